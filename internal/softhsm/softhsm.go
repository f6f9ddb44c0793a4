// Package softhsm creates throw-away SoftHSM2 tokens, and serves them
// through p11-kit remoting (see Server) so that tests, the demo and
// hsmcheck's soak can kill, pause and restart the "HSM".
//
// Setup must run before any PKCS#11 module is loaded: it writes a
// softhsm2.conf and sets SOFTHSM2_CONF and P11_KIT_SERVER_ADDRESS. Test
// binaries call softhsmtest.Main from their TestMain, which does that and
// cleans up.
//
// Tokens and keys are made by OpenSC's pkcs11-tool and softhsm2-util, in
// their own processes, so that the process under test stays the only user
// of the module in its address space.
//
// The package does not import testing, so that commands can link it; its
// few test helpers take a TB, and package softhsmtest holds the rest of the
// testing adapter (Main, Require, NewToken, StartServer).
package softhsm

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
)

// Well-known paths of the Debian packages softhsm2 and p11-kit.
const (
	SoftHSMModule = "/usr/lib/softhsm/libsofthsm2.so"
	ClientModule  = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
)

var (
	dir     string // set by Setup
	counter atomic.Uint64
)

// Setup makes directory d the home of this process's tokens: it writes
// d/softhsm2.conf with a token directory d/tokens and sets SOFTHSM2_CONF. It
// also sets P11_KIT_SERVER_ADDRESS to d/p11-kit.sock: p11-kit-client.so
// reads it once, when it is loaded (C_GetFunctionList), and a module is
// loaded once per process, so every Server of the process listens there.
func Setup(d string) error {
	tokens := filepath.Join(d, "tokens")
	if err := os.MkdirAll(tokens, 0o700); err != nil {
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
	dir = d
	return os.Setenv("P11_KIT_SERVER_ADDRESS", "unix:path="+socketPath())
}

// Dir returns the directory given to Setup, or "" if Setup has not run.
func Dir() string { return dir }

func socketPath() string { return filepath.Join(dir, "p11-kit.sock") }

// Missing returns what is not installed of SoftHSM2 and OpenSC's tools
// (with remote, of p11-kit too), or nil.
func Missing(remote bool) []string {
	var missing []string
	if _, err := os.Stat(SoftHSMModule); err != nil {
		missing = append(missing, SoftHSMModule+" (package softhsm2)")
	}
	for _, tool := range []string{"softhsm2-util", "pkcs11-tool"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if remote {
		if _, err := exec.LookPath("p11-kit"); err != nil {
			missing = append(missing, "p11-kit")
		}
		if _, err := os.Stat(ClientModule); err != nil {
			missing = append(missing, ClientModule+" (package p11-kit-modules)")
		}
	}
	return missing
}

// Token is a SoftHSM2 token.
type Token struct {
	Label  string
	Serial string
	PIN    string
	SOPIN  string
}

// CreateToken initializes a fresh token with a unique label starting with
// prefix, user PIN "1234" and SO PIN "5678".
func CreateToken(prefix string) (*Token, error) {
	if dir == "" {
		return nil, errors.New("softhsm: Setup has not run")
	}
	tok := &Token{
		Label: fmt.Sprintf("%s-%d-%d", prefix, os.Getpid(), counter.Add(1)),
		PIN:   "1234",
		SOPIN: "5678",
	}
	if len(tok.Label) > 32 {
		tok.Label = tok.Label[len(tok.Label)-32:]
	}
	if _, err := run("softhsm2-util", "--init-token", "--free", "--label", tok.Label, "--pin", tok.PIN, "--so-pin", tok.SOPIN); err != nil {
		return nil, err
	}
	out, err := run("pkcs11-tool", "--module", SoftHSMModule, "--list-token-slots")
	if err != nil {
		return nil, err
	}
	if tok.Serial = serialOf(out, tok.Label); tok.Serial == "" {
		return nil, fmt.Errorf("softhsm: token %q not listed by pkcs11-tool:\n%s", tok.Label, out)
	}
	return tok, nil
}

// serialOf finds the serial number of the token labelled label in the
// output of pkcs11-tool --list-token-slots.
func serialOf(out, label string) string {
	var cur string
	for _, line := range strings.Split(out, "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "token label":
			cur = strings.TrimSpace(v)
		case "serial num":
			if cur == label {
				return strings.TrimSpace(v)
			}
		}
	}
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

// Generate generates a key pair of type typ on the token, with the given
// CKA_ID and CKA_LABEL on both halves.
func (tok *Token) Generate(typ KeyType, id []byte, label string) error {
	args := []string{"--keypairgen", "--key-type", string(typ)}
	if len(id) > 0 {
		args = append(args, "--id", hex.EncodeToString(id))
	}
	if label != "" {
		args = append(args, "--label", label)
	}
	_, err := tok.Tool(args...)
	return err
}

// Import writes key (an *ecdsa.PrivateKey or *rsa.PrivateKey) to the
// token, its private and public halves with CKA_ID id and CKA_LABEL label,
// through pkcs11-tool --write-object: the same key can so be put on several
// tokens, as on the members of an HSM group.
func (tok *Token) Import(key crypto.Signer, id []byte, label string) error {
	return tok.ImportPair(key, key.Public(), id, label)
}

// ImportPair is Import with a public half of its own: a public key that is
// not the private key's makes the mismatched pair a test needs.
func (tok *Token) ImportPair(key crypto.Signer, public crypto.PublicKey, id []byte, label string) error {
	priv, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("softhsm: import: %w", err)
	}
	pub, err := x509.MarshalPKIXPublicKey(public)
	if err != nil {
		return fmt.Errorf("softhsm: import: %w", err)
	}
	tmp, err := os.MkdirTemp(dir, "import-")
	if err != nil {
		return fmt.Errorf("softhsm: import: %w", err)
	}
	defer os.RemoveAll(tmp)
	for _, half := range []struct {
		typ string
		der []byte
	}{{"privkey", priv}, {"pubkey", pub}} {
		f := filepath.Join(tmp, half.typ+".der")
		if err := os.WriteFile(f, half.der, 0o600); err != nil {
			return fmt.Errorf("softhsm: import: %w", err)
		}
		args := []string{"--write-object", f, "--type", half.typ, "--id", hex.EncodeToString(id)}
		if label != "" {
			args = append(args, "--label", label)
		}
		if _, err := tok.Tool(args...); err != nil {
			return err
		}
	}
	return nil
}

// Delete deletes the private and public key with CKA_ID id.
func (tok *Token) Delete(id []byte) error {
	for _, typ := range []string{"privkey", "pubkey"} {
		if _, err := tok.Tool("--delete-object", "--type", typ, "--id", hex.EncodeToString(id)); err != nil {
			return err
		}
	}
	return nil
}

// Dir returns the directory where SoftHSM's file store keeps the token's
// objects, one file each.
func (tok *Token) Dir() (string, error) {
	tokens := filepath.Join(dir, "tokens")
	entries, err := os.ReadDir(tokens)
	if err != nil {
		return "", err
	}
	label := []byte(fmt.Sprintf("%-32s", tok.Label))
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(tokens, e.Name(), "token.object"))
		if err == nil && bytes.Contains(b, label) {
			return filepath.Join(tokens, e.Name()), nil
		}
	}
	return "", fmt.Errorf("softhsm: no directory of token %q in %s", tok.Label, tokens)
}

// ReplacePrivate replaces the private key with CKA_ID id by a new private
// key of type typ, with the same CKA_ID and CKA_LABEL label, and leaves the
// public key object as it is: a token whose public key object says one key
// and whose private key is another (the new pair is made under a
// temporary ID, its public half deleted, its private half given id).
func (tok *Token) ReplacePrivate(typ KeyType, id []byte, label string) error {
	tmp := append([]byte{0xfe, 0xed}, id...)
	if err := tok.Generate(typ, tmp, label); err != nil {
		return err
	}
	for _, args := range [][]string{
		{"--delete-object", "--type", "pubkey", "--id", hex.EncodeToString(tmp)},
		{"--delete-object", "--type", "privkey", "--id", hex.EncodeToString(id)},
		{"--set-id", hex.EncodeToString(id), "--type", "privkey", "--id", hex.EncodeToString(tmp)},
	} {
		if _, err := tok.Tool(args...); err != nil {
			return err
		}
	}
	return nil
}

// SetPIN changes the user PIN.
func (tok *Token) SetPIN(newPIN string) error {
	if _, err := tok.Tool("--change-pin", "--new-pin", newPIN); err != nil {
		return err
	}
	tok.PIN = newPIN
	return nil
}

// Replace deletes the token and initializes a new one under the same label,
// with the same PINs: a different token (another serial number) answers to
// the old label.
func (tok *Token) Replace() error {
	if _, err := run("softhsm2-util", "--delete-token", "--token", tok.Label); err != nil {
		return err
	}
	if _, err := run("softhsm2-util", "--init-token", "--free", "--label", tok.Label, "--pin", tok.PIN, "--so-pin", tok.SOPIN); err != nil {
		return err
	}
	out, err := run("pkcs11-tool", "--module", SoftHSMModule, "--list-token-slots")
	if err != nil {
		return err
	}
	if tok.Serial = serialOf(out, tok.Label); tok.Serial == "" {
		return fmt.Errorf("softhsm: replaced token %q not listed", tok.Label)
	}
	return nil
}

// Tool runs pkcs11-tool against the token directly (not through p11-kit),
// logged in with the user PIN, and returns its output.
func (tok *Token) Tool(args ...string) (string, error) {
	base := []string{"--module", SoftHSMModule, "--token-label", tok.Label, "--login", "--pin", tok.PIN}
	return run("pkcs11-tool", append(base, args...)...)
}

// TB is the part of testing.TB that GenerateKey, DeleteKeyPair and
// ChangePIN use; *testing.T and *testing.B satisfy it. It is declared here
// so that this package does not import testing.
type TB interface {
	Helper()
	Fatal(args ...any)
}

// GenerateKey is Generate for tests: it fails t on error.
func (tok *Token) GenerateKey(t TB, typ KeyType, id []byte, label string) {
	t.Helper()
	if err := tok.Generate(typ, id, label); err != nil {
		t.Fatal(err)
	}
}

// ImportKey is Import for tests: it fails t on error.
func (tok *Token) ImportKey(t TB, key crypto.Signer, id []byte, label string) {
	t.Helper()
	if err := tok.Import(key, id, label); err != nil {
		t.Fatal(err)
	}
}

// DeleteKeyPair is Delete for tests: it fails t on error.
func (tok *Token) DeleteKeyPair(t TB, id []byte) {
	t.Helper()
	if err := tok.Delete(id); err != nil {
		t.Fatal(err)
	}
}

// ChangePIN is SetPIN for tests: it fails t on error.
func (tok *Token) ChangePIN(t TB, newPIN string) {
	t.Helper()
	if err := tok.SetPIN(newPIN); err != nil {
		t.Fatal(err)
	}
}

func run(name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("softhsm: %s %s: %w\n%s", name, strings.Join(redact(args), " "), err, out.String())
	}
	return out.String(), nil
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
