"""Errors that name the file at fault, so a user can find and fix it."""

from __future__ import annotations

import os


class DataError(ValueError):
    """A input file that cannot be used, with the path and what is wrong with it."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class BundleInputError(SystemExit):
    """A bundle's input check failed: ``python -m monai.bundle run`` ends with one line, the error's message.

    MONAI evaluates every config item inside ``except Exception`` and re-raises a ``RuntimeError``
    ("Failed to evaluate ConfigExpression ...") from it, so an ordinary exception ends a 60-line
    traceback whose last line is the config expression, not the cause. A ``SystemExit`` is no
    ``Exception``: it passes MONAI's wrappers and ``fire``, and Python prints its message alone
    (exit status 1). Only the bundles' input checks (``initialize`` in their configs) raise it;
    :func:`fedfms.bundle.bundle_workflow` turns it back into the :class:`DataError` (``.error``)
    for code that builds workflows (federated clients, the experiment runner).
    """

    def __init__(self, error: ValueError) -> None:
        self.error = error
        super().__init__(f"error: {error}")
