"""The agent's configuration (what the operator sets) and its timing policy (with defaults).

Nothing here reads files or the clock: :class:`AgentConfig` names paths and addresses, the
agent opens them. :class:`AgentPolicy` holds every timing decision in one place, with the
reasons for the defaults; ``python -m edgeward_device_agent --help`` exposes each of them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edgeward_device_agent.device_keys import SealPolicy
from edgeward_device_agent.inference import InferencePolicy
from edgeward_device_agent.model_manager import ModelPolicy
from edgeward_device_agent.offline import OfflinePolicy
from edgeward_device_agent.sandbox.supervisor import SandboxPolicy
from edgeward_shared.bus.mqtt import BrokerAddress
from edgeward_shared.identity import Identity

#: docs/protocol.md 5.3: ``device_class`` of an enrollment request.
DEVICE_CLASS_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")


@dataclass(frozen=True, slots=True)
class AgentPolicy:
    """How long the agent waits, how it retries, and when it renews.

    * ``request_timeout_s``: the wait for each enrollment reply (challenge, certificate);
      the registrar may call the identity service before it answers. Generous on purpose:
      when a site powers on, hundreds of devices enroll at once and the registrar answers
      them in turn (measured: ~13 enrollments+attestations/s on a 2-core host); a short
      timeout would make them retry and re-queue work the registrar is already doing.
    * ``retry_base_s`` / ``retry_cap_s``: every retry (TPM not reachable, enrollment
      rejected or unanswered, attestation request unanswered) waits
      ``min(cap, base * 2**n)`` times a jitter in [0.5, 1), so a fleet does not retry in step.
      Retries never stop: a device in the field has nobody to restart it.
    * ``renew_fraction``: ask for a fresh attestation when this fraction of the current
      result's lifetime (``iat`` to ``exp``) has passed (0.8: a fifth of the lifetime left).
    * ``cert_renew_fraction``: renew the device certificate (a new key, bound to the current
      attestation: docs/adr/0015) when this fraction of its lifetime has passed (0.5, as
      SPIRE does: half the lifetime is left to retry through an outage).
    * ``result_grace_s``: how long after a challenge's expiry the session key made for its
      evidence waits for a result before it is forgotten.
    * ``max_sleep_s``: the attestation scheduler re-reads the clock at least this often
      (wall-clock jumps, a suspended device, a test's clock).
    """

    request_timeout_s: float = 30.0
    retry_base_s: float = 1.0
    retry_cap_s: float = 60.0
    renew_fraction: float = 0.8
    cert_renew_fraction: float = 0.5
    result_grace_s: float = 60.0
    max_sleep_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0.0 < self.renew_fraction < 1.0 or not 0.0 < self.cert_renew_fraction < 1.0:
            raise ValueError("renew_fraction and cert_renew_fraction are strictly between 0 and 1")
        if min(self.request_timeout_s, self.retry_base_s, self.max_sleep_s) <= 0:
            raise ValueError("timeouts, retry base and sleep bound must be positive")
        if self.retry_cap_s < self.retry_base_s or self.result_grace_s < 0:
            raise ValueError("retry cap below its base, or a negative grace")


def retry_delays(policy: AgentPolicy, rand: Callable[[], float] = random.random) -> Iterator[float]:
    """Seconds to wait before retry n = 0, 1, 2, ...: capped exponential, jitter [0.5, 1)."""
    attempt = 0
    while True:
        ceiling = min(policy.retry_cap_s, policy.retry_base_s * 2.0**attempt)
        yield ceiling * (0.5 + rand() / 2.0)
        attempt = min(attempt + 1, 32)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """One device agent: who it is, where its TPM, state and trust anchors are, and its broker.

    ``state_dir`` (0700) holds ``enrollee/`` (provisioned: cert.pem, key.pem, chain.pem as
    ``edgeward pki issue enrollee <id>`` writes them; the agent seals key.pem at its first
    start), ``device/`` (written by the agent at enrollment) and ``trust/`` (the fleet trust
    bundle it adopted, used instead of ``ca_bundle`` once there, docs/adr/0017). ``crl`` is
    the issuing CAs' CRLs; the agent refuses to start with an expired one (fail closed),
    like every other Edgeward process. ``seal`` is the PCR policy the keys are sealed to
    (docs/adr/0016); it may not include the PCR the agent extends with models.
    """

    device_id: str
    device_class: str
    tcti: str
    state_dir: Path
    ca_bundle: Path
    crl: Path
    broker: BrokerAddress
    metrics_port: int | None = None
    policy: AgentPolicy = field(default_factory=AgentPolicy)
    #: how the agent follows the models assigned to it; None: it runs no models
    models: ModelPolicy | None = field(default_factory=ModelPolicy)
    #: inference requests and the sensor stream (only with ``models``)
    inference: InferencePolicy = field(default_factory=InferencePolicy)
    #: what keeps serving when the device cannot attest (docs/offline.md)
    offline: OfflinePolicy = field(default_factory=OfflinePolicy)
    #: where models run: a sandboxed worker per model (docs/sandbox.md); None: in the
    #: agent's process (development only: tier-high models are then refused)
    sandbox: SandboxPolicy | None = field(default_factory=SandboxPolicy)
    #: the boot PCRs the device's keys are sealed to (docs/adr/0016-device-key-sealing.md)
    seal: SealPolicy = field(default_factory=SealPolicy)
    #: a signed telemetry report every this many seconds (docs/telemetry.md); None: none
    telemetry_period_s: float | None = None
    #: the TCG boot event log sent with each quote (docs/adr/0021); None: ``$EDGEWARD_EVENT_LOG``
    #: if set, else Linux's ``/sys/kernel/security/tpm0/binary_bios_measurements``
    event_log: Path | None = None
    #: report the posture of the system below this root with each quote (docs/adr/0026):
    #: ``/`` on a device (``python -m edgeward_device_agent`` defaults to it); None: no
    #: report (simulated fleets: their host's posture is not theirs)
    posture_root: Path | None = None

    def __post_init__(self) -> None:
        Identity.device(self.device_id)  # raises ValueError for an invalid device id
        if self.telemetry_period_s is not None and not 1 <= self.telemetry_period_s <= 3600:
            raise ValueError("the telemetry period is between 1 s and 1 h")
        if not DEVICE_CLASS_RE.fullmatch(self.device_class):
            raise ValueError(f"invalid device class {self.device_class!r}")
        if self.models is not None and self.models.model_pcr in self.seal.pcrs:
            raise ValueError(
                f"PCR {self.models.model_pcr} is extended with models at run time:"
                " the device key cannot be sealed to it"
            )
