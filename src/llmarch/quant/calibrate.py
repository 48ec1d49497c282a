"""Calibration for GPTQ and AWQ: the model walked one unit (block) at a time on token rows.

Both methods quantize a block from the statistics of its linears' inputs on calibration data:
GPTQ from each input's Hessian ``H = Σ x xᵀ``, AWQ from its mean magnitude per channel and from
the block's output. As in the GPTQ paper, blocks are quantized in order and each block's inputs
come from the blocks before it *already quantized*, so a block corrects the error it inherits.

The walk runs a copy of the model with its layers unstacked (``with_unstacked_layers``): a unit
is one ``Block`` of a run, a skip module, or the LM head (with ``include_lm_head``), each called
on the hidden states of every calibration row, a batch at a time, jitted once per unit shape. An
algorithm turns a ``Unit`` into quantized tensors, writes their dequantized values back into the
copy (so the next unit sees the quantized model) and returns them; ``walk`` then stacks each
run's layers and installs them in the model being quantized. The statistics are recorded by
wrapping ``Einsum.__call__`` (and ``MoE.experts``, whose experts are arrays, not calls) while a
unit is traced: each linear's input is put in its matrix layout ``[n, K]`` and reduced inside
the jitted function, so only ``[K, K]`` sums ever leave it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from llmarch.config import ModelConfig
from llmarch.layers.einsum import Einsum
from llmarch.layers.moe import MoE
from llmarch.layers.norms import RMSNorm
from llmarch.model import _with_aux, run_layout, segment_positions, with_unstacked_layers
from llmarch.quant.config import QuantConfig
from llmarch.quant.linear import Layout
from llmarch.quant.targets import Linear
from llmarch.quant.tensor import QuantizedTensor
from llmarch.quant.tensor import quantize as quantize_tensor

_TAG = "_calib_tag"  # a static attribute: a module's path in its unit, while a unit is traced
MIN_ROWS = 8  # fewer calibration sequences than this estimate a Hessian too poorly to be useful


@dataclasses.dataclass
class Stats:
    """What calibration saw at one linear's input, in its matrix layout ``[*batch, K, N]``.

    Attributes:
      hessian: ``Σ x xᵀ`` float32 ``[*batch, K, K]`` over the tokens it saw.
      abs_sum: ``Σ |x|`` float32 ``[*batch, K]``.
      count: tokens seen ``[*batch]`` (MoE experts: the tokens routed to each).
      source: what computed the input: ``"norm:<path>"`` (an RMSNorm of the unit), ``"moe:<path>"``
        (the input of a MoE's experts, which is its norm's output), or None.
    """

    hessian: np.ndarray
    abs_sum: np.ndarray
    count: np.ndarray
    source: str | None = None

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / np.maximum(self.count, 1)[..., None]


@dataclasses.dataclass
class Site:
    """One quantized linear of a unit: its ``Einsum`` in the walk's copy, and where its result goes.

    Attributes:
      path: its path in the unit (``"attention/w_q_dnh"``).
      einsum: the copy's module; ``set`` writes (dequantized) weights into it.
      target: the model's ``Linear`` that takes the result.
      layer: its index along the target's stacked layers axis (None when not stacked).
    """

    path: str
    einsum: Einsum
    target: Linear

    layer: int | None

    @property
    def layout(self) -> Layout:
        return self.target.layout

    def matrix(self) -> np.ndarray:
        """The copy's current weight as float32 ``[*batch, K, N]``."""
        return np.asarray(self.layout.to_matrix(np.asarray(self.einsum.w[...], np.float32)))

    def set(self, m: Any) -> None:
        """Writes the matrix ``m [*batch, K, N]`` back as the copy's weight (its dtype kept)."""
        w = self.einsum.w
        w[...] = jnp.asarray(self.layout.from_matrix(jnp.asarray(m, jnp.float32)), w[...].dtype)


class Unit:
    """A module of the walk's copy, called on the calibration hidden states ``x [S,T,D]``.

    Attributes:
      name: its path in the model (``"runs/0/layers/3"``, ``"skips/0"``, ``"head"``).
      module: the module (a ``Block``, a skip layer, or the final norm with the LM head).
      x: its input for every calibration row ``[S,T,D]``.
      sites: its quantized linears, by path in the unit, in call order.
    """

    def __init__(
        self, name: str, module: nnx.Module, call: Callable, x: jax.Array, sites: dict[str, Site], batch: int
    ):
        self.name, self.module, self.x, self.sites = name, module, x, sites
        self._call, self._batch = call, batch

    def __call__(self, x: jax.Array | None = None, *, rows: int | None = None) -> jax.Array:
        """The unit's output on ``x`` (default its calibration input; ``rows``: the first rows)."""
        x = self.x if x is None else x
        x = x if rows is None else x[:rows]
        graphdef, state = nnx.split(self.module)
        return jnp.concatenate(
            [
                _apply(graphdef, self._call, state, x[i : i + self._batch])
                for i in range(0, len(x), self._batch)
            ]
        )

    def stats(self) -> dict[str, Stats]:
        """Input statistics of every linear the unit calls (quantized or not), by path."""
        layouts = tuple(sorted((path, site.layout) for path, site in self.sites.items()))
        with _tagged(self.module):
            graphdef, state = nnx.split(self.module)
            sources = _sources(graphdef, self._call, state, self.x[: self._batch], layouts)
            total: dict[str, list] = {}
            for i in range(0, len(self.x), self._batch):
                found = _record(graphdef, self._call, state, self.x[i : i + self._batch], layouts)
                for path, parts in found.items():  # summed on the host: no dispatch per add
                    parts = [np.asarray(a, np.float64) for a in parts]
                    if path in total:
                        for acc, a in zip(total[path], parts, strict=True):
                            acc += a
                    else:
                        total[path] = parts
        return {
            path: Stats(*(np.asarray(a, np.float32) for a in parts), source=sources.get(path))
            for path, parts in total.items()
        }


def check_rows(rows: Any, cfg: ModelConfig, method: str) -> np.ndarray:
    """The calibration rows as int32 ``[S,T]``, or a ``ValueError`` saying what is wrong."""
    if rows is None:
        raise ValueError(f"method={method!r} needs calibration data: token rows [samples, seq_len]")
    rows = np.asarray(rows)
    if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(
            f"calibration must be integer token rows [samples, seq_len], got {rows.dtype} {rows.shape}"
        )
    if len(rows) < MIN_ROWS:
        raise ValueError(f"calibration has {len(rows)} rows: {method} needs at least {MIN_ROWS}")
    if rows.shape[1] > cfg.max_seq_len:
        raise ValueError(f"calibration rows of {rows.shape[1]} tokens exceed max_seq_len={cfg.max_seq_len}")
    if rows.min() < 0 or rows.max() >= cfg.vocab_size:
        raise ValueError(
            f"calibration tokens must be in [0, {cfg.vocab_size}), got [{rows.min()}, {rows.max()}]"
        )
    return rows.astype(np.int32)


def walk(
    model: nnx.Module,
    cfg: ModelConfig,
    targets: list[Linear],
    rows: np.ndarray,
    process_unit: Callable[[Unit], dict[str, Any]],
    install: Callable[[Linear, dict[int | None, Any] | None], None],
    *,
    method: str,
    include_head: bool = False,
    batch: int = 8,
    progress: bool = True,
) -> None:
    """Processes ``model``'s ``targets`` unit by unit on the calibration ``rows``.

    ``process_unit(unit)`` returns a result for each of ``unit.sites`` (by path) after writing the
    weights it stands for into the unit (the next units then see them); ``install(target,
    results)`` puts a target's results, by layer (None for an unstacked target), into ``model``,
    and is called with None for a target no unit calls (the embedding table). Float weights the
    process changed besides its sites (norm scales, AWQ's folds) are copied into ``model``.

    Args:
      method: names the process in errors and the progress bar.
      include_head: the LM head (with the final norm) is a unit too.
    """
    rows = check_rows(rows, cfg, method)
    by_path = {t.path: t for t in targets}
    work = with_unstacked_layers(model)
    done: dict[str, dict[int | None, Any]] = {}
    positions = segment_positions(None, rows.shape)[:batch]

    def run(name: str, module: nnx.Module, call: Callable, x: jax.Array, map_path: Callable) -> jax.Array:
        sites = {}
        for path, sub in nnx.iter_modules(module):
            if isinstance(sub, Einsum) and path:
                rel = "/".join(map(str, path))
                target_path, layer = map_path(rel)
                if target_path in by_path:
                    sites[rel] = Site(rel, sub, by_path[target_path], layer)
        unit = Unit(name, module, call, x, sites, batch)
        before = _float_weights(module, sites)
        for rel, result in process_unit(unit).items():
            site = sites[rel]
            done.setdefault(site.target.path, {})[site.layer] = result
        _write_back(model, before, map_path)
        bar.update()
        return unit()

    block_call = lambda m, x: m(x, positions[: len(x)], None)[0]  # noqa: E731
    units = sum(c for _, _, c in run_layout(cfg)) + len(cfg.skip_layers) + bool(include_head)
    with tqdm(total=units, desc=f"{method} blocks", disable=not progress, leave=False) as bar:
        tokens = jnp.asarray(rows)
        x = jnp.concatenate(
            [
                work.embed.encode(tokens[i : i + batch], jnp.dtype(cfg.dtype))
                for i in range(0, len(rows), batch)
            ]
        )
        pending: dict[int, jax.Array] = {}
        for i, (run_module, (_, start, count)) in enumerate(zip(work.runs, run_layout(cfg), strict=True)):
            for k, (skip, (read, add)) in enumerate(zip(work.skips, cfg.skip_layers, strict=True)):
                if read == start:
                    kind = model.skip_kind
                    skip_call = lambda m, x, kind=kind: _with_aux(m(x), kind)[0]  # noqa: E731
                    pending[add] = run(
                        f"skips/{k}", skip, skip_call, x, lambda rel, k=k: (f"skips/{k}/{rel}", None)
                    )
            for layer, block in enumerate(run_module.layers):
                x = run(
                    f"runs/{i}/layers/{layer}",
                    block,
                    block_call,
                    x,
                    lambda rel, i=i, layer=layer: (f"runs/{i}/layers/{rel}", layer),
                )
            if start + count - 1 in pending:
                x = x + pending.pop(start + count - 1)
        if include_head and work.lm_head is not None:
            head = _Head(work.final_norm, work.lm_head)
            run(
                "head", head, lambda m, x: m(x), x, lambda rel: ("lm_head" if rel == "lm_head" else rel, None)
            )
    for t in targets:
        install(t, done.get(t.path))


def walk_quantized(
    model: nnx.Module,
    cfg: ModelConfig,
    qcfg: QuantConfig,
    targets: list[Linear],
    rows: np.ndarray,
    quantize_unit: Callable[[Unit], dict[str, QuantizedTensor]],
    *,
    progress: bool = True,
) -> None:
    """``walk`` for a quantization method: ``quantize_unit`` returns ``QuantizedTensor``s, which
    are installed as ``QuantizedEinsum`` layers (``install_quantized``)."""
    walk(
        model,
        cfg,
        targets,
        rows,
        quantize_unit,
        install_quantized(qcfg),
        method=qcfg.method,
        include_head=qcfg.include_lm_head,
        progress=progress,
    )


def install_quantized(qcfg: QuantConfig) -> Callable[[Linear, dict | None], None]:
    """``walk``'s ``install`` for ``QuantizedTensor`` results: a stacked run's layers restacked;
    a target no unit calls (the embedding table) rounded to nearest."""

    def install(t: Linear, found: dict[int | None, QuantizedTensor] | None) -> None:
        if found is None:
            qt = quantize_tensor(
                t.matrix(), method="rtn", bits=qcfg.bits, group_size=qcfg.group_size, symmetric=qcfg.symmetric
            )
        elif t.lead:
            qt = jax.tree.map(lambda *a: jnp.stack(a), *(found[layer] for layer in range(len(found))))
        else:
            qt = found[None]
        t.install(dataclasses.replace(qt, shape=t.layout.matrix_shape))

    return install


def _float_weights(module: nnx.Module, sites: dict[str, Site]) -> dict[str, tuple[nnx.Variable, Any]]:
    """The unit's float weights a process may change besides its sites (norm scales, linears it
    does not quantize, into which AWQ folds scales): each variable with its value now, by path."""
    found = {}
    for path, sub in nnx.iter_modules(module):
        rel = "/".join(map(str, path))
        if isinstance(sub, RMSNorm):
            found[rel] = (sub.scale, sub.scale.get_value())
        elif isinstance(sub, Einsum) and rel not in sites:
            found[rel] = (sub.w, sub.w.get_value())
    return found


def _write_back(model: nnx.Module, before: dict[str, tuple[nnx.Variable, Any]], map_path: Callable) -> None:
    """Copies into ``model`` the float weights of ``before`` that were assigned since (only those:
    a stacked weight's copy costs the whole stack)."""
    for rel, (var, value) in before.items():
        if var.get_value() is value:
            continue
        target_path, layer = map_path(rel)
        node = model
        for key in target_path.split("/"):
            node = node[int(key)] if key.isdigit() else getattr(node, key)
        target = node.scale if isinstance(node, RMSNorm) else node.w
        new = var[...] if layer is None else target[...].at[layer].set(var[...])
        target[...] = new.astype(target[...].dtype)


class _Head(nnx.Module):
    """The final norm and the LM head, as one unit."""

    def __init__(self, final_norm: RMSNorm, lm_head: Einsum):
        self.final_norm, self.lm_head = final_norm, lm_head

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.lm_head("BTD,DV->BTV", self.final_norm(x))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(graphdef, call, state, x):
    return call(nnx.merge(graphdef, state), x)


@contextlib.contextmanager
def _tagged(module: nnx.Module):
    """Names every Einsum, RMSNorm and MoE of ``module`` by its path (static attributes)."""
    tagged = [(p, m) for p, m in nnx.iter_modules(module) if isinstance(m, (Einsum, RMSNorm, MoE)) and p]
    for path, m in tagged:
        setattr(m, _TAG, "/".join(map(str, path)))
    try:
        yield
    finally:
        for _, m in tagged:
            delattr(m, _TAG)


def _instrumented(graphdef, call, state, x, layouts, sources: dict) -> dict[str, tuple]:
    """Calls the unit with its linears' inputs reduced to moments (returned, by path) and what
    produced each input written into ``sources``."""
    found: dict[str, tuple] = {}
    produced: dict[int, str] = {}  # id of a traced array -> "norm:<path>" / "moe:<path>"
    layouts = dict(layouts)
    originals = Einsum.__call__, RMSNorm.__call__, MoE.experts, MoE.__call__

    shared: dict[tuple, tuple] = {}  # (input, its [n, K] view) -> moments: q/k/v share theirs

    def einsum(self, eqn, xin):
        tag = getattr(self, _TAG, None)
        x_k = _as_rows(eqn, xin, layouts.get(tag))
        if tag is not None and x_k is not None and tag not in found:
            key = (id(xin), _view_key(eqn, layouts.get(tag)))
            if key not in shared:
                shared[key] = _moments(x_k)
            found[tag] = shared[key]
            sources[tag] = produced.get(id(xin))
        return originals[0](self, eqn, xin)

    def norm(self, xin):
        out = originals[1](self, xin)
        tag = getattr(self, _TAG, None)
        if tag is not None:
            produced[id(out)] = f"norm:{tag}"
        return out

    def moe_call(self, xin, **kw):
        tag = getattr(self, _TAG, None)
        if tag is not None and id(xin) in produced:
            sources[tag] = produced[id(xin)]
        return originals[3](self, xin, **kw)

    def experts(self, xf, experts, gates, **kw):
        tag = getattr(self, _TAG, None)
        if tag is not None:
            w = self.weights()
            E = w.gate.shape[0]
            routed = jnp.sum(jax.nn.one_hot(experts, E, dtype=jnp.float32), axis=1)  # [n,E]
            xf32 = xf.astype(jnp.float32)
            h = jax.nn.silu(jnp.einsum("...D,EDF->E...F", xf32, w.gate)) * jnp.einsum(
                "...D,EDF->E...F", xf32, w.up
            )  # flat tokens "...", as in moe_dispatch
            source = sources.get(tag)
            for name, inp in (("w_gate_edf", None), ("w_up_edf", None), ("w_down_efd", h)):
                inp = jnp.broadcast_to(xf32, (E, *xf32.shape)) if inp is None else inp  # [E,n,K]
                m = routed.T[..., None]  # [E,n,1]
                found[f"{tag}/{name}"] = (
                    jnp.einsum("E...K,E...L->EKL", inp * m, inp),
                    jnp.sum(jnp.abs(inp) * m, axis=1),
                    jnp.sum(routed, axis=0),
                )
                sources[f"{tag}/{name}"] = source if name != "w_down_efd" else f"up:{tag}/w_up_edf"
        return originals[2](self, xf, experts, gates, **kw)

    Einsum.__call__, RMSNorm.__call__, MoE.experts, MoE.__call__ = einsum, norm, experts, moe_call
    try:
        call(nnx.merge(graphdef, state), x)
    finally:
        Einsum.__call__, RMSNorm.__call__, MoE.experts, MoE.__call__ = originals
    return found


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def _record(graphdef, call, state, x, layouts):
    return _instrumented(graphdef, call, state, x, layouts, {})


def _sources(graphdef, call, state, x, layouts) -> dict[str, str | None]:
    sources: dict[str, str | None] = {}
    jax.eval_shape(lambda s, x: _instrumented(graphdef, call, s, x, layouts, sources), state, x)
    return sources


def _as_rows(eqn: str, x: jax.Array, layout: Layout | None) -> jax.Array | None:
    """``x`` as ``[n, K]`` in the layout's K order when ``eqn`` contracts the weight's K axes;
    without a layout (a linear not quantized), ``x``'s last axis when that is the contraction."""
    inputs, out = eqn.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    if "." in eqn or any(c in out for c in lhs if c in rhs):
        return None
    if layout is None or layout.batch:
        if rhs[0] != lhs[-1] or sum(c in rhs for c in lhs) != 1:
            return None
        return x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    k_letters = [rhs[p] for p in layout.perm[: layout.contracted]]
    if {c for c in lhs if c in rhs} != set(k_letters):
        return None
    free = [c for c in lhs if c not in rhs]
    order = tuple(lhs.index(c) for c in free + k_letters)
    return jnp.transpose(x, order).reshape(-1, layout.matrix_shape[-2]).astype(jnp.float32)


def _view_key(eqn: str, layout: Layout | None) -> tuple:
    """What fixes the ``[n, K]`` view ``_as_rows`` takes of an input: the input's letters and the
    contracted letters in the layout's order."""
    lhs, rhs = eqn.replace(" ", "").split("->")[0].split(",")
    if layout is None or layout.batch:
        return (lhs, None)
    return (lhs, tuple(rhs[p] for p in layout.perm[: layout.contracted]))


def _moments(x_k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return x_k.T @ x_k, jnp.sum(jnp.abs(x_k), axis=0), jnp.float32(x_k.shape[0])
