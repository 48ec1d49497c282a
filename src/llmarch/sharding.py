"""Meshes, logical-axis rules, and the shardings of model state, batches and activations.

Model code names logical axes (``llmarch.axes``); the rules here map them to the mesh axes
``data, fsdp, tensor, expert, stage``, and ``context`` where a spec names it (context parallelism:
the sequence split over it, attention as a ring, ``llmarch.ring_attention``). Every mesh axis is
``Auto``: the compiler propagates shardings between the constraints that we place at block
boundaries, and shardings are not part of array types (with Explicit axes every op's sharding must
type-check, which fights einsum-heavy model code; shard_map regions reshard their inputs themselves).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from llmarch import axes

MESH_AXES = ("data", "fsdp", "tensor", "expert", "stage")
# Context parallelism's axis. A mesh has it only when its spec names it, so a mesh without it keeps
# the five axes that code and tests index by position; it comes last, so the five keep their
# devices and ring neighbours are adjacent devices.
CONTEXT = "context"
OPTIONAL_AXES = (CONTEXT,)

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

_DATA = ("data", "fsdp")  # the batch is split over every axis that holds no model dimension
_UNSHARDED = {name: None for name in axes.PARAM_AXES + axes.ACTIVATION_AXES}
_FSDP = {axes.EMBED: "fsdp"}
_TP = {
    axes.HEADS: "tensor",
    axes.KV_HEADS: "tensor",
    axes.MLP: "tensor",
    axes.VOCAB: "tensor",
    axes.ACT_HEADS: "tensor",
}
_EP = {axes.EXPERT: "expert"}
# Memory-layer value tables (llmarch.layers.memory_sharded) split their rows as tensor parallelism
# splits FFN hidden units, and as expert parallelism splits the experts.
_TP[axes.MEMORY_ROWS] = "tensor"
_EP[axes.MEMORY_ROWS] = "expert"
# Context parallelism: every activation's sequence split over ``context``; attention is a ring
# (llmarch.ring_attention), everything else in a block is per token.
_CP = {axes.SEQ: CONTEXT}
# Megatron sequence parallelism (Korthikanti et al. 2022): the residual stream between sublayers split
# over tensor along the sequence, so norms and residual adds run on T/n tokens and tensor-parallel
# layers gather and scatter the sequence themselves; meant for ModelConfig.collective_matmul, whose
# rings do that (llmarch.collective_matmul); without it XLA chooses the collectives.
_SP = {axes.SEQ: "tensor"}


def _rules(*parts: Mapping[str, str | tuple[str, ...] | None], batch=_DATA) -> Rules:
    table = dict(_UNSHARDED, **{axes.BATCH: batch})
    for part in parts:
        table.update(part)
    return tuple(table.items())


RULES: dict[str, Rules] = {
    "dp": _rules(),
    "fsdp": _rules(_FSDP),
    "tp": _rules(_TP),
    "fsdp_tp": _rules(_FSDP, _TP),
    "tp_sp": _rules(_TP, _SP),
    "fsdp_tp_sp": _rules(_FSDP, _TP, _SP),
    "ep": _rules(_EP, batch=(*_DATA, "expert")),
    "hybrid": _rules(_FSDP, _TP, _EP, batch=(*_DATA, "expert")),
    # One serving replica (llmarch.inference.placement): the model split, the weights never
    # gathered per step (no FSDP); tokens spread over expert for the expert-parallel MoE layer.
    "serve": _rules(_TP, _EP, batch=(*_DATA, "expert")),
    "cp": _rules(_CP),
    "fsdp_cp": _rules(_FSDP, _CP),
}


def rules(name: str) -> Rules:
    """The logical-axis rules preset ``name`` (one of ``RULES``)."""
    if name not in RULES:
        raise ValueError(f"rules={name!r} is unknown; allowed: {sorted(RULES)}")
    return RULES[name]


def with_stage_layers(table: Rules | str) -> Rules:
    """``table`` with the stacked ``layers`` axis of scanned blocks split over ``stage``: under
    pipeline parallelism (``llmarch.pipeline``) each stage's layers, and their optimizer state,
    live on that stage's devices only."""
    table = rules(table) if isinstance(table, str) else table
    return tuple((name, "stage" if name == axes.LAYERS else target) for name, target in table)


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """``"data=2,fsdp=2,tensor=2"`` -> ``{"data": 2, "fsdp": 2, "tensor": 2}``, validated."""
    if isinstance(spec, str):
        sizes: dict[str, int] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, eq, size = item.partition("=")
            if not eq or not size.strip().isdigit():
                raise ValueError(f"mesh spec item {item!r} is invalid: expected NAME=SIZE, e.g. data=2")
            if name.strip() in sizes:
                raise ValueError(f"mesh axis {name.strip()!r} is given twice in {spec!r}")
            sizes[name.strip()] = int(size)
    else:
        sizes = dict(spec)
    for name, size in sizes.items():
        if name not in MESH_AXES + OPTIONAL_AXES:
            raise ValueError(f"mesh axis {name!r} is unknown; allowed: {MESH_AXES + OPTIONAL_AXES}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh axis {name}={size!r} is invalid: must be a positive integer")
    return sizes


def fit_mesh_spec(spec: str | Mapping[str, int], device_count: int | None = None) -> dict[str, int]:
    """``spec`` shrunk or grown to ``device_count`` devices (default: all of ``jax.devices()``), so
    code written for one mesh runs on a laptop, a one-GPU Colab runtime or a pod slice.

    Each axis, in ``spec``'s order, keeps the largest divisor of its size that the devices left
    allow; devices left over go to the first axis (data parallelism, which any model admits).
    ``{"data": 2, "fsdp": 2, "tensor": 2}`` on 8 devices is itself, on 4 is data=2,fsdp=2,tensor=1,
    on 1 is all ones, and on 16 is data=4,fsdp=2,tensor=2.
    """
    sizes = parse_mesh_spec(spec)
    left = len(jax.devices()) if device_count is None else device_count
    if not isinstance(left, int) or left < 1:
        raise ValueError(f"device_count={device_count!r} is invalid: must be a positive integer")
    fitted = {}
    for name, size in sizes.items():
        fitted[name] = math.gcd(size, left)
        left //= fitted[name]
    first = next(iter(fitted), "data")
    fitted[first] = fitted.get(first, 1) * left
    return fitted


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with all five axes of ``MESH_AXES`` (those not in ``spec`` have size 1), then the
    optional ones that ``spec`` names (``context``), every axis ``Auto``."""
    sizes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    names = MESH_AXES + tuple(name for name in OPTIONAL_AXES if name in sizes)
    shape = tuple(sizes.get(name, 1) for name in names)
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh {sizes} needs {math.prod(shape)} devices but {len(devices)} are given; "
            "the product of the axis sizes must equal the device count"
            + (
                " (on a CPU, simulate devices: XLA_FLAGS=--xla_force_host_platform_device_count="
                f"{math.prod(shape)} in the environment before jax starts)"
                if devices[0].platform == "cpu"
                else ""
            )
        )
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


@contextlib.contextmanager
def use(mesh: Mesh, rules_: Rules | str) -> Iterator[None]:
    """Activates ``mesh`` and ``rules_``: modules built inside are born sharded."""
    table = rules(rules_) if isinstance(rules_, str) else rules_
    with jax.set_mesh(mesh), nnx.logical_axis_rules(table):
        yield


def ambient() -> tuple[AbstractMesh, Rules]:
    """The mesh and logical-axis rules in effect (set by ``use``, or by ``jax.set_mesh`` and
    ``nnx.logical_axis_rules``): the one lookup that layers and the model make. An empty mesh or
    no rules means unsharded."""
    return jax.sharding.get_abstract_mesh(), tuple(flax_spmd.get_logical_axis_rules())


def spec_axes(entry: str | Sequence[str] | None) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (or one rules target): None, a mesh axis name or a
    tuple of them, as a tuple (``None -> ()``, ``"tensor" -> ("tensor",)``)."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def logical_axes_on_mesh(
    logical: str, mesh: Mesh | AbstractMesh | None = None, table: Rules | str | None = None
) -> tuple[str, ...]:
    """The axes of ``mesh`` that ``table`` maps the logical axis ``logical`` to (its entry of
    ``logical_to_spec``); by default the ambient mesh and rules (``ambient``). () with an empty
    mesh or no rules: unsharded."""
    if mesh is None or table is None:
        ambient_mesh, ambient_table = ambient()
        mesh = ambient_mesh if mesh is None else mesh
        table = ambient_table if table is None else table
    if mesh.empty or not table:
        return ()
    table = rules(table) if isinstance(table, str) else table
    return spec_axes(logical_to_spec((logical,), table, mesh.axis_names)[0])


def batch_axes(batch: int, exclude: str | None = None) -> tuple[str, ...]:
    """The ambient mesh axes that the ambient rules split a batch of ``batch`` rows over, less
    ``exclude`` (a ring's own axis), or () where they do not divide ``batch``: the axes a
    ``shard_map`` around a ring makes manual too, so that each device works on its own rows only."""
    mesh = jax.sharding.get_abstract_mesh()
    found = tuple(a for a in logical_axes_on_mesh(axes.BATCH, mesh) if a != exclude)
    return found if batch % math.prod(mesh.shape[a] for a in found) == 0 else ()


def logical_to_spec(names: Sequence[str | None], table: Rules, mesh_axes: Sequence[str]) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec over the axes that ``mesh_axes`` has.

    A mesh axis serves at most one dimension: where two dimensions map to the same axis, the
    first keeps it and the later one is replicated.
    """
    lookup = dict(table)
    used: set[str] = set()
    spec = []
    for name in names:
        if name is not None and name not in lookup:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(lookup)}")
        targets = spec_axes(lookup.get(name) if name is not None else None)
        kept = tuple(t for t in targets if t in mesh_axes and t not in used)
        used.update(kept)
        spec.append(kept[0] if len(kept) == 1 else (kept or None))
    return PartitionSpec(*spec)


def _check_divisible(
    path: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh | AbstractMesh
) -> None:
    for dim, (size, entry) in enumerate(zip(shape, spec, strict=False)):
        mesh_axes = spec_axes(entry)
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        if size % ways:
            raise ValueError(
                f"{path}: dimension {dim} of shape {shape} has size {size}, which the mesh axes "
                f"{mesh_axes} (x{ways}) do not divide; change the config or the mesh/rules"
            )


def state_shardings(state: nnx.State, mesh: Mesh | AbstractMesh, table: Rules | str) -> nnx.State:
    """The NamedSharding of every variable in ``state``, from its ``sharding_names``."""
    table = rules(table) if isinstance(table, str) else table

    def one(path, var):
        names = var.get_metadata().get("out_sharding") or (None,) * np.ndim(var.get_value())
        spec = logical_to_spec(names, table, mesh.axis_names)
        _check_divisible(jax.tree_util.keystr(path), np.shape(var.get_value()), spec, mesh)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: Mesh, table: Rules | str) -> nnx.State:
    """Places ``state`` on ``mesh`` according to ``table`` (outside jit)."""
    return jax.device_put(state, state_shardings(state, mesh, table))


def place(state: nnx.State) -> nnx.State:
    """``state`` on the default device, or sharded by its variables' logical names on the mesh of
    an enclosing ``use(mesh, rules)``: where a loader puts the weights it has just read."""
    mesh, table = ambient()
    if mesh.empty or not table:
        return jax.device_put(state)
    return shard_state(state, jax.sharding.get_mesh(), table)


def constrain_state(state: nnx.State, mesh: Mesh | AbstractMesh, table: Rules | str) -> nnx.State:
    """Shards ``state`` as ``table`` says, eagerly or under a trace (Auto mesh axes)."""
    shardings = state_shardings(state, mesh, table)
    return jax.tree.map(jax.lax.with_sharding_constraint, state, shardings)


def batch_sharding(mesh: Mesh, table: Rules | str, ndim: int = 2) -> NamedSharding:
    """Sharding of a ``[B, ...]`` input: the batch over the data axes, the rest replicated."""
    table = rules(table) if isinstance(table, str) else table
    return NamedSharding(mesh, logical_to_spec((axes.BATCH,) + (None,) * (ndim - 1), table, mesh.axis_names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical names; a no-op with no mesh or rules."""
    mesh, table = ambient()
    if mesh.empty or not table:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, table, mesh.axis_names))
