"""The OSD proxy ends closer to the perturbed-ensemble average than the clean target is."""

from __future__ import annotations

import pytest
import torch

from epikern.models.loading import load_causal_lm
from epikern.models.perturb import Perturbation
from epikern.training.diagnostics import kl_to_perturbed_average
from epikern.training.proxy import train_proxy
from epikern.training.target import heldout_examples, read_heldout

from .conftest import micro_proxy


def test_osd_proxy_is_closer_to_the_perturbed_average_than_the_target(micro_target, tmp_path):
    target_dir, _ = micro_target
    metrics = train_proxy(micro_proxy(target_dir), tmp_path / "proxy", progress=False)
    target, tok = load_causal_lm(target_dir)
    proxy, proxy_tok = load_causal_lm(tmp_path / "proxy")
    assert proxy_tok.get_vocab() == tok.get_vocab()
    assert not torch.equal(proxy.lm_head.weight, target.lm_head.weight)
    examples = heldout_examples(read_heldout(target_dir / "heldout.jsonl"))
    perturbation = Perturbation(target, rank=8, sigma=0.1)
    kl = dict(zip(("proxy", "target"), kl_to_perturbed_average([proxy, target], perturbation, examples,
                                                               pad_id=tok.pad_token_id, members=16, seed=11)))
    print(f"\nKL(perturbed average || model) on held-out target responses: OSD proxy {kl['proxy']:.5f} nats, "
          f"clean target {kl['target']:.5f} nats (training loss {metrics['first_loss']:.5f} -> "
          f"{metrics['final_loss']:.5f})")
    assert kl["proxy"] < kl["target"], kl


def test_perturbed_average_of_sigma_zero_is_the_target(micro_target):
    target, tok = load_causal_lm(micro_target[0])
    examples = heldout_examples(read_heldout(micro_target[0] / "heldout.jsonl"))[:4]
    [kl] = kl_to_perturbed_average([target], Perturbation(target, sigma=0.0), examples, pad_id=tok.pad_token_id,
                                   members=2)
    assert kl == pytest.approx(0.0, abs=1e-6)
