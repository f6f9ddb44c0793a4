#!/usr/bin/env bash
# Runs `hsmcheck conform` against five real PKCS#11 modules, each set up in
# temporary directories of its own, prints each table under a heading with
# the module's version, and writes a matrix (check x module: ok, refused,
# FAIL) to $1 (default /tmp/conf-matrix.txt). Exits 1 when a module FAILs a
# check or cannot be set up (the reason is printed).
#
#   softhsm2      SoftHSM2, loaded directly
#   p11-kit       the same SoftHSM2 token through p11-kit remoting (p11-kit server, p11-kit-client.so)
#   nss-softokn   NSS softokn, CK_C_INITIALIZE_ARGS.pReserved as x-init-reserved, -nologin
#   tpm2-pkcs11   tpm2-pkcs11 on swtpm (TCP, 127.0.0.1, two free ports)
#   opencryptoki  openCryptoki's soft token (swtok): needs pkcsslotd and the fixed
#                 /var/lib/opencryptoki/swtok, which is set aside and restored afterwards
#
# Debian/Ubuntu, as root (apt-get, pkcsslotd). Everything started is stopped on exit.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-/tmp/conf-matrix.txt}
case $out in /*) ;; *) out=$PWD/$out ;; esac
work=$(mktemp -d /tmp/conf-run.XXXXXX)
arch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
libdir=/usr/lib/$arch

pids=()            # daemons we started, each the leader of its own session (setsid)
ock_slotd=""       # set when we started pkcsslotd
ock_swtok_saved="" # where the original /var/lib/opencryptoki/swtok went
ock_shm_before=""  # /dev/shm/var.lib.opencryptoki.* that existed before

cleanup() {
	local pid
	for pid in "${pids[@]}"; do
		kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
	done
	for pid in "${pids[@]}"; do
		for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
	done
	pids=()
	# pkcsslotd leaves its pid file behind.
	[ -n "$ock_slotd" ] && rm -f /run/pkcsslotd.pid
	ock_slotd=""
	if [ -n "$ock_swtok_saved" ]; then
		rm -rf /var/lib/opencryptoki/swtok
		mv "$ock_swtok_saved" /var/lib/opencryptoki/swtok
		local f
		for f in /dev/shm/var.lib.opencryptoki.*; do
			[ -e "$f" ] || continue
			case " $ock_shm_before " in *" $f "*) ;; *) rm -f "$f" ;; esac
		done
		[ -e "$work/ock-shm-swtok" ] && cp -p "$work/ock-shm-swtok" /dev/shm/var.lib.opencryptoki.swtok
		ock_swtok_saved=""
	fi
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

say() { printf '%s\n' "$*"; }

# start CMD...: runs CMD in the background in a session of its own and
# records its pid (the script has no job control, so setsid does not fork
# and $! is CMD's pid, the leader of its process group).
start() {
	setsid "$@" &
	pids+=($!)
}

listening() { [ -n "$(ss -Htln "sport = :$1" 2>/dev/null)" ]; }

# freeport: a port P such that P and P+1 are free on 127.0.0.1.
freeport() {
	local p
	for _ in $(seq 100); do
		p=$((20000 + RANDOM % 30000))
		if ! listening "$p" && ! listening $((p + 1)) && [ -z "$(ss -Htan "( sport = :$p or sport = :$((p + 1)) )" 2>/dev/null)" ]; then
			echo "$p"
			return 0
		fi
	done
	return 1
}

# 1. Packages.
need=""
have() { [ -e "$1" ] || command -v "$1" >/dev/null 2>&1; }
for pair in softhsm2-util:softhsm2 /usr/lib/softhsm/libsofthsm2.so:softhsm2 \
	p11-kit:p11-kit "$libdir/pkcs11/p11-kit-client.so:p11-kit-modules" \
	pkcs11-tool:opensc "$libdir/libsoftokn3.so:libnss3" certutil:libnss3-tools \
	swtpm:swtpm swtpm_setup:swtpm-tools tpm2_flushcontext:tpm2-tools \
	"$libdir/pkcs11/libtpm2_pkcs11.so:libtpm2-pkcs11-1" \
	pkcsslotd:opencryptoki pkcsconf:opencryptoki "$libdir/pkcs11/libopencryptoki.so:opencryptoki"; do
	have "${pair%%:*}" || case " $need " in *" ${pair##*:} "*) ;; *) need="$need ${pair##*:}" ;; esac
done
if [ -n "$need" ]; then
	say "conformance: installing$need"
	if [ "$(id -u)" != 0 ]; then say "conformance: not root, cannot apt-get install$need" >&2; exit 1; fi
	# shellcheck disable=SC2086
	if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null 2>&1; then
		apt-get update -qq
		# shellcheck disable=SC2086
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null || { say "conformance: apt-get install$need failed" >&2; exit 1; }
	fi
fi

ver() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo unknown; }

# 2. The binary, built once.
say "conformance: building hsmcheck"
(cd "$repo" && go build -o "$work/hsmcheck" ./cmd/hsmcheck) || { say "conformance: go build failed" >&2; exit 1; }

modules=()     # short names, in order
declare -A title status  # status: ran, or skip: why
failed=0

# conform NAME TITLE [ENV...] -- ARGS...: runs hsmcheck conform with
# environment ENV and ARGS, prints its table, keeps it for the matrix.
conform() {
	local name=$1 title=$2; shift 2
	local env=()
	while [ "$1" != -- ]; do env+=("$1"); shift; done
	shift
	say ""
	say "=== $name: $title ==="
	local rc=0
	env "${env[@]}" timeout 120 "$work/hsmcheck" conform "$@" >"$work/$name.table" 2>"$work/$name.stderr" || rc=$?
	cat "$work/$name.table"
	if [ -s "$work/$name.stderr" ]; then
		say "--- stderr (the module's and hsmcheck's, first 15 lines of $(wc -l <"$work/$name.stderr")):"
		head -n 15 "$work/$name.stderr" | sed 's/^/  /'
	fi
	if [ "$rc" = 124 ]; then
		status[$name]="skip: conform did not finish in 120 s"
		failed=1
	elif ! grep -q '^check  *result' "$work/$name.table"; then
		status[$name]="skip: conform printed no table (exit $rc)"
		failed=1
	else
		status[$name]=ran
		[ "$rc" = 0 ] || failed=1
	fi
	say "exit status $rc"
}

skip() {
	status[$1]="skip: $2"
	failed=1
	say ""
	say "=== $1: ${title[$1]} ==="
	say "SKIPPED: $2"
}

# 3. SoftHSM2, directly.
m=softhsm2; modules+=($m); title[$m]="SoftHSM2 $(ver softhsm2) (libsofthsm2.so)"
shdir=$work/softhsm
mkdir -p "$shdir/tokens"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$shdir" >"$shdir/softhsm2.conf"
export SOFTHSM2_CONF=$shdir/softhsm2.conf
if softhsm2-util --init-token --free --label conf --so-pin 1234 --pin 1234 >"$work/softhsm.init" 2>&1; then
	conform $m "${title[$m]}" -- -uri "pkcs11:token=conf?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=1234"
else
	skip $m "softhsm2-util --init-token failed: $(tr '\n' ' ' <"$work/softhsm.init")"
fi

# 4. The same token through p11-kit remoting.
m=p11-kit; modules+=($m); title[$m]="p11-kit $(ver p11-kit) client -> server -> SoftHSM2 $(ver softhsm2)"
sock=$work/p11-kit.sock
if [ "${status[softhsm2]}" != ran ]; then
	skip $m "no SoftHSM2 token"
else
	start p11-kit server -f -n "$sock" -p /usr/lib/softhsm/libsofthsm2.so "pkcs11:token=conf" >"$work/p11-kit.log" 2>&1
	for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
	if [ -S "$sock" ]; then
		conform $m "${title[$m]}" P11_KIT_SERVER_ADDRESS="unix:path=$sock" -- \
			-uri "pkcs11:token=conf?module-path=$libdir/pkcs11/p11-kit-client.so&pin-value=1234"
	else
		skip $m "p11-kit server made no socket in 5 s: $(tr '\n' ' ' <"$work/p11-kit.log")"
	fi
fi

# 5. NSS softokn.
m=nss-softokn; modules+=($m); title[$m]="NSS softokn $(ver libnss3) (libsoftokn3.so, -nologin)"
nssdir=$work/nss
mkdir -p "$nssdir"
if certutil -N -d "sql:$nssdir" --empty-password >"$work/nss.init" 2>&1; then
	# x-init-reserved: spaces percent-encoded; quotes, '=', ':' and '/' are allowed raw in the query.
	args="configdir='sql:$nssdir'%20certPrefix=''%20keyPrefix=''%20secmod='secmod.db'%20flags="
	conform $m "${title[$m]}" -- -nologin \
		-uri "pkcs11:token=NSS%20Certificate%20DB?module-path=$libdir/libsoftokn3.so&x-init-reserved=$args"
else
	skip $m "certutil -N failed: $(tr '\n' ' ' <"$work/nss.init")"
fi

# 6. tpm2-pkcs11 on swtpm.
m=tpm2-pkcs11; modules+=($m); title[$m]="tpm2-pkcs11 $(ver libtpm2-pkcs11-1) on swtpm $(ver swtpm)"
tpm_setup() {
	local port tpmmod=$libdir/pkcs11/libtpm2_pkcs11.so
	port=$(freeport) || { echo "no two free ports"; return 1; }
	mkdir -p "$work/tpm/state" "$work/tpm/store"
	start swtpm socket --tpm2 --server "type=tcp,port=$port,bindaddr=127.0.0.1" \
		--ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" \
		--tpmstate "dir=$work/tpm/state" --flags not-need-init,startup-clear >"$work/swtpm.log" 2>&1
	for _ in $(seq 100); do listening "$port" && break; sleep 0.05; done
	listening "$port" || { echo "swtpm does not listen on $port: $(tr '\n' ' ' <"$work/swtpm.log")"; return 1; }
	export TPM2_PKCS11_TCTI="swtpm:host=127.0.0.1,port=$port" TPM2_PKCS11_STORE=$work/tpm/store
	export TPM2TOOLS_TCTI=$TPM2_PKCS11_TCTI
	# No resource manager: every process that loads the module leaves its
	# primary key and sessions in swtpm's 3 transient slots. Flush them
	# after each step.
	flush() { tpm2_flushcontext -t && tpm2_flushcontext -l && tpm2_flushcontext -s; } >/dev/null 2>&1
	local slot
	slot=$(pkcs11-tool --module "$tpmmod" --list-slots 2>/dev/null |
		awk '/^Slot /{id=$3; gsub(/[():]/, "", id)} /token state: *uninitialized/{print id; exit}')
	flush
	[ -n "$slot" ] || { echo "no uninitialized slot in pkcs11-tool --list-slots"; return 1; }
	pkcs11-tool --module "$tpmmod" --slot "$slot" --init-token --label conf --so-pin 12345678 >"$work/tpm.init" 2>&1 ||
		{ echo "pkcs11-tool --init-token: $(tr '\n' ' ' <"$work/tpm.init")"; return 1; }
	flush
	pkcs11-tool --module "$tpmmod" --token-label conf --init-pin --login --so-pin 12345678 --pin 123456 >"$work/tpm.init" 2>&1 ||
		{ echo "pkcs11-tool --init-pin: $(tr '\n' ' ' <"$work/tpm.init")"; return 1; }
	flush
}
# tpm_setup starts swtpm and exports the TCTI: not in a subshell.
tpm_setup >"$work/tpm.setup" 2>&1
if [ $? = 0 ]; then
	conform $m "${title[$m]}" -- -uri "pkcs11:token=conf?module-path=$libdir/pkcs11/libtpm2_pkcs11.so&pin-value=123456"
else
	skip $m "$(tr '\n' ' ' <"$work/tpm.setup")"
fi

# 7. openCryptoki's soft token.
m=opencryptoki; modules+=($m); title[$m]="openCryptoki $(ver opencryptoki) soft token (swtok, via pkcsslotd)"
ock_setup() {
	local conf=/etc/opencryptoki/opencryptoki.conf slot f
	if pgrep -x pkcsslotd >/dev/null; then
		echo "a pkcsslotd is already running: not touching a token in use"
		return 1
	fi
	slot=$(awk '/^slot /{s=$2} /stdll *= *libpkcs11_sw\.so/{print s; exit}' "$conf")
	[ -n "$slot" ] || { echo "no slot with stdll = libpkcs11_sw.so in $conf"; return 1; }
	[ -d /var/lib/opencryptoki/swtok ] || { echo "no /var/lib/opencryptoki/swtok"; return 1; }
	# Set the system's soft token aside; the cleanup puts it back.
	ock_shm_before=$(echo /dev/shm/var.lib.opencryptoki.*)
	[ -e /dev/shm/var.lib.opencryptoki.swtok ] && cp -p /dev/shm/var.lib.opencryptoki.swtok "$work/ock-shm-swtok" &&
		rm -f /dev/shm/var.lib.opencryptoki.swtok
	mv /var/lib/opencryptoki/swtok "$work/ock-swtok.orig" && ock_swtok_saved=$work/ock-swtok.orig
	install -d -m 0770 -o root -g pkcs11 /var/lib/opencryptoki/swtok /var/lib/opencryptoki/swtok/TOK_OBJ
	start pkcsslotd -f >"$work/pkcsslotd.log" 2>&1
	ock_slotd=1
	for _ in $(seq 100); do [ -S /var/run/pkcsslotd.socket ] && break; sleep 0.05; done
	[ -S /var/run/pkcsslotd.socket ] || { echo "pkcsslotd made no socket: $(tr '\n' ' ' <"$work/pkcsslotd.log")"; return 1; }
	echo conf | timeout 30 pkcsconf -I -c "$slot" -S 87654321 >"$work/ock.init" 2>&1 ||
		{ echo "pkcsconf -I: $(tr '\n' ' ' <"$work/ock.init")"; return 1; }
	timeout 30 pkcsconf -u -c "$slot" -S 87654321 -n 123456 >"$work/ock.init" 2>&1 ||
		{ echo "pkcsconf -u: $(tr '\n' ' ' <"$work/ock.init")"; return 1; }
	echo "slot $slot"
}
# ock_setup changes globals (pids, the saved token): not in a subshell.
ock_setup >"$work/ock.setup" 2>&1
if [ $? = 0 ]; then
	title[$m]="${title[$m]}, $(cat "$work/ock.setup")"
	conform $m "${title[$m]}" -- -uri "pkcs11:token=conf?module-path=$libdir/pkcs11/libopencryptoki.so&pin-value=123456"
else
	skip $m "$(tr '\n' ' ' <"$work/ock.setup")"
fi

# 8. The matrix.
{
	say "hsm conformance matrix ($(date -u +%Y-%m-%dT%H:%MZ), $(cd "$repo" && go version | awk '{print $3}'))"
	say ""
	for m in "${modules[@]}"; do say "  $m: ${title[$m]}$([ "${status[$m]}" = ran ] || echo " -- ${status[$m]^^}")"; done
	say ""
	for m in "${modules[@]}"; do
		[ "${status[$m]}" = ran ] || continue
		awk -F '  +' -v m="$m" 'seen {print m "\t" $1 "\t" $2} /^check  *result/ {seen=1}' "$work/$m.table"
	done >"$work/rows"
	awk -F '\t' -v mods="${modules[*]}" '
		BEGIN { n = split(mods, mod, " ") }
		!($2 in known) { known[$2] = 1; order[++k] = $2 }
		{ r[$1, $2] = $3 }
		END {
			w = 5
			for (i = 1; i <= k; i++) if (length(order[i]) > w) w = length(order[i])
			printf "%-" w "s", "check"
			for (j = 1; j <= n; j++) printf "  %-12s", mod[j]
			printf "\n"
			for (i = 1; i <= k; i++) {
				printf "%-" w "s", order[i]
				for (j = 1; j <= n; j++) { v = r[mod[j], order[i]]; printf "  %-12s", (v == "" ? "-" : v) }
				printf "\n"
			}
		}' "$work/rows"
	say ""
	say "- : not run on that module (its list differs, or the module was skipped)"
} >"$out"
say ""
say "=== matrix (also in $out) ==="
cat "$out"

cleanup

if [ "$failed" != 0 ]; then
	say "conformance: FAILED: a module FAILed a check or could not be set up (above)" >&2
	exit 1
fi
say "conformance: every module passed (refused is what a module cannot do)"
