"""What a run costs on a GPU, estimated from the model's config (no weights): tokens, FLOPs, peak
memory and GPU-hours (``booster run --dry-run`` prints them per cell and for the grid).

The rules, each an approximation stated where it is used:

- tokens: training sequences read (steps x batch x gradient accumulation) x ``max_length``; an upper
  bound, as a batch is padded only to its longest sample.
- FLOPs per token and forward/backward pass: 6 N for full fine-tuning (forward 2 N, backward 4 N);
  with LoRA 4 N + 6 N_lora: the frozen weights need no weight gradient, but the backward pass still
  flows through them to reach every adapter (2 N), and the adapters cost 6 N_lora like any trained
  weight. Attention's sequence-squared term is not counted. A post-fine-tuning
  repair (Antidote) runs forward passes only, over its re-alignment set: 2 N per token.
- GPU-hours: FLOPs / (the card's published dense bf16 peak x ``UTILISATION``).
- evaluation (:func:`evaluation_hours`): every answer runs to its token limit; reading the prompts
  (at most ``prompt_tokens`` each) and judging them (beaver-dam: a 7B forward pass over prompt and
  answer) are compute-bound; each decoding step reads the weights and the KV cache once, so it is
  bound by the card's memory bandwidth at ``BANDWIDTH_UTILISATION``.
- peak memory (one process, the training stages): weights N x dtype bytes; trainable parameters
  16 bytes each with LoRA (float32 adapter, gradient, two AdamW moments; peft keeps adapters in
  float32), 4 x dtype bytes each in full fine-tuning; Booster adds its saved copy and two gradient
  buffers (12 bytes per LoRA parameter, 3 x dtype bytes in full fine-tuning); activations
  b x s x L x (10 h + 5 I) values (every tensor a Llama block saves for backward: norms, q/k/v,
  attention, the MLP's three I-wide tensors) at 2 bytes under bf16 (4 otherwise), with gradient
  checkpointing b x s x (L h + 10 h + 5 I); logits b x s x V x 4 bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from booster.errors import UserError
from booster.models import DTYPES, LoraSettings, ModelConfig, model_architecture


@dataclass(frozen=True)
class Gpu:
    """A card as the estimate sees it: its published figures."""

    name: str
    #: dense bf16 peak, FLOP/s.
    flops: float
    memory_gib: int
    #: memory bandwidth, bytes/s: what a decoding step waits on (it reads every weight once).
    bandwidth: float


#: A100 SXM: 312 TFLOP/s, 2.04 TB/s; H100 SXM: 989 TFLOP/s, 3.35 TB/s; H200: the H100's compute with
#: more and faster memory (141 GB, 4.8 TB/s), so it trains as fast and generates faster.
GPUS = (
    Gpu("A100 80GB", 312e12, 80, 2.039e12),
    Gpu("H100 80GB", 989e12, 80, 3.35e12),
    Gpu("H200 141GB", 989e12, 141, 4.8e12),
)
#: the share of the peak a training step achieves (model FLOPs utilisation): an assumption, typical
#: of LoRA fine-tuning of a 7B model with the transformers Trainer at batch 10 x 256 tokens.
UTILISATION = 0.35
#: the share of the memory bandwidth a decoding step achieves: an assumption for batched greedy
#: generation with transformers (each step reads the weights and the batch's KV cache once).
BANDWIDTH_UTILISATION = 0.5
#: parameters of the judges that run a model (beaver-dam-7b: Llama-7B's body and a 14-way score
#: head); the keyword and embedded judges cost seconds on a CPU and are not counted.
JUDGE_PARAMETERS = {"beaver-dam": 6_607_400_960}
#: tokens the beaver-dam judge reads of a prompt and its answer, at most (its ``max_length``).
JUDGE_MAX_TOKENS = 512
#: bytes per trainable LoRA parameter: float32 weight, gradient, AdamW's two moments.
LORA_STATE_BYTES = 16
#: Booster's extra bytes per LoRA parameter: the saved weights and two gradient buffers (float32).
BOOSTER_STATE_BYTES = 12
#: the paper's measured time for Booster's alignment of Llama2-7B on one H100 (20 epochs over 5000
#: samples at batch 10, length 256), which the estimate is checked against.
PAPER_BOOSTER_LLAMA2_H100_HOURS = 1.86


@dataclass(frozen=True)
class ModelSize:
    """The sizes the estimates need, from the model's config."""

    name: str
    parameters: int
    #: parameters LoRA trains with the config's LoRA settings (None without LoRA: all train).
    lora_parameters: int | None
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    #: bytes per weight in ``model.dtype``.
    weight_bytes: int
    #: width of a layer's keys (= of its values): KV heads x head size (the hidden size without GQA).
    kv_width: int = 0

    @property
    def trainable(self) -> int:
        return self.parameters if self.lora_parameters is None else self.lora_parameters


def _dims(arch: Any) -> dict[str, int]:
    arch = getattr(arch, "text_config", None) or arch  # multimodal configs nest the language model
    hidden, layers = int(arch.hidden_size), int(arch.num_hidden_layers)
    heads = int(arch.num_attention_heads)
    return {
        "hidden": hidden,
        "layers": layers,
        "intermediate": int(getattr(arch, "intermediate_size", None) or 4 * hidden),
        "vocab": int(arch.vocab_size),
        "heads": heads,
        "kv_heads": int(getattr(arch, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(arch, "head_dim", None) or hidden // heads),
        "tied": bool(getattr(arch, "tie_word_embeddings", False)),
    }


def _linear_shapes(d: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of a Llama-style block, by module name."""
    h, i, q, kv = d["hidden"], d["intermediate"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def formula_parameters(arch: Any, lora: LoraSettings) -> tuple[int, int | None]:
    """(parameters, LoRA parameters) of a Llama-style model from hidden size, layers, vocabulary,
    intermediate size and heads: embeddings V h (+ an untied head V h), per layer the attention and
    the three MLP matrices and two norms, a final norm. LoRA: r (in + out) per targeted matrix."""
    d = _dims(arch)
    shapes = _linear_shapes(d)
    per_layer = sum(a * b for a, b in shapes.values()) + 2 * d["hidden"]
    total = d["vocab"] * d["hidden"] * (1 if d["tied"] else 2) + d["layers"] * per_layer + d["hidden"]
    if not lora.enabled:
        return total, None
    if any(t not in shapes for t in lora.target_modules):
        return total, 0  # a module the formula does not know: only the built count knows it
    adapters = sum(lora.r * sum(shapes[t]) for t in lora.target_modules)
    return total, d["layers"] * adapters


def built_parameters(arch: Any, lora: LoraSettings, trust_remote_code: bool) -> tuple[int, int | None]:
    """(parameters, LoRA parameters) counted on the model built from its config on PyTorch's meta
    device, which allocates no memory and reads no weights: exact for any architecture transformers
    knows (biases, extra norms, tied heads)."""
    import torch  # heavy: loaded only where it is used, so light commands stay fast
    from transformers import (
        AutoModelForCausalLM,  # heavy: loaded only where it is used, so light commands stay fast
    )

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    if not lora.enabled:
        return total, None
    adapters = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(
            name == t or name.endswith(f".{t}") for t in lora.target_modules
        ):
            adapters += lora.r * (module.in_features + module.out_features)
    return total, adapters


#: the published configs (config.json on the hub) of the paper's models, so a dry run of the paper
#: configs can estimate their cost offline: model_type and the sizes the estimate reads.
PUBLISHED_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "Qwen/Qwen2-7B": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    "google/gemma-2-9b": dict(
        model_type="gemma2",
        hidden_size=3584,
        intermediate_size=14336,
        num_hidden_layers=42,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        vocab_size=256000,
    ),
}


def published_architecture(name: str) -> Any | None:
    """The transformers config of a model in ``PUBLISHED_ARCHITECTURES`` (None for any other)."""
    from transformers import AutoConfig  # heavy: loaded only where it is used, so light commands stay fast

    known = PUBLISHED_ARCHITECTURES.get(name)
    if known is None:
        return None
    sizes = dict(known)
    return AutoConfig.for_model(sizes.pop("model_type"), **sizes)


def model_size(config: ModelConfig, local_only: bool = True) -> ModelSize | None:
    """The model's sizes from its config; None when the config cannot be read (``local_only``: only
    the local hub cache is looked at, so a dry run never waits on the network). The paper's models
    fall back to their published configs (``PUBLISHED_ARCHITECTURES``)."""

    try:
        arch = model_architecture(config, local_only=local_only)
        dims = _dims(arch)
    except (OSError, ValueError, AttributeError, TypeError, UserError):
        arch = published_architecture(config.name)
        if arch is None:
            return None
        dims = _dims(arch)
    try:
        total, lora = built_parameters(arch, config.lora, config.trust_remote_code)
    except Exception:  # an architecture this transformers cannot build: the Llama formula
        total, lora = formula_parameters(arch, config.lora)
    return ModelSize(
        config.name,
        total,
        lora,
        dims["hidden"],
        dims["layers"],
        dims["intermediate"],
        dims["vocab"],
        DTYPES[config.dtype].itemsize,
        dims["kv_heads"] * dims["head_dim"],
    )


def flops_per_token(size: ModelSize) -> float:
    """FLOPs of one forward + backward pass per token (see the module docstring)."""
    if size.lora_parameters is None:
        return 6.0 * size.parameters
    return 4.0 * size.parameters + 6.0 * size.lora_parameters


def forward_flops_per_token(size: ModelSize) -> float:
    """FLOPs of one forward pass per token (a repair's scoring pass): 2 N."""
    return 2.0 * size.parameters


def training_tokens(steps: int | None, batch: int, accumulation: int, max_length: int) -> int | None:
    """Sequences read (steps x batch x accumulation) x max_length: an upper bound."""
    return None if steps is None else steps * batch * accumulation * max_length


def stage_memory(
    size: ModelSize, batch: int, max_length: int, bf16: bool, checkpointing: bool, booster: bool
) -> int:
    """Peak bytes of a training stage on one process (see the module docstring)."""
    weights = size.parameters * size.weight_bytes
    if size.lora_parameters is None:
        state = size.parameters * size.weight_bytes * (3 + (3 if booster else 0))
    else:
        state = size.lora_parameters * (LORA_STATE_BYTES + (BOOSTER_STATE_BYTES if booster else 0))
    value = 2 if bf16 or size.weight_bytes == 2 else 4
    block = 10 * size.hidden + 5 * size.intermediate
    per_token = size.layers * size.hidden + block if checkpointing else size.layers * block
    activations = batch * max_length * per_token * value
    logits = batch * max_length * size.vocab * 4
    return weights + state + activations + logits


def gpu_hours(flops: float) -> list[float]:
    """Hours on each card of ``GPUS`` at ``UTILISATION`` of its peak."""
    return [flops / (gpu.flops * UTILISATION) / 3600 for gpu in GPUS]


@dataclass(frozen=True)
class EvaluationSize:
    """What one evaluation generates and judges."""

    #: (prompts, new tokens per answer) of each test set: the harmful prompts, the task's test split.
    answers: tuple[tuple[int, int], ...]
    batch: int
    #: tokens of a prompt, at most.
    prompt_tokens: int
    #: bytes per weight while generating (2 under bf16).
    weight_bytes: int
    #: answers the judge reads (the harmful prompts') and the judge's parameters (0: a CPU judge).
    judged: int
    judge_parameters: int


def evaluation_hours(size: ModelSize, ev: EvaluationSize) -> list[float]:
    """Hours of one evaluation on each card of ``GPUS``: every answer runs to its token limit (an
    upper bound; greedy answers often stop sooner), in batches. Reading the prompts and judging are
    compute-bound (FLOPs at ``UTILISATION``); each decoding step reads the weights and the batch's
    KV cache (at its mean length) once, at ``BANDWIDTH_UTILISATION`` of the bandwidth, unless its
    FLOPs take longer. So the H200 trains as fast as the H100 and generates faster."""
    hours = []
    kv_per_token = 2 * size.layers * (size.kv_width or size.hidden) * ev.weight_bytes
    for gpu in GPUS:
        compute = gpu.flops * UTILISATION
        seconds = 0.0
        for n, new in ev.answers:
            seconds += 2.0 * size.parameters * n * ev.prompt_tokens / compute  # the prompts, at once
            batch = min(ev.batch, n)
            read = size.parameters * ev.weight_bytes + batch * (ev.prompt_tokens + new / 2) * kv_per_token
            step = max(
                read / (gpu.bandwidth * BANDWIDTH_UTILISATION), 2.0 * size.parameters * batch / compute
            )
            seconds += math.ceil(n / max(ev.batch, 1)) * new * step
        if ev.answers:
            tokens = min(ev.prompt_tokens + ev.answers[0][1], JUDGE_MAX_TOKENS)
            seconds += 2.0 * ev.judge_parameters * ev.judged * tokens / compute
        hours.append(seconds / 3600)
    return hours


def paper_check(local_only: bool = True) -> tuple[float, float]:
    """(our H100 hours, the paper's 1.86) for Booster's alignment of Llama2-7B in the paper's default
    setting: 10,000 steps (5000 samples x 20 epochs / batch 10) of 3 passes over 10 x 256 tokens,
    LoRA r=32 on q/k/v. The architecture is Llama-2-7B's config (``PUBLISHED_ARCHITECTURES`` offline)."""
    config = ModelConfig(name="meta-llama/Llama-2-7b-hf", dtype="bfloat16", lora=LoraSettings(r=32, alpha=4))
    size = model_size(config, local_only=local_only)
    assert size is not None  # a published architecture: always known
    tokens = training_tokens(10_000, 10, 1, 256)
    assert tokens is not None
    hours = gpu_hours(3 * tokens * flops_per_token(size))[1]
    return hours, PAPER_BOOSTER_LLAMA2_H100_HOURS


def format_count(value: float | None) -> str:
    """1234567 -> 1.23M; 2.07e18 -> 2.07e18 (FLOPs); None -> unknown."""
    if value is None:
        return "unknown"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def format_flops(value: float | None) -> str:
    if value is None:
        return "unknown"
    if value == 0:
        return "0"
    exponent = math.floor(math.log10(value))
    return f"{value / 10**exponent:.2f}e{exponent}"


def format_gib(value: float | None) -> str:
    return "unknown" if value is None else f"{value / 2**30:.1f} GiB"
