"""The flags of the commands that train (``llmarch train``, ``llmarch distill``), one for every
TrainConfig field (``llmarch.cli_config``), and the ``TrainConfig`` they make: ``--config`` (YAML or
JSON), then the run's own stored settings when ``--out`` already holds a run (so ``llmarch train
--out RUN --steps N`` continues it), then the flags."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib


def _spec(kind: str):
    """An argparse type: a ``--clean`` or ``--augment`` word list as its config's JSON fields."""

    def parse(text: str) -> dict:
        from llmarch.data import AugmentConfig, CleanConfig

        try:
            cfg = (CleanConfig if kind == "clean" else AugmentConfig).from_spec(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return {**dataclasses.asdict(cfg), **({"ops": list(cfg.ops)} if kind == "augment" else {})}

    parse.__name__ = kind
    return parse


# Short names and help of `llmarch train` flags: (flag, TrainConfig field path, type, help). Every
# field has its own flag anyway (add_train_flags); an entry for a field adds an alias and its help (the
# type is the field's), an entry for a section (--clean) is a flag of its own with this type.
TRAIN_FLAGS = [
    ("--out", "out_dir", str, "output directory: checkpoints, metrics.jsonl, tensorboard/"),
    ("--preset", "preset", str, "model preset (see `llmarch presets`)"),
    ("--data", "data", str, "'default', a text file, a directory of texts, or a .jsonl file"),
    ("--text-field", "text_field", str, "the text field of JSONL records"),
    ("--tokenizer", "tokenizer", str, "'byte' or a tokenizer.json"),
    ("--steps", "steps", int, "training steps"),
    ("--seq-len", "seq_len", int, "tokens per row"),
    ("--batch-size", "batch_size", int, "global batch size in rows"),
    ("--seed", "seed", int, "seed of the model, data order and RNG"),
    ("--mesh", "mesh", str, "device mesh, e.g. data=2,fsdp=4"),
    ("--rules", "rules", str, "sharding rules preset (llmarch.sharding)"),
    ("--precision", "precision", str, "mixed-precision policy (llmarch.train.precision)"),
    ("--fp8-history", "fp8_history", int, "amax history steps of --precision fp8-delayed"),
    ("--eval-every", "eval_every", int, "steps between evaluations"),
    ("--eval-batches", "eval_batches", int, "validation batches per evaluation"),
    ("--log-every", "log_every", int, "steps between metric records"),
    ("--checkpoint-every", "checkpoint_every", int, "steps between checkpoints"),
    ("--keep-checkpoints", "keep_checkpoints", int, "checkpoints kept"),
    ("--z-loss", "z_loss", float, "z-loss coefficient"),
    (
        "--loss-chunk",
        "loss_chunk",
        int,
        "vocabulary entries per step of the fused cross entropy; null: the plain loss over all logits",
    ),
    ("--nan-policy", "nan_policy", str, "skip or stop on a non-finite step"),
    (
        "--max-skipped-fraction",
        "max_skipped_fraction",
        float,
        "fail the run once more than this share of its steps were skipped",
    ),
    (
        "--resume",
        "resume",
        str,
        "auto: continue from the newest checkpoint if any (default); must: fail "
        "without one; never: fail if one exists; fallback: set corrupted checkpoints aside and continue "
        "from the newest intact one",
    ),
    ("--val-fraction", "val_fraction", float, "held-out fraction of the corpus"),
    ("--peak-flops", "peak_flops", float, "peak FLOP/s per device for MFU"),
    (
        "--init-from",
        "init_from",
        str,
        "fine-tune: start from this run's or Hugging Face checkpoint's weights",
    ),
    (
        "--profile-steps",
        "profile_steps",
        str,
        "A:B: write a jax.profiler trace of steps A to B-1 to OUT/profile (TensorBoard, Perfetto)",
    ),
    (
        "--clean",
        "clean",
        _spec("clean"),
        "clean the corpus first: a comma list of exact, near (MinHash), dedup (both), gopher "
        "(Gopher's repetition rules), all; counts go to OUT/data_report.json",
    ),
    (
        "--augment",
        "augment",
        _spec("augment"),
        "EDA augmentation of every training epoch: eda (all four) or a comma list of sr, ri, rs, rd",
    ),
    (
        "--wandb",
        "wandb",
        str,
        "also log to this Weights & Biases project (the wandb extra; WANDB_MODE=offline logs locally)",
    ),
    ("--optimizer", "optimizer.name", str, "the optimizer (each as its torch.optim namesake)"),
    ("--lr", "optimizer.learning_rate", float, "peak learning rate"),
    ("--schedule", "optimizer.schedule", str, "learning-rate schedule after the warmup"),
    ("--warmup-steps", "optimizer.warmup_steps", int, "linear warmup steps"),
    ("--weight-decay", "optimizer.weight_decay", float, "weight decay (none on norms and biases)"),
    ("--clip-norm", "optimizer.clip_norm", float, "global gradient-norm clip"),
    ("--grad-accum-steps", "optimizer.grad_accum_steps", int, "micro-steps per update"),
]


# Help for the fields that TRAIN_FLAGS does not describe (the others: their comments in the class).
HELPS = {
    "tensorboard": "write TensorBoard event files too (--no-tensorboard: metrics.jsonl only)",
    "keep_sparsity": "zero weights stay zero (null: as the --init-from run says; on for `llmarch prune`'s)",
    "progress": "show a progress bar",
}
MODEL_DEFAULTS = "the preset's"  # or --init-from's: see _model_base


def train_choices() -> dict[tuple[type, str], tuple[str, ...]]:
    """The values each validated string field allows, for ``--help`` (the classes check them)."""
    from llmarch import config, presets, sharding
    from llmarch.distill.config import LOSSES, DistillConfig
    from llmarch.train import run_dir
    from llmarch.train.config import NAN_POLICIES, TrainConfig
    from llmarch.train.optim import OPTIMIZERS, SCHEDULES, OptimizerConfig
    from llmarch.train.precision import POLICIES

    dtypes = {(config.ModelConfig, f): config.DTYPES for f in ("dtype", "param_dtype", "logits_dtype")}
    return {
        (TrainConfig, "preset"): presets.names(),
        (TrainConfig, "precision"): tuple(sorted(POLICIES)),
        (TrainConfig, "rules"): tuple(sorted(sharding.RULES)),
        (TrainConfig, "nan_policy"): NAN_POLICIES,
        (TrainConfig, "resume"): run_dir.RESUME_MODES,
        (OptimizerConfig, "name"): OPTIMIZERS,
        (OptimizerConfig, "schedule"): SCHEDULES,
        **dtypes,
        (config.ModelConfig, "remat"): config.REMAT_POLICIES,
        (config.ModelConfig, "impl"): config.IMPLS,
        (config.MLAConfig, "path"): config.MLA_PATHS,
        (config.MoEConfig, "router"): config.MOE_ROUTERS,
        (config.MoEConfig, "strategy"): config.MOE_STRATEGIES,
        (config.MemoryConfig, "score"): config.MEMORY_SCORES,
        (DistillConfig, "loss"): LOSSES,
    }


def train_paths() -> set[str]:
    """The ``args`` attributes that hold TrainConfig values: every field path, sections included
    (``--clean`` sets a whole section), and TRAIN_FLAGS' fields."""
    from llmarch.cli_config import walk
    from llmarch.train.config import TrainConfig

    flags, sections = walk(TrainConfig)
    return {f.path for f in flags} | set(sections) | {field for _, field, _, _ in TRAIN_FLAGS}


def add_train_flags(
    parser: argparse.ArgumentParser,
    *,
    names: dict[str, list[str]] | None = None,
    aliases: dict[str, list[str]] | None = None,
    helps: dict[str, str] | None = None,
) -> None:
    """``--config`` and a flag for every TrainConfig field, however nested (``llmarch.cli_config``),
    with TRAIN_FLAGS' short names as aliases (``--out``, ``--lr``); a TRAIN_FLAGS entry for a
    section (``--clean WORDS``) is a flag of its own, with its own type. ``names``: a field's flags
    instead of its own and TRAIN_FLAGS' (distill's ``{"preset": ["--student-preset"]}``);
    ``aliases``: more flags for a field; ``helps``: a field's help, instead of TRAIN_FLAGS' or its
    comment's."""
    from llmarch import cli_config
    from llmarch.train.config import TrainConfig

    names = names or {}
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="a YAML (.yaml, .yml) or JSON (.json) file of TrainConfig fields, nested as the flags "
        "(a `model` without all of ModelConfig's required fields starts from the preset's); flags "
        "override it",
    )
    leaves = {f.path for f in cli_config.walk(TrainConfig)[0]}
    table = {path: list(more) for path, more in (aliases or {}).items()}
    helps = {**HELPS, **(helps or {})}
    own = []  # TRAIN_FLAGS entries that set a whole section (or anything that is not one field)
    for flag, field, kind, text in TRAIN_FLAGS:
        if field in names:
            continue
        helps.setdefault(field, text)
        if field in leaves:
            table.setdefault(field, []).append(flag)
        else:
            own.append((flag, field, kind, text))
    groups = cli_config.add_flags(
        parser,
        TrainConfig,
        aliases=table,
        names=names,
        helps=helps,
        choices=train_choices(),
        from_section={"model": MODEL_DEFAULTS},
    )
    for flag, field, kind, text in own:
        if flag not in parser._option_string_actions:
            group = groups.get(field, parser)
            group.add_argument(flag, dest=field, type=kind, default=argparse.SUPPRESS, help=text)
    add_distributed_flags(parser)


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """How this process joins a multi-process run (``llmarch.train.distributed``): launch settings,
    not the run's, so they are not TrainConfig fields (each process has its own ``--process-id``)."""
    group = parser.add_argument_group(
        "multi-process (jax.distributed; every process runs the same command)",
        "Without these flags, a launcher's environment (SLURM srun, Open MPI, Cloud TPU VMs; not "
        "Kubernetes) is detected as jax.distributed.initialize() detects it; with neither, one process.",
    )
    group.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address and a free port")
    group.add_argument("--num-processes", type=int, metavar="N", help="how many processes take part")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0 to N-1")
    group.add_argument(
        "--no-distributed-detect",
        dest="distributed_detect",
        action="store_false",
        help="do not read a launcher's environment: one process unless the flags above are given",
    )


def start_distributed(args: argparse.Namespace) -> bool:
    """Joins a multi-process run as ``add_distributed_flags``' flags (or the launcher's environment)
    say, before anything starts jax; False for commands without those flags and single-process runs."""
    if not hasattr(args, "distributed_detect"):
        return False
    from llmarch.train import distributed

    launch = distributed.Launch(
        coordinator=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        detect=args.distributed_detect,
    )
    return distributed.start(launch)


def _model_base(data: dict) -> dict:
    """The model a partial ``model`` override starts from: ``init_from``'s, else the preset's."""
    from llmarch import presets
    from llmarch.train.config import TrainConfig

    if data.get("init_from"):
        from llmarch.sources import source

        return dataclasses.asdict(source(data["init_from"], what="--init-from").cfg)
    name = data.get("preset", TrainConfig.__dataclass_fields__["preset"].default)
    if name not in presets.names():
        raise ValueError(f"TrainConfig.preset={name!r} is unknown; allowed: {presets.names()}")
    return dataclasses.asdict(presets.get(name))


def train_config(args: argparse.Namespace, extra: dict | None = None):
    """The TrainConfig of ``--config`` (YAML or JSON), then of the run's stored settings when
    ``--out`` holds a run and no ``--config`` is given, then of the flags (``add_train_flags``).
    Flags under ``model.`` (and a ``model`` in the file that lacks required fields) change the
    preset's model, or ``--init-from``'s, field by field. ``extra``: sections set by other flags,
    merged over the rest."""
    from llmarch import cli_config
    from llmarch.config import ModelConfig
    from llmarch.json_config import read_json
    from llmarch.run_format import CONFIG_FILE
    from llmarch.train.config import TrainConfig

    flags = cli_config.given(args, train_paths())
    config = getattr(args, "config", None)
    data: dict = {}
    if config:
        try:
            data = cli_config.read_config(config, TrainConfig)
        except ValueError as e:
            raise ValueError(f"--config {e}") from None
    out_dir = flags.get("out_dir")
    if not config and out_dir and (pathlib.Path(out_dir) / CONFIG_FILE).is_file():
        # An existing run continues with its own settings; flags that differ still fail the resume.
        data = read_json(pathlib.Path(out_dir) / CONFIG_FILE)
        if "preset" in flags:
            data["model"] = None  # the preset flag names the model: let the resume compare it
    data = cli_config.merge(data, {p: v for p, v in flags.items() if "." not in p})
    model = data.get("model")
    if isinstance(model, dict) and cli_config.missing_required(ModelConfig, model):
        data["model"] = cli_config.deep_update(_model_base(data), model)
    nested = {p: v for p, v in flags.items() if "." in p}
    data = cli_config.merge(data, nested, lambda section: _model_base(data) if section == "model" else None)
    for key, section in (extra or {}).items():
        data[key] = {**(data.get(key) or {}), **section}
    if data.get("init_from") and "tokenizer" not in data:  # the weights' own tokenizer
        from llmarch.sources import source

        data["tokenizer"] = source(data["init_from"], what="--init-from").tokenizer or "byte"
    if "out_dir" not in data:
        raise ValueError("an output directory is required: --out DIR (or out_dir in --config)")
    try:
        return TrainConfig.from_dict(data)
    except ValueError as e:
        raise ValueError(f"--config {config}: {e}" if config else str(e)) from None


# `llmarch train --task shapes-captions`: the TrainConfig flags it takes, as ShapesRunConfig fields.
SHAPES_FLAGS = {
    "out_dir": "out_dir",
    "steps": "steps",
    "batch_size": "batch_size",
    "seed": "seed",
    "log_every": "log_every",
    "optimizer.learning_rate": "learning_rate",
    "optimizer.warmup_steps": "warmup_steps",
    "optimizer.weight_decay": "weight_decay",
    "optimizer.clip_norm": "clip_norm",
}


def shapes_run_config(args: argparse.Namespace):
    """The ``ShapesRunConfig`` of ``llmarch train --task shapes-captions``'s flags; any other training
    flag (a preset, data, a mesh, ...) is refused by name rather than ignored."""
    from llmarch import cli_config
    from llmarch.vision.captioning import ShapesRunConfig

    flags = cli_config.given(args, train_paths())
    if getattr(args, "config", None):
        raise ValueError("--config does not apply to --task shapes-captions: give its settings as flags")
    flag = {field: name for name, field, _, _ in TRAIN_FLAGS}
    named = lambda path: flag.get(path, "--" + path.replace("_", "-"))  # noqa: E731
    other = sorted(named(p) for p in set(flags) - set(SHAPES_FLAGS))
    if other:
        allowed = ", ".join(named(p) for p in SHAPES_FLAGS)
        raise ValueError(f"--task shapes-captions does not take {', '.join(other)}; it takes: {allowed}")
    if "out_dir" not in flags:
        raise ValueError("an output directory is required: --out DIR")
    return ShapesRunConfig(**{SHAPES_FLAGS[path]: value for path, value in flags.items()})
