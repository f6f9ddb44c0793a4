package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	cryptorand "crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"
)

// A Group is one key on several HSMs: members that each hold the same key
// under the same reference, such as the partitions of HSMs without vendor
// HA (YubiHSM 2, NetHSM, separate Luna partitions or clusters) or SoftHSM
// tokens. Every member is a Provider of its own, with its own generation,
// health probing and automatic recovery. The Group's keys spread
// operations across the healthy members and, when one fails because of its
// HSM (device lost, unavailable, busy, not answering), repeat the
// operation on another: signing and decrypting are safe to repeat. The
// caller sees an error only when no member could do it, or for a caller
// error (bad input), which is never repeated.
//
// Safe for concurrent use.
type Group struct {
	members []*member
	log     *slog.Logger

	// Counters over the group's life, read by Stats.
	ops, failovers, failed atomic.Uint64
	// isShut is closed, readable without mu: every operation looks at it.
	isShut atomic.Bool
	// events is GroupConfig.OnStateChange's notifier, or nil; set before
	// ready.
	events *notifier[GroupStateChange]

	mu     sync.Mutex // protects following fields
	state  GroupState
	since  time.Time
	ready  bool // every member's Provider is set: the members' callbacks may look at them
	closed bool // also in isShut, for the operations' path
}

// member is one Provider of a Group.
type member struct {
	index int
	p     *Provider
	// down is the error that kept the member from opening at OpenGroup,
	// or nil.
	down error
	// inFlight is the number of the group's operations on the member now,
	// including ones abandoned while they hang; ops and failovers count the
	// operations given to it and those that failed on it and were repeated
	// on another member.
	inFlight       atomic.Int64
	ops, failovers atomic.Uint64

	mu       sync.Mutex // protects following fields
	excluded []KeyRef   // keys this member holds another key under
}

// GroupState is the health of a Group as a whole.
type GroupState uint32

// Group states.
const (
	// GroupHealthy: every member is healthy.
	GroupHealthy GroupState = iota
	// GroupDegraded: some members are healthy, not all: operations go to
	// those, and the others recover on their own.
	GroupDegraded
	// GroupUnavailable: no member is healthy: operations fail fast with
	// ErrUnavailable.
	GroupUnavailable
	// GroupClosed: Close was called.
	GroupClosed
)

func (s GroupState) String() string {
	switch s {
	case GroupHealthy:
		return "healthy"
	case GroupDegraded:
		return "degraded"
	case GroupUnavailable:
		return "unavailable"
	case GroupClosed:
		return "closed"
	}
	return fmt.Sprintf("GroupState(%d)", uint32(s))
}

// GroupStateChange is delivered to GroupConfig.OnStateChange.
type GroupStateChange struct {
	From, To GroupState
	// Healthy is the number of healthy members after the change, out of
	// Members.
	Healthy, Members int
	At               time.Time
}

// GroupConfig configures OpenGroupConfig.
type GroupConfig struct {
	// Members are the members' configurations, in order: each opens a
	// Provider of its own, with a module of its own (a PKCS#11 module is
	// opened once per process). A member's OnStateChange still runs.
	Members []Config
	// Logger receives the group's own records: members that cannot open
	// or hold another key, state changes. Nil: the first member's Logger,
	// or none.
	Logger *slog.Logger
	// OnStateChange, if set, is called after each change of the group's
	// state, in order, from a goroutine of the group, never under a lock
	// (it may call the group, Close included). A slow callback does not
	// slow the group: up to 256 changes wait for it, and when more come the
	// oldest waiting one is dropped (and counted in
	// GroupStats.EventsDropped), so that the last change delivered is the
	// latest. Close delivers the changes queued before it, GroupClosed
	// last, and waits for the callback within its own bound, except when
	// called from inside it (see Group.Close).
	OnStateChange func(GroupStateChange)
}

// maxMembers bounds a group's size: an operation tracks the members it has
// tried in one word.
const maxMembers = 64

// OpenGroup opens a Group of the members, as OpenGroupConfig does.
func OpenGroup(members ...Config) (*Group, error) {
	return OpenGroupConfig(GroupConfig{Members: members})
}

// OpenGroupConfig opens every member, concurrently, and returns the Group
// once each has opened or failed (each Open is bounded by its member's
// ProbeTimeout).
//
// It succeeds when at least one member opens. A member whose HSM is down,
// not answering or without the token stays in Members as a Provider in
// StateUnavailable, and joins when its automatic recovery brings it up (so
// it needs auto recovery, the default). A member whose PIN is refused stays
// in StateFailed and is never used. Either is logged, and shown in Stats
// (the member's State and LastError, and MemberStats.OpenError).
//
// It fails, and closes what it opened, when no member opens, and at once,
// opening nothing, for a configuration error in any member (an invalid
// Config, a module that cannot be loaded, two members with one module, a
// module another Provider holds): those never cure themselves.
func OpenGroupConfig(gc GroupConfig) (*Group, error) {
	const op = "open group"
	n := len(gc.Members)
	switch {
	case n == 0:
		return nil, opErr(op, 0, ErrConfig, "no members")
	case n > maxMembers:
		return nil, opErr(op, 0, ErrConfig, "%d members; at most %d", n, maxMembers)
	}
	paths := make(map[string]int, n)
	for i, cfg := range gc.Members {
		if err := cfg.validate(); err != nil {
			return nil, &Error{Op: op, Err: causedBy(wrapf(ErrConfig, "member %d", i), err)}
		}
		abs, err := filepath.Abs(cfg.Path)
		if err == nil {
			abs, err = filepath.EvalSymlinks(abs)
		}
		if err != nil {
			return nil, &Error{Op: op, Err: causedBy(wrapf(ErrConfig, "member %d: module %q", i, cfg.Path), err)}
		}
		if j, dup := paths[abs]; dup {
			return nil, opErr(op, 0, ErrConfig, "members %d and %d both use the module %s: a PKCS#11 module is initialized once per process, so each member needs a module of its own", j, i, abs)
		}
		paths[abs] = i
	}
	g := &Group{members: make([]*member, n), log: gc.Logger, since: time.Now()}
	if g.log == nil {
		g.log = gc.Members[0].Logger
	}
	if g.log == nil {
		g.log = slog.New(slog.DiscardHandler)
	}
	for i := range g.members {
		g.members[i] = &member{index: i}
	}
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, cfg := range gc.Members {
		m := g.members[i]
		user := cfg.OnStateChange
		cfg.OnStateChange = func(c StateChange) {
			g.update()
			if user != nil {
				user(c)
			}
		}
		wg.Go(func() {
			if m.p, errs[i] = open(cfg, true); m.p != nil {
				m.down = m.p.openErr
			}
		})
	}
	wg.Wait()

	var opened int
	var bad, down []error
	for i, m := range g.members {
		switch {
		case errs[i] != nil:
			bad = append(bad, fmt.Errorf("member %d: %w", i, errs[i]))
		case m.down != nil:
			down = append(down, fmt.Errorf("member %d: %w", i, m.down))
		default:
			opened++
		}
	}
	if len(bad) > 0 || opened == 0 {
		// An error no retry cures, or no member opened: close the others.
		refused := false
		for _, m := range g.members {
			refused = refused || (m.p != nil && m.p.State() == StateFailed)
		}
		var wg sync.WaitGroup
		for _, m := range g.members {
			if m.p != nil {
				wg.Go(func() { _ = m.p.Close() })
			}
		}
		wg.Wait()
		if len(bad) > 0 {
			return nil, &Error{Op: op, Err: errors.Join(bad...)}
		}
		if refused {
			// A PIN refused (or another token): not ErrUnavailable, so
			// that a loop retrying OpenGroup while the HSMs come up does
			// not send a wrong PIN again and lock the token.
			return nil, &Error{Op: op, Err: wrapf(errors.Join(down...), "none of the %d members opened", n)}
		}
		return nil, &Error{Op: op, Err: causedBy(wrapf(ErrUnavailable, "none of the %d members opened", n), errors.Join(down...))}
	}
	for _, m := range g.members {
		if m.down != nil {
			g.log.Warn("hsm: group member did not open; it joins when its HSM answers", "member", m.index, "module", gc.Members[m.index].Path, "state", m.p.State(), "err", m.down)
		}
	}
	g.events = newNotifier(gc.OnStateChange)
	g.events.start()
	g.mu.Lock()
	g.state, _ = g.compute()
	g.ready = true
	g.mu.Unlock()
	g.update() // a member may have changed since
	return g, nil
}

// Members returns the members' Providers, in the order given to OpenGroup,
// including those that did not open (see OpenGroupConfig). Closing one
// takes it out of the group for good.
func (g *Group) Members() []*Provider {
	if g == nil {
		return nil
	}
	out := make([]*Provider, len(g.members))
	for i, m := range g.members {
		out[i] = m.p
	}
	return out
}

// compute returns the group's state from its members' and the number of
// healthy members.
func (g *Group) compute() (GroupState, int) {
	healthy := 0
	for _, m := range g.members {
		if m.p != nil && m.p.State() == StateHealthy {
			healthy++
		}
	}
	switch {
	case healthy == 0:
		return GroupUnavailable, 0
	case healthy == len(g.members):
		return GroupHealthy, healthy
	}
	return GroupDegraded, healthy
}

// update recomputes the group's state after a member's change (from the
// member's notifier) and announces a change.
func (g *Group) update() {
	g.mu.Lock()
	if g.closed || !g.ready {
		g.mu.Unlock()
		return
	}
	to, healthy := g.compute()
	from := g.state
	if to == from {
		g.mu.Unlock()
		return
	}
	g.state, g.since = to, time.Now()
	g.events.send(GroupStateChange{From: from, To: to, Healthy: healthy, Members: len(g.members), At: g.since})
	g.mu.Unlock()
	switch to {
	case GroupHealthy:
		g.log.Info("hsm: group healthy", "members", len(g.members))
	case GroupDegraded:
		g.log.Warn("hsm: group degraded", "healthy", healthy, "members", len(g.members))
	case GroupUnavailable:
		g.log.Error("hsm: group unavailable: no member is healthy", "members", len(g.members))
	}
}

// State returns the group's state, from its members' states now.
func (g *Group) State() GroupState {
	if g == nil {
		return GroupClosed
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return GroupClosed
	}
	st, _ := g.compute()
	return st
}

// Close closes every member, concurrently, and returns their errors
// joined; each Close is bounded as Provider.Close is. Keys of the group
// fail with ErrClosed after it. When the group has an OnStateChange
// callback, Close delivers the changes queued before it, the change to
// GroupClosed last, and waits for the callback to return, except when
// called from inside it: then it does not wait for its caller, and no
// callback starts after that one. Close returns within the largest of the
// members' DrainTimeout plus ProbeTimeout, whatever the HSMs and the
// callbacks do (the members' and the group's). Calling it again returns
// nil.
func (g *Group) Close() error {
	if g == nil {
		return nil
	}
	start := time.Now()
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return nil
	}
	from := g.state
	g.closed, g.state, g.since = true, GroupClosed, time.Now()
	g.isShut.Store(true)
	g.events.send(GroupStateChange{From: from, To: GroupClosed, Members: len(g.members), At: g.since})
	g.events.close()
	g.mu.Unlock()

	errs := make([]error, len(g.members))
	closeMember := func(i int, m *member) {
		if err := m.p.Close(); err != nil {
			errs[i] = fmt.Errorf("member %d: %w", i, err)
		}
	}
	// here is the member whose OnStateChange called Close, if any: it is
	// closed here, in its callback's goroutine, so that its Close knows.
	here := -1
	var bound time.Duration
	for i, m := range g.members {
		if here < 0 && m.p.health.events.inCallback() {
			here = i
		}
		bound = max(bound, m.p.cfg.closeBound())
	}
	var wg sync.WaitGroup
	for i, m := range g.members {
		if i != here {
			wg.Go(func() { closeMember(i, m) })
		}
	}
	if here >= 0 {
		closeMember(here, g.members[here])
	}
	wg.Wait()
	g.events.wait(start.Add(bound))
	return errors.Join(errs...)
}

// GroupStats is a snapshot of a group's health and activity.
type GroupStats struct {
	State GroupState
	// Since is when the state last changed.
	Since time.Time
	// Healthy is the number of healthy members.
	Healthy int
	// Operations counts the operations of the group's keys; Failovers
	// those repeated on another member after failing on one (once per
	// repetition); Failed those that failed for want of a member, not for
	// bad input.
	Operations, Failovers, Failed uint64
	// EventsDropped counts group state changes not delivered to
	// OnStateChange because it fell behind.
	EventsDropped uint64
	Members       []MemberStats
}

// MemberStats is one member's part of GroupStats.
type MemberStats struct {
	// Stats are the member's own, as Provider.Stats returns them.
	Stats Stats
	// Operations counts the group's operations given to the member;
	// Failovers those that failed on it and were repeated on another.
	Operations, Failovers uint64
	// InFlight is the number of the group's operations on the member now,
	// including any abandoned while its HSM did not answer.
	InFlight int64
	// OpenError is why the member did not open at OpenGroup, or nil.
	OpenError error
	// Excluded lists the keys (as the group's callers named them) for which
	// the member holds another key than the group's: it is never used for
	// them.
	Excluded []KeyRef
}

// Stats returns a snapshot of the group and of each member. It makes no
// PKCS#11 call.
func (g *Group) Stats() GroupStats {
	if g == nil {
		return GroupStats{State: GroupClosed}
	}
	g.mu.Lock()
	s := GroupStats{State: g.state, Since: g.since}
	if !g.closed {
		s.State, s.Healthy = g.compute()
	}
	g.mu.Unlock()
	s.Operations, s.Failovers, s.Failed = g.ops.Load(), g.failovers.Load(), g.failed.Load()
	s.EventsDropped = g.events.droppedCount()
	s.Members = make([]MemberStats, len(g.members))
	for i, m := range g.members {
		ms := MemberStats{Stats: m.p.Stats(), Operations: m.ops.Load(), Failovers: m.failovers.Load(),
			InFlight: m.inFlight.Load(), OpenError: m.down}
		m.mu.Lock()
		ms.Excluded = append([]KeyRef(nil), m.excluded...)
		m.mu.Unlock()
		s.Members[i] = ms
	}
	return s
}

// groupKey is a key of a group: the key under ref on each member, all with
// the public key pinned when the group's key was made.
type groupKey struct {
	g       *Group
	ref     KeyRef
	decrypt bool
	pub     crypto.PublicKey // written by newKey only, before the key is shared
	pinned  string           // hex of the first 8 bytes of the SHA-256 of pub, for messages
	at      []memberKey
	rr      atomic.Uint64 // round robin among equally loaded members

	closed, none error // prebuilt refusals
}

// memberKey is a group key on one member.
type memberKey struct {
	d atomic.Pointer[durable] // bound, with the group's public key
	// binding is set while a lookup of the key on the member runs (it may
	// outlive the caller that started it, when the HSM stops answering):
	// pick passes the member over meanwhile.
	binding atomic.Bool

	mu sync.Mutex // protects following fields; never held across a PKCS#11 call
	// excluded is set when the member holds another key under ref: it is
	// never used for it.
	excluded error
	// failedGen and failedAt say when binding last failed (the key not on
	// the member, say): it is tried again in a later generation of the
	// member, or after rebindEvery.
	failedGen uint64
	failedAt  time.Time
	failed    bool
}

// rebindEvery is how often a member on which a group key could not be
// found is asked again within one generation.
const rebindEvery = 5 * time.Second

// newKey looks ref up on every healthy member, concurrently (each lookup
// bounded as an operation is), and pins the public key of the first member
// in order that has it; a member holding another key is excluded for it.
// Members not healthy now, or whose lookup did not finish, are bound when
// first used.
func (g *Group) newKey(ref KeyRef, decrypt bool, op string) (*groupKey, error) {
	closed := &Error{Op: op, Err: ErrClosed}
	if g == nil || len(g.members) == 0 {
		return nil, opErr(op, 0, ErrClosed, "a nil or zero hsm.Group: open one with OpenGroup")
	}
	if g.isClosed() {
		return nil, closed
	}
	k := &groupKey{g: g, ref: ref, decrypt: decrypt, at: make([]memberKey, len(g.members)), closed: closed}
	type found struct {
		d   *durable
		err error
	}
	res := make([]found, len(g.members))
	var wg sync.WaitGroup
	for i, m := range g.members {
		if m.p.State() != StateHealthy {
			res[i].err = &Error{Op: op, Err: wrapf(ErrUnavailable, "member %d is %v", i, m.p.State())}
			continue
		}
		wg.Go(func() { res[i].d, res[i].err = k.lookup(context.Background(), i) })
	}
	wg.Wait()
	var errs []error
	for i, r := range res {
		if r.err == nil && k.pub == nil {
			k.pub, k.pinned = r.d.pub, r.d.pinned
		}
		if r.err == nil {
			r.err = k.adopt(i, r.d)
		}
		if r.err != nil {
			errs = append(errs, fmt.Errorf("member %d: %w", i, r.err))
		}
	}
	if k.pub == nil {
		err := errors.Join(errs...)
		for _, target := range []error{ErrKeyNotFound, ErrAmbiguousKey, ErrUnsupportedKey, ErrKeyMismatch} {
			if errors.Is(err, target) {
				return nil, &Error{Op: op, Err: causedBy(wrapf(target, "%s on no member of the group", ref), err)}
			}
		}
		return nil, &Error{Op: op, Err: causedBy(wrapf(ErrUnavailable, "no member could find %s", ref), err)}
	}
	k.none = &Error{Op: op, Err: wrapf(ErrUnavailable, "no healthy member of the group holds %s", ref)}
	return k, nil
}

func (g *Group) isClosed() bool { return g.isShut.Load() }

// lookup finds the key on member i as a durable key of the member. The
// lookup runs in a goroutine of its own and is waited for as an operation
// is (see wait): a member that stops answering does not hold the caller,
// and is passed over (binding) until the lookup returns. A failure is
// remembered, so that the member is not asked again at every call.
func (k *groupKey) lookup(ctx context.Context, i int) (*durable, error) {
	mk, m := &k.at[i], k.g.members[i]
	if !mk.binding.CompareAndSwap(false, true) {
		return nil, &Error{Op: "bind key", Err: wrapf(ErrBusy, "member %d: a lookup of %s is still running", i, k.ref)}
	}
	gen := m.p.Generation()
	done := make(chan result, 1)
	var d *durable
	go func() {
		defer mk.binding.Store(false)
		var err error
		d, err = m.p.durable(k.ref, k.decrypt)
		done <- result{err: err}
	}()
	r := k.wait(ctx, m, "bind key", done)
	if r.err != nil {
		mk.mu.Lock()
		mk.failed, mk.failedGen, mk.failedAt = true, gen, time.Now()
		if errors.Is(r.err, ErrKeyMismatch) && mk.excluded == nil {
			// The member's private key under ref is not its public key's:
			// whatever the group pins, it is not to be trusted with it.
			k.exclude(i, mk, r.err)
		}
		mk.mu.Unlock()
		return nil, r.err
	}
	return d, nil
}

// adopt binds d, found on member i, if its public key is the pinned one,
// and excludes the member for the key otherwise.
func (k *groupKey) adopt(i int, d *durable) error {
	mk := &k.at[i]
	mk.mu.Lock()
	defer mk.mu.Unlock()
	if mk.excluded != nil {
		return mk.excluded
	}
	if eq, ok := d.pub.(interface{ Equal(crypto.PublicKey) bool }); !ok || !eq.Equal(k.pub) {
		k.exclude(i, mk, opErr("bind key", d.cur.Load().gen, ErrKeyChanged,
			"member %d holds another key under %s (SHA-256 %s..., not the group's %s...): never used for it", i, k.ref, d.pinned, k.pinned))
		return mk.excluded
	}
	mk.failed = false
	mk.d.Store(d)
	return nil
}

// bind finds and binds the key on member i, for an operation.
func (k *groupKey) bind(ctx context.Context, i int) (*durable, error) {
	d, err := k.lookup(ctx, i)
	if err != nil {
		return nil, err
	}
	if err := k.adopt(i, d); err != nil {
		return nil, err
	}
	return d, nil
}

// exclude takes member i out of the key for good. Called with mk.mu held.
func (k *groupKey) exclude(i int, mk *memberKey, err error) {
	mk.excluded = err
	mk.d.Store(nil)
	m := k.g.members[i]
	m.mu.Lock()
	m.excluded = append(m.excluded, k.ref)
	m.mu.Unlock()
	k.g.log.Error("hsm: group member holds another key: never used for it", "member", i, "key", k.ref.String(), "err", err)
}

// pick chooses the member for the next attempt: a healthy one, not yet
// tried (a bit of tried), not excluded, not in a lookup of the key, with
// the fewest operations in flight; equally loaded members take turns. It
// returns -1 when none is left.
func (k *groupKey) pick(tried uint64) int {
	n := len(k.at)
	start := int(k.rr.Add(1) % uint64(n))
	best, load := -1, int64(0)
	for o := range n {
		i := (start + o) % n
		if tried&(1<<i) != 0 {
			continue
		}
		m := k.g.members[i]
		gen, st := m.p.gate.load()
		if st != StateHealthy {
			continue
		}
		mk := &k.at[i]
		if mk.d.Load() == nil && !k.mayBind(mk, gen) {
			continue
		}
		if l := m.inFlight.Load(); best < 0 || l < load {
			best, load = i, l
		}
	}
	return best
}

// mayBind says whether binding the key on a member in generation gen may
// be tried now.
func (k *groupKey) mayBind(mk *memberKey, gen uint64) bool {
	if mk.binding.Load() {
		return false
	}
	mk.mu.Lock()
	defer mk.mu.Unlock()
	return mk.excluded == nil && (!mk.failed || mk.failedGen != gen || time.Since(mk.failedAt) >= rebindEvery)
}

// retryable says whether an operation that failed with err on one member
// may be repeated on another: yes unless the caller's input or context is
// at fault.
func retryable(err error) bool {
	switch {
	case errors.Is(err, ErrInvalidOptions), errors.Is(err, ErrDecryption), errors.Is(err, ErrUnsupportedKey),
		errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return false
	}
	if code, ok := codeOf(err); ok && classify(code) == classCaller && !isPINCode(code) {
		return false
	}
	return true
}

type result struct {
	out []byte
	err error
}

// do runs f, the operation op, on one member after another until one
// succeeds, the error is the caller's, or no member is left. f must run no
// code of the caller's (readers, options' methods): it may run on after
// do has returned.
func (k *groupKey) do(ctx context.Context, op string, f func(*key) ([]byte, error)) ([]byte, error) {
	g := k.g
	if g.isClosed() {
		return nil, k.closed
	}
	if err := ctx.Err(); err != nil {
		return nil, &Error{Op: op, Err: causedBy(ErrUnavailable, err)}
	}
	g.ops.Add(1)
	var tried uint64
	var errs []error
	var failedOn *member // the member the last attempt failed on
	for {
		i := k.pick(tried)
		if i < 0 {
			break
		}
		if err := ctx.Err(); err != nil {
			return nil, &Error{Op: op, Err: causedBy(ErrUnavailable, err)}
		}
		tried |= 1 << i
		m := g.members[i]
		if failedOn != nil { // the operation is repeated on m
			failedOn.failovers.Add(1)
			g.failovers.Add(1)
			failedOn = nil
		}
		d := k.at[i].d.Load()
		if d == nil {
			var err error
			if d, err = k.bind(ctx, i); err != nil {
				if !retryable(err) {
					return nil, err
				}
				errs = append(errs, fmt.Errorf("member %d: %w", i, err))
				continue
			}
		}
		m.ops.Add(1)
		out, err := k.attempt(ctx, i, d, op, f)
		if err == nil {
			return out, nil
		}
		if g.isClosed() {
			return nil, k.closed
		}
		if !retryable(err) {
			return nil, err
		}
		mk := &k.at[i]
		switch {
		case errors.Is(err, ErrKeyChanged):
			mk.mu.Lock()
			if mk.excluded == nil {
				k.exclude(i, mk, err)
			}
			mk.mu.Unlock()
		case errors.Is(err, ErrKeyNotFound), errors.Is(err, ErrAmbiguousKey):
			// Gone from the member since it was bound (found again by the
			// member's re-binding): ask again later, not at every call.
			mk.mu.Lock()
			mk.d.Store(nil)
			mk.failed, mk.failedGen, mk.failedAt = true, m.p.Generation(), time.Now()
			mk.mu.Unlock()
		}
		failedOn = m
		errs = append(errs, fmt.Errorf("member %d: %w", i, err))
	}
	if g.isClosed() {
		return nil, k.closed
	}
	g.failed.Add(1)
	if len(errs) == 0 {
		return nil, k.none
	}
	return nil, &Error{Op: op, Err: causedBy(wrapf(ErrUnavailable, "no member of the group could %s with %s", op, k.ref), errors.Join(errs...))}
}

// attempt runs f on member i's key d: a durable key of the member, which
// proves in each of the member's generations, before its first operation,
// that the member's private key is the pinned one (a member that fails is
// excluded, by do, on ErrKeyChanged). The call runs in a goroutine of its own and is waited for as wait says.
// An abandoned call keeps its place in the member's inFlight until the
// module returns it.
func (k *groupKey) attempt(ctx context.Context, i int, d *durable, op string, f func(*key) ([]byte, error)) ([]byte, error) {
	m := k.g.members[i]
	m.inFlight.Add(1)
	done := make(chan result, 1)
	go func() {
		defer m.inFlight.Add(-1)
		out, err := d.do(context.Background(), false, op, f)
		done <- result{out, err}
	}()
	r := k.wait(ctx, m, op, done)
	return r.out, r.err
}

// wait waits for the result of a call on member m: until it comes, the
// member stops being healthy (its watchdog saw it hang, or it was lost),
// the member's ProbeTimeout has passed, or ctx ends. A result that is
// there is preferred to any of those.
func (k *groupKey) wait(ctx context.Context, m *member, op string, done <-chan result) result {
	t := time.NewTimer(m.p.cfg.ProbeTimeout)
	defer t.Stop()
	for {
		changed := m.p.changes()
		select {
		case r := <-done:
			return r
		default:
		}
		if _, st := m.p.gate.load(); st != StateHealthy {
			return result{err: &Error{Op: op, Generation: m.p.Generation(),
				Err: causedBy(wrapf(ErrUnavailable, "member %d became %v during the call", m.index, st), m.p.LastError())}}
		}
		select {
		case r := <-done:
			return r
		case <-changed:
		case <-t.C:
			select {
			case r := <-done:
				return r
			default:
			}
			return result{err: &Error{Op: op, Generation: m.p.Generation(),
				Err: wrapf(ErrHung, "member %d did not answer in %v (its ProbeTimeout)", m.index, m.p.cfg.ProbeTimeout)}}
		case <-ctx.Done():
			select {
			case r := <-done:
				return r
			default:
			}
			return result{err: &Error{Op: op, Generation: m.p.Generation(), Err: causedBy(ErrUnavailable, ctx.Err())}}
		}
	}
}

// GroupSigner is a group's private key as a crypto.Signer. Safe for
// concurrent use.
type GroupSigner struct{ k *groupKey }

// Signer finds ref on the group's healthy members, as Provider.Signer
// does, and pins the public key of the first member (in the order given
// to OpenGroup) that has it; a member that holds another key under ref is
// excluded for it (logged, and listed in MemberStats.Excluded), and never
// used. Members not healthy now are checked when they are first used. It
// fails with ErrKeyNotFound when no member that answered has the key, and
// with ErrUnavailable when none answered.
func (g *Group) Signer(ref KeyRef) (*GroupSigner, error) {
	k, err := g.newKey(ref, false, "group signer")
	if err != nil {
		return nil, err
	}
	return &GroupSigner{k}, nil
}

// Public returns the pinned public key. It makes no PKCS#11 call.
func (s *GroupSigner) Public() crypto.PublicKey {
	if s == nil || s.k == nil {
		return nil
	}
	return s.k.pub
}

// KeyRef returns the reference the key was asked for with.
func (s *GroupSigner) KeyRef() KeyRef {
	if s == nil || s.k == nil {
		return KeyRef{}
	}
	return s.k.ref
}

// String describes the key without secrets.
func (s *GroupSigner) String() string {
	if s == nil || s.k == nil {
		return "hsm.GroupSigner{no key}"
	}
	return fmt.Sprintf("hsm.GroupSigner{%s, public key SHA-256 %s..., %d members}", s.k.ref, s.k.pinned, len(s.k.at))
}

// Sign signs as Signer.Sign does, on a healthy member; if the member fails
// (its HSM lost, unavailable, busy or not answering), on another. Bad
// input fails at once (ErrInvalidOptions). With no member left it fails
// with ErrUnavailable, at once when no member is healthy.
func (s *GroupSigner) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return s.SignContext(context.Background(), digest, opts)
}

// SignContext is Sign; ctx bounds the wait for a member's answer. It does
// not wait for an unavailable member to recover.
func (s *GroupSigner) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if s == nil || s.k == nil {
		return nil, errNoKey("sign", "GroupSigner")
	}
	own, err := ownSignerOpts(opts)
	if err != nil {
		return nil, err
	}
	digest = bytes.Clone(digest) // the call may outlive this one (a member that hangs)
	return s.k.do(ctx, "sign", func(k *key) ([]byte, error) { return k.sign(digest, own) })
}

// ownSignerOpts returns opts with nothing of the caller's left to run: the
// caller's HashFunc is called here, in the caller's goroutine, and PSS and
// Ed25519 options are copied, because a group's call runs in a goroutine of
// its own and may outlive the caller's. A typed nil is passed on for
// Signer.Sign to refuse without calling it.
func ownSignerOpts(opts crypto.SignerOpts) (crypto.SignerOpts, error) {
	switch o := opts.(type) {
	case nil, crypto.Hash:
		return opts, nil
	case *rsa.PSSOptions:
		if o == nil {
			return opts, nil
		}
		c := *o
		return &c, nil
	case *ed25519.Options:
		if o == nil {
			return opts, nil
		}
		c := *o
		return &c, nil
	}
	if isNil(opts) {
		return opts, nil
	}
	h, err := hashFunc(opts)
	if err != nil {
		return nil, &Error{Op: "sign", Err: err}
	}
	return h, nil
}

// GroupDecrypter is a group's RSA private key as a crypto.Decrypter. Safe
// for concurrent use.
type GroupDecrypter struct{ k *groupKey }

// Decrypter finds ref as Signer does, with the checks of
// Provider.Decrypter (an RSA key that may decrypt).
func (g *Group) Decrypter(ref KeyRef) (*GroupDecrypter, error) {
	k, err := g.newKey(ref, true, "group decrypter")
	if err != nil {
		return nil, err
	}
	return &GroupDecrypter{k}, nil
}

// Public returns the pinned public key. It makes no PKCS#11 call.
func (d *GroupDecrypter) Public() crypto.PublicKey {
	if d == nil || d.k == nil {
		return nil
	}
	return d.k.pub
}

// KeyRef returns the reference the key was asked for with.
func (d *GroupDecrypter) KeyRef() KeyRef {
	if d == nil || d.k == nil {
		return KeyRef{}
	}
	return d.k.ref
}

// String describes the key without secrets.
func (d *GroupDecrypter) String() string {
	if d == nil || d.k == nil {
		return "hsm.GroupDecrypter{no key}"
	}
	return fmt.Sprintf("hsm.GroupDecrypter{%s, public key SHA-256 %s..., %d members}", d.k.ref, d.k.pinned, len(d.k.at))
}

// Decrypt decrypts as Decrypter.Decrypt does, on a healthy member, and
// fails over as GroupSigner.Sign does. A ciphertext the key rejects
// (ErrDecryption) is never tried on another member.
func (d *GroupDecrypter) Decrypt(rand io.Reader, ciphertext []byte, opts crypto.DecrypterOpts) ([]byte, error) {
	return d.DecryptContext(context.Background(), rand, ciphertext, opts)
}

// DecryptContext is Decrypt; ctx bounds the wait for a member's answer.
func (d *GroupDecrypter) DecryptContext(ctx context.Context, rand io.Reader, ciphertext []byte, opts crypto.DecrypterOpts) ([]byte, error) {
	if d == nil || d.k == nil {
		return nil, errNoKey("decrypt", "GroupDecrypter")
	}
	maxLen := 0
	if pub, ok := d.k.pub.(*rsa.PublicKey); ok {
		maxLen = pub.Size() - 11
	}
	own, random, err := ownDecrypterOpts(rand, opts, maxLen)
	if err != nil {
		return nil, err
	}
	ciphertext = bytes.Clone(ciphertext)
	return d.k.do(ctx, "decrypt", func(k *key) ([]byte, error) {
		return k.decryptWith(bytes.NewReader(random), ciphertext, own)
	})
}

// ownDecrypterOpts returns opts with nothing of the caller's left to use,
// as ownSignerOpts does, and the random bytes PKCS #1 v1.5 decryption with
// a SessionKeyLen may need (twice the length: the constant-time path and
// the token's own), read here from the caller's rand (crypto/rand if nil);
// a length above maxLen is left for Decrypter to refuse.
func ownDecrypterOpts(rand io.Reader, opts crypto.DecrypterOpts, maxLen int) (crypto.DecrypterOpts, []byte, error) {
	switch o := opts.(type) {
	case *rsa.OAEPOptions:
		if o == nil {
			return opts, nil, nil
		}
		c := *o
		c.Label = bytes.Clone(o.Label)
		return &c, nil, nil
	//lint:ignore SA1019 crypto.Decrypter still defines PKCS #1 v1.5 decryption options.
	case *rsa.PKCS1v15DecryptOptions:
		if o == nil || o.SessionKeyLen <= 0 || o.SessionKeyLen > maxLen {
			return opts, nil, nil
		}
		c := *o
		if rand == nil {
			rand = cryptorand.Reader
		}
		random := make([]byte, 2*c.SessionKeyLen)
		if _, err := io.ReadFull(rand, random); err != nil {
			return nil, nil, &Error{Op: "decrypt", Err: err}
		}
		return &c, random, nil
	}
	return opts, nil, nil
}
