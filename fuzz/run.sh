#!/bin/sh
# Runs one fuzz target for $2 seconds (default 600) at low priority, as recorded in
# RELIABILITY.md. The machine has only a stable toolchain: RUSTC_BOOTSTRAP=1 lets
# cargo-fuzz pass its -Z sanitizer flags to it.
set -eu
cd "$(dirname "$0")"
target=$1
secs=${2:-600}
mkdir -p "corpus/$target" "seeds/$target" logs
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="$PWD/target"
exec nice -n 10 cargo fuzz run -s address "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$secs" -print_final_stats=1 >"logs/$target.log" 2>&1
