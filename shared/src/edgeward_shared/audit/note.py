"""Signed checkpoints: C2SP tlog-checkpoint bodies in C2SP signed-note envelopes (Ed25519).

A checkpoint commits to the whole log at one size::

    <origin>\\n                     unique name of the log, e.g. "edgeward/audit/attestation"
    <size>\\n                       decimal tree size, no leading zeros
    <base64 root hash>\\n           standard base64 (with padding) of the 32-byte RFC 6962 root
    \\n                             (the blank line ends the signed text)
    — <key name> <base64(key id || signature)>\\n     one line per signature

The signed text is the body including its final newline. Signature type 0x01 (Ed25519,
RFC 8032, over the text bytes), key id = the first 4 bytes of
SHA-256(key name || 0x0A || 0x01 || 32-byte public key), and a verifier key is shared as
``<name>+<hex key id>+<base64(0x01 || public key)>`` (the vkey of Go's sumdb/note). Why an
Ed25519 key per log rather than the services' ECDSA identities: docs/adr/0023.

Pure: keys are passed in. Authenticity failures raise :class:`AuthenticityError`
(``audit.checkpoint.signature``); text that is not a checkpoint raises :class:`MessageError`
(``audit.checkpoint.malformed``); a checkpoint of another log raises :class:`PolicyError`
(``audit.checkpoint.origin``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeward_shared.errors import AuthenticityError, MessageError, PolicyError

ED25519_TYPE: Final = b"\x01"
DASH: Final = "\u2014 "  # em dash and a space starts every signature line
MAX_NOTE_BYTES: Final = 8192
MAX_SIGNATURES: Final = 100
_NAME_RE: Final = re.compile(r"[^\s+\u2014]+")
_SIZE_RE: Final = re.compile(r"0|[1-9][0-9]{0,18}")


class NoteReason:
    """Reason ids of checkpoint handling (stable; docs/protocol.md 5)."""

    MALFORMED: Final = "audit.checkpoint.malformed"
    SIGNATURE: Final = "audit.checkpoint.signature"
    ORIGIN: Final = "audit.checkpoint.origin"


def key_id(name: str, public: bytes) -> bytes:
    """The 4-byte signed-note key id of an Ed25519 key."""
    return hashlib.sha256(name.encode() + b"\n" + ED25519_TYPE + public).digest()[:4]


def _check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"key name {name!r} must be non-empty, without spaces or '+'")
    return name


@dataclass(frozen=True, slots=True)
class NoteVerifier:
    """A public Ed25519 note key: its name, id and 32 raw bytes."""

    name: str
    public: bytes

    def __post_init__(self) -> None:
        _check_name(self.name)
        if len(self.public) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public)

    @property
    def vkey(self) -> str:
        """``<name>+<hex key id>+<base64(0x01 || public key)>``."""
        encoded = base64.b64encode(ED25519_TYPE + self.public).decode()
        return f"{self.name}+{self.key_id.hex()}+{encoded}"

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteVerifier:
        name, sep, rest = vkey.strip().partition("+")
        hex_id, sep2, b64 = rest.partition("+")
        try:
            raw = base64.b64decode(b64, validate=True)
            wanted = bytes.fromhex(hex_id)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"malformed verifier key: {exc}") from exc
        if not (sep and sep2) or raw[:1] != ED25519_TYPE or len(wanted) != 4:
            raise ValueError("malformed verifier key (not name+id+base64(0x01||key))")
        verifier = cls(name, raw[1:])
        if verifier.key_id != wanted:
            raise ValueError("verifier key id does not match its name and key")
        return verifier

    def verifies(self, text: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, text)
        except InvalidSignature:
            return False
        return True


class NoteSigner:
    """An Ed25519 private note key (the audit key of one log)."""

    def __init__(self, name: str, key: Ed25519PrivateKey) -> None:
        self.name = _check_name(name)
        self._key = key
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.verifier = NoteVerifier(name, public)

    def renamed(self, name: str) -> NoteSigner:
        """The same key under another name (the key id changes with the name)."""
        return NoteSigner(name, self._key)

    @classmethod
    def generate(cls, name: str) -> NoteSigner:
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, name: str, pem: bytes) -> NoteSigner:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise TypeError("the audit key must be an Ed25519 private key")
        return cls(name, key)

    def to_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign_line(self, text: bytes) -> str:
        signature = self._key.sign(text)
        return f"{DASH}{self.name} {base64.b64encode(self.verifier.key_id + signature).decode()}\n"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A log's origin, size and root hash (the signed-note body of a tlog checkpoint)."""

    origin: str
    size: int
    root: bytes

    def __post_init__(self) -> None:
        if not self.origin or not self.origin.isprintable() or self.origin != self.origin.strip():
            raise ValueError(f"checkpoint origin {self.origin!r} is not a valid line")
        if not 0 <= self.size < 2**63 or len(self.root) != 32:
            raise ValueError("checkpoint size or root out of range")

    def body(self) -> str:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"


def sign_checkpoint(checkpoint: Checkpoint, signer: NoteSigner) -> str:
    """The signed note of ``checkpoint`` (text, blank line, one signature line)."""
    body = checkpoint.body()
    return body + "\n" + signer.sign_line(body.encode())


def parse_checkpoint(note: str) -> tuple[Checkpoint, bytes, list[tuple[str, bytes]]]:
    """Split a signed note into its checkpoint, signed text and (name, id||sig) lines.

    Checks the form only; :func:`open_checkpoint` checks the signature.
    """
    raw = note.encode()
    if len(raw) > MAX_NOTE_BYTES:
        raise MessageError(NoteReason.MALFORMED, "checkpoint note too large")
    text, sep, sig_block = note.rpartition("\n\n")
    if not sep or not text or not sig_block.endswith("\n"):
        raise MessageError(NoteReason.MALFORMED, "no blank line before the signatures")
    text += "\n"
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise MessageError(NoteReason.MALFORMED, "control character in the note text")
    signatures: list[tuple[str, bytes]] = []
    for line in sig_block[:-1].split("\n"):
        name, space, b64 = line.removeprefix(DASH).partition(" ")
        try:
            blob = base64.b64decode(b64, validate=True)
        except binascii.Error:
            blob = b""
        if not line.startswith(DASH) or not space or not _NAME_RE.fullmatch(name) or len(blob) < 5:
            raise MessageError(NoteReason.MALFORMED, f"bad signature line {line[:80]!r}")
        signatures.append((name, blob))
    if len(signatures) > MAX_SIGNATURES:
        raise MessageError(NoteReason.MALFORMED, "too many signatures")
    lines = text[:-1].split("\n")
    if len(lines) < 3 or not _SIZE_RE.fullmatch(lines[1]):
        raise MessageError(NoteReason.MALFORMED, "checkpoint body is not origin, size, root")
    try:
        root = base64.b64decode(lines[2], validate=True)
        checkpoint = Checkpoint(lines[0], int(lines[1]), root)
    except (binascii.Error, ValueError) as exc:
        raise MessageError(NoteReason.MALFORMED, f"checkpoint body: {exc}") from exc
    if base64.b64encode(root).decode() != lines[2]:
        raise MessageError(NoteReason.MALFORMED, "root hash is not canonical base64")
    return checkpoint, text.encode(), signatures


def open_checkpoint(note: str, verifier: NoteVerifier, *, origin: str | None = None) -> Checkpoint:
    """The checkpoint of ``note`` if ``verifier`` signed it (and it is of ``origin``)."""
    checkpoint, text, signatures = parse_checkpoint(note)
    ours = [
        blob[4:]
        for name, blob in signatures
        if name == verifier.name and blob[:4] == verifier.key_id
    ]
    if not ours or not all(verifier.verifies(text, sig) for sig in ours):
        raise AuthenticityError(NoteReason.SIGNATURE, f"no valid signature by {verifier.name}")
    if origin is not None and checkpoint.origin != origin:
        raise PolicyError(NoteReason.ORIGIN, f"checkpoint of {checkpoint.origin!r}, not {origin!r}")
    return checkpoint
