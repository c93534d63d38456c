"""Fixtures shared by every test tier."""

from __future__ import annotations

import pytest

from edgeward_shared.identity import Identity, ServiceName
from edgeward_shared.testing import FixedClock, MemoryPki

pytest_plugins = ["tests.model_fixtures"]


@pytest.fixture(scope="session")
def memory_pki() -> MemoryPki:
    return MemoryPki()


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock()


DEVICE_A = Identity.device("dev-a")
DEVICE_B = Identity.device("dev-b")
TELEMETRY = Identity.service(ServiceName.TELEMETRY)
ATTESTATION = Identity.service(ServiceName.ATTESTATION)
ALICE = Identity.operator("alice")
