#!/usr/bin/env bash
# Counts the instructions (cachegrind's I refs) one run of each workload
# of scripts/instructions.rs takes, built from each commit given (and the
# working tree as "HEAD+"), on a current-thread runtime. Deterministic to
# well under 1 %, unlike wall-clock times on a noisy virtual machine, where
# the same binary's criterion medians differ by up to 50 % between runs;
# it does not see wake-ups, cache misses or contention, so use it beside
# the benches, not instead of them.
#
# Usage: scripts/instruction-counts.sh <commit>... [-- workload...]
# Workloads: mapper_c2 mapper_c8_unordered pipeline stages fused batcher
# (all by default), and `breaker` with FEATURES=circuit-breaker. With
# FEATURES=metrics the workloads run with the feature on and no recorder.
# Needs valgrind.
set -euo pipefail
commits=()
while (($#)) && [[ $1 != -- ]]; do commits+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
workloads=("$@")
((${#workloads[@]})) || workloads=(mapper_c2 mapper_c8_unordered pipeline stages fused batcher)
root=$(git rev-parse --show-toplevel)
tmp=${TMPDIR:-/tmp}/streamz-instructions
mkdir -p "$tmp"
build() { # dir target -> binary
    cp "$root/scripts/instructions.rs" "$1/examples/zz_instructions.rs"
    (cd "$1" && CARGO_TARGET_DIR=$2 cargo build --quiet --release --example zz_instructions \
        ${FEATURES:+--features "$FEATURES"})
    rm "$1/examples/zz_instructions.rs"
    echo "$2/release/examples/zz_instructions"
}
bins=()
for c in "${commits[@]}"; do
    dir="$tmp/tree-$c"
    [[ -d $dir ]] || git -C "$root" worktree add --quiet --detach "$dir" "$c"
    bins+=("$c=$(build "$dir" "$tmp/target-$c")")
done
bins+=("HEAD+=$(build "$root" "$root/target")")
for w in "${workloads[@]}"; do
    for entry in "${bins[@]}"; do
        ir=$(valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
            "${entry#*=}" "$w" 2>&1 | awk '/I *refs/ {print $NF}')
        printf '%-22s %-10s %s\n' "$w" "${entry%%=*}" "$ir"
    done
done
