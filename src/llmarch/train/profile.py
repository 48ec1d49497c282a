"""A ``jax.profiler`` trace of chosen training steps (``TrainConfig.profile_steps="A:B"``).

A trace of a whole run is too large to open and mostly repeats itself; a few steps after
compilation show where a step's time goes. The trainer traces steps ``A`` to ``B - 1`` into
``<run>/profile`` (``plugins/profile/<time>/<host>.xplane.pb`` for TensorBoard's profile plugin
or XProf, and ``*.trace.json.gz`` for Perfetto), waiting for the last traced step's results
before it stops, since jax dispatches asynchronously and a trace stopped at dispatch would miss
the work it means to show.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax

from llmarch.run_format import PROFILE_DIR

_SPEC = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


def parse_profile_steps(spec: str, *, steps: int | None = None) -> tuple[int, int]:
    """``(A, B)`` of ``"A:B"``: the steps ``A`` to ``B - 1`` (1-based, as the metrics count them).

    Raises:
      ValueError: naming ``TrainConfig.profile_steps``, unless ``1 <= A < B`` (and ``A <= steps``
        when ``steps`` is given: a range past the run would trace nothing).
    """
    match = _SPEC.fullmatch(spec) if isinstance(spec, str) else None
    if match is None:
        raise ValueError(
            f"TrainConfig.profile_steps={spec!r} is invalid: must be 'A:B', the steps A to B-1 to trace"
        )
    first, stop = int(match[1]), int(match[2])
    if not 1 <= first < stop:
        raise ValueError(
            f"TrainConfig.profile_steps={spec!r} is invalid: must be 'A:B' with 1 <= A < B "
            "(steps A to B-1 are traced)"
        )
    if steps is not None and first > steps:
        raise ValueError(
            f"TrainConfig.profile_steps={spec!r} starts after the last step (steps={steps}): "
            "nothing would be traced"
        )
    return first, stop


class StepProfiler:
    """Starts the trace before step ``A`` and stops it after step ``B - 1``, or in ``close`` when
    training ends first (an error, an interrupt, or ``steps < B - 1``). A resumed run that starts
    inside ``[A, B)`` traces the steps that remain; one that starts past it traces nothing.

    Attributes:
      directory: the trace's directory once a trace was written, else None.
      traced: ``(first, last)``, the steps the trace holds once one was written (the last one
        cut short if an error ended training during it).
    """

    def __init__(self, spec: str | None, run: Path):
        self.range = parse_profile_steps(spec) if spec is not None else None
        self.root = run / PROFILE_DIR
        self.active = False
        self.directory: Path | None = None
        self.traced: tuple[int, int] | None = None

    def before(self, step: int) -> None:
        if self.range is None or self.active or self.directory is not None:
            return
        first, stop = self.range
        if first <= step < stop:
            jax.profiler.start_trace(str(self.root), create_perfetto_trace=True)
            self.active = True
            self.traced = (step, step)

    def after(self, step: int, results: Any, *, last: bool = False) -> None:
        """Called once step ``step`` was dispatched, with its outputs ``results``, which the
        trace waits for before it stops; ``last``: no step follows (the run's final step)."""
        if not self.active:
            return
        self.traced = (self.traced[0], step)
        if last or step >= self.range[1] - 1:
            self.active = False
            try:
                jax.block_until_ready(results)
            finally:
                self._stop()

    def close(self) -> None:
        """Stops a trace that is still running: training ended by an error or an interrupt."""
        if self.active:
            self.active = False
            self._stop()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self.directory = self.root
