"""Which GEMMs an FP8 precision policy (``llmarch.train.precision``) runs in FP8, and switching them.

DeepSeek-V3 (§3.3.1) runs the linear GEMMs of its blocks in FP8 and keeps in higher precision the
parts whose error it found the model sensitive to: the embedding, the output head, the MoE gating,
the norms and the attention operators. Here the targets are therefore exactly the ``Einsum``
layers *called as linears* by a block's attention (``Attention``, ``MLA``: the q/k/v/o and MLA's
down/up projections) and its SwiGLU FFNs (dense FFNs and MoE shared experts). Left in the compute
dtype: the embedding and ``lm_head`` (outside the blocks), the MoE router (``MoE.route`` reads its
weight with a float32 einsum, never calling the layer), the routed experts (a grouped matmul over
``[E, D, F]`` arrays, not an ``Einsum`` call: FP8 grouped GEMMs are not done yet), the memory
layers' projections and tables, norms, softmax and losses.

The switch is a static attribute ``Einsum.fp8`` (the recipe's name), so it lives in the model's
graphdef: a jitted step traced for an FP8 model cannot be reused for a plain one, and the
parameters (and so optimizer state) are the same as without FP8. The ``"delayed"`` recipe
(``llmarch.quant.fp8_delayed``) also gives each target an ``fp8_meta`` variable, its amax
histories (``[L, 3, H]`` in a scanned run), which the train step carries and checkpoints keep.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from llmarch.layers.attention import Attention
from llmarch.layers.einsum import Einsum
from llmarch.layers.ffn import SwiGLU
from llmarch.layers.mla import MLA
from llmarch.model import BlockRun
from llmarch.quant import fp8_delayed
from llmarch.quant.fp8_linear import RECIPES as STATELESS_RECIPES

RECIPES = (*STATELESS_RECIPES, fp8_delayed.RECIPE)  # the recipes an Einsum layer can take

_PARENTS = (Attention, MLA, SwiGLU)  # the modules whose linear layers run in FP8


def targets(model: nnx.Module) -> list[str]:
    """Paths (``"runs/0/layers/ffn/w_up_df"``) of the ``Einsum`` layers an FP8 policy switches.

    Raises ValueError when a linear layer of those modules is not a plain ``Einsum`` (a LoRA,
    low-rank or quantized layer would keep computing in its own way, silently outside FP8), or when
    the model has no such layer at all."""
    modules = dict(nnx.iter_modules(model))
    found = []
    for path, module in modules.items():
        if not path or not isinstance(modules.get(path[:-1]), _PARENTS) or not _is_linear(path[-1]):
            continue
        where = "/".join(map(str, path))
        if type(module) is not Einsum:
            raise ValueError(
                f"an FP8 precision policy cannot take the layer {where} ({type(module).__name__}): it "
                "switches plain Einsum layers only; train this model with 'bf16' or 'float32'"
            )
        found.append(where)
    if not found:
        raise ValueError(
            "an FP8 precision policy found no attention or FFN linear layer to run in FP8 in this model"
        )
    return found


def install(model: nnx.Module, recipe: str, *, history: int = fp8_delayed.DEFAULT_HISTORY) -> list[str]:
    """Sets ``recipe`` (one of ``RECIPES``) on ``targets(model)``, in place; returns their paths.

    ``"delayed"`` also gives each target a fresh ``FP8Meta`` of ``history`` steps (ValueError
    unless 1..``fp8_delayed.MAX_HISTORY``); the other recipes ignore ``history``."""
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe={recipe!r} is unknown; allowed: {RECIPES}")
    if recipe == fp8_delayed.RECIPE:
        fp8_delayed.check_history(history)
    paths = targets(model)
    for path in paths:
        layer = _walk(model, path)
        layer.fp8 = recipe
        if recipe == fp8_delayed.RECIPE:
            layer.fp8_meta = fp8_delayed.init_meta(history, _stacked(model, path))
    return paths


def _stacked(model: nnx.Module, path: str) -> tuple[int, ...]:
    """``(L,)`` when the layer at ``path`` lives in a scanned ``BlockRun`` (its variables carry a
    leading layers axis), else ``()``."""
    keys = path.split("/")
    for i in range(len(keys) - 1):
        node = _walk(model, "/".join(keys[:i])) if i else model
        if isinstance(node, BlockRun) and keys[i] == "layers" and not isinstance(node.layers, nnx.List):
            return (node.count,)
    return ()


def _is_linear(name: Any) -> bool:
    return isinstance(name, str) and name.startswith("w_")


def _walk(model: nnx.Module, path: str) -> Any:
    node = model
    for key in path.split("/"):
        node = node[int(key)] if key.isdigit() else getattr(node, key)
    return node
