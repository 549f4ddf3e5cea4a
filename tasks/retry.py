"""Which failures a task retries: transient network and process trouble, never bad data or bad config.

Retried: TimeoutError, ConnectionError (refused, reset, aborted), aiohttp client errors other than HTTP
4xx answers (fsspec's HTTP reads), and a worker pool that died under a shard (BrokenProcessPool, img2dataset).
Not retried: a missing file or column (SourceError, FileNotFoundError), a bad config, a stage's own bug.
"""

from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool
from typing import Any

import aiohttp


def is_transient(error: BaseException) -> bool:
    if isinstance(error, aiohttp.ClientResponseError):
        return error.status >= 500 or error.status == 429
    return isinstance(error, TimeoutError | ConnectionError | aiohttp.ClientError | BrokenProcessPool)


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry_condition_fn: retry only when the failure is transient."""
    try:
        state.result()
    except Exception as error:  # the task's own exception, re-raised by result()
        return is_transient(error)
    return False
