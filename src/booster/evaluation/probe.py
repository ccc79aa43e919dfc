"""The harmful-loss probe: the mechanism Booster claims, measured directly during the attack.

Booster's claim is not only a lower harmful score at the end: it is that the user's harmful
fine-tuning lowers the harmful loss more slowly on a Booster-aligned model. The probe measures
exactly that, on held-out harmful pairs that no stage trains on (the ``probe`` split): their mean
per-token loss at the start of the attack (step 0, the aligned model) and every few steps after,
plus the norm of its gradient at the start (how steep the harmful loss is where the attack begins).

Far less noisy than a harmful score: it needs no generation and no judge, and every probe pair
contributes a real-valued loss instead of a 0/1 verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from booster.methods.booster import global_norm
from booster.methods.losses import count_scored_tokens, token_loss_sum

#: how many probe points a run gets when no interval is set (plus step 0 and the last step): the
#: report reads the start and the drop (start - last), the points between only draw the curve, and
#: each costs a pass over the probe pairs (docs/performance.md).
DEFAULT_POINTS = 4


def probe_interval(max_steps: int, every: int | None) -> int:
    """Steps between probe points: ``every`` when set, else about ``DEFAULT_POINTS`` per run."""
    if every is not None:
        return max(int(every), 1)
    return max(max_steps // DEFAULT_POINTS, 1)


def harmful_loss(
    model: Any, batches: Sequence[dict[str, torch.Tensor]], context: Any, with_grad: bool = False
) -> tuple[float, float | None]:
    """Mean per-token loss over ``batches`` and, with ``with_grad``, the norm of its gradient over
    the trainable parameters. The model's weights and train/eval mode are left as they were."""
    params = [p for p in model.parameters() if p.requires_grad]
    tokens = max(sum(count_scored_tokens(b["labels"]) for b in batches), 1)
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), dtype=torch.float64)
        grads: list[torch.Tensor] | None = None
        for batch in batches:
            with torch.set_grad_enabled(with_grad), context():
                loss = token_loss_sum(model, batch) / tokens
            if with_grad:
                parts = torch.autograd.grad(loss, params, allow_unused=True)
                parts = [
                    torch.zeros_like(p) if g is None else g.float()
                    for g, p in zip(parts, params, strict=True)
                ]
                grads = parts if grads is None else [a.add_(b) for a, b in zip(grads, parts, strict=True)]
            total += float(loss.detach())
    finally:
        model.train(was_training)
    norm = float(global_norm(grads)) if grads else None
    return float(total), norm


class HarmfulLossProbe(TrainerCallback):
    """Logs ``probe_loss`` at step 0 and every ``every`` optimizer steps (and at the last step), and
    ``probe_grad_norm`` at step 0, into the trainer's log (so into ``metrics.jsonl`` and the
    checkpoints' log history, which a resumed run keeps).

    It runs forward passes only (and one backward at step 0), in eval mode, with no random numbers
    drawn, so the training itself is unchanged. The passes run under the trainer's autocast, so in
    bfloat16 when the stage trains in bf16. ``group_by_length`` batches the pairs sorted by length
    (less padding; the mean is the same up to float rounding).
    """

    def __init__(
        self, trainer: Any, dataset: Any, batch_size: int, every: int | None, group_by_length: bool = False
    ) -> None:
        self.trainer = trainer
        collate = trainer.data_collator
        rows = list(dataset)
        if group_by_length:
            rows.sort(key=lambda row: -len(row["input_ids"]))  # stable: ties keep the data's order
        self.cpu_batches = [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
        self.every = every

    def _measure(self, step: int, with_grad: bool) -> None:
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        batches = [trainer._prepare_inputs(b) for b in self.cpu_batches]
        loss, norm = harmful_loss(model, batches, trainer.compute_loss_context_manager, with_grad)
        logs = {"probe_loss": round(loss, 6)}
        if norm is not None:
            logs["probe_grad_norm"] = round(norm, 6)
        trainer.state.log_history.append({**logs, "step": step})
        # The handler's on_log clears should_log; this step's own training log must still happen.
        should_log = trainer.control.should_log
        trainer.control = trainer.callback_handler.on_log(trainer.args, trainer.state, trainer.control, logs)
        trainer.control.should_log = should_log

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.global_step == 0:
            self._measure(0, with_grad=True)
        return control

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        every = probe_interval(state.max_steps, self.every)
        if state.global_step % every == 0 or state.global_step == state.max_steps:
            self._measure(state.global_step, with_grad=False)
        return control


def probe_summary(log_history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The probe curve of a finished run and its start, end and drop (start - end), or None."""
    points = sorted({e["step"]: e for e in log_history if "probe_loss" in e}.items())
    if not points:
        return None
    curve = [[step, e["probe_loss"]] for step, e in points]
    start, end = curve[0][1], curve[-1][1]
    grad_norm = points[0][1].get("probe_grad_norm")
    return {
        "probe_curve": curve,
        "probe_loss_start": start,
        "probe_loss_end": end,
        "probe_loss_drop": round(start - end, 6),
        "probe_grad_norm_start": grad_norm,
    }
