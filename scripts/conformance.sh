#!/usr/bin/env bash
# Runs `hsmcheck conform` against five real PKCS#11 modules, each set up in
# temporary directories of its own, prints each table under a heading with
# the module's version, and writes a matrix (check x module: ok, refused,
# FAIL) to $1 (default /tmp/conf-matrix.txt). With HSM_CONF_DOC set to a
# file (docs/modules.md), the matrix also replaces what that file holds
# between its <!-- conformance:start --> and <!-- conformance:end -->
# lines; without it the work tree is left as it is (CI).
#
#   softhsm2      SoftHSM2, loaded directly
#   p11-kit       the same SoftHSM2 token through p11-kit remoting (p11-kit server, p11-kit-client.so)
#   nss-softokn   NSS softokn, CK_C_INITIALIZE_ARGS.pReserved as x-init-reserved, -nologin
#   tpm2-pkcs11   tpm2-pkcs11 on swtpm (TCP, 127.0.0.1, two free ports) behind the
#                 tpm2-abrmd resource manager, on a D-Bus session bus of its own
#   opencryptoki  openCryptoki's soft token (swtok): needs pkcsslotd and the fixed
#                 /var/lib/opencryptoki/swtok, which is set aside and restored afterwards
#
# Every result is compared with the expectations below (the known limits of
# each module, with their reasons; every other check must be ok). Exits 1
# when a check does worse than expected (a regression), a module cannot be
# set up, or a run does not finish in time; a check that does better than
# expected is reported, not an error.
#
# Environment: HSM_CONF_TIMEOUT bounds each module's conform run (seconds,
# default 120), HSM_CONF_PORTS is the range swtpm's ports come from
# (default 20000-49999), HSM_CONF_DOC is the document to write the matrix
# into (default none).
#
# Debian/Ubuntu, as root (apt-get, pkcsslotd). Everything started is
# stopped on exit, on failure and on INT/TERM/HUP.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-/tmp/conf-matrix.txt}
case $out in /*) ;; *) out=$PWD/$out ;; esac
work=$(mktemp -d "${TMPDIR:-/tmp}/conf-run.XXXXXX")
limit=${HSM_CONF_TIMEOUT:-120}
ports=${HSM_CONF_PORTS:-20000-49999}
arch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
libdir=/usr/lib/$arch

pids=()            # daemons we started, each the leader of its own session (setsid)
child=""           # the bounded command running now, the leader of its process group
ock_slotd=""       # set when we started pkcsslotd
ock_swtok_saved="" # where the original /var/lib/opencryptoki/swtok went
ock_shm_before=""  # /dev/shm/var.lib.opencryptoki.* that existed before

cleanup() {
	local pid
	if [ -n "$child" ]; then
		# timeout passes TERM on to its command and reaps it; KILL is the
		# fallback for the whole group.
		kill -TERM "$child" 2>/dev/null
		for _ in $(seq 50); do kill -0 "$child" 2>/dev/null || break; sleep 0.1; done
		kill -KILL -- "-$child" 2>/dev/null
		wait "$child" 2>/dev/null
		child=""
	fi
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

# bounded SECS CMD...: runs CMD under timeout (TERM after SECS, KILL 5 s
# later) in the background and waits for it, so that a signal to this
# script interrupts the wait at once and the cleanup stops CMD (timeout
# makes its own process group). CMD reads this script's stdin.
bounded() {
	local secs=$1 rc=0
	shift
	timeout -k 5 "$secs" "$@" <&0 &
	child=$!
	wait "$child" || rc=$?
	child=""
	return "$rc"
}

listening() { [ -n "$(ss -Htln "sport = :$1" 2>/dev/null)" ]; }

# freeport: a port P in $ports such that P and P+1 are free on 127.0.0.1.
freeport() {
	local p lo=${ports%-*} hi=${ports#*-}
	for _ in $(seq 100); do
		p=$((lo + RANDOM % (hi - lo)))
		if ! listening "$p" && ! listening $((p + 1)) && [ -z "$(ss -Htan "( sport = :$p or sport = :$((p + 1)) )" 2>/dev/null)" ]; then
			echo "$p"
			return 0
		fi
	done
	return 1
}

# 1. Packages: the tests' set and the other modules' (nothing when they are there).
bounded 900 sh "$repo/scripts/install-deps.sh" --conformance || { say "conformance: installing the packages failed" >&2; exit 1; }

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
	bounded "$limit" env "${env[@]}" "$work/hsmcheck" conform "$@" </dev/null >"$work/$name.table" 2>"$work/$name.stderr" || rc=$?
	cat "$work/$name.table"
	if [ -s "$work/$name.stderr" ]; then
		say "--- stderr (the module's and hsmcheck's, first 15 lines of $(wc -l <"$work/$name.stderr")):"
		head -n 15 "$work/$name.stderr" | sed 's/^/  /'
	fi
	# Exit 1 with a table is a FAILed check: the expectations judge it.
	if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
		status[$name]="skip: conform did not finish in $limit s"
		failed=1
	elif ! grep -q '^check  *result' "$work/$name.table"; then
		status[$name]="skip: conform printed no table (exit $rc)"
		failed=1
	elif [ "$rc" != 0 ] && [ "$rc" != 1 ]; then
		status[$name]="skip: conform exited $rc"
		failed=1
	else
		status[$name]=ran
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
if timeout -k 5 60 softhsm2-util --init-token --free --label conf --so-pin 1234 --pin 1234 >"$work/softhsm.init" 2>&1; then
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
if timeout -k 5 60 certutil -N -d "sql:$nssdir" --empty-password >"$work/nss.init" 2>&1; then
	# x-init-reserved: spaces percent-encoded; quotes, '=', ':' and '/' are allowed raw in the query.
	args="configdir='sql:$nssdir'%20certPrefix=''%20keyPrefix=''%20secmod='secmod.db'%20flags="
	conform $m "${title[$m]}" -- -nologin \
		-uri "pkcs11:token=NSS%20Certificate%20DB?module-path=$libdir/libsoftokn3.so&x-init-reserved=$args"
else
	skip $m "certutil -N failed: $(tr '\n' ' ' <"$work/nss.init")"
fi

# 6. tpm2-pkcs11 on swtpm, behind tpm2-abrmd. Without a resource manager
# swtpm's 3 transient object slots are full after the first key pair
# (tpm2-pkcs11 keeps the token's primary key, the private key and its
# public half loaded: Esys_CreateLoaded then TPM_RC_OBJECT_MEMORY, 0x902,
# which the module reports as CKR_GENERAL_ERROR); the resource manager
# swaps objects out, and flushes what a process left when it disconnects.
# Its D-Bus is a session bus of our own, under a name of our own.
m=tpm2-pkcs11; modules+=($m); title[$m]="tpm2-pkcs11 $(ver libtpm2-pkcs11-1) on swtpm $(ver swtpm), tpm2-abrmd $(ver tpm2-abrmd)"
tpm_setup() {
	local port tpmmod=$libdir/pkcs11/libtpm2_pkcs11.so bus=$work/tpm/bus name
	port=$(freeport) || { echo "no two free ports in $ports"; return 1; }
	name=com.intel.tss2.Tabrmd.conf$port
	mkdir -p "$work/tpm/state" "$work/tpm/store"
	start swtpm socket --tpm2 --server "type=tcp,port=$port,bindaddr=127.0.0.1" \
		--ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" \
		--tpmstate "dir=$work/tpm/state" --flags not-need-init,startup-clear >"$work/swtpm.log" 2>&1
	start dbus-daemon --session --nofork --nopidfile --address="unix:path=$bus" >"$work/dbus.log" 2>&1
	for _ in $(seq 100); do listening "$port" && [ -S "$bus" ] && break; sleep 0.05; done
	listening "$port" || { echo "swtpm does not listen on $port: $(tr '\n' ' ' <"$work/swtpm.log")"; return 1; }
	[ -S "$bus" ] || { echo "dbus-daemon made no socket: $(tr '\n' ' ' <"$work/dbus.log")"; return 1; }
	export DBUS_SESSION_BUS_ADDRESS=unix:path=$bus
	start tpm2-abrmd --session --allow-root --flush-all --dbus-name="$name" \
		--tcti="swtpm:host=127.0.0.1,port=$port" >"$work/abrmd.log" 2>&1
	local up=""
	for _ in $(seq 200); do
		dbus-send --session --print-reply --dest=org.freedesktop.DBus / org.freedesktop.DBus.NameHasOwner "string:$name" 2>/dev/null |
			grep -q 'boolean true' && up=1 && break
		sleep 0.05
	done
	[ -n "$up" ] || { echo "tpm2-abrmd did not take $name in 10 s: $(tr '\n' ' ' <"$work/abrmd.log")"; return 1; }
	export TPM2_PKCS11_TCTI="tabrmd:bus_type=session,bus_name=$name" TPM2_PKCS11_STORE=$work/tpm/store
	local slot
	slot=$(timeout -k 5 60 pkcs11-tool --module "$tpmmod" --list-slots 2>/dev/null |
		awk '/^Slot /{id=$3; gsub(/[():]/, "", id)} /token state: *uninitialized/{print id; exit}')
	[ -n "$slot" ] || { echo "no uninitialized slot in pkcs11-tool --list-slots"; return 1; }
	timeout -k 5 60 pkcs11-tool --module "$tpmmod" --slot "$slot" --init-token --label conf --so-pin 12345678 >"$work/tpm.init" 2>&1 ||
		{ echo "pkcs11-tool --init-token: $(tr '\n' ' ' <"$work/tpm.init")"; return 1; }
	timeout -k 5 60 pkcs11-tool --module "$tpmmod" --token-label conf --init-pin --login --so-pin 12345678 --pin 123456 >"$work/tpm.init" 2>&1 ||
		{ echo "pkcs11-tool --init-pin: $(tr '\n' ' ' <"$work/tpm.init")"; return 1; }
}
# tpm_setup starts daemons and exports the TCTI: not in a subshell.
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
	echo conf | timeout -k 5 30 pkcsconf -I -c "$slot" -S 87654321 >"$work/ock.init" 2>&1 ||
		{ echo "pkcsconf -I: $(tr '\n' ' ' <"$work/ock.init")"; return 1; }
	timeout -k 5 30 pkcsconf -u -c "$slot" -S 87654321 -n 123456 >"$work/ock.init" 2>&1 ||
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

# 8. The expectations: what each module cannot do, and why. A check not
# listed must be ok. "refused TEXT": refused, and the detail says TEXT (the
# CKR code); "-": not run (the key it needs could not be made); "FAIL
# TEXT": a known failure whose detail says TEXT. Fields: module | check |
# expected | reason.
expectations='
p11-kit      | generate Ed25519               | refused CKR_MECHANISM_INVALID | the RPC of p11-kit 0.24.1 carries neither CKM_EC_EDWARDS_KEY_PAIR_GEN nor CKM_EDDSA
p11-kit      | sign Ed25519 pure              | -                             | no Ed25519 key
nss-softokn  | generate Ed25519               | refused CKR_MECHANISM_INVALID | NSS softokn 3.87 has no Ed25519
nss-softokn  | sign Ed25519 pure              | -                             | no Ed25519 key
tpm2-pkcs11  | sign RSA-2048 PSS SHA-256 salt=auto | refused CKR_MECHANISM_PARAM_INVALID | a TPM signs RSA-PSS only with a salt as long as the hash
tpm2-pkcs11  | generate ECDSA P-521           | refused invalid P521 point encoding | tpm2-pkcs11 1.9.0 writes the 133-byte P-521 CKA_EC_POINT with a one-byte length, 04 85 04... (src/lib/tpm.c:3580), not DER; it cannot read it back to sign either (src/lib/ssl_util.c:182, CKR_HOST_MEMORY)
tpm2-pkcs11  | sign ECDSA P-521 SHA-512       | -                             | no P-521 key
tpm2-pkcs11  | generate Ed25519               | refused CKR_MECHANISM_INVALID | TPM 2.0 has no Ed25519
tpm2-pkcs11  | sign Ed25519 pure              | -                             | no Ed25519 key
opencryptoki | generate ECDSA P-256           | refused CKR_MECHANISM_INVALID | Debian'"'"'s openCryptoki 3.8.1 soft token has no EC
opencryptoki | sign ECDSA P-256 SHA-256       | -                             | no P-256 key
opencryptoki | generate ECDSA P-384           | refused CKR_MECHANISM_INVALID | no EC
opencryptoki | sign ECDSA P-384 SHA-384       | -                             | no P-384 key
opencryptoki | generate ECDSA P-521           | refused CKR_MECHANISM_INVALID | no EC
opencryptoki | sign ECDSA P-521 SHA-512       | -                             | no P-521 key
opencryptoki | generate Ed25519               | refused CKR_MECHANISM_INVALID | no EC
opencryptoki | sign Ed25519 pure              | -                             | no Ed25519 key
p11-kit      | ecdh ECDSA P-256               | refused CKR_MECHANISM_INVALID | the RPC of p11-kit 0.24.1 does not carry CKM_ECDH1_DERIVE (its CK_ECDH1_DERIVE_PARAMS)
p11-kit      | ecdh ECDSA P-384               | refused CKR_MECHANISM_INVALID | no CKM_ECDH1_DERIVE through p11-kit 0.24.1
p11-kit      | ecdh ECDSA P-521               | refused CKR_MECHANISM_INVALID | no CKM_ECDH1_DERIVE through p11-kit 0.24.1
tpm2-pkcs11  | ecdh ECDSA P-256               | refused CKR_FUNCTION_NOT_SUPPORTED | tpm2-pkcs11 1.9.0 has no C_DeriveKey (the TPM could: TPM2_ECDH_ZGen)
tpm2-pkcs11  | ecdh ECDSA P-384               | refused CKR_FUNCTION_NOT_SUPPORTED | no C_DeriveKey
tpm2-pkcs11  | generate ECDSA P-521 (derive)  | refused invalid P521 point encoding | the P-521 CKA_EC_POINT of tpm2-pkcs11 1.9.0 (see generate ECDSA P-521)
tpm2-pkcs11  | ecdh ECDSA P-521               | -                             | no P-521 key
opencryptoki | generate ECDSA P-256 (derive)  | refused CKR_MECHANISM_INVALID | no EC
opencryptoki | ecdh ECDSA P-256               | -                             | no P-256 key
opencryptoki | generate ECDSA P-384 (derive)  | refused CKR_MECHANISM_INVALID | no EC
opencryptoki | ecdh ECDSA P-384               | -                             | no P-384 key
opencryptoki | generate ECDSA P-521 (derive)  | refused CKR_MECHANISM_INVALID | no EC
opencryptoki | ecdh ECDSA P-521               | -                             | no P-521 key
'
printf '%s' "$expectations" | awk -F '|' 'NF >= 3 {
	for (i = 1; i <= NF; i++) gsub(/^ +| +$/, "", $i)
	print $1 "\t" $2 "\t" $3 "\t" $4
}' >"$work/expected"

# Each table's rows: module, check, result, detail (columns found from the
# header, as the details have runs of spaces too).
for m in "${modules[@]}"; do
	[ "${status[$m]}" = ran ] || continue
	awk -v m="$m" '
		/^check  *result  *detail/ { rc = index($0, "result"); dc = index($0, "detail"); next }
		rc {
			c = substr($0, 1, rc - 1); r = substr($0, rc, dc - rc); d = substr($0, dc)
			gsub(/ +$/, "", c); gsub(/ +$/, "", r); gsub(/ +$/, "", d)
			print m "\t" c "\t" r "\t" d
		}' "$work/$m.table"
done >"$work/rows"

# The verdicts: module, check, got, expected, verdict (same, better,
# WORSE), reason. Every check any module ran is judged on every module that
# ran; an expectation no module's table has is stale.
awk -F '\t' -v mods="${modules[*]}" -v ran="$(for m in "${modules[@]}"; do [ "${status[$m]}" = ran ] && printf '%s ' "$m"; done)" '
	FNR == 1 { file++ }
	file == 1 { want[$1, $2] = $3; why[$1, $2] = $4; eorder[++ne] = $1 SUBSEP $2; next }
	{
		if (!($2 in known)) { known[$2] = 1; order[++k] = $2 }
		res[$1, $2] = $3; det[$1, $2] = $4
	}
	END {
		n = split(ran, mod, " ")
		for (j = 1; j <= n; j++) for (i = 1; i <= k; i++) {
			m = mod[j]; c = order[i]
			got = ((m, c) in res) ? res[m, c] : "-"
			e = ((m, c) in want) ? want[m, c] : "ok"
			split(e, ep, " "); et = ep[1]; etext = substr(e, length(et) + 2)
			if (got == et && (etext == "" || index(det[m, c], etext) > 0)) v = "same"
			else if (got == "ok") v = "better"
			else if (et == "FAIL" && got == "refused") v = "better"
			else v = "WORSE"
			print m "\t" c "\t" got "\t" e "\t" v "\t" why[m, c] "\t" det[m, c]
		}
		for (i = 1; i <= ne && (" " ran) ~ / softhsm2 /; i++) {
			split(eorder[i], mc, SUBSEP)
			if (!(mc[2] in known)) print mc[1] "\t" mc[2] "\t-\t" want[eorder[i]] "\tSTALE\t" why[eorder[i]] "\t"
		}
	}' "$work/expected" "$work/rows" >"$work/verdicts" || { say "conformance: judging the results failed" >&2; exit 1; }
[ -s "$work/verdicts" ] || { say "conformance: no results to judge" >&2; exit 1; }

# 9. The matrix: ! marks a result worse than expected, + a better one.
{
	say "hsm conformance matrix ($(date -u +%Y-%m-%dT%H:%MZ), $(cd "$repo" && go version | awk '{print $3}'))"
	say ""
	for m in "${modules[@]}"; do say "  $m: ${title[$m]}$([ "${status[$m]}" = ran ] || echo " -- ${status[$m]^^}")"; done
	say ""
	awk -F '\t' -v mods="${modules[*]}" '
		BEGIN { n = split(mods, mod, " ") }
		$5 == "STALE" { next }
		!($2 in known) { known[$2] = 1; order[++k] = $2 }
		{ r[$1, $2] = $3 ($5 == "WORSE" ? "!" : $5 == "better" ? "+" : "") }
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
		}' "$work/verdicts"
	say ""
	say "- : not run on that module (the key it needs was not made, or the module was skipped)"
	say "! : worse than expected, + : better than expected (update the expectations in scripts/conformance.sh)"
	say ""
	say "Known limits (expected, not failures):"
	awk -F '\t' '$5 == "same" && $4 != "ok" && $4 != "-" { printf "  %s, %s: %s: %s\n", $1, $2, $4, $6 }' "$work/verdicts"
} >"$out"
say ""
say "=== matrix (also in $out) ==="
cat "$out"

# The matrix into the document, when asked: a fenced block between the
# markers, trailing blanks dropped.
if [ -n "${HSM_CONF_DOC:-}" ]; then
	doc=$HSM_CONF_DOC
	case $doc in /*) ;; *) doc=$PWD/$doc ;; esac
	if grep -qx '<!-- conformance:start -->' "$doc" 2>/dev/null && grep -qx '<!-- conformance:end -->' "$doc"; then
		awk -v m="$out" '
			$0 == "<!-- conformance:start -->" {
				print; print "```"
				while ((getline l < m) > 0) { sub(/ +$/, "", l); print l }
				print "```"; skip = 1; next
			}
			$0 == "<!-- conformance:end -->" { skip = 0 }
			!skip' "$doc" >"$work/doc" && cat "$work/doc" >"$doc" && say "conformance: matrix written into $doc"
	else
		say "conformance: $doc has no <!-- conformance:start/end --> lines: matrix not written into it" >&2
		failed=1
	fi
fi

worse=$(awk -F '\t' '$5 == "WORSE" { printf "  %s, %s: %s, expected %s%s\n", $1, $2, $3 ($7 == "" ? "" : " (" $7 ")"), $4, ($6 == "" ? "" : " (" $6 ")") }' "$work/verdicts")
better=$(awk -F '\t' '$5 == "better" { printf "  %s, %s: %s, expected %s\n", $1, $2, $3, $4 }' "$work/verdicts")
stale=$(awk -F '\t' '$5 == "STALE" { printf "  %s, %s: expected %s, but no module has that check\n", $1, $2, $4 }' "$work/verdicts")
if [ -n "$better" ]; then
	say ""
	say "conformance: better than expected (not an error; update the expectations):"
	say "$better"
fi

cleanup

if [ -n "$worse" ] || [ -n "$stale" ]; then
	say "" >&2
	[ -n "$worse" ] && say "conformance: FAILED: worse than expected (a regression):" >&2 && say "$worse" >&2
	[ -n "$stale" ] && say "conformance: FAILED: stale expectations (softhsm2 ran every check):" >&2 && say "$stale" >&2
	failed=1
fi
if [ "$failed" != 0 ]; then
	for m in "${modules[@]}"; do [ "${status[$m]}" = ran ] || say "conformance: $m: ${status[$m]}" >&2; done
	say "conformance: FAILED" >&2
	exit 1
fi
say "conformance: every module as expected (refused is what a module cannot do)"
