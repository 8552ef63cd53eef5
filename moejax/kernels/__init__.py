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
           "moejax_linear": "MoejaxLinear", "moejax_linear_t": "MoejaxLinearT",
           "moejax_attend_decode": "MoejaxAttendDecode"}

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


MADV_COLLAPSE = 25  # Linux 6.1+: back a populated range with huge pages now


def huge_pages(arrays, min_bytes: int = 4 << 20) -> int:
    """Back the CPU buffers of `arrays` (those of at least min_bytes) with 2 MiB pages, through
    madvise(MADV_COLLAPSE). Decode streams every weight once per token; with 4 KiB pages that is
    a TLB miss and a restart of the hardware prefetcher every 4 KiB. Returns the bytes
    collapsed: 0 off Linux, on other devices, or where the kernel refuses (nothing changes then)."""
    if sys.platform != "linux" or os.environ.get("MOEJAX_HUGE_PAGES", "1") == "0":
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page, done = 2 << 20, 0
    for a in arrays:
        if a.nbytes < min_bytes or any(d.platform != "cpu" for d in a.devices()):
            continue
        try:
            start = a.unsafe_buffer_pointer()
        except (RuntimeError, ValueError):  # several shards, or deleted
            continue
        lo, hi = -(-start // page) * page, (start + a.nbytes) // page * page
        if hi > lo and madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
            done += hi - lo
    return done
