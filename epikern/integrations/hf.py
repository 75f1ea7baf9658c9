"""``epikern.integrations.hf.generate``: per-token EU from K drafts inside transformers' own ``generate``.

    out = target.generate(input_ids, attention_mask=mask, custom_generate=epikern.integrations.hf.generate,
                          drafts=ensemble, speculative_tokens=4, max_new_tokens=64,
                          return_dict_in_generate=True)
    out.sequences, out.uncertainty.eu          # DraftUncertainty [B, N], NaN after eos

transformers 5.x calls a callable ``custom_generate`` as ``custom_generate(model, input_ids,
logits_processor=…, stopping_criteria=…, generation_config=…, **custom, **model_kwargs)`` once it has
merged the GenerationConfig with the call's options (``max_length`` from ``max_new_tokens``, eos and
pad ids, ``do_sample``, ``temperature``), expanded the batch for ``num_return_sequences``, and built
the logits processors and stopping criteria; ``custom`` are the call's keyword arguments named in
this function's signature (``drafts``, ``speculative_tokens``, ``reference``, ``proposal``,
``confidence_threshold``). The decoding is :meth:`epikern.DraftEstimator.generate`'s (rounds of
:mod:`epikern.models.decoding`), so tokens and EU are its numbers. What it cannot honour — any logits
processor but the temperature, any stopping criterion but max length and eos, beam search, extra
outputs, a prefilled cache — raises a ``ValueError`` rather than being silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ..extras import require

require("models", __name__)

from torch import Tensor, nn  # noqa: E402
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList  # noqa: E402
from transformers.generation import (EosTokenCriteria, GenerateDecoderOnlyOutput, MaxLengthCriteria,  # noqa: E402
                                     TemperatureLogitsWarper)

from ..models import DraftEnsemble, DraftEstimator  # noqa: E402
from ..models.decoding import DecodingStats  # noqa: E402
from ..models.speculative import MIXTURE  # noqa: E402
from ..ops import DraftUncertainty  # noqa: E402

#: What to pass ``generate`` to drop a logits processor transformers adds by default or from the config.
_PROCESSOR_HINTS = {"TopKLogitsWarper": "pass top_k=0 (transformers samples with top_k=50 by default)",
                    "TopPLogitsWarper": "pass top_p=1.0"}
#: The keyword arguments transformers prepares for a model forward; epikern runs its own forwards.
_MODEL_KWARGS = frozenset({"attention_mask", "position_ids", "cache", "past_key_values", "use_cache",
                           "logits_to_keep"})
#: GenerationConfig options with no epikern counterpart, with the value that leaves them off.
_OFF = {"num_beams": 1, "output_scores": False, "output_logits": False, "output_attentions": False,
        "output_hidden_states": False}


@dataclass
class DraftGenerateOutput(GenerateDecoderOnlyOutput):
    """transformers' decoder-only output with the drafts' uncertainty of every generated token."""

    uncertainty: Optional[DraftUncertainty] = None  #: fields [B, N] (draft_lse [K, B, N]); NaN after eos
    generated_mask: Optional[Tensor] = None  #: [B, N] bool, True for tokens up to and including eos
    stats: Optional[DecodingStats] = None  #: rounds, acceptance and forwards of each model


def generate(model: nn.Module, input_ids: Tensor, logits_processor: Optional[LogitsProcessorList] = None,
             stopping_criteria: Optional[StoppingCriteriaList] = None,
             generation_config: Optional[GenerationConfig] = None, *, drafts: Optional[DraftEnsemble] = None,
             speculative_tokens: int = 0, reference: Optional[nn.Module] = None, proposal: Union[str, int] = MIXTURE,
             confidence_threshold: float = 0.0, **model_kwargs) -> Union[Tensor, DraftGenerateOutput]:
    """Decode with ``model`` (plain decoding at γ = 0, else speculative) and score every token's EU.

    Args (besides what transformers passes):
        drafts: the :class:`~epikern.DraftEnsemble` (required).
        speculative_tokens: γ ≥ 0 draft proposals per round (0: plain decoding with EU).
        reference: the distribution p of ``kl``/``eu``: None for ``model`` itself, or an OSD proxy.
        proposal: ``"mixture"`` or a draft index k; confidence_threshold: τ of adaptive rounds.

    Returns:
        The sequences ``[B, T0 + N]`` (pad after a row's eos), or with ``return_dict_in_generate=True``
        a :class:`DraftGenerateOutput` (``.sequences``, ``.uncertainty``, ``.generated_mask``, ``.stats``).

    Raises:
        TypeError: ``drafts`` missing or not a DraftEnsemble. ValueError: an option it does not honour.
    """
    config = model.generation_config if generation_config is None else generation_config
    _check_supported(config, logits_processor, stopping_criteria, model_kwargs)
    if not isinstance(drafts, DraftEnsemble):
        raise TypeError(f"custom_generate=epikern.integrations.hf.generate needs drafts=<a DraftEnsemble>, "
                        f"got {type(drafts).__name__}")
    max_new_tokens = config.max_length - input_ids.shape[1]
    out = DraftEstimator(model, drafts, reference).generate(
        input_ids, model_kwargs.get("attention_mask"), max_new_tokens=max_new_tokens, do_sample=bool(config.do_sample),
        temperature=1.0 if config.temperature is None else config.temperature, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id, speculative_tokens=speculative_tokens, proposal=proposal,
        confidence_threshold=confidence_threshold)
    if not config.return_dict_in_generate:
        return out.sequences
    return DraftGenerateOutput(sequences=out.sequences, uncertainty=out.uncertainty,
                               generated_mask=out.generated_mask, stats=out.stats)


def _check_supported(config: GenerationConfig, logits_processor: Optional[LogitsProcessorList],
                     stopping_criteria: Optional[StoppingCriteriaList], model_kwargs: dict) -> None:
    """Raise on everything transformers prepared that the decoding core would not honour."""
    where = "custom_generate=epikern.integrations.hf.generate"
    for name, off in _OFF.items():
        if (getattr(config, name, None) or off) != off:
            raise ValueError(f"{where} does not support {name}={getattr(config, name)!r}")
    for processor in logits_processor or ():
        kind = type(processor).__name__
        if not isinstance(processor, TemperatureLogitsWarper):
            hint = _PROCESSOR_HINTS.get(kind, "drop the generate option (or logits_processor=) that adds it")
            raise ValueError(f"{where} does not apply {kind} (it samples from softmax(logits / temperature) "
                             f"over the whole vocabulary); {hint}")
    for criterion in stopping_criteria or ():
        if not isinstance(criterion, (MaxLengthCriteria, EosTokenCriteria)):
            raise ValueError(f"{where} stops at max_new_tokens and eos only, not at {type(criterion).__name__} "
                             f"(max_time=, stop_strings= or stopping_criteria=)")
    unknown = sorted(set(model_kwargs) - _MODEL_KWARGS)
    if unknown:
        raise ValueError(f"{where} runs its own forwards and does not take {', '.join(unknown)}")
    for key in ("cache", "past_key_values"):
        cache = model_kwargs.get(key)
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(f"{where} starts from the prompt and does not continue a prefilled {key}")
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"{where} needs a 2-D attention_mask [B, T0], got shape {tuple(attention_mask.shape)}")


__all__ = ["DraftGenerateOutput", "generate"]
