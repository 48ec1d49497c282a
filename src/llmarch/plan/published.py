"""Published training runs the cost model is checked against (``tests/test_plan.py``,
``experiments/21_plan_published.py``), each with its source.

MaxText's reference runs (github.com/AI-Hypercomputer/maxtext, README "Runtime Performance
Results", the tables as of the commits that carry MaxText/configs/v5e/*.sh and v5p/*.sh): the
model of ``global_parameter_scale=s`` is base.yml's (emb 2048, 16 heads of 128, MLP 7168 SwiGLU,
16 layers, vocabulary 32,000, untied) with ``get_individual_scales(s)`` applied (pyconfig.py: of
log2(s) = 3b + r, heads and MLP scale by 2^(b + (r>0)), width by 2^(b + (r>1)), layers by 2^b),
trained at ``max_target_length=2048`` with the script's ``per_device_batch_size``, remat policy
and ICI parallelism (fsdp over the rest of the slice). The MFU is MaxText's own, whose FLOPs
(before July 2025, when these tables were made) are 6·N_matmul plus non-causal attention;
``train_flops_per_token(causal=True)`` differs from that by under 2% at T=2048 for these widths.
"""

from __future__ import annotations

import dataclasses
import math

from llmarch.config import AttentionConfig, ModelConfig


def maxtext_config(scale: int) -> ModelConfig:
    """MaxText's model at ``global_parameter_scale=scale`` (a power of two), see the module doc."""
    if scale < 1 or 2 ** int(math.log2(scale)) != scale:
        raise ValueError(
            f"scale={scale!r} is invalid: must be a power of two (MaxText's global_parameter_scale)"
        )
    b, r = divmod(int(math.log2(scale)), 3)
    heads_scale, width_scale = b + int(r > 0), b + int(r > 1)
    heads = 16 * 2**heads_scale
    return ModelConfig(
        vocab_size=32_000,
        d_model=2048 * 2**width_scale,
        num_layers=16 * 2**b,
        ffn_dim=7168 * 2**heads_scale,
        attention=AttentionConfig(num_heads=heads, num_kv_heads=heads, head_dim=128),
        max_seq_len=2048,
        dtype="bfloat16",
        name=f"maxtext-{scale}b",
    )


@dataclasses.dataclass(frozen=True)
class PublishedMFU:
    """One measured run: the model, hardware, mesh, per-device batch and remat, and its MFU."""

    scale: int
    hardware: str
    mesh: dict
    per_device_batch: int
    remat: str  # ours closest to the script's remat_policy ('minimal' saves the matmul outputs: dots)
    mfu: float
    source: str


MAXTEXT = (
    # README "TPU v5e" table, row "1x v5e-256": 16B 61.10%, 32B 66.86%; scripts v5e/16b.sh
    # (per_device_batch_size=6, remat_policy=full), v5e/32b.sh (4, full); fsdp over all 256 chips.
    PublishedMFU(16, "tpu-v5e", {"fsdp": 256}, 6, "full", 0.6110, "MaxText README, TPU v5e, 16B, 1x v5e-256"),
    PublishedMFU(32, "tpu-v5e", {"fsdp": 256}, 4, "full", 0.6686, "MaxText README, TPU v5e, 32B, 1x v5e-256"),
    # README "TPU v5p" table: 32B on v5p-128 67.76% (an earlier README: 71.47%), 64B on v5p-128
    # 70.31%; scripts v5p/32b.sh (per_device_batch_size=7, remat_policy=minimal,
    # ici_tensor_parallelism=4, fsdp the rest), v5p/64b.sh (3, minimal, tensor 4).
    PublishedMFU(
        32, "tpu-v5p", {"fsdp": 16, "tensor": 4}, 7, "dots", 0.6776, "MaxText README, TPU v5p, 32B, v5p-128"
    ),
    PublishedMFU(
        64, "tpu-v5p", {"fsdp": 16, "tensor": 4}, 3, "dots", 0.7031, "MaxText README, TPU v5p, 64B, v5p-128"
    ),
)

# DeepSeek-V3 technical report (arXiv 2412.19437), Table 1: pre-training 2,664K H800 GPU-hours,
# context extension 119K, post-training 5K, total 2,788K; 14.8T pre-training tokens (§4.1). §3.2:
# 2,048 H800s, 16-way pipeline (DualPipe), 64-way expert parallelism over 8 nodes, ZeRO-1 data
# parallelism, no tensor parallelism; FP8 GEMMs (§3.3). §4.2: sequence length 4K, the batch
# ramped to 15,360 sequences.
DEEPSEEK_V3 = dict(
    gpu_hours_total=2.788e6,
    gpu_hours_pretraining=2.664e6,
    tokens=14.8e12,
    devices=2048,
    mesh={"stage": 16, "expert": 64, "data": 2},
    batch=15_360,
    seq_len=4096,
)
