"""What every image promises (deploy/images/Containerfile, docs/adr/0030), checked on the
built images from the attacker's side: no shell or package tool anywhere in the file
system (a foothold gets no interpreter but Python, no way to install one), a non-root user,
a bounded size, and an entry point that starts on a read-only root without capabilities.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from typing import Any

import docker
import pytest
from tests.containers.engine import HARDENED, IMAGE_UID, build_images

pytestmark = pytest.mark.containers

#: image -> size budget (MB); the services carry numpy and onnx through edgeward-shared
BUDGET_MB = {
    "broker": 25,
    "attestation": 220,
    "identity": 220,
    "models": 220,
    "revocation": 220,
    "gateway": 230,
    "telemetry": 220,
}
#: names no image may contain, anywhere
FORBIDDEN = {
    "sh", "bash", "dash", "rbash", "ash", "zsh", "busybox", "toybox", "su", "sudo",
    "apt", "apt-get", "dpkg", "pip", "pip3", "curl", "wget", "perl",
}  # fmt: skip


@pytest.fixture(scope="module")
def client() -> Iterator[docker.DockerClient]:
    build_images(*BUDGET_MB)
    engine = docker.from_env()
    yield engine
    engine.close()


def _files(client: docker.DockerClient, image: str) -> list[str]:
    container = client.containers.create(f"edgeward/{image}")
    try:
        stream = b"".join(container.export())
    finally:
        container.remove(force=True)

    with tarfile.open(fileobj=io.BytesIO(stream)) as archive:
        return archive.getnames()


@pytest.mark.parametrize("image", sorted(BUDGET_MB))
def test_no_shell_no_package_tool_non_root_and_small(
    client: docker.DockerClient, image: str
) -> None:
    names = _files(client, image)
    assert any(name.endswith(("python3.11", "mosquitto")) for name in names)  # a real listing
    found = sorted(n for n in names if n.rsplit("/", 1)[-1] in FORBIDDEN)
    assert found == []
    assert not [n for n in names if "/var/lib/dpkg" in n or "/etc/apt" in n]
    attrs: dict[str, Any] = client.images.get(f"edgeward/{image}").attrs
    assert attrs["Config"]["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert attrs["Size"] / 1e6 < BUDGET_MB[image]


@pytest.mark.parametrize("image", sorted(set(BUDGET_MB) - {"broker"}))
def test_the_service_starts_on_a_read_only_root_without_capabilities(
    client: docker.DockerClient, image: str
) -> None:
    output = client.containers.run(f"edgeward/{image}", ["--help"], remove=True, **HARDENED)
    assert b"Usage:" in output


def test_no_shell_to_run_even_when_asked(client: docker.DockerClient) -> None:
    container = client.containers.create(
        "edgeward/attestation", ["-c", "id"], entrypoint="/bin/sh", **HARDENED
    )
    try:
        with pytest.raises(docker.errors.APIError, match="sh"):
            container.start()
    finally:
        container.remove(force=True)
