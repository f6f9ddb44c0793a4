// Command hsmdemo shows what package hsm is for, on a SoftHSM2 token it
// creates in a temporary directory:
//
//  1. Directly on SoftHSM2: sign, re-initialize the PKCS#11 library, watch
//     the old key fail fast with ErrStaleKey, look it up again, sign again.
//  2. Through p11-kit remoting, the way a network HSM is reached, recovery
//     by hand: kill the HSM, see the first call fail with CKR_DEVICE_ERROR
//     and the rest fail fast, restart it, re-initialize once, sign again.
//  3. The same outage with automatic recovery: the provider notices, fails
//     fast while the HSM is gone, and is healthy again shortly after it
//     returns, without any code of the application.
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
	"github.com/ce46d8f2/hsm/internal/softhsm"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "hsmdemo:", err)
		os.Exit(1)
	}
}

func run() error {
	if missing := softhsm.Missing(true); len(missing) > 0 {
		return fmt.Errorf("not installed: %s; run `make deps`", strings.Join(missing, ", "))
	}
	dir, err := os.MkdirTemp("", "hsmdemo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if err := softhsm.Setup(dir); err != nil {
		return err
	}
	tok, err := softhsm.CreateToken("demo")
	if err != nil {
		return err
	}
	if err := tok.Generate(softhsm.P256, []byte{1}, "demo-key"); err != nil {
		return err
	}
	fmt.Printf("Created SoftHSM2 token %q in %s with an ECDSA P-256 key \"demo-key\".\n\n", tok.Label, dir)

	if err := direct(tok); err != nil {
		return fmt.Errorf("part 1: %w", err)
	}
	if err := manual(tok); err != nil {
		return fmt.Errorf("part 2: %w", err)
	}
	if err := automatic(tok); err != nil {
		return fmt.Errorf("part 3: %w", err)
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

func direct(tok *softhsm.Token) error {
	fmt.Println("== Part 1: SoftHSM2 loaded directly ==")
	p, err := hsm.Open(hsm.Config{Path: softhsm.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN})
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

// remoteConfig is the Config for tok served by p11-kit.
func remoteConfig(srv *softhsm.Server, tok *softhsm.Token) hsm.Config {
	return hsm.Config{
		Path: srv.Module(), TokenLabel: tok.Label, PIN: tok.PIN,
		// p11-kit 0.24's client can hang when the server dies with several
		// calls in flight: one call at a time (see docs/modules.md).
		MaxSessions: 1,
	}
}

func manual(tok *softhsm.Token) error {
	fmt.Println("== Part 2: the same token as a network HSM (p11-kit server + p11-kit-client.so), recovery by hand ==")
	srv, err := softhsm.Serve(tok)
	if err != nil {
		return err
	}
	defer srv.Stop()
	cfg := remoteConfig(srv, tok)
	cfg.DisableAutoRecovery = true
	p, err := hsm.Open(cfg)
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
	if !errors.Is(err, hsm.ErrDeviceLost) || !errors.As(err, &herr) {
		return fmt.Errorf("after killing the server: %v, want a device-lost error", err)
	}
	fmt.Printf("killed the HSM; the next signature failed in %v:\n    %v (matches hsm.ErrDeviceLost)\n", took.Round(time.Microsecond), err)

	took, err = signVerify(key, pub)
	if !errors.Is(err, hsm.ErrUnavailable) {
		return fmt.Errorf("second signature after the kill: %v, want ErrUnavailable", err)
	}
	fmt.Printf("from then on the provider is %v and calls fail fast (%v), without touching the HSM:\n    %v\n", p.State(), took, err)

	if err := srv.Restart(); err != nil {
		return err
	}
	if _, err = signVerify(key, pub); !errors.Is(err, hsm.ErrUnavailable) {
		return fmt.Errorf("after restarting the server: %v, want still unavailable", err)
	}
	fmt.Println("restarted the HSM; the PKCS#11 library cannot use it until it is re-initialized")

	start := time.Now()
	if err := p.ReinitializeFrom(context.Background(), herr.Generation); err != nil {
		return err
	}
	fmt.Printf("ReinitializeFrom(generation %d) took %v: now generation %d\n", herr.Generation, time.Since(start).Round(time.Microsecond), p.Generation())
	if err := p.ReinitializeFrom(context.Background(), herr.Generation); err != nil || p.Stats().Reinitializations != 1 {
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

func automatic(tok *softhsm.Token) error {
	fmt.Println("\n== Part 3: the same outage with automatic recovery (the default) ==")
	srv, err := softhsm.Serve(tok)
	if err != nil {
		return err
	}
	defer srv.Stop()
	changes := make(chan hsm.StateChange, 64)
	cfg := remoteConfig(srv, tok)
	cfg.OnStateChange = func(c hsm.StateChange) { changes <- c }
	p, err := hsm.Open(cfg)
	if err != nil {
		return err
	}
	defer p.Close()
	key, err := p.Signer(hsm.KeyRef{Label: "demo-key"})
	if err != nil {
		return err
	}
	pub := key.Public().(*ecdsa.PublicKey)

	killed := time.Now()
	if err := srv.Kill(); err != nil {
		return err
	}
	_, err = signVerify(key, pub)
	if !errors.Is(err, hsm.ErrDeviceLost) {
		return fmt.Errorf("after the kill: %v", err)
	}
	took, err := signVerify(key, pub)
	if !errors.Is(err, hsm.ErrUnavailable) {
		return fmt.Errorf("second call after the kill: %v", err)
	}
	fmt.Printf("killed the HSM: %v after the kill the provider was %v; calls fail fast (%v each)\n", time.Since(killed).Round(time.Microsecond), p.State(), took)
	time.Sleep(500 * time.Millisecond)
	st := p.Stats()
	fmt.Printf("half a second later: still %v, %d re-initialization attempts failed while the HSM is gone\n", st.State, st.ReinitializationFailures)

	restarted := time.Now()
	if err := srv.Restart(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.WaitHealthy(ctx); err != nil {
		return err
	}
	fmt.Printf("restarted the HSM: healthy again %v later, generation %d, %d re-initialization\n",
		time.Since(restarted).Round(time.Millisecond), p.Generation(), p.Stats().Reinitializations)
	key, err = p.Signer(hsm.KeyRef{Label: "demo-key"})
	if err != nil {
		return err
	}
	if _, err := signVerify(key, pub); err != nil {
		return err
	}
	fmt.Println("looked up again, the key signs; state changes seen by OnStateChange:")
	for {
		select {
		case c := <-changes:
			fmt.Printf("    %-14v -> %-14v generation %d\n", c.From, c.To, c.Generation)
		default:
			return nil
		}
	}
}
