"""The trainer: data, model, optimizer and checkpoints wired into one resumable loop.

``train(TrainConfig(...))`` trains on one device or on a mesh (``mesh="data=2,fsdp=4"``),
evaluates on the held-out split, logs metrics as JSON lines and TensorBoard scalars, and saves
everything needed to continue (parameters, optimizer, step, RNG, data-iterator position) every
``checkpoint_every`` steps. Run it again with the same ``out_dir`` and it resumes from the
latest checkpoint: the resumed run sees exactly the batches and computes exactly the losses
that an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from llmarch import accounting, logs, lora, pipeline, sharding
from llmarch.data import (
    PackedRows,
    make_batches,
)
from llmarch.model import Transformer
from llmarch.run_format import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    DATA_REPORT_FILE,
)
from llmarch.train import distributed, run_dir
from llmarch.train import metrics as metrics_lib
from llmarch.train import summary as summary_lib
from llmarch.train.checkpoint import Checkpointer, CheckpointError, atomic_write_text
from llmarch.train.config import TrainConfig
from llmarch.train.data import RunData, load_data, load_rows  # noqa: F401 (load_rows: readers import it here)
from llmarch.train.distill_step import distill_objective
from llmarch.train.guard import RunHealth, TrainingError, TrainingInterrupted, all_finite
from llmarch.train.heldout import make_evaluator, to_global
from llmarch.train.interrupt import graceful_stop
from llmarch.train.optim import build_optimizer, learning_rate_schedule
from llmarch.train.precision import policy
from llmarch.train.profile import StepProfiler
from llmarch.train.state import TrainState
from llmarch.train.step import (
    make_train_step,
)
from llmarch.train.trackers import open_trackers

Sampler = Callable[[Any, np.ndarray, int, int], np.ndarray]
logger = logging.getLogger(__name__)
_all_finite = jax.jit(all_finite)


def _reporters(log: Callable[[str], None] | None, main: bool):
    """``(info, warning)``: this module's logger, or the ``log`` callable given for both (a warning
    marked as one). Only process 0 reports progress; every process reports its warnings."""
    info, warning = (logger.info, logger.warning) if log is None else (log, lambda m: log(f"WARNING: {m}"))
    return (info if main else lambda message: None), warning


@dataclasses.dataclass
class TrainResult:
    step: int
    losses: dict[int, float]  # step -> training loss of that step (this invocation's steps)
    val_loss: float | None
    skipped_steps: int
    params: nnx.State
    rest: nnx.State
    graphdef: nnx.GraphDef
    train_rows: PackedRows
    frozen: nnx.State | None = None  # a LoRA run's base (``params`` are its adapters)

    def model(self) -> Transformer:
        """The trained model (a LoRA run's with its adapters: ``llmarch.lora.merge_lora`` merges them)."""
        return nnx.merge(self.graphdef, self.params, self.rest, *[self.frozen] * (self.frozen is not None))


def _fingerprint(rows: PackedRows) -> str:
    """A digest of the token stream the run trains or validates on: a resume on a corpus (or
    tokenizer) changed under the same path is caught, not silently trained on."""
    return hashlib.blake2b(np.ascontiguousarray(rows.tokens).tobytes(), digest_size=16).hexdigest()


def _lora_rngs(cfg: TrainConfig) -> nnx.Rngs:
    """The adapters' initialization: drawn from the run's seed, apart from the model's."""
    return nnx.Rngs(params=jax.random.fold_in(jax.random.key(cfg.seed), 0x10BA))


def init_state(cfg: TrainConfig, mesh: jax.sharding.Mesh | None):
    """``(graphdef, tx, state)``: a fresh ``TrainState``, sharded on ``mesh`` by ``cfg.rules``.

    With ``cfg.lora`` the model carries adapters (``llmarch.lora.apply_lora``): ``state.params``
    are the adapters alone (the optimizer's state is theirs) and ``state.frozen`` the base."""
    frozen = None
    table = cfg.rules  # a pipeline's stages hold their own layers (and their optimizer state)
    if mesh is not None and mesh.shape[pipeline.STAGE] > 1:
        table = sharding.with_stage_layers(cfg.rules)
    with sharding.use(mesh, table) if mesh is not None else contextlib.nullcontext():
        model = Transformer(cfg.model_config(), rngs=nnx.Rngs(cfg.seed))
    # FP8 policies switch the blocks' linears (static); fp8-delayed adds their amax histories
    policy(cfg.precision, fp8_history=cfg.fp8_history).prepare(model)
    if cfg.lora is None:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    else:  # adapted (and QLoRA's base quantized) off the mesh, then placed by the same rules
        with nnx.use_eager_sharding(False):
            model = lora.apply_lora(model, cfg.lora, rngs=_lora_rngs(cfg))
        graphdef, params, frozen, rest = lora.split(model)
        if mesh is not None:
            params, frozen, rest = (sharding.shard_state(s, mesh, table) for s in (params, frozen, rest))
    tx = build_optimizer(cfg.optimizer, cfg.steps, model=cfg.model_config())  # + e.g. UltraMem's value LR
    state = TrainState(
        params=params,
        rest=rest,
        opt_state=tx.init(params),
        step=jnp.int32(0),
        rng=jax.random.key_data(jax.random.key(cfg.seed)),
        skipped=jnp.int32(0),
        frozen=frozen,
    )
    if mesh is None:  # committed, like every later step's outputs and a loaded teacher's
        # weights: a step fed committed and uncommitted arrays at once would compile twice
        return graphdef, tx, jax.device_put(state, jax.devices()[0])
    if mesh is not None:  # scalars (step counts, RNG) are born on one device: replicate them
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        on_mesh = lambda x: isinstance(x.sharding, jax.sharding.NamedSharding)  # noqa: E731
        state = jax.tree.map(lambda x: x if on_mesh(x) else jax.device_put(x, replicated), state)
    return graphdef, tx, state


def _place(new, old):
    new = jnp.asarray(new)
    if new.shape != old.shape:
        raise ValueError(f"init_from weights of shape {new.shape} do not fit this run's {old.shape}")
    return jax.device_put(new.astype(old.dtype), old.sharding)


def start_from(state: TrainState, tx, params: nnx.State, rest: nnx.State) -> TrainState:
    """``state`` starting from the weights ``params``/``rest`` (laid out like its own), with a
    fresh optimizer state for them."""
    try:
        params = jax.tree.map(_place, params, state.params)
        rest = jax.tree.map(_place, rest, state.rest)
    except ValueError as e:  # a tree mismatch: the source is another architecture
        raise ValueError(f"TrainConfig.init_from's weights do not fit this run's model: {e}") from None
    return dataclasses.replace(state, params=params, rest=rest, opt_state=tx.init(params))


def with_lora_base(
    cfg: TrainConfig, state: TrainState, params: nnx.State, rest: nnx.State, *, fresh: bool
) -> TrainState:
    """A LoRA run's ``state`` whose frozen base is the plain model weights ``params``/``rest``
    (``init_from``'s), adapted (and, QLoRA, quantized) as ``cfg.lora`` says; ``fresh``: also its
    ``rest`` (a new run), else the checkpoint's ``rest`` is kept (a resumed run). The adapters and
    the optimizer state are left as they are."""
    with nnx.use_eager_sharding(False):  # shapes only: nothing is initialized
        plain = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg.model_config(), rngs=nnx.Rngs(0))))
    try:
        model = nnx.merge(plain, params, rest)
        _, _, frozen, new_rest = lora.split(lora.apply_lora(model, cfg.lora, rngs=_lora_rngs(cfg)))
        frozen = jax.tree.map(_place, frozen, state.frozen)
        new_rest = jax.tree.map(_place, new_rest, state.rest) if fresh else state.rest
    except (ValueError, KeyError) as e:  # a tree mismatch: the source is another architecture
        raise ValueError(f"TrainConfig.init_from's weights do not fit this run's model: {e}") from None
    return dataclasses.replace(state, frozen=frozen, rest=new_rest)


def _lora_inputs(cfg: TrainConfig, state: TrainState, step: int) -> dict[str, Any]:
    """The train step's LoRA arguments: the frozen base, and the key of this step's dropout (from
    the run's seed and the step, so a resumed run draws the same masks)."""
    if state.frozen is None:
        return {}
    inputs = {"frozen": state.frozen}
    if cfg.lora.dropout:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
        inputs["rng"] = jax.random.key_data(key)
    return inputs


class _OnPolicy:
    """Which steps train on student samples (a fraction λ, drawn from the seed and step so a
    resumed run draws the same), and those batches: each row's first ``prompt_len`` tokens
    continued by the student to the row's length; only the sampled positions count."""

    def __init__(self, cfg: TrainConfig, graphdef: nnx.GraphDef, sampler: Sampler):
        self.fraction, self.seed, self.graphdef, self.sampler = (
            cfg.distill.on_policy_fraction,
            cfg.seed,
            graphdef,
            sampler,
        )
        self.prompt = cfg.distill.prompt_tokens(cfg.seq_len)

    def due(self, step: int) -> bool:
        return bool(np.random.default_rng((self.seed, step)).random() < self.fraction)

    def batch(self, batch: dict[str, np.ndarray], params, rest, step: int) -> dict[str, np.ndarray]:
        inputs = np.asarray(batch["inputs"])
        B, T = inputs.shape
        model = nnx.merge(self.graphdef, params, rest)
        seq = np.asarray(self.sampler(model, inputs[:, : self.prompt], T + 1 - self.prompt, self.seed + step))
        mask = np.zeros_like(batch["mask"])
        mask[:, self.prompt - 1 :] = 1  # targets from position prompt - 1 on were sampled
        positions = np.broadcast_to(np.arange(T, dtype=batch["positions"].dtype), (B, T))
        return {  # one document per row, the same keys and dtypes as a corpus batch
            "inputs": seq[:, :T].astype(batch["inputs"].dtype),
            "targets": seq[:, 1:].astype(batch["targets"].dtype),
            "segment_ids": np.ones_like(batch["segment_ids"]),
            "positions": np.ascontiguousarray(positions),
            "mask": mask,
            "label_weight": np.zeros((B, T), np.float32),
        }


def train(
    cfg: TrainConfig,
    *,
    log: Callable[[str], None] | None = None,
    init: Callable[[], tuple[nnx.State, nnx.State]] | None = None,
    teacher: nnx.Module | None = None,
    sampler: Sampler | None = None,
) -> TrainResult:
    """Trains (or resumes) the run in ``cfg.out_dir``; see the module docstring.

    A run with ``init_from`` or ``distill`` needs what those name, loaded: ``llmarch.sources.train``
    passes them (the trainer sits below the Hugging Face and inference packages).

    Args:
      log: receives every message (warnings prefixed ``WARNING:``); None: they go to the
        ``llmarch.train.trainer`` logger (INFO and WARNING; ``llmarch.logs``).
      init: returns the ``(params, rest)`` a fresh run starts from (``cfg.init_from``'s weights);
        called only when the run does not resume, except by a LoRA run, whose base (not in its
        checkpoints) it also gives when the run resumes.
      teacher: the distillation teacher (``cfg.distill``), run in inference mode.
      sampler: ``sampler(model, prompt [B,P], new_tokens, seed) -> [B,P+new]`` int32 numpy, for
        on-policy distillation steps (``cfg.distill.on_policy_fraction > 0``).

    Raises:
      ValueError, CheckpointError: bad settings, or a run directory that this run cannot use
        (corrupted or mismatching checkpoint, ``resume`` mode not satisfied); nothing is changed.
      RuntimeError: another process is training in ``cfg.out_dir``.
      TrainingError: the run diverged (too many skipped steps, ``nan_policy='stop'``, non-finite
        final weights or validation loss); the checkpoints saved before stay as they were.
      TrainingInterrupted: SIGINT/SIGTERM; a checkpoint of the last finished step was saved.
    """
    cfg = cfg.resolved()
    if cfg.init_from is not None and init is None:
        raise ValueError(
            f"TrainConfig.init_from={cfg.init_from!r} needs its weights: train through "
            "llmarch.sources.train(cfg), which loads them"
        )
    if cfg.init_from is not None and cfg.model is None:
        raise ValueError(
            "TrainConfig.model must be the init_from checkpoint's (llmarch.sources.train fills it)"
        )
    if cfg.distill is not None and teacher is None:
        raise ValueError("TrainConfig.distill needs its teacher: train through llmarch.sources.train(cfg)")
    if cfg.distill is not None and cfg.distill.on_policy_fraction > 0 and sampler is None:
        raise ValueError("TrainConfig.distill.on_policy_fraction > 0 needs a sampler (llmarch.sources.train)")
    cfg.check_mtp_training()
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"TrainConfig.out_dir={str(out)!r} is an existing file: it must be a directory")
    rows = load_data(cfg)  # before the lock creates the directory: bad data leaves nothing behind
    mesh = sharding.make_mesh(cfg.mesh) if cfg.mesh else None
    if mesh is not None and mesh.shape[pipeline.STAGE] > 1:  # refused before anything is built
        pipeline.trainer_objective(cfg, cfg.model_config(), mesh)
    if mesh is None and jax.process_count() > 1:
        raise ValueError(
            f"TrainConfig.mesh=None: a run over {jax.process_count()} processes needs a mesh over all "
            f"{jax.device_count()} devices, e.g. --mesh data={jax.device_count()}"
        )
    # One writer per run directory: process 0 holds the lock for all processes of a run.
    lock = run_dir.lock(out) if logs.is_main_process() else None
    try:
        return _train(cfg, out, rows, mesh, log, init, teacher, sampler)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, out: Path, rows: RunData, mesh, log, init, teacher, sampler) -> TrainResult:
    model_cfg = cfg.model_config()
    main = logs.is_main_process()  # the process that writes files, bars and summaries
    log, warning = _reporters(log, main)
    train_rows, val_rows = rows.train_rows, rows.val_rows
    data_sharding = sharding.batch_sharding(mesh, cfg.rules) if mesh is not None else None
    if cfg.batch_size % jax.process_count():
        raise ValueError(
            f"TrainConfig.batch_size={cfg.batch_size} must divide evenly over {jax.process_count()} processes"
        )
    # This process's block of every batch's rows: the rows its devices hold under the mesh.
    block = (0, 1) if mesh is None else distributed.process_rows(data_sharding, cfg.batch_size, cfg.seq_len)
    train_iter = make_batches(
        rows.train_source,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        process_index=block[0],
        process_count=block[1],
    )
    graphdef, tx, state = init_state(cfg, mesh)
    shardings = (
        jax.tree.map(lambda x: x.sharding, (state.params, state.rest, state.opt_state))
        if mesh is not None
        else None
    )
    teacher_state = None
    objective = None
    if cfg.distill is not None:
        teacher_graphdef, teacher_state = nnx.split(teacher)
        if mesh is not None:  # sharded like the student, by the same rules
            teacher_state = sharding.shard_state(teacher_state, mesh, cfg.rules)

        objective = distill_objective(cfg.distill, teacher_graphdef, z_loss=cfg.z_loss)
    mtp = cfg.trains_mtp(model_cfg)
    if mesh is not None and mesh.shape[pipeline.STAGE] > 1:  # the loss through a pipeline
        objective = pipeline.trainer_objective(cfg, model_cfg, mesh)
    step_fn = make_train_step(
        graphdef,
        tx,
        z_loss=cfg.z_loss,
        donate=True,
        out_shardings=shardings,
        update_rest=True,  # rest: e.g. the MoE expert bias, updated per step
        loss_chunk=cfg.loss_chunk,
        keep_zeros=bool(cfg.keep_sparsity),
        objective=objective,
        mtp_loss_weight=cfg.mtp_loss_weight if mtp else None,
    )
    on_policy = _OnPolicy(cfg, graphdef, sampler) if cfg.distill and cfg.distill.on_policy_fraction else None
    evaluate = make_evaluator(
        graphdef,
        val_rows,
        batch_size=cfg.batch_size,
        batches=cfg.eval_batches,
        data_sharding=data_sharding,
        loss_chunk=cfg.loss_chunk,
        rows_block=block,
    )

    config = run_dir.as_dict(cfg)
    data = {"train_tokens": _fingerprint(train_rows), "val_tokens": _fingerprint(val_rows)}
    ckpt = Checkpointer(out / CHECKPOINTS_DIR, save_every=cfg.checkpoint_every, keep=cfg.keep_checkpoints)
    log_file = None
    bar = None
    profiler = StepProfiler(cfg.profile_steps, out)
    try:
        start = run_dir.start_step(ckpt, cfg.resume, config, data, log=warning)
        if start is not None:
            state = ckpt.restore(start, state, train_iter)
            if cfg.lora is not None and init is not None:  # the base is not in the checkpoint
                state = with_lora_base(cfg, state, *init(), fresh=False)
            log(f"resumed from {ckpt.step_dir(start)}")
        elif init is not None and cfg.lora is not None:
            state = with_lora_base(cfg, state, *init(), fresh=True)
            log(f"starting from the weights of {cfg.init_from}")
        elif init is not None:
            state = start_from(state, tx, *init())
            log(f"starting from the weights of {cfg.init_from}")
        if cfg.lora is not None:
            trained = sum(x.size for x in jax.tree.leaves(state.params))
            base = sum(x.size for x in jax.tree.leaves(state.frozen))
            log(f"LoRA: training {trained:,} adapter parameters; the base's {base:,} stay frozen")
        start = int(state.step)
        if start >= cfg.steps:
            log(
                f"the run is already at step {start}, at or past steps={cfg.steps}: nothing to train "
                "(raise --steps to continue it)"
            )
        # Only now, with a fresh start or a verified restore, is the directory this run's.
        if main:
            atomic_write_text(out / CONFIG_FILE, cfg.to_json() + "\n")
            atomic_write_text(out / DATA_REPORT_FILE, json.dumps(rows.report(), indent=2) + "\n")
        for line in rows.lines():  # what cleaning removed, how the epochs are augmented
            log(line)
        log_file = open_trackers(cfg, out, start=start, config=config)  # JSONL, TensorBoard, W&B

        flops_per_token = accounting.train_flops_per_token(model_cfg, cfg.seq_len, causal=True)
        peak = cfg.peak_flops or metrics_lib.peak_flops(jax.devices()[0].device_kind)
        # The learning rate a step uses, as the optimizer computes it: the schedule counts applied
        # updates (a skipped step applies none; accumulated micro-steps count once).
        accum = cfg.optimizer.grad_accum_steps
        schedule = learning_rate_schedule(cfg.optimizer, cfg.steps // accum or 1)
        # Loss terms with a coefficient of 0 are constants, not curves: logged only when active.
        terms = ("z_loss",) * bool(cfg.z_loss) + ("aux_loss",) * metrics_lib.aux_loss_active(model_cfg)
        terms += ("mtp_loss",) * mtp

        def warn(message: str) -> None:
            with tqdm.external_write_mode():  # above the progress bar, not through it
                warning(message)

        health = RunHealth(cfg.steps, cfg.max_skipped_fraction, warn=warn)
        losses: dict[int, float] = {}
        val_loss = None
        busy, busy_steps = 0.0, 0  # time in train steps since the last record (not eval, not saving)

        def last_good() -> str:
            step = ckpt.latest_step()
            return "no checkpoint exists" if step is None else f"the last checkpoint is {ckpt.step_dir(step)}"

        def save(step: int, state: TrainState) -> None:
            # One program (not an eager op per leaf): with several processes, many small programs
            # in flight at once can each hold the CPU threads another one's collectives wait for.
            if not bool(_all_finite(state)):  # unreachable through the guarded step: never save it
                raise TrainingError(
                    f"step {step}: the train state holds non-finite values; not saved; {last_good()}"
                )
            log_file.sync()  # every point logged so far survives a kill, as the checkpoint does
            try:
                saved = ckpt.save(step, state, train_iter, config=config, data=data, force=True)
                if saved:  # False: this step was saved already
                    logger.debug("saved %s", ckpt.step_dir(step))
            except CheckpointError:
                raise
            except Exception as e:  # e.g. a full disk: the run failed, the settings were fine
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise TrainingError(f"saving {ckpt.step_dir(step)} failed ({first}); {last_good()}") from e

        if start < cfg.steps:
            log(summary_lib.header(cfg, out, start, mesh))
            log(f"compiling the train step (step {start + 1} of {cfg.steps} waits for it)…")
        with graceful_stop(log=warning) as stop:
            for step in range(start + 1, cfg.steps + 1):
                profiler.before(step)
                tick = time.perf_counter()
                batch = next(train_iter)
                sampled = on_policy is not None and on_policy.due(step)
                if sampled:  # GKD: the student's own continuations of the rows' prompts
                    batch = on_policy.batch(batch, state.params, state.rest_and_frozen(), step)
                elif on_policy is not None:
                    batch = {**batch, "label_weight": np.ones(batch["inputs"].shape, np.float32)}
                batch = to_global(batch, data_sharding, block[1])
                params, rest, opt_state, m = step_fn(
                    state.params,
                    state.rest,
                    state.opt_state,
                    batch,
                    teacher_state,
                    **_lora_inputs(cfg, state, step),  # a LoRA run: its frozen base, dropout key
                    **({"mtp_weight": cfg.mtp_weight(step)} if mtp else {}),  # λ's schedule: no recompile
                )
                skipped = state.skipped + (~m["finite"]).astype(jnp.int32)
                state = dataclasses.replace(
                    state,
                    params=params,
                    rest=rest,
                    opt_state=opt_state,
                    step=jax.device_put(np.int32(step), state.step.sharding),  # replicated like the rest
                    skipped=skipped,
                )
                loss = float(m["loss"])  # waits for the step
                if step > start + 1:  # the first step compiles: not throughput
                    busy, busy_steps = busy + time.perf_counter() - tick, busy_steps + 1
                losses[step] = loss
                profiler.after(step, (params, rest, opt_state, m), last=step == cfg.steps)
                finite = bool(m["finite"])
                if not finite and cfg.nan_policy == "stop":
                    raise TrainingError(
                        f"step {step}: the loss ({loss}), gradient norm ({float(m['grad_norm'])}) or "
                        f"update is not finite; stopped without applying it (nan_policy='stop'); "
                        f"{last_good()}. Lower the learning rate, add z_loss, or set nan_policy='skip'"
                    )
                try:
                    health.observe(step, loss, float(m["grad_norm"]), finite, int(skipped))
                except TrainingError as e:
                    raise TrainingError(f"{e}; {last_good()}") from None
                if bar is None:  # started once the first step is done: its ETA leaves out compiling
                    bar = tqdm(
                        total=cfg.steps,
                        initial=step,
                        desc="train",
                        disable=not (cfg.progress and main and logs.show_progress()),
                        mininterval=1.0,
                    )
                else:
                    bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps or stop:
                    applied = step - 1 - (int(skipped) - (not finite))  # updates applied before this step
                    record = {
                        "loss": loss,
                        "perplexity": float(np.exp(min(loss, 50.0))),
                        **{name: float(m[name]) for name in terms},
                        "grad_norm": float(m["grad_norm"]),
                        "skipped": int(skipped),
                        "learning_rate": float(schedule(applied // accum)),
                        **({"distill_loss": float(m["distill_loss"])} if "distill_loss" in m else {}),
                        **({"on_policy": sampled} if on_policy is not None else {}),
                        **metrics_lib.layer_metrics(m),
                    }
                    if busy_steps:  # seconds per step and throughput since the last record
                        record["step_time"] = busy / busy_steps
                        tokens_per_s = busy_steps * cfg.batch_size * cfg.seq_len / busy
                        record["tokens_per_s"] = tokens_per_s
                        if peak:
                            record["mfu"] = accounting.mfu(
                                tokens_per_s / jax.device_count(), flops_per_token, peak
                            )
                    busy, busy_steps = 0.0, 0
                    log_file.log(step, record)
                    bar.set_postfix_str(metrics_lib.progress_text(record), refresh=False)
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    val_loss = evaluate(params, state.rest_and_frozen())
                    log_file.log(
                        step, {"val_loss": val_loss, "val_perplexity": float(np.exp(min(val_loss, 50.0)))}
                    )
                    if not math.isfinite(val_loss):
                        warn(f"step {step}: the validation loss is {val_loss}")
                if step == cfg.steps or step % cfg.checkpoint_every == 0:
                    save(step, state)
                # Checked after saving (the signal may arrive during the save), and by every process
                # at once: a signal that reached one process stops them all after this step.
                if distributed.any_process(bool(stop)):
                    save(step, state)
                    raise TrainingInterrupted(
                        f"stopped by {stop.name or 'a signal to another process'} after step {step}; saved "
                        f"{ckpt.step_dir(step)}; run the same command again to resume",
                        stop.signum or signal.SIGTERM,
                    )
        if val_loss is not None and not math.isfinite(val_loss):
            raise TrainingError(
                f"the run ended with validation loss {val_loss}: the model is broken; {last_good()}"
            )
    finally:
        profiler.close()  # training ended inside the traced steps: keep what was traced
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
        ckpt.close()
    files = {"checkpoints": f"{ckpt.step_dir(int(state.step))} (the latest)", **log_file.locations()}
    files.update(summary_lib.other_files(out, profiler))  # the data report, a profile
    final = losses[max(losses)] if losses else None
    for line in summary_lib.lines(
        out=out,
        step=int(state.step),
        steps=cfg.steps,
        train_loss=final,
        val_loss=val_loss,
        skipped=int(state.skipped),
        files=files,
    ):
        log(line)
    return TrainResult(
        step=int(state.step),
        losses=losses,
        val_loss=val_loss,
        skipped_steps=int(state.skipped),
        params=state.params,
        rest=state.rest,
        graphdef=graphdef,
        train_rows=train_rows,
        frozen=state.frozen,
    )
