package hsm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

// groupRef is the group key's reference on every member.
var groupRef = KeyRef{ID: []byte{0x47}, Label: "group"}

// groupFixture is n SoftHSM tokens, each served by a p11-kit server of its
// own (a copy of the client module each), holding the same imported key
// under groupRef.
type groupFixture struct {
	toks []*softhsmtest.Token
	srvs []*softhsmtest.Server
	key  crypto.Signer
}

func newGroupFixture(t testing.TB, n int, key crypto.Signer) *groupFixture {
	t.Helper()
	f := &groupFixture{key: key}
	for i := range n {
		tok := softhsmtest.NewToken(t, fmt.Sprintf("grp%d", i))
		tok.ImportKey(t, key, groupRef.ID, groupRef.Label)
		f.toks = append(f.toks, tok)
		f.srvs = append(f.srvs, softhsmtest.StartOwnServer(t, tok))
	}
	return f
}

// configs returns the members' configurations: quick probes and recovery,
// so that the tests see outages and returns within a second or two (a
// frozen member after remoteProbeTimeout: a shorter one could take a
// healthy member, opening through p11-kit on a loaded machine, for a hung
// one), and one session each: p11-kit 0.24's client can hang for ever when
// its server dies under concurrent calls (docs/modules.md, known module problems).
func (f *groupFixture) configs(mod ...func(i int, c *Config)) []Config {
	var cfgs []Config
	for i, tok := range f.toks {
		c := Config{Path: f.srvs[i].Module(), TokenLabel: tok.Label, PIN: tok.PIN,
			MaxSessions: 1, SessionWaitTimeout: 2 * time.Second,
			ProbeInterval: 100 * time.Millisecond, ProbeTimeout: remoteProbeTimeout,
			RecoveryBackoffMin: 20 * time.Millisecond, RecoveryBackoffMax: 200 * time.Millisecond,
			DrainTimeout: 2 * time.Second}
		for _, m := range mod {
			m(i, &c)
		}
		cfgs = append(cfgs, c)
	}
	return cfgs
}

// members returns g's members, for waitFor to wake up at their changes.
func members(g *Group) []changer {
	var on []changer
	for _, p := range g.Members() {
		on = append(on, p)
	}
	return on
}

func openGroup(t testing.TB, gc GroupConfig) *Group {
	t.Helper()
	g, err := OpenGroupConfig(gc)
	if err != nil {
		t.Fatalf("OpenGroup: %v", err)
	}
	t.Cleanup(func() {
		if err := g.Close(); err != nil {
			t.Errorf("Group.Close: %v", err)
		}
	})
	return g
}

// signLoad signs with s from workers goroutines until stop is closed, and
// verifies every signature against pub. It returns the number of good
// signatures; failures and wrong signatures fail t.
func signLoad(t *testing.T, s crypto.Signer, pub *ecdsa.PublicKey, workers int, stop <-chan struct{}) func() int64 {
	var good atomic.Int64
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				digest := sha256.Sum256(fmt.Appendf(nil, "worker %d signature %d", w, i))
				sig, err := s.Sign(nil, digest[:], crypto.SHA256)
				if err != nil {
					t.Errorf("worker %d: signature %d failed: %v", w, i, err)
					return
				}
				if !ecdsa.VerifyASN1(pub, digest[:], sig) {
					t.Errorf("worker %d: signature %d is wrong", w, i)
					return
				}
				good.Add(1)
			}
		})
	}
	return func() int64 { wg.Wait(); return good.Load() }
}

// TestGroupKillOneMember: with 8 goroutines signing through a two-member
// group, one member's HSM is killed: no signature fails and none is wrong.
// When it returns, it takes load again.
func TestGroupKillOneMember(t *testing.T) {
	f := newGroupFixture(t, 2, ecKey(t))
	var changes []GroupStateChange
	var mu sync.Mutex
	g := openGroup(t, GroupConfig{Members: f.configs(), OnStateChange: func(c GroupStateChange) {
		mu.Lock()
		changes = append(changes, c)
		mu.Unlock()
	}})
	s, err := g.Signer(KeyRef{Label: groupRef.Label})
	if err != nil {
		t.Fatal(err)
	}
	pub := f.key.Public().(*ecdsa.PublicKey)
	if !pub.Equal(s.Public()) {
		t.Fatal("the group's public key is not the imported key's")
	}
	stop := make(chan struct{})
	wait := signLoad(t, s, pub, 8, stop)
	ops := func(i int) uint64 { return g.Stats().Members[i].Operations }
	waitFor(t, "both members sign", func() bool { return ops(0) > 50 && ops(1) > 50 })

	if err := f.srvs[1].Kill(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "member 1 seen lost", func() bool { return g.Members()[1].State() != StateHealthy }, g.Members()[1])
	before := ops(0)
	waitFor(t, "member 0 carries the load", func() bool { return ops(0) > before+200 })
	if st := g.State(); st != GroupDegraded {
		t.Errorf("one member down: group %v, want degraded", st)
	}

	if err := f.srvs[1].Restart(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := g.Members()[1].WaitHealthy(ctx); err != nil {
		t.Fatal(err)
	}
	back := ops(1)
	waitFor(t, "member 1 takes load again", func() bool { return ops(1) > back+50 })
	close(stop)
	good := wait()

	st := g.Stats()
	t.Logf("%d good signatures; group: %d operations, %d failovers, %d failed; member 0: %d ops, member 1: %d ops, %d failovers, %d re-initializations",
		good, st.Operations, st.Failovers, st.Failed, st.Members[0].Operations, st.Members[1].Operations, st.Members[1].Failovers, st.Members[1].Stats.Reinitializations)
	if st.Failed != 0 {
		t.Errorf("%d operations failed", st.Failed)
	}
	if st.State != GroupHealthy {
		t.Errorf("group %v after the member's return", st.State)
	}
	mu.Lock()
	defer mu.Unlock()
	var seen []string
	for _, c := range changes {
		seen = append(seen, c.To.String())
	}
	if len(seen) < 2 || seen[0] != "degraded" || seen[len(seen)-1] != "healthy" {
		t.Errorf("group state changes %v, want degraded first and healthy last", seen)
	}
}

// TestGroupAllDown: with every member's HSM gone the group fails fast with
// ErrUnavailable, and recovers when they return.
func TestGroupAllDown(t *testing.T) {
	f := newGroupFixture(t, 2, ecKey(t))
	g := openGroup(t, GroupConfig{Members: f.configs(func(_ int, c *Config) {
		c.ProbeTimeout = 30 * time.Second // a failure that waited for a member would show
	})})
	s, err := g.Signer(groupRef)
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("all down"))
	for _, srv := range f.srvs {
		if err := srv.Kill(); err != nil {
			t.Fatal(err)
		}
	}
	// The first signature finds both members lost, one after the other
	// (or finds them lost already, if their probes were quicker).
	_, err = s.Sign(nil, digest[:], crypto.SHA256)
	wantErr(t, err, ErrUnavailable)
	t.Logf("first failure: %v", err)
	waitFor(t, "group unavailable", func() bool { return g.State() == GroupUnavailable }, members(g)...)
	start := time.Now()
	_, err = s.Sign(nil, digest[:], crypto.SHA256)
	took := time.Since(start)
	wantErr(t, err, ErrUnavailable)
	t.Logf("all members down: %v in %v", err, took)
	// Fast: a failure that waited for a member would take its
	// ProbeTimeout (30 s); fastBound is far below.
	if took > fastBound {
		t.Errorf("ErrUnavailable took %v with no member healthy, want at most %v", took, fastBound)
	}
	if _, err := g.Signer(groupRef); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Signer with no member healthy: %v, want ErrUnavailable", err)
	}

	for _, srv := range f.srvs {
		if err := srv.Restart(); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "group healthy again", func() bool { return g.State() == GroupHealthy }, members(g)...)
	sig, err := s.Sign(nil, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if !ecdsa.VerifyASN1(f.key.Public().(*ecdsa.PublicKey), digest[:], sig) {
		t.Fatal("wrong signature after recovery")
	}
}

// TestGroupForeignKey: a member holding another key under the same
// reference is excluded for it, shown in Stats, and never used, not even
// when the other members are down.
func TestGroupForeignKey(t *testing.T) {
	f := newGroupFixture(t, 2, ecKey(t))
	// Member 1 gets another key under the same label (and ID).
	f.toks[1].DeleteKeyPair(t, groupRef.ID)
	f.toks[1].ImportKey(t, ecKey(t), groupRef.ID, groupRef.Label)
	g := openGroup(t, GroupConfig{Members: f.configs()})
	s, err := g.Signer(KeyRef{Label: groupRef.Label})
	if err != nil {
		t.Fatal(err)
	}
	if !f.key.Public().(*ecdsa.PublicKey).Equal(s.Public()) {
		t.Fatal("the group pinned member 1's key, not the first member's")
	}
	st := g.Stats()
	if ex := st.Members[1].Excluded; len(ex) != 1 || ex[0].Label != groupRef.Label {
		t.Fatalf("member 1 excluded for %v, want the group key", ex)
	}
	if len(st.Members[0].Excluded) != 0 {
		t.Fatalf("member 0 excluded for %v", st.Members[0].Excluded)
	}
	digest := sha256.Sum256([]byte("foreign"))
	for range 50 {
		sig, err := s.Sign(nil, digest[:], crypto.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		if !ecdsa.VerifyASN1(f.key.Public().(*ecdsa.PublicKey), digest[:], sig) {
			t.Fatal("wrong signature")
		}
	}
	if n := g.Stats().Members[1].Operations; n != 0 {
		t.Fatalf("member 1, holding another key, got %d operations", n)
	}
	// With member 0 down, the group has no member for the key.
	if err := f.srvs[0].Kill(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "member 0 seen lost", func() bool { return g.Members()[0].State() != StateHealthy }, g.Members()[0])
	_, err = s.Sign(nil, digest[:], crypto.SHA256)
	wantErr(t, err, ErrUnavailable)
	if n := g.Stats().Members[1].Operations; n != 0 {
		t.Fatalf("member 1 got %d operations with member 0 down", n)
	}
	// A member whose key changes under a re-initialization is excluded too.
	if err := f.srvs[0].Restart(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "member 0 back", func() bool { return g.Members()[0].State() == StateHealthy }, g.Members()[0])
	if _, err := s.Sign(nil, digest[:], crypto.SHA256); err != nil {
		t.Fatal(err)
	}
}

// TestGroupKeyChangesOnMember: a member whose key under the reference is
// replaced while its HSM is away is refused when it returns (the member's
// durable key finds another public key), excluded, and never used.
func TestGroupKeyChangesOnMember(t *testing.T) {
	f := newGroupFixture(t, 2, ecKey(t))
	g := openGroup(t, GroupConfig{Members: f.configs()})
	s, err := g.Signer(groupRef)
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("changes"))
	if err := f.srvs[1].Kill(); err != nil {
		t.Fatal(err)
	}
	f.toks[1].DeleteKeyPair(t, groupRef.ID)
	f.toks[1].ImportKey(t, ecKey(t), groupRef.ID, groupRef.Label)
	if err := f.srvs[1].Restart(); err != nil {
		t.Fatal(err)
	}
	// Until the member is re-initialized and asked, it may still be healthy
	// with its old (dead) handles; sign until it has been excluded.
	waitFor(t, "member 1 excluded", func() bool {
		sig, err := s.Sign(nil, digest[:], crypto.SHA256)
		if err != nil {
			t.Fatalf("sign: %v", err)
		}
		if !ecdsa.VerifyASN1(f.key.Public().(*ecdsa.PublicKey), digest[:], sig) {
			t.Fatal("wrong signature")
		}
		return len(g.Stats().Members[1].Excluded) == 1
	})
	ops := g.Stats().Members[1].Operations
	for range 50 {
		if _, err := s.Sign(nil, digest[:], crypto.SHA256); err != nil {
			t.Fatal(err)
		}
	}
	if n := g.Stats().Members[1].Operations; n != ops {
		t.Fatalf("excluded member 1 got %d more operations", n-ops)
	}
}

// TestGroupMemberDownAtOpen: a member whose HSM is down at OpenGroup does
// not fail it; it is reported, and joins when its HSM comes up.
func TestGroupMemberDownAtOpen(t *testing.T) {
	f := newGroupFixture(t, 2, ecKey(t))
	if err := f.srvs[1].Kill(); err != nil {
		t.Fatal(err)
	}
	g := openGroup(t, GroupConfig{Members: f.configs()})
	st := g.Stats()
	if st.State != GroupDegraded || st.Members[1].OpenError == nil || st.Members[1].Stats.State != StateUnavailable {
		t.Fatalf("group %v, member 1 %v, open error %v", st.State, st.Members[1].Stats.State, st.Members[1].OpenError)
	}
	t.Logf("member 1 at open: %v", st.Members[1].OpenError)
	s, err := g.Signer(groupRef)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.srvs[1].Restart(); err != nil {
		t.Fatal(err)
	}
	joinsAndSigns(t, g, s)
	if ti := g.Members()[1].TokenInfo(); ti.Serial != f.toks[1].Serial {
		t.Fatalf("member 1 token serial %q, want %q", ti.Serial, f.toks[1].Serial)
	}
}

// joinsAndSigns waits until member 1 of g is healthy and has signed with
// s, which must never fail meanwhile.
func joinsAndSigns(t *testing.T, g *Group, s *GroupSigner) {
	t.Helper()
	waitFor(t, "member 1 joins", func() bool { return g.State() == GroupHealthy }, members(g)...)
	digest := sha256.Sum256([]byte("joined"))
	waitFor(t, "member 1 signs", func() bool {
		if _, err := s.Sign(nil, digest[:], crypto.SHA256); err != nil {
			t.Fatal(err)
		}
		return g.Stats().Members[1].Operations > 0
	})
}

// TestGroupMemberFrozenAtOpen: a member whose HSM does not answer at
// OpenGroup (its C_Initialize hangs) does not hold OpenGroup beyond its
// ProbeTimeout, and joins once its HSM answers.
func TestGroupMemberFrozenAtOpen(t *testing.T) {
	f := newGroupFixture(t, 2, ecKey(t))
	f.srvs[1].Pause()
	resumed := false
	defer func() {
		if !resumed {
			f.srvs[1].Resume()
		}
	}()
	start := time.Now()
	g := openGroup(t, GroupConfig{Members: f.configs()})
	took := time.Since(start)
	// OpenGroup returns at the frozen member's ProbeTimeout; fastBound is
	// the margin for a loaded machine. One that waited for the member
	// would not return before Resume, below.
	if bound := remoteProbeTimeout + fastBound; took > bound {
		t.Errorf("OpenGroup took %v with a frozen member, want at most its ProbeTimeout + %v = %v", took, fastBound, bound)
	}
	st := g.Stats()
	if !errors.Is(st.Members[1].OpenError, ErrHung) || st.State != GroupDegraded {
		t.Fatalf("group %v, member 1 open error %v", st.State, st.Members[1].OpenError)
	}
	s, err := g.Signer(groupRef)
	if err != nil {
		t.Fatal(err)
	}
	f.srvs[1].Resume()
	resumed = true
	joinsAndSigns(t, g, s)
}

// TestGroupFrozenMember: a member whose HSM stops answering (SIGSTOP) under
// load costs no failed signature: calls stuck in it are repeated on the
// other member.
func TestGroupFrozenMember(t *testing.T) {
	f := newGroupFixture(t, 2, ecKey(t))
	g := openGroup(t, GroupConfig{Members: f.configs()})
	s, err := g.Signer(groupRef)
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	wait := signLoad(t, s, f.key.Public().(*ecdsa.PublicKey), 8, stop)
	ops := func(i int) uint64 { return g.Stats().Members[i].Operations }
	waitFor(t, "both members sign", func() bool { return ops(0) > 50 && ops(1) > 50 })
	f.srvs[1].Pause()
	waitFor(t, "member 1 seen hung", func() bool { return g.Members()[1].State() != StateHealthy }, g.Members()[1])
	before := ops(0)
	waitFor(t, "member 0 carries the load", func() bool { return ops(0) > before+200 })
	f.srvs[1].Resume()
	waitFor(t, "member 1 back", func() bool { return g.Members()[1].State() == StateHealthy }, g.Members()[1])
	close(stop)
	good := wait()
	st := g.Stats()
	t.Logf("%d good signatures, %d failovers, member 1: %v", good, st.Failovers, st.Members[1].Stats.LastError)
	if st.Failed != 0 {
		t.Errorf("%d operations failed", st.Failed)
	}
}

// TestGroupCallerErrorNotRetried: bad input fails at once, on one member.
func TestGroupCallerErrorNotRetried(t *testing.T) {
	f := newGroupFixture(t, 2, ecKey(t))
	g := openGroup(t, GroupConfig{Members: f.configs()})
	s, err := g.Signer(groupRef)
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Sign(nil, []byte("short"), crypto.SHA256)
	wantErr(t, err, ErrInvalidOptions)
	_, err = s.Sign(nil, make([]byte, 32), crypto.Hash(99))
	wantErr(t, err, ErrInvalidOptions)
	if st := g.Stats(); st.Failovers != 0 || st.Failed != 0 {
		t.Fatalf("caller errors were retried: %d failovers, %d failed", st.Failovers, st.Failed)
	}
	if _, err := g.Decrypter(groupRef); !errors.Is(err, ErrUnsupportedKey) {
		t.Fatalf("Decrypter of an ECDSA key: %v", err)
	}
	if _, err := g.Signer(KeyRef{Label: "no such key"}); !errors.Is(err, ErrKeyNotFound) {
		t.Fatalf("Signer of a missing key: %v", err)
	}
}

// TestGroupDecrypter: an RSA key on two members decrypts through the
// group, also with one member gone; a rejected ciphertext is not retried.
func TestGroupDecrypter(t *testing.T) {
	rk := rsaKey(t)
	f := newGroupFixture(t, 2, rk)
	g := openGroup(t, GroupConfig{Members: f.configs()})
	d, err := g.Decrypter(groupRef)
	if err != nil {
		t.Fatal(err)
	}
	opts := &rsa.OAEPOptions{Hash: crypto.SHA256}
	ct := encryptTo(t, &rk.PublicKey, []byte("group secret"), opts)
	if err := f.srvs[0].Kill(); err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		pt, err := d.Decrypt(nil, ct, opts)
		if err != nil || string(pt) != "group secret" {
			t.Fatalf("decryption %d with member 0 gone: %q, %v", i, pt, err)
		}
	}
	bad := append([]byte(nil), ct...)
	bad[10] ^= 1
	failovers := g.Stats().Failovers
	_, err = d.Decrypt(nil, bad, opts)
	wantErr(t, err, ErrDecryption)
	if n := g.Stats().Failovers; n != failovers {
		t.Fatalf("a rejected ciphertext was tried on another member (%d failovers)", n-failovers)
	}
}

// TestOpenGroupErrors: configuration errors fail OpenGroup before
// anything opens; a group with no member up fails with ErrUnavailable.
func TestOpenGroupErrors(t *testing.T) {
	softhsmtest.RequireRemote(t)
	if _, err := OpenGroup(); !errors.Is(err, ErrConfig) {
		t.Errorf("no members: %v", err)
	}
	tok := sharedToken(t)
	cfg := Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN}
	_, err := OpenGroup(cfg, cfg)
	wantErr(t, err, ErrConfig)
	if !strings.Contains(err.Error(), "members 0 and 1") {
		t.Errorf("two members on one module: %v", err)
	}
	_, err = OpenGroup(cfg, Config{Path: "/nonexistent/module.so"})
	wantErr(t, err, ErrConfig)
	if !strings.Contains(err.Error(), "member 1") {
		t.Errorf("a bad member is not named: %v", err)
	}
	// The module of member 0 was not left claimed.
	p, err := Open(cfg)
	if err != nil {
		t.Fatalf("Open after the failed OpenGroup: %v", err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}

	f := newGroupFixture(t, 2, ecKey(t))
	for _, srv := range f.srvs {
		if err := srv.Kill(); err != nil {
			t.Fatal(err)
		}
	}
	_, err = OpenGroup(f.configs()...)
	wantErr(t, err, ErrUnavailable)
	t.Logf("no member up: %v", err)
	// Nothing was left claimed: with the HSMs back, the group opens.
	for _, srv := range f.srvs {
		if err := srv.Restart(); err != nil {
			t.Fatal(err)
		}
	}
	g := openGroup(t, GroupConfig{Members: f.configs()})
	if st := g.State(); st != GroupHealthy {
		t.Fatalf("group %v", st)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Signer(groupRef); !errors.Is(err, ErrClosed) {
		t.Fatalf("Signer after Close: %v", err)
	}
}

// TestGroupWrongPINMember: a member whose PIN is refused is reported and
// stays failed; the group works with the others.
func TestGroupWrongPINMember(t *testing.T) {
	f := newGroupFixture(t, 2, ecKey(t))
	g := openGroup(t, GroupConfig{Members: f.configs(func(i int, c *Config) {
		if i == 1 {
			c.PIN = "9999"
		}
	})})
	st := g.Stats()
	if st.Members[1].Stats.State != StateFailed || !errors.Is(st.Members[1].OpenError, ErrPIN) {
		t.Fatalf("member 1: %v, %v", st.Members[1].Stats.State, st.Members[1].OpenError)
	}
	s, err := g.Signer(groupRef)
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("pin"))
	for range 10 {
		if _, err := s.Sign(nil, digest[:], crypto.SHA256); err != nil {
			t.Fatal(err)
		}
	}
	if st := g.Stats(); st.Members[1].Operations != 0 || st.Members[1].Stats.ReinitializationFailures != 0 {
		t.Fatalf("failed member used: %d operations, %d PIN retries", st.Members[1].Operations, st.Members[1].Stats.ReinitializationFailures)
	}
}

// BenchmarkGroup: ECDSA P-256 signatures through p11-kit, in parallel
// (4 goroutines per core), by one member's durable key alone (eng=member),
// by a group of that one member (eng=group1: the group's own cost) and by
// a group of two members, each its own p11-kit server (eng=group2: the
// load spread).
func BenchmarkGroup(b *testing.B) {
	f := newGroupFixture(b, 2, ecKey(b))
	cfgs := f.configs(func(_ int, c *Config) { c.ProbeInterval = -1 })
	digest := sha256.Sum256([]byte("group benchmark"))
	run := func(b *testing.B, s crypto.Signer) {
		b.SetParallelism(4)
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := s.Sign(nil, digest[:], crypto.SHA256); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	b.Run("eng=member", func(b *testing.B) {
		p, err := Open(cfgs[0])
		if err != nil {
			b.Fatal(err)
		}
		defer p.Close()
		s, err := p.DurableSigner(groupRef)
		if err != nil {
			b.Fatal(err)
		}
		run(b, s)
	})
	for _, n := range []int{1, 2} {
		b.Run(fmt.Sprintf("eng=group%d", n), func(b *testing.B) {
			g, err := OpenGroup(cfgs[:n]...)
			if err != nil {
				b.Fatal(err)
			}
			defer g.Close()
			s, err := g.Signer(groupRef)
			if err != nil {
				b.Fatal(err)
			}
			run(b, s)
			st := g.Stats()
			for i, m := range st.Members {
				b.ReportMetric(float64(m.Operations)/float64(st.Operations), fmt.Sprintf("share%d", i))
			}
		})
	}
}

// TestGroupSignerFrozenMember: a member that stops answering (unnoticed:
// no probes) while Signer looks the key up does not hold Signer beyond its
// ProbeTimeout, nor the signatures that follow.
func TestGroupSignerFrozenMember(t *testing.T) {
	f := newGroupFixture(t, 2, ecKey(t))
	g := openGroup(t, GroupConfig{Members: f.configs(func(_ int, c *Config) {
		c.ProbeInterval = -1
	})})
	f.srvs[1].Pause()
	defer f.srvs[1].Resume()
	// The lookup on the frozen member, and a call on it, are given up
	// after its ProbeTimeout; fastBound is the margin for a loaded machine.
	// Whatever waited for the member would not return before Resume, at
	// the end.
	bound := remoteProbeTimeout + fastBound
	var s *GroupSigner
	var err error
	took := within(t, waitLimit, "Signer", func() { s, err = g.Signer(groupRef) })
	if err != nil {
		t.Fatal(err)
	}
	if took > bound {
		t.Fatalf("Signer took %v with a frozen member, want at most %v", took, bound)
	}
	digest := sha256.Sum256([]byte("frozen at bind"))
	for i := range 20 {
		var sig []byte
		took := within(t, waitLimit, fmt.Sprintf("signature %d", i), func() { sig, err = s.Sign(nil, digest[:], crypto.SHA256) })
		if err != nil {
			t.Fatalf("signature %d: %v", i, err)
		}
		if !ecdsa.VerifyASN1(f.key.Public().(*ecdsa.PublicKey), digest[:], sig) {
			t.Fatalf("signature %d is wrong", i)
		}
		if took > bound {
			t.Fatalf("signature %d took %v with a frozen member, want at most %v", i, took, bound)
		}
	}
}

// TestGroupMismatchedPair: a member whose private key under the reference
// is another key than its public key object says (the one the group pins)
// fails the challenge, is excluded, and makes no wrong signature.
func TestGroupMismatchedPair(t *testing.T) {
	f := newGroupFixture(t, 2, ecKey(t))
	f.toks[1].DeleteKeyPair(t, groupRef.ID)
	if err := f.toks[1].ImportPair(ecKey(t), f.key.Public(), groupRef.ID, groupRef.Label); err != nil {
		t.Fatal(err)
	}
	g := openGroup(t, GroupConfig{Members: f.configs()})
	s, err := g.Signer(groupRef)
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("mismatched"))
	for i := range 40 {
		sig, err := s.Sign(nil, digest[:], crypto.SHA256)
		if err != nil {
			t.Fatalf("signature %d: %v", i, err)
		}
		if !ecdsa.VerifyASN1(f.key.Public().(*ecdsa.PublicKey), digest[:], sig) {
			t.Fatalf("signature %d is wrong", i)
		}
	}
	if ex := g.Stats().Members[1].Excluded; len(ex) != 1 {
		t.Fatalf("member 1 with a mismatched pair not excluded: %v", ex)
	}
}

// TestGroupAccounting: a cancelled context makes no signature; a group of
// one whose member is lost counts a failure and no failover; Close turns
// operations into ErrClosed without counting failures; a panicking reader
// of the caller's panics in the caller's goroutine.
func TestGroupAccounting(t *testing.T) {
	rk := rsaKey(t)
	f := newGroupFixture(t, 1, rk)
	g := openGroup(t, GroupConfig{Members: f.configs()})
	s, err := g.Signer(groupRef)
	if err != nil {
		t.Fatal(err)
	}
	d, err := g.Decrypter(groupRef)
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("accounting"))
	if _, err := s.Sign(nil, digest[:], crypto.SHA256); err != nil { // binds and proves
		t.Fatal(err)
	}
	signs := func() uint64 { return g.Stats().Members[0].Stats.Latency["sign"].Count }
	before := signs()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for range 20 {
		_, err := s.SignContext(ctx, digest[:], crypto.SHA256)
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled context: %v", err)
		}
	}
	if n := signs() - before; n != 0 {
		t.Fatalf("%d signatures made for cancelled contexts", n)
	}

	func() {
		defer func() {
			if r := recover(); r != "caller's reader" {
				t.Fatalf("recovered %v, want the reader's panic in the caller's goroutine", r)
			}
		}()
		//lint:ignore SA1019 the PKCS #1 v1.5 session key path reads the caller's rand.
		_, _ = d.Decrypt(panicReader{}, make([]byte, 256), &rsa.PKCS1v15DecryptOptions{SessionKeyLen: 16})
		t.Fatal("the reader was not read")
	}()

	if err := f.srvs[0].Kill(); err != nil {
		t.Fatal(err)
	}
	_, err = s.Sign(nil, digest[:], crypto.SHA256)
	wantErr(t, err, ErrUnavailable)
	st := g.Stats()
	if st.Failovers != 0 || st.Members[0].Failovers != 0 || st.Failed != 1 {
		t.Fatalf("one member lost: %d failovers (member %d), %d failed; want 0 and 1", st.Failovers, st.Members[0].Failovers, st.Failed)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	_, err = s.Sign(nil, digest[:], crypto.SHA256)
	wantErr(t, err, ErrClosed)
	if st := g.Stats(); st.Failed != 1 || st.Failovers != 0 {
		t.Fatalf("after Close: %d failed, %d failovers", st.Failed, st.Failovers)
	}
}

type panicReader struct{}

func (panicReader) Read([]byte) (int, error) { panic("caller's reader") }

// TestOpenGroupAllPINsRefused: when no member opens and a PIN was refused,
// the error does not match ErrUnavailable (a loop retrying OpenGroup while
// the HSMs come up would send the wrong PIN again and lock the token).
func TestOpenGroupAllPINsRefused(t *testing.T) {
	f := newGroupFixture(t, 2, ecKey(t))
	_, err := OpenGroup(f.configs(func(_ int, c *Config) { c.PIN = "9999" })...)
	wantErr(t, err, ErrPIN)
	if errors.Is(err, ErrUnavailable) {
		t.Fatalf("every PIN refused, yet the error matches ErrUnavailable: %v", err)
	}
}

// TestGroupCloseFromMemberCallback: Close called from a member's
// OnStateChange returns without waiting for that callback, its caller.
func TestGroupCloseFromMemberCallback(t *testing.T) {
	f := newGroupFixture(t, 2, ecKey(t))
	var g *Group
	ready := make(chan struct{})
	closed := make(chan error, 1)
	var once sync.Once
	cfgs := f.configs(func(i int, c *Config) {
		c.DrainTimeout = 20 * time.Second
		if i == 1 {
			c.OnStateChange = func(ch StateChange) {
				if ch.To == StateUnavailable {
					<-ready
					once.Do(func() { closed <- g.Close() })
				}
			}
		}
	})
	var err error
	if g, err = OpenGroup(cfgs...); err != nil {
		t.Fatal(err)
	}
	close(ready)
	if err := f.srvs[1].Kill(); err != nil {
		t.Fatal(err)
	}
	if err := g.Members()[1].Reinitialize(context.Background()); err == nil {
		t.Fatal("re-initialized with the HSM gone")
	}
	select {
	case err := <-closed:
		if err != nil {
			t.Fatalf("Close from the callback: %v", err)
		}
	case <-time.After(waitLimit):
		t.Fatal("Close from a member's callback waited for that callback")
	}
	if g.State() != GroupClosed {
		t.Fatalf("group %v after Close", g.State())
	}
}

// TestGroupCallOnFrozenMember: a signature that lands on a member whose HSM
// has just stopped answering (unnoticed: no probes) is abandoned once the
// member's watchdog sees the hang, and made on the other member; the caller
// does not wait for the HSM to answer again.
func TestGroupCallOnFrozenMember(t *testing.T) {
	f := newGroupFixture(t, 2, ecKey(t))
	g := openGroup(t, GroupConfig{Members: f.configs(func(_ int, c *Config) {
		c.ProbeInterval = -1
	})})
	s, err := g.Signer(groupRef)
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("frozen in the call"))
	for range 4 { // both members bound and proven
		if _, err := s.Sign(nil, digest[:], crypto.SHA256); err != nil {
			t.Fatal(err)
		}
	}
	if n := g.Stats().Members[1].Operations; n == 0 {
		t.Fatal("member 1 took no operation before the freeze")
	}
	f.srvs[1].Pause()
	defer f.srvs[1].Resume()
	// A call on the frozen member is given up when its watchdog sees the
	// hang, or after its ProbeTimeout; fastBound is the margin for a loaded
	// machine. A caller that waited for the HSM would not return before
	// Resume, at the end.
	bound := remoteProbeTimeout + fastBound
	for i := range 6 {
		var err error
		took := within(t, waitLimit, fmt.Sprintf("signature %d", i), func() { _, err = s.Sign(nil, digest[:], crypto.SHA256) })
		if err != nil {
			t.Fatalf("signature %d: %v", i, err)
		}
		if took > bound {
			t.Fatalf("signature %d took %v with a frozen member, want at most %v", i, took, bound)
		}
	}
	if st := g.Stats(); st.Failovers == 0 || st.Members[1].InFlight == 0 {
		t.Fatalf("no call was abandoned on the frozen member: %d failovers, %d in flight on it", st.Failovers, st.Members[1].InFlight)
	}
}
