"""Multi-process training on jax's own distributed runtime (``jax.distributed``), and the few
agreements the trainer needs between its processes.

Every process runs the same ``llmarch train`` command; ``start`` joins them before jax touches a
device, after which ``jax.devices()`` lists every process's devices, a mesh spans them all, and
each process feeds only the batch rows its own devices hold. Settings come from the command line
(``--coordinator HOST:PORT --num-processes N --process-id I``) or, when none is given, from the
launcher's environment as ``jax.distributed.initialize()`` detects it on its own:

- SLURM (inside an ``srun`` step): ``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST`` (the first node is
  the coordinator; port ``JAX_COORDINATOR_PORT`` or one derived from the job id),
  ``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_LOCALID`` (on GPUs: one device per process);
- Open MPI (``mpirun``): ``OMPI_MCA_orte_hnp_uri``, ``OMPI_COMM_WORLD_SIZE``,
  ``OMPI_COMM_WORLD_RANK``, ``OMPI_COMM_WORLD_LOCAL_RANK``;
- Cloud TPU VMs (a pod slice, ``gcloud ... --worker=all``): the VM's metadata server, or
  ``TPU_WORKER_HOSTNAMES``/``TPU_PROCESS_ADDRESSES`` and ``TPU_WORKER_ID`` on GKE;
- not Kubernetes: jax's detector fires in any pod (``KUBERNETES_SERVICE_HOST``: hosted notebooks,
  CI runners), where a one-process run would warn or try to bootstrap across pods; in a
  Kubernetes job give the three flags (or ``jax.distributed.initialize`` in your own script).

Once started, jax also reads ``JAX_COORDINATOR_PORT`` and ``JAX_LOCAL_DEVICE_IDS`` (a
``JAX_COORDINATOR_ADDRESS`` alone starts nothing: give the flags). With neither flags nor such an
environment the run is one process.

On CPU, cross-process collectives go through gloo, jax 0.10's default
``jax_cpu_collectives_implementation`` (checked by ``tests/test_distributed.py``: 2 processes of
4 simulated devices train exactly as one process of 8).
"""

from __future__ import annotations

import dataclasses
import logging
import re

import jax
import numpy as np

logger = logging.getLogger(__name__)

_NOT_DETECTED = ("K8sCluster",)  # see the module docstring
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins the others: the coordinator's ``HOST:PORT`` (process 0 serves it),
    the number of processes and this one's id; unset fields come from the launcher's
    environment. ``detect``: look for a launcher's environment when no field is set."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    detect: bool = True

    def __post_init__(self):
        if self.coordinator is not None:
            match = _ADDRESS.match(self.coordinator)
            if match is None or not 1 <= int(match.group(2)) <= 65535:
                raise ValueError(
                    f"--coordinator {self.coordinator!r} is invalid: give HOST:PORT (process 0's "
                    "address and a free port, the same on every process), e.g. 10.0.0.1:1234"
                )
        for flag, value in (("--num-processes", self.num_processes), ("--process-id", self.process_id)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{flag} {value!r} is invalid: it must be an integer")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"--num-processes {self.num_processes} is invalid: it must be >= 1")
        if self.process_id is not None and self.process_id < 0:
            raise ValueError(f"--process-id {self.process_id} is invalid: it must be >= 0")
        if (
            self.num_processes is not None
            and self.process_id is not None
            and self.process_id >= self.num_processes
        ):
            raise ValueError(
                f"--process-id {self.process_id} is invalid: it must be in [0, --num-processes "
                f"{self.num_processes})"
            )

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))


def detected_launcher() -> str | None:
    """The name of the launcher environment that ``jax.distributed.initialize()`` would read
    (e.g. ``SlurmCluster``), or None. jax keeps its detectors in ``jax._src.clusters``; this asks
    them the same question, in the same order, that ``initialize`` asks."""
    try:  # private to jax: if it moves, detection is off and the flags still work
        from jax._src import clusters

        detectors = list(clusters.ClusterEnv._cluster_types)
    except (ImportError, AttributeError):
        logger.debug("jax's cluster detectors were not found: launcher detection is off")
        return None
    for env in detectors:
        if getattr(env, "opt_in_only_method", True) or env.__name__ in _NOT_DETECTED:
            continue
        if env.is_env_present():
            return env.__name__
    return None


def start(launch: Launch) -> bool:
    """Joins this process to the others (``jax.distributed.initialize``) when ``launch`` sets
    anything or a launcher's environment is detected; returns whether it did. Must run before any
    jax computation or device query.

    Raises:
      ValueError: settings that cannot start a run (some flags given, the rest neither given nor
        detected), or jax already started in this process.
    """
    if not launch.given:
        launcher = detected_launcher() if launch.detect else None
        if launcher is None:
            return False
        logger.debug("multi-process settings from the %s environment", launcher)
    elif (
        None in (launch.coordinator, launch.num_processes, launch.process_id) and detected_launcher() is None
    ):
        missing = [
            flag
            for flag, value in (
                ("--coordinator", launch.coordinator),
                ("--num-processes", launch.num_processes),
                ("--process-id", launch.process_id),
            )
            if value is None
        ]
        raise ValueError(
            f"{', '.join(missing)} not given and no launcher environment (SLURM, Open MPI, Cloud TPU, "
            "Cloud TPU) to read it from: give --coordinator, --num-processes and --process-id together"
        )
    from jax._src import xla_bridge

    if getattr(xla_bridge, "backends_are_initialized", lambda: False)():  # else jax's own error
        raise ValueError(
            "multi-process settings came after jax had started in this process: "
            "jax.distributed.initialize must run before any jax computation"
        )
    jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id)
    return True


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is set on any process (every process must call this at the same point):
    a signal that reached one process stops all of them after the same step."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def from_main(value: int) -> int:
    """Process 0's ``value`` on every process (every process must call this at the same point)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def process_rows(data_sharding: jax.sharding.Sharding, batch_size: int, seq_len: int) -> tuple[int, int]:
    """``(index, count)``: this process feeds block ``index`` of ``count`` equal, contiguous blocks
    of every global batch's rows, the rows its devices hold under ``data_sharding`` (the layout
    ``jax.make_array_from_process_local_data`` assembles). One process: ``(0, 1)``; a batch
    replicated over the processes: ``(0, 1)`` on each.

    Raises:
      ValueError: the mesh gives a process rows that are not one such block: an axis that does
        not split the batch is major to one that does, across processes.
    """
    indices = data_sharding.addressable_devices_indices_map((batch_size, seq_len))
    rows = set()
    for index in indices.values():
        start, stop, _ = index[0].indices(batch_size)
        rows.update(range(start, stop))
    first, size = min(rows), len(rows)
    if rows != set(range(first, first + size)) or batch_size % size or first % size:
        raise ValueError(
            f"the mesh gives process {jax.process_index()} batch rows that are not one contiguous "
            f"block of the {batch_size} rows (it holds {size} rows from {first}): split the processes "
            "over the batch's mesh axes (data, fsdp) rather than over an axis that comes before them"
        )
    return first // size, batch_size // size
