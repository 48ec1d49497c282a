"""A one-line description of the machine, written beside every benchmark or experiment result."""

from __future__ import annotations

import os
import platform

import jax


def describe() -> str:
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{len(devices)} x {'/'.join(kinds)} ({jax.default_backend()}), "
        f"python {platform.python_version()}, jax {jax.__version__}"
    )
