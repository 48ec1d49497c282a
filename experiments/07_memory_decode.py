"""Decode traffic and decode-step latency of an UltraMem layer against an MoE layer of the same total
and activated parameters, written to experiments/results/07_memory_decode.md.

Part 1, from configs alone (``llmarch.accounting.decode_traffic``): bytes one decoding step reads
for a batch of B sequences, for the reconstructed paper-scale presets ``ultramem-*`` against
``moe-*-2in34`` of (within 0.02%) the same parameters, bf16 weights and a 2048-token KV cache.

Part 2, measured: one layer's decode step (``x [B,1,D]`` -> ``[B,1,D]``, jitted, float32) for
B = 1…64. The UltraMem layer (``llmarch.layers.memory.MemoryLayer``: TDQKR r=2, 2 cores, IVE W=4,
raw scores, value width D/2 with projection) and an ``llmarch.layers.moe.MoE`` layer (top-2
SwiGLU experts) are sized to the same total and activated parameters. The MoE runs with each of
its strategies that compute only routed tokens ("dropless": sort + ``ragged_dot``; "capacity":
per-expert buffers) and the table takes the faster one at each B, so the ratio is against the
best MoE this library has. Medians over interleaved repeats (the two layers alternate, so load
from other processes falls on both).

Part 3, the roofline: the bytes and FLOPs each layer must touch per step (UltraMem: its dense
weights and the B·J value rows it reads; MoE: the router and the experts its batch routes to),
against this machine's streaming bandwidth (an XLA matrix-vector product over a 256 MB matrix)
and matmul rate (a 1024² float32 matmul), both measured in the same process, interleaved with
the layers. ``roofline`` is max(bytes / bandwidth, FLOPs / matmul rate); ``of roofline`` is the
roofline time over the measured time.

    python experiments/07_memory_decode.py [--batches 1,2,4,8,16,32,64] [--repeats 15]
"""

import argparse
import datetime
import pathlib
import statistics

import jax
import jax.numpy as jnp
from _bench_common import interleaved_medians
from flax import nnx

import llmarch
from llmarch import accounting, machine
from llmarch.config import AttentionConfig, MemoryConfig, ModelConfig, MoEConfig, moe_blocks
from llmarch.layers.memory import MemoryLayer
from llmarch.layers.moe import MoE

MOES = ("moe-dropless", "moe-capacity", "moe-gather")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--num-keys", type=int, default=512, help="P: the UltraMem grid is P² slots")
    return parser.parse_args(argv)


def ultramem_config(d_model: int, num_keys: int) -> MemoryConfig:
    """The UltraMem layer measured here (TDQKR r=2, 2 cores, IVE W=4, raw scores, values D/2)."""
    return MemoryConfig(
        num_keys=num_keys,
        topk=32,
        num_heads=2,
        key_dim=128,
        value_dim=d_model // 2,
        score="raw",
        output_proj=True,
        tucker_rank=2,
        num_cores=2,
        virtual_blocks=4,
        key_norm=True,
        value_init_std=0.02,
    )


def decode_latency(batches, repeats: int, d_model: int, num_keys: int) -> dict:
    """Part 2: median decode-step ms of the UltraMem layer and each MoE strategy at each B, over
    interleaved repeats. Returns ``rows`` (``(B, {name: ms}, fastest MoE)``) and the sizes."""
    D = d_model
    mem = ultramem_config(D, num_keys)
    base = dict(
        vocab_size=256,
        d_model=D,
        num_layers=1,
        ffn_dim=4 * D,
        max_seq_len=64,
        attention=AttentionConfig(num_heads=D // 128, num_kv_heads=D // 128, head_dim=128),
    )
    um_cfg = ModelConfig(**base, skip_layers=((0, 0),), skip_kind="ultramem", memory=mem)
    um_total = accounting.memory_params(um_cfg)
    um_active = accounting.memory_params(um_cfg, active=True)
    # MoE: top-2 experts whose 2·3·D·F matches UltraMem's activated parameters, and enough of them to
    # match its total (the router, D·E, is counted in both).
    F = round((um_active - D * 24) / (2 * 3 * D))
    E = round(um_total / (3 * D * F + D))
    moe_cfg = ModelConfig(**base, moe=MoEConfig(num_experts=E, top_k=2, expert_dim=F), blocks=moe_blocks(1))
    moe_total = accounting.param_counts(moe_cfg).ffn
    moe_active = accounting.active_param_counts(moe_cfg).ffn

    with nnx.use_eager_sharding(False):
        um_graph, um_state = nnx.split(MemoryLayer(D, um_cfg.memory, rngs=nnx.Rngs(0), pre_norm=True))
        moe_graph, moe_state = nnx.split(MoE(D, moe_cfg.moe, rngs=nnx.Rngs(0)))

    @jax.jit
    def um_step(state, x):
        return nnx.merge(um_graph, state)(x)[0]

    def moe_step(strategy):
        return jax.jit(lambda state, x: nnx.merge(moe_graph, state)(x, strategy=strategy)[0])

    @jax.jit
    def moe_gather_step(state, x):
        """A decode baseline written here (not a library strategy): each token gathers its k experts'
        weights, so a batch reads B·k expert copies, the fewest possible while B·k <= E."""
        layer = nnx.merge(moe_graph, state)
        r, w = layer.route(x), layer.weights()
        B, k = x.shape[0], layer.moe.top_k
        e = r.experts.reshape(B * k)
        xk = jnp.repeat(x.reshape(B, D), k, axis=0)  # [B·k, D]
        h = jax.nn.silu(jnp.einsum("ND,NDF->NF", xk, w.gate[e])) * jnp.einsum("ND,NDF->NF", xk, w.up[e])
        y = jnp.einsum("NF,NFD->ND", h, w.down[e]).reshape(B, k, D)
        return jnp.einsum("BKD,BK->BD", y, r.gates.reshape(B, k))[:, None]

    big = jax.random.normal(jax.random.key(1), (65536, 1024), jnp.float32)  # 256 MB
    vec = jax.random.normal(jax.random.key(2), (1024,), jnp.float32)
    sq = jax.random.normal(jax.random.key(3), (1024, 1024), jnp.float32)
    matvec, matmul = jax.jit(lambda a, v: a @ v), jax.jit(lambda a: a @ a)
    probes = {
        "matvec": lambda: jax.block_until_ready(matvec(big, vec)),
        "matmul": lambda: jax.block_until_ready(matmul(sq)),
    }
    probe_times = {name: [] for name in probes}
    for fn in probes.values():
        fn()

    def touched_experts(x):
        """Distinct experts the batch ``x`` routes to (the fewest any MoE strategy must read)."""
        layer = nnx.merge(moe_graph, moe_state)
        return len(set(jax.device_get(layer.route(x).experts).reshape(-1).tolist()))

    steps = {"ultramem": lambda x: um_step(um_state, x)}
    for strategy in ("dropless", "capacity"):
        fn = moe_step(strategy)
        steps[f"moe-{strategy}"] = lambda x, fn=fn: fn(moe_state, x)
    steps["moe-gather"] = lambda x: moe_gather_step(moe_state, x)

    rows = []
    for B in batches:
        x = jax.random.normal(jax.random.key(B), (B, 1, D), jnp.float32)
        calls = {name: (lambda fn=fn, x=x: jax.block_until_ready(fn(x))) for name, fn in steps.items()}
        for call in calls.values():
            call()  # compile
            call()  # warm
        # The roofline probes run interleaved with the layers, so they see the same load.
        med = {name: t * 1e3 for name, t in interleaved_medians({**probes, **calls}, repeats).items()}
        for name in probes:
            probe_times[name].append(med.pop(name) / 1e3)
        best = min(MOES, key=med.get)
        rows.append((B, med, best, touched_experts(x)))
        print(B, {k: round(v, 3) for k, v in med.items()}, flush=True)
    um_params = {jax.tree_util.keystr(k): v.size for k, v in jax.tree_util.tree_leaves_with_path(um_state)}
    return dict(
        rows=rows,
        # The UltraMem step's optimized HLO at an input like x (a profile names its thunks by it).
        ultramem_hlo=lambda x: um_step.lower(um_state, x).compile().as_text(),
        bandwidth=big.nbytes / statistics.median(probe_times["matvec"]),  # bytes/s
        flop_rate=2 * 1024**3 / statistics.median(probe_times["matmul"]),  # FLOP/s
        big_nbytes=big.nbytes,
        um_params=um_params,
        mem=mem,
        um_total=um_total,
        um_active=um_active,
        moe_total=moe_total,
        moe_active=moe_active,
        E=E,
        F=F,
        D=D,
        steps=steps,  # name -> fn(x): the layers, for a profile of one of them
    )


def roofline(m: dict) -> dict:
    """Part 3 from ``decode_latency``'s result: per B, the bytes and FLOPs each layer must touch
    and its roofline time (ms) = max(bytes / bandwidth, FLOPs / matmul rate) at the rates measured
    beside the layers, with the measured times (``um_measured``, ``moe_measured``: the best MoE)."""
    mem, D, E, F, params = m["mem"], m["D"], m["E"], m["F"], m["um_params"]
    J, U = mem.reads_per_token, mem.width(D)
    um_dense = sum(n for k, n in params.items() if "values_mu" not in k and "ive_permutation" not in k)
    um_matmul = sum(n for k, n in params.items() if any(w in k for w in ("w_q_", "keys_", "w_out")))
    expert_params = 3 * D * F
    rows = []
    for B, med, best, touched in m["rows"]:
        um_bytes = 4 * (um_dense + B * J * U) + 4 * B * J  # + the IVE permutation entries
        um_flops = 2 * B * (um_matmul + J * U)
        moe_bytes = 4 * (D * E + touched * expert_params)
        moe_flops = 2 * B * (D * E + 2 * expert_params)
        rows.append(
            dict(
                B=B,
                experts=touched,
                um_bytes=um_bytes,
                um_flops=um_flops,
                moe_bytes=moe_bytes,
                moe_flops=moe_flops,
                um_ms=max(um_bytes / m["bandwidth"], um_flops / m["flop_rate"]) * 1e3,
                moe_ms=max(moe_bytes / m["bandwidth"], moe_flops / m["flop_rate"]) * 1e3,
                um_measured=med["ultramem"],
                moe_measured=med[best],
            )
        )
    return dict(rows=rows, um_dense=um_dense, um_matmul=um_matmul, expert_params=expert_params)


def main(argv=None) -> None:
    args = parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    out_path = pathlib.Path(__file__).parent / "results" / "07_memory_decode.md"
    lines = [
        "# 07 Memory-layer decode: traffic model and UltraMem vs MoE latency",
        "",
        f"Command: `python experiments/07_memory_decode.py --batches {args.batches} "
        f"--repeats {args.repeats} --d-model {args.d_model} --num-keys {args.num_keys}`",
        "",
        f"Machine: {machine.describe()}  ",
        f"Date: {datetime.date.today()}",
        "",
    ]

    # -- part 1: the traffic model at paper scale ------------------------------------------------------
    lines += [
        "## Bytes read per decoding step (traffic model, from the configs)",
        "",
        "Reconstructed paper-scale presets (see `llmarch/presets.py` for how their shapes were derived; "
        "they are not the paper's published table). bf16 weights and cache, KV cache of 2048 tokens per "
        "sequence, uniform routing and memory picks. `sparse`: the MoE experts / memory value rows the "
        "batch touches; `total`: everything the step reads (dense weights, sparse part, KV cache).",
        "",
        "| model | params | activated | B | sparse (MB) | total (MB) | MoE total / UltraMem total |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in ("151m", "680m", "1.6b"):
        um, moe = llmarch.presets.get(f"ultramem-{size}"), llmarch.presets.get(f"moe-{size}-2in34")
        for B in (1, 8, 64, 256):
            t_um = accounting.decode_traffic(um, B, context_len=2048)
            t_moe = accounting.decode_traffic(moe, B, context_len=2048)
            for name, cfg, t in ((um.name, um, t_um), (moe.name, moe, t_moe)):
                ratio = f"{t_moe.total / t_um.total:.2f}x" if cfg is moe else ""
                lines.append(
                    f"| {name} | {accounting.param_count(cfg) / 1e9:.2f}B | "
                    f"{accounting.active_param_count(cfg) / 1e9:.3f}B | {B} | {t.sparse / 1e6:,.1f} | "
                    f"{t.total / 1e6:,.1f} | {ratio} |"
                )
    lines.append("")

    # -- part 2: measured layer latency ------------------------------------------------------------
    m = decode_latency(batches, args.repeats, args.d_model, args.num_keys)
    rows, mem, D = m["rows"], m["mem"], args.d_model
    um_total, um_active, moe_total, moe_active, E, F = (
        m[k] for k in ("um_total", "um_active", "moe_total", "moe_active", "E", "F")
    )
    lines += [
        "## Measured decode-step latency of one layer (this machine)",
        "",
        f"UltraMem layer: D={D}, P={args.num_keys} ({args.num_keys**2:,} virtual slots, "
        f"{mem.physical_rows:,} physical rows of {D // 2}), 2 heads x top-32, key width 128, "
        f"TDQKR r=2 with 2 cores, IVE W=4, raw scores; {um_total:,} parameters, "
        f"{um_active:,} activated per token (queries, all keys, projection, the 64 rows read). "
        f"MoE layer: {E} SwiGLU experts of F={F}, top-2; {moe_total:,} parameters, "
        f"{moe_active:,} activated. "
        "float32, jitted, `x [B,1,D]`, median of interleaved repeats. MoE strategies: `dropless` "
        "(the library's sort + `ragged_dot`, which XLA:CPU runs slowly), `capacity` (the library's "
        "per-expert buffers: every expert's weights are read at every step), `gather` (written in this "
        "script: each token gathers its k experts, B·k expert reads); `MoE best` is the fastest of the "
        "three at that B, so the ratio is against the best MoE decode available here.",
        "",
        "| B | UltraMem (ms) | MoE dropless (ms) | MoE capacity (ms) | MoE gather (ms) | MoE best (ms) "
        "| MoE best / UltraMem |",
        "|---|---|---|---|---|---|---|",
    ]
    for B, med, best, _ in rows:
        lines.append(
            f"| {B} | {med['ultramem']:.3f} | {med['moe-dropless']:.3f} | {med['moe-capacity']:.3f} | "
            f"{med['moe-gather']:.3f} | {med[best]:.3f} ({best[4:]}) | "
            f"{med[best] / med['ultramem']:.2f}x |"
        )
    at8 = [med[best] / med["ultramem"] for B, med, best, _ in rows if B >= 8]
    if at8:
        lines += [
            "",
            f"Goal (UltraMem >= 2x faster at B >= 8, as the paper's A100 figures show): "
            f"min ratio at B >= 8 on this machine = {min(at8):.2f}x "
            f"({'met' if min(at8) >= 2 else 'NOT met'}).",
        ]
    # -- part 3: the roofline ------------------------------------------------------------------------
    roof = roofline(m)
    J, U, E, F = mem.reads_per_token, mem.width(D), m["E"], m["F"]
    lines += [
        "",
        "## Roofline: what each layer must touch per step",
        "",
        f"Measured in this process, interleaved with the layers: streaming bandwidth "
        f"{m['bandwidth'] / 1e9:.1f} GB/s (XLA matrix-vector product over a {m['big_nbytes'] / 2**20:.0f} "
        f"MiB matrix), matmul rate {m['flop_rate'] / 1e9:.0f} GFLOP/s (1024² float32). UltraMem must "
        f"read its dense weights ({roof['um_dense'] * 4 / 1e6:.1f} MB: queries, keys, cores, W_o) and "
        f"B·{J} value rows of {U} numbers; its FLOPs are 2·B·({roof['um_matmul']:,} query, key and W_o "
        f"weights + {J}·{U} for the weighted sum). MoE must read its router and the experts its batch "
        f"routes to ({roof['expert_params'] * 4 / 1e6:.1f} MB each; `experts` counts them at this B, of "
        f"{E}); its FLOPs are 2·B·(D·E + 2·{roof['expert_params']:,}). `roofline` = max(bytes / "
        "bandwidth, FLOPs / matmul rate); `of roofline` = roofline / measured. `roofline ratio` is "
        "MoE's roofline over UltraMem's: the speed-up this machine allows if both layers ran at their "
        "rooflines.",
        "",
        "| B | UltraMem MB | UltraMem MFLOP | UltraMem roofline (ms) | of roofline | experts "
        "| MoE MB | MoE MFLOP | MoE roofline (ms) | MoE best of roofline | roofline ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in roof["rows"]:
        lines.append(
            f"| {r['B']} | {r['um_bytes'] / 1e6:.1f} | {r['um_flops'] / 1e6:.0f} | {r['um_ms']:.3f} | "
            f"{r['um_ms'] / r['um_measured']:.0%} | {r['experts']} | {r['moe_bytes'] / 1e6:.1f} | "
            f"{r['moe_flops'] / 1e6:.0f} | {r['moe_ms']:.3f} | {r['moe_ms'] / r['moe_measured']:.0%} | "
            f"{r['moe_ms'] / r['um_ms']:.2f}x |"
        )
    lines.append("")
    out_path.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
