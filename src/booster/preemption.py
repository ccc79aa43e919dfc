"""An orderly stop on the signals a cluster sends before it takes the machine back.

SLURM and Kubernetes stop a job with SIGTERM and kill it with SIGKILL after a grace period; SLURM
can also send SIGUSR1 ahead of time (``--signal=B:USR1@120``). While a stage trains, such a signal
only sets a flag: the Trainer finishes the optimizer step it is in, saves a checkpoint at that step
and stops, and the stage raises :class:`Preempted` naming the checkpoint, so nothing is marked done
and the next run resumes from it exactly as from a periodic checkpoint. Outside training (loading,
evaluating) the signal raises :class:`Preempted` at once: finished stages are kept, and an
unfinished evaluation is simply done again.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: the signals that ask for an orderly stop.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
#: the exit status of a run stopped on request with its work saved ("try again later", sysexits.h).
EXIT_PREEMPTED = 75

Handler = Callable[[int, Any], None] | int | None


class Preempted(Exception):
    """The run stopped on SIGTERM or SIGUSR1; ``saved`` names the checkpoint written, if any."""

    def __init__(self, signal_name: str, saved: str | None = None) -> None:
        self.signal_name = signal_name
        self.saved = saved
        where = f"saved {saved}; " if saved else "finished stages are kept; "
        super().__init__(f"stopped by {signal_name}: {where}rerun the same command to resume")


def _raise_preempted(signum: int, frame: Any) -> None:
    raise Preempted(signal.Signals(signum).name)


@contextmanager
def stop_signal_handlers(handler: Handler) -> Iterator[None]:
    """Route the stop signals to ``handler`` inside the block (main thread only: elsewhere Python
    cannot set handlers, and the signals keep their current meaning)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def stop_on_signals() -> Any:
    """For a whole command: a stop signal raises :class:`Preempted` where the program is, the way
    Ctrl-C raises ``KeyboardInterrupt``."""
    return stop_signal_handlers(_raise_preempted)
