#!/usr/bin/env bash
# Builds every fuzz target with libFuzzer + sanitizer-coverage (stable Rust, see README.md) and
# runs each for a fixed time over its corpus; prints one table row per target.
#   benches/fuzz/run.sh [SECONDS_PER_TARGET] [PARALLEL]
#   benches/fuzz/run.sh --report      # the table again, from the last run's logs
# Env: TARGETS="a b" to run a subset; FUZZ_ARGS for extra libFuzzer flags.
set -euo pipefail
cd "$(dirname "$0")"
TARGETS=${TARGETS:-"model_reader adapter_reader pth_reader safetensors_reader dicom_reader frame_prompt"}

report() {
    printf '| %-18s | %12s | %8s | %9s | %12s | %7s |\n' target executions "exec/s" "cov / ft" "corpus (new)" crashes
    printf '|%s|%s|%s|%s|%s|%s|\n' -------------------- -------------- ---------- ----------- -------------- ---------
    for t in $TARGETS; do
        local log=logs/$t.log runs rate cov corpus crashes
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
        cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1 | awk '{print $2 " / " $4}')
        corpus=$(find "work/$t" -type f 2>/dev/null | wc -l)
        crashes=$(find "artifacts/$t" -type f 2>/dev/null | wc -l)
        printf '| %-18s | %12s | %8s | %9s | %12s | %7s |\n' "$t" "${runs:-?}" "${rate:-?}" "${cov:-?}" "$corpus" "$crashes"
    done
}

if [ "${1:-}" = "--report" ]; then
    report
    exit 0
fi

SECS=${1:-300}
PAR=${2:-1}
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')

# What cargo-fuzz passes on nightly, minus -Zsanitizer: on stable the sancov LLVM pass is still
# reachable through -Cpasses, and its inline 8-bit counters, PC table and compare tracing are
# what libFuzzer reads. --target keeps these flags off build scripts and proc macros.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth \
-Cdebug-assertions -Coverflow-checks --cfg fuzzing"
export CARGO_TARGET_DIR=target/instrumented
cargo build --release --features fuzz --target "$TRIPLE" --bins >&2
BIN=$CARGO_TARGET_DIR/$TRIPLE/release

mkdir -p logs artifacts
run_one() {
    local t=$1 work=work/$1
    mkdir -p "$work" "artifacts/$t"
    # New inputs go to work/ (ignored by git, kept between runs); the committed corpus is read only.
    local dirs=("$work" "corpus/$t")
    # Crash regressions join the corpus: mutating near a past bug is cheap insurance.
    [ -d "regressions/$t" ] && dirs+=("regressions/$t")
    # Tokens of the format (pickle globals, zip signatures) the mutator would rarely spell out.
    local dict=()
    [ -f "dicts/$t.dict" ] && dict=(-dict="dicts/$t.dict")
    # 2 GiB RSS, 1 GiB per allocation: a reader that sizes an allocation from an unchecked
    # length field is reported as a crash. 10 s per input: a hang is a crash too.
    "$BIN/$t" "${dirs[@]}" -max_total_time="$SECS" -rss_limit_mb=2048 -malloc_limit_mb=1024 \
        -timeout=10 -max_len=65536 -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
        "${dict[@]}" ${FUZZ_ARGS:-} >"logs/$t.log" 2>&1 || true
}
export -f run_one
export BIN SECS FUZZ_ARGS
printf '%s\n' $TARGETS | xargs -P "$PAR" -I{} bash -c 'run_one {}'
report
