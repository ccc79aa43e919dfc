"""RepNoise: representation noising (Rosati et al., NeurIPS 2024, arXiv 2405.14577).

RepNoise removes the information about harmful answers from the model's hidden states, so that
fine-tuning has little to recover. On an alignment (retain) batch and a harmful batch:

    loss = f(w)  +  beta * MMD(hidden states on the harmful batch, Gaussian noise)
                 -  alpha * log(h_all(w) + 1)

    f      retain loss: LM loss on the alignment batch (refusals), as in SFT
    MMD    per layer, between the harmful samples' hidden states (flattened over tokens) and as
           many samples of N(0, I) of the same shape, averaged over layers; minimised, so the
           harmful representations are pushed toward noise
    h_all  harmful LM loss, also read out at every layer through the final norm and LM head:
           (CE_final + sum_j CE(lm_head(norm(e_j)))) / (L + 1), j over the embedding output and
           the L layer outputs. It enters with a minus sign through a log: gradient ascent on
           the harmful loss, damped as it grows.

Defaults alpha=0.1, beta=0.001 (git-disl/Booster ``script/alignment/repNoise.sh``, which passes
them as ``--rho`` and ``--lamb``). We follow the reference loss (domenicrosati/representation-
noising ``representation_noising/loss.py`` and its copy in git-disl/Booster
``loss_func/repnoise_loss.py``): the hidden states are the outputs of each layer's ``mlp``
module; the MMD is the multi-bandwidth Gaussian kernel one (5 bandwidths, factor 2, base
bandwidth from the detached mean pairwise distance); hidden states and noise are zeroed outside
the mask before flattening. Departures:

- mask: the reference compares the harmful and harmless input ids position by position and keeps
  the positions that differ, which for a *paired* batch (same prompt, different answers) is the
  answer; we use the answer tokens directly (labels != -100), so the mask no longer depends on
  which alignment batch happens to be drawn beside the harmful one (in the Booster copy the two
  batches are not paired and the id comparison also keeps prompt tokens);
- the cross-entropies score every answer token; the reference's masking zeroes the logits
  that predict the first answer token (a constant log V term) and drops target id 0;
- the read-out of the last layer applies the final norm once; the reference applies it to
  ``hidden_states[-1]``, which transformers has already normalised;
- with gradient accumulation each micro-batch gets its own harmful batch and its MMD and ascent
  terms are averaged over micro-batches (the MMD couples the samples of a batch, so a larger batch
  is not the same objective); the retain loss is the exact large-batch mean, as in SFT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from booster.data.template import IGNORE_INDEX
from booster.methods.vaccine import transformer_layers
from booster.training import HarmfulBatchArguments, LMTrainer

#: the reference MMD: 5 Gaussian kernels whose bandwidths are spaced by a factor 2.
KERNEL_MUL = 2.0
KERNEL_NUM = 5


def mmd(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Biased MMD^2 between samples ``source`` (n, d) and ``target`` (m, d), multi-bandwidth Gaussian kernel.

    The base bandwidth is the mean pairwise squared distance of all n + m samples (detached),
    divided by KERNEL_MUL ** (KERNEL_NUM // 2); the kernel sums KERNEL_NUM bandwidths.
    """
    n = source.shape[0]
    total = torch.cat([source, target], dim=0)
    sq = total.pow(2).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * total @ total.T).clamp_min(0.0)
    count = total.shape[0]
    bandwidth = dist.detach().sum() / (count * count - count)
    bandwidth = bandwidth / KERNEL_MUL ** (KERNEL_NUM // 2)
    kernel = sum(torch.exp(-dist / (bandwidth * KERNEL_MUL**i)) for i in range(KERNEL_NUM))
    xx, yy = kernel[:n, :n], kernel[n:, n:]
    xy, yx = kernel[:n, n:], kernel[n:, :n]
    return xx.mean() + yy.mean() - xy.mean() - yx.mean()


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64, for exact tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@dataclass
class HarmfulTerms:
    """What RepNoise computes on a harmful batch (tensors keep their graph)."""

    #: MMD to Gaussian noise, averaged over layers.
    noise_mmd: torch.Tensor
    #: (CE_final + sum of per-layer read-out CEs) / (L + 1).
    harmful_loss: torch.Tensor
    #: the final-logits cross-entropy alone (for logging: the usual harmful loss).
    harmful_loss_final: torch.Tensor


def _decoder_norm_head(model: Any) -> tuple[Any, Any, Any]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    norm = getattr(decoder, "norm", None)
    head = base.get_output_embeddings()
    if norm is None or head is None:
        raise ValueError(f"RepNoise needs a final norm and an LM head; {type(base).__name__} exposes neither")
    return decoder, norm, head


def harmful_terms(
    model: Any, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
) -> HarmfulTerms:
    """One forward of the decoder on the harmful batch; MMD-to-noise and the layer-wise harmful loss.

    Noise is drawn layer by layer from ``generator`` (the global generator when None), in float32
    (or the hidden states' dtype if wider).
    """
    decoder, norm, head = _decoder_norm_head(model)
    layers = transformer_layers(model)
    mlps = [getattr(layer, "mlp", None) for layer in layers]
    if any(m is None for m in mlps):
        raise ValueError("RepNoise reads each layer's mlp output; a decoder layer has no .mlp")
    captured: dict[str, list[torch.Tensor]] = {"embedding": [], "layer": [], "mlp": []}

    def keep(key: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            captured[key].append(output[0] if isinstance(output, tuple) else output)

        return hook

    def keep_input(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        captured["embedding"].append(args[0] if args else kwargs["hidden_states"])

    handles = [layers[0].register_forward_pre_hook(keep_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(keep("layer")) for layer in layers]
    handles += [m.register_forward_hook(keep("mlp")) for m in mlps]
    try:
        decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    finally:
        for handle in handles:
            handle.remove()

    labels = batch["labels"]
    answer = labels.ne(IGNORE_INDEX)  # the mask: answer tokens (see the module docstring)
    noise_mmd = torch.zeros((), device=labels.device)
    for hidden in captured["mlp"]:
        hidden = _upcast(hidden) * answer[..., None]
        noise = torch.randn(hidden.shape, generator=generator, device=hidden.device, dtype=hidden.dtype)
        noise = noise * answer[..., None]
        noise_mmd = noise_mmd + mmd(hidden.flatten(1), noise.flatten(1))
    noise_mmd = noise_mmd / len(captured["mlp"])

    targets = labels[:, 1:]
    scored = targets.ne(IGNORE_INDEX)

    config = getattr(model, "config", None)
    scale = getattr(config, "logit_scale", None)
    softcap = getattr(config, "final_logit_softcapping", None)

    def read_out(hidden: torch.Tensor) -> torch.Tensor:
        logits = _upcast(head(norm(hidden[:, :-1][scored])))
        if scale is not None:  # same logit transforms as booster.methods.losses
            logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, targets[scored])

    readouts = [read_out(h) for h in (captured["embedding"][0], *captured["layer"])]
    final = readouts[-1]  # the last layer through the final norm and head: the model's own logits
    harmful_loss = (final + sum(readouts)) / len(readouts)
    return HarmfulTerms(noise_mmd, harmful_loss, final.detach())


def repnoise_penalty(
    noise_mmd: torch.Tensor, harmful_loss: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """beta * MMD - alpha * log(harmful + 1): minimised, so the MMD to noise falls and the harmful loss rises."""
    return beta * noise_mmd - alpha * torch.log(harmful_loss + 1.0)


def repnoise_objective(
    retain_loss: torch.Tensor, noise_mmd: torch.Tensor, harmful_loss: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """The whole RepNoise loss for one retain batch and one harmful batch."""
    return retain_loss + repnoise_penalty(noise_mmd, harmful_loss, alpha, beta)


# -- the trainer ------------------------------------------------------------------------------------


@dataclass
class RepNoiseConfig(HarmfulBatchArguments):
    """TrainingArguments plus RepNoise's weights (defaults: the reference script's)."""

    repnoise_alpha: float = field(
        default=0.1, metadata={"help": "alpha: weight of -log(harmful loss + 1), the gradient-ascent term."}
    )
    repnoise_beta: float = field(
        default=0.001, metadata={"help": "beta: weight of the MMD between harmful hidden states and noise."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.repnoise_alpha < 0 or self.repnoise_beta < 0:
            raise ValueError("repnoise_alpha and repnoise_beta must be >= 0")


class RepNoiseTrainer(LMTrainer):
    """RepNoise alignment: retain loss + beta * MMD(harmful hidden states, noise) - alpha * log(h + 1).

    Every alignment micro-batch is paired with a fresh harmful micro-batch; the harmful terms of
    the k micro-batches of a step are averaged (divided by k), the retain loss is the step's mean.
    """

    args: RepNoiseConfig

    def __init__(self, *args: Any, harmful_dataset: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, RepNoiseConfig):
            raise TypeError("RepNoiseTrainer needs args=RepNoiseConfig(...)")
        self.harmful = self.add_stream("harmful", harmful_dataset, self.args.harmful_batch_size)
        #: the Gaussian noise has its own generator (seed + rank), so it does not depend on what else
        #: draws random numbers and a run is reproducible.
        self.noise_generator = torch.Generator(device=self.args.device).manual_seed(
            self.args.seed + self.args.process_index
        )

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        retain = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if model.training:
            terms = harmful_terms(
                self.accelerator.unwrap_model(model), self.harmful.next(), generator=self.noise_generator
            )
            penalty = repnoise_penalty(
                terms.noise_mmd, terms.harmful_loss, self.args.repnoise_alpha, self.args.repnoise_beta
            )
            micro_batches = getattr(self, "current_gradient_accumulation_steps", 1) or 1
            self.log_extra(
                retain_loss=float(retain.detach()) / (self.args.world_size if self._scaled_by_world() else 1),
                repnoise_mmd=float(terms.noise_mmd.detach()),
                repnoise_harmful_loss=float(terms.harmful_loss.detach()),
                harmful_loss=float(terms.harmful_loss_final),
            )
            loss = retain + penalty / micro_batches
        else:
            loss = retain
        return (loss, None) if return_outputs else loss

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        values, tensors = super().checkpoint_state()
        return values, {**tensors, "noise_generator": self.noise_generator.get_state()}

    def load_checkpoint_state(self, values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super().load_checkpoint_state(values, tensors)
        self.noise_generator.set_state(tensors["noise_generator"])

    def _scaled_by_world(self) -> bool:
        return bool(self.args.average_tokens_across_devices and self.args.world_size > 1)
