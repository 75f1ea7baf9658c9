"""Ahead-of-time compile of every Triton kernel configuration for sm_80 and sm_90 (design §8).

Needs no GPU: ``triton.compile`` with ``GPUTarget("cuda", 80|90, 32)`` produces PTX, which the
``ptxas`` Triton itself picks for that arch (``triton.backends.nvidia.compiler.get_ptxas``: triton
3.6 uses its CUDA 12.8 ``ptxas`` below sm_100, triton 3.9 ``ptxas-blackwell`` from sm_90 on; the
system ptxas is too old for Triton's PTX) assembles with ``-v`` and Triton's own flags to report
registers and spills. Every tile configuration the dispatcher can pick
(:func:`epikern.backends.triton.config.all_tile_configs`) is compiled with fp32, fp16 and bf16
logits (drafts and target of the same dtype) and the specialisation flags that do the most work
(target present; mixture sweep on), with the pointer/stride divisibility the runtime specialises
for aligned tensors. Any spill fails the test. ``python -m tests.backends.test_triton_aot`` prints
the Markdown table recorded in ``benchmarks/RESULTS.md``. The compiles run once per session in a
child process (so that ``TRITON_INTERPRET``, which the interpreter tests switch on, cannot reach
them), in parallel, and Triton's on-disk cache makes later sessions fast.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402

from epikern.backends.triton import config  # noqa: E402

ARCHS = (80, 90)
VARIANT_ARCH = 90  #: the lighter flag variants are compiled for this arch only (time)
DTYPES = ("fp32", "fp16", "bf16")
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
PTXAS_ARCH = {80: "sm_80", 90: "sm_90a"}


@dataclass(frozen=True)
class Spec:
    """One kernel specialisation to compile."""

    kernel: str
    k_pad: int
    block_v: int
    num_warps: int
    dtype: str  # draft logit dtype; "-" for kernels that read no logits
    target: str = ""  # target logit dtype ("" = same as the drafts)
    has_target: bool = True
    decompose: bool = True
    index: str = ""  # row-map dtype of the rows kernel ("i32" or "i64")

    @property
    def tag(self) -> str:
        flags = ("" if self.has_target else "-notarget") + ("" if self.decompose else "-eu")
        flags += f"-{self.index}" if self.index else ""
        target = f"+{self.target}" if self.target else ""
        return f"{self.kernel}-k{self.k_pad}-{self.dtype}{target}{flags}"


@dataclass(frozen=True)
class Report:
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int


def _kernels():
    from epikern.backends.triton import row, rows, split
    return {
        "row": row.draft_uncertainty_row_kernel,
        "rows": rows.draft_uncertainty_rows_kernel,
        "split_states": split.split_states_kernel,
        "split_mixture": split.split_mixture_kernel,
        "split_finalize": split.split_finalize_kernel,
    }


def specs() -> list[Spec]:
    """Every kernel specialisation the dispatcher can launch, with the heaviest flags."""
    out = []
    for dt in DTYPES:
        for cfg in config.all_tile_configs(ITEMSIZE[dt]):
            names = ["row"] if cfg.path == "row" else ["split_states", "split_mixture"]
            out += [Spec(name, cfg.k_pad, cfg.block_v, cfg.num_warps, dt) for name in names]
            if cfg.path == "row":  # draft_uncertainty_rows: the row configuration, int32 maps
                out.append(Spec("rows", cfg.k_pad, cfg.block_v, cfg.num_warps, dt, index="i32"))
    for cfg in config.all_tile_configs(2):
        if cfg.path == "split":  # reads no logits: one specialisation per K_PAD
            out.append(Spec("split_finalize", cfg.k_pad, 0, config.FINALIZE_WARPS, "-"))
    order = {"row": 0, "rows": 1, "split_states": 2, "split_mixture": 3, "split_finalize": 4}
    return sorted(out, key=lambda s: (s.k_pad, order[s.kernel], s.dtype))


def flag_variants() -> list[Spec]:
    """The lighter specialisations (no target, no mixture sweep, mixed draft/target dtypes, int64
    row maps) for K_PAD ∈ {1, 4}: they share the code of :func:`specs` but must compile too (the
    interpreter does not type-check loop-carried values, the compiler does)."""
    uses = {"row": ("has_target", "decompose"), "rows": ("has_target", "decompose"), "split_states": ("has_target",),
            "split_mixture": ("has_target",), "split_finalize": ("has_target", "decompose")}
    main = set(specs())
    out = []
    for spec in main:
        if spec.k_pad not in (1, 4) or spec.dtype not in ("bf16", "-"):
            continue
        for has_target in (True, False):
            for decompose in (True, False):
                if (not decompose and "decompose" not in uses[spec.kernel]):
                    continue
                target = "fp32" if has_target and spec.dtype != "-" else ""
                variant = replace(spec, target=target, has_target=has_target, decompose=decompose,
                                  index="i64" if spec.index else "")
                if variant not in main:
                    out.append(variant)
    return sorted(out, key=lambda v: v.tag)


#: Pointer arguments of the kernels; the others are fp32 (weights, workspace, outputs).
_LOGIT_POINTERS = ("D", "T")
_FP32_POINTERS = ("W", "STATS", "DLSE", "TLSE", "WS_D", "WS_T", "WS_M", "ITEMP", "OUT")
#: Row-map pointers of the rows kernel (``Spec.index``).
_INDEX_POINTERS = ("DMAP", "TMAP")


def _signature(fn, spec: Spec):
    """(signature, constexprs, attrs) for ``triton.compiler.ASTSource`` (triton ≥ 3.3 API)."""
    constexprs = {"K_PAD": spec.k_pad, "BLOCK_V": spec.block_v, "CHUNK_BLOCK":
                  config.chunk_block_for(spec.k_pad), "HAS_TARGET": spec.has_target,
                  "DECOMPOSE": spec.decompose, "HAS_DMAP": True, "HAS_TMAP": True}
    dtypes = {"D": spec.dtype, "T": spec.target if spec.target and spec.has_target else spec.dtype}
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "inv_temp":
            signature[name] = "fp32"
        elif name in _LOGIT_POINTERS or name in _FP32_POINTERS:
            signature[name] = "*" + dtypes.get(name, "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _INDEX_POINTERS:
            signature[name] = "*" + spec.index
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if (name.startswith("stride") and name != "stride_it") or name in ("V", "CHUNK_V"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _ptxas(arch: int = 90) -> str:
    """The ptxas Triton's own ``make_cubin`` uses for ``sm_<arch>`` (the versions differ: a spill
    reported by another ptxas says nothing about the kernels Triton builds), else its newest."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(arch).path
        if path and os.path.exists(path):
            return path
    except Exception:  # a Triton without get_ptxas(arch) or without its bundled tools
        pass
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(bin_dir, name)
        if os.path.exists(path):
            return path
    pytest.skip(f"Triton ships no ptxas in {bin_dir}")


def _ptxas_flags(ptxas: str) -> list[str]:
    """The flags Triton itself passes: ``-lineinfo``, plus ``--regAllocOptLevel=2`` for ptxas
    13.x (Triton's workaround for a 13.x register-allocation bug that can cause small spills)."""
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    major = re.search(r"release (\d+)\.", version)
    return ["-lineinfo"] + (["--regAllocOptLevel=2"] if major and int(major.group(1)) >= 13 else [])


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_report(spec: Spec, arch: int) -> Report:
    """Compile ``spec`` for ``sm_<arch>`` and read registers and spills from ``ptxas -v``."""
    fn = _kernels()[spec.kernel]
    signature, constexprs, attrs = _signature(fn, spec)
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps})
    with tempfile.TemporaryDirectory(prefix="epikern_aot_") as tmp:
        ptx_path = os.path.join(tmp, "kernel.ptx")
        with open(ptx_path, "w") as f:
            f.write(compiled.asm["ptx"])
        ptxas = _ptxas(arch)
        log = subprocess.run([ptxas, *_ptxas_flags(ptxas), f"-arch={PTXAS_ARCH[arch]}", "-v",
                              ptx_path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    regs = [int(r) for r in _REGS.findall(log)]
    spills = [tuple(map(int, s)) for s in _SPILL.findall(log)]
    if not regs or not spills:
        raise RuntimeError(f"cannot parse ptxas output:\n{log}")
    return Report(max(regs), max(s[1] for s in spills), max(s[2] for s in spills),
                  max(s[0] for s in spills))


def _compile_one(job):
    spec, arch = job
    try:
        return spec, arch, asdict(compile_report(spec, arch))
    except Exception as exc:  # reported per configuration by the test
        return spec, arch, {"error": f"{type(exc).__name__}: {exc}"}


def compile_all(jobs: int) -> dict:
    """``{(spec, arch): report dict or {"error": ...}}`` for every spec and arch, ``jobs`` at once."""
    work = [(spec, arch) for spec in specs() for arch in ARCHS]
    work += [(spec, VARIANT_ARCH) for spec in flag_variants()]
    if jobs <= 1:
        results = map(_compile_one, work)
        return {(s, a): r for s, a, r in results}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        return {(s, a): r for s, a, r in pool.map(_compile_one, work)}


@pytest.fixture(scope="session")
def reports() -> dict:
    """Compile everything once per session in a child process (the kernels must be imported
    there without ``TRITON_INTERPRET``, which the CPU interpreter tests switch on)."""
    _ptxas()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "tests.backends.test_triton_aot", "--json"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"AOT compile process failed:\n{proc.stderr[-4000:]}"
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return {(Spec(**r["spec"]), r["arch"]): r["report"] for r in rows}


def test_every_dispatcher_config_is_enumerated():
    """What :func:`config.choose` returns for a sweep of shapes and dtypes is in the compiled set."""
    import torch

    compiled = {(s.kernel, s.k_pad, s.block_v, s.num_warps, s.dtype) for s in specs()}
    finalize = {s.k_pad for s in specs() if s.kernel == "split_finalize"}
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    for dtype, dt in names.items():
        for K in range(1, config.MAX_K + 1):
            for N in (1, 8, 64, 128, 129, 4096):
                for V in (1000, 32000, 128256):
                    c = config.choose(K, N, V, dtype)
                    kernels = ["row"] if c.path == "row" else ["split_states", "split_mixture"]
                    for kernel in kernels:
                        assert (kernel, c.k_pad, c.block_v, c.num_warps, dt) in compiled
                    rows = config.choose(K, config.SPLIT_MAX_ROWS + 1, V, dtype)  # the rows kernel's
                    assert ("rows", rows.k_pad, rows.block_v, rows.num_warps, dt) in compiled
                    assert c.path == "row" or c.k_pad in finalize
                    assert c.chunk_block == config.chunk_block_for(c.k_pad)
                    assert 1 <= c.chunks <= config.MAX_CHUNKS
                    assert c.chunks == 1 or (c.chunks - 1) * c.chunk_size(V) < V  # none empty
    with pytest.raises(ValueError, match="1 to 32 drafts"):
        config.choose(config.MAX_K + 1, 1, 1000, torch.float32)


@pytest.mark.parametrize("spec,arch", [(s, a) for s in specs() for a in ARCHS]
                         + [(s, VARIANT_ARCH) for s in flag_variants()],
                         ids=lambda x: x.tag if isinstance(x, Spec) else f"sm{x}")
def test_compiles_without_spills(reports, spec, arch):
    rep = reports[(spec, arch)]
    assert "error" not in rep, f"{spec} failed to compile for sm_{arch}: {rep['error']}"
    print(f"{spec.tag} BLOCK_V={spec.block_v} warps={spec.num_warps} "
          f"sm_{arch}: {rep['registers']} registers, spill stores "
          f"{rep['spill_stores']} B, spill loads {rep['spill_loads']} B")
    assert rep["spill_stores"] == 0 and rep["spill_loads"] == 0, f"{spec} on sm_{arch} spills: {rep}"


def markdown_table(results: dict) -> str:
    rows = ["| kernel | K_PAD | BLOCK_V | warps | logits | regs sm_80 | regs sm_90a | spill bytes |",
            "|---|---|---|---|---|---|---|---|"]
    for spec in specs():
        r80, r90 = results[(spec, 80)], results[(spec, 90)]
        if "error" in r80 or "error" in r90:
            rows.append(f"| {spec.kernel} | {spec.k_pad} | | | {spec.dtype} | compile error | | |")
            continue
        spill = sum(r[key] for r in (r80, r90) for key in ("spill_stores", "spill_loads"))
        block = spec.block_v or "-"
        rows.append(f"| {spec.kernel} | {spec.k_pad} | {block} | {spec.num_warps} | {spec.dtype} "
                    f"| {r80['registers']} | {r90['registers']} | {spill} |")
    variants = [results[(v, VARIANT_ARCH)] for v in flag_variants()]
    ok = [r for r in variants if "error" not in r]
    rows.append(f"\nLighter flag variants (no target / no mixture sweep / bf16 drafts with fp32 "
                f"target, K_PAD 1 and 4, sm_{VARIANT_ARCH}): {len(ok)} of {len(variants)} compiled, "
                f"max {max((r['registers'] for r in ok), default=0)} registers, "
                f"{sum(r['spill_stores'] + r['spill_loads'] for r in ok)} spill bytes.")
    return "\n".join(rows)


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON line for the test fixture")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args()
    results = compile_all(args.jobs)
    if args.json:
        print(json.dumps([{"spec": asdict(s), "arch": a, "report": r}
                          for (s, a), r in results.items()]))
    else:
        print(markdown_table(results))


if __name__ == "__main__":
    _main()
