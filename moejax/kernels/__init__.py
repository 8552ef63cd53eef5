"""The CPU expert kernel (cpu_experts.cc): built on first use with the system C++ compiler,
cached under the moejax cache directory, and registered with XLA as an FFI custom call.

`available()` says whether it can be used. Without a compiler, or with MOEJAX_CPU_KERNEL=0,
moejax computes experts with plain jnp (the formulation every other backend runs). The
library is keyed by the source, the compiler flags, jaxlib's version and the CPU model, so a
changed source or machine builds again; the build holds a file lock, so concurrent first uses
build it once.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu_experts.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
TARGETS = {"moejax_experts_decode": "MoejaxExpertsDecode", "moejax_experts_ordered": "MoejaxExpertsOrdered",
           "moejax_linear": "MoejaxLinear", "moejax_linear_t": "MoejaxLinearT"}

_state: dict = {}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_path() -> Path:
    import jaxlib

    from moejax.api import cache_dir

    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(FLAGS).encode(), jaxlib.__version__.encode(),
                                     _cpu_model().encode()])).hexdigest()[:16]
    return cache_dir() / "kernels" / f"cpu_experts-{key}.so"


def build(out: Path) -> Path:
    """Compile cpu_experts.cc into `out` (atomically: a temporary file, then a rename)."""
    import jax
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if out.is_file():
            return out
        cxx = os.environ.get("CXX", "c++")
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(tmp)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def available() -> bool:
    """Build (once per machine) and register the kernel; False where it cannot be used."""
    if "ok" in _state:
        return _state["ok"]
    ok = False
    if os.environ.get("MOEJAX_CPU_KERNEL", "1") != "0":
        try:
            import jax

            lib = ctypes.cdll.LoadLibrary(str(build(library_path())))
            for target, symbol in TARGETS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
            _state["lib"] = lib
            ok = True
        except (OSError, subprocess.CalledProcessError, AttributeError) as e:
            detail = e.stderr.strip().splitlines()[-1] if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
            print(f"moejax: CPU kernels unavailable ({detail}); computing with jnp", file=sys.stderr)
    _state["ok"] = ok
    return ok


def usable(x, w, packed: bool = False) -> bool:
    """Whether the kernels compute with activations x and weights w: float32 or bfloat16
    activations, float32, bfloat16 or bfloat16-bits (uint16) weights, or (packed) quantized
    experts as uint8 rows, and a built kernel."""
    import jax.numpy as jnp

    weights = (jnp.uint8,) if packed else (jnp.float32, jnp.bfloat16, jnp.uint16)
    return x.dtype in (jnp.float32, jnp.bfloat16) and w.dtype in weights and available()
