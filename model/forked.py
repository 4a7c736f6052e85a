"""Running a job over numbered parts in forked worker processes (they inherit the caller's memory)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

_T = TypeVar("_T")


def map_in_order(job: Callable[[int], _T], count: int, workers: int) -> Iterator[_T]:
    """``job(index)`` for ``index`` in ``range(count)``, in order; in ``workers`` forked processes when there
    are several parts (the job reads what it needs from module state set before the call)."""
    if workers <= 1 or count <= 1:
        yield from (job(index) for index in range(count))
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(job, range(count))
