# shellcheck shell=bash
# Sourced by the cross/ scripts: the paths, pinned tool versions and small helpers they share.
# Nothing here installs or builds anything.

CROSS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$CROSS_DIR/.." && pwd)

# JetPack 5 is Ubuntu 20.04 with glibc 2.31; JetPack 6 (Ubuntu 22.04, glibc 2.35) is then covered too.
GLIBC_FLOOR=2.31

# Pinned so that CI and every developer link with the same tools. The zig wrapper's path (which holds
# cargo-zigbuild's version and the Python path) is the linker cargo hashes into every crate's
# fingerprint: changing any of these recompiles the aarch64 build from scratch once.
CARGO_ZIGBUILD_VERSION=0.24.1
CARGO_DEB_VERSION=3.8.0
ZIGLANG_VERSION=0.17.1

# zig comes from PyPI's `ziglang` package in a virtualenv of our own, always this one (not .venv):
# a changing Python path would change the linker path and so rebuild everything.
VENV="$ROOT/.venv-cross"
export CARGO_ZIGBUILD_PYTHON_PATH="$VENV/bin/python"

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
# The amd64 package is linked by zig too, for the same glibc floor. Its target is the host's, so cargo
# would also link build scripts and proc-macros with zig; in the shared target folder they would then
# flip between the zig and the default linker on every run. A folder of its own keeps both builds fresh.
AMD64_TARGET_DIR="$TARGET_DIR/zig-amd64"
DEB_DIR=${MICROFED_DEB_DIR:-$TARGET_DIR/debian}

QEMU_SYSROOT=/usr/aarch64-linux-gnu

say() { printf '\n== %s\n' "$*"; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# Debian architecture name -> Rust target triple.
triple_of() {
  case "$1" in
  arm64) echo aarch64-unknown-linux-gnu ;;
  amd64) echo x86_64-unknown-linux-gnu ;;
  *) die "unknown architecture '$1' (expected arm64 or amd64)" ;;
  esac
}

# Debian architecture name -> the CARGO_TARGET_DIR its release build uses.
target_dir_of() {
  case "$1" in
  arm64) echo "$TARGET_DIR" ;;
  amd64) echo "$AMD64_TARGET_DIR" ;;
  *) die "unknown architecture '$1' (expected arm64 or amd64)" ;;
  esac
}

# Where the release binary of an architecture lands (and where cargo-deb picks it up).
binary_of() { echo "$(target_dir_of "$1")/$(triple_of "$1")/release/microfed"; }
