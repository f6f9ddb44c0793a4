package soak

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"fmt"
	mrand "math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/internal/softhsm"
)

// GroupResult is what a group soak observed.
type GroupResult struct {
	Members           int
	Operations        uint64 // signatures attempted
	Verified          uint64 // returned and verified under the group's public key
	Wrong             uint64 // returned but not verifying: must be 0
	Failed            uint64 // any error: must be 0 while a member lives
	Panics            uint64 // must be 0
	Kills, Pauses     int    // outages caused
	Freezes           int    // of them, HSM restarted frozen
	MostDown          int    // members down at once, at most Members-1
	Failovers         uint64 // operations repeated on another member
	Reinitializations uint64 // over all members
	Shares            []uint64
	GoroutinesLeaked  int // must be 0
	FirstError        string
}

// OK reports whether the result holds every promise.
func (r GroupResult) OK() bool {
	return r.Wrong == 0 && r.Failed == 0 && r.Panics == 0 && r.GoroutinesLeaked == 0 &&
		r.Verified == r.Operations && r.Operations > 0 && r.MostDown < r.Members
}

// String is the report printed by hsmcheck soak -members.
func (r GroupResult) String() string {
	return fmt.Sprintf(`members               %d
operations            %d
signatures verified   %d
wrong signatures      %d
failed operations     %d %s
panics                %d
outages caused        %d (%d kills, %d pauses, %d restarted frozen); at most %d members down at once
failovers             %d
re-initializations    %d
operations by member  %v
goroutines leaked     %d`,
		r.Members, r.Operations, r.Verified, r.Wrong, r.Failed, r.FirstError, r.Panics,
		r.Kills+r.Pauses+r.Freezes, r.Kills, r.Pauses, r.Freezes, r.MostDown, r.Failovers, r.Reinitializations, r.Shares, r.GoroutinesLeaked)
}

// RunGroup runs a soak of an hsm.Group of members (at least 2) SoftHSM
// tokens holding the same EC and RSA keys, each behind a p11-kit server of
// its own: workers sign through the group while each member's HSM is, at
// random times, killed and restarted, paused and resumed, or restarted
// frozen, with at least one member up at all times. No signature may fail.
func RunGroup(opts Options, members int) (GroupResult, error) {
	res := GroupResult{Members: members}
	if members < 2 {
		return res, fmt.Errorf("soak: a group soak needs at least 2 members, not %d", members)
	}
	if opts.Workers <= 0 {
		opts.Workers = 8
	}
	var logMu sync.Mutex // the members' chaos goroutines log concurrently
	logf := func(format string, args ...any) {
		if opts.Log != nil {
			logMu.Lock()
			defer logMu.Unlock()
			fmt.Fprintf(opts.Log, format+"\n", args...)
		}
	}
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return res, err
	}
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return res, err
	}
	srvs := make([]*softhsm.Server, members)
	cfgs := make([]hsm.Config, members)
	for i := range members {
		tok, err := softhsm.CreateToken(fmt.Sprintf("gsoak%d", i))
		if err != nil {
			return res, err
		}
		if err := tok.Import(ec, []byte{1}, "ec"); err != nil {
			return res, err
		}
		if err := tok.Import(rk, []byte{2}, "rsa"); err != nil {
			return res, err
		}
		if srvs[i], err = softhsm.ServeOwn(tok); err != nil {
			return res, err
		}
		defer srvs[i].Stop()
		cfgs[i] = hsm.Config{
			Path: srvs[i].Module(), TokenLabel: tok.Label, PIN: tok.PIN,
			MaxSessions: 1, // p11-kit 0.24's client: one call at a time (docs/modules.md)
			// With two members down, the one left serves every worker
			// through its one session: a wait of 2 s, as the group tests give.
			SessionWaitTimeout: 2 * time.Second,
			ProbeInterval:      100 * time.Millisecond,
			ProbeTimeout:       probeTimeout,
			DrainTimeout:       time.Second,
			RecoveryBackoffMax: 200 * time.Millisecond,
		}
	}
	goroutines := runtime.NumGoroutine() // with the servers' own
	g, err := hsm.OpenGroup(cfgs...)
	if err != nil {
		return res, err
	}
	keys := make([]*hsm.GroupSigner, 2)
	for i, label := range []string{"ec", "rsa"} {
		if keys[i], err = g.Signer(hsm.KeyRef{Label: label}); err != nil {
			g.Close()
			return res, err
		}
	}

	var (
		ops, verified, wrong, failed, panics atomic.Uint64
		firstErr                             atomic.Value
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
				digest, so := signInput(key, w, i)
				ops.Add(1)
				sig, err := key.Sign(rand.Reader, digest, so)
				switch {
				case err != nil:
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					time.Sleep(time.Millisecond)
				case verify(key.Public(), digest, sig, so):
					verified.Add(1)
				default:
					wrong.Add(1)
				}
			}
		})
	}

	// The chaos: one goroutine per member, each taking its member down at
	// random times unless that would leave no member up. A member counts
	// as down from its outage until it is healthy again.
	var mu sync.Mutex
	down := 0
	var chaos sync.WaitGroup
	var chaosErr error
	for i, srv := range srvs {
		chaos.Go(func() {
			for kind := mrand.IntN(3); ; kind++ {
				time.Sleep(opts.OutageEvery/2 + mrand.N(opts.OutageEvery))
				if !time.Now().Add(500 * time.Millisecond).Before(deadline) {
					return
				}
				mu.Lock()
				if down+1 >= members {
					mu.Unlock()
					continue
				}
				down++
				res.MostDown = max(res.MostDown, down)
				switch kind % 3 {
				case 0:
					res.Kills++
				case 1:
					res.Pauses++
				case 2:
					res.Freezes++
				}
				mu.Unlock()
				d := 50*time.Millisecond + mrand.N(400*time.Millisecond)
				var err error
				switch kind % 3 {
				case 0:
					logf("member %d: kill    (down %v)", i, d)
					if err = srv.Kill(); err == nil {
						time.Sleep(d)
						err = srv.Restart()
					}
				case 1:
					logf("member %d: pause   (down %v)", i, d)
					srv.Pause()
					time.Sleep(d)
					srv.Resume()
				case 2:
					d += probeTimeout
					logf("member %d: freeze  (restarted frozen, down %v)", i, d)
					if err = srv.Kill(); err == nil {
						if err = srv.Restart(); err == nil {
							srv.Pause()
							time.Sleep(d)
							srv.Resume()
						}
					}
				}
				if err == nil {
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					if werr := g.Members()[i].WaitHealthy(ctx); werr != nil {
						mp := g.Members()[i]
						err = fmt.Errorf("member %d not healthy 10s after its HSM came back: %w; state %v, last error %v, %d failed re-initializations",
							i, werr, mp.State(), mp.LastError(), mp.Stats().ReinitializationFailures)
					}
					cancel()
				}
				mu.Lock()
				down--
				if err != nil && chaosErr == nil {
					chaosErr = err
				}
				mu.Unlock()
				if err != nil {
					return
				}
			}
		})
	}
	chaos.Wait()
	wg.Wait()
	if chaosErr != nil {
		g.Close()
		return res, chaosErr
	}
	st := g.Stats()
	res.Failovers = st.Failovers
	for _, m := range st.Members {
		res.Reinitializations += m.Stats.Reinitializations
		res.Shares = append(res.Shares, m.Operations)
	}
	if err := g.Close(); err != nil {
		return res, err
	}
	settle := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > goroutines && time.Now().Before(settle) {
		time.Sleep(10 * time.Millisecond)
	}
	res.GoroutinesLeaked = max(0, runtime.NumGoroutine()-goroutines)
	res.Operations, res.Verified, res.Wrong = ops.Load(), verified.Load(), wrong.Load()
	res.Failed, res.Panics = failed.Load(), panics.Load()
	if s, ok := firstErr.Load().(string); ok {
		res.FirstError = "(first: " + s + ")"
	}
	return res, nil
}
