"""The distillation objective: a student's loss against a teacher's distributions, in one step.

``distill_objective(dcfg, teacher_graphdef)`` is a ``llmarch.train.step.Objective``: given the
student, a batch and the teacher's state, it runs the teacher in inference mode (no gradient
reaches it) inside the same jitted step, and returns

    alpha · mean D(P_teacher ‖ Q_student) + (1 − alpha) · label_weight · CE + z_loss · z + aux

over the unmasked positions, with ``D`` the configured divergence (``llmarch.distill.losses``).
A batch may carry ``label_weight [B,T]``: 0 on rows the student sampled itself (on-policy GKD
steps, where the tokens are not labels), 1 on corpus rows. Distillation needs the whole ``[B,T,V]``
distributions of both models, so the fused vocabulary-chunked loss does not apply here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llmarch.distill.config import DistillConfig
from llmarch.distill.losses import divergence
from llmarch.model import Transformer, aux_loss
from llmarch.train.step import Batch, Objective, masked_mean


def distill_objective(
    dcfg: DistillConfig, teacher_graphdef: nnx.GraphDef, *, z_loss: float = 0.0
) -> Objective:
    """The objective of ``dcfg`` for a teacher of ``teacher_graphdef`` (its state is the step's
    ``teacher`` argument)."""

    def objective(student: Transformer, batch: Batch, teacher_state: Any):
        call = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
        teacher = nnx.merge(teacher_graphdef, teacher_state)
        t_logits = jax.lax.stop_gradient(teacher(batch["inputs"], **call)).astype(jnp.float32)
        out = student(batch["inputs"], **call, return_aux=True)
        s_logits = out.logits.astype(jnp.float32)  # [B,T,V]
        mask = batch.get("mask")
        kd = masked_mean(
            divergence(dcfg.loss, t_logits, s_logits, temperature=dcfg.temperature, beta=dcfg.beta), mask
        )
        nll = optax.softmax_cross_entropy_with_integer_labels(s_logits, batch["targets"])  # [B,T]
        ce = masked_mean(nll, mask)
        weight = batch.get("label_weight")
        labelled = ce if weight is None else masked_mean(nll * weight, mask)
        lse = jax.nn.logsumexp(s_logits, axis=-1)
        z = masked_mean(jnp.square(lse), mask)
        extra = aux_loss(out.aux)
        total = dcfg.alpha * kd + (1 - dcfg.alpha) * labelled + z_loss * z + extra
        return total, {"loss": ce, "z_loss": z, "aux_loss": extra, "distill_loss": kd}, out.aux

    return objective
