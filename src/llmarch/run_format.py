"""The on-disk format of a training run's directory, as ``llmarch train`` writes it.

One home for the names, shared by the writer (``llmarch.train``) and the readers (``eval``,
``generate``, serving in ``llmarch.inference``), so that a reader depends on the format and
not on the trainer. Layout of a run directory::

  train_config.json         the run's configuration, written only once a fresh start or a
                            restore has succeeded (its presence is what makes a run)
  checkpoints/<step>/       one checkpoint per step, sealed by manifest.json, which also
                            stores the configuration it was saved under
  checkpoints_set_aside/    corrupted or unfinished steps moved out of the way, kept to inspect
  metrics.jsonl             one JSON record per logged step
  data_report.json          what cleaning removed (per rule), the augmentation, token counts
  tensorboard/              the same scalars as TensorBoard events
  profile/                  a jax.profiler trace of the steps --profile-steps names, if any
  wandb/, wandb_run_id      the Weights & Biases run's local files and id, with --wandb PROJECT
  .lock                     held while a trainer writes
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_FILE = "train_config.json"
CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"  # inside each checkpoints/<step>/
SET_ASIDE_SUFFIX = "_set_aside"  # checkpoints/ + this: where set-aside steps go
METRICS_FILE = "metrics.jsonl"
DATA_REPORT_FILE = "data_report.json"
TENSORBOARD_DIR = "tensorboard"
PROFILE_DIR = "profile"
WANDB_DIR = "wandb"  # made by wandb itself under the run directory
WANDB_ID_FILE = "wandb_run_id"  # the W&B run a resumed run continues
LOCK_FILE = ".lock"


def is_run(root: Path) -> bool:
    """Whether the directory ``root`` is a training run (it has its ``train_config.json``)."""
    return (root / CONFIG_FILE).is_file()


def existing_dir(path: str | os.PathLike, expected: str, *, what: str = "checkpoint") -> Path:
    """``path`` as a directory, for a reader; ``what`` names it in errors ("checkpoint", "run")
    and ``expected`` says what the directory should hold.

    Raises:
      FileNotFoundError: when ``path`` does not exist or is not a directory.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{what} directory {str(root)!r} does not exist; expected {expected}")
    if not root.is_dir():
        raise FileNotFoundError(f"{what} {str(root)!r} is not a directory; expected {expected}")
    return root
