#!/bin/sh
# Installs the system packages hsm's demo and tests need, if missing:
# softhsm2 (the token), p11-kit (remoting: the "network HSM"), opensc
# (pkcs11-tool, to make tokens and keys), libnss3 and libnss3-tools (NSS
# softokn and certutil). Debian/Ubuntu; apt-get as root,
# through sudo otherwise. Arguments name more commands to install, each from
# the package of the same name (make bench: valgrind), node from nodejs
# (make interop: openssl curl node npm).
#
# With --conformance first, also what scripts/conformance.sh needs for its
# other modules: swtpm and tpm2-pkcs11 behind a resource manager
# (tpm2-abrmd on a private D-Bus), and openCryptoki.
set -eu

need=""
if [ "${1:-}" = --conformance ]; then
	shift
	lib=/usr/lib/x86_64-linux-gnu
	command -v swtpm >/dev/null 2>&1 || need="$need swtpm"
	[ -e $lib/libtss2-tcti-swtpm.so.0 ] || need="$need libtss2-tcti-swtpm0"
	[ -e $lib/pkcs11/libtpm2_pkcs11.so ] || need="$need libtpm2-pkcs11-1"
	command -v tpm2-abrmd >/dev/null 2>&1 || need="$need tpm2-abrmd"
	[ -e $lib/libtss2-tcti-tabrmd.so.0 ] || need="$need libtss2-tcti-tabrmd0"
	command -v dbus-daemon >/dev/null 2>&1 && command -v dbus-send >/dev/null 2>&1 || need="$need dbus-daemon"
	command -v pkcsslotd >/dev/null 2>&1 && command -v pkcsconf >/dev/null 2>&1 && [ -e $lib/pkcs11/libopencryptoki.so ] || need="$need opencryptoki"
fi
[ -e /usr/lib/softhsm/libsofthsm2.so ] && command -v softhsm2-util >/dev/null 2>&1 || need="$need softhsm2"
command -v p11-kit >/dev/null 2>&1 && [ -e /usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so ] || need="$need p11-kit p11-kit-modules"
command -v pkcs11-tool >/dev/null 2>&1 || need="$need opensc"
# NSS softokn, a second real module (Config.InitArgs), and certutil for its database.
[ -e /usr/lib/x86_64-linux-gnu/libsoftokn3.so ] && command -v certutil >/dev/null 2>&1 || need="$need libnss3 libnss3-tools"
for cmd in "$@"; do
	case $cmd in
	node) pkg=nodejs ;;
	*) pkg=$cmd ;;
	esac
	command -v "$cmd" >/dev/null 2>&1 || need="$need $pkg"
done
[ -z "$need" ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
	echo "install-deps: missing:$need; this script knows only apt-get (Debian, Ubuntu)" >&2
	exit 1
fi
if [ "$(id -u)" = 0 ]; then
	sudo=""
elif command -v sudo >/dev/null 2>&1; then
	sudo="sudo"
else
	echo "install-deps: missing:$need; run as root or install sudo" >&2
	exit 1
fi
echo "install-deps: installing$need" >&2
$sudo apt-get update -qq
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $need >/dev/null
