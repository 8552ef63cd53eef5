"""moejax as a model of EleutherAI's lm-evaluation-harness (`pip install -e ".[lm-eval]"`).

Importing this module registers the model `moejax`; the harness has no discovery of models
from other packages, so its command line is run through this module:

    python -m moejax.eval.harness run --model moejax \\
        --model_args path=checkpoints/moejax-shakespeare-moe,vram_budget=25%,policy=smoe,alpha=0.3 \\
        --tasks hellaswag

model_args (all optional): path (default: the bundled model), vram_budget (as --vram-budget;
none: every expert resident), policy (default smoe with a budget, else resident), alpha,
substitute (window, hybrid, similarity, skip), similarity, score_window, prefetch_width, engine (fused,
stepwise), per_layer, prefix (context tokens prefilled, or "all"; default 8), max_length (the
longest sequence scored; default the model's context).

Requests are scored as `moejax eval tasks` scores a choice (moejax.eval.tasks: the harness's
own context/continuation split, decode mode after `prefix` prefilled tokens; requests with the
same context share its computation, in the harness's order). One engine serves every request
of a run, never reset, so its pool evolves as in a server. generate_until decodes greedily
(sampling arguments are ignored) until one of `until` or max_gen_toks tokens.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from moejax.eval import tasks as T


@register_model("moejax")
class MoejaxLM(LM):
    def __init__(self, path=None, vram_budget=None, policy=None, alpha=None, substitute="window", similarity=None,
                 score_window=16, engine=None, per_layer=False, prefix=8, max_length=None, prefetch_width=0,
                 **unused):
        super().__init__()
        import moejax
        from moejax import cli

        self.model = moejax.load(path or cli.bundled_model())
        cfg = self.model.config
        if self.model.tokenizer is None:
            from moejax.errors import MoejaxError

            raise MoejaxError(f"{self.model.path} has no tokenizer.json")
        self.spec = cli.parse_budget_arg(str(vram_budget)) if vram_budget not in (None, "") else None
        self.policy = policy or ("smoe" if self.spec else "resident")
        self.sub = cli.Substitution(cli.DEFAULT_ALPHA if alpha is None else float(alpha), substitute, similarity,
                                    int(score_window), int(prefetch_width))
        self.kind = "none" if self.policy == "resident" else (engine or "fused")
        self.per_layer = bool(per_layer)
        self.prefix = cli._prefix_arg(str(prefix))
        self.max_length = int(max_length or cfg.max_position_embeddings)
        self.eot = cfg.eos_token_ids[0] if cfg.eos_token_ids else (cfg.bos_token_id or 0)
        self.steps, self.engine, self.cache_len = None, None, 0

    # ---- the resident model or engine, with a cache long enough -------------------------
    def _ready(self, need: int):
        """What prefill/step run on, with a KV cache of at least `need` positions (a longer
        request than any before builds the engine again, with an empty pool)."""
        from moejax import cli
        from moejax.generate import cache_length

        if self.steps is None or need > self.cache_len:
            self.cache_len = cache_length(min(need, self.max_length), 0)
            self.steps, self.engine, _ = cli.task_steps(self.model, self.policy, self.kind, self.spec, self.cache_len,
                                                        self.per_layer, self.sub)
        return self.steps

    def _fit(self, ctx: list[int], conts: list[list[int]]) -> list[int]:
        """Cut the context from the left so that the longest continuation fits max_length."""
        room = self.max_length - max(len(c) for c in conts)
        return ctx[-room:] if room > 0 else ctx[-1:]

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) pairs -> (log-likelihood, greedy), contexts shared."""
        from tqdm.auto import tqdm

        groups: dict[tuple, list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            groups.setdefault(tuple(ctx), []).append(i)
        out: list = [None] * len(pairs)
        fitted = [(self._fit(list(ctx), [pairs[i][1] for i in idx]), idx) for ctx, idx in groups.items()]
        steps = self._ready(max(len(ctx) + max(len(pairs[i][1]) for i in idx) for ctx, idx in fitted))
        for ctx, idx in tqdm(fitted, desc="moejax", unit="context", disable=len(fitted) < 2):
            for i, r in zip(idx, T.score_continuations(steps, ctx or [self.eot], [pairs[i][1] for i in idx],
                                                       self.prefix)):
                out[i] = r
        return out

    # ---- the harness's interface --------------------------------------------------------
    def _encode(self, context: str, continuation: str):
        if not context:  # the harness scores such requests after an end-of-text token
            return [self.eot], self.model.tokenizer.encode(continuation, add_special_tokens=False).ids
        return T.encode_pair(self.model.tokenizer, context, continuation)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = self._score([self._encode(*r.args) for r in requests])
        for r, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for r in requests:
            ids = self.model.tokenizer.encode(r.args[0], add_special_tokens=False).ids
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=ids, prefix_token=self.eot, max_seq_len=self.max_length, context_len=1)]
            total = sum(ll for ll, _ in self._score(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
            out.append(total)
        return out

    def generate_until(self, requests) -> list[str]:
        import numpy as np

        tok, out = self.model.tokenizer, []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.get("max_gen_toks", 256))
            ids = (tok.encode(context, add_special_tokens=False).ids or [self.eot])[-(self.max_length - n):]
            prompt = np.array([ids], np.int32)
            stop = self.model.config.eos_token_ids
            if self.engine is None and self.policy == "resident":
                g = self.model.generate(prompt, n, stop_ids=stop)
            else:
                self._ready(len(ids) + n)
                g = self.engine.generate(prompt, n, stop_ids=stop)
            text = tok.decode(g.tokens[0])
            for s in until:
                text = text.split(s)[0] if s else text
            self.cache_hook.add_partial("generate_until", r.args, text)
            out.append(text)
        return out


if __name__ == "__main__":  # the harness's own command line, with `moejax` registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
