"""The exception types the command line turns into a one-line message instead of a traceback."""


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; raised before another checkpoint is written."""
