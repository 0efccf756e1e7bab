"""The one exception type that means "the user asked for something we cannot do".

The CLI catches it and prints its message as a single line (no traceback) with exit code 2.
Everything else is a bug in posttrain and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in a recipe, an override, a path or a flag: print one line and exit 2."""
