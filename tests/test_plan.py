"""The cost model and planner (``llmarch.plan``, ``llmarch plan``): its formulas on hand-checkable
cases, one test per published figure (source in the comment), the search, and the errors."""

import math

import pytest

from llmarch import accounting, presets
from llmarch.cli import main
from llmarch.plan import HARDWARE, Layout, get, memory, plan, search
from llmarch.plan.collectives import wire_factor
from llmarch.plan.memory import microbatches_in_flight, param_split
from llmarch.plan.published import DEEPSEEK_V3, MAXTEXT, maxtext_config
from llmarch.plan.search import factorizations

TINY = presets.get("tiny-dense")


def _maxtext(run):
    devices = math.prod(run.mesh.values())
    layout = Layout(mesh=run.mesh, batch=run.per_device_batch * devices, seq_len=2048, remat=run.remat)
    return plan(maxtext_config(run.scale), layout, get(run.hardware))


# -- published figures ------------------------------------------------------------------------


def test_deepseek_v3_kv_cache_is_70272_bytes_per_token():
    # DeepSeek-V2 report (arXiv 2405.04434) Table 1 / V3 config: MLA caches the latent c_KV
    # (d_c = 512) and the shared RoPE key (d_h^R = 64) per layer: (512 + 64) x 61 layers x 2 bytes
    # (bf16) = 70,272 bytes per token.
    cfg = presets.get("deepseek-v3")
    layout = Layout(mesh={}, batch=1, seq_len=4096, precision="bf16")
    mem = memory(cfg, layout)
    assert mem.kv_bytes_per_token == (512 + 64) * 61 * 2 == 70_272
    assert mem.kv_cache == 70_272 * 4096  # one device holds the whole sequence


def test_deepseek_v3_implied_mfu_from_its_gpu_hours():
    # DeepSeek-V3 report (arXiv 2412.19437) Table 1: 2.788M H800 GPU-hours in all (2.664M of them
    # pre-training) for 14.8T tokens; 37B activated parameters. Implied MFU against the H800's
    # 989 TFLOP/s dense bf16 peak: 6 * N_active * tokens / (hours * 3600 * peak).
    d = DEEPSEEK_V3
    cfg = presets.get("deepseek-v3")
    n_active = accounting.active_param_count(cfg)
    assert 37e9 <= n_active <= 38e9
    peak = get("h800").peak_bf16
    implied = 6 * n_active * d["tokens"] / (d["gpu_hours_total"] * 3600 * peak)
    assert implied == pytest.approx(0.336, abs=0.002)  # 0.351 on the 2.664M pre-training hours
    with_attention = (
        accounting.train_flops_per_token(cfg, d["seq_len"], causal=True)
        * d["tokens"]
        / (d["gpu_hours_total"] * 3600 * peak)
    )
    assert with_attention == pytest.approx(0.373, abs=0.002)
    # The planner, for the report's layout (§3.2: PP 16, EP 64 over 8 nodes, DP 2; FP8 GEMMs;
    # batch 15,360 x 4K; selective recompute ~ remat "dots"; DualPipe priced as 1F1B with one
    # sequence per microbatch), predicts 29.6% by the same count (6N + attention over the bf16
    # peak), 3.51M GPU-hours: 0.79 of the implied 37.3%, NOT within 15%. The difference is the
    # expert all-to-all: 64-way EP spans 8 nodes, so the planner sends it over InfiniBand and,
    # assuming no overlap, exposes it (17.8 s of a 26.3 s step); DeepSeek hides it behind compute
    # with DualPipe and cuts its bytes with node-limited routing (<= 4 nodes per token) and FP8
    # dispatch (§3.2.2). With it hidden the roofline gives the other bound, FP8 GEMMs at 80% of
    # the FP8 peak: far above what the hours imply (the report's FP8 GEMMs, 20 SMs kept for
    # communication, MTP and DualPipe's own costs sit between). The two bounds bracket the
    # published figure; experiments/results/21_plan_published.md states the same. Its memory
    # (131 GB) also exceeds 80 GB: DeepSeek caches activations in FP8 and recomputes more (§3.3).
    layout = Layout(mesh=d["mesh"], batch=d["batch"], seq_len=d["seq_len"], remat="dots", precision="fp8")
    predicted = plan(cfg, layout, get("h800"))
    assert predicted.mfu / with_attention == pytest.approx(0.79, abs=0.02)
    hours = d["tokens"] / predicted.tokens_per_second * d["devices"] / 3600
    assert hours / 1e6 == pytest.approx(3.51, abs=0.02)
    assert predicted.bound == "exposed collectives"
    exposed = sum(c.seconds for c in predicted.collectives if c.axis == "expert" and c.op == "all-to-all")
    assert exposed / predicted.step_seconds > 0.6
    hidden = (predicted.compute_seconds / (1 - predicted.bubble)) + predicted.optimizer_seconds
    upper = predicted.model_flops / (hidden * d["devices"] * peak)
    assert predicted.mfu < with_attention < upper
    assert not predicted.fits


def test_llama3_8b_full_finetuning_memory_with_adamw():
    # ZeRO (Rajbhandari et al., SC 2020, §3.1): mixed-precision Adam keeps 16 bytes per
    # parameter (2 + 2 for the bf16 weights and gradients, 12 for the float32 master weights, m
    # and v): Llama-3-8B's 8.03B parameters need 128.5 GB before activations. llmarch's bf16
    # policy (float32 parameters, gradients, m and v) is the same 16 bytes.
    cfg = presets.get("llama3-8b")
    n = accounting.param_count(cfg)
    assert n == pytest.approx(8.03e9, rel=1e-3)
    mem = memory(cfg, Layout(mesh={}, batch=1, seq_len=8192, remat="full", precision="bf16"))
    states = mem.params + mem.grads + mem.optimizer
    assert states == 16 * n
    assert states / 1e9 == pytest.approx(128.5, abs=0.1)
    assert 0 < mem.activations < states / 10  # one 8K sequence under full remat: ~12 GB
    assert mem.total > get("h100").hbm_bytes  # so one 80 GB GPU cannot hold it: shard it
    fsdp8 = memory(cfg, Layout(mesh={"fsdp": 8}, batch=8, seq_len=8192, remat="full"))
    assert fsdp8.params + fsdp8.grads + fsdp8.optimizer == pytest.approx(states / 8)


@pytest.mark.parametrize("run", MAXTEXT, ids=lambda r: r.source)
def test_maxtext_published_mfu(run):
    # MaxText README "Runtime Performance Results" (sources in llmarch.plan.published): 1x
    # v5e-256: 16B 61.10%, 32B 66.86%; v5p-128: 32B 67.76%, 64B 70.31%. The planner predicts
    # 75.0% (v5e, remat full: the forward recomputed caps MFU at 3/4 of the roofline) and 85.6%
    # (v5p, remat minimal ~ dots, the tensor all-reduce exposed): ratios 1.23, 1.12, 1.26, 1.22.
    # The v5e 32B run is within 15%; the others are 16-26% over, and the gap is the matmul
    # efficiency the TPU records leave at 1.0: no pure-matmul measurement of a TPU is published,
    # while the GPUs' measured ones are 0.80 (H100) and 0.86 (A100) of peak. At the H100's 0.80
    # every run is within 15%, which the last assertion checks. MaxText shards the activations'
    # model dimension over tensor, llmarch does not, so the v5p layouts do not fit llmarch's
    # 95 GiB (they do in MaxText).
    predicted = _maxtext(run)
    ratio = predicted.mfu / run.mfu
    assert 1.0 < ratio < 1.3, ratio  # the roofline is an upper bound
    if run.scale == 32 and run.hardware == "tpu-v5e":
        assert abs(ratio - 1) <= 0.15
    assert abs(ratio * get("h100").matmul_efficiency - 1) <= 0.15


# -- the model's formulas ---------------------------------------------------------------------


def test_ring_factors():
    assert wire_factor("all-reduce", 8, torus=False) == 2 * 7 / 8
    assert wire_factor("all-gather", 8, torus=False) == wire_factor("reduce-scatter", 8, torus=False) == 7 / 8
    assert wire_factor("all-to-all", 8, torus=False) == 7 / 8
    assert wire_factor("all-to-all", 16, torus=True) == 4  # n/4 hops on a bidirectional ring
    assert wire_factor("send", 8, torus=True) == 1


def test_data_parallel_allreduce_bytes_and_link():
    cfg = presets.get("llama3-8b")
    p = plan(cfg, Layout(mesh={"data": 16}, batch=16, seq_len=2048, remat="full"), get("h100"))
    (grads,) = [c for c in p.collectives if c.axis == "data"]
    n = param_split(cfg).total
    assert grads.op == "all-reduce" and grads.operand_bytes == 4 * n  # float32 gradients
    assert grads.wire_bytes == pytest.approx(2 * 15 / 16 * 4 * n)
    assert grads.link == "InfiniBand"  # 16 GPUs span two nodes of 8
    assert grads.seconds == pytest.approx(grads.wire_bytes / 50e9)
    inside = plan(cfg, Layout(mesh={"data": 8}, batch=8, seq_len=2048, remat="full"), get("h100"))
    assert inside.collectives[0].link == "NVLink"


def test_compute_time_is_flops_over_achievable_peak():
    cfg = presets.get("llama3-8b")
    layout = Layout(mesh={"fsdp": 8}, batch=8, seq_len=4096, remat="none")
    p = plan(cfg, layout, get("h100"))
    flops = accounting.train_flops_per_token(cfg, 4096, causal=True) * 8 * 4096 / 8
    assert p.hardware_flops == pytest.approx(flops)
    assert p.flops_seconds == pytest.approx(flops / (989e12 * 792.1 / 989))
    full = plan(cfg, Layout(mesh={"fsdp": 8}, batch=8, seq_len=4096, remat="full"), get("h100"))
    assert full.flops_seconds == pytest.approx(4 / 3 * p.flops_seconds)  # the forward again
    assert full.mfu < p.mfu


@pytest.mark.parametrize(
    "schedule, v, bubble", [("gpipe", 1, 3 / 11), ("1f1b", 1, 3 / 11), ("interleaved", 2, 1.5 / 9.5)]
)
def test_pipeline_bubble(schedule, v, bubble):
    # GPipe/1F1B: (p-1)/(m+p-1) (Huang et al. 2019; Narayanan et al. 2021); interleaved: the fill
    # (p-1) divided by the v virtual stages.
    cfg = presets.get("llama3-8b")
    layout = Layout(mesh={"stage": 4}, batch=8, seq_len=1024, schedule=schedule, virtual_stages=v)
    assert layout.microbatches == 8
    assert plan(cfg, layout, get("h100")).bubble == pytest.approx(bubble)


@pytest.mark.parametrize("schedule, v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 4)])
@pytest.mark.parametrize("p, m", [(4, 8), (4, 16), (2, 8)])
def test_bubble_and_activations_equal_the_built_schedules(schedule, v, p, m):
    # The planner's closed forms against the tick-by-tick schedules that llmarch's pipeline runs
    # (llmarch.pipeline_schedule.build): their idle fraction and their busiest device's peak of
    # microbatches held between forward and backward.
    pipeline_schedule = pytest.importorskip("llmarch.pipeline_schedule")
    built = pipeline_schedule.build(schedule, p, m, v)
    layout = Layout(mesh={"stage": p}, batch=m, seq_len=8, schedule=schedule, virtual_stages=v)
    assert plan(TINY.replace(num_layers=16), layout, get("h100")).bubble == pytest.approx(built.bubble())
    assert microbatches_in_flight(layout) == pytest.approx(built.activation_stages())


def test_activation_memory_by_remat_and_schedule():
    cfg = presets.get("llama3-8b")

    def acts(**kw):
        return memory(cfg, Layout(**{"mesh": {}, "batch": 1, "seq_len": 4096, **kw})).activations

    assert acts(remat="full") < acts(remat="dots") < acts(remat="none")
    held = {
        s: microbatches_in_flight(
            Layout(
                mesh={"stage": 4},
                batch=16,
                seq_len=64,
                schedule=s,
                virtual_stages=2 if s == "interleaved" else 1,
            )
        )
        for s in ("gpipe", "1f1b", "interleaved")
    }
    assert held == {"gpipe": 16, "1f1b": 4, "interleaved": pytest.approx(4 * (1 + 3 / 8))}
    staged = {
        s: memory(cfg, Layout(mesh={"stage": 4}, batch=16, seq_len=1024, schedule=s)).activations
        for s in ("gpipe", "1f1b")
    }
    assert staged["gpipe"] > staged["1f1b"]


def test_energy_from_rated_power_and_none_without_it():
    layout = Layout(mesh={"fsdp": 8}, batch=8, seq_len=2048)
    p = plan(presets.get("llama3-8b"), layout, get("h100"))
    assert p.energy_joules == pytest.approx(700 * 8 * p.step_seconds)
    assert p.joules_per_token == pytest.approx(p.energy_joules / (8 * 2048))
    assert plan(presets.get("llama3-8b"), layout, get("tpu-v5p")).energy_joules is None


def test_every_hardware_record_has_its_numbers():
    for hw in HARDWARE.values():
        assert hw.peak_bf16 > 0 and hw.hbm_bytes > 0 and hw.fast_link > hw.slow_link > 0
        assert 0 < hw.matmul_efficiency <= 1


# -- search -----------------------------------------------------------------------------------


def test_factorizations_cover_the_device_count():
    found = list(factorizations(8, ("data", "fsdp", "tensor")))
    assert len(found) == 10  # ordered factorizations of 2^3 into 3 factors: C(5, 2)
    assert all(math.prod(f.values()) == 8 for f in found)


def test_search_returns_only_layouts_that_fit_ranked_by_step_time():
    cfg = presets.get("llama3-8b")
    hw = get("h100")
    found = search(cfg, hw, 16, batch=64, seq_len=8192, remat="full")
    assert found.considered == len(list(factorizations(16, ("data", "fsdp", "tensor", "expert", "stage"))))
    assert found.too_big > 0 and found.invalid > 0 and found.ranked
    assert all(p.fits and p.memory.total <= hw.hbm_bytes for p in found.ranked)
    times = [p.step_seconds for p in found.ranked]
    assert times == sorted(times)
    assert {"data": 16} not in [{a: n for a, n in p.layout.mesh.items() if n > 1} for p in found.ranked]


def test_search_on_too_small_hardware_finds_nothing():
    found = search(presets.get("llama3-70b"), get("tpu-v5e"), 4, batch=4, seq_len=4096)
    assert found.ranked == () and found.too_big > 0


def test_search_names_a_model_it_cannot_price_instead_of_counting_it_as_not_dividing():
    with pytest.raises(ValueError, match="ffn kind 'pkm' has no activation model"):
        search(presets.get("tiny-pkm"), get("h100"), 8, batch=8, seq_len=128)


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: get("tpu-v9"), "hardware='tpu-v9' is unknown"),
        (lambda: Layout(mesh={"data": 3}, batch=4, seq_len=8), "must be divisible by data*fsdp*expert=3"),
        (lambda: Layout(mesh={"pipeline": 2}, batch=4, seq_len=8), "mesh axis 'pipeline' is unknown"),
        (lambda: Layout(mesh={}, batch=4, seq_len=8, remat="some"), "Layout.remat='some' is invalid"),
        (  # the schedules llmarch.pipeline builds: interleaved needs 2+ chunks per stage
            lambda: Layout(mesh={"stage": 4}, batch=8, seq_len=8, schedule="interleaved"),
            "Layout.virtual=1 is invalid for 'interleaved'",
        ),
        (lambda: Layout(mesh={}, batch=4, seq_len=8, microbatches=2), "must be 1 without pipelining"),
        (lambda: Layout(mesh={}, batch=4, seq_len=8, virtual_stages=2), "unless schedule='interleaved'"),
        (
            lambda: plan(TINY, Layout(mesh={"tensor": 8}, batch=1, seq_len=8), get("h100")),
            "tensor=8 must divide tiny-dense's num_heads=4",
        ),
        (
            lambda: plan(TINY, Layout(mesh={"expert": 2}, batch=2, seq_len=8), get("h100")),
            "expert=2 needs an MoE model",
        ),
        (
            lambda: plan(TINY, Layout(mesh={}, batch=1, seq_len=8, precision="fp8"), get("tpu-v5e")),
            "needs FP8 matmuls, which tpu-v5e does not have",
        ),
        (
            lambda: plan(TINY, Layout(mesh={}, batch=1, seq_len=8, precision="float32"), get("tpu-v5p")),
            "computes in float32, for which tpu-v5p publishes no peak",
        ),
    ],
)
def test_bad_input_is_a_value_error_naming_it(make, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*").replace("(", r"\(")):
        make()


def test_cli_prints_the_table(capsys):
    common = ["plan", "--preset", "llama3-8b", "--hardware", "h100", "--batch", "8", "--seq-len", "4096"]
    assert main([*common, "--mesh", "fsdp=8"]) == 0
    out = capsys.readouterr().out
    rows = ("parameters", "optimizer state", "activations", "KV cache (serving)", "fsdp all-gather")
    for row in (*rows, "pipeline bubble", "predicted MFU", "J/token"):
        assert row in out
    assert main([*common, "--devices", "8", "--search", "--top", "3"]) == 0
    out = capsys.readouterr().out
    ranked = [line for line in out.splitlines() if line[:4].strip().isdigit()]
    assert "factorizations" in out and len(ranked) == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--hardware", "tpu-v9", "--mesh", "data=2"], "hardware='tpu-v9' is unknown"),
        (["--hardware", "h100", "--mesh", "data=3", "--devices", "4"], "uses 3 devices but --devices is 4"),
        (["--hardware", "h100", "--search"], "--search needs --devices N"),
        (
            ["--hardware", "h100", "--search", "--devices", "4", "--microbatches", "2"],
            "--microbatches does not apply to --search",
        ),
        (["--hardware", "h100"], "give --mesh SPEC"),
        (["--hardware", "h100", "--mesh", "data=two"], "expected NAME=SIZE"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys):
    code = main(["plan", "--preset", "tiny-dense", "--batch", "4", "--seq-len", "8", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
