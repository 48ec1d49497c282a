"""Where a run's metrics go: JSON lines, TensorBoard, Weights & Biases, behind one small interface.

A ``Tracker`` takes ``log(step, metrics)`` calls, makes what it has taken durable on ``sync()``
(the trainer syncs before every checkpoint, so a ``kill -9`` loses no point that the resumed run
does not log again) and ends with ``close()``. ``open_trackers`` opens the ones a ``TrainConfig``
asks for, on process 0 only: in a multi-process run the other processes log nowhere.

A tracker opened with ``start`` (the step the run starts from, 0 for a fresh start) first forgets
what it holds past ``start``: a resumed run replays those steps and logs them again. The JSONL file
and TensorBoard do so exactly; a W&B run cannot rewind, so it keeps its points and drops the
replayed ones (W&B ignores a step below its last).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tensorboardX import SummaryWriter

from llmarch import logs
from llmarch.run_format import METRICS_FILE, TENSORBOARD_DIR, WANDB_ID_FILE
from llmarch.train.checkpoint import atomic_write_text


@runtime_checkable
class Tracker(Protocol):
    """A destination of metric records. ``name`` and ``location`` (a path or URL) say in the run's
    summary where the records went."""

    name: str
    location: str

    def log(self, step: int, metrics: Mapping[str, Any]) -> None: ...

    def sync(self) -> None: ...

    def close(self) -> None: ...


def plain(value: Any) -> Any:
    """numpy and jax scalars as Python numbers."""
    try:
        return value.item()
    except AttributeError:
        return value


def scalars(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    """The entries that plot as curves: numbers, not flags or per-expert lists."""
    out = {}
    for key, value in metrics.items():
        value = plain(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = value
    return out


class JsonlTracker:
    """Appends ``{"step": ..., **metrics}`` lines to ``metrics.jsonl`` in ``directory``.

    On opening it drops every record past ``start``, atomically, so every step is in the file
    exactly once (a fresh start in an old directory forgets the old steps). A torn last line, left
    by a kill during a write, is dropped too.
    """

    name = "metrics"

    def __init__(self, directory: str | Path, *, start: int = 0):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / METRICS_FILE
        self.location = str(self.path)
        self.truncate_after(start)

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = []
        for i, line in enumerate(lines):
            if not line.strip() or (i == len(lines) - 1 and not line.endswith("\n")):
                continue  # blank, or torn by a kill mid-write (past every checkpoint: saving follows logging)
            try:
                record_step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(
                    f"{self.path} line {i + 1} is not a metrics record: {line.strip()[:80]!r}; "
                    "repair or delete the line to resume"
                ) from None
            if record_step <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(kept))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        record = {"step": step, **{k: plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def sync(self) -> None:
        pass  # every line is written (closed) when logged

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Scalars as TensorBoard events in ``directory/tensorboard``; a resumed run's replayed steps
    replace the old points (``purge_step``)."""

    name = "tensorboard"

    def __init__(self, directory: str | Path, *, start: int = 0):
        self.directory = Path(directory) / TENSORBOARD_DIR
        self.location = str(self.directory)
        self.writer = SummaryWriter(str(self.directory), purge_step=start + 1)
        self.reopened = 0

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.writer is None:  # after a sync: continue in a new events file
            # named apart: an events file's name has whole seconds, and a writer opened within the
            # same second as the last one would truncate that one's file ('wb') with its points
            self.reopened += 1
            self.writer = SummaryWriter(str(self.directory), filename_suffix=f".{self.reopened}")
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(key, value, step)

    def sync(self) -> None:
        """tensorboardX writes from a background queue and its ``flush`` does not wait for it;
        only ``close`` drains it."""
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbTracker:
    """A Weights & Biases run in ``project``, its local files in ``directory/wandb``.

    W&B's own settings come from its environment: ``WANDB_MODE=offline`` logs locally (``wandb
    sync`` uploads later), ``WANDB_ENTITY``, ``WANDB_NAME``, ``WANDB_API_KEY``. A resumed run
    (``start > 0``) continues the W&B run it started, whose id the run directory keeps.

    Raises:
      ValueError: wandb is not installed (``pip install 'llmarch[wandb]'``).
      RuntimeError: W&B refused to start a run (no API key, no network): the message says which.
    """

    name = "wandb"

    def __init__(self, project: str, directory: str | Path, *, config: Mapping[str, Any], start: int = 0):
        try:
            import wandb
        except ImportError:
            raise ValueError(
                f"TrainConfig.wandb={project!r} needs the wandb package: pip install 'llmarch[wandb]'"
            ) from None
        directory = Path(directory)
        id_file = directory / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if start > 0 and id_file.is_file() else None
        try:
            self.run = wandb.init(
                project=project,
                dir=str(directory),
                id=run_id,  # None: a new run, its id made by wandb
                resume="allow",
                config=dict(config),
                settings=wandb.Settings(console="off", silent=True),  # its own lines would cut the bar
            )
        except Exception as e:  # noqa: BLE001  (wandb raises its own kinds: no key, no network)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise RuntimeError(
                f"W&B could not start a run in project {project!r} ({first}); log in with `wandb "
                "login` (or WANDB_API_KEY), or set WANDB_MODE=offline to log locally"
            ) from e
        atomic_write_text(id_file, self.run.id + "\n")
        self.offline = self.run.settings.mode in ("offline", "dryrun")
        local = Path(self.run.dir).parent  # <directory>/wandb/<offline-)run-<time>-<id>
        self.location = (
            f"{local} (offline: `wandb sync {local}` uploads it)" if self.offline else self.run.url
        )

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.run.log(scalars(metrics), step=step)

    def sync(self) -> None:
        pass  # W&B's service process owns the files; finish() is the only drain

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class Trackers:
    """Several trackers as one: each call goes to every one of them, in order."""

    def __init__(self, trackers: Sequence[Tracker] = ()):
        self.trackers = list(trackers)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log(step, metrics)

    def sync(self) -> None:
        for t in self.trackers:
            t.sync()

    def close(self) -> None:
        errors = []
        for t in self.trackers:  # every one is closed, even after one fails
            try:
                t.close()
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        if errors:
            raise errors[0]

    def locations(self) -> dict[str, str]:
        """``{name: where its records are}``, for the run's summary."""
        return {t.name: t.location for t in self.trackers}


def open_trackers(cfg, out: Path, *, start: int, config: Mapping[str, Any] | None = None) -> Trackers:
    """The trackers that ``cfg`` (a ``TrainConfig``) asks for, opened at ``start`` in ``out``: the
    JSONL file always, TensorBoard unless ``cfg.tensorboard`` is off, W&B when ``cfg.wandb`` names
    a project (``config``: the run's settings, shown with it). None on processes other than 0."""
    if not logs.is_main_process():
        return Trackers()
    opened = Trackers([JsonlTracker(out, start=start)])
    try:
        if cfg.tensorboard:
            opened.trackers.append(TensorBoardTracker(out, start=start))
        if cfg.wandb is not None:
            opened.trackers.append(WandbTracker(cfg.wandb, out, config=config or {}, start=start))
    except BaseException:
        opened.close()
        raise
    return opened
