// Package soak is a chaos test of package hsm: goroutines sign with durable
// keys through p11-kit remoting while the "HSM" (a p11-kit server in front of
// a SoftHSM2 token) is, in turn, killed and restarted, paused and resumed,
// or killed and restarted frozen (it accepts connections and does not
// answer, so that the re-initialization is stuck in C_Initialize until it is
// resumed), at random times. It reports what a user must be able to rely on: every signature
// returned verifies, none is wrong, nothing panics, there is one
// re-initialization per outage, recovery is quick, no goroutine is left.
//
// softhsm.Setup must have run (cmd/hsmcheck and TestMain do it).
package soak

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/internal/softhsm"
)

// Options configure a soak.
type Options struct {
	Duration    time.Duration // how long the workers sign
	OutageEvery time.Duration // mean time between two outages
	Workers     int           // signing goroutines
	// Log receives one line per outage; nil for none.
	Log io.Writer
}

// Result is what a soak observed.
type Result struct {
	Operations        uint64 // signatures attempted
	Signatures        uint64 // signatures returned
	Verified          uint64 // of those, verified under the pinned public key
	Wrong             uint64 // returned but not verifying: must be 0
	Refused           uint64 // ErrUnavailable, ErrBusy, device lost: expected during outages
	Unexpected        uint64 // any other error: must be 0
	Panics            uint64 // must be 0
	Kills, Pauses     int    // outages caused
	Freezes           int    // of them, HSM frozen during the re-initialization
	Outages           uint64 // outages the provider noticed (healthy -> unavailable)
	Reinitializations uint64
	// ReinitFailures counts the re-initializations that failed (drain
	// time-outs, ErrHung while frozen, the HSM still down) and were retried.
	ReinitFailures   uint64 // must equal Outages
	WorstRecovery    time.Duration
	GoroutinesLeaked int // must be 0
	FirstUnexpected  string
}

// OK reports whether the result holds every promise.
func (r Result) OK() bool {
	return r.Wrong == 0 && r.Panics == 0 && r.Unexpected == 0 && r.Verified == r.Signatures &&
		r.Reinitializations == r.Outages && r.GoroutinesLeaked == 0 && r.Signatures > 0
}

// String is the report printed by hsmcheck soak.
func (r Result) String() string {
	return fmt.Sprintf(`operations            %d
signatures returned   %d
signatures verified   %d
wrong signatures      %d
refused (outages)     %d
unexpected errors     %d %s
panics                %d
outages caused        %d (%d kills, %d pauses, %d frozen during re-initialization)
outages noticed       %d
re-initializations    %d (%d failed attempts retried)
worst recovery        %v (HSM back -> first good signature)
goroutines leaked     %d`,
		r.Operations, r.Signatures, r.Verified, r.Wrong, r.Refused, r.Unexpected, r.FirstUnexpected, r.Panics,
		r.Kills+r.Pauses+r.Freezes, r.Kills, r.Pauses, r.Freezes, r.Outages, r.Reinitializations, r.ReinitFailures, r.WorstRecovery.Round(time.Millisecond), r.GoroutinesLeaked)
}

// probeTimeout is the soak provider's Config.ProbeTimeout. It also bounds
// Open through p11-kit (225 ms at worst measured on 2 loaded cores) and a
// group's wait for a healthy member's answer: 1 s leaves a margin of 4x.
const probeTimeout = time.Second

// Run runs one soak on a token it creates.
func Run(opts Options) (Result, error) {
	var res Result
	if opts.Workers <= 0 {
		opts.Workers = 8
	}
	logf := func(format string, args ...any) {
		if opts.Log != nil {
			fmt.Fprintf(opts.Log, format+"\n", args...)
		}
	}
	tok, err := softhsm.CreateToken("soak")
	if err != nil {
		return res, err
	}
	if err := tok.Generate(softhsm.P256, []byte{1}, "ec"); err != nil {
		return res, err
	}
	if err := tok.Generate(softhsm.RSA2048, []byte{2}, "rsa"); err != nil {
		return res, err
	}
	srv, err := softhsm.Serve(tok)
	if err != nil {
		return res, err
	}
	defer srv.Stop()

	goroutines := runtime.NumGoroutine()
	var outages atomic.Uint64
	p, err := hsm.Open(hsm.Config{
		Path: srv.Module(), TokenLabel: tok.Label, PIN: tok.PIN,
		MaxSessions:        1, // p11-kit 0.24's client: one call at a time (docs/modules.md)
		SessionWaitTimeout: 200 * time.Millisecond,
		ProbeInterval:      100 * time.Millisecond,
		ProbeTimeout:       probeTimeout,
		DrainTimeout:       time.Second,
		RecoveryBackoffMax: 200 * time.Millisecond,
		OnStateChange: func(c hsm.StateChange) {
			if c.From == hsm.StateHealthy && c.To == hsm.StateUnavailable {
				outages.Add(1)
			}
		},
	})
	if err != nil {
		return res, err
	}
	keys := make([]*hsm.DurableSigner, 2)
	for i, label := range []string{"ec", "rsa"} {
		if keys[i], err = p.DurableSigner(hsm.KeyRef{Label: label}); err != nil {
			p.Close()
			return res, err
		}
	}

	var (
		ops, sigs, verified, wrong, refused, unexpected, panics atomic.Uint64
		backAt                                                  atomic.Int64 // when the HSM last came back, unix nanos; 0 when recovered
		worst                                                   atomic.Int64
		firstUnexpected                                         atomic.Value
	)
	deadline := time.Now().Add(opts.Duration)
	var wg sync.WaitGroup
	for w := range opts.Workers {
		wg.Go(func() {
			defer func() {
				if recover() != nil {
					panics.Add(1)
				}
			}()
			key := keys[w%len(keys)]
			for i := 0; time.Now().Before(deadline); i++ {
				digest, opts := signInput(key, w, i)
				start := time.Now()
				ops.Add(1)
				sig, err := key.Sign(rand.Reader, digest, opts)
				switch {
				case err == nil:
					sigs.Add(1)
					if verify(key.Public(), digest, sig, opts) {
						verified.Add(1)
					} else {
						wrong.Add(1)
					}
					if b := backAt.Load(); b != 0 && start.UnixNano() >= b {
						d := time.Since(time.Unix(0, b))
						for {
							old := worst.Load()
							if int64(d) <= old || worst.CompareAndSwap(old, int64(d)) {
								break
							}
						}
						backAt.CompareAndSwap(b, 0)
					}
				case errors.Is(err, hsm.ErrUnavailable), errors.Is(err, hsm.ErrBusy), errors.Is(err, hsm.ErrDeviceLost):
					refused.Add(1)
					time.Sleep(time.Millisecond)
				default:
					unexpected.Add(1)
					firstUnexpected.CompareAndSwap(nil, err.Error())
					time.Sleep(time.Millisecond)
				}
			}
		})
	}

	// The chaos: outages at random times, each followed by the HSM's
	// return; the kinds in turn, from a random first one.
	for kind := mrand.IntN(3); time.Now().Add(opts.OutageEvery / 2).Before(deadline); kind++ {
		time.Sleep(opts.OutageEvery/2 + mrand.N(opts.OutageEvery))
		if !time.Now().Add(300 * time.Millisecond).Before(deadline) {
			break
		}
		down := 50*time.Millisecond + mrand.N(250*time.Millisecond)
		switch kind % 3 {
		case 0:
			res.Kills++
			if err := srv.Kill(); err != nil {
				return res, err
			}
			logf("kill    (down %v)", down)
			time.Sleep(down)
			if err := srv.Restart(); err != nil {
				return res, err
			}
		case 1:
			res.Pauses++
			logf("pause   (down %v)", down)
			srv.Pause()
			time.Sleep(down)
			srv.Resume()
		case 2:
			// Back, but frozen for longer than ProbeTimeout: the
			// re-initialization that the next signature starts gets stuck
			// in C_Initialize, fails with ErrHung, and its retries fail
			// fast until the HSM answers.
			res.Freezes++
			down += probeTimeout
			if err := srv.Kill(); err != nil {
				return res, err
			}
			if err := srv.Restart(); err != nil {
				return res, err
			}
			srv.Pause()
			logf("freeze  (restarted frozen, down %v)", down)
			time.Sleep(down)
			srv.Resume()
		}
		backAt.Store(time.Now().UnixNano())
	}
	wg.Wait()

	// The HSM is up: the provider must end healthy.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.WaitHealthy(ctx); err != nil {
		p.Close()
		return res, fmt.Errorf("not healthy after the soak: %w", err)
	}
	res.Reinitializations = p.Stats().Reinitializations
	res.ReinitFailures = p.Stats().ReinitializationFailures
	if err := p.Close(); err != nil {
		return res, err
	}
	settle := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > goroutines && time.Now().Before(settle) {
		time.Sleep(10 * time.Millisecond)
	}
	res.GoroutinesLeaked = max(0, runtime.NumGoroutine()-goroutines)
	res.Operations, res.Signatures, res.Verified = ops.Load(), sigs.Load(), verified.Load()
	res.Wrong, res.Refused, res.Unexpected, res.Panics = wrong.Load(), refused.Load(), unexpected.Load(), panics.Load()
	res.Outages = outages.Load()
	res.WorstRecovery = time.Duration(worst.Load())
	if s, ok := firstUnexpected.Load().(string); ok {
		res.FirstUnexpected = "(first: " + s + ")"
	}
	return res, nil
}

// signInput is worker w's i-th digest and options for key: SHA-256, and
// for an RSA key PSS every other time.
func signInput(key crypto.Signer, w, i int) ([]byte, crypto.SignerOpts) {
	digest := sha256.Sum256(fmt.Appendf(nil, "worker %d message %d", w, i))
	if _, ok := key.Public().(*rsa.PublicKey); ok && i%2 == 1 {
		return digest[:], &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthEqualsHash}
	}
	return digest[:], crypto.SHA256
}

func verify(pub crypto.PublicKey, digest, sig []byte, opts crypto.SignerOpts) bool {
	switch pub := pub.(type) {
	case *ecdsa.PublicKey:
		return ecdsa.VerifyASN1(pub, digest, sig)
	case *rsa.PublicKey:
		if pss, ok := opts.(*rsa.PSSOptions); ok {
			return rsa.VerifyPSS(pub, crypto.SHA256, digest, sig, pss) == nil
		}
		return rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest, sig) == nil
	}
	return false
}
