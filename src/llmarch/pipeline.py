"""Pipeline parallelism over the ``stage`` mesh axis: the decoder's blocks split into stages, the
batch into microbatches, run by a schedule of ``llmarch.pipeline_schedule`` (GPipe, 1F1B,
interleaved 1F1B) with ``jax.shard_map`` and ``jax.lax.ppermute`` between ring neighbours.

Design (what runs where):

- The embedding runs inside the pipeline on the device of the first virtual stage (Megatron's
  placement: the pipeline's input is the token ids, and the first stage's backward writes the
  embedding table's gradient), and the final norm, output head and loss on the device of the last
  one, so a microbatch's loss gradient starts its backward pass as soon as its forward pass ends
  (which is what lets 1F1B free activations early).
- The run's stacked ``[L, ...]`` layer weights are viewed as ``[v, p, L/(pv), ...]`` with the ``p``
  axis split over ``stage``: device d holds virtual stages ``d, d+p, ...`` (one run of identical
  blocks, so every stage is the same program over its own slice of the weights).
- Every device runs one ``jax.lax.scan`` over the schedule's ticks. At each tick it stores the
  activation and the gradient its neighbours sent at the previous tick in the buffer slots the
  schedule assigned, then runs its op (``lax.switch``: idle, forward, or backward, so an idle
  device computes nothing), then sends. A forward keeps only the stage *input* (the buffer slot);
  the backward recomputes the stage's forward from it under ``jax.vjp`` (stage-level
  rematerialization, one extra forward per microbatch), so a device's activation memory is
  ``Schedule.in_flight`` microbatch inputs ``[b,T,D]``: GPipe m, 1F1B at most p (``p - d`` on
  device d), interleaved ``(p-d-1)·2 + (v-1)·p + 1`` chunk inputs. ``cfg.remat`` still applies
  inside a stage's backward. The first stage keeps no input at all: its backward re-embeds the
  microbatch's token ids.
- The ``shard_map`` is manual over ``stage`` and the row axes only (``stage_axes``). ``tensor`` and
  ``expert`` stay automatic wherever the rules map a logical axis to them (the "tp", "hybrid", ...
  presets; ``pipeline_loss``'s ``rules``): inside a stage the layers run under the rules
  restricted to them (``stage_rules``), so a stage's weights, their gradients and the per-layer
  activations are split over them as outside a pipeline (Megatron tensor parallelism: heads, FFN
  hidden units and vocabulary over ``tensor``, XLA inserting the all-reduces; the experts over
  ``expert``, the MoE layer's own all-to-all shard_map nested inside; a layer's own ppermute ring
  over them, collective matmul or the MoE ring exchange, is refused: ``check_pipeline``). Every
  other axis of size > 1 (data, fsdp; tensor or expert where no rule names them) splits the
  microbatch's rows, with the weights whole over it (gathered once at the boundary, not per
  layer: fsdp is no weight split inside a stage), and the gradients summed over it.
- The whole pipeline is one ``jax.custom_vjp`` whose forward computes the loss *and* every
  gradient by the schedule; its backward scales them by the cotangent. ``jax.grad`` of a loss
  built on ``pipeline_loss`` therefore runs the schedule's order, not autodiff's.

The loss equals the one-device loss of the whole batch (the token mean); layers' aux losses (MoE
load balancing) are computed per microbatch and per row shard (not per tensor or expert shard:
those see the whole microbatch) and averaged, as gradient accumulation would.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from llmarch import ops, sharding
from llmarch.config import ModelConfig
from llmarch.model import _REMAT_POLICIES, Transformer, run_layout, segment_positions
from llmarch.pipeline_schedule import SCHEDULES, Schedule, build, check_schedule_args
from llmarch.quant import fp8_delayed

STAGE = "stage"
TENSOR = "tensor"
EXPERT = "expert"


class _Head(nnx.Module):
    """The modules outside the blocks: the embedding (the first stage's input, and the tied output
    projection) and, after the last block, the final norm and the untied output projection; on
    every device, whole over the row axes and split over the model axes (the vocabulary over
    ``tensor``)."""

    def __init__(self, model: Transformer):
        self.norm, self.embed, self.lm_head = model.final_norm, model.embed, model.lm_head


def _rules_of(rules: sharding.Rules | str | None) -> sharding.Rules:
    """``rules`` as a table; None: the rules in effect, or the "tp" preset when none are."""
    if rules is None:
        rules = sharding.ambient()[1] or "tp"
    return sharding.rules(rules) if isinstance(rules, str) else tuple(rules)


def stage_axes(
    mesh_shape: Mapping[str, int], rules: sharding.Rules
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(row axes, model axes)`` inside the stages: ``tensor`` and ``expert`` (size > 1) are model
    axes where ``rules`` map a logical axis to them (the heads, FFN hidden units and vocabulary:
    Megatron tensor parallelism, left to the compiler; the experts: expert parallelism), and every
    other axis but ``stage`` of size > 1 splits the microbatches' rows."""
    used = {t for _, target in rules for t in sharding.spec_axes(target)}
    model = tuple(a for a in (TENSOR, EXPERT) if mesh_shape.get(a, 1) > 1 and a in used)
    rows = tuple(a for a, n in mesh_shape.items() if a != STAGE and n > 1 and a not in model)
    return rows, model


def stage_rules(rules: sharding.Rules, model_axes: tuple[str, ...]) -> sharding.Rules:
    """``rules`` restricted to ``model_axes`` (``stage_axes``): what the layers see inside a
    stage, where the other mesh axes are manual (the stage's own and the rows' shards)."""
    out = []
    for name, target in rules:
        kept = tuple(t for t in sharding.spec_axes(target) if t in model_axes)
        out.append((name, kept[0] if len(kept) == 1 else (kept or None)))
    return tuple(out)


def check_pipeline(
    cfg: ModelConfig,
    mesh_shape: dict[str, int],
    *,
    schedule: str,
    microbatches: int,
    virtual: int = 1,
    batch_size: int | None = None,
    rules: sharding.Rules | str | None = None,
) -> None:
    """Raises ValueError naming the field for what the pipeline cannot run, before any compilation.
    ``rules``: as ``pipeline_loss``'s (they decide whether tensor and expert split rows or the model)."""
    p = mesh_shape.get(STAGE, 1)
    check_schedule_args(schedule, p, microbatches, virtual)
    layout = run_layout(cfg)
    if len(layout) != 1 or cfg.skip_layers:
        raise ValueError(
            f"model {cfg.name!r} has {len(layout)} runs of blocks (kinds differ between layers or skip "
            "layers cut them): pipeline stages must be alike, so the pipeline needs one run of "
            "identical blocks and no skip_layers"
        )
    if cfg.num_layers % (p * virtual):
        raise ValueError(
            f"num_layers={cfg.num_layers} cannot be split into stage={p} x virtual={virtual} equal "
            f"stages: it must be a multiple of {p * virtual}"
        )
    if cfg.mtp_depth:
        raise ValueError(f"mtp_depth={cfg.mtp_depth} is not supported with pipeline stages (stage={p})")
    rows, model_axes = stage_axes(mesh_shape, _rules_of(rules))
    # A layer's own ppermute ring inside a stage runs in one branch of the tick's lax.switch, which
    # only the devices of some stages take, but it lowers to a collective-permute over every device:
    # on XLA:CPU (jax 0.10.2) the permutes of different branches then pair up wrongly (wrong losses,
    # measured) or wait forever. XLA's own collectives (all-reduce, all-to-all) are unaffected.
    rings = {
        TENSOR: ("ModelConfig.collective_matmul", cfg.collective_matmul, "False"),
        EXPERT: ("MoEConfig.ep_exchange", cfg.moe.ep_exchange if cfg.moe else None, "'padded'"),
    }
    for axis, (field, value, instead) in rings.items():
        if axis in model_axes and value in (True, "ring"):
            raise ValueError(
                f"{field}={value!r} is not supported inside pipeline stages that split the model over "
                f"'{axis}' (mesh {axis}={mesh_shape[axis]}, stage={p}): its ppermute ring runs in only "
                f"some stages' branch of the schedule; set it to {instead}, or use rules that name no "
                f"'{axis}' (then {axis} splits the rows)"
            )
    if batch_size is not None:
        ways = math.prod(mesh_shape[a] for a in rows)
        if batch_size % (microbatches * ways):
            raise ValueError(
                f"batch_size={batch_size} cannot be split into microbatches={microbatches} of rows split "
                f"{ways} ways over the mesh's row axes {rows}: it must be a multiple of {microbatches * ways}"
            )


def _to_microbatches(a: jax.Array, m: int) -> jax.Array:
    """``[B, ...] -> [m, B/m, ...]``, microbatch i taking rows ``i, i+m, ...``: rows split over the
    data axes in contiguous blocks leave every shard a share of every microbatch."""
    return jnp.swapaxes(a.reshape(a.shape[0] // m, m, *a.shape[1:]), 0, 1)


def _from_microbatches(a: jax.Array) -> jax.Array:
    return jnp.swapaxes(a, 0, 1).reshape(-1, *a.shape[2:])


def pipeline_loss(
    model: Transformer,
    batch: dict[str, jax.Array],
    *,
    mesh: jax.sharding.Mesh,
    schedule: str = "1f1b",
    microbatches: int,
    virtual: int = 1,
    z_loss: float = 0.0,
    loss_chunk: int | None = None,
    rules: sharding.Rules | str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(total, parts)`` as ``llmarch.train.step.loss_fn`` gives them (``parts``: loss, z_loss,
    aux_loss), computed by a pipeline over ``mesh``'s ``stage`` axis.

    Args:
      model: a Transformer with one run of identical blocks (``check_pipeline``).
      batch: ``inputs``, ``targets`` ``[B,T]``; optional ``mask``, ``positions``, ``segment_ids``.
      mesh: the device mesh (``llmarch.sharding.make_mesh``); ``stage`` of any size (1 runs the
        schedule on one stage).
      schedule: "gpipe", "1f1b" or "interleaved" (``llmarch.pipeline_schedule.SCHEDULES``).
      microbatches: m; B must be a multiple of m times the product of the row axes (``stage_axes``).
      virtual: chunks per device for "interleaved" (v >= 2).
      z_loss, loss_chunk: as in ``loss_fn`` (``loss_chunk`` None: plain float32 logits).
      rules: the logical-axis rules (a table or a ``llmarch.sharding.RULES`` name) whose ``tensor``
        and ``expert`` entries the stages run under (``stage_axes``, ``stage_rules``); None: those
        in effect (``llmarch.sharding.use``), or the "tp" preset when none are.
    """
    cfg = model.cfg
    inputs, targets = batch["inputs"], batch["targets"]
    table = _rules_of(rules)
    check_pipeline(
        cfg,
        dict(mesh.shape),
        schedule=schedule,
        microbatches=microbatches,
        virtual=virtual,
        batch_size=inputs.shape[0],
        rules=table,
    )
    if fp8_delayed.has_meta(nnx.state(model)):  # one call per microbatch: the histories would add
        raise ValueError(
            "a model with FP8 delayed-scaling state (precision 'fp8-delayed') cannot run in a pipeline: "
            "each layer runs once per microbatch and its amax histories would be summed; use 'fp8'"
        )
    m = microbatches
    seg = batch.get("segment_ids")
    pos = batch.get("positions")
    pos = segment_positions(seg, inputs.shape) if pos is None else pos
    mask = batch.get("mask")
    w = jnp.ones(inputs.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    denom = jnp.maximum(w.sum(), 1.0) if mask is not None else jnp.float32(w.size)
    mbs = {"inputs": inputs, "targets": targets, "weights": w / denom, "positions": pos}
    if seg is not None:
        mbs["segment_ids"] = seg
    mbs = {k: _to_microbatches(v, m) for k, v in mbs.items()}  # each [m,b,T]

    gd_layers, st_layers = nnx.split(model.runs[0].layers)
    gd_head, st_head = nnx.split(_Head(model))
    p, v = mesh.shape[STAGE], virtual
    rows, model_axes = stage_axes(dict(mesh.shape), table)
    inner = stage_rules(table, model_axes)
    # Each leaf's split over the model axes inside a stage (raising ValueError, by path, for a
    # dimension they do not divide): the layers' [L, ...] (L whole: stage is manual there).
    layer_specs, head_specs = (_specs(st, mesh, inner) for st in (st_layers, st_head))
    layer_leaves, layer_def = jax.tree.flatten(st_layers)
    layer_leaves = [a.reshape(v, p, a.shape[0] // (p * v), *a.shape[1:]) for a in layer_leaves]
    head_leaves, head_def = jax.tree.flatten(st_head)
    sched = build(schedule, p, m, v)
    run = _make_run(
        cfg,
        mesh,
        sched,
        (gd_layers, layer_def, layer_specs),
        (gd_head, head_def, head_specs),
        (rows, model_axes, inner),
        z_loss,
        loss_chunk,
    )
    out = run(layer_leaves, head_leaves, mbs)
    total, ce, z, aux = out[0], out[1], out[2], out[3]
    parts = {"loss": jax.lax.stop_gradient(ce), "z_loss": jax.lax.stop_gradient(z)}
    parts["aux_loss"] = jax.lax.stop_gradient(aux)
    return total, parts


def _specs(state: nnx.State, mesh: jax.sharding.Mesh, inner: sharding.Rules) -> list[P]:
    """Each leaf's PartitionSpec under ``inner`` (model axes only), in ``jax.tree.leaves`` order."""
    shardings = sharding.state_shardings(state, mesh, inner)
    return [s.spec for s in jax.tree.leaves(shardings)]


def _is_float(a) -> bool:
    return jnp.issubdtype(jnp.result_type(a), jnp.floating)


def _zero_cotangent(a):
    return jnp.zeros_like(a) if _is_float(a) else np.zeros(np.shape(a), jax.dtypes.float0)


def _make_run(cfg, mesh, sched: Schedule, layers, head, axes_, z_loss, loss_chunk):
    """The pipeline as a ``jax.custom_vjp`` over ``(layer_leaves, head_leaves, mbs)`` (``mbs``: each
    ``[m,b,T]``, the token ids among them) -> ``[total, ce, z, aux]``. ``layers``, ``head``: each
    ``(graphdef, treedef, per-leaf specs over the model axes)``; ``axes_``: ``(row axes, model axes,
    the rules inside a stage)`` (``stage_axes``, ``stage_rules``)."""
    gd_layers, layer_def, layer_specs = layers
    gd_head, head_def, head_specs = head
    rows, model_axes, inner = axes_
    p, v, m = sched.stages, sched.virtual, sched.microbatches
    V = p * v
    ways = math.prod(mesh.shape[a] for a in rows)
    aux_scale = 1.0 / (m * ways)  # aux losses: the mean over microbatches and row shards
    row_spec = rows if rows else None
    tables = tuple(
        jnp.asarray(t)
        for t in (
            sched.op,
            sched.chunk,
            sched.mb,
            sched.act_slot,
            sched.grad_slot,
            sched.recv_act,
            sched.recv_grad,
        )
    )
    fwd_perm = [(i, (i + 1) % p) for i in range(p)]
    bwd_perm = [(i, (i - 1) % p) for i in range(p)]
    policy = None if cfg.remat == "none" else _REMAT_POLICIES[cfg.remat]

    def stage_fn(float_leaves, other_leaves, is_float, x, pos, seg):
        """One chunk's blocks over ``x [b,T,D]``: ``(y, aux loss)``, scanned over its layers."""
        it_f, it_o = iter(float_leaves), iter(other_leaves)
        leaves = [next(it_f) if f else next(it_o) for f in is_float]
        state = jax.tree.unflatten(layer_def, leaves)

        def body(x, layer_state):
            x, (_, aux) = nnx.merge(gd_layers, layer_state)(x, pos, seg, None)
            return x, jnp.sum(aux["loss"]) if "loss" in aux else jnp.zeros((), jnp.float32)

        if policy is not None or cfg.remat == "full":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        y, aux = jax.lax.scan(body, x, state)
        return y, aux.sum().astype(jnp.float32)

    def head_fn(head_leaves, y, targets, weights):
        """Final norm, output head, cross entropy (+ z-loss) of one microbatch, token-weighted."""
        head = nnx.merge(gd_head, jax.tree.unflatten(head_def, head_leaves))
        h = head.norm(y)
        if loss_chunk is None:
            logits = head.embed.attend(h) if head.lm_head is None else head.lm_head("BTD,DV->BTV", h)
            logits = logits.astype(cfg.logits_dtype).astype(jnp.float32)
            lse = jax.nn.logsumexp(logits, axis=-1)
            # The target's logit by a one-hot contraction, not a gather: with V over one model axis
            # and B over another, XLA's SPMD partitioner (jax 0.10.2) aborts on that gather in a
            # partly manual program ("Check failed: ... num_devices_per_group"); the sum is exact.
            picked = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1]), axis=-1)  # [B,T]
            nll = lse - picked
        else:
            b, t, dm = h.shape
            wt, tr = (head.embed.table(), False) if head.lm_head is None else (head.lm_head.weight(), True)
            nll, lse = ops.cross_entropy(
                h.reshape(b * t, dm),
                wt,
                targets.reshape(b * t),
                transpose_w=tr,
                chunk=loss_chunk,
                impl=cfg.impl,
            )
            nll, lse = nll.reshape(b, t), lse.reshape(b, t)
        ce = jnp.sum(nll * weights)
        z = jnp.sum(jnp.square(lse) * weights)
        return ce + z_loss * z, (ce, z)

    def embed_fn(head_leaves, tokens):
        """The first stage's input: the embedded token ids ``[b,T] -> [b,T,D]``."""
        head = nnx.merge(gd_head, jax.tree.unflatten(head_def, head_leaves))
        return head.embed.encode(tokens, jnp.dtype(cfg.dtype))

    def split(a, spec):  # the model axes' split of a weight (or a gradient) inside the stage
        return jax.lax.with_sharding_constraint(a, spec) if model_axes else a

    def body(layer_leaves, head_leaves, mbs):
        d = jax.lax.axis_index(STAGE)
        # [v, Lc, ...], split over the model axes as the layer's names say ([L, ...] -> [v, Lc, ...])
        local_specs = [P(None, *s) for s in layer_specs]
        local = [split(a[:, 0], s) for a, s in zip(layer_leaves, local_specs, strict=True)]
        head_leaves = [split(a, s) for a, s in zip(head_leaves, head_specs, strict=True)]
        is_float = [_is_float(a) for a in local]
        float_local = [a for a, f in zip(local, is_float, strict=True) if f]
        float_specs = [s for s, f in zip(local_specs, is_float, strict=True) if f]

        def accumulate(accs, grads, specs):
            # Pinned to the weights' split: the scan's carries never left to sharding propagation.
            return [split(a + g, s) for a, g, s in zip(accs, grads, specs, strict=True)]

        other_local = [a for a, f in zip(local, is_float, strict=True) if not f]
        seg_all = mbs.get("segment_ids")
        b, T = mbs["inputs"].shape[1:]
        dtype = jnp.dtype(cfg.dtype)
        zeros_act = jnp.zeros((b, T, cfg.d_model), dtype)

        def chunk(leaves, c):
            return [jax.lax.dynamic_index_in_dim(a, c, 0, keepdims=False) for a in leaves]

        def call_stage(fl, c, xin, i):
            seg = None if seg_all is None else seg_all[i]
            return stage_fn(fl, chunk(other_local, c), is_float, xin, mbs["positions"][i], seg)

        def stage_input(carry, i, aslot, first):
            """The first stage embeds microbatch i; the others read the slot it arrived in."""
            return jax.lax.cond(
                first, lambda: embed_fn(head_leaves, mbs["inputs"][i]), lambda: carry["act"][aslot]
            )

        def idle(carry, c, i, aslot, gslot, first, last):
            return carry, zeros_act, zeros_act

        def forward(carry, c, i, aslot, gslot, first, last):
            y, aux = call_stage(chunk(float_local, c), c, stage_input(carry, i, aslot, first), i)

            def loss_grads():
                (tot, (ce, z)), (dh, dy) = jax.value_and_grad(head_fn, argnums=(0, 1), has_aux=True)(
                    head_leaves, y, mbs["targets"][i], mbs["weights"][i]
                )
                return jnp.stack([tot, ce, z]), dh, dy.astype(y.dtype)

            def nothing():
                return jnp.zeros(3, jnp.float32), [jnp.zeros_like(a) for a in head_leaves], zeros_act

            losses, dh, dy = jax.lax.cond(last, loss_grads, nothing)
            carry = dict(carry)
            carry["grad"] = carry["grad"].at[gslot].set(dy)  # a dummy slot unless last
            carry["dhead"] = accumulate(carry["dhead"], dh, head_specs)
            carry["losses"] = carry["losses"] + jnp.concatenate([losses, aux_scale * aux[None]])
            return carry, y, zeros_act

        def backward(carry, c, i, aslot, gslot, first, last):
            dy = carry["grad"][gslot]
            f = lambda fl, xx: call_stage(fl, c, xx, i)  # noqa: E731
            _, vjp = jax.vjp(f, chunk(float_local, c), stage_input(carry, i, aslot, first))
            dfl, dx = vjp((dy, jnp.float32(aux_scale)))

            def embedding_grads():  # the first stage: dx flows into the embedding table's rows
                _, embed_vjp = jax.vjp(lambda hl: embed_fn(hl, mbs["inputs"][i]), head_leaves)
                return embed_vjp(dx)[0]

            dh = jax.lax.cond(first, embedding_grads, lambda: [jnp.zeros_like(a) for a in head_leaves])
            carry = dict(carry)
            carry["dlayers"] = [
                split(jax.lax.dynamic_update_index_in_dim(acc, acc[c] + g, c, 0), spec)
                for acc, g, spec in zip(carry["dlayers"], dfl, float_specs, strict=True)
            ]
            carry["dhead"] = accumulate(carry["dhead"], dh, head_specs)
            return carry, zeros_act, dx

        def tick(state, row):
            carry, send_a, send_g = state
            op, c, i, aslot, gslot, ra, rg = (r[d] for r in row)
            recv_a = jax.lax.ppermute(send_a, STAGE, fwd_perm)
            recv_g = jax.lax.ppermute(send_g, STAGE, bwd_perm)
            carry = dict(carry)
            carry["act"] = carry["act"].at[ra].set(recv_a)
            carry["grad"] = carry["grad"].at[rg].set(recv_g)
            u = c * p + d
            first, last = u == 0, u == V - 1
            carry, send_a, send_g = jax.lax.switch(
                op, (idle, forward, backward), carry, c, i, aslot, gslot, first, last
            )
            return (carry, send_a, send_g), None

        carry = {
            "act": jnp.zeros((sched.act_slots + 1, *zeros_act.shape), dtype),  # + 1: the "nothing" slot
            "grad": jnp.zeros((sched.grad_slots + 1, *zeros_act.shape), dtype),
            "dlayers": [split(jnp.zeros_like(a), s) for a, s in zip(float_local, float_specs, strict=True)],
            "dhead": [split(jnp.zeros_like(a), s) for a, s in zip(head_leaves, head_specs, strict=True)],
            "losses": jnp.zeros(4, jnp.float32),
        }
        (carry, _, _), _ = jax.lax.scan(tick, (carry, zeros_act, zeros_act), tables)
        every = (STAGE, *rows)
        losses = jax.lax.psum(carry["losses"], every)
        dhead = [jax.lax.psum(g, every) for g in carry["dhead"]]
        it = iter(carry["dlayers"])
        dlayers = [
            (jax.lax.psum(next(it), rows) if rows else next(it))[:, None] if f else jnp.zeros_like(a)[:, None]
            for a, f in zip(local, is_float, strict=True)
        ]
        total = losses[0] + losses[3]
        out = jnp.stack([total, losses[1], losses[2], losses[3]])
        return out, dlayers, dhead

    def run_all(layer_leaves, head_leaves, mbs):
        # Specs name the manual axes only: a weight keeps its split over the model axes.
        layer_spec = [P(None, STAGE)] * len(layer_leaves)
        head_spec = [P()] * len(head_leaves)
        row = P(None, row_spec)
        mb_spec = {k: row for k in mbs}
        fn = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(layer_spec, head_spec, mb_spec),
            out_specs=(P(), layer_spec, head_spec),
            axis_names=frozenset(a for a in mesh.axis_names if a not in model_axes),
            check_vma=False,
        )
        # Inside, the layers constrain activations to the model axes only (none: every axis manual).
        with nnx.logical_axis_rules(inner if model_axes else ()):
            return fn(layer_leaves, head_leaves, mbs)

    @jax.custom_vjp
    def run(layer_leaves, head_leaves, mbs):
        return run_all(layer_leaves, head_leaves, mbs)[0]

    def run_fwd(layer_leaves, head_leaves, mbs):
        out, dl, dh = run_all(layer_leaves, head_leaves, mbs)
        dl = [g if _is_float(a) else None for g, a in zip(dl, layer_leaves, strict=True)]
        return out, (dl, dh, layer_leaves, mbs)

    def run_bwd(res, g):
        dl, dh, layer_leaves, mbs = res
        scale = g[0]  # only the total is differentiated; the parts are reported, stop_gradient'ed
        dl = [
            _zero_cotangent(a) if gi is None else scale * gi for gi, a in zip(dl, layer_leaves, strict=True)
        ]
        return dl, [scale * a for a in dh], jax.tree.map(_zero_cotangent, mbs)

    run.defvjp(run_fwd, run_bwd)
    return run


def train_objective(
    cfg: ModelConfig,
    mesh: jax.sharding.Mesh,
    *,
    schedule: str,
    microbatches: int | None,
    virtual: int,
    batch_size: int,
    z_loss: float,
    loss_chunk: int | None,
    unsupported: tuple[str, ...] = (),
    rules: sharding.Rules | str | None = None,
):
    """The trainer's objective (``llmarch.train.step.Objective``) on a mesh with ``stage > 1``:
    ``pipeline_loss`` with ``microbatches`` (None: twice the stages) under ``rules`` (as
    ``pipeline_loss``'s). ``unsupported``: the TrainConfig features in use that the pipeline
    cannot run (refused here, by name).

    Raises:
      ValueError: naming the field, before anything compiles.
    """
    p = mesh.shape[STAGE]
    if unsupported:
        raise ValueError(
            f"TrainConfig.{unsupported[0]} is not supported with pipeline parallelism (mesh stage={p}); "
            "train without it, or with stage=1"
        )
    if cfg.moe is not None and cfg.moe.bias_update_rate > 0:
        raise ValueError(
            f"MoEConfig.bias_update_rate={cfg.moe.bias_update_rate} is not supported with pipeline "
            f"parallelism (mesh stage={p}): the aux-loss-free bias update needs every layer's expert "
            "loads, which the pipeline does not return; set it to 0 or use stage=1"
        )
    m = 2 * p if microbatches is None else microbatches
    table = _rules_of(rules)  # fixed now: the step runs outside the trainer's sharding context
    check_pipeline(
        cfg,
        dict(mesh.shape),
        schedule=schedule,
        microbatches=m,
        virtual=virtual,
        batch_size=batch_size,
        rules=table,
    )

    def objective(model: Transformer, batch: dict[str, jax.Array], teacher: Any):
        total, parts = pipeline_loss(
            model,
            batch,
            mesh=mesh,
            schedule=schedule,
            microbatches=m,
            virtual=virtual,
            z_loss=z_loss,
            loss_chunk=loss_chunk,
            rules=table,
        )
        return total, parts, collections.OrderedDict()  # no per-layer aux leaves the pipeline

    return objective


def trainer_objective(train_cfg: Any, cfg: ModelConfig, mesh: jax.sharding.Mesh):
    """``train_objective`` for a ``llmarch.train.config.TrainConfig`` (read by attribute: the
    trainer sits above this module): its pipeline fields, batch size, z-loss, loss chunk and rules, and
    the features the pipeline refuses (distillation, LoRA, multi-token prediction)."""
    used = {
        "distill": train_cfg.distill is not None,
        "lora": train_cfg.lora is not None,
        "mtp_loss_weight": train_cfg.trains_mtp(cfg),
    }
    return train_objective(
        cfg,
        mesh,
        schedule=train_cfg.pipeline_schedule,
        microbatches=train_cfg.pipeline_microbatches,
        virtual=train_cfg.pipeline_virtual,
        batch_size=train_cfg.batch_size,
        z_loss=train_cfg.z_loss,
        loss_chunk=train_cfg.loss_chunk,
        unsupported=tuple(name for name, on in used.items() if on),
        rules=train_cfg.rules,
    )


__all__ = [
    "SCHEDULES",
    "check_pipeline",
    "pipeline_loss",
    "stage_axes",
    "stage_rules",
    "train_objective",
    "trainer_objective",
]
