"""Pipeline schedules as static tables: which stage runs which microbatch's forward or backward
at every tick, the buffer slots its activations and gradients occupy, its bubble and its memory.

A schedule is built from each device's *order* of operations (GPipe: every forward, then every
backward; 1F1B / PipeDream-Flush: ``p-1-s`` warm-up forwards, then one forward one backward; the
interleaved 1F1B of Megatron-LM (Narayanan et al. 2021, §2.2) with ``v`` virtual stages per
device), then timed by a simulation in unit ticks: at each tick a device runs its next operation
if its inputs arrived at an earlier tick (an activation from the previous virtual stage, a gradient
from the next one), else it idles. One tick is one forward or one backward of one virtual stage on
one microbatch (forward and backward cost alike in this count), and every device sends at most one
activation and one gradient per tick, to its ring neighbours (``llmarch.pipeline`` runs the
tables with ``jax.lax.ppermute``).

Virtual stage ``u = c·p + d`` (chunk c of device d) holds layers ``[u·L/(pv), (u+1)·L/(pv))``;
with ``v = 1`` it is stage d. Nothing here uses jax: the tables are numpy, checked by the tests
against the papers' bubble fractions and activation counts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

SCHEDULES = ("gpipe", "1f1b", "interleaved")
IDLE, FWD, BWD = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A timed schedule over ``stages`` devices, ``virtual`` chunks each, ``microbatches``.

    Tables are ``[ticks, stages]`` int32: ``op`` (IDLE/FWD/BWD), ``chunk`` and ``mb`` of the op,
    ``act_slot`` (the activation buffer slot the op reads; the stage input of a forward, kept for
    the backward's recompute), ``grad_slot`` (the gradient slot a backward reads, or a last-stage
    forward writes its loss gradient to), ``recv_act`` / ``recv_grad`` (the slot where the message
    arriving at this tick is stored; ``act_slots`` / ``grad_slots``, one past the last slot, means
    nothing arrives). ``in_flight[d]``: the most microbatches device d held between a forward and
    its backward at any tick (the papers' activation count, in chunk inputs).
    """

    name: str
    stages: int
    virtual: int
    microbatches: int
    op: np.ndarray
    chunk: np.ndarray
    mb: np.ndarray
    act_slot: np.ndarray
    grad_slot: np.ndarray
    recv_act: np.ndarray
    recv_grad: np.ndarray
    act_slots: int
    grad_slots: int
    in_flight: tuple[int, ...]

    @property
    def ticks(self) -> int:
        return self.op.shape[0]

    def bubble(self) -> float:
        """Idle stage-ticks over all stage-ticks: ``1 - busy / (stages · ticks)``."""
        return 1.0 - float((self.op != IDLE).sum()) / (self.stages * self.ticks)

    def ideal_bubble(self) -> float:
        """The papers' fraction: ``(p-1)/(m+p-1)`` (GPipe, 1F1B), ``(p-1)/(v·m+p-1)`` interleaved."""
        p, m, v = self.stages, self.microbatches, self.virtual
        return (p - 1) / (v * m + p - 1)

    def activation_stages(self) -> float:
        """Peak activations of the busiest device in units of one whole stage's activations for one
        microbatch: ``in_flight / v`` (a chunk holds ``1/v`` of the device's layers)."""
        return max(self.in_flight) / self.virtual


def _orders(name: str, p: int, v: int, m: int) -> list[list[tuple[int, int, int]]]:
    """Each device's ops in execution order: ``(FWD|BWD, chunk, mb)``."""
    orders = []
    for d in range(p):
        if name == "gpipe":
            fwd = [(FWD, 0, i) for i in range(m)]
            bwd = [(BWD, 0, i) for i in range(m)]
            warm = m
        elif name == "1f1b":
            fwd = [(FWD, 0, i) for i in range(m)]
            bwd = [(BWD, 0, i) for i in range(m)]
            warm = min(p - 1 - d, m)
        else:  # Megatron-LM's interleaved order: groups of p microbatches, chunk by chunk
            n = v * m
            fwd = [(FWD, (k // p) % v, (k // (p * v)) * p + k % p) for k in range(n)]
            bwd = [(BWD, v - 1 - (k // p) % v, (k // (p * v)) * p + k % p) for k in range(n)]
            warm = min((p - d - 1) * 2 + (v - 1) * p, n)
        order = fwd[:warm]
        for i in range(len(fwd) - warm):
            order += [fwd[warm + i], bwd[i]]
        order += bwd[len(fwd) - warm :]
        orders.append(order)
    return orders


def _allocate(intervals: list[tuple[int, int, object]]) -> tuple[dict[object, int], int]:
    """Greedy interval colouring: ``key -> slot`` so that entries alive at the same tick (inclusive
    ``[start, end]``) never share a slot; returns the map and the number of slots."""
    free: list[int] = []
    busy: list[tuple[int, int]] = []  # (end, slot)
    slots: dict[object, int] = {}
    count = 0
    for start, end, key in sorted(intervals, key=lambda x: (x[0], x[1])):
        for item in sorted(busy):
            if item[0] < start:
                busy.remove(item)
                free.append(item[1])
        if free:
            free.sort()
            slot = free.pop(0)
        else:
            slot, count = count, count + 1
        slots[key] = slot
        busy.append((end, slot))
    return slots, count


def check_schedule_args(
    name: str, stages: int, microbatches: int, virtual: int = 1, *, owner: str = ""
) -> None:
    """Raises ValueError naming the argument (prefixed by ``owner``, e.g. "TrainConfig.pipeline_")
    for a schedule that cannot be built."""
    if name not in SCHEDULES:
        raise ValueError(f"{owner}schedule={name!r} is unknown; allowed: {SCHEDULES}")
    for field, value in (("stages", stages), ("microbatches", microbatches), ("virtual", virtual)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}{field}={value!r} is invalid: must be a positive integer")
    if name == "interleaved":
        if virtual < 2:
            raise ValueError(
                f"{owner}virtual={virtual} is invalid for 'interleaved': needs at least 2 chunks per stage"
            )
        if microbatches % stages:
            raise ValueError(
                f"{owner}microbatches={microbatches} is invalid for 'interleaved' over stages={stages}: "
                "Megatron's interleaved order takes microbatches in groups of one per stage, so "
                "microbatches must be a multiple of stages"
            )
    elif virtual != 1:
        raise ValueError(
            f"{owner}virtual={virtual} is invalid for {name!r}: only 'interleaved' has virtual stages"
        )


def build(name: str, stages: int, microbatches: int, virtual: int = 1) -> Schedule:
    """The timed schedule ``name`` (one of ``SCHEDULES``) for ``stages`` devices, ``microbatches``
    microbatches and ``virtual`` chunks per device (``interleaved`` only)."""
    check_schedule_args(name, stages, microbatches, virtual)
    p, v, m = stages, virtual, microbatches
    last = p * v - 1
    orders = _orders(name, p, v, m)
    done: dict[tuple[int, int, int], int] = {}  # (kind, virtual stage, mb) -> tick
    pos, rows, t = [0] * p, [], 0
    while any(pos[d] < len(orders[d]) for d in range(p)):
        row = [None] * p
        for d in range(p):
            if pos[d] == len(orders[d]):
                continue
            kind, c, i = orders[d][pos[d]]
            u = c * p + d
            if kind == FWD:
                ready = u == 0 or done.get((FWD, u - 1, i), t) < t
            else:
                after = (FWD, u, i) if u == last else (BWD, u + 1, i)
                ready = done.get(after, t) < t
            if ready:
                row[d] = (kind, c, i)
        if all(r is None for r in row):  # nothing ran, so nothing new can become ready
            raise ValueError(f"schedule {name!r} deadlocks at tick {t} (stages={p}, microbatches={m})")
        for d, r in enumerate(row):
            if r is not None:
                done[(r[0], r[1] * p + d, r[2])] = t
                pos[d] += 1
        rows.append(row)
        t += 1
    ticks = len(rows)

    # Buffer entries per device: the stage input of (u > 0, mb), alive from its arrival to the
    # backward that recomputes from it; the gradient of (u, mb), from its arrival (the last stage:
    # its forward, which computes the loss gradient) to its backward.
    act_iv: list[list] = [[] for _ in range(p)]
    grad_iv: list[list] = [[] for _ in range(p)]
    for u in range(p * v):
        d = u % p
        for i in range(m):
            if u > 0:
                act_iv[d].append((done[(FWD, u - 1, i)] + 1, done[(BWD, u, i)], (u, i)))
            start = done[(FWD, u, i)] if u == last else done[(BWD, u + 1, i)] + 1
            grad_iv[d].append((start, done[(BWD, u, i)], (u, i)))
    act_map, grad_map, act_n, grad_n = {}, {}, 1, 1
    for d in range(p):
        a, na = _allocate(act_iv[d])
        g, ng = _allocate(grad_iv[d])
        act_map.update(a)
        grad_map.update(g)
        act_n, grad_n = max(act_n, na), max(grad_n, ng)

    shape = (ticks, p)
    op, chunk, mb = (np.zeros(shape, np.int32) for _ in range(3))
    act_slot, grad_slot = np.full(shape, act_n, np.int32), np.full(shape, grad_n, np.int32)
    recv_act, recv_grad = np.full(shape, act_n, np.int32), np.full(shape, grad_n, np.int32)
    for t, row in enumerate(rows):
        for d, r in enumerate(row):
            if r is None:
                continue
            kind, c, i = r
            u = c * p + d
            op[t, d], chunk[t, d], mb[t, d] = kind, c, i
            if u > 0:
                act_slot[t, d] = act_map[(u, i)]
            if kind == BWD or u == last:
                grad_slot[t, d] = grad_map[(u, i)]
            if t + 1 < ticks and kind == FWD and u < last:  # the receiver stores it next tick
                recv_act[t + 1, (d + 1) % p] = act_map[(u + 1, i)]
            if t + 1 < ticks and kind == BWD and u > 0:
                recv_grad[t + 1, (d - 1) % p] = grad_map[(u - 1, i)]
    in_flight = []
    for d in range(p):
        live = np.zeros(ticks + 1, np.int32)
        for u in range(d, p * v, p):
            for i in range(m):
                live[done[(FWD, u, i)] : done[(BWD, u, i)] + 1] += 1
        in_flight.append(int(live.max()))
    return Schedule(
        name,
        p,
        v,
        m,
        op,
        chunk,
        mb,
        act_slot,
        grad_slot,
        recv_act,
        recv_grad,
        act_n,
        grad_n,
        tuple(in_flight),
    )


def balanced_partition(costs: Sequence[float], parts: int, cuts: Sequence[int] | None = None) -> list[int]:
    """Splits layers of ``costs`` (per-layer cost, e.g. FLOPs) into ``parts`` contiguous non-empty
    groups minimizing the largest group's cost; returns each group's first layer. ``cuts``: the
    layer indices a group may start at (default: any), e.g. only run boundaries.

    Raises:
      ValueError: when ``parts`` groups cannot be formed (fewer allowed cuts than groups).
    """
    n = len(costs)
    if n == 0 or not all(isinstance(c, (int, float, np.number)) and 0 <= c < math.inf for c in costs):
        raise ValueError(f"costs={list(costs)!r} is invalid: one finite cost >= 0 per layer, at least one")
    allowed = sorted(set(range(1, n) if cuts is None else cuts))
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts={parts!r} is invalid: must be a positive integer")
    if any(not 0 < c < n for c in allowed):
        raise ValueError(f"cuts={list(cuts or ())} is invalid: each must be in (0, {n})")
    if parts - 1 > len(allowed):
        raise ValueError(
            f"{n} layers cannot be split into {parts} stages: only {len(allowed)} allowed cut "
            f"points ({allowed}); use fewer stages or a model whose runs split further"
        )
    bounds = [0, *allowed, n]
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(costs, np.float64))])
    # best[k][j]: the smallest max-cost of splitting layers [0, bounds[j]) into k groups.
    inf = math.inf
    best = [[inf] * len(bounds) for _ in range(parts + 1)]
    back = [[0] * len(bounds) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for j in range(1, len(bounds)):
            for i in range(j):
                value = max(best[k - 1][i], prefix[bounds[j]] - prefix[bounds[i]])
                if value < best[k][j]:
                    best[k][j], back[k][j] = value, i
    starts, j = [], len(bounds) - 1
    for k in range(parts, 0, -1):
        j = back[k][j]
        starts.append(bounds[j])
    return starts[::-1]
