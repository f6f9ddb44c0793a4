package hsm

import (
	"crypto"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/miekg/pkcs11"
)

func TestOpenErrors(t *testing.T) {
	tok := sharedToken(t)
	notModule := filepath.Join(t.TempDir(), "not-a-module.so")
	if err := os.WriteFile(notModule, []byte("this is text, not ELF"), 0o644); err != nil {
		t.Fatal(err)
	}
	slot := 7
	tests := []struct {
		name   string
		cfg    Config
		target error
		says   string
	}{
		{"no path", Config{TokenLabel: tok.Label, PIN: tok.PIN}, ErrConfig, "Path"},
		{"no selector", Config{Path: softhsmtest.SoftHSMModule, PIN: tok.PIN}, ErrConfig, "no token selector"},
		{"two selectors", Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, SlotNumber: &slot, PIN: tok.PIN}, ErrConfig, "TokenLabel SlotNumber"},
		{"no PIN", Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label}, ErrConfig, "PIN is empty"},
		{"negative sessions", Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN, MaxSessions: -1}, ErrConfig, "MaxSessions"},
		{"missing module", Config{Path: "/nonexistent/libnothing.so", TokenLabel: tok.Label, PIN: tok.PIN}, ErrConfig, "no such file"},
		{"not a module", Config{Path: notModule, TokenLabel: tok.Label, PIN: tok.PIN}, ErrConfig, "could not be loaded as a PKCS#11 module"},
		{"directory", Config{Path: t.TempDir(), TokenLabel: tok.Label, PIN: tok.PIN}, ErrConfig, "not a regular file"},
		{"unknown label", Config{Path: softhsmtest.SoftHSMModule, TokenLabel: "no-such-token", PIN: tok.PIN}, ErrTokenNotFound, `label "no-such-token"`},
		{"unknown serial", Config{Path: softhsmtest.SoftHSMModule, TokenSerial: "0000000000000000", PIN: tok.PIN}, ErrTokenNotFound, "serial"},
		{"wrong PIN", Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: "9999"}, ErrPIN, "CKR_PIN_INCORRECT"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Open(tt.cfg)
			if err == nil {
				p.Close()
				t.Fatal("Open succeeded")
			}
			e := wantErr(t, err, tt.target)
			if e.Op == "" || !strings.HasPrefix(err.Error(), "hsm: ") || !strings.Contains(err.Error(), tt.says) {
				t.Errorf("error %q: want op set, prefix hsm: and %q", err, tt.says)
			}
			if strings.Contains(err.Error(), tok.PIN) && tt.cfg.PIN != "" {
				t.Errorf("error %q shows the PIN", err)
			}
			t.Log(err)
		})
	}
	// After every failure the module is free again: a good Open works.
	openToken(t, tok)
}

func TestOpenWrongPINIsCallerError(t *testing.T) {
	tok := sharedToken(t)
	_, err := Open(Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: "0000"})
	var p11 pkcs11.Error
	if !errors.As(err, &p11) || p11 != pkcs11.CKR_PIN_INCORRECT {
		t.Fatalf("errors.As pkcs11.Error: %v", err)
	}
	if code, _ := codeOf(err); classify(code) != classCaller {
		t.Fatalf("classify(%s) = %v, want caller", CodeName(code), classify(code))
	}
	if errors.Is(err, ErrDeviceLost) {
		t.Fatal("a PIN error is classified as device loss")
	}
}

func TestOpenSelectors(t *testing.T) {
	tok := sharedToken(t)
	p := openToken(t, tok, func(c *Config) { c.TokenLabel = ""; c.TokenSerial = tok.Serial })
	ti := p.TokenInfo()
	label, serial := ti.Label, ti.Serial
	if label != tok.Label || serial != tok.Serial {
		t.Fatalf("TokenInfo = %q %q, want %q %q", label, serial, tok.Label, tok.Serial)
	}
	in := p.inst.Load()
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	slot := int(in.slot)
	q := openToken(t, tok, func(c *Config) { c.TokenLabel = ""; c.SlotNumber = &slot })
	if label := q.TokenInfo().Label; label != tok.Label {
		t.Fatalf("slot %d holds %q", slot, label)
	}
}

// TestModuleShared: a second Open of a module already open in the process,
// under its own name or another, shares it: both Providers sign, closing
// one leaves the other signing, and once both are closed the module is
// initialized again by the next Open (C_Initialize after C_Finalize in one
// process).
func TestModuleShared(t *testing.T) {
	tok := sharedToken(t)
	p := openToken(t, tok)
	if p.fast == nil {
		t.Fatal("the two-call signing path is off for SoftHSM")
	}
	// The same file under another name is the same module.
	link := filepath.Join(t.TempDir(), "alias.so")
	if err := os.Symlink(softhsmtest.SoftHSMModule, link); err != nil {
		t.Fatal(err)
	}
	q, err := Open(Config{Path: link, TokenLabel: tok.Label, PIN: tok.PIN})
	if err != nil {
		t.Fatal(err)
	}
	if q.mod != p.mod {
		t.Fatal("the module under another name was loaded twice")
	}
	d := sha256.Sum256(nil)
	for _, r := range []*Provider{p, q} {
		if _, err := mustSigner(t, r, "p256").Sign(nil, d[:], crypto.SHA256); err != nil {
			t.Fatal(err)
		}
	}
	s := mustSigner(t, p, "p256")
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Sign(nil, d[:], crypto.SHA256); err != nil {
		t.Fatalf("after the other Provider closed: %v", err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if p.mod.initialized {
		t.Fatal("the module is still initialized after its last Provider closed")
	}
	r := openToken(t, tok, func(c *Config) { c.Path = link })
	if _, err := mustSigner(t, r, "p256").Sign(nil, d[:], crypto.SHA256); err != nil {
		t.Fatal(err)
	}
}

func TestLookup(t *testing.T) {
	p := openShared(t)
	tests := []struct {
		name   string
		ref    KeyRef
		target error
		label  string
	}{
		{"label", KeyRef{Label: "p384"}, nil, "p384"},
		{"id", KeyRef{ID: []byte{3}}, nil, "p384"},
		{"both", KeyRef{ID: []byte{3}, Label: "p384"}, nil, "p384"},
		{"both, ID of another key", KeyRef{ID: []byte{2}, Label: "p384"}, ErrKeyNotFound, ""},
		{"unknown label", KeyRef{Label: "nope"}, ErrKeyNotFound, ""},
		{"unknown id", KeyRef{ID: []byte{0xEE}}, ErrKeyNotFound, ""},
		{"empty", KeyRef{}, ErrKeyNotFound, ""},
		{"ambiguous label", KeyRef{Label: "dup"}, ErrAmbiguousKey, ""},
		{"ambiguity resolved by id", KeyRef{ID: []byte{0x11}, Label: "dup"}, nil, "dup"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := p.Signer(tt.ref)
			if tt.target != nil {
				e := wantErr(t, err, tt.target)
				if e.Op != "find key" || e.Generation != 1 {
					t.Errorf("error fields %+v", e)
				}
				t.Log(err)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if s.KeyRef().Label != tt.label {
				t.Fatalf("found %v, want label %q", s.KeyRef(), tt.label)
			}
		})
	}
}

func TestClose(t *testing.T) {
	tok := sharedToken(t)
	p, err := Open(Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN})
	if err != nil {
		t.Fatal(err)
	}
	s := mustSigner(t, p, "p256")
	d, err := p.Decrypter(KeyRef{Label: "rsa2048"})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if err := p.Close(); err != nil {
			t.Fatalf("Close #%d: %v", i+1, err)
		}
	}
	if p.State() != StateClosed {
		t.Fatalf("State = %v", p.State())
	}
	digest := sha256.Sum256(nil)
	_, err = s.Sign(nil, digest[:], crypto.SHA256)
	wantErr(t, err, ErrClosed)
	_, err = d.Decrypt(nil, make([]byte, 256), nil)
	wantErr(t, err, ErrClosed)
	_, err = p.Signer(KeyRef{Label: "p256"})
	wantErr(t, err, ErrClosed)
	wantErr(t, p.Reinitialize(t.Context()), ErrClosed)
	wantErr(t, p.ReinitializeFrom(t.Context(), 1), ErrClosed)
}

func TestSecretsNotPrinted(t *testing.T) {
	cfg := Config{Path: "/lib/x.so", TokenLabel: "tok", PIN: "s3cr3t-pin"}
	for _, f := range []string{"%v", "%+v", "%#v", "%s", "%q"} {
		if out := fmt.Sprintf(f, cfg); strings.Contains(out, "s3cr3t") {
			t.Errorf("%s prints the PIN: %s", f, out)
		}
		if out := fmt.Sprintf(f, &cfg); strings.Contains(out, "s3cr3t") {
			t.Errorf("%s of *Config prints the PIN: %s", f, out)
		}
	}
}

func TestErrorModel(t *testing.T) {
	err := p11err("sign", 3, pkcs11.Error(pkcs11.CKR_DEVICE_ERROR))
	if got, want := err.Error(), "hsm: sign (generation 3): CKR_DEVICE_ERROR (0x30)"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	// One "hsm: " however the errors nest, codes by name, vendor codes too.
	for _, tt := range []struct {
		err  error
		want string
	}{
		{p11err("sign", 3, stepErr("C_OpenSession", pkcs11.Error(pkcs11.CKR_DEVICE_ERROR))), "hsm: sign (generation 3): C_OpenSession: CKR_DEVICE_ERROR (0x30)"},
		{opErr("sign", 1, ErrInvalidOptions, "digest is %d bytes", 31), "hsm: sign (generation 1): invalid options or input: digest is 31 bytes"},
		{&Error{Op: "sign", Generation: 2, Err: causedBy(ErrUnavailable, &Error{Op: "wait", Generation: 2, Err: ErrClosed})}, "hsm: sign (generation 2): HSM unavailable: wait (generation 2): provider is closed"},
		{causedBy(ErrConfig, errors.New("the PIN is not valid UTF-8")), "hsm: invalid config: the PIN is not valid UTF-8"},
		{wrapf(ErrURI, "no %s", "module-path"), "hsm: invalid PKCS#11 URI: no module-path"},
		{ErrClosed, "hsm: provider is closed"},
		{&Error{Op: "decrypt", Code: 0x80000012, Err: pkcs11.Error(0x80000012)}, "hsm: decrypt: CKR_VENDOR_DEFINED+0x12 (0x80000012)"},
		{&Error{Op: "x", Code: 0x1234}, "hsm: x: CKR 0x1234"},
	} {
		if got := tt.err.Error(); got != tt.want {
			t.Errorf("Error() = %q, want %q", got, tt.want)
		}
	}
	wrapped := fmt.Errorf("handshake: %w", err)
	var e *Error
	if !errors.As(wrapped, &e) || e.Op != "sign" || e.Code != 0x30 || e.Generation != 3 {
		t.Fatalf("errors.As: %+v", e)
	}
	if code, _ := codeOf(wrapped); !errors.Is(wrapped, ErrDeviceLost) || classify(code) != classDeviceLost {
		t.Error("device error does not match ErrDeviceLost")
	}
	var p pkcs11.Error
	if dec := (&key{gen: 1}).decryptionError(pkcs11.Error(pkcs11.CKR_GENERAL_ERROR)); !errors.Is(dec, ErrDecryption) || !errors.As(dec, &p) || p != pkcs11.CKR_GENERAL_ERROR {
		t.Errorf("a rejected ciphertext's error %v hides its code", dec)
	}
	classes := map[uint]class{
		pkcs11.CKR_DEVICE_ERROR:             classDeviceLost,
		pkcs11.CKR_DEVICE_REMOVED:           classDeviceLost,
		pkcs11.CKR_TOKEN_NOT_PRESENT:        classDeviceLost,
		pkcs11.CKR_TOKEN_NOT_RECOGNIZED:     classDeviceLost,
		pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED: classDeviceLost,
		pkcs11.CKR_SESSION_HANDLE_INVALID:   classSuspect,
		pkcs11.CKR_SESSION_CLOSED:           classSuspect,
		pkcs11.CKR_GENERAL_ERROR:            classSuspect,
		pkcs11.CKR_FUNCTION_FAILED:          classSuspect,
		pkcs11.CKR_OPERATION_ACTIVE:         classSession,
		pkcs11.CKR_MECHANISM_INVALID:        classCaller,
		pkcs11.CKR_DATA_LEN_RANGE:           classCaller,
		pkcs11.CKR_KEY_TYPE_INCONSISTENT:    classCaller,
		pkcs11.CKR_PIN_INCORRECT:            classCaller,
		pkcs11.CKR_PIN_LOCKED:               classCaller,
	}
	for code, want := range classes {
		got, ok := codeOf(p11err("x", 1, pkcs11.Error(code)))
		if !ok || got != code || classify(got) != want {
			t.Errorf("classify(%s) = %v, want %v", CodeName(code), classify(got), want)
		}
	}
	_, okNil := codeOf(nil)
	_, okOther := codeOf(ErrKeyNotFound)
	if okNil || okOther || classify(pkcs11.CKR_OK) != classNone {
		t.Error("non-PKCS#11 errors must have no code, and CKR_OK classify as none")
	}
	pin := p11err("login", 1, pkcs11.Error(pkcs11.CKR_PIN_LOCKED))
	if !errors.Is(pin, ErrPIN) || errors.Is(pin, ErrDeviceLost) {
		t.Error("PIN code does not match ErrPIN only")
	}
}

func TestModuleInfoAndKeys(t *testing.T) {
	p := openShared(t)
	mi, err := p.ModuleInfo()
	if err != nil || mi.Manufacturer != "SoftHSM" || mi.CryptokiVersion == "" {
		t.Fatalf("%+v %v", mi, err)
	}
	keys, err := p.Keys()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, k := range keys {
		if !k.CanSign {
			t.Errorf("%v cannot sign", k.Ref)
		}
		got[fmt.Sprintf("%s/%x", k.Ref.Label, k.Ref.ID)] = k.Type
	}
	want := map[string]string{"rsa2048/01": "RSA-2048", "p256/02": "ECDSA P-256", "p384/03": "ECDSA P-384",
		"p521/04": "ECDSA P-521", "ed25519/05": "Ed25519", "rsa3072/06": "RSA-3072", "dup/10": "ECDSA P-256", "dup/11": "ECDSA P-256"}
	if len(got) != len(want) {
		t.Fatalf("keys %v", got)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %q, want %q", k, got[k], v)
		}
	}
}

// TestKeysListsUnusable: Keys lists every private key on the token, and a
// key it cannot use with why (crypto11's FindAllKeyPairs fails as a whole
// on the first key it cannot use).
func TestKeysListsUnusable(t *testing.T) {
	tok := softhsmtest.NewToken(t, "unusable")
	tok.GenerateKey(t, softhsmtest.P256, []byte{1}, "good")
	tok.GenerateKey(t, softhsmtest.Ed25519, []byte{2}, "ed")
	tok.GenerateKey(t, softhsmtest.KeyType("EC:secp256k1"), []byte{3}, "k1")
	tok.GenerateKey(t, softhsmtest.P256, []byte{4}, "halfless")
	if out, err := tok.Tool("--delete-object", "--type", "pubkey", "--id", "04"); err != nil {
		t.Fatalf("delete the public half: %v\n%s", err, out)
	}
	p := openToken(t, tok)
	keys, err := p.Keys()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, k := range keys {
		got[k.Ref.Label] = k.Type
	}
	t.Log(got)
	for label, want := range map[string]string{"good": "ECDSA P-256", "ed": "Ed25519", "k1": "unsupported: ", "halfless": "unsupported: "} {
		if !strings.HasPrefix(got[label], want) {
			t.Errorf("%s: %q, want %q...", label, got[label], want)
		}
	}
	if !strings.Contains(got["k1"], "curve") || !strings.Contains(got["halfless"], "no public key object") {
		t.Errorf("the reasons do not say why: %q, %q", got["k1"], got["halfless"])
	}
	if len(keys) != 4 {
		t.Errorf("%d keys listed, want 4", len(keys))
	}
}
