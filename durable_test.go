package hsm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

func TestDurableSurvivesReinitialize(t *testing.T) {
	p := openShared(t)
	ds, err := p.DurableSigner(KeyRef{Label: "p256"})
	if err != nil {
		t.Fatal(err)
	}
	dd, err := p.DurableDecrypter(KeyRef{Label: "rsa2048"})
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("durable"))
	for round := 1; round <= 3; round++ {
		before := p.Stats().Operations
		for range 50 {
			sig, err := ds.Sign(nil, digest[:], crypto.SHA256)
			if err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
			if !ecdsa.VerifyASN1(ds.Public().(*ecdsa.PublicKey), digest[:], sig) {
				t.Fatal("signature does not verify under the pinned key")
			}
		}
		// 50 signatures, plus one lookup and one proof (a signature of a
		// challenge) after each re-initialization: re-binding happens once
		// per generation, not per call.
		want := uint64(50)
		if round > 1 {
			want += 2
		}
		if got := p.Stats().Operations - before; got != want {
			t.Fatalf("round %d: %d operations for 50 signatures, want %d", round, got, want)
		}
		if ds.Generation() != uint64(round) {
			t.Fatalf("bound in generation %d, want %d", ds.Generation(), round)
		}
		ct, _ := rsa.EncryptOAEP(sha256.New(), rand.Reader, dd.Public().(*rsa.PublicKey), []byte("s"), nil)
		if pt, err := dd.Decrypt(nil, ct, &rsa.OAEPOptions{Hash: crypto.SHA256}); err != nil || string(pt) != "s" {
			t.Fatalf("durable decrypt: %q %v", pt, err)
		}
		if err := p.Reinitialize(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	var _ crypto.Decrypter = dd
	var _ crypto.Signer = ds
}

// TestDurableKeyChanged: the key is replaced on the token while the library
// is down. The durable key refuses the other key, without ever signing with
// it, and does not look it up again on every call.
func TestDurableKeyChanged(t *testing.T) {
	tok := softhsmtest.NewToken(t, "durable")
	id := []byte{7}
	tok.GenerateKey(t, softhsmtest.P256, id, "k")
	p := openToken(t, tok)
	ds, err := p.DurableSigner(KeyRef{Label: "k"})
	if err != nil {
		t.Fatal(err)
	}
	p.testHookFinalized = func() {
		tok.DeleteKeyPair(t, id)
		tok.GenerateKey(t, softhsmtest.P256, id, "k")
	}
	if err := p.Reinitialize(t.Context()); err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256(nil)
	sig, err := ds.Sign(nil, digest[:], crypto.SHA256)
	if sig != nil {
		t.Fatal("signed with the replaced key")
	}
	wantErr(t, err, ErrKeyChanged)
	t.Log(err)
	ops := p.Stats().Operations
	for range 10 {
		_, err := ds.SignContext(t.Context(), digest[:], crypto.SHA256)
		wantErr(t, err, ErrKeyChanged)
	}
	if p.Stats().Operations != ops {
		t.Fatal("the refusal looked the key up again")
	}
}

// tlsServer serves HTTPS with key and a self-signed certificate for it.
func tlsServer(t *testing.T, key crypto.Signer, cert *x509.Certificate) (*httptest.Server, *http.Client, *atomic.Int64) {
	t.Helper()
	var handshakeErrors atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	}))
	srv.Config.ErrorLog = log.New(countWriter{&handshakeErrors}, "", 0)
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{cert.Raw}, PrivateKey: key}}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	roots := x509.NewCertPool()
	roots.AddCert(cert)
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: roots, ServerName: "hsm.test"},
		DisableKeepAlives: true, // a handshake per request
	}}
	return srv, client, &handshakeErrors
}

type countWriter struct{ n *atomic.Int64 }

func (c countWriter) Write(b []byte) (int, error) { c.n.Add(1); return len(b), nil }

func get(client *http.Client, url string) error {
	resp, err := client.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && string(b) != "ok" {
		err = errors.New("unexpected body " + string(b))
	}
	return err
}

// TestDurableTLSServer: a TLS server whose key is durable survives an HSM
// outage with its tls.Config untouched.
func TestDurableTLSServer(t *testing.T) {
	r, _ := openAuto(t)
	p := r.p
	ds, err := p.DurableSigner(KeyRef{Label: "ec"})
	if err != nil {
		t.Fatal(err)
	}
	s := mustSigner(t, p, "ec")
	srv, client, _ := tlsServer(t, ds, selfSigned(t, s, 0))
	for range 3 {
		if err := get(client, srv.URL); err != nil {
			t.Fatal(err)
		}
	}
	r.kill(t)
	var failFast time.Duration
	for i := range 5 {
		start := time.Now()
		if err := get(client, srv.URL); err == nil {
			t.Fatalf("handshake %d succeeded with the HSM down", i)
		}
		failFast = max(failFast, time.Since(start))
	}
	if _, err := ds.Sign(nil, make([]byte, 32), crypto.SHA256); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("durable key while down: %v, want ErrUnavailable", err)
	}
	restart := time.Now()
	r.restart(t)
	if err := p.WaitHealthy(contextWithTimeout(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	if err := get(client, srv.URL); err != nil {
		t.Fatalf("after recovery: %v", err)
	}
	t.Logf("handshakes failed in at most %v while down; served again %v after restart", failFast, time.Since(restart))
	if ds.Generation() != 2 {
		t.Fatalf("durable key bound in generation %d", ds.Generation())
	}
}

// TestDurableTLSKeyReplaced: the key behind the label is replaced during the
// outage. The durable key refuses it: no handshake completes with it.
func TestDurableTLSKeyReplaced(t *testing.T) {
	r, _ := openAuto(t)
	p := r.p
	ds, err := p.DurableSigner(KeyRef{Label: "ec"})
	if err != nil {
		t.Fatal(err)
	}
	srv, client, _ := tlsServer(t, ds, selfSigned(t, mustSigner(t, p, "ec"), 0))
	if err := get(client, srv.URL); err != nil {
		t.Fatal(err)
	}
	r.kill(t)
	if err := get(client, srv.URL); err == nil { // the provider notices the loss
		t.Fatal("handshake succeeded with the HSM down")
	}
	waitState(t, p, StateUnavailable, 5*time.Second)
	r.tok.DeleteKeyPair(t, []byte{1})
	r.tok.GenerateKey(t, softhsmtest.P256, []byte{1}, "ec")
	r.restart(t)
	if err := p.WaitHealthy(contextWithTimeout(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	if p.Generation() != 2 {
		t.Fatalf("generation %d after recovery", p.Generation())
	}
	for range 3 {
		if err := get(client, srv.URL); err == nil {
			t.Fatal("a handshake completed after the key was replaced")
		}
	}
	_, err = ds.Sign(nil, make([]byte, 32), crypto.SHA256)
	wantErr(t, err, ErrKeyChanged)
}

// TestSignContextWaitsForRecovery: SignContext waits for the provider to
// recover, up to its context; Sign does not wait.
func TestSignContextWaitsForRecovery(t *testing.T) {
	r, _ := openAuto(t)
	p := r.p
	ds, err := p.DurableSigner(KeyRef{Label: "ec"})
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("wait"))
	r.kill(t)
	_, _ = ds.Sign(nil, digest[:], crypto.SHA256) // notices the loss
	waitState(t, p, StateUnavailable, 5*time.Second)

	start := time.Now()
	_, err = ds.Sign(nil, digest[:], crypto.SHA256)
	wantErr(t, err, ErrUnavailable)
	if took := time.Since(start); took > fastBound {
		t.Fatalf("Sign waited %v while unavailable", took)
	}
	short, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	_, err = ds.SignContext(short, digest[:], crypto.SHA256)
	if !errors.Is(err, ErrUnavailable) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("SignContext with a short deadline: %v", err)
	}

	done := make(chan error, 1)
	go func() {
		sig, err := ds.SignContext(contextWithTimeout(t, 20*time.Second), digest[:], crypto.SHA256)
		if err == nil && !ecdsa.VerifyASN1(ds.Public().(*ecdsa.PublicKey), digest[:], sig) {
			err = errors.New("signature does not verify")
		}
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("SignContext returned while the HSM is down: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	r.restart(t)
	if err := <-done; err != nil {
		t.Fatalf("SignContext across the outage: %v", err)
	}
}
