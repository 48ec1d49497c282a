"""Dropless expert parallelism by ragged all-to-all (``llmarch.layers.moe_ragged``).

On 8 simulated CPU devices, where XLA:CPU has no ragged-all-to-all, the ragged path runs over
``emulated_ragged_all_to_all`` (the collective's semantics from ``all_gather``), so its offset and
regrouping bookkeeping is checked for values and gradients against one device, beside the padded
fallback (whose layer-level tests are in test_moe_parallel.py); a bounded receive buffer drops and
counts exactly the rows the collective would not deliver. The real ``exchange="ragged"`` path,
with jax's own gradient of the collective, runs on CPU with only the collective's lowering swapped
for the emulation (the ``ragged_on_cpu`` fixture), up to the whole MoE layer. The real collective is
exported for tpu and cuda at DeepSeek-V3's MoE shapes (forward and backward).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export
from jax._src import core
from jax._src.lax import parallel
from jax.interpreters import mlir
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from llmarch import accounting, presets, sharding
from llmarch.config import MoEConfig
from llmarch.layers import moe_dispatch as dispatch
from llmarch.layers import moe_parallel, moe_ragged
from llmarch.layers.moe import MoE
from llmarch.layers.moe_dispatch import ExpertWeights

E, K, D, F, N = 8, 2, 16, 8, 64  # N tokens over the mesh


def _problem(seed=0, skew=False):
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (N, D))
    logits = jax.random.normal(keys[1], (N, E)) + (3.0 * (jnp.arange(E) < 2) if skew else 0.0)
    gates, experts = jax.lax.top_k(jax.nn.softmax(logits), K)
    w = ExpertWeights(
        *(
            0.3 * jax.random.normal(k, s)
            for k, s in zip(keys[2:5], [(E, D, F)] * 2 + [(E, F, D)], strict=True)
        )
    )
    cot = jax.random.normal(keys[5], (N, D))
    return x, experts.astype(jnp.int32), gates, w, cot


def _value_and_grads(fn, x, experts, gates, w, cot):
    def loss(x, gates, w):
        y, dropped = fn(x, experts, gates, w)
        return jnp.sum(y * cot), (y, dropped)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, gates, w)


def _parallel(spec, exchange, recv_rows=None):
    mesh = sharding.make_mesh(spec)
    table = sharding.rules("ep")
    cfg = MoEConfig(num_experts=E, top_k=K, expert_dim=F)

    def fn(x, experts, gates, w):
        return moe_parallel.parallel_moe(
            x, experts, gates, w, cfg, strategy="dropless", mesh=mesh, table=table, exchange=exchange,
            recv_rows=recv_rows,
        )  # fmt: skip

    return mesh, fn


def _single(x, experts, gates, w):
    return dispatch.dropless(x, experts, gates, w), jnp.zeros((), jnp.int32)


@pytest.fixture
def ragged_on_cpu():
    """``jax.lax.ragged_all_to_all`` made to run on XLA:CPU for the duration of a test: its primitive
    lowered, on cpu, to ``emulated_ragged_all_to_all``. The ragged path then runs as written —
    ``exchange="ragged"``, jax's own JVP and transpose rules (the reverse exchange) — with only the
    collective's implementation swapped. (Private jax modules: a test-only patch.)"""
    if jax.default_backend() != "cpu":
        yield  # the real collective
        return

    def lowering(ctx, *args, axis_name, axis_index_groups):
        assert axis_index_groups is None and len(axis_name) == 1
        ep = ctx.module_context.axis_context.mesh.shape[axis_name[0]]
        fn = lambda *a: moe_ragged.emulated_ragged_all_to_all(*a, axis_name=axis_name[0], ep=ep)  # noqa: E731
        with core.extend_axis_env_nd([(axis_name[0], ep)]):
            return mlir.lower_fun(fn, multiple_results=False)(ctx, *args)

    cpu = mlir._platform_specific_lowerings["cpu"]
    before = cpu.get(parallel.ragged_all_to_all_p)
    mlir.register_lowering(parallel.ragged_all_to_all_p, lowering, platform="cpu")
    try:
        yield
    finally:
        if before is None:
            cpu.pop(parallel.ragged_all_to_all_p, None)
        else:
            cpu[parallel.ragged_all_to_all_p] = before
        jax.clear_caches()


def test_emulation_follows_the_documented_semantics(devices):
    """The example of ``jax.lax.ragged_all_to_all``'s docstring, on an axis of size 2."""
    mesh = jax.make_mesh((2,), ("expert",), axis_types=(AxisType.Explicit,), devices=devices[:2])
    args = [  # per device: operand, output, input_offsets, send_sizes, output_offsets, recv_sizes
        [[1, 2, 2], [0, 0, 0, 0], [0, 1], [1, 2], [0, 0], [1, 1]],
        [[3, 4, 0], [0, 0, 0, 0], [0, 1], [1, 1], [1, 2], [2, 1]],
    ]
    stacked = [jnp.array([a[i] for a in args], jnp.int32).reshape(-1) for i in range(6)]
    stacked = [jax.device_put(a, NamedSharding(mesh, PartitionSpec("expert"))) for a in stacked]
    f = jax.shard_map(
        lambda *a: moe_ragged.emulated_ragged_all_to_all(*a, axis_name="expert", ep=2),
        mesh=mesh,
        in_specs=(PartitionSpec("expert"),) * 6,
        out_specs=PartitionSpec("expert"),
    )
    np.testing.assert_array_equal(jax.jit(f)(*stacked), [1, 3, 0, 0, 2, 2, 4, 0])


def test_ragged_all_to_all_is_unimplemented_on_cpu(devices):
    """Why the padded exchange is the CPU default (and the check that tells us if XLA:CPU gains it)."""
    if jax.default_backend() != "cpu":
        pytest.skip("checks XLA:CPU")
    assert moe_ragged.default_exchange() == "padded"
    mesh, fn = _parallel("expert=8", "ragged")
    x, experts, gates, w, _ = _problem()
    with pytest.raises(Exception, match="ragged-all-to-all"):
        jax.block_until_ready(jax.jit(fn)(x, experts, gates, w))


CASES = [
    ("expert=8", "emulated", False),
    ("data=2,expert=4", "emulated", False),
    ("data=2,expert=4", "emulated", True),  # skewed routing: uneven counts, empty experts
    ("expert=8", "padded", True),  # the CPU fallback on the same problem
]


@pytest.mark.parametrize("spec, exchange, skew", CASES, ids=[f"{s}-{e}-skew{k}" for s, e, k in CASES])
def test_exchange_equals_single_device(devices, spec, exchange, skew):
    x, experts, gates, w, cot = _problem(1, skew)
    (_, (want, _)), want_grads = _value_and_grads(_single, x, experts, gates, w, cot)
    mesh, fn = _parallel(spec, exchange)
    (_, (y, dropped)), grads = _value_and_grads(fn, x, experts, gates, w, cot)
    assert int(dropped) == 0
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads, want_grads)


RAGGED = [("expert=8", False), ("data=2,expert=4", True)]


@pytest.mark.parametrize("spec, skew", RAGGED, ids=[f"{s}-skew{k}" for s, k in RAGGED])
def test_ragged_collective_path_equals_single_device(devices, ragged_on_cpu, spec, skew):
    """The real ``exchange="ragged"`` path (the collective lowered to its emulation on CPU): values
    and gradients of one device. Its gradients go through jax's transpose of ragged_all_to_all;
    they caught receive buffers typed as replicated (see ``moe_ragged._zeros_varying_like``)."""
    x, experts, gates, w, cot = _problem(3, skew)
    (_, (want, _)), want_grads = _value_and_grads(_single, x, experts, gates, w, cot)
    mesh, fn = _parallel(spec, "ragged")
    (_, (y, dropped)), grads = _value_and_grads(fn, x, experts, gates, w, cot)
    assert int(dropped) == 0
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads, want_grads)


def _undelivered(experts: np.ndarray, ep: int, recv_rows: int) -> np.ndarray:
    """``[N,k]`` bool: the copies a receive buffer of ``recv_rows`` rows cannot take. Receiver i
    holds its sources' rows in source order, each source's sorted by expert, then token order."""
    n, E_l = N // ep, E // ep
    dropped = np.zeros(experts.shape, bool)
    for i in range(ep):
        rows = [
            (t, c)
            for s in range(ep)
            for e in range(i * E_l, (i + 1) * E_l)
            for t in range(s * n, (s + 1) * n)
            for c in range(K)
            if experts[t, c] == e
        ]
        for t, c in rows[recv_rows:]:
            dropped[t, c] = True
    return dropped


@pytest.mark.parametrize("exchange", ["emulated", "ragged"])
def test_bounded_receive_buffer_drops_and_counts_the_overflow(devices, ragged_on_cpu, exchange):
    """With ``recv_rows`` below the worst case, rows that would overflow a receiver are neither sent
    nor computed: the result is the single-device one without those assignments, and they are
    counted (so the dropless default, ``recv_rows=None``, is what guarantees exactness)."""
    x, experts, gates, w, cot = _problem(2, skew=True)
    ep, recv_rows = 8, 12  # the balanced load is n·k = 16 rows per device
    over = _undelivered(np.asarray(experts), ep, recv_rows)
    assert 0 < over.sum() < over.size

    def without_overflow(x, experts, gates, w):
        return dispatch.dropless(x, experts, jnp.where(over, 0.0, gates), w), jnp.zeros((), jnp.int32)

    (_, (want, _)), want_grads = _value_and_grads(without_overflow, x, experts, gates, w, cot)
    mesh, fn = _parallel("expert=8", exchange, recv_rows)
    (_, (y, dropped)), grads = _value_and_grads(fn, x, experts, gates, w, cot)
    assert int(dropped) == over.sum()
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads, want_grads)


def test_worst_case_receive_rows():
    assert moe_ragged.worst_case_recv_rows(tokens=4, top_k=2, num_experts=8, ep=2) == 2 * 4 * 2
    assert moe_ragged.worst_case_recv_rows(tokens=4, top_k=8, num_experts=8, ep=4) == 4 * 4 * 2  # E_l=2<k


def test_bad_exchange_is_refused(devices):
    x, experts, gates, w, _ = _problem()
    with pytest.raises(ValueError, match="exchange='spiral'"):
        _parallel("expert=8", "spiral")[1](x, experts, gates, w)
    with pytest.raises(ValueError, match="recv_rows=0"):
        _parallel("expert=8", "ragged", 0)[1](x, experts, gates, w)


# Lowering the real collective for the accelerators ----------------------------------------------


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_ragged_path_lowers_for_accelerators(platform):
    """Forward and backward of dropless EP at DeepSeek-V3's MoE shapes (E=256, k=8, D=7168, F=2048)
    on an abstract 8-way expert mesh, 512 tokens per device, exported for ``platform``: two
    ragged-all-to-alls forward (dispatch, combine) and two more in the backward pass (their
    transposes, jax's own rule: the reverse exchange). ``ragged_all_to_all`` is an XLA custom call
    without jax.export's compatibility guarantee, hence the disabled check."""
    m = presets.get("deepseek-v3").moe
    ep, n = 8, 512
    mesh = AbstractMesh((1, 1, 1, ep, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 5)
    table = sharding.rules("ep")

    def loss(x, experts, gates, w):
        y, _ = moe_parallel.parallel_moe(
            x, experts, gates, w, m, strategy="dropless", mesh=mesh, table=table, exchange="ragged"
        )
        return y.astype(jnp.float32).sum()

    Dm, bf16 = presets.get("deepseek-v3").d_model, jnp.bfloat16
    token_axes, ep_axis, _, _ = moe_parallel.layout(mesh, table)
    tokens = NamedSharding(mesh, PartitionSpec(token_axes, None))
    split = NamedSharding(mesh, PartitionSpec(ep_axis, None, None))
    args = (
        jax.ShapeDtypeStruct((ep * n, Dm), bf16, sharding=tokens),
        jax.ShapeDtypeStruct((ep * n, m.top_k), jnp.int32, sharding=tokens),
        jax.ShapeDtypeStruct((ep * n, m.top_k), jnp.float32, sharding=tokens),
        ExpertWeights(
            jax.ShapeDtypeStruct((m.num_experts, Dm, m.expert_dim), bf16, sharding=split),
            jax.ShapeDtypeStruct((m.num_experts, Dm, m.expert_dim), bf16, sharding=split),
            jax.ShapeDtypeStruct((m.num_experts, m.expert_dim, Dm), bf16, sharding=split),
        ),
    )
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3)))
    exported = export.export(
        fn,
        platforms=[platform],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("ragged_all_to_all")],
    )(*args)
    text = exported.mlir_module()
    assert text.count("stablehlo.custom_call @ragged_all_to_all") == 4
    assert exported.nr_devices == ep
    # dispatch: the n·k = 4096 routed rows into the dropless worst case ep·n·min(k,E_l) = 32768 rows
    # (the padded exchange: [ep,E_l,n,D], 131072 rows each way); combine: the reverse
    assert "(tensor<4096x7168xbf16>, tensor<32768x7168xbf16>, tensor<8xi32>" in text
    assert "(tensor<32768x7168xbf16>, tensor<4096x7168xbf16>, tensor<8xi32>" in text
    assert "replica_groups = dense<[[0, 1, 2, 3, 4, 5, 6, 7]]>" in text  # over the 8-way expert axis


def test_exchange_bytes_at_deepseek_v3_shapes():
    """The send buffer shrinks E/k = 32x; the guaranteed-dropless receive buffer only by
    E_l/min(k,E_l) (none once E_l <= k); the routed rows, what travels, are k/E of the padding."""
    cfg = presets.get("deepseek-v3")
    for ep in (8, 64):
        b = accounting.ep_exchange_bytes(cfg, tokens_per_device=4096, ep=ep)
        assert b.padded_send == b.padded_recv == 256 * 4096 * 7168 * 2
        assert b.padded_send / b.ragged_send == 32
        assert b.padded_recv / b.ragged_recv_worst == (256 // ep) / min(8, 256 // ep)
        assert b.ragged_recv_balanced == b.ragged_send


def test_moe_layer_on_the_ragged_default_equals_single_device(devices, ragged_on_cpu, monkeypatch):
    """The whole ``MoE`` layer (router, shared expert) under the "ep" rules on expert=8, with the
    exchange chosen as on TPU/GPU (``default_exchange`` -> "ragged"): one device's values and
    gradients."""
    cfg = MoEConfig(num_experts=E, top_k=K, expert_dim=F, num_shared_experts=1, router="sigmoid")
    with nnx.use_eager_sharding(False):
        layer = MoE(D, cfg, rngs=nnx.Rngs(0), init_std=0.3)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(4), (8, 8, D))
    cot = jax.random.normal(jax.random.key(5), x.shape)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x)[0] * cot)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    want, want_grads = grad(params, x)
    monkeypatch.setattr(moe_ragged, "default_exchange", lambda chunks=1: "ragged")
    mesh = sharding.make_mesh("expert=8")
    with sharding.use(mesh, "ep"):
        placed = sharding.shard_state(params, mesh, "ep")
        got, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
            placed, jax.device_put(x, sharding.batch_sharding(mesh, "ep", 3))
        )
        jaxpr = str(jax.make_jaxpr(loss)(placed, x))
    assert "ragged_all_to_all" in jaxpr  # the ragged path ran, not the padded one
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads, want_grads)


def test_moe_config_picks_the_exchange(devices):
    """``MoEConfig.ep_exchange`` reaches the layer ("emulated" runs the ragged bookkeeping on CPU;
    "padded" never does), and bad values are refused by name."""
    cfg = MoEConfig(num_experts=E, top_k=K, expert_dim=F, ep_exchange="emulated")
    with nnx.use_eager_sharding(False):
        layer = MoE(D, cfg, rngs=nnx.Rngs(0), init_std=0.3)
    x = jax.random.normal(jax.random.key(4), (8, 8, D))
    mesh = sharding.make_mesh("expert=8")
    outs = {}
    for how in ("emulated", "padded"):
        layer.moe = dataclasses.replace(cfg, ep_exchange=how)
        graphdef, state = nnx.split(layer)

        def run(s, x, graphdef=graphdef):
            return nnx.merge(graphdef, s)(x)[0]

        with sharding.use(mesh, "ep"):
            outs[how] = np.asarray(jax.jit(run)(state, x))
            jaxpr = str(jax.make_jaxpr(run)(state, x))
        assert ("all_gather" in jaxpr) == (how == "emulated"), how
    np.testing.assert_allclose(outs["emulated"], outs["padded"], atol=1e-5)
    with pytest.raises(ValueError, match=r"MoEConfig.ep_exchange='fast' is invalid"):
        MoEConfig(num_experts=E, top_k=K, expert_dim=F, ep_exchange="fast")
    with pytest.raises(ValueError, match=r"ep_exchange='ragged'.*cannot run with ep_chunks=2"):
        MoEConfig(num_experts=E, top_k=K, expert_dim=F, ep_exchange="ragged", ep_chunks=2)
    with pytest.raises(ValueError, match=r"ep_exchange='ring'.*cannot run with ep_chunks=2"):
        MoEConfig(num_experts=E, top_k=K, expert_dim=F, ep_exchange="ring", ep_chunks=2)
