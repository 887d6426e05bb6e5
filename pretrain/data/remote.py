"""Remote shards (URL, `pipe:`): the retry policy of every remote read, and the start-up
check that an http(s) source's shards exist: one HEAD request per shard, several at once,
each bounded in time and retried like reads, before any training step.

A `pipe:` command cannot be checked without running it (no command is known that only
tests existence), so its shards are found missing when read; docs/failures.md says so.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from pretrain.errors import DataError

# Remote reads (URL, `pipe:`) are retried: READ_ATTEMPTS tries, waiting RETRY_BASE_S, then
# twice as long each time (capped at RETRY_MAX_S), before the failure becomes a DataError.
READ_ATTEMPTS = 4
RETRY_BASE_S = 2.0
RETRY_MAX_S = 30.0
MISSING = -1  # the size of a shard that is not there (start-up check)

HEAD_TIMEOUT_S = 10.0  # one request; retried READ_ATTEMPTS times with the reads' backoff
PARALLEL_REQUESTS = 16


def wait_before_retry(url: str, verb: str, attempt: int, attempts: int, reason: str) -> None:
    """After failed attempt `attempt` at a remote object: log it and wait with exponential
    backoff, unless it was the last."""
    if attempt < attempts:
        delay = min(RETRY_BASE_S * 2 ** (attempt - 1), RETRY_MAX_S)
        print(f"warning: data: {verb} {url} failed ({reason[:200]}); attempt {attempt + 1} "
              f"of {attempts} in {delay:g} s", file=sys.stderr, flush=True)
        time.sleep(delay)


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _head(url: str) -> int | None:
    """The object's size (None: the server does not say), MISSING on 404/410; raises
    DataError for an answer that will not change (403, ...), or after the retries."""
    attempts = READ_ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=HEAD_TIMEOUT_S) as response:
                length = response.headers.get("Content-Length", "")
                return int(length) if length.isdigit() else None
        except urllib.error.HTTPError as err:
            if err.code in (404, 410):
                return MISSING
            if err.code in (405, 501):  # no HEAD on this server: the read will tell
                return None
            reason = f"HTTP {err.code} {err.reason}"
            if err.code < 500 and err.code not in (408, 429):  # asking again will not help
                raise DataError(f"{url}: {reason} at start-up; check the URL and the "
                                f"server's permissions") from None
        except (urllib.error.URLError, OSError) as err:  # refused, reset, timed out
            reason = str(getattr(err, "reason", err)) or type(err).__name__
        wait_before_retry(url, "checking", attempt, attempts, reason)
    raise DataError(f"{url}: no answer to a HEAD request after {attempts} attempt(s) "
                    f"({reason[:300]}); check the server")


def shard_sizes(urls: list[str]) -> list[int | None]:
    """Each URL's size (None: unknown, MISSING: not there), in order."""
    with ThreadPoolExecutor(max_workers=max(1, min(PARALLEL_REQUESTS, len(urls)))) as pool:
        return list(pool.map(_head, urls))
