"""Everything a command will need, checked before its first training step.

A wrong judge name, a data file that is not there or a model id with a typo would otherwise stop a
run after hours of alignment. Data specs are resolved (a dataset name against the known ones; hub
datasets are not contacted, their access shows when they load), every row of a local data file the
grid will read is checked as its stage would read it (the stage then reuses what was read), the
judge is looked up in the registry (a local judge model folder must exist), and the model's config
is read (a local folder's config.json, a hub id's config from the hub or the cache; ``tiny`` and
``embedded`` are known). A run stopped here has written nothing.
"""

from __future__ import annotations

from booster.config import RunConfig, Sweep
from booster.data import hub, local
from booster.data.sources import check_rows, check_spec
from booster.errors import UserError
from booster.evaluation.judges import check_judge
from booster.methods.registry import METHODS, alignment_method, check_compiles, get_method, init_adapter
from booster.models import check_model
from booster.plan import cells
from booster.stages.align import adapter_folder

#: what each command runs: the stages whose inputs it checks.
STAGES = {
    "align": ("align",),
    "attack": ("align", "attack"),
    "evaluate": ("evaluate",),
    "run": ("align", "attack", "evaluate"),
    "search": ("align", "attack", "evaluate", "search"),
}


def data_needs(
    config: RunConfig, method: str, stages: tuple[str, ...]
) -> list[tuple[str, str, str, str | None]]:
    """(setting, spec, role, split) for every data set the stages read for ``method``."""

    align, attack, evaluate = config.align, config.attack, config.evaluate
    needs: list[tuple[str, str, str, str | None]] = []
    attacks = "attack" in stages and bool(attack.poison_ratios)
    if "align" in stages or attacks:  # an attack aligns first when the alignment is missing
        needs.append(("align.alignment_data", align.alignment_data, "alignment", None))
        if get_method(alignment_method(method)).uses_harmful_data:
            needs.append(("align.harmful_data", align.harmful_data, "harmful", None))
    if attacks:
        needs.append(("attack.task_data", attack.task_data, "task", "train"))
        needs.append(("attack.poison_data", attack.poison_data, "poison", None))
        if attack.probe_data:
            needs.append(("attack.probe_data", attack.probe_data, "probe", None))
        if get_method(method).repair is not None:  # a post-fine-tuning repair follows the attack
            needs.append(("repair.harmful_data", config.repair.harmful_data, "harmful", None))
    if "evaluate" in stages:
        needs.append(("evaluate.harmful_prompts", evaluate.harmful_prompts, "harmful_prompts", None))
        if evaluate.task_samples > 0:
            key = "evaluate.task_data" if evaluate.task_data else "attack.task_data"
            needs.append((key, evaluate.task_data or attack.task_data, "task", "test"))
    if "search" in stages and config.search.validation_prompts:
        needs.append(("search.validation_prompts", config.search.validation_prompts, "harmful_prompts", None))
    return needs


def _path_like(spec: str) -> bool:
    """A spec that names a file or folder (which may exist on another machine)."""

    text = spec.strip()
    name = text.partition(":")[2] if text.partition(":")[0].lower() in hub.DATASETS else text
    suffixes = hub.HUB_SUFFIXES + local.SUPPORTED_SUFFIXES
    return "/" in name or "\\" in name or name.startswith((".", "~")) or name.lower().endswith(suffixes)


def preflight(sweep: Sweep, command: str, methods: list[str] | None = None, local: bool = True) -> None:
    """Raise a one-line :class:`UserError` naming the config and the setting for the first thing
    ``command`` (align, attack, evaluate or run) would fail on.

    ``local=False`` (a dry run, which swaps model, data and judge for tiny ones and may check a
    config meant for another machine) checks only what does not depend on this machine: no model
    config, no judge model or package, and a data path that does not exist here is let through."""

    where = sweep.where
    stages = STAGES[command]
    base = sweep.base
    if local:
        try:
            check_model(base.model)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
    if "evaluate" in stages:
        options = {"model": base.evaluate.judge_model} if base.evaluate.judge_model else {}
        try:
            check_judge(base.evaluate.judge, resources=local, **options)
        except UserError as err:
            raise UserError(f"{where}: evaluate.judge: {err}") from None
    seen: set[tuple[str, str, str | None]] = set()
    for cell in cells(sweep, methods):
        if "align" in stages or ("attack" in stages and cell.config.attack.poison_ratios):
            _check_start(cell.config, cell.method, where, local)
            if cell.config.align.compile:
                check_compiles(cell.method, f"{where}: ")
        for key, spec, role, split in data_needs(cell.config, cell.method, stages):
            if (spec, role, split) in seen:
                continue
            seen.add((spec, role, split))
            try:
                check_spec(spec, role, split)
                check_rows(spec, role, split)
            except UserError as err:
                if not local and _path_like(spec):
                    continue
                raise UserError(f"{where}: {key}: {err}") from None


def _check_start(config: RunConfig, method: str, where: str, local: bool) -> None:
    """The adapter folder an alignment starts from (``align.init_adapter``) holds an adapter, and
    LoRA is on to train it; a folder on another machine passes a dry run (``local=False``)."""
    start = init_adapter(method, config.align.init_adapter)
    if start is None or start in METHODS:
        return
    if not config.model.lora.enabled:
        raise UserError(
            f"{where}: align.init_adapter: {start} is a LoRA adapter, but model.lora.enabled is false; "
            "enable LoRA, or name a method whose aligned model to start from"
        )
    if local:
        try:
            adapter_folder(start)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
