"""DraftEnsemble decode step vs looping over K separate HF models (design §4, §7 "shared-trunk drafts").

For K drafts of L layers with S shared, one decode step should cost about ``trunk + K·branch``,
and the cache should hold ``S + K·(L−S)`` layers of KV. This script measures, at a fixed context of
P cached tokens (each timed step is undone with ``crop(-1)``), the median decode-step time of

* K separate HF models, each with its own ``DynamicCache`` (the baseline loop);
* the ensemble for each S, with its cache bytes against the K HF caches;
* one-draft models (K=1 ensembles) of n layers, t1(n), which give the prediction
  ``trunk(S) + K·branch(S) = (t1(S) − t1(0)) + K·t1(L−S)`` (t1(0) is embedding + final norm + head);
* one decoder layer called directly with warm weights: the K-draft stacked layer (one ``bmm`` per
  projection over K) against K one-draft layers, i.e. the batched step against a loop over drafts.

    python benchmarks/bench_draft_ensemble.py [--hidden 256 --layers 8 --drafts 4 --threads 1]

Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import platform

import torch
import transformers
from transformers import DynamicCache

from epikern.eval.timing import interleaved_medians
from epikern.models import DraftEnsemble, StackedKVLayer
from epikern.models.hf import hf_cache_keyword
from epikern.models.layers import StackedDecoderLayer, rotary_tables


def make_drafts(args):
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=4 * args.context)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    models = []
    for k in range(args.drafts):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():        # distinct drafts; the trunk is re-shared per S below
                p.add_(0.01 * torch.randn_like(p))
        models.append(m)
    return models


def share_trunk(models, shared):
    """Copies of ``models`` whose embedding and first ``shared`` layers are model 0's."""
    out = [copy.deepcopy(m) for m in models]
    src = out[0].get_decoder()
    for m in out[1:]:
        dec = m.get_decoder()
        dec.embed_tokens.load_state_dict(src.embed_tokens.state_dict())
        for l in range(shared):
            dec.layers[l].load_state_dict(src.layers[l].state_dict())
    return out


def hf_step(models, caches, token):
    def step():
        for m, c in zip(models, caches):
            m(input_ids=token, use_cache=True, **{hf_cache_keyword(type(m)): c})
            c.crop(-1)
    return step


def ens_step(ens, cache, token):
    def step():
        ens(token, None, cache)
        cache.crop(-1)
    return step


def one_draft_step(config, layers, args, prompt, token):
    """Decode step of a single-draft ensemble with ``layers`` decoder layers (for t1(n))."""
    ens = DraftEnsemble(type(config)(**{**config.to_dict(), "num_hidden_layers": layers}), 1, 0)
    cache = ens.new_cache(args.batch)
    ens(prompt, None, cache)
    return ens_step(ens, cache, token)


def layer_step(config, groups, args, hidden):
    """One StackedDecoderLayer decode step (warm weights) for ``groups`` drafts at context P."""
    B, P = args.batch, args.context
    layer = StackedDecoderLayer(config, groups, frozenset())
    rotary = DraftEnsemble(config, 1, 0).rotary_emb
    cos, sin = rotary_tables(*rotary(hidden[0], torch.full((B, 1), P)))
    kv, shape = StackedKVLayer(), (groups, B, layer.num_kv_heads, P, layer.head_dim)
    kv.update(torch.randn(shape), torch.randn(shape))
    x = hidden.expand(groups, -1, -1, -1)

    def run():
        layer(x, cos, sin, None, False, kv)
        kv.crop(-1)
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--drafts", type=int, default=4)
    ap.add_argument("--shared", type=int, nargs="+", default=[0, 4, 6])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    K, L, B, P = args.drafts, args.layers, args.batch, args.context

    base_models = make_drafts(args)
    prompt = torch.randint(0, args.vocab, (B, P))
    token = torch.randint(0, args.vocab, (B, 1))

    caches = [DynamicCache(config=m.config) for m in base_models]
    for m, c in zip(base_models, caches):
        m(input_ids=prompt, use_cache=True, **{hf_cache_keyword(type(m)): c})
    hf_bytes = sum(layer.keys.nbytes + layer.values.nbytes for c in caches for layer in c.layers)
    runners = {"hf": hf_step(base_models, caches, token)}
    ens_bytes = {}
    for S in args.shared:
        ens = DraftEnsemble.from_models(share_trunk(base_models, S), shared_layers=S)
        cache = ens.new_cache(B)
        ens(prompt, None, cache)
        ens_bytes[S] = ens.cache_nbytes(cache)
        runners[f"ens{S}"] = ens_step(ens, cache, token)
    config = base_models[0].config
    sizes = sorted({0, L} | set(args.shared) | {L - S for S in args.shared})
    for n in sizes:
        runners[f"t1_{n}"] = one_draft_step(config, n, args, prompt, token)
    hidden = torch.randn(1, B, 1, args.hidden)
    runners["layer_1"], runners["layer_K"] = layer_step(config, 1, args, hidden), layer_step(config, K, args, hidden)
    ms = {name: 1e3 * s for name, s in interleaved_medians(runners, args.reps, warmup=3).items()}

    hf_ms, t1 = ms["hf"], {n: ms[f"t1_{n}"] for n in sizes}
    rows = []
    for S in args.shared:
        trunk, branch = t1[S] - t1[0], t1[L - S]
        layers_of_kv = S + K * (L - S)
        rows.append((S, ms[f"ens{S}"], trunk, branch, trunk + K * branch, hf_ms / ms[f"ens{S}"], ens_bytes[S],
                     layers_of_kv, ens_bytes[S] / hf_bytes, layers_of_kv / (K * L)))
    one_layer, stacked_layer = ms["layer_1"], ms["layer_K"]

    print(f"\nDraftEnsemble decode step, CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {args.threads} thread(s); Llama H={args.hidden}, "
          f"I={args.intermediate}, L={L}, heads {args.heads}/{args.kv_heads} kv, V={args.vocab}, K={K}, B={B}, "
          f"context {P}, fp32, median of {args.reps} steps (all variants timed round-robin)\n")
    print(f"K separate HF models (loop, own DynamicCache each): **{hf_ms:.2f} ms**/step, cache {hf_bytes / 2**20:.2f} MiB "
          f"({K * L} layers of KV)\n")
    print(f"One draft (K=1) of n layers, t1(n) ms: " + ", ".join(f"t1({n}) = {v:.2f}" for n, v in t1.items()) + "\n")
    print("| S | ensemble step (ms) | trunk (ms) | branch (ms) | trunk + K·branch (ms) | measured / predicted "
          "| speed-up vs HF loop | cache (MiB) | layers of KV S+K(L−S) | cache / HF caches | expected |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for S, ms, trunk, branch, pred, speed, nbytes, layers, ratio, expected in rows:
        print(f"| {S} | {ms:.2f} | {trunk:.2f} | {branch:.2f} | {pred:.2f} | {ms / pred:.2f} | {speed:.2f}× "
              f"| {nbytes / 2**20:.3f} | {layers} | {ratio:.4f} | {expected:.4f} |")
    print(f"\nOne decoder layer, warm weights: K-draft stacked layer {stacked_layer:.3f} ms vs K one-draft "
          f"layers {K * one_layer:.3f} ms (one: {one_layer:.3f} ms)")


if __name__ == "__main__":
    main()
