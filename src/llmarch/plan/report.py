"""The planner's answers as text tables: one layout in full (``describe``), a search's ranking
(``describe_search``)."""

from __future__ import annotations

from llmarch.plan.planner import Plan
from llmarch.plan.search import SearchResult


def _scaled(value: float, units: tuple[tuple[float, str], ...]) -> str:
    """``value`` in the largest unit it reaches (the last unit below all of them)."""
    for scale, unit in units:
        if abs(value) >= scale:
            return f"{value / scale:,.2f} {unit}"
    scale, unit = units[-1]
    return f"{value / scale:,.2f} {unit}"


def _gb(nbytes: float) -> str:
    return _scaled(nbytes, ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B")))


def _seconds(s: float) -> str:
    return _scaled(s, ((1, "s"), (1e-3, "ms"), (1e-6, "us")))


def _joules(j: float) -> str:
    return _scaled(j, ((1e6, "MJ"), (1e3, "kJ"), (1, "J"), (1e-3, "mJ")))


def describe(p: Plan) -> str:
    """Every number of ``p``, one per row: memory per device, the roofline's terms, each
    collective over its link, bubble, step time, MFU, throughput and energy."""
    lay, hw, mem = p.layout, p.hardware, p.memory
    rows: list[tuple[str, str]] = [
        ("model", p.model),
        ("hardware", f"{hw.name} x {lay.devices} ({hw.peak_bf16 / 1e12:,.0f} TFLOP/s bf16 each)"),
        ("mesh", lay.spec()),
        (
            "batch",
            f"{lay.batch} x {lay.seq_len} tokens; remat={lay.remat}, precision={lay.precision}, "
            f"optimizer={lay.optimizer}",
        ),
    ]
    if lay.stages > 1:
        v = f", v={lay.virtual_stages}" if lay.schedule == "interleaved" else ""
        rows.append(("pipeline", f"{lay.schedule}, p={lay.stages}, m={lay.microbatches}{v}"))
    rows += [
        ("-- memory per device", ""),
        ("parameters", _gb(mem.params)),
        ("gradients", _gb(mem.grads)),
        ("optimizer state", _gb(mem.optimizer)),
        ("activations", _gb(mem.activations)),
        (
            "total (training)",
            f"{_gb(mem.total)} of {_gb(hw.hbm_bytes)}: {'fits' if p.fits else 'DOES NOT FIT'}",
        ),
        ("KV cache (serving)", f"{_gb(mem.kv_cache)} ({mem.kv_bytes_per_token:,} bytes/token)"),
        ("-- step time per device", ""),
        ("FLOPs", f"{p.hardware_flops:.3e} -> {_seconds(p.flops_seconds)}"),
        ("HBM traffic", f"{_gb(p.hbm_bytes)} -> {_seconds(p.hbm_seconds)}"),
        ("optimizer update", _seconds(p.optimizer_seconds)),
    ]
    for c in p.collectives:
        how = "overlapped" if c.overlapped else "exposed"
        rows.append(
            (
                f"{c.axis} {c.op}",
                f"{c.what}: {_gb(c.wire_bytes)} over {c.link} ({c.n} devices) -> "
                f"{_seconds(c.seconds)}, {how}",
            )
        )
    rows += [
        ("pipeline bubble", f"{p.bubble:.1%}"),
        ("step time", f"{_seconds(p.step_seconds)} (bound: {p.bound})"),
        ("tokens/s", f"{p.tokens_per_second:,.0f}"),
        ("predicted MFU", f"{p.mfu:.1%}"),
    ]
    if p.energy_joules is None:
        rows.append(("energy", f"n/a: {hw.name} has no published rated power"))
    else:
        rows.append(
            (
                "energy",
                f"{_joules(p.energy_joules)}/step, {_joules(p.joules_per_token)}/token at {hw.watts:.0f} W",
            )
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" if v else k for k, v in rows)


def describe_search(result: SearchResult, top: int) -> str:
    """The ``top`` fastest layouts that fit, one per row, and what was left out."""
    lines = [
        f"{result.considered} factorizations: {len(result.ranked)} fit, {result.too_big} exceed memory, "
        f"{result.invalid} do not divide the model or batch"
    ]
    if not result.ranked:
        lines.append(
            "no layout fits: more devices, remat full, a leaner precision or optimizer, or a smaller batch"
        )
    else:
        lines.append(f"{'rank':>4}  {'mesh':<40} {'memory':>12} {'step':>10} {'MFU':>7}  bound")
        for i, p in enumerate(result.ranked[:top], 1):
            lines.append(
                f"{i:>4}  {p.layout.spec():<40} {_gb(p.memory.total):>12} {_seconds(p.step_seconds):>10} "
                f"{p.mfu:>7.1%}  {p.bound}"
            )
    return "\n".join(lines)
