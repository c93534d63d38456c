#!/usr/bin/env bash
# Containers for Edgeward without a Docker engine, and with one (docs/adr/0030).
#
#   scripts/containers.sh setup          podman + runc + debootstrap, containers.conf, the
#                                        Docker API socket (idempotent; skipped when a Docker
#                                        engine answers)
#   scripts/containers.sh base           the Debian bookworm base image (debootstrap
#                                        --variant=minbase + import), cached by its recipe
#   scripts/containers.sh images [NAME]  build images (default: all) from
#                                        deploy/images/Containerfile; an image whose inputs'
#                                        hash matches its label is not rebuilt
#   scripts/containers.sh env            print the exports a client needs (eval "$(...)")
#   scripts/containers.sh requirements   regenerate deploy/images/requirements/ from uv.lock
#   scripts/containers.sh compose ARGS   docker compose (a Docker engine) or podman-compose,
#                                        on deploy/compose/compose.yaml
#   scripts/containers.sh stop-api       stop the API service this script started (by pid)
#
# Environment: EDGEWARD_ENGINE (docker|podman, default: docker if its engine answers, else
# podman), EDGEWARD_BASE (a builder base instead of the debootstrap one, e.g.
# debian:bookworm-slim), EDGEWARD_RUNTIME (the final images' base instead of the local
# distroless stage, e.g. gcr.io/distroless/python3-debian12:nonroot).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${EDGEWARD_IMAGE_CACHE:-$HOME/.cache/edgeward/images}"
SOCK="${EDGEWARD_PODMAN_SOCK:-$HOME/.cache/edgeward/podman/podman.sock}"
CONTAINERFILE="$ROOT/deploy/images/Containerfile"
SUITE=bookworm
MIRROR="${EDGEWARD_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE_RECIPE="debootstrap --variant=minbase $SUITE $MIRROR v1"
ALL_IMAGES=(broker attestation identity models revocation gateway telemetry device)
# netavark 1.4 (bookworm) sets up a container's network with iptables, which a minimal host
# lacks: without it every RUN step and every container fails with "netavark: No such file"
APT_PACKAGES=(podman runc debootstrap netavark aardvark-dns iptables python3-venv)
# Debian's podman-compose (1.0.3) ignores `pid:` and mistranslates `network_mode: service:`,
# which the revocation sidecar needs: a pinned one from PyPI, in a private venv
PODMAN_COMPOSE="podman-compose==1.6.0"
PODMAN_COMPOSE_VENV="${EDGEWARD_PODMAN_COMPOSE_VENV:-$HOME/.cache/edgeward/podman-compose}"

say() { printf '[containers] %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

docker_answers() {
    command -v docker >/dev/null 2>&1 && [ -z "${DOCKER_HOST:-}" ] \
        && timeout 10 docker info >/dev/null 2>&1
}

engine() {
    if [ -z "${EDGEWARD_ENGINE:-}" ]; then
        if docker_answers; then EDGEWARD_ENGINE=docker; else EDGEWARD_ENGINE=podman; fi
    fi
    echo "$EDGEWARD_ENGINE"
}

# ------------------------------------------------------------------------------ setup
write_if_changed() {  # write_if_changed FILE (content on stdin), as root
    local want; want="$(cat)"
    if [ ! -f "$1" ] || [ "$(cat "$1")" != "$want" ]; then
        say "writing $1"
        as_root mkdir -p "$(dirname "$1")"
        printf '%s\n' "$want" | as_root tee "$1" >/dev/null
    fi
}

api_answers() {
    [ -S "$SOCK" ] && timeout 5 curl -fsS --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1
}

start_api() {
    api_answers && return 0
    mkdir -p "$(dirname "$SOCK")"
    rm -f "$SOCK"
    say "starting the Docker API: podman system service unix://$SOCK"
    nohup podman system service --time=0 "unix://$SOCK" \
        >"$(dirname "$SOCK")/service.log" 2>&1 &
    echo $! >"$(dirname "$SOCK")/service.pid"
    for _ in $(seq 1 100); do api_answers && return 0; sleep 0.1; done
    say "the podman API did not answer on $SOCK (see $(dirname "$SOCK")/service.log)"
    return 1
}

setup() {
    if [ "$(engine)" = docker ]; then return 0; fi  # a Docker engine: nothing to do
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}" curl; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing: ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if ! "$PODMAN_COMPOSE_VENV/bin/podman-compose" version >/dev/null 2>&1; then
        say "installing $PODMAN_COMPOSE into $PODMAN_COMPOSE_VENV"
        python3 -m venv "$PODMAN_COMPOSE_VENV"
        "$PODMAN_COMPOSE_VENV/bin/pip" install --quiet --disable-pip-version-check "$PODMAN_COMPOSE"
    fi
    # crun refuses this kind of host's hybrid cgroup layout; podman's default ulimits try to
    # raise the limits and fail with EPERM in an unprivileged CI container.
    write_if_changed /etc/containers/containers.conf <<'EOF'
# written by edgeward scripts/containers.sh (docs/adr/0030)
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
network_backend = "netavark"
EOF
    start_api
}

stop_api() {
    local pidfile; pidfile="$(dirname "$SOCK")/service.pid"
    if [ -f "$pidfile" ]; then
        kill "$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile" "$SOCK"
    fi
}

print_env() {
    if [ "$(engine)" = podman ]; then echo "export DOCKER_HOST=unix://$SOCK"; fi
    echo "export TESTCONTAINERS_RYUK_DISABLED=true"
}

# ------------------------------------------------------------------------------ base
short_hash() { sha256sum | cut -c1-16; }

base_image() {  # the builder base's name (built here unless EDGEWARD_BASE names one)
    if [ -n "${EDGEWARD_BASE:-}" ]; then echo "$EDGEWARD_BASE"; return; fi
    echo "localhost/edgeward/bookworm:$(printf '%s' "$BASE_RECIPE" | short_hash)"
}

base() {
    local name eng; name="$(base_image)"; eng="$(engine)"
    [ -n "${EDGEWARD_BASE:-}" ] && return 0
    if "$eng" image inspect "$name" >/dev/null 2>&1; then return 0; fi
    local tag="${name##*:}" dir="$CACHE/rootfs-${name##*:}"
    if [ ! -f "$dir/.complete" ]; then
        say "debootstrap --variant=minbase $SUITE (once; cached in $dir)"
        as_root rm -rf "$dir"
        mkdir -p "$CACHE"
        as_root debootstrap --variant=minbase "$SUITE" "$dir" "$MIRROR" \
            >"$CACHE/debootstrap-$tag.log" 2>&1 \
            || { say "debootstrap failed: see $CACHE/debootstrap-$tag.log"; return 1; }
        as_root rm -rf "$dir/var/cache/apt/archives"/*.deb "$dir/var/lib/apt/lists"/*
        as_root touch "$dir/.complete"
    fi
    say "importing $name"
    as_root tar -C "$dir" --exclude=./.complete -c . | "$eng" import --quiet - "$name" >/dev/null
    "$eng" tag "$name" localhost/edgeward/bookworm:minbase
}

# ------------------------------------------------------------------------------ images
# What each image is built from, besides the Containerfile and the base: the hash of these
# paths (file names and contents) is the image's label; an equal label means no rebuild.
REQ=deploy/images/requirements
PY="$REQ/shared.txt shared/src"
inputs_of() {
    case "$1" in
        broker) echo "mosquitto/plugin/edgeward_guard.c" ;;
        attestation) echo "$PY services/attestation/src" ;;
        identity) echo "$PY services/identity/src" ;;
        models) echo "$PY services/model-distribution/src" ;;
        revocation) echo "$PY services/revocation/src" ;;
        gateway) echo "$PY $REQ/gateway.txt services/inference-gateway/src" ;;
        telemetry) echo "$PY services/telemetry/src" ;;
        device) echo "$PY $REQ/device.txt services/device-agent/src services/device-sim/src" ;;
        *) say "no image named $1 (one of: ${ALL_IMAGES[*]})"; return 1 ;;
    esac
}

inputs_hash() {  # inputs_hash NAME BASE RUNTIME
    local paths; paths="$(inputs_of "$1")"
    {
        printf '%s\n' "$1" "$2" "$3" "$("$(engine)" image inspect --format '{{.Id}}' "$2" 2>/dev/null)"
        cd "$ROOT"
        # shellcheck disable=SC2086 # paths is a list of repository paths without spaces
        find deploy/images/Containerfile deploy/images/rootfs.sh $paths -type f ! -name '*.pyc' ! -path '*/__pycache__/*' 2>/dev/null \
            | LC_ALL=C sort | xargs sha256sum
    } | short_hash
}

build_image() {  # build_image NAME
    local name="$1" eng base runtime want have started
    eng="$(engine)"; base="$(base_image)"; runtime="${EDGEWARD_RUNTIME:-distroless}"
    want="$(inputs_hash "$name" "$base" "$runtime")"
    have="$("$eng" image inspect --format '{{ index .Config.Labels "org.edgeward.inputs" }}' \
        "edgeward/$name" 2>/dev/null || true)"
    if [ "$have" = "$want" ]; then say "edgeward/$name is up to date ($want)"; return 0; fi
    say "building edgeward/$name ($want)"
    started=$(date +%s)
    "$eng" build --quiet -f "$CONTAINERFILE" --target "$name" \
        --build-arg "BASE=$base" --build-arg "RUNTIME=$runtime" \
        --secret "id=cacert,src=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" \
        --label "org.edgeward.inputs=$want" -t "edgeward/$name" "$ROOT" >/dev/null
    say "built edgeward/$name in $(($(date +%s) - started)) s"
}

images() {
    [ "$#" -gt 0 ] || set -- "${ALL_IMAGES[@]}"
    base
    local name
    for name in "$@"; do build_image "$name"; done
}

requirements() {  # shared.txt: edgeward-shared's locked deps; NAME.txt: what NAME adds
    local dir="$ROOT/deploy/images/requirements" name package
    mkdir -p "$dir"
    export_for() {
        (cd "$ROOT" && uv export --frozen --no-dev --no-emit-workspace --no-header \
            --no-annotate --package "$1" --quiet)
    }
    export_for edgeward-shared >"$dir/shared.txt"
    for name in gateway device; do
        case "$name" in
            gateway) package=edgeward-inference-gateway ;;
            device) package=edgeward-device-sim ;;
        esac
        # the blocks (a requirement and its hash lines) that shared.txt does not have
        export_for "$package" | awk -v shared="$dir/shared.txt" '
            BEGIN { while ((getline line < shared) > 0) if (line !~ /^ /) have[line] = 1 }
            /^[^ ]/ { keep = !($0 in have) }
            keep' >"$dir/$name.txt"
    done
}

case "${1:-}" in
    setup) setup ;;
    base) setup; base ;;
    images) shift; setup; images "$@" ;;
    env) print_env ;;
    engine) engine ;;
    requirements) requirements ;;
    stop-api) stop_api ;;
    compose)
        shift
        file="$ROOT/deploy/compose/compose.yaml"
        if [ "$(engine)" = docker ]; then exec docker compose -f "$file" "$@"; fi
        exec "$PODMAN_COMPOSE_VENV/bin/podman-compose" -f "$file" "$@" ;;
    *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
