"""Streaming over a network that fails: retried with backoff at the exact row, counted, told once, bounded.

A run streams its data for hours, and connections drop, servers answer 5xx, reads stall. Three
layers retry, and this module decides how:

- huggingface_hub retries each HTTP request itself (up to 5 more tries over ~23 s, for a timeout,
  a refused or dropped connection, a 5xx). Kept: the same byte range is fetched again.
- ``datasets`` would retry a failed read 20 more times, 5 to 60 s apart, one warning each, then die
  with three chained tracebacks (~10 minutes, ~400 lines for an outage). Turned down to a single
  try (:func:`take_over_retries`), because:
- :class:`ResilientRows` owns the policy. When reading the next row fails for a network reason, it
  waits (1, 2, 4 ... 30 s), reopens the stream at the position of the last row it yielded (the
  ``datasets`` stream's own ``state_dict``) and goes on, so the rows are exactly those of a run
  without faults. After ``patience`` seconds without a row it raises :class:`DataUnavailable`, one
  line naming the host and the file; the training loop then saves its last complete step
  (``checkpoint.py``) and ``--ckpt_path last`` continues once the host is back.

Every retry, the hub client's and this module's, is counted per process (:data:`NETWORK`); dataloader
workers send their counts with each batch, and the data module logs the total as ``data/retries``.
The log gets one line per incident (a retry after a quiet minute), not one per retry.
"""

from __future__ import annotations

import copy
import logging
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from datasets import IterableDataset

from tiny_audio_pl.errors import DataUnavailable

QUIET_S = 60.0  # a retry this long after the previous one starts a new incident (and a new log line)
MAX_WAIT_S = 30.0  # the longest wait between two of this module's retries
_TRANSPORT_MODULES = ("httpx", "httpx2", "aiohttp", "urllib3", "requests")
T = TypeVar("T")


@dataclass
class Trouble:
    """What failed: the host, the file (repository path when it is a hub URL) and why."""

    host: str
    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.reason} from {self.host} ({self.file})" if self.host else self.reason

    def stopped(self, waited: float, patience: float) -> str:
        """The one line a run stops with."""
        return (f"the data host {self.host or '(unknown)'} did not answer for {waited:.0f} s (data.network_patience "
                f"{patience:g} s); last: {self.reason}, reading {self.file or 'the stream'}. When it is back, "
                "continue with --ckpt_path last")


def _hub_path(url: str) -> tuple[str, str]:
    """``(host, file)`` of a URL: a hub file (``.../{repo}/resolve/{revision}/{path}``) as ``repo/path``, a hub
    API call as ``repo (hub API: what)``."""
    parts = urlsplit(url)
    path = unquote(parts.path).lstrip("/")
    resolved = re.match(r"(?:datasets/)?(.+?)/resolve/[^/]+/(.+)", path)
    api = re.match(r"api/(?:models|datasets)/([^/]+/[^/]+)/?([^/]*)", path)
    if resolved:
        return parts.netloc, "/".join(resolved.groups())
    return parts.netloc, f"{api.group(1)} (hub API: {api.group(2) or 'info'})" if api else path


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _url_of(error: BaseException) -> str | None:
    for attribute in ("request", "response"):
        try:
            url = getattr(getattr(error, attribute, None), "url", None)
        except RuntimeError:  # httpx: the request of an error raised outside a request
            url = None
        if url:
            return str(url)
    found = re.search(r"https?://\S+", str(error))
    return found.group(0).rstrip("'\").,") if found else None


def network_trouble(error: BaseException) -> Trouble | None:
    """The network failure behind ``error`` (a refused, dropped or timed-out connection, a 5xx answer), or None.

    Anything else (a missing file, a corrupt shard, a bug) is not retried.
    """
    failure = None
    for link in _chain(error):
        status = getattr(getattr(link, "response", None), "status_code", None)
        module = type(link).__module__.split(".")[0]
        transport = module in _TRANSPORT_MODULES and "Status" not in type(link).__name__
        failed = isinstance(link, (ConnectionError, TimeoutError)) or (status or 0) >= 500 or status in (408, 429)
        if failed or transport:
            failure = failure or link
    if failure is None:
        return None
    url = next((u for u in map(_url_of, _chain(error)) if u), None) or NETWORK.last_url
    host, file = _hub_path(url) if url else ("", "")
    words = str(failure).strip().splitlines()
    reason = f"{type(failure).__name__}: {words[0][:120]}" if words else type(failure).__name__
    return Trouble(host, file, reason)


class NetworkLedger:
    """This process's retries: counted for ``data/retries``, one line on stderr per incident."""

    def __init__(self) -> None:
        self.pending = 0  # retries not yet reported with a batch
        self.last_retry = -float("inf")
        self.last_url: str | None = None  # the latest URL the hub client reported trouble with
        self.last_reason = "network error"  # and what went wrong
        self.reached = False  # whether a data host ever answered this process

    def retry(self, trouble: Trouble) -> None:
        now = time.monotonic()
        if now - self.last_retry > QUIET_S:
            print(f"data: {trouble}; retrying with backoff (each retry is counted in data/retries)",
                  file=sys.stderr, flush=True)
        self.pending += 1
        self.last_retry = now

    def drain(self) -> int:
        """Retries since the last call: what a batch reports to the main process."""
        count, self.pending = self.pending, 0
        return count

    def filter(self, record: logging.LogRecord) -> bool:
        """Count the hub client's retries from its warnings, and keep them off the log (one line per incident)."""
        message = record.getMessage()
        trouble = re.match(r"(.*) thrown while requesting \w+ (\S+)", message)
        if trouble:
            self.last_url, self.last_reason = trouble.group(2), trouble.group(1).strip("'")[:120]
        elif message.startswith(("Retrying in", "Rate limited")):
            host, file = _hub_path(self.last_url) if self.last_url else ("", "")
            self.retry(Trouble(host, file, self.last_reason))
        return not (trouble or message.startswith(("Retrying in", "Rate limited", "Got disconnected",
                                                   "Failed to connect")))


NETWORK = NetworkLedger()


def take_over_retries() -> None:
    """Turn ``datasets``' own read retries down to one try, and count the hub client's (idempotent, per process)."""
    from datasets import config

    config.STREAMING_READ_MAX_RETRIES = config.STREAMING_OPEN_MAX_RETRIES = 1
    config.STREAMING_READ_RETRY_INTERVAL = config.STREAMING_OPEN_RETRY_INTERVAL = 0
    config.STREAMING_READ_SERVER_UNAVAILABLE_RETRY_INTERVAL = config.STREAMING_READ_RATE_LIMIT_RETRY_INTERVAL = 0
    for name in ("huggingface_hub.utils._http", "datasets.utils.file_utils"):
        logger = logging.getLogger(name)
        if NETWORK.filter not in logger.filters:
            logger.addFilter(NETWORK.filter)


class Backoff:
    """Waits 1, 2, 4 ... 30 s between the tries of a read that fails for a network reason, for ``patience`` s."""

    def __init__(self, patience: float) -> None:
        self.patience = patience
        self.reset()

    def reset(self) -> None:
        """A read succeeded: the next failure starts a new wait."""
        self.since: float | None = None
        self.wait = 1.0

    def after(self, error: Exception) -> None:
        """Count ``error`` and wait before the next try; raise it if it is not a network failure, or
        :class:`DataUnavailable` once the failures have lasted ``patience`` seconds."""
        trouble = network_trouble(error)
        if trouble is None:
            raise error
        now = time.monotonic()
        self.since = self.since or now
        if now - self.since >= self.patience:
            raise DataUnavailable(trouble.stopped(now - self.since, self.patience)) from error
        NETWORK.retry(trouble)
        time.sleep(min(self.wait, self.patience - (now - self.since)))
        self.wait = min(2 * self.wait, MAX_WAIT_S)


def unresolved(error: BaseException) -> bool:
    """Whether ``error`` comes from a host name that did not resolve (no network, or a wrong ``HF_ENDPOINT``): in its
    chain, or in what the hub client last logged (``datasets`` raises its own error without the cause)."""
    words = re.compile(r"name resolution|Name or service not known|nodename nor servname")
    return (any(isinstance(link, socket.gaierror) or words.search(str(link)) for link in _chain(error))
            or bool(words.search(NETWORK.last_reason)))


def with_retries(call: Callable[[], T], patience: float) -> T:
    """``call()``, tried again with backoff while it fails for a network reason, for up to ``patience`` seconds.

    A host name that does not resolve before anything was ever read is not a passing fault (a machine without a
    network, a mistyped ``HF_ENDPOINT``): it stops at once instead of retrying for ``patience`` seconds.
    """
    take_over_retries()
    backoff = Backoff(patience)
    while True:
        try:
            result = call()
            NETWORK.reached = True
            return result
        except Exception as error:
            trouble = network_trouble(error)
            if trouble is not None and not NETWORK.reached and unresolved(error):
                raise DataUnavailable(f"cannot resolve the data host {trouble.host or '(unknown)'}: no network here? "
                                      "Set HF_HUB_OFFLINE=1 to read the hub cache (`tiny-audio download -c CONFIG` "
                                      "fills it where there is internet), or check HF_ENDPOINT") from error
            backoff.after(error)


class ResilientRows:
    """The rows of a ``datasets`` stream, read again from the last row yielded when the network fails.

    ``state_dict()`` is the stream's position after the last row yielded (what a window or a
    checkpoint starts from).
    """

    def __init__(self, source: IterableDataset, patience: float) -> None:
        self.source, self.patience = source, patience
        self.position: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any] | None:
        return self.position

    def __iter__(self) -> Iterator[dict[str, Any]]:
        take_over_retries()
        start = copy.deepcopy(self.source)  # where a failure before the first row starts again
        stream, rows = self.source, iter(self.source)
        backoff = Backoff(self.patience)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as error:
                backoff.after(error)
                stream = copy.deepcopy(start)
                if self.position is not None:
                    stream.load_state_dict(self.position)
                rows = iter(stream)
                continue
            backoff.reset()
            NETWORK.reached = True
            self.position = stream.state_dict()
            yield row
