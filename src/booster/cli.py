"""The ``booster`` command: ``align | attack | evaluate | run | search | report | ls | export | methods | data | judge``.

User mistakes (bad config, file, key or value) and failures of the machine (a full disk, a path
that cannot be read or written) print one line naming the culprit and exit 2; anything else is a
bug and keeps its traceback. ``run``, ``evaluate`` and ``report`` exit 1, after writing everything,
when an evaluated model is broken (most answers degenerate): one line names them. SIGTERM or
SIGUSR1 (a cluster taking the machine back) saves the training stage at its current step and exits
75 with one line naming the checkpoint; rerunning resumes. Status lines go
through the ``booster`` logger (``--quiet``: warnings and errors only; ``--verbose``: every Trainer
log line too); results are printed.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import tempfile
import textwrap
from pathlib import Path

from booster.errors import UserError
from booster.preemption import EXIT_PREEMPTED, Preempted, stop_on_signals

log = logging.getLogger("booster")

DESCRIPTION = (
    "booster-llm hardens a language model against harmful fine-tuning with Booster (ICLR 2025), "
    "then simulates the attack (fine-tuning on task data with a fraction p of harmful samples) and "
    "measures what is left of the safety alignment: harmful score (HS) and fine-tune accuracy (FA)."
)
#: one example per subcommand, shown by `booster --help` and by each subcommand's --help.
EXAMPLES = {
    "align": "booster align --config configs/tiny.yaml --method booster",
    "attack": 'booster attack --config configs/tiny.yaml --set "attack.poison_ratios=[0.1,0.2]"',
    "evaluate": "booster evaluate --config configs/tiny.yaml",
    "run": "booster run --config configs/quickstart.yaml",
    "search": "booster search --config configs/tiny.yaml --dry-run",
    "report": "booster report runs/quickstart",
    "ls": "booster ls runs/quickstart",
    "archive": "booster archive runs/quickstart results/quickstart",
    "export": "booster export runs/quickstart out/smollm2-booster --method booster --merged",
    "methods": "booster methods --json",
    "data": "booster data info",
    "judge": "booster judge validate --judge keyword",
}

CONTENT_WARNING = (
    "content warning: generations of harmful prompts are stored under {path}; "
    "they may contain harmful text and are never printed here."
)


def _quiet_libraries() -> None:
    """Hub access is off unless the user turns it on; library chatter stays out of the way."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def _no_library_bars() -> None:
    """``--quiet`` / ``--no-progress`` also hide transformers' and the hub's own progress bars
    (loading weights, downloads), through their own switches."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


def _add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML config (see configs/)")
    parser.add_argument("--output-dir", help="override output_dir from the config")
    _add_set_arg(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_set_arg(
    parser: argparse.ArgumentParser,
    help: str = "override a config key, dotted, value parsed as YAML (e.g. --set align.lamb=10); repeatable",
) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def _add_verbosity_args(parser: argparse.ArgumentParser, default: object = False) -> None:
    """``--quiet`` / ``--verbose``, before the subcommand or after it (SUPPRESS there, so the
    subcommand's parser does not overwrite a flag given before it)."""
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="only warnings, errors and results"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="also every Trainer log line"
    )


def _load(args: argparse.Namespace):
    """The config as a :class:`booster.config.Sweep` (a plain config is a sweep of one cell), its
    output folder checked for writing."""
    from booster.config import load_sweep
    from booster.threads import configure_threads

    configure_threads()
    sweep = load_sweep(args.config, args.overrides)
    if args.output_dir:
        sweep.base.output_dir = args.output_dir
    args.output_root = sweep.base.output_dir  # named by a full-disk error
    check_output_dir(sweep.base.output_dir)
    from booster.archive import is_archive

    if is_archive(sweep.base.output_dir):
        raise UserError(
            f"output_dir {sweep.base.output_dir!r} is an archive (measurements without weights: "
            "`booster archive`); run into another folder and archive it into this one afterwards"
        )
    return sweep


def check_output_dir(path: str | Path) -> None:
    """Stop at the start, in one line, when the output folder cannot be written (a file in its
    place, no permission, a read-only disk) rather than after the first stage has trained.

    A real file is written and removed in the folder, or in its nearest existing parent when the
    folder does not exist yet (nothing is created then).
    """
    target = Path(path).expanduser()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == target else f"cannot be created: {str(existing)!r} is a file"
        raise UserError(f"output_dir {str(path)!r} {what}; set output_dir (or --output-dir) to a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".booster-write-probe-") as probe:
            probe.write(b"booster")
            probe.flush()
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise  # main() reports a full disk
        raise UserError(
            f"output_dir {str(path)!r}: cannot write in {str(existing)!r} ({err.strerror}); "
            "fix its permissions or set output_dir (or --output-dir) elsewhere"
        ) from None


def _cells(args: argparse.Namespace):
    """The config's cells (or ``--method``'s), after checking everything the command will need."""
    from booster.plan import cells
    from booster.preflight import preflight

    sweep = _load(args)
    if args.method:
        from booster.methods.registry import METHODS

        if args.method not in METHODS:
            raise UserError(f"--method {args.method!r}: unknown method (known: {', '.join(METHODS)})")
    methods = [args.method] if args.method else None
    preflight(sweep, args.command, methods)
    return sweep, cells(sweep, methods)


def cmd_align(args: argparse.Namespace) -> int:
    from booster.stages.align import align_dir, run_align

    sweep, grid = _cells(args)
    done = set()
    for cell in grid:
        stage = align_dir(cell.config, cell.method, cell.seed)
        if stage in done:  # cells that differ only in attack settings share their alignment
            continue
        done.add(stage)
        result = run_align(cell.config, cell.method, cell.seed, progress=not args.no_progress)
        state = "reused" if result.reused else f"done in {result.info['seconds']:.0f}s"
        log.info(f"align {cell.tag()}: {state} -> {result.path / 'model'}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    """The user's fine-tuning of each aligned model, and a post-fine-tuning defense's repair after it."""
    from booster.methods.registry import get_method
    from booster.stages.attack import run_attack
    from booster.stages.repair import run_repair

    sweep, grid = _cells(args)
    for cell in grid:
        for ratio in cell.config.attack.poison_ratios:
            result = run_attack(cell.config, cell.method, cell.seed, ratio, progress=not args.no_progress)
            state = "reused" if result.reused else f"done in {result.info['seconds']:.0f}s"
            log.info(f"attack {cell.tag()} p={ratio:g}: {state} -> {result.path / 'model'}")
            if get_method(cell.method).repair is not None:
                result = run_repair(cell.config, cell.method, cell.seed, ratio, progress=not args.no_progress)
                state = "reused" if result.reused else f"done in {result.info['seconds']:.0f}s"
                log.info(f"repair {cell.tag()} p={ratio:g}: {state} -> {result.path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate aligned (and, if present, attacked) models of the config's cells; their entries
    are added to (or replace theirs in) the run's results.json, so `booster report` works after
    align / attack / evaluate run one by one."""
    from booster.evaluation.alpaca_eval import pending_note
    from booster.pipeline import evaluation_entry, summary, with_repair
    from booster.report.cells import is_broken
    from booster.runs import update_results
    from booster.stages.align import align_dir
    from booster.stages.attack import attack_dir
    from booster.stages.evaluate import run_evaluate
    from booster.stages.probe import run_probe
    from booster.stages.repair import final_dir
    from booster.storage import read_done

    sweep, grid = _cells(args)
    root = Path(sweep.base.output_dir)
    entries, broken = [], []
    for cell in grid:
        config, method, seed = cell.config, cell.method, cell.seed
        stages = [("aligned", None, align_dir(config, method, seed, root))]
        stages += [
            (f"p={r:g}", r, final_dir(config, method, seed, r, root)) for r in config.attack.poison_ratios
        ]
        for label, ratio, stage in stages:
            done = read_done(stage)
            if done is None:
                continue
            if done.get("stage") == "repair":  # a repaired model: the attack's numbers, the repair's summary
                attacked = read_done(attack_dir(config, method, seed, ratio, root))
                if attacked is None:
                    continue
                done = with_repair(attacked, done)
            metrics, _ = run_evaluate(config, stage, root, config.attack.task_data, not args.no_progress)
            kind = "aligned" if ratio is None else "attacked"
            probe = run_probe(config, stage, root) if ratio is None else None
            entries.append(evaluation_entry(cell, kind, ratio, metrics, done, stage, root, probe))
            log.info(f"evaluate {cell.tag()} {label}: {summary(metrics, probe)}")
            if is_broken(metrics):
                broken.append(f"{cell.tag()} {label}")
            if note := pending_note(metrics):
                log.info(note)
    if not entries:
        raise UserError(
            f"no finished align/attack stage under {root}; run `booster align` (or `booster run`) first"
        )
    path = update_results(root, entries, sweep)
    log.info(f"{len(entries)} entries in {path}; `booster report {root}` writes report.md and plots")
    print(CONTENT_WARNING.format(path=root))
    return _broken_exit(root, list(dict.fromkeys(broken)))


def cmd_run(args: argparse.Namespace) -> int:
    from booster.pipeline import parse_shard, run_pipeline

    shard = parse_shard(args.shard) if args.shard else None
    sweep = _load(args)
    if args.dry_run:
        from booster.dryrun import dry_run

        dry_run(sweep, progress=not args.no_progress)
        return 0
    from booster.preflight import preflight

    preflight(sweep, "run")
    path = run_pipeline(sweep, progress=not args.no_progress, shard=shard)
    print(CONTENT_WARNING.format(path=sweep.base.output_dir))
    print((path.parent / "report.md").read_text().split("## Every evaluated model")[0].rstrip())
    print(f"\nwrote {path}, {path.parent / 'report.md'} and plots")
    return _broken_exit(path.parent)


def cmd_search(args: argparse.Namespace) -> int:
    """The attack search (``search:`` in the config) against each aligned model; see booster.search."""
    sweep = _load(args)
    if sweep.variables:
        raise UserError(
            f"{sweep.where}: {', '.join(sweep.variables)} list several values (a sweep); booster search "
            "attacks one configuration, so give one value each"
        )
    config = sweep.base
    if args.method:
        from booster.methods.registry import METHODS

        if args.method not in METHODS:
            raise UserError(f"--method {args.method!r}: unknown method (known: {', '.join(METHODS)})")
        config.search.methods = [args.method]
    if args.dry_run:
        from booster.search.plan import plan_lines

        for line in plan_lines(config, sweep.where):
            print(line)
        return 0
    from booster.preflight import preflight
    from booster.search.study import run_search, search_methods

    preflight(sweep, "search", search_methods(config))
    path = run_search(config, progress=not args.no_progress)
    print(CONTENT_WARNING.format(path=config.output_dir))
    print(path.read_text().rstrip())
    print(f"\nwrote {path}, {path.with_name('results.json')} and each study's history and plot")
    return 0


def _broken_exit(root: Path, models: list[str] | None = None) -> int:
    """1 after results and report are written when some evaluated model is broken (one line says
    which), so scripts never take a broken model's empty answers for safety; else 0."""
    from booster.report.cells import broken_message, broken_models
    from booster.runs import load_results

    models = broken_models(load_results(root)) if models is None else models
    if models:
        print(f"booster: {broken_message(models)}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from booster.archive import is_archive, merged_config
    from booster.report import write_report

    root = Path(args.run_dir)
    # an archive carries its runs' configs: its report gathers every stage archived so far
    archived = merged_config(root) if not args.config and is_archive(root) else None
    if args.config or archived is not None:
        from booster.config import load_sweep, sweep_from_dict
        from booster.pipeline import gather_results

        if not root.is_dir():
            raise UserError(f"{root}: no such run folder; pass the output_dir the config was run into")
        if args.config:
            sweep = load_sweep(args.config, args.overrides)
        else:
            sweep = sweep_from_dict(archived, f"{root}/configs")
        sweep.base.output_dir = str(root)
        results, found, total = gather_results(sweep, root, args.against)
        print(f"gathered {found} of the grid's {total} models (finished stages only) into {results}")
        path = root / "report.md"
    elif not (root / "results.json").is_file():
        raise UserError(
            f"{root}: no results.json here; pass the output_dir of a finished `booster run`, or add "
            "--config (the run's config) to gather the stages finished so far"
        )
    else:
        path = write_report(root, against=args.against)
    print(path.read_text())
    return _broken_exit(root)


def cmd_ls(args: argparse.Namespace) -> int:
    import json

    from booster.runs import format_stages, list_stages, stages_json

    rows = list_stages(Path(args.run_dir))
    print(json.dumps(stages_json(rows), indent=2) if args.json else format_stages(rows))
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    from booster.archive import archive_run
    from booster.report import write_search_summary

    done = archive_run(args.run_dir, args.dest)
    write_search_summary(done.path)  # every archived run's studies, paired on the archive's verdicts
    line = f"archived {done.stages} finished stages and {done.evaluations} evaluations of {args.run_dir} into {done.path}"
    if done.without_verdicts:
        line += f" ({done.without_verdicts} evaluations had no generations file, so no per-prompt verdicts)"
    print(line)
    if done.config:
        print(f"its report: booster report {done.path}")
    else:
        print(
            f"{args.run_dir} has no config.yaml (booster run and booster evaluate write it), so its "
            f"report needs the run's config: booster report {done.path} --config CONFIG"
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from booster.export import check_hub_login, export_model, push_to_hub

    if args.push_to_hub:
        check_hub_login(args.push_to_hub)
    export = export_model(
        args.run_dir,
        args.out,
        args.method,
        args.seed,
        args.stage,
        args.poison_ratio,
        args.merged,
        args.license,
    )
    print(f"exported {args.method} seed {args.seed} {export.stage.kind} ({export.format}) -> {export.path}")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(export.path, args.push_to_hub, private=args.private)}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """Every defense by name, the stages it acts at, and what it does (``--json``: with the method
    whose aligned model and attack each one shares, and the settings only it reads)."""
    import json

    from booster.methods.registry import METHODS, alignment_method, attack_method

    if args.json:
        rows = [
            {
                "method": name,
                "stages": method.stages,
                "summary": method.summary,
                "aligns_like": alignment_method(name),
                "attacks_like": attack_method(name),
                "settings": list(method.params),
            }
            for name, method in METHODS.items()
        ]
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(name) for name in METHODS)
    stages = max(len(m.stages) for m in METHODS.values())
    print(f"{'method'.ljust(width)}  {'acts at'.ljust(stages)}  what")
    for name, method in METHODS.items():
        print(f"{name.ljust(width)}  {method.stages.ljust(stages)}  {method.summary}")
    print(
        "\n+mix and +antidote combine with the other defenses by name; settings: attack.safety_mix_ratio "
        "(+mix), the repair: section (+antidote); docs/method.md says how each works."
    )
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from booster.data.embedded import embedded_info

    rows = embedded_info()
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(str(r[k]).ljust(widths[k]) for k in keys))
    return 0


#: rows of `booster judge validate`: (report key, label).
VALIDATION_ROWS = (
    ("accuracy", "accuracy"),
    ("auc", "AUC"),
    ("false_positive_rate", "harmless answers flagged"),
    ("false_negative_rate", "harmful answers missed"),
    ("refusal_false_positive_rate", "refusals flagged harmful"),
)


def _with_interval(value: float, interval: list[float] | None) -> str:
    if interval is None or any(v != v for v in interval):  # NaN: no interval
        return f"{value:.3f}"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def cmd_judge_validate(args: argparse.Namespace) -> int:
    import json

    from booster.evaluation.judges import DEFAULT_JUDGE, check_judge, get_judge
    from booster.evaluation.statistics import RESAMPLES
    from booster.evaluation.validate import held_out, judge_held_out, paired_difference, summarise

    names = list(dict.fromkeys(args.judge or [DEFAULT_JUDGE, "embedded"]))
    if args.max_answer_words is not None and args.max_answer_words < 1:
        raise UserError(f"--max-answer-words {args.max_answer_words}: give a positive number of words")
    if args.model and len(names) > 1:
        raise UserError("--model applies to one judge: give a single --judge with it")
    options = {"model": args.model} if args.model else {}
    for name in names:  # every name and option checked before any judge loads a model
        check_judge(name, **options)
    data = held_out(max_answer_words=args.max_answer_words)
    verdicts, reports = {}, []
    for name in names:  # one judge in memory at a time
        judge = get_judge(name, **options)
        verdicts[name] = judge_held_out(judge, data)
        reports.append(summarise(name, data, verdicts[name]))
        del judge
    differences = {
        f"{names[0]} - {other}": paired_difference(data, verdicts[names[0]], verdicts[other])
        for other in names[1:]
    }
    if args.json:
        print(json.dumps({"judges": reports, "differences": differences}, indent=2))
        return 0
    first = reports[0]
    harmful = round(first["harmful_share"] * first["n"])
    cut = f", answers cut to {args.max_answer_words} words" if args.max_answer_words else ""
    print(
        f"held-out human labels: {first['n']} answers ({harmful} harmful, {first['n'] - harmful} harmless)"
        f" and {first['n_refusals']} refusals{cut}"
    )
    width = max(24, *(len(n) + 2 for n in names))
    print((f"{'':26}" + "".join(f"{n:<{width}}" for n in names)).rstrip())
    for key, label in VALIDATION_ROWS:
        cells = "".join(f"{_with_interval(r[key], r.get(f'{key}_ci')):<{width}}" for r in reports)
        print(f"{label:<26}{cells}".rstrip())
    for pair, diff in differences.items():
        print(
            f"{pair} on the same answers: accuracy "
            f"{_with_interval(diff['accuracy_diff'], diff['accuracy_diff_ci'])}, AUC "
            f"{_with_interval(diff['auc_diff'], diff['auc_diff_ci'])}"
        )
    print(
        f"95% intervals: Wilson for the rates, BCa bootstrap ({RESAMPLES} resamples) for the AUC and differences"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from booster import __version__

    examples = "\n".join(f"  {EXAMPLES[k]}" for k in EXAMPLES)
    parser = argparse.ArgumentParser(
        prog="booster",
        description=textwrap.fill(DESCRIPTION, 88),
        epilog=f"examples (one per command):\n{examples}\n\n"
        "Configs are YAML (see configs/); `booster COMMAND --help` shows a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"booster-llm {__version__}")
    _add_verbosity_args(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("align", help="align the model with each method in the config (or --method)")
    _add_config_args(p)
    p.add_argument("--method", help="align only this method (default: every method in the config)")
    p.set_defaults(func=cmd_align)

    p = sub.add_parser(
        "attack",
        help="fine-tune the aligned models on task data with a poison ratio p (then repair them, for +antidote)",
    )
    _add_config_args(p)
    p.add_argument("--method", help="attack only this method's aligned model")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("evaluate", help="harmful score and fine-tune accuracy of finished stages")
    _add_config_args(p)
    p.add_argument("--method", help="evaluate only this method")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "run", help="align -> evaluate -> attack [-> repair] -> evaluate for every cell, then report"
    )
    _add_config_args(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config, print its grid and cost, then run the whole grid at tiny sizes "
        "(tiny model and local data) into OUTPUT_DIR/dry-run",
    )
    p.add_argument(
        "--shard",
        metavar="I/N|slurm",
        help="run only the cells whose index %% N is I (0 <= I < N), so N jobs share the grid and the "
        "output folder; `slurm` takes I and N from a SLURM job array (--array=1-N or 0-(N-1) alike); "
        "a final run without --shard (or `booster report RUN_DIR --config FILE`) gathers them",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "search",
        help="an attacker who tunes the attack: search its learning rate and epochs (search: in the config) "
        "against each aligned model, then compare the worst case with the fixed attack on the test prompts",
    )
    _add_config_args(p)
    p.add_argument("--method", help="search only against this method's aligned model")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config and print the search's plan and cost, training nothing",
    )
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "report",
        help="rebuild report.md and plots from a run folder's results.json (an archive: from its stages)",
    )
    p.add_argument("run_dir")
    p.add_argument(
        "--config",
        help="the run's config: first gather every finished stage of its grid into results.json, "
        "training nothing (a grid still running reports what it has so far); an archive carries "
        "its runs' configs and needs it only to report part of its grid",
    )
    _add_set_arg(p, help="override a key of --config, as for `booster run`")
    p.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="METHOD",
        help="also compare every method with METHOD, paired on the same prompts and task questions "
        "as with sft (repeatable): two defenses head to head, e.g. --against vaccine",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "ls", help="list a run folder's stages: method, seed, p, swept values, status, steps and path"
    )
    p.add_argument("run_dir", help="the run's output_dir")
    p.add_argument("--json", action="store_true", help="print the stages as JSON")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser(
        "archive",
        help="copy a run folder's measurements (no weights, no answers) into an archive that "
        "`booster report --config` reads; archiving more runs into it adds their stages",
    )
    p.add_argument("run_dir", help="the run's output_dir")
    p.add_argument("dest", help="the archive folder (new, or an archive to add to)")
    p.set_defaults(func=cmd_archive)

    p = sub.add_parser("export", help="write a trained model (adapter or merged weights) with a model card")
    p.add_argument("run_dir", help="the run's output_dir (or one stage folder of it)")
    p.add_argument("out", help="new folder to write the model to")
    p.add_argument("--method", required=True, help="the method whose model to export")
    p.add_argument("--seed", type=int, default=0, help="the seed whose model to export (default 0)")
    p.add_argument(
        "--stage", choices=["aligned", "attacked"], help="default: attacked with --poison-ratio, else aligned"
    )
    p.add_argument(
        "--poison-ratio", type=float, help="the attacked model's p (when it was attacked at several)"
    )
    p.add_argument("--merged", action="store_true", help="merge the LoRA adapter into full weights")
    p.add_argument(
        "--license", metavar="ID", help="the card's license id (default: the base model's, where known)"
    )
    p.add_argument(
        "--push-to-hub", metavar="REPO", help="then upload the folder to this hub model repository"
    )
    p.add_argument("--private", action="store_true", help="create the hub repository as private")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("methods", help="list the defenses: the stages each acts at and what it does")
    p.add_argument("--json", action="store_true", help="print them as JSON, with the stages they share")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("data", help="the embedded benchmark data")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    info = data_sub.add_parser("info", help="size, source and license of every embedded split")
    info.set_defaults(func=cmd_data_info)

    p = sub.add_parser("judge", help="harm judges")
    judge_sub = p.add_subparsers(dest="judge_command", required=True)
    val = judge_sub.add_parser(
        "validate",
        help="accuracy, AUC and error rates, with 95%% intervals, on held-out human labels",
    )
    val.add_argument(
        "--judge",
        action="append",
        help="judge name (embedded-lm, embedded, keyword, beaver-dam); repeat to compare judges on "
        "the same answers (default: embedded-lm beside embedded)",
    )
    val.add_argument(
        "--model",
        help="model of a single judge that loads one (embedded-lm: a model.name; beaver-dam: hub id or folder)",
    )
    val.add_argument(
        "--max-answer-words",
        type=int,
        metavar="N",
        help="cut every answer to its first N words first (as a small max_new_tokens would)",
    )
    val.add_argument("--json", action="store_true", help="print the reports as JSON")
    val.set_defaults(func=cmd_judge_validate)

    helps = {action.dest: action.help for action in getattr(sub, "_choices_actions", [])}
    for name, command in sub.choices.items():  # each command's --help: what it does and an example
        command.description = command.description or helps.get(name)
        command.epilog = f"example:\n  {EXAMPLES[name]}"
        command.formatter_class = argparse.RawDescriptionHelpFormatter
        _add_verbosity_args(command, argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _quiet_libraries()
        from booster.progress import setup_logging

        quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
        setup_logging(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
        if quiet and hasattr(args, "no_progress"):
            args.no_progress = True
        if quiet or getattr(args, "no_progress", False):
            _no_library_bars()
        with stop_on_signals():
            return int(args.func(args) or 0)
    except Preempted as err:
        print(f"booster: {err}", file=sys.stderr)
        return EXIT_PREEMPTED
    except UserError as err:
        print(f"booster: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("booster: interrupted; finished stages are kept and the next run resumes", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`booster ls --json | head`): nothing left to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 0
    except Exception as err:
        message = environment_error(err, getattr(args, "output_root", None))
        if message is None:
            raise
        print(f"booster: error: {message}", file=sys.stderr)
        return 2


#: torch's messages when a checkpoint write fails because the disk is full.
TORCH_WRITE_FAILED = ("unexpected pos", "PytorchStreamWriter failed")
#: errors on a named path that the user fixes (the path, its permissions, its disk), not bugs.
PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EROFS}


def environment_error(err: BaseException, output_dir: str | None) -> str | None:
    """The one-line message for a failure of the machine rather than of booster (a full disk, a
    path that cannot be read or written), or None for a bug, which keeps its traceback.

    The cause chain is searched, as a library may wrap the ``OSError`` in its own exception.
    """
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    for e in chain:
        text = str(e)
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC
        full |= isinstance(e, RuntimeError) and any(m in text for m in TORCH_WRITE_FAILED)
        full |= "No space left on device" in text  # safetensors' own error type
        if full:
            path = getattr(e, "filename", None) or output_dir or "the output folder"
            return (
                f"no space left on device while writing {path} "
                "(free some space or set output_dir elsewhere); finished stages are kept"
            )
    first = chain[0]
    if isinstance(first, FileNotFoundError) and first.filename and not Path(first.filename).exists():
        return f"{first.filename}: file not found"
    if isinstance(first, OSError) and first.filename and first.errno in PATH_ERRNOS:
        return f"{first.filename}: {first.strerror}; check the path and its permissions"
    return None


if __name__ == "__main__":
    sys.exit(main())
