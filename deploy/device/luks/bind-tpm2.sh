#!/usr/bin/env bash
# Edgeward device: bind a LUKS2 volume to the TPM with Clevis (seed 000, section 3:
# "Disk Encryption (LUKS) bound to TPM"). The disk then unlocks at boot only while the
# PCRs hold their commissioned values (PCR 7: the Secure Boot state and keys, by default).
#
#   bind-tpm2.sh [--pcrs 7] [--key-file FILE] [--dry-run] DEVICE
#
# Run as root on the device, after Secure Boot is on with your own keys (README.md,
# steps 1-3): a binding made while Secure Boot is off seals to the wrong PCR 7. It asks for
# an existing passphrase (or reads --key-file); keep that passphrase as the recovery key,
# escrowed off the device. It refuses anything that is not LUKS2 (Clevis stores its
# binding as a LUKS2 token; the posture item `disk-encryption` reads it from there), checks
# the binding by asking the TPM for the key, and rebuilds the initramfs so early boot can
# unlock. --dry-run prints the commands instead of running them.
# Checked by `bash -n` and shellcheck in tests/integration/test_device_config.py.
set -euo pipefail

PCRS="7"
KEY_FILE=""
DRY_RUN=0

usage() {
    echo "usage: $0 [--pcrs LIST] [--key-file FILE] [--dry-run] DEVICE" >&2
    exit 64
}

say() { printf '[bind-tpm2] %s\n' "$*" >&2; }

run() {
    if [ "$DRY_RUN" -eq 1 ]; then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}

while [ "$#" -gt 0 ]; do
    case "$1" in
        --pcrs) [ "$#" -ge 2 ] || usage; PCRS="$2"; shift 2 ;;
        --key-file) [ "$#" -ge 2 ] || usage; KEY_FILE="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage ;;
        -*) usage ;;
        *) break ;;
    esac
done
[ "$#" -eq 1 ] || usage
DEVICE="$1"

if ! [[ "$PCRS" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    say "--pcrs is a comma-separated list of PCR indices, e.g. 7 or 0,7"
    exit 64
fi
if [ "$DRY_RUN" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
    say "run as root"
    exit 77
fi
if ! cryptsetup isLuks --type luks2 "$DEVICE"; then
    say "$DEVICE is not a LUKS2 volume (convert a LUKS1 volume with 'cryptsetup convert')"
    exit 65
fi
if [ "$DRY_RUN" -eq 0 ]; then
    for tool in clevis clevis-luks-bind tpm2_pcrread; do
        command -v "$tool" >/dev/null || { say "missing $tool: apt-get install clevis clevis-luks clevis-tpm2 clevis-initramfs tpm2-tools"; exit 69; }
    done
fi

SECURE_BOOT=/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c
if [[ ",$PCRS," == *",7,"* ]]; then
    if [ ! -r "$SECURE_BOOT" ] || [ "$(od -An -t u1 -j 4 -N 1 "$SECURE_BOOT" | tr -d ' ')" != "1" ]; then
        say "warning: Secure Boot is not enabled: PCR 7 will change when you enable it"
    fi
fi

CONFIG="{\"pcr_bank\":\"sha256\",\"pcr_ids\":\"$PCRS\"}"
say "binding $DEVICE to the TPM (PCRs $PCRS)"
if [ -n "$KEY_FILE" ]; then
    run clevis luks bind -y -k "$KEY_FILE" -d "$DEVICE" tpm2 "$CONFIG"
else
    run clevis luks bind -y -d "$DEVICE" tpm2 "$CONFIG"
fi

say "checking the binding: the TPM must release the key now"
run clevis luks list -d "$DEVICE"
if [ "$DRY_RUN" -eq 0 ]; then
    SLOT_LIST="$(clevis luks list -d "$DEVICE" | awk -F: '/tpm2/ {print $1}')"
    if [ -z "$SLOT_LIST" ]; then
        say "no tpm2 binding listed on $DEVICE"
        exit 1
    fi
    for slot in $SLOT_LIST; do
        clevis luks pass -d "$DEVICE" -s "$slot" >/dev/null
    done
fi

say "rebuilding the initramfs so early boot unlocks through the TPM"
run update-initramfs -u -k all
say "done: keep the passphrase as the recovery key, off the device"
