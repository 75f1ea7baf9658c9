"""Kernel configuration of the Triton backend: a small pure function of (K, N, V, dtype).

Two paths compute the same numbers (design §1, §7):

* ``row``   — one program per row; sweeps the vocabulary in blocks (many rows: prefill).
* ``split`` — the vocabulary of each row is spread over ``chunks`` programs that write partial
  online-softmax states to a small fp32 workspace, merged in a fixed order (few rows: decode).

The draft tile a program holds is ``[K_PAD, BLOCK_V]`` with ``K_PAD = next_pow2(K)`` and
``K_PAD · BLOCK_V · itemsize = TILE_BYTES``: the same bytes per block for every K and dtype (the
next block is prefetched into registers in its own dtype, then upcast to fp32). Every
configuration :func:`choose` can return is listed by :func:`all_tile_configs`; the AOT test
compiles each of them for sm_80 and sm_90 and fails on register spills.

Environment overrides, read at call time (for tests and tuning; they bypass the AOT-checked set):

* ``EPIKERN_TRITON_PATH=row|split`` forces a path;
* ``EPIKERN_TRITON_BLOCK_V=<power of two ≥ 16>`` forces the vocabulary block;
* ``EPIKERN_TRITON_CHUNKS=<int ≥ 1>`` forces the number of vocabulary chunks of the split path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

#: Largest number of drafts the Triton kernels take (K_PAD ≤ MAX_K).
MAX_K = 32
#: Bytes of the ``[K_PAD, BLOCK_V]`` draft tile held by one program (4096 fp16/bf16 elements).
TILE_BYTES = 8192
#: num_warps of the vocabulary-sweeping kernels (row kernel, split phases) for tiles of at least
#: 4096 elements (fp16/bf16); fp32 tiles (2048 elements) use half as many, 16 elements a thread
#: either way (with 8 warps, ptxas 12.9 spilled split_mixture K_PAD=4 fp32 on sm_80).
SWEEP_WARPS = 8
#: num_warps of the split path's per-row finalize kernel (no vocabulary sweep).
FINALIZE_WARPS = 4
#: Rows up to which the split path is used automatically.
SPLIT_MAX_ROWS = 128
#: Programs the split path aims for (a few per SM on an H100/H200-class GPU).
SPLIT_TARGET_PROGRAMS = 512
#: Upper bound on the vocabulary chunks of one row (bounds the workspace and the merge).
MAX_CHUNKS = 256
#: Elements of a ``[CHUNK_BLOCK, K_PAD]`` workspace tile merged at once.
MERGE_TILE = 1024

PATHS = ("row", "split")


@dataclass(frozen=True)
class Config:
    """One launch configuration. ``chunks == 1`` for the row path."""

    path: str
    k_pad: int
    block_v: int
    num_warps: int
    chunks: int
    chunk_block: int  #: chunks merged per step by the split path (power of two)

    def chunk_size(self, vocab: int) -> int:
        """Vocabulary entries per split chunk: a multiple of ``block_v``."""
        blocks = _cdiv(_cdiv(vocab, self.block_v), self.chunks)
        return blocks * self.block_v


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


#: Tile elements at K_PAD ≥ 32, where the K_PAD running states take registers of their own
#: (the 4096-element fp16 tile spilled 12 bytes under triton 3.6's ptxas 12.8).
LARGE_K_TILE_ELEMENTS = 2048


def block_v_for(k_pad: int, itemsize: int) -> int:
    elements = TILE_BYTES // itemsize
    if k_pad >= 32:
        elements = min(elements, LARGE_K_TILE_ELEMENTS)
    return max(elements // k_pad, 16)


def warps_for(k_pad: int, block_v: int) -> int:
    """num_warps of a sweeping kernel over a ``[k_pad, block_v]`` tile (16 elements a thread)."""
    return max(1, min(SWEEP_WARPS, k_pad * block_v // (16 * 32)))


def chunk_block_for(k_pad: int) -> int:
    return min(MAX_CHUNKS, max(16, MERGE_TILE // k_pad))


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    return value


def choose(K: int, N: int, V: int, dtype: torch.dtype) -> Config:
    """Configuration for ``K`` drafts, ``N`` rows, vocabulary ``V`` (``dtype`` of the drafts).

    Pure in its arguments unless one of the ``EPIKERN_TRITON_*`` overrides is set.
    """
    if not 1 <= K <= MAX_K:
        raise ValueError(f"backend 'triton' supports 1 to {MAX_K} drafts, got K={K}")
    k_pad = next_pow2(K)
    block_v = block_v_for(k_pad, dtype.itemsize)
    forced_block = _env_int("EPIKERN_TRITON_BLOCK_V")
    if forced_block is not None:
        if forced_block < 16 or forced_block != next_pow2(forced_block):
            raise ValueError(f"EPIKERN_TRITON_BLOCK_V must be a power of two >= 16, got {forced_block}")
        block_v = forced_block
    blocks = _cdiv(V, block_v)
    path = os.environ.get("EPIKERN_TRITON_PATH") or None
    if path is not None and path not in PATHS:
        raise ValueError(f"EPIKERN_TRITON_PATH must be one of {PATHS}, got {path!r}")
    chunks = min(MAX_CHUNKS, blocks, max(1, _cdiv(SPLIT_TARGET_PROGRAMS, max(N, 1))))
    forced_chunks = _env_int("EPIKERN_TRITON_CHUNKS")
    if forced_chunks is not None:
        if not 1 <= forced_chunks <= MAX_CHUNKS:
            raise ValueError(f"EPIKERN_TRITON_CHUNKS must be in [1, {MAX_CHUNKS}], got {forced_chunks}")
        chunks = min(forced_chunks, blocks)
    if path is None:
        path = "split" if N <= SPLIT_MAX_ROWS and chunks > 1 else "row"
    if path == "row":
        chunks = 1
    chunks = _cdiv(blocks, _cdiv(blocks, chunks))  # no empty chunk
    return Config(path, k_pad, block_v, warps_for(k_pad, block_v), chunks, chunk_block_for(k_pad))


def all_tile_configs(itemsize: int) -> list[Config]:
    """Every (path, K_PAD, BLOCK_V, num_warps, CHUNK_BLOCK) :func:`choose` can return for logits
    of ``itemsize`` bytes. ``chunks`` is a runtime argument of the kernels: 1 (row), 2 (split)."""
    out = []
    k_pad = 1
    while k_pad <= MAX_K:
        for path in PATHS:
            block_v = block_v_for(k_pad, itemsize)
            out.append(Config(path, k_pad, block_v, warps_for(k_pad, block_v),
                              1 if path == "row" else 2, chunk_block_for(k_pad)))
        k_pad *= 2
    return out
