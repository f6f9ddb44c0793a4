#!/usr/bin/env bash
# Runs the benchmarks (the compare module's bench_test.go, ecdh_test.go and scale_test.go,
# where raw miekg/pkcs11, crypto11 and hsm run side by side, and the core's
# bench_test.go and scale_test.go, which measure hsm alone), the PKCS#11
# call count (compare's TestCallsCompared) and the instruction count
# (instructions.sh), and writes the results into docs/performance.md
# between the bench and scale markers, with the machine they ran on.
#
# The benchmarks run in BENCH_COUNT rounds (default 10), each round running
# every benchmark once, so that every engine sees the same drift of a shared
# machine, rather than ten runs of one engine followed by ten of the next;
# benchstat then compares crypto11 and hsm with raw miekg/pkcs11 (-col
# /eng), with confidence intervals and p-values.
set -euo pipefail
cd "$(dirname "$0")/.."
count="${BENCH_COUNT:-10}"
out=bench.txt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bin=$tmp/hsm.test cmp=$tmp/compare.test
go test -c -o "$bin" .
(cd compare && go test -c -o "$cmp" .)
: >"$out"
for i in $(seq "$count"); do
	echo "bench.sh: round $i of $count" >&2
	"$cmp" -test.run '^$' -test.bench 'Benchmark(Ops|ECDH)$' -test.benchmem -test.timeout 60m | tee -a "$out"
	"$bin" -test.run '^$' -test.bench 'Benchmark(Refused|SessionKey)$' -test.benchmem -test.timeout 60m | tee -a "$out"
done
# The cost of lookups as keys are added (100, 1,000, 5,000 keys on one
# token): BENCH_SCALE_COUNT runs (default 6) of a few iterations each, in
# one process per module (list and lookup in compare, the durable re-bind
# in the core), since making 5,000 keys takes a minute and one listing of
# them seconds.
scale=bench-scale.txt
scount="${BENCH_SCALE_COUNT:-6}"
export HSM_SCALE="${HSM_SCALE:-100,1000,5000}"
echo "bench.sh: scale, $scount runs" >&2
"$cmp" -test.run '^$' -test.bench 'BenchmarkScale$' -test.benchtime 3x -test.count "$scount" -test.timeout 60m | tee "$scale"
"$bin" -test.run '^$' -test.bench 'BenchmarkScale$' -test.benchtime 3x -test.count "$scount" -test.timeout 60m | tee -a "$scale"
calls=$( { (cd compare && go test -count=1 -run TestCallsCompared -v . | grep -o 'PKCS#11 calls per .*'); go test -count=1 -run TestCallsPerECDH -v . | grep -o 'PKCS#11 calls per ECDH: [0-9.]*' | sed 's/$/ (hsm)/'; } || true)
benchstat="go run golang.org/x/perf/cmd/benchstat@v0.0.0-20260908200009-22c9c6c9d4da"
# The comparison (compare's BenchmarkOps) first, then what hsm alone does.
table=$($benchstat -col /eng -filter 'pkg:github.com/ce46d8f2/hsm/compare' "$out"; echo; $benchstat -col /eng -filter 'pkg:github.com/ce46d8f2/hsm' "$out")
scaletable=$($benchstat -col /eng -filter '/op:(list OR lookup)' "$scale"; echo; $benchstat -filter '/op:rebind' "$scale")
instructions=$(bash scripts/instructions.sh)
machine="$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(go version | cut -d' ' -f3), SoftHSM $(dpkg-query -W -f='${Version}' softhsm2 2>/dev/null), p11-kit $(dpkg-query -W -f='${Version}' p11-kit 2>/dev/null), $(date -u +%Y-%m-%d)"
python3 - "$machine" "$calls" "$table" "$instructions" "$count" "$scaletable" <<'PY'
import re, sys
machine, calls, table, instructions, count, scaletable = sys.argv[1:7]
calls = "\n".join(f"- {l}" for l in calls.splitlines())
section = (f"<!-- bench:start -->\nMeasured by `make bench` on {machine}.\n\n"
           f"{calls}\n\nCPU instructions per operation, directly on SoftHSM, one goroutine "
           f"(`scripts/instructions.sh`, under valgrind; mean of two runs, ± half their spread):\n\n```\n{instructions}\n```\n\n"
           f"Time and memory ({count} interleaved rounds; `vs base` is the change from raw miekg/pkcs11, "
           f"`~` where the difference is not significant at p < 0.05):\n\n```\n{table}\n```\n<!-- bench:end -->")
doc = "docs/performance.md"
s = open(doc).read()
if "<!-- bench:end -->" not in s or "<!-- scale:end -->" not in s:
    sys.exit(f"bench.sh: {doc} has no bench or scale markers")
s = re.sub(r"<!-- bench:start -->.*<!-- bench:end -->", lambda m: section, s, flags=re.S)
scount = __import__("os").environ.get("BENCH_SCALE_COUNT", "6")
scale = (f"<!-- scale:start -->\nMeasured by `make bench` on {machine} ({scount} runs of 3 iterations; "
         f"`vs base` is the change from raw miekg/pkcs11):\n\n```\n{scaletable}\n```\n<!-- scale:end -->")
s = re.sub(r"<!-- scale:start -->.*<!-- scale:end -->", lambda m: scale, s, flags=re.S)
open(doc, "w").write(s)
PY
echo "docs/performance.md updated" >&2
