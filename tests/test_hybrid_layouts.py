"""Hybrid layouts, really tested (issue #20): an MoE model and a DeepSeek-style MLA+MoE model on 8
simulated devices, under every logical-axis rules preset of ``llmarch.sharding.RULES`` and the
3-axis meshes data×fsdp×tensor, data×expert×tensor, stage×data×fsdp and stage×tensor×expert
(pipeline parallelism, ``llmarch.pipeline``): logits, loss and every parameter's gradient equal
the one-device run's, and the parameters are split over the axes the rules name (a layout that
silently replicated everything would fail).

Why the results must be equal, not merely close:
- MoE strategy "dropless" (on CPU the expert-parallel exchange is the padded one, C = n slots per
  source device): no token is ever dropped. Under "capacity" each device has its own capacity
  ``ceil(f·n·k/E)`` of its own n tokens (``moe_parallel``), so what is dropped, and the output,
  would differ from one device's whenever anything is dropped.
- Balancing losses: the MoE model has the Switch batch-wise loss and the router z-loss, the MLA
  model DeepSeek-V3's sequence-wise loss. The pipeline computes the layers' aux losses per
  microbatch and data shard and averages them (``llmarch.pipeline``'s module doc), which equals the
  whole batch's value only for losses linear in the rows or tokens (z-loss: a mean over tokens;
  sequence-wise: a mean over rows), so the MoE model's pipeline twin ("moe-pp") drops the
  batch-wise loss. Without a pipeline every loss is computed on the whole (sharded) batch.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import llmarch
from llmarch import pipeline, sharding
from llmarch.config import AttentionConfig, MLAConfig, moe_blocks
from llmarch.model import aux_loss

B, T = 8, 16


def _moe_model(batch_aux: bool = True):
    """Mixtral-style (GQA, softmax top-2 of 4 experts), 2 MoE layers; ``batch_aux``: the Switch
    batch-wise balance loss on (off in a pipeline, see the module doc)."""
    cfg = llmarch.presets.get("tiny-moe")
    moe = dataclasses.replace(
        cfg.moe,
        num_experts=4,
        expert_dim=32,
        aux_loss_coef=0.01 if batch_aux else 0.0,
        z_loss_coef=1e-3,
        strategy="dropless",
    )
    return cfg.replace(
        vocab_size=128,
        d_model=32,
        ffn_dim=64,
        max_seq_len=T,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8),
        moe=moe,
        name="hybrid-moe",
    )


def _mla_model(dense_prefix: int = 1):
    """DeepSeek-V3-style: MLA, ``dense_prefix`` dense layers then MoE (sigmoid routing over 2
    groups, a shared expert, the sequence-wise loss); 0 for a pipeline's one run of blocks."""
    cfg = llmarch.presets.get("tiny-deepseek")
    mla = MLAConfig(
        num_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8
    )
    moe = dataclasses.replace(
        cfg.moe,
        num_experts=4,
        expert_dim=32,
        n_group=2,
        topk_group=1,
        bias_update_rate=0.0,  # a train step's bias update: nothing here applies it
        seq_aux_loss_coef=1e-2,
    )
    return cfg.replace(
        vocab_size=128,
        d_model=32,
        ffn_dim=64,
        num_layers=2,
        max_seq_len=T,
        attention=mla.mha_baseline(),
        mla=mla,
        moe=moe,
        blocks=moe_blocks(2, dense_prefix, attention="mla"),
        name="hybrid-mla",
    )


MODELS = {
    "moe": lambda: _moe_model(),
    "mla": lambda: _mla_model(),
    "moe-pp": lambda: _moe_model(batch_aux=False),
    "mla-pp": lambda: _mla_model(dense_prefix=0),
}


def _loss(graphdef, params, rest, tokens):
    out = nnx.merge(graphdef, params, rest)(tokens[:, :-1], return_aux=True)
    nll = optax.softmax_cross_entropy_with_integer_labels(out.logits.astype(jnp.float32), tokens[:, 1:])
    return nll.mean() + aux_loss(out.aux), out.logits


_grad = jax.value_and_grad(_loss, argnums=1, has_aux=True)


@pytest.fixture(scope="module")
def reference():
    """``get(name)``: the model's ``(graphdef, params, rest, tokens, loss, logits, grads)`` on one
    device, computed once per module and model."""
    cache = {}

    def get(name):
        if name not in cache:
            cfg = MODELS[name]()
            graphdef, params, rest = nnx.split(llmarch.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
            tokens = jax.random.randint(jax.random.key(1), (B, T + 1), 0, cfg.vocab_size)
            (loss, logits), grads = jax.jit(_grad, static_argnums=0)(graphdef, params, rest, tokens)
            cache[name] = graphdef, params, rest, tokens, loss, logits, grads
        return cache[name]

    return get


# (model, mesh, rules preset, the mesh axes its parameters must be split over): every preset at
# least once, and both models on each 3-axis mesh. The pipeline layouts (stage > 1) use the preset
# with the stacked layers over ``stage`` (``with_stage_layers``), as the trainer does.
CASES = [
    ("moe", "data=8", "dp", ()),
    ("mla", "data=2,fsdp=4", "fsdp", ("fsdp",)),
    ("moe", "data=4,tensor=2", "tp", ("tensor",)),
    ("moe", "data=2,fsdp=2,tensor=2", "fsdp_tp", ("fsdp", "tensor")),
    ("mla", "data=2,fsdp=2,tensor=2", "fsdp_tp", ("fsdp", "tensor")),
    # Megatron sequence parallelism's rules (the residual stream split over tensor), here without
    # collective matmuls: XLA chooses the gathers (tests/test_collective_matmul.py has the rings)
    ("moe", "data=4,tensor=2", "tp_sp", ("tensor",)),
    ("mla", "data=2,fsdp=2,tensor=2", "fsdp_tp_sp", ("fsdp", "tensor")),
    ("moe", "data=2,expert=4", "ep", ("expert",)),
    ("moe", "data=2,expert=2,tensor=2", "hybrid", ("tensor", "expert")),
    ("mla", "data=2,expert=2,tensor=2", "hybrid", ("tensor", "expert")),
    ("mla", "tensor=2,expert=4", "serve", ("tensor", "expert")),
    ("moe", "context=4,data=2", "cp", ()),
    ("mla", "context=4,fsdp=2", "fsdp_cp", ("fsdp",)),
    ("moe-pp", "stage=2,data=2,fsdp=2", "fsdp", ("stage", "fsdp")),
    ("mla-pp", "stage=2,data=2,fsdp=2", "fsdp", ("stage", "fsdp")),
    ("moe-pp", "stage=2,tensor=2,expert=2", "hybrid", ("stage", "tensor", "expert")),
    ("mla-pp", "stage=2,tensor=2,expert=2", "hybrid", ("stage", "tensor", "expert")),
]

# Mesh axis -> parameters (path suffixes) that must be split over it: the embedding and a layer's
# output projection (fsdp, their ``embed``), the output head and the heads (tensor), an expert
# stack (expert), the stacked layers (stage).
_SPLIT = {
    "fsdp": ("embed/table_vd", "attention/w_o_nhd/w"),
    "tensor": ("lm_head/w", "attention/w_o_nhd/w"),
    "expert": ("ffn/w_gate_edf/w",),
    "stage": ("attention/w_o_nhd/w", "ffn/w_up_edf/w"),
}


def _check_split(params: nnx.State, split: tuple[str, ...]) -> None:
    """The parameters of ``_SPLIT[axis]`` for each axis in ``split`` are split over it (their spec
    names it and a device holds only a part), and no parameter is split over another model axis."""
    seen = {axis: 0 for axis in split}
    for path, var in nnx.to_flat_state(params):
        path, value = "/".join(map(str, path)), var.get_value()
        sizes = value.sharding.mesh.shape
        named = {a for e in value.sharding.spec for a in sharding.spec_axes(e) if sizes[a] > 1}
        assert named <= set(split), (path, value.sharding.spec, split)
        for axis in split:
            if path.endswith(_SPLIT[axis]):
                assert axis in named, (path, value.sharding.spec)
                assert value.addressable_shards[0].data.size < value.size, (path, value.sharding.spec)
                seen[axis] += 1
    assert all(seen.values()), seen


def _close(got, want, atol, rtol):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=rtol)


def test_every_rules_preset_is_in_the_matrix():
    assert {preset for _, _, preset, _ in CASES} == set(sharding.RULES)


@pytest.mark.parametrize("model, spec, preset, split", CASES, ids=[f"{m}-{s}-{r}" for m, s, r, _ in CASES])
def test_layout_equals_one_device(devices, reference, model, spec, preset, split):
    graphdef, params, rest, tokens, ref_loss, ref_logits, ref_grads = reference(model)
    mesh = sharding.make_mesh(spec)
    piped = mesh.shape["stage"] > 1
    table = sharding.with_stage_layers(preset) if piped else sharding.rules(preset)
    placed, placed_rest = (sharding.shard_state(s, mesh, table) for s in (params, rest))
    _check_split(placed, split)
    batch = jax.device_put(tokens, sharding.batch_sharding(mesh, table))
    with sharding.use(mesh, table):
        if piped:  # the loss only: the pipeline's head runs inside it, on the last stage
            rows = {"inputs": batch[:, :-1], "targets": batch[:, 1:]}

            def loss(p):
                return pipeline.pipeline_loss(
                    nnx.merge(graphdef, p, placed_rest), rows, mesh=mesh, schedule="1f1b", microbatches=2
                )

            lowered = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(placed)
            (total, parts), grads = lowered.compile()(placed)
            assert float(parts["aux_loss"]) > 0  # the layers' balancing losses are in the total
        else:
            lowered = jax.jit(_grad, static_argnums=0).lower(graphdef, placed, placed_rest, batch)
            (total, logits), grads = lowered.compile()(placed, placed_rest, batch)
            np.testing.assert_allclose(logits, ref_logits, atol=2e-5)
    program = lowered.as_text()
    if piped or mesh.shape.get(sharding.CONTEXT, 1) > 1:  # stage sends; the ring of attention
        assert "collective_permute" in program
    if mesh.shape["expert"] > 1 and not piped:  # tokens travel to their experts' devices
        assert "all_to_all" in program
    np.testing.assert_allclose(total, ref_loss, rtol=1e-5)
    _close(grads, ref_grads, atol=1e-6, rtol=1e-4)


def test_born_sharded_on_a_pipeline_hybrid_mesh(devices, reference):
    """Built directly on stage=2,tensor=2,expert=2 (as the trainer builds a pipeline's model): the
    one-device initialization, sharded exactly as ``state_shardings`` says."""
    _, params, rest, *_ = reference("mla-pp")
    mesh = sharding.make_mesh("stage=2,tensor=2,expert=2")
    table = sharding.with_stage_layers("hybrid")
    with sharding.use(mesh, table):
        born = nnx.state(llmarch.Transformer(MODELS["mla-pp"](), rngs=nnx.Rngs(0)))
    expected = sharding.state_shardings(born, mesh, table)
    for (path, var), (_, want) in zip(nnx.to_flat_state(born), nnx.to_flat_state(expected), strict=True):
        value = var.get_value()
        assert value.sharding.is_equivalent_to(want.get_value(), value.ndim), (path, value.sharding)
    _check_split(nnx.state(born, nnx.Param), ("stage", "tensor", "expert"))
    want = jax.tree.leaves(nnx.merge_state(params, rest))
    for a, b in zip(jax.tree.leaves(born), want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_dense_prefix_cannot_be_pipelined(devices, reference):
    """By design (``llmarch.pipeline``: stages run one program) the DeepSeek layout with a dense
    first layer is refused on a stage mesh, by name, before anything compiles."""
    graphdef, params, rest, tokens, *_ = reference("mla")
    mesh = sharding.make_mesh("stage=2,data=2,fsdp=2")
    rows = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    with pytest.raises(ValueError, match="has 2 runs of blocks"):
        pipeline.pipeline_loss(nnx.merge(graphdef, params, rest), rows, mesh=mesh, microbatches=2)
