"""The one exception curate.py raises for bad input, a bad recipe or bad options; the CLI prints
it as one `error: ...` line and exits 2, so it names the file, field or value and the fix."""

from __future__ import annotations

from pretrain.errors import DataError


class CurateError(DataError):
    """A problem with the inputs, the recipe or the options, stated as one line."""
