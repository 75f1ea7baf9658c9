"""The core install (``pip install epikern``, no extras) runs the kernels; the rest says what to install.

A fresh interpreter with the optional dependencies made unimportable (``sys.modules[name] = None``,
what an uninstalled module looks like to ``import`` and ``importlib.util.find_spec``) imports epikern,
runs ``draft_uncertainty`` and ``forward_kl`` on the CPU backends and ``epikern backends``, and gets
the ``pip install "epikern[...]"`` line from everything that needs an extra.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from epikern import extras

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("sklearn", "scipy", "matplotlib", "rich", "transformers", "safetensors", "tqdm", "gguf",
            "accelerate", "vllm", "liger_kernel")

PRELUDE = f"""
import sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None  # uninstalled
"""


def _python(body: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_core_runs_the_kernels_without_the_extras():
    proc = _python("""
        import torch
        import epikern as ek
        g = torch.Generator().manual_seed(0)
        draft, target = torch.randn(3, 4, 50, generator=g), torch.randn(4, 50, generator=g)
        for backend in ("cpu", "torch"):
            u = ek.draft_uncertainty(draft, target, backend=backend)
            assert torch.isfinite(u.eu).all() and (u.jsd >= -1e-5).all()
            student = torch.randn(4, 50, generator=g, requires_grad=True)
            loss = ek.forward_kl(student, target, backend=backend)
            loss.backward()
            assert torch.isfinite(student.grad).all()
        from epikern.cli import main
        assert main(["backends"]) == 0
        leaked = [name for name in sys.modules if name.split(".")[0] in {optional!r} and sys.modules[name]]
        assert not leaked, leaked
        print("ok")
    """.replace("{optional!r}", repr(OPTIONAL)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("ok")


@pytest.mark.parametrize("module,extra", [
    ("epikern.models", "models"), ("epikern.data", "models"), ("epikern.training.loop", "train"),
    ("epikern.eval.metrics", "eval"), ("epikern.eval.plots", "eval"), ("epikern.eval.bench", "eval")])
def test_an_import_that_needs_an_extra_says_which(module, extra):
    proc = _python(f"""
        import importlib
        from epikern.extras import MissingExtraError
        try:
            importlib.import_module({module!r})
        except MissingExtraError as exc:
            print(exc)
        else:
            raise SystemExit("imported without its extra")
    """)
    assert proc.returncode == 0, proc.stderr
    assert f'pip install "epikern[{extra}]"' in proc.stdout


def test_cli_commands_that_need_an_extra_say_which():
    proc = _python("""
        from epikern.cli import main
        print("rc", main(["train", "target"]), main(["bench", "--quick"]))
    """)
    assert "rc 2 2" in proc.stdout, proc.stdout + proc.stderr
    assert 'pip install "epikern[train]"' in proc.stderr and 'pip install "epikern[eval]"' in proc.stderr


def test_require_and_install_command():
    assert extras.install_command("eval") == 'pip install "epikern[eval]"'
    with pytest.raises(ValueError, match="unknown extra 'nope'"):
        extras.install_command("nope")
    extras.require("eval", "this test")  # the test environment has every extra
