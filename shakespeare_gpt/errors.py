"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""
