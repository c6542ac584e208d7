"""The one exception type the CLI turns into a clean message and exit code 2."""


class TetherError(Exception):
    """A user mistake or an unmet precondition; the message is one sentence that names the fix."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (200 characters at most), or its class name
    when it has none: enough to name a failure in a one-line report."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else exc.__class__.__name__)[:200]
