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
	"sync"
	"sync/atomic"
	"time"
)

// groupKey is a key of a group: the key under ref on each member, all with
// the public key pinned when the group's key was made.
type groupKey struct {
	g      *Group
	ref    KeyRef // what every member is asked with
	own    KeyRef // the key's own CKA_ID and CKA_LABEL on the member pinned; written by newKey only
	use    keyUse
	pub    crypto.PublicKey // written by newKey only, before the key is shared
	pinned string           // hex of the first 8 bytes of the SHA-256 of pub, for messages
	at     []memberKey
	rr     atomic.Uint64 // round robin among equally loaded members

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
func (g *Group) newKey(ref KeyRef, use keyUse, op string) (*groupKey, error) {
	closed := &Error{Op: op, Err: ErrClosed}
	if g == nil || len(g.members) == 0 {
		return nil, opErr(op, 0, ErrClosed, "a nil or zero hsm.Group: open one with OpenGroup")
	}
	if g.isClosed() {
		return nil, closed
	}
	k := &groupKey{g: g, ref: ref, use: use, at: make([]memberKey, len(g.members)), closed: closed}
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
			k.pub, k.pinned, k.own = r.d.pub, r.d.pinned, r.d.ref
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
		d, err = m.p.durable(k.ref, k.use)
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

// run is do, under ctx, and with wait, again after each change of a
// member's state while no member could do it, until ctx ends.
func (k *groupKey) run(ctx context.Context, wait bool, o operation) ([]byte, error) {
	op, f := o.name(), o.on
	for {
		var changed <-chan struct{}
		if wait { // taken before the attempt, so that no change is missed
			changed = k.g.changes()
		}
		out, err := k.do(ctx, op, f)
		if err == nil || !wait || !errors.Is(err, ErrUnavailable) || ctx.Err() != nil || k.g.isClosed() {
			return out, err
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, &Error{Op: op, Err: causedBy(ErrUnavailable, ctx.Err())}
		}
	}
}

func (k *groupKey) public() crypto.PublicKey { return k.pub }
func (k *groupKey) ownRef() KeyRef           { return k.own }
func (k *groupKey) detached() bool           { return true }
func (k *groupKey) describe() string {
	return fmt.Sprintf("%s, public key SHA-256 %s..., %d members", k.own, k.pinned, len(k.at))
}

// Signer finds ref on the group's healthy members, as Provider.Signer
// does, and pins the public key of the first member (in the order given
// to OpenGroup) that has it; a member that holds another key under ref is
// excluded for it (logged, and listed in MemberStats.Excluded), and never
// used. Members not healthy now are checked when they are first used. It
// fails with ErrKeyNotFound when no member that answered has the key, and
// with ErrUnavailable when none answered.
func (g *Group) Signer(ref KeyRef) (*GroupSigner, error) {
	k, err := g.newKey(ref, useSign, "group signer")
	if err != nil {
		return nil, err
	}
	return &GroupSigner{k}, nil
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

// Decrypter finds ref as Signer does, with the checks of
// Provider.Decrypter (an RSA key that may decrypt).
func (g *Group) Decrypter(ref KeyRef) (*GroupDecrypter, error) {
	k, err := g.newKey(ref, useDecrypt, "group decrypter")
	if err != nil {
		return nil, err
	}
	return &GroupDecrypter{k}, nil
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
