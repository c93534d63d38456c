"""The device agent's command line reaches the policies it names: parsed by click as an
operator's shell would give it, then turned into the agent's configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeward_device_agent.__main__ import agent_config, main
from edgeward_device_agent.sandbox.supervisor import SandboxPolicy
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.runtime.kit import NodeOptions


def _config(tmp_path: Path, *extra: str) -> SandboxPolicy | None:
    bundle = tmp_path / "ca-bundle.pem"
    bundle.write_text("")
    args = [
        *("--device-id", "edge-0001", "--device-class", "edge-gw"),
        *("--tcti", "swtpm:host=127.0.0.1,port=2321", "--state-dir", str(tmp_path)),
        *("--ca-bundle", str(bundle), "--crl", str(bundle), "--broker", "127.0.0.1:8883"),
        *extra,
    ]
    params = main.make_context("edgeward-agent", args).params
    node = NodeOptions(
        "device-agent", BrokerAddress("127.0.0.1", 8883), None, "info", bundle, bundle
    )
    return agent_config(node, **params).sandbox


def test_inference_threads_reach_the_sandbox_policy(tmp_path: Path) -> None:
    assert _config(tmp_path) == SandboxPolicy()  # one thread unless asked
    policy = _config(tmp_path, "--inference-threads", "2")
    assert policy is not None
    assert policy.threads == 2
    assert _config(tmp_path, "--no-sandbox", "--inference-threads", "2") is None


@pytest.mark.parametrize("value", ["-1", "65", "two"])
def test_inference_threads_out_of_range_are_a_usage_error(tmp_path: Path, value: str) -> None:
    result = CliRunner().invoke(main, ["--inference-threads", value])
    assert result.exit_code == 2
    assert "--inference-threads" in result.output
