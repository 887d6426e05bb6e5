"""The one exception type the shard tools raise for bad input or settings; the CLIs print it as
one `error: ...` line and exit 2, so it must name the file, field or value and the fix."""

from __future__ import annotations

from pretrain.errors import DataError


class ShardError(DataError):
    """A problem with the inputs, the tokenizer or the options, stated as one line."""
