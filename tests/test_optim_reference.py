"""Each optimizer against its reference: several steps on the same tensors and gradients through
``build_optimizer`` (constant schedule, no clipping), through the update equations written out in
numpy (float64), and, with torch installed, through ``torch.optim``; and llmarch's defaults
against torch's own."""

import inspect

import jax
import numpy as np
import optax
import pytest

from llmarch.train.optim import OPTIMIZERS, REFERENCE_DEFAULTS, OptimizerConfig, build_optimizer

STEPS = 6
SHAPES = {"w": (3, 4), "v": (5,)}  # no "norm"/"bias" in the names: every parameter takes decay


def _problem(seed=0):
    """Parameters and a fixed gradient sequence; some entries tiny (where ``eps`` matters) and
    one exactly zero at the first step (an accumulator that starts empty)."""
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    grads = []
    for t in range(STEPS):
        g = {k: rng.normal(size=s) for k, s in SHAPES.items()}
        g["v"][:2] *= 1e-3
        if t == 0:
            g["w"][0, 0] = 0.0
        grads.append(g)
    return params, grads


# (case id, OptimizerConfig fields, torch.optim class name, torch keyword arguments). The first
# case of each optimizer sets nothing: llmarch's defaults against torch's.
CASES = [
    ("sgd", {"name": "sgd"}, "SGD", {}),
    (
        "sgd-decay",
        {"name": "sgd", "learning_rate": 0.1, "weight_decay": 0.1},
        "SGD",
        {"lr": 0.1, "weight_decay": 0.1},
    ),
    (
        "sgd-momentum",
        {"name": "sgd", "learning_rate": 0.1, "momentum": 0.8},
        "SGD",
        {"lr": 0.1, "momentum": 0.8},
    ),
    ("momentum", {"name": "momentum", "learning_rate": 0.05}, "SGD", {"lr": 0.05, "momentum": 0.9}),
    (
        "nesterov-decay",
        {"name": "momentum", "learning_rate": 0.05, "nesterov": True, "weight_decay": 0.01},
        "SGD",
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    ),
    ("adagrad", {"name": "adagrad"}, "Adagrad", {}),
    (
        "adagrad-options",
        {
            "name": "adagrad",
            "learning_rate": 0.1,
            "initial_accumulator_value": 0.5,
            "eps": 0.05,
            "weight_decay": 0.1,
        },
        "Adagrad",
        {"lr": 0.1, "initial_accumulator_value": 0.5, "eps": 0.05, "weight_decay": 0.1},
    ),
    ("adadelta", {"name": "adadelta"}, "Adadelta", {}),
    (
        "adadelta-options",
        {"name": "adadelta", "learning_rate": 0.5, "rho": 0.8, "eps": 1e-3, "weight_decay": 0.1},
        "Adadelta",
        {"lr": 0.5, "rho": 0.8, "eps": 1e-3, "weight_decay": 0.1},
    ),
    ("rmsprop", {"name": "rmsprop"}, "RMSprop", {}),
    (
        "rmsprop-momentum-eps",
        {"name": "rmsprop", "learning_rate": 0.01, "alpha": 0.9, "eps": 0.01, "momentum": 0.5},
        "RMSprop",
        {"lr": 0.01, "alpha": 0.9, "eps": 0.01, "momentum": 0.5},
    ),
    (
        "rmsprop-centered-decay",
        {"name": "rmsprop", "centered": True, "momentum": 0.9, "weight_decay": 0.1},
        "RMSprop",
        {"centered": True, "momentum": 0.9, "weight_decay": 0.1},
    ),
    ("adam", {"name": "adam"}, "Adam", {}),
    (
        "adam-l2",
        {"name": "adam", "learning_rate": 0.01, "b1": 0.8, "b2": 0.95, "eps": 1e-3, "weight_decay": 0.1},
        "Adam",
        {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.1},
    ),
    ("adamw", {"name": "adamw"}, "AdamW", {}),
    (
        "adamw-decoupled",
        {"name": "adamw", "learning_rate": 0.01, "b2": 0.95, "weight_decay": 0.5},
        "AdamW",
        {"lr": 0.01, "betas": (0.9, 0.95), "weight_decay": 0.5},
    ),
    ("adamw-no-decay", {"name": "adamw", "weight_decay": 0.0}, "AdamW", {"weight_decay": 0.0}),
]
IDS = [c[0] for c in CASES]


def _llmarch(fields, params, grads):
    cfg = OptimizerConfig(schedule="constant", clip_norm=None, **fields)
    tx = build_optimizer(cfg, total_steps=STEPS)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(jax.tree.map(lambda x: np.asarray(x, np.float32), g), state, params)
        params = optax.apply_updates(params, updates)
    return {k: np.asarray(v, np.float64) for k, v in params.items()}


def _numpy(fields, params, grads):
    """The update equations as torch.optim's documentation writes them, in float64."""
    c = OptimizerConfig(**fields).resolved()
    lr, wd = c.learning_rate, c.weight_decay
    out = {}
    for k, p in params.items():
        p = p.copy()
        buf = np.zeros_like(p)  # momentum buffer / Adam's first moment / centered mean
        sq = np.zeros_like(p) + (c.initial_accumulator_value or 0.0)  # second moment or Σg²
        acc = np.zeros_like(p)  # Adadelta's average squared step
        mean = np.zeros_like(p)
        for t, step_grads in enumerate(grads, start=1):
            g = step_grads[k]
            if c.name == "adamw":
                p = p * (1 - lr * wd)  # decoupled decay
            else:
                g = g + wd * p  # L2: decay added to the gradient
            if c.name in ("sgd", "momentum"):
                if c.momentum:
                    buf = c.momentum * buf + g
                    g = g + c.momentum * buf if c.nesterov else buf
                p = p - lr * g
            elif c.name == "adagrad":
                sq = sq + g * g
                p = p - lr * g / (np.sqrt(sq) + c.eps)
            elif c.name == "adadelta":
                sq = c.rho * sq + (1 - c.rho) * g * g
                delta = np.sqrt(acc + c.eps) / np.sqrt(sq + c.eps) * g
                acc = c.rho * acc + (1 - c.rho) * delta * delta
                p = p - lr * delta
            elif c.name == "rmsprop":
                sq = c.alpha * sq + (1 - c.alpha) * g * g
                var = sq
                if c.centered:
                    mean = c.alpha * mean + (1 - c.alpha) * g
                    var = sq - mean * mean
                direction = g / (np.sqrt(var) + c.eps)
                if c.momentum:
                    buf = c.momentum * buf + direction
                    direction = buf
                p = p - lr * direction
            else:  # adam, adamw
                buf = c.b1 * buf + (1 - c.b1) * g
                sq = c.b2 * sq + (1 - c.b2) * g * g
                m_hat, v_hat = buf / (1 - c.b1**t), sq / (1 - c.b2**t)
                p = p - lr * m_hat / (np.sqrt(v_hat) + c.eps)
        out[k] = p
    return out


def _torch(cls_name, kwargs, params, grads):
    torch = pytest.importorskip("torch")
    tensors = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    opt = getattr(torch.optim, cls_name)(list(tensors.values()), **kwargs)
    for g in grads:
        for k, t in tensors.items():
            t.grad = torch.tensor(g[k], dtype=torch.float64)
        opt.step()
    return {k: t.detach().numpy() for k, t in tensors.items()}


def _close(got, want, what):
    for k in SHAPES:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=f"{what}: {k}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_the_update_equations(case):
    _, fields, _, _ = case
    params, grads = _problem()
    got = _llmarch(fields, params, grads)
    want = _numpy(fields, params, grads)
    _close(got, want, "numpy")
    # The optimizer moved the parameters by more than the tolerance: the check has teeth.
    assert max(np.abs(want[k] - params[k]).max() for k in SHAPES) > 1e-4


@pytest.mark.hf
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_torch_optim(case):
    _, fields, cls_name, kwargs = case
    params, grads = _problem()
    _close(
        _llmarch(fields, params, grads), _torch(cls_name, kwargs, params, grads), f"torch.optim.{cls_name}"
    )


def test_reference_catches_a_misplaced_eps():
    """The numpy reference tells torch's Adagrad (eps outside the square root) from optax's
    ``scale_by_rss`` (eps inside), on the same problem the tests above run."""
    params, grads = _problem()
    fields = {"name": "adagrad", "learning_rate": 0.1, "eps": 0.05}
    tx = optax.chain(optax.scale_by_rss(initial_accumulator_value=0.0, eps=0.05), optax.scale(-0.1))
    p = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update(jax.tree.map(lambda x: np.asarray(x, np.float32), g), state)
        p = optax.apply_updates(p, updates)
    with pytest.raises(AssertionError):
        _close({k: np.asarray(v) for k, v in p.items()}, _numpy(fields, params, grads), "optax rss")


# Fields of OptimizerConfig and the torch.optim keyword that holds the same value.
_TORCH_NAMES = {
    "learning_rate": "lr",
    "weight_decay": "weight_decay",
    "momentum": "momentum",
    "nesterov": "nesterov",
    "eps": "eps",
    "rho": "rho",
    "alpha": "alpha",
    "centered": "centered",
    "initial_accumulator_value": "initial_accumulator_value",
}
_TORCH_CLASSES = {
    "sgd": "SGD",
    "momentum": "SGD",
    "adagrad": "Adagrad",
    "adadelta": "Adadelta",
    "rmsprop": "RMSprop",
    "adam": "Adam",
    "adamw": "AdamW",
}
# torch options llmarch does not offer, and the value at which torch behaves as llmarch does.
_TORCH_FIXED = {
    "dampening": 0,
    "lr_decay": 0,
    "amsgrad": False,
    "maximize": False,
    "decoupled_weight_decay": False,
}


@pytest.mark.hf
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_defaults_are_torchs(name):
    torch = pytest.importorskip("torch")
    signature = inspect.signature(getattr(torch.optim, _TORCH_CLASSES[name]).__init__)
    torch_defaults = {k: p.default for k, p in signature.parameters.items()}
    ours = OptimizerConfig(name=name).resolved()
    for field in REFERENCE_DEFAULTS[name]:
        if field in ("b1", "b2"):
            want = torch_defaults["betas"][field == "b2"]
        elif name == "momentum" and field == "momentum":
            want = 0.9  # torch's SGD has momentum 0: "momentum" is SGD with 0.9 (Sutskever et al.)
        else:
            want = torch_defaults[_TORCH_NAMES[field]]
        assert getattr(ours, field) == want, (name, field, getattr(ours, field), want)
    for option, value in _TORCH_FIXED.items():
        if option in torch_defaults:
            assert torch_defaults[option] == value, (name, option)
    # Every hyperparameter torch's constructor has is either ours or fixed at its default.
    known = set(_TORCH_NAMES.values()) | set(_TORCH_FIXED) | {"betas"}
    knobs = {"self", "params", "foreach", "capturable", "differentiable", "fused"}
    assert set(torch_defaults) - knobs <= known, set(torch_defaults) - knobs - known


def test_each_optimizer_has_its_own_eps():
    eps = {name: OptimizerConfig(name=name).resolved().eps for name in OPTIMIZERS}
    assert eps == {
        "sgd": None,
        "momentum": None,
        "adagrad": 1e-10,
        "adadelta": 1e-6,
        "rmsprop": 1e-8,
        "adam": 1e-8,
        "adamw": 1e-8,
    }


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"name": "adam", "rho": 0.9}, r"rho=0.9 is invalid: adam does not use it"),
        ({"name": "adadelta", "b2": 0.99}, r"b2=0.99 is invalid: adadelta does not use it"),
        ({"name": "adam", "momentum": 0.0}, r"momentum=0.0 is invalid: adam does not use it"),
        ({"name": "rmsprop", "nesterov": True}, r"nesterov=True is invalid: rmsprop does not use it"),
        ({"name": "sgd", "nesterov": True}, r"nesterov=True is invalid: needs momentum > 0"),
        ({"name": "sgd", "centered": True}, r"centered=True is invalid: sgd does not use it"),
        ({"name": "rmsprop", "alpha": 1.0}, r"alpha=1.0 is invalid: must be in \[0, 1\)"),
        ({"name": "adagrad", "eps": 0.0}, r"eps=0.0 is invalid: must be a finite number > 0"),
        ({"name": "adagrad", "initial_accumulator_value": -1.0}, r"initial_accumulator_value=-1.0"),
        ({"name": "momentum", "nesterov": "yes"}, r"nesterov='yes' is invalid: must be true or false"),
    ],
)
def test_bad_hyperparameters_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**fields)
