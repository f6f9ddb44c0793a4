// Package softhsmtest creates throw-away SoftHSM2 tokens for tests, and
// serves them through p11-kit remoting (see Server) so that tests can kill,
// pause and restart the "HSM".
//
// Every test binary that uses it calls Main from its TestMain: Main creates
// a token directory and a softhsm2.conf in a temporary directory and sets
// SOFTHSM2_CONF before any module is loaded, and removes them afterwards.
//
// Tokens and keys are made by OpenSC's pkcs11-tool and softhsm2-util, in
// their own processes, so that the process under test stays the only user
// of the module in its address space.
package softhsmtest

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
)

// Well-known paths of the Debian packages softhsm2 and p11-kit.
const (
	SoftHSMModule = "/usr/lib/softhsm/libsofthsm2.so"
	ClientModule  = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
)

var (
	dir     string // set by Main
	counter atomic.Uint64
)

// Main sets up the SoftHSM2 configuration for the test binary (SOFTHSM2_CONF)
// and the address of its p11-kit server (P11_KIT_SERVER_ADDRESS), runs the
// tests and cleans up. Use it as: func TestMain(m *testing.M) { os.Exit(softhsmtest.Main(m)) }
func Main(m *testing.M) int {
	d, err := os.MkdirTemp("", "softhsmtest-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "softhsmtest:", err)
		return 2
	}
	defer os.RemoveAll(d)
	dir = d
	if err := configure(d); err != nil {
		fmt.Fprintln(os.Stderr, "softhsmtest:", err)
		return 2
	}
	return m.Run()
}

func configure(d string) error {
	tokens := filepath.Join(d, "tokens")
	if err := os.Mkdir(tokens, 0o700); err != nil {
		return err
	}
	conf := filepath.Join(d, "softhsm2.conf")
	text := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", tokens)
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		return err
	}
	if err := os.Setenv("SOFTHSM2_CONF", conf); err != nil {
		return err
	}
	// p11-kit-client.so reads the server address once, when it is loaded
	// (C_GetFunctionList), and a module is loaded once per process: every
	// Server of the test binary listens on this one socket.
	return os.Setenv("P11_KIT_SERVER_ADDRESS", "unix:path="+socketPath())
}

func socketPath() string { return filepath.Join(dir, "p11-kit.sock") }

// Require skips the test when SoftHSM2 or its tools are not installed, and
// fails it instead when running in CI (CI=true), where they must be.
func Require(t testing.TB) {
	t.Helper()
	if dir == "" {
		t.Fatal("softhsmtest: call softhsmtest.Main from TestMain")
	}
	var missing []string
	if _, err := os.Stat(SoftHSMModule); err != nil {
		missing = append(missing, SoftHSMModule+" (package softhsm2)")
	}
	for _, tool := range []string{"softhsm2-util", "pkcs11-tool"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if len(missing) == 0 {
		return
	}
	msg := "softhsmtest: not installed: " + strings.Join(missing, ", ") + "; run `make deps` (installs softhsm2, p11-kit, opensc)"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// Token is a SoftHSM2 token made for a test.
type Token struct {
	Label  string
	Serial string
	PIN    string
	SOPIN  string
}

// NewToken initializes a fresh token with a unique label starting with
// prefix, user PIN "1234" and SO PIN "5678".
func NewToken(t testing.TB, prefix string) *Token {
	t.Helper()
	Require(t)
	tok := &Token{
		Label: fmt.Sprintf("%s-%d-%d", prefix, os.Getpid(), counter.Add(1)),
		PIN:   "1234",
		SOPIN: "5678",
	}
	if len(tok.Label) > 32 {
		tok.Label = tok.Label[len(tok.Label)-32:]
	}
	run(t, "softhsm2-util", "--init-token", "--free", "--label", tok.Label, "--pin", tok.PIN, "--so-pin", tok.SOPIN)
	tok.Serial = tok.findSerial(t)
	return tok
}

func (tok *Token) findSerial(t testing.TB) string {
	out := run(t, "pkcs11-tool", "--module", SoftHSMModule, "--list-token-slots")
	var label string
	for _, line := range strings.Split(out, "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "token label":
			label = strings.TrimSpace(v)
		case "serial num":
			if label == tok.Label {
				return strings.TrimSpace(v)
			}
		}
	}
	t.Fatalf("softhsmtest: token %q not listed by pkcs11-tool:\n%s", tok.Label, out)
	return ""
}

// KeyType names a key for pkcs11-tool --key-type.
type KeyType string

// Key types.
const (
	RSA2048 KeyType = "RSA:2048"
	RSA3072 KeyType = "RSA:3072"
	P256    KeyType = "EC:prime256v1"
	P384    KeyType = "EC:secp384r1"
	P521    KeyType = "EC:secp521r1"
	Ed25519 KeyType = "EC:edwards25519"
)

// GenerateKey generates a key pair of type typ on the token, with the given
// CKA_ID and CKA_LABEL on both halves.
func (tok *Token) GenerateKey(t testing.TB, typ KeyType, id []byte, label string) {
	t.Helper()
	args := []string{"--keypairgen", "--key-type", string(typ)}
	if len(id) > 0 {
		args = append(args, "--id", hex.EncodeToString(id))
	}
	if label != "" {
		args = append(args, "--label", label)
	}
	tok.Tool(t, args...)
}

// DeleteKeyPair deletes the private and public key with CKA_ID id.
func (tok *Token) DeleteKeyPair(t testing.TB, id []byte) {
	t.Helper()
	for _, typ := range []string{"privkey", "pubkey"} {
		tok.Tool(t, "--delete-object", "--type", typ, "--id", hex.EncodeToString(id))
	}
}

// ChangePIN changes the user PIN.
func (tok *Token) ChangePIN(t testing.TB, newPIN string) {
	t.Helper()
	tok.Tool(t, "--change-pin", "--new-pin", newPIN)
	tok.PIN = newPIN
}

// Tool runs pkcs11-tool against the token directly (not through p11-kit),
// logged in with the user PIN, and returns its output.
func (tok *Token) Tool(t testing.TB, args ...string) string {
	t.Helper()
	base := []string{"--module", SoftHSMModule, "--token-label", tok.Label, "--login", "--pin", tok.PIN}
	return run(t, "pkcs11-tool", append(base, args...)...)
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("softhsmtest: %s %s: %v\n%s", name, strings.Join(redact(args), " "), err, out.String())
	}
	return out.String()
}

// redact hides PINs in a logged command line.
func redact(args []string) []string {
	out := append([]string(nil), args...)
	for i := range out {
		if i > 0 && (out[i-1] == "--pin" || out[i-1] == "--so-pin" || out[i-1] == "--new-pin") {
			out[i] = "***"
		}
	}
	return out
}
