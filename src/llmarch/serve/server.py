"""Running the app under uvicorn, with a SIGTERM that drains and then exits cleanly."""

from __future__ import annotations

import signal
import socket

import uvicorn


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first SIGTERM drains and then lets the command end with status 0.

    uvicorn itself already shuts down gracefully (it closes the listening socket, lets the
    requests in flight finish, then runs the lifespan's shutdown, where the engine thread
    finishes), but afterwards re-raises the signal, which would end the process with 143.
    Here the first SIGTERM also makes the app answer 503 to any new request, and is not
    re-raised; a second one stops at once. Other signals (Ctrl-C) behave as in uvicorn.
    """

    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.state = state  # the app's ServerState: its ``draining`` flag

    def handle_exit(self, sig, frame):
        self.state.draining = True
        if sig == signal.SIGTERM:
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True
            return
        super().handle_exit(sig, frame)


def run_server(
    app, sock: socket.socket, *, log_level: str = "info", drain_timeout: float | None = 60.0
) -> None:
    """Serves ``app`` (from ``create_app``) on the bound socket ``sock`` until a signal stops it."""
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=drain_timeout, lifespan="on")
    DrainingServer(config, app.state.server).run(sockets=[sock])
