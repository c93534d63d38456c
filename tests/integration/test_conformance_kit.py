"""The conformance kit's generator still works against the code and a real swtpm.

``tests/conformance/make_kit.py`` writes a whole fresh kit (new PKI, new TPM, new
signatures) into a temporary directory; every check ``tests/unit/test_conformance.py``
makes on the committed kit is then made on the fresh one. So when a message changes, the
kit can be regenerated, and what it regenerates passes.
"""

from __future__ import annotations

import inspect
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from tests.conformance import make_kit
from tests.unit import test_conformance

pytestmark = pytest.mark.tpm
COMMITTED = test_conformance.KIT


@pytest.fixture
def fresh_kit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    kit = tmp_path / "conformance"
    kit.mkdir()
    shutil.copy(test_conformance.KIT / "README.md", kit / "README.md")
    shutil.copy(test_conformance.KIT.parent / "protocol.md", tmp_path / "protocol.md")
    make_kit.main(kit)
    monkeypatch.setattr(test_conformance, "KIT", kit)
    monkeypatch.setattr(test_conformance, "EXAMPLES", sorted((kit / "messages").glob("*.json")))
    test_conformance.trust.cache_clear()
    yield test_conformance
    test_conformance.trust.cache_clear()


def test_a_regenerated_kit_passes_every_conformance_check(fresh_kit: ModuleType) -> None:
    committed = {p.name for p in (COMMITTED / "messages").glob("*.json")}
    assert {p.name for p in fresh_kit.EXAMPLES} == committed
    assert (fresh_kit.KIT / "pki" / "root.pem").read_bytes() != (
        COMMITTED / "pki" / "root.pem"
    ).read_bytes()  # a new PKI: nothing but the shape is shared with the committed kit
    for path in fresh_kit.EXAMPLES:
        fresh_kit.test_example_verifies_and_decodes_to_its_documented_values(path)
        fresh_kit.test_example_is_refused_elsewhere_and_later(path)
        fresh_kit.test_example_verifies_with_only_the_document_and_a_crypto_library(path)
    checks = [
        check
        for name, check in vars(fresh_kit).items()
        if name.startswith("test_") and not inspect.signature(check).parameters
    ]
    assert len(checks) >= 10
    for check in checks:
        check()
