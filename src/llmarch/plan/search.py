"""``llmarch plan --search``: every way to factor the device count over the mesh axes, priced,
the ones that fit in memory ranked by predicted step time."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

from llmarch.checks import check_int
from llmarch.config import ModelConfig
from llmarch.plan.hardware import Hardware
from llmarch.plan.layout import AXES, Layout
from llmarch.plan.memory import layer_elements
from llmarch.plan.planner import Plan, peaks, plan

SEARCH_AXES = ("data", "fsdp", "tensor", "expert", "stage")  # context only when asked


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def factorizations(devices: int, axes: Sequence[str]) -> Iterator[dict[str, int]]:
    """Every ``{axis: size}`` over ``axes`` whose sizes multiply to ``devices``."""
    if not axes:
        if devices == 1:
            yield {}
        return
    for d in _divisors(devices):
        for rest in factorizations(devices // d, axes[1:]):
            yield {axes[0]: d, **rest}


@dataclasses.dataclass(frozen=True)
class SearchResult:
    ranked: tuple[Plan, ...]  # the layouts that fit, fastest first
    considered: int  # factorizations of the device count
    invalid: int  # refused by the model or batch (a size that does not divide)
    too_big: int  # valid, but over the device's memory


def search(
    cfg: ModelConfig,
    hw: Hardware,
    devices: int,
    *,
    batch: int,
    seq_len: int,
    axes: Sequence[str] = SEARCH_AXES,
    **layout_options,
) -> SearchResult:
    """Prices every factorization of ``devices`` over ``axes`` (other ``Layout`` fields from
    ``layout_options``; pipeline microbatches default to one sequence each) and ranks those whose
    per-device memory fits ``hw`` by step time. A layout the model or batch cannot take (a size
    that does not divide) is skipped and counted, never priced."""
    check_int("search", "devices", devices)
    for axis in axes:
        if axis not in AXES:
            raise ValueError(f"search axis {axis!r} is unknown; allowed: {AXES}")
    # The options and the precision on this hardware are checked once, so that a bad one is its
    # own error rather than every layout "invalid".
    peaks(hw, Layout(mesh={}, batch=batch, seq_len=seq_len, **layout_options))
    # and the model's blocks must have an activation model at all, else every layout would be
    # counted as "does not divide" and the real reason hidden
    layer_elements(cfg, 1, layout_options.get("remat", Layout.remat))
    fitting, considered, invalid, too_big = [], 0, 0, 0
    for mesh in factorizations(devices, tuple(dict.fromkeys(axes))):
        considered += 1
        try:
            priced = plan(cfg, Layout(mesh=mesh, batch=batch, seq_len=seq_len, **layout_options), hw)
        except ValueError:
            invalid += 1
            continue
        if priced.fits:
            fitting.append(priced)
        else:
            too_big += 1
    fitting.sort(key=lambda p: (p.step_seconds, p.memory.total))
    return SearchResult(tuple(fitting), considered, invalid, too_big)
