"""A small process pool with a hard timeout per item.

math-verify's own timeouts use signals, which only work in a main thread; a pathological
expression can also hang inside C code. Here each item runs in a worker process, and a worker
that overruns its item's deadline is killed and replaced; the item is reported as timed out.

A worker that dies (killed, out of memory) shows up as EOFError or ConnectionResetError on its
pipe, depending on when it died. Its item is retried once on a fresh worker, then reported as
failed. Workers that keep dying without finishing anything (a broken environment) stop the
pool with one clear error instead of marking every item wrong.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from multiprocessing.connection import wait

from posttrain.errors import UserError

TRIES_PER_ITEM = 2


def _worker_loop(conn, function, warm_up=None):
    if warm_up is not None:  # before the first item, while the parent is busy elsewhere
        try:
            warm_up()
        except Exception:  # the first item reports whatever is broken
            pass
    while True:
        message = conn.recv()
        if message is None:
            return
        index, item = message
        try:
            result = function(item)
        except Exception as err:  # report, keep serving
            result = {"error": f"{type(err).__name__}: {err}"}
        conn.send((index, result))


class TimeoutPool:
    """`map(items)` → results in order; an item that takes longer than `timeout` seconds yields
    `on_timeout` and its worker is restarted."""

    def __init__(self, function, workers: int, timeout: float, on_timeout: dict, warm_up=None):
        """`warm_up`: a module-level function each worker calls once when it starts (imports)."""
        self.function, self.timeout, self.on_timeout, self.warm_up = function, timeout, on_timeout, warm_up
        self.context = mp.get_context("spawn")  # no inherited threads, CUDA or model state
        self.workers = [self._start() for _ in range(max(1, workers))]
        self.deaths_in_a_row = 0  # worker deaths since the last item that finished

    def _start(self):
        parent, child = self.context.Pipe()
        process = self.context.Process(target=_worker_loop, args=(child, self.function, self.warm_up), daemon=True)
        process.start()
        return {"process": process, "conn": parent, "job": None, "started": 0.0}

    def map(self, items: list) -> list:
        results = [None] * len(items)
        tries = [0] * len(items)
        pending = list(enumerate(items))[::-1]
        busy = []
        while pending or busy:
            for worker in self.workers:
                if worker["job"] is None and pending:
                    worker["job"] = pending.pop()
                    tries[worker["job"][0]] += 1
                    worker["started"] = time.monotonic()
                    busy.append(worker)
                    try:
                        worker["conn"].send(worker["job"])
                    except OSError:  # already dead: wait() reports its pipe ready and recv fails below
                        pass
            nearest = min(w["started"] + self.timeout for w in busy) - time.monotonic()
            ready = wait([w["conn"] for w in busy], timeout=max(0.0, nearest))
            for worker in list(busy):
                index = worker["job"][0]
                if worker["conn"] in ready:
                    try:
                        _, results[index] = worker["conn"].recv()
                        self.deaths_in_a_row = 0
                    except (EOFError, OSError):  # died: EOF, or ConnectionResetError if it died early
                        self._died(worker)
                        if tries[index] < TRIES_PER_ITEM:
                            pending.append(worker["job"])
                        else:
                            results[index] = {**self.on_timeout, "error": "grader process died"}
                elif time.monotonic() - worker["started"] > self.timeout:
                    results[index] = dict(self.on_timeout)
                    self._replace(worker)
                else:
                    continue
                worker["job"] = None
                busy.remove(worker)
        return results

    def _died(self, worker):
        self.deaths_in_a_row += 1
        if self.deaths_in_a_row > TRIES_PER_ITEM * len(self.workers) + 2:
            self.close()
            raise UserError(f"grading processes keep dying ({self.deaths_in_a_row} in a row, none finished an item); "
                            "check memory limits and that the posttrain package imports in a fresh interpreter")
        self._replace(worker)

    def _replace(self, worker):
        worker["process"].kill()
        worker["process"].join()
        fresh = self._start()
        worker.update(process=fresh["process"], conn=fresh["conn"])

    def close(self):
        for worker in self.workers:
            try:
                worker["conn"].send(None)
            except (BrokenPipeError, OSError):
                pass
            worker["process"].join(timeout=2)
            if worker["process"].is_alive():
                worker["process"].kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
