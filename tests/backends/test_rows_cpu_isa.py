"""``draft_uncertainty_rows`` on every ISA variant of ``epikern._cpu`` (the ``cpu_isa`` fixture):
engine layouts, and the split-vocabulary path, against the dense op on the gathered rows."""

from __future__ import annotations

import pytest
import torch

import epikern as ek
from tests._layouts import LAYOUTS, assert_rows_match, dense_expected, make_layout

pytest.importorskip("epikern._cpu")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_op_on_each_variant(cpu_isa, layout):
    lay = make_layout(layout, K=3, V=1003, dtype=torch.bfloat16, seed=LAYOUTS.index(layout))
    temperature = 0.5 + torch.rand(lay.n, generator=torch.Generator().manual_seed(7))
    out = ek.draft_uncertainty_rows(lay.draft, lay.target, draft_rows=lay.draft_rows, target_rows=lay.target_rows,
                                    temperature=temperature, backend="cpu")
    expected, keep = dense_expected(lay, 1 / temperature, "torch")
    assert_rows_match(out, expected, keep)


def test_rows_op_split_vocabulary_on_each_variant(cpu_isa):
    lay = make_layout("sglang_padded", K=2, V=33001, dtype=torch.float16, seed=5)
    lay.draft, lay.target = lay.draft[:, :4], lay.target[:4]
    lay.target_rows = torch.tensor([3, -1, 0, 2], dtype=torch.int32)
    out = ek.draft_uncertainty_rows(lay.draft, lay.target, target_rows=lay.target_rows, backend="cpu")
    expected, keep = dense_expected(lay, torch.ones(4), "torch")
    assert_rows_match(out, expected, keep)
