package stepkms

import (
	"context"
	"crypto/subtle"
	"fmt"
	"log/slog"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ce46d8f2/hsm"
)

// KMSes of one configuration share one hsm.Provider, with a count of
// references: step-ca's reload (SIGHUP) opens the new configuration's KMS
// before it closes the old one, and the two then use one Provider, its
// keys and its sessions. The first New of a configuration opens the
// Provider, every New of the same configuration takes a reference to it,
// and the last Close closes it. A New of another configuration of the
// module (another token of it, other settings) opens a Provider of its
// own, which shares the module with the others (see hsm.Open): one
// C_Initialize, and one re-initialization for all of them on an outage.
var registry = struct {
	sync.Mutex // protects following fields
	// open holds the shared providers, by module path (canonical).
	open map[string][]*share
	// closing holds, by module path, a channel closed when the Close of the
	// module's last provider has returned, so that a New waits for it
	// instead of failing with hsm.ErrModuleInUse.
	closing map[string]chan struct{}
}{open: map[string][]*share{}, closing: map[string]chan struct{}{}}

// share is a Provider and the KMSes that use it.
type share struct {
	module string     // the registry's key
	cfg    hsm.Config // the configuration it was opened with
	p      *hsm.Provider
	refs   int // open KMSes (handles) of it; guarded by registry
}

// handle is one KMS's reference to its share. It is apart from the KMS so
// that a cleanup of the KMS (see dropped) can release it.
type handle struct {
	s      *share
	closed atomic.Bool
}

// acquire returns a handle on a provider of cfg's module: the shared one
// when one is open with the same configuration, a new one otherwise. ctx
// bounds the wait for a Close of the module's last provider in progress
// (itself bounded by that provider's Close).
func acquire(ctx context.Context, cfg hsm.Config) (*handle, error) {
	module := canonical(cfg.Path)
	for {
		registry.Lock()
		ch := registry.closing[module]
		if ch == nil {
			break
		}
		registry.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, &opError{op: "open", msg: "waiting for the module's last KMS to close: " + ctx.Err().Error(), causes: []error{ctx.Err()}}
		}
	}
	defer registry.Unlock()
	for _, s := range registry.open[module] {
		if s.p.State() == hsm.StateClosed {
			// Closed through Provider().Close(): its KMSes are closed too.
			registry.open[module] = slices.DeleteFunc(registry.open[module], func(o *share) bool { return o == s })
			continue
		}
		if len(differences(s.cfg, cfg)) == 0 {
			s.refs++
			return &handle{s: s}, nil
		}
	}
	// hsm.Open is bounded by cfg.ProbeTimeout. Another token of the module,
	// or the same token with other settings: a Provider of its own on the
	// module (the same token with another PIN is refused, without a login
	// attempt: hsm.ErrPIN).
	p, err := hsm.Open(cfg)
	if err != nil {
		return nil, &opError{op: "open", msg: err.Error(), causes: []error{err}}
	}
	s := &share{module: module, cfg: cfg, p: p, refs: 1}
	registry.open[module] = append(registry.open[module], s)
	return &handle{s: s}, nil
}

// release gives back h's reference; the last one closes the provider.
func (h *handle) release() error {
	s := h.s
	registry.Lock()
	if s.refs--; s.refs > 0 {
		registry.Unlock()
		return nil
	}
	registry.open[s.module] = slices.DeleteFunc(registry.open[s.module], func(o *share) bool { return o == s })
	if len(registry.open[s.module]) > 0 {
		// Other Providers of the module stay open: the module stays up, and
		// a New of it need not wait for this Close.
		registry.Unlock()
		if err := s.p.Close(); err != nil {
			return &opError{op: "close", msg: err.Error(), causes: []error{err}}
		}
		return nil
	}
	delete(registry.open, s.module)
	ch := make(chan struct{})
	registry.closing[s.module] = ch
	registry.Unlock()

	err := s.p.Close() // bounded: DrainTimeout + ProbeTimeout

	registry.Lock()
	if registry.closing[s.module] == ch {
		delete(registry.closing, s.module)
	}
	close(ch)
	registry.Unlock()
	if err != nil {
		return &opError{op: "close", msg: err.Error(), causes: []error{err}}
	}
	return nil
}

// dropped is the cleanup of a KMS that became unreachable: it, and every
// signer and decrypter it made, can no longer be used, so a reference it
// still holds (Close was not called) is given back. step-ca does not close
// the KMS of a configuration whose authority failed to initialize after the
// KMS opened (a key name not found in a reloaded ca.json): without this,
// its reference would keep the provider open, and its configuration
// claimed, until the process ends. The closing, when it is the last
// reference, runs in a goroutine of its own, bounded by the provider's
// Close: a cleanup must not block.
func dropped(h *handle) {
	if !h.closed.CompareAndSwap(false, true) {
		return
	}
	log := h.s.cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log.Warn("stepkms: a KMS was dropped without Close; its reference to the provider is released", "module", h.s.module)
	go func() {
		if err := h.release(); err != nil {
			log.Warn("stepkms: closing the provider of a KMS dropped without Close", "module", h.s.module, "err", err)
		}
	}()
}

// track arranges for dropped to run when k becomes unreachable.
func track(k *KMS) {
	runtime.AddCleanup(k, dropped, k.h)
}

// canonical returns the module path as hsm keys its modules: absolute,
// symbolic links resolved; the path as given when that fails (hsm.Open
// then fails too).
func canonical(path string) string {
	abs, err := filepath.Abs(path)
	if err == nil {
		abs, err = filepath.EvalSymlinks(abs)
	}
	if err != nil {
		return path
	}
	return abs
}

// differences lists what differs between the configuration a provider was
// opened with (a) and the one asked for (b), in words, without the PIN and
// the initialization arguments. Every field of hsm.Config counts but the
// module path (the same, canonical) and the Logger (the first KMS's is
// kept); a configuration with an OnStateChange callback, which cannot be
// compared, is never shared.
func differences(a, b hsm.Config) []string {
	var diff []string
	add := func(name string, open, asked any) {
		diff = append(diff, fmt.Sprintf("%s %v open, %v asked", name, open, asked))
	}
	if sa, sb := selector(a), selector(b); sa != sb {
		add("token", sa, sb)
	}
	if subtle.ConstantTimeCompare([]byte(a.PIN), []byte(b.PIN)) != 1 {
		diff = append(diff, "another PIN")
	}
	if a.InitArgs != b.InitArgs {
		diff = append(diff, "other init args")
	}
	if a.NoLogin != b.NoLogin {
		add("no login", a.NoLogin, b.NoLogin)
	}
	if a.UserType != b.UserType {
		add("user type", a.UserType, b.UserType)
	}
	if a.MaxSessions != b.MaxSessions {
		add("max-sessions", sessions(a.MaxSessions), sessions(b.MaxSessions))
	}
	for _, d := range []struct {
		name string
		a, b time.Duration
	}{
		{"session wait timeout", a.SessionWaitTimeout, b.SessionWaitTimeout},
		{"drain timeout", a.DrainTimeout, b.DrainTimeout},
		{"probe interval", a.ProbeInterval, b.ProbeInterval},
		{"probe timeout", a.ProbeTimeout, b.ProbeTimeout},
		{"recovery backoff min", a.RecoveryBackoffMin, b.RecoveryBackoffMin},
		{"recovery backoff max", a.RecoveryBackoffMax, b.RecoveryBackoffMax},
	} {
		if d.a != d.b {
			add(d.name, d.a, d.b)
		}
	}
	if a.DisableAutoRecovery != b.DisableAutoRecovery {
		add("auto recovery disabled", a.DisableAutoRecovery, b.DisableAutoRecovery)
	}
	if a.OnStateChange != nil || b.OnStateChange != nil {
		diff = append(diff, "an OnStateChange callback (a provider with one is not shared)")
	}
	return diff
}

// selector names the token a configuration selects.
func selector(c hsm.Config) string {
	switch {
	case c.TokenLabel != "":
		return "label " + strconv.Quote(c.TokenLabel)
	case c.TokenSerial != "":
		return "serial " + strconv.Quote(c.TokenSerial)
	case c.SlotNumber != nil:
		return "slot-id " + strconv.Itoa(*c.SlotNumber)
	}
	return "none"
}

func sessions(n int) string {
	if n == 0 {
		return "default"
	}
	return strconv.Itoa(n)
}
