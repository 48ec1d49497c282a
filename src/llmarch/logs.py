"""How llmarch reports: through ``logging``, never ``print``.

Each module logs to its own logger, ``logging.getLogger(__name__)``, so the names form one
hierarchy under ``llmarch`` (``llmarch.train.trainer``, ``llmarch.evaluation``, ...) that a user
tunes like any library's: ``logging.getLogger("llmarch").setLevel(logging.WARNING)``. The library
installs no handler; without one Python shows only warnings and errors. ``configure`` is what the
``llmarch`` command calls: INFO and up on stderr, written above progress bars, and from process 0
only in a multi-process run (every process would print the same lines). What a command produces
(``eval``'s JSON, ``generate``'s text) is its output and goes to stdout, not through here.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

ROOT = "llmarch"
LEVELS = ("debug", "info", "warning", "error", "critical")
_quiet = False  # set by configure(): progress bars follow the messages' level


def show_progress() -> bool:
    """Whether progress bars are wanted: False once ``configure`` was asked for warnings only
    (``llmarch -q``); True otherwise, the library's default."""
    return not _quiet


def process_index() -> int:
    """``jax.process_index()``, without starting jax to ask: once ``jax.distributed.initialize``
    ran, the id it was given; before that and before jax's backends exist (or without jax
    imported) this is process 0's view, so a log line never initializes a backend before
    ``jax.distributed.initialize`` could run."""
    if "jax" not in sys.modules:
        return 0
    import jax

    try:
        from jax._src import distributed, xla_bridge

        if distributed.global_state.client is not None:  # joined (jax.distributed), backends or not
            return distributed.global_state.process_id
        if not xla_bridge.backends_are_initialized():
            return 0
    except (ImportError, AttributeError):  # a jax without that helper: ask directly
        pass
    return jax.process_index()


def is_main_process() -> bool:
    """Whether this process writes a run's files, progress bars and summaries (process 0)."""
    return process_index() == 0


def level(*, name: str | None = None, verbose: int = 0, quiet: int = 0) -> int:
    """The ``logging`` level of a ``--log-level NAME`` (which wins) or of ``-v``/``-q`` counts:
    INFO by default, DEBUG with ``-v``, WARNING with ``-q``, ERROR with ``-qq``.

    Raises:
      ValueError: an unknown level name.
    """
    if name is not None:
        if name.lower() not in LEVELS:
            raise ValueError(f"--log-level {name!r} is unknown; allowed: {', '.join(LEVELS)}")
        return getattr(logging, name.upper())
    return min(max(logging.INFO + 10 * (quiet - verbose), logging.DEBUG), logging.CRITICAL)


class _MainProcessOnly(logging.Filter):
    """Errors pass from every process (each may fail its own way); the rest only from process 0."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or is_main_process()


class _Formatter(logging.Formatter):
    """INFO lines as they are; other levels named: ``warning: ...``."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno == logging.INFO else f"{record.levelname.lower()}: {text}"


class ProgressAwareHandler(logging.Handler):
    """Writes to the current ``sys.stderr`` (looked up per record, so a redirected stream is
    followed) through ``tqdm.write``, which lifts open progress bars above the line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001  (logging's contract: a handler never raises)
            self.handleError(record)


def configure(log_level: int = logging.INFO) -> Callable[[], None]:
    """Shows the ``llmarch`` loggers' records at ``log_level`` and up on stderr (process 0 only,
    errors from all); above INFO, progress bars are off too (``show_progress``). Returns a
    function that undoes it (the ``llmarch`` command calls it on exit, so repeated in-process
    calls, as in tests, do not stack handlers)."""
    global _quiet
    logger = logging.getLogger(ROOT)
    handler = ProgressAwareHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    handler.addFilter(_MainProcessOnly())
    before = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(log_level)
    logger.propagate = False  # a root handler (e.g. absl's) would print every line again
    quiet_before, _quiet = _quiet, log_level > logging.INFO

    def undo() -> None:
        global _quiet
        _quiet = quiet_before
        logger.removeHandler(handler)
        logger.setLevel(before[0])
        logger.propagate = before[1]

    return undo
