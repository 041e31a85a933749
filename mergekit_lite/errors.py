"""User-facing errors.

Anything a user can fix (a bad recipe, a missing file, an incompatible model) raises
`MoemergeError`; the CLI prints its message on one line and exits with status 2, no traceback.
"""


class MoemergeError(Exception):
    """An error whose message tells the user what is wrong and how to fix it."""
