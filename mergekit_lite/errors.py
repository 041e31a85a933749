"""User-facing errors.

Anything a user can fix (a bad recipe, a missing file, an incompatible model) raises
`MoemergeError`; the CLI prints its message on one line and exits with status 2, no traceback.
"""


class MoemergeError(Exception):
    """An error whose message tells the user what is wrong and how to fix it."""


class PeerWaitError(MoemergeError):
    """A process of a multi-process run gave up waiting for another one.

    Printed by every process (the one that waited is not the one that usually speaks), and the process then
    leaves at once: after a timed-out gloo collective, an ordinary interpreter exit aborts (SIGABRT, core).
    """
