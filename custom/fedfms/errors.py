"""Errors that name the file at fault, so a user can find and fix it."""

from __future__ import annotations

import os


class DataError(ValueError):
    """A input file that cannot be used, with the path and what is wrong with it."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
