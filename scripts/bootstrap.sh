#!/usr/bin/env bash
# Prepare a fresh Debian/Ubuntu machine for Edgeward: system packages, uv, the project venv.
# Idempotent and quiet when everything is already there. Used by `make demo` and `make test`.
set -euo pipefail

APT_PACKAGES=(mosquitto mosquitto-clients openssl ca-certificates python3 python3-venv make
    # TPM: swtpm devices and tpm2-tools for tests; libtss2-dev + a compiler to build tpm2-pytss
    swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config gcc python3-dev
    # the broker's guard plugin (mosquitto/plugin/edgeward_guard.c) is built against these
    mosquitto-dev libmosquitto-dev
    # the flood test loads deploy/nftables/edgeward-broker.nft in a namespace of its own
    nftables iproute2 util-linux
    # deploy/device/ is checked by each file's own tool (tests/integration/test_device_config.py);
    # cryptsetup writes the LUKS2 headers the posture check reads; openssh-server only for
    # `sshd -t` (its service is left disabled below)
    wireguard-tools openssh-server shellcheck systemd kmod rsyslog cryptsetup-bin gettext-base
    # the syslog shipping tests send RFC 5425 (syslog over TLS) to a real rsyslog
    rsyslog-openssl
    # the operator console's browser tests: Debian's chromium and its WebDriver (Selenium),
    # NSS tools for the client certificate, openssl's pkcs12 (above)
    chromium chromium-driver libnss3-tools
    # PostgreSQL: the fleet backend; the store suites start a server of their own (initdb)
    postgresql)
UV_VENV="${EDGEWARD_UV_VENV:-$HOME/.cache/edgeward/uv}"

say() { printf '[bootstrap] %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing system packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
    # sshd is here for `sshd -t` only: a machine that had no SSH server does not get one
    if printf '%s\n' "${missing[@]}" | grep -qx openssh-server && command -v systemctl >/dev/null \
        && [ -d /run/systemd/system ]; then
        as_root systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true
    fi
fi

# uv: from PyPI into a private venv (a system pip on Debian 12 refuses, PEP 668).
if ! command -v uv >/dev/null 2>&1; then
    if [ ! -x "$UV_VENV/bin/uv" ]; then
        say "installing uv into $UV_VENV"
        python3 -m venv "$UV_VENV"
        "$UV_VENV/bin/pip" install --quiet --disable-pip-version-check "uv>=0.8"
    fi
    export PATH="$UV_VENV/bin:$PATH"
fi

# The broker's guard plugin: the launcher refuses to start a broker without it.
GUARD_DIR="$(cd "$(dirname "$0")/.." && pwd)/mosquitto/plugin"
if [ ! -f "$GUARD_DIR/edgeward_guard.so" ] \
    || [ "$GUARD_DIR/edgeward_guard.c" -nt "$GUARD_DIR/edgeward_guard.so" ]; then
    say "building the broker's guard plugin"
    gcc -std=c11 -Wall -Wextra -Werror -O2 -fPIC -shared \
        -o "$GUARD_DIR/edgeward_guard.so" "$GUARD_DIR/edgeward_guard.c"
fi

# The console's browser tests log in with a client certificate. Chromium (since 156.0.8078.114)
# waits at its certificate picker in headless mode, which no WebDriver can answer: a managed
# policy picks the certificate for the loopback console only, and only one issued by an
# Edgeward issuing CA. Nothing else of chromium's behaviour changes.
CHROMIUM_POLICY=/etc/chromium/policies/managed/edgeward-loopback-console.json
CHROMIUM_WANT='{"AutoSelectCertificateForUrls": ["{\"pattern\":\"https://127.0.0.1:*\",\"filter\":{\"ISSUER\":{\"CN\":\"Edgeward Issuing CA\"}}}"]}'
if [ "$(cat "$CHROMIUM_POLICY" 2>/dev/null)" != "$CHROMIUM_WANT" ]; then
    say "writing $CHROMIUM_POLICY (client certificate for the loopback console)"
    as_root mkdir -p "$(dirname "$CHROMIUM_POLICY")"
    printf '%s\n' "$CHROMIUM_WANT" | as_root tee "$CHROMIUM_POLICY" >/dev/null
fi

# containers (docs/adr/0030): podman, runc, debootstrap and the Docker API socket, unless a
# Docker engine answers; the containers tests run in `make test`
"$(dirname "$0")/containers.sh" setup

say "syncing the project environment (uv.lock)"
uv sync --locked --all-packages --quiet
