"""The demo fleet with its console, and a real headless browser holding a certificate.

``demo_fleet`` runs ``edgeward demo`` to its end (two swtpm devices, one attested, one with
a tampered boot chain; every service; the console) and keeps it running
(``EDGEWARD_DEMO_HOLD``). ``Browser`` is Debian's ``chromium`` driven by Selenium through
Debian's ``chromedriver``; its client certificate is the only one in an NSS database of its
own (``$HOME/.pki/nssdb``), which headless Chromium selects by itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from edgeward_shared.identity import Identity
from edgeward_shared.pki.store import PkiStore

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[2] / ".test-artifacts" / "console"
DEMO_TIMEOUT_S = 300


@dataclass
class DemoFleet:
    root: Path
    url: str
    broker: str
    process: subprocess.Popen[str]
    output: list[str]

    @property
    def pki(self) -> PkiStore:
        return PkiStore(self.root / "pki")

    def cli(self, *argv: str) -> str:
        """``edgeward ...`` as the demo's operator (a session the console does not hold)."""
        result = self._run(argv)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def cli_ok(self, *argv: str) -> bool:
        """Whether ``edgeward ...`` succeeded."""
        return self._run(argv).returncode == 0

    def _run(self, argv: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgeward_cli.main", *argv],
            env={
                **os.environ,
                "EDGEWARD_PKI": str(self.root / "pki"),
                "EDGEWARD_BROKER": self.broker,
                "EDGEWARD_OPERATOR": "admin",
                "EDGEWARD_COMMAND_LOG": str(self.root / "state" / "commands.jsonl"),
            },
            cwd=self.root,  # any other relative default lands in the demo's directory
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


@contextmanager
def demo_fleet(root: Path) -> Iterator[DemoFleet]:
    process = subprocess.Popen(
        [sys.executable, "-m", "edgeward_cli.main", "demo", "--workdir", str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "EDGEWARD_DEMO_HOLD": "1"},
    )
    output: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + DEMO_TIMEOUT_S
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            output.append(line)
            if "press Enter to stop the demo" in line:
                break
        text = "".join(output)
        assert "press Enter to stop the demo" in text, text[-4000:]
        url = re.search(r"console (https://[0-9.]+:\d+/)", text)
        broker = re.search(r"mosquitto pid \d+ on ([0-9.]+:\d+)", text)
        assert url is not None, text[-4000:]
        assert broker is not None, text[-4000:]
        yield DemoFleet(root, url.group(1), broker.group(1), process, output)
    finally:
        if process.poll() is None and process.stdin is not None:
            process.stdin.write("\n")
            process.stdin.flush()
            try:
                process.wait(90)
            except subprocess.TimeoutExpired:
                process.terminate()
                process.wait(30)
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()
        process.wait(30)


def nss_home(home: Path, pki: PkiStore, who: Identity) -> Path:
    """A HOME whose NSS database trusts the PKI's CAs and holds ``who``'s certificate."""
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True)
    nss = f"sql:{db}"
    subprocess.run(["certutil", "-N", "-d", nss, "--empty-password"], check=True)
    files = pki.identity_files(who)
    p12 = home / "client.p12"
    subprocess.run(
        [
            *("openssl", "pkcs12", "-export", "-in", str(files.cert), "-inkey", str(files.key)),
            *("-certfile", str(files.chain), "-passout", "pass:", "-out", str(p12)),
        ],
        check=True,
    )
    subprocess.run(
        ["pk12util", "-d", nss, "-i", str(p12), "-W", ""], check=True, capture_output=True
    )
    pem = pki.bundle_path.read_text()
    for n, block in enumerate(
        re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.DOTALL)
    ):
        ca = home / f"ca-{n}.pem"
        ca.write_text(block + "\n")
        subprocess.run(
            ["certutil", "-A", "-d", nss, "-n", f"edgeward-ca-{n}", "-t", "CT,,", "-i", str(ca)],
            check=True,
        )
    return home


@contextmanager
def browser(home: Path, downloads: Path | None = None) -> Iterator[WebDriver]:
    for tool in (CHROMIUM, CHROMEDRIVER, shutil.which("certutil"), shutil.which("pk12util")):
        assert tool is not None, "certutil/pk12util missing: run scripts/bootstrap.sh"
        assert Path(tool).exists(), f"{tool}: run scripts/bootstrap.sh"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--user-data-dir={home / 'profile'}",
        "--window-size=1400,1000",
        # this machine's network is closed: without these, chromium's own background
        # connections (updates, sync, QUIC probes) are refused by the dozen and stall it
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--no-first-run",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if downloads is not None:
        options.add_experimental_option(
            "prefs",
            {"download.default_directory": str(downloads), "download.prompt_for_download": False},
        )
    service = Service(CHROMEDRIVER, env={**os.environ, "HOME": str(home)})
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: WebDriver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
