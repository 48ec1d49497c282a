"""The serving engine: paged KV cache, continuous batching, chunked prefill, sampling.

``Engine(model, cfg)`` serves many requests at once on one device. Each ``step()`` asks the
``Scheduler`` what to run, lays the step's tokens out as one flat row (decode tokens and
prefill chunks of different sequences side by side, padded to a bucket), and runs one jitted
program: copy-on-write page copies, the model over the paged cache (``paged_cache``), and
per-row sampling (``sampling``). Shapes are bucketed (tokens, decode rows and chunk width
by powers of two and the 1.5x points between; block tables always span ``max_len``, since
attention loops only over the pages in use), so the program compiles once per bucket and a
steady decode never recompiles. When a step only decodes and no request waits, one dispatch
runs up to ``EngineConfig.decode_steps`` decode steps on the device (``step_program``), each
feeding the tokens the last one sampled; ``step()`` then returns several tokens per sequence.
Full pages stay cached by the hash of their prefix, so a prompt that starts like an earlier one
prefills only from the first page not cached (``prefix_cache``; ``enable_prefix_caching``).
On CPU the layers run over per-layer copies of their weights (``unstack_layers``).

    engine = Engine(model, cfg, tokenizer=tok, max_num_seqs=32)
    outs = engine.generate(["Once upon", "The"], SamplingParams(max_tokens=64, temperature=0))
    for event in engine.stream(prompts, params): print(event.text, end="")

Lower level: ``add_request`` (validated before anything changes, so a bad request never
disturbs the ones in flight), ``step``, ``has_unfinished``, ``abort``, ``stats``.

A vision-language model (``llmarch.vision.llava.Llava``) is served the same way: its decoder runs
the steps, and a request's ``images`` are encoded when it is queued (``images``), their features
taking the place of the prompt's placeholder tokens at prefill.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from llmarch import accounting
from llmarch.config import ModelConfig
from llmarch.inference import images as image_inputs
from llmarch.inference import paged_cache, placement, prefix_cache, step_batch
from llmarch.inference.block_manager import BlockManager, pages_for
from llmarch.inference.detokenize import TextStream
from llmarch.inference.engine_config import EngineConfig
from llmarch.inference.outputs import Completion, RequestOutput, TokenEvent
from llmarch.inference.sampling import SamplingParams
from llmarch.inference.scheduler import Plan, Request, Scheduler, Status
from llmarch.inference.scheduler import Sequence as Seq
from llmarch.inference.step_program import program, run_decode, run_step
from llmarch.inference.unstacked import weights_on_cpu
from llmarch.layers import kv_quant
from llmarch.model import with_unstacked_layers


def _unstack(choice: bool | None, model) -> bool:
    """EngineConfig.unstack_layers resolved: None means "when the weights live on CPU"."""
    return choice if choice is not None else weights_on_cpu(model)


class Engine:
    """Serves generation requests for ``model`` with a paged cache and continuous batching.

    Args:
      model: a ``Transformer`` (dense/GQA, MLA, MoE, memory layers: any block whose attention
        kind has a paged cache), or a ``Llava`` (``llmarch.vision.llava``), whose requests may
        carry images.
      cfg: its (decoder's) config (default ``model.cfg``, a Llava's ``language_model.cfg``).
      tokenizer: optional; lets prompts be strings and completions carry text.
      config: an ``EngineConfig``; keyword overrides replace its fields.
    """

    def __init__(
        self,
        model,
        cfg: ModelConfig | None = None,
        *,
        tokenizer=None,
        config: EngineConfig | None = None,
        **overrides,
    ):
        from llmarch.vision.llava import Llava

        self.images = image_inputs.ImageEncoder(model) if isinstance(model, Llava) else None
        if self.images is not None:
            model = model.language_model
        cfg = model.cfg if cfg is None else cfg
        if not isinstance(cfg, ModelConfig):  # e.g. Engine(model, EngineConfig(...))
            raise ValueError(
                f"cfg={type(cfg).__name__}(...) is invalid: must be the model's ModelConfig or None; "
                "an EngineConfig goes in config="
            )
        if cfg != model.cfg:
            raise ValueError(f"cfg {cfg.name!r} is not the model's config {model.cfg.name!r}")
        config = dataclasses.replace(config or EngineConfig(), **overrides)
        self.cfg, self.config, self.tokenizer = cfg, config, tokenizer
        self.max_len = cfg.max_seq_len if config.max_len is None else config.max_len
        if self.max_len > cfg.max_seq_len:
            raise ValueError(
                f"EngineConfig.max_len={self.max_len} exceeds the model's max_seq_len={cfg.max_seq_len}"
            )
        if config.max_num_batched_tokens > cfg.max_seq_len:
            raise ValueError(
                f"EngineConfig.max_num_batched_tokens={config.max_num_batched_tokens} exceeds "
                f"the model's max_seq_len={cfg.max_seq_len} (a step is one row)"
            )
        self.max_pages_per_seq = pages_for(self.max_len, config.page_size)
        self.kv_dtype = kv_quant.storage_dtype(config.kv_cache_dtype, cfg.dtype)
        num_pages = config.num_pages or config.max_num_seqs * self.max_pages_per_seq + 1
        if config.kv_cache_memory is not None:
            num_pages = accounting.pages_for_memory(
                cfg, config.kv_cache_memory, config.page_size, self.kv_dtype
            )
            if num_pages < 2:
                raise ValueError(
                    f"EngineConfig.kv_cache_memory={config.kv_cache_memory} is invalid: holds {num_pages} "
                    f"pages of {accounting.kv_page_bytes(cfg, config.page_size, self.kv_dtype)} bytes; "
                    "needs >= 2 (one is the trash page)"
                )
        self.kinds = paged_cache.cache_kinds(model)
        self.mesh = None if config.mesh is None else placement.serving_mesh(config.mesh)
        if self.mesh is not None:  # a sharded copy: the caller's model stays where it is
            model = placement.place_model(model, self.mesh)
        if _unstack(config.unstack_layers, model):
            model = with_unstacked_layers(model)
        graphdef, state = nnx.split(model)
        self._leaves, treedef = jax.tree.flatten(state)
        self.program = program(graphdef, treedef, self.kinds, config.max_logprobs, config.decode_steps)
        self.pools = paged_cache.init_pools(model, num_pages, config.page_size, self.kv_dtype)
        if self.mesh is not None:
            self.pools = placement.place_pools(self.kinds, self.pools, self.mesh)
        else:  # committed, as every step's output pools are: else the second step compiles again
            self.pools = jax.device_put(self.pools, self._leaves[0].devices().pop())
        # Why prefix caching is off (None: it is on): turned off, or unsafe for this model.
        off = None if config.enable_prefix_caching else "EngineConfig.enable_prefix_caching=False"
        self.prefix_caching_off = off or prefix_cache.unsafe_reason(cfg)
        self.block_manager = BlockManager(
            num_pages, config.page_size, prefix_caching=not self.prefix_caching_off
        )
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_prefill_chunk=config.max_prefill_chunk,
            max_prefill_rows=config.max_prefill_rows,
            watermark_pages=int(config.watermark * num_pages),
            admission=config.admission,
            max_wait_steps=config.max_wait_steps,
        )
        self.requests: dict[str, Request] = {}
        self._rng = np.random.default_rng(config.seed)
        self._ids = itertools.count()
        self._texts: dict[tuple[str, int], TextStream] = {}  # streamed text of live completions
        self._seq_times: dict[int, list[float]] = {}  # token arrival times per sequence
        self.counters = dict(
            steps=0,
            dispatches=0,
            mixed_steps=0,
            decode_tokens=0,
            prefill_tokens=0,
            padded_tokens=0,
            prefill_step_seconds=0.0,
            decode_step_seconds=0.0,
        )
        self.shapes: set[tuple[int, ...]] = set()

    # Requests ----------------------------------------------------------------------------

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: Engine(..., tokenizer=...)")
            prompt = self.tokenizer.encode(prompt)
        ids = np.asarray(prompt)
        if ids.ndim != 1:
            raise ValueError(f"prompt has shape {ids.shape}: expected a 1-D sequence of token ids")
        if ids.size == 0:
            raise ValueError("prompt is empty: a request needs at least one prompt token")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt has dtype {ids.dtype}: expected integer token ids")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise ValueError(
                f"prompt token ids span [{ids.min()}, {ids.max()}]: allowed range is "
                f"[0, vocab_size={self.cfg.vocab_size})"
            )
        return ids.astype(int).tolist()

    def _make_request(
        self, prompt, params: SamplingParams | None, request_id: str | None, images=None
    ) -> Request:
        """A validated request; raises ValueError (changing nothing) for a bad one."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        ids = self._prompt_ids(prompt)
        if images is not None and self.images is None:
            raise ValueError(
                "images were given, but this engine's model has no vision tower: serve a "
                "llmarch.vision.llava.Llava to pass images"
            )
        params.check(self.cfg.vocab_size, self.config.max_logprobs)
        if len(ids) >= self.max_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens: longer than the maximum of "
                f"{self.max_len - 1} (max_len={self.max_len} leaves room for one token)"
            )
        if len(ids) + params.max_tokens > self.max_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens + max_tokens={params.max_tokens} exceeds max_len={self.max_len}"
            )
        if pages_for(len(ids) + params.max_tokens, self.config.page_size) > self.block_manager.capacity:
            raise ValueError(
                f"prompt + max_tokens needs more pages than the cache's {self.block_manager.capacity}"
            )
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"SamplingParams.n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request_id={request_id!r} is already in use")
        seed = int(self._rng.integers(2**63)) if params.seed is None else params.seed
        request = Request(request_id, ids, params, seed, time.perf_counter())
        if self.images is not None:  # placeholders without images are refused here too
            if images is not None or self.images.cfg.image_token_id in ids:
                request.embeds, request.embed_mask, request.hash_root = self.images.encode(ids, images)
        return request

    def add_request(
        self, prompt, params: SamplingParams | None = None, *, request_id: str | None = None, images=None
    ) -> str:
        """Queues one request (token ids, or text with a tokenizer); returns its id. ``images``:
        a vision-language engine's ``pixel_values [N,C,H,W]`` (or one ``[C,H,W]``) for the prompt's
        ``N * image_tokens`` placeholders.

        Raises:
          ValueError: empty prompt, prompt too long for ``max_len``, unknown stop token,
            ``max_tokens <= 0`` (in ``SamplingParams``), images that do not match the prompt's
            placeholders (or for a text-only model), ...; requests in flight are untouched.
        """
        return self._enqueue(self._make_request(prompt, params, request_id, images))

    def _enqueue(self, request: Request) -> str:
        request.arrival_time = time.perf_counter()
        self.requests[request.request_id] = request
        sched, n = self.scheduler, request.params.n
        if n == 1:
            seq = sched.new_sequence(request, 0, request.prompt)
            request.completions = [seq]
            sched.add(seq)
        elif len(request.prompt) == 1:  # nothing to share: n independent sequences
            request.completions = [sched.new_sequence(request, i, request.prompt) for i in range(n)]
            for seq in request.completions:
                sched.add(seq)
        else:  # prefill all but the last prompt token once, then fork
            sched.add(sched.new_sequence(request, -1, request.prompt[:-1]))
        return request.request_id

    def abort(self, request_id: str) -> None:
        """Stops a request; its pages are freed and its completions end with reason "abort"."""
        request = self.requests[request_id]
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            if seq.request is request:
                self.scheduler.finish(seq, "abort")
        for key in [k for k in self._texts if k[0] == request_id]:
            del self._texts[key]  # its text streams end with it
        request.finish_time = time.perf_counter()

    def release(self, request_id: str) -> None:
        """Forgets a finished (or aborted) request, so a long-running server's memory stays
        bounded; its output can no longer be read."""
        request = self.requests.get(request_id)
        if request is None:
            raise ValueError(f"request_id={request_id!r} is unknown (never added, or released)")
        if not request.finished:
            raise ValueError(f"request {request_id!r} is unfinished: abort it before releasing it")
        for seq in request.completions:
            self._seq_times.pop(seq.seq_id, None)
        del self.requests[request_id]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # The step ----------------------------------------------------------------------------

    def _decode_steps(self, plan: Plan) -> int:
        """How many decode steps to run in this dispatch: ``EngineConfig.decode_steps`` when the
        step only decodes, nothing waits to be admitted (it would wait for the whole dispatch)
        and every row has that many tokens left and pages for them without copy-on-write (given
        here, as the scheduler gives the first); otherwise 1."""
        c, bm = self.config, self.block_manager
        if c.decode_steps == 1 or plan.prefill or plan.copies or self.scheduler.waiting:
            return 1
        if any(step_batch.has_embeds(s, s.num_computed, s.num_computed + 1) for s in plan.decode):
            return 1  # a recomputed image placeholder: the loop feeds sampled tokens only
        steps = min(c.decode_steps, *(s.request.params.max_tokens - s.num_generated for s in plan.decode))
        if steps <= 1:
            return 1
        spans = [(seq.pages, seq.num_computed, seq.num_computed + steps) for seq in plan.decode]
        new = [max(0, pages_for(end, c.page_size) - len(table)) for table, _, end in spans]
        if sum(new) > bm.num_free or any(
            bm.pages_to_write(*span) != n for span, n in zip(spans, new, strict=True)
        ):
            return 1  # short of pages, or a shared page ahead: one step, as scheduled
        for span in spans:
            bm.prepare_write(*span)  # only appends fresh pages: checked above
        return steps

    def step(self) -> list[TokenEvent]:
        """Runs one step; returns the tokens it generated (empty if nothing could run)."""
        plan = self.scheduler.schedule()
        if not plan.decode and not plan.prefill:
            if self.scheduler.has_work():
                live = (*self.scheduler.running, *self.scheduler.waiting)
                raise RuntimeError(
                    "no sequence can be scheduled: the cache is too small for the "
                    f"waiting requests; {self._describe(live)}"
                )
            return []
        if parents := [seq for seq in plan.decode if seq.is_parent]:  # its last piece forks, never samples
            raise RuntimeError(
                f"scheduler error: a prompt parent was planned as a decode row; {self._describe(parents)}"
            )
        start = time.perf_counter()
        steps = self._decode_steps(plan)
        batch, shape = step_batch.build(plan, self.config, self.max_pages_per_seq)
        self.counters["padded_tokens"] += batch.tokens.shape[0] - plan.num_tokens
        self.shapes.add((*shape, steps > 1))  # the decode loop is a program of its own
        with placement.ambient(self.mesh):  # traced with the mesh's rules: GSPMD splits the step
            if steps > 1:
                self.pools, out = run_decode(
                    self._leaves,
                    self.pools,
                    batch,
                    np.int32(steps),
                    program=self.program,
                    page_size=self.config.page_size,
                )
            else:
                self.pools, out = run_step(self._leaves, self.pools, batch, program=self.program)
        out = jax.device_get(out)
        now = time.perf_counter()
        self.counters["steps"] += steps
        self.counters["dispatches"] += 1
        self.counters["prefill_step_seconds" if plan.prefill else "decode_step_seconds"] += now - start
        self.counters["mixed_steps"] += bool(plan.decode and plan.prefill)  # chunked prefill + decode
        self.counters["prefill_tokens"] += plan.num_tokens - len(plan.decode)
        events = []
        Rd = shape[1]
        first = Rd - len(plan.decode)  # the first decode row that holds a sequence
        for j in range(steps):
            out_j = {name: value[j] for name, value in out.items()} if steps > 1 else out
            for r, seq in enumerate(plan.decode):
                if seq.status is Status.FINISHED:  # stopped earlier in this dispatch; the rest is dropped
                    continue
                self.scheduler.advance(seq, seq.num_computed + 1)
                self.counters["decode_tokens"] += 1
                events.append(self._append(seq, out_j, first + r, now))
        for r, (seq, _, end) in enumerate(plan.prefill):
            self.scheduler.advance(seq, end)
            if end < len(seq.tokens):
                continue
            if seq.is_parent:
                self.scheduler.fork(seq)
            else:
                events.append(self._append(seq, out, Rd + r, now))
        return events

    def _append(self, seq: Seq, out: dict, r: int, now: float) -> TokenEvent:
        """Appends row r's sampled token to seq and ends it if a stop condition holds."""
        request, params = seq.request, seq.request.params
        token = int(out["tokens"][r])
        seq.tokens.append(token)
        logprob = None
        if params.logprobs is not None:
            logprob = float(out["logprobs"][r])
            seq.logprobs.append(logprob)
            n = params.logprobs
            seq.top_logprobs.append(
                {
                    int(t): float(v)
                    for t, v in zip(out["top_ids"][r][:n], out["top_logprobs"][r][:n], strict=True)
                }
                if n
                else {}
            )
        if request.first_token_time is None:
            request.first_token_time = now
        request.token_times.append(now)
        seq_times = self._seq_times.setdefault(seq.seq_id, [])
        seq_times.append(now)
        if token in params.stop_token_ids:
            self.scheduler.finish(seq, "stop")
        elif seq.num_generated >= params.max_tokens:
            self.scheduler.finish(seq, "length")
        if request.finished:
            request.finish_time = now
        return TokenEvent(
            request.request_id,
            seq.sample_index,
            token,
            self._text_delta(seq),
            logprob,
            seq.status is Status.FINISHED,
            seq.finish_reason,
        )

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids; ids past the tokenizer's vocabulary (a model's vocabulary may
        be padded beyond it) show as U+FFFD rather than failing."""
        V, parts, run = self.tokenizer.vocab_size, [], []
        for i in ids:
            if i < V:
                run.append(i)
            else:
                parts += [self.tokenizer.decode(run), "\ufffd"]
                run = []
        return "".join([*parts, self.tokenizer.decode(run)])

    def _text_delta(self, seq: Seq) -> str | None:
        """The text seq's newest token adds: never part of a character (held back until the token
        completing it comes); at the end, whatever is left, so the pieces join to the output's text."""
        if self.tokenizer is None:
            return None
        key = (seq.request.request_id, seq.sample_index)
        stream = self._texts.setdefault(key, TextStream(self.decode))
        final = seq.status is Status.FINISHED
        if final:
            del self._texts[key]
        return stream.push(seq.tokens[-1], final=final)

    # Results -----------------------------------------------------------------------------

    def output(self, request_id: str) -> RequestOutput:
        """The request's completions and metrics so far."""
        request = self.requests[request_id]
        completions, gaps = [], []
        for seq in request.completions:
            generated = seq.tokens[len(request.prompt) :]
            want_lp = request.params.logprobs is not None
            completions.append(
                Completion(
                    seq.sample_index,
                    generated,
                    None if self.tokenizer is None else self.decode(generated),
                    list(seq.logprobs) if want_lp else None,
                    list(seq.top_logprobs) if want_lp else None,
                    seq.finish_reason,
                )
            )
            times = self._seq_times.get(seq.seq_id, [])
            gaps += list(np.diff(times))
        ttft = None if request.first_token_time is None else request.first_token_time - request.arrival_time
        return RequestOutput(
            request.request_id,
            list(request.prompt),
            completions,
            request.finished,
            ttft,
            [float(g) for g in gaps],
        )

    def _requests_for(self, prompts, params, images=None) -> list[Request]:
        if isinstance(prompts, str) or (isinstance(prompts, np.ndarray) and prompts.ndim == 1):
            prompts = [prompts]
            images = None if images is None else [images]
        prompts = list(prompts)
        if isinstance(params, SamplingParams) or params is None:
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        images = [None] * len(prompts) if images is None else list(images)
        if len(images) != len(prompts):
            raise ValueError(f"images has {len(images)} entries for {len(prompts)} prompts: one each")
        requests = []
        for i, (prompt, p, im) in enumerate(zip(prompts, params, images, strict=True)):
            try:
                requests.append(self._make_request(prompt, p, None, im))
            except ValueError as e:
                raise ValueError(f"request {i}: {e}") from None
        return requests

    def _describe(self, requests) -> str:
        """The states of requests (ids, or sequences standing for theirs) and of their sequences,
        for errors about requests that cannot go on."""
        request_ids = list(dict.fromkeys(r if isinstance(r, str) else r.request.request_id for r in requests))
        seqs: dict[str, list[Seq]] = {}
        for seq in (*self.scheduler.running, *self.scheduler.waiting):
            seqs.setdefault(seq.request.request_id, []).append(seq)
        parts = []
        for rid in request_ids:
            request = self.requests[rid]
            p = request.params
            live = seqs.get(rid, [])
            shown = live + [s for s in request.completions if s not in live]
            states = (
                "; ".join(
                    f"{'prompt parent' if s.is_parent else f'completion {s.sample_index}'} {s.status.value}"
                    f"{f' ({s.finish_reason})' if s.finish_reason else ''}: {s.num_computed}/{len(s.tokens)} "
                    f"tokens computed, {max(0, s.num_generated)} generated, {len(s.pages)} pages"
                    for s in shown
                )
                or "no sequence"
            )
            parts.append(
                f"request {rid!r} (prompt of {len(request.prompt)} tokens, n={p.n}, "
                f"max_tokens={p.max_tokens}, {len(request.completions)} completions, "
                f"{'finished' if request.finished else 'unfinished'}, "
                f"{'queued or running' if live else 'in neither queue'}): {states}"
            )
        return (
            f"{len(request_ids)} request(s), {self.block_manager.num_free} of "
            f"{self.block_manager.capacity} pages free: " + " | ".join(parts)
        )

    def _run(self, ids: list[str]) -> Iterator[TokenEvent]:
        """Steps until the requests ``ids`` finish, yielding every event. A step that runs nothing
        while some are unfinished raises RuntimeError naming them, rather than looping forever."""
        while pending := [i for i in ids if not self.requests[i].finished]:
            steps = self.counters["steps"]
            events = self.step()
            if self.counters["steps"] == steps:  # nothing scheduled, so nothing can have finished
                raise RuntimeError(
                    "the engine made no progress: nothing can be scheduled, yet "
                    f"requests are unfinished; {self._describe(pending)}"
                )
            yield from events

    def stream(
        self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None, *, images=None
    ) -> Iterator[TokenEvent]:
        """Queues the prompts (all validated first) and yields their tokens as they come;
        ``images`` as in ``generate``."""
        ids = [self._enqueue(r) for r in self._requests_for(prompts, params, images)]
        wanted = set(ids)
        for event in self._run(ids):
            if event.request_id in wanted:
                yield event

    def generate(
        self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None, *, images=None
    ) -> list[RequestOutput]:
        """Generates for every prompt (token ids, or text with a tokenizer); one output each.
        ``images`` (a vision-language engine): one entry per prompt, its ``pixel_values`` or None
        (for a single prompt, its pixel values).

        All prompts are validated before any is queued: a bad one raises ValueError naming its
        index, and nothing changes. Requests already in flight keep running alongside.

        Raises:
          RuntimeError: naming the unfinished requests and their states, if a step can schedule
            nothing while some are unfinished (a bug: it never loops forever instead).
        """
        ids = [self._enqueue(r) for r in self._requests_for(prompts, params, images)]
        for _ in self._run(ids):
            pass
        return [self.output(i) for i in ids]

    @property
    def stats(self) -> dict:
        """Counters: steps (and those mixing prefill chunks with decode tokens), dispatches
        (programs run: a dispatch of several decode steps counts once), tokens by kind (prompt
        tokens found in the prefix cache are not computed, so not counted in ``prefill_tokens``),
        padding, seconds in steps with and without prefill, preemptions, distinct step shapes
        (a bucket run as a loop of decode steps counts apart: each is one compiled program),
        pages (``free_pages`` counts evictable cached ones) and the bytes of the page pools
        (scales included). Prefix caching: whether it is on, lookups (one per sequence joining
        from the queue, preempted ones again), their tokens and the tokens found cached, the hit
        rate (found over looked-up tokens), cached pages and evictions."""
        return dict(
            self.counters,
            preemptions=self.scheduler.num_preemptions,
            step_shapes=len(self.shapes),
            free_pages=self.block_manager.num_free,
            num_pages=self.block_manager.num_pages,
            kv_cache_bytes=sum(x.nbytes for pool in self.pools for x in pool),
            **prefix_cache.stats(self.block_manager.cache),
        )
