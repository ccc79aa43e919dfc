"""The one exception type for user mistakes: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """A mistake the user can fix (bad file, key, value); the message names it and says how."""
