"""The agent's side of paged syncs (docs/protocol.md §5.7): it asks for every page in turn,
and only once it has seen them all does it unload a model no page offered; pages that go
backwards, or never end, are refused and unload nothing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from tests.unit.test_device_inference import _loaded

from edgeward_device_agent.model_manager import ModelManager, ModelPolicy
from edgeward_device_agent.model_store import ModelStore
from edgeward_shared.errors import MessageError
from edgeward_shared.messages.model import MAX_SYNC_PAGES, SyncReply, SyncRequest
from edgeward_shared.testing import EPOCH_MS, FixedClock

pytestmark = pytest.mark.asyncio


class Pages:
    """A runtime whose sync replies follow ``nexts`` (one reply per request, no documents)."""

    def __init__(self, nexts: list[int | None]) -> None:
        self.nexts = nexts
        self.offsets: list[int] = []

    async def request(self, topic: str, message: Any, timeout_s: float) -> Any:
        del topic, timeout_s
        assert isinstance(message, SyncRequest)
        self.offsets.append(message.offset)
        following = self.nexts[min(len(self.offsets), len(self.nexts)) - 1]
        return SimpleNamespace(
            message=SyncReply(in_reply_to="ab" * 16, releases=[], next=following)
        )


def _manager(tmp: Path) -> ModelManager:
    models = ModelManager(
        "dev-0001",
        ModelStore(tmp),
        trust=lambda: None,  # type: ignore[arg-type,return-value]  # no document to check
        clock=FixedClock(EPOCH_MS),
        tpm=None,  # type: ignore[arg-type]
        attestation=lambda: None,
        device_key=lambda: None,  # type: ignore[arg-type,return-value]
        policy=ModelPolicy(sync_interval_s=60, attestation_wait_s=30),
    )
    models.loaded["gone"] = replace(_loaded(), name="gone", session=None)
    return models


async def test_every_page_is_asked_for_before_anything_is_unloaded(tmp_path: Path) -> None:
    models = _manager(tmp_path)
    pages = Pages([5, 9, None])
    await models.sync(pages)  # type: ignore[arg-type]
    assert pages.offsets == [0, 5, 9]
    assert "gone" not in models.loaded  # offered on no page


@pytest.mark.parametrize("nexts", [[5, 3, None], [5, 5]])
async def test_pages_that_go_backwards_unload_nothing(
    tmp_path: Path, nexts: list[int | None]
) -> None:
    models = _manager(tmp_path)
    with pytest.raises(MessageError):
        await models.sync(Pages(nexts))  # type: ignore[arg-type]
    assert "gone" in models.loaded


async def test_pages_that_never_end_unload_nothing(tmp_path: Path) -> None:
    models = _manager(tmp_path)
    pages = Pages([*range(1, MAX_SYNC_PAGES + 5)])
    with pytest.raises(MessageError):
        await models.sync(pages)  # type: ignore[arg-type]
    assert len(pages.offsets) == MAX_SYNC_PAGES
    assert "gone" in models.loaded
