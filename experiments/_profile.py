"""Where a compiled program's time goes on XLA:CPU: its thunks, traced with ``jax.profiler``.

XLA:CPU runs a program as a graph of thunks (a dot, a fusion, a while loop, ...) and, under the
profiler, records each thunk's start and end on the thread that ran it. ``trace`` collects those
events for some calls of a function; ``breakdown`` turns them into wall time by kind of thunk
(each kind's time is the union of its intervals over both cores, so work running concurrently on
two threads is not counted twice, and ``idle`` is the time no thunk ran; ``ffi_kinds`` names each
``kernels_cpu`` call by its kernel, where the profiler only says ``ffi_call``); ``dot_shapes``
reads the shapes of every matrix product in the optimized HLO (XLA's dots and
``kernels_cpu.dense_matmul`` calls) so each can be timed alone (``lone_dot_seconds``): the rate
the same product reaches with nothing else running, the roofline the program's products are
measured against.

Used by ``experiments/bench.py`` to explain the goals it does not meet.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import math
import re
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np

# Thunks that contain other thunks (their time is their children's): left out of the union.
_CONTAINERS = ("while", "call", "conditional")
# An HLO instruction's name ("dot.3", "ynn_fusion.89", "wrapped_reduce-window"); the profiler's
# other events (Python frames, the runtime's "ThunkExecutor::Execute") never look like one.
_INSTRUCTION = re.compile(r"^[a-z][a-z0-9_\-]*(\.\d+)?$")


@dataclasses.dataclass(frozen=True)
class Event:
    start: int  # ns
    end: int
    name: str  # the HLO instruction, e.g. "ynn_fusion.89"

    @property
    def kind(self) -> str:
        """The instruction's name without its number: "ynn_fusion", "dot", "copy_bitcast_fusion"."""
        return re.sub(r"\.\d+$", "", self.name)


def trace(fn: Callable[[], object], calls: int) -> list[Event]:
    """The XLA:CPU thunk events of ``calls`` calls of ``fn`` (warm it first; it must block)."""
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        try:
            for _ in range(calls):
                fn()
        finally:
            jax.profiler.stop_trace()
        (path,) = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    events = []
    for plane in data.planes:  # thunks run on XLA's threads, or inline on the caller's
        for line in plane.lines:
            for ev in line.events:
                if _INSTRUCTION.match(ev.name):
                    events.append(Event(ev.start_ns, ev.start_ns + ev.duration_ns, ev.name))
    if not events:
        raise RuntimeError("the profiler recorded no XLA:CPU thunk events (is the backend CPU?)")
    return sorted(events, key=lambda e: e.start)


def union_ns(intervals) -> int:
    """Total length of the union of ``(start, end)`` intervals."""
    total, cur_start, cur_end = 0, None, None
    for s, e in sorted(intervals):
        if cur_end is None or s > cur_end:
            total += 0 if cur_end is None else cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    return total + (0 if cur_end is None else cur_end - cur_start)


def is_dot(kind: str) -> bool:
    """A matrix product: XLA's own dot thunk, a dot fused for XNNPACK/YNNPACK, or the
    ``dense_matmul`` kernel (as ``ffi_kinds`` names it)."""
    return kind in ("dot", "dense_matmul") or kind.startswith(("ynn_fusion", "xnn_fusion"))


_FFI = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = .* custom-call\(.*custom_call_target="llmarch_(\w+)"')


def ffi_kinds(hlo: str) -> dict[str, str]:
    """``{thunk name: kernel}`` for every ``kernels_cpu`` call of optimized HLO text
    (``"ffi_call.3": "dense_matmul"``), for ``breakdown``'s ``kinds``."""
    return {m[1]: m[2] for m in map(_FFI.match, hlo.splitlines()) if m}


def breakdown(events: list[Event], per: int = 1, kinds: dict[str, str] | None = None) -> dict[str, float]:
    """Milliseconds of wall time per ``per`` (e.g. per step) by thunk kind, largest first, with
    ``span`` (first start to last end), ``dots`` (all matrix products together) and ``idle``
    (no thunk running on either core: dispatch, waits, the runtime between thunks). ``kinds``
    renames some thunks' kind by name (``ffi_kinds``)."""
    kinds = kinds or {}
    leaves = [e for e in events if e.kind not in _CONTAINERS]
    by_kind = collections.defaultdict(list)
    for e in leaves:
        by_kind[kinds.get(e.name, e.kind)].append((e.start, e.end))
    span = max(e.end for e in events) - events[0].start
    products = [iv for kind, ivs in by_kind.items() if is_dot(kind) for iv in ivs]
    out = {"span": span, "dots": union_ns(products)}
    out["idle"] = span - union_ns([(e.start, e.end) for e in leaves])
    out.update(sorted(((k, union_ns(v)) for k, v in by_kind.items()), key=lambda kv: -kv[1]))
    return {k: v / 1e6 / per for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class DotShape:
    lhs: tuple[int, ...]
    rhs: tuple[int, ...]
    dims: tuple  # ((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))
    kernel: bool = False  # kernels_cpu.dense_matmul's [M, K] @ [K, N], not XLA's dot
    more: tuple[tuple[int, ...], ...] = ()  # a kernel call's further weights [K, N_i], sharing x

    @property
    def flops(self) -> int:
        (lc, _), (lb, _) = self.dims
        free = math.prod(d for i, d in enumerate(self.lhs) if i not in lc and i not in lb)
        (_, rc), (_, rb) = self.dims
        rfree = math.prod(d for i, d in enumerate(self.rhs) if i not in rc and i not in rb)
        k = math.prod(self.lhs[i] for i in lc)
        extra = sum(math.prod(w) for w in self.more) // k  # further weights' output columns
        return 2 * math.prod(self.lhs[i] for i in lb) * free * (rfree + extra) * k

    @property
    def rhs_bytes(self) -> int:  # float32: the weights a matrix-vector product streams
        return 4 * (math.prod(self.rhs) + sum(math.prod(w) for w in self.more))


_SHAPE = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = f32\[([\d,]*)\]")
_DOT = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = f32\[[\d,]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\), (.*)$")


def _dims(attrs: str, name: str) -> tuple[int, ...]:
    m = re.search(name + r"=\{([\d,]*)\}", attrs)
    return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def dot_shapes(hlo: str) -> dict[str, DotShape]:
    """Every float32 matrix product of optimized HLO text (fused computations included), by the
    name of the thunk that runs it: the dot itself, the fusion that calls the computation it sits
    in, or the ``dense_matmul`` kernel's call."""
    shapes = {
        m[1]: tuple(int(d) for d in m[2].split(",") if d) for m in map(_SHAPE.match, hlo.splitlines()) if m
    }
    computation, in_computation, dots = None, {}, {}
    for line in hlo.splitlines():
        if head := re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line):
            computation = head[1]
        elif m := _DOT.match(line):
            attrs = m[4]
            dims = (
                (_dims(attrs, "lhs_contracting_dims"), _dims(attrs, "rhs_contracting_dims")),
                (_dims(attrs, "lhs_batch_dims"), _dims(attrs, "rhs_batch_dims")),
            )
            shape = DotShape(shapes[m[2]], shapes[m[3]], dims)
            dots[m[1]] = shape
            in_computation[computation] = shape
    for line in hlo.splitlines():  # fusions whose computation holds a dot run as one thunk
        if (m := re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = .* fusion\(.*calls=%([\w.\-]+)", line)) and m[
            2
        ] in in_computation:
            dots[m[1]] = in_computation[m[2]]
    for line in hlo.splitlines():  # the kernel's calls: x [M, K], w [K, N], as its operands' layouts
        if 'custom_call_target="llmarch_dense_matmul"' in line:
            name = _FFI.match(line)[1]
            operands = line.split("operand_layout_constraints=")[1].split("}}")[0]
            x, w, *more = [
                tuple(int(d) for d in s.split(",")) for s in re.findall(r"f32\[([\d,]+)\]", operands)
            ]
            dots[name] = DotShape(x, w, (((1,), (0,)), ((), ())), kernel=True, more=tuple(more))
    return dots


def lone_dot_seconds(shape: DotShape, repeats: int = 10, stream_bytes: int = 0) -> float:
    """Best seconds of one jitted product of ``shape`` (XLA's ``dot_general``, or the
    ``dense_matmul`` kernel for a kernel call) with nothing else in the program.

    With ``stream_bytes``, the product runs over enough distinct copies of its right operand to
    read that many bytes (one program, the copies in turn), and the time per product is returned:
    a matrix-vector product over a weight that fits in cache would otherwise time the cache, not
    the memory a decode step streams its weights from.
    """
    rng = np.random.default_rng(0)
    a = jax.numpy.asarray(rng.standard_normal(shape.lhs, np.float32))
    copies = max(1, stream_bytes // shape.rhs_bytes)
    if shape.kernel:  # each copy: the call's weights, together
        from kernels_cpu.dense_matmul import dense_matmuls

        bs = [
            [jax.numpy.asarray(rng.standard_normal(s, np.float32)) for s in (shape.rhs, *shape.more)]
            for _ in range(copies)
        ]
        f = jax.jit(lambda a, bs: [dense_matmuls(a, b) for b in bs])
    else:
        bs = [jax.numpy.asarray(rng.standard_normal(shape.rhs, np.float32)) for _ in range(copies)]
        f = jax.jit(lambda a, bs: [jax.lax.dot_general(a, b, shape.dims) for b in bs])
    jax.block_until_ready(f(a, bs))
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(a, bs))
        best = min(best, time.perf_counter() - t)
    return best / copies


def dot_table(
    events: list[Event], hlo: str, per: int, *, stream_bytes: int = 0, min_rhs_bytes: int = 0
) -> list[dict]:
    """Per distinct dot shape whose right operand has at least ``min_rhs_bytes``: how many run per
    ``per``, their median time in the program, and the same product's time alone
    (``lone_dot_seconds`` with ``stream_bytes``); sorted by total time, largest first."""
    shapes = dot_shapes(hlo)
    times = collections.defaultdict(list)
    for e in events:
        if e.name in shapes:
            times[shapes[e.name]].append((e.end - e.start) / 1e9)
    rows = []
    for shape, ts in times.items():
        if shape.rhs_bytes < min_rhs_bytes:
            continue
        rows.append(
            {
                "shape": shape,
                "count": len(ts) / per,
                "median_s": float(np.median(ts)),
                "total_s": sum(ts) / per,
                "lone_s": lone_dot_seconds(shape, stream_bytes=stream_bytes),
            }
        )
    return sorted(rows, key=lambda r: -r["total_s"])
