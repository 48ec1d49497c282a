"""The kind registry: a kind defined only here, in the test file, runs through the whole library.

``ReluSquared`` (Primer's squared-ReLU FFN, So et al. 2021) is registered as an FFN kind with its
parameter count and an aux contract, then used by ``Transformer``, ``accounting``, the trainer
(its step and a whole ``train`` run with a checkpoint) and the serving ``Engine``, with no edit to
library code. Unknown kinds and broken aux contracts are clear errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch import accounting, axes
from llmarch.config import BlockConfig, ModelConfig
from llmarch.inference.engine import Engine
from llmarch.inference.sampling import SamplingParams
from llmarch.layers import kinds
from llmarch.layers.einsum import Einsum
from llmarch.train.config import TrainConfig
from llmarch.train.trainer import train


class ReluSquared(nnx.Module):
    """``relu(x W_up)² W_down``, reporting the share of active hidden units as a metric."""

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.w_up_df = Einsum((d_model, hidden), (axes.EMBED, axes.MLP), rngs=rngs, init=init)
        self.w_down_fd = Einsum((hidden, d_model), (axes.MLP, axes.EMBED), rngs=rngs, init=init)

    def __call__(self, x):
        h = jax.nn.relu(self.w_up_df("BTD,DF->BTF", x))
        active = jnp.mean((h > 0).astype(jnp.float32))
        return self.w_down_fd("BTF,FD->BTD", h * h), {"metrics": {"relu2_active": active}}


TOY = kinds.FFNKind(
    name="relu2",
    build=lambda cfg, rngs: ReluSquared(cfg.d_model, cfg.ffn_dim, rngs=rngs),
    params=lambda cfg, active: 2 * cfg.d_model * cfg.ffn_dim,
    aux=frozenset({"metrics"}),
)


@pytest.fixture(scope="module")
def toy_kind():
    kinds.register_ffn(TOY)
    yield TOY
    kinds.unregister("ffn", TOY.name)


def _config() -> ModelConfig:
    # alternating kinds: two runs of each, so the toy is also stacked and scanned
    blocks = (BlockConfig(ffn="relu2"), BlockConfig(), BlockConfig(ffn="relu2"), BlockConfig(ffn="relu2"))
    return llmarch.presets.get("tiny-dense").replace(num_layers=4, blocks=blocks, name="toy")


def test_a_kind_defined_in_a_test_runs_through_model_and_accounting(toy_kind):
    cfg = _config()
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % cfg.vocab_size
    out = model(tokens, return_aux=True)
    logits, aux = (out.logits, out.aux) if hasattr(out, "logits") else out
    assert logits.shape == (2, 12, cfg.vocab_size) and bool(jnp.isfinite(logits).all())
    assert llmarch.model.aux_metrics(aux)["relu2_active"].shape == (3,)  # one per toy layer
    params = nnx.state(model, nnx.Param)
    real = sum(x.size for x in jax.tree.leaves(params))
    assert accounting.param_count(cfg) == real
    D, F = cfg.d_model, cfg.ffn_dim
    assert accounting.param_counts(cfg).ffn == 3 * (2 * D * F) + 1 * (3 * D * F)  # three toys, one SwiGLU
    assert ModelConfig.from_json(cfg.to_json()) == cfg  # the kind's name round-trips


def test_a_kind_defined_in_a_test_trains_and_checkpoints(toy_kind, tmp_path):
    run = train(
        TrainConfig(
            out_dir=str(tmp_path / "run"),
            model=_config(),
            steps=6,
            seq_len=32,
            batch_size=4,
            eval_every=1000,
            eval_batches=1,
            log_every=1,
            checkpoint_every=3,
            progress=False,
            tensorboard=False,
        ),
        log=lambda s: None,
    )
    assert run.losses[6] < run.losses[1]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["3", "6"]


def test_a_kind_defined_in_a_test_serves_greedy_like_full_recompute(toy_kind):
    cfg = _config()
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(1))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, 11).tolist()
    engine = Engine(
        model, max_num_seqs=2, max_num_batched_tokens=16, max_prefill_chunk=8, max_len=32, page_size=8
    )
    got = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0))[0].token_ids
    seq = list(prompt)
    for _ in range(6):  # greedy by full recomputation, no cache
        seq.append(int(jnp.argmax(model(jnp.asarray([seq], jnp.int32))[0, -1])))
    assert got == seq[len(prompt) :]


def test_unknown_kinds_are_clear_errors_everywhere():
    with pytest.raises(ValueError, match=r"BlockConfig.ffn='relu3' is invalid: must be one of \('swiglu'"):
        BlockConfig(ffn="relu3")
    with pytest.raises(ValueError, match=r"BlockConfig.attention='linear' is invalid: must be one of"):
        BlockConfig(attention="linear")
    with pytest.raises(ValueError, match=r"ModelConfig.skip_kind='moe' is invalid: must be one of"):
        llmarch.presets.get("tiny-dense").replace(skip_layers=((0, 1),), skip_kind="moe")
    with pytest.raises(ValueError, match=r"ffn kind 'relu3' is not registered: registered are"):
        kinds.ffn("relu3")
    with pytest.raises(ValueError, match="already registered"):
        kinds.register_ffn(kinds.ffn("swiglu"))
    with pytest.raises(TypeError, match="register_attention takes an AttentionKind"):
        kinds.register_attention(TOY)


def test_a_layer_that_breaks_its_aux_contract_fails_while_tracing():
    liar = kinds.FFNKind(name="liar", build=TOY.build, params=TOY.params, aux=frozenset({"loss"}))
    kinds.register_ffn(liar)
    try:
        cfg = llmarch.presets.get("tiny-dense").replace(blocks=(BlockConfig(ffn="liar"),) * 2)
        model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
        with pytest.raises(
            TypeError,
            match=r"'liar' layer returned aux keys \['metrics'\], but its kind "
            r"declares \['loss'\]",
        ):
            model(jnp.zeros((1, 4), jnp.int32))
    finally:
        kinds.unregister("ffn", "liar")


def test_kind_records_are_checked_when_made_and_used():
    with pytest.raises(ValueError, match=r"FFNKind.name='' is invalid: must be a non-empty string"):
        kinds.FFNKind(name="", build=TOY.build, params=TOY.params)
    with pytest.raises(TypeError, match=r"FFNKind 'x': build=None must be callable"):
        kinds.FFNKind(name="x", build=None, params=TOY.params)
    with pytest.raises(TypeError, match=r"aux=\{'metrics'\} must be a frozenset"):
        kinds.FFNKind(name="x", build=TOY.build, params=TOY.params, aux={"metrics"})
    with pytest.raises(ValueError, match=r"ffn kind 'never' is not registered"):
        kinds.unregister("ffn", "never")
    odd = [
        kinds.FFNKind(name="nothing", build=lambda cfg, rngs: None, params=TOY.params),
        kinds.FFNKind(
            name="elsewhere", build=TOY.build, params=TOY.params, config_field="relu2", config_type=dict
        ),
    ]
    for kind in odd:
        kinds.register_ffn(kind)
    try:
        base = llmarch.presets.get("tiny-dense")
        with pytest.raises(TypeError, match=r"kind 'nothing': build returned NoneType, not an nnx.Module"):
            llmarch.Transformer(base.replace(blocks=(BlockConfig(ffn="nothing"),) * 2), rngs=nnx.Rngs(0))
        with pytest.raises(
            ValueError, match=r"blocks use ffn 'elsewhere', whose kind needs ModelConfig.relu2"
        ):
            base.replace(blocks=(BlockConfig(ffn="elsewhere"),) * 2)
    finally:
        for kind in odd:
            kinds.unregister("ffn", kind.name)
