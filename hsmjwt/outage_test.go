package hsmjwt_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/hsmjwt"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/golang-jwt/jwt/v5"
)

// TestOutage signs JWTs with a DurableSigner on a token served by p11-kit
// server (a network HSM), kills the server, and checks that Token.SignedString
// fails fast with the provider's error while hsmjwt.SignedString waits for
// the HSM to come back and then signs.
func TestOutage(t *testing.T) {
	tok := softhsmtest.NewToken(t, "jwt-remote")
	tok.GenerateKey(t, softhsmtest.P256, []byte{1}, "k")
	srv := softhsmtest.StartServer(t, tok)
	p, err := hsm.Open(hsm.Config{
		Path: srv.Module(), TokenLabel: tok.Label, PIN: tok.PIN,
		MaxSessions: 1, // p11-kit 0.24's client hangs when several calls wait on a dead server
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Error(err)
		}
	})
	key, err := p.DurableSigner(hsm.KeyRef{Label: "k"})
	if err != nil {
		t.Fatal(err)
	}
	checkRoundTrip(t, hsmjwt.ES256, key)

	if err := srv.Kill(); err != nil {
		t.Fatal(err)
	}
	for range 2 { // the first call finds the device lost, the second fails fast
		_, err := jwt.NewWithClaims(hsmjwt.ES256, claims()).SignedString(key)
		if !errors.Is(err, hsm.ErrDeviceLost) && !errors.Is(err, hsm.ErrUnavailable) {
			t.Fatalf("SignedString with the HSM gone: %v, want hsm.ErrDeviceLost or hsm.ErrUnavailable", err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := hsmjwt.SignedString(ctx, jwt.NewWithClaims(hsmjwt.ES256, claims()), key); !errors.Is(err, context.Canceled) {
		t.Fatalf("SignedString with a canceled context: %v, want context.Canceled", err)
	}

	// One caller waits through the outage; the HSM comes back.
	done := make(chan error, 1)
	var s string
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		var err error
		s, err = hsmjwt.SignedString(ctx, jwt.NewWithClaims(hsmjwt.ES256, claims()), key)
		done <- err
	}()
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("SignedString across the outage: %v", err)
	}
	parse(t, s, key.Public(), "ES256")
	checkRoundTrip(t, hsmjwt.ES256, key)
}
