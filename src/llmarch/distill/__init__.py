"""Knowledge distillation: a student trained on a teacher's next-token distributions.

``DistillConfig`` names the teacher and the objective; ``losses`` holds the divergences (Hinton
et al.'s temperature-softened KL, forward and reverse KL, GKD's generalized JSD(β)). The step
that trains on them is ``llmarch.train.distill_step``; ``llmarch.sources.train`` loads the teacher
and runs ``llmarch distill``.
"""

from llmarch.distill.config import LOSSES, DistillConfig
from llmarch.distill.losses import divergence, forward_kl, jsd, reverse_kl

__all__ = ["LOSSES", "DistillConfig", "divergence", "forward_kl", "jsd", "reverse_kl"]
