"""Every backend module satisfies the contract of :mod:`epikern.backends.contract`."""

import importlib
import importlib.util
import inspect

import pytest

from epikern.backends import contract

#: backend modules and the ops each implements (triton.launch: the Triton package's launcher)
MODULES = {
    "epikern.backends.reference": ("draft_uncertainty", "draft_uncertainty_rows", "forward_kl", "forward_kl_backward"),
    "epikern.backends.cpu": ("draft_uncertainty", "draft_uncertainty_rows", "forward_kl", "forward_kl_backward"),
    "epikern.backends.cuda": ("draft_uncertainty", "draft_uncertainty_rows"),
    "epikern.backends.triton": ("draft_uncertainty", "draft_uncertainty_rows", "forward_kl", "forward_kl_backward"),
    "epikern.backends.triton.launch": ("draft_uncertainty", "draft_uncertainty_rows"),
}


def _parameters(fn) -> list[tuple[str, object]]:
    params = list(inspect.signature(fn).parameters.values())
    return [(p.name, p.kind) for p in params if p.name != "self"]


@pytest.mark.parametrize("module_name", sorted(MODULES))
def test_backend_modules_follow_the_contract(module_name):
    if module_name.startswith("epikern.backends.triton"):
        pytest.importorskip("triton")
    module = importlib.import_module(module_name)
    if module_name != "epikern.backends.triton.launch":
        assert isinstance(module, contract.Backend), f"{module_name} lacks NAME or check_available"
    for op in MODULES[module_name]:
        fn = getattr(module, f"{op}_out")
        expected = _parameters(contract.ENTRY_POINTS[op].__call__)
        assert _parameters(fn)[: len(expected)] == expected, f"{module_name}.{op}_out"
        extra = list(inspect.signature(fn).parameters.values())[len(expected):]
        assert all(p.default is not inspect.Parameter.empty for p in extra), f"{module_name}.{op}_out"


def test_every_entry_point_of_a_module_is_in_the_contract():
    """A new ``<op>_out`` must be written down in the contract before a backend grows one."""
    for module_name in MODULES:
        if module_name.startswith("epikern.backends.triton") and importlib.util.find_spec("triton") is None:
            continue
        module = importlib.import_module(module_name)
        ops = {name[: -len("_out")] for name in vars(module) if name.endswith("_out")
               and callable(getattr(module, name))}
        assert ops <= set(contract.ENTRY_POINTS), f"{module_name}: {ops - set(contract.ENTRY_POINTS)}"
        assert set(MODULES[module_name]) <= ops
