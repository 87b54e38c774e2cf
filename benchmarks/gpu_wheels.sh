#!/usr/bin/env bash
# Packs what the lent GPU machine lacks (it is offline) into .whl/gpu-site.tar.xz, here, once:
# pydantic (and its needs), PyAV and PyNvVideoCodec, for its python3 3.12 on x86-64.
#
#   bash benchmarks/gpu_wheels.sh
#
# The wheels come to 65 MB, over the 64 MiB a call carries beside the checkout; unpacked, less
# what the machine never loads (PyNvVideoCodec's build for CUDA 12.1 drivers, its samples), and
# packed with xz they take 28 MB. benchmarks/gpu_session.sh unpacks them into /tmp/site.
# .whl/ is ignored through the checkout's info/exclude (never committed).
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$work/wheels" pynvvideocodec==2.2.4 av==18.1.0 pydantic==2.13.4 pydantic-core==2.46.4 \
    annotated-types==0.8.0 typing-inspection==0.4.5
mkdir -p "$work/site" .whl
for wheel in "$work"/wheels/*.whl; do
    python3 -m zipfile -e "$wheel" "$work/site"
done
rm -rf "$work/site/samples" "$work/site/benchmarks" "$work"/site/pynvvideocodec-*.data \
    "$work"/site/PyNvVideoCodec/PyNvVideoCodec_121.*.so
tar -C "$work/site" -cf - . | xz -9e -T0 >.whl/gpu-site.tar.xz
ls -l .whl/gpu-site.tar.xz
