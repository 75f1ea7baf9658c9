"""Training configuration: one frozen dataclass for the loop, one per recipe, all JSON-serialisable.

Every checkpoint stores the whole recipe config (:func:`to_dict`); ``--resume`` compares it with the
config of the new run field by field (:func:`config_diff`) and refuses to continue a different run.

    TrainConfig                  the optimisation loop: steps, global batch, AdamW, schedule, seed
    TargetRecipe                 ``epikern train target``: tiny Llama target on the synthetic task
    DraftsRecipe                 ``epikern train drafts``: DDD (a×b) or IDD drafts by forward KL
    ProxyRecipe                  ``epikern train proxy``: the OSD proxy

``quick`` presets (``--quick``) are the same recipes with fewer steps, problems and responses.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of :func:`epikern.training.loop.train`.

    The learning rate follows a linear warmup to ``lr`` over ``warmup_steps`` and then a cosine decay
    to ``min_lr_ratio · lr`` at ``steps``:

        lr(s) = lr · (s + 1) / warmup_steps                                  s < warmup_steps
        lr(s) = lr · (r + (1 − r) · ½ (1 + cos(π · (s − w) / (steps − w))))   otherwise, r = min_lr_ratio

    Attributes:
        steps: optimizer steps.
        batch_size: the *global* batch in sequences, split evenly across processes under torchrun
            (so 2 processes compute the same step as 1 process, up to float reassociation).
        lr, warmup_steps, min_lr_ratio: the schedule above.
        weight_decay: AdamW decoupled decay, applied to matrices only (not norms, not biases).
        betas, eps: AdamW moments.
        grad_clip: clip the global gradient norm to this (0 disables clipping).
        seed: seeds data order, initialisation jitter and every noise stream of the run.
        checkpoint_every: write a checkpoint every this many steps and at the last step (0: only at
            the last step).
    """

    steps: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self):
        _positive_int("steps", self.steps)
        _positive_int("batch_size", self.batch_size)
        if not (isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps <= self.steps):
            raise ValueError(f"warmup_steps must be an int in [0, steps={self.steps}], got {self.warmup_steps!r}")
        if not (isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0):
            raise ValueError(f"checkpoint_every must be an int >= 0, got {self.checkpoint_every!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not (self.weight_decay >= 0 and self.grad_clip >= 0 and self.eps > 0):
            raise ValueError(f"weight_decay and grad_clip must be >= 0 and eps > 0, got "
                             f"{self.weight_decay!r}, {self.grad_clip!r}, {self.eps!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based), as in the class docstring."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_steps = max(self.steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        r = self.min_lr_ratio
        return self.lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class TinyModelConfig:
    """The tiny Llama-style target (``transformers.LlamaConfig``; the vocabulary is the tokenizer's).

    The default (6 layers, 0.63 M parameters) reaches about 50 % held-out accuracy on the default
    task in 400 steps (3 layers: 0.31 M, about 43 %); a narrower model or fewer steps stays near 0
    (the copying of operands is learnt late). Six layers so that the 2-layer drafts cost a third of
    a target step, the regime where speculative decoding pays (with 3 they cost 0.55×).
    """

    hidden_size: int = 96
    intermediate_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 256


@dataclass(frozen=True)
class TargetRecipe:
    """``epikern train target``: the tiny target, its held-out accuracy and its sampled responses.

    Attributes:
        model: architecture of the tiny target.
        synthetic: keyword arguments of :class:`epikern.data.SyntheticConfig` (the task difficulty
            and the data seed). Default: 1-2 steps of ``+``/``-`` on one-digit numbers.
        train_problems: synthetic problems the target is trained on (cross-entropy on the answer).
        heldout_problems: disjoint problems (:func:`epikern.data.generate_splits`: no question or
            worked answer of the training set) on which its greedy accuracy is measured.
        response_prompts: training prompts for which R responses are sampled (the drafts' data).
        responses_per_prompt: R.
        max_new_tokens: cap of a sampled or greedy answer.
        train: the loop.
    """

    model: TinyModelConfig = TinyModelConfig()
    synthetic: dict = field(default_factory=lambda: {"steps": (1, 2), "digits": (1, 1), "ops": ("+", "-")})
    train_problems: int = 12000
    heldout_problems: int = 300
    response_prompts: int = 256
    responses_per_prompt: int = 4
    max_new_tokens: int = 64
    train: TrainConfig = TrainConfig(steps=400, batch_size=32, lr=5e-3, warmup_steps=20, checkpoint_every=100)

    def __post_init__(self):
        # kept in its JSON form (lists), so that a recipe equals its own round trip through JSON
        object.__setattr__(self, "synthetic", json_ready(dict(self.synthetic)))


@dataclass(frozen=True)
class DraftsRecipe:
    """``epikern train drafts``: K = a·b drafts distilled from the target with forward KL.

    Attributes:
        target: the target's spec (HF directory, ``.gguf`` or ``smollm2``) as given.
        partitions, drafts_per_partition: a and b of ``--ddd a×b``.
        idd: identical data: every draft trains on the responses of *all* prompts (instead of its
            partition's), with the same steps and batch as a DDD draft, its own seed.
        shared_layers: S, the trunk (the embedding and the first S layers, frozen, shared).
        branch_layers: decoder layers of a draft after the trunk; a draft has S + branch_layers
            layers, initialised from the corresponding layers of the target (or ``draft_init``).
        jitter: each draft's branch weights start at the source weights plus Gaussian noise of
            ``jitter · rms(W)`` from its own seed, so that drafts differ from step 0.
        osd: distil from the perturbed target (fresh noise every step) instead of the clean one.
        osd_members, sigma, rank: the perturbed teacher (members averaged per step, TokUR's noise).
        draft_init: an HF model to initialise the drafts from instead of the target (same
            vocabulary as the target; its own embedding and first S layers form the trunk).
        layer_skip: initialise the branch from the source's **last** ``branch_layers`` layers
            (``L − n .. L − 1``) instead of the layers right after the trunk, so that a draft starts
            as the target with its middle skipped (a self-speculative draft).
        psd: posterior-sample distillation: draft k is distilled from the target under its own
            **fixed** draw of TokUR's perturbation (``sigma``, ``rank``; a fixed seed per draft,
            different across drafts), a posterior sample, instead of the clean target.
        more_responses: extra responses per prompt sampled from the target (temperature 1, a seed
            of their own) for the prompts of a stored responses file: a larger distillation set.
        responses: where the distillation data came from (``"<dir>/responses.jsonl"``, ``"target"``
            for sampling from the target, or ``"reference"`` for GSM8K reference solutions).
        prompts, responses_per_prompt, max_new_tokens: for a target without stored responses, how
            many GSM8K train prompts, responses per prompt and new tokens to sample.
        train: the loop of one draft.
    """

    target: str = ""
    partitions: int = 2
    drafts_per_partition: int = 2
    idd: bool = False
    shared_layers: int = 1
    branch_layers: int = 1
    jitter: float = 0.02
    osd: bool = False
    osd_members: int = 2
    sigma: float = 0.1
    rank: int = 8
    draft_init: Optional[str] = None
    responses: str = ""
    prompts: int = 8
    responses_per_prompt: int = 1
    max_new_tokens: int = 32
    train: TrainConfig = TrainConfig(steps=80, batch_size=16, lr=2e-3, warmup_steps=8, checkpoint_every=40)
    layer_skip: bool = False
    psd: bool = False
    more_responses: int = 0

    #: options added after the first recipes were cached: left out of :func:`to_dict` at their
    #: defaults, so that the recipes (and cache keys) of earlier runs stay what they were
    LATE_FIELDS = ("layer_skip", "psd", "more_responses")

    def __post_init__(self):
        if self.osd and self.psd:
            raise ValueError("--osd and --psd are two different teachers (fresh noise every step vs one fixed "
                             "draw per draft): choose one")
        if isinstance(self.more_responses, bool) or not isinstance(self.more_responses, int) \
                or self.more_responses < 0:
            raise ValueError(f"more_responses must be an int >= 0, got {self.more_responses!r}")

    @property
    def num_drafts(self) -> int:
        """K = a·b."""
        return self.partitions * self.drafts_per_partition


@dataclass(frozen=True)
class ProxyRecipe:
    """``epikern train proxy``: OSD, the target's copy distilled towards its perturbed average.

    Attributes:
        target, responses, prompts, responses_per_prompt, max_new_tokens: as in
            :class:`DraftsRecipe` (the same data).
        osd_members: perturbed members per step whose mixture is the step's teacher (fresh noise
            every step; the expected gradient is that of distilling to the perturbed average).
        sigma, rank: TokUR's perturbation (design §5).
        train: the loop.
    """

    target: str = ""
    responses: str = ""
    prompts: int = 8
    responses_per_prompt: int = 1
    max_new_tokens: int = 32
    osd_members: int = 2
    sigma: float = 0.1
    rank: int = 8
    train: TrainConfig = TrainConfig(steps=40, batch_size=16, lr=1e-4, warmup_steps=4, checkpoint_every=20)


def to_dict(config) -> dict:
    """A JSON-ready dict of a (nested) config dataclass; its ``LATE_FIELDS`` only where they differ
    from their defaults (:func:`from_dict` restores them)."""
    out = json_ready(dataclasses.asdict(config))
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for name in getattr(config, "LATE_FIELDS", ()):
        if out[name] == defaults[name]:
            del out[name]
    return out


def json_ready(value: Any) -> Any:
    """Tuples → lists recursively, so that a dict equals its own JSON round trip."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def from_dict(cls, data: dict):
    """Rebuild a config dataclass (nested dataclasses included) from :func:`to_dict`'s output.

    Raises:
        ValueError: unknown fields (names them).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = from_dict(type(default), value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two :func:`to_dict` outputs, with both values.

    Example: ``["train.steps: 200 (checkpoint) vs 300 (now)"]``.
    """
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_diff(a, b, name + ".")
        elif json_ready(a) != json_ready(b):
            diffs.append(f"{name}: {a!r} (checkpoint) vs {b!r} (now)")
    return diffs

