#!/bin/bash
# Runs in the Containerfile's builder stages only (never in a final image): copy the files
# of some installed Debian packages into DEST, then every shared library their programs
# and libraries need (ldd), skipping what EXCEPT (an earlier rootfs) already has.
#
#   rootfs.sh DEST EXCEPT PACKAGE...        (EXCEPT may be "-")
#
# Left out: documentation, init scripts and units, and every shell or package tool, so that
# an image made of DEST has no shell and no package manager (tests/containers checks it).
set -euo pipefail
dest="$1" except="$2"; shift 2
mkdir -p "$dest"
for link in bin lib lib64 sbin; do  # bookworm is merged-/usr: keep the links
    [ -e "$dest/$link" ] || ln -s "usr/$link" "$dest/$link"
done
mkdir -p "$dest/usr/bin" "$dest/usr/lib" "$dest/usr/lib64" "$dest/usr/sbin"

list="$(mktemp)"
dpkg -L "$@" | sort -u | while read -r path; do
    [ -f "$path" ] || [ -L "$path" ] || continue
    case "$path" in
        /usr/share/doc/* | /usr/share/man/* | /usr/share/info/* | /usr/share/lintian/* \
        | /usr/share/locale/* | /usr/share/bug/* | /etc/init.d/* | /lib/systemd/* \
        | /usr/lib/systemd/* | /etc/logrotate.d/* | /usr/lib/x86_64-linux-gnu/gconv/* \
        | */bin/sh | */bin/bash | */bin/dash | */bin/rbash | */bin/apt* | */bin/dpkg*) continue ;;
    esac
    if [ "$except" != - ] && { [ -e "$except$path" ] || [ -L "$except$path" ]; }; then continue; fi
    echo "${path#/}"
done >"$list"
tar -C / -cf - -T "$list" | tar -C "$dest" -xf - --keep-directory-symlink

# the shared libraries of everything copied (and of theirs), resolved in this builder
libs="$(mktemp)"
find "$dest" -type f \( -perm -u+x -o -name '*.so*' \) -print0 \
    | { xargs -0 -r ldd 2>/dev/null || true; } | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}' \
    | sort -u >"$libs"
while read -r lib; do
    for path in "$lib" "$(readlink -f "$lib")"; do
        if [ "$except" != - ] && [ -e "$except$path" ]; then continue; fi
        [ -e "$dest$path" ] || tar -C / -cf - "${path#/}" | tar -C "$dest" -xf - --keep-directory-symlink
    done
done <"$libs"
rm -f "$list" "$libs"
