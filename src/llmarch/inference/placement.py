"""Serving on a device mesh: where the engine's weights and page pools live.

One engine is one model replica, so its mesh splits the model, never the requests: attention
and FFN over ``tensor`` (query and KV heads, FFN hidden units, the vocabulary; Megatron's layout),
MoE experts over ``expert``. The rules are ``llmarch.sharding``'s ``"serve"`` preset: tensor and
expert parallelism with the step's tokens spread over ``expert`` (the expert-parallel MoE layer
exchanges tokens between expert shards, as in training). The page pools split their KV heads like
the key and value projections, so each device keeps the cache of its own heads; MLA's latent cache
has no head axis and is replicated. Every step program is traced with the mesh and rules ambient
(``sharding.use``), so the model's activation constraints apply and GSPMD partitions the step.
"""

from __future__ import annotations

import contextlib
import math

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from llmarch import axes, sharding
from llmarch.layers import kinds
from llmarch.layers.paged import PagedKVCache

SERVE_AXES = ("tensor", "expert")
RULES = "serve"


def check_mesh_spec(spec: str | None) -> dict[str, int] | None:
    """``EngineConfig.mesh`` parsed: only ``tensor`` and ``expert`` (a replica splits the model)."""
    if spec is None:
        return None
    try:
        sizes = sharding.parse_mesh_spec(spec)
    except ValueError as e:
        raise ValueError(f"EngineConfig.mesh={spec!r} is invalid: {e}") from None
    other = sorted(set(sizes) - set(SERVE_AXES))
    if other or not sizes:
        raise ValueError(
            f"EngineConfig.mesh={spec!r} is invalid: a serving mesh splits the model over "
            f"{SERVE_AXES} (e.g. 'tensor=2'); {other or 'no axis'} given. Serve more requests "
            "with more engines (replicas), not a data axis"
        )
    return sizes


def serving_mesh(spec: str, devices=None) -> Mesh:
    """The mesh of ``EngineConfig.mesh`` over the first devices it needs."""
    sizes = check_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(sizes.values())
    if need > len(devices):
        raise ValueError(
            f"EngineConfig.mesh={spec!r} needs {need} devices but {len(devices)} exist "
            "(on CPU, simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N "
            "before jax is imported)"
        )
    return sharding.make_mesh(sizes, devices[:need])


def place_model(model, mesh: Mesh):
    """A copy of ``model`` whose parameters are sharded over ``mesh``; ``model`` stays as it is.

    Raises:
      ValueError: naming the weight, when a mesh axis does not divide the dimension it splits
        (e.g. 2 KV heads over tensor=4).
    """
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, sharding.shard_state(state, mesh, RULES))


def place_pools(names: tuple[str, ...], pools: list, mesh: Mesh) -> list:
    """The page pools on ``mesh``: KV pools ``[L,P,page,K,...]`` split over their KV heads."""
    table = sharding.rules(RULES)

    def put(kind: str, x: jax.Array) -> jax.Array:
        cache = kinds.attention(kind).paged_cache
        heads = isinstance(cache, type) and issubclass(cache, PagedKVCache)  # MLA's latent: no heads
        names_ = (None, None, None, axes.KV_HEADS) if heads else ()
        names_ = names_ + (None,) * (x.ndim - len(names_))
        spec = sharding.logical_to_spec(names_, table, mesh.axis_names)
        return jax.device_put(x, NamedSharding(mesh, spec))

    return [tuple(put(kind, x) for x in pool) for kind, pool in zip(names, pools, strict=True)]


def ambient(mesh: Mesh | None):
    """The context the step programs run in: the mesh and the serving rules, or nothing."""
    return contextlib.nullcontext() if mesh is None else sharding.use(mesh, RULES)
