#!/usr/bin/env bash
# Install the Debian packages the tests need and extract the vtest.avi test video.
#
# Idempotent: apt work is skipped when every package is already installed, and the
# video is only extracted when tests/.assets/vtest.avi is missing.
# Usage: sudo .ci/install-system.sh   (from anywhere; paths are relative to the repo)
set -euo pipefail

PACKAGES=(
    ffmpeg
    gir1.2-gst-rtsp-server-1.0
    python3-gi
    gstreamer1.0-plugins-base
    gstreamer1.0-plugins-good
    gstreamer1.0-plugins-bad
    gstreamer1.0-plugins-ugly
    gstreamer1.0-libav
    gstreamer1.0-tools
    mosquitto
    chromium
)
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VTEST="$REPO_ROOT/tests/.assets/vtest.avi"
VTEST_IN_DEB="./usr/share/doc/opencv-doc/examples/data/vtest.avi"

export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [[ "$(id -u)" != 0 ]]; then SUDO="sudo"; fi

is_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" == "ii "* ]]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    is_installed "$pkg" || missing+=("$pkg")
done

if ((${#missing[@]})); then
    echo "install-system: installing ${missing[*]}"
    # Refresh the index only when the first install attempt cannot find packages.
    if ! $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
        $SUDO apt-get update -qq
        $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

if [[ ! -s "$VTEST" ]]; then
    echo "install-system: extracting vtest.avi from opencv-doc"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download -qq opencv-doc >/dev/null 2>&1) \
        || { $SUDO apt-get update -qq && (cd "$tmp" && apt-get download -qq opencv-doc >/dev/null); }
    dpkg-deb --fsys-tarfile "$tmp"/opencv-doc_*.deb | tar -x -C "$tmp" "$VTEST_IN_DEB"
    mkdir -p "$(dirname "$VTEST")"
    mv "$tmp/$VTEST_IN_DEB" "$VTEST"
fi
