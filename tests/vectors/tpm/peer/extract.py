"""Extract the peer quote vectors in this directory from other projects' checkouts (README.md).

Usage (from the repository root, with git checkouts of the projects at the commits the
README names)::

    uv run python tests/vectors/tpm/peer/extract.py \\
        --keylime ../keylime --keylime-commit <sha> \\
        --go-tpm-tools ../go-tpm-tools --go-tpm-tools-commit <sha> \\
        --vaportpm ../vaportpm --vaportpm-commit <sha> \\
        --cmc ../cmc --cmc-commit <sha>

Only data is taken: the keylime unit test's base64 literals (read with ``ast``, not run),
go-tpm-tools' recorded ``Attestation`` protobuf (decoded here by its wire format, so no
protobuf dependency), vaportpm's JSON fixtures, and the hex and PEM literals of cmc's Go
test (read with regular expressions, not compiled). The output is deterministic:
re-running writes the same bytes.
"""

from __future__ import annotations

import argparse
import ast
import base64
import json
import re
import struct
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

HERE = Path(__file__).parent
KEYLIME_TEST = "keylime/tpm/tpm_util_test.py"
GCE_ATTESTATION = "internal/test/attestations/gce-cos-85-nonce9009.pb"
HASH_NAMES = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512"}


def _write(name: str, meta: dict[str, object], ak: bytes, attest: bytes, signature: bytes) -> None:
    out = HERE / name
    out.mkdir(exist_ok=True)
    (out / "ak.bin").write_bytes(ak)
    (out / "attest.bin").write_bytes(attest)
    (out / "signature.bin").write_bytes(signature)
    (out / "vector.json").write_text(json.dumps(meta, indent=2) + "\n")


# ---------------------------------------------------------------------- keylime
def _literals(source: str, function: str) -> dict[str, object]:
    """Constant values assigned in ``function`` (strings, bytes, base64 decodes, bytes(...))."""
    tree = ast.parse(source)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    found: dict[str, object] = {}
    for statement in node.body:
        if not isinstance(statement, ast.Assign) or len(statement.targets) != 1:
            continue
        target, value = statement.targets[0], statement.value
        if not isinstance(target, ast.Name):
            continue
        if isinstance(value, ast.Constant):
            found[target.id] = value.value
        elif isinstance(value, ast.Call) and value.args:
            try:
                found[target.id] = ast.literal_eval(value.args[0])
            except ValueError:  # not a literal (bytearray(quoteblob) and the like)
                continue
    return found


def _tools_pcr_file(blob: bytes) -> tuple[int, dict[int, bytes]]:
    """tpm2-tools' "serialized" PCR file (x86-64 structs): one bank, its values in order."""
    (count,) = struct.unpack_from("<I", blob, 0)
    if count != 1:
        raise ValueError("one bank expected")
    bank, size, select = struct.unpack_from("<HB4s", blob, 4)
    indices = [i for i in range(8 * size) if select[i // 8] >> (i % 8) & 1]
    offset = 4 + 16 * 8
    (lists,) = struct.unpack_from("<I", blob, offset)
    offset += 4
    values: list[bytes] = []
    for _ in range(lists):
        (n,) = struct.unpack_from("<I", blob, offset)
        for k in range(n):
            length, buffer = struct.unpack_from("<H64s", blob, offset + 4 + 66 * k)
            values.append(buffer[:length])
        offset += 4 + 66 * 8
    return bank, dict(zip(indices, values, strict=True))


def keylime(checkout: Path, commit: str) -> None:
    found = _literals((checkout / KEYLIME_TEST).read_text(), "test_checkquote")
    pem = found["aikblob"]
    assert isinstance(pem, str)
    spki = serialization.load_pem_public_key(pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    decode = {k: base64.b64decode(str(found[k])) for k in ("sigblob", "quoteblob", "pcrblob")}
    bank, pcrs = _tools_pcr_file(decode["pcrblob"])
    nonce = str(found["nonce"])
    meta = {
        "source": "keylime (https://github.com/keylime/keylime), Apache-2.0",
        "commit": commit,
        "path": f"{KEYLIME_TEST}, TestTpmUtil.test_checkquote",
        "what": "an RSA-2048 AK (given as a PEM SubjectPublicKeyInfo), an RSASSA-SHA256 quote "
        "over one SHA-256 PCR, its nonce (the ASCII string is the extraData), the PCR values "
        "as tpm2-tools' serialized file",
        "ak_format": "spki",
        "extra_data": nonce.encode().hex(),
        "bank": HASH_NAMES[bank],
        "pcrs": {str(i): v.hex() for i, v in pcrs.items()},
    }
    _write("keylime-checkquote-rsa", meta, spki, decode["quoteblob"], decode["sigblob"])
    _keylime_make_credential(checkout, commit)


def _nested_literals(source: str, function: str) -> dict[str, object]:
    """Like :func:`_literals`, also inside ``with`` blocks (keylime mocks the randomness)."""
    tree = ast.parse(source)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    body = [n for n in ast.walk(node) if isinstance(n, ast.Assign)]
    holder = ast.FunctionDef(
        name=function, args=node.args, body=body, decorator_list=[], returns=None, lineno=0
    )
    return _literals(ast.unparse(ast.Module(body=[holder], type_ignores=[])), function)


def _keylime_make_credential(checkout: Path, commit: str) -> None:
    """TestTpmUtil.test_makecredential (RSA EK, seed 0x12 x 32: os.urandom is mocked) and
    test_makecredential_ecc (ECC EK, a fixed ephemeral key): tpm2_makecredential's file."""
    source = (checkout / KEYLIME_TEST).read_text()
    rsa, ecc = (
        _nested_literals(source, f) for f in ("test_makecredential", "test_makecredential_ecc")
    )
    ephemeral = _nested_literals(source, "create_fixed_ec_key")

    def case(found: dict[str, object]) -> dict[str, str]:
        return {
            "ek_public": str(found["ek_tpm"]),
            "object_name": str(found["aik_name"]),
            "secret": str(found["challenge"]),
        }

    doc = {
        "source": "keylime (https://github.com/keylime/keylime), Apache-2.0",
        "commit": commit,
        "path": f"{KEYLIME_TEST}, TestTpmUtil.test_makecredential and test_makecredential_ecc",
        "what": "tpm2_makecredential's output file (magic 0xBADCC0DE, version 1, "
        "TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET) for a TPM2B_PUBLIC EK, an object Name and "
        "a secret; keylime pins all of it for ECC and the first 80 bytes (up to the OAEP "
        "ciphertext's size) for RSA, whose OAEP padding is random",
        "rsa": {
            **case(rsa),
            "seed": "12" * 32,
            "expected_prefix": _expected(source, "test_makecredential"),
        },
        "ecc": {
            **case(ecc),
            "ephemeral_private": f"{int(str(ephemeral['priv'])):064x}",
            "expected": _expected(source, "test_makecredential_ecc"),
        },
    }
    (HERE / "keylime-makecredential.json").write_text(json.dumps(doc, indent=2) + "\n")


def _expected(source: str, function: str) -> str:
    """The hex literal of the test's ``assertEqual(credential..., bytes.fromhex(...))``."""
    tree = ast.parse(source)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    for call in ast.walk(node):
        if isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "fromhex":
            value = ast.literal_eval(call.args[0])
            if isinstance(value, str) and value.startswith("badcc0de"):
                return value
    raise ValueError(f"no expected credential in {function}")


# ---------------------------------------------------------------------- go-tpm-tools
def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """Protocol buffers wire format: (field number, varint or length-delimited bytes)."""
    i, out = 0, []
    while i < len(data):
        key, i = _varint(data, i)
        kind = key & 7
        value: int | bytes
        if kind == 0:
            value, i = _varint(data, i)
        elif kind == 2:
            length, i = _varint(data, i)
            value, i = data[i : i + length], i + length
        else:
            raise ValueError(f"wire type {kind}")
        out.append((key >> 3, value))
    return out


def go_tpm_tools(checkout: Path, commit: str) -> None:
    attestation = _fields((checkout / GCE_ATTESTATION).read_bytes())
    ak = next(v for f, v in attestation if f == 1)  # ak_pub: TPMT_PUBLIC
    assert isinstance(ak, bytes)
    for field, quote in attestation:
        if field != 2:  # quotes: tpm.Quote {quote, raw_sig, pcrs {hash, map<uint32, bytes>}}
            continue
        assert isinstance(quote, bytes)
        parts = dict(_fields(quote))
        pcrs_message = parts[3]
        assert isinstance(pcrs_message, bytes)
        bank, values = 0, {}
        for f, v in _fields(pcrs_message):
            if f == 1:
                assert isinstance(v, int)
                bank = v
            else:
                assert isinstance(v, bytes)
                entry = dict(_fields(v))
                values[int(entry.get(1, 0))] = bytes(entry.get(2, b""))  # type: ignore[arg-type]
        meta = {
            "source": "go-tpm-tools (https://github.com/google/go-tpm-tools), Apache-2.0",
            "commit": commit,
            "path": f"{GCE_ATTESTATION}, Attestation.quotes[{HASH_NAMES[bank]}]",
            "what": "a Google Compute Engine vTPM (COS 85): its RSA-2048 AK (TPMT_PUBLIC, "
            "Attestation.ak_pub), an RSASSA-SHA256 quote over all 24 PCRs of one bank, the "
            "PCR values; go-tpm-tools' test verifies it with nonce 0x9009 as extraData",
            "ak_format": "tpmt_public",
            "extra_data": "9009",
            "bank": HASH_NAMES[bank],
            "pcrs": {str(i): values[i].hex() for i in sorted(values)},
        }
        attest, signature = parts[1], parts[2]
        assert isinstance(attest, bytes)
        assert isinstance(signature, bytes)
        _write(f"go-tpm-tools-gce-{HASH_NAMES[bank]}", meta, ak, attest, signature)


# ---------------------------------------------------------------------- vaportpm
VAPORTPM_FIXTURES = {
    "vaportpm-gcp-tdx-ecc": "crates/vaportpm-verify/test-gcp-tdx-fixture.json",
    "vaportpm-gcp-amd-ecc": "crates/vaportpm-verify/test-gcp-amd-fixture.json",
    "vaportpm-nitro-ecc": "crates/vaportpm-verify/test-nitro-fixture.json",
}


def _tpmt_ecdsa(der: bytes) -> bytes:
    """A DER ECDSA signature as the TPMT_SIGNATURE a TPM returned (ECDSA, SHA-256, r, s as
    32-byte TPM2B_ECC_PARAMETERs): vaportpm keeps the signature DER-encoded."""
    r, s = decode_dss_signature(der)
    param = b"\x00\x20"
    return b"\x00\x18\x00\x0b" + param + r.to_bytes(32, "big") + param + s.to_bytes(32, "big")


def vaportpm(checkout: Path, commit: str) -> None:
    for name, path in VAPORTPM_FIXTURES.items():
        fixture = json.loads((checkout / path).read_text())
        point = fixture["ak_pubkeys"]["ecc_p256"]
        key = ec.EllipticCurvePublicNumbers(
            int(point["x"], 16), int(point["y"], 16), ec.SECP256R1()
        ).public_key()
        spki = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        ((bank, values),) = fixture["pcrs"].items()
        quote = fixture["attestation"]["tpm"]["ecc_p256"]
        where = "AWS EC2 Nitro TPM" if "nitro" in name else "Google Cloud vTPM"
        meta = {
            "source": "vaportpm (https://github.com/lockboot/vaportpm), MIT OR Apache-2.0",
            "commit": commit,
            "path": f"{path}: attestation.tpm.ecc_p256, ak_pubkeys.ecc_p256, pcrs, nonce",
            "what": f"a {where} ({name.split('-')[-2]}): an ECC P-256 AK (x, y; here DER "
            "SPKI), an ECDSA-SHA256 quote over all 24 PCRs of one bank (the signature kept "
            "DER-encoded by vaportpm; here as the TPMT_SIGNATURE, same r and s), the PCR "
            "values, the nonce as extraData",
            "ak_format": "spki",
            "extra_data": fixture["nonce"],
            "bank": bank,
            "pcrs": {str(i): v for i, v in sorted(values.items(), key=lambda kv: int(kv[0]))},
        }
        attest = bytes.fromhex(quote["attest_data"])
        _write(name, meta, spki, attest, _tpmt_ecdsa(bytes.fromhex(quote["signature"])))


# ---------------------------------------------------------------------- cmc
CMC_TEST = "verifier/tpm_test.go"


def _go_hex(source: str, name: str) -> bytes:
    found = re.search(rf"\b{name}, _ = hex\.DecodeString\(\"([0-9a-f]+)\"\)", source)
    if found is None:
        raise ValueError(f"no {name} in {CMC_TEST}")
    return bytes.fromhex(found.group(1))


def cmc(checkout: Path, commit: str) -> None:
    """Fraunhofer AISEC's cmc: an RSA AK in a certificate, a quote over PCRs 1 and 4."""
    source = (checkout / CMC_TEST).read_text()
    pem = re.search(
        r"validAk = conv\(\[\]byte\(\"(-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----)",
        source,
    )
    if pem is None:
        raise ValueError(f"no validAk in {CMC_TEST}")
    certificate = x509.load_pem_x509_certificate(pem.group(1).replace("\\n", "\n").encode())
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    nonce = re.search(r"validTpmNonce = \[\]byte\{([^}]*)\}", source)
    if nonce is None:
        raise ValueError(f"no validTpmNonce in {CMC_TEST}")
    extra = bytes(int(b, 16) for b in nonce.group(1).replace(" ", "").split(","))
    # validArtifactsSummary: the PCR values (TYPE_PCR_SUMMARY) of PCRs 1 and 4
    summary = source[source.index("validArtifactsSummary = ") :]
    summary = summary[: summary.index("\n\t}\n")]
    values = re.findall(r'Index: (\d+),.*?Content: dec\("([0-9a-f]{64})"\)', summary, re.DOTALL)
    pcrs = dict(values)
    meta = {
        "source": "cmc (https://github.com/Fraunhofer-AISEC/cmc), Apache-2.0",
        "commit": commit,
        "path": f"{CMC_TEST}: validQuote, validSignature, validAk, validTpmNonce, PCRs 1 and 4",
        "what": "an RSA-2048 AK (in its certificate validAk; here DER SPKI), an RSASSA-SHA256 "
        "quote over SHA-256 PCRs 1 and 4, the nonce as extraData, the PCR values",
        "ak_format": "spki",
        "extra_data": extra.hex(),
        "bank": "sha256",
        "pcrs": {i: pcrs[i] for i in sorted(pcrs, key=int)},
    }
    attest, signature = _go_hex(source, "validQuote"), _go_hex(source, "validSignature")
    _write("cmc-rsa", meta, spki, attest, signature)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keylime", type=Path, required=True)
    parser.add_argument("--keylime-commit", required=True)
    parser.add_argument("--go-tpm-tools", type=Path, required=True)
    parser.add_argument("--go-tpm-tools-commit", required=True)
    parser.add_argument("--vaportpm", type=Path, required=True)
    parser.add_argument("--vaportpm-commit", required=True)
    parser.add_argument("--cmc", type=Path, required=True)
    parser.add_argument("--cmc-commit", required=True)
    args = parser.parse_args()
    keylime(args.keylime, args.keylime_commit)
    go_tpm_tools(args.go_tpm_tools, args.go_tpm_tools_commit)
    vaportpm(args.vaportpm, args.vaportpm_commit)
    cmc(args.cmc, args.cmc_commit)


if __name__ == "__main__":
    main()
