"""Regenerate the TPM quote vectors in this directory (see README.md).

Run from the repository root: ``uv run python tests/vectors/tpm/make_vectors.py``. Needs
swtpm, swtpm-tools and tpm2-tools (5.4); starts two swtpm devices in a temporary directory
and stops them by PID. The quotes are ECDSA-signed (randomized) and the TPM clock moves, so
every run writes different bytes; the tests only rely on what vector.json states.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeward_device_agent.tpm import PcrBank
from edgeward_device_sim.swtpm import (
    GOLDEN_BOOT_CHAIN,
    SwtpmDevice,
    SwtpmFleet,
    expected_pcrs,
    tampered_boot_chain,
)
from edgeward_shared.bindings import qualifying_data
from edgeward_shared.testing import EPOCH_MS

HERE = Path(__file__).parent
SELECTION = list(range(8))
#: What every vector's challenge says: issued at EPOCH_MS, valid for 30 s.
EXPIRES_AT_MS = EPOCH_MS + 30_000


def _session_key() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write(
    name: str,
    made_by: str,
    ak_public: bytes,
    attest: bytes,
    signature: bytes,
    bank: PcrBank,
    pcrs: dict[int, bytes],
    nonce: bytes,
    session_key: bytes,
) -> None:
    out = HERE / name
    out.mkdir(exist_ok=True)
    (out / "ak.pub").write_bytes(ak_public)
    (out / "attest.bin").write_bytes(attest)
    (out / "signature.bin").write_bytes(signature)
    vector = {
        "made_by": made_by,
        "nonce": nonce.hex(),
        "session_key": session_key.hex(),
        "qualifying_data": qualifying_data(nonce, session_key).hex(),
        "expires_at_ms": EXPIRES_AT_MS,
        "verify_at_ms": EPOCH_MS + 1_000,
        "bank": bank.name.lower(),
        "selection": SELECTION,
        "pcrs": {str(i): pcrs[i].hex() for i in SELECTION},
        "golden_pcrs": {str(i): v.hex() for i, v in expected_pcrs(GOLDEN_BOOT_CHAIN).items()},
    }
    (out / "vector.json").write_text(json.dumps(vector, indent=2) + "\n")


def _pytss_vector(name: str, device: SwtpmDevice, bank: PcrBank) -> None:
    nonce, session_key = os.urandom(32), _session_key()
    with device.open() as tpm:
        quote = tpm.quote(qualifying_data(nonce, session_key), SELECTION, bank)
        made_by = f"tpm2-pytss 3.0.0 Tpm.quote on swtpm ({bank.name} bank)"
        _write(
            name,
            made_by,
            tpm.ak_public,
            quote.attest,
            quote.signature,
            bank,
            dict(quote.pcrs),
            nonce,
            session_key,
        )


def _tools_vector(device: SwtpmDevice, work: Path, alg: str = "ecc") -> None:
    """tpm2_createek + tpm2_createak (AK under the EK) + tpm2_quote, all tpm2-tools 5.4.

    ``alg`` "ecc": ECC EK, ECDSA-SHA256 P-256 AK (``tpm2-tools/``); "rsa": RSA-2048 EK,
    RSASSA-SHA256 RSA-2048 AK (``tpm2-tools-rsa/``).
    """
    env = {**os.environ, "TPM2TOOLS_TCTI": device.tcti}
    scheme = "ecdsa" if alg == "ecc" else "rsassa"
    name = "tpm2-tools" if alg == "ecc" else "tpm2-tools-rsa"
    nonce, session_key = os.urandom(32), _session_key()
    selection = "sha256:" + ",".join(map(str, SELECTION))

    def tool(*args: str) -> None:
        subprocess.run(args, env=env, cwd=work, check=True, capture_output=True)
        # no resource manager on a bare swtpm: flush what the tool left loaded
        subprocess.run(["tpm2_flushcontext", "-t"], env=env, check=True, capture_output=True)

    tool("tpm2_createek", "-c", "ek.ctx", "-G", alg, "-u", "ek.pub")
    tool(
        "tpm2_createak",
        "-C",
        "ek.ctx",
        "-c",
        "ak.ctx",
        "-G",
        alg,
        "-g",
        "sha256",
        "-s",
        scheme,
        "-u",
        "ak.pub",
        "-n",
        "ak.name",
    )
    tool(
        "tpm2_quote",
        "-c",
        "ak.ctx",
        "-l",
        selection,
        "-g",
        "sha256",
        "-q",
        qualifying_data(nonce, session_key).hex(),
        "-m",
        "quote.msg",
        "-s",
        "quote.sig",
        "-o",
        "pcrs.bin",
        "-F",
        "values",
    )
    values = (work / "pcrs.bin").read_bytes()
    pcrs = {i: values[32 * n : 32 * (n + 1)] for n, i in enumerate(SELECTION)}
    _write(
        name,
        f"tpm2-tools 5.4: tpm2_createak -G {alg} -s {scheme} (under tpm2_createek's "
        f"{alg.upper()} EK) + tpm2_quote -g sha256 -F values, on swtpm",
        (work / "ak.pub").read_bytes(),
        (work / "quote.msg").read_bytes(),
        (work / "quote.sig").read_bytes(),
        PcrBank.SHA256,
        pcrs,
        nonce,
        session_key,
    )


def main() -> None:
    with (
        tempfile.TemporaryDirectory() as tmp,
        SwtpmFleet(Path(tmp) / "fleet", pcr_banks=(PcrBank.SHA1, PcrBank.SHA256)) as fleet,
    ):
        golden = fleet.start("vector-golden")
        tampered = fleet.start("vector-tampered", tampered_boot_chain())
        _pytss_vector("pytss", golden, PcrBank.SHA256)
        _pytss_vector("pytss-sha1", golden, PcrBank.SHA1)
        _pytss_vector("pytss-tampered", tampered, PcrBank.SHA256)
        _tools_vector(golden, Path(tmp))
        _tools_vector(golden, Path(tmp), "rsa")
    print(f"vectors written under {HERE}")


if __name__ == "__main__":
    main()
