"""Training: losses and the pure train step."""

from llmarch.train.step import cross_entropy, make_train_step

__all__ = ["cross_entropy", "make_train_step"]
