package hsm

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

func TestOutageThroughRemoting(t *testing.T) {
	r := openRemote(t)
	p := r.p
	if p.fast == nil {
		t.Fatal("the two-call signing path is off for p11-kit-client.so")
	}
	ec := mustSigner(t, p, "ec")
	rs := mustSigner(t, p, "rsa")
	digest := sha256.Sum256([]byte("before"))
	for _, s := range []*Signer{ec, rs} {
		if _, err := s.Sign(nil, digest[:], crypto.SHA256); err != nil {
			t.Fatal(err)
		}
	}

	r.kill(t)
	start := time.Now()
	_, err := ec.Sign(nil, digest[:], crypto.SHA256)
	took := time.Since(start)
	if code, _ := codeOf(err); !errors.Is(err, ErrDeviceLost) || classify(code) != classDeviceLost {
		t.Fatalf("after kill: %v (class %v), want device lost", err, classify(code))
	}
	var e *Error
	if !errors.As(err, &e) || e.Generation != 1 || e.Code == 0 {
		t.Fatalf("error fields: %+v", e)
	}
	t.Logf("kill -> %v in %v", err, took)

	// From the first loss on, operations fail fast without a call.
	if p.State() != StateUnavailable {
		t.Fatalf("state %v after a device-loss error, want unavailable", p.State())
	}
	_, err = ec.Sign(nil, digest[:], crypto.SHA256)
	wantErr(t, err, ErrUnavailable)

	// The HSM comes back, but the library does not recover by itself: a
	// raw call (nothing else is inside the library) still fails.
	r.restart(t)
	in := p.inst.Load()
	if _, err := in.ctx.GetSessionInfo(in.login); !errors.Is(p11err("raw", 1, err), ErrDeviceLost) {
		t.Fatalf("raw call after restart, before re-initialization: %v; DESIGN.md says the library stays broken", err)
	}
	_, err = ec.Sign(nil, digest[:], crypto.SHA256)
	wantErr(t, err, ErrUnavailable)

	if err := p.ReinitializeFrom(t.Context(), e.Generation); err != nil {
		t.Fatal(err)
	}
	if p.Generation() != 2 {
		t.Fatalf("generation %d", p.Generation())
	}
	for _, s := range []*Signer{ec, rs} {
		_, err := s.Sign(nil, digest[:], crypto.SHA256)
		wantErr(t, err, ErrStaleKey)
	}
	// Looked up again, the keys sign, and the signatures verify under the
	// public keys from before the outage.
	digest = sha256.Sum256([]byte("after"))
	sig, err := mustSigner(t, p, "ec").Sign(nil, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if !ecdsa.VerifyASN1(ec.Public().(*ecdsa.PublicKey), digest[:], sig) {
		t.Fatal("EC signature after recovery does not verify under the original key")
	}
	sig, err = mustSigner(t, p, "rsa").Sign(nil, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if err := rsa.VerifyPKCS1v15(rs.Public().(*rsa.PublicKey), crypto.SHA256, digest[:], sig); err != nil {
		t.Fatal("RSA signature after recovery:", err)
	}
}

// TestOutageStampede: 32 goroutines sign; the HSM is killed; every one of
// them sees the loss and asks for a re-initialization from the generation
// it saw fail. Exactly one re-initialization happens.
func TestOutageStampede(t *testing.T) {
	r := openRemote(t)
	p := r.p
	const workers = 32
	var lost, recovered atomic.Int64
	var ready atomic.Int64 // workers that have signed once
	back := make(chan struct{})
	var wg sync.WaitGroup
	fail := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			var s *Signer
			var pub *ecdsa.PublicKey
			sawLoss, isReady := false, false
			// handle deals with an error of a lookup or a signature; it
			// returns false when the worker must stop.
			handle := func(err error) bool {
				var e *Error
				switch {
				case errors.As(err, &e) && (errors.Is(err, ErrDeviceLost) || errors.Is(err, ErrUnavailable)):
					// The first worker sees the device-loss code; the
					// provider is unavailable from then on and the others
					// see ErrUnavailable, with the same generation.
					if !sawLoss {
						sawLoss = true
						lost.Add(1)
					}
					<-back // the operator restarts the HSM
					if err := p.ReinitializeFrom(t.Context(), e.Generation); err != nil {
						fail <- err
						return false
					}
				case errors.Is(err, ErrStaleKey):
					s = nil
				default:
					fail <- fmt.Errorf("unexpected error: %w", err)
					return false
				}
				return true
			}
			for i := 0; ; i++ {
				if s == nil {
					var err error
					if s, err = p.Signer(KeyRef{Label: "ec"}); err != nil {
						if !handle(err) {
							return
						}
						continue
					}
					if pub == nil {
						pub = s.Public().(*ecdsa.PublicKey)
					} else if !pub.Equal(s.Public()) {
						fail <- errors.New("the key found again has another public key")
						return
					}
				}
				digest := sha256.Sum256(fmt.Appendf(nil, "%d %d", w, i))
				sig, err := s.Sign(nil, digest[:], crypto.SHA256)
				if err != nil {
					if !handle(err) {
						return
					}
					continue
				}
				if !ecdsa.VerifyASN1(pub, digest[:], sig) {
					fail <- errors.New("signature does not verify")
					return
				}
				if sawLoss {
					recovered.Add(1)
					return
				}
				if !isReady {
					isReady = true
					ready.Add(1)
				}
			}
		})
	}
	// failed fails the test with a worker's failure, if there is one.
	failed := func() {
		select {
		case err := <-fail:
			t.Fatal(err)
		default:
		}
	}
	waitFor(t, "every worker signed once", func() bool { failed(); return ready.Load() == workers })
	r.kill(t)
	waitFor(t, "every worker saw the loss", func() bool { failed(); return lost.Load() == workers })
	r.restart(t)
	close(back)
	wg.Wait()
	close(fail)
	for err := range fail {
		t.Error(err)
	}
	if got := p.Stats().Reinitializations; got != 1 {
		t.Fatalf("%d workers that saw one outage caused %d re-initializations, want 1", workers, got)
	}
	if recovered.Load() != workers {
		t.Fatalf("%d of %d workers signed again after recovery", recovered.Load(), workers)
	}
}

// TestHungHSMDrainTimeout: the HSM stops answering with a call in flight.
// The re-initialization waits DrainTimeout, gives up without C_Finalize (the
// hung call is still inside the library), and the provider stays
// unavailable. When the HSM answers again the hung call completes with a
// valid signature, and a re-initialization succeeds.
func TestHungHSMDrainTimeout(t *testing.T) {
	r := openRemote(t, func(c *Config) { c.DrainTimeout = 300 * time.Millisecond })
	p := r.p
	s := mustSigner(t, p, "ec")
	digest := sha256.Sum256([]byte("hung"))

	if n := r.srv.Pause(); n < 2 {
		t.Fatalf("paused %d processes, want the server and its connection's child", n)
	}
	type result struct {
		sig []byte
		err error
	}
	hung := make(chan result, 1)
	go func() {
		sig, err := s.Sign(nil, digest[:], crypto.SHA256)
		hung <- result{sig, err}
	}()
	waitFor(t, "the signature in flight", func() bool { return p.gate.inFlight() > 0 })

	start := time.Now()
	err := p.Reinitialize(t.Context())
	took := time.Since(start)
	wantErr(t, err, ErrDrainTimeout)
	if took < 300*time.Millisecond { // a lower bound: load cannot break it
		t.Fatalf("gave up after %v, before DrainTimeout", took)
	}
	if p.State() != StateUnavailable || p.Generation() != 1 {
		t.Fatalf("state %v generation %d, want unavailable in generation 1", p.State(), p.Generation())
	}
	p.mod.busy <- struct{}{} // no life cycle call runs: the drain timed out
	finalized := !p.mod.initialized
	<-p.mod.busy
	if finalized {
		t.Fatal("C_Finalize was called with a call in flight")
	}
	// New operations fail fast, without queueing on the hung device.
	_, err = s.Sign(nil, digest[:], crypto.SHA256)
	wantErr(t, err, ErrUnavailable)
	_, err = p.Signer(KeyRef{Label: "ec"})
	wantErr(t, err, ErrUnavailable)

	r.srv.Resume()
	res := recv(t, "the hung call, after the HSM answered again", hung)
	if res.err != nil {
		t.Fatalf("hung call after resume: %v", res.err)
	}
	if !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), digest[:], res.sig) {
		t.Fatal("hung call's signature does not verify")
	}
	if err := p.Reinitialize(t.Context()); err != nil {
		t.Fatal(err)
	}
	if p.State() != StateHealthy || p.Generation() != 2 {
		t.Fatalf("state %v generation %d", p.State(), p.Generation())
	}
	sig, err := mustSigner(t, p, "ec").Sign(nil, digest[:], crypto.SHA256)
	if err != nil || !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), digest[:], sig) {
		t.Fatalf("after recovery: %v", err)
	}
}

// TestReinitializeWhileDown: a re-initialization while the HSM is still
// gone fails and leaves the provider unavailable; a later one succeeds.
func TestReinitializeWhileDown(t *testing.T) {
	r := openRemote(t)
	p := r.p
	s := mustSigner(t, p, "ec")
	r.kill(t)
	for range 2 {
		err := p.Reinitialize(t.Context())
		if err == nil {
			t.Fatal("re-initialization succeeded with the HSM down")
		}
		var e *Error
		if !errors.As(err, &e) {
			t.Fatalf("%v is not an *Error", err)
		}
		t.Logf("while down: %v", err)
		if p.State() != StateUnavailable || p.Generation() != 1 {
			t.Fatalf("state %v generation %d", p.State(), p.Generation())
		}
		digest := sha256.Sum256(nil)
		_, err = s.Sign(nil, digest[:], crypto.SHA256)
		wantErr(t, err, ErrUnavailable)
	}
	r.restart(t)
	if err := p.Reinitialize(t.Context()); err != nil {
		t.Fatal(err)
	}
	if p.Generation() != 2 || p.Stats().Reinitializations != 1 {
		t.Fatalf("generation %d, reinits %d", p.Generation(), p.Stats().Reinitializations)
	}
	digest := sha256.Sum256(nil)
	_, err := s.Sign(nil, digest[:], crypto.SHA256)
	wantErr(t, err, ErrStaleKey)
	if _, err := mustSigner(t, p, "ec").Sign(nil, digest[:], crypto.SHA256); err != nil {
		t.Fatal(err)
	}
}

// TestEd25519ThroughRemoting: p11-kit 0.24.1's RPC does not carry CKM_EDDSA,
// so an Ed25519 signature through p11-kit-client.so fails with
// CKR_MECHANISM_INVALID. That is the caller's kind of error: the provider
// stays healthy and other keys go on signing.
func TestEd25519ThroughRemoting(t *testing.T) {
	r := openRemote(t)
	r.tok.GenerateKey(t, softhsmtest.Ed25519, []byte{9}, "ed")
	s := mustSigner(t, r.p, "ed")
	_, err := s.Sign(nil, []byte("m"), crypto.Hash(0))
	if err == nil {
		t.Skip("this p11-kit carries CKM_EDDSA: the limitation is gone")
	}
	if code, _ := codeOf(err); code != 0x70 || classify(code) != classCaller {
		t.Fatalf("%v (class %v), want CKR_MECHANISM_INVALID as a caller error", err, classify(code))
	}
	if r.p.State() != StateHealthy {
		t.Fatalf("state %v after a caller error", r.p.State())
	}
	digest := sha256.Sum256(nil)
	if _, err := mustSigner(t, r.p, "ec").Sign(nil, digest[:], crypto.SHA256); err != nil {
		t.Fatal(err)
	}
}

// TestDecryptThroughRemoting: the two-call decryption through p11-kit's RPC,
// which carries the mechanism's OAEP parameters to the server.
func TestDecryptThroughRemoting(t *testing.T) {
	r := openRemote(t)
	if r.p.fast == nil {
		t.Fatal("the two-call path is off for p11-kit-client.so")
	}
	d, err := r.p.Decrypter(KeyRef{Label: "rsa"})
	if err != nil {
		t.Fatal(err)
	}
	pub := d.Public().(*rsa.PublicKey)
	secret := []byte("through the socket")
	for _, opts := range []crypto.DecrypterOpts{
		nil,
		&rsa.OAEPOptions{Hash: crypto.SHA1},
		&rsa.OAEPOptions{Hash: crypto.SHA256, Label: []byte("label")},
	} {
		ct := encryptTo(t, pub, secret, opts)
		pt, err := d.Decrypt(nil, ct, opts)
		if err != nil || !bytes.Equal(pt, secret) {
			t.Fatalf("%#v: %q, %v", opts, pt, err)
		}
		ct[len(ct)-1] ^= 1
		_, err = d.Decrypt(nil, ct, opts)
		wantErr(t, err, ErrDecryption)
	}
	if _, soft := r.p.inst.Load().oaepSoft.Load(oaepShape{crypto.SHA1, crypto.SHA1, false}); soft {
		t.Error("SHA-1 OAEP did not reach the token's CKM_RSA_PKCS_OAEP")
	}
	if s := r.p.State(); s != StateHealthy {
		t.Fatalf("state %v after rejected ciphertexts", s)
	}
}
