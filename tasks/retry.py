"""Which failures a task retries: transient network and process trouble, never bad data or bad config.

Retried: TimeoutError, ConnectionError (refused, reset, aborted), aiohttp client errors other than HTTP
4xx answers (fsspec's HTTP reads), and a worker pool that died under a shard (BrokenProcessPool, img2dataset).
Not retried: a missing file or column (SourceError, FileNotFoundError), a bad config, a stage's own bug.
"""

from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool
from typing import Any

import aiohttp


class UnitsFailed(RuntimeError):
    """Units of one task's batch that failed, each with its error; the batch's other units committed (their
    summaries in `done`). Transient when any of the errors is: a retry reruns only the units without a marker."""

    def __init__(self, errors: dict[str, BaseException], done: list[Any]) -> None:
        self.errors, self.done = errors, done
        super().__init__("; ".join(f"{unit}: {message}" for unit, message in self.messages().items()))

    def messages(self) -> dict[str, str]:
        return {unit: f"{type(error).__name__}: {error}" for unit, error in self.errors.items()}


def is_transient(error: BaseException) -> bool:
    if isinstance(error, UnitsFailed):
        return any(is_transient(e) for e in error.errors.values())
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
