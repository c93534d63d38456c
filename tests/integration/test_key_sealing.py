"""Device keys sealed by real swtpm TPMs (marker ``tpm``): seal/unseal, the PolicyPCR
digest against the TPM's own, a tampered boot and a cloned state directory refused with
their reasons, the file format's checks, migrating a plain key, and a scan showing that no
file of an enrolled device's state directory holds a usable private key.

One fleet per module: a golden device, another golden device (the clone's TPM) and a device
booted into the tampered chain, each with SHA-1 and SHA-256 banks.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RC, TPM2_SE
from tpm2_pytss.types import TPM2B_DIGEST, TPM2B_SENSITIVE_CREATE, TPMT_SYM_DEF

from edgeward_device_agent.config import AgentConfig
from edgeward_device_agent.device_keys import SealedKeyStore, SealPolicy
from edgeward_device_agent.state import AgentState
from edgeward_device_agent.tpm import (
    PcrBank,
    Tpm,
    TpmError,
    _selection,
    _split_sealed,
    _srk_template,
    pcr_policy_digest,
    sealed_policy,
)
from edgeward_device_sim.swtpm import (
    GOLDEN_BOOT_CHAIN,
    SwtpmDevice,
    SwtpmFleet,
    expected_pcrs,
    tampered_boot_chain,
)
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.errors import ConfigError
from edgeward_shared.identity import Identity
from edgeward_shared.pki.certs import new_key
from edgeward_shared.pki.store import PkiStore, write_private_key

pytestmark = pytest.mark.tpm

BOOT = tuple(range(8))
SECRET = bytes(range(32))


@dataclasses.dataclass
class Fleet:
    swtpms: SwtpmFleet
    golden: SwtpmDevice
    other: SwtpmDevice
    tampered: SwtpmDevice


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("sealing") / "fleet"
    with SwtpmFleet(root, pcr_banks=(PcrBank.SHA1, PcrBank.SHA256)) as swtpms:
        golden, other = swtpms.start_many(["dev-golden", "dev-other"])
        tampered = swtpms.start("dev-tampered", tampered_boot_chain())
        yield Fleet(swtpms, golden, other, tampered)


@pytest.fixture
def tpm(fleet: Fleet) -> Iterator[Tpm]:
    with fleet.golden.open() as opened:
        yield opened


def _refusal(tpm: Tpm, blob: bytes, pcrs: tuple[int, ...] = BOOT) -> str:
    with pytest.raises(TpmError) as info:
        tpm.unseal(blob, pcrs)
    return info.value.reason


# ------------------------------------------------------------------ the TPM layer
def test_a_sealed_secret_comes_back_on_the_same_tpm_and_boot(tpm: Tpm) -> None:
    blob = tpm.seal(SECRET, BOOT)
    assert SECRET not in blob
    assert tpm.unseal(blob, BOOT) == SECRET
    sha1 = tpm.seal(b"k" * 128, [0, 4, 7], PcrBank.SHA1)
    assert tpm.unseal(sha1, [0, 4, 7], PcrBank.SHA1) == b"k" * 128
    with pytest.raises(ValueError, match="1 to 128"):
        tpm.seal(b"k" * 129, BOOT)
    with pytest.raises(ValueError, match="at least one PCR"):
        tpm.seal(SECRET, [])


def test_the_policy_is_policy_pcr_over_the_boot_values_as_the_tpm_computes_it(
    tpm: Tpm, fleet: Fleet
) -> None:
    """Our by-hand digest (Part 3, 23.7) equals what a trial session computes, for the
    golden boot's values: the blob's authPolicy names exactly the golden chain."""
    blob = tpm.seal(SECRET, BOOT)
    golden = expected_pcrs(GOLDEN_BOOT_CHAIN)
    assert sealed_policy(blob) == pcr_policy_digest(PcrBank.SHA256, golden)
    esapi = ESAPI(fleet.golden.tcti)
    try:
        trial = esapi.start_auth_session(
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.TRIAL,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA256,
        )
        esapi.policy_pcr(trial, TPM2B_DIGEST(), _selection(PcrBank.SHA256, BOOT))
        assert bytes(esapi.policy_get_digest(trial)) == sealed_policy(blob)
        esapi.flush_context(trial)
    finally:
        esapi.close()
    public, _ = _split_sealed(blob)
    assert not public.publicArea.objectAttributes & 0x40  # userWithAuth clear


def test_the_empty_password_cannot_unseal_only_the_policy_can(tpm: Tpm, fleet: Fleet) -> None:
    public, private = _split_sealed(tpm.seal(SECRET, BOOT))
    esapi = ESAPI(fleet.golden.tcti)
    try:
        srk, *_ = esapi.create_primary(TPM2B_SENSITIVE_CREATE(), _srk_template(), ESYS_TR.OWNER)
        item = esapi.load(srk, private, public)
        with pytest.raises(TSS2_Exception) as info:
            esapi.unseal(item)  # a password session, the empty password
        assert info.value.error == TPM2_RC.AUTH_UNAVAILABLE
        esapi.flush_context(item)
        esapi.flush_context(srk)
    finally:
        esapi.close()


def test_a_boot_pcr_extended_after_sealing_refuses_the_unseal(fleet: Fleet) -> None:
    with fleet.tampered.open() as tpm:
        blob = tpm.seal(SECRET, BOOT)
        assert tpm.unseal(blob, BOOT) == SECRET
        tpm.extend_pcr(7, {PcrBank.SHA256: b"\x66" * 32, PcrBank.SHA1: b"\x66" * 20})
        assert _refusal(tpm, blob) == "tpm.unseal.policy_failed"
        # a selection other than the sealed one does not open it either
        assert _refusal(tpm, blob, (0, 1, 2, 3)) == "tpm.unseal.policy_failed"


def test_a_blob_sealed_to_the_golden_boot_does_not_open_on_a_tampered_boot(
    tpm: Tpm, fleet: Fleet
) -> None:
    """Values are named, not read: a blob sealed by the tampered device to the golden values
    (what a legitimate firmware update would prepare) does not open while it runs the
    tampered chain."""
    with fleet.tampered.open() as tampered:
        blob = tampered.seal(SECRET, BOOT, values=expected_pcrs(GOLDEN_BOOT_CHAIN))
        assert _refusal(tampered, blob) == "tpm.unseal.policy_failed"


def test_a_blob_does_not_load_on_another_tpm(tpm: Tpm, fleet: Fleet) -> None:
    blob = tpm.seal(SECRET, BOOT)
    with fleet.other.open() as other:  # same golden boot, another TPM
        assert other.read_pcrs(BOOT) == tpm.read_pcrs(BOOT)
        assert _refusal(other, blob) == "tpm.unseal.wrong_tpm"
    flipped = bytearray(blob)
    flipped[-5] ^= 1  # the private part altered
    assert _refusal(tpm, bytes(flipped)) == "tpm.unseal.wrong_tpm"
    with pytest.raises(ValueError, match="malformed"):
        tpm.unseal(blob[:-1], BOOT)


# ------------------------------------------------------------------ the key store
def test_a_store_keeps_the_key_sealed_and_a_renewal_seals_to_the_same_values(
    fleet: Fleet, tmp_path: Path
) -> None:
    with fleet.swtpms.device("dev-renewing") as device, device.open() as tpm:
        _renew(tpm, tmp_path)


def _renew(tpm: Tpm, tmp_path: Path) -> None:
    store = SealedKeyStore(tmp_path / "key.sealed", tpm)
    key = store.create()
    document = json.loads(store.path.read_bytes())
    assert document["v"] == 1
    assert document["pcrs"] == {
        str(i): v.hex() for i, v in expected_pcrs(GOLDEN_BOOT_CHAIN).items()
    }
    fresh = SealedKeyStore(store.path, tpm)
    assert fresh.load().private_numbers() == key.private_numbers()

    # a pending renewal key: sealed to the values the current key is sealed to, even if a
    # PCR moved since (a run-time extend must not become part of the next seal)
    pending = store.sibling(tmp_path / "renewal.sealed")
    tpm.extend_pcr(0, {PcrBank.SHA256: b"\x01" * 32, PcrBank.SHA1: b"\x01" * 20})
    renewed = pending.create()
    assert json.loads(pending.path.read_bytes())["pcrs"] == document["pcrs"]
    store.replace(renewed)
    pending.remove()
    assert not pending.exists()
    assert json.loads(store.path.read_bytes())["pcrs"] == document["pcrs"]
    with pytest.raises(ConfigError) as info:
        SealedKeyStore(store.path, tpm).load()  # PCR 0 moved: it does not open now
    assert info.value.reason == "tpm.unseal.policy_failed"
    assert "PCRs [0]" in info.value.detail


def test_edited_pcr_values_in_the_file_are_refused(tpm: Tpm, tmp_path: Path) -> None:
    store = SealedKeyStore(tmp_path / "key.sealed", tpm, SealPolicy((1, 2)))
    store.create()
    document = json.loads(store.path.read_bytes())
    document["pcrs"]["1"] = "00" * 32
    store.path.write_text(json.dumps(document))
    for broken in (json.dumps(document).encode(), b"{", b'{"v": 2}'):
        store.path.write_bytes(broken)
        with pytest.raises(ConfigError) as info:
            SealedKeyStore(store.path, tpm).load()
        assert info.value.reason == "agent.key.sealed_malformed"


def test_a_plain_key_of_an_older_agent_is_sealed_then_shredded(tpm: Tpm, tmp_path: Path) -> None:
    plain = tmp_path / "key.pem"
    key = new_key()
    write_private_key(plain, key)
    store = SealedKeyStore(tmp_path / "key.sealed", tpm, SealPolicy((1, 2, 3)))
    assert store.adopt_plain(plain)
    assert not plain.exists()
    assert not list(tmp_path.glob("*.tmp"))
    assert SealedKeyStore(store.path, tpm, SealPolicy((1, 2, 3))).load().private_numbers() == (
        key.private_numbers()
    )
    assert not store.adopt_plain(plain)


def test_a_changed_selection_takes_effect_once_the_key_opened(tpm: Tpm, tmp_path: Path) -> None:
    path = tmp_path / "key.sealed"
    key = SealedKeyStore(path, tpm, SealPolicy((1, 2))).create()
    moved = SealedKeyStore(path, tpm, SealPolicy((0, 5), PcrBank.SHA1))
    assert moved.load().private_numbers() == key.private_numbers()
    document = json.loads(path.read_bytes())
    assert (sorted(document["pcrs"]), document["bank"]) == (["0", "5"], "sha1")
    reopened = SealedKeyStore(path, tpm, SealPolicy((0, 5), PcrBank.SHA1)).load()  # unsealed
    assert reopened.private_numbers() == key.private_numbers()


def test_a_plain_key_replaces_an_unreadable_sealed_file(tpm: Tpm, tmp_path: Path) -> None:
    (tmp_path / "key.sealed").write_bytes(b"garbage")
    plain = tmp_path / "key.pem"
    key = new_key()
    write_private_key(plain, key)
    store = SealedKeyStore(tmp_path / "key.sealed", tpm, SealPolicy((1,)))
    assert store.adopt_plain(plain)
    reopened = SealedKeyStore(store.path, tpm, SealPolicy((1,))).load()
    assert reopened.private_numbers() == key.private_numbers()


def test_policy_refuses_resettable_pcrs_and_the_model_pcr(tmp_path: Path) -> None:
    for pcrs, message in (((), "at least one"), ((7, 4), "ascending"), ((16,), "reset")):
        with pytest.raises(ValueError, match=message):
            SealPolicy(pcrs)
    with pytest.raises(ValueError, match="PCR 14"):
        AgentConfig(
            device_id="dev-x",
            device_class="camera",
            tcti="swtpm:port=1",
            state_dir=tmp_path,
            ca_bundle=tmp_path,
            crl=tmp_path,
            broker=BrokerAddress("127.0.0.1", 1),
            seal=SealPolicy((7, 14)),
        )
    assert SealPolicy.parse("0,2,4,7", "sha1") == SealPolicy((0, 2, 4, 7), PcrBank.SHA1)


# ------------------------------------------------------------------ the state directory
def _usable_private_keys(root: Path) -> list[Path]:
    found = []
    for path in (p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for load in (serialization.load_pem_private_key, serialization.load_der_private_key):
            try:
                load(data, None)
            except (ValueError, TypeError):
                continue
            found.append(path)
    return found


def test_a_state_directory_holds_no_usable_private_key_and_a_copy_opens_nowhere_else(
    tpm: Tpm, fleet: Fleet, tmp_path: Path
) -> None:
    pki = PkiStore(tmp_path / "pki")
    now = datetime.now(UTC)
    pki.init(now)
    enrollee = pki.issue(Identity.enrollee("dev-scan"), now, timedelta(hours=1))
    state = AgentState(tmp_path / "state", "dev-scan")
    state.install_enrollee(enrollee)
    assert _usable_private_keys(state.root) == [state.enrollee.key]  # as provisioned
    state.unlock(tpm)
    key = state.device_key()
    assert _usable_private_keys(state.root) == []
    assert sorted(p.name for p in state.root.rglob("*.sealed")) == ["key.sealed", "key.sealed"]

    clone = tmp_path / "clone"
    shutil.copytree(state.root, clone)
    with fleet.other.open() as other:
        copied = AgentState(clone, "dev-scan")
        copied.unlock(other)
        with pytest.raises(ConfigError) as info:
            copied.device_key()
    assert info.value.reason == "tpm.unseal.wrong_tpm"
    assert "another TPM" in info.value.detail
    assert state.device_key() is key  # the original is untouched
