#!/usr/bin/env bash
# Installs what cross-compiling, testing under qemu and packaging need, each only when missing, so a
# second run takes about a second:
#   Debian: gcc-aarch64-linux-gnu libc6-dev-arm64-cross (cross linker and sysroot for the tests),
#           qemu-user (runs aarch64 binaries), binutils-aarch64-linux-gnu (strip for the arm64 .deb),
#           dpkg-dev (cargo-deb's helpers), python3-venv;
#   rustup: the aarch64-unknown-linux-gnu standard library;
#   cargo:  cargo-zigbuild and cargo-deb (pinned in env.sh, `cargo install --locked`);
#   PyPI:   ziglang (the zig toolchain) in the virtualenv .venv-cross.
set -euo pipefail
source "$(dirname "$0")/env.sh"

APT_PACKAGES=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user binutils-aarch64-linux-gnu dpkg-dev python3-venv)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "apt-get install ${missing[*]}"
  sudo_cmd=()
  [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! rustup target list --installed | grep -qx aarch64-unknown-linux-gnu; then
  rustup target add aarch64-unknown-linux-gnu
fi

# `cargo install` only when the pinned version is not the one on PATH.
cargo_tool() { # binary crate version
  local have
  have=$("$1" --version 2>/dev/null | awk '{print $2}' || true)
  if [[ $have != "$3" ]]; then
    echo "cargo install $2@$3 (found: ${have:-none})"
    cargo install --locked --quiet "$2@$3"
  fi
}
cargo_tool cargo-zigbuild cargo-zigbuild "$CARGO_ZIGBUILD_VERSION"
cargo_tool cargo-deb cargo-deb "$CARGO_DEB_VERSION"

[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
if [[ $("$VENV/bin/python" -m ziglang version 2>/dev/null || true) != "$ZIGLANG_VERSION" ]]; then
  echo "pip install ziglang==$ZIGLANG_VERSION into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "ziglang==$ZIGLANG_VERSION"
fi
echo "tools: $(cargo-zigbuild --version), $(cargo-deb --version), zig $("$VENV/bin/python" -m ziglang version), $(qemu-aarch64 --version | head -n1)"
