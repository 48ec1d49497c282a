"""Image inputs for the serving engine: a LLaVA model's tower runs once per request, when it is
queued, and its projected features stand in for the prompt's placeholder tokens at prefill.

``Engine(llava)`` serves ``llmarch.vision.llava.Llava``: the decoder (``language_model``) runs
the paged steps as any ``Transformer`` does, and ``ImageEncoder.encode`` turns a request's
``pixel_values [N,C,H,W]`` into ``embeds [len(prompt), D]`` (features at the placeholder
positions, row-major in image order, as ``Llava.embed`` writes them) that the step program
writes over the token embeddings of those positions (``step_batch.StepBatch.embeds``). The
features are kept with the request on the host, so chunked prefill, preemption and recompute, and
``n > 1`` forks read the same rows; decode steps carry none. Prefix caching keys an image request's
pages by its images too (``prefix_cache.root_for_images``).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from llmarch.inference import prefix_cache


@functools.partial(jax.jit, static_argnums=0)
def _features(graphdef, state, images):
    return nnx.merge(graphdef, state).image_features(images)


class ImageEncoder:
    """A ``Llava`` model's tower and projector, run on a request's images."""

    def __init__(self, model):
        self.cfg = model.cfg  # LlavaConfig
        # The whole model's state goes to the tower's program; the decoder's arrays are arguments it
        # never reads, so nothing is copied for them.
        self._graphdef, self._state = nnx.split(model)

    def encode(self, prompt: list[int], images) -> tuple[np.ndarray, np.ndarray, bytes]:
        """``(embeds [len(prompt), D] float32, mask [len(prompt)] bool, hash_root)`` of ``images``
        (``pixel_values [N,C,H,W]``, or one image ``[C,H,W]``) for ``prompt``'s placeholders.

        Raises:
          ValueError: before anything compiles, for pixel values of the wrong shape, rank or dtype,
            non-finite ones, or a placeholder count other than ``N * image_tokens``.
        """
        from llmarch.vision.llava import check_inputs

        tokens = np.asarray(prompt, np.int32)[None]
        if images is None:  # the caller checked that the prompt holds placeholders
            found, token = int(np.sum(tokens == self.cfg.image_token_id)), self.cfg.image_token_id
            raise ValueError(
                f"the prompt holds {found} image placeholders (id {token}) but no images were given: pass "
                "images= (llmarch generate --image FILE, one per <image>), or leave the placeholders out"
            )
        pixels = np.asarray(images)
        if pixels.ndim == 3:
            pixels = pixels[None]
        check_inputs(self.cfg, tokens, pixels)
        with np.errstate(over="ignore"):  # values past float32's range become inf: refused below
            pixels = pixels.astype(np.float32)  # the tower's input
        if not np.isfinite(pixels).all():
            raise ValueError("images hold non-finite pixel values (in float32): expected finite floats")
        features = _features(self._graphdef, self._state, pixels)  # [N,P,D]
        features = np.asarray(jax.device_get(features), np.float32)
        mask = tokens[0] == self.cfg.image_token_id
        embeds = np.zeros((len(prompt), features.shape[-1]), np.float32)
        embeds[mask] = features.reshape(-1, features.shape[-1])
        return embeds, mask, prefix_cache.root_for_images(pixels)


def expand_placeholders(ids: list[int], image_token_id: int, image_tokens: int, num_images: int) -> list[int]:
    """``ids`` with each of its ``num_images`` single placeholders (``<image>``, as a chat prompt
    writes it) repeated ``image_tokens`` times, as transformers' LLaVA processor expands them;
    ``ids`` that already hold ``num_images * image_tokens`` placeholders come back unchanged.

    Raises:
      ValueError: any other placeholder count, naming the id and both counts allowed.
    """
    found = ids.count(image_token_id)
    if found == num_images * image_tokens:
        return list(ids)
    if found != num_images:
        raise ValueError(
            f"the prompt holds {found} image placeholders (id {image_token_id}) for {num_images} images: "
            f"allowed: {num_images} (one per image, e.g. <image> in the text, each expanded to "
            f"{image_tokens}) or {num_images * image_tokens}"
        )
    out: list[int] = []
    for t in ids:
        out.extend([t] * image_tokens if t == image_token_id else [t])
    return out
