"""The container engine of the ``containers`` tests: ``scripts/containers.sh`` prepares it
(podman's Docker API when no Docker engine answers, docs/adr/0030) and builds the images
(cached by the hash of their inputs, so a second run costs nothing).

Nothing here skips: a machine that cannot run containers fails these tests, loudly.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]
SCRIPT: Final = ROOT / "scripts" / "containers.sh"
#: the user every Edgeward image runs as (deploy/images/Containerfile)
IMAGE_UID: Final = 65532
#: what every Edgeward container gets: read-only root, no capabilities, no new privileges
HARDENED: Final = {
    "read_only": True,
    "cap_drop": ["ALL"],
    "security_opt": ["no-new-privileges"],
}


@functools.cache
def prepare_engine() -> None:
    """Set up the engine (idempotent) and export what its clients need into this process:
    ``DOCKER_HOST`` (podman's socket) and ``TESTCONTAINERS_RYUK_DISABLED``."""
    subprocess.run([str(SCRIPT), "setup"], check=True)
    exports = subprocess.run(
        [str(SCRIPT), "env"], check=True, capture_output=True, text=True
    ).stdout
    for line in exports.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        os.environ.setdefault(name, value)


def build_images(*names: str) -> None:
    """``make images`` for ``names`` (instant when their inputs did not change)."""
    prepare_engine()
    subprocess.run([str(SCRIPT), "images", *names], check=True)


def engine() -> str:
    return subprocess.run(
        [str(SCRIPT), "engine"], check=True, capture_output=True, text=True
    ).stdout.strip()


def hand_over(paths: Iterable[Path]) -> str:
    """The ``uid:gid`` a container runs as to use ``paths`` (keys are 0600): as root, the
    files are given to the images' user; otherwise the container runs as this user."""
    if os.geteuid() != 0:
        return f"{os.getuid()}:{os.getgid()}"
    for top in paths:
        for directory, _, files in os.walk(top):
            os.chown(directory, IMAGE_UID, IMAGE_UID)
            for name in files:
                os.chown(Path(directory) / name, IMAGE_UID, IMAGE_UID)
    return f"{IMAGE_UID}:{IMAGE_UID}"
