package stepkms

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"log/slog"
	"net/url"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"go.step.sm/crypto/kms"
	"go.step.sm/crypto/kms/apiv1"
)

// refs returns the number of open KMSes on the module's shared providers.
func refs(module string) int {
	registry.Lock()
	defer registry.Unlock()
	n := 0
	for _, s := range registry.open[canonical(module)] {
		n += s.refs
	}
	return n
}

// TestReloadShares does what step-ca's reload (SIGHUP) does: a second KMS
// on the same URI, through kms.New, while the first is open; then the first
// is closed. The two share a provider; the closed one's keys fail with
// hsm.ErrClosed, the other's sign on; the last Close closes the provider.
func TestReloadShares(t *testing.T) {
	tok := softhsmtest.NewToken(t, "reload")
	mod := softhsmtest.SoftHSMModule
	uri := kmsURI(mod, tok, "")
	Register()
	ctx := context.Background()
	oldKM, err := kms.New(ctx, apiv1.Options{Type: apiv1.PKCS11, URI: uri})
	if err != nil {
		t.Fatal(err)
	}
	old := oldKM.(*KMS)
	defer old.Close()
	const ecName, rsaName = "pkcs11:id=7331;object=intermediate-key", "pkcs11:id=7332;object=decrypt-key"
	if _, err := old.CreateKey(&apiv1.CreateKeyRequest{Name: ecName}); err != nil {
		t.Fatal(err)
	}
	if _, err := old.CreateKey(&apiv1.CreateKeyRequest{Name: rsaName, SignatureAlgorithm: apiv1.SHA256WithRSA, Bits: 2048}); err != nil {
		t.Fatal(err)
	}
	oldSigner, err := old.CreateSigner(&apiv1.CreateSignerRequest{SigningKey: ecName})
	if err != nil {
		t.Fatal(err)
	}
	oldDec, err := old.CreateDecrypter(&apiv1.CreateDecrypterRequest{DecryptionKey: rsaName})
	if err != nil {
		t.Fatal(err)
	}

	// The reload's new KMS.
	newKM, err := kms.New(ctx, apiv1.Options{Type: apiv1.PKCS11, URI: uri})
	if err != nil {
		t.Fatalf("a second KMS on the same URI: %v", err)
	}
	nu := newKM.(*KMS)
	defer nu.Close()
	if nu.Provider() != old.Provider() || refs(mod) != 2 {
		t.Fatalf("two KMSes of one URI: providers %p and %p, %d references; want one provider, 2 references", nu.Provider(), old.Provider(), refs(mod))
	}
	newSigner, err := nu.CreateSigner(&apiv1.CreateSignerRequest{SigningKey: ecName})
	if err != nil {
		t.Fatal(err)
	}
	newDec, err := nu.CreateDecrypter(&apiv1.CreateDecrypterRequest{DecryptionKey: rsaName})
	if err != nil {
		t.Fatal(err)
	}

	// The old one is closed: its keys and methods fail, the new one's work.
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("after the reload"))
	ct, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, newDec.Public().(*rsa.PublicKey), []byte("secret"), nil)
	if err != nil {
		t.Fatal(err)
	}
	oaep := &rsa.OAEPOptions{Hash: crypto.SHA256}
	for name, call := range map[string]func() ([]byte, error){
		"old signer": func() ([]byte, error) { return oldSigner.Sign(rand.Reader, digest[:], crypto.SHA256) },
		"old signer, context": func() ([]byte, error) {
			return oldSigner.(hsm.ContextSigner).SignContext(ctx, digest[:], crypto.SHA256)
		},
		"old decrypter": func() ([]byte, error) { return oldDec.Decrypt(rand.Reader, ct, oaep) },
		"old decrypter, context": func() ([]byte, error) {
			return oldDec.(hsm.ContextDecrypter).DecryptContext(ctx, rand.Reader, ct, oaep)
		},
		"old decrypter's Sign": func() ([]byte, error) { return oldDec.(crypto.Signer).Sign(rand.Reader, digest[:], crypto.SHA256) },
		"old KMS": func() ([]byte, error) {
			_, err := old.GetPublicKey(&apiv1.GetPublicKeyRequest{Name: ecName})
			return nil, err
		},
	} {
		if out, err := call(); out != nil || !errors.Is(err, hsm.ErrClosed) || !strings.HasPrefix(err.Error(), "stepkms: ") {
			t.Errorf("%s after its KMS's Close: %x, %v; want an error matching hsm.ErrClosed", name, out, err)
		}
	}
	if err := old.Close(); err != nil || refs(mod) != 1 {
		t.Errorf("second Close: %v, %d references; want nil, 1", err, refs(mod))
	}
	if _, err := newSigner.Sign(rand.Reader, digest[:], crypto.SHA256); err != nil {
		t.Errorf("the new KMS's signer after the old KMS's Close: %v", err)
	}
	if got, err := newDec.Decrypt(rand.Reader, ct, oaep); err != nil || string(got) != "secret" {
		t.Errorf("the new KMS's decrypter after the old KMS's Close: %q, %v", got, err)
	}
	if st := nu.Provider().State(); st != hsm.StateHealthy {
		t.Errorf("shared provider %v after the old KMS's Close", st)
	}

	// The last Close closes the provider and frees the module.
	p := nu.Provider()
	if err := nu.Close(); err != nil {
		t.Fatal(err)
	}
	if st := p.State(); st != hsm.StateClosed || refs(mod) != 0 {
		t.Errorf("after the last Close: provider %v, %d references; want closed, 0", st, refs(mod))
	}
	if _, err := newSigner.Sign(rand.Reader, digest[:], crypto.SHA256); !errors.Is(err, hsm.ErrClosed) {
		t.Errorf("signer after the last Close: %v, want hsm.ErrClosed", err)
	}
	q, err := hsm.Open(hsm.Config{Path: mod, TokenLabel: tok.Label, PIN: tok.PIN})
	if err != nil {
		t.Fatalf("hsm.Open after the last Close: %v", err)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestShareOtherConfigurations: a New of a module open under another
// configuration opens a Provider of its own on the module (another token,
// the same token by serial, without login, other settings), which signs
// beside the first; the same token with another PIN is refused with
// hsm.ErrPIN, without a login attempt and without naming the PIN; the same
// configuration shares. Closing them leaves the first signing.
func TestShareOtherConfigurations(t *testing.T) {
	tok, other := softhsmtest.NewToken(t, "share"), softhsmtest.NewToken(t, "other")
	for _, tk := range []*softhsmtest.Token{tok, other} {
		tk.GenerateKey(t, softhsmtest.P256, []byte{1}, "ec")
	}
	mod := softhsmtest.SoftHSMModule
	k := open(t, tok)
	sign := func(k *KMS, what string) {
		t.Helper()
		s, err := k.CreateSigner(&apiv1.CreateSignerRequest{SigningKey: "pkcs11:id=%01"})
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		d := sha256.Sum256([]byte(what))
		sig, err := s.Sign(rand.Reader, d[:], crypto.SHA256)
		if err != nil || !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), d[:], sig) {
			t.Fatalf("%s: signature %x, %v", what, sig, err)
		}
	}
	base := "pkcs11:module-path=" + mod + ";token=" + url.QueryEscape(tok.Label)
	var others []*KMS
	for _, c := range []struct {
		name, uri string
		base      hsm.Config
	}{
		{"another token", kmsURI(mod, other, ""), hsm.Config{}},
		{"the token by serial", "pkcs11:module-path=" + mod + ";serial=" + tok.Serial + "?pin-value=" + tok.PIN, hsm.Config{}},
		{"max-sessions", kmsURI(mod, tok, ";max-sessions=2"), hsm.Config{}},
		{"another probe timeout", kmsURI(mod, tok, ""), hsm.Config{ProbeTimeout: time.Second}},
		{"a callback", kmsURI(mod, tok, ""), hsm.Config{OnStateChange: func(hsm.StateChange) {}}},
	} {
		o, err := NewWithConfig(context.Background(), apiv1.Options{URI: c.uri}, c.base)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		others = append(others, o)
		if o.Provider() == k.Provider() {
			t.Errorf("%s: shares the first KMS's provider", c.name)
		}
		sign(o, c.name)
	}
	_, err := NewWithConfig(context.Background(), apiv1.Options{URI: base + "?pin-value=s3cr3t-other"}, hsm.Config{})
	if !errors.Is(err, hsm.ErrPIN) || strings.Contains(err.Error(), "s3cr3t") || !strings.HasPrefix(err.Error(), "stepkms: open: ") {
		t.Errorf("another PIN for the open token: %v; want hsm.ErrPIN, without the PIN", err)
	}
	// The same configuration shares; the Logger is not compared.
	same, err := NewWithConfig(context.Background(), apiv1.Options{URI: kmsURI(mod, tok, "")}, hsm.Config{Logger: slog.Default()})
	if err != nil {
		t.Fatalf("the same configuration with a Logger: %v", err)
	}
	if same.Provider() != k.Provider() {
		t.Error("the same configuration did not share the provider")
	}
	if n := refs(mod); n != 2+len(others) {
		t.Errorf("%d references, want %d", n, 2+len(others))
	}
	for _, o := range others {
		if err := o.Close(); err != nil {
			t.Fatal(err)
		}
	}
	sign(k, "the first KMS, the others closed")
	if err := same.Close(); err != nil {
		t.Fatal(err)
	}
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}
	if n := refs(mod); n != 0 {
		t.Errorf("%d references after every Close", n)
	}
}

// TestDifferencesCoverConfig: every field of hsm.Config is either compared
// by differences or named here as not compared, so that a field added to
// the core does not go unnoticed: two KMSes that differ in it would share a
// provider with the first one's setting.
func TestDifferencesCoverConfig(t *testing.T) {
	slot, slot2 := 1, 2
	changes := map[string]func(*hsm.Config){
		"TokenLabel":          func(c *hsm.Config) { c.TokenLabel = "other" },
		"TokenSerial":         func(c *hsm.Config) { c.TokenLabel, c.TokenSerial = "", "0102" },
		"SlotNumber":          func(c *hsm.Config) { c.TokenLabel, c.SlotNumber = "", &slot2 },
		"InitArgs":            func(c *hsm.Config) { c.InitArgs = "configdir=x" },
		"PIN":                 func(c *hsm.Config) { c.PIN = "5678" },
		"NoLogin":             func(c *hsm.Config) { c.NoLogin = true },
		"UserType":            func(c *hsm.Config) { c.UserType = 0x80000001 },
		"MaxSessions":         func(c *hsm.Config) { c.MaxSessions = 4 },
		"SessionWaitTimeout":  func(c *hsm.Config) { c.SessionWaitTimeout = time.Second },
		"DrainTimeout":        func(c *hsm.Config) { c.DrainTimeout = time.Second },
		"ProbeInterval":       func(c *hsm.Config) { c.ProbeInterval = time.Second },
		"ProbeTimeout":        func(c *hsm.Config) { c.ProbeTimeout = time.Second },
		"DisableAutoRecovery": func(c *hsm.Config) { c.DisableAutoRecovery = true },
		"RecoveryBackoffMin":  func(c *hsm.Config) { c.RecoveryBackoffMin = time.Second },
		"RecoveryBackoffMax":  func(c *hsm.Config) { c.RecoveryBackoffMax = time.Second },
		"OnStateChange":       func(c *hsm.Config) { c.OnStateChange = func(hsm.StateChange) {} },
	}
	notCompared := []string{"Path", "Logger"}
	typ := reflect.TypeFor[hsm.Config]()
	for i := range typ.NumField() {
		name := typ.Field(i).Name
		if _, ok := changes[name]; !ok && !slices.Contains(notCompared, name) {
			t.Errorf("hsm.Config.%s: neither compared by differences nor named as not compared", name)
		}
	}
	base := hsm.Config{Path: "/m.so", TokenLabel: "t", PIN: "1234"}
	if d := differences(base, base); len(d) != 0 {
		t.Errorf("a configuration differs from itself: %v", d)
	}
	for name, change := range changes {
		c := base
		change(&c)
		if d := differences(base, c); len(d) != 1 {
			t.Errorf("%s changed: differences %q, want one", name, d)
		} else if strings.Contains(d[0], "5678") || strings.Contains(d[0], "configdir") {
			t.Errorf("%s changed: %q shows a secret", name, d[0])
		}
	}
	// Selecting another slot than 1.
	a, b := base, base
	a.TokenLabel, a.SlotNumber = "", &slot
	b.TokenLabel, b.SlotNumber = "", &slot2
	if d := differences(a, b); len(d) != 1 || !strings.Contains(d[0], "slot-id 1 open, slot-id 2 asked") {
		t.Errorf("slots 1 and 2: %q", d)
	}
}

// TestDroppedKMS: a KMS dropped without Close (step-ca drops the KMS of a
// configuration whose authority failed to initialize) gives its reference
// back once it is garbage collected, but not while a signer it made is
// reachable.
func TestDroppedKMS(t *testing.T) {
	tok := softhsmtest.NewToken(t, "dropped")
	mod := softhsmtest.SoftHSMModule
	keep := open(t, tok)
	const name = "pkcs11:id=01;object=k"
	if _, err := keep.CreateKey(&apiv1.CreateKeyRequest{Name: name}); err != nil {
		t.Fatal(err)
	}
	held := &struct{ crypto.Signer }{signerOfDropped(t, tok, name)}
	if refs(mod) != 2 {
		t.Fatalf("%d references, want 2", refs(mod))
	}
	for range 3 {
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
	digest := sha256.Sum256([]byte("held"))
	if _, err := held.Sign(rand.Reader, digest[:], crypto.SHA256); err != nil || refs(mod) != 2 {
		t.Fatalf("the signer of a dropped KMS it keeps: %v, %d references; want a signature, 2", err, refs(mod))
	}
	held.Signer = nil
	deadline := time.Now().Add(10 * time.Second)
	for refs(mod) != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("%d references 10 s after the KMS and its signer were dropped, want 1", refs(mod))
		}
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
	p := keep.Provider()
	if err := keep.Close(); err != nil {
		t.Fatal(err)
	}
	if st := p.State(); st != hsm.StateClosed {
		t.Errorf("provider %v after the last open KMS's Close, want closed", st)
	}
}

// signerOfDropped opens a KMS on tok, and returns a signer of it, and
// nothing else of it.
func signerOfDropped(t *testing.T, tok *softhsmtest.Token, name string) crypto.Signer {
	t.Helper()
	k, err := New(context.Background(), apiv1.Options{URI: kmsURI(softhsmtest.SoftHSMModule, tok, "")})
	if err != nil {
		t.Fatal(err)
	}
	s, err := k.CreateSigner(&apiv1.CreateSignerRequest{SigningKey: name})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestSharedConcurrent: KMSes of one configuration opened, used and closed
// at once, the provider opened and closed again and again (a New that
// meets the last Close waits for it): every signature is good or refused
// as closed, and the module is free at the end.
func TestSharedConcurrent(t *testing.T) {
	tok := softhsmtest.NewToken(t, "concurrent")
	mod := softhsmtest.SoftHSMModule
	const name = "pkcs11:id=01;object=k"
	k := open(t, tok)
	if _, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: name}); err != nil {
		t.Fatal(err)
	}
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("concurrent"))
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 5 {
				k, err := New(context.Background(), apiv1.Options{URI: kmsURI(mod, tok, "")})
				if err != nil {
					t.Errorf("goroutine %d, New %d: %v", g, i, err)
					return
				}
				s, err := k.CreateSigner(&apiv1.CreateSignerRequest{SigningKey: name})
				if err != nil {
					t.Errorf("goroutine %d, CreateSigner %d: %v", g, i, err)
				} else if _, err := s.Sign(rand.Reader, digest[:], crypto.SHA256); err != nil {
					t.Errorf("goroutine %d, Sign %d: %v", g, i, err)
				}
				if err := k.Close(); err != nil {
					t.Errorf("goroutine %d, Close %d: %v", g, i, err)
				}
				if s != nil {
					if _, err := s.Sign(rand.Reader, digest[:], crypto.SHA256); !errors.Is(err, hsm.ErrClosed) {
						t.Errorf("goroutine %d, Sign %d after Close: %v, want hsm.ErrClosed", g, i, err)
					}
				}
			}
		})
	}
	wg.Wait()
	if n := refs(mod); n != 0 {
		t.Errorf("%d references left", n)
	}
	open(t, tok)
}
