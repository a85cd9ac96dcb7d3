"""Where per-layer work runs: on this machine's cores (`--jobs` threads) or on a Dask cluster's worker
processes (`--cluster ADDRESS`): rtn's clipping searches and crq's reconstructions, one layer a task.

Every task is a pure function of its arguments, so the answers, and the file, are the same wherever the
work ran. On one machine, threads: numpy releases the GIL in the loops that cost (the clipping search,
matrix products), so threads keep every core busy without copying a weight into another process. A
cluster gets whole layers (`task_map`), a bounded number at a time.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from threadpoolctl import threadpool_limits

from onnxtq.errors import UsageError

#: glibc's mallopt parameter for the number of heaps (malloc.h).
_M_ARENA_MAX = -8
#: Bytes of working set that may run beside the largest item's (`layer_map`).
BESIDE_BYTES = 1 << 30
#: Seconds to wait for a Dask scheduler to answer.
CONNECT_SECONDS = 20

_settings = {"jobs": 0, "cluster": None}


def configure(jobs: int = 0, cluster: str | None = None) -> None:
    """Workers for what follows: `jobs` local workers (0: one per core), and a Dask scheduler's address."""
    if jobs < 0:
        raise UsageError(f"--jobs {jobs}: give a count of workers, or 0 for one per core")
    _settings.update(jobs=jobs, cluster=cluster)
    for address in [a for a in _clients if a != cluster]:  # a client left behind would try to reconnect
        _clients.pop(address).close()


def workers() -> int:
    """Local workers: --jobs, or the cores this process may run on."""
    return _settings["jobs"] or len(os.sched_getaffinity(0))


def one_heap() -> None:
    """Have every thread allocate from one glibc heap, as MALLOC_ARENA_MAX=1 would (a user's own setting wins).

    glibc gives a thread that allocates under contention a heap of its own and keeps what the thread frees there
    for it: with a layer on each core, auto on the 123M model peaked at 3.13 GB, and at 2.78 GB with one heap
    (the same file, 24 s more of 11 minutes). Elsewhere (musl, macOS, Windows) there is nothing to set."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 1)
    except (OSError, AttributeError, TypeError):
        pass


def thread_map(fn: Callable, items: Iterable) -> list:
    """[fn(item) for item in items], on the local workers' threads when there are several."""
    items = list(items)
    if workers() == 1 or len(items) < 2:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(workers(), len(items))) as pool:
        return list(pool.map(fn, items))


def layer_map(
    fn: Callable,
    items: Iterable,
    working_set: Callable[..., int] | None = None,
    answer_bytes: Callable[..., int] | None = None,
) -> Iterator:
    """fn(item) for each item, in order, the items spread over the local workers' threads, each with one BLAS
    thread: per-layer work that alternates compiled loops (one core) with small matrix products (which two
    BLAS threads barely speed up) keeps every core busy on its own layer.

    With `working_set` (the bytes an item's work holds), items run beside one another only while theirs add up
    to at most the largest one's and BESIDE_BYTES more: the peak is the largest layer's working set and a margin,
    whatever the count of workers. On the 1.3B model, whose LM head's tq curves hold 5 GB, an attention
    projection's (1.4 GB) and an MLP up-projection's (1.8 GB) run together (its first block's curves in 94 s;
    one such layer at a time, their times alone add up to 138 s). With `answer_bytes` (what an item's answer
    holds: answers that are whole layers, auto's emit), an answer counts against the budget until the caller
    takes it, so the workers run ahead of the caller as far as the budget allows, and no further."""
    items = list(items)
    if workers() == 1 or len(items) < 2:
        yield from map(fn, items)
        return
    threads = min(workers(), len(items))
    with threadpool_limits(1, "blas"):
        if working_set is None:
            with ThreadPoolExecutor(threads) as pool:
                yield from pool.map(fn, items)
        else:
            sizes = [working_set(item) for item in items]
            answers = None if answer_bytes is None else [answer_bytes(item) for item in items]
            yield from _within_budget(fn, items, sizes, answers, max(sizes) + BESIDE_BYTES, threads)


def _within_budget(
    fn: Callable, items: list, sizes: list[int], answer_sizes: list[int] | None, budget: int, threads: int
) -> Iterator:
    """layer_map's schedule: each worker takes the largest item waiting whose working set fits the budget beside
    what is held (the working sets running, and with `answer_sizes` the answers waiting for the caller; nothing
    held, anything fits), the first of equals; answers come back in order. With `answer_sizes` the caller's
    next item may always start, so a caller never waits on answers it has not taken (the budget is then passed
    by at most that item's). Largest first: a large layer left for last runs alone while the other workers
    wait (the 27M GPT's LM head, the last of its layers and the longest to make curves for)."""
    hold = answer_sizes is not None
    waiting, answers = list(range(len(items))), {}
    state = {"held": 0, "holders": 0, "error": None, "next": 0}
    turn = threading.Condition()

    def runnable() -> int | None:
        fits = budget - state["held"] if state["holders"] else math.inf
        k = max((k for k in waiting if sizes[k] <= fits), key=sizes.__getitem__, default=None)
        if k is None and hold and state["next"] in waiting:
            return state["next"]
        return k

    def work() -> None:
        while True:
            with turn:
                while waiting and not state["error"] and (k := runnable()) is None:
                    turn.wait()
                if not waiting or state["error"]:
                    return
                waiting.remove(k)
                state["held"] += sizes[k]
                state["holders"] += 1
            answer, error = None, None
            try:
                answer = fn(items[k])
            except BaseException as exc:  # noqa: BLE001 - raised to the caller
                error = exc
            with turn:
                answers[k] = answer
                state["error"] = state["error"] or error
                state["held"] += (answer_sizes[k] if hold else 0) - sizes[k]
                state["holders"] -= 0 if hold else 1
                turn.notify_all()

    pool = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()
    try:
        for k in range(len(items)):
            with turn:
                while k not in answers and not state["error"]:
                    turn.wait()
                if state["error"]:
                    raise state["error"]
                answer = answers.pop(k)
                if hold:
                    state["held"] -= answer_sizes[k]
                    state["holders"] -= 1
                state["next"] = k + 1
                turn.notify_all()
            yield answer
    finally:
        with turn:
            waiting.clear()  # a caller that stopped early: the workers finish what they hold and stop
            turn.notify_all()
        for thread in pool:
            thread.join()


def task_map(fn: Callable, items: Iterable, window: int = 0) -> Iterator:
    """fn(item) for each item, in order: on the Dask cluster when one is configured (at most `window` tasks
    out at a time, default twice its workers, so only their arguments are copied and alive at once), else
    here, one after the other, the next one running while the caller finishes this one (each task's numpy loops
    use the local threads). `fn` must be importable where the workers run."""
    if not _settings["cluster"]:
        yield from _one_ahead(fn, items)
        return
    client = _dask_client(_settings["cluster"])
    window = window or 2 * max(1, len(client.scheduler_info().get("workers", {})))
    pending: list = []
    for item in items:
        pending.append(client.submit(fn, item, pure=False))
        if len(pending) >= window:
            yield pending.pop(0).result()
    for future in pending:
        yield future.result()


def _one_ahead(fn: Callable, items: Iterable) -> Iterator:
    """fn(item) for each item, in order, the next item's call running on a thread while the caller works on this
    one's answer: what the caller does alone (writing a layer) no longer leaves the other cores idle. The items
    themselves are drawn here, on the caller's thread, one ahead."""
    if workers() == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(1) as pool:  # a caller that stops early: the pool finishes the call it holds
        ahead = None
        for item in items:
            running = pool.submit(fn, item)
            if ahead is not None:
                yield ahead.result()
            ahead = running
        if ahead is not None:
            yield ahead.result()


def tasks_of(items: Iterable, task: Callable, fn: Callable) -> Iterator[tuple]:
    """(item, fn(task(item))) for each item, in order, the calls made by `task_map`: on a cluster the next few
    items are read and sent while this one is finished here (only their arguments are alive at once)."""
    pending: deque = deque()

    def arguments():
        for item in items:
            pending.append(item)
            yield task(item)

    for answer in task_map(fn, arguments()):
        yield pending.popleft(), answer


_clients: dict = {}


def _dask_client(address: str):
    """One Dask client per scheduler address for the life of the process."""
    if address not in _clients:
        try:
            from distributed import Client
        except ImportError as exc:
            raise UsageError("--cluster needs Dask's distributed scheduler", "pip install 'onnxtq[cluster]'") from exc
        try:
            _clients[address] = Client(address, timeout=CONNECT_SECONDS)
        except OSError as exc:
            raise UsageError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc
    return _clients[address]
