"""``booster search``: the attacker tunes the attack's learning rate and epochs against one aligned
model, then the worst case it found is measured on the test prompts beside the fixed attack.

Per aligned model (method, seed) one Optuna study: each trial is one attack stage at the trial's
learning rate and epochs (``attack.max_steps`` -1, the poison ratio fixed), scored by its harmful
score on the validation prompts (:mod:`booster.search.validation`). A trial whose model is broken
(most answers degenerate) or whose training diverged is kept out of the best: the sampler is told it
is infeasible, so it steers away from it. The best trial's model is then evaluated on the test
prompts, as is the config's own (fixed) attack at the same poison ratio.

Resuming: the study lives in a journal file in its folder, written as each trial ends, so a rerun
keeps every finished trial; a trial cut short is run again with its own settings, and its attack
resumes from its last checkpoint. Stages are the pipeline's: a trial with the settings of an
existing attack stage reuses it, and every trial shares the aligned stage. Reproducible: the
sampler of trial k is seeded from ``search.sampler_seed`` and k, so the same finished trials give
the same next trial, interrupted or not.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from booster.config import RunConfig, settings_dict
from booster.errors import UserError
from booster.evaluation.harmful_score import model_verdict, with_intervals
from booster.plan import Cell, cell_weights, planned_steps
from booster.progress import advance, logger
from booster.search import history
from booster.search.validation import ValidationSet, write_validation_file
from booster.searches import JOURNAL, SEARCH_DIR
from booster.stages.align import align_dir, fingerprint, run_align
from booster.stages.attack import attack_dir, attack_settings, run_attack
from booster.stages.evaluate import evaluation_file, run_evaluate
from booster.storage import StageBusy, claimed
from booster.training import TrainingDiverged

STUDY_NAME = "attack-search"
#: attack settings a trial sets itself (the rest come from the config).
SEARCHED = ("learning_rate", "epochs", "max_steps")


def search_ratio(config: RunConfig) -> float:
    """The poison ratio of the trials and the fixed attack."""
    ratio = config.search.poison_ratio
    if ratio is None and not config.attack.poison_ratios:
        raise UserError(
            "search.poison_ratio is null and attack.poison_ratios is empty; set search.poison_ratio"
        )
    return config.attack.poison_ratios[0] if ratio is None else ratio


def search_methods(config: RunConfig) -> list[str]:
    return list(config.search.methods or config.methods)


def fixed_config(config: RunConfig) -> RunConfig:
    """The config's own attack at the search's poison ratio."""
    fixed = copy.deepcopy(config)
    fixed.attack.poison_ratios = [search_ratio(config)]
    return fixed


def trial_config(config: RunConfig, learning_rate: float, epochs: int) -> RunConfig:
    """The config of a trial: the fixed attack with the trial's learning rate, trained for its epochs."""
    trial = fixed_config(config)
    trial.attack.learning_rate = float(learning_rate)
    trial.attack.epochs = float(epochs)
    trial.attack.max_steps = -1
    return trial


def validation_config(config: RunConfig, validation: ValidationSet) -> RunConfig:
    """The evaluation of a trial: HS on the validation prompts only (no task accuracy)."""
    scored = copy.deepcopy(config)
    scored.evaluate.harmful_prompts = str(validation.path)
    scored.evaluate.harmful_samples = validation.count
    scored.evaluate.task_samples = 0
    return scored


def study_dir(config: RunConfig, method: str, seed: int, root: Path, validation_sha: str) -> Path:
    """A study's folder, named by what its trials depend on: the aligned stage, every attack setting
    it does not search, the ranges and the sampler, the validation prompts and how they are judged.
    The number of trials is not among them: raising it extends the same study."""
    ratio = search_ratio(config)
    attack = {
        k: v for k, v in attack_settings(fixed_config(config), ratio, method).items() if k not in SEARCHED
    }
    search = config.search
    ranges = {
        "learning_rate": search.learning_rate,
        "epochs": search.epochs,
        "sampler_seed": search.sampler_seed,
        "startup_trials": search.startup_trials,
    }
    evaluate = settings_dict(config.evaluate)
    for key in ("harmful_prompts", "harmful_samples", "task_data", "task_samples", "task_max_new_tokens"):
        evaluate.pop(key, None)  # the validation file's hash stands for the prompts; no task is scored
    name = fingerprint(align_dir(config, method, seed, root).name, attack, ranges, validation_sha, evaluate)
    return root / SEARCH_DIR / f"{method}-seed{seed}-p{ratio:g}-{name}"


def _trial_seed(sampler_seed: int, number: int) -> int:
    digest = hashlib.sha256(f"{sampler_seed}\0{number}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _sampler(config: RunConfig, number: int) -> Any:
    import optuna  # heavy: only the search needs it

    with warnings.catch_warnings():  # multivariate TPE is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=_trial_seed(config.search.sampler_seed, number),
            n_startup_trials=config.search.startup_trials,
            multivariate=True,
        )


def _distributions(config: RunConfig) -> dict[str, Any]:
    import optuna  # heavy: only the search needs it

    (lr_low, lr_high), (ep_low, ep_high) = config.search.learning_rate, config.search.epochs
    return {
        "learning_rate": optuna.distributions.FloatDistribution(lr_low, lr_high, log=True),
        "epochs": optuna.distributions.IntDistribution(ep_low, ep_high),
    }


def open_study(folder: Path, config: RunConfig) -> Any:
    """The study in ``folder``'s journal, created when new."""
    import optuna  # heavy: only the search needs it
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # booster's own lines say what happens
    folder.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(folder / JOURNAL)))
    return optuna.create_study(
        storage=storage,
        study_name=STUDY_NAME,
        direction="maximize",
        sampler=_sampler(config, 0),
        load_if_exists=True,
    )


def finished_in(folder: Path) -> int:
    """How many trials a study's journal holds as finished (0: no journal yet); reads, never writes."""
    import optuna  # heavy: only the search needs it
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if not (folder / JOURNAL).is_file():
        return 0
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(folder / JOURNAL)))
    return len(finished_trials(optuna.load_study(study_name=STUDY_NAME, storage=storage)))


def finished_trials(study: Any) -> list[Any]:
    import optuna  # heavy: only the search needs it

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


@dataclass
class Search:
    """One study being run: the aligned model it attacks and where its files go."""

    config: RunConfig
    method: str
    seed: int
    root: Path
    folder: Path
    validation: ValidationSet
    progress: bool
    bar: Any = None
    #: forward/backward passes of the alignment (its weight on the bar).
    align_weight: int = 1

    @property
    def tag(self) -> str:
        return f"{self.method} seed {self.seed} p={search_ratio(self.config):g}"

    def attack_steps(self, config: RunConfig) -> int:
        """Forward/backward passes of an attack (its weight on the progress bar)."""
        attack = config.attack
        return max(planned_steps(attack, attack.samples) or 1, 1) * attack.gradient_accumulation_steps


def run_trial(search: Search, study: Any, trial: Any, log) -> None:
    """Train (or reuse) the trial's attack, score it on the validation prompts and tell the study."""
    config, method, seed, root = search.config, search.method, search.seed, search.root
    lr, epochs = float(trial.params["learning_rate"]), int(trial.params["epochs"])
    attacked_config = trial_config(config, lr, epochs)
    ratio = search_ratio(config)
    stage = attack_dir(attacked_config, method, seed, ratio, root)
    attrs: dict[str, Any] = {"stage": stage.relative_to(root).as_posix()}
    steps = search.attack_steps(attacked_config)
    if search.bar is not None:  # the bar counted this trial at the middle of the epochs range
        search.bar.total += steps - search.attack_steps(trial_config(config, lr, mean_epochs(config)))
    try:
        attacked = run_attack(attacked_config, method, seed, ratio, root, search.progress)
    except TrainingDiverged as err:
        attrs.update(broken=True, diverged=True, reason=str(err))
        value = 0.0
        log(f"[{search.tag}] trial {trial.number}: lr {lr:.3g}, {epochs} epochs: training diverged")
        if search.bar is not None:
            advance(search.bar, steps, True)
    else:
        if search.bar is not None:
            advance(search.bar, steps, attacked.reused)
        scored = validation_config(attacked_config, search.validation)
        metrics, _ = run_evaluate(scored, attacked.path, root, None, search.progress)
        metrics = with_intervals(metrics)
        broken = model_verdict(metrics.get("degenerate_rate")) == "broken"
        value = float(metrics["harmful_score"])
        attrs.update(
            broken=broken,
            diverged=False,
            reused=attacked.reused,
            steps=attacked.info.get("steps"),
            validation_hs=value,
            validation_hs_ci=metrics.get("harmful_score_ci"),
            degenerate_rate=metrics.get("degenerate_rate"),
            refusal_rate=metrics.get("refusal_rate"),
            n=metrics.get("n"),
            evaluation=evaluation_file(scored, attacked.path, None).relative_to(root).as_posix(),
        )
        state = "BROKEN, " if broken else ""
        log(
            f"[{search.tag}] trial {trial.number}: lr {lr:.3g}, {epochs} epochs: {state}validation HS "
            f"{value:.1f}{' (attack reused)' if attacked.reused else ''}"
        )
    for key, value_ in attrs.items():
        trial.set_user_attr(key, value_)
    # > 0: infeasible, which the sampler ranks below every working model
    trial.set_constraint("broken", 1.0 if attrs["broken"] else 0.0)
    study.tell(trial.number, value)


def mean_epochs(config: RunConfig) -> int:
    low, high = config.search.epochs
    return round((low + high) / 2)


def evaluate_on_test(config: RunConfig, stage: Path, root: Path, progress: bool) -> dict[str, Any]:
    """HS (with its interval) and FA of a finished attack on the test prompts, as ``booster run`` scores it."""
    metrics, _ = run_evaluate(config, stage, root, config.attack.task_data, progress)
    metrics = with_intervals(metrics)
    keep = (
        "harmful_score",
        "harmful_score_ci",
        "harmful_score_plus",
        "refusal_rate",
        "degenerate_rate",
        "verdict",
        "n",
        "finetune_accuracy",
        "finetune_accuracy_ci",
    )
    out = {k: metrics.get(k) for k in keep}
    out["evaluation"] = evaluation_file(config, stage, config.attack.task_data).relative_to(root).as_posix()
    return out


def run_study(search: Search, log) -> dict[str, Any]:
    """Run the study's missing trials, then measure the best and the fixed attack on the test prompts;
    returns the study's history (also written into its folder)."""
    import optuna  # heavy: only the search needs it

    config, method, seed, root = search.config, search.method, search.seed, search.root
    try:
        with claimed(search.folder / ".search.lock", search.folder, wait=False):
            aligned = run_align(config, method, seed, root, search.progress)
            log(
                f"[{search.tag}] align {'reused' if aligned.reused else 'done'} ({aligned.info['seconds']:.0f}s)"
            )
            if search.bar is not None:
                advance(search.bar, search.align_weight, aligned.reused)
            study = open_study(search.folder, config)
            distributions = _distributions(config)
            for left in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                # cut short by an earlier process (this one holds the lock): run it again as drawn
                log(f"[{search.tag}] trial {left.number} was cut short; running it again")
                run_trial(search, study, optuna.trial.Trial(study, left._trial_id), log)
            while len(finished_trials(study)) < config.search.trials:
                study.sampler = _sampler(config, len(study.trials))
                run_trial(search, study, study.ask(distributions), log)

            fixed = fixed_config(config)
            ratio = search_ratio(config)
            attacked = run_attack(fixed, method, seed, ratio, root, search.progress)
            if search.bar is not None:
                advance(search.bar, search.attack_steps(fixed), attacked.reused)
            fixed_test = evaluate_on_test(fixed, attacked.path, root, search.progress)
            records = history.trial_records(finished_trials(study))
            best = history.best_record(records)
            best_test = None
            if best is not None:
                best_config = trial_config(config, best["learning_rate"], best["epochs"])
                # its stage is reused; trained again where this folder lacks it (a search resumed from
                # an archive's journal on a machine that kept no weights)
                best_attack = run_attack(best_config, method, seed, ratio, root, search.progress)
                best_test = evaluate_on_test(best_config, best_attack.path, root, search.progress)
            result = history.study_history(
                config,
                method,
                seed,
                records,
                best,
                best_test,
                fixed_attack(fixed, attacked.path.relative_to(root).as_posix(), fixed_test),
                search.validation,
                search.folder.relative_to(root).as_posix(),
                root,
            )
            history.write_study(search.folder, result)
    except StageBusy:
        raise UserError(
            f"{search.folder}: another process is running this search; wait for it, or search other "
            "settings (each study runs in one process)"
        ) from None
    log(f"[{search.tag}] {history.summary_line(result)}")
    return result


def fixed_attack(config: RunConfig, stage: str, test: dict[str, Any]) -> dict[str, Any]:
    attack = config.attack
    return {
        "learning_rate": attack.learning_rate,
        "epochs": attack.epochs if attack.max_steps == -1 else None,
        "max_steps": attack.max_steps if attack.max_steps != -1 else None,
        "stage": stage,
        "test": test,
    }


def run_search(config: RunConfig, progress: bool = True, log=None) -> Path:
    """Search the attack against every (method, seed) of the config; returns the summary report's path
    (``OUTPUT_DIR/search/report.md``, with ``results.json`` beside it)."""
    log = log or logger.info
    root = Path(config.output_dir)
    folder = root / SEARCH_DIR
    validation = write_validation_file(config, folder)
    log(f"validation: {validation.count} prompts ({validation.path}), disjoint from the test prompts")
    searches = []
    for seed in config.seeds:
        for method in search_methods(config):
            where = study_dir(config, method, seed, root, validation.sha256)
            searches.append(Search(config, method, seed, root, where, validation, progress))
    # the ETA weighs each stage by its forward/backward passes; a trial not yet drawn counts at the
    # middle of the epochs range until it is
    bar = tqdm(total=0, desc="search", unit="pass", disable=not progress, position=0, leave=True)
    trial = trial_config(config, config.search.learning_rate[0], mean_epochs(config))
    for search in searches:
        search.bar = bar
        search.align_weight = cell_weights([Cell(search.seed, search.method, config, {})])[0][0]
        done = finished_in(search.folder)
        left = max(config.search.trials - done, 0)
        bar.total += search.align_weight + left * search.attack_steps(trial)
        bar.total += search.attack_steps(fixed_config(config))
    bar.refresh()
    results = [run_study(search, log) for search in searches]
    bar.close()
    return history.write_summary(folder, results)
