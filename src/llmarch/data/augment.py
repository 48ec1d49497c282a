"""Data augmentation: EDA text operations and jax.numpy image operations, with grain transforms.

The text half lives in ``augment_text`` (synonym replacement, random insertion, swap and
deletion after Wei & Zou 2019, and sentence reordering; WordNet or table synonyms), the
image half in ``augment_image`` (flips, random crop, scale, rotate, Gaussian noise). This
module gathers both, so users write ``from llmarch.data import augment``::

    ds = grain.MapDataset.source(records).random_map(
        augment.SynonymReplacement(augment.TableSynonyms({"quick": ["fast"]}), alpha=0.1), seed=0)
    image = augment.rotate(image, 15.0)
"""

from llmarch.data.augment_image import (
    ImageAugment,
    flip_horizontal,
    flip_vertical,
    gaussian_noise,
    random_crop,
    random_rotate,
    rotate,
    scale,
)
from llmarch.data.augment_text import (
    STOP_WORDS,
    EasyDataAugmentation,
    RandomDeletion,
    RandomInsertion,
    RandomSwap,
    SentenceReorder,
    SynonymReplacement,
    SynonymSource,
    TableSynonyms,
    WordNetSynonyms,
    find_wordnet_dir,
    random_deletion,
    random_insertion,
    random_swap,
    sentence_reorder,
    split_sentences,
    synonym_replacement,
)

__all__ = [
    "STOP_WORDS",
    "EasyDataAugmentation",
    "ImageAugment",
    "RandomDeletion",
    "RandomInsertion",
    "RandomSwap",
    "SentenceReorder",
    "SynonymReplacement",
    "SynonymSource",
    "TableSynonyms",
    "WordNetSynonyms",
    "find_wordnet_dir",
    "flip_horizontal",
    "flip_vertical",
    "gaussian_noise",
    "random_crop",
    "random_deletion",
    "random_insertion",
    "random_rotate",
    "random_swap",
    "rotate",
    "scale",
    "sentence_reorder",
    "split_sentences",
    "synonym_replacement",
]
