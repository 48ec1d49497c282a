"""Test setup: 8 simulated CPU devices, set before jax is first imported."""

import os

# --xla_backend_optimization_level=0: LLVM compiles the tests' thousands of tiny programs without
# its optimization passes. Compiling is most of the suite's time (test_mtp: 352 of 428 s), and at
# the tests' tiny shapes the slower code costs far less than it saves: test_mtp ran in 228-280 s
# instead of 428-434 s, side by side. XLA's own HLO passes still run, and LLVM reassociates no
# float arithmetic at any level (no fast-math), so results do not change. Library users keep O3.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI's persistent compilation cache stays off in tests (a test that wants it names a directory),
# so in-process `cli.main` calls never write to the user's ~/.cache.
os.environ["LLMARCH_COMPILE_CACHE"] = "off"

import gc  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops jax's caches after each test module. XLA:CPU maps memory for the code of every
    executable it keeps, and the whole suite in one process compiles thousands: two test files
    left 10,423 mappings (754 with this), and the suite crossed the kernel's 65,530-mapping limit
    (vm.max_map_count), which aborts the process inside an XLA compile."""
    yield
    jax.clear_caches()
    gc.collect()


_MAPS = pathlib.Path("/proc/self/maps")
# Well under the kernel's default vm.max_map_count (65,530): a module that compiles many programs
# (test_trainer's mesh runs) must not cross it between two module-end releases.
_MAPPINGS_RELEASE_AT = 30_000


@pytest.fixture(autouse=True)
def _release_compiled_programs_when_many():
    """Drops jax's caches after a test that left the process with many memory mappings: CI aborted
    inside test_trainer (a mesh run's first save) at 94% of the suite, where the per-module release
    above had not run yet."""
    yield
    if _MAPS.exists():
        with _MAPS.open("rb") as maps:
            count = sum(1 for _ in maps)
        if count > _MAPPINGS_RELEASE_AT:
            jax.clear_caches()
            gc.collect()


@pytest.fixture(scope="session")
def devices():
    if len(jax.devices()) < 8:
        pytest.skip(f"needs 8 devices, have {len(jax.devices())}: jax was imported before conftest")
    return jax.devices()


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data directory {SHARED_DATA} is absent")
    return SHARED_DATA
