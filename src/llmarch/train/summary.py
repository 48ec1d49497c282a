"""What the trainer says around a run: the header before it compiles, and the summary at the end
naming every file written and the final losses."""

from __future__ import annotations

import math
from pathlib import Path

import jax

from llmarch import accounting


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped at ``exp(50)`` so that a diverged run still prints a number."""
    return math.exp(min(loss, 50.0))


def header(cfg, out: Path, start: int, mesh: jax.sharding.Mesh | None) -> str:
    """One line before the first compilation: the model, the devices (``mesh``'s, else one), the
    batch, the steps and where the run goes (``cfg``: a resolved ``TrainConfig``)."""
    model = cfg.model_config()
    name = cfg.preset if cfg.model is None else (model.name or "custom model")
    count = mesh.size if mesh is not None else 1
    where = f"{count} {jax.devices()[0].platform} device{'s' * (count > 1)}"
    if cfg.mesh:
        where += f", mesh {cfg.mesh} ({cfg.rules})"
    origin = f"resuming at step {start}" if start else "from scratch"
    if cfg.init_from and not start:
        origin = f"from {cfg.init_from}"
    params = f"{accounting.param_count(model):,} parameters"
    if model.mtp_depth:  # the main model's, then its multi-token-prediction modules'
        params += f" + {accounting.mtp_param_counts(model).total:,} in {model.mtp_depth} MTP module(s)"
    return (
        f"training {name} ({params}) on {where}: "
        f"{cfg.steps} steps of {cfg.batch_size}×{cfg.seq_len} tokens, {origin}; run directory {out}"
    )


def other_files(out: Path, profiler) -> dict[str, str]:
    """The data report and the profile (``llmarch.train.profile.StepProfiler``), where written."""
    from llmarch.run_format import DATA_REPORT_FILE

    files = {}
    if (out / DATA_REPORT_FILE).is_file():
        files["data report"] = str(out / DATA_REPORT_FILE)
    if profiler.directory is not None:
        first, last = profiler.traced
        files["profile"] = (
            f"{profiler.directory} (steps {first}-{last}: TensorBoard's profile tab; its "
            "perfetto_trace.json.gz opens in ui.perfetto.dev)"
        )
    return files


def lines(
    *,
    out: Path,
    step: int,
    steps: int,
    train_loss: float | None,
    val_loss: float | None,
    skipped: int,
    files: dict[str, str],
) -> list[str]:
    """The end-of-run summary: the final losses (nats/token and perplexity), then one line per
    file or directory written (``files``: ``{what: where}``, in the order given)."""
    parts = []
    if train_loss is not None:
        parts.append(f"train loss {train_loss:.4f} (perplexity {perplexity(train_loss):.2f})")
    if val_loss is not None:
        parts.append(f"validation loss {val_loss:.4f} (perplexity {perplexity(val_loss):.2f})")
    if skipped:
        parts.append(f"{skipped} skipped step{'s' * (skipped > 1)}")
    head = f"finished at step {step} of {steps}" + (f": {', '.join(parts)}" if parts else "")
    width = max(map(len, files), default=0)
    return [head, f"wrote {out}:", *(f"  {name:<{width}}  {where}" for name, where in files.items())]
