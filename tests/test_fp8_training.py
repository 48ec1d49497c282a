"""FP8 training policies: ``llmarch.quant.fp8_linear``'s GEMMs and the ``fp8``/``fp8-tensor`` precisions.

The custom VJP is checked against an explicit computation through ``llmarch.quant.fp8_blockwise``'s
quantizers and reference GEMM (Fprop and Dgrad bit for bit on CPU, where ``llmarch.ops`` runs that
reference; Wgrad, a scan over K chunks, to float32 rounding), a few
training steps against bf16 from the same init and data, and the targets against what DeepSeek-V3
keeps in higher precision (embedding, head, router).
"""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmarch import presets
from llmarch.config import AttentionConfig, MoEConfig, moe_blocks
from llmarch.lora.config import LoraConfig
from llmarch.model import Transformer
from llmarch.quant import fp8_blockwise as fb
from llmarch.quant.fp8_linear import RECIPES, fp8_einsum, fp8_linear
from llmarch.train import fp8, precision
from llmarch.train.config import TrainConfig
from llmarch.train.trainer import train

SMALL = dict(
    seq_len=32, batch_size=4, eval_every=1000, eval_batches=1, log_every=1, progress=False, tensorboard=False
)


def _cfg128(**changes):
    """tiny-dense widened so that the 128 tiles and blocks apply without padding."""
    base = presets.get("tiny-dense")
    attention = AttentionConfig(num_heads=4, num_kv_heads=4, head_dim=32)
    return dataclasses.replace(base, d_model=128, ffn_dim=256, attention=attention, **changes)


def _pad(a, shape):
    return jnp.zeros(shape, a.dtype).at[: a.shape[0], : a.shape[1]].set(a)


def _explicit(x, w, g):
    """``(y, dx, dw)`` of the blockwise recipe written out with fp8_blockwise's own functions,
    padding every operand to 128 multiples by hand."""
    (M, K), N = x.shape, w.shape[1]
    Mp, Kp, Np = (-(-n // 128) * 128 for n in (M, K, N))
    xq, xs = fb.quantize_activation_tiles(_pad(x, (M, Kp)))
    wq, ws = fb.quantize_weight_blocks(_pad(w, (Kp, Np)))
    y = fb.fp8_blockwise_matmul_reference(xq, xs, wq, ws)[:, :N]
    gq, gs = fb.quantize_activation_tiles(_pad(g, (M, Np)))  # Dgrad: dy per token per 128 of N
    wtq, wts = fb.quantize_weight_blocks(_pad(w, (Kp, Np)).T)  # wᵀ in 128×128 blocks
    dx = fb.fp8_blockwise_matmul_reference(gq, gs, wtq, wts)[:, :K]
    xtq, xts = fb.quantize_activation_tiles(_pad(x, (Mp, K)).T)  # Wgrad: xᵀ per 128 tokens
    gtq, gts = fb.quantize_activation_tiles(_pad(g, (Mp, N)).T)  # dyᵀ per 128 tokens
    dw = fb.fp8_blockwise_matmul_reference(xtq, xts, gtq.T, gts.T)
    return y, dx, dw


@pytest.mark.parametrize("shape", [(128, 128, 256), (96, 200, 130)])  # (M, K, N); the second padded
def test_blockwise_vjp_equals_explicit_quantize_and_reference_gemm(shape):
    M, K, N = shape
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (M, K), jnp.float32)
    w = jax.random.normal(kw, (K, N), jnp.float32) * 0.05
    g = jax.random.normal(kg, (M, N), jnp.float32)
    y, vjp = jax.vjp(fp8_linear, x, w)
    dx, dw = vjp(g)
    ey, edx, edw = _explicit(x, w, g)
    for got, want in ((y, ey), (dx, edx)):  # the same float32 operations: bit for bit
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Wgrad's scan sums each chunk in the dot's order: float32 rounding of the output's scale
    np.testing.assert_allclose(np.asarray(dw), np.asarray(edw), rtol=0, atol=1e-6 * float(jnp.abs(edw).max()))
    assert dw.dtype == jnp.float32 and dx.dtype == x.dtype
    # and close to the float32 product (e4m3 keeps 3 mantissa bits: a few % of the output's scale)
    for got, want in ((y, x @ w), (dx, g @ w.T), (dw, x.T @ g)):
        assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < 0.08


def test_zero_padding_is_exact():
    """K=200 padded to 256 by fp8_linear gives what explicitly zero-padded operands give."""
    x = jax.random.normal(jax.random.key(1), (16, 200))
    w = jax.random.normal(jax.random.key(2), (200, 128))
    padded = fp8_linear(_pad(x, (16, 256)), _pad(w, (256, 128)))
    np.testing.assert_array_equal(np.asarray(fp8_linear(x, w)), np.asarray(padded))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("eqn", ["BTD,DNH->BTNH", "BTNH,NHD->BTD", "BTNH,ANH->BTNA"])
def test_fp8_einsum_matches_the_flattened_linear(eqn, recipe):
    shapes = {"B": 2, "T": 8, "D": 128, "N": 2, "H": 64, "A": 128}
    lhs, rhs = eqn.split("->")[0].split(",")
    x = jax.random.normal(jax.random.key(3), [shapes[c] for c in lhs], jnp.bfloat16)
    w = jax.random.normal(jax.random.key(4), [shapes[c] for c in rhs]) * 0.05
    got = fp8_einsum(eqn, x, w, recipe=recipe)
    want = jnp.einsum(eqn, x.astype(jnp.float32), w)
    assert got.dtype == jnp.bfloat16 and got.shape == want.shape
    assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < 0.1
    with pytest.raises(ValueError, match="cannot take eqn"):
        fp8_einsum("BTD,DF->BT", x[..., 0, 0] if x.ndim == 4 else x, w.reshape(128, -1), recipe=recipe)


def _float8_casts(jaxpr) -> int:
    """How many converts to float8_e4m3fn ``jaxpr`` holds, sub-jaxprs (scan bodies, VJPs) included."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "convert_element_type" and eqn.params["new_dtype"] == jnp.float8_e4m3fn:
            count += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _float8_casts(sub)
    return count


def test_targets_leave_embedding_head_router_and_routed_experts_unquantized():
    moe = MoEConfig(num_experts=4, top_k=2, expert_dim=128, num_shared_experts=1)
    model = Transformer(_cfg128(moe=moe, blocks=moe_blocks(2, first_k_dense_replace=1)), rngs=nnx.Rngs(0))
    paths = fp8.install(model, "blockwise")
    names = sorted(p.replace("/layers/", "/") for p in paths)  # a dense block, then a MoE block: two runs
    attention = ["attention/w_k_dkh", "attention/w_o_nhd", "attention/w_q_dnh", "attention/w_v_dkh"]
    ffn = ["w_down_fd", "w_gate_df", "w_up_df"]
    want = [f"runs/0/{n}" for n in attention + [f"ffn/{f}" for f in ffn]]
    assert names == want + [f"runs/1/{n}" for n in attention + [f"ffn/shared/{f}" for f in ffn]]
    assert not any(k in p for p in paths for k in ("lm_head", "embed", "router", "_edf", "_efd"))
    # The forward pass quantizes exactly x and w of each targeted call: two e4m3 casts apiece
    # (the scan body is traced once for the run's layers), none for embedding, head or router.
    tokens = jnp.zeros((1, 8), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda t: model(t))(tokens).jaxpr
    assert _float8_casts(jaxpr) == 2 * len(paths)


def test_policies_and_validation(tmp_path):
    with pytest.raises(ValueError, match=r"allowed: \[.*'fp8', 'fp8-delayed', 'fp8-tensor'"):
        precision.policy("fp8-blocky")
    assert precision.policy("fp8").fp8 == "blockwise" and precision.policy("fp8").compute_dtype == "bfloat16"
    assert precision.FP8_RECIPES == fp8.RECIPES == (*RECIPES, "delayed")
    with pytest.raises(ValueError, match="invalid with lora"):
        TrainConfig(out_dir=str(tmp_path), precision="fp8", lora=LoraConfig())
    from llmarch import lora

    adapted = lora.apply_lora(Transformer(_cfg128(), rngs=nnx.Rngs(0)), LoraConfig(), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="cannot take the layer .*LoRAEinsum"):
        fp8.targets(adapted)


def test_fp8_training_tracks_bf16(tmp_path):
    """A few steps from the same init and data: every loss finite, within 0.5% of bf16's (seen on
    CPU: at most 0.03% for fp8, 0.1% for fp8-tensor), and not bf16's bit for bit (FP8 did run)."""
    losses = {}
    for name in ("bf16", "fp8", "fp8-tensor"):
        cfg = TrainConfig(out_dir=str(tmp_path / name), model=_cfg128(), precision=name, steps=6, **SMALL)
        losses[name] = np.array([v for _, v in sorted(train(cfg, log=lambda s: None).losses.items())])
    print({k: np.round(v, 4).tolist() for k, v in losses.items()})
    for name in ("fp8", "fp8-tensor"):
        assert np.all(np.isfinite(losses[name]))
        np.testing.assert_allclose(losses[name], losses["bf16"], rtol=5e-3)
        assert not np.array_equal(losses[name], losses["bf16"])
    assert losses["fp8"][-1] < losses["fp8"][0]


@pytest.mark.parametrize("shape", [(128, 128, 256), (96, 200, 130)])
def test_chunked_promotion_equals_the_reference_path_to_float32_rounding(shape):
    """``chunked_promotion()`` (Fprop/Dgrad by per-chunk dots, for long CPU experiments) gives the
    default path's y, dx and dw to float32 rounding of the output's scale."""
    from llmarch.quant.fp8_linear import chunked_promotion

    M, K, N = shape
    kx, kw, kg = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(kx, (M, K), jnp.float32)
    w = jax.random.normal(kw, (K, N), jnp.float32) * 0.05
    g = jax.random.normal(kg, (M, N), jnp.float32)
    y, vjp = jax.vjp(fp8_linear, x, w)
    with chunked_promotion():
        cy, cvjp = jax.vjp(fp8_linear, x, w)
        chunked = (cy, *cvjp(g))
    for got, want in zip(chunked, (y, *vjp(g)), strict=True):
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(want), rtol=0, atol=1e-6 * float(jnp.abs(want).max())
        )
