"""CPU threads for training and evaluation: torch's intra-op pool gets the cores this process may
run on, its inter-op pool one thread.

torch sizes its intra-op pool from the machine's cores, not from the CPUs a scheduler gave the job
(``taskset``, a SLURM allocation, a container's cpuset): on a shared node it may start more threads
than it has cores, and threads that wait on each other slow every op. The inter-op pool only runs
independent ops side by side, which a model's sequential layers never have, so a second pool of
threads only competes with the first. Neither setting changes the arithmetic (a test trains the same
adapter, sha256 for sha256, with and without it). ``OMP_NUM_THREADS``, when set, is the user's or
the launcher's choice (``torchrun`` sets 1 per process) and is kept.
"""

from __future__ import annotations

import contextlib
import os

import torch


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask), or the machine's count where there is none."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return max(os.cpu_count() or 1, 1)


def configure_threads() -> tuple[int, int]:
    """Intra-op threads = usable cores (never more than torch's own default, which counts physical
    cores), inter-op threads = 1, unless ``OMP_NUM_THREADS`` is set. Returns (intra, inter)."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(min(torch.get_num_threads(), usable_cores()))
        # once inter-op work has run in this process its pool is fixed, and stays as it is
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
    return torch.get_num_threads(), torch.get_num_interop_threads()
