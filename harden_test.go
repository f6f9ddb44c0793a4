//lint:file-ignore SA1019 PKCS #1 v1.5 decryption options are part of crypto.Decrypter; these tests pass them.

package hsm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/miekg/pkcs11"
)

// TestOddOptionsRefused: options that crash a careless implementation (a
// typed nil, a crypto.Hash crypto does not define) are refused with
// ErrInvalidOptions, without a panic and without a PKCS#11 call (counted
// by pkcs11-spy).
func TestOddOptionsRefused(t *testing.T) {
	p := openSpy(t)
	d := sha256.Sum256([]byte("x"))
	signs := []struct {
		name, key string
		opts      crypto.SignerOpts
	}{
		{"ECDSA unknown hash", "p256", crypto.Hash(99)},
		{"ECDSA hash 0xffff", "p256", crypto.Hash(0xffff)},
		{"RSA unknown hash", "rsa2048", crypto.Hash(99)},
		{"Ed25519 unknown hash", "ed25519", crypto.Hash(99)},
		{"PSS unknown hash", "rsa2048", &rsa.PSSOptions{Hash: crypto.Hash(99)}},
		{"typed nil PSSOptions", "rsa2048", (*rsa.PSSOptions)(nil)},
		{"typed nil PSSOptions on ECDSA", "p256", (*rsa.PSSOptions)(nil)},
		{"typed nil ed25519.Options", "ed25519", (*ed25519.Options)(nil)},
		{"typed nil of another type", "p256", (*oddOpts)(nil)},
		{"HashFunc of a nil embedded pointer", "p256", struct{ *rsa.PSSOptions }{}},
	}
	for _, tt := range signs {
		s := mustSigner(t, p, tt.key)
		var err error
		calls := callsByName(t, func() { _, err = s.Sign(nil, d[:], tt.opts) })
		wantErr(t, err, ErrInvalidOptions)
		if len(calls) != 0 {
			t.Errorf("%s: PKCS#11 calls %v for a refusal", tt.name, calls)
		}
		t.Logf("%s: %v", tt.name, err)
	}
	// Refused for the options whatever the provider's state: also while
	// unavailable, and so before any session is looked for.
	s := mustSigner(t, p, "p256")
	p.markLost(p.Generation(), errors.New("test: unavailable"))
	for _, tt := range signs {
		_, err := s.Sign(nil, d[:], tt.opts)
		wantErr(t, err, ErrInvalidOptions)
	}
	if err := p.Reinitialize(t.Context()); err != nil {
		t.Fatal(err)
	}
	quiet(t, p)
	dec, err := p.Decrypter(KeyRef{Label: "rsa2048"})
	if err != nil {
		t.Fatal(err)
	}
	ct := make([]byte, 256)
	decrypts := []struct {
		name string
		opts crypto.DecrypterOpts
	}{
		{"typed nil PKCS1v15DecryptOptions", (*rsa.PKCS1v15DecryptOptions)(nil)},
		{"typed nil OAEPOptions", (*rsa.OAEPOptions)(nil)},
		{"OAEP unknown hash", &rsa.OAEPOptions{Hash: crypto.Hash(99)}},
		{"OAEP unknown MGF hash", &rsa.OAEPOptions{Hash: crypto.SHA256, MGFHash: crypto.Hash(99)}},
		{"typed nil of another type", (*oddOpts)(nil)},
	}
	for _, tt := range decrypts {
		var err error
		calls := callsByName(t, func() { _, err = dec.Decrypt(nil, ct, tt.opts) })
		wantErr(t, err, ErrInvalidOptions)
		if len(calls) != 0 {
			t.Errorf("%s: PKCS#11 calls %v for a refusal", tt.name, calls)
		}
		t.Logf("%s: %v", tt.name, err)
	}
}

type oddOpts struct{ h crypto.Hash }

func (o *oddOpts) HashFunc() crypto.Hash { return o.h }

// TestEmptyMessage: Ed25519 signs an empty message, as crypto/ed25519
// does, on both paths; and the next caller of the same (only) session
// signs with another key. SoftHSM answers a NULL data pointer with
// CKR_ARGUMENTS_BAD and leaves the operation active, so a NULL pointer, or
// a session pooled after it, would fail the next caller with
// CKR_OPERATION_ACTIVE.
func TestEmptyMessage(t *testing.T) {
	for _, path := range []string{"two-call", "miekg"} {
		t.Run(path, func(t *testing.T) {
			p := openShared(t, func(c *Config) { c.MaxSessions = 1 })
			if path == "miekg" {
				p.fast = nil
			}
			ed := mustSigner(t, p, "ed25519")
			ec := mustSigner(t, p, "p256")
			d := sha256.Sum256([]byte("next"))
			for _, msg := range [][]byte{nil, {}} {
				sig, err := ed.Sign(nil, msg, crypto.Hash(0))
				if err != nil {
					t.Fatalf("Ed25519 of an empty message: %v", err)
				}
				if !ed25519.Verify(ed.Public().(ed25519.PublicKey), nil, sig) {
					t.Fatal("Ed25519 signature of an empty message does not verify")
				}
				sig, err = ec.Sign(nil, d[:], crypto.SHA256)
				if err != nil {
					t.Fatalf("the next caller: %v", err)
				}
				if !ecdsa.VerifyASN1(ec.Public().(*ecdsa.PublicKey), d[:], sig) {
					t.Fatal("the next caller's signature does not verify")
				}
			}
		})
	}
}

// TestActiveOperationNotPooled: a session on which a failed call may have
// left an operation active is closed, not pooled, so that the next caller
// of the only session never sees CKR_OPERATION_ACTIVE.
func TestActiveOperationNotPooled(t *testing.T) {
	p := openShared(t, func(c *Config) { c.MaxSessions = 1 })
	ec := mustSigner(t, p, "p256")
	rs := mustSigner(t, p, "rsa2048")
	d := sha256.Sum256([]byte("x"))
	rsaMech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS, nil)}
	for _, tt := range []struct {
		name string
		f    task
	}{
		// A signing operation really left active on the session, and the
		// failure marked as one that may leave it so.
		{"active operation", func(in *instance, s pkcs11.SessionHandle) error {
			if err := in.ctx.SignInit(s, rsaMech, rs.k.handle); err != nil {
				return err
			}
			return mayBeActive(errors.New("failed after C_SignInit"))
		}},
		// C_Sign fails after C_SignInit succeeded (SoftHSM: 246 bytes do
		// not fit PKCS #1 v1.5 with a 2048-bit key), on both paths.
		{"C_Sign fails, two-call", func(in *instance, s pkcs11.SessionHandle) error {
			_, _, err := fastSign(p.fast, s, rsaMech[0], rs.k.handle, make([]byte, 246), 256)
			return err
		}},
		{"C_Sign fails, miekg", func(in *instance, s pkcs11.SessionHandle) error {
			if err := in.ctx.SignInit(s, rsaMech, rs.k.handle); err != nil {
				return err
			}
			_, err := in.ctx.Sign(s, make([]byte, 246))
			return mayBeActive(err)
		}},
	} {
		var used pkcs11.SessionHandle
		err := p.withSession("test", func(in *instance, s pkcs11.SessionHandle) error {
			used = s
			return tt.f(in, s)
		})
		if err == nil {
			t.Fatalf("%s: no error", tt.name)
		}
		t.Logf("%s: %v", tt.name, err)
		sig, err := ec.Sign(nil, d[:], crypto.SHA256)
		if err != nil {
			t.Fatalf("%s: the next caller: %v", tt.name, err)
		}
		if !ecdsa.VerifyASN1(ec.Public().(*ecdsa.PublicKey), d[:], sig) {
			t.Fatalf("%s: signature does not verify", tt.name)
		}
		// The session of the failure was closed: the next caller had
		// another one.
		in := p.inst.Load()
		if _, err := in.ctx.GetSessionInfo(used); err == nil {
			t.Errorf("%s: session %d, whose operation may be active, is still open", tt.name, used)
		}
	}
}

// TestPINRefusedBeforeLogin: a PIN with bytes no PIN has, or a length the
// token does not take, is refused before C_Login: it costs no login
// attempt, so the token's counter of failed logins does not move.
func TestPINRefusedBeforeLogin(t *testing.T) {
	tok := softhsmtest.NewToken(t, "pin")
	for _, pin := range []string{tok.PIN + "\x00", "\x00", "12\n34", "\xff\xfe\xfd\xfc", "\ufeff" + tok.PIN, tok.PIN + "\u2028",
		"123", strings.Repeat("1", 300)} {
		_, err := Open(Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: pin})
		if err == nil {
			t.Fatalf("PIN %q accepted", pin)
		}
		if !errors.Is(err, ErrConfig) && !errors.Is(err, ErrPIN) {
			t.Fatalf("PIN %q: %v, want ErrConfig or ErrPIN", pin, err)
		}
		var e *Error
		if errors.As(err, &e) && e.Code != 0 {
			t.Fatalf("PIN %q reached the token: %v", pin, err)
		}
		t.Log(err)
	}
	// The token counts no failed login (CKF_USER_PIN_COUNT_LOW is clear),
	// and the right PIN still works.
	p := openToken(t, tok)
	if flags := p.inst.Load().token.Flags; flags&(pkcs11.CKF_USER_PIN_COUNT_LOW|pkcs11.CKF_USER_PIN_LOCKED) != 0 {
		t.Fatalf("token flags %#x: failed logins were counted", flags)
	}
}

// TestURIMatchTakesASlot: OpenURI's check of the token and library
// attributes makes PKCS#11 calls, and takes a session slot like every
// operation: with the only slot held, it waits, then fails with ErrBusy.
func TestURIMatchTakesASlot(t *testing.T) {
	tok := sharedToken(t)
	p := openToken(t, tok, func(c *Config) { c.MaxSessions = 1; c.SessionWaitTimeout = 50 * time.Millisecond })
	u, err := ParseURI("pkcs11:token=" + escape([]byte(tok.Label), false) + ";library-manufacturer=SoftHSM")
	if err != nil {
		t.Fatal(err)
	}
	held, release := make(chan struct{}), make(chan struct{})
	go p.withSession("hold", func(*instance, pkcs11.SessionHandle) error {
		close(held)
		<-release
		return nil
	})
	<-held
	err = p.matchURI(u)
	close(release)
	wantErr(t, err, ErrBusy)
	if err := p.matchURI(u); err != nil {
		t.Fatalf("with the slot free: %v", err)
	}
}

// TestZeroKeys: nil and zero key values, which no Provider or Group handed
// out, fail with an error naming the mistake, never a panic, in the methods
// generic code calls (Public, Sign, Decrypt).
func TestZeroKeys(t *testing.T) {
	digest := make([]byte, 32)
	signers := map[string]crypto.Signer{
		"nil *Signer": (*Signer)(nil), "zero Signer": &Signer{},
		"nil *Decrypter": (*Decrypter)(nil), "zero Decrypter": &Decrypter{},
		"nil *DurableSigner": (*DurableSigner)(nil), "zero DurableSigner": &DurableSigner{},
		"nil *DurableDecrypter": (*DurableDecrypter)(nil), "zero DurableDecrypter": &DurableDecrypter{},
		"nil *GroupSigner": (*GroupSigner)(nil), "zero GroupSigner": &GroupSigner{},
	}
	for name, s := range signers {
		_ = fmt.Sprint(s) // String, and for some KeyRef and Generation below: no panic
		if k, ok := s.(interface {
			KeyRef() KeyRef
		}); ok && k.KeyRef().Label != "" {
			t.Errorf("%s: KeyRef %v", name, k.KeyRef())
		}
		if k, ok := s.(interface{ Generation() uint64 }); ok && k.Generation() != 0 {
			t.Errorf("%s: Generation %d", name, k.Generation())
		}
		if pub := s.Public(); pub != nil {
			t.Errorf("%s: Public() = %v", name, pub)
		}
		_, err := s.Sign(nil, digest, crypto.SHA256)
		wantErr(t, err, ErrKeyNotFound)
		if !strings.Contains(err.Error(), "holds no key") {
			t.Errorf("%s: %v", name, err)
		}
	}
	decrypters := map[string]crypto.Decrypter{
		"nil *Decrypter": (*Decrypter)(nil), "zero Decrypter": &Decrypter{},
		"zero DurableDecrypter": &DurableDecrypter{}, "nil *GroupDecrypter": (*GroupDecrypter)(nil), "zero GroupDecrypter": &GroupDecrypter{},
	}
	for name, d := range decrypters {
		if pub := d.Public(); pub != nil {
			t.Errorf("%s: Public() = %v", name, pub)
		}
		_, err := d.Decrypt(nil, digest, nil)
		wantErr(t, err, ErrKeyNotFound)
	}
	if _, err := (&DurableSigner{}).SignContext(context.Background(), digest, crypto.SHA256); !errors.Is(err, ErrKeyNotFound) {
		t.Errorf("zero DurableSigner.SignContext: %v", err)
	}
	// A nil or zero Group.
	for name, g := range map[string]*Group{"nil *Group": nil, "zero Group": {}} {
		if st := g.State(); st == GroupHealthy {
			t.Errorf("%s: state %v", name, st)
		}
		if _, err := g.Signer(KeyRef{Label: "k"}); !errors.Is(err, ErrClosed) {
			t.Errorf("%s: Signer: %v", name, err)
		}
		if _, err := g.Decrypter(KeyRef{Label: "k"}); !errors.Is(err, ErrClosed) {
			t.Errorf("%s: Decrypter: %v", name, err)
		}
		_ = g.Members()
		_ = g.Stats()
		if err := g.Close(); err != nil {
			t.Errorf("%s: Close: %v", name, err)
		}
	}
}
