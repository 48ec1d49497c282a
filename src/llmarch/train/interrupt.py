"""Graceful stop on SIGINT (Ctrl-C) and SIGTERM (what preemptible TPU/GPU VMs and schedulers
send before they kill): the first signal asks the trainer to finish its step, save and exit;
a second one aborts at once."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Aborted(KeyboardInterrupt):
    """The second signal: stop now, without saving."""

    def __init__(self, signum: int):
        super().__init__(f"second {signal.Signals(signum).name}: aborted without saving")
        self.signum = signum


class StopRequest:
    """Set by the first signal; ``signum`` says which."""

    def __init__(self):
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


@contextlib.contextmanager
def graceful_stop(*, log) -> Iterator[StopRequest]:
    """Within the block, SIGINT/SIGTERM set the yielded ``StopRequest`` instead of killing the
    process; a second signal raises ``Aborted`` (a ``KeyboardInterrupt``). Off the main thread (where Python
    cannot install handlers) the request simply never fires. The old handlers come back on exit."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum, frame):
        if request:
            raise Aborted(signum)
        request.signum = signum
        log(
            f"{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
            "(send it again to abort without saving)"
        )

    previous = {sig: signal.signal(sig, handle) for sig in SIGNALS}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
