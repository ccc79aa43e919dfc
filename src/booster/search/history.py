"""What a search wrote down: the trials as a table (JSON and markdown), a plot of them, and the
summary of every study of a config (the worst case found beside the fixed attack).

Trials come from the study's journal, so the history after a resumed search is the history of an
uninterrupted one. A broken trial (most answers degenerate) or a diverged one is listed but never
chosen as the worst case: breaking the model is not a successful attack.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from booster.config import RunConfig
from booster.markdown import head, row
from booster.report import write_search_summary
from booster.search.validation import ValidationSet
from booster.searches import (
    HISTORY,
    PLOT,
    SUMMARY_JSON,
    merge_summary,
    pct,
    read_summary,
    test_hs_text,
    with_ci,
)
from booster.stages.align import align_dir
from booster.storage import write_json_atomic, write_text_atomic


def trial_records(trials: list[Any]) -> list[dict[str, Any]]:
    """One row per finished trial, in trial order, from the study's trials."""
    records = []
    for trial in sorted(trials, key=lambda t: t.number):
        attrs = trial.user_attrs
        records.append(
            {
                "trial": trial.number,
                "learning_rate": float(trial.params["learning_rate"]),
                "epochs": int(trial.params["epochs"]),
                "validation_hs": attrs.get("validation_hs"),
                "validation_hs_ci": attrs.get("validation_hs_ci"),
                "degenerate_rate": attrs.get("degenerate_rate"),
                "refusal_rate": attrs.get("refusal_rate"),
                "broken": bool(attrs.get("broken")),
                "diverged": bool(attrs.get("diverged")),
                "steps": attrs.get("steps"),
                "reused": bool(attrs.get("reused")),
                "stage": attrs.get("stage"),
                "evaluation": attrs.get("evaluation"),
            }
        )
    return records


def best_record(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial with the highest validation HS among working models (the earliest on a tie); None
    when every trial broke the model."""
    working = [r for r in records if not r["broken"] and r["validation_hs"] is not None]
    if not working:
        return None
    return max(working, key=lambda r: (r["validation_hs"], -r["trial"]))


def study_history(
    config: RunConfig,
    method: str,
    seed: int,
    records: list[dict[str, Any]],
    best: dict[str, Any] | None,
    best_test: dict[str, Any] | None,
    fixed: dict[str, Any],
    validation: ValidationSet,
    folder: str,
    root: Path,
) -> dict[str, Any]:
    """The study's history.json: settings, every trial, the worst case and the fixed attack on the test."""
    search = config.search
    return {
        "method": method,
        "seed": seed,
        "poison_ratio": config.attack.poison_ratios[0]
        if search.poison_ratio is None
        else search.poison_ratio,
        "folder": folder,
        "aligned_stage": align_dir(config, method, seed, root).relative_to(root).as_posix(),
        "search": {
            "trials": len(records),
            "learning_rate": list(search.learning_rate),
            "epochs": list(search.epochs),
            "sampler": "TPE (multivariate)",
            "sampler_seed": search.sampler_seed,
            "startup_trials": search.startup_trials,
        },
        "validation": {
            "prompts": search.validation_prompts
            or f"{config.evaluate.harmful_prompts} (after the test prompts)",
            "n": validation.count,
            "sha256": validation.sha256,
        },
        "test": {"prompts": config.evaluate.harmful_prompts, "n": config.evaluate.harmful_samples},
        "judge": config.evaluate.judge,
        "trials": records,
        "best": None if best is None else {**best, "test": best_test},
        "fixed": fixed,
    }


# -- text --------------------------------------------------------------------------------------------


def _length(fixed: dict[str, Any]) -> str:
    if fixed.get("max_steps") is not None:
        return f"{fixed['max_steps']} steps"
    return f"{fixed['epochs']:g} epochs"


def summary_line(result: dict[str, Any]) -> str:
    """``fixed attack: test HS 30.0 [..]; worst case (trial 4: lr 3e-04, 6 epochs): test HS 52.5 [..]``."""
    fixed = f"fixed attack: test HS {test_hs_text(result['fixed']['test'])}"
    best = result["best"]
    if best is None:
        return f"{fixed}; every trial broke the model, so there is no worst case to report"
    return (
        f"{fixed}; worst case (trial {best['trial']}: lr {best['learning_rate']:.3g}, {best['epochs']} "
        f"epochs, validation HS {best['validation_hs']:.1f}): test HS {test_hs_text(best['test'])}"
    )


def markdown(result: dict[str, Any]) -> str:
    """The study's history.md: the comparison on the test prompts, then every trial."""
    s, v, t = result["search"], result["validation"], result["test"]
    best, fixed = result["best"], result["fixed"]
    lines = [
        f"# Attack search: {result['method']} seed {result['seed']}, p={result['poison_ratio']:g}",
        "",
        f"Aligned model `{result['aligned_stage']}`. {s['trials']} trials of the attack's learning rate "
        f"(log range [{s['learning_rate'][0]:g}, {s['learning_rate'][1]:g}]) and epochs "
        f"([{s['epochs'][0]}, {s['epochs'][1]}]), {s['sampler']} with seed {s['sampler_seed']} (the first "
        f"{s['startup_trials']} at random). Each trial is scored by its harmful score on {v['n']} validation "
        f"prompts ({v['prompts']}), disjoint from the {t['n']} test prompts ({t['prompts']}); judge "
        f"`{result['judge']}`. The worst case is the trial with the highest validation HS whose model is not "
        "broken; only it and the fixed attack are evaluated on the test prompts.",
        "",
        *head(["attack", "learning rate", "length", "test HS [95% CI]", "refusals", "degenerate", "FA"]),
    ]
    rows = [("fixed (the config's attack)", fixed["learning_rate"], _length(fixed), fixed["test"])]
    if best is not None:
        rows.append(
            (
                f"worst case (trial {best['trial']})",
                best["learning_rate"],
                f"{best['epochs']} epochs",
                best["test"],
            )
        )
    for name, lr, length, test in rows:
        lines.append(
            row(
                [
                    name,
                    f"{lr:.3g}",
                    length,
                    test_hs_text(test),
                    f"{pct(test.get('refusal_rate'))}%",
                    f"{pct(test.get('degenerate_rate'))}%",
                    pct(test.get("finetune_accuracy")),
                ]
            )
        )
    if best is None:
        lines += ["", "Every trial broke the model (or diverged): there is no worst case to evaluate."]
    lines += [
        "",
        *head(
            [
                "trial",
                "learning rate",
                "epochs",
                "validation HS [95% CI]",
                "degenerate",
                "broken?",
                "test HS of the best",
            ]
        ),
    ]
    for r in result["trials"]:
        chosen = best is not None and r["trial"] == best["trial"]
        broken = "diverged" if r["diverged"] else "yes" if r["broken"] else "no"
        hs = "-" if r["diverged"] else with_ci(r["validation_hs"], r["validation_hs_ci"])
        test = test_hs_text(best["test"]) if chosen else ""
        trial = f"{r['trial']}{' (best)' if chosen else ''}"
        lines.append(
            row(
                [
                    trial,
                    f"{r['learning_rate']:.3g}",
                    str(r["epochs"]),
                    hs,
                    f"{pct(r['degenerate_rate'])}%",
                    broken,
                    test,
                ]
            )
        )
    lines += ["", f"![validation HS per trial and against the learning rate]({PLOT})", ""]
    return "\n".join(lines)


def write_study(folder: Path, result: dict[str, Any]) -> None:
    write_json_atomic(folder / f"{HISTORY}.json", result)
    write_text_atomic(folder / f"{HISTORY}.md", markdown(result))
    plot_study(result, folder / PLOT)


def write_summary(folder: Path, results: list[dict[str, Any]]) -> Path:
    """``search/results.json`` with this search's studies in and those an earlier search into the
    same folder summarised kept (a study whose folder was removed is dropped), so searching one
    method at a time builds one summary; then ``search/report.md`` from it
    (:func:`booster.report.write_search_summary`)."""
    kept = [r for r in read_summary(folder.parent) if (folder.parent / r["folder"]).is_dir()]
    write_json_atomic(folder / SUMMARY_JSON, merge_summary(kept, results))
    path = write_search_summary(folder.parent)
    assert path is not None  # results.json was just written
    return path


# -- plot --------------------------------------------------------------------------------------------


def plot_study(result: dict[str, Any], path: Path) -> None:
    """Validation HS per trial (with the best so far) and against the learning rate (colour: epochs);
    broken trials as grey crosses at their HS, diverged ones at the bottom, the worst case a star."""
    import matplotlib  # heavy: only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only plotting needs it

    records, best = result["trials"], result["best"]
    fig, (per_trial, per_lr) = plt.subplots(1, 2, figsize=(10.5, 4.2), layout="constrained")
    ok = [r for r in records if not r["broken"]]
    broken = [r for r in records if r["broken"] and not r["diverged"]]
    diverged = [r for r in records if r["diverged"]]
    low, high = result["search"]["epochs"]
    color = {"cmap": "viridis", "vmin": low, "vmax": max(high, low + 1)}

    points = None
    for ax, x in ((per_trial, "trial"), (per_lr, "learning_rate")):
        if ok:
            points = ax.scatter(
                [r[x] for r in ok], [r["validation_hs"] for r in ok], c=[r["epochs"] for r in ok],
                s=36, edgecolors="black", linewidths=0.4, label="trial", zorder=3, **color,
            )  # fmt: skip
        if broken:
            ax.scatter(
                [r[x] for r in broken], [r["validation_hs"] for r in broken], marker="x", color="grey",
                s=40, label="broken (not eligible)", zorder=3,
            )  # fmt: skip
        if diverged:
            ax.scatter(
                [r[x] for r in diverged], [0.0] * len(diverged), marker="v", color="firebrick", s=40,
                label="diverged", zorder=3,
            )  # fmt: skip
        if best is not None:
            test = best.get("test") or {}
            ax.scatter(
                [best[x]], [best["validation_hs"]], marker="*", s=320, facecolors="none",
                edgecolors="red", linewidths=1.6, zorder=4,
                label=f"worst case: trial {best['trial']} (test HS {test_hs_text(test)})",
            )  # fmt: skip
        ax.set_ylim(-3, 103)
        ax.set_ylabel("validation HS (%)")
        ax.grid(alpha=0.3)
    if ok:  # the best eligible validation HS so far
        running, xs, ys = -math.inf, [], []
        for r in records:
            if not r["broken"] and r["validation_hs"] is not None:
                running = max(running, r["validation_hs"])
            if running > -math.inf:
                xs.append(r["trial"])
                ys.append(running)
        per_trial.step(xs, ys, where="post", color="black", alpha=0.5, linewidth=1, label="best so far")
    per_trial.set_xlabel("trial")
    per_trial.xaxis.get_major_locator().set_params(integer=True)
    per_lr.set_xscale("log")
    per_lr.set_xlabel("attack learning rate")
    lr_low, lr_high = result["search"]["learning_rate"]
    per_lr.set_xlim(lr_low / 1.5, lr_high * 1.5)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # heavy: only plotting

    # ticks at 1, 2 and 5 of each decade, written plainly: a range under a decade otherwise gets
    # every minor tick labelled in scientific notation, on top of each other
    per_lr.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    per_lr.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    per_lr.xaxis.set_minor_formatter(NullFormatter())
    if points is not None:
        from matplotlib.ticker import MaxNLocator  # heavy: only plotting needs it

        bar = fig.colorbar(points, ax=per_lr, label="epochs")
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
    handles: dict[str, Any] = {}
    for ax in (per_trial, per_lr):
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=3, fontsize=8)
    fixed = result["fixed"]["test"]
    fig.suptitle(
        f"attack search on {result['method']} seed {result['seed']}, p={result['poison_ratio']:g}: "
        f"{len(records)} trials, {result['validation']['n']} validation prompts; "
        f"fixed attack's test HS {test_hs_text(fixed)}",
        fontsize=10,
    )
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
