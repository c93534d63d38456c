"""Group commit: results that arrive while a commit runs go into the next one together.

SQLite fsyncs every commit (``synchronous=FULL``); one transaction per result would cap
the gateway at the disk's fsync rate. :meth:`ResultWriter.submit` queues one item and
waits; whichever submitter finds no commit running drives the queue, one transaction per
batch, until it is empty. No background task: nothing to start or stop.
"""

from __future__ import annotations

import asyncio
from typing import Final

from edgeward_inference_gateway.store import Commit, Committed, GatewayStore
from edgeward_shared.errors import TransportError

MAX_BATCH: Final = 200  # x 12 parameters: far below SQLite's 32766 per statement


class ResultWriter:
    def __init__(self, store: GatewayStore, max_batch: int = MAX_BATCH) -> None:
        self._store = store
        self._max_batch = max_batch
        self._queue: list[tuple[Commit, asyncio.Future[Committed]]] = []
        self._driving = False
        self.batches = 0

    async def submit(self, item: Commit) -> Committed:
        future: asyncio.Future[Committed] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if not self._driving:
            try:
                await self._drive()
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved: the cancellation is what propagates
                raise
        return await future

    async def _drive(self) -> None:
        self._driving = True
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                try:
                    done = await self._store.commit([item for item, _ in batch])
                except asyncio.CancelledError:
                    _fail(batch, TransportError("storage.busy", "commit cancelled"))
                    raise
                except Exception as exc:  # noqa: BLE001 - handed to every waiter of the batch
                    _fail(batch, exc)
                    continue
                self.batches += 1
                for (_, future), result in zip(batch, done, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._driving = False
            # cancelled while others waited: they must not wait forever
            _fail(self._queue, TransportError("storage.busy", "commit abandoned"))
            self._queue.clear()


def _fail(batch: list[tuple[Commit, asyncio.Future[Committed]]], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)
