"""What the user is told: the one exception type for their mistakes (the CLI prints its message as
one line and exits 2), and one-line warnings."""

import sys


class UserError(Exception):
    """A mistake the user can fix (bad file, key, value); the message names it and says how."""


def warn(message: str) -> None:
    """One warning line on stderr (stdout carries the run's log)."""
    print(f"booster: warning: {message}", file=sys.stderr, flush=True)
