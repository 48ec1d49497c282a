"""Optimizers by name, built from optax transformations.

``build_optimizer`` composes, in order: global-norm clipping, the named optimizer's update
rule with weight decay (masked: none on norms and biases), per-parameter-group
learning-rate multipliers, the learning-rate schedule, and gradient accumulation.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable

import jax
import optax

from llmarch.checks import INT32_MAX, check_int, check_number
from llmarch.config import ModelConfig
from llmarch.layers.memory import VALUES_PATTERN

OPTIMIZERS = ("sgd", "momentum", "adagrad", "adadelta", "rmsprop", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
_NO_DECAY = re.compile(r"(norm|bias)", re.IGNORECASE)
_check = functools.partial(check_number, "OptimizerConfig")


@dataclasses.dataclass(frozen=True)
class LrGroup:
    """Parameters whose path matches ``pattern`` (a regex over ``a/b/c`` paths) train at
    ``multiplier`` × the learning rate, moving linearly to ``final_multiplier`` over training
    when it is set (UltraMem's value tables start at 4× and end at 1×)."""

    pattern: str
    multiplier: float
    final_multiplier: float | None = None

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"LrGroup.pattern={self.pattern!r} is not a regex: {e}") from None
        for name in ("multiplier", "final_multiplier"):
            value = getattr(self, name)
            if value is not None:
                check_number("LrGroup", name, value, "must be a finite number >= 0", lambda x: x >= 0)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"
    learning_rate: float = 3e-3
    schedule: str = "cosine"  # linear warmup, then cosine decay to min_lr_ratio × peak
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    momentum: float = 0.9  # momentum (sgd with momentum), rmsprop's momentum is not used
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_accum_steps: int = 1
    lr_groups: tuple[LrGroup, ...] = ()

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"OptimizerConfig.name={self.name!r} is unknown; allowed: {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimizerConfig.schedule={self.schedule!r} is unknown; allowed: {SCHEDULES}")
        _check("learning_rate", self.learning_rate, "must be a finite number > 0", lambda x: x > 0)
        _check("min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]", lambda x: 0 <= x <= 1)
        _check("weight_decay", self.weight_decay, "must be a finite number >= 0", lambda x: x >= 0)
        if self.clip_norm is not None:
            _check("clip_norm", self.clip_norm, "must be a finite number > 0, or None", lambda x: x > 0)
        _check("momentum", self.momentum, "must be in [0, 1)", lambda x: 0 <= x < 1)
        _check("b1", self.b1, "must be in [0, 1)", lambda x: 0 <= x < 1)
        _check("b2", self.b2, "must be in [0, 1)", lambda x: 0 <= x < 1)
        _check("eps", self.eps, "must be a finite number > 0", lambda x: x > 0)
        check_int("OptimizerConfig", "warmup_steps", self.warmup_steps, low=0, high=INT32_MAX)
        check_int("OptimizerConfig", "grad_accum_steps", self.grad_accum_steps, high=INT32_MAX)
        if not all(isinstance(g, LrGroup) for g in self.lr_groups):
            raise ValueError(f"OptimizerConfig.lr_groups={self.lr_groups!r} must be a tuple of LrGroup")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """The schedule over optimizer updates (accumulated micro-steps count once)."""
    if cfg.schedule == "constant":
        if not cfg.warmup_steps:
            return optax.constant_schedule(cfg.learning_rate)
        warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
        return optax.join_schedules([warmup, optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
    return optax.warmup_cosine_decay_schedule(
        0.0,
        cfg.learning_rate,
        cfg.warmup_steps,
        max(total_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def _update_rule(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """The named optimizer's direction, before weight decay and the learning rate."""
    match cfg.name:
        case "sgd":
            return optax.identity()
        case "momentum":
            return optax.trace(decay=cfg.momentum)
        case "adagrad":
            return optax.scale_by_rss(initial_accumulator_value=0.1, eps=cfg.eps)
        case "adadelta":
            return optax.scale_by_adadelta(eps=cfg.eps)
        case "rmsprop":
            return optax.scale_by_rms(decay=cfg.b2, eps=cfg.eps)
        case "adam" | "adamw":
            return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    raise AssertionError(cfg.name)  # unreachable: validated in OptimizerConfig


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def decay_mask(params) -> object:
    """True for parameters that take weight decay: all but norms and biases."""
    return jax.tree_util.tree_map_with_path(lambda p, _: not _NO_DECAY.search(_path(p)), params)


def _group_labels(groups: tuple[LrGroup, ...]) -> Callable:
    def labels(params):
        def one(path, _):
            name = _path(path)
            for i, g in enumerate(groups):
                if re.search(g.pattern, name):
                    return f"group{i}"
            return "base"

        return jax.tree_util.tree_map_with_path(one, params)

    return labels


def model_lr_groups(model: ModelConfig) -> tuple[LrGroup, ...]:
    """The learning-rate groups a model's own config asks for: UltraMem's value tables train at
    λ × the learning rate, λ decaying linearly from ``memory.value_lr`` (λ₀ = 4) to
    ``memory.value_lr_final`` (1); ``()`` when nothing asks."""
    memory = model.memory
    if memory is None or (memory.value_lr == 1.0 and memory.value_lr_final == 1.0):
        return ()
    return (LrGroup(VALUES_PATTERN, memory.value_lr, memory.value_lr_final),)


def build_optimizer(
    cfg: OptimizerConfig, total_steps: int, model: ModelConfig | None = None
) -> optax.GradientTransformation:
    """The optimizer for ``total_steps`` updates (``optax.MultiSteps`` when accumulating), with
    ``cfg.lr_groups`` and then the groups that ``model``'s config asks for (``model_lr_groups``;
    the first group whose pattern matches a parameter wins)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} is invalid: must be > 0")
    if model is not None:
        cfg = dataclasses.replace(cfg, lr_groups=cfg.lr_groups + model_lr_groups(model))
    updates = total_steps // cfg.grad_accum_steps or 1
    parts = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    # AdamW decays the weights apart from the adaptive update (Loshchilov & Hutter 2019);
    # every other optimizer takes weight decay as L2, added to the gradient (as torch does).
    decay = [optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask)] if cfg.weight_decay else []
    parts += [_update_rule(cfg), *decay] if cfg.name == "adamw" else [*decay, _update_rule(cfg)]
    if cfg.lr_groups:

        def multiplier(g: LrGroup) -> optax.GradientTransformation:
            end = g.multiplier if g.final_multiplier is None else g.final_multiplier
            return optax.scale_by_schedule(optax.linear_schedule(g.multiplier, end, updates))

        transforms = {f"group{i}": multiplier(g) for i, g in enumerate(cfg.lr_groups)}
        transforms["base"] = optax.identity()
        parts.append(optax.multi_transform(transforms, _group_labels(cfg.lr_groups)))
    parts.append(optax.scale_by_learning_rate(learning_rate_schedule(cfg, updates)))
    tx = optax.chain(*parts)
    if cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
    return tx
