"""The one exception type the CLI turns into a clean message and exit code 2."""


class TetherError(Exception):
    """A user mistake or an unmet precondition; the message is one sentence that names the fix."""
