"""LLaVA (Liu et al. 2023, "Visual Instruction Tuning"): a vision tower's tokens, projected, stand in
for placeholder tokens of a decoder's input.

``pixel_values [N,C,image,image]`` -> SigLIP tower -> hidden states of ``vision_feature_layer``
``[N,T,d]`` (HF's ``hidden_states[layer]``: the embeddings, then each block's output before the final
LayerNorm) -> (``"default"`` strategy: drop the first token, CLIP's CLS; ``"full"``: keep all) ->
2-layer MLP projector ``[N,P,D]`` -> written, image after image, over the positions of
``image_token_id`` in ``tokens [B,T]`` (HF's ``masked_scatter``: row-major over ``[B,T]``) -> the
llmarch decoder from its input embeddings on (``Transformer(..., embeddings=)``), causal over the
whole sequence, image tokens included, as in HF's LLaVA.

The placeholders are ordinary vocabulary ids, so the decoder's token checks and embedding lookup take
them unchanged; their embeddings are then overwritten.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmarch import axes
from llmarch.checks import check_choice, check_int, fail
from llmarch.config import ModelConfig
from llmarch.layers.einsum import Einsum, param
from llmarch.model import Transformer
from llmarch.model import check_inputs as check_tokens
from llmarch.vision.config import VisionConfig
from llmarch.vision.siglip import SiglipVision, check_pixels

STRATEGIES = ("default", "full")  # HF's vision_feature_select_strategy
# HF's projector_hidden_act names: "gelu" is exact (erf), "gelu_pytorch_tanh" the tanh approximation.
PROJECTOR_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """A LLaVA model: ``vision`` tower, ``text`` decoder, and how the two meet.

    Attributes:
      image_token_id: the placeholder id in ``tokens``; each image fills ``image_tokens`` of them.
      vision_feature_layer: which of the tower's ``num_layers + 1`` hidden states the projector reads
        (a Python index: -2, LLaVA's choice, is the input of the last block).
      vision_feature_select_strategy: ``"default"`` drops the first token of each image, as HF does
        (for CLIP's CLS token; a SigLIP tower has none, so it drops a patch), ``"full"`` keeps all.
        SigLIP-based checkpoints use ``"full"``.
      projector_activation: the projector MLP's activation (HF ``projector_hidden_act``).
      projector_bias: whether the projector's linears have biases (HF ``multimodal_projector_bias``).
    """

    vision: VisionConfig
    text: ModelConfig
    image_token_id: int
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "full"
    projector_activation: str = "gelu"
    projector_bias: bool = True

    def __post_init__(self):
        if not isinstance(self.vision, VisionConfig):
            fail("LlavaConfig", "vision", type(self.vision).__name__, "must be a VisionConfig")
        if not isinstance(self.text, ModelConfig):
            fail("LlavaConfig", "text", type(self.text).__name__, "must be a ModelConfig")
        if self.vision.use_head:
            fail(
                "LlavaConfig",
                "vision.use_head",
                True,
                "LLaVA reads the tower's tokens, never its pooled vector; allowed: False",
            )
        check_int("LlavaConfig", "image_token_id", self.image_token_id, low=0, high=self.text.vocab_size - 1)
        L = self.vision.num_layers
        check_int("LlavaConfig", "vision_feature_layer", self.vision_feature_layer, low=-(L + 1), high=L)
        check_choice(
            "LlavaConfig", "vision_feature_select_strategy", self.vision_feature_select_strategy, STRATEGIES
        )
        check_choice("LlavaConfig", "projector_activation", self.projector_activation, PROJECTOR_ACTIVATIONS)
        if not isinstance(self.projector_bias, bool):
            fail("LlavaConfig", "projector_bias", self.projector_bias, "must be True or False")
        if self.image_tokens > self.text.max_seq_len:
            fail(
                "LlavaConfig",
                "vision",
                f"{self.image_tokens} tokens per image",
                f"one image must fit text.max_seq_len={self.text.max_seq_len}",
            )

    @property
    def image_tokens(self) -> int:  # P
        """Placeholder tokens (projected features) per image."""
        return self.vision.num_patches - (self.vision_feature_select_strategy == "default")

    def replace(self, **changes) -> LlavaConfig:
        return dataclasses.replace(self, **changes)


class Projector(nnx.Module):
    """HF's ``LlavaMultiModalProjector``: ``linear_2(act(linear_1(x)))``, the tower's width ``d`` to
    the decoder's ``D`` (the hidden width ``F`` is ``D`` too). Named after HF's ``linear_1/2``: the
    tower and decoder each write their width ``D``, so this one module needs both ``d`` and ``D``."""

    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
        d, D = cfg.vision.hidden_size, cfg.text.d_model
        pd, init = jnp.dtype(cfg.text.param_dtype), nnx.initializers.normal(cfg.text.init_std)
        self.linear_1 = Einsum((d, D), (None, axes.MLP), rngs=rngs, init=init, param_dtype=pd)  # [d,F]
        self.linear_2 = Einsum((D, D), (axes.MLP, axes.EMBED), rngs=rngs, init=init, param_dtype=pd)  # [F,D]
        bias = cfg.projector_bias
        self.b_1_f = param(jnp.zeros((D,), pd), (axes.MLP,)) if bias else None
        self.b_2_d = param(jnp.zeros((D,), pd), (axes.EMBED,)) if bias else None
        self.tanh = cfg.projector_activation == "gelu_pytorch_tanh"

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B,T,d]`` (B images of T tokens) -> ``[B,T,D]``."""
        h = self.linear_1("BTd,dF->BTF", x)
        if self.b_1_f is not None:
            h = h + self.b_1_f[...].astype(h.dtype)
        h = jax.nn.gelu(h, approximate=self.tanh)
        y = self.linear_2("BTF,FD->BTD", h)
        return y if self.b_2_d is None else y + self.b_2_d[...].astype(y.dtype)


def check_inputs(cfg: LlavaConfig, tokens, images) -> None:
    """One-line ValueErrors for inputs that cannot pair up. Shapes are checked always (they are static
    while tracing); the placeholder count only when ``tokens`` is concrete, so under ``jax.jit`` call
    this first, on the host: inside, a missing image would silently repeat the last features."""
    check_tokens(cfg.text, tokens)
    if images is not None:
        check_pixels(images, cfg.vision)
        if images.shape[0] == 0:
            raise ValueError(f"images has shape {images.shape}, no image: pass images=None instead")
    if isinstance(tokens, jax.core.Tracer):
        return
    found = int(np.sum(np.asarray(tokens) == cfg.image_token_id))
    P = cfg.image_tokens
    if images is None:
        if found:
            raise ValueError(
                f"tokens hold {found} image placeholders (id {cfg.image_token_id}) but images=None: "
                f"pass pixel_values for {found / P:g} images of {P} tokens each"
            )
        return
    N = images.shape[0]
    if found != N * P:
        raise ValueError(
            f"tokens hold {found} image placeholders (id {cfg.image_token_id}) for {N} images: "
            f"each image needs exactly {P}, so allowed: {N * P}"
        )


class Llava(nnx.Module):
    """``vision`` (SiglipVision), ``projector`` (Projector), ``language_model`` (Transformer).

    ``model(tokens [B,T], images=pixel_values [N,C,H,W]) -> logits [B,T,V]``.
    """

    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, LlavaConfig):
            raise ValueError(f"Llava.cfg={type(cfg).__name__} is invalid: must be a LlavaConfig")
        self.cfg = cfg
        self.vision = SiglipVision(cfg.vision, rngs=rngs)
        self.projector = Projector(cfg, rngs=rngs)
        self.language_model = Transformer(cfg.text, rngs=rngs)

    def image_features(self, images: jax.Array) -> jax.Array:
        """``images [N,C,H,W]`` -> projected features ``[N,P,D]`` in the decoder's compute dtype."""
        cfg = self.cfg
        with jax.named_scope("vision"):
            hidden = self.vision(images, hidden_states=True).hidden_states  # [L+1,N,T,d]
            x = hidden[cfg.vision_feature_layer]  # [N,T,d]
            if cfg.vision_feature_select_strategy == "default":
                x = x[:, 1:]  # [N,P,d]
        with jax.named_scope("projector"):
            return self.projector(x).astype(jnp.dtype(cfg.text.dtype))  # [N,P,D]

    def embed(self, tokens: jax.Array, images: jax.Array | None) -> jax.Array:
        """The decoder's input ``[B,T,D]``: token embeddings with the image features written over the
        placeholders, in order (the k-th placeholder, row-major over ``[B,T]``, takes feature k of
        the flattened ``[N*P,D]``)."""
        dt = jnp.dtype(self.cfg.text.dtype)
        x = self.language_model.embed.encode(tokens, dt)  # [B,T,D]
        if images is None:
            return x
        features = self.image_features(images)
        flat = features.reshape(-1, features.shape[-1])  # [N*P,D]
        mask = tokens == self.cfg.image_token_id  # [B,T]
        index = jnp.cumsum(mask.reshape(-1)) - 1  # [B*T]: the feature each placeholder takes
        picked = jnp.take(flat, jnp.clip(index, 0, flat.shape[0] - 1), axis=0).reshape(x.shape)
        return jnp.where(mask[..., None], picked, x)

    def __call__(self, tokens: jax.Array, *, images: jax.Array | None = None) -> jax.Array:
        """Logits ``[B,T,V]`` of ``tokens [B,T]`` whose ``image_token_id`` placeholders (``P`` per
        image, in order) take the features of ``images [N,C,H,W]`` (HF's ``pixel_values``).

        Raises:
          ValueError: before anything compiles, for images of the wrong shape or a placeholder count
            other than ``N * P`` (see ``check_inputs``).
        """
        check_inputs(self.cfg, tokens, images)
        return self.language_model(tokens, embeddings=self.embed(tokens, images))
