"""docs/method.md sections 1-3 on hand-built score vectors."""

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.offload import decisions as D
from moejax.offload.importance import classify, gate_weights, substitute, threshold_s
from moejax.offload.policies import LRU, ScoreEviction, mean_score


def _probs(*rows):
    p = np.array(rows, np.float64)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def _topk(probs, k):
    return np.argsort(-probs, axis=-1, kind="stable")[:, :k]


# one token, 8 experts, k = 2: selected 0 (0.30) and 1 (0.21); S = p[2] = 0.20
P = _probs([0.30, 0.21, 0.20, 0.15, 0.09, 0.03, 0.01, 0.01])


def test_threshold_is_k_plus_first():
    assert threshold_s(P, _topk(P, 2))[0] == pytest.approx(P[0, 2])


def test_threshold_is_best_unselected_for_group_limited_routing():
    """A group-limited router may skip expert 1 (another group); S is then p[1], not p[2]."""
    idx = np.array([[0, 2]])
    assert threshold_s(P, idx)[0] == pytest.approx(P[0, 1])
    _, top = classify(P, idx, alpha=0.0)
    assert top.tolist() == [[True, False]]  # p[2] < S: low-score even at alpha 0
    out, changed = substitute(P, idx, 0.3, available={1, 3})
    assert out.tolist() == [[0, 1]] and changed.tolist() == [[False, True]]  # best on-device in window


def test_classification_at_window_edges():
    idx = _topk(P, 2)
    S = P[0, 2]
    ratio = P[0, 1] / S  # expert 1 sits at (1 + a) * S for a = ratio - 1
    _, top = classify(P, idx, alpha=ratio - 1 - 1e-4)
    assert top.tolist() == [[True, True]]  # p >= (1+a) S: top-score
    _, top = classify(P, idx, alpha=ratio - 1 + 1e-4)
    assert top.tolist() == [[True, False]]  # just below: low-score
    _, top = classify(P, idx, alpha=0.0)
    assert top.all()  # alpha = 0: every selected expert is top-score


def test_alpha_zero_changes_nothing():
    idx = _topk(P, 2)
    out, changed = substitute(P, idx, 0.0, available=set())
    assert np.array_equal(out, idx) and not changed.any()


def test_substitute_best_resident_inside_window():
    idx = _topk(P, 2)  # [0, 1]; alpha 0.3: 1 is low-score (0.21 < 1.3 * 0.20)
    out, changed = substitute(P, idx, 0.3, available={3, 4, 2})
    # window ((1 - 0.3) S, S] = (0.14, 0.20]: 2 (0.20) and 3 (0.15) qualify, 4 (0.09) does not
    assert out.tolist() == [[0, 2]] and changed.tolist() == [[False, True]]
    out, _ = substitute(P, idx, 0.3, available={3, 4})
    assert out.tolist() == [[0, 3]]
    out, changed = substitute(P, idx, 0.3, available={4, 5})  # nothing in the window: keep and fetch
    assert out.tolist() == [[0, 1]] and not changed.any()


def test_low_score_kept_when_resident_or_batch_top_score():
    idx = _topk(P, 2)
    out, changed = substitute(P, idx, 0.3, available={1, 2})
    assert out.tolist() == [[0, 1]] and not changed.any()  # 1 is on the device
    # a second token whose top-score expert is 1: it is computed anyway, so token 0 keeps it
    P2 = np.concatenate([P, _probs([0.05, 0.60, 0.10, 0.10, 0.05, 0.05, 0.03, 0.02])])
    idx2 = _topk(P2, 2)
    out, changed = substitute(P2, idx2, 0.3, available={2})
    assert out[0].tolist() == [0, 1] and not changed[0].any()


def test_batch_top_score_expert_can_be_a_substitute():
    # token 1's top-score expert 3 is computed anyway: token 0 may use it though it is not resident
    P2 = np.concatenate([P, _probs([0.05, 0.05, 0.05, 0.70, 0.05, 0.05, 0.03, 0.02])])
    idx2 = _topk(P2, 2)
    out, changed = substitute(P2, idx2, 0.3, available=set())
    assert out[0].tolist() == [0, 3] and changed[0].tolist() == [False, True]


def test_substitutes_distinct_exactly_k_and_never_selected():
    rng = np.random.default_rng(0)
    for _ in range(200):
        logits = rng.normal(size=(3, 16)) * rng.uniform(0.1, 3)
        probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)  # substitute's precision
        k, alpha = 4, rng.uniform(0, 0.9)
        idx = _topk(probs, k)
        avail = set(rng.choice(16, size=rng.integers(0, 16), replace=False).tolist())
        out, changed = map(np.asarray, substitute(probs, idx, alpha, avail))
        S, top = map(np.asarray, classify(probs, idx, alpha))
        batch_top = set(idx[top].tolist())
        for n in range(3):
            assert len(set(out[n].tolist())) == k  # k distinct experts
            assert np.array_equal(out[n][top[n]], idx[n][top[n]])  # top-score untouched
            for j in np.nonzero(changed[n])[0]:
                c = out[n, j]
                assert c not in idx[n]  # an unselected expert
                assert c in avail or c in batch_top  # on the device or computed anyway
                assert (1 - alpha) * S[n] < probs[n, c] <= S[n]  # inside the window


def test_similarity_modes_rank_by_similarity():
    idx = _topk(P, 2)
    sim = np.eye(8)
    sim[1, 3], sim[1, 2], sim[1, 6] = 0.9, 0.1, 0.95
    out, _ = substitute(P, idx, 0.3, available={2, 3, 6}, mode="hybrid", similarity=sim)
    assert out.tolist() == [[0, 3]]  # 6 is more similar but outside the window
    out, _ = substitute(P, idx, 0.3, available={2, 3, 6}, mode="similarity", similarity=sim)
    assert out.tolist() == [[0, 6]]  # no window in similarity mode


@pytest.mark.parametrize("renorm", [True, False])
def test_gate_weights_are_own_probabilities(renorm):
    experts = np.array([[0, 3]])
    w = gate_weights(P, experts, renorm)
    raw = P[0, [0, 3]]
    assert np.allclose(w, raw / raw.sum() if renorm else raw)
    assert np.allclose(gate_weights(P, experts, renorm, scale=2.5), 2.5 * w)


def test_sigmoid_importance_is_normalised_and_keeps_order():
    from moejax.model.moe import importance

    scores = np.array([[0.9, 0.2, 0.6, 0.95]], np.float32)  # independent sigmoids, sum 2.65
    p = importance(scores, "sigmoid")
    assert p.sum() == pytest.approx(1.0) and np.argsort(p[0]).tolist() == np.argsort(scores[0]).tolist()
    assert p[0, 3] == pytest.approx(0.95 / 2.65)
    assert importance(scores, "softmax") is scores  # a softmax is a distribution already


def test_score_eviction_mean_over_window_all_experts():
    lay = D.Layout(2, 3, 3)  # one pool shared by 2 MoE layers of 3 experts
    pol = ScoreEviction(score_window=2)
    s = D.init_state(lay, score_window=2)
    s = D.observe(s, 0, _probs([0.1, 0.5, 0.4]))
    s = D.observe(s, 0, _probs([0.4, 0.2, 0.4], [0.6, 0.0, 0.4]))  # a batch: its mean, [0.5, 0.1, 0.4]
    s = D.observe(s, 0, _probs([0.6, 0.3, 0.1]))  # window of 2: the first observation drops out
    assert np.asarray(s["hist_n"]).tolist() == [3, 0]
    assert np.allclose(np.asarray(s["hist"])[0], [[0.6, 0.3, 0.1], [0.5, 0.1, 0.4]])  # a ring buffer
    mean = np.asarray(mean_score(s))
    assert np.allclose(mean[0], [0.55, 0.2, 0.25]) and (mean[1] == 0).all()  # every expert, selected or not
    # layer 0 holds all three, expert 1 the most recently used (LRU would evict 0);
    # layer 1 needs a slot: the lowest mean score goes, (0, 1) at (0.1 + 0.3) / 2 = 0.2
    s = D.plan_decode(s, lay, pol, 0, jnp.array([[0, 2, 1]]))[0]
    _, f, _ = D.plan_decode(s, lay, pol, 1, jnp.array([[2]]))
    assert int(f.count) == 1 and int(f.slots[0]) == 2 and np.asarray(s["owner"])[2] == 1
    assert int(D.plan_decode(s, lay, LRU(), 1, jnp.array([[2]]))[1].slots[0]) == 0  # LRU: (0, 0)
    # an unobserved layer: every mean is 0, ties go to the least recently used
    s = D.init_state(lay, score_window=2)
    s = D.plan_decode(s, lay, pol, 1, jnp.array([[0, 1]]))[0]  # (1, 0) slot 0, (1, 1) slot 1
    s = D.plan_decode(s, lay, pol, 1, jnp.array([[2, 0]]))[0]  # (1, 2) slot 2; (1, 0) used again
    _, f, _ = D.plan_decode(s, lay, pol, 0, jnp.array([[0]]))
    assert int(f.count) == 1 and int(f.slots[0]) == 1  # (1, 1): least recently used


def _substitute_reference(probs, idx, alpha, available, mode, similarity):
    """substitute as it was on the host before the jnp rewrite (sets and Python loops; ties in
    the order of the low-score experts sorted stably)."""
    out, changed = idx.copy(), np.zeros(idx.shape, bool)
    if alpha <= 0:
        return out, changed
    N, k = idx.shape
    S = np.array([max(probs[n, c] for c in range(probs.shape[1]) if c not in idx[n]) for n in range(N)])
    top = np.array([[probs[n, idx[n, j]] >= (1.0 + alpha) * S[n] for j in range(k)] for n in range(N)])
    usable = set(available) | {int(idx[n, j]) for n in range(N) for j in range(k) if top[n, j]}
    for n in range(N):
        low = [j for j in np.argsort(-probs[n, idx[n]], kind="stable")
               if not top[n, j] and int(idx[n, j]) not in usable]
        selected = set(idx[n].tolist())
        cands = [c for c in usable if c not in selected]
        if mode != "similarity":
            cands = [c for c in cands if probs[n, c] > (1.0 - alpha) * S[n]]
        taken = set()
        for j in low:
            e = int(idx[n, j])
            free = [c for c in cands if c not in taken]
            if not free:
                break
            if mode == "window":
                best = max(free, key=lambda c: (probs[n, c], -c))
            else:
                best = max(free, key=lambda c: (similarity[e, c], probs[n, c], -c))
            taken.add(best)
            out[n, j] = best
            changed[n, j] = True
    return out, changed


def test_substitute_matches_the_host_reference():
    """100 random batches (N = 3, E = 16, k = 4), every mode in turn, random alpha,
    availability and similarity: the jnp substitute gives the reference's experts and mask."""
    rng = np.random.default_rng(1)
    modes = ("window", "hybrid", "similarity")
    n_changed = dict.fromkeys(modes, 0)
    for case in range(100):
        mode = modes[case % 3]
        logits = rng.normal(size=(3, 16)) * rng.uniform(0.1, 3)
        probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
        idx = _topk(probs, 4)
        alpha = float(rng.uniform(0.05, 0.9))
        mask = rng.random(16) < rng.uniform(0, 1)
        sim = rng.random((16, 16)).astype(np.float32)
        available = mask if case % 2 else set(np.nonzero(mask)[0].tolist())  # both forms
        want_out, want_changed = _substitute_reference(probs, idx, alpha, set(np.nonzero(mask)[0].tolist()), mode, sim)
        out, changed = substitute(probs, idx, alpha, available, mode, sim if mode != "window" else None)
        assert np.asarray(out).tolist() == want_out.tolist(), (case, mode, alpha)
        assert np.asarray(changed).tolist() == want_changed.tolist(), (case, mode, alpha)
        n_changed[mode] += int(want_changed.sum())
    assert min(n_changed.values()) >= 10, n_changed  # the cases do substitute, in every mode


def _substitute_reference(probs, idx, alpha, avail, mode, sim):
    """The rules of the module docstring, one token and one low-score expert at a time (numpy)."""
    N, k = idx.shape
    E = probs.shape[1]
    S, top = map(np.asarray, classify(probs, idx, alpha))
    usable = np.zeros(E, bool)
    usable[list(avail)] = True
    usable[idx[top]] = True
    out, changed = idx.copy(), np.zeros(idx.shape, bool)
    for n in range(N):
        cands = usable.copy()
        cands[idx[n]] = False
        if mode != "similarity":
            cands &= probs[n] > np.float32(1.0 - alpha) * S[n]
        for j in np.argsort(-probs[n, idx[n]], kind="stable"):
            e = idx[n, j]
            if top[n, j] or usable[e] or not cands.any():
                continue
            if mode == "window":
                rank = np.where(cands, probs[n], -np.inf)
            else:
                s = np.where(cands, sim[e], -np.inf)
                rank = np.where(cands & (s == s.max()), probs[n], -np.inf)
            out[n, j], changed[n, j] = np.argmax(rank), True
            cands[out[n, j]] = False
    return out, changed


@pytest.mark.parametrize("mode", ["window", "hybrid", "similarity"])
def test_substitute_matches_one_token_at_a_time(mode):
    """The batch-vectorised substitution equals the rules applied token by token."""
    rng = np.random.default_rng(1)
    for _ in range(60):
        N, E, k = rng.integers(1, 5), 16, int(rng.integers(1, 5))
        logits = rng.normal(size=(N, E)) * rng.uniform(0.1, 3)
        probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
        idx = _topk(probs, k)
        alpha = float(rng.uniform(0.05, 0.9))
        avail = set(rng.choice(E, size=rng.integers(0, E), replace=False).tolist())
        sim = rng.uniform(size=(E, E)).round(1).astype(np.float32)  # ties on purpose
        out, changed = map(np.asarray, substitute(probs, idx, alpha, avail, mode, sim))
        want_out, want_changed = _substitute_reference(probs, idx, alpha, avail, mode, sim)
        assert np.array_equal(out, want_out) and np.array_equal(changed, want_changed)
