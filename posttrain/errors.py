"""The one exception type that means "the user asked for something we cannot do".

A `UserError` is raised where the mistake is found, with what is known there: the recipe `key`
it is about (dotted, e.g. "prompts.answer_field") and, where the code knows it, the `file`. The
CLI fills in the recipe file it was given (`in_recipe`) and prints the error once, as one line
with exit code 2. Everything else is a bug in posttrain and keeps its traceback.

Formatting (`str(err)`):
  key set         "<file>: key '<key>' <message>"  ("<file>: key '<key>': …" when the message
                  starts with ':', ',' or ';'; the file defaults to "recipe")
  recipe=True     "<file>: <message>"   (about the recipe as a whole: a refused run, a stop)
  otherwise       the message alone     (a path, a flag, a folder)
"""

from __future__ import annotations

from contextlib import contextmanager


class UserError(Exception):
    """A mistake in a recipe, an override, a path or a flag: print one line and exit 2."""

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None, recipe: bool = False):
        super().__init__(message)
        self.message, self.key, self.file = message, key, file
        self.recipe = recipe or key is not None

    def __str__(self) -> str:
        if not self.recipe:
            return f"{self.file}: {self.message}" if self.file else self.message
        where = self.file or "recipe"
        if self.key is None:
            return f"{where}: {self.message}"
        separator = "" if self.message[:1] in (":", ",", ";") else " "
        return f"{where}: key '{self.key}'{separator}{self.message}"


@contextmanager
def in_recipe(path):
    """Errors about a recipe raised inside (by the loader, the data, the loop) name `path`
    unless they already name their file: the CLI wraps each command that runs a recipe."""
    try:
        yield
    except UserError as err:
        if err.recipe and err.file is None:
            err.file = str(path)
        raise
