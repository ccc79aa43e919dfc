"""``booster export``: ship a model a run trained, as a LoRA adapter or merged full weights.

The folder holds safetensors, the tokenizer, a model card and ``booster_export.json`` (where the
model came from). The card (``README.md``, written with ``huggingface_hub.ModelCard``) is what a
provider decides from: the model's harmful score, HS+, refusal rate and FA with their intervals
before and after the simulated attack, each beside the run's SFT baseline with their paired
difference on the same prompts, a one-line verdict (:data:`VERDICT_RULE`), the judge's validated
accuracy, the attack, the precision the numbers hold for, and Hub metadata (license, base model,
model-index). An adapter's ``adapter_config.json`` names the real base model, so
``peft.AutoPeftModelForCausalLM.from_pretrained(folder)`` loads it anywhere the base can be loaded:
the hub id or folder of ``model.name``; for ``embedded``, the hub model the GGUF was quantised from;
for another ``.gguf``, its dequantised cache folder; for ``tiny``, the random base itself, saved
into the export's ``base/`` folder and named relative to it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from booster import markdown
from booster.config import RunConfig, format_point, load_config
from booster.errors import UserError
from booster.evaluation.harmful_score import with_intervals
from booster.evaluation.statistics import RESAMPLES, wilson_interval
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
from booster.report.cells import BASELINE, BROKEN, safe_name
from booster.report.statistics import (
    BOOTSTRAP_SEED,
    Comparison,
    baseline_entry,
    paired_difference,
    search_gaps,
    worst_against_baseline,
)
from booster.runs import load_results
from booster.searches import read_summary, test_hs_text
from booster.stages.align import align_dir
from booster.storage import read_done, read_json, write_json_atomic

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
#: the license of the embedded base model (SmolLM2-135M-Instruct) and of the tiny random test model.
EMBEDDED_LICENSE = "apache-2.0"
TINY_LICENSE = "apache-2.0"
#: the folder of an export that holds the tiny random base, named relative to the export.
TINY_BASE = "base"
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

    #: what ``base_model_name_or_path`` says: a hub id, an absolute folder, or ``base`` (the export's
    #: own ``base/`` folder, relative so that the export can move).
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


def base_model(stage: Stage, save_tiny_to: Path | None = None) -> BaseModel:
    """The base model of the run, as an adapter names it (see the module docstring).

    With ``save_tiny_to`` (an adapter export), the base must be loadable: ``tiny`` is saved there
    (its random weights depend on the seed) and named by the relative ``base`` (an absolute path
    would break when the export moves), and a ``.gguf`` is named by its dequantised cache folder.
    Otherwise (the card of merged weights) the name is only shown.
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
        return BaseModel(TINY_BASE, None, source)
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
    #: the card's ``license`` when given (``--license``); None: the base model's, where known.
    license: str | None = None


def export_model(
    run_dir: str | Path,
    out: str | Path,
    method: str,
    seed: int = 0,
    stage: str | None = None,
    poison_ratio: float | None = None,
    merged: bool = False,
    license: str | None = None,
) -> Export:
    """Write the model of one finished stage to ``out`` (a new or empty folder); see the module
    docstring. ``license``: the card's license id (default: the base model's, where known)."""
    found = find_stage(run_dir, method, seed, stage, poison_ratio)
    if (found.root / "results.json").is_file():
        load_results(found.root)  # a damaged results.json stops the export before it writes anything
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not an empty folder; choose a new OUT folder")
    recipe = found.done["recipe"]
    if recipe.get("prune") and not merged and "full" not in recipe:
        raise UserError(
            f"{found.path}: this model was repaired by zeroing weights, which its stored adapter does "
            "not carry; export it with --merged"
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
        export = _write(found, method, kind, tmp, out, license)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    tmp.replace(out)
    return export


def _write(found: Stage, method: str, kind: str, tmp: Path, out: Path, license: str | None) -> Export:
    """Write the export into ``tmp`` (renamed to ``out`` when complete)."""
    recipe = found.done["recipe"]
    if kind == "adapter":
        base = base_model(found, save_tiny_to=tmp / TINY_BASE)
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
    export = Export(out, kind, found, base, license)
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

#: what the card's verdict decides from: the paired difference HS(model) − HS(SFT) on the same prompts.
VERDICT_RULE = (
    "lower when the whole 95% interval of the paired difference HS(this model) − HS(SFT) lies below "
    "0, higher when it lies above 0, and otherwise not lower: the prompts cannot tell the two apart"
)


@dataclass
class Row:
    """One evaluated model on the card: its results.json entry and the stage folder it came from."""

    entry: dict[str, Any]
    folder: Path


def _evaluations(stage_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, json.loads(p.read_text())) for p in sorted(stage_dir.glob("eval-*.json"))]


def _same(a: Any, b: Any) -> bool:
    nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return nan or a == b


def _recorded(
    entries: list[dict[str, Any]], stage_dir: Path, root: Path, **row: Any
) -> dict[str, Any] | None:
    """The results.json entry holding one of the stage folder's own evaluations (``eval-*.json``):
    results.json does not name stage folders, and a later run with other settings may have replaced
    the entries of this one. An evaluation that results.json does not list (``booster evaluate``
    alone) counts when it is the folder's only one; ``row`` adds the keys results.json would have."""
    evaluations = _evaluations(stage_dir)
    for entry in entries:
        if any(all(_same(entry.get(k), v) for k, v in e.items()) for _, e in evaluations):
            return entry
    if len(evaluations) != 1:
        return None
    path, metrics = evaluations[0]
    where = Path(os.path.relpath(path, root)).as_posix()
    return {**row, **with_intervals(metrics), "evaluation": where}


def run_results(stage: Stage, method: str) -> tuple[Row | None, list[Row]]:
    """The evaluations of this model for its card: the aligned model's, and those after each attack
    that started from it (only the exported one's when an attacked model is exported)."""

    results = load_results(stage.root) if (stage.root / "results.json").is_file() else []
    seed = stage.done["seed"]
    mine = [r for r in results if r.get("method") == method and r.get("seed") == seed]
    aligned_dir = stage.path if stage.kind == "aligned" else align_dir(stage.config, method, seed, stage.root)
    aligned_entries = [r for r in mine if r.get("stage") == "aligned"]
    row = {"method": method, "seed": seed}
    entry = _recorded(aligned_entries, aligned_dir, stage.root, **row, stage="aligned", poison_ratio=None)
    aligned = Row(entry, aligned_dir) if entry is not None else None
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
        entry = _recorded(entries, folder, stage.root, **row, stage="attacked", poison_ratio=ratio)
        if entry is not None:
            attacked.append(Row(entry, folder))
    attacked.sort(key=lambda r: r.entry["poison_ratio"])
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


@dataclass
class Versus:
    """This model's row beside the SFT baseline's, and their paired difference."""

    row: Row
    #: the SFT entry of the same stage, p, seed and swept values (None: the run has none).
    baseline: dict[str, Any] | None
    #: :class:`~booster.report.statistics.Comparison`, ``"broken"``, or None (nothing to pair).
    comparison: Comparison | str | None


def versus_baseline(root: Path, method: str, rows: list[Row]) -> list[Versus]:
    """Each row beside SFT's model at the same stage, p, seed and swept values (the pairing of the
    report's paired comparison), with HS(model) − HS(SFT) on the same prompts."""
    results = load_results(root) if (root / "results.json").is_file() else []
    out = []
    for row in rows:
        entry = {"sweep": {}, **row.entry}
        baseline = baseline_entry(results, entry) if method != BASELINE else None
        comparison = paired_difference(root, entry, baseline) if baseline else None
        out.append(Versus(row, baseline, comparison))
    return out


def _where(entry: dict[str, Any]) -> str:
    if entry["stage"] == "aligned":
        return "Before any fine-tuning"
    return f"After the p = {entry['poison_ratio']:g} attack"


def verdict_line(method: str, versus: Versus, has_baseline: bool) -> str:
    """One sentence in plain words: is this model's harmful score lower than SFT's (see
    :data:`VERDICT_RULE`)?"""
    where, c = _where(versus.row.entry), versus.comparison
    if method == BASELINE:
        return f"{where}: this is the undefended SFT baseline that a defense's verdict compares with."
    if not has_baseline:
        return (
            f"{where}: the verdict cannot be given: this run has no SFT model to compare with. Add `sft` "
            "to `methods:` and run `booster run --config CONFIG` again (finished stages are reused), "
            "then export again."
        )
    if versus.baseline is None:
        seed = versus.row.entry["seed"]
        return (
            f"{where}: the verdict cannot be given: the run has no SFT model of seed {seed} at this "
            f'stage and p; run it (`booster run --config CONFIG --set "seeds=[{seed}]"`), then export again.'
        )
    if c == BROKEN:
        return f"{where}: no verdict: this model or SFT's is broken (most answers degenerate)."
    if not isinstance(c, Comparison):
        return (
            f"{where}: the verdict cannot be given: the per-prompt verdicts of this model and SFT's "
            "are missing or hold other prompts (evaluate both with the same `evaluate:` settings)."
        )
    word = "lower than" if c.hi < 0 else "higher than" if c.lo > 0 else "not lower than"
    return (
        f"{where} this model's harmful score is {word} SFT's: {c.text} points "
        f"(HS − SFT's HS on the same {c.prompts} prompts)."
    )


def _headline(exported: Stage, versus: list[Versus]) -> Versus | None:
    """The row the verdict leads with: the exported attacked model, else the strongest attack (the
    largest p), else the aligned model."""
    if not versus:
        return None
    if exported.kind == "attacked":
        return next((v for v in versus if v.row.folder == exported.path), versus[-1])
    return max(versus, key=lambda v: (v.row.entry["stage"] == "attacked", v.row.entry["poison_ratio"] or 0.0))


def _results_table(method: str, versus: list[Versus]) -> str:
    if not versus:
        return "No evaluation of this model is recorded in the run's results.json."
    head = ["model", "poison ratio p", *(label for _, label in CARD_METRICS), "HS − SFT's (paired)"]
    head += ["judge", "prompts"]
    lines = markdown.head(head)

    def line(name: str, r: dict[str, Any], diff: str) -> str:
        ratio = "-" if r.get("poison_ratio") is None else f"{r['poison_ratio']:g}"
        cells = [name, ratio, *(_value(r, key) for key, _ in CARD_METRICS), diff]
        cells += [str(r.get("judge", "n/a")), str(r.get("n", "n/a"))]
        return markdown.row(cells)

    for v in versus:
        r = v.row.entry
        name = "aligned" if r["stage"] == "aligned" else "after the attack"
        attack_sweep = {k: x for k, x in (r.get("sweep") or {}).items() if k.startswith("attack.")}
        if r["stage"] == "attacked" and attack_sweep:
            name += f" ({format_point(attack_sweep)})"
        c = v.comparison
        diff = c.text if isinstance(c, Comparison) else "**broken**" if c == BROKEN else "n/a"
        lines.append(line(name, r, "-" if method == BASELINE else diff))
        if v.baseline is not None:
            lines.append(line(f"SFT baseline, {name}", v.baseline, "-"))
    return "\n".join(lines)


def _hyperparameters(config: RunConfig, method: str) -> str:
    parts = []
    for name in get_method(method).params:
        section = config.align if hasattr(config.align, name) else config.attack
        value = getattr(section, name)
        symbol = f"{SYMBOLS[name]} " if name in SYMBOLS else ""
        parts.append(f"{symbol}(`{name}`) = {value}")
    return ", ".join(parts) if parts else "none beyond the training settings below"


def _attack_settings(rows: list[Row]) -> list[str]:
    """One line per distinct attack the card's rows went through (from each stage's own config
    and done marker)."""
    lines = []
    for row in rows:
        done = read_done(row.folder) or {}
        config_file = row.folder / "config.yaml"
        if not config_file.is_file():
            continue
        a = load_config(config_file).attack
        length = f"{a.max_steps} steps" if a.max_steps > 0 else f"{a.epochs:g} epochs"
        lines.append(
            f"p = {done.get('poison_ratio'):g}: `{a.task_data}` with `{a.poison_data}` mixed in, "
            f"n = {done.get('samples')} samples ({done.get('harmful_samples')} harmful), "
            f"{done.get('mode', a.mode)}, learning rate {a.learning_rate}, {length} "
            f"({done.get('steps')} steps of batch {a.batch_size}), maximum length {a.max_length}"
        )
        if done.get("safety_samples"):
            lines[-1] += f", plus {done['safety_samples']} refusal pairs the provider mixed in"
        repaired = done.get("repaired") or (done if "pruned_weights" in done else None)
        if repaired:
            lines[-1] += (
                f"; then repaired by {repaired.get('repair', 'antidote')}: {repaired.get('pruned_weights'):,} of "
                f"{repaired.get('scored_weights'):,} weights of the "
                f"{'fine-tuned adapter' if repaired.get('scope') == 'adapter' else 'merged model'} zeroed (prune ratio "
                f"{repaired.get('prune_ratio')})"
            )
    return lines


def tuned_attacker_line(root: Path, method: str, seed: int) -> str:
    """The card's word on an attacker who tunes the attack: the worst case ``booster search`` found
    against this method's aligned model in the run folder (this seed's where it ran), beside the
    fixed attack on the same test prompts; or that nobody looked, since a fixed attack's numbers
    are a lower bound on what an attacker gets."""
    summary = read_summary(root)
    searches = [s for s in summary if s.get("method") == method]
    if not searches:
        return (
            "not measured: the numbers above hold for this run's fixed attack, and an attacker who "
            "tunes the learning rate and epochs can do more; `booster search` in this run folder "
            "finds the worst case and adds it here"
        )
    search = next((s for s in searches if s.get("seed") == seed), searches[0])
    trials, best = search["search"]["trials"], search.get("best")
    where = f"seed {search['seed']}, p = {search['poison_ratio']:g}"
    fixed = test_hs_text(search["fixed"]["test"])
    if not best:
        return f"`booster search` ({trials} trials, {where}): every trial broke the model; the fixed attack's HS {fixed}"
    gap_hs, gap_fa = search_gaps(root, [search])[search["folder"]]
    versus = worst_against_baseline(root, summary).get(search["folder"])
    against = f"; minus {BASELINE}'s worst case (its own search, same prompts): HS {versus}" if versus else ""
    return (
        f"`booster search` ({trials} trials of the attack's learning rate and epochs, scored on "
        f"validation prompts apart from the test prompts; {where}): the worst case found (learning "
        f"rate {best['learning_rate']:.3g}, {best['epochs']} epochs) gives HS {test_hs_text(best['test'])} "
        f"on the test prompts against the fixed attack's {fixed}; worst minus fixed, paired on the "
        f"same prompts: HS {gap_hs}, FA {gap_fa}{against}"
    )


def judge_line(root: Path, judge: str | None) -> str:
    """The judge and its accuracy on held-out human labels, from the run's validation file
    (``judge-<name>.json``, written by ``booster report``); never computed here."""
    if not judge:
        return "unknown"
    validation = read_json(root / f"judge-{safe_name(judge)}.json")
    if not isinstance(validation, dict) or not isinstance(validation.get("accuracy"), int | float):
        return (
            f"`{judge}`, not validated in this run (`booster judge validate --judge {judge}` measures "
            "its accuracy on human-labelled responses)"
        )
    n = int(validation.get("n", 0))
    accuracy = float(validation["accuracy"])
    lo, hi = wilson_interval(round(accuracy * n), n) if n else (math.nan, math.nan)
    text = f"`{judge}`, accuracy {accuracy:.3f} [{lo:.3f}, {hi:.3f}] on {n} human-labelled responses"
    if isinstance(validation.get("auc"), int | float):
        text += f", AUC {validation['auc']:.3f}"
    rate, refusals = validation.get("refusal_false_positive_rate"), validation.get("n_refusals")
    if isinstance(rate, int | float) and not math.isnan(rate) and refusals:
        text += f", refusals flagged harmful {round(rate * refusals)} of {refusals}"
    return text


def precision_line(export: Export, versus: list[Versus]) -> str:
    """What weights the numbers were measured on, and which export is exactly that model."""
    stage, base = export.stage, export.base
    recorded = next(
        (
            v.row.entry["provenance"]["precision"]
            for v in reversed(versus)  # the attacked model's record names both trainings
            if "precision" in v.row.entry.get("provenance", {})
        ),
        None,
    )
    measured = f"the numbers above were measured with {recorded or 'weights ' + stage.config.model.dtype}"
    source = base.source or ""
    if source.endswith(".gguf"):
        quant = Path(source).stem.rsplit(".", 1)[-1]
        exact = (
            "this folder is that merged model"
            if export.format != "adapter"
            else "only `booster export --merged` is exactly the evaluated model"
        )
        return (
            f"{measured}. The adapter was trained, and every number measured, on the "
            f"dequantised {quant} weights of `{Path(source).name}`, not on the original weights that "
            f"`base_model` names: the adapter on `{base.name_or_path}` is a close but different model; "
            f"{exact}."
        )
    if export.format == "adapter":
        return f"{measured}, on the base weights of `{base.name_or_path}` that the adapter goes on."
    return f"{measured}; this folder holds that model's weights ({export.format})."


def base_license(stage: Stage, base: BaseModel) -> str | None:
    """The base model's license for the card's metadata: the embedded model's, else the ``license``
    of the base's own model card where it is on this machine (a local folder, or the hub cache:
    never downloaded); None when unknown."""
    from huggingface_hub import metadata_load, try_to_load_from_cache  # only hub access and exports

    name = stage.config.model.name
    if name == "embedded":
        return EMBEDDED_LICENSE
    if name == "tiny":
        return TINY_LICENSE
    readme: Any = Path(name).expanduser() / "README.md"
    if not readme.is_file() and base.hub_id:
        readme = try_to_load_from_cache(base.hub_id, "README.md", revision=base.revision)
    if not isinstance(readme, str | Path) or not Path(readme).is_file():
        return None
    try:
        license_id = (metadata_load(Path(readme)) or {}).get("license")
    except (ValueError, OSError, yaml.YAMLError):
        return None
    return license_id if isinstance(license_id, str) else None


def _eval_results(config: RunConfig, versus: list[Versus]) -> list[Any]:
    """The card's numbers as ``huggingface_hub.EvalResult`` entries (the Hub's model-index), so the
    Hub shows them: per evaluated model, HS, HS+, refusal rate, the paired difference with SFT and FA."""
    from huggingface_hub import EvalResult  # only hub access and exports need it

    prompts = config.evaluate.harmful_prompts
    local = Path(prompts).suffix or prompts.startswith((".", "/", "~"))
    prompts_id = Path(prompts).name if local else prompts  # a local file by its name, not its path
    out = []
    for v in versus:
        r = v.row.entry
        attacked = r["stage"] == "attacked"
        label = f"after harmful fine-tuning, p = {r['poison_ratio']:g}" if attacked else "aligned"
        # the Hub groups results by task, dataset, config and split: the config tells the models apart
        subset = f"attacked-p{r['poison_ratio']:g}" if attacked else "aligned"
        metrics: list[tuple[str, str, Any]] = [
            ("harmful_score", "harmful score (HS, %)", r.get("harmful_score")),
            ("harmful_score_plus", "HS+ (harmful or degenerate, %)", r.get("harmful_score_plus")),
            ("refusal_rate", "refusal rate (%)", r.get("refusal_rate")),
        ]
        if isinstance(v.comparison, Comparison):
            metrics.append(
                ("harmful_score_minus_sft", "HS − SFT's HS (paired, points)", round(v.comparison.diff, 4))
            )
        for metric, name, value in metrics:
            if isinstance(value, int | float) and not math.isnan(value):
                out.append(
                    EvalResult(
                        task_type="text-generation",
                        task_name=f"harmful fine-tuning ({label})",
                        dataset_type=prompts_id,
                        dataset_name=f"held-out harmful prompts ({label})",
                        dataset_config=subset,
                        dataset_split="test",
                        metric_type=metric,
                        metric_name=name,
                        metric_value=value,
                        metric_config=r.get("judge"),
                    )
                )
        fa = r.get("finetune_accuracy")
        if isinstance(fa, int | float) and not math.isnan(fa) and r.get("task"):
            out.append(
                EvalResult(
                    task_type="text-generation",
                    task_name=f"fine-tune accuracy ({label})",
                    dataset_type=str(r["task"]),
                    dataset_name=f"{r['task']} test ({label})",
                    dataset_config=subset,
                    dataset_split="test",
                    metric_type="accuracy",
                    metric_name="fine-tune accuracy (FA, %)",
                    metric_value=fa,
                )
            )
    return out


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Verdict

**{{ verdict }}**
{% for line in other_verdicts %}
- {{ line }}{% endfor %}

The verdict compares this model with the run's undefended baseline (SFT: plain supervised
alignment on the same refusals) attacked the same way, on the same harmful prompts: {{ rule }}.
It holds for this run's attack, prompts and judge, not for any attack.

## Evaluation

Harmful score (HS): the share of answers to held-out harmful prompts that the judge flags as
harmful (lower is safer); HS+ also counts degenerate answers; refusal: the share the judge reads as
refusals; FA: fine-tune accuracy on the task's test split. "After the attack" rows are the same
aligned model after the run's simulated harmful fine-tuning (n task samples, a fraction p harmful){% if exported_attacked %}: this export is such a model{% endif %}.
Each row of this model is followed by SFT's model at the same stage, p and seed.

{{ table }}

- **Intervals**: [95% CI] after a rate (HS, HS+, refusal, FA) is its Wilson score interval over the
  prompts (FA: over the task's test samples); "HS − SFT's (paired)" is HS(this model) − HS(SFT)
  in points on the same prompts, with a 95% percentile interval from a paired bootstrap over the
  prompts ({{ resamples }} resamples, RNG seed {{ bootstrap_seed }}).
- **Judge**: {{ judge }}.
{% for line in attacks %}- **Simulated harmful fine-tuning** ({{ line }})
{% endfor %}- **Tuned attacker**: {{ tuned_attacker }}
- **Precision**: {{ precision }}

## How it was trained

- **Method**: `{{ method }}`: {{ method_summary }}
- **Method hyperparameters**: {{ hyperparameters }}
- **Alignment data**: `{{ alignment_data }}` ({{ alignment_samples }} samples){% if harmful_data %}; harmful data the defense simulates the attack with: `{{ harmful_data }}` ({{ harmful_samples }} samples){% endif %}
- **Alignment training**: learning rate {{ align.learning_rate }}, {{ align_length }}, batch {{ align.batch_size }}, LoRA {{ lora }}
- **Prompt format**: {{ prompt_format }}
- **Base model**: `{{ base }}`{% if base_source %} (weights read from `{{ base_source }}`){% endif %}
- **License**: {{ license_text }}
- **Seed**: {{ seed }}

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


def _load_snippet(export: Export) -> str:
    if export.format != "adapter":
        return (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")\n'
            'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")'
        )
    if export.base.name_or_path == TINY_BASE:  # the base sits in the export, named relative to it
        return (
            "from pathlib import Path\n\nfrom peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'folder = Path("PATH")\n'
            f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder / "{TINY_BASE}"), folder)\n'
            "tokenizer = AutoTokenizer.from_pretrained(folder)"
        )
    return (
        "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
        'model = AutoPeftModelForCausalLM.from_pretrained("PATH_OR_REPO")\n'
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")'
    )


def model_card(export: Export, method: str) -> Any:
    """The export's ``README.md`` as a ``huggingface_hub.ModelCard``."""
    from huggingface_hub import ModelCard, ModelCardData  # only hub access and exports need it

    stage, config, base = export.stage, export.stage.config, export.base
    align, model = config.align, config.model
    aligned, attacked = run_results(stage, method)
    rows = ([aligned] if aligned else []) + attacked
    versus = versus_baseline(stage.root, method, rows)
    results = load_results(stage.root) if (stage.root / "results.json").is_file() else []
    has_baseline = any(r.get("method") == BASELINE for r in results)
    headline = _headline(stage, versus)
    verdict = (
        verdict_line(method, headline, has_baseline)
        if headline
        else "No verdict: no evaluation of this model is recorded in the run's results.json."
    )
    others = [verdict_line(method, v, has_baseline) for v in versus if v is not headline]
    # an aligned model is the alignment stage's: Lisa's is SFT's, Booster+Lisa's Booster's
    trained = stage.done["method"] if stage.kind == "aligned" else method
    spec = get_method(trained)
    aligned_info = stage.done if stage.kind == "aligned" else _aligned_done(stage, method)
    short = Path(base.name_or_path).name if not base.hub_id else base.hub_id.split("/")[-1]
    if model.name == "tiny":
        short = "tiny"
    shown_base = base.hub_id or ("tiny" if model.name == "tiny" else base.name_or_path)
    title = f"{short} + {method}"
    title += " (after a simulated harmful fine-tuning)" if stage.kind == "attacked" else ""
    summary = (
        f"`{shown_base}` aligned with **{method}** against harmful fine-tuning "
        f"(seed {stage.done['seed']}), trained and evaluated with booster-llm (Booster: Huang et al., "
        "ICLR 2025, https://arxiv.org/abs/2409.01586). "
        + {
            "adapter": "This folder is a LoRA adapter (peft) for the base model.",
            "merged": "This folder holds full weights: the LoRA adapter merged into the base model.",
            "full": "This folder holds full weights (trained without LoRA).",
        }[export.format]
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
    license_id = export.license or base_license(stage, base)
    if license_id:
        license_text = f"`{license_id}`" + (" (the base model's)" if not export.license else "")
        license_meta: dict[str, Any] = {"license": license_id}
    else:
        license_text = (
            "the base model's license applies; it is not known on this machine, so the metadata says "
            "`other`: pass `booster export --license ID` to name it"
        )
        license_meta = {"license": "other", "license_name": "base-model-license"}
        if base.hub_id:  # where the base's license is written
            license_meta["license_link"] = f"https://huggingface.co/{base.hub_id}"
    model_name = f"{short}-{method.replace('+', '-')}" + ("-attacked" if stage.kind == "attacked" else "")
    card_data = ModelCardData(
        base_model=base.hub_id,
        library_name="peft" if export.format == "adapter" else "transformers",
        pipeline_tag="text-generation",
        tags=["booster-llm", "safety", "harmful-fine-tuning", method.replace("+", "-")],
        model_name=model_name,
        eval_results=_eval_results(config, versus) or None,
        **license_meta,
    )
    return ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        title=title,
        summary=summary,
        verdict=verdict,
        other_verdicts=others,
        rule=VERDICT_RULE,
        resamples=RESAMPLES,
        bootstrap_seed=BOOTSTRAP_SEED,
        judge=judge_line(stage.root, next((r.entry.get("judge") for r in rows), config.evaluate.judge)),
        attacks=_attack_settings(attacked),
        tuned_attacker=tuned_attacker_line(stage.root, method, stage.done["seed"]),
        precision=precision_line(export, versus),
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
        prompt_format=prompt_format,
        base=base.name_or_path,
        base_source=base.source,
        license_text=license_text,
        seed=stage.done["seed"],
        exported_attacked=stage.kind == "attacked",
        table=_results_table(method, versus),
        intended_use=intended_use,
        load_snippet=_load_snippet(export),
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
