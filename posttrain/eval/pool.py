"""A small process pool with a hard timeout per item.

math-verify's own timeouts use signals, which only work in a main thread; a pathological
expression can also hang inside C code. Here each item runs in a worker process, and a worker
that overruns its item's deadline is killed and replaced; the item is reported as timed out.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from multiprocessing.connection import wait


def _worker_loop(conn, function):
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

    def __init__(self, function, workers: int, timeout: float, on_timeout: dict):
        self.function, self.timeout, self.on_timeout = function, timeout, on_timeout
        self.context = mp.get_context("spawn")  # no inherited threads, CUDA or model state
        self.workers = [self._start() for _ in range(max(1, workers))]

    def _start(self):
        parent, child = self.context.Pipe()
        process = self.context.Process(target=_worker_loop, args=(child, self.function), daemon=True)
        process.start()
        return {"process": process, "conn": parent, "job": None, "started": 0.0}

    def map(self, items: list) -> list:
        results = [None] * len(items)
        pending = list(enumerate(items))[::-1]
        busy = []
        while pending or busy:
            for worker in self.workers:
                if worker["job"] is None and pending:
                    worker["job"] = pending.pop()
                    worker["started"] = time.monotonic()
                    worker["conn"].send(worker["job"])
                    busy.append(worker)
            now = time.monotonic()
            nearest = min(w["started"] + self.timeout for w in busy) - now
            ready = wait([w["conn"] for w in busy], timeout=max(0.0, nearest))
            for worker in list(busy):
                if worker["conn"] in ready:
                    try:
                        index, result = worker["conn"].recv()
                    except EOFError:  # the worker died (e.g. out of memory)
                        index, result = worker["job"][0], {"error": "grader process died"}
                        self._replace(worker)
                    results[index] = result
                elif time.monotonic() - worker["started"] > self.timeout:
                    results[worker["job"][0]] = dict(self.on_timeout)
                    self._replace(worker)
                else:
                    continue
                worker["job"] = None
                busy.remove(worker)
        return results

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
