#!/usr/bin/env bash
# Counts the CPU instructions one operation costs, directly on SoftHSM, for
# raw miekg/pkcs11, crypto11 and hsm: the deterministic side of "hsm within
# 2% of raw miekg/pkcs11" (time per operation on a shared 2-core machine
# swings by more than that between runs).
#
# Each engine's serial benchmark of BenchmarkOps (in the compare module,
# compare/bench_test.go) runs under valgrind
# (cachegrind, without cache simulation, counts user-space instructions of
# the process: Go, cgo, SoftHSM, Botan) with -benchtime N1x and N2x; the
# difference divided by N2-N1 is the cost of one operation, with setup
# (Initialize, login, key lookup) cancelled out. GOMAXPROCS=1 and GOGC=off
# keep the Go scheduler's spinning and the collector from adding
# instructions that vary with timing. Every pair runs REPS times (default
# 2); the table gives the mean and the spread of the estimates.
#
# Usage: scripts/instructions.sh [output-file]   (make bench calls it)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/dev/stdout}"
reps="${REPS:-2}"
command -v valgrind >/dev/null || { echo "instructions.sh: valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd compare && go test -c -o "$tmp/compare.test" .)

# op N1 N2: fewer repetitions for the costly RSA operations.
ops=("ECDSA-P256 100 1100" "Ed25519 50 550" "RSA2048-PKCS1v15 20 220" "RSA2048-PSS 20 220" "RSA2048-OAEP-decrypt 20 220")

count() { # engine op n -> instructions
	GOMAXPROCS=1 GOGC=off valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
		"$tmp/compare.test" -test.run '^$' -test.bench "^BenchmarkOps/where=direct/op=$2/par=serial/eng=$1\$" -test.benchtime "$3x" 2>&1 |
		awk '/I +refs:/ { gsub(",", "", $NF); print $NF; found=1 } /FAIL|panic:/ { print "instructions.sh: " $0 > "/dev/stderr"; exit 1 } END { if (!found) exit 1 }'
}

: > "$tmp/per-op"
for spec in "${ops[@]}"; do
	read -r op n1 n2 <<<"$spec"
	for eng in raw crypto11 hsm; do
		[[ $eng == crypto11 && $op == Ed25519 ]] && continue # crypto11 has no Ed25519
		for _ in $(seq "$reps"); do
			a=$(count "$eng" "$op" "$n1")
			b=$(count "$eng" "$op" "$n2")
			echo "$op $eng $(( (b - a) / (n2 - n1) ))" | tee -a "$tmp/per-op" >&2
		done
	done
done

python3 - "$tmp/per-op" >"$out" <<'PY'
import sys, collections
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    op, eng, n = line.split()
    rows.setdefault(op, {}).setdefault(eng, []).append(int(n))
def cell(v):
    m = sum(v) / len(v)
    return f"{m/1e3:,.1f}k ± {(max(v)-min(v))/2/1e3:,.1f}k"
print(f"{'instructions/op (direct, serial)':34} {'raw':>20} {'crypto11':>20} {'hsm':>20} {'hsm vs raw':>11}")
for op, e in rows.items():
    raw = sum(e["raw"]) / len(e["raw"])
    hsm = sum(e["hsm"]) / len(e["hsm"])
    c11 = cell(e["crypto11"]) if "crypto11" in e else "-"
    print(f"{op:34} {cell(e['raw']):>20} {c11:>20} {cell(e['hsm']):>20} {100*(hsm-raw)/raw:>+10.2f}%")
PY
