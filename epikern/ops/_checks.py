"""Input validation shared by the public ops: one message per error path of design §3."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: float64 logits are served by the reference backend only.
REFERENCE_ONLY_DTYPES = (torch.float64,)


def dispatcher_watching() -> bool:
    """Whether PyTorch must see an op as ATen calls or a registered op, rather than have it run
    straight on raw pointers: under ``torch.compile`` or a dispatch mode (``FlopCounterMode``,
    ``FakeTensorMode``)."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def through_dispatcher(*tensors: Optional[Tensor]) -> bool:
    """Whether a call must go through its registered op rather than straight to the backend: under
    ``torch.compile``, a dispatch mode, meta tensors or autograd. Elsewhere the dispatcher's
    wrappers only cost time (~40 µs a call, and three times that once a decoding loop's target
    forward has evicted them from the caches)."""
    grad = torch.is_grad_enabled()
    return dispatcher_watching() or any(
        t is not None and (t.is_meta or (grad and t.requires_grad)) for t in tensors)


def check_logits(name: str, x: Tensor, min_dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.dtype in LOGIT_DTYPES or x.dtype in REFERENCE_ONLY_DTYPES):
        raise TypeError(
            f"{name} must be a floating tensor (float32, float16 or bfloat16), got {x.dtype}"
        )
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(x.shape)}")


def check_same_device(**tensors: Optional[Tensor]) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return first


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, Tensor):
        raise TypeError("temperature must be a Python number, not a tensor")
    t = float(temperature)
    if not 0 < t < math.inf:  # also False for NaN; comparisons trace under torch.compile
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return t


def check_reference_dtype(backend: str, **tensors: Optional[Tensor]) -> None:
    for k, v in tensors.items():
        if v is not None and v.dtype in REFERENCE_ONLY_DTYPES and backend != "torch":
            raise TypeError(
                f"{k} is {v.dtype}, which only backend='torch' supports "
                f"(backend {backend!r} reads float32, float16 and bfloat16)"
            )


def uniform_or_checked_weights(
    weights: Union[None, Sequence[float], Tensor], k: int, device: torch.device
) -> Tensor:
    """``[K]`` float32 mixture weights on ``device``: uniform if None, otherwise validated.

    Python sequences and CPU tensors are checked on the host; weights already on an accelerator
    are checked with ``torch._assert_async`` so that no host synchronisation happens.
    """
    if weights is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float32, device=device)
    if isinstance(weights, Tensor):
        if weights.dtype.is_complex or not weights.dtype.is_floating_point:
            raise TypeError(f"weights must be a floating tensor, got {weights.dtype}")
        if weights.dim() != 1 or weights.shape[0] != k:
            raise ValueError(f"weights must have shape [{k}] (one per draft), got {tuple(weights.shape)}")
        w = weights.detach()
        if w.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_weight_values(w.tolist())
        else:
            w = w.to(device)
            torch._assert_async(((w >= 0).all() & ((w.sum() - 1).abs() <= 1e-5)),
                                "weights must be non-negative and sum to 1")
        return w.to(device=device, dtype=torch.float32)
    values = [float(v) for v in weights]
    if len(values) != k:
        raise ValueError(f"weights must have {k} entries (one per draft), got {len(values)}")
    _check_weight_values(values)
    return torch.tensor(values, dtype=torch.float32, device=device)


def _check_weight_values(values: Sequence[float]) -> None:
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"weights must be finite and non-negative, got {list(values)}")
    total = math.fsum(values)
    if abs(total - 1.0) > 1e-5:
        raise ValueError(f"weights must sum to 1 (within 1e-5), got sum {total!r} for {list(values)}")


def last_dim_contiguous(x: Tensor) -> Tensor:
    """Copy only when the vocabulary dimension is strided (kernels take any other strides)."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def check_vocab_size(vocab_size) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")


def shared_vocab(vocab_size: Optional[int], inputs: dict[str, Optional[Tensor]],
                 vocab_dims: Optional[dict[str, int]] = None) -> list[Optional[Tensor]]:
    """``inputs`` (None entries pass through) cut to one vocabulary, in the order given.

    The vocabulary is each tensor's last dim, or ``vocab_dims[name]`` (an LM-head weight's rows).
    With ``vocab_size`` every input keeps its first ``vocab_size`` entries (a view: padded
    vocabularies that differ); without it all must have the same, non-empty vocabulary.
    """
    dims = vocab_dims or {}
    present = {k: (v, dims.get(k, -1)) for k, v in inputs.items() if v is not None}
    sizes = {k: v.shape[d] for k, (v, d) in present.items()}
    if vocab_size is not None:
        check_vocab_size(vocab_size)
        if min(sizes.values()) < vocab_size:
            listing = ", ".join(f"{k} {n}" for k, n in sizes.items())
            raise ValueError(f"vocab_size={vocab_size} exceeds the vocabulary of the inputs ({listing})")
        return [None if v is None else v.narrow(dims.get(k, -1), 0, vocab_size) for k, v in inputs.items()]
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{k} {tuple(v.shape)} has V={sizes[k]}" for k, (v, _) in present.items())
        raise ValueError(f"vocabulary mismatch: {listing}; pass vocab_size= to compare the shared "
                         "prefix of padded vocabularies")
    if 0 in sizes.values():
        first, (tensor, _) = next(iter(present.items()))
        raise ValueError(f"the vocabulary is empty: {first} {tuple(tensor.shape)}")
    return list(inputs.values())
