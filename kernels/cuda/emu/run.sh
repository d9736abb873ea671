#!/usr/bin/env bash
# Builds the CPU emulation of the CUDA kernels and runs its checks (needs g++ with C++20; no GPU).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${TMPDIR:-/tmp}/microfed-emu-test"
g++ -std=c++20 -O1 -pthread -Wall -Wno-unknown-pragmas -Wno-unused-variable -Wno-unused-but-set-variable \
    -o "$out" "$here/test_kernels.cpp"
"$out"
