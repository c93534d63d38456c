"""The images' hash-locked requirements (deploy/images/requirements) are uv.lock's: a lock
change without `scripts/containers.sh requirements` fails here, not in an image build."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_requirements_match_the_lock(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    for name in ("pyproject.toml", "uv.lock"):
        shutil.copy2(ROOT / name, copy / name if copy.exists() else _mk(copy) / name)
    for member in ("shared", "cli", "services"):
        shutil.copytree(ROOT / member, copy / member, ignore=shutil.ignore_patterns("*.pyc"))
    (copy / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "containers.sh", copy / "scripts" / "containers.sh")
    subprocess.run([str(copy / "scripts" / "containers.sh"), "requirements"], check=True)
    committed = ROOT / "deploy" / "images" / "requirements"
    fresh = copy / "deploy" / "images" / "requirements"
    assert sorted(p.name for p in fresh.iterdir()) == sorted(p.name for p in committed.iterdir())
    for path in committed.iterdir():
        assert (fresh / path.name).read_text() == path.read_text(), path.name
    assert "--hash=sha256:" in (committed / "shared.txt").read_text()


def _mk(path: Path) -> Path:
    path.mkdir()
    return path
