"""The device agent: enroll once, then run as the device and keep itself attested.

:class:`DeviceAgent` wires the pieces and owns the lifecycle (ARCHITECTURE flows 1 and 2)::

    prepare      state directory 0700, provisioned identity, trust bundle and CRL (fail fast)
    open TPM     in a worker thread; retried with backoff until it answers; then unlock the
                 state: plain keys are sealed, the keys this run needs are unsealed into
                 memory (a key sealed by another TPM or to other boot PCRs ends the run)
    enroll       (no device certificate yet) as ``enroll.<id>``: :mod:`.enrollment`, retried
                 with backoff after any rejection, timeout or TPM failure, never giving up
    run          as ``<id>``: answers pings, challenges and results (:mod:`.attestation`),
                 sends AttestationRequest on every (re)connection, before the model sync
                 and the sensor stream, and before the result expires (:mod:`.schedule`);
                 unloads what the offline policy no longer keeps (:mod:`.offline`); renews
                 its certificate at ``cert_renew_fraction`` of its lifetime or on a
                 ``rotate-cert`` command (:mod:`.renewal`, docs/adr/0015)
    switch       a renewal ends the run phase: the next one runs on the new certificate and
                 first tells the identity service so (the old one is then revoked)
    come back    a certificate that expired (offline, or renewals failing) ends the run
                 phase too, and the agent enrolls again through its EK (docs/adr/0005)

Each phase is one :class:`~edgeward_shared.runtime.core.Runtime` (which verifies every
message and reconnects by itself) serving while the phase's work runs. Both runtimes share
one metrics registry, beside the agent's own metrics (:mod:`.metrics`).

Failures: a :class:`~edgeward_shared.errors.ConfigError` (missing or unsafe files, an
expired CRL, a certificate for someone else) ends :meth:`DeviceAgent.run`: nothing will fix
itself. Everything else is logged with its reason id, counted and retried. The policies
(retries, challenges, renewal) and why: docs/adr/0008-device-agent-lifecycle.md.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, Literal, TypeVar

from cryptography import x509

from edgeward_device_agent.attestation import Attester, CurrentAttestation
from edgeward_device_agent.boot_log import event_log_path, read_event_log
from edgeward_device_agent.commands import CommandHandler
from edgeward_device_agent.config import AgentConfig, retry_delays
from edgeward_device_agent.enrollment import REPLY_TYPES, Enrollment
from edgeward_device_agent.inference import DeviceInference, standing_of
from edgeward_device_agent.ledger import LEDGER_NAME, DeviceLedger
from edgeward_device_agent.metrics import AgentMetrics
from edgeward_device_agent.model_manager import ModelManager, in_process_loader
from edgeward_device_agent.model_store import ModelStore
from edgeward_device_agent.ports import AgentTpm, Connector, TpmFactory, mqtt_connector
from edgeward_device_agent.posture import posture_reader
from edgeward_device_agent.reasons import AgentReason
from edgeward_device_agent.renewal import RenewalError, Renewer, RenewReason, due_at_ms, serial_of
from edgeward_device_agent.revocations import RevocationHolder, RevocationHook
from edgeward_device_agent.sandbox.supervisor import WarmPool
from edgeward_device_agent.sandboxed import SandboxExecutor, sandbox_loader
from edgeward_device_agent.schedule import RequestReason, RequestSchedule
from edgeward_device_agent.state import AgentState
from edgeward_device_agent.status import AttestationState, EnrollmentState, TrustState
from edgeward_device_agent.telemetry import (
    Snapshot,
    TelemetryRecorder,
    describe_all,
    process_resources,
    send_reports,
    worst_protections,
)
from edgeward_device_agent.tpm import Tpm
from edgeward_device_agent.trust_files import (
    adopted_bundle,
    current_bundle,
    load_trust,
    trust_dir,
)
from edgeward_device_agent.waits import wait_any
from edgeward_device_agent.witness import AuditWitness
from edgeward_shared.bus.base import Bus
from edgeward_shared.clock import Clock, SystemClock, from_datetime, to_datetime
from edgeward_shared.envelope import EnvelopeVerifier, Opened, SigningKey
from edgeward_shared.errors import ConfigError, EdgewardError
from edgeward_shared.identity import Identity
from edgeward_shared.logs import fields
from edgeward_shared.messages.attest import (
    AttestationChallenge,
    AttestationRequest,
    AttestationResult,
)
from edgeward_shared.messages.common import Rejected
from edgeward_shared.pki.store import IdentityFiles
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.revocation import RevocationView
from edgeward_shared.runtime.core import Connect, Outgoing, Runtime
from edgeward_shared.runtime.health import answer_pings
from edgeward_shared.runtime.metrics import RuntimeMetrics
from edgeward_shared.runtime.trust import TrustFollower
from edgeward_shared.tls import TlsIdentity
from edgeward_shared.topics import Channel, Direction, device_topic

log = logging.getLogger("edgeward.agent")
#: Certificates renew at ``cert_renew_fraction`` x (1 - SPREAD x rand) of their lifetime.
CERT_RENEW_SPREAD: Final = 0.2
#: How often the settling of a switched certificate looks for the new connection.
SWITCH_POLL_S: Final = 0.05
T = TypeVar("T")
#: How a run phase ended: stopped, switched to a renewed certificate, or expired.
PhaseEnd = Literal["stopped", "renewed", "expired"]
#: Attempts at telling the identity service a renewed certificate is in use (then the old
#: one simply expires).
SETTLE_ATTEMPTS = 5


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


class DeviceAgent:
    """One device's agent. ``await agent.run(stop)``; read :meth:`trust_state` any time.

    ``clock``, ``tpm_factory``, ``connector`` and ``rand`` are injected for tests (a fixed
    clock, a doctored TPM, the in-memory broker, fixed jitter); production uses the system
    clock, :class:`~edgeward_device_agent.tpm.Tpm` and mutual-TLS MQTT.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Clock | None = None,
        tpm_factory: TpmFactory = Tpm,
        connector: Connector | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.state = AgentState(config.state_dir, config.device_id, config.seal)
        self.metrics = RuntimeMetrics()
        self.agent_metrics = AgentMetrics(self.metrics.registry)
        self._clock = clock or SystemClock()
        self._tpm_factory = tpm_factory
        self._connector = connector or self._mqtt_connect
        #: the fleet trust bundle (docs/adr/0017): adopted at once, kept in the state dir
        self.trust = TrustFollower(
            trust_dir(config.state_dir), bundle_file=adopted_bundle(config.state_dir)
        )
        self._rand = rand
        self._certificate: x509.Certificate | None = None
        self._received_at_ms: int | None = None
        self._runtime: Runtime | None = None
        self._attester: Attester | None = None
        self._schedule = RequestSchedule(config.policy, rand)
        self._connections = 0
        self._wake = asyncio.Event()
        #: cleared on each new connection, set once the agent has asked for a challenge on
        #: it: what else the device sends waits for it (re-attest first, docs/offline.md)
        self._asked_on_connection = asyncio.Event()
        self._last_error: str | None = None
        #: the models this device runs (None until it serves as the device, or if disabled)
        self.models: ModelManager | None = None
        self._warm: WarmPool | None = None  # idle sandboxed workers, started with the models
        #: inference requests and the sensor stream (with the models)
        self.inference: DeviceInference | None = None
        # revocations and commands (docs/adr/0010): persisted in the ledger
        self.ledger = DeviceLedger(config.state_dir / LEDGER_NAME)
        self.revocations = RevocationHolder(self.ledger, self._clock, self.metrics.registry)
        self.witness = AuditWitness(self.ledger)  # audit checkpoints (docs/adr/0023)
        self.commands = CommandHandler(
            config.device_id, self.ledger, self.revocations, self._clock, self.metrics.registry
        )
        # renewal (docs/adr/0015): one at a time; a renewal ends the run phase
        self.renewer = Renewer(
            config.device_id,
            self.state,
            self._clock,
            lambda: self.attestation,
            config.policy.request_timeout_s,
        )
        self.commands.on_rotate_cert(self._rotate_now)
        self._renewing = asyncio.Lock()
        #: the periodic telemetry report's counts (docs/telemetry.md); None: no reports
        self.telemetry: TelemetryRecorder | None = None
        if config.telemetry_period_s is not None:
            self.telemetry = TelemetryRecorder(
                config.device_id,
                boot_ms=self._clock.now_ms(),
                period_ms=int(config.telemetry_period_s * 1000),
            )
        self._phase_end = asyncio.Event()
        self._ended: PhaseEnd = "stopped"
        self._unsettled: tuple[str, str] | None = None  # (new serial, previous serial)
        self._renewed = asyncio.Event()  # a renewal switched the identity in place
        self._switched_after = 0  # the connection count when it did
        self.renewals = 0

    @property
    def device_id(self) -> str:
        return self.config.device_id

    @property
    def stopped(self) -> bool:
        """True after an acknowledged ``stop`` until a signed ``resume`` (survives restarts);
        every inference entry point calls :meth:`check_inference_allowed` first."""
        return self.commands.stopped

    def check_inference_allowed(self) -> None:
        self.commands.check_inference_allowed()

    def on_revocations(self, hook: RevocationHook) -> None:
        """``hook(view)`` runs whenever a newer revocation list is accepted."""
        self.revocations.on_revocations(hook)

    # ------------------------------------------------------------------ what others read
    @property
    def attestation(self) -> CurrentAttestation | None:
        """The current attestation (EAR, claims, session private key), if valid right now."""
        attester = self._attester
        return attester.current(self._clock.now_ms()) if attester is not None else None

    def trust_state(self) -> TrustState:
        """A snapshot of the agent's standing (see :class:`TrustState`)."""
        now = self._clock.now_ms()
        attester, certificate = self._attester, self._certificate
        held = attester.held if attester is not None else None
        verdict = attester.last_verdict if attester is not None else None
        refusal = attester.last_refusal if attester is not None else None
        return TrustState(
            device_id=self.device_id,
            at_ms=now,
            enrollment=EnrollmentState.ENROLLED if certificate else EnrollmentState.NOT_ENROLLED,
            attestation=AttestationState.ATTESTED
            if self.attestation is not None
            else AttestationState.UNATTESTED,
            status=verdict.status if verdict is not None else None,
            reasons=verdict.reasons if verdict is not None else (),
            expires_at_ms=held.expires_at_ms if held is not None else None,
            result_id=held.claims.result_id if held is not None else None,
            policy_id=held.claims.policy_id if held is not None else None,
            certificate_not_after_ms=from_datetime(certificate.not_valid_after_utc)
            if certificate is not None
            else None,
            connected=self._runtime is not None and self._runtime.ready.is_set(),
            last_error=refusal or self._last_error,
        )

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        """Enroll if needed, then serve as the device until ``stop`` is set."""
        self._prepare()
        tpm = await self._open_tpm(stop)
        if tpm is None:
            return
        try:
            while not stop.is_set():
                if self._certificate is None and not await self._enroll(tpm, stop):
                    return
                ended = await self._serve_as_device(tpm, stop)
                if ended == "expired":  # back through the EK path (docs/adr/0005)
                    log.warning("certificate.expired", extra=fields(device=self.device_id))
                    self._set_certificate(None)
        finally:
            await asyncio.to_thread(tpm.close)

    def _prepare(self) -> None:
        """Every check that needs no TPM; checking the key waits for it (:meth:`_unlock`)."""
        self.state.prepare()
        trust_dir(self.config.state_dir).mkdir(mode=0o700, exist_ok=True)
        self._trust_store()  # an unreadable bundle or an expired CRL stops us here
        if self._enrolled_and_current():
            self._set_certificate(self.state.check_device_identity())
        else:  # never enrolled, or back after its certificate expired: enroll (again)
            self.state.check_enrollee()

    def _enrolled_and_current(self) -> bool:
        """Enrolled, with a certificate that has not expired (no TPM needed)."""
        if not self.state.is_enrolled():
            return False
        return not self._expired(self.state.check_device_identity())

    def _expired(self, certificate: x509.Certificate) -> bool:
        return self._clock.now_ms() >= from_datetime(certificate.not_valid_after_utc)

    def _unlock(self, tpm: AgentTpm) -> x509.Certificate | None:
        """Seal plain keys, unseal the keys this run needs; the device certificate if
        enrolled and current (checked for the unsealed key). Blocking: runs in a worker
        thread."""
        self.state.unlock(tpm)
        if self._enrolled_and_current():
            return self.state.device_certificate()
        self.state.enrollee_key()
        self.state.device_key()  # made and sealed before enrollment asks for it
        return None

    def _set_certificate(
        self, certificate: x509.Certificate | None, *, received: bool = False
    ) -> None:
        """``received``: the certificate just arrived (its renewal is timed from now)."""
        self._certificate = certificate
        self._received_at_ms = self._clock.now_ms() if received else None
        self.agent_metrics.enrolled.set(1 if certificate is not None else 0)

    def _failed(self, event: str, exc: EdgewardError) -> None:
        self._last_error = exc.reason
        log.error(event, extra=fields(device=self.device_id, reason=exc.reason, detail=exc.detail))

    async def _open_tpm(self, stop: asyncio.Event) -> AgentTpm | None:
        """The TPM, with the state unlocked; a key it cannot unseal ends the run."""
        delays = retry_delays(self.config.policy, self._rand)
        while not stop.is_set():
            try:
                tpm, certificate = await asyncio.to_thread(self._open_and_unlock)
            except ConfigError as exc:
                self._failed("agent.keys.unusable", exc)
                raise
            except EdgewardError as exc:
                self._failed("tpm.unavailable", exc)
            else:
                self._set_certificate(certificate)
                return tpm
            await wait_any(stop, seconds=next(delays))
        return None

    def _open_and_unlock(self) -> tuple[AgentTpm, x509.Certificate | None]:
        tpm = self._tpm_factory(self.config.tcti)
        try:
            return tpm, self._unlock(tpm)
        except BaseException:
            tpm.close()
            raise

    # ------------------------------------------------------------------ runtimes
    def _trust_store(self) -> TrustStore:
        """The adopted bundle if there is one (else the provisioned one), with the CRLs."""
        now = to_datetime(self._clock.now_ms())
        return load_trust(self.config.state_dir, self.config.ca_bundle, self.config.crl, now=now)

    def _mqtt_connect(
        self, identity: Identity, tls: IdentityFiles | TlsIdentity
    ) -> AbstractAsyncContextManager[Bus]:
        """Mutual-TLS MQTT, verifying the broker against the bundle held at this connect."""
        bundle = current_bundle(self.config.state_dir, self.config.ca_bundle)
        return mqtt_connector(self.config.broker, bundle)(identity, tls)

    def _runtime_for(
        self, key: SigningKey, tls: Callable[[], TlsIdentity], expected: Identity
    ) -> tuple[Runtime, Connect]:
        """A runtime signing with ``key`` whose connections present ``tls()`` (both held in
        memory: the keys are unsealed, never read from a file)."""
        if key.identity != expected:
            raise ConfigError(
                AgentReason.IDENTITY_MISMATCH, f"a certificate for {key.identity}, not {expected}"
            )
        runtime = Runtime(
            signing_key=key,
            verifier=EnvelopeVerifier(self._trust_store(), MemoryReplayGuard()),
            clock=self._clock,
            metrics=self.metrics,
        )
        connector = self._connector
        self._runtime = runtime
        return runtime, lambda: connector(key.identity, tls())

    async def _phase(
        self, runtime: Runtime, connect: Connect, work: Callable[[], Awaitable[T]]
    ) -> T:
        """Serve ``runtime`` while ``work`` runs; a ConfigError of either ends the phase."""
        phase_stop = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(runtime.run(connect, phase_stop))
                try:
                    return await work()
                finally:
                    phase_stop.set()
        except BaseExceptionGroup as failed:
            raise _first_leaf(failed) from None

    # ------------------------------------------------------------------ enrollment
    async def _enroll(self, tpm: AgentTpm, stop: asyncio.Event) -> bool:
        await asyncio.to_thread(self.state.enrollee_key)  # unsealed off the loop (come back)
        runtime, connect = self._runtime_for(
            self.state.enrollee_signing_key(),
            self.state.enrollee_tls,
            Identity.enrollee(self.device_id),
        )
        enrollment = Enrollment(
            self.device_id,
            self.config.device_class,
            tpm,
            self.state,
            self._clock,
            self.config.policy.request_timeout_s,
        )
        runtime.expect_replies(enrollment.down, REPLY_TYPES)
        return await self._phase(
            runtime, connect, lambda: self._enroll_until_done(runtime, enrollment, stop)
        )

    async def _enroll_until_done(
        self, runtime: Runtime, enrollment: Enrollment, stop: asyncio.Event
    ) -> bool:
        delays = retry_delays(self.config.policy, self._rand)
        while not stop.is_set():
            await wait_any(runtime.ready, stop)
            if stop.is_set():
                break
            if await self._try_enrollment(runtime, enrollment):
                return True
            await wait_any(stop, seconds=next(delays))
        return False

    async def _try_enrollment(self, runtime: Runtime, enrollment: Enrollment) -> bool:
        log.info("enrollment.started", extra=fields(device=self.device_id))
        try:
            certificate = await enrollment.attempt(runtime)
        except ConfigError:
            raise
        except EdgewardError as exc:
            self.agent_metrics.enrollment_failures.labels(exc.reason).inc()
            self._failed("enrollment.failed", exc)
            return False
        except Exception:  # a bug must not end a device that nobody can restart by hand
            log.exception("enrollment.crashed", extra=fields(device=self.device_id))
            self.agent_metrics.enrollment_failures.labels("agent.enroll.error").inc()
            self._last_error = "agent.enroll.error"
            return False
        self._set_certificate(certificate, received=True)
        self._last_error = None
        log.info(
            "enrollment.completed",
            extra=fields(
                device=self.device_id,
                serial=f"{certificate.serial_number:x}",
                not_after=certificate.not_valid_after_utc.isoformat(),
            ),
        )
        return True

    # ------------------------------------------------------------------ running as the device
    async def _serve_as_device(self, tpm: AgentTpm, stop: asyncio.Event) -> PhaseEnd:
        runtime, connect = self._runtime_for(
            self.state.device_signing_key(), self.state.device_tls, Identity.device(self.device_id)
        )
        self._phase_end.clear()
        self._ended = "stopped"
        self.renewer.expect_replies(runtime)
        self._attester = Attester(
            self.device_id,
            tpm,
            trust=runtime.verifier.trust,
            clock=self._clock,
            policy=self.config.policy,
            metrics=self.agent_metrics,
            on_adopted=self._adopted,
            event_log=functools.partial(read_event_log, event_log_path(self.config.event_log)),
            posture=None
            if self.config.posture_root is None
            else posture_reader(self.config.posture_root, self._clock),
        )
        answer_pings(runtime, device_topic(self.device_id, Direction.DOWN, Channel.HEALTH))
        runtime.route(
            device_topic(self.device_id, Direction.DOWN, Channel.ATTEST),
            [AttestationChallenge, AttestationResult],
            self._attester.handle,
            name="attest",
        )
        runtime.route(  # the verifier refused something we sent (e.g. asked too often)
            device_topic(self.device_id, Direction.DOWN, Channel.ATTEST),
            [Rejected],
            self._refused,
            name="attest.refused",
        )
        # a fresh store holds only its CRLs' serials (loaded by _trust_store)
        self.revocations.bind_trust(runtime.verifier.trust, runtime.verifier.trust.revoked_serials)
        self.trust.attach(runtime)
        self.revocations.attach(runtime)
        self.commands.attach(runtime)
        self.witness.attach(runtime)
        if self.config.models is not None:
            # a worker started, confined and idle before any model arrives: an activation
            # (tier high: strict) does not wait for an interpreter and onnxruntime's import
            sandbox = self.config.sandbox
            if sandbox is not None and sandbox.warm and self._warm is None:
                self._warm = WarmPool(sandbox)
                self._warm.refill(strict=True)
            self.models = ModelManager(
                self.device_id,
                ModelStore(self.config.state_dir),
                trust=lambda: runtime.verifier.trust,
                clock=self._clock,
                tpm=tpm,
                attestation=lambda: self.attestation,
                device_key=lambda: runtime.signing_key.key,
                policy=self.config.models,
                # the view is replaced by each newer list: look it up at every call
                revoked=lambda name, version: self.revocations.view.model_revoked(name, version),  # noqa: PLW0108
                loader=sandbox_loader(sandbox, self._warm)
                if sandbox is not None
                else in_process_loader,
            )
            self.models.install(runtime)
            self.on_revocations(self._unload_revoked_models)
            self.inference = DeviceInference(
                self.device_id,
                self.models,
                attestation=lambda: self._attester.held if self._attester else None,
                allowed=self.check_inference_allowed,
                clock=self._clock,
                state_dir=self.config.state_dir,
                policy=self.config.inference,
                executor=SandboxExecutor(),
                recorder=self.telemetry,
            )
            self.inference.install(runtime)
        try:
            await self._phase(
                runtime, self._counted(connect), lambda: self._device_work(runtime, stop)
            )
        finally:
            if self.models is not None:
                await self.models.close()  # the sandboxed workers end with the agent
            if self._warm is not None:
                await self._warm.close()
                self._warm = None
        return self._ended

    def _unload_revoked_models(self, view: RevocationView) -> None:
        del view  # the model manager asks the current view itself
        if self.models is not None:
            self.models.apply_revocations()

    async def _device_work(self, runtime: Runtime, stop: asyncio.Event) -> None:
        """Keep attested and, beside it, follow revocations and keep the assigned models."""
        async with asyncio.TaskGroup() as group:
            side = [
                group.create_task(self.revocations.watch(stop)),
                group.create_task(self._keep_certified(runtime, stop)),
                group.create_task(self._settle_renewals(runtime, stop)),
            ]
            if self.models is not None:
                side.append(
                    group.create_task(self.models.run(runtime, stop, self._asked_on_connection))
                )
            if self.inference is not None:
                side.append(
                    group.create_task(
                        self.inference.stream(runtime, stop, self._asked_on_connection)
                    )
                )
            if self.models is not None:  # connected or not: docs/offline.md
                side.append(group.create_task(self._follow_offline_policy(self.models, stop)))
            if self.telemetry is not None:
                side.append(
                    group.create_task(
                        send_reports(runtime, self.telemetry, self._telemetry_snapshot, stop)
                    )
                )
            await self._keep_attested(runtime, stop)
            for task in side:
                task.cancel()  # stopping or switching: no wait for a sync, download, inference

    def _telemetry_snapshot(self) -> Snapshot:
        """What the report says besides the counts (docs/telemetry.md)."""
        current = self.attestation
        held = self._attester.held if self._attester is not None else None
        loaded = list(self.models.loaded.values()) if self.models is not None else []
        rss, cpu = process_resources()
        return Snapshot(
            now_ms=self._clock.now_ms(),
            ear=current.ear if current is not None else None,
            attested=current is not None,
            stopped=self.stopped,
            offline=current is None and held is not None,
            protections=worst_protections(describe_all(loaded)),
            rss_bytes=rss,
            cpu_ms=cpu,
        )

    async def _follow_offline_policy(self, models: ModelManager, stop: asyncio.Event) -> None:
        """Unload what the offline policy no longer keeps, whether the broker answers or not."""
        while not stop.is_set():
            held = self._attester.held if self._attester is not None else None
            models.apply_offline(standing_of(held, self._clock.now_ms()), self.config.offline)
            await wait_any(stop, seconds=self.config.policy.max_sleep_s)

    async def _refused(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        reason = opened.message.reason
        self._last_error = reason
        log.info("attestation.refused", extra=fields(device=self.device_id, reason=reason))
        return ()

    def _counted(self, connect: Connect) -> Connect:
        """``connect``, counting connections and waking the scheduler when one ends."""

        @asynccontextmanager
        async def counted() -> AsyncIterator[Bus]:
            async with connect() as bus:
                self._connections += 1
                self._asked_on_connection.clear()
                try:
                    yield bus
                finally:
                    self._wake.set()

        return counted

    def _adopted(self, current: CurrentAttestation) -> None:
        self._schedule.adopted(current)
        self._wake.set()
        if self.models is not None:
            self.models.wake()  # a model waiting for an attestation result can get its key

    async def _keep_attested(self, runtime: Runtime, stop: asyncio.Event) -> None:
        """Send AttestationRequest when :class:`RequestSchedule` says so, until ``stop``."""
        schedule, seen = self._schedule, 0
        while not stop.is_set() and not self._phase_end.is_set():
            self._wake.clear()
            if not runtime.ready.is_set():
                await wait_any(runtime.ready, stop, self._phase_end)
                continue
            now = self._clock.now_ms()
            if self._connections != seen:
                seen = self._connections
                schedule.connected(now)
            reason = schedule.due(now)
            if reason is not None:
                schedule.requested(now)
                await self._request_attestation(runtime, reason)
                continue
            pause = min(schedule.wait_s(now), self.config.policy.max_sleep_s)
            await wait_any(stop, self._wake, self._phase_end, seconds=pause)

    async def _request_attestation(self, runtime: Runtime, reason: RequestReason) -> None:
        topic = device_topic(self.device_id, Direction.UP, Channel.ATTEST)
        try:
            await runtime.publish(Outgoing(topic, AttestationRequest(reason=reason)))
        except EdgewardError as exc:
            log.warning(
                "attestation.request_failed",
                extra=fields(device=self.device_id, reason=exc.reason, detail=exc.detail),
            )
            return
        finally:
            self._asked_on_connection.set()
        self.agent_metrics.attestation_requests.labels(reason).inc()
        log.info("attestation.requested", extra=fields(device=self.device_id, why=reason))

    # ------------------------------------------------------------------ renewal (ADR 0015)
    async def _keep_certified(self, runtime: Runtime, stop: asyncio.Event) -> None:
        """Renew at ``cert_renew_fraction`` of the certificate's lifetime (retrying with
        backoff); end the phase when it expires without a renewal."""
        delays = retry_delays(self.config.policy, self._rand)
        retry_at = 0
        # spread a fleet enrolled together: each certificate renews somewhere in the last
        # fifth before its fraction, drawn once, so devices do not renew in lockstep
        fraction = self.config.policy.cert_renew_fraction * (1.0 - CERT_RENEW_SPREAD * self._rand())
        while not stop.is_set() and not self._phase_end.is_set():
            certificate, now = self._certificate, self._clock.now_ms()
            if certificate is None:
                return
            if self._expired(certificate):
                self._end_phase("expired")
                return
            due = max(due_at_ms(certificate, fraction, self._received_at_ms), retry_at)
            if now >= due and runtime.ready.is_set():
                try:
                    await self._renew(runtime)
                except EdgewardError as exc:
                    self._failed("renewal.failed", exc)
                    retry_at = self._clock.now_ms() + int(next(delays) * 1000)
                    continue
                retry_at = 0  # the next certificate's own schedule, freshly spread
                fraction = self.config.policy.cert_renew_fraction * (
                    1.0 - CERT_RENEW_SPREAD * self._rand()
                )
                continue
            pause = min(max(0.0, (due - now) / 1000), self.config.policy.max_sleep_s)
            await wait_any(stop, self._phase_end, seconds=pause)

    async def _rotate_now(self) -> str:
        """``rotate-cert``: renew at once; the new serial (the phase ends after the receipt)."""
        runtime = self._runtime
        if runtime is None:
            raise RenewalError(RenewReason.NOT_RUNNING, "not running as the device")
        return serial_of(await self._renew(runtime))

    async def _renew(self, runtime: Runtime) -> x509.Certificate:
        async with self._renewing:
            if self._phase_end.is_set():  # already switching: one renewal per phase
                raise RenewalError(RenewReason.BUSY, "the certificate is being switched")
            previous = self._certificate
            try:
                certificate = await self.renewer.renew(runtime)
            except EdgewardError as exc:
                self.agent_metrics.renewals.labels(exc.reason).inc()
                raise
            self.agent_metrics.renewals.labels("renewed").inc()
            if previous is not None:
                self._unsettled = (serial_of(certificate), serial_of(previous))
                self.state.record_unsettled(*self._unsettled)
            self._set_certificate(certificate, received=True)
            self.renewals += 1
            self._last_error = None
            log.info(
                "certificate.renewed",
                extra=fields(
                    device=self.device_id,
                    serial=serial_of(certificate),
                    previous=serial_of(previous) if previous is not None else None,
                    not_after=certificate.not_valid_after_utc.isoformat(),
                ),
            )
            # switch in place: sign with the new key now, reconnect with it without losing
            # a message; models, workers and the attestation stay (docs/adr/0015)
            self._switched_after = self._connections
            runtime.swap_identity(self.state.device_signing_key())
            self._renewed.set()
            return certificate

    def _end_phase(self, ended: PhaseEnd) -> None:
        self._ended = ended
        self._phase_end.set()

    async def _settle_renewals(self, runtime: Runtime, stop: asyncio.Event) -> None:
        """After each in-place switch, once connected with the new certificate, settle it."""
        if self._unsettled is None:  # a renewal of an earlier run, not settled before it ended
            pending, current = self.state.unsettled(), self._certificate
            if pending is not None and current is not None and pending[0] == serial_of(current):
                self._unsettled = pending
            elif pending is not None:  # for a certificate this device no longer uses
                self.state.clear_unsettled()
        if self._unsettled is not None:  # a renewal of an earlier phase or run
            self._renewed.set()
        while not stop.is_set() and not self._phase_end.is_set():
            await wait_any(stop, self._phase_end, self._renewed)
            if stop.is_set() or self._phase_end.is_set():
                return
            self._renewed.clear()
            while self._connections <= self._switched_after or not runtime.ready.is_set():
                await wait_any(stop, self._phase_end, seconds=SWITCH_POLL_S)
                if stop.is_set() or self._phase_end.is_set():
                    return
            await self._settle_renewal(runtime, stop)

    async def _settle_renewal(self, runtime: Runtime, stop: asyncio.Event) -> None:
        """First thing on a renewed certificate: say so (signed with it), so the identity
        service has the old one revoked; a few attempts, then the old one just expires."""
        delays = retry_delays(self.config.policy, self._rand)
        for _ in range(SETTLE_ATTEMPTS):
            if self._unsettled is None or stop.is_set():
                return
            await wait_any(runtime.ready, stop, self._phase_end)
            if stop.is_set() or self._phase_end.is_set():
                return
            serial, previous = self._unsettled
            try:
                settled = await self.renewer.settle(runtime, serial, previous)
            except EdgewardError as exc:
                self._failed("renewal.unsettled", exc)
                await wait_any(stop, self._phase_end, seconds=next(delays))
                continue
            self._unsettled = None
            self.state.clear_unsettled()
            log.info(
                "renewal.settled",
                extra=fields(device=self.device_id, previous=previous, job=settled.job_id),
            )
