import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _moejax_cache(tmp_path_factory):
    """Conversions and compiled programs (the CLI's compile cache) go to a temporary
    directory, never ~/.cache; tests may point MOEJAX_CACHE elsewhere themselves."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEJAX_CACHE", str(tmp_path_factory.mktemp("moejax-cache")))
        from moejax.api import enable_compile_cache

        enable_compile_cache()  # engines built alike in several tests compile once
        yield


@pytest.fixture(scope="module", autouse=True)
def _drop_compiled_programs():
    """After each test module, drop JAX's in-memory compiled programs (later modules load them
    from the persistent cache if they need them again). One process otherwise holds every
    program the suite compiled; a full run once ended in a segfault inside XLA:CPU's compiler
    late in the suite, while the same module alone passed."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """Session cache of (hf_dir, converted_dir, torch_model) keyed by a test-chosen name,
    so tests that share a tiny model convert it once."""
    from moejax.convert import convert
    from tiny import save_hf

    root = tmp_path_factory.mktemp("tiny")
    made = {}

    def get(name, config, seed=0, fused=False, builder=save_hf):
        if name not in made:
            hf_dir = root / f"{name}-hf"
            torch_model = builder(hf_dir, config, seed=seed, fused=fused)
            out = root / f"{name}-mj"
            convert(hf_dir, out, progress=False)
            made[name] = (hf_dir, out, torch_model)
        return made[name]

    return get
