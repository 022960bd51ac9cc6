#!/usr/bin/env bash
# Build a Debian bookworm base image locally, for machines that reach Debian's package mirror but no
# container registry (air-gapped clusters, CI sandboxes). Elsewhere just use debian:bookworm-slim.
#
#   docker/make_base_image.sh [TAG]          # default TAG: qwen-local/debian:bookworm
#   docker build --build-arg BASE_IMAGE=qwen-local/debian:bookworm ...
#
# Needs root, debootstrap and a running docker daemon. Does nothing when TAG already exists.
set -euo pipefail
tag="${1:-qwen-local/debian:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "base image $tag already exists"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "Error: debootstrap is not installed (apt-get install debootstrap)." >&2; exit 2; }
root="$(mktemp -d /var/tmp/qwen-bookworm.XXXXXX)"
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm into $root (a few minutes) ..."
debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
# What debian:bookworm-slim has on top of a bare minbase: no apt caches, no docs.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import --change 'CMD ["bash"]' - "$tag" >/dev/null
echo "base image $tag ready"
