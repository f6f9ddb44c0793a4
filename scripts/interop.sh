#!/usr/bin/env bash
# make interop: checks hsm's output with clients nobody here wrote (see
# docs/interop.md). Installs npm's jose into a temporary directory (never
# into the repository), builds the interop program (interop/, a nested
# module) there and runs it: it makes a SoftHSM2 token of its own, serves
# HTTPS on 127.0.0.1 with the token's keys, and runs openssl s_client,
# curl, openssl verify, openssl req -verify and jose (Node.js) against what
# it made, each on good input (must accept) and on broken input (must
# refuse). Arguments go to the program (-v: every client's output;
# -markdown FILE: the results as a table).
#
# Needs openssl, curl, node and npm (make interop installs them), SoftHSM2
# and OpenSC (make deps), and the npm registry. JOSE_VERSION overrides the
# jose version: 6.2.18 on Node.js 20 or later, else 5.10.0 (jose 6 needs
# the WebCrypto global and Ed25519 of Node.js 20).
#
# Every step is bounded (timeout); the temporary directory goes, and the
# program is stopped, on every exit path.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}

for cmd in openssl curl node npm; do
	command -v "$cmd" >/dev/null 2>&1 || { echo "interop: $cmd is not installed; run: sh scripts/install-deps.sh openssl curl node npm" >&2; exit 1; }
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/hsm-interop.XXXXXX")
pid=""
cleanup() {
	if [ -n "$pid" ]; then
		kill -TERM "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	fi
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# run runs a command in the background and waits for it, so that a signal
# to this script runs the traps at once (cleanup then stops the command).
run() {
	"$@" &
	pid=$!
	local rc=0
	wait "$pid" || rc=$?
	pid=""
	return "$rc"
}

t0=$SECONDS
node_major=$(node -p 'process.versions.node.split(".")[0]')
jose=${JOSE_VERSION:-}
if [ -z "$jose" ]; then
	if [ "$node_major" -ge 20 ]; then jose=6.2.18; else jose=5.10.0; fi
fi
echo "== npm install jose@$jose (Node.js $(node --version), npm $(npm --version)) into $tmp/npm"
run timeout -k 5 120 npm install --prefix "$tmp/npm" --no-audit --no-fund --no-update-notifier \
	--ignore-scripts --loglevel=error "jose@$jose" >/dev/null

echo "== go build ./interop"
run timeout -k 5 300 "$GO" -C interop build -o "$tmp/interop" .

t1=$SECONDS
echo "== interop"
run timeout -k 10 150 "$tmp/interop" -jose "$tmp/npm" -timeout 120s "$@"
echo "== interop: checks $((SECONDS - t1)) s, with npm and the build $((SECONDS - t0)) s"
