package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"testing"
	"time"
)

// kinds are the six kinds of key on one RSA key: generation-bound and
// durable on p, group on g.
func kinds(t *testing.T, p *Provider, ref KeyRef, g *Group, gref KeyRef) map[string]ContextSigner {
	t.Helper()
	s, err := p.Signer(ref)
	if err != nil {
		t.Fatal(err)
	}
	d, err := p.Decrypter(ref)
	if err != nil {
		t.Fatal(err)
	}
	ds, err := p.DurableSigner(ref)
	if err != nil {
		t.Fatal(err)
	}
	dd, err := p.DurableDecrypter(ref)
	if err != nil {
		t.Fatal(err)
	}
	gs, err := g.Signer(gref)
	if err != nil {
		t.Fatal(err)
	}
	gd, err := g.Decrypter(gref)
	if err != nil {
		t.Fatal(err)
	}
	return map[string]ContextSigner{"Signer": s, "Decrypter": d, "DurableSigner": ds, "DurableDecrypter": dd, "GroupSigner": gs, "GroupDecrypter": gd}
}

// TestKindsOneVocabulary: every kind of key answers the same methods with
// the same meaning. Sign, SignContext, SignMessage and SignMessageContext
// sign on every kind, every
// decrypter decrypts with Decrypt and DecryptContext and signs too, a done
// context makes no PKCS#11 call on any kind, and KeyRef is the key's own
// reference as read from the token on every kind, whatever it was asked by.
func TestKindsOneVocabulary(t *testing.T) {
	f := newGroupFixture(t, 1, rsaKey(t))
	g := openGroup(t, GroupConfig{Members: f.configs()})
	p := g.Members()[0]
	ks := kinds(t, p, KeyRef{Label: groupRef.Label}, g, KeyRef{Label: groupRef.Label})
	pub := f.key.Public().(*rsa.PublicKey)
	digest := sha256.Sum256([]byte("one vocabulary"))
	done, cancel := context.WithCancel(context.Background())
	cancel()
	for name, k := range ks {
		if !samePublic(k.Public(), pub) {
			t.Errorf("%s: Public is not the key", name)
		}
		if ref := k.(interface{ KeyRef() KeyRef }).KeyRef(); !bytes.Equal(ref.ID, groupRef.ID) || ref.Label != groupRef.Label {
			t.Errorf("%s: KeyRef %v, want the key's own %v (asked by label only)", name, ref, groupRef)
		}
		sig, err := k.Sign(nil, digest[:], crypto.SHA256)
		if err != nil {
			t.Fatalf("%s: Sign: %v", name, err)
		}
		if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig); err != nil {
			t.Fatalf("%s: Sign: %v", name, err)
		}
		sig, err = k.SignContext(t.Context(), digest[:], crypto.SHA256)
		if err != nil {
			t.Fatalf("%s: SignContext: %v", name, err)
		}
		if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig); err != nil {
			t.Fatalf("%s: SignContext: %v", name, err)
		}
		m, ok := k.(messageSigner)
		if !ok {
			t.Fatalf("%s has no SignMessage and SignMessageContext", name)
		}
		for how, sign := range map[string]func() ([]byte, error){
			"SignMessage": func() ([]byte, error) { return m.SignMessage(nil, []byte("one vocabulary"), crypto.SHA256) },
			"SignMessageContext": func() ([]byte, error) {
				return m.SignMessageContext(t.Context(), []byte("one vocabulary"), crypto.SHA256)
			},
		} {
			sig, err := sign()
			if err != nil {
				t.Fatalf("%s: %s: %v", name, how, err)
			}
			if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig); err != nil {
				t.Fatalf("%s: %s: %v", name, how, err)
			}
		}
		ops := p.Stats().Operations
		_, err = k.SignContext(done, digest[:], crypto.SHA256)
		if !errors.Is(err, ErrUnavailable) || !errors.Is(err, context.Canceled) {
			t.Errorf("%s: SignContext with a done context: %v, want ErrUnavailable and context.Canceled", name, err)
		}
		_, err = m.SignMessageContext(done, []byte("one vocabulary"), crypto.SHA256)
		if !errors.Is(err, ErrUnavailable) || !errors.Is(err, context.Canceled) {
			t.Errorf("%s: SignMessageContext with a done context: %v, want ErrUnavailable and context.Canceled", name, err)
		}
		if d, ok := k.(ContextDecrypter); ok {
			ct := encryptTo(t, pub, []byte("secret"), &rsa.OAEPOptions{Hash: crypto.SHA256})
			for how, dec := range map[string]func() ([]byte, error){
				"Decrypt": func() ([]byte, error) { return d.Decrypt(nil, ct, &rsa.OAEPOptions{Hash: crypto.SHA256}) },
				"DecryptContext": func() ([]byte, error) {
					return d.DecryptContext(t.Context(), nil, ct, &rsa.OAEPOptions{Hash: crypto.SHA256})
				},
			} {
				if pt, err := dec(); err != nil || string(pt) != "secret" {
					t.Fatalf("%s: %s: %q, %v", name, how, pt, err)
				}
			}
			ops = p.Stats().Operations
			_, err = d.DecryptContext(done, nil, ct, &rsa.OAEPOptions{Hash: crypto.SHA256})
			if !errors.Is(err, ErrUnavailable) || !errors.Is(err, context.Canceled) {
				t.Errorf("%s: DecryptContext with a done context: %v", name, err)
			}
		}
		if p.Stats().Operations != ops {
			t.Errorf("%s: a done context made an operation", name)
		}
		t.Logf("%s: %v", name, k)
	}
	for _, name := range []string{"Decrypter", "DurableDecrypter", "GroupDecrypter"} {
		if _, ok := ks[name].(ContextDecrypter); !ok {
			t.Errorf("%s is not a ContextDecrypter", name)
		}
	}
}

// TestSignContextWaitsOnEveryKind: while the HSM is down, SignContext of
// each binding waits, until it is back: a durable key and a group key then
// sign; a generation-bound key, whose generation ended, fails with
// ErrStaleKey (after the wait, without a call on the old handles).
func TestSignContextWaitsOnEveryKind(t *testing.T) {
	f := newGroupFixture(t, 1, ecKey(t))
	g := openGroup(t, GroupConfig{Members: f.configs()})
	p := g.Members()[0]
	ks := map[string]ContextSigner{}
	s, err := p.Signer(groupRef)
	if err != nil {
		t.Fatal(err)
	}
	ks["Signer"] = s
	if ks["DurableSigner"], err = p.DurableSigner(groupRef); err != nil {
		t.Fatal(err)
	}
	if ks["GroupSigner"], err = g.Signer(groupRef); err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("wait on every kind"))
	if err := f.srvs[0].Kill(); err != nil {
		t.Fatal(err)
	}
	_, _ = s.Sign(nil, digest[:], crypto.SHA256) // notices the loss
	waitState(t, p, StateUnavailable, 10*time.Second)
	type result struct {
		name string
		sig  []byte
		err  error
	}
	results := make(chan result, len(ks))
	ctx := contextWithTimeout(t, 60*time.Second)
	for name, k := range ks {
		go func() {
			sig, err := k.SignContext(ctx, digest[:], crypto.SHA256)
			results <- result{name, sig, err}
		}()
	}
	// None returns while the HSM is down; each is waiting on the
	// provider's (or the group's) state, not polling, so this holds
	// however long the pause. 300 ms: enough for a wrong early return to
	// show on a loaded machine.
	select {
	case r := <-results:
		t.Fatalf("%s: SignContext returned while the HSM was down: %v", r.name, r.err)
	case <-time.After(300 * time.Millisecond):
	}
	if err := f.srvs[0].Restart(); err != nil {
		t.Fatal(err)
	}
	for range ks {
		r := <-results
		switch r.name {
		case "Signer":
			wantErr(t, r.err, ErrStaleKey)
		default:
			if r.err != nil {
				t.Fatalf("%s: %v", r.name, r.err)
			}
			if !ecdsa.VerifyASN1(f.key.Public().(*ecdsa.PublicKey), digest[:], r.sig) {
				t.Fatalf("%s: the signature does not verify", r.name)
			}
		}
		t.Logf("%s after the outage: %v", r.name, r.err)
	}
}
