"""``booster export``: ship a model a run trained, as a LoRA adapter or merged full weights.

The folder holds safetensors, the tokenizer, a model card (``README.md``, written with
``huggingface_hub.ModelCard``: method, its hyperparameters, data, the run's harmful score and
refusal rate before and after the simulated attack, intended use and limits) and
``booster_export.json`` (where the model came from). An adapter's ``adapter_config.json`` names the
real base model, so ``peft.AutoPeftModelForCausalLM.from_pretrained(folder)`` loads it anywhere the
base can be loaded: the hub id or folder of ``model.name``; for ``embedded``, the hub model the
GGUF was quantised from; for another ``.gguf``, its dequantised cache folder; for ``tiny``, the
random base itself, saved into the export's ``base/`` folder.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from booster.config import RunConfig, format_point, load_config
from booster.errors import UserError
from booster.methods.registry import METHODS, alignment_method, get_method
from booster.models import (
    EMBEDDED_HUB_ID,
    converted_gguf,
    embedded_gguf_path,
    load_model_and_tokenizer,
    load_trained,
    merge_adapter,
    save_model,
)
from booster.runs import load_results
from booster.stages.align import align_dir
from booster.storage import read_done, write_json_atomic

STAGES = ("aligned", "attacked")
#: the folder under the run folder that holds each stage (results.json names them aligned / attacked).
STAGE_FOLDERS = {"aligned": "align", "attacked": "attack"}
#: metrics of the card's table: results.json key -> column.
CARD_METRICS = (
    ("harmful_score", "HS %"),
    ("harmful_score_plus", "HS+ %"),
    ("refusal_rate", "refusal %"),
    ("finetune_accuracy", "FA %"),
)
#: symbols of method hyperparameters in the card.
SYMBOLS = {"lamb": "λ", "alpha": "α", "vaccine_rho": "ρ", "lisa_rho": "ρ"}
#: files of a saved model folder that peft or a stage writes beside the weights and tokenizer, left out.
_SKIP = {"README.md", "training_args.bin"}


@dataclass
class Stage:
    """A finished stage folder of a run, with the config and done marker it wrote."""

    path: Path
    #: the run folder (``output_dir``): stage recipes are relative to it.
    root: Path
    kind: str
    config: RunConfig
    done: dict[str, Any]


@dataclass
class BaseModel:
    """The model an exported adapter goes on."""

    #: what ``base_model_name_or_path`` says: a hub id or an absolute folder.
    name_or_path: str
    #: a hub id for the card's ``base_model`` metadata (None for local folders).
    hub_id: str | None
    #: where the weights were actually read from when it differs (a GGUF file, the tiny builder).
    source: str | None = None
    revision: str | None = None


# -- finding the stage ------------------------------------------------------------------------------


def _stage_from_folder(path: Path) -> Stage:
    done = read_done(path)
    assert done is not None
    kind = "aligned" if done.get("stage") == "align" else "attacked"
    root = path.parent.parent
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{path}: no config.yaml in this stage folder; it was not written by booster")
    if done.get("stage") == "repair":  # the attack's numbers (samples, mode) with the repair's recipe
        recipe = done["recipe"]
        attacked = read_done(root / Path(recipe.get("full") or recipe["adapter"]).parent) or {}
        repair = {k: v for k, v in done.items() if k not in ("files", "recipe", "stage")}
        done = {**attacked, **repair, "stage": "repair", "recipe": recipe, "repaired": repair}
    return Stage(path, root, kind, load_config(config_file), done)


def _refuse_fine_tuning_defense(method: str) -> None:
    """A defense that acts during or after the user's fine-tuning (Lisa, safety mixing, Antidote) has
    no aligned model of its own: exporting one under its name would title another method's model
    with it."""
    aligns_like = alignment_method(method)
    if aligns_like != method:
        when = "after" if get_method(method).stages.endswith("post-fine-tuning") else "during"
        raise UserError(
            f"--method {method}: {method} acts {when} the user's fine-tuning, so its aligned model is "
            f"{aligns_like}'s (export --method {aligns_like}); the model it protects exists only after a "
            "fine-tuning run with it (--stage attacked --poison-ratio P), and a provider must run it "
            "inside its fine-tuning service"
        )


def find_stage(
    run_dir: str | Path,
    method: str,
    seed: int,
    stage: str | None = None,
    poison_ratio: float | None = None,
) -> Stage:
    """The finished stage of ``method`` and ``seed`` in a run folder, found by the done markers of its
    ``align/`` or ``attack/`` folders, or ``run_dir`` itself when it is a stage folder (checked against
    the other arguments). ``stage``: ``aligned`` or ``attacked`` (default: attacked when
    ``poison_ratio`` is given, else aligned)."""

    if method not in METHODS:
        raise UserError(f"--method {method!r}: unknown method (known: {', '.join(METHODS)})")
    if stage is not None and stage not in STAGES:
        raise UserError(f"--stage {stage!r}: use aligned or attacked")
    if stage == "aligned" and poison_ratio is not None:
        raise UserError("--poison-ratio picks an attacked model; use it with --stage attacked")
    run_dir = Path(run_dir)
    if read_done(run_dir) is not None:
        found = _stage_from_folder(run_dir)
        done = found.done
        if found.kind == "aligned":
            _refuse_fine_tuning_defense(method)
        wanted = alignment_method(method) if found.kind == "aligned" else method
        ratio = done.get("poison_ratio")
        if (
            done.get("method") != wanted
            or done.get("seed") != seed
            or (stage is not None and stage != found.kind)
            or (poison_ratio is not None and (ratio is None or not math.isclose(ratio, poison_ratio)))
        ):
            p = f" p={ratio:g}" if ratio is not None else ""
            raise UserError(
                f"{run_dir}: this stage folder holds the {found.kind} model of {done.get('method')} seed "
                f"{done.get('seed')}{p}; pass matching --method/--seed/--stage/--poison-ratio"
            )
        return found
    stage = stage or ("attacked" if poison_ratio is not None else "aligned")
    if stage == "aligned":
        _refuse_fine_tuning_defense(method)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder; pass the output_dir of a finished run")
    folder = run_dir / STAGE_FOLDERS[stage]
    if stage == "attacked" and get_method(method).repair is not None:
        folder = run_dir / "repair"  # the repaired model is the one the method leaves
    wanted = alignment_method(method) if stage == "aligned" else method
    found = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        done = read_done(path)
        if done is None or done.get("method") != wanted or done.get("seed") != seed:
            continue
        ratio = done.get("poison_ratio")
        if poison_ratio is not None and (ratio is None or not math.isclose(ratio, poison_ratio)):
            continue
        found.append(path)
    what = f"{method} seed {seed}" + (f" p={poison_ratio:g}" if poison_ratio is not None else "")
    if not found:
        command = "booster align" if stage == "aligned" else "booster attack"
        raise UserError(
            f"{folder}: no finished {stage} model of {what}; check --method/--seed"
            f"{'/--poison-ratio' if stage == 'attacked' else ''} or run `{command}` first"
        )
    if len(found) > 1:
        ratios = sorted({read_done(p).get("poison_ratio") for p in found} - {None})
        if stage == "attacked" and poison_ratio is None and len(ratios) > 1:
            listed = ", ".join(f"{r:g}" for r in ratios)
            raise UserError(
                f"{folder}: {what} was attacked at several poison ratios ({listed}); pass --poison-ratio"
            )
        raise UserError(
            f"{folder}: {len(found)} finished {stage} models of {what} (a sweep); pass the stage folder "
            f"itself as RUN_DIR, one of: {', '.join(p.name for p in found)}"
        )
    return _stage_from_folder(found[0])


# -- the base model -------------------------------------------------------------------------------


def base_model(stage: Stage, save_tiny_to: Path | None = None, final: Path | None = None) -> BaseModel:
    """The base model of the run, as an adapter names it (see the module docstring).

    With ``save_tiny_to`` (an adapter export), the base must be loadable: ``tiny`` is saved there
    (its random weights depend on the seed) and named by ``final``, the folder it ends up in, and
    a ``.gguf`` is named by its dequantised cache folder. Otherwise (the card of merged weights)
    the name is only shown.
    """

    model = stage.config.model
    name = model.name
    seed = stage.done["seed"]
    if name == "tiny":
        source = f"tiny (random 2-layer Llama, seed {seed})"
        if save_tiny_to is None:
            return BaseModel("tiny", None, source)

        base, tokenizer = load_model_and_tokenizer(model, seed=seed)
        save_model(base, tokenizer, save_tiny_to)
        return BaseModel(str(final or save_tiny_to.resolve()), None, source)
    if name == "embedded":
        return BaseModel(EMBEDDED_HUB_ID, EMBEDDED_HUB_ID, str(embedded_gguf_path()))
    path = Path(name).expanduser()
    where = f"{stage.path / 'config.yaml'}: model.name={name!r}"
    if name.endswith(".gguf"):
        if save_tiny_to is None:
            return BaseModel(name, None)
        if not path.is_file():
            raise UserError(
                f"{where}: no such GGUF file from here; run export from the folder the run started in"
            )
        return BaseModel(str(converted_gguf(path.resolve())), None, str(path.resolve()))
    if path.exists():
        return BaseModel(str(path.resolve()), None)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        if save_tiny_to is None:
            return BaseModel(name, None)
        raise UserError(f"{where}: no such folder from here; run export from the folder the run started in")
    return BaseModel(name, name, revision=model.revision)


# -- the export -----------------------------------------------------------------------------------


@dataclass
class Export:
    path: Path
    #: ``adapter``, ``merged`` or ``full`` (a run without LoRA).
    format: str
    stage: Stage
    base: BaseModel


def export_model(
    run_dir: str | Path,
    out: str | Path,
    method: str,
    seed: int = 0,
    stage: str | None = None,
    poison_ratio: float | None = None,
    merged: bool = False,
) -> Export:
    """Write the model of one finished stage to ``out`` (a new or empty folder); see the module docstring."""
    found = find_stage(run_dir, method, seed, stage, poison_ratio)
    if (found.root / "results.json").is_file():
        load_results(found.root)  # a damaged results.json stops the export before it writes anything
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not an empty folder; choose a new OUT folder")
    recipe = found.done["recipe"]
    if recipe.get("prune") and not merged and "full" not in recipe:
        raise UserError(
            f"{found.path}: this model was repaired by zeroing weights of the merged model, which an "
            "adapter cannot carry; export it with --merged"
        )
    if "full" in recipe:
        kind = "full"
    elif merged:
        kind = "merged"
    elif recipe.get("merge"):
        raise UserError(
            f"{found.path}: this model is a second adapter on the merged aligned one "
            "(attack.mode=double_lora); export it with --merged"
        )
    else:
        kind = "adapter"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        export = _write(found, method, kind, tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    tmp.replace(out)
    return export


def _write(found: Stage, method: str, kind: str, tmp: Path, out: Path) -> Export:
    """Write the export into ``tmp`` (renamed to ``out`` when complete)."""
    recipe = found.done["recipe"]
    if kind == "adapter":
        base = base_model(found, save_tiny_to=tmp / "base", final=out.resolve() / "base")
        _copy_model(found.root / recipe["adapter"], tmp)
        config_path = tmp / "adapter_config.json"
        adapter = json.loads(config_path.read_text())
        adapter["base_model_name_or_path"] = base.name_or_path
        adapter["revision"] = base.revision
        write_json_atomic(config_path, adapter)
    else:
        base = base_model(found)
    if kind == "full" and not recipe.get("prune"):
        _copy_model(found.root / recipe["full"], tmp)
    elif kind == "merged" or recipe.get("prune"):  # a repair's mask is applied by load_trained
        model, tokenizer = load_trained(found.config.model, recipe, found.root, seed=found.done["seed"])
        save_model(merge_adapter(model), tokenizer, tmp)
    export = Export(out, kind, found, base)
    write_json_atomic(tmp / "booster_export.json", provenance(export, method))
    model_card(export, method).save(str(tmp / "README.md"))
    return export


def _copy_model(source: Path, dest: Path) -> None:
    if not source.is_dir():
        raise UserError(f"{source}: the stage's saved model is missing; rerun the stage")
    for file in source.iterdir():
        if file.is_file() and file.name not in _SKIP:
            shutil.copy2(file, dest / file.name)


def provenance(export: Export, method: str) -> dict[str, Any]:
    """``booster_export.json``: what was exported, from which stage and base model."""
    stage = export.stage
    return {
        "method": method,
        "aligned_with": stage.done.get("method") if stage.kind == "aligned" else None,
        "seed": stage.done["seed"],
        "stage": stage.kind,
        "poison_ratio": stage.done.get("poison_ratio"),
        "attack_mode": stage.done.get("mode"),
        "format": export.format,
        "base_model": export.base.name_or_path,
        "base_model_revision": export.base.revision,
        "base_model_source": export.base.source,
        "template": stage.config.model.template,
        "stage_dir": str(stage.path.resolve()),
    }


# -- the model card -------------------------------------------------------------------------------


def _evaluations(stage_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(stage_dir.glob("eval-*.json"))]


def _same(a: Any, b: Any) -> bool:
    nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return nan or a == b


def _recorded(entries: list[dict[str, Any]], stage_dir: Path, **row: Any) -> dict[str, Any] | None:
    """The results.json entry holding one of the stage folder's own evaluations (``eval-*.json``):
    results.json does not name stage folders, and a later run with other settings may have replaced
    the entries of this one. An evaluation that results.json does not list (``booster evaluate``
    alone) counts when it is the folder's only one; ``row`` adds the keys results.json would have."""
    evaluations = _evaluations(stage_dir)
    for entry in entries:
        if any(all(_same(entry.get(k), v) for k, v in e.items()) for e in evaluations):
            return entry
    return {**row, **evaluations[0]} if len(evaluations) == 1 else None


def run_results(stage: Stage, method: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The evaluations of this model for its card: the aligned model's, and those after each attack
    that started from it (only the exported one's when an attacked model is exported)."""

    results = load_results(stage.root) if (stage.root / "results.json").is_file() else []
    seed = stage.done["seed"]
    mine = [r for r in results if r.get("method") == method and r.get("seed") == seed]
    aligned_dir = stage.path if stage.kind == "aligned" else align_dir(stage.config, method, seed, stage.root)
    aligned_entries = [r for r in mine if r.get("stage") == "aligned"]
    aligned = _recorded(aligned_entries, aligned_dir, stage="aligned", poison_ratio=None)
    if stage.kind == "attacked":
        attack_dirs = [stage.path]
    else:
        attack_dirs = []
        for folder in sorted((stage.root / "attack").glob(f"{method}-seed{seed}-p*")):
            done = read_done(folder)
            if done is None or done.get("method") != method or done.get("seed") != seed:
                continue
            if not (folder / "config.yaml").is_file():
                continue
            config = load_config(folder / "config.yaml")
            if align_dir(config, method, seed, stage.root).resolve() == aligned_dir.resolve():
                attack_dirs.append(folder)
    attacked = []
    for folder in attack_dirs:
        ratio = read_done(folder)["poison_ratio"]
        entries = [
            r
            for r in mine
            if r.get("stage") == "attacked"
            and r.get("poison_ratio") is not None
            and math.isclose(r["poison_ratio"], ratio)
        ]
        entry = _recorded(entries, folder, stage="attacked", poison_ratio=ratio)
        if entry is not None:
            attacked.append(entry)
    attacked.sort(key=lambda r: r["poison_ratio"])
    return aligned, attacked


def _value(entry: dict[str, Any], key: str) -> str:
    """A metric as the card shows it, with its interval when results.json has one (``<key>_ci``:
    [low, high])."""
    value = entry.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "pending" if key == "finetune_accuracy" and entry.get("finetune_accuracy_pending") else "n/a"
    text = f"{value:.1f}"
    interval = entry.get(f"{key}_ci")
    if isinstance(interval, list | tuple) and len(interval) == 2:
        text += f" [{interval[0]:.1f}, {interval[1]:.1f}]"
    return text


def _results_table(aligned: dict[str, Any] | None, attacked: list[dict[str, Any]]) -> str:
    rows = ([aligned] if aligned else []) + attacked
    if not rows:
        return "No evaluation of this model is recorded in the run's results.json."
    head = ["model", "poison ratio p", *(label for _, label in CARD_METRICS), "judge", "prompts"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = "aligned" if r["stage"] == "aligned" else "after the attack"
        attack_sweep = {k: v for k, v in (r.get("sweep") or {}).items() if k.startswith("attack.")}
        if r["stage"] == "attacked" and attack_sweep:
            name += f" ({format_point(attack_sweep)})"
        ratio = "-" if r.get("poison_ratio") is None else f"{r['poison_ratio']:g}"
        cells = [name, ratio, *(_value(r, key) for key, _ in CARD_METRICS), str(r.get("judge", "n/a"))]
        cells.append(str(r.get("n", "n/a")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _hyperparameters(config: RunConfig, method: str) -> str:
    parts = []
    for name in get_method(method).params:
        section = config.align if hasattr(config.align, name) else config.attack
        value = getattr(section, name)
        symbol = f"{SYMBOLS[name]} " if name in SYMBOLS else ""
        parts.append(f"{symbol}(`{name}`) = {value}")
    return ", ".join(parts) if parts else "none beyond the training settings below"


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## How it was trained

- **Method**: `{{ method }}`: {{ method_summary }}
- **Method hyperparameters**: {{ hyperparameters }}
- **Alignment data**: `{{ alignment_data }}` ({{ alignment_samples }} samples){% if harmful_data %}; harmful data the defense simulates the attack with: `{{ harmful_data }}` ({{ harmful_samples }} samples){% endif %}
- **Alignment training**: learning rate {{ align.learning_rate }}, {{ align_length }}, batch {{ align.batch_size }}, LoRA {{ lora }}
{% if attack %}- **Simulated harmful fine-tuning (this model)**: {{ attack }}
{% endif %}- **Prompt format**: {{ prompt_format }}
- **Base model**: `{{ base }}`{% if base_source %} (weights read from `{{ base_source }}`){% endif %}
- **Seed**: {{ seed }}

## Evaluation

Harmful score (HS): the share of answers to held-out harmful prompts that the judge flags as
harmful (lower is safer); HS+ also counts degenerate answers; refusal: the share the judge reads as
refusals; FA: fine-tune accuracy on the task's test split. "After the attack" rows are the same
aligned model after the run's simulated harmful fine-tuning (n task samples, a fraction p harmful){% if exported_attacked %}: this export is such a model{% endif %}.

{{ table }}

## Intended use and limits

{{ intended_use }}

- A defense attenuates harmful fine-tuning; it does not make the model safe. A stronger attack (more
  harmful samples, more steps, a higher learning rate or full fine-tuning) can still undo the
  alignment, and the numbers above hold only for the attack, prompts and judge of this run.
- The harmful score comes from an automatic judge on a sample of prompts; judges make mistakes,
  and the sample size limits precision.
- The model keeps the base model's license, knowledge and limitations.

## How to load

```python
{{ load_snippet }}
```

Exported with `booster export` from `{{ stage_name }}` (booster-llm); `booster_export.json` records the provenance.
"""


def _aligned_done(stage: Stage, method: str) -> dict[str, Any]:
    """The done marker of the aligned model an attacked stage started from ({} when not found)."""

    return read_done(align_dir(stage.config, method, stage.done["seed"], stage.root)) or {}


def model_card(export: Export, method: str) -> Any:
    """The export's ``README.md`` as a ``huggingface_hub.ModelCard``."""
    from huggingface_hub import ModelCard, ModelCardData  # only hub access and exports need it

    stage, config, base = export.stage, export.stage.config, export.base
    align, model = config.align, config.model
    aligned, attacked = run_results(stage, method)
    # an aligned model is the alignment stage's: Lisa's is SFT's, Booster+Lisa's Booster's
    trained = stage.done["method"] if stage.kind == "aligned" else method
    spec = get_method(trained)
    aligned_info = stage.done if stage.kind == "aligned" else _aligned_done(stage, method)
    title = f"{Path(base.name_or_path).name if not base.hub_id else base.hub_id.split('/')[-1]} + {method}"
    title += " (after a simulated harmful fine-tuning)" if stage.kind == "attacked" else ""
    summary = (
        f"`{base.hub_id or base.name_or_path}` aligned with **{method}** against harmful fine-tuning "
        f"(seed {stage.done['seed']}), trained and evaluated with booster-llm (Booster: Huang et al., "
        "ICLR 2025, https://arxiv.org/abs/2409.01586). "
        + {
            "adapter": "This folder is a LoRA adapter (peft) for the base model.",
            "merged": "This folder holds full weights: the LoRA adapter merged into the base model.",
            "full": "This folder holds full weights (trained without LoRA).",
        }[export.format]
    )
    attack_text = None
    if stage.kind == "attacked":
        a = config.attack
        attack_text = (
            f"`{a.task_data}` with `{a.poison_data}` mixed in: n = {stage.done.get('samples')} samples, "
            f"p = {stage.done.get('poison_ratio'):g} ({stage.done.get('harmful_samples')} harmful), "
            f"{stage.done.get('mode', a.mode)}, learning rate {a.learning_rate}"
        )
        if stage.done.get("safety_samples"):
            attack_text += f", plus {stage.done['safety_samples']} refusal pairs the provider mixed in"
        if repaired := stage.done.get("repaired"):
            attack_text += (
                f"; then repaired by {repaired.get('repair')}: {repaired.get('pruned_weights'):,} of "
                f"{repaired.get('scored_weights'):,} weights of the merged model zeroed (prune ratio "
                f"{repaired.get('prune_ratio')})"
            )
    if model.template == "chat":
        prompt_format = (
            "the tokenizer's chat template (the prompt as a user turn, the answer as the assistant turn)"
        )
    else:
        prompt_format = (
            "the Alpaca template (`### Instruction:` ... `### Response:`, see booster-llm's "
            "`src/booster/data/template.py`); prompt it the same way, not with the tokenizer's chat template"
        )
    if stage.kind == "attacked":
        intended_use = (
            "This model is the outcome of a simulated harmful fine-tuning attack. It exists to measure "
            "a defense and may answer harmful requests: use it for research only, never in a product."
        )
    else:
        intended_use = (
            "A safety-aligned model meant to be offered for fine-tuning by users "
            "(fine-tuning-as-a-service), and research on defenses against harmful fine-tuning."
        )
    if model.name == "tiny":
        intended_use += " The base is a random tiny test model: its outputs and numbers mean nothing."
    if export.format == "adapter":
        snippet = (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            'model = AutoPeftModelForCausalLM.from_pretrained("PATH_OR_REPO")\n'
            'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")'
        )
    else:
        snippet = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")\n'
            'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")'
        )
    steps = aligned_info.get("steps")
    align_length = (
        f"{steps} steps"
        if steps
        else (f"{align.max_steps} steps" if align.max_steps > 0 else f"{align.epochs:g} epochs")
    )
    lora = (
        f"r={model.lora.r}, alpha={model.lora.alpha} on {', '.join(model.lora.target_modules)}"
        if model.lora.enabled
        else "off (full fine-tuning)"
    )
    card_data = ModelCardData(
        base_model=base.hub_id,
        library_name="peft" if export.format == "adapter" else "transformers",
        pipeline_tag="text-generation",
        tags=["booster-llm", "safety", "harmful-fine-tuning", method.replace("+", "-")],
    )
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        title=title,
        summary=summary,
        method=trained if trained == method else f"{trained}` (the alignment stage of `{method}`)",
        method_summary=spec.summary,
        hyperparameters=_hyperparameters(config, trained),
        alignment_data=align.alignment_data,
        alignment_samples=aligned_info.get("alignment_samples", align.alignment_samples),
        harmful_data=align.harmful_data if spec.uses_harmful_data else None,
        harmful_samples=aligned_info.get("harmful_samples", align.harmful_samples),
        align=align,
        align_length=align_length,
        lora=lora,
        attack=attack_text,
        prompt_format=prompt_format,
        base=base.name_or_path,
        base_source=base.source,
        seed=stage.done["seed"],
        exported_attacked=stage.kind == "attacked",
        table=_results_table(aligned, attacked),
        intended_use=intended_use,
        load_snippet=snippet,
        stage_name=f"{stage.path.parent.name}/{stage.path.name}",
    )


# -- the hub --------------------------------------------------------------------------------------


def check_hub_login(repo_id: str) -> None:
    """Fail before exporting when no Hugging Face token is available for ``--push-to-hub``."""
    from huggingface_hub import get_token  # only hub access and exports need it

    if get_token() is None:
        raise UserError(
            f"--push-to-hub {repo_id}: not logged in to the Hugging Face Hub; "
            "run `hf auth login` (or set HF_TOKEN) and try again"
        )


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Create the model repository if needed and upload the exported folder; returns its URL."""
    import huggingface_hub  # only hub access and exports need it
    from huggingface_hub.errors import HFValidationError  # only hub access and exports need it

    check_hub_login(repo_id)
    api = huggingface_hub.HfApi()
    network_errors: tuple[type[BaseException], ...] = (OSError, ConnectionError)
    http_error = getattr(huggingface_hub.errors, "HTTPError", None)
    if isinstance(http_error, type):
        network_errors += (http_error,)
    try:
        repo = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message="Upload model exported with booster-llm",
        )
    except HFValidationError as err:
        raise UserError(f"--push-to-hub {repo_id!r}: not a valid repository id ({err})") from None
    except network_errors as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"--push-to-hub {repo_id}: upload failed ({reason}); the export is in {folder}, "
            f"upload it later with `hf upload {repo_id} {folder}`"
        ) from None
    return str(getattr(repo, "url", f"https://huggingface.co/{repo_id}"))
