"""``VisionConfig``: the shape of a ViT-style vision tower (SigLIP's), frozen and checked on creation.

Field names follow transformers' ``SiglipVisionConfig`` (``image_size``, ``patch_size``, ...) so
that the Hugging Face mapping in ``llmarch.vision.hf`` is one line per field; ``num_layers`` and
``num_heads`` are the two renamed ones (``num_hidden_layers``, ``num_attention_heads``).
"""

from __future__ import annotations

import dataclasses

from llmarch.checks import check_choice, check_number, check_positive, fail
from llmarch.config import DTYPES, IMPLS

# transformers' names: "gelu_pytorch_tanh" is GELU with the tanh approximation (SigLIP, Gemma's
# vision towers), "gelu" the exact erf one (CLIP-style towers).
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A SigLIP vision tower: patch embedding, ``num_layers`` pre-LayerNorm encoder blocks, final
    LayerNorm and (``use_head``) the attention-pooling ("MAP") head.

    The defaults are SigLIP-base/16 at 224 pixels. Derived sizes use the axis alphabet: ``T``
    patches (``grid**2``), ``O`` pixels per patch (``num_channels * patch_size**2``), ``H`` head dim.
    """

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768  # D
    intermediate_size: int = 3072  # F
    num_layers: int = 12  # L
    num_heads: int = 12  # N
    layer_norm_eps: float = 1e-6
    activation: str = "gelu_pytorch_tanh"
    use_head: bool = True
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # Attention implementation (llmarch.ops). "xla" by default: patch counts such as 196 or 729
    # seldom tile the flash kernel's blocks, and a tower's attention is a small share of its cost.
    impl: str = "xla"
    init_std: float = 0.02

    def __post_init__(self):
        check_positive(
            "VisionConfig",
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
        )
        if self.image_size % self.patch_size:
            fail(
                "VisionConfig",
                "patch_size",
                self.patch_size,
                f"must divide image_size={self.image_size} (patches do not overlap or pad)",
            )
        if self.hidden_size % self.num_heads:
            fail(
                "VisionConfig",
                "num_heads",
                self.num_heads,
                f"must divide hidden_size={self.hidden_size} (head dim = hidden_size / num_heads)",
            )
        check_number("VisionConfig", "layer_norm_eps", self.layer_norm_eps, "must be in (0, 1)", _unit)
        check_choice("VisionConfig", "activation", self.activation, ACTIVATIONS)
        if not isinstance(self.use_head, bool):
            fail("VisionConfig", "use_head", self.use_head, "must be True or False")
        check_choice("VisionConfig", "dtype", self.dtype, DTYPES)
        check_choice("VisionConfig", "param_dtype", self.param_dtype, DTYPES)
        check_choice("VisionConfig", "impl", self.impl, IMPLS)
        check_number("VisionConfig", "init_std", self.init_std, "must be > 0", lambda v: v > 0)

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:  # T
        return self.grid**2

    @property
    def patch_dim(self) -> int:  # O
        return self.num_channels * self.patch_size**2

    @property
    def head_dim(self) -> int:  # H
        return self.hidden_size // self.num_heads

    def replace(self, **changes) -> VisionConfig:
        return dataclasses.replace(self, **changes)


def _unit(value: float) -> bool:
    return 0 < value < 1
