// Package softhsmtest adapts package softhsm to package testing: Main for
// TestMain, Require and RequireRemote to skip (or, in CI, fail) where
// SoftHSM2 or p11-kit is not installed, and NewToken and StartServer, which
// fail the test instead of returning an error; ScaleToken, a token with
// thousands of keys, for the benchmarks of lookups.
//
// It re-exports what tests use of softhsm (Token, Server, KeyType and its
// constants, the module paths, CreateToken, Serve), so that a test needs
// only this package. Commands import softhsm, which does not link testing.
package softhsmtest

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/ce46d8f2/hsm/internal/softhsm"
)

// Well-known paths of the Debian packages softhsm2 and p11-kit.
const (
	SoftHSMModule = softhsm.SoftHSMModule
	ClientModule  = softhsm.ClientModule
)

// Token is a SoftHSM2 token; see softhsm.Token. Its methods GenerateKey,
// DeleteKeyPair and ChangePIN take a *testing.T or *testing.B.
type Token = softhsm.Token

// KeyType names a key for pkcs11-tool --key-type.
type KeyType = softhsm.KeyType

// Key types.
const (
	RSA2048 = softhsm.RSA2048
	RSA3072 = softhsm.RSA3072
	P256    = softhsm.P256
	P384    = softhsm.P384
	P521    = softhsm.P521
	Ed25519 = softhsm.Ed25519
)

// Main sets up a temporary SoftHSM2 configuration for the test binary
// (softhsm.Setup), runs the tests and removes it. Use it as:
//
//	func TestMain(m *testing.M) { os.Exit(softhsmtest.Main(m)) }
func Main(m *testing.M) int {
	d, err := os.MkdirTemp("", "softhsmtest-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "softhsmtest:", err)
		return 2
	}
	defer os.RemoveAll(d)
	if err := softhsm.Setup(d); err != nil {
		fmt.Fprintln(os.Stderr, "softhsmtest:", err)
		return 2
	}
	return m.Run()
}

// Require skips the test when SoftHSM2 or its tools are not installed, and
// fails it instead when running in CI (CI=true), where they must be.
func Require(t testing.TB) { require(t, false) }

// RequireRemote is Require plus p11-kit's server and client module.
func RequireRemote(t testing.TB) { require(t, true) }

func require(t testing.TB, remote bool) {
	t.Helper()
	if softhsm.Dir() == "" {
		t.Fatal("softhsmtest: call softhsmtest.Main from TestMain")
	}
	missing := softhsm.Missing(remote)
	if len(missing) == 0 {
		return
	}
	msg := "softhsmtest: not installed: " + strings.Join(missing, ", ") + "; run `make deps` (installs softhsm2, p11-kit, opensc)"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// CreateToken is softhsm.CreateToken: it initializes a fresh token with a
// unique label starting with prefix, user PIN "1234" and SO PIN "5678".
func CreateToken(prefix string) (*Token, error) { return softhsm.CreateToken(prefix) }

// NewToken is CreateToken for tests: it fails the test on error, and skips
// it where SoftHSM2 is not installed (outside CI).
func NewToken(t testing.TB, prefix string) *Token {
	t.Helper()
	Require(t)
	tok, err := softhsm.CreateToken(prefix)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// Softokn is NSS's PKCS#11 module (package libnss3).
const Softokn = "/usr/lib/x86_64-linux-gnu/libsoftokn3.so"

// NSSDatabase makes an NSS database with an empty password in a directory
// of the test's own, with certutil (package libnss3-tools), and returns the
// CK_C_INITIALIZE_ARGS.pReserved string that opens it with Softokn (token
// "NSS Certificate DB", no login). It fails in CI and skips elsewhere when
// NSS is not installed.
func NSSDatabase(t testing.TB) string {
	t.Helper()
	_, err := os.Stat(Softokn)
	if _, lerr := exec.LookPath("certutil"); err != nil || lerr != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("NSS softokn or certutil missing (packages libnss3, libnss3-tools): %v %v", err, lerr)
		}
		t.Skip("NSS softokn or certutil not installed (packages libnss3, libnss3-tools)")
	}
	dir := t.TempDir()
	if out, err := exec.Command("certutil", "-N", "-d", "sql:"+dir, "--empty-password").CombinedOutput(); err != nil {
		t.Fatalf("certutil: %v\n%s", err, out)
	}
	return fmt.Sprintf("configdir='sql:%s' certPrefix='' keyPrefix='' secmod='secmod.db' flags=", dir)
}
