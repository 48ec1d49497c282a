"""Expert parallelism on 8 simulated devices: EP (expert=8; data=2 x expert=4) and overlapped EP
(chunked all-to-all) equal the single-device layer and the unchunked exchange in values and
gradients; the compiled program splits the exchange into independent chunks (what lets a scheduler
overlap them); on GPU/TPU the schedule overlaps them."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch import hlo, sharding
from llmarch.config import MoEConfig, moe_blocks
from llmarch.hlo import Dataflow
from llmarch.layers.moe import MoE

D = 32


def _cfg(**moe):
    m = MoEConfig(
        **{
            **dict(
                num_experts=8,
                top_k=2,
                expert_dim=16,
                router="sigmoid",
                n_group=4,
                topk_group=2,
                router_bias=True,
                num_shared_experts=1,
            ),
            **moe,
        }
    )
    return llmarch.presets.get("tiny-dense").replace(d_model=D, moe=m, blocks=moe_blocks(2, 1), init_std=0.3)


def _loss_and_grads(graphdef, params, rest, x, cotangent, strategy=None):
    def loss(params, x):
        y, aux = nnx.merge(graphdef, params, rest)(x, strategy=strategy)
        return jnp.sum(y * cotangent), (y, aux["dropped"])

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)


@pytest.fixture(scope="module")
def reference():
    with nnx.use_eager_sharding(False):
        layer = MoE(D, _cfg().moe, rngs=nnx.Rngs(0), init_std=0.3)
    layer.bias_e[...] = 0.1 * jax.random.normal(jax.random.key(7), (8,))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (8, 8, D))  # B=8, T=8: N=64 tokens
    cotangent = jax.random.normal(jax.random.key(2), x.shape)
    (_, (y, _)), grads = jax.jit(_loss_and_grads, static_argnums=0)(graphdef, params, rest, x, cotangent)
    return layer, x, cotangent, y, grads


def _run_ep(layer, x, cotangent, spec, chunks, strategy, exchange="auto"):
    """``(y, dropped, grads)`` of ``layer`` (its weights) on ``mesh(spec)`` under the "ep" rules."""
    # capacity: per-device capacity of E/k·n slots, so nothing can be dropped and the results match
    moe = MoEConfig(
        **{**layer.moe.__dict__, "ep_chunks": chunks, "capacity_factor": 4.0, "ep_exchange": exchange}
    )
    mesh = sharding.make_mesh(spec)
    with sharding.use(mesh, "ep"):
        with nnx.use_eager_sharding(False):
            sharded = MoE(D, _cfg(ep_chunks=chunks, ep_exchange=exchange).moe, rngs=nnx.Rngs(0), init_std=0.3)
        sharded.moe = moe
        graphdef, params, rest = nnx.split(sharded, nnx.Param, ...)
        params = sharding.shard_state(nnx.state(layer, nnx.Param), mesh, "ep")
        rest = jax.device_put(nnx.state(layer, nnx.Not(nnx.Param)))
        xs = jax.device_put(x, sharding.batch_sharding(mesh, "ep", 3))
        w = params["w_gate_edf"]["w"].get_value()
        if "expert" in spec:  # the experts are split over the expert axis
            assert w.sharding.spec[0] == "expert"
            assert w.addressable_shards[0].data.shape[0] == 8 // mesh.shape["expert"]
        (_, (y, dropped)), grads = jax.jit(_loss_and_grads, static_argnums=(0, 5))(
            graphdef, params, rest, xs, cotangent, strategy
        )
    return y, dropped, grads


@pytest.fixture(scope="module")
def ep_run(reference):
    """``run(spec, chunks, strategy, exchange)``: ``_run_ep`` of the reference layer, memoized per
    module."""
    layer, x, cotangent, _, _ = reference
    cache = {}

    def run(spec, chunks, strategy, exchange="auto"):
        key = spec, chunks, strategy, exchange
        if key not in cache:
            cache[key] = _run_ep(layer, x, cotangent, *key)
        return cache[key]

    return run


CASES = [
    ("expert=8", 1, "dropless", "auto"),
    ("data=2,expert=4", 1, "dropless", "auto"),
    ("expert=8", 2, "dropless", "auto"),
    ("data=2,expert=4", 4, "capacity", "auto"),
    ("data=8", 1, "dropless", "auto"),
    ("expert=8", 1, "dropless", "ring"),  # COMET-style: the all-to-all as per-peer ppermute steps
    ("data=2,expert=4", 1, "capacity", "ring"),
]


@pytest.mark.parametrize(
    "spec, chunks, strategy, exchange", CASES, ids=[f"{s}-c{c}-{st}-{e}" for s, c, st, e in CASES]
)
def test_expert_parallel_equals_single_device(devices, reference, ep_run, spec, chunks, strategy, exchange):
    _, _, _, ref_y, ref_grads = reference
    y, dropped, grads = ep_run(spec, chunks, strategy, exchange)
    assert int(dropped) == 0
    np.testing.assert_allclose(y, ref_y, atol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), grads, ref_grads)


CHUNKED = [("expert=8", 2), ("expert=8", 3), ("data=2,expert=4", 4)]  # 3: C=8 padded to 9 slots


@pytest.mark.parametrize("spec, chunks", CHUNKED, ids=[f"{s}-c{c}" for s, c in CHUNKED])
def test_chunked_exchange_equals_unchunked(devices, ep_run, spec, chunks):
    """Overlap changes only the schedule: the chunked exchange gives the unchunked one's values and
    gradients on the same mesh, to float32 summation order (weight gradients add per chunk)."""
    y, dropped, grads = ep_run(spec, chunks, "dropless")
    want_y, want_dropped, want_grads = ep_run(spec, 1, "dropless")
    assert int(dropped) == int(want_dropped) == 0
    np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, want_grads)


def _ep_forward(chunks, exchange="auto"):
    mesh = sharding.make_mesh("expert=8")
    with nnx.use_eager_sharding(False):
        layer = MoE(D, _cfg(ep_chunks=chunks, ep_exchange=exchange).moe, rngs=nnx.Rngs(0), init_std=0.3)
    graphdef, state = nnx.split(layer)
    x = jax.ShapeDtypeStruct((8, 8, D), jnp.float32)

    def forward(state, x):  # traced under sharding.use(mesh, "ep")
        return nnx.merge(graphdef, state)(x)[0]

    return mesh, forward, state, x


def _compiled_ep_forward(chunks: int, exchange: str = "auto") -> str:
    """Optimized HLO of the layer's forward on expert=8 (64 tokens: C = 8 slots per device, dropless)."""
    mesh, forward, state, x = _ep_forward(chunks, exchange)
    with sharding.use(mesh, "ep"):
        return jax.jit(forward).lower(state, x).compile().as_text()


# Reading the data flow of the compiled entry computation (llmarch.hlo.Dataflow) ---------------------


def _chunk(g: Dataflow, name: str) -> int:
    """The ``ep_chunk{i}`` named scope of an instruction (a done's: its start's)."""
    found = re.search(r"ep_chunk(\d+)/", g.line[name])
    return int(found[1]) if found else _chunk(g, g.operands[name][0])


@pytest.mark.slow
@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_compiled_exchange_is_split_into_independent_chunks(devices, chunks):
    """What permits overlap, read from what XLA compiled (on any backend): the exchange is one
    dispatch and one combine all-to-all per chunk, each moving one chunk of the C slots, with the
    chunk's expert GEMMs between them; and no op of a chunk depends on another chunk's all-to-alls
    or GEMMs, so a scheduler is free to run chunk i's GEMMs while chunk i+1's dispatch is in flight.
    (XLA:CPU issues the all-to-alls synchronously, so whether they overlap is the next test's,
    on GPU/TPU.)"""
    g = Dataflow(_compiled_ep_forward(chunks))
    done = [n for n in g.op if g.op[n] in ("all-to-all", "all-to-all-done")]  # one per all-to-all
    assert sorted(_chunk(g, n) for n in done) == sorted(list(range(chunks)) * 2)
    size = -(-8 // chunks)  # C = 8 slots per device, rounded up to whole chunks
    for n in done:  # [ep, E_l, C/c, D] on every device: ep=8 ranks, E_l=1 expert each
        assert g.elements(n) == 8 * 1 * size * D, (n, g.shape[n])
    gemms = [n for n in g.op if g.is_gemm(n)]
    parts = {}
    for c in range(chunks):
        dispatch, combine = sorted((n for n in done if _chunk(g, n) == c), key=lambda n: len(g.ancestors(n)))
        assert dispatch in g.ancestors(combine)  # the results travel back
        own = [n for n in gemms if dispatch in g.ancestors(n) and n in g.ancestors(combine)]
        assert len(own) >= 2, own  # the experts' gate/up and down projections run between them
        parts[c] = {dispatch, combine, *own}
    for c, part in parts.items():
        others = set().union(*(p for d, p in parts.items() if d != c))
        for n in part:
            assert not g.ancestors(n) & others, (c, n, g.ancestors(n) & others)


def test_ring_exchange_gives_every_transfer_independent_gemms(devices):
    """COMET's overlap in the program's data flow (``exchange="ring"``): the all-to-all is 2(ep-1)
    collective-permutes (dispatch and return per peer, none for the local step) and no all-to-all,
    and each transfer has expert GEMMs that neither feed it nor wait for it, so a transfer can run
    under them on any backend whose collective-permute is asynchronous (XLA:CPU's is not)."""
    g = Dataflow(_compiled_ep_forward(1, "ring"))
    sends = [n for n in g.op if g.op[n] in ("collective-permute", "collective-permute-done")]
    assert not [n for n in g.op if g.op[n].startswith("all-to-all")]
    assert len(sends) == 2 * (8 - 1), sends
    gemms = [n for n in g.op if g.is_gemm(n)]
    for n in sends:
        before, after = g.ancestors(n), {m for m in g.op if n in g.ancestors(m)}
        free = [m for m in gemms if m not in before and m not in after]
        assert len(free) >= 2, (n, len(free))  # at least one other step's expert FFN


@pytest.mark.slow
def test_chunks_overlap_in_the_accelerator_schedule(devices):
    """COMET's overlap is the latency-hiding scheduler's, on backends whose all-to-all is an async
    start/done pair: there at least one chunk's all-to-all has compute scheduled inside it."""
    if jax.default_backend() == "cpu":
        pytest.skip(
            "XLA:CPU issues all-to-all as one blocking op (no start/done pairs), so no "
            "schedule can overlap it; the chunk structure is checked by the test above"
        )
    schedule = hlo.collective_schedule(_compiled_ep_forward(chunks=2))
    a2a = [p for p in schedule["async_pairs"] if p["collective"] == "all-to-all"]
    assert len(a2a) == 4  # 2 chunks x (dispatch, combine)
    assert schedule["overlapped"] >= 1, schedule


@pytest.mark.slow
def test_scanned_model_with_overlapped_ep_equals_single_device(devices):
    """The MoE run inside the model's layer scan, hybrid rules on data=2 x expert=4, 2 chunks (the
    layer tests above compare gradients; this one the wiring into the scanned stack)."""
    cfg = _cfg(ep_chunks=2)
    tokens = jax.random.randint(jax.random.key(1), (8, 8), 0, cfg.vocab_size)
    forward = jax.jit(lambda graphdef, state, tokens: nnx.merge(graphdef, state)(tokens), static_argnums=0)
    ref = forward(*nnx.split(llmarch.Transformer(cfg, rngs=nnx.Rngs(0))), tokens)
    mesh = sharding.make_mesh("data=2,expert=4")
    with sharding.use(mesh, "hybrid"):
        graphdef, state = nnx.split(llmarch.Transformer(cfg, rngs=nnx.Rngs(0)))
        w = state["runs"][1]["layers"]["ffn"]["w_gate_edf"]["w"].get_value()
        assert w.sharding.spec[:2] == (None, "expert")  # [L, E, D, F]: experts split 4 ways
        logits = forward(graphdef, state, jax.device_put(tokens, sharding.batch_sharding(mesh, "hybrid")))
    np.testing.assert_allclose(logits, ref, atol=2e-5)
