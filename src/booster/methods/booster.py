"""Booster's update as one short function (Huang et al., ICLR 2025, arXiv 2409.01586).

Booster minimises  f(w) + lamb * (h(w) - h(w - alpha * grad h(w) / ||grad h(w)||)),
f the alignment loss and h the harmful loss: it penalises how much one simulated, normalised
harmful step would lower the harmful loss. Dropping the Hessian term (the direction is held
fixed), the gradient of the penalty is

    lamb * (grad h(w) - grad h(w'))   with   w' = w - alpha * g_h / (||g_h|| + 1e-7),

||.|| the global L2 norm over all trainable parameters. :func:`booster_correction` computes that
term; the trainer adds it to the alignment gradient before the optimizer step. It is exactly the
gradient of the surrogate F(w) = f(w) + lamb * (h(w) - h(w - alpha * d)) with d held fixed, which
the finite-difference test checks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

#: added to the norm as in the reference code, so a zero harmful gradient cannot divide by zero.
NORM_EPS = 1e-7

#: returns (harmful loss, gradients of it w.r.t. the trainable parameters) at the current weights.
HarmfulGradFn = Callable[[], tuple[torch.Tensor, list[torch.Tensor]]]

#: averages tensors over the data-parallel ranks (an all-reduce divided by the number of ranks).
Reduce = Callable[[list[torch.Tensor]], list[torch.Tensor]]


@dataclass
class BoosterTerms:
    """What one Booster step computed: the gradient correction and the quantities we log."""

    correction: list[torch.Tensor]
    harmful_loss: float
    harmful_loss_perturbed: float
    harmful_grad_norm: float

    @property
    def harmful_loss_reduction(self) -> float:
        """h(w) - h(w'): how much one simulated harmful step lowers the harmful loss."""
        return self.harmful_loss - self.harmful_loss_perturbed


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all tensors taken together, in float32 (or higher) whatever their dtype.

    Sharded tensors (FSDP2 DTensors) give the norm of the full tensors, reduced over their shards,
    so every rank takes the same step.
    """
    norms = [torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors]
    total = torch.linalg.vector_norm(torch.stack(norms))
    return total.full_tensor() if hasattr(total, "full_tensor") else total


def booster_correction(
    params: Sequence[torch.Tensor],
    harmful_grad: HarmfulGradFn,
    lamb: float,
    alpha: float,
    reduce: Reduce | None = None,
) -> BoosterTerms:
    """lamb * (grad h(w) - grad h(w')) for the trainable ``params``; ``params`` come back bit-exact.

    ``harmful_grad`` evaluates h and its gradient at whatever values ``params`` hold when called
    (over the whole effective harmful batch). The weights are perturbed in place for the second
    call and then restored from a saved copy, not by adding the step back, so no rounding drift
    accumulates in low precision.

    Data parallel: ``harmful_grad`` returns the global loss and this rank's share of the gradient
    (shares average to the global-batch gradient), and ``reduce`` averages g_h so that every rank
    takes the same step, normalised by the global norm. g_h' is not reduced: the correction is this
    rank's share, and averaging the shares gives lamb * (g_h - g_h') exactly. The caller adds it to
    the gradient before the data-parallel average of the alignment gradient, which then carries it
    at no extra communication.
    """
    loss, grads = harmful_grad()
    if reduce is not None:
        grads = reduce(grads)
    norm = global_norm(grads)
    scale = alpha / (norm + NORM_EPS)
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_((g * scale).to(p.dtype))
        loss_perturbed, grads_perturbed = harmful_grad()
    finally:
        with torch.no_grad():
            for p, original in zip(params, saved, strict=True):
                p.copy_(original)
    correction = [g.sub_(gp).mul_(lamb) for g, gp in zip(grads, grads_perturbed, strict=True)]
    return BoosterTerms(
        correction=correction,
        harmful_loss=float(loss),
        harmful_loss_perturbed=float(loss_perturbed),
        harmful_grad_norm=float(norm),
    )
