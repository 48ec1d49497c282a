"""The decoder: embedding, runs of stacked blocks scanned with ``jax.lax.scan``, final norm.

Each layer's attention and FFN kind comes from ``cfg.layer_blocks``; consecutive identical
blocks form a run whose parameters are stacked on a leading ``layers`` axis and scanned, so
compile time does not grow with depth. Kinds are built from their records in
``llmarch.layers.kinds``; a new kind registers there and needs nothing here.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmarch import axes, sharding
from llmarch.checks import check_positive
from llmarch.config import BlockConfig, ModelConfig
from llmarch.layers import kinds, kv_quant
from llmarch.layers.cache import Pooled
from llmarch.layers.einsum import Einsum, use_impl
from llmarch.layers.embed import Embed
from llmarch.layers.mla import MLA, check_path
from llmarch.layers.mtp import build_mtp
from llmarch.layers.norms import RMSNorm

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_ACTIVATION = (axes.BATCH, axes.SEQ, axes.ACT_EMBED)

# Runs of at most this many blocks are unrolled when they run without a cache (training,
# evaluation): a scan keeps the backward pass's residuals in stacked [L,...] buffers that XLA
# zero-fills, copies and slices every step (about 6% of a small Llama's train step on CPU);
# unrolled, they are plain per-layer arrays. Deeper runs stay scanned, so compile time stays
# flat in depth.
UNROLL_MAX_LAYERS = 8


class Block(nnx.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``."""

    def __init__(self, cfg: ModelConfig, block: BlockConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
        self.attention = kinds.build(kinds.attention(block.attention), cfg, rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
        self.ffn_kind = kinds.ffn(block.ffn)  # static: its aux contract
        self.ffn = kinds.build(self.ffn_kind, cfg, rngs)

    def __call__(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, cache: Any = None
    ) -> tuple[jax.Array, tuple[Any, Aux]]:
        """Returns ``(x, (cache, aux))``: the scan carries x and stacks cache and aux per layer."""
        with jax.named_scope("attention"):
            out, cache = self.attention(self.attn_norm(x), positions, segment_ids, cache)
            x = x + out
        with jax.named_scope("ffn"):
            out, aux = _with_aux(self.ffn(self.ffn_norm(x)), self.ffn_kind)
            x = x + out
        return sharding.constrain(x, _ACTIVATION), (cache, aux)


class BlockRun(nnx.Module):
    """``count`` identical blocks whose parameters are stacked on a leading ``layers`` axis."""

    def __init__(self, cfg: ModelConfig, block: BlockConfig, count: int, *, rngs: nnx.Rngs):
        self.count, self.remat, self.block = count, cfg.remat, block

        def init_one(key: jax.Array) -> nnx.State:
            with nnx.use_eager_sharding(False):
                return nnx.state(Block(cfg, block, rngs=nnx.Rngs(params=key)))

        # One jax.vmap over per-layer keys: every layer is initialized as a lone block would be.
        stacked = jax.vmap(init_one)(jax.random.split(rngs.params(), count))

        eager = nnx.using_eager_sharding()

        def add_layer_axis(var: nnx.Variable) -> nnx.Variable:
            names = var.get_metadata().get("out_sharding")
            if names:
                var.set_metadata(out_sharding=(axes.LAYERS, *names))
            var.set_metadata(eager_sharding=eager)  # as if born in this context, like the rest
            return var

        stacked = jax.tree.map(add_layer_axis, stacked, is_leaf=lambda x: isinstance(x, nnx.Variable))
        mesh, table = sharding.ambient()
        if not mesh.empty and table and eager:  # born sharded, like flax's eager variables
            stacked = sharding.constrain_state(stacked, mesh, table)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: _unsharded_block(cfg, block)))
        self.layers = nnx.merge(graphdef, stacked)  # a Block whose every variable has an L axis

    def init_cache(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: jnp.dtype) -> Any:
        """The run's decoding cache: one layer's cache stacked ``count`` times, or for unstacked
        layers (``with_unstacked_layers``) a list of ``count`` separate ones, which each layer
        updates in place (a stacked one would be sliced and stacked anew at every step)."""
        one = kinds.attention(self.block.attention).init_cache(cfg, batch_size, max_len, dtype)
        if isinstance(self.layers, nnx.List):
            return [jax.tree.map(jnp.zeros_like, one) for _ in range(self.count)]
        return jax.tree.map(lambda x: jnp.zeros((self.count, *x.shape), x.dtype), one)

    def __call__(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, cache: Any = None
    ) -> tuple[jax.Array, tuple[Any, Aux]]:
        """Returns ``(x, (cache, aux))`` with cache and aux stacked over the run's layers."""
        if isinstance(self.layers, nnx.List):  # unstacked for serving: see with_unstacked_layers
            return self._unrolled(x, positions, segment_ids, cache)
        graphdef, state = nnx.split(self.layers)
        if isinstance(cache, Pooled):  # pools hold every layer (paged): carried whole, updated in place
            return self._scan_pooled(graphdef, state, x, positions, segment_ids, cache)

        def body(x, layer):
            layer_state, layer_cache = layer
            return nnx.merge(graphdef, layer_state)(x, positions, segment_ids, layer_cache)

        if self.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.remat], prevent_cse=False)
        unroll = cache is None and self.count <= UNROLL_MAX_LAYERS
        return jax.lax.scan(body, x, (state, cache), unroll=self.count if unroll else 1)

    def _scan_pooled(self, graphdef, state, x, positions, segment_ids, cache):
        """The scan for a cache whose pools hold every layer of the run (``cache.for_layer(i)``
        addresses layer i): it rides in the carry, so each layer's writes update the one buffer in
        place instead of slicing it per layer and stacking a new copy, as ``xs``/``ys`` would."""

        def body(carry, layer_state):
            x, cache, i = carry
            x, (cache, aux) = nnx.merge(graphdef, layer_state)(x, positions, segment_ids, cache.for_layer(i))
            return (x, cache, i + 1), aux

        (x, cache, _), aux = jax.lax.scan(body, (x, cache, jnp.int32(0)), state)
        return x, (cache, aux)

    def _unrolled(self, x, positions, segment_ids, cache):
        """The layers one after another (a Python loop): each reads its own parameter arrays."""
        pooled, listed = isinstance(cache, Pooled), isinstance(cache, list)  # listed: init_cache's
        caches, auxes = [], []
        for i, block in enumerate(self.layers):
            if pooled:
                layer_cache = cache.for_layer(jnp.int32(i))
            elif listed:
                layer_cache = cache[i]
            else:
                layer_cache = None if cache is None else jax.tree.map(lambda c, i=i: c[i], cache)
            x, (layer_cache, aux) = block(x, positions, segment_ids, layer_cache)
            cache = layer_cache.for_layer(jnp.int32(i + 1)) if pooled else cache
            caches.append(layer_cache)
            auxes.append(aux)
        if listed:
            cache = caches
        elif not pooled and cache is not None:
            cache = jax.tree.map(lambda *c: jnp.stack(c), *caches)
        return x, (cache, jax.tree.map(lambda *a: jnp.stack(a), *auxes))

    def unstack(self) -> None:
        """Replaces the stacked layers by ``count`` Blocks, each over its own (copied) arrays."""
        graphdef, state = nnx.split(self.layers)
        self.layers = nnx.List(
            [nnx.merge(graphdef, jax.tree.map(lambda v, i=i: v[i], state)) for i in range(self.count)]
        )


class Transformer(nnx.Module):
    """Decoder-only transformer: ``model(tokens [B,T]) -> logits [B,T,V]`` (float32 by default).

    Built under ``llmarch.sharding.use(mesh, rules)`` its parameters are born sharded; with
    no mesh it builds unsharded on the default device.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        mesh, table = sharding.ambient()
        sharded = not mesh.empty and bool(table) and nnx.using_eager_sharding()
        if sharded:  # fail with a clear message before anything is placed on the mesh
            abstract = nnx.eval_shape(lambda: _unsharded_model(cfg))
            sharding.state_shardings(nnx.state(abstract), mesh, table)
        with contextlib.nullcontext() if sharded else nnx.use_eager_sharding(False):
            self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, init_std=cfg.init_std, param_dtype=pd)
            self.runs = nnx.List(
                [BlockRun(cfg, block, count, rngs=rngs) for block, _, count in run_layout(cfg)]
            )
            self.skip_kind = None if cfg.skip_kind is None else kinds.skip(cfg.skip_kind)
            self.skips = nnx.List([kinds.build(self.skip_kind, cfg, rngs) for _ in cfg.skip_layers])
            self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
            self.lm_head = (
                None
                if cfg.tie_embeddings
                else Einsum(
                    (cfg.d_model, cfg.vocab_size),
                    (axes.EMBED, axes.VOCAB),
                    rngs=rngs,
                    init=nnx.initializers.normal(cfg.init_std),
                    param_dtype=pd,
                )
            )
            # Multi-token prediction: each depth's block a one-block run (the decoder's caches,
            # remat and layer-axis sharding), built here since layers do not import the decoder;
            # ``__call__`` never runs them: ``llmarch.mtp`` does, for training and drafting.
            make = lambda: BlockRun(cfg, cfg.mtp_block_config, 1, rngs=rngs)  # noqa: E731
            self.mtp = nnx.data(build_mtp(cfg, make, rngs=rngs))
            if cfg.low_rank is not None:  # weights stored as low-rank factors (llmarch.lowrank)
                from llmarch.lowrank.layer import build_factorized

                build_factorized(self, cfg.low_rank, rngs=rngs, init_std=cfg.init_std, param_dtype=pd)
        use_impl(self, cfg.impl)  # the weight products' ops follow the config as the layers' do

    def init_cache(self, batch_size: int, max_len: int | None = None, dtype: Any = None) -> list:
        """An empty decoding cache for ``batch_size`` sequences of up to ``max_len`` tokens.

        A list with one entry per run of blocks, each that run's per-layer caches stacked on a
        leading layers axis; pass it to ``__call__`` and use the cache it returns. ``dtype``: a
        float dtype, or a ``kv_cache_dtype`` name (``llmarch.layers.kv_quant``: "int8" and
        "fp8_e4m3" store the cache quantized); None: the config's compute dtype.
        """
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        check_positive("", batch_size=batch_size, max_len=max_len)
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds max_seq_len={self.cfg.max_seq_len}")
        dtype = kv_quant.storage_dtype("auto" if dtype is None else dtype, self.cfg.dtype, owner="")
        return [run.init_cache(self.cfg, batch_size, max_len, dtype) for run in self.runs]

    def output_projection(self) -> tuple[jax.Array, bool]:
        """The weight that maps hidden states to logits and whether it is stored ``[D,V]``:
        ``(table [V,D], False)`` with tied embeddings, ``(lm_head [D,V], True)`` otherwise (the
        arguments ``w, transpose_w`` of ``llmarch.ops.cross_entropy``)."""
        if self.lm_head is None:
            return self.embed.table(), False
        return self.lm_head.weight(), True

    def head(self, x: jax.Array) -> jax.Array:
        """The output head: final-normed ``x [B,T,D]`` -> logits ``[B,T,V]`` in ``cfg.logits_dtype``."""
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head("BTD,DV->BTV", x)
        return logits.astype(self.cfg.logits_dtype)

    def aux_sources(self) -> dict[str, nnx.Module]:
        """The module behind each key of the aux that ``__call__`` returns, in the same (layer)
        order: each skip module before the run it reads, each run's FFN (whose variables, like
        its aux, carry the run's layers axis).

        A key is the module's path in this model, its attribute names and list indices joined
        by "/" as in ``nnx.state(model)``: ``"runs/<i>/layers/ffn"`` for run i's FFN,
        ``"skips/<k>"`` for the k-th skip-layer module (``cfg.skip_layers[k]``).
        """
        sources: dict[str, nnx.Module] = {}
        for i, (run, (_, start, _)) in enumerate(zip(self.runs, run_layout(self.cfg), strict=True)):
            for k, (skip, (read, _)) in enumerate(zip(self.skips, self.cfg.skip_layers, strict=True)):
                if read == start:
                    sources[skip_aux_key(k)] = skip
            sources[run_aux_key(i)] = run.layers.ffn
        for k, module in enumerate(self.mtp or ()):  # MTP blocks, when a train step ran them
            sources[mtp_aux_key(k)] = module.block.layers.ffn
        return sources

    def update_state(self, aux: AuxByModule) -> None:
        """Applies the layers' post-step updates of their non-trainable state from ``aux`` of a
        forward pass (e.g. the aux-loss-free expert bias): the module at each key of ``aux``
        (see ``aux_sources``), if it has an ``update_state`` method, gets its own entry. The
        train step calls it after the parameter update.

        Raises:
          KeyError: for a key that names no module of this model that returns aux (every run's FFN
            and every skip module has a key, ``{}`` when it has nothing to report).
        """
        sources = self.aux_sources()
        for key, entry in aux.items():
            if key not in sources:
                raise KeyError(
                    f"aux key {key!r} names no FFN or skip module of this model; known: {sorted(sources)}"
                )
            module = sources[key]
            if hasattr(module, "update_state") and entry:
                module.update_state(entry)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: list | None = None,
        return_aux: bool = False,
        logits_at: jax.Array | None = None,
        return_hidden: bool = False,
        embeddings: jax.Array | None = None,
    ) -> jax.Array | ModelOutput:
        """Logits of ``tokens [B,T]``.

        Args:
          tokens: int ``[B,T]`` token ids in ``[0, V)``.
          positions: int ``[B,T]`` RoPE positions; default: position within the segment.
            With a cache they are also the slots the new keys and values are written to.
          segment_ids: int ``[B,T]`` document ids of packed sequences; tokens attend only
            within their segment. Default: one document per row. Not used with a cache.
          cache: from ``init_cache``; the tokens then attend to everything cached before them.
          return_aux: also return the blocks' auxiliary outputs (router losses and statistics):
            one dict per FFN and skip module (``{}`` for one with nothing to report), keyed by
            its path (``aux_sources``), a scanned run's stacked over its layers; ``aux_loss``
            sums their losses.
          logits_at: int ``[B,J]`` indices into T: compute logits only there (``[B,J,V]``), as a
            serving step does for the last token of each sequence.
          return_hidden: stop before the output projection: a ``ModelOutput`` whose ``hidden``
            holds the final-normed states ``[B,T,D]``, ``trunk`` the states before the final norm
            (``h^0`` of multi-token prediction, ``llmarch.mtp.hidden``) and whose ``logits`` is
            None. The training loss projects them itself, a vocabulary chunk at a time
            (``llmarch.ops.cross_entropy`` with ``output_projection()``), so the ``[B,T,V]``
            logits never exist.
          embeddings: ``[B,T,D]`` input embeddings to use instead of looking ``tokens`` up (which
            still give the shape and are checked): a multimodal model (``llmarch.vision.llava``)
            writes image features over its placeholder tokens' embeddings and passes them here.
        Returns:
          ``[B,T,V]`` logits (float32 unless ``cfg.logits_dtype`` says otherwise) when neither a
          cache nor ``return_aux`` nor ``return_hidden`` is given; otherwise a ``ModelOutput`` of
          the logits (or hidden states), the updated cache (None without one) and the aux (None
          without ``return_aux``).
        """
        check_inputs(self.cfg, tokens, positions, segment_ids, cache)
        if positions is None:
            positions = segment_positions(segment_ids, tokens.shape)
        if embeddings is None:
            x = self.embed.encode(tokens, jnp.dtype(self.cfg.dtype))
        elif np.shape(embeddings) != (*np.shape(tokens), self.cfg.d_model):
            raise ValueError(
                f"embeddings has shape {np.shape(embeddings)}: expected [B, T, d_model] = "
                f"{(*np.shape(tokens), self.cfg.d_model)}"
            )
        else:
            x = embeddings.astype(jnp.dtype(self.cfg.dtype))
        x = sharding.constrain(x, _ACTIVATION)
        new_cache: list = []
        # An OrderedDict, not a dict: jax keeps its key order through jit and grad (a dict's keys
        # come back sorted), so aux_loss and aux_metrics see the layers in order.
        aux: AuxByModule = collections.OrderedDict()  # keys: see aux_sources
        pending: dict[int, jax.Array] = {}  # skip outputs waiting to be added, by target layer
        for i, (run, (_, start, count)) in enumerate(zip(self.runs, run_layout(self.cfg), strict=True)):
            for k, (skip, (read, add)) in enumerate(zip(self.skips, self.cfg.skip_layers, strict=True)):
                if read == start:  # runs are split at every skip boundary
                    with jax.named_scope(f"skip{read}_{add}"):
                        pending[add], aux[skip_aux_key(k)] = _with_aux(skip(x), self.skip_kind)
            with jax.named_scope(f"run{i}"):
                x, (run_cache, aux[run_aux_key(i)]) = run(
                    x, positions, segment_ids, None if cache is None else cache[i]
                )
            new_cache.append(run_cache)
            if start + count - 1 in pending:
                x = x + pending.pop(start + count - 1)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)  # [B,J,D]
        trunk, x = x, self.final_norm(x)
        if return_hidden:
            return ModelOutput(
                logits=None,
                cache=None if cache is None else new_cache,
                aux=aux if return_aux else None,
                hidden=x,
                trunk=trunk,
            )
        logits = sharding.constrain(self.head(x), (axes.BATCH, axes.SEQ, axes.ACT_VOCAB))
        if cache is None and not return_aux:
            return logits
        return ModelOutput(
            logits=logits, cache=None if cache is None else new_cache, aux=aux if return_aux else None
        )


Aux = dict[str, Any]  # one module's auxiliary outputs: "loss", "metrics", layer-specific entries
AuxByModule = collections.OrderedDict[str, Aux]  # module path (Transformer.aux_sources) -> its aux


def run_aux_key(i: int) -> str:
    """The aux key of run i's FFN: its path in the model (``model.runs[i].layers.ffn``)."""
    return f"runs/{i}/layers/ffn"


def mtp_aux_key(k: int) -> str:
    """The aux key of MTP module k's FFN (depth k + 1): its path (``model.mtp[k].block.layers.ffn``)."""
    return f"mtp/{k}/block/layers/ffn"


def skip_aux_key(k: int) -> str:
    """The aux key of the k-th skip-layer module: its path in the model (``model.skips[k]``)."""
    return f"skips/{k}"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """What ``Transformer.__call__`` returns when a cache or ``return_aux`` is given (a pytree,
    so it can leave a jitted function whole).

    Attributes:
      logits: ``[B,T,V]`` (or ``[B,J,V]`` with ``logits_at``); None with ``return_hidden``.
      cache: the updated decoding cache, one entry per run as ``init_cache`` makes it; None
        when no cache was passed.
      aux: the layers' auxiliary outputs keyed by module path (``Transformer.aux_sources``), in
        layer order, each stacked over its run's layers; None unless ``return_aux``.
      hidden: the final-normed hidden states ``[B,T,D]`` with ``return_hidden``, else None.
      trunk: the hidden states before the final norm ``[B,T,D]`` with ``return_hidden``, else None.
    """

    logits: jax.Array | None
    cache: list | None = None
    aux: AuxByModule | None = None
    hidden: jax.Array | None = None
    trunk: jax.Array | None = None


def _with_aux(out: jax.Array | tuple[jax.Array, Aux], kind: kinds.FFNKind) -> tuple[jax.Array, Aux]:
    """A layer returns its output, or ``(output, aux)`` with exactly the aux keys its kind declares
    (checked while tracing, so a kind that breaks its contract fails before anything runs)."""
    out, aux = out if isinstance(out, tuple) else (out, {})
    if set(aux) != kind.aux:
        raise TypeError(
            f"{kind.name!r} layer returned aux keys {sorted(aux)}, but its kind declares {sorted(kind.aux)}"
        )
    if not isinstance(aux.get("metrics", {}), dict):  # aux_metrics reads name -> per-layer values
        raise TypeError(f"{kind.name!r} layer's aux['metrics'] must be a dict of named arrays")
    return out, aux


def aux_metrics(aux: AuxByModule) -> dict[str, jax.Array]:
    """Every layer's ``"metrics"`` entries, concatenated over layers in the order of ``aux``
    (layer order, as ``__call__`` builds it): ``name -> [layers, ...]`` (e.g. the MoE layers'
    ``expert_load [layers, E]`` and ``load_ratio [layers]``)."""
    found: dict[str, list[jax.Array]] = {}
    for a in aux.values():
        for name, value in a.get("metrics", {}).items():
            found.setdefault(name, []).append(jnp.atleast_1d(value))  # stacked [L, ...] by the scan
    return {name: jnp.concatenate(values) for name, values in found.items()}


def aux_loss(aux: AuxByModule) -> jax.Array:
    """The sum of every ``"loss"`` entry in the aux outputs (each layer's weighted aux loss)."""
    losses = [jnp.sum(a["loss"]) for a in aux.values() if "loss" in a]
    return sum(losses, jnp.zeros((), jnp.float32))


def run_layout(cfg: ModelConfig) -> list[tuple[BlockConfig, int, int]]:
    """``(block, first layer, count)`` of each run: consecutive identical blocks, also split
    where a skip-layer module reads (before block i) or adds (after block j)."""
    cuts = {i for i, _ in cfg.skip_layers} | {j + 1 for _, j in cfg.skip_layers}
    layout: list[tuple[BlockConfig, int, int]] = []
    for layer, block in enumerate(cfg.layer_blocks):
        if layout and layout[-1][0] == block and layer not in cuts:
            _, start, count = layout[-1]
            layout[-1] = (block, start, count + 1)
        else:
            layout.append((block, layer, 1))
    return layout


def segment_positions(segment_ids: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
    """``[B,T]`` position of each token within its segment (``arange(T)`` with no segments)."""
    B, T = shape
    index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is None:
        return index
    starts = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def check_inputs(cfg: ModelConfig, tokens, positions=None, segment_ids=None, cache=None) -> None:
    """Raises ValueError/TypeError for inputs the model cannot take.

    Shapes and dtypes are always checked; values (token ids, cache positions) only when
    concrete (outside jit), since a traced value is unknown until it runs.
    """
    shape = np.shape(tokens)
    if len(shape) != 2:
        raise ValueError(f"tokens has shape {shape}: expected rank 2 [batch, seq]")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens has dtype {tokens.dtype}: expected an integer dtype")
    if shape[1] > cfg.max_seq_len:
        raise ValueError(
            f"tokens has sequence length {shape[1]}, longer than the configured max_seq_len={cfg.max_seq_len}"
        )
    for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
        if arr is not None and np.shape(arr) != shape:
            raise ValueError(f"{name} has shape {np.shape(arr)}: expected tokens' shape {shape}")
    if not isinstance(tokens, jax.core.Tracer) and shape[0] * shape[1]:
        host = np.asarray(tokens)  # concrete: a host copy, so the check is not traced
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(
                f"token ids span [{lo}, {hi}]: allowed range is [0, vocab_size={cfg.vocab_size})"
            )
    if cache is not None and positions is None:
        raise ValueError("positions are required with a cache: they are the slots to write")
    # Every cache kind says how many slots it holds; None: it places tokens itself (paged).
    first = cache
    while isinstance(first, list):  # the model's cache: a list per run (a run's unstacked: per layer)
        first = first[0]
    slots = None if first is None else first.num_slots
    if slots is not None:
        if shape[1] > slots:
            raise ValueError(f"tokens has sequence length {shape[1]}, more than the cache's {slots} slots")
        if not isinstance(positions, jax.core.Tracer):
            host = np.asarray(positions)  # out-of-range slots would be dropped by the scatter
            if host.size and (host.min() < 0 or host.max() >= slots):
                raise ValueError(
                    f"positions span [{host.min()}, {host.max()}]: a cache of {slots} "
                    f"slots allows [0, {slots})"
                )


def _unsharded_block(cfg: ModelConfig, block: BlockConfig) -> Block:
    with nnx.use_eager_sharding(False):
        return Block(cfg, block, rngs=nnx.Rngs(0))


def _unsharded_model(cfg: ModelConfig) -> Transformer:
    with nnx.use_eager_sharding(False):
        return Transformer(cfg, rngs=nnx.Rngs(0))


def with_unstacked_layers(model: Transformer) -> Transformer:
    """``model`` with every run's layers as separate Blocks called one after another, instead of
    stacked parameters scanned over: the same function, for serving.

    XLA:CPU runs a scan over stacked parameters by copying each layer's slice of every weight
    before its matmul, so a memory-bound decode step reads the weights three times (read, write,
    read the copy) instead of once. Separate arrays are read in place. The layers' arrays are
    copies (the model's stacked ones are left as they are); compile time grows with depth. Built
    for inference: ``aux_sources`` and training expect the stacked layout.
    """
    new = nnx.merge(*nnx.split(model))  # new module objects over the same arrays
    for run in new.runs:
        run.unstack()
    return new


def with_mla_path(model: Transformer, path: str) -> Transformer:
    """``model`` with every MLA layer attending by ``path``; the weights are shared, not copied.

    A whole-model transform, so it lives here rather than in ``layers/mla.py`` (layers never
    import the model).

    Raises:
      ValueError: for an unknown path, or a model that has no MLA layer.
    """
    check_path(path)
    if model.cfg.mla is None:
        raise ValueError(
            f"path={path!r} cannot apply: model {model.cfg.name!r} has no 'mla' "
            "attention blocks (ModelConfig.mla=None)"
        )
    new = nnx.merge(*nnx.split(model))  # new module objects over the same arrays
    for _, node in nnx.iter_graph(new):
        if isinstance(node, MLA):
            node.config = dataclasses.replace(node.config, path=path)
    new.cfg = new.cfg.replace(mla=dataclasses.replace(new.cfg.mla, path=path))
    return new


def without_mtp(model: Transformer) -> Transformer:
    """``model`` with its multi-token-prediction modules dropped (``mtp_depth=0``), as inference that
    does not draft with them needs; the other weights are shared, not copied."""
    new = nnx.merge(*nnx.split(model))  # new module objects over the same arrays
    new.mtp = nnx.data(None)
    new.cfg = new.cfg.replace(mtp_depth=0, mtp_block=None)
    return new
