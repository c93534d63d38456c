"""The device side of the model supply chain (ARCHITECTURE flow 3, issue 4).

:class:`ModelManager` keeps the device's models in line with what the distribution service
assigns it, trusting nothing on the way::

    sync        signed release documents for the models assigned to this device
    check       signature, signer and expiry of each document (freeze), then the persisted
                high-water marks (rollback) and the binding to this device (mix-and-match)
    fetch       the blob in chunks, each checked against the document's digests (resume)
    key         for encrypted tiers: the data key, HPKE-wrapped to the session key of this
                device's current attestation result (tier high needs one that affirms)
    verify      decrypt in memory, digest, provenance, signer certificate, model-signing
                bundle, allowed runtime
    measure     extend the model PCR with the model's digest before it is loaded, so the
                next quote shows which model runs
    load        the loader's ONNX structure checks, then
                ``onnxruntime.InferenceSession(bytes)``: in the sandboxed worker, both
                confined (the agent never parses the model), or in process (development);
                then swap it in, raise the high-water mark (fsynced), report the activation

A failure at any step leaves the previous version serving and is counted and reported with
its reason id. Plaintext exists only in memory: the blob on disk is ciphertext (tier low,
shipped in the clear on purpose, is never written at all).
A model the service stops assigning (its version revoked, say) is unloaded; the device never
goes back to an older version than one it has run (rollback protection wins), except on an
explicit revert: a document naming the aborted version it replaces, with metadata newer
than any seen (docs/adr/0020). The older version is then fetched, verified and loaded
*before* the aborted one is retired, so the model never stops serving in between.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import msgspec
import onnxruntime
from packaging.requirements import InvalidRequirement, Requirement

from edgeward_device_agent.model_fetch import ChunkFetcher, FetchPolicy
from edgeward_device_agent.model_store import ModelStore
from edgeward_device_agent.offline import OfflinePolicy, Standing, keep_loaded
from edgeward_device_agent.tpm import PcrBank
from edgeward_device_agent.waits import wait_any
from edgeward_shared.clock import Clock
from edgeward_shared.crypto.keys import PrivateKey
from edgeward_shared.envelope import Envelope, EnvelopeVerifier, Opened
from edgeward_shared.errors import EdgewardError, MessageError, PolicyError
from edgeward_shared.inference import InferenceReason
from edgeward_shared.logs import fields
from edgeward_shared.messages.common import Rejected
from edgeward_shared.messages.model import (
    MAX_SYNC_PAGES,
    ActivationReport,
    ChunksSent,
    KeyGrant,
    KeyRequest,
    ModelAvailable,
    SyncReply,
    SyncRequest,
)
from edgeward_shared.models.onnx_check import check_onnx
from edgeward_shared.models.provenance import Provenance, Tier, decode_provenance, sha256_hex
from edgeward_shared.models.reasons import ModelReason
from edgeward_shared.models.release import (
    HighWater,
    ModelRelease,
    check_release,
    document_verifier,
    open_release,
)
from edgeward_shared.models.sealing import ModelRef, ReleaseContext, unwrap_on_device
from edgeward_shared.models.verify import decrypt_release_blob, verify_release_model
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.runtime.core import Outgoing, Runtime
from edgeward_shared.topics import COHORT_FILTER, Channel, Direction, device_topic

if TYPE_CHECKING:  # attestation -> config -> here: only the type is needed
    from edgeward_device_agent.attestation import CurrentAttestation

log = logging.getLogger("edgeward.agent.models")

#: The result id a medium-tier key wrapped to the device certificate's key carries.
DEVICE_CERTIFICATE: Final = "device-certificate"
MODEL_PCR: Final = 14  # "the next quote shows which model runs" (docs/model-tiers.md)


class ModelTpm(Protocol):
    def extend_pcr(self, index: int, digests: Mapping[PcrBank, bytes]) -> None: ...


#: Loads verified ONNX bytes for a tier: returns the handle ``LoadedModel.session`` holds
#: (an onnxruntime session in-process, or a sandboxed worker: :mod:`.sandboxed`).
#: Its third argument: what the ONNX checks (default caps) found in exactly these bytes, when
#: the caller ran them, so that a loader which checks too need not again (or None).
#: ``loader(model, tier, gate)``: a session for ``model``, which the loader checks
#: (``check_onnx``) before any runtime sees it; ``gate`` is the agent's verification of the
#: signed model and its measurement, running: nothing may load the bytes before it succeeds.
Loader = Callable[[bytes, Tier, Awaitable[object]], Awaitable[Any]]


def onnx_session(model: bytes) -> Any:
    """An onnxruntime session created from bytes (the only way a model is ever loaded)."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


async def in_process_loader(model: bytes, tier: Tier, gate: Awaitable[object]) -> Any:
    """onnxruntime in the agent's own process, after the ONNX checks: development only,
    never for tier high (which must run in the strict sandbox: fail closed). Unconfined, it
    parses nothing before ``gate`` has verified the signature."""
    if tier is Tier.HIGH:
        raise PolicyError(ModelReason.TIER_POLICY, "tier high runs only in the strict sandbox")
    await gate
    return await asyncio.to_thread(checked_session, model)


def checked_session(model: bytes) -> Any:
    """``check_onnx`` (the default caps), then :func:`onnx_session`."""
    check_onnx(model)
    return onnx_session(model)


def check_runtime(spec: str) -> None:
    """Refuse a model whose provenance allows another runtime than the one here."""
    try:
        requirement, installed = _requirement(spec)
    except (InvalidRequirement, PackageNotFoundError) as exc:
        raise PolicyError(ModelReason.RUNTIME_UNSUPPORTED, f"{spec}: {exc}") from exc
    if requirement.name != "onnxruntime" or not requirement.specifier.contains(
        installed, prereleases=True
    ):
        raise PolicyError(ModelReason.RUNTIME_UNSUPPORTED, f"{spec} (have {installed})")


@functools.lru_cache(maxsize=64)
def _requirement(spec: str) -> tuple[Requirement, str]:
    """A provenance's runtime requirement, parsed, and the installed version of what it names
    (read from the package metadata once: a millisecond per activation otherwise)."""
    requirement = Requirement(spec)
    return requirement, version(requirement.name)


@dataclass(frozen=True, slots=True)
class ModelPolicy:
    sync_interval_s: float = 60.0
    model_pcr: int = MODEL_PCR
    attestation_wait_s: float = 30.0  # tier high waits this long for an attestation
    request_timeout_s: float = 30.0
    fetch: FetchPolicy = field(default_factory=FetchPolicy)


@dataclass(frozen=True, slots=True)
class LoadedModel:
    name: str
    version: int
    tier: Tier
    digest: str
    provenance: Provenance
    result_id: str | None
    loaded_at_ms: int
    expires_at_ms: int  # of the release document it was accepted under
    session: Any


class ModelManager:
    def __init__(
        self,
        device_id: str,
        store: ModelStore,
        *,
        trust: Callable[[], TrustStore],
        clock: Clock,
        tpm: ModelTpm,
        attestation: Callable[[], CurrentAttestation | None],
        device_key: Callable[[], PrivateKey],
        policy: ModelPolicy | None = None,
        loader: Loader = in_process_loader,
        on_change: Callable[[str], None] | None = None,
        revoked: Callable[[str, int], bool] = lambda _name, _version: False,
    ) -> None:
        self.device_id = device_id
        self.store = store
        self.policy = policy or ModelPolicy()
        self.loaded: dict[str, LoadedModel] = {}
        self.last_refusal: str | None = None
        self._trust = trust
        self._clock = clock
        self._tpm = tpm
        self._attestation = attestation
        self._device_key = device_key
        self._loader = loader
        self._on_change = on_change
        self._revoked = revoked  # the revocation plane's list (docs/adr/0010)
        self._fetcher = ChunkFetcher(device_id, store, self.policy.fetch)
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.up = device_topic(device_id, Direction.UP, Channel.MODEL)
        self.down = device_topic(device_id, Direction.DOWN, Channel.MODEL)

    # ------------------------------------------------------------------ wiring
    def install(self, runtime: Runtime) -> None:
        runtime.expect_replies(self.down, [SyncReply, ChunksSent, KeyGrant])
        runtime.route(self.down, [ModelAvailable], self._hinted, name="model.hint")
        runtime.route_frames(self._fetcher.frames_topic, self._fetcher.on_frame, name="model.data")
        # chunks published once per version for its cohort (docs/adr/0029): the broker
        # delivers what this device's cohorts carry, nothing else
        runtime.route_frames(COHORT_FILTER, self._fetcher.on_cohort_frame, name="model.cohort")

    async def _hinted(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        log.info("model.hint", extra=fields(device=self.device_id, model=opened.message.name))
        self._wake.set()
        return ()

    def wake(self) -> None:
        """Sync now (a hint, a new attestation result, a revocation)."""
        self._wake.set()

    async def run(
        self, runtime: Runtime, stop: asyncio.Event, after: asyncio.Event | None = None
    ) -> None:
        """Sync on connect, on every hint and every ``sync_interval_s``, until ``stop``.

        ``after``: on each connection, sync only once it is set (the agent sets it when it
        has asked for a fresh attestation: docs/offline.md, re-attest before anything else).
        """
        self.store.prepare()
        while not stop.is_set():
            self._wake.clear()
            if not runtime.ready.is_set():
                await wait_any(runtime.ready, stop)
                continue
            if after is not None and not after.is_set():
                await wait_any(after, stop, seconds=self.policy.attestation_wait_s)
            try:
                await self.sync(runtime)
                self.check_freshness()
            except EdgewardError as exc:
                log.warning(
                    "model.sync_failed",
                    extra=fields(device=self.device_id, reason=exc.reason, detail=exc.detail),
                )
            await wait_any(self._wake, stop, seconds=self.policy.sync_interval_s)

    # ------------------------------------------------------------------ sync
    async def sync(self, runtime: Runtime) -> None:
        async with self._lock:
            offered: dict[str, int] = {}  # every verified document, activated or not
            offset: int | None = 0
            for _ in range(MAX_SYNC_PAGES):  # the service pages replies (each < 256 KiB)
                if offset is None:
                    break
                reply = await runtime.request(
                    self.up, SyncRequest(offset=offset), timeout_s=self.policy.request_timeout_s
                )
                if isinstance(reply.message, Rejected):
                    raise PolicyError(reply.message.reason, "the service refused to sync")
                if not isinstance(reply.message, SyncReply):
                    raise MessageError(ModelReason.METADATA_MISMATCH, "unexpected sync reply")
                for raw in reply.message.releases:
                    release = await self._consider(runtime, raw)
                    if release is not None:
                        offered[release.name] = release.version
                following = reply.message.next
                if following is not None and following <= offset:
                    raise MessageError(ModelReason.METADATA_MISMATCH, "sync pages go backwards")
                offset = following
            else:
                if offset is not None:  # more pages than any fleet has: keep what runs
                    raise MessageError(ModelReason.METADATA_MISMATCH, "too many sync pages")
            # withdrawn (no longer assigned, or assigned below what runs: a revoked version)
            # models stop; a newer one that failed to activate leaves the running one alone
            for name, model in list(self.loaded.items()):
                if offered.get(name, 0) < model.version:
                    self._unload(name, "model.unassigned")

    async def _consider(self, runtime: Runtime, raw: bytes) -> ModelRelease | None:
        """Apply one release document. Returns it if it verified (even if activating what
        it names then failed: counted and reported); None if the document was refused."""
        name, release = "?", None
        try:
            name = _peek_name(raw)
            opened = self._open(raw, name)
            release = opened.message
            loaded = self.loaded.get(release.name)
            if loaded is not None and loaded.version == release.version:
                self._accept(release, raw)  # re-signed metadata: just fresher
                self.loaded[release.name] = replace(loaded, expires_at_ms=opened.exp)
                return release
            if loaded is not None and release.version < loaded.version:
                log.warning(
                    ModelReason.ROLLOUT_REVERT,
                    extra=fields(
                        device=self.device_id,
                        model=release.name,
                        version=release.version,
                        reverts=release.reverts,
                        running=loaded.version,
                    ),
                )
            await self._activate(runtime, release, raw, opened.exp)
        except EdgewardError as exc:
            self._refused(name, release, exc)
            if release is not None:
                await self._report(runtime, release.name, release.version, "failed", exc.reason)
        return release

    def _open(self, raw: bytes, name: str) -> Opened[ModelRelease]:
        verifier: EnvelopeVerifier = document_verifier(self._trust())
        opened = open_release(verifier, raw, name, now_ms=self._clock.now_ms())
        release = opened.message
        check_release(release, self.device_id, self.store.high_water().get(release.name))
        if self._revoked(release.name, release.version):
            raise PolicyError(ModelReason.VERSION_REVOKED, f"{release.name} v{release.version}")
        return opened

    def _accept(self, release: ModelRelease, raw: bytes) -> None:
        mark = HighWater(release.version, release.meta_version, sha256_hex(release.provenance))
        self.store.raise_high_water(release.name, mark)  # fsynced before it is relied on
        self.store.save_release(release.name, raw)

    async def close(self) -> None:
        """Stop every loaded model's session (sandboxed workers end) and wait for them."""
        sessions = [model.session for model in self.loaded.values()]
        self.loaded.clear()
        for session in sessions:
            _retire(session)
        if _retiring:
            await asyncio.gather(*_retiring, return_exceptions=True)

    def apply_revocations(self) -> list[str]:
        """Unload every loaded version the revocation list names; returns their names."""
        gone = [m.name for m in self.loaded.values() if self._revoked(m.name, m.version)]
        for name in gone:
            self._unload(name, ModelReason.VERSION_REVOKED)
        return gone

    def apply_offline(self, standing: Standing | None, policy: OfflinePolicy) -> list[str]:
        """Unload what :func:`.offline.keep_loaded` no longer keeps (tier high, its device's
        attestation result expired past the grace period, or none held); their names."""
        now = self._clock.now_ms()
        gone = [
            m.name for m in self.loaded.values() if not keep_loaded(m.tier, standing, now, policy)
        ]
        for name in gone:
            self._unload(name, InferenceReason.ATTESTATION_EXPIRED)
        return gone

    def check_freshness(self) -> list[str]:
        """Freeze: models whose release document expired without being re-signed. Tier high
        stops serving (fail closed); the others keep serving, with the alarm raised."""
        now = self._clock.now_ms()
        stale = [m for m in self.loaded.values() if m.expires_at_ms <= now]
        for model in stale:
            log.error(
                "model.metadata_expired",
                extra=fields(device=self.device_id, model=model.name, version=model.version),
            )
            if model.tier is Tier.HIGH:
                self._unload(model.name, ModelReason.METADATA_EXPIRED)
        return [m.name for m in stale]

    # ------------------------------------------------------------------ activation
    async def _activate(
        self, runtime: Runtime, release: ModelRelease, raw: bytes, expires_at_ms: int
    ) -> None:
        started = time.perf_counter()
        encrypted = release.tier.encrypted
        # megabytes read, hashed, decrypted and parsed: off the event loop, which keeps
        # serving inference, heartbeats and the broker's keepalives meanwhile
        blob = await asyncio.to_thread(self.store.blob, release.blob) if encrypted else None
        if blob is None:
            # an encrypted blob is kept as it comes (written and fsynced off the event loop)
            blob = await self._fetcher.fetch(runtime, release, persist=encrypted)
        key, result_id = await self._data_key(runtime, release) if encrypted else (None, None)
        model = await asyncio.to_thread(decrypt_release_blob, release, blob, key)
        # the digests and the signature are verified and the model measured while the
        # loader's worker checks the bytes, confined; no session is created before that
        gate = asyncio.ensure_future(
            asyncio.to_thread(self._verify_and_measure, release, blob, model)
        )
        try:
            session = await self._loader(model, release.tier, gate)
        except Exception as exc:
            raise await _verdict(gate) or _load_error(exc) from exc
        provenance = await gate
        del model  # the session (or the sandboxed worker) holds what it needs
        self._accept(release, raw)
        previous = self.loaded.get(release.name)
        if previous is not None:
            _retire(previous.session)
        self.loaded[release.name] = LoadedModel(
            name=release.name,
            version=release.version,
            tier=release.tier,
            digest=provenance.digest,
            provenance=provenance,
            result_id=result_id,
            loaded_at_ms=self._clock.now_ms(),
            expires_at_ms=expires_at_ms,
            session=session,
        )
        log.info(
            "model.activated",
            extra=fields(
                device=self.device_id,
                model=release.name,
                version=release.version,
                tier=str(release.tier),
                digest=provenance.digest,
                seconds=round(time.perf_counter() - started, 3),
                confinement=_describe(session),
            ),
        )
        if self._on_change is not None:
            self._on_change(release.name)
        await self._report(runtime, release.name, release.version, "active", "model.activated")

    def _verify_and_measure(self, release: ModelRelease, blob: bytes, model: bytes) -> Provenance:
        """The blob's and the signed model's checks, then the model's digest extended into
        the model PCR (before it is loaded: the next quote shows which model runs)."""
        provenance = verify_release_model(
            release, blob, model, self._trust(), now_ms=self._clock.now_ms()
        )
        if (provenance.name, provenance.version, provenance.tier) != (
            release.name,
            release.version,
            release.tier,
        ):
            raise PolicyError(ModelReason.METADATA_MISMATCH, "provenance names another model")
        check_runtime(provenance.runtime)
        digest = bytes.fromhex(provenance.digest)
        self._tpm.extend_pcr(self.policy.model_pcr, {PcrBank.SHA256: digest})
        return provenance

    async def _data_key(self, runtime: Runtime, release: ModelRelease) -> tuple[bytes, str]:
        current = await self._current_attestation(release.tier)
        request = KeyRequest(
            name=release.name,
            version=release.version,
            ear=current.ear if current is not None else None,
        )
        reply = await runtime.request(self.up, request, timeout_s=self.policy.request_timeout_s)
        grant = reply.message
        if isinstance(grant, Rejected):
            raise PolicyError(grant.reason, "the service refused the data key")
        if not isinstance(grant, KeyGrant) or (grant.name, grant.version) != (
            release.name,
            release.version,
        ):
            raise PolicyError(ModelReason.KEY_UNWRAP, "a key for another model")
        digest = decode_provenance(release.provenance).digest
        context = ReleaseContext(
            self.device_id, ModelRef(release.name, release.version, digest), grant.result_id
        )
        if current is not None and grant.result_id == current.claims.result_id:
            return unwrap_on_device(
                grant.wrapped_key, current.session_key, context
            ), grant.result_id
        if grant.result_id == DEVICE_CERTIFICATE and release.tier is Tier.MEDIUM:
            return unwrap_on_device(grant.wrapped_key, self._device_key(), context), grant.result_id
        raise PolicyError(ModelReason.KEY_UNWRAP, f"key wrapped for {grant.result_id!r}")

    async def _current_attestation(self, tier: Tier) -> CurrentAttestation | None:
        current = self._attestation()
        if current is not None or tier is not Tier.HIGH:
            return current
        deadline = time.monotonic() + self.policy.attestation_wait_s
        while current is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            current = self._attestation()
        return current  # still None: ask anyway; the service refuses and records why

    # ------------------------------------------------------------------ failures
    def _refused(self, name: str, release: ModelRelease | None, exc: EdgewardError) -> None:
        self.last_refusal = exc.reason
        log.warning(
            "model.refused",
            extra=fields(
                device=self.device_id,
                model=name,
                version=release.version if release else None,
                reason=exc.reason,
                detail=exc.detail,
            ),
        )

    def _unload(self, name: str, reason: str) -> None:
        model = self.loaded.pop(name, None)
        if model is None:
            return
        _retire(model.session)
        log.warning(
            "model.unloaded",
            extra=fields(device=self.device_id, model=name, version=model.version, reason=reason),
        )
        if self._on_change is not None:
            self._on_change(name)

    async def _report(
        self,
        runtime: Runtime,
        name: str,
        version: int,
        state: Literal["active", "failed"],
        reason: str,
    ) -> None:
        report = ActivationReport(name=name, version=version, state=state, reason=reason)
        try:
            await runtime.publish(Outgoing(self.up, report))
        except EdgewardError as exc:
            log.info("model.report_failed", extra=fields(device=self.device_id, reason=exc.reason))


def _describe(session: Any) -> dict[str, str] | str:
    """How a loaded model is confined (a sandboxed worker tells; in-process says so)."""
    describe = getattr(session, "describe", None)
    return describe() if callable(describe) else "in-process"


async def _verdict(gate: asyncio.Future[Provenance]) -> BaseException | None:
    """The verification's own error, once it is done, if it failed: a model that is not the
    signed one is refused as such, whatever its loader said."""
    await asyncio.wait([gate])
    return None if gate.cancelled() else gate.exception()


def _load_error(exc: Exception) -> Exception:
    if isinstance(exc, EdgewardError):
        return exc
    # onnxruntime raises its own exception types
    return PolicyError(ModelReason.LOAD_FAILED, str(exc)[:200])


_retiring: set[asyncio.Task[Any]] = set()


def _retire(session: Any) -> None:
    """Close a replaced or unloaded model's session (a sandboxed worker is stopped)."""
    close = getattr(session, "close", None)
    if close is None or not asyncio.iscoroutinefunction(close):
        return
    task = asyncio.get_running_loop().create_task(close())
    _retiring.add(task)
    task.add_done_callback(_retiring.discard)


def _peek_name(raw: bytes) -> str:
    """The model a release document names (unverified: :func:`open_release` binds it)."""
    try:
        envelope = msgspec.json.decode(raw, type=Envelope)
        name = msgspec.json.decode(envelope.payload).get("name")
    except (msgspec.DecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise MessageError(ModelReason.METADATA_MISMATCH, "not a release document") from exc
    if not isinstance(name, str):
        raise MessageError(ModelReason.METADATA_MISMATCH, "release document names no model")
    return name
