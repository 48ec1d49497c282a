"""lm-evaluation-harness adapter: llmarch checkpoints on the harness's tasks.

Needs the ``eval`` extra (``pip install 'llmarch[eval]'``). Importing this module registers the
model type ``llmarch``; ``python -m llmarch.eval_harness`` is the harness's own command line with
it registered::

    python -m llmarch.eval_harness --model llmarch --model_args checkpoint=runs/shakespeare \\
        --tasks lambada_openai --batch_size 8

or, from Python, ``lm_eval.simple_evaluate(model=HarnessLM("runs/shakespeare"), tasks=[...])``.
The checkpoint is anything ``llmarch generate`` reads: an llmarch run, a Hugging Face directory or
Hub id, a quantized checkpoint.

Scores are the model's own: ``loglikelihood`` sums the log-probabilities of the continuation's
tokens given the context (the context truncated on the left to fit ``max_length``),
``loglikelihood_rolling`` scores a whole text in windows of ``max_length`` tokens as the harness
specifies (``lm_eval.utils.get_rolling_token_windows``), the first token conditioned on EOS: llmarch
packs documents after an EOS, so that is what a document's first token follows in training.
``generate_until`` decodes with llmarch's ``Engine`` (greedy unless the task asks for a
temperature) and cuts the text at the first stop string.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # an optional extra: say which
    raise ImportError("llmarch.eval_harness needs lm-evaluation-harness: pip install 'llmarch[eval]'") from e

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

MIN_BUCKET = 16  # the shortest padded length: rows are padded to powers of two, few programs


@register_model("llmarch")
class HarnessLM(LM):
    """An llmarch checkpoint as an ``lm_eval`` language model.

    Args:
      checkpoint: an llmarch run, Hugging Face directory or Hub id, or quantized checkpoint.
      tokenizer: "byte" or a tokenizer.json, instead of the checkpoint's.
      batch_size: rows scored per model call (the harness's ``--batch_size``; "auto" means 8).
      max_length: the longest row (default and limit: the model's ``max_seq_len``).
      max_gen_toks: new tokens per generation unless the task says otherwise.
      dtype: parameter and compute dtype, e.g. "bfloat16" (default: as stored).
    """

    def __init__(
        self,
        checkpoint: str,
        tokenizer: str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str | None = None,
        **harness_options: Any,  # e.g. device, max_batch_size: jax places the work itself
    ):
        super().__init__()
        from llmarch.data import load_tokenizer
        from llmarch.inference.loading import load_for_inference

        self.model, self.cfg, tok = load_for_inference(checkpoint, dtype=dtype)
        self.tok = load_tokenizer(tokenizer) if tokenizer else tok
        if self.tok is None:
            raise ValueError(f"{checkpoint} has no tokenizer: pass tokenizer=byte or a tokenizer.json")
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = min(int(max_length or self.cfg.max_seq_len), self.cfg.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        if self.batch_size <= 0 or self.max_length < 2:
            raise ValueError(f"batch_size={batch_size} and max_length={max_length} must be positive (>= 2)")
        graphdef, self.params, self.rest = nnx.split(self.model, nnx.Param, ...)

        @jax.jit
        def score(params, rest, inputs, targets):
            logits = nnx.merge(graphdef, params, rest)(inputs).astype(jnp.float32)  # [B,L,V]
            chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            logprob = chosen - jax.nn.logsumexp(logits, axis=-1)
            return logprob, chosen >= logits.max(axis=-1)  # [B,L] each: log p(target), greedy

        self._score = score
        self._engine = None

    @property
    def eot_token_id(self) -> int:
        return int(self.tok.eos_id)

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tok.encode(text)]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """The harness's rule: trailing spaces of the context move to the continuation, and the
        continuation's tokens are those that the whole text adds to the context's."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        n = len(self._encode(context))
        return whole[:n], whole[n:]

    def _score_rows(self, rows: Sequence[tuple[list[int], int]], desc: str) -> list[tuple[float, bool]]:
        """``(sum of log p, all greedy)`` of each ``(tokens, scored)``: the last ``scored`` tokens
        of ``tokens`` given those before them (``len(tokens) <= max_length + 1``)."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths together
        out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, disable=None):
            chunk = order[start : start + self.batch_size]
            longest = max(len(rows[i][0]) - 1 for i in chunk)
            length = min(max(MIN_BUCKET, 1 << (longest - 1).bit_length()), self.max_length)
            inputs = np.full((self.batch_size, length), self.tok.pad_id, np.int32)
            targets = np.zeros_like(inputs)
            for r, i in enumerate(chunk):
                tokens = rows[i][0]
                inputs[r, : len(tokens) - 1], targets[r, : len(tokens) - 1] = tokens[:-1], tokens[1:]
            logprob, greedy = map(np.asarray, self._score(self.params, self.rest, inputs, targets))
            for r, i in enumerate(chunk):
                n, k = len(rows[i][0]) - 1, rows[i][1]
                out[i] = (float(logprob[r, n - k : n].sum()), bool(greedy[r, n - k : n].all()))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        rows = []
        for request in requests:
            context, continuation = request.args
            ctx, cont = (
                self._encode_pair(context, continuation) if context else ([], self._encode(continuation))
            )
            if not cont:
                raise ValueError(f"the continuation {continuation!r} encodes to no tokens")
            ctx = ctx or [self.eot_token_id]  # an empty context: the document's start (after EOS)
            whole = (ctx + cont)[-(self.max_length + 1) :]
            rows.append((whole, min(len(cont), len(whole) - 1)))
        return self._score_rows(rows, "loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        rows, owner = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            windows = get_rolling_token_windows(
                self._encode(text), prefix_token=self.eot_token_id, max_seq_len=self.max_length, context_len=1
            )
            for context, predicted in map(make_disjoint_window, windows):
                rows.append((context + predicted, len(predicted)))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._score_rows(rows, "loglikelihood_rolling"), strict=True):
            totals[index] += logprob
        return totals

    def _engine_for_generation(self):
        if self._engine is None:
            from llmarch.inference import Engine

            budget = min(256, self.max_length)
            self._engine = Engine(
                self.model,
                self.cfg,
                tokenizer=self.tok,
                max_num_seqs=min(self.batch_size, budget),
                max_num_batched_tokens=budget,
                max_prefill_chunk=budget,
                max_len=self.max_length,
            )
        return self._engine

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from llmarch.inference import SamplingParams

        prompts, params, stops = [], [], []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new = min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
            temperature = float(kwargs.get("temperature") or 0.0)  # the harness's default: greedy
            if kwargs.get("do_sample") and temperature == 0.0:
                temperature = 1.0
            ids = self._encode(context) or [self.eot_token_id]
            prompts.append(ids[-(self.max_length - new) :])  # room for the new tokens
            stop = (self.eot_token_id,)
            params.append(SamplingParams(max_tokens=new, temperature=temperature, stop_token_ids=stop))
            stops.append(until)
        outputs = self._engine_for_generation().generate(prompts, params) if prompts else []
        texts = []
        for out, until in zip(outputs, stops, strict=True):
            # EOS ends a completion; ids past the tokenizer's vocabulary (a model's padded rows) have no text
            ids = [
                t for t in out.completions[0].token_ids if t != self.eot_token_id and t < self.tok.vocab_size
            ]
            text = self.tok.decode(np.asarray(ids, np.int32))
            cut = min((text.find(s) for s in until if s and s in text), default=len(text))
            texts.append(text[:cut])
        return texts


def main(argv: Sequence[str] | None = None) -> None:
    """The harness's command line (``lm_eval ...``) with the ``llmarch`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
