"""Collective matmul on 8 simulated devices: the ring primitives equal the plain all-gather-then-
matmul and matmul-then-reduce-scatter in values and gradients (tensor = 2, 3 and 4); a tiny model
with ``collective_matmul=True`` (attention's projections and the FFN as rings) on a data x tensor
mesh equals one device, with the residual stream replicated (rules ``tp``) or sequence-split
(``tp_sp``, ``fsdp_tp_sp``); bad inputs are refused by name; and the compiled program gives every
ring step's transfer a GEMM that is neither its ancestor nor its descendant (what lets a
latency-hiding scheduler run them together; XLA:CPU issues collective-permute synchronously, so the
overlap itself is not observable here)."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

import llmarch
from llmarch import sharding
from llmarch.collective_matmul import all_gather_matmul, matmul_reduce_scatter
from llmarch.config import AttentionConfig
from llmarch.hlo import Dataflow
from llmarch.layers.attention import Attention
from llmarch.layers.ffn import SwiGLU

B, T, D, F = 4, 8, 8, 48  # F splits 2, 3 and 4 ways
MESHES = {2: "data=4,tensor=2", 3: "data=2,tensor=3", 4: "data=2,tensor=4"}


def _mesh(n: int):
    return sharding.make_mesh(MESHES[n], jax.devices()[:6] if n == 3 else None)  # n=3: 6 of the 8


def _arrays(t=T, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (B, t, D))  # [B,T,D]
    w_up = jax.random.normal(k[1], (D, F)) / D**0.5  # [D,F]
    w_down = jax.random.normal(k[2], (F, D)) / F**0.5  # [F,D]
    cot = jax.random.normal(k[3], (B, t, D))
    return x, w_up, w_down, cot


def _block(mesh, *, ring: bool, bidirectional: bool = False):
    """``sum(cot * reduce_scatter(tanh(all_gather(x) @ w_up) @ w_down))`` over ``tensor``, as
    rings or as XLA's single collectives; returns (value, grads) jitted."""

    def body(x, w_up, w_down):  # x [B,T/n,D]; w_up [D,F/n]; w_down [F/n,D]
        if ring:
            h = all_gather_matmul(x, w_up, "tensor", bidirectional=bidirectional)
            return matmul_reduce_scatter(jnp.tanh(h), w_down, "tensor")
        h = jnp.einsum("BTD,DF->BTF", lax.all_gather(x, "tensor", axis=1, tiled=True), w_up)
        y = jnp.einsum("BTF,FD->BTD", jnp.tanh(h), w_down)
        return lax.psum_scatter(y, "tensor", scatter_dimension=1, tiled=True)

    seq = P("data", "tensor")
    run = jax.shard_map(body, mesh=mesh, in_specs=(seq, P(None, "tensor"), P("tensor")), out_specs=seq)

    def loss(x, w_up, w_down, cot):
        y = run(x, w_up, w_down)
        return jnp.sum(y * cot), y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_rings_equal_plain_collectives(n, bidirectional):
    """n = 3: the bidirectional ring's odd case (both directions in every step)."""
    mesh = _mesh(n)
    args = _arrays(t=4 * n)
    (_, y), grads = _block(mesh, ring=True, bidirectional=bidirectional)(*args)
    (_, y_ref), grads_ref = _block(mesh, ring=False)(*args)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    # the single-device math, too: the plain path is not itself wrong
    np.testing.assert_allclose(y, jnp.tanh(args[0] @ args[1]) @ args[2], atol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, atol=1e-5)


def test_rings_contract_attention_shaped_einsums():
    """Other contractions in the alphabet: QKV-style ``BTD,DNH->BTNH`` gathered over T, and the
    output projection ``BTNH,NHD->BTD`` reduce-scattered (heads split 4 ways)."""
    mesh = _mesh(4)
    k = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k[0], (B, T, D))
    w_q = jax.random.normal(k[1], (D, 4, 2))  # [D,N,H]
    w_o = jax.random.normal(k[2], (4, 2, D))  # [N,H,D]

    def body(x, w_q, w_o):
        q = all_gather_matmul(x, w_q, "tensor", eqn="BTD,DNH->BTNH", bidirectional=True)
        return matmul_reduce_scatter(q, w_o, "tensor", eqn="BTNH,NHD->BTD")

    seq = P("data", "tensor")
    run = jax.shard_map(body, mesh=mesh, in_specs=(seq, P(None, "tensor"), P("tensor")), out_specs=seq)
    want = jnp.einsum("BTNH,NHD->BTD", jnp.einsum("BTD,DNH->BTNH", x, w_q), w_o)
    np.testing.assert_allclose(jax.jit(run)(x, w_q, w_o), want, atol=1e-4)


def test_ring_arguments_are_checked():
    mesh = _mesh(2)
    x, w_up, w_down, _ = _arrays()
    seq = P("data", "tensor")

    def call(body, *args, in_specs):
        return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=seq)(*args)

    with pytest.raises(ValueError, match="seq='S' must be a letter"):
        call(lambda x, w: all_gather_matmul(x, w, "tensor", seq="S"), x, w_up, in_specs=(seq, P()))
    with pytest.raises(ValueError, match="eqn='BTD->BTF' is invalid"):
        call(lambda x, w: all_gather_matmul(x, w, "tensor", eqn="BTD->BTF"), x, w_up, in_specs=(seq, P()))
    h = jnp.ones((B, 3, F))  # [B,T,F]: F split over tensor=2, T=3 not
    with pytest.raises(ValueError, match="length 3, not a multiple of the size 2"):
        call(
            lambda h, w: matmul_reduce_scatter(h, w, "tensor"),
            h,
            w_down,
            in_specs=(P("data", None, "tensor"), P("tensor")),
        )


# The model --------------------------------------------------------------------------------------


def _tiny(**changes):
    return llmarch.presets.get("tiny-gqa").replace(num_layers=2, **changes)


def _loss_logits_grads(graphdef, state, tokens):
    def loss(state):
        logits = nnx.merge(graphdef, state)(tokens)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)), logits

    return jax.value_and_grad(loss, has_aux=True)(state)


@pytest.fixture(scope="module")
def model_reference():
    cfg = _tiny(collective_matmul=True)
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, cfg.vocab_size)
    step = jax.jit(_loss_logits_grads, static_argnums=0)
    return cfg, tokens, step(*nnx.split(llmarch.Transformer(cfg, rngs=nnx.Rngs(0))), tokens)


def _collectives(hlo_text: str) -> tuple[int, int]:
    """(collective-permutes, other collectives issued inside a block's attention or FFN scope)."""
    ops = re.findall(
        r"= \S+ (all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)\([^\n]*?"
        r'op_name="([^"]*)"',
        hlo_text,
    )
    permutes = sum(op == "collective-permute" for op, _ in ops)
    in_blocks = sum(
        op != "collective-permute" and re.search("/(attention|ffn)/", name) is not None for op, name in ops
    )
    return permutes, in_blocks


@pytest.mark.parametrize(
    "spec, rules",
    [("data=4,tensor=2", "tp"), ("data=4,tensor=2", "tp_sp"), ("data=2,fsdp=2,tensor=2", "fsdp_tp_sp")],
)
def test_model_with_collective_matmul_equals_one_device(model_reference, spec, rules):
    """Attention's projections and the FFN as rings, on tensor=2 (tiny-gqa's 2 KV heads allow
    tensor=2) with data (and fsdp): under ``tp`` the residual stream is replicated (each sublayer's output is
    gathered back), under ``tp_sp`` it stays sequence-split (no per-layer gather or reduce)."""
    cfg, tokens, ((loss_ref, logits_ref), grads_ref) = model_reference
    mesh = sharding.make_mesh(spec)
    with sharding.use(mesh, rules):
        graphdef, state = nnx.split(llmarch.Transformer(cfg, rngs=nnx.Rngs(0)))
        w = state["runs"][0]["layers"]["ffn"]["w_up_df"]["w"].get_value()
        assert w.sharding.spec[-1] == "tensor"  # [L,D,F]: F split 2 ways
        tokens_sharded = jax.device_put(tokens, sharding.batch_sharding(mesh, rules))
        # a function of its own: jax's trace cache keys on the function, not on the ambient rules
        step = jax.jit(lambda g, s, t: _loss_logits_grads(g, s, t), static_argnums=0)
        compiled = step.lower(graphdef, state, tokens_sharded).compile()
        (loss, logits), grads = compiled(state, tokens_sharded)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    np.testing.assert_allclose(logits, logits_ref, atol=1e-5)
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        np.testing.assert_allclose(g, g_ref, atol=1e-6)
    permutes, in_blocks = _collectives(compiled.as_text())
    # layers x rings (q/k/v, out, gate/up, down) x (forward, backward), n-1 = 1 step each; under
    # tp_sp XLA adds a permute or two outside the blocks (the loss's shift by one token)
    assert permutes >= 2 * 4 * 2 if rules.endswith("sp") else permutes == 2 * 4 * 2
    # tp: each sublayer's output gathered back to the replicated residual stream, forward and
    # backward; tp_sp: no collective but the rings inside a block (fsdp_tp_sp adds FSDP's own
    # weight gathers and gradient reductions there)
    if rules != "fsdp_tp_sp":
        assert in_blocks == (0 if rules == "tp_sp" else 2 * 2 * 2)


def test_collective_matmul_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="ModelConfig.collective_matmul=1 is invalid: must be a bool"):
        _tiny(collective_matmul=1)
    deepseek = llmarch.presets.get("tiny-deepseek")  # MLA attention; a dense first layer, then MoE
    with pytest.raises(ValueError, match="no block has either"):
        deepseek.replace(blocks=deepseek.blocks[1:] + deepseek.blocks[1:2], collective_matmul=True)
    mesh = _mesh(4)
    with sharding.use(mesh, "tp"):
        layer = SwiGLU(D, F, rngs=nnx.Rngs(0), collective_matmul=True)
        with pytest.raises(ValueError, match="SwiGLU .* sequence length T=6 must be a multiple of it"):
            layer(jnp.ones((2, 6, D)))  # T=6 over tensor=4
        attention = Attention(D, AttentionConfig(num_heads=4, num_kv_heads=4, head_dim=2), rngs=nnx.Rngs(0))
        attention.collective_matmul = True
        with pytest.raises(ValueError, match="Attention .* sequence length T=6 must be a multiple of it"):
            attention(jnp.ones((2, 6, D)), jnp.broadcast_to(jnp.arange(6), (2, 6)))
        layer.w_up_df.fp8 = "tensor"
        with pytest.raises(ValueError, match="w_up_df is of type Einsum with fp8='tensor'"):
            layer(jnp.ones((2, 8, D)))


# The compiled program ---------------------------------------------------------------------------


def _compiled_ffn(n: int, grad: bool) -> str:
    mesh = _mesh(n)
    with sharding.use(mesh, "tp"):
        graphdef, state = nnx.split(SwiGLU(D, F, rngs=nnx.Rngs(0), collective_matmul=True))

        def forward(state, x):
            return nnx.merge(graphdef, state)(x)

        fn = jax.grad(lambda s, x: jnp.sum(forward(s, x) ** 2), argnums=(0, 1)) if grad else forward
        return jax.jit(fn).lower(state, jnp.ones((B, T, D))).compile().as_text()


@dataclasses.dataclass
class _Steps:
    permutes: list[str]
    independent: dict[str, list[str]]  # permute -> GEMMs neither its ancestor nor its descendant


def _steps(hlo_text: str) -> _Steps:
    g = Dataflow(hlo_text)
    permutes = [m for m in g.op if g.op[m] in ("collective-permute", "collective-permute-done")]
    gemms = [m for m in g.op if g.is_gemm(m)]
    independent = {
        p: [m for m in gemms if m not in g.ancestors(p) and p not in g.ancestors(m)] for p in permutes
    }
    return _Steps(permutes, independent)


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_every_ring_step_has_an_independent_gemm(grad):
    """The FFN's rings on tensor=4: 3 transfers gathering x, 3 scattering the output (and as many
    again in the backward's two rings); each has a GEMM that a scheduler may run beside it."""
    steps = _steps(_compiled_ffn(4, grad))
    assert len(steps.permutes) == (4 if grad else 2) * 3, steps.permutes
    for p, gemms in steps.independent.items():
        assert gemms, f"{p} has no GEMM independent of it"


def test_the_plain_sequence_gather_has_no_independent_gemm():
    """The check above can fail: the same FFN as one all-gather, then its GEMMs, gives the gather
    no independent GEMM (every one reads what it gathered)."""
    mesh = _mesh(4)

    def body(x, w):
        return jnp.einsum("BTD,DF->BTF", lax.all_gather(x, "tensor", axis=1, tiled=True), w)

    run = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P("data", "tensor"), P(None, "tensor")),
        out_specs=P("data", None, "tensor"),
    )
    g = Dataflow(jax.jit(run).lower(jnp.ones((B, T, D)), jnp.ones((D, F))).compile().as_text())
    gathers = [m for m in g.op if g.op[m].startswith("all-gather")]
    gemms = [m for m in g.op if g.is_gemm(m)]
    assert gathers and gemms
    assert all(p in g.ancestors(m) for p in gathers for m in gemms)


def test_every_ring_step_in_the_model_has_an_independent_gemm(model_reference):
    """The whole model's forward under ``tp_sp``: every transfer inside a block (attention's two
    rings and the FFN's two, per layer) has a GEMM beside it. (XLA's own permutes outside the
    blocks, for the embedding lookup of sequence-split tokens, are not rings and are not counted.)"""
    cfg, tokens, _ = model_reference
    mesh = sharding.make_mesh("data=4,tensor=2")
    with sharding.use(mesh, "tp_sp"):
        graphdef, state = nnx.split(llmarch.Transformer(cfg, rngs=nnx.Rngs(0)))
        tokens = jax.device_put(tokens, sharding.batch_sharding(mesh, "tp_sp"))
        forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
        text = forward.lower(state, tokens).compile().as_text()
    g, steps = Dataflow(text), _steps(text)
    rings = [p for p in steps.permutes if re.search(r'op_name="[^"]*/(attention|ffn)/', g.line[p])]
    assert len(rings) == 2 * 4, rings  # layers x (q/k/v, out, gate/up, down), n-1 = 1 step each
    for p in rings:
        assert steps.independent[p], f"{p} has no GEMM independent of it"
