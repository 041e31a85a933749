"""User-facing errors.

Anything a user can fix (a bad recipe, a missing file, an incompatible model) raises
`MoemergeError`; the CLI prints its message on one line and exits with status 2, no traceback.
"""


class MoemergeError(Exception):
    """An error whose message tells the user what is wrong and how to fix it."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty.

    Libraries raise multi-line messages (tracebacks of remote errors, HTTP bodies); our errors are one line,
    so they quote only this.
    """
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class PeerWaitError(MoemergeError):
    """A process of a multi-process run gave up waiting for another one.

    Printed by every process (the one that waited is not the one that usually speaks), and the process then
    leaves at once: after a timed-out gloo collective, an ordinary interpreter exit aborts (SIGABRT, core).
    """
