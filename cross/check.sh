#!/usr/bin/env bash
# The edge-board check CI runs: everything a change must not break for the aarch64 boards.
#
#     cross/check.sh
#
#  1. set-up      installs the cross tools when missing (cross/setup.sh; MICROFED_SKIP_SETUP=1 skips it)
#  2. arm64       release binary for aarch64, zig-linked against glibc 2.31, and the glibc floor check
#  3. qemu smoke  `microfed --version` and `--help` of that binary under qemu-aarch64
#  4. qemu tests  the workspace's unit tests, built for aarch64 in the release profile, under qemu
#  5. amd64       the same release binary for x86_64, glibc 2.31 floor too
#  6. debs        microfed_*_arm64.deb and microfed_*_amd64.deb (+ -dbgsym .ddeb) into $DEB_DIR
#  7. deb test    tests/tests/deb_package.rs inspects both packages
# and prints a summary with the time of each step. Every step is incremental: a second run with nothing
# changed takes seconds. Exits non-zero at the first failing step.
#
# Knobs (environment): CARGO_TARGET_DIR (default ./target), MICROFED_DEB_DIR (default
# $CARGO_TARGET_DIR/debian), MICROFED_SKIP_SETUP=1, MICROFED_CROSS_ARCHES="arm64 amd64" (packages to
# build; arm64 is always built and tested), MICROFED_HOST_TARGET_DIR (target folder of step 7's host
# build, default CARGO_TARGET_DIR), MICROFED_DEB_FAST=0 (best compression, slower).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
mkdir -p "$TARGET_DIR"

AARCH64=$(triple_of arm64)
read -r -a DEB_ARCHES <<<"${MICROFED_CROSS_ARCHES:-arm64 amd64}"

# Tests run under qemu: every workspace member's library (unit) tests, plus the integration tests below
# that exercise CPU numerics (gemm's NEON kernels, im2col, gradients, metrics) in a few seconds. The
# end-to-end crate is left out: its tests drive the host binary and services.
# The tests are built in the release profile with the same linker as the release binary, so they share
# its compiled dependencies (cargo hashes the linker into every crate's fingerprint: tests linked by
# the gcc of .cargo/config.toml would recompile all dependencies, measured 2m40s here).
QEMU_TESTS=(--workspace --exclude microfed-e2e --lib)
# Integration test targets (file stems under */tests/) run under qemu; seconds measured under qemu on
# this project's 2-core machine. A target that no longer exists is reported and left out.
QEMU_TEST_TARGETS=(
  suite            # kernels: every op and its gradient by finite differences, each test as cpu::NAME and
                   # cuda::NAME (the CUDA half skips itself: no libcuda under qemu); slow ones in QEMU_SKIP
  cuda_unavailable # kernels: the CPU fallback when no CUDA library loads, as on a board without JetPack CUDA (<1 s)
  features_known   # agent: grain size, ASTM E112, phase fractions against hand-computed values (<1 s)
  metrics_known    # agent: IoU, Dice, boundary F1 against hand-computed values (<1 s)
  dataset_check    # agent: dataset validation on real files (1 s)
)
# Left out, measured under qemu: synth_truth (36 s) and synth_cli (11 s: generator and CLI, integer
# and geometry code that runs on the host suite), cuda_emulated (7 s: CUDA indexing under a host C++
# emulation, nothing aarch64-specific), cuda_compile (needs NVRTC: it skips under qemu anyway).
#
# Tests skipped inside the targets above (cargo test's --skip takes substrings of test names); a test
# belongs here when it takes more than a few seconds under qemu and covers no aarch64-specific path.
# The CUDA tests need no entry: there is no libcuda under qemu, so they skip themselves as on any
# machine without a GPU. Emulation runs arithmetic 5-20x slower than a board.
QEMU_SKIP=(
  unet_learns_synthetic_micrographs      # suite: 200 training steps of the full U-Net (750 s under qemu);
                                         # its ops and gradients are checked one by one above
  unet_gradients_match_finite_differences # suite: whole-network finite differences (25 s), per-op ones run
  # agent (lib): fleet install and rollback logic, each loading and running models through tract
  # (whose kernels the engine parity test runs under qemu); the host suite runs them.
  forged_and_worse_models_are_refused_a_good_one_runs_and_rollback_returns # 78 s
  a_new_model_that_fails_at_run_time_returns_to_the_previous_one           # 38 s
  a_release_whose_install_was_cut_short_is_installed_after_the_restart     # 26 s
  a_model_that_pads_differently_fails_the_probe_and_stays_on_tract         # 80 s: the probe's fallback
  a_release_that_cannot_be_recorded_leaves_the_running_model               # 40 s
  messages_are_decoded_from_their_topics_and_refusals_reported              # 12 s
  # model runtime: tract's plan and state bookkeeping, whose arithmetic is tract's own (run above by
  # the engine parity test); under qemu making each tract plan dominates.
  a_reused_tract_state_gives_what_a_fresh_one_gives                         # 83 s
  max_pools_rewritten_as_reductions_compute_the_same                        # 55 s
  # study: the style-code attack (18 synthetic labs segmented and coded, a classifier fitted); its
  # numerics are the kernels' and tract's, covered above.
  one_clear_code_names_the_imaging_style_of_a_lab                           # 174 s
)

# ---- step bookkeeping: name, seconds, status, printed at exit whatever happened --------------------
steps=() times=() states=() notes=()
current=""
t0=0
elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
begin() {
  current=$1
  t0=$(date +%s.%N)
  say "$current"
}
end() { # [note]
  steps+=("$current")
  times+=("$(elapsed)")
  states+=(ok)
  notes+=("${1:-}")
  current=""
}
summary() {
  local rc=$?
  if [[ -n $current ]]; then
    steps+=("$current")
    times+=("$(elapsed)")
    states+=(FAILED)
    notes+=("")
  fi
  printf '\n== cross/check.sh summary\n'
  printf '%-12s %8s  %-6s %s\n' step seconds status note
  local i total=0
  for i in "${!steps[@]}"; do
    printf '%-12s %8s  %-6s %s\n' "${steps[$i]}" "${times[$i]}" "${states[$i]}" "${notes[$i]}"
    total=$(awk -v a="$total" -v b="${times[$i]}" 'BEGIN { printf "%.1f", a + b }')
  done
  printf '%-12s %8s\n' total "$total"
  if ((rc == 0)); then echo "cross/check.sh: all steps passed"; else echo "cross/check.sh: FAILED (exit $rc)"; fi
}
trap summary EXIT

# ---- 1. set-up -----------------------------------------------------------------------------------
begin set-up
if [[ "${MICROFED_SKIP_SETUP:-0}" != 1 ]]; then "$CROSS_DIR/setup.sh"; fi
end

# ---- 2. arm64 release binary and glibc floor -----------------------------------------------------
begin arm64
"$CROSS_DIR/build.sh" arm64 | tee "$TARGET_DIR/.cross-glibc-arm64.log"
end "$(tail -n1 "$TARGET_DIR/.cross-glibc-arm64.log" | sed 's/^ok: //')"

# ---- 3. the binary runs under qemu ---------------------------------------------------------------
begin "qemu smoke"
bin=$(binary_of arm64)
version=$(cargo pkgid -p microfed | sed 's/.*[#@]//')
out=$(qemu-aarch64 -L "$QEMU_SYSROOT" "$bin" --version)
echo "$out"
[[ $out == "microfed $version" ]] || die "expected 'microfed $version' from --version, got '$out'"
qemu-aarch64 -L "$QEMU_SYSROOT" "$bin" --help >/dev/null
end "$out"

# ---- 4. unit tests under qemu --------------------------------------------------------------------
begin "qemu tests"
skip_args=()
for s in "${QEMU_SKIP[@]}"; do skip_args+=(--skip "$s"); done
target_args=()
for t in "${QEMU_TEST_TARGETS[@]}"; do
  if compgen -G "*/tests/$t.rs" >/dev/null || compgen -G "*/tests/$t/main.rs" >/dev/null; then
    target_args+=(--test "$t")
  else
    echo "note: test target $t no longer exists; update QEMU_TEST_TARGETS in cross/check.sh"
  fi
done
test_log="$TARGET_DIR/.cross-qemu-tests.log"
# LD_LIBRARY_PATH may name host libraries (tests/run.sh points it at an x86 NVRTC); the emulated loader
# must see only the aarch64 sysroot. The runner (qemu) comes from .cargo/config.toml.
# MICROFED_UNDER_QEMU=1: tests with a long emulated run (the engine parity on every shipped model)
# check fewer images.
env -u LD_LIBRARY_PATH MICROFED_UNDER_QEMU=1 cargo-zigbuild test --release --locked --target "$AARCH64.$GLIBC_FLOOR" \
  "${QEMU_TESTS[@]}" "${target_args[@]}" -- "${skip_args[@]}" 2>&1 | tee "$test_log"
passed=$(grep -o '[0-9]* passed' "$test_log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -o '[0-9]* failed' "$test_log" | awk '{s+=$1} END {print s+0}')
end "$passed passed, $failed failed ($((${#target_args[@]} / 2)) integration targets, ${#QEMU_SKIP[@]} skips)"

# ---- 5. amd64 release binary ---------------------------------------------------------------------
if [[ " ${DEB_ARCHES[*]} " == *" amd64 "* ]]; then
  begin amd64
  "$CROSS_DIR/build.sh" amd64 | tee "$TARGET_DIR/.cross-glibc-amd64.log"
  end "$(tail -n1 "$TARGET_DIR/.cross-glibc-amd64.log" | sed 's/^ok: //')"
fi

# ---- 6. Debian packages --------------------------------------------------------------------------
begin debs
mkdir -p "$DEB_DIR"
deb_notes=()
# Quick compression by default: measured 13 s instead of ~95 s per architecture once tract-onnx is in,
# for packages about 20% larger. MICROFED_DEB_FAST=0 for release packages.
deb_fast=(--fast)
[[ ${MICROFED_DEB_FAST:-1} == 0 ]] && deb_fast=()
for arch in "${DEB_ARCHES[@]}"; do
  bin=$(binary_of "$arch")
  deb=$(ls -t "$DEB_DIR"/microfed_*_"$arch".deb 2>/dev/null | head -n1 || true)
  # Rebuild only when the binary or anything packaged is newer than the package.
  if [[ -n $deb && -z $(find "$bin" agent/Cargo.toml cross/debian cross/README.md -newer "$deb" 2>/dev/null) ]]; then
    echo "$(basename "$deb") is up to date"
  else
    rm -f "$DEB_DIR"/microfed_*_"$arch".deb "$DEB_DIR"/microfed-dbgsym_*_"$arch".ddeb
    CARGO_TARGET_DIR=$(target_dir_of "$arch") \
      cargo deb -p microfed --no-build --locked --target "$(triple_of "$arch")" --output "$DEB_DIR/" "${deb_fast[@]}"
    deb=$(ls -t "$DEB_DIR"/microfed_*_"$arch".deb | head -n1)
  fi
  deb_notes+=("$(basename "$deb") $(du -k "$deb" | cut -f1) KiB")
done
end "$(
  IFS=,
  echo "${deb_notes[*]}"
)"

# ---- 7. inspect the packages ---------------------------------------------------------------------
begin "deb test"
# A host test: MICROFED_HOST_TARGET_DIR lets a developer point it at the host's usual target folder.
# --workspace (not -p microfed-e2e): the selection tests/run.sh's other steps use, so the test binary
# shares their compiled dependencies instead of building another feature set of them.
MICROFED_DEB_DIR="$DEB_DIR" CARGO_TARGET_DIR=${MICROFED_HOST_TARGET_DIR:-$TARGET_DIR} \
  cargo test --locked --workspace --test deb_package -- --nocapture
end "$DEB_DIR"
