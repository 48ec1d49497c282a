"""The cost model (``llmarch.plan``) against published figures: DeepSeek-V3's KV bytes per token and
its GPU-hours, Llama-3-8B's full fine-tuning memory with AdamW, and MaxText's measured MFU on TPU
v5e/v5p; then a ``--search`` ranking. Pure arithmetic from configs: no accelerator is used.

Writes experiments/results/21_plan_published.md.

    python experiments/21_plan_published.py
"""

import datetime
import math
import pathlib

from llmarch import accounting, machine, presets
from llmarch.plan import Layout, get, memory, plan, search
from llmarch.plan.published import DEEPSEEK_V3, MAXTEXT, maxtext_config
from llmarch.plan.report import describe, describe_search

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "21_plan_published.md"
rows = []
H100_EFFICIENCY = get("h100").matmul_efficiency


def row(figure: str, source: str, published: str, predicted: str, ratio: float | None, note: str) -> None:
    within = "" if ratio is None else ("yes" if abs(ratio - 1) <= 0.15 else "no")
    shown = "" if ratio is None else f"{ratio:.2f}"
    rows.append(f"| {figure} | {source} | {published} | {predicted} | {shown} | {within} | {note} |")


# 1. DeepSeek-V3's KV cache per token
ds = presets.get("deepseek-v3")
kv = memory(ds, Layout(mesh={}, batch=1, seq_len=4096)).kv_bytes_per_token
row(
    "DeepSeek-V3 KV cache, bytes/token",
    "V2 report Table 1; V3 config: (512+64) x 61 x 2",
    "70,272",
    f"{kv:,}",
    kv / 70_272,
    "MLA caches c_KV and k_R only",
)

# 2. DeepSeek-V3's GPU-hours -> implied MFU, and the planner's prediction for its layout
d = DEEPSEEK_V3
peak = get("h800").peak_bf16
flops = accounting.train_flops_per_token(ds, d["seq_len"], causal=True)
implied = flops * d["tokens"] / (d["gpu_hours_total"] * 3600 * peak)
implied_6n = 6 * accounting.active_param_count(ds) * d["tokens"] / (d["gpu_hours_total"] * 3600 * peak)
ds_layout = Layout(mesh=d["mesh"], batch=d["batch"], seq_len=d["seq_len"], remat="dots", precision="fp8")
ds_plan = plan(ds, ds_layout, get("h800"))
hours = d["tokens"] / ds_plan.tokens_per_second * d["devices"] / 3600
hidden = ds_plan.compute_seconds / (1 - ds_plan.bubble) + ds_plan.optimizer_seconds
upper = ds_plan.model_flops / (hidden * d["devices"] * peak)
row(
    "DeepSeek-V3 MFU implied by 2.788M H800 GPU-hours / 14.8T tokens",
    "V3 report Table 1, §3.2",
    f"{implied:.1%} (6N only: {implied_6n:.1%})",
    f"{ds_plan.mfu:.1%} ({hours / 1e6:.2f}M GPU-hours); with the all-to-all hidden: {upper:.0%} "
    "(FP8 peak: 2x bf16)",
    ds_plan.mfu / implied,
    "EP all-to-all over InfiniBand priced as exposed (DualPipe hides it); the two bounds bracket it",
)

# 3. Llama-3-8B full fine-tuning with AdamW in mixed precision
llama = presets.get("llama3-8b")
ll = memory(llama, Layout(mesh={}, batch=1, seq_len=8192, remat="full"))
states = ll.params + ll.grads + ll.optimizer
row(
    "Llama-3-8B full fine-tuning, AdamW mixed precision: weights+grads+states",
    "ZeRO (Rajbhandari et al. 2020) §3.1: 16 bytes/param",
    f"{16 * accounting.param_count(llama) / 1e9:.1f} GB",
    f"{states / 1e9:.1f} GB (+ {ll.activations / 1e9:.1f} GB activations, one 8K sequence, full remat)",
    states / (16 * accounting.param_count(llama)),
    "does not fit one 80 GB GPU: shard it (fsdp=8: 16.1 GB of states per GPU)",
)

# 4. MaxText's measured MFU
for run in MAXTEXT:
    devices = math.prod(run.mesh.values())
    layout = Layout(mesh=run.mesh, batch=run.per_device_batch * devices, seq_len=2048, remat=run.remat)
    p = plan(maxtext_config(run.scale), layout, get(run.hardware))
    ratio = p.mfu / run.mfu
    note = (
        f"roofline at 100% of peak; x{H100_EFFICIENCY:.2f} (H100's measured matmul efficiency) -> "
        f"{ratio * H100_EFFICIENCY:.2f}"
        + ("; llmarch's TP keeps D-sized activations whole, so it would not fit 95 GiB" if not p.fits else "")
    )
    row(
        f"MaxText {run.scale}B ({layout.spec()}, batch {run.per_device_batch}/chip, remat {run.remat})",
        run.source,
        f"{run.mfu:.2%}",
        f"{p.mfu:.2%}",
        ratio,
        note,
    )

found = search(llama, get("h100"), 16, batch=64, seq_len=8192, remat="full")
today = datetime.date.today()
lines = [
    "# 21: the cost model against published figures",
    "",
    f"{today}; `python experiments/21_plan_published.py`; arithmetic from configs on {machine.describe()}"
    " (no accelerator is used). Sources: `llmarch/plan/published.py`, `llmarch/plan/hardware.py`.",
    "",
    "| figure | source | published | planner | ratio | within 15% | note |",
    "|---|---|---|---|---:|---|---|",
    *rows,
    "",
    "Why the rows outside 15% are off:",
    "",
    "- **MaxText**: the planner is a roofline. It prices matmuls at 100% of the TPU's peak because no",
    "  pure-matmul measurement of a TPU is published (the GPUs' measured 80-86% are in the hardware",
    "  table), and it assumes the FSDP all-gathers hide behind compute. Remat full caps it at 75% (the",
    "  forward runs twice). Its MFU is 12-26% above the measured. At the H100's measured matmul efficiency",
    "  (0.80) every MaxText row is within 15%, but the TPU tables keep 1.0 because no source gives a",
    "  TPU number.",
    "- **DeepSeek-V3**: the planner puts the 64-way expert all-to-all on InfiniBand (EP spans 8 nodes)",
    "  and, assuming no overlap, leaves it exposed: 17.8 s of a 26.3 s step. DualPipe hides it, and",
    "  node-limited routing (at most 4 nodes per token) and FP8 dispatch cut its bytes. With it hidden,",
    f"  the roofline's FP8 GEMMs at 80% of the FP8 peak give {upper:.0%} of the bf16 peak. The",
    f"  published {implied:.1%} lies between the two bounds. The planner's",
    f"  {ds_plan.memory.total / 1e9:.0f} GB per GPU also exceeds 80 GB: DeepSeek caches activations in",
    "  FP8 and recomputes more than `dots`.",
    "",
    "## DeepSeek-V3's layout as the planner prices it",
    "",
    "```",
    describe(ds_plan),
    "```",
    "",
    "## `llmarch plan --preset llama3-8b --hardware h100 --devices 16 --search --batch 64 --seq-len 8192`",
    "",
    "```",
    describe_search(found, 8),
    "```",
    "",
]
RESULTS.write_text("\n".join(lines))
print("\n".join(lines))
