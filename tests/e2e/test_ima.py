"""Issue 19's IMA half end to end, all parts real: mosquitto with the repository's config,
the identity and attestation services, device agents on swtpm TPMs whose development boot
wrote a real IMA log (binary ``ima-ng``) and extended PCR 10 with it, an operator driving
the CLI (docs/adr/0033).

The operator records a policy over PCRs 0-7 and 10 from a reference device: its boot log
gives the reference events, its IMA log the allowlist. A device that runs a trojaned agent
binary and a dropped miner is refused with ``attestation.ima.not_allowed`` and ``edgeward
device show`` names both files. A golden device attests, and when its kernel measures one
more file the next attestation sends only that entry (incremental transfer): the verifier's
progress moves by one entry; a file off the allowlist measured at run time turns the
device untrusted at its next attestation.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator

import pytest
from tests.e2e.fabric import (
    BOOT_PCRS,
    DEVICE_CLASS,
    World,
    agent_running,
    make_world,
    services,
    until,
)

from edgeward_attestation.ima import ImaProgress
from edgeward_attestation.store import AttestationStore
from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_agent.ima_log import IMA_PCR, ima_entry, template_data
from edgeward_device_agent.tpm import PcrBank
from edgeward_device_sim.swtpm import (
    GOLDEN_BOOT_CHAIN,
    SwtpmDevice,
    tampered_runtime,
)

pytestmark = [pytest.mark.tpm, pytest.mark.broker]
PCRS = ",".join(str(i) for i in [*BOOT_PCRS, IMA_PCR])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("e2e-ima")) as built:
        yield built


async def agent(world: World, store: AttestationStore, name: str, tpm: SwtpmDevice) -> DeviceAgent:
    return await world.new_agent(
        store, name, tpm.tcti, event_log=tpm.event_log, ima_log=tpm.ima_log
    )


def measure(tpm: SwtpmDevice, path: str, contents: bytes) -> None:
    """The device's kernel measures one more file: PCR 10 extended, the log appended."""
    entry = ima_entry(path, hashlib.sha256(contents).digest())
    with tpm.open() as opened:
        opened.extend_pcr(IMA_PCR, {PcrBank.SHA256: hashlib.sha256(template_data(entry)).digest()})
    with tpm.ima_log.open("ab") as log:
        log.write(entry)


async def progress_of(store: AttestationStore, device_id: str, entries: int) -> ImaProgress:
    for _ in range(200):
        progress = await store.ima_progress(device_id, "ima-1")
        if progress is not None and progress.entries == entries:
            return progress
        await asyncio.sleep(0.1)
    raise AssertionError(f"{device_id}: progress {progress}, wanted {entries} entries")


@pytest.mark.asyncio
async def test_the_ima_log_is_replayed_appraised_and_sent_incrementally(world: World) -> None:
    ref = world.fleet.start("tpm-ima-ref", GOLDEN_BOOT_CHAIN)
    good = world.fleet.start("tpm-ima-good", GOLDEN_BOOT_CHAIN)
    bad = world.fleet.start("tpm-ima-bad", GOLDEN_BOOT_CHAIN, tampered_runtime())
    async with services(world, reattest_ms=1000) as store:
        reference = await agent(world, store, "dev-ima-ref", ref)
        async with agent_running(reference):
            assert await until(lambda: reference.trust_state().enrolled)
            await asyncio.to_thread(
                world.cli, "policy", "record", "ima-1", "--class", DEVICE_CLASS,
                "--pcrs", PCRS, "--from-device", "dev-ima-ref",
            )  # fmt: skip
            for _ in range(200):
                row = await store.policy("ima-1")
                if row is not None and row.policy is not None:
                    break
                await asyncio.sleep(0.1)
            assert row is not None
            assert row.policy is not None
            assert row.policy.ima is not None
            assert "/usr/bin/edgeward-agent" in row.policy.ima.allowlist
            assert "10" not in row.policy.allowlist  # PCR 10 is appraised by its log
            await asyncio.to_thread(world.cli, "policy", "approve", "ima-1")
            assert await until(lambda: reference.trust_state().attested), reference.trust_state()

        honest = await agent(world, store, "dev-ima-good", good)
        tampered = await agent(world, store, "dev-ima-bad", bad)
        async with agent_running(honest), agent_running(tampered):
            assert await until(lambda: honest.trust_state().attested), honest.trust_state()
            assert await until(lambda: bool(tampered.trust_state().reasons))
            shown = await asyncio.to_thread(world.cli, "device", "show", "dev-ima-bad")
            first = await progress_of(store, "dev-ima-good", 6)  # boot_aggregate + 5 files

            measure(good, "/usr/bin/python3.12", b"python 3.12.3")  # allowed: run again
            second = await progress_of(store, "dev-ima-good", 7)
            assert honest.trust_state().attested
            measure(good, "/tmp/.x/miner", b"xmrig")
            assert await until(lambda: not honest.trust_state().attested)
            shown_good = await asyncio.to_thread(world.cli, "device", "show", "dev-ima-good")
            after = await store.ima_progress("dev-ima-good", "ima-1")

    assert tampered.trust_state().reasons == ("attestation.ima.not_allowed",)
    assert "untrusted" in shown
    assert "IMA /usr/bin/edgeward-agent: expected " in shown
    assert "IMA /tmp/.x/miner: expected (not in the allowlist), found " in shown
    assert first.reset_count == second.reset_count
    assert first.pcr != second.pcr
    assert honest.trust_state().reasons == ("attestation.ima.not_allowed",)
    assert "IMA /tmp/.x/miner" in shown_good
    assert after == second  # a refused entry does not move the progress: the boot is tainted
