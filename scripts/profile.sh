#!/usr/bin/env bash
# Profiles chatpool under load with perf and prints the top functions of each kind of thread.
#
# Builds the `profiling` profile with frame pointers (so perf can walk stacks without DWARF),
# runs one scenario of the load benchmark against it (default: overhead, 10 s), records every
# process of the run with the cpu-clock software event (no hardware counters needed), and
# reports chatpool's threads by name: the acceptor, the workers (worker-* together), the
# store-writer, and tiny_http's threads (http-accept, and http-conn for each connection).
#
#   scripts/profile.sh [SCENARIO] [SECONDS]     # output in target/profile/
set -euo pipefail
cd "$(dirname "$0")/.."
scenario=${1:-overhead}
seconds=${2:-10}
out=target/profile
mkdir -p "$out"

if ! command -v perf >/dev/null; then
  echo "profile: installing Debian's linux-perf" >&2
  apt-get install -y -q linux-perf >/dev/null
fi
RUSTFLAGS="-C force-frame-pointers=yes" CARGO_TARGET_DIR=target/frame-pointers \
  cargo build --profile profiling --quiet
bin=target/frame-pointers/profiling/chatpool

perf record -e cpu-clock -F 999 -g -o "$out/perf.data" -- \
  python3 scripts/load.py --bin "$bin" --duration "$seconds" "$scenario" | tee "$out/load.txt"

# Self time shows where the CPU goes; inclusive time of chatpool's own functions (and of the
# libraries it calls for storage, JSON and upstream HTTP) shows which of its steps cost that.
for mode in no-children children; do
  perf report -i "$out/perf.data" --$mode --sort comm,sym --stdio -g none 2>/dev/null \
    | MODE=$mode python3 -c '
import os, re, sys, collections
inclusive = os.environ["MODE"] == "children"
ours = ("chatpool::", "rusqlite::", "sqlite3_step", "serde_json::", "ureq::", "tiny_http::")
groups = collections.defaultdict(collections.Counter)
total = collections.Counter()
for line in sys.stdin:
    m = re.match(r"\s+([\d.]+)%\s+(?:([\d.]+)%\s+)?(\S+)\s+\[[.k]\]\s+(.*)", line)
    if not m:
        continue
    share, comm, sym = float(m.group(1)), m.group(3), m.group(4).strip()
    if inclusive and not sym.startswith(ours):
        continue
    group = "worker-*" if comm.startswith("worker-") else comm
    if group not in ("acceptor", "worker-*", "store-writer", "store-checkpoint", "http-conn", "http-accept"):
        continue
    groups[group][sym] += share
    total[group] += share
title = "inclusive time of chatpool steps" if inclusive else "self time"
for group, share in sorted(total.items(), key=lambda kv: -kv[1]):
    print(f"\n== {group} ({title})")
    for sym, s in groups[group].most_common(20 if inclusive else 12):
        print(f"  {s:6.2f}%  {sym[:110]}")
'
done | tee "$out/top.txt"
if command -v inferno-flamegraph >/dev/null; then
  perf script -i "$out/perf.data" 2>/dev/null | inferno-collapse-perf \
    | grep -E '^(worker-|acceptor|store-|http-)' | inferno-flamegraph > "$out/chatpool.svg"
  echo "profile: flame graph of chatpool's threads in $out/chatpool.svg"
else
  echo "profile: for a flame graph, cargo install inferno and run this again"
fi
echo "profile: perf data in $out/perf.data; per-thread tops in $out/top.txt"
