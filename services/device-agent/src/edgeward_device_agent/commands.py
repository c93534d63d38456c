"""Operators' commands on the device: who may order what, the action, and a signed receipt.

Route ``ew/v1/dev/<id>/down/cmd``. The runtime has already checked the envelope (chain,
signature, time window, the operator role the topic requires, in-process replay); then
:class:`CommandHandler` carries out the pure decision of
:func:`edgeward_device_agent.core.admit_command`, which checks, in order:

1. the signer may sign this verb: an operator any, the telemetry service ``stop`` only
   (``command.signer.not_operator``; :func:`~edgeward_shared.messages.command.may_command`,
   docs/adr/0022; the topic rule already admits only these two);
2. the command names this device (``command.target.mismatch``);
3. it was never received before, across restarts (``command.replay``; the ledger);
4. the revocation list held is current (else only ``stop`` is obeyed, the safe direction:
   ``command.revocations.stale``) and revokes neither the operator, nor its certificate,
   nor its key (``command.signer.revoked``).

Then it acts and answers with a :class:`CommandReceipt` signed by the device key, binding
the SHA-256 of the command envelope's bytes. A rejection after the envelope check is
answered with a receipt too (``outcome = "rejected"``) so the operator's record says why;
a replay is refused without a receipt (the runtime answers ``Rejected``). Every outcome is
counted (``edgeward_agent_commands_total{verb,outcome,reason}``) and logged.

``stop`` is written to the ledger before its receipt leaves; :attr:`stopped` gates every
inference entry point until a ``resume``. ``re-attest`` also sends an AttestationRequest;
``unload-model`` calls the hooks the model manager registers; ``rotate-cert`` renews the
device certificate now (the hook the agent registers, docs/adr/0015) and its receipt names
the new serial, or answers ``failed`` with the renewal's reason id.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from edgeward_device_agent.core import ReplayRecord, admit_command
from edgeward_device_agent.ledger import DeviceLedger
from edgeward_device_agent.revocations import RevocationHolder
from edgeward_shared.clock import Clock
from edgeward_shared.command_log import CommandReason, command_digest
from edgeward_shared.envelope import Opened
from edgeward_shared.errors import EdgewardError, PolicyError
from edgeward_shared.logs import fields
from edgeward_shared.messages.attest import AttestationRequest
from edgeward_shared.messages.command import (
    COMMAND_TYPES,
    Command,
    CommandReceipt,
    Outcome,
    ReattestCommand,
    ResumeCommand,
    RotateCertCommand,
    StopCommand,
    UnloadModelCommand,
)
from edgeward_shared.runtime.core import Outgoing, Runtime
from edgeward_shared.topics import Channel, Direction, device_topic

log = logging.getLogger("edgeward.agent.commands")
UnloadHook = Callable[[str, int], bool]
#: Renews the device certificate now; returns the new serial (lowercase hex).
RotateHook = Callable[[], Awaitable[str]]
INFERENCE_STOPPED = "agent.inference.stopped"


class CommandHandler:
    """Decides on and carries out one device's commands (see the module docstring)."""

    def __init__(
        self,
        device_id: str,
        ledger: DeviceLedger,
        revocations: RevocationHolder,
        clock: Clock,
        registry: CollectorRegistry,
        *,
        clock_skew_ms: int = 30_000,
    ) -> None:
        self.device_id = device_id
        self._ledger = ledger
        self._revocations = revocations
        self._clock = clock
        self._skew = clock_skew_ms
        self._unload_hooks: list[UnloadHook] = []
        self._rotate: RotateHook | None = None
        self.counted = Counter(
            "edgeward_agent_commands_total",
            "Commands decided, by verb, outcome and reason id",
            ["verb", "outcome", "reason"],
            registry=registry,
        )

    @property
    def stopped(self) -> bool:
        return self._ledger.stopped

    def check_inference_allowed(self) -> None:
        """Raise ``PolicyError(agent.inference.stopped)`` while a ``stop`` holds."""
        if self._ledger.stopped:
            raise PolicyError(INFERENCE_STOPPED, f"stopped by command {self._ledger.stopped_by}")

    def on_unload_model(self, hook: UnloadHook) -> None:
        """``hook(name, version)`` unloads a model version; True if it was loaded."""
        self._unload_hooks.append(hook)

    def on_rotate_cert(self, hook: RotateHook) -> None:
        """``await hook()`` renews the device certificate and returns the new serial."""
        self._rotate = hook

    def attach(self, runtime: Runtime) -> None:
        runtime.route(
            device_topic(self.device_id, Direction.DOWN, Channel.COMMAND),
            COMMAND_TYPES,
            self.handle,
            name="commands",
        )

    async def handle(self, opened: Opened[Any]) -> Sequence[Outgoing]:
        command: Command = opened.message
        verb = command.TYPE.split(".")[2]
        try:
            self._admit(opened, command)
        except PolicyError as refused:
            self._ledger.flush()  # the replay record, before the receipt
            return self._answer(opened, verb, "rejected", refused.reason)
        if not isinstance(command, StopCommand | ResumeCommand):
            self._ledger.flush()  # on disk before anything is done
        # stop / resume: one write carries the replay record and the new state
        outcome, reason, extra, serial = await self._act(opened, command)
        self._ledger.flush()  # nothing left, but never answer with a record unwritten
        return [*self._answer(opened, verb, outcome, reason, serial), *extra]

    def _admit(self, opened: Opened[Any], command: Command) -> None:
        """Carry out :func:`admit_command`'s decision: persist the replay record, then
        raise ``PolicyError`` with the refusal, if any (a replay raises from the ledger)."""
        now = self._clock.now_ms()
        admission = admit_command(
            command,
            opened.signer,
            mid=opened.mid,
            exp_ms=opened.exp,
            device_id=self.device_id,
            revocations=self._revocations.view,
            now_ms=now,
            clock_skew_ms=self._skew,
        )
        if admission.record is not None:
            self._record(admission.record, command, now)
        if admission.refusal is not None:
            raise PolicyError(admission.refusal.reason, admission.refusal.detail)

    def _record(self, record: ReplayRecord, command: Command, now_ms: int) -> None:
        try:  # persisted before anything is done (``handle`` flushes): a replay after a
            # restart is refused too
            self._ledger.record_command(record.key, record.forget_after_ms, now_ms, flush=False)
        except Exception:
            self.counted.labels(command.TYPE.split(".")[2], "refused", CommandReason.REPLAY).inc()
            raise

    async def _act(
        self, opened: Opened[Any], command: Command
    ) -> tuple[Outcome, str, Sequence[Outgoing], str | None]:
        if isinstance(command, RotateCertCommand):
            return await self._rotate_cert()
        outcome, reason, extra = self._act_now(opened, command)
        return outcome, reason, extra, None

    async def _rotate_cert(self) -> tuple[Outcome, str, Sequence[Outgoing], str | None]:
        if self._rotate is None:
            return "failed", CommandReason.UNSUPPORTED, (), None
        try:
            serial = await self._rotate()
        except EdgewardError as exc:
            return "failed", exc.reason, (), None
        return "done", CommandReason.DONE, (), serial

    def _act_now(
        self, opened: Opened[Any], command: Command
    ) -> tuple[Outcome, str, Sequence[Outgoing]]:
        match command:
            case StopCommand():
                self._ledger.set_stopped(True, opened.mid)  # on disk before the receipt
            case ResumeCommand():
                self._ledger.set_stopped(False, None)
            case UnloadModelCommand(model=name, version=version):
                if not self._unload_hooks:
                    return "failed", CommandReason.UNSUPPORTED, ()
                for hook in self._unload_hooks:
                    hook(name, version)
            case ReattestCommand():
                topic = device_topic(self.device_id, Direction.UP, Channel.ATTEST)
                return (
                    "done",
                    CommandReason.DONE,
                    (Outgoing(topic, AttestationRequest(reason="renew")),),
                )
        return "done", CommandReason.DONE, ()

    def _answer(
        self,
        opened: Opened[Any],
        verb: str,
        outcome: Outcome,
        reason: str,
        serial: str | None = None,
    ) -> Sequence[Outgoing]:
        self.counted.labels(verb, outcome, reason).inc()
        level = logging.INFO if outcome == "done" else logging.WARNING
        log.log(
            level,
            "command.decided",
            extra=fields(
                device=self.device_id,
                verb=verb,
                outcome=outcome,
                reason=reason,
                operator=str(opened.signer.identity),
                mid=opened.mid,
                serial=serial,
            ),
        )
        receipt = CommandReceipt(
            in_reply_to=opened.mid,
            command_digest=command_digest(opened.raw),
            device_id=self.device_id,
            outcome=outcome,
            reason=reason,
            at_ms=self._clock.now_ms(),
            serial=serial,
        )
        return (Outgoing(device_topic(self.device_id, Direction.UP, Channel.COMMAND), receipt),)
