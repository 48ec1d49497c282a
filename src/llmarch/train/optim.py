"""Optimizers by name, built from optax transformations, each pinned to its reference.

``build_optimizer`` composes, in order: global-norm clipping, the named optimizer's update
rule with weight decay (masked: none on norms and biases), per-parameter-group
learning-rate multipliers, the learning-rate schedule, and gradient accumulation.

With a constant schedule and no clipping, each optimizer takes the same steps as its
``torch.optim`` namesake with the same hyperparameters, and a hyperparameter left unset
(None) takes that namesake's default (``REFERENCE_DEFAULTS``): results read against papers
and PyTorch code mean the same thing here. Each optimizer has its own fields, so one
optimizer's setting (Adam's ``eps``) never leaks into another's (Adadelta's), and a field
the named optimizer does not use is an error rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from llmarch.checks import INT32_MAX, check_int, check_number, fail
from llmarch.config import ModelConfig
from llmarch.layers.memory import VALUES_PATTERN

OPTIMIZERS = ("sgd", "momentum", "adagrad", "adadelta", "rmsprop", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
_NO_DECAY = re.compile(r"(norm|bias)", re.IGNORECASE)
_check = functools.partial(check_number, "OptimizerConfig")

# The defaults of each optimizer's torch.optim namesake (torch 2.x), which follow the papers:
# Adagrad (Duchi et al. 2011), Adadelta (Zeiler 2012: no learning rate, hence lr 1.0), RMSProp
# (Hinton's lecture 6e; centered: Graves 2013), Adam (Kingma & Ba 2015), AdamW (Loshchilov &
# Hutter 2019: decoupled decay, 1e-2 in torch). "momentum" is torch's SGD with momentum 0.9
# (Sutskever et al. 2013), since torch's own default momentum is 0.
REFERENCE_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"learning_rate": 1e-3, "weight_decay": 0.0, "momentum": 0.0, "nesterov": False},
    "momentum": {"learning_rate": 1e-3, "weight_decay": 0.0, "momentum": 0.9, "nesterov": False},
    "adagrad": {"learning_rate": 1e-2, "weight_decay": 0.0, "initial_accumulator_value": 0.0, "eps": 1e-10},
    "adadelta": {"learning_rate": 1.0, "weight_decay": 0.0, "rho": 0.9, "eps": 1e-6},
    "rmsprop": {
        "learning_rate": 1e-2,
        "weight_decay": 0.0,
        "alpha": 0.99,
        "eps": 1e-8,
        "momentum": 0.0,
        "centered": False,
    },
    "adam": {"learning_rate": 1e-3, "weight_decay": 0.0, "b1": 0.9, "b2": 0.999, "eps": 1e-8},
    "adamw": {"learning_rate": 1e-3, "weight_decay": 1e-2, "b1": 0.9, "b2": 0.999, "eps": 1e-8},
}
# The fields whose meaning belongs to an optimizer (set for one that does not take them: an error).
_HYPERPARAMETERS = (
    "momentum",
    "nesterov",
    "b1",
    "b2",
    "eps",
    "rho",
    "alpha",
    "centered",
    "initial_accumulator_value",
)
# Every field that train_config.json files written before the per-optimizer fields held.
_LEGACY_FIELDS = frozenset(
    (
        "name",
        "learning_rate",
        "schedule",
        "warmup_steps",
        "min_lr_ratio",
        "weight_decay",
        "clip_norm",
        "momentum",
        "b1",
        "b2",
        "eps",
        "grad_accum_steps",
        "lr_groups",
    )
)


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
    """The optimizer and its schedule. A hyperparameter left None takes the named optimizer's
    reference default (``REFERENCE_DEFAULTS``; ``resolved()`` fills them in). Which optimizer
    takes which field:

    - sgd, momentum: ``momentum`` (buf = momentum·buf + g), ``nesterov`` (step along
      g + momentum·buf); "momentum" is sgd whose momentum defaults to 0.9.
    - adagrad: ``initial_accumulator_value``, ``eps`` (g / (√Σg² + eps)).
    - adadelta: ``rho``, ``eps`` (inside both square roots, as Zeiler and torch).
    - rmsprop: ``alpha`` (the squared-gradient average's decay), ``eps`` (outside the square
      root, as torch), ``momentum``, ``centered`` (divide by the gradient's standard deviation).
    - adam, adamw: ``b1``, ``b2``, ``eps``; adam adds weight decay to the gradient (L2, torch's
      Adam), adamw decays the weights apart from the adaptive step (torch's AdamW).

    ``weight_decay`` (every optimizer) spares norms and biases (``decay_mask``), where torch
    decays every parameter it is given. ``clip_norm`` (on by default: a training-recipe
    choice, not part of any optimizer) clips the global gradient norm before everything else.
    """

    name: str = "adamw"
    learning_rate: float | None = None  # the peak of the schedule
    schedule: str = "cosine"  # linear warmup, then cosine decay to min_lr_ratio × peak
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float | None = None
    clip_norm: float | None = 1.0
    momentum: float | None = None  # sgd, momentum, rmsprop
    nesterov: bool = False  # sgd, momentum
    b1: float | None = None  # adam, adamw
    b2: float | None = None  # adam, adamw
    eps: float | None = None  # adagrad, adadelta, rmsprop, adam, adamw
    rho: float | None = None  # adadelta
    alpha: float | None = None  # rmsprop
    centered: bool = False  # rmsprop
    initial_accumulator_value: float | None = None  # adagrad
    grad_accum_steps: int = 1
    lr_groups: tuple[LrGroup, ...] = ()

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"OptimizerConfig.name={self.name!r} is unknown; allowed: {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimizerConfig.schedule={self.schedule!r} is unknown; allowed: {SCHEDULES}")
        takes = REFERENCE_DEFAULTS[self.name]
        for field in _HYPERPARAMETERS:
            value = getattr(self, field)
            if field not in takes and value is not None and value is not False:
                fail(
                    "OptimizerConfig",
                    field,
                    value,
                    f"{self.name} does not use it (leave it unset); {self.name} takes {sorted(takes)}",
                )
        for field in ("nesterov", "centered"):
            if not isinstance(getattr(self, field), bool):
                fail("OptimizerConfig", field, getattr(self, field), "must be true or false")
        unit = "must be in [0, 1)", lambda x: 0 <= x < 1
        checks = {
            "learning_rate": ("must be a finite number > 0, or None", lambda x: x > 0),
            "weight_decay": ("must be a finite number >= 0, or None", lambda x: x >= 0),
            "momentum": unit,
            "b1": unit,
            "b2": unit,
            "rho": unit,
            "alpha": unit,
            "eps": ("must be a finite number > 0, or None", lambda x: x > 0),
            "initial_accumulator_value": ("must be a finite number >= 0, or None", lambda x: x >= 0),
        }
        for field, (allowed, ok) in checks.items():
            if getattr(self, field) is not None:
                _check(field, getattr(self, field), allowed, ok)
        momentum = takes.get("momentum") if self.momentum is None else self.momentum
        if self.nesterov and not momentum:
            fail("OptimizerConfig", "nesterov", True, "needs momentum > 0 (as torch's SGD)")
        _check("min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]", lambda x: 0 <= x <= 1)
        if self.clip_norm is not None:
            _check("clip_norm", self.clip_norm, "must be a finite number > 0, or None", lambda x: x > 0)
        check_int("OptimizerConfig", "warmup_steps", self.warmup_steps, low=0, high=INT32_MAX)
        check_int("OptimizerConfig", "grad_accum_steps", self.grad_accum_steps, high=INT32_MAX)
        if not all(isinstance(g, LrGroup) for g in self.lr_groups):
            raise ValueError(f"OptimizerConfig.lr_groups={self.lr_groups!r} must be a tuple of LrGroup")

    def resolved(self) -> OptimizerConfig:
        """The same config with every hyperparameter the optimizer takes and left unset (None)
        replaced by its reference default."""
        unset = {k: v for k, v in REFERENCE_DEFAULTS[self.name].items() if getattr(self, k) is None}
        return dataclasses.replace(self, **unset) if unset else self

    @classmethod
    def upgrade_json(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Reads an ``optimizer`` object as earlier llmarch versions wrote it, every field present
        and none of the per-optimizer ones (``nesterov``, ``rho``, ...), into today's fields with
        the same meaning: fields the optimizer ignored then are dropped, RMSProp's decay moves
        from ``b2`` to ``alpha``, and Adagrad keeps the accumulator's start of 0.1 it had then.
        Adagrad's and RMSProp's ``eps`` now sits outside the square root (as torch), which
        changes steps only where the squared-gradient sum or average is below about ``eps``.
        Anything else is returned as it is (json_config.build calls this before building)."""
        if not isinstance(data, dict) or set(data) != _LEGACY_FIELDS or not isinstance(data["name"], str):
            return data
        used_then = {
            "sgd": (),
            "momentum": ("momentum",),
            "adagrad": ("eps",),
            "adadelta": ("eps",),
            "rmsprop": ("b2", "eps"),
            "adam": ("b1", "b2", "eps"),
            "adamw": ("b1", "b2", "eps"),
        }.get(data["name"])
        if used_then is None:  # an unknown name: let validation say so
            return data
        out = {k: v for k, v in data.items() if k not in ("momentum", "b1", "b2", "eps") or k in used_then}
        if data["name"] == "rmsprop":
            out["alpha"] = out.pop("b2")
        if data["name"] == "adagrad":
            out["initial_accumulator_value"] = 0.1
        return out


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """The schedule over optimizer updates (accumulated micro-steps count once)."""
    peak = cfg.resolved().learning_rate
    if cfg.schedule == "constant":
        if not cfg.warmup_steps:
            return optax.constant_schedule(peak)
        warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
        return optax.join_schedules([warmup, optax.constant_schedule(peak)], [cfg.warmup_steps])
    return optax.warmup_cosine_decay_schedule(
        0.0,
        peak,
        cfg.warmup_steps,
        max(total_steps, cfg.warmup_steps + 1),
        end_value=peak * cfg.min_lr_ratio,
    )


def scale_by_root_sum_of_squares(
    initial_accumulator_value: float, eps: float
) -> optax.GradientTransformation:
    """Adagrad's direction as torch computes it: ``g / (√(a₀ + Σg²) + eps)``.

    ``optax.scale_by_rss`` puts ``eps`` inside the square root (``g / √(Σg² + eps)``), which
    with torch's ``eps=1e-10`` differs from torch's step wherever Σg² is small (a first step
    from a zero accumulator: optax moves by g/√(g² + eps), torch by g/(|g| + eps)). The state is
    optax's ``ScaleByRssState``, so checkpoints written with ``optax.scale_by_rss`` still restore.
    """

    def init(params):
        return optax.ScaleByRssState(sum_of_squares=optax.tree.full_like(params, initial_accumulator_value))

    def update(updates, state, params=None):
        del params
        sums = jax.tree.map(lambda g, s: s + jnp.square(g), updates, state.sum_of_squares)
        updates = jax.tree.map(lambda g, s: g / (jnp.sqrt(s) + eps), updates, sums)
        return updates, optax.ScaleByRssState(sum_of_squares=sums)

    return optax.GradientTransformation(init, update)


def _update_rule(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """The named optimizer's direction (``cfg`` resolved), before weight decay and the learning
    rate; each matches its torch.optim namesake's step divided by the learning rate."""
    match cfg.name:
        case "sgd" | "momentum":
            if not cfg.momentum:
                return optax.identity()
            # torch: buf = momentum·buf + g (dampening 0); the step is buf, or g + momentum·buf.
            return optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov)
        case "adagrad":
            return scale_by_root_sum_of_squares(cfg.initial_accumulator_value, cfg.eps)
        case "adadelta":
            return optax.scale_by_adadelta(rho=cfg.rho, eps=cfg.eps)
        case "rmsprop":
            # torch: g / (√v + eps), v the average of g² (minus the average g's square, centered).
            scale = optax.scale_by_stddev if cfg.centered else optax.scale_by_rms
            rule = scale(decay=cfg.alpha, eps=cfg.eps, eps_in_sqrt=False)
            # torch's RMSProp momentum: buf = momentum·buf + that direction, and the step is buf.
            return optax.chain(rule, optax.trace(decay=cfg.momentum)) if cfg.momentum else rule
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
    cfg = cfg.resolved()
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
