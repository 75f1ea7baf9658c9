"""Runtime ISA dispatch of ``epikern._cpu``: the variants in the build, the choice at import and by
``EPIKERN_CPU_ISA``, the machine code of each variant, and every variant this CPU runs against the
float64 reference (draft_uncertainty on the design §8 kinds and on engine row maps, forward_kl
forward and backward, the fused decode step against the ATen path).
The kernel-level tests (test_cpu_kernel.py) also run once per variant."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import epikern as ek
from epikern.backends import cpu, reference
from tests._cases import (KINDS, assert_close, assert_close_stats, assert_special_rows, make_logits,
                          masked_spread_rows, reference_stats, special_rows)
from tests._layouts import LAYOUTS, assert_rows_match, dense_expected, make_layout

_cpu = pytest.importorskip("epikern._cpu", reason="epikern._cpu is not built (pip install -e .)")

X86 = platform.machine() in ("x86_64", "AMD64")
DISPATCH = _cpu.isas != ("custom",)  # not a single-variant EPIKERN_CPU_ARCH build
ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter importing this checkout, with ``env`` added."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                          timeout=120)


# ---- the variants and the choice ----------------------------------------------------------------

@pytest.mark.skipif(not (X86 and DISPATCH), reason="x86-64 dispatch build only")
def test_x86_build_has_three_variants_with_their_vector_width():
    assert _cpu.isas == ("baseline", "avx2", "avx512")
    assert _cpu.isa_flags == {"baseline": "-march=x86-64-v2", "avx2": "-march=x86-64-v3",
                              "avx512": "-march=x86-64-v4"}
    assert [getattr(_cpu, name)._simd_width for name in _cpu.isas] == [4, 8, 16]


def test_default_is_the_best_supported_variant():
    supported = _cpu.supported_isas()
    assert supported == list(_cpu.isas[:len(supported)])  # each variant needs the one before
    if os.environ.get("EPIKERN_CPU_ISA", "auto") in ("", "auto"):
        assert _cpu.isa() == supported[-1]


def test_set_isa_switches_the_module_functions(cpu_isa):
    variant = getattr(_cpu, cpu_isa)
    assert _cpu.isa() == cpu_isa
    assert _cpu.draft_uncertainty is variant.draft_uncertainty
    assert _cpu.forward_kl is variant.forward_kl
    assert _cpu._simd_width == variant._simd_width
    names = {n for n in dir(variant) if not n.startswith("__")}
    assert names <= set(dir(_cpu))
    assert {n for n in dir(getattr(_cpu, _cpu.isas[0])) if not n.startswith("__")} == names


def test_set_isa_rejects_an_unknown_variant():
    with pytest.raises(ValueError, match=r"unknown ISA 'sse9'; this build has "):
        _cpu.set_isa("sse9")


@pytest.mark.skipif(len(_cpu.supported_isas()) == len(_cpu.isas), reason="this CPU runs every variant")
def test_set_isa_rejects_a_variant_this_cpu_lacks():
    missing = _cpu.isas[len(_cpu.supported_isas())]
    with pytest.raises(RuntimeError, match=rf"this CPU cannot run the '{missing}' kernels, which need"):
        _cpu.set_isa(missing)


def test_environment_variable_forces_a_variant_and_backends_reports_it():
    forced = _cpu.supported_isas()[0]
    out = _python("import epikern._cpu as c; print(c.isa())", EPIKERN_CPU_ISA=forced)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == forced
    out = _python("from epikern.cli import main; main(['backends'])", EPIKERN_CPU_ISA=forced)
    assert out.returncode == 0, out.stderr
    assert re.search(rf"^cpu +available, ISA {forced} \(", out.stdout, re.M), out.stdout


def test_environment_variable_with_a_bad_name_fails_the_import_saying_why():
    out = _python("import epikern._cpu", EPIKERN_CPU_ISA="sse9")
    assert out.returncode != 0
    assert "unknown ISA 'sse9'; this build has" in out.stderr and "(EPIKERN_CPU_ISA=sse9)" in out.stderr
    out = _python("from epikern.backends import cpu; cpu.check_available()", EPIKERN_CPU_ISA="sse9")
    assert "backend 'cpu' needs the compiled module epikern._cpu" in out.stderr
    assert "EPIKERN_CPU_ISA=sse9" in out.stderr and "pip install" not in out.stderr


# ---- machine code --------------------------------------------------------------------------------

_VECTOR_INSN = re.compile(r"\t(v[a-z0-9]+)\s|%[yz]mm\d+|%k[0-7]\b")
_SYMBOL = re.compile(r"^[0-9a-f]+ <(.+)>:$")
# mangled-name marks of code private to one object file: a clone (.isra, .constprop, .cold,
# ._omp_fn ...), the anonymous namespace, a static function (GCC's L before its name)
_INTERNAL = re.compile(r"\.|_GLOBAL__N_|L\d+[A-Za-z_]")


def _wide_functions(path: str) -> dict[str, bool]:
    """Mangled name → whether it uses AVX-512 registers, of every function whose code uses a
    VEX/EVEX encoding (``objdump -d``)."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True,
                          text=True, check=True).stdout
    found: dict[str, bool] = {}
    name = None
    for line in text.splitlines():
        m = _SYMBOL.match(line)
        if m:
            name = m.group(1)
        elif name is not None and "\t" in line:
            for hit in _VECTOR_INSN.finditer(line):
                found[name] = found.get(name, False) or hit.group(0).startswith(("%zmm", "%k"))
    return found


@pytest.mark.skipif(not (X86 and DISPATCH) or shutil.which("objdump") is None,
                    reason="needs the x86-64 dispatch build and objdump")
def test_only_the_wide_variants_contain_wide_instructions():
    """A function the variants' objects share (C++ library templates, pybind11 glue) is kept once
    by the linker; were that copy compiled for AVX, the baseline kernels would call AVX code on a
    CPU without it. So every VEX/EVEX function must belong to the avx2/avx512 namespaces or be
    private to one object file (CMakeLists.txt links the baseline objects first)."""
    wide = _wide_functions(_cpu.__file__)
    assert any("3cpu6avx512" in n and zmm for n, zmm in wide.items()), "no AVX-512 code in avx512"
    assert any("3cpu4avx2" in n for n in wide), "no AVX code in the avx2 variant"
    shared = sorted(n for n in wide if not _INTERNAL.search(n) and "3cpu4avx2" not in n
                    and "3cpu6avx512" not in n)
    assert not shared, f"VEX/EVEX code in functions the variants share: {shared[:10]}"
    assert not [n for n in wide if "3cpu8baseline" in n], "VEX/EVEX code in the baseline variant"
    assert not [n for n, zmm in wide.items() if zmm and "3cpu4avx2" in n], "AVX-512 code in avx2"


# ---- every variant against the float64 reference --------------------------------------------------

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_draft_uncertainty_matches_the_reference(cpu_isa, kind, dtype):
    g = _gen(hash((kind, str(dtype))) % 1000)
    draft = make_logits((4, 3, 1037), kind, dtype=dtype, generator=g)
    target = make_logits((3, 1037), kind, dtype=dtype, generator=g)
    out = ek.draft_uncertainty(draft, target, weights=[0.4, 0.3, 0.0, 0.3], temperature=0.8,
                               backend="cpu")
    assert_close_stats(out, reference_stats(draft, target, [0.4, 0.3, 0.0, 0.3], 0.8))


def test_draft_uncertainty_split_vocabulary_matches_the_reference(cpu_isa):
    g = _gen(5)
    draft = make_logits((3, 2, 40000), "peaked", dtype=torch.bfloat16, generator=g)
    target = make_logits((2, 40000), "masked", dtype=torch.bfloat16, generator=g)
    assert_close_stats(ek.draft_uncertainty(draft, target, backend="cpu"),
                       reference_stats(draft, target))
    assert_close_stats(ek.draft_uncertainty(draft, None, backend="cpu"),
                       reference_stats(draft, None))


def test_draft_uncertainty_special_rows(cpu_isa):
    draft, target = special_rows()
    out = ek.draft_uncertainty(draft, target, backend="cpu")
    assert_close_stats(out, reference_stats(draft, target))
    assert_special_rows(out)


@pytest.mark.parametrize("V", [5000, 40000], ids=["rows", "split"])
@pytest.mark.parametrize("mass_first", [True, False], ids=["mass-first", "peak-first"])
@pytest.mark.parametrize("spread", [95.0, 120.0])
def test_masked_reference_past_a_big_spread_is_inf(cpu_isa, spread, mass_first, V):
    """A draft entry against a −inf reference makes eu and kl +inf even where its e^{x − max}
    (peak-first: sweep 1's vector cross term) or q̄ (sweep 2) underflows, on the row path and the
    split-vocabulary path (the entry in another span: the merge)."""
    draft, target = masked_spread_rows(spread, N=2, V=V, mass_first=mass_first)
    out = ek.draft_uncertainty(draft, target, backend="cpu")
    assert torch.isposinf(out.eu).all(), f"{cpu_isa}: eu = {out.eu.tolist()}"
    assert torch.isposinf(out.kl).all(), f"{cpu_isa}: kl = {out.kl.tolist()}"
    assert torch.isfinite(out.jsd).all() and torch.isfinite(out.draft_entropy).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_draft_uncertainty_rows_matches_the_dense_reference(cpu_isa, layout):
    """The row-map entry (engine layouts, per-row temperatures) of every variant."""
    lay = make_layout(layout, K=3, V=1037, dtype=torch.bfloat16, seed=LAYOUTS.index(layout))
    temperature = 0.5 + torch.rand(lay.n, generator=_gen(1))
    out = ek.draft_uncertainty_rows(lay.draft, lay.target, draft_rows=lay.draft_rows,
                                    target_rows=lay.target_rows, temperature=temperature, backend="cpu")
    expected, keep = dense_expected(lay, 1 / temperature, "torch")
    assert_rows_match(out, expected, keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_kl_and_gradient_match_the_reference(cpu_isa, dtype):
    g = _gen(11)
    student = make_logits((5, 2051), "peaked", dtype=dtype, generator=g).requires_grad_()
    teacher = make_logits((5, 2051), "masked", dtype=dtype, generator=g)
    loss = ek.forward_kl(student, teacher, temperature=1.5, reduction="none", backend="cpu")
    grad, = torch.autograd.grad(loss.sum(), student)
    s64 = student.detach().double().requires_grad_()
    ref = reference.forward_kl(s64, teacher.double(), 1.5, "none", None, -100)
    ref_grad, = torch.autograd.grad(ref.sum(), s64)
    assert_close("loss", loss, ref.detach())
    tol = {torch.float32: (1e-6, 1e-4), torch.float16: (1e-6, 2e-3), torch.bfloat16: (1e-5, 1e-2)}
    assert_close("grad", grad, ref_grad, *tol[dtype])


def test_fused_decode_step_equals_the_pytorch_path(cpu_isa, monkeypatch):
    """The decoder-step kernel (matmul tiles of the variant's width) against the ATen path."""
    from epikern.models import DraftEnsemble
    from tests.models.helpers import drafts_sharing_trunk, tiny_model

    calls = []
    kernel = getattr(_cpu, cpu_isa).stacked_decode_step
    monkeypatch.setattr(_cpu, "stacked_decode_step", lambda *a: calls.append(1) or kernel(*a))

    ens = DraftEnsemble.from_models(drafts_sharing_trunk(tiny_model("qwen2"), 3, 1), shared_layers=1)
    gen = _gen(0)
    prompt = torch.randint(0, ens.vocab_size, (2, 7), generator=gen)
    steps = [torch.randint(0, ens.vocab_size, (2, w), generator=gen) for w in (1, 3, 2)]
    logits = {}
    with torch.no_grad():
        for fused in (False, True):
            ens.fused_decode = fused
            cache = ens.new_cache(2)
            ens(prompt, None, cache)
            logits[fused] = [ens(ids, None, cache) for ids in steps]
    assert len(calls) == len(steps)  # the fused path ran, with this variant's kernel
    for a, b in zip(logits[True], logits[False]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
