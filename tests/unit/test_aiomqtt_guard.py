"""The private aiomqtt hook (docs/adr/0003) is used only on an aiomqtt release it knows.

On any other release ``connect_mqtt`` refuses before opening a socket, with a
``ConfigError`` naming the version, instead of failing later like a network fault.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt
import paho.mqtt.client as mqtt
import pytest

from edgeward_shared.bus import mqtt as bus_mqtt
from edgeward_shared.bus.mqtt import (
    AIOMQTT_UNKNOWN,
    BrokerAddress,
    MqttSettings,
    check_aiomqtt,
    connect_mqtt,
    disconnected_of,
    paho_of,
)
from edgeward_shared.errors import ConfigError
from edgeward_shared.pki.store import IdentityFiles


def test_the_installed_aiomqtt_is_known() -> None:
    check_aiomqtt(aiomqtt.__version__)


@pytest.mark.parametrize("version", ["2.4.0", "2.5.1", "2.5.99"])
def test_known_releases_pass(version: str) -> None:
    check_aiomqtt(version)


@pytest.mark.parametrize("version", ["3.0.0", "2.6.0", "2.3.9", "1.2.3", "garbage"])
def test_unknown_release_is_refused_by_name(version: str) -> None:
    with pytest.raises(ConfigError) as refused:
        check_aiomqtt(version)
    assert refused.value.reason == AIOMQTT_UNKNOWN
    assert f"aiomqtt {version} " in refused.value.detail


@pytest.mark.asyncio
async def test_connect_refuses_an_unknown_aiomqtt_before_any_socket(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(bus_mqtt.aiomqtt, "__version__", "3.1.0")
    settings = MqttSettings(
        broker=BrokerAddress("127.0.0.1", 1),  # nothing listens: a socket would fail otherwise
        ca_bundle=tmp_path / "absent-ca.pem",
        identity=IdentityFiles(tmp_path / "absent"),
        client_id="device-x",
        tls=lambda: pytest.fail("TLS context built before the version check"),
    )
    with pytest.raises(ConfigError, match="aiomqtt 3.1.0"):
        async with connect_mqtt(settings):
            pytest.fail("connected on an unknown aiomqtt")


@pytest.mark.asyncio
async def test_private_attributes_are_found_on_the_installed_aiomqtt() -> None:
    client = aiomqtt.Client("127.0.0.1", 1)
    assert isinstance(paho_of(client), mqtt.Client)
    assert isinstance(disconnected_of(client), asyncio.Future)


@pytest.mark.asyncio
async def test_a_client_without_the_private_attributes_is_refused() -> None:
    client = aiomqtt.Client("127.0.0.1", 1)
    del client._client
    del client._disconnected
    with pytest.raises(ConfigError, match="_client"):
        paho_of(client)
    with pytest.raises(ConfigError, match="_disconnected"):
        disconnected_of(client)
