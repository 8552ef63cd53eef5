"""CPU throughput of moejax against llama.cpp on the same weights and the same prompt ids.

llama.cpp is what a user without a GPU runs MoE models with, so it is the anchor for
moejax's CPU path (issue 15). This program

1. builds llama.cpp (unless --llama-build names a cmake build of it): the copy vendored in the
   `llama-cpp-python==0.3.36` source archive from PyPI (`pip download --no-binary :all:`),
   configured Release with -DGGML_NATIVE=ON, only the targets needed (llama-bench and the
   library), plus a 100-line greedy decoder over libllama (written below) that takes prompt
   token ids and prints the argmax ids and its timings. Everything is cached in
   $MOEJAX_CACHE/llama.cpp (default ~/.cache/moejax/llama.cpp): a second run builds nothing;
2. converts each Hugging Face checkpoint to GGUF (f32, bf16, and q8_0 as an extra
   llama.cpp-only row) with llama.cpp's own convert_hf_to_gguf.py and the gguf-py of the same
   tree; "int8" (both systems: routed experts 8-bit, the rest bf16) is the bf16 GGUF with its
   expert tensors requantized to q8_0 by llama-quantize --tensor-type, and on moejax's side the
   checkpoint converted with --experts int8. A tokenizer whose BPE pre-tokenizer hash llama.cpp does not know (the bundled
   model's) gets the rule --bpe-pre (default "gpt-2", the rule the bundled tokenizer uses):
   the converter runs inside a small wrapper that maps it at run time; no vendored file is
   edited. Random models without a tokenizer get the bundled model's tokenizer (llama.cpp
   pads the vocabulary; the tokens are given as ids, so the text side does not matter);
3. runs the systems interleaved, trial by trial, on the same prompt ids:
   * moejax: `moejax.load(path, dtype=...)`, `Model.generate` greedy (warmed up first);
     prefill tokens/s = prompt length / median time to the first token of --bench-reps
     generations, decode tokens/s = 1 / mean step time (each step reads its token back to the
     host, which synchronises it);
   * llama.cpp `llama-bench -p 32 -n 64 -t 2` (its defaults otherwise): pp and tg tokens/s;
   * llama.cpp greedy decoder with flash attention off and an f32 KV cache: its tokens
     (compared with moejax's: equal, and for how many tokens from the start) and the same
     prefill / decode timings as moejax's.

Run it on an otherwise idle machine: llama.cpp's worker threads wait for each other at every
op, so with -t equal to the core count one other busy process stalls it for whole scheduler
slices (seen here: 15-45 tok/s instead of ~1000 while a test suite ran). The load average
at the start and the end is recorded.

Writes one JSON file (machine, date, llama.cpp commit, command, per model and dtype the
medians, every trial, the ratios moejax / llama.cpp) and prints a markdown table.

    python scripts/bench_llamacpp.py --models checkpoints/moejax-shakespeare-moe --json out/llamacpp.json
    python scripts/bench_llamacpp.py --models medium --dtypes f32,bf16 --json out/llamacpp_medium.json

"medium" and "small" are the random qwen2_moe models of scripts/bench_resident.py.
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

LLAMA_CPP_PYTHON = "0.3.36"
REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "checkpoints" / "moejax-shakespeare-moe"
PROMPT_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
               "First Citizen:\nYou are all resolved rather to die than to famish?\n")
MJ_DTYPE = {"f32": "float32", "bf16": "bfloat16", "int8": "bfloat16"}
# "int8": routed experts 8-bit, everything else bfloat16, in both systems: moejax `convert
# --dtype bfloat16 --experts int8` (a scale per output channel) against llama.cpp's bf16 GGUF
# with its expert tensors requantized to q8_0 (a scale per 32 weights) by llama-quantize.
EXPERT_Q8 = ("ffn_gate_exps=q8_0", "ffn_up_exps=q8_0", "ffn_down_exps=q8_0")


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------------------------
# llama.cpp: source, build, greedy decoder
# --------------------------------------------------------------------------------------------

GREEDY_CPP = r"""
// moejax-greedy: greedy decoding over libllama from given prompt token ids.
// usage: moejax-greedy MODEL.gguf N_NEW THREADS ID,ID,... FA(0|1) KV(f32|f16) REPS
// prints one JSON object: {"tokens": [...], "prefill_s": [...], "decode_step_s": [[...], ...]}
// run 0 is a warm-up (not timed in the output); every run starts from an empty KV cache.
#include "llama.h"
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_WARN) fputs(text, stderr);
}

static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static int argmax(const float * x, int n) {
    int best = 0;
    for (int i = 1; i < n; ++i) if (x[i] > x[best]) best = i;
    return best;
}

int main(int argc, char ** argv) {
    if (argc != 8) { fprintf(stderr, "usage: %s MODEL N_NEW THREADS IDS FA KV REPS\n", argv[0]); return 2; }
    const char * path = argv[1];
    const int n_new = atoi(argv[2]), threads = atoi(argv[3]);
    std::vector<llama_token> prompt;
    for (char * s = strtok(argv[4], ","); s; s = strtok(nullptr, ",")) prompt.push_back(atoi(s));
    const bool fa = atoi(argv[5]) != 0;
    const bool kv32 = strcmp(argv[6], "f32") == 0;
    const int reps = atoi(argv[7]);
    const int n_prompt = (int) prompt.size();

    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(path, mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", path); return 1; }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_prompt + n_new + 16;
    cp.n_batch = cp.n_ubatch = n_prompt;
    cp.n_threads = cp.n_threads_batch = threads;
    cp.flash_attn_type = fa ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.type_k = cp.type_v = kv32 ? GGML_TYPE_F32 : GGML_TYPE_F16;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create a context\n"); return 1; }
    llama_batch_ext * batch = llama_batch_ext_init(ctx);

    std::vector<int> tokens;
    std::vector<double> prefill_s;
    std::vector<std::vector<double>> steps_s;
    for (int r = 0; r <= reps; ++r) {
        llama_memory_clear(llama_get_memory(ctx), true);
        tokens.clear();
        std::vector<double> steps;
        llama_batch_ext_clear(batch);
        for (int i = 0; i < n_prompt; ++i) {
            const int idx = llama_batch_ext_add_token(batch, 0, prompt[i]);
            const llama_pos pos = i;
            llama_batch_ext_set_pos(batch, idx, &pos);
        }
        llama_batch_ext_set_output_logits(batch, n_prompt - 1, true);
        double t = now();
        if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch)) { fprintf(stderr, "prefill failed\n"); return 1; }
        int tok = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
        const double pf = now() - t;
        tokens.push_back(tok);
        for (int i = 1; i < n_new; ++i) {
            t = now();
            llama_batch_ext_clear(batch);
            const int idx = llama_batch_ext_add_token(batch, 0, tok);
            const llama_pos pos = n_prompt + i - 1;
            llama_batch_ext_set_pos(batch, idx, &pos);
            llama_batch_ext_set_output_logits(batch, idx, true);
            if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch)) { fprintf(stderr, "decode failed\n"); return 1; }
            tok = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
            steps.push_back(now() - t);
            tokens.push_back(tok);
        }
        if (r > 0) { prefill_s.push_back(pf); steps_s.push_back(steps); }
    }
    printf("{\"tokens\": [");
    for (size_t i = 0; i < tokens.size(); ++i) printf("%s%d", i ? ", " : "", tokens[i]);
    printf("], \"prefill_s\": [");
    for (size_t i = 0; i < prefill_s.size(); ++i) printf("%s%.9f", i ? ", " : "", prefill_s[i]);
    printf("], \"decode_step_s\": [");
    for (size_t r = 0; r < steps_s.size(); ++r) {
        printf("%s[", r ? ", " : "");
        for (size_t i = 0; i < steps_s[r].size(); ++i) printf("%s%.9f", i ? ", " : "", steps_s[r][i]);
        printf("]");
    }
    printf("]}\n");
    llama_batch_ext_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
"""


def cache_root() -> Path:
    return Path(os.environ.get("MOEJAX_CACHE", Path.home() / ".cache" / "moejax")) / "llama.cpp"


def run(cmd, log: Path | None = None, **kw) -> subprocess.CompletedProcess:
    """Run cmd; on failure raise BenchError with the command and the tail of its output."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(map(str, cmd))}\n{p.stdout}\n{p.stderr}\n")
    if p.returncode != 0:
        tail = (p.stderr.strip() or p.stdout.strip()).splitlines()[-15:]
        raise BenchError(f"{Path(str(cmd[0])).name} failed (exit {p.returncode}):\n" + "\n".join(tail))
    return p


def need_tools(cmake: bool = True) -> str:
    """The C++ compiler, or a one-line BenchError when cmake or a compiler is missing."""
    if cmake and shutil.which("cmake") is None:
        raise BenchError("cmake not found on PATH: it is needed to build llama.cpp (install cmake, "
                         "or pass --llama-build DIR of an existing llama.cpp build)")
    cxx = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if cxx is None or shutil.which(cxx) is None:
        raise BenchError("no C++ compiler found (c++, g++, clang++ or $CXX): it is needed to build llama.cpp")
    return cxx


def fetch_source(root: Path) -> Path:
    """llama.cpp as vendored in the llama-cpp-python sdist, extracted under root/src."""
    src = root / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").is_file() and (root / "src" / ".extracted").is_file():
        return src
    dl = root / "download"
    dl.mkdir(parents=True, exist_ok=True)
    archive = dl / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not archive.is_file():
        print(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON} (source archive) ...", file=sys.stderr)
        run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-binary",
             ":all:", "--no-deps", "-d", dl])
    if not archive.is_file():
        raise BenchError(f"pip download did not produce {archive.name} in {dl}")
    shutil.rmtree(root / "src", ignore_errors=True)
    (root / "src").mkdir(parents=True)
    import tarfile

    with tarfile.open(archive) as tf:
        tf.extractall(root / "src", filter="data")
    if not (src / "CMakeLists.txt").is_file():
        raise BenchError(f"{archive.name} has no vendor/llama.cpp")
    (root / "src" / ".extracted").write_text("")
    return src


def source_of(build: Path) -> Path:
    """The llama.cpp source directory of a cmake build directory (from its CMakeCache.txt)."""
    cache = build / "CMakeCache.txt"
    if not cache.is_file():
        raise BenchError(f"--llama-build {build}: no CMakeCache.txt (not a cmake build directory of llama.cpp)")
    for line in cache.read_text().splitlines():
        if line.startswith("CMAKE_HOME_DIRECTORY:"):
            return Path(line.split("=", 1)[1])
    raise BenchError(f"{cache}: no CMAKE_HOME_DIRECTORY")


def find_file(build: Path, name: str) -> Path | None:
    hits = sorted(build.rglob(name))
    return hits[0] if hits else None


def build_llama(src: Path, build: Path, jobs: int) -> None:
    need_tools()
    build.mkdir(parents=True, exist_ok=True)
    log = build.parent / "build.log"
    print(f"building llama.cpp in {build} (log {log}) ...", file=sys.stderr)
    t0 = time.perf_counter()
    run(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=ON",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
         "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DGGML_OPENMP=ON"], log=log)
    run(["cmake", "--build", build, "--config", "Release", "-j", str(jobs), "--target", "llama-bench", "llama",
         "llama-quantize"], log=log)
    print(f"built llama.cpp in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def build_greedy(src: Path, build: Path, out: Path) -> Path:
    cxx = need_tools(cmake=False)
    lib = find_file(build, "libllama.so") or find_file(build, "libllama.dylib")
    if lib is None:
        raise BenchError(f"no libllama shared library under {build} (build llama.cpp with -DBUILD_SHARED_LIBS=ON)")
    out.parent.mkdir(parents=True, exist_ok=True)
    cpp = out.with_suffix(".cpp")
    cpp.write_text(GREEDY_CPP)
    run([cxx, "-O2", "-std=c++17", cpp, "-o", out, f"-I{src / 'include'}", f"-I{src / 'ggml' / 'include'}",
         f"-L{lib.parent}", "-lllama", f"-Wl,-rpath,{lib.parent}"])
    return out


def llama_tools(a) -> dict:
    """{src, build, bench, greedy, commit} of a given build or the cached one (built once)."""
    if a.llama_build is not None:
        build = a.llama_build.resolve()
        src = source_of(build)
        root = cache_root() / "given" / hashlib.sha256(str(build).encode()).hexdigest()[:16]
    else:
        root = cache_root()
        build = root / "build"
        built = find_file(build / "bin", "llama-bench") is not None and find_file(build, "libllama.so") is not None
        if not built:
            need_tools()  # before the download
        src = fetch_source(root)
        if not built:
            build_llama(src, build, a.jobs)
    bench = find_file(build, "llama-bench")
    if bench is None:
        raise BenchError(f"no llama-bench under {build}")
    quantize = find_file(build, "llama-quantize")
    if quantize is None and a.llama_build is None and "int8" in a.dtypes:  # a build from before the int8 row
        run(["cmake", "--build", build, "--config", "Release", "-j", str(a.jobs), "--target", "llama-quantize"],
            log=root / "build.log")
        quantize = find_file(build, "llama-quantize")
    greedy = root / "bin" / "moejax-greedy"
    if not greedy.is_file() or greedy.stat().st_mtime < bench.stat().st_mtime:
        greedy = build_greedy(src, build, greedy)
    commit = "unknown"
    g = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    if g.returncode == 0 and g.stdout.strip():
        commit = g.stdout.strip()
    return {"src": src, "build": build, "bench": bench, "greedy": greedy, "quantize": quantize, "commit": commit}


# --------------------------------------------------------------------------------------------
# Models and GGUF conversion
# --------------------------------------------------------------------------------------------

CONVERT_WRAPPER = r"""
# Runs llama.cpp's convert_hf_to_gguf.py with one change made at run time: a BPE pre-tokenizer
# that llama.cpp does not recognise gets the rule named in MOEJAX_BPE_PRE (the vendored files
# are not edited).
import logging, os, runpy, sys
src = sys.argv.pop(1)
sys.path.insert(0, src)
sys.path.insert(1, os.path.join(src, "gguf-py"))
import conversion.base as base
orig = base.TextModel.get_vocab_base_pre

def get_vocab_base_pre(self, tokenizer):
    try:
        return orig(self, tokenizer)
    except NotImplementedError:
        rule = os.environ.get("MOEJAX_BPE_PRE")
        if not rule:
            raise
        logging.getLogger("bench_llamacpp").warning("unknown BPE pre-tokenizer hash: mapped to %r", rule)
        print(f"MOEJAX_BPE_PRE_MAPPED={rule}", file=sys.stderr)
        return rule

base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv[0] = os.path.join(src, "convert_hf_to_gguf.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def random_model(size: str, root: Path) -> Path:
    """The random qwen2_moe of scripts/bench_resident.py, saved as HF, with the bundled tokenizer."""
    spec = importlib.util.spec_from_file_location("bench_resident", REPO / "scripts" / "bench_resident.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if size not in mod.SIZES:
        raise BenchError(f"unknown random model {size!r} (one of {', '.join(mod.SIZES)}) and no such directory")
    hf = root / "hf"
    if not (hf / "config.json").is_file():
        _, n = mod.build(size, root)
        print(f"random {size} qwen2_moe: {n / 1e6:.1f} M parameters", file=sys.stderr)
    give_tokenizer(hf)
    return hf


def give_tokenizer(hf: Path) -> None:
    """llama.cpp's converter needs a tokenizer: lend the bundled one to a model without one."""
    if (hf / "tokenizer.json").is_file():
        return
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED / name, hf / name)


def to_gguf(tools: dict, hf: Path, outtype: str, out: Path, bpe_pre: str) -> dict:
    if out.is_file():
        return {"path": str(out), "bpe_pre_mapped": None}
    if outtype == "int8":  # the bf16 GGUF, expert tensors requantized to q8_0
        if tools.get("quantize") is None:
            raise BenchError("the int8 row needs llama-quantize (build the target llama-quantize in --llama-build)")
        bf16 = to_gguf(tools, hf, "bf16", out.with_name("model-bf16.gguf"), bpe_pre)
        tmp = out.with_suffix(".part")
        types = [x for t in EXPERT_Q8 for x in ("--tensor-type", t)]
        run([tools["quantize"], *types, bf16["path"], tmp, "BF16"])
        tmp.rename(out)
        return {"path": str(out), "bpe_pre_mapped": bf16["bpe_pre_mapped"], "llama_quantize": [*types, "BF16"]}
    wrapper = out.parent / "convert_wrapper.py"
    wrapper.write_text(CONVERT_WRAPPER)
    env = dict(os.environ, MOEJAX_BPE_PRE=bpe_pre or "")
    tmp = out.with_suffix(".part")
    p = run([sys.executable, wrapper, tools["src"], hf, "--outtype", outtype, "--outfile", tmp], env=env)
    tmp.rename(out)
    mapped = next((ln.split("=", 1)[1] for ln in p.stderr.splitlines() if ln.startswith("MOEJAX_BPE_PRE_MAPPED=")), None)
    return {"path": str(out), "bpe_pre_mapped": mapped}


def prompt_ids(hf: Path, n: int, vocab: int) -> list[int]:
    """A Shakespeare prompt in the model's own tokenizer if it has one (not lent), else random ids."""
    tok = hf / "tokenizer.json"
    if tok.is_file() and hf.resolve() != BUNDLED.resolve() and tok.read_bytes() == (BUNDLED / "tokenizer.json").read_bytes():
        tok = None  # a lent tokenizer: the model was not trained on it
    if tok is not None and tok.is_file():
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(tok)).encode(PROMPT_TEXT * 4).ids[:n]
        if len(ids) == n and max(ids) < vocab:
            return ids
    return np.random.default_rng(0).integers(0, vocab, n).tolist()


# --------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------


def llama_bench(tools: dict, gguf: Path, a) -> dict:
    p = run([tools["bench"], "-m", gguf, "-p", a.prompt_len, "-n", a.new_tokens, "-t", a.threads, "-r", a.bench_reps,
             "-o", "json"])
    rows = json.loads(p.stdout)
    out = {}
    for r in rows:
        key = "prefill" if r["n_prompt"] > 0 else "decode"
        out[key] = r["avg_ts"]
        out[key + "_samples"] = r.get("samples_ts")
        out["flash_attn"] = r.get("flash_attn")
        out["type_k"] = r.get("type_k")
        out["build_commit"] = r.get("build_commit")
    return out


def llama_greedy(tools: dict, gguf: Path, ids: list[int], a) -> dict:
    p = run([tools["greedy"], gguf, a.new_tokens + 1, a.threads, ",".join(map(str, ids)), 0, "f32", 1])
    r = json.loads(p.stdout)
    return {"tokens": r["tokens"], "prefill": len(ids) / statistics.median(r["prefill_s"]),
            "decode": 1.0 / float(np.mean(r["decode_step_s"][0]))}


def moejax_run(model, ids: list[int], a) -> dict:
    """--bench-reps generations, as llama-bench repeats its runs: prefill from the median time to
    the first token (one sample varied 12-26 ms on the bundled model), decode from all steps."""
    gs = [model.generate(np.asarray([ids], np.int32), a.new_tokens + 1) for _ in range(a.bench_reps)]
    return {"tokens": gs[0].tokens[0], "prefill": len(ids) / statistics.median(g.ttft_s for g in gs),
            "decode": 1.0 / float(np.mean([s for g in gs for s in g.step_s]))}


def agree(x: list[int], y: list[int]) -> int:
    n = 0
    for u, v in zip(x, y):
        if u != v:
            break
        n += 1
    return n


def bench_model(name: str, a, tools: dict, work: Path) -> list[dict]:
    import moejax

    if Path(name).is_dir():
        hf = Path(name).resolve()
        if not (hf / "config.json").is_file():
            raise BenchError(f"{hf}: llama.cpp's converter needs a Hugging Face directory (config.json + safetensors)")
        if not (hf / "tokenizer.json").is_file():
            raise BenchError(f"{hf}: no tokenizer.json (llama.cpp's converter needs a tokenizer)")
        mj_path, label = hf, hf.name
    else:
        mroot = work / name
        mroot.mkdir(parents=True, exist_ok=True)
        hf = random_model(name, mroot)
        from moejax.convert import convert

        mj_path, label = mroot / "mj", f"{name} (random qwen2_moe of bench_resident.py)"
        if not (mj_path / "moejax.json").is_file():
            convert(hf, mj_path, progress=False)
    cfg = json.loads((hf / "config.json").read_text())
    ids = prompt_ids(hf, a.prompt_len, cfg["vocab_size"])
    n_params = None
    gdir = work / "gguf" / label.split()[0]
    gdir.mkdir(parents=True, exist_ok=True)
    records = []
    for dtype in a.dtypes + a.llama_only:
        t0 = time.perf_counter()
        conv = to_gguf(tools, hf, dtype, gdir / f"model-{dtype}.gguf", a.bpe_pre)
        print(f"{label}: GGUF {dtype} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        model = None
        if dtype in MJ_DTYPE:
            path = mj_path
            if dtype == "int8":
                from moejax.convert import convert

                path = work / "mj-int8" / label.split()[0]
                if not (path / "moejax.json").is_file():
                    convert(hf, path, dtype="bfloat16", experts="int8", progress=False)
            model = moejax.load(path, dtype=MJ_DTYPE[dtype])
            if n_params is None:
                import jax

                n_params = int(sum(getattr(x, "size", 0) for x in jax.tree.leaves(model.state)))
            model.generate(np.asarray([ids], np.int32), a.new_tokens + 1, warmup=True)  # compile, caches
        trials = {"moejax": [], "llama_bench": [], "llama_greedy": []}
        for t in range(a.trials):
            if model is not None:
                trials["moejax"].append(moejax_run(model, ids, a))
            trials["llama_greedy"].append(llama_greedy(tools, Path(conv["path"]), ids, a))
            trials["llama_bench"].append(llama_bench(tools, Path(conv["path"]), a))
            msg = {k: (round(v[-1]["prefill"], 1), round(v[-1]["decode"], 1)) for k, v in trials.items() if v}
            print(f"{label} {dtype} trial {t + 1}/{a.trials}: (prefill, decode) tok/s {msg}", file=sys.stderr)
        med = lambda rows, k: statistics.median(r[k] for r in rows) if rows else None  # noqa: E731
        rec = {"model": label, "path": str(hf), "params": n_params, "dtype": dtype, "gguf_bytes": Path(conv["path"]).stat().st_size,
               "bpe_pre_mapped": conv["bpe_pre_mapped"], "llama_quantize": conv.get("llama_quantize"), "prompt_ids": ids,
               "tokens_per_s": {
                   "moejax": {"prefill": med(trials["moejax"], "prefill"), "decode": med(trials["moejax"], "decode")},
                   "llama_bench": {"prefill": med(trials["llama_bench"], "prefill"),
                                   "decode": med(trials["llama_bench"], "decode")},
                   "llama_greedy_fa0_kvf32": {"prefill": med(trials["llama_greedy"], "prefill"),
                                              "decode": med(trials["llama_greedy"], "decode")}},
               "llama_bench_settings": {k: trials["llama_bench"][0].get(k) for k in ("flash_attn", "type_k", "build_commit")},
               "trials": trials}
        mj, lb = rec["tokens_per_s"]["moejax"], rec["tokens_per_s"]["llama_bench"]
        lg = rec["tokens_per_s"]["llama_greedy_fa0_kvf32"]
        if model is not None:
            rec["ratio_vs_llama_bench"] = {k: mj[k] / lb[k] for k in ("prefill", "decode")}
            rec["ratio_vs_llama_greedy"] = {k: mj[k] / lg[k] for k in ("prefill", "decode")}
            mt, lt = trials["moejax"][-1]["tokens"], trials["llama_greedy"][-1]["tokens"]
            rec["greedy_tokens"] = {"compared": len(mt), "equal": mt == lt, "agree_prefix": agree(mt, lt),
                                    "agree_positions": int(sum(u == v for u, v in zip(mt, lt)))}
        records.append(rec)
        del model
    return records


def table(records: list[dict]) -> str:
    f = lambda x: "" if x is None else f"{x:.1f}"  # noqa: E731
    r2 = lambda x: "" if x is None else f"{x:.2f}"  # noqa: E731
    lines = ["| model | dtype | moejax prefill | llama-bench pp | ratio | moejax decode | llama-bench tg | ratio | "
             "llama greedy (fa off, f32 KV) pp / tg | greedy tokens equal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        t = r["tokens_per_s"]
        ratio = r.get("ratio_vs_llama_bench", {})
        g = r.get("greedy_tokens")
        eq = "" if g is None else (f"yes ({g['compared']})" if g["equal"]
                                   else f"no: first {g['agree_prefix']} of {g['compared']}")
        lines.append(f"| {r['model'].split()[0]} | {r['dtype']} | {f(t['moejax']['prefill'])} | {f(t['llama_bench']['prefill'])} | "
                     f"{r2(ratio.get('prefill'))} | {f(t['moejax']['decode'])} | {f(t['llama_bench']['decode'])} | "
                     f"{r2(ratio.get('decode'))} | {f(t['llama_greedy_fa0_kvf32']['prefill'])} / "
                     f"{f(t['llama_greedy_fa0_kvf32']['decode'])} | {eq} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=str(BUNDLED),
                   help="comma-separated: Hugging Face checkpoint directories, or small / medium (random models)")
    p.add_argument("--dtypes", default="f32,bf16", help="run by both systems (f32, bf16, int8: 8-bit experts)")
    p.add_argument("--llama-only", default="q8_0", help="GGUF types run by llama.cpp alone ('' for none)")
    p.add_argument("--llama-build", type=Path, help="an existing cmake build directory of llama.cpp")
    p.add_argument("--bpe-pre", default="gpt-2",
                   help="llama.cpp pre-tokenizer rule for a tokenizer it does not recognise ('' to fail instead)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps timed (moejax and greedy generate one more)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--bench-reps", type=int, default=3, help="llama-bench -r and moejax generations per trial")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel build jobs")
    p.add_argument("--work", type=Path, help="where GGUF files and random models go (default: a temporary directory)")
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args(argv)
    a.dtypes = [d for d in a.dtypes.split(",") if d]
    a.llama_only = [d for d in a.llama_only.split(",") if d]
    bad = [d for d in a.dtypes if d not in MJ_DTYPE]
    if bad:
        p.error(f"--dtypes: {bad} not in {list(MJ_DTYPE)}")

    load_start = os.getloadavg()
    try:
        tools = llama_tools(a)
        with tempfile.TemporaryDirectory(prefix="bench_llamacpp-") as tmp:
            work = a.work or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            records = []
            for name in a.models.split(","):
                records += bench_model(name, a, tools, work)
    except BenchError as e:
        print(f"bench_llamacpp: error: {e}", file=sys.stderr)
        return 2

    import jax

    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu}", "jax": jax.__version__,
            "moejax_commit": git, "llama_cpp": f"llama-cpp-python {LLAMA_CPP_PYTHON} sdist, vendor/llama.cpp",
            "llama_cpp_commit": tools["commit"], "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
            "llama_bench_command": f"llama-bench -p {a.prompt_len} -n {a.new_tokens} -t {a.threads} -r {a.bench_reps} -o json",
            "greedy": "moejax-greedy (libllama, argmax of the logits), flash attention off, f32 KV cache, 1 warm-up run",
            "moejax": "Model.generate greedy after warm-up; prefill = prompt_len / time to first token, "
                      "decode = 1 / mean step time",
            "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
            "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "threads": a.threads, "trials": a.trials}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"meta": meta, "records": records}, indent=1)
    text = re.sub(r"\[[-0-9.e,\s]*\]", lambda m: " ".join(m.group(0).split()), text)  # number lists on one line
    a.json.write_text(text + "\n")
    print(table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
