"""Vaccine: perturbation-aware alignment (Huang, Hu, Liu; NeurIPS 2024, arXiv 2402.01109).

Vaccine aligns the model so that its hidden states survive a bounded perturbation, standing in
for the embedding drift that harmful fine-tuning causes later. Each step, on the alignment batch:

    pass 1   g_l = d f / d e_l          for each layer output e_l (no weight update)
    scale    eps_l = rho * g_l / (||g||_global + 1e-7)      ||.||: over all layers (and samples)
    pass 2   g   = grad_w f(w; e_l + eps_l for every l)     hooks add eps_l to the layer outputs
    optimizer.step(g); the hooks are removed, so the model itself is unchanged

Which outputs: the reference code (git-disl/Vaccine ``trainer.py`` and the copy in
git-disl/Booster) hooks every self-attention module (``LlamaAttention`` ...) and perturbs its
output, the branch added to the residual stream, not the decoder layer's output. That is our
default (``target="attention"``); ``target="decoder"`` perturbs each decoder layer's output
hidden state, the paper's e_l taken literally. rho: 2 in the Vaccine README and scripts (5 in
the Booster repository's vaccine and Booster+Vaccine scripts).

Departures from the reference, none of which changes the update for one batch on one device:
- pass 1 takes ``torch.autograd.grad`` of the loss w.r.t. the recorded outputs only, instead of a
  full backward whose weight gradients are thrown away (deprecated module backward hooks);
- with gradient accumulation the norm is taken over all micro-batches of the optimizer step
  (and across ranks), so accumulation k equals one batch k times larger; the reference normalises
  each micro-batch on its own;
- the perturbation is added as a constant in the autograd graph (``out + eps``) rather than by
  overwriting ``.data``: same values and same gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from booster.methods.booster import NORM_EPS, global_norm
from booster.methods.losses import count_scored_tokens, token_loss_sum
from booster.training import LMTrainer, sum_over_ranks

#: where the perturbation goes: the self-attention output (reference code) or the decoder layer output.
TARGETS = ("attention", "decoder")


def transformer_layers(model: Any) -> list[torch.nn.Module]:
    """The decoder layers of a (peft-wrapped) causal LM, in order."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(
            f"cannot find the decoder layers of {type(base).__name__} (expected .get_decoder().layers)"
        )
    return list(layers)


def perturbation_modules(model: Any, target: str = "attention") -> list[torch.nn.Module]:
    """The modules whose outputs Vaccine perturbs, one per layer."""
    if target not in TARGETS:
        raise ValueError(f"vaccine target must be one of {TARGETS}, got {target!r}")
    layers = transformer_layers(model)
    if target == "decoder":
        return layers
    modules = [getattr(layer, "self_attn", None) for layer in layers]
    if any(m is None for m in modules):
        raise ValueError("target='attention' needs a self_attn module in every decoder layer; use 'decoder'")
    return modules


def _hidden(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (attention modules return a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def recorded_outputs(modules: Sequence[torch.nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Record each module's first output hidden state during the block (hooks removed after).

    Only the first call is kept, so a recomputation under gradient checkpointing does not
    replace the tensor that the loss was built from.
    """
    outputs: list[torch.Tensor | None] = [None] * len(modules)

    def make_hook(i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if outputs[i] is None:
                outputs[i] = _hidden(output)

        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(modules)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def perturbed(modules: Sequence[torch.nn.Module], perturbations: Sequence[torch.Tensor]) -> Iterator[None]:
    """Add ``perturbations[i]`` to the output hidden state of ``modules[i]`` inside the block.

    The hooks are removed on exit, also on error, so no perturbation outlives the step.
    """
    if len(modules) != len(perturbations):
        raise ValueError(f"{len(modules)} modules but {len(perturbations)} perturbations")

    def make_hook(eps: torch.Tensor) -> Callable[..., Any]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            hidden = _hidden(output)
            return _with_hidden(output, hidden + eps.to(hidden.dtype))

        return hook

    handles = [m.register_forward_hook(make_hook(eps)) for m, eps in zip(modules, perturbations, strict=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def hidden_gradients(
    modules: Sequence[torch.nn.Module], loss_fn: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Pass 1: the loss and its gradient w.r.t. each module's output hidden state (float32 or wider)."""
    with recorded_outputs(modules) as outputs:
        loss = loss_fn()
    if any(o is None for o in outputs):
        raise RuntimeError("a perturbation module did not run in the forward pass")
    present = [o for o in outputs if o.requires_grad]
    grads = iter(torch.autograd.grad(loss, present, allow_unused=True)) if present else iter(())
    result = []
    for o in outputs:
        g = next(grads) if o.requires_grad else None
        g = torch.zeros_like(o) if g is None else g  # an output no trainable weight reaches
        result.append(g.detach().to(torch.promote_types(g.dtype, torch.float32)))
    return loss.detach(), result


def scale_to_norm(
    grads: Sequence[torch.Tensor], rho: float, norm: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """eps = rho * g / (||g|| + 1e-7); ``norm`` overrides ||g|| (a norm over more micro-batches or ranks)."""
    norm = global_norm(grads) if norm is None else norm
    scale = rho / (norm + NORM_EPS)
    return [g * scale for g in grads]


@dataclass
class VaccineTerms:
    """One Vaccine step on one batch: the weight gradient of pass 2 and what we log."""

    grads: list[torch.Tensor]
    perturbations: list[torch.Tensor]
    loss: float
    loss_perturbed: float
    hidden_grad_norm: float


def vaccine_gradients(
    params: Sequence[torch.Tensor],
    modules: Sequence[torch.nn.Module],
    loss_fn: Callable[[], torch.Tensor],
    rho: float,
) -> VaccineTerms:
    """The Vaccine weight gradient for one batch: grad_w of ``loss_fn`` with the layer outputs perturbed.

    ``loss_fn`` runs the model forward on the batch and returns the alignment loss; it is called
    twice (unperturbed, then perturbed). The weights are never modified.
    """
    loss, hidden_grads = hidden_gradients(modules, loss_fn)
    norm = global_norm(hidden_grads)
    perturbations = scale_to_norm(hidden_grads, rho, norm)
    with perturbed(modules, perturbations):
        loss_perturbed = loss_fn()
    grads = torch.autograd.grad(loss_perturbed, list(params), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    return VaccineTerms(grads, perturbations, float(loss), float(loss_perturbed.detach()), float(norm))


# -- the trainer ------------------------------------------------------------------------------------


def _rho_field() -> Any:
    return field(
        default=2.0, metadata={"help": "Vaccine's rho: global L2 norm of the hidden-state perturbation."}
    )


def _target_field() -> Any:
    return field(
        default="attention",
        metadata={
            "help": "Perturbed outputs: 'attention' (reference code) or 'decoder' (each layer's output)."
        },
    )


def _check_vaccine(args: Any) -> None:
    if args.vaccine_rho < 0:
        raise ValueError(f"vaccine_rho must be >= 0, got {args.vaccine_rho}")
    if args.vaccine_target not in TARGETS:
        raise ValueError(f"vaccine_target must be one of {TARGETS}, got {args.vaccine_target!r}")


@dataclass
class VaccineConfig(TrainingArguments):
    """TrainingArguments plus Vaccine's rho and where it perturbs (defaults: the reference's)."""

    vaccine_rho: float = _rho_field()
    vaccine_target: str = _target_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_vaccine(self)


class VaccineMixin:
    """Makes the alignment pass of an ``LMTrainer`` subclass perturbation-aware (Vaccine).

    Once per optimizer step, before the first micro-batch, pass 1 runs on every micro-batch of the
    step (Trainer's ``get_batch_samples`` hands them over) and the perturbations are scaled by one
    norm over all of them and all ranks, so accumulation k equals one k times larger batch. Each
    micro-batch's ordinary loss (``compute_loss``) then runs with its perturbation hooked on; the
    hooks exist only inside that call.
    """

    args: Any

    def _init_vaccine(self) -> None:
        self._vaccine_pending: list[Any] | None = None
        self._vaccine_queue: list[list[torch.Tensor]] = []
        self._vaccine_active: list[torch.Tensor] | None = None

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)  # type: ignore[misc]
        self._vaccine_pending = batches
        self._vaccine_queue = []
        return batches, num_items

    def vaccine_perturbations(
        self, model: Any, batches: list[dict[str, torch.Tensor]], num_items_in_batch: Any
    ) -> list[list[torch.Tensor]]:
        """Pass 1 on ``batches``: per micro-batch, eps_l = rho * g_l / ||g|| with one global norm."""
        trainer: Any = self
        unwrapped = trainer.accelerator.unwrap_model(model)
        modules = perturbation_modules(unwrapped, self.args.vaccine_target)
        prepared = [trainer._prepare_inputs(b) for b in batches]
        if num_items_in_batch is None:
            num_items_in_batch = max(sum(count_scored_tokens(b["labels"]) for b in prepared), 1)

        def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with trainer.compute_loss_context_manager():
                return token_loss_sum(unwrapped, batch) / num_items_in_batch

        was_training = unwrapped.training
        unwrapped.train()
        try:
            results = [hidden_gradients(modules, functools.partial(loss_fn, b)) for b in prepared]
        finally:
            unwrapped.train(was_training)
        local = global_norm([g for _, grads in results for g in grads])
        norm = sum_over_ranks(local.pow(2)).sqrt()
        trainer.log_extra(
            loss_unperturbed=float(sum(float(loss) for loss, _ in results)),
            vaccine_hidden_grad_norm=float(norm),
        )
        return [scale_to_norm(grads, self.args.vaccine_rho, norm) for _, grads in results]

    def training_step(
        self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        if not self._vaccine_queue:
            pending = self._vaccine_pending
            batches = pending if pending and pending[0] is inputs else [inputs]
            self._vaccine_pending = None
            self._vaccine_queue = self.vaccine_perturbations(model, batches, num_items_in_batch)
        self._vaccine_active = self._vaccine_queue.pop(0)
        try:
            return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        finally:
            self._vaccine_active = None

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        parent = super().compute_loss  # type: ignore[misc]
        if self._vaccine_active is None:  # evaluation, or Booster's own passes
            return parent(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        unwrapped = self.accelerator.unwrap_model(model)  # type: ignore[attr-defined]
        with perturbed(perturbation_modules(unwrapped, self.args.vaccine_target), self._vaccine_active):
            return parent(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


class VaccineTrainer(VaccineMixin, LMTrainer):
    """Vaccine alignment: SFT whose gradient is taken with the layer outputs perturbed (norm rho)."""

    args: VaccineConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not hasattr(self.args, "vaccine_rho"):
            raise TypeError(
                "VaccineTrainer needs args=VaccineConfig(...) (it carries vaccine_rho, vaccine_target)"
            )
        self._init_vaccine()
