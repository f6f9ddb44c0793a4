package hsm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/miekg/pkcs11"
)

func TestReinitializeStaleKeys(t *testing.T) {
	p := openShared(t)
	s := mustSigner(t, p, "p256")
	d, err := p.Decrypter(KeyRef{Label: "rsa2048"})
	if err != nil {
		t.Fatal(err)
	}
	if s.Generation() != 1 || p.Generation() != 1 {
		t.Fatalf("generations %d %d, want 1", s.Generation(), p.Generation())
	}
	if err := p.Reinitialize(t.Context()); err != nil {
		t.Fatal(err)
	}
	if p.Generation() != 2 || p.State() != StateHealthy || p.Stats().Reinitializations != 1 {
		t.Fatalf("after reinit: generation %d, state %v, reinits %d", p.Generation(), p.State(), p.Stats().Reinitializations)
	}
	digest := sha256.Sum256([]byte("m"))
	_, err = s.Sign(nil, digest[:], crypto.SHA256)
	if e := wantErr(t, err, ErrStaleKey); e.Generation != 1 || e.Op != "sign" {
		t.Fatalf("stale error fields %+v", e)
	}
	_, err = d.Decrypt(nil, make([]byte, 256), nil)
	wantErr(t, err, ErrStaleKey)
	_, err = d.Sign(nil, digest[:], crypto.SHA256)
	wantErr(t, err, ErrStaleKey)

	s2 := mustSigner(t, p, "p256")
	if s2.Generation() != 2 {
		t.Fatalf("new key generation %d", s2.Generation())
	}
	sig, err := s2.Sign(nil, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	// The same key: its signature verifies under the old key's public key.
	if !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), digest[:], sig) {
		t.Fatal("signature of the key found again does not verify under the original public key")
	}
}

// TestStaleHandleWouldReachAnotherKey is the scenario of DESIGN.md §1: key A
// is found, the library is finalized, another process replaces A by B under
// the same label and ID, the library is initialized again. The old handle
// number now names B. The old Signer must refuse (ErrStaleKey) and never
// produce a signature by B.
func TestStaleHandleWouldReachAnotherKey(t *testing.T) {
	tok := softhsmtest.NewToken(t, "wrongkey")
	id := []byte{0xA1}
	tok.GenerateKey(t, softhsmtest.P256, id, "k")
	p := openToken(t, tok)
	findPrivateFirst(t, p, id)
	sA := mustSigner(t, p, "k")
	pubA := sA.Public().(*ecdsa.PublicKey)

	hooked := false
	p.testHookFinalized = func() {
		// The library is finalized: another process replaces the key.
		tok.DeleteKeyPair(t, id)
		tok.GenerateKey(t, softhsmtest.P256, id, "k")
		hooked = true
	}
	if err := p.Reinitialize(t.Context()); err != nil {
		t.Fatal(err)
	}
	if !hooked {
		t.Fatal("the key was not replaced during the re-initialization")
	}
	findPrivateFirst(t, p, id)
	sB := mustSigner(t, p, "k")
	pubB := sB.Public().(*ecdsa.PublicKey)
	if pubA.Equal(pubB) {
		t.Fatal("the replacement key has the same public key")
	}

	// The hazard is real: the handle number of A now names B, and a raw
	// C_Sign with it makes a signature that verifies under B.
	if sA.k.handle != sB.k.handle {
		t.Logf("note: SoftHSM gave B handle %d, A had %d; the raw-handle check below uses A's number", sB.k.handle, sA.k.handle)
	}
	digest := sha256.Sum256([]byte("pay 100 to alice"))
	raw := rawSign(t, p, sA.k.handle, digest[:])
	if raw != nil && !ecdsa.VerifyASN1(pubB, digest[:], raw) {
		t.Fatal("raw signature with A's old handle does not verify under B: the scenario did not reproduce")
	}
	if raw == nil {
		t.Fatal("A's old handle is invalid in the new generation: the scenario did not reproduce")
	}

	// The library refuses: no PKCS#11 call, no signature by B.
	sig, err := sA.Sign(nil, digest[:], crypto.SHA256)
	if sig != nil {
		t.Fatal("stale key returned a signature")
	}
	wantErr(t, err, ErrStaleKey)

	// Looked up again, the key is B and says so.
	sig, err = sB.Sign(nil, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if !ecdsa.VerifyASN1(pubB, digest[:], sig) || ecdsa.VerifyASN1(pubA, digest[:], sig) {
		t.Fatal("new signer does not sign as B")
	}
}

// findPrivateFirst finds the private key with id by class before anything
// else of the generation, as a library without generations would: SoftHSM
// then gives it the first object handle of the library instance, in each
// generation alike. (hsm's own lookup finds both halves in one scan, in the
// module's order, which may differ between generations.)
func findPrivateFirst(t *testing.T, p *Provider, id []byte) {
	t.Helper()
	err := p.withSession("raw find", func(in *instance, s pkcs11.SessionHandle) error {
		_, err := in.findObjects(s, refTemplate(pkcs11.CKO_PRIVATE_KEY, id, "k"), 1)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// rawSign signs with a bare object handle on a session of the provider's
// current generation, bypassing every check of this package: what a
// library without generations would do. It returns nil if the token
// rejects the handle.
func rawSign(t *testing.T, p *Provider, h pkcs11.ObjectHandle, digest []byte) []byte {
	t.Helper()
	gen := p.Generation()
	var sig []byte
	err := p.withSession("raw sign", func(in *instance, s pkcs11.SessionHandle) error {
		err := in.ctx.SignInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}, h)
		if err != nil {
			return err
		}
		if sig, err = in.ctx.Sign(s, digest); err != nil {
			return mayBeActive(err)
		}
		return nil
	})
	if err != nil {
		t.Logf("raw sign with handle %d: %v", h, err)
		return nil
	}
	k := &key{kind: kindECDSA, size: len(sig), gen: gen}
	der, err := k.ecdsaDER(sig)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func TestStampede(t *testing.T) {
	p := openShared(t)
	const callers = 64
	for round := 1; round <= 3; round++ {
		seen := p.Generation()
		start := make(chan struct{})
		var wg sync.WaitGroup
		errs := make(chan error, callers)
		for range callers {
			wg.Go(func() {
				<-start
				errs <- p.ReinitializeFrom(t.Context(), seen)
			})
		}
		close(start)
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		if got := p.Stats().Reinitializations; got != uint64(round) {
			t.Fatalf("round %d: %d callers caused %d re-initializations in all, want %d", round, callers, got, round)
		}
		if p.Generation() != seen+1 {
			t.Fatalf("generation %d, want %d", p.Generation(), seen+1)
		}
	}
	// A late caller that saw generation 1 fail changes nothing.
	if err := p.ReinitializeFrom(t.Context(), 1); err != nil || p.Stats().Reinitializations != 3 {
		t.Fatalf("late caller: %v, %d reinits", err, p.Stats().Reinitializations)
	}
}

// TestConcurrentSignAndReinitialize: goroutines sign continuously, looking
// keys up again when they turn stale, while another goroutine
// re-initializes. Every signature returned verifies under its key's public
// key; every error is one of the documented refusals.
func TestConcurrentSignAndReinitialize(t *testing.T) {
	p := openShared(t, func(c *Config) { c.MaxSessions = 8 })
	labels := []string{"p256", "rsa2048", "ed25519", "p384"}
	const workers = 12
	const reinits = 8
	stop := make(chan struct{})
	var good, stale, unavailable atomic.Int64
	var wg sync.WaitGroup
	fail := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			label := labels[w%len(labels)]
			var s *Signer
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if s == nil {
					var err error
					if s, err = p.Signer(KeyRef{Label: label}); err != nil {
						if errors.Is(err, ErrUnavailable) {
							unavailable.Add(1)
							time.Sleep(time.Millisecond)
							continue
						}
						fail <- fmt.Errorf("lookup %s: %w", label, err)
						return
					}
				}
				msg := fmt.Appendf(nil, "%s %d %d", label, w, i)
				digest, opts := signInput(s, msg)
				sig, err := s.Sign(nil, digest, opts)
				switch {
				case err == nil:
					if err := verify(s.Public(), digest, sig, opts); err != nil {
						fail <- fmt.Errorf("%s generation %d: %w", label, s.Generation(), err)
						return
					}
					good.Add(1)
				case errors.Is(err, ErrStaleKey):
					stale.Add(1)
					s = nil
				case errors.Is(err, ErrUnavailable):
					unavailable.Add(1)
					time.Sleep(100 * time.Microsecond)
				default:
					fail <- fmt.Errorf("%s: unexpected error %w", label, err)
					return
				}
			}
		})
	}
	for range reinits {
		before := good.Load()
		// Let signing progress between re-initializations.
		waitFor(t, "50 signatures between two re-initializations", func() bool {
			select {
			case err := <-fail:
				t.Fatal(err)
			default:
			}
			return good.Load() >= before+50
		})
		if err := p.Reinitialize(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	close(fail)
	for err := range fail {
		t.Error(err)
	}
	if p.Stats().Reinitializations != reinits {
		t.Errorf("%d re-initializations, want %d", p.Stats().Reinitializations, reinits)
	}
	if stale.Load() == 0 {
		t.Error("no signer ever saw ErrStaleKey: the test did not overlap signing and re-initialization")
	}
	t.Logf("%d good signatures, %d stale, %d unavailable, %d re-initializations", good.Load(), stale.Load(), unavailable.Load(), p.Stats().Reinitializations)
}

// TestReinitializeCallerContext: a caller's context bounds its own wait,
// not the shared re-initialization, which goes on for the other callers.
func TestReinitializeCallerContext(t *testing.T) {
	p := openShared(t)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	err := p.Reinitialize(ctx)
	if err != nil && !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want nil or context.Canceled", err)
	}
	waitFor(t, "the re-initialization completed (healthy in generation 2)", func() bool {
		return p.Generation() == 2 && p.State() == StateHealthy
	}, p)
}
