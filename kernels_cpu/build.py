"""Compiles ``kernels_cpu``'s C++ sources into one shared library, once per machine, and
registers its handlers with ``jax.ffi``.

The library is built with ``-march=native`` for the CPU it runs on, so its cache key holds the
CPU's model and feature flags along with the sources, the compiler and jaxlib's version: a home
directory shared by different machines never loads a library built for another CPU. It lands in
``$LLMARCH_KERNEL_CACHE`` (default ``$XDG_CACHE_HOME/llmarch/kernels_cpu``, ``~/.cache/...``),
written to a temporary name and renamed, so concurrent builds cannot load a half-written file.

``LLMARCH_CPU_WARM_THREADS=0`` keeps the kernels' parallel loop on XLA's pool (``pool.h``).
``LLMARCH_CPU_KERNELS=0`` turns the kernels off; without a C++ compiler (``$CXX``, else ``c++``)
they are unavailable. Either way ``load()`` returns None with the reason in ``unavailable()``,
and callers take their XLA path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jaxlib

SOURCES = ("quantized_matmul.cc", "dense_matmul.cc", "paged_attention.cc", "top_k.cc", "memory_read.cc")
HEADERS = ("pool.h",)  # included by the sources: part of the cache key too
HANDLERS = (
    "llmarch_quantized_matmul",
    "llmarch_dense_matmul",
    "llmarch_paged_attention",
    "llmarch_paged_attention2",
    "llmarch_top_k",
    "llmarch_memory_read",
)
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp-simd", "-std=c++17")
FLAGS += ("-shared", "-fPIC", "-w")

_reason: list[str] = []


def _cpu_signature() -> str:
    """The CPU's model and feature flags (Linux), else what ``platform`` knows."""
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def cache_dir() -> pathlib.Path:
    if os.environ.get("LLMARCH_KERNEL_CACHE"):
        return pathlib.Path(os.environ["LLMARCH_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base, "llmarch", "kernels_cpu")


def _compile(compiler: str, out: pathlib.Path) -> None:
    here = pathlib.Path(__file__).parent
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        tmp_path = pathlib.Path(tmp.name)
    try:
        command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", *(str(here / s) for s in SOURCES)]
        subprocess.run([*command, "-o", str(tmp_path)], check=True, capture_output=True, text=True)
        os.replace(tmp_path, out)
    finally:
        tmp_path.unlink(missing_ok=True)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library with its handlers registered for the CPU platform, or None when the
    kernels are off or cannot be built (``unavailable()`` says why)."""
    if os.environ.get("LLMARCH_CPU_KERNELS", "1") == "0":
        _reason.append("LLMARCH_CPU_KERNELS=0")
        return None
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        _reason.append("no C++ compiler ($CXX, c++ or g++) on PATH")
        return None
    here = pathlib.Path(__file__).parent
    key = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        key.update(here.joinpath(source).read_bytes())
    key.update(f"{compiler}\n{' '.join(FLAGS)}\n".encode())
    key.update(f"{jaxlib.__version__}\n{_cpu_signature()}".encode())
    path = cache_dir() / f"kernels_cpu-{key.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            _compile(compiler, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        _reason.append(f"building {path.name} failed: {detail.strip()[-500:]}")
        warnings.warn(f"llmarch CPU kernels unavailable, using the XLA paths: {_reason[-1]}", stacklevel=2)
        return None
    for name in HANDLERS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return lib


def unavailable() -> str | None:
    """Why ``load()`` returned None, or None when the kernels are loaded."""
    return None if load() is not None else _reason[-1]
