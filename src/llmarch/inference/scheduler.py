"""Continuous batching: which sequences run in the next step, and what each computes.

At every step (Orca's iteration-level scheduling, vLLM's scheduler) running sequences go
first, oldest first: a completion with one token to feed decodes it; one still in its prompt
(or recomputing after preemption) takes the next chunk of it, so long prompts are prefilled
in chunks *in the same step* as the other sequences' decode tokens. Then waiting sequences
join while the batch budget (``max_num_seqs``), the token budget (``max_num_batched_tokens``),
the prefill-row budget and free pages allow, in the order ``admission`` names:

- ``"fcfs"``: first come first served.
- ``"shortest"``: the fewest prompt tokens left to compute first (shortest job first, which
  minimises the mean time to first token of requests waiting together: a 16-token prompt no
  longer waits behind a 512-token one). A sequence that has waited ``max_wait_steps`` steps,
  or that was preempted, goes ahead of all others, first come first served among them, so a
  long prompt is delayed by at most that many steps, never starved.

When a running sequence needs a page and none is free, the newest running sequence is
preempted: its pages are released and it goes back to the front of the queue, to be
recomputed from its tokens (prompt and generated so far) when pages free up. The oldest
running sequence is never preempted for a newer one, so it always progresses, and every
admitted request completes.

A request for ``n > 1`` completions first prefills its prompt (all but the last token) as one
*parent* sequence; then ``fork`` makes ``n`` children that share the parent's pages (copy on
write) and each feed the last prompt token as their first decode step.

With prefix caching (``BlockManager(prefix_caching=True)``, ``llmarch.inference.prefix_cache``),
a sequence joining from the queue (new, or preempted and to be recomputed) first looks up the
full pages of its tokens, all but the last (which must be computed, for its logits or, in a
parent, to fork); it holds the cached ones and computes only from the first page not found. The
pages a step fills are entered in the cache as the step completes (``advance``).

Whether a row decodes is the sequence's state (``Sequence.decoding``), never the length of the
piece it feeds: a parent's last prefill piece may be a single token, and it must still fork, not
sample.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools

import numpy as np

from llmarch.inference import prefix_cache
from llmarch.inference.block_manager import BlockManager, OutOfPages
from llmarch.inference.sampling import SamplingParams

ADMISSION = ("fcfs", "shortest")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """One prompt and its sampling parameters; ``completions`` are filled in by ``fork``."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    arrival_time: float
    completions: list[Sequence] = dataclasses.field(default_factory=list)
    first_token_time: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    finish_time: float | None = None
    # Image inputs (a vision-language engine): ``embeds [len(prompt), D]`` float32 holds the image
    # features at the placeholder positions that ``embed_mask [len(prompt)]`` marks; None: text only.
    embeds: np.ndarray | None = None
    embed_mask: np.ndarray | None = None
    hash_root: bytes = prefix_cache.ROOT  # its prefix-cache chain's root (prefix_cache.root_for_images)

    @property
    def finished(self) -> bool:
        """All completions ended (or the request was aborted)."""
        return self.finish_time is not None or (
            bool(self.completions) and all(s.status is Status.FINISHED for s in self.completions)
        )


@dataclasses.dataclass(eq=False)
class Sequence:
    """A token sequence in the cache. ``tokens[:num_computed]`` have keys and values in
    ``pages``; ``tokens[num_computed:]`` are fed next. ``sample_index`` -1 marks the
    shared-prompt parent of an ``n > 1`` request (it never samples). ``hashes``: the prefix
    hashes of its first full pages (known so far); ``num_cached``: its first pages already offered
    to the prefix cache."""

    seq_id: int
    request: Request
    sample_index: int
    tokens: list[int]
    num_computed: int = 0
    pages: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    order: int = -1  # admission stamp: the largest is the newest, preempted first
    queued_at: int = 0  # the scheduling step it joined the queue at; -1: preempted (goes first)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    hashes: list[bytes] = dataclasses.field(default_factory=list)
    num_cached: int = 0

    @property
    def is_parent(self) -> bool:
        return self.sample_index < 0

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.request.prompt)

    @property
    def to_compute(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def decoding(self) -> bool:
        """Feeds its last token and samples the next one: a completion (never a parent, whose
        tokens are all prompt and whose last piece forks) with one token left to compute. A
        completion's last piece samples whatever its length, so a one-token piece left after
        chunked prefill or recomputation is a decode step."""
        return not self.is_parent and self.to_compute == 1


@dataclasses.dataclass
class Plan:
    """One step: decode sequences (one token each, each samples), prefill chunks
    ``(seq, start, end)`` (the one ending a completion's tokens samples; the one ending a
    parent's forks it), and the copy-on-write page copies to apply before any write."""

    decode: list[Sequence]
    prefill: list[tuple[Sequence, int, int]]
    copies: list[tuple[int, int]]

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(end - start for _, start, end in self.prefill)


class Scheduler:
    """Admission, chunking and preemption over a ``BlockManager``'s pages."""

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_prefill_chunk: int,
        max_prefill_rows: int,
        watermark_pages: int = 0,
        admission: str = "fcfs",
        max_wait_steps: int = 64,
    ):
        if admission not in ADMISSION:
            raise ValueError(f"admission={admission!r} is invalid: must be one of {list(ADMISSION)}")
        self.admission, self.max_wait_steps = admission, max_wait_steps
        self.num_steps = 0
        self.bm = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_prefill_chunk, self.max_prefill_rows = max_prefill_chunk, max_prefill_rows
        self.watermark_pages = watermark_pages
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # ordered by admission, oldest first
        self.num_preemptions = 0
        self._stamps = itertools.count()
        self._ids = itertools.count()

    # Sequences ---------------------------------------------------------------------------

    def new_sequence(self, request: Request, sample_index: int, tokens: list[int]) -> Sequence:
        return Sequence(next(self._ids), request, sample_index, list(tokens))

    def add(self, seq: Sequence) -> None:
        seq.queued_at = self.num_steps
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _slots_taken(self, seq: Sequence) -> int:
        """Batch slots a sequence will take: a parent becomes its request's ``n`` completions."""
        return seq.request.params.n if seq.is_parent else 1

    def _admit(self, seq: Sequence) -> None:
        seq.status, seq.order = Status.RUNNING, next(self._stamps)
        self.running.append(seq)

    def preempt(self, seq: Sequence) -> None:
        """Frees ``seq``'s pages; it waits at the front of the queue to be recomputed."""
        self.bm.release(seq.pages)
        seq.num_computed, seq.num_cached, seq.status, seq.queued_at = 0, 0, Status.WAITING, -1
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        self.bm.release(seq.pages)
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def fork(self, parent: Sequence) -> list[Sequence]:
        """Replaces a parent whose prompt prefix is cached by its request's n completions."""
        request = parent.request
        children = []
        for i in range(request.params.n):
            child = self.new_sequence(request, i, request.prompt)
            child.num_computed, child.pages = parent.num_computed, self.bm.share(parent.pages)
            child.hashes, child.num_cached = list(parent.hashes), parent.num_cached
            children.append(child)
        self.bm.release(parent.pages)
        if parent.status is Status.RUNNING:
            self.running.remove(parent)
        parent.status = Status.FINISHED
        for child in children:
            self._admit(child)
        request.completions = children
        return children

    def advance(self, seq: Sequence, num_computed: int) -> None:
        """Records that ``seq``'s tokens up to ``num_computed`` have their keys and values in its
        pages (a step ran), entering the pages that became full in the prefix cache."""
        seq.num_computed = num_computed
        full = num_computed // self.bm.page_size
        if self.bm.cache is None or full <= seq.num_cached:
            return
        hashes = prefix_cache.extend_hashes(
            seq.hashes, seq.tokens, self.bm.page_size, full, seq.request.hash_root
        )
        for j in range(seq.num_cached, full):
            self.bm.cache_page(seq.pages[j], hashes[j])
        seq.num_cached = full

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached pages ``seq`` (waiting, holding no pages) can start from: those of its
        longest cached prefix of full pages, short of its last token (nothing taken yet)."""
        if self.bm.cache is None or seq.pages:
            return []
        usable = (len(seq.tokens) - 1) // self.bm.page_size
        root, ps = seq.request.hash_root, self.bm.page_size
        return self.bm.lookup(prefix_cache.extend_hashes(seq.hashes, seq.tokens, ps, usable, root))

    # Scheduling --------------------------------------------------------------------------

    def _prepare(self, seq: Sequence, start: int, end: int, copies: list, scheduled: set) -> bool:
        """Pages for ``seq``'s positions ``[start, end)``, preempting the newest unscheduled
        running sequences as needed; False if ``seq`` itself had to be preempted."""
        while True:
            try:
                copies += self.bm.prepare_write(seq.pages, start, end)
                return True
            except OutOfPages:
                victim = next(s for s in reversed(self.running) if s not in scheduled)
                if victim.order < seq.order:  # never an older sequence for a newer one
                    victim = seq
                self.preempt(victim)
                if victim is seq:
                    return False

    def next_waiting(self) -> Sequence:
        """The waiting sequence to admit next, by the ``admission`` policy."""
        if self.admission == "fcfs":
            return self.waiting[0]
        overdue = self.num_steps - self.max_wait_steps
        for seq in self.waiting:  # preempted (-1) or waited too long: first come first served
            if seq.queued_at <= overdue or seq.queued_at < 0:
                return seq
        return min(self.waiting, key=lambda s: s.to_compute)  # ties: the earliest queued

    def schedule(self) -> Plan:
        """The next step's plan (possibly empty when nothing can run)."""
        self.num_steps += 1
        budget = self.max_num_batched_tokens
        plan = Plan([], [], [])
        scheduled: set[Sequence] = set()
        for decoding in (True, False):  # decode tokens first, then prefill chunks; oldest first
            for seq in list(self.running):
                if seq.status is not Status.RUNNING or seq.decoding != decoding:
                    continue  # preempted for an older sequence in this loop, or the other pass
                start = seq.num_computed
                if decoding:
                    end = start + 1
                else:
                    if len(plan.prefill) >= self.max_prefill_rows:
                        break
                    end = start + min(seq.to_compute, budget, self.max_prefill_chunk)
                if end - start > budget or end <= start:
                    continue
                if self._prepare(seq, start, end, plan.copies, scheduled):
                    self._schedule(plan, scheduled, seq, start, end)
                    budget -= end - start
        while self.waiting and budget > 0:
            seq = self.next_waiting()
            if sum(map(self._slots_taken, self.running)) + self._slots_taken(seq) > self.max_num_seqs:
                break
            hits = self._cached_prefix(seq)
            start = len(hits) * self.bm.page_size if hits else seq.num_computed
            todo = len(seq.tokens) - start
            decoding = not seq.is_parent and todo == 1  # seq.decoding once start is computed
            if not decoding and len(plan.prefill) >= self.max_prefill_rows:
                break
            end = start + min(todo, budget, self.max_prefill_chunk)
            table = hits or seq.pages  # the block table seq starts from
            # Cached pages nobody holds are counted free: taking them leaves fewer.
            needed = self.bm.pages_to_write(table, start, end) + self.bm.pages_revived(hits)
            headroom = self.watermark_pages if self.running else 0  # room for the running to grow
            if needed + headroom > self.bm.num_free:
                break
            if self.bm.cache is not None and not seq.pages:
                self.bm.cache.record(len(seq.tokens), start)
                if hits:
                    seq.pages, seq.num_computed, seq.num_cached = self.bm.take(hits), start, len(hits)
            plan.copies += self.bm.prepare_write(seq.pages, start, end)
            self.waiting.remove(seq)
            self._admit(seq)
            self._schedule(plan, scheduled, seq, start, end)
            budget -= end - start
        return plan

    @staticmethod
    def _schedule(plan: Plan, scheduled: set, seq: Sequence, start: int, end: int) -> None:
        scheduled.add(seq)
        if seq.decoding:  # the sequence's state decides, not the piece's length
            plan.decode.append(seq)
        else:
            plan.prefill.append((seq, start, end))
