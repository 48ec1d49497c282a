"""``DistillConfig``: the teacher, the divergence and how it mixes with the labels."""

from __future__ import annotations

import dataclasses

from llmarch.checks import check_choice, check_int, check_number, fail

LOSSES = ("forward_kl", "reverse_kl", "jsd")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Distillation settings of a training run (``TrainConfig.distill``).

    The objective of a batch drawn from the corpus is
    ``alpha · D(teacher ‖ student) + (1 − alpha) · CE(student, labels)``, with ``D`` the
    ``loss`` divergence at ``temperature`` (times τ², see ``llmarch.distill.losses``). A fraction
    ``on_policy_fraction`` of the steps (GKD, Agarwal et al. 2024) instead trains on sequences the
    student itself samples (temperature 1), continuing the first ``prompt_len`` tokens of the
    batch's rows; those steps use ``D`` alone over the sampled positions, since their "labels"
    are the student's own draws.

    Attributes:
      teacher: an llmarch run directory or a Hugging Face checkpoint directory; it must share the
        student's tokenizer and vocabulary.
      loss: "forward_kl" (Hinton et al.'s soft targets), "reverse_kl" or "jsd" (generalized
        JSD(β) of GKD).
      temperature: τ > 0, softening both distributions.
      alpha: the divergence's weight in [0, 1] against the hard-label loss.
      beta: JSD's β in (0, 1).
      on_policy_fraction: λ in [0, 1]: the share of steps trained on student samples.
      prompt_len: tokens of each row kept as the prompt of an on-policy sample (0: half the
        row); must be shorter than the sequence.
    """

    teacher: str
    loss: str = "forward_kl"
    temperature: float = 1.0
    alpha: float = 1.0
    beta: float = 0.5
    on_policy_fraction: float = 0.0
    prompt_len: int = 0

    def __post_init__(self):
        owner = "DistillConfig"
        if not isinstance(self.teacher, str) or not self.teacher:
            fail(owner, "teacher", self.teacher, "must be a run or Hugging Face directory")
        check_choice(owner, "loss", self.loss, LOSSES)
        check_number(owner, "temperature", self.temperature, "must be a finite number > 0", lambda v: v > 0)
        check_number(owner, "alpha", self.alpha, "must be in [0, 1]", lambda v: 0 <= v <= 1)
        check_number(owner, "beta", self.beta, "must be in (0, 1)", lambda v: 0 < v < 1)
        check_number(
            owner, "on_policy_fraction", self.on_policy_fraction, "must be in [0, 1]", lambda v: 0 <= v <= 1
        )
        check_int(owner, "prompt_len", self.prompt_len, low=0)

    def prompt_tokens(self, seq_len: int) -> int:
        """The on-policy prompt length for rows of ``seq_len`` tokens."""
        return self.prompt_len or max(seq_len // 2, 1)
