// Command hsmdemo shows what package hsm is for, on a SoftHSM2 token it
// creates in a temporary directory:
//
//  1. Directly on SoftHSM2: sign, re-initialize the PKCS#11 library, watch
//     the old key fail fast with ErrStaleKey, look it up again, sign again.
//  2. Through p11-kit remoting, the way a network HSM is reached: kill the
//     HSM, see every call fail with CKR_DEVICE_ERROR even after the HSM is
//     back, re-initialize once, and sign again with the same key.
//
// It needs softhsm2, p11-kit and opensc (make deps installs them) and exits
// non-zero if anything does not behave as described.
package main

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "hsmdemo:", err)
		os.Exit(1)
	}
}

func run() error {
	if missing := softhsmtest.Missing(true); len(missing) > 0 {
		return fmt.Errorf("not installed: %s; run `make deps`", strings.Join(missing, ", "))
	}
	dir, err := os.MkdirTemp("", "hsmdemo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if err := softhsmtest.Setup(dir); err != nil {
		return err
	}
	tok, err := softhsmtest.CreateToken("demo")
	if err != nil {
		return err
	}
	if err := tok.Generate(softhsmtest.P256, []byte{1}, "demo-key"); err != nil {
		return err
	}
	fmt.Printf("Created SoftHSM2 token %q in %s with an ECDSA P-256 key \"demo-key\".\n\n", tok.Label, dir)

	if err := direct(tok); err != nil {
		return fmt.Errorf("part 1: %w", err)
	}
	if err := remote(tok); err != nil {
		return fmt.Errorf("part 2: %w", err)
	}
	fmt.Println("\nAll good: no stale handle was ever used, and the key survived the outage.")
	return nil
}

var digest = sha256.Sum256([]byte("the demo's message"))

// signVerify signs with s and checks the signature under pub.
func signVerify(s *hsm.Signer, pub *ecdsa.PublicKey) (time.Duration, error) {
	start := time.Now()
	sig, err := s.Sign(nil, digest[:], crypto.SHA256)
	took := time.Since(start)
	if err != nil {
		return took, err
	}
	if !ecdsa.VerifyASN1(pub, digest[:], sig) {
		return took, errors.New("signature does not verify")
	}
	return took, nil
}

func direct(tok *softhsmtest.Token) error {
	fmt.Println("== Part 1: SoftHSM2 loaded directly ==")
	p, err := hsm.Open(hsm.Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN})
	if err != nil {
		return err
	}
	defer p.Close()
	key, err := p.Signer(hsm.KeyRef{Label: "demo-key"})
	if err != nil {
		return err
	}
	pub := key.Public().(*ecdsa.PublicKey)
	took, err := signVerify(key, pub)
	if err != nil {
		return err
	}
	fmt.Printf("signed and verified with %v in %v\n", key, took.Round(time.Microsecond))

	start := time.Now()
	if err := p.Reinitialize(context.Background()); err != nil {
		return err
	}
	fmt.Printf("re-initialized the library (C_Finalize + C_Initialize) in %v: now generation %d\n", time.Since(start).Round(time.Microsecond), p.Generation())

	took, err = signVerify(key, pub)
	if !errors.Is(err, hsm.ErrStaleKey) {
		return fmt.Errorf("old key after re-initialization: %v, want ErrStaleKey", err)
	}
	fmt.Printf("old key refused in %v without any PKCS#11 call:\n    %v\n", took, err)

	key, err = p.Signer(hsm.KeyRef{Label: "demo-key"})
	if err != nil {
		return err
	}
	if _, err := signVerify(key, pub); err != nil {
		return err
	}
	fmt.Printf("looked up again: %v signs, and the signature verifies under the original public key\n\n", key)
	return nil
}

func remote(tok *softhsmtest.Token) error {
	fmt.Println("== Part 2: the same token as a network HSM (p11-kit server + p11-kit-client.so) ==")
	srv, err := softhsmtest.Serve(tok)
	if err != nil {
		return err
	}
	defer srv.Stop()
	p, err := hsm.Open(hsm.Config{
		Path: srv.Module(), TokenLabel: tok.Label, PIN: tok.PIN,
		// p11-kit 0.24's client can hang when the server dies with several
		// calls in flight: one call at a time (see README).
		MaxSessions: 1,
	})
	if err != nil {
		return err
	}
	defer p.Close()
	key, err := p.Signer(hsm.KeyRef{Label: "demo-key"})
	if err != nil {
		return err
	}
	pub := key.Public().(*ecdsa.PublicKey)
	took, err := signVerify(key, pub)
	if err != nil {
		return err
	}
	fmt.Printf("signed over the socket in %v\n", took.Round(time.Microsecond))

	if err := srv.Kill(); err != nil {
		return err
	}
	took, err = signVerify(key, pub)
	var herr *hsm.Error
	if !hsm.IsDeviceLost(err) || !errors.As(err, &herr) {
		return fmt.Errorf("after killing the server: %v, want a device-lost error", err)
	}
	fmt.Printf("killed the HSM; the next signature failed in %v:\n    %v (class %v)\n", took.Round(time.Microsecond), err, hsm.Classify(err))

	if err := srv.Restart(); err != nil {
		return err
	}
	if _, err = signVerify(key, pub); !hsm.IsDeviceLost(err) {
		return fmt.Errorf("after restarting the server: %v, want the library still broken", err)
	}
	fmt.Printf("restarted the HSM; the library does not recover by itself:\n    %v\n", err)

	start := time.Now()
	if err := p.ReinitializeFrom(context.Background(), herr.Generation); err != nil {
		return err
	}
	fmt.Printf("ReinitializeFrom(generation %d) took %v: now generation %d\n", herr.Generation, time.Since(start).Round(time.Microsecond), p.Generation())
	if err := p.ReinitializeFrom(context.Background(), herr.Generation); err != nil || p.Reinitializations() != 1 {
		return fmt.Errorf("a second caller that saw the same outage re-initialized again (%v)", err)
	}
	fmt.Println("a second caller reporting the same outage changed nothing (still one re-initialization)")

	if _, err := signVerify(key, pub); !errors.Is(err, hsm.ErrStaleKey) {
		return fmt.Errorf("old key after recovery: %v, want ErrStaleKey", err)
	}
	key, err = p.Signer(hsm.KeyRef{Label: "demo-key"})
	if err != nil {
		return err
	}
	took, err = signVerify(key, pub)
	if err != nil {
		return err
	}
	fmt.Printf("old key: ErrStaleKey; looked up again, it signs in %v and verifies under the original public key\n", took.Round(time.Microsecond))
	return nil
}
