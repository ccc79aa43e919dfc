"""The ``booster`` command: ``align | attack | evaluate | run | report | ls | export | data | judge``.

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
    "report": "booster report runs/quickstart",
    "ls": "booster ls runs/quickstart",
    "archive": "booster archive runs/quickstart results/quickstart",
    "export": "booster export runs/quickstart out/smollm2-booster --method booster --merged",
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
    from booster.stages.attack import run_attack

    sweep, grid = _cells(args)
    for cell in grid:
        for ratio in cell.config.attack.poison_ratios:
            result = run_attack(cell.config, cell.method, cell.seed, ratio, progress=not args.no_progress)
            state = "reused" if result.reused else f"done in {result.info['seconds']:.0f}s"
            log.info(f"attack {cell.tag()} p={ratio:g}: {state} -> {result.path / 'model'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate aligned (and, if present, attacked) models of the config's cells; their entries
    are added to (or replace theirs in) the run's results.json, so `booster report` works after
    align / attack / evaluate run one by one."""
    from booster.evaluation.alpaca_eval import pending_note
    from booster.pipeline import evaluation_entry, summary
    from booster.report.cells import is_broken
    from booster.runs import update_results
    from booster.stages.align import align_dir
    from booster.stages.attack import attack_dir
    from booster.stages.evaluate import run_evaluate
    from booster.stages.probe import run_probe
    from booster.storage import read_done

    sweep, grid = _cells(args)
    root = Path(sweep.base.output_dir)
    entries, broken = [], []
    for cell in grid:
        config, method, seed = cell.config, cell.method, cell.seed
        stages = [("aligned", None, align_dir(config, method, seed, root))]
        stages += [
            (f"p={r:g}", r, attack_dir(config, method, seed, r, root)) for r in config.attack.poison_ratios
        ]
        for label, ratio, stage in stages:
            done = read_done(stage)
            if done is None:
                continue
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
    from booster.report import write_report

    root = Path(args.run_dir)
    if args.config:
        from booster.config import load_sweep
        from booster.pipeline import gather_results

        if not root.is_dir():
            raise UserError(f"{root}: no such run folder; pass the output_dir the config was run into")
        sweep = load_sweep(args.config, args.overrides)
        sweep.base.output_dir = str(root)
        results, found, total = gather_results(sweep, root)
        print(f"gathered {found} of the grid's {total} models (finished stages only) into {results}")
        path = root / "report.md"
    elif not (root / "results.json").is_file():
        raise UserError(
            f"{root}: no results.json here; pass the output_dir of a finished `booster run`, or add "
            "--config (the run's config) to gather the stages finished so far"
        )
    else:
        path = write_report(root)
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

    done = archive_run(args.run_dir, args.dest)
    line = f"archived {done.stages} finished stages and {done.evaluations} evaluations of {args.run_dir} into {done.path}"
    if done.without_verdicts:
        line += f" ({done.without_verdicts} evaluations had no generations file, so no per-prompt verdicts)"
    print(line)
    print(f"its report: booster report {done.path} --config CONFIG")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from booster.export import check_hub_login, export_model, push_to_hub

    if args.push_to_hub:
        check_hub_login(args.push_to_hub)
    export = export_model(
        args.run_dir, args.out, args.method, args.seed, args.stage, args.poison_ratio, args.merged
    )
    print(f"exported {args.method} seed {args.seed} {export.stage.kind} ({export.format}) -> {export.path}")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(export.path, args.push_to_hub, private=args.private)}")
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


def cmd_judge_validate(args: argparse.Namespace) -> int:
    from booster.evaluation.judges import get_judge
    from booster.evaluation.validate import validate_judge

    options = {"model": args.model} if args.model else {}
    report = validate_judge(get_judge(args.judge, **options))
    for key, value in report.items():
        print(f"{key:>28}: {value:.3f}" if isinstance(value, float) else f"{key:>28}: {value}")
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

    p = sub.add_parser("attack", help="fine-tune the aligned models on task data with a poison ratio p")
    _add_config_args(p)
    p.add_argument("--method", help="attack only this method's aligned model")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("evaluate", help="harmful score and fine-tune accuracy of finished stages")
    _add_config_args(p)
    p.add_argument("--method", help="evaluate only this method")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("run", help="align -> evaluate -> attack -> evaluate for every cell, then report")
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

    p = sub.add_parser("report", help="rebuild report.md and plots from a run folder's results.json")
    p.add_argument("run_dir")
    p.add_argument(
        "--config",
        help="the run's config: first gather every finished stage of its grid into results.json, "
        "training nothing (a grid still running reports what it has so far)",
    )
    _add_set_arg(p, help="override a key of --config, as for `booster run`")
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
        "--push-to-hub", metavar="REPO", help="then upload the folder to this hub model repository"
    )
    p.add_argument("--private", action="store_true", help="create the hub repository as private")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("data", help="the embedded benchmark data")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    info = data_sub.add_parser("info", help="size, source and license of every embedded split")
    info.set_defaults(func=cmd_data_info)

    p = sub.add_parser("judge", help="harm judges")
    judge_sub = p.add_subparsers(dest="judge_command", required=True)
    val = judge_sub.add_parser(
        "validate", help="accuracy, AUC and refusal false-positive rate on held-out labels"
    )
    val.add_argument("--judge", default="embedded", help="judge name (embedded, keyword, beaver-dam)")
    val.add_argument("--model", help="model for judges that load one (beaver-dam: hub id or folder)")
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
