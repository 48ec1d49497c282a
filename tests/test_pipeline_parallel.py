"""Pipeline parallelism (llmarch.pipeline, llmarch.pipeline_schedule) on 8 simulated CPU devices:
the schedules' tables (bubble, activation counts, dependencies), balanced partitions against brute
force, and loss and gradients equal to the one-device model for GPipe, 1F1B and interleaved 1F1B,
with tensor and expert splitting the stages' weights (not their rows) where the rules name them."""

import dataclasses
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmarch
from llmarch import pipeline, sharding
from llmarch import pipeline_schedule as ps
from llmarch.config import moe_blocks
from llmarch.train.step import loss_fn

CASES = [("gpipe", p, m, 1) for p, m in [(2, 1), (2, 4), (4, 4), (4, 8), (3, 5)]]
CASES += [("1f1b", p, m, 1) for p, m in [(2, 1), (2, 4), (4, 2), (4, 8), (3, 7)]]
CASES += [("interleaved", p, m, v) for p, m, v in [(2, 2, 2), (2, 4, 3), (4, 4, 2), (4, 8, 2)]]


def _replay(s: ps.Schedule):
    """Checks a schedule by replaying it: every op once, each after what it needs (a strictly
    earlier tick), and every message stored in the slot its reader reads."""
    p, v, m = s.stages, s.virtual, s.microbatches
    done, act, grad = {}, [dict() for _ in range(p)], [dict() for _ in range(p)]
    sent = [None] * p
    for t in range(s.ticks):
        for d in range(p):  # messages sent at t-1 arrive now
            src_a = sent[(d - 1) % p]
            if src_a and src_a[0] == "a":
                act[d][int(s.recv_act[t, d])] = src_a[1]
            src_g = sent[(d + 1) % p]
            if src_g and src_g[0] == "g":
                grad[d][int(s.recv_grad[t, d])] = src_g[1]
        new = [None] * p
        for d in range(p):
            op, c, i = int(s.op[t, d]), int(s.chunk[t, d]), int(s.mb[t, d])
            u = c * p + d
            if op == ps.IDLE:
                continue
            if u > 0:
                assert act[d][int(s.act_slot[t, d])] == (u, i)
            if op == ps.FWD:
                assert u == 0 or done[("F", u - 1, i)] < t
                if u == p * v - 1:
                    grad[d][int(s.grad_slot[t, d])] = (u, i)
                else:
                    new[d] = ("a", (u + 1, i))
                done[("F", u, i)] = t
            else:
                assert grad[d][int(s.grad_slot[t, d])] == (u, i)
                assert done[("F", u, i)] < t
                if u > 0:
                    new[d] = ("g", (u - 1, i))
                done[("B", u, i)] = t
        sent = new
    assert len(done) == 2 * p * v * m


@pytest.mark.parametrize("name,p,m,v", CASES)
def test_schedule_bubble_and_memory(name, p, m, v):
    s = ps.build(name, p, m, v)
    _replay(s)
    # The measured idle fraction is the papers' (p-1)/(m+p-1), and (p-1)/(v·m+p-1) interleaved.
    assert s.bubble() == pytest.approx((p - 1) / (v * m + p - 1))
    assert s.bubble() == pytest.approx(s.ideal_bubble())
    if name == "gpipe":  # every microbatch's activations kept until the backward phase
        assert s.in_flight == (m,) * p
    elif name == "1f1b":  # PipeDream-Flush: stage d holds at most p - d
        assert s.in_flight == tuple(min(p - d, m) for d in range(p))
    else:  # Megatron-LM: (p-d-1)·2 + (v-1)·p warm-up chunks, + 1 (§2.2: p·(1 + (p-1)/(pv)) stages)
        assert s.in_flight == tuple(min((p - d - 1) * 2 + (v - 1) * p + 1, v * m) for d in range(p))
        if (p - 1) * 2 + (v - 1) * p + 1 <= v * m:  # warm-up not cut short
            assert s.activation_stages() == pytest.approx(p * (1 + (p - 1) / (p * v)))


def test_schedule_args_rejected():
    with pytest.raises(ValueError, match="schedule='zb'"):
        ps.build("zb", 2, 4)
    with pytest.raises(ValueError, match="microbatches=0"):
        ps.build("1f1b", 2, 0)
    with pytest.raises(ValueError, match="microbatches=3 is invalid for 'interleaved'"):
        ps.build("interleaved", 2, 3, 2)
    with pytest.raises(ValueError, match="virtual=2 is invalid for 'gpipe'"):
        ps.build("gpipe", 2, 4, 2)
    with pytest.raises(ValueError, match="virtual=1 is invalid for 'interleaved'"):
        ps.build("interleaved", 2, 4, 1)


def _worst(costs, starts):
    """The largest group cost of the split of ``costs`` at ``starts``."""
    return max(sum(costs[a:b]) for a, b in zip(starts, [*starts[1:], len(costs)], strict=True))


def test_balanced_partition_is_optimal():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(2, 9))
        costs = rng.integers(1, 10, n).tolist()
        cuts = sorted(rng.choice(np.arange(1, n), size=int(rng.integers(1, n)), replace=False).tolist())
        parts = int(rng.integers(1, len(cuts) + 2))
        starts = ps.balanced_partition(costs, parts, cuts)
        assert starts[0] == 0 and len(starts) == parts and set(starts[1:]) <= set(cuts)
        brute = min(_worst(costs, [0, *c]) for c in itertools.combinations(cuts, parts - 1))
        assert _worst(costs, starts) == brute
    # DeepSeek-V3-like: a cheap dense layer then MoE layers; runs only cut at the boundary.
    assert ps.balanced_partition([1, 4, 4, 4], 2) == [0, 2]
    with pytest.raises(ValueError, match="4 layers cannot be split into 3 stages"):
        ps.balanced_partition([1, 1, 1, 1], 3, [2])
    with pytest.raises(ValueError, match="costs=\\[1, nan\\] is invalid"):  # never a silent split
        ps.balanced_partition([1, float("nan")], 2)
    with pytest.raises(ValueError, match="costs=\\[\\] is invalid"):
        ps.balanced_partition([], 1)
    with pytest.raises(ValueError, match="cuts=\\[0, 2\\] is invalid"):  # a cut at 0 is no cut
        ps.balanced_partition([1, 1, 1], 2, [0, 2])


def _batch(cfg, B=8, T=8, seed=0, packed=False):
    rng = np.random.default_rng(seed)
    batch = {
        "inputs": jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32),
    }
    if packed:  # two documents per row and a loss mask
        batch["segment_ids"] = jnp.asarray(np.repeat([[1] * (T // 2) + [2] * (T - T // 2)], B, 0), jnp.int32)
        batch["mask"] = jnp.asarray(rng.random((B, T)) > 0.3, jnp.int32)
    return batch


def _pipelined_grads(model, batch, spec, **kw):
    """``((total, parts), grads), compiled program's text``."""
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    mesh = sharding.make_mesh(spec)
    params = sharding.shard_state(params, mesh, "fsdp")  # born FSDP-sharded, as the trainer's

    def loss(params):
        return pipeline.pipeline_loss(nnx.merge(gd, params, rest), batch, mesh=mesh, **kw)

    compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params).compile()
    return compiled(params), compiled.as_text()


def _has_shard(program: str, *dims: int) -> bool:
    """Whether the compiled program holds a float32 array whose trailing dimensions are ``dims``."""
    return re.search(r"f32\[(\d+,)*" + ",".join(map(str, dims)) + r"\]", program) is not None


def _assert_close(tree_a, tree_b, rtol):
    for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b), strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol * float(np.abs(b).max())
        )


DENSE = [
    ("stage=4,data=2", dict(schedule="gpipe", microbatches=2), False),
    ("stage=4,data=2", dict(schedule="1f1b", microbatches=4), True),
    ("stage=2,data=2,fsdp=2", dict(schedule="interleaved", microbatches=2, virtual=2), True),
    # tensor parallelism inside the stages (the "tp" rules: no rules in effect), rows over data
    ("stage=2,tensor=2,data=2", dict(schedule="1f1b", microbatches=2), True),
]


@pytest.mark.parametrize("spec,kw,packed", DENSE)
def test_dense_equals_one_device(spec, kw, packed):
    cfg = llmarch.presets.get("tiny-dense").replace(num_layers=4, max_seq_len=16, remat="full")
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    batch = _batch(cfg, packed=packed)
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    (ref, parts), ref_grads = jax.value_and_grad(lambda p: loss_fn(gd, p, rest, batch, 1e-3), has_aux=True)(
        params
    )
    ((total, got), grads), program = _pipelined_grads(model, batch, spec, z_loss=1e-3, loss_chunk=128, **kw)
    np.testing.assert_allclose(total, ref, rtol=1e-5)
    np.testing.assert_allclose(got["loss"], parts["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["z_loss"], parts["z_loss"], rtol=1e-5)
    _assert_close(grads, ref_grads, 2e-4)
    D, F, N, H = cfg.d_model, cfg.ffn_dim, cfg.attention.num_heads, cfg.attention.head_dim
    # A stage's weights per device: F and the heads halved over tensor (were tensor a row axis,
    # as before, every device would hold [D,F] and [D,N,H] whole and no such shard would exist).
    split = _has_shard(program, D, F // 2) and _has_shard(program, D, N // 2, H)
    assert split == ("tensor" in spec)


MOE = [
    ("stage=4,data=2", None, 2),  # rows over data: 2 sub-batches per microbatch
    # tensor and expert split the model inside the stages (the hybrid rules): the whole microbatch
    # is one batch, as one device sees it (were they row axes, 4 sub-batches of 1 row)
    ("stage=2,tensor=2,expert=2", "hybrid", 1),
]


@pytest.mark.parametrize("spec,rules,ways", MOE)
def test_moe_equals_microbatched_one_device(spec, rules, ways):
    """MoE routing and its load-balancing loss depend on which tokens share a batch: the pipeline
    equals one device that accumulates over the same sub-batches (microbatch x row shard)."""
    cfg = llmarch.presets.get("tiny-moe").replace(num_layers=4, blocks=moe_blocks(4), max_seq_len=16)
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(1))
    batch = _batch(cfg, seed=1)
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    m, rows = 2, 8 // (2 * ways)

    def ref(params):
        totals = []
        for i in range(m):
            mb = jax.tree.map(lambda a, i=i: a[i::m], batch)  # microbatch i (pipeline._to_microbatches)
            for k in range(ways):
                sub = jax.tree.map(lambda a, k=k: a[k * rows : (k + 1) * rows], mb)
                totals.append(loss_fn(gd, params, rest, sub)[0])
        return jnp.mean(jnp.stack(totals))

    ref_loss, ref_grads = jax.value_and_grad(ref)(params)
    ((total, parts), grads), program = _pipelined_grads(
        model, batch, spec, schedule="1f1b", microbatches=m, rules=rules
    )
    assert float(parts["aux_loss"]) > 0
    np.testing.assert_allclose(total, ref_loss, rtol=1e-5)
    _assert_close(grads, ref_grads, 2e-4)
    # The experts' weights per device [E/2, D, F/2]: the experts over expert, their F over tensor.
    E, D, F = cfg.moe.num_experts, cfg.d_model, cfg.moe.expert_dim
    assert _has_shard(program, E // 2, D, F // 2) == ("expert" in spec)


def test_bad_splits_rejected():
    cfg = llmarch.presets.get("tiny-dense").replace(num_layers=6)
    mesh = {"stage": 4, "data": 2}
    with pytest.raises(ValueError, match="num_layers=6 cannot be split into stage=4"):
        pipeline.check_pipeline(cfg, mesh, schedule="1f1b", microbatches=4)
    with pytest.raises(ValueError, match="batch_size=12 cannot be split into microbatches=4"):
        pipeline.check_pipeline(
            cfg.replace(num_layers=8), mesh, schedule="1f1b", microbatches=4, batch_size=12
        )
    # tensor splits the rows only where no rule names it: B=4, m=2 fits 2 row shards, not 4
    tp_mesh = {"stage": 2, "tensor": 2, "data": 2}
    pipeline.check_pipeline(cfg, tp_mesh, schedule="1f1b", microbatches=2, batch_size=4, rules="tp")
    with pytest.raises(ValueError, match=r"split 4 ways over the mesh's row axes \('tensor', 'data'\)"):
        pipeline.check_pipeline(cfg, tp_mesh, schedule="1f1b", microbatches=2, batch_size=4, rules="dp")
    # a layer's own ppermute ring runs in some stages' branch only: refused where its axis splits
    # the model (on XLA:CPU it paired with other branches' permutes: wrong losses)
    ring = cfg.replace(num_layers=8, collective_matmul=True)
    with pytest.raises(ValueError, match="ModelConfig.collective_matmul=True is not supported inside"):
        pipeline.check_pipeline(ring, tp_mesh, schedule="1f1b", microbatches=2, rules="tp")
    pipeline.check_pipeline(ring, tp_mesh, schedule="1f1b", microbatches=2, rules="dp")  # no ring
    moe = llmarch.presets.get("tiny-moe").replace(num_layers=2, blocks=moe_blocks(2))
    moe = moe.replace(moe=dataclasses.replace(moe.moe, ep_exchange="ring"))
    with pytest.raises(ValueError, match="MoEConfig.ep_exchange='ring' is not supported inside"):
        pipeline.check_pipeline(moe, {"stage": 2, "expert": 2}, schedule="gpipe", microbatches=2, rules="ep")
    deepseek = llmarch.presets.get("tiny-deepseek")  # a dense layer, then MoE layers: two runs
    with pytest.raises(ValueError, match="2 runs of blocks"):
        pipeline.check_pipeline(deepseek, {"stage": 2}, schedule="gpipe", microbatches=2)
    with pytest.raises(ValueError, match="schedule='pipedream'"):
        pipeline.check_pipeline(cfg, {"stage": 2}, schedule="pipedream", microbatches=2)


def test_fp8_delayed_state_is_refused_by_the_pipeline(devices):
    """Delayed scaling's amax histories are written once per call; a pipeline calls each layer once
    per microbatch, so the sum of m rolled histories would replace them: refused, not corrupted."""
    from llmarch.train.fp8 import install

    cfg = llmarch.presets.get("tiny-dense").replace(num_layers=2)
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    install(model, "delayed", history=4)
    batch = {"inputs": jnp.zeros((4, 8), jnp.int32), "targets": jnp.zeros((4, 8), jnp.int32)}
    mesh = sharding.make_mesh("stage=2,data=4")
    with pytest.raises(ValueError, match="FP8 delayed-scaling state"):
        pipeline.pipeline_loss(model, batch, mesh=mesh, schedule="gpipe", microbatches=1)


def test_trainer_pipeline_matches_one_device(tmp_path):
    """``llmarch train --mesh stage=2,data=4``: the trainer's losses equal a one-device run's."""
    from llmarch.train.config import TrainConfig
    from llmarch.train.trainer import train

    small = dict(
        seq_len=16, batch_size=8, steps=3, eval_every=1000, log_every=1, progress=False, tensorboard=False
    )
    model = llmarch.presets.get("tiny-dense").replace(num_layers=4)

    def run(name, **changes):
        cfg = TrainConfig(out_dir=str(tmp_path / name), model=model, **small, **changes)
        return train(cfg, log=lambda s: None)

    one = run("one")
    piped = run("piped", mesh="stage=2,data=4", pipeline_schedule="gpipe", pipeline_microbatches=2)
    np.testing.assert_allclose(list(piped.losses.values()), list(one.losses.values()), rtol=2e-5)
    stacked = [v.get_value() for path, v in nnx.to_flat_state(piped.params) if "layers" in path]
    assert stacked and all(a.sharding.spec[0] == "stage" for a in stacked)  # each stage keeps its layers


def test_cli_refuses_what_the_pipeline_cannot_run(tmp_path, capsys):
    from llmarch import cli

    base = ["train", "--preset", "tiny-dense", "--out", str(tmp_path / "x"), "--steps", "1"]
    cases = [
        (["--mesh", "stage=4,data=2"], "num_layers=2 cannot be split into stage=4"),
        (["--pipeline-schedule", "zb"], "TrainConfig.pipeline_schedule='zb' is unknown"),
        (["--pipeline-virtual", "2"], "TrainConfig.pipeline_virtual=2 is invalid for '1f1b'"),
        (
            ["--mesh", "stage=2,data=4", "--batch-size", "4"],
            "batch_size=4 cannot be split into microbatches=4",
        ),
    ]
    for flags, message in cases:
        assert cli.main(base + flags) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    mtp = ["--preset", "tiny-deepseek-mtp", "--mesh", "stage=2,data=4"]
    assert cli.main(base[:1] + ["--out", str(tmp_path / "y"), "--steps", "1"] + mtp) == 2
    assert "TrainConfig.mtp_loss_weight is not supported with pipeline" in capsys.readouterr().err
