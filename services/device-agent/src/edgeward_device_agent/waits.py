"""Waiting on several things at once."""

from __future__ import annotations

import asyncio


async def wait_any(*events: asyncio.Event, seconds: float | None = None) -> None:
    """Return when any of ``events`` is set, or after ``seconds``."""
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
