#!/usr/bin/env bash
# Runs each fuzz target for a bounded time and prints what libFuzzer reports.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     # default: 300 s, every target
#
# Targets: `request` (routing, query, X-Chat-Id and both body parsers, from request line and
# body to a command) and `upstream` (an LLM's completion, error and streamed bodies) live in
# fuzz/; `http_request` (the HTTP/1.1 parser of chatpool's tiny_http fork: request line,
# headers, framing, plain and chunked bodies) lives with the fork in vendor/tiny_http/fuzz/.
# Each starts from its seed corpus in DIR/corpus/TARGET; what it learns goes to
# target/fuzz-corpus/TARGET, so the committed seeds stay small. A crash leaves its input in
# DIR/artifacts/TARGET and makes this script exit 1: turn it into a regression test before
# fixing it.
#
# Needs cargo-fuzz (installed here when missing) and a nightly toolchain for the sanitizer
# flags; without one, stable is told to accept them with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-300}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(request upstream http_request)

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi

found=0
for target in "${targets[@]}"; do
  dir=fuzz
  [ "$target" = http_request ] && dir=vendor/tiny_http/fuzz
  work=$PWD/target/fuzz-corpus/$target
  mkdir -p "$work"
  echo "== $target: ${seconds}s"
  (cd "$dir" && "${fuzz[@]}" run "$target" "$work" "corpus/$target" -- \
      -max_total_time="$seconds" -print_final_stats=1 2>&1) \
    | grep -E '^(#[0-9]+\s+DONE|Done|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==|SUMMARY|.*panicked)' || true
  findings=$(ls "$dir/artifacts/$target" 2>/dev/null | wc -l)
  echo "   corpus: $(ls "$work" | wc -l) inputs; findings: $findings"
  [ "$findings" -eq 0 ] || found=1
done
exit $found
