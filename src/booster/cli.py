"""The ``booster`` command: ``align | attack | evaluate | run | report | data | judge``.

User mistakes (bad config, file, key or value) print one line naming the culprit and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from booster.errors import UserError

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


def _add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML config (see configs/)")
    parser.add_argument("--output-dir", help="override output_dir from the config")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, dotted, value parsed as YAML (e.g. --set align.lamb=10); repeatable",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _load(args: argparse.Namespace):
    """The config as a :class:`booster.config.Sweep` (a plain config is a sweep of one cell)."""
    from booster.config import load_sweep

    sweep = load_sweep(args.config, args.overrides)
    if args.output_dir:
        sweep.base.output_dir = args.output_dir
    return sweep


def _cells(args: argparse.Namespace):
    from booster.pipeline import cells

    sweep = _load(args)
    if args.method:
        from booster.methods.registry import METHODS

        if args.method not in METHODS:
            raise UserError(f"--method {args.method!r}: unknown method (known: {', '.join(METHODS)})")
    return sweep, cells(sweep, [args.method] if args.method else None)


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
        print(f"align {cell.tag()}: {state} -> {result.path / 'model'}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from booster.stages.attack import run_attack

    sweep, grid = _cells(args)
    for cell in grid:
        for ratio in cell.config.attack.poison_ratios:
            result = run_attack(cell.config, cell.method, cell.seed, ratio, progress=not args.no_progress)
            state = "reused" if result.reused else f"done in {result.info['seconds']:.0f}s"
            print(f"attack {cell.tag()} p={ratio:g}: {state} -> {result.path / 'model'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate aligned (and, if present, attacked) models of the config's cells."""
    from booster.evaluation.alpaca_eval import pending_note
    from booster.pipeline import summary
    from booster.stages.align import align_dir
    from booster.stages.attack import attack_dir
    from booster.stages.common import read_done
    from booster.stages.evaluate import run_evaluate

    sweep, grid = _cells(args)
    root = Path(sweep.base.output_dir)
    found = 0
    for cell in grid:
        config, method, seed = cell.config, cell.method, cell.seed
        stages = [("aligned", align_dir(config, method, seed, root))]
        stages += [
            (f"p={r:g}", attack_dir(config, method, seed, r, root)) for r in config.attack.poison_ratios
        ]
        for label, stage in stages:
            if read_done(stage) is None:
                continue
            found += 1
            metrics, _ = run_evaluate(config, stage, root, config.attack.task_data, not args.no_progress)
            print(f"evaluate {cell.tag()} {label}: {summary(metrics)}")
            if note := pending_note(metrics):
                print(note)
    if not found:
        raise UserError(
            f"no finished align/attack stage under {root}; run `booster align` (or `booster run`) first"
        )
    print(CONTENT_WARNING.format(path=root))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from booster.pipeline import parse_shard, run_pipeline

    shard = parse_shard(args.shard) if args.shard else None
    sweep = _load(args)
    if args.dry_run:
        from booster.dryrun import dry_run

        dry_run(sweep, progress=not args.no_progress)
        return 0
    path = run_pipeline(sweep, progress=not args.no_progress, shard=shard)
    print(CONTENT_WARNING.format(path=sweep.base.output_dir))
    print((path.parent / "report.md").read_text().split("## Every evaluated model")[0].rstrip())
    print(f"\nwrote {path}, {path.parent / 'report.md'} and plots")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from booster.report import write_report

    root = Path(args.run_dir)
    if not (root / "results.json").is_file():
        raise UserError(f"{root}: no results.json here; pass the output_dir of a finished `booster run`")
    path = write_report(root)
    print(path.read_text())
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
    parser = argparse.ArgumentParser(prog="booster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

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
        metavar="I/N",
        help="run only the cells whose index %% N is I, so N jobs (e.g. a SLURM array) share the grid "
        "and the output folder; a final run without --shard (or `booster report`) gathers them",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="rebuild report.md and plots from a run folder's results.json")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _quiet_libraries()
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"booster: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("booster: interrupted; finished stages are kept and the next run resumes", file=sys.stderr)
        return 130
    except FileNotFoundError as err:
        if err.filename and not Path(err.filename).exists():
            print(f"booster: error: {err.filename}: file not found", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
