#!/usr/bin/env bash
# Runs the benchmarks (bench_test.go) and the PKCS#11 call count
# (TestCallsPerOperation), and writes the results into README.md between
# the bench markers, with the machine they ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
count="${BENCH_COUNT:-3}"
out=bench.txt
go test -run '^$' -bench . -benchmem -count "$count" -timeout 60m . | tee "$out"
calls=$(go test -count=1 -run TestCallsPerOperation -v . | grep -o 'PKCS#11 calls per ECDSA signature.*' || true)
table=$(go run golang.org/x/perf/cmd/benchstat@v0.0.0-20260908200009-22c9c6c9d4da -col /x "$out" 2>/dev/null || go run golang.org/x/perf/cmd/benchstat@v0.0.0-20260908200009-22c9c6c9d4da "$out")
machine="$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(go version | cut -d' ' -f3), SoftHSM $(dpkg-query -W -f='${Version}' softhsm2 2>/dev/null), p11-kit $(dpkg-query -W -f='${Version}' p11-kit 2>/dev/null), $(date -u +%Y-%m-%d)"
python3 - "$machine" "$calls" "$table" <<'PY'
import re, sys
machine, calls, table = sys.argv[1:4]
section = (f"<!-- bench:start -->\nMeasured by `make bench` on {machine}:\n\n"
           f"{calls}\n\n```\n{table}\n```\n<!-- bench:end -->")
s = open("README.md").read()
s = re.sub(r"<!-- bench:start -->.*<!-- bench:end -->", lambda m: section, s, flags=re.S)
open("README.md", "w").write(s)
PY
echo "README.md updated"
