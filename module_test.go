package hsm

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

// Several Providers of one module: two tokens, and a second Provider of one
// of them, through pkcs11-spy (the calls counted and their handles checked)
// and through one p11-kit server exporting both tokens (killed and
// restarted).

// moduleTokens makes n new tokens, each with a P-256 key "ec" (ID 1). Make
// them before a Provider of this test opens the module: SoftHSM lists the
// tokens it finds at C_Initialize.
func moduleTokens(t *testing.T, n int) []*softhsmtest.Token {
	t.Helper()
	var toks []*softhsmtest.Token
	for i := range n {
		tok := softhsmtest.NewToken(t, fmt.Sprintf("mod%d", i))
		tok.GenerateKey(t, softhsmtest.P256, []byte{1}, "ec")
		toks = append(toks, tok)
	}
	return toks
}

// openOn opens a Provider of tok through the module at path, without
// periodic probes (their calls would land in the spy's counts), and closes
// it when the test ends unless the test closed it.
func openOn(t *testing.T, path string, tok *softhsmtest.Token, mod ...func(*Config)) *Provider {
	t.Helper()
	cfg := Config{Path: path, TokenLabel: tok.Label, PIN: tok.PIN, ProbeInterval: -1}
	for _, m := range mod {
		m(&cfg)
	}
	p, err := Open(cfg)
	if err != nil {
		t.Fatalf("Open(%v): %v", cfg, err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// fastRecovery makes automatic recovery retry every 10 to 50ms.
func fastRecovery(c *Config) {
	c.RecoveryBackoffMin, c.RecoveryBackoffMax = 10*time.Millisecond, 50*time.Millisecond
}

// signs checks that s signs, and that the signature verifies.
func signs(t *testing.T, s crypto.Signer, what string) {
	t.Helper()
	sig, err := s.Sign(nil, digest32[:], crypto.SHA256)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), digest32[:], sig) {
		t.Fatalf("%s: the signature does not verify", what)
	}
}

// The spy's log: "N: C_Name" starts a call; its handles are in lines
// "[in] hSession = 0x1", "[out] *phSession = 0x1", "Object 0x2 matches".
// The spy writes the lines of concurrent calls without a lock, so a line
// may follow another's text on the same line: the patterns are not
// anchored.
var (
	spyCallLine  = regexp.MustCompile(`[0-9]+: (C_[A-Za-z]+)`)
	spySessOut   = regexp.MustCompile(`\[out\] \*phSession = (0x[0-9a-f]+)`)
	spyObjOut    = regexp.MustCompile(`\[out\] \*ph(?:Object|Key|PublicKey|PrivateKey) = (0x[0-9a-f]+)|Object (0x[0-9a-f]+) matches`)
	spySessIn    = regexp.MustCompile(`\[in\] hSession = (0x[0-9a-f]+)`)
	spyObjIn     = regexp.MustCompile(`\[in\] h(?:Object|Key|BaseKey) = (0x[0-9a-f]+)`)
	spyEpochCall = map[string]bool{"C_Initialize": true, "C_Finalize": true}
)

// spyMark returns where the spy's log ends now, for checkHandles.
func spyMark(t *testing.T) int64 {
	t.Helper()
	fi, err := os.Stat(spyLog)
	if err != nil {
		return 0 // not written yet
	}
	return fi.Size()
}

// checkHandles runs noHandleCrossesFinalize on what the spy logged since
// mark: deferred, it checks the calls of a test that failed too.
func checkHandles(t *testing.T, mark int64) {
	t.Helper()
	log, err := os.ReadFile(spyLog)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("checked %d handle uses", noHandleCrossesFinalize(t, log[mark:]))
}

// noHandleCrossesFinalize checks invariant 1 on a spy log that starts
// before the module's C_Initialize: no call uses a session or object handle
// that was handed out (C_OpenSession, C_FindObjects, C_CreateObject,
// C_GenerateKeyPair...) before the last C_Initialize or C_Finalize and not
// again since. (A handle the log shows no origin for, its line garbled by
// the spy's concurrent writes, is counted apart, not judged.) It returns
// the number of handle uses it checked.
func noHandleCrossesFinalize(t *testing.T, log []byte) int {
	t.Helper()
	type handles struct{ now, before map[string]bool }
	sessions := handles{map[string]bool{}, map[string]bool{}}
	objects := handles{map[string]bool{}, map[string]bool{}}
	epochs, checked, unknown, call := 0, 0, 0, ""
	use := func(h handles, v, what string) {
		checked++
		switch {
		case h.now[v]:
		case h.before[v]:
			t.Errorf("%s uses %s %s, handed out before a C_Initialize or C_Finalize (%d of them so far) and not since", call, what, v, epochs)
		default:
			unknown++
		}
	}
	sc := bufio.NewScanner(bytes.NewReader(log))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if m := spyCallLine.FindStringSubmatch(line); m != nil {
			call = m[1]
			if spyEpochCall[call] {
				epochs++
				for _, h := range []handles{sessions, objects} {
					for v := range h.now {
						h.before[v] = true
					}
					clear(h.now)
				}
			}
		}
		for _, m := range spySessOut.FindAllStringSubmatch(line, -1) {
			sessions.now[m[1]] = true
		}
		for _, m := range spyObjOut.FindAllStringSubmatch(line, -1) {
			objects.now[m[1]+m[2]] = true
		}
		for _, m := range spySessIn.FindAllStringSubmatch(line, -1) {
			use(sessions, m[1], "session")
		}
		for _, m := range spyObjIn.FindAllStringSubmatch(line, -1) {
			use(objects, m[1], "object")
		}
	}
	if epochs == 0 {
		t.Fatal("the spy's log has no C_Initialize: it does not start before the module was initialized")
	}
	if unknown > checked/100 {
		t.Errorf("%d of %d handle uses have no origin in the spy's log: the check checked too little", unknown, checked)
	}
	return checked
}

// TestTokensOfOneModule: two tokens of one module and a second Provider of
// one of them, through pkcs11-spy: one C_Initialize and one C_Login per
// token for the three; used concurrently, each with its own stats; closing
// one leaves the others signing, with no C_Logout under them; the last
// Close logs out and finalizes. No handle crosses a C_Finalize.
func TestTokensOfOneModule(t *testing.T) {
	useSpy(t)
	toks := moduleTokens(t, 2)
	var a1, a2, b *Provider
	defer checkHandles(t, spyMark(t))
	func() {
		opens := callsByName(t, func() {
			a1 = openOn(t, spyModule, toks[0])
			a2 = openOn(t, spyModule, toks[0])
			b = openOn(t, spyModule, toks[1])
		})
		t.Logf("three Opens: %v", opens)
		if opens["C_Initialize"] != 1 || opens["C_Login"] != 2 || opens["C_Finalize"] != 0 {
			t.Errorf("three Opens of two tokens: %d C_Initialize, %d C_Login, %d C_Finalize; want 1, 2 (one per token), 0",
				opens["C_Initialize"], opens["C_Login"], opens["C_Finalize"])
		}
		if a1.mod != a2.mod || a1.mod != b.mod {
			t.Fatal("the Providers do not share the module")
		}
		if a1.TokenInfo().Serial != a2.TokenInfo().Serial || a1.TokenInfo().Serial == b.TokenInfo().Serial {
			t.Fatalf("tokens: %v, %v, %v", a1.TokenInfo(), a2.TokenInfo(), b.TokenInfo())
		}

		// Concurrently: 4 goroutines per Provider, 25 signatures each.
		provs := []*Provider{a1, a2, b}
		var wg sync.WaitGroup
		var wrong atomic.Int64
		for _, p := range provs {
			s := mustSigner(t, p, "ec")
			for w := range 4 {
				wg.Go(func() {
					for i := range 25 {
						d := sha256.Sum256(fmt.Appendf(nil, "%p %d %d", p, w, i))
						sig, err := s.Sign(nil, d[:], crypto.SHA256)
						if err != nil {
							t.Errorf("%v: %v", p, err)
							return
						}
						if !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), d[:], sig) {
							wrong.Add(1)
						}
					}
				})
			}
		}
		wg.Wait()
		if n := wrong.Load(); n != 0 {
			t.Fatalf("%d wrong signatures", n)
		}
		// 100 signatures each, and one lookup with its proof: the same
		// count for each, its own (three Providers' would be 300 more).
		first := a1.Stats().Operations
		for i, p := range provs {
			if st := p.Stats(); st.Operations != first || st.Operations < 100 || st.Operations > 110 || st.Generation != 1 || st.State != StateHealthy {
				t.Errorf("Provider %d: %d operations, generation %d, %v; want its own 100 and a lookup (%d for the first), 1, healthy", i, st.Operations, st.Generation, st.State, first)
			}
		}

		sa1, sb := mustSigner(t, a1, "ec"), mustSigner(t, b, "ec")
		closing := func(p *Provider, what string, logouts, finalizes int) {
			t.Helper()
			calls := callsByName(t, func() {
				if err := p.Close(); err != nil {
					t.Fatalf("Close %s: %v", what, err)
				}
			})
			t.Logf("Close %s: %v", what, calls)
			if calls["C_Logout"] != logouts || calls["C_Finalize"] != finalizes {
				t.Errorf("Close %s: %d C_Logout, %d C_Finalize; want %d, %d", what, calls["C_Logout"], calls["C_Finalize"], logouts, finalizes)
			}
		}
		closing(a2, "the second Provider of token A", 0, 0)
		signs(t, sa1, "token A's first Provider, after its second closed")
		signs(t, sb, "token B, after A's second Provider closed")
		closing(a1, "the last Provider of token A", 1, 0)
		signs(t, sb, "token B, after token A's Providers closed")
		closing(b, "the last Provider of the module", 1, 1)
		if b.mod.initialized {
			t.Error("the module is initialized after its last Provider closed")
		}
	}()
}

// TestModuleReinitializedOnce: a Reinitialize asked of one Provider
// re-initializes the module for the three of two tokens: one C_Finalize,
// one C_Initialize, every token logged in again; every Provider moves to
// generation 2; every key of before, whichever Provider it came from,
// fails with ErrStaleKey and makes no call; durable keys sign again. Then
// 32 callers across the three Providers, that saw generation 2 fail,
// re-initialize it once more, together.
func TestModuleReinitializedOnce(t *testing.T) {
	useSpy(t)
	toks := moduleTokens(t, 2)
	var provs []*Provider
	defer checkHandles(t, spyMark(t))
	func() {
		for _, tok := range []*softhsmtest.Token{toks[0], toks[0], toks[1]} {
			provs = append(provs, openOn(t, spyModule, tok))
		}
		var olds []*Signer
		var durables []*DurableSigner
		for _, p := range provs {
			olds = append(olds, mustSigner(t, p, "ec"))
			d, err := p.DurableSigner(KeyRef{Label: "ec"})
			if err != nil {
				t.Fatal(err)
			}
			durables = append(durables, d)
		}
		calls := callsByName(t, func() {
			if err := provs[2].Reinitialize(t.Context()); err != nil {
				t.Fatal(err)
			}
		})
		t.Logf("Reinitialize: %v", calls)
		if calls["C_Finalize"] != 1 || calls["C_Initialize"] != 1 || calls["C_Login"] != 2 {
			t.Errorf("one Reinitialize: %d C_Finalize, %d C_Initialize, %d C_Login; want 1, 1, 2 (every token)", calls["C_Finalize"], calls["C_Initialize"], calls["C_Login"])
		}
		for i, p := range provs {
			if st := p.Stats(); st.Generation != 2 || st.State != StateHealthy || st.Reinitializations != 1 {
				t.Errorf("Provider %d: generation %d, %v, %d re-initializations; want 2, healthy, 1", i, st.Generation, st.State, st.Reinitializations)
			}
		}
		stale := callsByName(t, func() {
			for i, s := range olds {
				_, err := s.Sign(nil, digest32[:], crypto.SHA256)
				if !errors.Is(err, ErrStaleKey) {
					t.Errorf("Provider %d's key of generation 1: %v, want ErrStaleKey", i, err)
				}
			}
		})
		if n := total(stale); n != 0 {
			t.Errorf("keys of generation 1 made %d PKCS#11 calls (%v), want none", n, stale)
		}
		for i, d := range durables {
			signs(t, d, fmt.Sprintf("Provider %d's durable key", i))
		}

		// The stampede: 32 callers, that all saw generation 2 fail.
		start := make(chan struct{})
		var wg sync.WaitGroup
		calls = callsByName(t, func() {
			for i := range 32 {
				p := provs[i%3]
				wg.Go(func() {
					<-start
					if err := p.ReinitializeFrom(context.Background(), 2); err != nil {
						t.Errorf("caller %d: %v", i, err)
					}
				})
			}
			close(start)
			wg.Wait()
		})
		t.Logf("32 callers across three Providers: %v", calls)
		if calls["C_Finalize"] != 1 || calls["C_Initialize"] != 1 {
			t.Errorf("32 callers: %d C_Finalize, %d C_Initialize; want 1 each", calls["C_Finalize"], calls["C_Initialize"])
		}
		for i, p := range provs {
			if st := p.Stats(); st.Generation != 3 || st.Reinitializations != 2 {
				t.Errorf("Provider %d: generation %d, %d re-initializations; want 3, 2", i, st.Generation, st.Reinitializations)
			}
		}
		for i, d := range durables {
			signs(t, d, fmt.Sprintf("Provider %d's durable key after the stampede", i))
		}
		for _, p := range provs {
			if err := p.Close(); err != nil {
				t.Fatal(err)
			}
		}
	}()
}

// TestSharedLoginPIN: Providers of one token share its login. One with
// another PIN fails with ErrPIN without a C_Login (it would not be
// checked) and without logging the first out; a PIN the token refused is
// not sent again in the same life of the module (no second login attempt
// towards a lock-out).
func TestSharedLoginPIN(t *testing.T) {
	useSpy(t)
	toks := moduleTokens(t, 2)
	a := openOn(t, spyModule, toks[0])
	sa := mustSigner(t, a, "ec")
	calls := callsByName(t, func() {
		_, err := Open(Config{Path: spyModule, TokenLabel: toks[0].Label, PIN: "9999", ProbeInterval: -1})
		e := wantErr(t, err, ErrPIN)
		if !strings.Contains(e.Error(), "another PIN") {
			t.Errorf("a second Provider with another PIN: %v; want it to say so", e)
		}
	})
	if calls["C_Login"] != 0 || calls["C_Logout"] != 0 || calls["C_Finalize"] != 0 {
		t.Errorf("Open with another PIN of a token logged in: %v; want no C_Login, C_Logout or C_Finalize", calls)
	}
	signs(t, sa, "the first Provider, after another's PIN was refused")

	// Token B, logged in by no one: the wrong PIN costs one attempt, once.
	for i, want := range []int{1, 0} {
		calls := callsByName(t, func() {
			_, err := Open(Config{Path: spyModule, TokenLabel: toks[1].Label, PIN: "9999", ProbeInterval: -1})
			wantErr(t, err, ErrPIN)
		})
		if calls["C_Login"] != want {
			t.Errorf("wrong PIN, attempt %d: %d C_Login, want %d", i+1, calls["C_Login"], want)
		}
	}
	b := openOn(t, spyModule, toks[1])
	signs(t, mustSigner(t, b, "ec"), "token B with its PIN")
	signs(t, sa, "token A")
}

// TestTokenRemovedFromOneSlot: a token whose slot stops answering while
// the module answers for another token is that token's loss: its Provider
// recovers it alone, without C_Finalize, and the other Provider stays
// healthy in its generation all along. SoftHSM does not find a token again
// once its directory has gone; a Reinitialize of the module, asked for,
// brings it back, for both.
func TestTokenRemovedFromOneSlot(t *testing.T) {
	useSpy(t)
	toks := moduleTokens(t, 2)
	a := openOn(t, spyModule, toks[0], fastRecovery)
	b := openOn(t, spyModule, toks[1], fastRecovery)
	sb := mustSigner(t, b, "ec")
	dir, err := toks[0].Dir()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(dir, dir+".gone"); err != nil {
		t.Fatal(err)
	}
	restored := false
	defer func() {
		if !restored {
			os.Rename(dir+".gone", dir)
		}
	}()
	calls := callsByName(t, func() {
		a.probe() // SoftHSM: C_GetTokenInfo of the slot fails, C_GetSlotList answers
		if st := a.State(); st == StateHealthy {
			t.Fatal("the Provider of the removed token is still healthy after a probe")
		}
		// Let automatic recovery try the token a few times.
		waitFor(t, "three re-openings of the removed token", func() bool { return a.Stats().ReinitializationFailures >= 3 }, a)
		signs(t, sb, "the other token, while the removed one is being recovered")
	})
	t.Logf("while token A is gone: %v; A: %v", calls, a.LastError())
	if calls["C_Finalize"] != 0 || calls["C_Initialize"] != 0 {
		t.Errorf("a token's loss re-initialized the module, healthy for the other: %d C_Finalize, %d C_Initialize", calls["C_Finalize"], calls["C_Initialize"])
	}
	if st := b.Stats(); st.Generation != 1 || st.State != StateHealthy || st.Reinitializations != 0 {
		t.Errorf("the other Provider: generation %d, %v, %d re-initializations; want 1, healthy, 0", st.Generation, st.State, st.Reinitializations)
	}
	if !a.tokenScoped() {
		t.Errorf("the removed token's loss is not taken for its own: %v", a.LastError())
	}
	if err := os.Rename(dir+".gone", dir); err != nil {
		t.Fatal(err)
	}
	restored = true
	if err := a.Reinitialize(t.Context()); err != nil {
		t.Fatal(err)
	}
	signs(t, mustSigner(t, a, "ec"), "the token back, after the module's re-initialization")
	if g := b.Generation(); g != 2 {
		t.Errorf("the other Provider is in generation %d after the module's re-initialization, want 2", g)
	}
	signs(t, mustSigner(t, b, "ec"), "the other token, after the module's re-initialization")
}

// remoteConfig is a Provider of tok through p11-kit's client, recovering
// by itself quickly: one session (p11-kit 0.24's client can hang when its
// server dies under concurrent calls, docs/modules.md), probes every 100ms.
func remoteConfig(tok *softhsmtest.Token) Config {
	return Config{Path: softhsmtest.ClientModule, TokenLabel: tok.Label, PIN: tok.PIN,
		MaxSessions: 1, SessionWaitTimeout: 2 * time.Second,
		ProbeInterval: 100 * time.Millisecond, ProbeTimeout: remoteProbeTimeout,
		RecoveryBackoffMin: 20 * time.Millisecond, RecoveryBackoffMax: 200 * time.Millisecond,
		DrainTimeout: 2 * time.Second}
}

// TestModuleOutageTwoTokens: one p11-kit server exports two tokens, one
// Provider each through one client module. The server is killed and
// restarted while a worker signs with both Providers' durable keys, and
// again while it is paused (SIGSTOP): both come back, every signature
// verifies (0 wrong), and each outage re-initialized the module for both.
// A signature in flight when the server goes away may fail (ErrDeviceLost,
// ErrHung, or ErrBusy while the paused server holds the one session); one
// asked for once the loss is seen waits for the recovery.
func TestModuleOutageTwoTokens(t *testing.T) {
	toks := moduleTokens(t, 2)
	srv := softhsmtest.StartServer(t, toks[0], toks[1])
	var provs []*Provider
	var durables []*DurableSigner
	for _, tok := range toks {
		p, err := Open(remoteConfig(tok))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Close() })
		d, err := p.DurableSigner(KeyRef{Label: "ec"})
		if err != nil {
			t.Fatal(err)
		}
		provs, durables = append(provs, p), append(durables, d)
	}
	if provs[0].mod != provs[1].mod {
		t.Fatal("the two Providers do not share the client module")
	}
	// One worker, the two keys in turn: the client module carries one
	// call at a time (see remoteConfig), probes aside.
	stop := make(chan struct{})
	var good [2]atomic.Int64
	var wrong, failed atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			k := i % 2
			d := sha256.Sum256(fmt.Appendf(nil, "signature %d", i))
			ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
			sig, err := durables[k].SignContext(ctx, d[:], crypto.SHA256)
			cancel()
			switch {
			case errors.Is(err, ErrDeviceLost) || errors.Is(err, ErrHung) || errors.Is(err, ErrBusy):
				// A call in flight when the HSM went away, or one that
				// waited for the session a call to the paused server held,
				// before the watchdog found it frozen (SessionWaitTimeout
				// and ProbeTimeout are both 2s).
				failed.Add(1)
			case err != nil:
				t.Errorf("signature %d with token %d: %v", i, k, err)
				return
			case !ecdsa.VerifyASN1(durables[k].Public().(*ecdsa.PublicKey), d[:], sig):
				wrong.Add(1)
			default:
				good[k].Add(1)
			}
		}
	}()
	signing := func(what string) {
		t.Helper()
		a, b := good[0].Load(), good[1].Load()
		waitFor(t, what, func() bool { return good[0].Load() > a+20 && good[1].Load() > b+20 })
	}
	signing("both tokens sign")
	outage := func(what string, lose, back func() error) {
		t.Helper()
		gens := []uint64{provs[0].Generation(), provs[1].Generation()}
		if err := lose(); err != nil {
			t.Fatal(err)
		}
		waitFor(t, what+": both Providers see the loss", func() bool {
			return provs[0].State() != StateHealthy && provs[1].State() != StateHealthy
		}, provs[0], provs[1])
		if err := back(); err != nil {
			t.Fatal(err)
		}
		for i, p := range provs {
			waitFor(t, fmt.Sprintf("%s: Provider %d back", what, i), func() bool {
				return p.State() == StateHealthy && p.Generation() > gens[i]
			}, p)
		}
		signing(what + ": both tokens sign again")
	}
	outage("killed", srv.Kill, srv.Restart)
	outage("paused", func() error { srv.Pause(); return nil }, srv.Restart)
	close(stop)
	<-done
	t.Logf("good signatures: %d with token A, %d with token B; %d wrong, %d failed; generations %d, %d",
		good[0].Load(), good[1].Load(), wrong.Load(), failed.Load(), provs[0].Generation(), provs[1].Generation())
	if wrong.Load() != 0 {
		t.Errorf("%d wrong signatures", wrong.Load())
	}
}

// TestGroupTokensOfOneModule: a group whose members are two tokens of one
// module (one p11-kit server) signs with either; a loss of the module takes
// both down together (the group is unavailable), and both come back with
// it.
func TestGroupTokensOfOneModule(t *testing.T) {
	key := ecKey(t)
	toks := []*softhsmtest.Token{softhsmtest.NewToken(t, "gmod0"), softhsmtest.NewToken(t, "gmod1")}
	for _, tok := range toks {
		tok.ImportKey(t, key, groupRef.ID, groupRef.Label)
	}
	srv := softhsmtest.StartServer(t, toks[0], toks[1])
	g := openGroup(t, GroupConfig{Members: []Config{remoteConfig(toks[0]), remoteConfig(toks[1])}})
	s, err := g.Signer(KeyRef{Label: groupRef.Label})
	if err != nil {
		t.Fatal(err)
	}
	ms := g.Members()
	if ms[0].mod != ms[1].mod {
		t.Fatal("the members do not share the module")
	}
	signs(t, s, "the group")
	if err := srv.Kill(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the group down with its module", func() bool { return g.State() == GroupUnavailable }, members(g)...)
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	sig, err := s.SignContext(ctx, digest32[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if !ecdsa.VerifyASN1(&key.PublicKey, digest32[:], sig) {
		t.Fatal("the group's signature does not verify")
	}
	waitFor(t, "both members back", func() bool { return g.State() == GroupHealthy }, members(g)...)
}
