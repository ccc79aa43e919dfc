"""Evaluations in the experiment trackers: each new evaluation's harmful score, HS+, refusal and
degenerate rates, fine-tune accuracy (and an attack's harmful-loss probe summary) go to the
``report_to`` trackers of the stage that trained the model, under the stage's run name and at its
last step, so that a dashboard shows what the training did to safety next to its loss.

The Trainer is gone by the time a model is evaluated, so the trackers' own transformers callbacks
are driven directly (one ``on_log``, then ``on_train_end`` to flush and close). They log under
``eval/`` (``eval/harmful_score``), beside the training's ``train/`` values.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from booster.errors import warn
from booster.passthrough import TENSORBOARD_DIR, tracked_run_name

#: what an evaluation file holds that a tracker shows (percentages).
EVALUATION_KEYS = (
    "harmful_score",
    "harmful_score_plus",
    "refusal_rate",
    "degenerate_rate",
    "finetune_accuracy",
)

#: the harmful-loss probe's summary an attack's done.json holds (booster.evaluation.probe).
PROBE_KEYS = ("probe_loss_start", "probe_loss_end", "probe_loss_drop", "probe_grad_norm_start")


def evaluation_logs(metrics: dict[str, Any], done: dict[str, Any]) -> dict[str, float]:
    """The values to log, named ``eval_<key>`` (transformers files them under ``eval/``): the
    evaluation's rates that were measured (a pending FA is left out) and the probe's summary."""
    found = {key: metrics.get(key) for key in EVALUATION_KEYS}
    found.update({key: done.get(key) for key in PROBE_KEYS})
    return {f"eval_{key}": float(value) for key, value in found.items() if _is_number(value)}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def log_evaluation(section: Any, stage: Path, done: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    """Log an evaluation to the trackers of ``section`` (the stage's ``align`` or ``attack``
    settings); returns the trackers it reached. A tracker that fails (no network, a closed
    service) is one warning: the evaluation is already saved, and the report has it."""
    trackers = [t for t in section.report_to if t != "none"]
    logs = evaluation_logs(metrics, done)
    if not trackers or not logs:
        return []
    from transformers import TrainerControl, TrainerState, TrainingArguments  # heavy: trackers only
    from transformers.integrations import get_reporting_integration_callbacks  # heavy: trackers only

    checkpoints = Path(stage) / "checkpoints"
    args = TrainingArguments(
        output_dir=str(checkpoints),
        report_to=trackers,
        run_name=tracked_run_name(section.run_name, checkpoints),
        use_cpu=True,  # no device is used: the arguments only name the run
    )
    state = TrainerState(global_step=int(done.get("steps") or 0))
    control = TrainerControl()
    reached = []
    for callback_class in get_reporting_integration_callbacks(args.report_to):
        name = callback_class.__name__.removesuffix("Callback")
        try:
            callback = callback_class()
            if name == "TensorBoard" and not os.environ.get("TENSORBOARD_LOGGING_DIR"):
                callback.logging_dir = str(Path(stage) / TENSORBOARD_DIR)  # beside the training's logs
            callback.on_log(args, state, control, logs=dict(logs))
            callback.on_train_end(args, state, control)
        except Exception as err:  # noqa: BLE001 - any tracker's failure is only a warning
            warn(f"{stage}: the evaluation is saved, but {name} did not take it: {str(err).splitlines()[0]}")
            continue
        reached.append(name)
    return reached
