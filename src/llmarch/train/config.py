"""``TrainConfig``: every setting of a training run, checked when it is made (before anything is
loaded or compiled), stored as ``train_config.json`` in the run so a rerun continues it."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

from llmarch import presets, sharding
from llmarch.checks import INT32_MAX, check_int, check_number
from llmarch.config import ModelConfig
from llmarch.data.augment_epochs import AugmentConfig
from llmarch.data.clean import CleanConfig
from llmarch.distill.config import DistillConfig
from llmarch.json_config import dataclass_from_dict
from llmarch.lora.config import LoraConfig
from llmarch.pipeline_schedule import check_schedule_args
from llmarch.train import run_dir
from llmarch.train.optim import OptimizerConfig
from llmarch.train.precision import FP8_HISTORY, FP8_MAX_HISTORY, policy
from llmarch.train.profile import parse_profile_steps
from llmarch.train.step import DEFAULT_LOSS_CHUNK, check_loss_chunk

NAN_POLICIES = ("skip", "stop")
DATA_FORMATS = ("text", "chat")
_check = functools.partial(check_number, "TrainConfig")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    out_dir: str
    preset: str = "tiny-dense"
    model: ModelConfig | None = None  # overrides the preset when given
    data: str = "default"  # "default", a text file, a directory of texts, or JSONL
    text_field: str = "text"
    tokenizer: str = "byte"  # "byte" or a tokenizer.json
    seq_len: int = 128
    batch_size: int = 16  # global, across all devices and processes
    steps: int = 300
    seed: int = 0
    val_fraction: float = 0.05
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    optimizer: OptimizerConfig = OptimizerConfig()
    precision: str = "float32"
    # Steps of amax history behind precision="fp8-delayed"'s per-tensor scales (ignored otherwise).
    fp8_history: int = FP8_HISTORY
    z_loss: float = 0.0
    # Vocabulary entries per step of the fused cross entropy (the [B,T,V] logits never exist,
    # see llmarch.train.step.token_losses); None: the plain loss over the whole logits.
    loss_chunk: int | None = DEFAULT_LOSS_CHUNK
    # DeepSeek-V3's multi-token prediction, for a model with ModelConfig.mtp_depth > 0: the loss adds
    # λ · mean over depths of the MTP losses (llmarch.train.step.mtp_losses), λ = mtp_loss_weight,
    # and from step mtp_loss_weight_step on, mtp_loss_weight_later (the report: 0.3, then 0.1 for
    # the last third of its tokens). Both 0: the MTP modules are not trained (nor run).
    mtp_loss_weight: float = 0.3
    mtp_loss_weight_later: float | None = None
    mtp_loss_weight_step: int | None = None
    nan_policy: str = "skip"  # skip the update and count it, or stop with an error
    max_skipped_fraction: float = 0.1  # more skipped steps than this share of `steps`: the run fails
    resume: str = "auto"  # auto, must, never, fallback: see llmarch.train.run_dir.start_step
    mesh: str | None = None
    rules: str = "fsdp"
    # Pipeline parallelism, used when the mesh has stage > 1 (llmarch.pipeline): the schedule
    # ("gpipe", "1f1b", "interleaved"), microbatches per step (None: twice the stages) and chunks
    # per device (virtual stages, "interleaved" only).
    pipeline_schedule: str = "1f1b"
    pipeline_microbatches: int | None = None
    pipeline_virtual: int = 1
    tensorboard: bool = True
    progress: bool = True
    peak_flops: float | None = None  # per device; None: from the device kind if known
    # Fine-tuning: a fresh run starts from this checkpoint's weights (an llmarch run or a Hugging
    # Face directory) instead of random ones; the model config is the source's (see
    # llmarch.sources.train, which loads it; the trainer alone cannot reach Hugging Face).
    init_from: str | None = None
    # Weight entries that are zero stay zero through training (a pruned model's masks).
    # None: as the init_from run says (llmarch prune writes True), False without one.
    keep_sparsity: bool | None = None
    distill: DistillConfig | None = None  # train against a teacher (llmarch.distill)
    # LoRA/QLoRA: train adapters on a frozen base (init_from's, or the seed's), llmarch.lora.
    lora: LoraConfig | None = None
    # "text": documents (text_field of JSONL records); "chat": JSONL {"messages": [{"role", "content"}]}
    # rendered by a chat template, the loss on the assistant's tokens only (llmarch.data.chat).
    data_format: str = "text"
    # chat: a Jinja template file; None: the tokenizer's own (tokenizer_config.json or
    # chat_template.jinja beside its tokenizer.json), else llmarch.data.chat.DEFAULT_TEMPLATE.
    chat_template: str | None = None
    # "A:B": a jax.profiler trace of steps A to B-1 in <out_dir>/profile (llmarch.train.profile)
    profile_steps: str | None = None
    # A Weights & Biases project to log to besides metrics.jsonl/TensorBoard (llmarch.train.trackers;
    # needs the wandb extra; WANDB_MODE=offline logs locally).
    wandb: str | None = None
    # Cleaning of the corpus before the split: deduplication, quality filters (llmarch.data.clean).
    clean: CleanConfig | None = None
    # EDA augmentation of each training epoch's documents (llmarch.data.augment_epochs).
    augment: AugmentConfig | None = None

    def __post_init__(self):
        for name in (
            "seq_len",
            "batch_size",
            "steps",
            "eval_every",
            "eval_batches",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            check_int("TrainConfig", name, getattr(self, name), high=INT32_MAX)
        check_int("TrainConfig", "seed", self.seed, low=0, high=2**32 - 1)  # numpy's seed range
        check_int("TrainConfig", "fp8_history", self.fp8_history, low=1, high=FP8_MAX_HISTORY)
        for name in ("out_dir", "preset", "data", "text_field", "tokenizer", "precision", "rules"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"TrainConfig.{name}={value!r} is invalid: must be a non-empty string")
        for name in ("tensorboard", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"TrainConfig.{name}={getattr(self, name)!r} is invalid: must be True or False"
                )
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
            raise ValueError(
                f"TrainConfig.init_from={self.init_from!r} is invalid: must be a checkpoint directory or None"
            )
        if self.keep_sparsity is not None and not isinstance(self.keep_sparsity, bool):
            raise ValueError(
                f"TrainConfig.keep_sparsity={self.keep_sparsity!r} is invalid: must be True, False or None"
            )
        if self.distill is not None and not isinstance(self.distill, DistillConfig):
            raise ValueError(
                f"TrainConfig.distill={self.distill!r} is invalid: must be a DistillConfig or None"
            )
        if self.distill is not None and self.distill.prompt_tokens(self.seq_len) >= self.seq_len:
            raise ValueError(
                f"DistillConfig.prompt_len={self.distill.prompt_len} is invalid: must be shorter than "
                f"TrainConfig.seq_len={self.seq_len}"
            )
        for name, kind in (("clean", CleanConfig), ("augment", AugmentConfig)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                allowed = f"must be a {kind.__name__} or None"
                raise ValueError(f"TrainConfig.{name}={value!r} is invalid: {allowed}")
        self._check_lora_and_chat()
        if self.model is not None and not isinstance(self.model, ModelConfig):
            raise ValueError(f"TrainConfig.model={self.model!r} is invalid: must be a ModelConfig or None")
        if not isinstance(self.optimizer, OptimizerConfig):
            raise ValueError(
                f"TrainConfig.optimizer={self.optimizer!r} is invalid: must be an OptimizerConfig"
            )
        _check("z_loss", self.z_loss, "must be a finite number >= 0", lambda x: x >= 0)
        check_loss_chunk("TrainConfig", self.loss_chunk)
        self._check_mtp()
        _check("val_fraction", self.val_fraction, "must be in (0, 1)", lambda x: 0 < x < 1)
        _check("max_skipped_fraction", self.max_skipped_fraction, "must be in [0, 1]", lambda x: 0 <= x <= 1)
        if self.peak_flops is not None:
            _check(
                "peak_flops",
                self.peak_flops,
                "must be a finite number > 0 (FLOP/s per device), or None",
                lambda x: x > 0,
            )
        if self.profile_steps is not None:
            parse_profile_steps(self.profile_steps, steps=self.steps)
        if self.wandb is not None and (not isinstance(self.wandb, str) or not self.wandb.strip()):
            raise ValueError(
                f"TrainConfig.wandb={self.wandb!r} is invalid: must be a W&B project name, or None"
            )
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(
                f"TrainConfig.nan_policy={self.nan_policy!r} is unknown; allowed: {NAN_POLICIES}"
            )
        if self.mesh is not None and (not isinstance(self.mesh, str) or not self.mesh):
            raise ValueError(
                f"TrainConfig.mesh={self.mesh!r} is invalid: must be a mesh spec such as "
                "'data=2,fsdp=4', or None"
            )
        if self.optimizer.grad_accum_steps > self.steps:
            raise ValueError(
                f"OptimizerConfig.grad_accum_steps={self.optimizer.grad_accum_steps} exceeds "
                f"TrainConfig.steps={self.steps}: no update would ever be applied"
            )
        if self.resume not in run_dir.RESUME_MODES:
            raise ValueError(
                f"TrainConfig.resume={self.resume!r} is unknown; allowed: {run_dir.RESUME_MODES}"
            )
        if self.model is None and self.preset not in presets.names():
            raise ValueError(f"TrainConfig.preset={self.preset!r} is unknown; allowed: {presets.names()}")
        if policy(self.precision).fp8 is not None and self.lora is not None:  # LoRA layers bypass FP8
            raise ValueError(f"TrainConfig.precision={self.precision!r} is invalid with lora: use 'bf16'")
        sharding.rules(self.rules)
        stages = 1 if self.mesh is None else sharding.parse_mesh_spec(self.mesh).get("stage", 1)
        check_schedule_args(  # against the mesh's stages, m defaulting as llmarch.pipeline's (2p)
            self.pipeline_schedule,
            stages,
            2 * stages if self.pipeline_microbatches is None else self.pipeline_microbatches,
            self.pipeline_virtual,
            owner="TrainConfig.pipeline_",
        )
        if self.mesh is not None:
            if stages > 1 and policy(self.precision).fp8 == "delayed":  # one call per microbatch
                raise ValueError(
                    f"TrainConfig.precision='fp8-delayed' is invalid with a pipeline (mesh={self.mesh!r}): "
                    "each layer runs once per microbatch, and its amax histories would be summed; "
                    "use 'fp8' or 'fp8-tensor'"
                )
        if self.model is None and self.init_from is not None:
            return  # the model is the source's: checked once llmarch.sources.train has read it
        cfg = self.model_config()
        if self.seq_len > cfg.max_seq_len:
            raise ValueError(
                f"TrainConfig.seq_len={self.seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}"
            )

    def _check_mtp(self) -> None:
        _check("mtp_loss_weight", self.mtp_loss_weight, "must be a finite number >= 0", lambda x: x >= 0)
        later, switch = self.mtp_loss_weight_later, self.mtp_loss_weight_step
        if later is not None:
            _check("mtp_loss_weight_later", later, "must be a finite number >= 0, or None", lambda x: x >= 0)
        if switch is not None:
            check_int("TrainConfig", "mtp_loss_weight_step", switch, high=INT32_MAX)
        if (later is None) != (switch is None):
            raise ValueError(
                f"TrainConfig.mtp_loss_weight_later={later!r} and mtp_loss_weight_step={switch!r} are "
                "invalid: give both (the weight and the step it starts at) or neither"
            )

    def mtp_weight(self, step: int) -> float:
        """λ of multi-token prediction at ``step`` (1-based): ``mtp_loss_weight``, then
        ``mtp_loss_weight_later`` from ``mtp_loss_weight_step`` on."""
        if self.mtp_loss_weight_step is not None and step >= self.mtp_loss_weight_step:
            return float(self.mtp_loss_weight_later)
        return float(self.mtp_loss_weight)

    def check_mtp_training(self) -> None:
        """Refuses runs that would give the model's MTP modules no loss yet still change them
        (AdamW's weight decay shrinks every parameter it holds, gradient or not), or train the
        decoder through MTP modules frozen at their first values (LoRA adapts the decoder only)."""
        depth = self.model_config().mtp_depth
        if not depth:
            return
        if self.lora is not None:
            raise ValueError(
                f"TrainConfig.lora with a model of mtp_depth={depth}: LoRA adapts the decoder only, so "
                "its MTP modules would stay frozen while their loss trains the adapters; allowed: "
                "mtp_depth=0 (--model.mtp-depth 0), or full fine-tuning"
            )
        why = None
        if self.distill is not None:
            why = "distillation trains the main output head only"
        elif not self.mtp_loss_weight and not self.mtp_loss_weight_later:
            why = f"TrainConfig.mtp_loss_weight={self.mtp_loss_weight} gives them no loss"
        elif self.mtp_loss_weight_later == 0:
            why = "TrainConfig.mtp_loss_weight_later=0 ends their loss"
        if why is not None:
            raise ValueError(
                f"the model has mtp_depth={depth} multi-token-prediction modules and {why}, yet weight "
                "decay would still change them; allowed: mtp_depth=0 (--model.mtp-depth 0), or an MTP "
                "loss weight > 0 throughout, without distill"
            )

    def trains_mtp(self, model: ModelConfig) -> bool:
        """Whether the train step runs ``model``'s MTP modules: it has some, some λ is > 0, and the
        objective is the plain one (distillation trains the main head only)."""
        weights = (self.mtp_loss_weight, self.mtp_loss_weight_later or 0.0)
        return model.mtp_depth > 0 and any(weights) and self.distill is None

    def _check_lora_and_chat(self) -> None:
        if self.lora is not None and not isinstance(self.lora, LoraConfig):
            raise ValueError(f"TrainConfig.lora={self.lora!r} is invalid: must be a LoraConfig or None")
        if self.lora is not None and self.keep_sparsity:
            raise ValueError(
                "TrainConfig.keep_sparsity=True is invalid with lora: the adapters' B starts at zero and "
                "the merged weights are dense; set keep_sparsity to false"
            )
        if self.data_format not in DATA_FORMATS:
            raise ValueError(
                f"TrainConfig.data_format={self.data_format!r} is unknown; allowed: {DATA_FORMATS}"
            )
        if self.chat_template is not None and (
            not isinstance(self.chat_template, str) or not self.chat_template.strip()
        ):
            raise ValueError(
                f"TrainConfig.chat_template={self.chat_template!r} is invalid: must be a Jinja file or None"
            )
        if self.data_format != "chat" and self.chat_template is not None:
            raise ValueError(
                f"TrainConfig.chat_template={self.chat_template!r} applies to data_format='chat' only"
            )
        if self.data_format == "chat":
            if self.data == "default":
                raise ValueError(
                    "TrainConfig.data='default' is invalid with data_format='chat': give a JSONL file of "
                    '{"messages": [...]} records'
                )
            for name in ("clean", "augment"):
                if getattr(self, name, None) is not None:
                    raise ValueError(
                        f"TrainConfig.{name} applies to text documents, not to data_format='chat'"
                    )

    def model_config(self) -> ModelConfig:
        cfg = self.model if self.model is not None else presets.get(self.preset)
        return policy(self.precision).apply(cfg)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, data)

    def resolved(self) -> TrainConfig:
        """The same run with its paths absolute, as it is stored: ``eval`` and ``generate`` then
        work from any directory."""

        def absolute(value: str, keep: tuple[str, ...]) -> str:
            return value if value in keep or not Path(value).exists() else str(Path(value).resolve())

        return dataclasses.replace(
            self,
            out_dir=str(Path(self.out_dir).resolve()),
            data=absolute(self.data, ("default",)),
            tokenizer=absolute(self.tokenizer, ("byte",)),
            chat_template=None if self.chat_template is None else absolute(self.chat_template, ()),
        )
