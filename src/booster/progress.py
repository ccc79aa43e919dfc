"""What a person sees while booster works: status lines, progress bars named by stage, the ETA.

Status lines go through the ``booster`` logger; the command line writes them with ``tqdm.write``
(:func:`setup_logging`), so they land above the progress bars instead of through them. Library
users see them only when they configure logging. Each training stage gets one bar named by what
it trains (``align booster seed 0``) and, while the bar shows, one short line per Trainer log step
(the full dict goes to the stage's ``metrics.jsonl``); transformers' own bar and raw-dict printer
are taken off. The pipeline's bar weighs each stage by its forward/backward passes (steps x the
method's passes per step, ``methods/registry.py``), so its ETA follows the work left, not the
number of models.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback

logger = logging.getLogger("booster")

#: Trainer log values shown on a stage's line, in this order (the rest: metrics.jsonl only).
SHOWN = {
    "loss": "loss",
    "harmful_loss_reduction": "h(w)-h(w')",
    "harmful_loss": "harmful loss",
    "retain_loss": "retain loss",
    "repnoise_mmd": "mmd",
    "lisa_proximal": "proximal",
    "probe_loss": "probe loss",
    "grad_norm": "grad norm",
    "learning_rate": "lr",
}


class _TqdmHandler(logging.Handler):
    """Writes a record above any open progress bar: info to stdout, warnings and errors to stderr
    (the streams are looked up at each record, so redirections and test captures see it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            tqdm.write(self.format(record), file=stream)
        except Exception:  # a closed stream must not stop a run
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
    """The ``booster`` logger at ``level``, written through tqdm (idempotent: one handler)."""
    for handler in list(logger.handlers):
        if isinstance(handler, _TqdmHandler):
            logger.removeHandler(handler)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)


def _value(value: float) -> str:
    return f"{value:.2e}" if value and abs(value) < 1e-3 else f"{value:.4g}"


def compact_line(label: str, step: int, max_steps: int, logs: dict[str, Any]) -> str | None:
    """``align booster seed 0 step 10/50: loss 2.31  h(w)-h(w') 0.012  lr 5.00e-04``; None for a
    log without any shown value (e.g. Trainer's end-of-training summary)."""
    parts = [
        f"{name} {_value(float(logs[key]))}"
        for key, name in SHOWN.items()
        if isinstance(logs.get(key), int | float) and not isinstance(logs.get(key), bool)
    ]
    if not parts:
        return None
    return f"{label} step {step}/{max_steps}: " + "  ".join(parts)


class StageProgress(TrainerCallback):
    """A stage's progress bar named by ``label`` and one short line per log step.

    The lines are info-level while the bar shows and debug-level without it (``--no-progress``
    keeps the output to one line per stage; ``metrics.jsonl`` has every value either way).
    """

    def __init__(self, label: str, show_bar: bool) -> None:
        self.label = label
        self.show_bar = show_bar
        self.bar: Any = None

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.is_world_process_zero and self.show_bar:
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,  # a resumed stage starts at its checkpoint
                desc=self.label,
                unit="step",
                dynamic_ncols=True,
                leave=False,
            )

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if not state.is_world_process_zero or not logs:
            return
        line = compact_line(self.label, state.global_step, state.max_steps, logs)
        if line is not None:
            logger.log(logging.INFO if self.show_bar else logging.DEBUG, line)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def use_stage_progress(trainer: Any, label: str, show_bar: bool) -> None:
    """Replace transformers' unnamed bar and raw-dict printer with :class:`StageProgress`."""
    from transformers import (
        trainer as trainer_module,  # heavy: loaded only where it is used, so light commands stay fast
    )
    from transformers.trainer_callback import (  # heavy: loaded only where it is used, so light commands stay fast
        PrinterCallback,
        ProgressCallback,
    )

    for cls in {PrinterCallback, ProgressCallback, trainer_module.DEFAULT_PROGRESS_CALLBACK}:
        trainer.remove_callback(cls)
    trainer.add_callback(StageProgress(label, show_bar))


# -- the pipeline's ETA ----------------------------------------------------------------------------


def advance(bar: Any, weight: int, reused: bool) -> None:
    """Count a finished stage: trained work moves the bar; a reused stage leaves the total instead,
    so the rate (and the ETA) measures only work done in this run."""
    if reused:
        bar.total = max(bar.total - weight, bar.n)
        bar.refresh()
    else:
        bar.update(weight)
