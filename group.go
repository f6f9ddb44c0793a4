package hsm

import (
	"errors"
	"fmt"
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
	// isShut is set by Close, readable without mu: every operation looks
	// at it.
	isShut atomic.Bool
	// events is GroupConfig.OnStateChange's notifier, or nil; set before
	// ready.
	events *notifier[GroupStateChange]

	mu sync.Mutex // protects following fields
	// changed is closed, and replaced, at every change of a member's
	// state, and at Close: what a key waiting for a member waits on.
	changed chan struct{}
	state   GroupState
	since   time.Time
	ready   bool // every member's Provider is set: the members' callbacks may look at them
	closed  bool // also in isShut, for the operations' path
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
	// Provider of its own, on a token of its own. Members may be tokens of
	// one module (partitions of one network HSM behind one client
	// library): they share its life cycle, so a loss of the module takes
	// them all down together, and its re-initialization brings them back
	// together; a group of independent HSMs has a module for each. A
	// member's OnStateChange still runs.
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
// Config, a module that cannot be loaded, two members that select the same
// token of one module, a module initialized by other code): those never
// cure themselves.
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
		token := fmt.Sprintf("%s\x00%s\x00%s\x00%v", abs, cfg.TokenLabel, cfg.TokenSerial, slotText(cfg.SlotNumber))
		if j, dup := paths[token]; dup {
			return nil, opErr(op, 0, ErrConfig, "members %d and %d select the same token (%s) of the module %s: a member is a token of its own", j, i, selectorText(cfg), abs)
		}
		paths[token] = i
	}
	g := &Group{members: make([]*member, n), log: gc.Logger, since: time.Now(), changed: make(chan struct{})}
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
	close(g.changed)
	g.changed = make(chan struct{})
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

// changes returns a channel closed at the next change of a member's state,
// or at Close.
func (g *Group) changes() <-chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.changed
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
	if g.changed != nil { // nil in a zero Group
		close(g.changed) // wakes the keys that wait: they see the group closed
		g.changed = make(chan struct{})
	}
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

// slotText is a Config's SlotNumber for comparisons: "" when not set.
func slotText(n *int) string {
	if n == nil {
		return ""
	}
	return fmt.Sprint(*n)
}
