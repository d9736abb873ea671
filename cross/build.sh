#!/usr/bin/env bash
# Builds the release `microfed` binary for the boards, linked against glibc 2.31 (JetPack 5), and
# checks the floor:
#
#     cross/build.sh [arm64] [amd64]        # default: arm64
#
# arm64 lands in $CARGO_TARGET_DIR/aarch64-unknown-linux-gnu/release/microfed, amd64 in
# $CARGO_TARGET_DIR/zig-amd64/x86_64-unknown-linux-gnu/release/microfed (see env.sh for why).
# Needs the tools of cross/setup.sh.
#
# Why zig: Debian 12's cross glibc is 2.36, and anything linked against glibc >= 2.34 needs
# __libc_start_main@GLIBC_2.34, so the gcc cross linker of .cargo/config.toml cannot meet the floor.
# cargo-zigbuild links with `zig cc`, which carries stub libraries for any glibc version: the
# `.2.31` suffix on the target picks the version whose symbols the binary may reference.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"

arches=("$@")
((${#arches[@]})) || arches=(arm64)
for arch in "${arches[@]}"; do
  triple=$(triple_of "$arch")
  CARGO_TARGET_DIR=$(target_dir_of "$arch") \
    cargo zigbuild --release --locked -p microfed --bin microfed --target "$triple.$GLIBC_FLOOR"
  "$CROSS_DIR/glibc-check.sh" "$(binary_of "$arch")" "$GLIBC_FLOOR"
done
