#!/usr/bin/env bash
# Runs the same benches of an earlier commit and of the working tree one
# after the other, in one session, and prints criterion's medians side by
# side: the honest way to say "no slower than before" on a noisy machine.
#
# Usage: scripts/bench-compare.sh <commit> <bench>... [-- <criterion filter>]
# Example: scripts/bench-compare.sh b7d2dfe batcher async_mapper throttle pipeline chain
#          FEATURES=circuit-breaker scripts/bench-compare.sh 2943071 breaker
#
# The earlier commit is checked out as a worktree under $TMPDIR and built
# with its own target directory, so the working tree's build is untouched.
set -euo pipefail

base=${1:?usage: bench-compare.sh <commit> <bench>... [-- filter]}
shift
benches=()
while (($#)) && [[ $1 != -- ]]; do
    benches+=("$1")
    shift
done
[[ ${1:-} == -- ]] && shift
filter=${1:-}
((${#benches[@]})) || { echo "name at least one bench" >&2; exit 2; }

root=$(git rev-parse --show-toplevel)
tmp=${TMPDIR:-/tmp}/streamz-bench-compare
old="$tmp/tree"
old_target="$tmp/target"
mkdir -p "$tmp"
if [[ -d $old ]]; then
    git -C "$old" checkout --quiet --detach "$base"
else
    git -C "$root" worktree add --quiet --detach "$old" "$base"
fi
trap 'git -C "$root" worktree remove --force "$old" 2>/dev/null || true' EXIT

bench_args=()
for b in "${benches[@]}"; do bench_args+=(--bench "$b"); done
# Benches that need a cargo feature (breaker): FEATURES=circuit-breaker.
[[ -n ${FEATURES:-} ]] && bench_args+=(--features "$FEATURES")
(cd "$old" && CARGO_TARGET_DIR=$old_target cargo bench --no-run "${bench_args[@]}" 2>/dev/null)
(cd "$root" && cargo bench --no-run "${bench_args[@]}" 2>/dev/null)

# The newest executable of a bench in a target directory.
exe() { ls -t "$1"/release/deps/"$2"-* | grep -v '\.d$' | head -1; }
target=$(cd "$root" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

for b in "${benches[@]}"; do
    for side in before after; do
        if [[ $side == before ]]; then dir=$old bin=$(exe "$old_target" "$b");
        else dir=$root bin=$(exe "$target" "$b"); fi
        (cd "$dir" && "$bin" --bench --noplot --warm-up-time 1 --measurement-time 3 $filter 2>/dev/null) \
            >"$tmp/$b.$side.txt"
    done
    python3 - "$tmp" "$b" <<'PY'
import re, sys
tmp, bench = sys.argv[1], sys.argv[2]
def medians(side):
    found, name = {}, None
    for line in open(f"{tmp}/{bench}.{side}.txt"):
        m = re.match(r"^(?:Benchmarking )?([A-Za-z_0-9]+/[^\s:]+)\s*$", line)
        if m:
            name = m.group(1)
        m = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+)", line)
        if m and name:
            scale = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
            found[name] = float(m.group(1)) * scale
            name = None
    return found
before, after = medians("before"), medians("after")
print(f"\n{bench}: median ms, before -> after (after / before)")
for case, b in before.items():
    a = after.get(case)
    if a is not None:
        print(f"  {case:60} {b:9.3f} -> {a:9.3f}  ({a / b:.2f}x)")
PY
done
