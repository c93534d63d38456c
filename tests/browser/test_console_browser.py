"""The operator console in a real headless browser, over the real demo fleet.

Debian's chromium driven by Selenium logs in with the demo operator's certificate, sees
the fleet (one attested device, one untrusted), opens the untrusted one and finds the PCR
that differs, stops a device and watches its receipt arrive, watches a gated rollout's
wave change live (server-sent events, no reload), checks that the audit checkpoint
verifies and downloads an inclusion proof, which is then checked here independently.
Hostile strings go through the services and come back as text. Screenshots are saved in
``.test-artifacts/console/``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from tests.browser.console_world import DemoFleet, browser, demo_fleet, nss_home, screenshot

from edgeward_cli.demo_models import demo_model
from edgeward_shared.audit.merkle import leaf_hash, verify_inclusion
from edgeward_shared.identity import Identity

pytestmark = [pytest.mark.broker, pytest.mark.tpm, pytest.mark.browser, pytest.mark.slow]

WAIT_S = 45
HOSTILE = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoFleet]:
    with demo_fleet(tmp_path_factory.mktemp("demo") / "demo") as world:
        yield world


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def operator(
    fleet: DemoFleet, tmp_path_factory: pytest.TempPathFactory, downloads: Path
) -> Iterator[WebDriver]:
    home = nss_home(tmp_path_factory.mktemp("operator-home"), fleet.pki, Identity.operator("admin"))
    with browser(home, downloads) as driver:
        yield driver


def _wait(driver: WebDriver, condition: object, what: str) -> None:
    WebDriverWait(driver, WAIT_S, poll_frequency=0.25).until(condition, what)  # type: ignore[arg-type]


def _attr(driver: WebDriver, css: str, name: str) -> str | None:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].get_attribute(name) if found else None


def _no_script_ran(driver: WebDriver) -> None:
    assert driver.execute_script("return window.__pwned === undefined")
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not [e for e in severe if "Content Security Policy" in e["message"]], severe


def test_login_and_the_demo_fleet(fleet: DemoFleet, operator: WebDriver) -> None:
    operator.get(fleet.url)
    _wait(operator, lambda d: d.find_elements(By.CSS_SELECTOR, "tr[data-device]"), "fleet rows")
    assert operator.find_element(By.ID, "operator").text == "op.admin"
    trust = {
        row.get_attribute("data-device"): row.get_attribute("data-trust")
        for row in operator.find_elements(By.CSS_SELECTOR, "tr[data-device]")
    }
    assert trust == {"edge-0001": "attested", "edge-0002": "untrusted"}
    assert _attr(operator, "[data-count=attested]", "textContent") == "1"
    assert _attr(operator, "[data-count=untrusted]", "textContent") == "1"
    row = operator.find_element(By.CSS_SELECTOR, "tr[data-device=edge-0001]").text
    assert "edge-classifier v1" in row  # the model it runs
    assert "revoked" in operator.find_element(By.CSS_SELECTOR, "tr[data-device=edge-0002]").text
    screenshot(operator, "01-fleet")
    # filters and search
    operator.get(fleet.url + "fleet?state=untrusted")
    rows = operator.find_elements(By.CSS_SELECTOR, "tr[data-device]")
    assert [r.get_attribute("data-device") for r in rows] == ["edge-0002"]
    operator.get(fleet.url + "fleet?q=0001")
    rows = operator.find_elements(By.CSS_SELECTOR, "tr[data-device]")
    assert [r.get_attribute("data-device") for r in rows] == ["edge-0001"]
    _no_script_ran(operator)


def test_the_untrusted_device_shows_the_differing_pcr(
    fleet: DemoFleet, operator: WebDriver
) -> None:
    operator.get(fleet.url + "fleet")
    operator.find_element(By.LINK_TEXT, "edge-0002").click()
    _wait(operator, lambda d: d.find_elements(By.ID, "device-id"), "device page")
    assert operator.find_element(By.ID, "trust").text == "untrusted"
    differing = operator.find_elements(By.CSS_SELECTOR, "tr.differs")
    assert [row.get_attribute("data-pcr") for row in differing] == ["4"]
    assert "EV_EFI_BOOT_SERVICES_APPLICATION" in differing[0].text
    same = operator.find_elements(By.CSS_SELECTOR, "tr[data-differs=no]")
    assert {row.get_attribute("data-pcr") for row in same} >= {"0", "1", "2", "3", "7"}
    screenshot(operator, "02-untrusted-device")


def test_stop_a_device_and_see_the_receipt(fleet: DemoFleet, operator: WebDriver) -> None:
    operator.get(fleet.url + "device/edge-0001")
    operator.find_element(By.ID, "action-stop").click()
    _wait(operator, lambda d: d.find_elements(By.ID, "confirm"), "confirmation page")
    assert operator.find_element(By.ID, "target").text == "edge-0001"
    operator.find_element(By.ID, "reason").send_keys(HOSTILE)
    screenshot(operator, "03-confirm-stop")
    operator.find_element(By.ID, "confirm").click()
    _wait(
        operator,
        lambda d: _attr(d, "#commands tr[data-verb=stop]", "data-outcome") == "done",
        "the stop's receipt",
    )
    row = operator.find_element(By.CSS_SELECTOR, "#commands tr[data-verb=stop]")
    assert HOSTILE in row.text  # shown as the text it is
    assert "op.admin.console" in row.text  # signed in the operator's name
    assert "command.done" in row.text
    screenshot(operator, "04-stop-receipt")
    _no_script_ran(operator)
    # the console's command log: both envelopes re-verified offline, the receipt bound
    log = fleet.root / "state" / "console-commands.jsonl"
    out = fleet.cli(
        *("command", "verify", str(log)),
        *("--ca-bundle", str(fleet.pki.bundle_path), "--crl", str(fleet.pki.crl_path)),
    )
    assert "edge-0001" in out
    assert "command:ok receipt:ok" in out
    assert "every command and receipt verifies" in out


def test_a_rollouts_wave_progress_updates_live(
    fleet: DemoFleet, operator: WebDriver, tmp_path: Path
) -> None:
    # v2 is the demo's bad version (act 13b), aborted and rolled back by its gate
    model = tmp_path / "model.onnx"
    model.write_bytes(demo_model())
    fleet.cli(
        *("model", "publish", str(model), "--name", "edge-classifier", "--version", "3"),
        *("--tier", "high", "--dataset-fingerprint", "sha256:demo"),
    )
    fleet.cli(
        *("model", "rollout", "edge-classifier", "3", "--device", "edge-0001"),
        *("--waves", "10,50,100", "--manual"),
    )
    operator.get(fleet.url + "models")
    version = operator.find_element(
        By.CSS_SELECTOR, "tr[data-model=edge-classifier][data-version='3']"
    )
    assert version.find_element(By.CSS_SELECTOR, "td.signer").text == "signer.ci"  # provenance
    assert "sha256:demo" in version.text
    section = "section[data-rollout='edge-classifier@3']"
    _wait(operator, lambda d: _attr(d, section, "data-phase") == "canary", "the canary")
    heading = operator.find_element(By.TAG_NAME, "h1")
    screenshot(operator, "05-rollout-canary")
    fleet.cli("model", "promote", "edge-classifier", "3", "--reason", "from the CLI")
    _wait(operator, lambda d: _attr(d, section, "data-wave") == "wave-1", "wave-1, live")
    assert heading.text == "Models"  # the same document: updated in place, not reloaded
    assert _attr(operator, section, "data-percent") == "50"
    screenshot(operator, "06-rollout-wave-1-live")
    # pause it from the console, with a hostile reason that the service keeps
    operator.find_element(By.ID, "rollout-pause-edge-classifier-3").click()
    operator.find_element(By.ID, "reason").send_keys(HOSTILE)
    operator.find_element(By.ID, "confirm").click()
    _wait(operator, lambda d: _attr(d, section, "data-phase") == "paused", "paused")
    assert HOSTILE in operator.find_element(By.CSS_SELECTOR, section + " p.text").text
    screenshot(operator, "07-rollout-paused")
    _no_script_ran(operator)


def test_the_audit_checkpoint_verifies_and_a_proof_downloads(
    fleet: DemoFleet, operator: WebDriver, downloads: Path
) -> None:
    operator.get(fleet.url + "audit")
    for log in ("attestation", "revocation"):
        assert _attr(operator, f"section[data-log={log}]", "data-verified") == "yes"
        assert "Checkpoint verifies" in operator.find_element(By.ID, f"verified-{log}").text
    screenshot(operator, "08-audit")
    link = operator.find_element(By.CSS_SELECTOR, "section[data-log=attestation] a.proof")
    link.click()
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and not list(downloads.glob("attestation-entry-*.json")):
        time.sleep(0.2)
    files = list(downloads.glob("attestation-entry-*.json"))
    assert files, "no proof downloaded"
    proof = json.loads(files[0].read_text())
    import base64

    assert verify_inclusion(
        proof["index"],
        proof["tree_size"],
        leaf_hash(proof["entry"].encode()),
        [bytes.fromhex(h) for h in proof["proof"]],
        base64.b64decode(proof["root"]),
    )


def test_charts_and_revocations(fleet: DemoFleet, operator: WebDriver) -> None:
    # an inference the console sees (the gateway's signed result event), on a running device
    fleet.cli("command", "resume", "edge-0001", "--reason", "charts")
    deadline = time.monotonic() + WAIT_S
    while not fleet.cli_ok("infer", "edge-0001", "--model", "edge-classifier", "--random", "1x16"):
        assert time.monotonic() < deadline, "no inference accepted"
        time.sleep(1)
    operator.get(fleet.url + "charts")
    for chart in ("chart-trust", "chart-progress", "chart-latency", "chart-errors"):
        assert operator.find_elements(By.CSS_SELECTOR, f"#{chart} svg")
    assert operator.find_elements(By.CSS_SELECTOR, "#chart-trust polyline")
    assert operator.find_elements(By.CSS_SELECTOR, "#chart-progress polyline")
    assert "edge-classifier v3" in operator.find_element(By.ID, "chart-latency").text
    screenshot(operator, "09-charts")
    operator.get(fleet.url + "revocations")
    assert "version" in operator.find_element(By.ID, "list").text
    assert operator.find_elements(By.CSS_SELECTOR, "tr[data-subject=edge-0002]")
    screenshot(operator, "10-revocations")


def test_revoke_through_the_console_with_a_hostile_reason(
    fleet: DemoFleet, operator: WebDriver
) -> None:
    """The tampered device (already revoked by the demo) revoked again from its page: the
    revocation service records the job with the console session as actor and keeps the
    reason, which the Revocations page shows as text."""
    operator.get(fleet.url + "device/edge-0002")
    operator.find_element(By.ID, "action-revoke").click()
    operator.find_element(By.ID, "reason").send_keys(HOSTILE)
    operator.find_element(By.ID, "confirm").click()
    _wait(operator, lambda d: d.find_elements(By.ID, "device-id"), "back on the device page")
    operator.get(fleet.url + "revocations")
    jobs = [
        row.text
        for row in operator.find_elements(By.CSS_SELECTOR, "tr[data-subject=edge-0002]")
        if HOSTILE in row.text
    ]
    assert jobs, "the console's revocation job is not listed"
    assert "op.admin.console" in jobs[0]
    screenshot(operator, "11-revoked-from-the-console")
    _no_script_ran(operator)


def test_a_hostile_device_id_in_the_address_renders_as_text(
    fleet: DemoFleet, operator: WebDriver
) -> None:
    operator.get(fleet.url + "device/%3Cimg%20src=x%20onerror=window.__pwned=1%3E")
    assert operator.find_element(By.ID, "reason").text == "console.not_found"
    assert "<img src=x onerror=window.__pwned=1>" in operator.find_element(By.ID, "detail").text
    _no_script_ran(operator)


def test_a_device_certificate_gets_403_in_the_browser(
    fleet: DemoFleet, tmp_path_factory: pytest.TempPathFactory
) -> None:
    home = nss_home(tmp_path_factory.mktemp("device-home"), fleet.pki, Identity.device("dev-0001"))
    with browser(home) as driver:
        for path in ("fleet", "device/edge-0001", "models", "audit"):
            driver.get(fleet.url + path)
            assert (
                "403 console.caller.not_operator" in driver.find_element(By.TAG_NAME, "body").text
            )
