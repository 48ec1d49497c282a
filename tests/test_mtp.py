"""DeepSeek-V3 multi-token prediction (``llmarch.layers.mtp``): the loss against a brute-force
reference, the causal chain, the cached decoding form, training, config errors, accounting and
checkpoints."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import llmarch
from llmarch import accounting, mtp
from llmarch.config import BlockConfig, ModelConfig
from llmarch.lora import LoraConfig
from llmarch.train import metrics
from llmarch.train.config import TrainConfig
from llmarch.train.evaluate import restore_run
from llmarch.train.step import loss_fn, make_train_step
from llmarch.train.trainer import train

B, T = 2, 8


def _cfg(depth=2, **changes):
    return llmarch.presets.get("tiny-dense").replace(mtp_depth=depth, **changes)


def _batch(cfg, seed=0):
    """Row 0 packs two documents (the second's first target masked as the packer does) and row 1
    ends in two padding positions; targets are the inputs shifted by one."""
    stream = np.asarray(jax.random.randint(jax.random.key(seed), (B, T + 1), 0, cfg.vocab_size), np.int32)
    segment_ids = np.array([[1, 1, 1, 1, 2, 2, 2, 2], [1] * 6 + [0, 0]], np.int32)
    mask = np.ones((B, T), np.int32)
    mask[0, 3] = 0  # the input is document 1's last token, the target document 2's first
    mask[1, 6:] = 0  # padding
    positions = np.asarray(llmarch.model.segment_positions(jnp.asarray(segment_ids), (B, T)))
    return {
        "inputs": jnp.asarray(stream[:, :-1]),
        "targets": jnp.asarray(stream[:, 1:]),
        "segment_ids": jnp.asarray(segment_ids),
        "positions": jnp.asarray(positions),
        "mask": jnp.asarray(mask),
    }


def _reference_mtp_losses(model, batch):
    """The formula of DeepSeek-V3 §2.2 by hand: for depth k, position i of each row, h'_i = M_k
    [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)] over the *truncated* sequence i < T-k, module k's
    block, its final norm and the shared head; cross entropy against t_{i+k+1} where the target
    lies in position i's document and the main loss counts it; the mean per depth."""
    inputs, targets = np.asarray(batch["inputs"]), np.asarray(batch["targets"])
    seg, mask, pos = (np.asarray(batch[k]) for k in ("segment_ids", "mask", "positions"))
    trunk = model(batch["inputs"], segment_ids=batch["segment_ids"], return_hidden=True).trunk
    h_prev = [trunk[b] for b in range(B)]  # h^0 per row, [T,D]
    losses = []
    for k in range(1, model.cfg.mtp_depth + 1):
        module, n = model.mtp[k - 1], T - k
        total, count, h_next = 0.0, 0, []
        for b in range(B):
            emb = model.embed.table()[inputs[b, k:]]  # Emb(t_{i+k}), i < T-k: [n,D]
            x = jnp.concatenate([module.enorm(emb), module.hnorm(h_prev[b][:n])], axis=-1)
            x = x @ module.eh_proj.weight()  # [n,D]
            h, _ = module.block(x[None], jnp.asarray(pos[b, :n])[None], jnp.asarray(seg[b, :n])[None])
            h_next.append(h[0])
            logp = np.asarray(jax.nn.log_softmax(module.norm(h[0]) @ model.lm_head.weight()))  # [n,V]
            for i in range(n):
                if mask[b, i + k] and seg[b, i] == seg[b, i + k]:
                    total += -logp[i, targets[b, i + k]]
                    count += 1
        losses.append(total / count)
        h_prev = h_next
    return np.array(losses)


def test_mtp_loss_equals_brute_force_reference():
    cfg = _cfg(depth=2)
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    batch = _batch(cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    f = jax.jit(lambda p, r, b, w: loss_fn(graphdef, p, r, b, with_aux=False, loss_chunk=64, mtp_weight=w))
    total, parts = f(params, rest, batch, 0.3)
    reference = _reference_mtp_losses(model, batch)
    np.testing.assert_allclose(parts["mtp_loss"], reference.mean(), rtol=2e-5)
    np.testing.assert_allclose(total, parts["loss"] + 0.3 * reference.mean(), rtol=2e-5)
    # The plain (unchunked) loss agrees too.
    plain = loss_fn(graphdef, params, rest, batch, loss_chunk=None, mtp_weight=0.3)[1]["mtp_loss"]
    np.testing.assert_allclose(plain, reference.mean(), rtol=2e-5)


def test_causal_chain():
    """Perturbing t_j changes depth k's output at position i (i < T-k) exactly when j <= i + k."""
    cfg = _cfg(depth=2)
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)

    @jax.jit
    def hidden(state, tokens):
        m = nnx.merge(graphdef, state)
        return jnp.stack(mtp.hidden(m, m(tokens, return_hidden=True).trunk, tokens)[0])  # [k,B,T,D]

    tokens = jax.random.randint(jax.random.key(0), (1, T), 0, cfg.vocab_size)
    base = hidden(state, tokens)
    for j in range(T):
        changed = hidden(state, tokens.at[0, j].set((tokens[0, j] + 1) % cfg.vocab_size))
        moved = np.asarray(jnp.abs(changed - base).max(-1)[:, 0] > 1e-6)  # [k,T]
        for k in (1, 2):
            i = np.arange(T - k)
            np.testing.assert_array_equal(moved[k - 1, : T - k], j <= i + k, err_msg=f"j={j}, k={k}")


def test_without_mtp_or_with_zero_weight_the_loss_is_the_previous_one():
    plain_cfg = llmarch.presets.get("tiny-dense")
    plain = llmarch.Transformer(plain_cfg, rngs=nnx.Rngs(0))
    with_mtp = llmarch.Transformer(_cfg(depth=1), rngs=nnx.Rngs(0))
    batch = _batch(plain_cfg)
    a = nnx.split(plain, nnx.Param, ...)
    b = nnx.split(with_mtp, nnx.Param, ...)
    main = {k: v for k, v in b[1].items() if k != "mtp"}
    for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(nnx.State(main)), strict=True):
        np.testing.assert_array_equal(x, y)  # the MTP modules are built after the main model
    before, parts = loss_fn(*a, batch)
    assert "mtp_loss" not in parts
    assert loss_fn(*b, batch)[0] == before  # no weight: MTP not run
    total, parts = loss_fn(*b, batch, mtp_weight=0.0)
    assert total == before and parts["loss"] == before and parts["mtp_loss"] > 0


def test_train_steps_lower_both_losses_with_the_weight_schedule():
    cfg = llmarch.presets.get("tiny-deepseek-mtp")  # MoE MTP block: its aux joins the decoder's
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx, update_rest=True, mtp_loss_weight=0.3)
    batch = _batch(cfg, seed=3)
    first = None
    for i in range(8):
        params, rest, opt_state, m = step(params, rest, opt_state, batch, mtp_weight=0.3 if i < 4 else 0.1)
        assert bool(m["finite"])
        first = first or (float(m["loss"]), float(m["mtp_loss"]))
    assert step._cache_size() == 1  # λ's schedule is a traced scalar: one compile
    assert float(m["loss"]) < first[0] and float(m["mtp_loss"]) < first[1]
    assert m["expert_load"].shape[0] == cfg.num_layers - 1 + 1  # the MoE layers, then the MTP block's
    bias_path = ("mtp", 0, "block", "layers", "ffn")
    bias = [v for p, v in nnx.to_flat_state(rest) if p[:5] == bias_path]
    assert bias and any(np.abs(np.asarray(v.get_value())).max() > 0 for v in bias)  # update_state ran


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-deepseek"])
def test_cached_mtp_step_equals_full_sequence(preset):
    depth = 2
    cfg = llmarch.presets.get(preset).replace(mtp_depth=depth)
    model = llmarch.Transformer(cfg, rngs=nnx.Rngs(2))
    tokens = jax.random.randint(jax.random.key(1), (1, T), 0, cfg.vocab_size)
    full = mtp.hidden(model, model(tokens, return_hidden=True).trunk, tokens)[0]
    graphdef, state = nnx.split(model)

    @jax.jit
    def decode(state, cache, mtp_cache, tokens, i):
        """Position i: the main model's step, then each depth's, each with its own cache."""
        m = nnx.merge(graphdef, state)
        pos = jnp.full((1, 1), i, jnp.int32)
        out = m(jax.lax.dynamic_slice(tokens, (0, i), (1, 1)), positions=pos, cache=cache, return_hidden=True)
        h, hidden, new = out.trunk, [], []
        for k in range(1, depth + 1):
            ahead = jax.lax.dynamic_slice(tokens, (0, i + k), (1, 1))  # t_{i+k}
            h, c, _ = mtp.step(m, k, h, ahead, pos, cache=mtp_cache[k - 1])
            hidden.append(h[:, 0])
            new.append(c)
        return out.cache, new, hidden

    cache, mtp_cache = model.init_cache(1, T), mtp.init_cache(model, 1, T)
    for i in range(T - depth):
        cache, mtp_cache, hidden = decode(state, cache, mtp_cache, tokens, i)
        for k in range(depth):
            np.testing.assert_allclose(hidden[k], full[k][:, i], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(mtp_depth=-1), "mtp_depth=-1"),
        (dict(mtp_depth=True), "mtp_depth=True"),
        (dict(mtp_depth=1.0), "mtp_depth=1.0"),
        (dict(mtp_depth=256), "mtp_depth=256.*max_seq_len"),
        (dict(mtp_block=BlockConfig()), "mtp_block=.*mtp_depth=0"),
        (dict(mtp_depth=1, mtp_block="moe"), "mtp_block='moe'.*BlockConfig"),
        (
            dict(mtp_depth=1, mtp_block=BlockConfig(ffn="moe")),
            "ModelConfig.moe=None.*mtp_block uses ffn 'moe'",
        ),
    ],
)
def test_config_errors_name_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        llmarch.presets.get("tiny-dense").replace(**changes)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(mtp_loss_weight=-0.1), "mtp_loss_weight=-0.1"),
        (dict(mtp_loss_weight=float("nan")), "mtp_loss_weight=nan"),
        (dict(mtp_loss_weight_later=0.1), "mtp_loss_weight_later=0.1.*both"),
        (dict(mtp_loss_weight_later=0.1, mtp_loss_weight_step=0), "mtp_loss_weight_step=0"),
    ],
)
def test_train_config_errors_name_the_field(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(out_dir=str(tmp_path), **changes)


def test_weight_schedule_and_json_round_trip():
    cfg = TrainConfig(out_dir="x", mtp_loss_weight=0.3, mtp_loss_weight_later=0.1, mtp_loss_weight_step=5)
    assert [cfg.mtp_weight(s) for s in (1, 4, 5, 9)] == [0.3, 0.3, 0.1, 0.1]
    model = _cfg(depth=1, mtp_block=BlockConfig(attention="mha", ffn="swiglu"))
    assert ModelConfig.from_json(model.to_json()) == model
    assert cfg.trains_mtp(model) and not cfg.trains_mtp(_cfg(depth=0))
    assert not dataclasses.replace(cfg, mtp_loss_weight=0.0, mtp_loss_weight_later=0.0).trains_mtp(model)


def test_deepseek_v3_accounting_671b_main_plus_14b_mtp():
    v3 = llmarch.presets.get("deepseek-v3")
    assert v3.mtp_depth == 1 and v3.mtp_block_config == v3.layer_blocks[-1]  # MLA + MoE
    assert accounting.param_count(v3) == 671_026_404_352  # the main model: the report's 671B
    counts = accounting.mtp_param_counts(v3)
    assert counts.projection == 2 * 7168 * 7168
    assert counts.total == 11_610_067_968  # the module's own weights
    # With the embedding and head copies the published checkpoint stores in its MTP layer: "14B".
    assert counts.published == 13_463_426_048
    assert accounting.param_count(v3) + counts.published == pytest.approx(685e9, rel=0.002)
    assert accounting.mtp_param_counts(llmarch.presets.get("tiny-deepseek")).total == 0


@pytest.mark.parametrize("preset", ["tiny-deepseek-mtp"])
def test_mtp_param_count_matches_built_model(preset):
    cfg = llmarch.presets.get(preset)
    model = nnx.eval_shape(lambda: llmarch.Transformer(cfg, rngs=nnx.Rngs(0)))
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    assert (
        count(nnx.state(model, nnx.Param))
        == accounting.param_count(cfg) + accounting.mtp_param_counts(cfg).total
    )
    assert count(nnx.state(model.mtp, nnx.Param)) == accounting.mtp_param_counts(cfg).total


def test_trainer_logs_mtp_loss_and_checkpoints_the_modules(tmp_path):
    model = _cfg(depth=1)
    run = dict(seq_len=16, batch_size=4, eval_every=1000, eval_batches=1, log_every=1, progress=False)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), model=model, steps=2, tensorboard=False, **run)
    result = train(cfg, log=lambda s: None)
    records = [r for r in metrics.read(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2] and all(r["mtp_loss"] > 0 for r in records)
    assert not any("mtp_loss_max" in r for r in records)  # a loss term, not a per-layer metric
    _, _, state, _ = restore_run(tmp_path / "run")
    saved = nnx.to_flat_state(state.params)
    assert any(path[0] == "mtp" for path, _ in saved)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(result.params), strict=True):
        np.testing.assert_array_equal(a, b)


def _spec_model(seed=0):
    cfg = ModelConfig(
        vocab_size=48,
        d_model=32,
        num_layers=2,
        ffn_dim=64,
        max_seq_len=64,
        attention=llmarch.AttentionConfig(2, 2, 16),
        init_std=0.5,
        mtp_depth=1,
        name="spec-mtp",
    )
    return llmarch.Transformer(cfg, rngs=nnx.Rngs(seed))


def _greedy(model, prompts, n):
    """Greedy by full recomputation in one fixed [B, 32] buffer (one compile)."""
    buf = np.zeros((len(prompts), 32), np.int32)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
    forward = jax.jit(lambda b: jnp.argmax(model(b), axis=-1))
    for t in range(n):
        nxt = np.asarray(forward(jnp.asarray(buf)))
        for i, p in enumerate(prompts):
            buf[i, len(p) + t] = nxt[i, len(p) + t - 1]
    return [buf[i, len(p) : len(p) + n].tolist() for i, p in enumerate(prompts)]


def _trained_on_a_cycle(model, cycle, steps=30):
    """``model`` after ``steps`` Adam steps (main and MTP loss) on rows cut from ``cycle`` repeated:
    the next and the next-but-one token are both predictable, so the MTP module learns to draft."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(3e-2)
    opt_state, step = tx.init(params), make_train_step(graphdef, tx, mtp_loss_weight=1.0)
    stream = np.tile(cycle, 40)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        starts = rng.integers(0, len(cycle), 8)
        rows = np.stack([stream[s : s + 25] for s in starts]).astype(np.int32)
        batch = {"inputs": jnp.asarray(rows[:, :-1]), "targets": jnp.asarray(rows[:, 1:])}
        params, opt_state, m = step(params, rest, opt_state, batch)
    return nnx.merge(graphdef, params, rest)


def test_mtp_self_speculative_greedy_is_the_models_greedy():
    from llmarch.inference import SamplingParams
    from llmarch.inference.mtp_speculative import MTPSpeculativeDecoder

    cycle = np.random.default_rng(1).permutation(48)[:11]
    model = _trained_on_a_cycle(_spec_model(), cycle)
    spec = MTPSpeculativeDecoder(model)
    prompts = [list(cycle[2:7]), [9], [2, 6]]  # on the cycle, then two off it
    outs = spec.generate(prompts, SamplingParams(max_tokens=9, temperature=0.0))
    assert [o.token_ids for o in outs] == _greedy(model, prompts, 9)
    assert 0 < spec.acceptance_rate < 1  # drafts accepted and rejected: both paths ran
    stop = outs[0].token_ids[4]
    params = [SamplingParams(max_tokens=9, temperature=0.0, stop_token_ids=(stop,))] + [
        SamplingParams(max_tokens=9, temperature=0.0)
    ] * 2
    cut = spec.generate(prompts, params)
    assert cut[0].token_ids == outs[0].token_ids[: outs[0].token_ids.index(stop) + 1]
    assert cut[0].finish_reason == "stop" and [o.token_ids for o in cut[1:]] == [
        o.token_ids for o in outs[1:]
    ]
    sampled = spec.generate(prompts, SamplingParams(max_tokens=5, temperature=1.0, seed=1))
    assert all(len(o.token_ids) == 5 and max(o.token_ids) < 48 for o in sampled)
    with pytest.raises(ValueError, match="mtp_depth=0"):
        MTPSpeculativeDecoder(llmarch.Transformer(llmarch.presets.get("tiny-dense"), rngs=nnx.Rngs(0)))


def test_mtp_loss_on_a_mesh_equals_one_device(devices):
    """Born sharded by the rules (the MTP block's weights with a layers axis, eh_proj [mlp, embed]),
    the MTP loss and its gradients equal the single-device ones."""
    from llmarch import sharding

    cfg = _cfg(depth=1)
    batch = {k: jnp.concatenate([v, v[::-1]]) for k, v in _batch(cfg).items()}  # 4 rows: data x fsdp
    graphdef, params, rest = nnx.split(llmarch.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

    def grads(graphdef, params, rest, batch):
        f = lambda p: loss_fn(graphdef, p, rest, batch, loss_chunk=64, mtp_weight=0.3)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (ref, ref_parts), ref_grads = grads(graphdef, params, rest, batch)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    with sharding.use(mesh, "fsdp_tp"):
        sharded_graphdef, p, r = nnx.split(llmarch.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
        assert "tensor" in str(p["mtp"][0]["eh_proj"]["w"].get_value().sharding.spec)
        on_mesh = jax.device_put(batch, sharding.batch_sharding(mesh, "fsdp_tp"))
        (loss, parts), g = grads(sharded_graphdef, p, r, on_mesh)
    np.testing.assert_allclose(parts["mtp_loss"], ref_parts["mtp_loss"], rtol=1e-5)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_without_mtp_drops_the_modules_and_keeps_the_logits():
    from llmarch.model import without_mtp

    model = llmarch.Transformer(_cfg(depth=1), rngs=nnx.Rngs(0))
    plain = without_mtp(model)
    assert plain.mtp is None and plain.cfg.mtp_depth == 0 and "mtp" not in nnx.state(plain)
    tokens = jnp.arange(T)[None] % 300
    np.testing.assert_array_equal(plain(tokens), model(tokens))
    assert model.mtp is not None  # the original keeps them


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(mtp_loss_weight=0.0), "mtp_loss_weight=0.0 gives them no loss, yet weight decay"),
        (
            dict(mtp_loss_weight_later=0.0, mtp_loss_weight_step=5),
            "mtp_loss_weight_later=0 ends their loss",
        ),
        (dict(lora=LoraConfig(rank=4)), "LoRA adapts the decoder only"),
    ],
)
def test_runs_that_would_leave_mtp_modules_untrained_are_refused(tmp_path, changes, match):
    """Refused before any data is read or anything compiles (``TrainConfig.check_mtp_training``)."""
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), preset="tiny-deepseek-mtp", steps=1, **changes)
    with pytest.raises(ValueError, match=match):
        train(cfg)
    assert not (tmp_path / "run").exists()
    TrainConfig(out_dir="x", preset="tiny-deepseek", mtp_loss_weight=0.0).check_mtp_training()  # no MTP


def test_quantize_and_prune_refuse_mtp_modules_they_do_not_cover():
    from llmarch.model import Transformer, without_mtp
    from llmarch.prune import PruneConfig, prune
    from llmarch.quant import QuantConfig, quantize

    cfg = llmarch.presets.get("tiny-deepseek-mtp")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"mtp_depth=1: quantize does not cover multi-token-prediction"):
        quantize(model, cfg, QuantConfig(method="rtn", bits=8), progress=False)
    with pytest.raises(ValueError, match=r"mtp_depth=1: prune does not cover"):
        prune(model, cfg, PruneConfig(method="magnitude", sparsity=0.5), progress=False)
    plain = without_mtp(model)
    assert quantize(plain, plain.cfg, QuantConfig(method="rtn", bits=8), progress=False) is not None
