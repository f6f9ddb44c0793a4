package hsm

import (
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"math"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
)

// TestStatsSessionsAndLatency: Stats shows the session pool (capacity,
// open, in use, idle, waits) and counts each admitted operation once in the
// latency histogram of its kind.
func TestStatsSessionsAndLatency(t *testing.T) {
	p := openShared(t, func(c *Config) { c.MaxSessions = 2; c.SessionWaitTimeout = 50 * time.Millisecond })
	base := p.Stats()
	if base.Sessions.MaxSessions != 2 || base.Sessions.InUse != 0 {
		t.Fatalf("fresh pool: %+v", base.Sessions)
	}
	for _, kind := range []string{"sign", "decrypt", "lookup", "write", "check"} {
		h, ok := base.Latency[kind]
		if !ok || len(h.Buckets) != len(latencyBounds)+1 || h.Buckets[len(h.Buckets)-1].UpperBound != math.MaxInt64 {
			t.Fatalf("latency %q: %+v", kind, h)
		}
	}

	s := mustSigner(t, p, "p256")
	d, err := p.Decrypter(KeyRef{Label: "rsa2048"})
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("stats"))
	const n = 7
	for range n {
		if _, err := s.Sign(nil, digest[:], crypto.SHA256); err != nil {
			t.Fatal(err)
		}
	}
	ct := encryptTo(t, d.Public().(*rsa.PublicKey), []byte("secret"), &rsa.OAEPOptions{Hash: crypto.SHA1})
	if _, err := d.Decrypt(nil, ct, &rsa.OAEPOptions{Hash: crypto.SHA1}); err != nil {
		t.Fatal(err)
	}
	// Bad input is refused before admission, and not timed.
	if _, err := s.Sign(nil, digest[:1], crypto.SHA256); err == nil {
		t.Fatal("a short digest was signed")
	}

	st := p.Stats()
	delta := func(kind string) uint64 { return st.Latency[kind].Count - base.Latency[kind].Count }
	// n signatures; the proof of the EC key at its lookup is a check.
	if got := delta("sign"); got != n {
		t.Errorf("sign latency counted %d, want %d", got, n)
	}
	if got := delta("check"); got < 1 {
		t.Errorf("check latency counted %d, want at least 1 (the lookup's proof; probes count there too)", got)
	}
	if got := delta("decrypt"); got != 1 {
		t.Errorf("decrypt latency counted %d, want 1", got)
	}
	if got := delta("lookup"); got != 2 {
		t.Errorf("lookup latency counted %d, want 2 (Signer, Decrypter)", got)
	}
	for kind, h := range st.Latency {
		last := uint64(0)
		for _, b := range h.Buckets {
			if b.Count < last {
				t.Fatalf("%s: buckets not cumulative: %+v", kind, h.Buckets)
			}
			last = b.Count
		}
		if last != h.Count || (h.Count > 0) != (h.Sum > 0) {
			t.Fatalf("%s: count %d, last bucket %d, sum %v", kind, h.Count, last, h.Sum)
		}
	}
	ss := st.Sessions
	if ss.InUse != 0 || ss.Open < 1 || ss.Open > 2 || ss.Idle != ss.Open || ss.WaitCount != 0 {
		t.Fatalf("idle pool after sequential operations: %+v", ss)
	}

	// Hold both slots: the next operation waits, then fails with ErrBusy.
	held, release := make(chan struct{}, 2), make(chan struct{})
	for range 2 {
		go p.withSession("hold", func(*instance, pkcs11.SessionHandle) error {
			held <- struct{}{}
			<-release
			return nil
		})
	}
	<-held
	<-held
	if ss := p.Stats().Sessions; ss.InUse != 2 || ss.Idle != ss.Open-2 {
		t.Errorf("both slots held: %+v", ss)
	}
	_, err = s.Sign(nil, digest[:], crypto.SHA256)
	wantErr(t, err, ErrBusy)
	close(release)
	ss = p.Stats().Sessions
	// The refused signature's wait, and perhaps the probe that its
	// ErrBusy starts at once (a full pool may be a frozen HSM), which waits
	// for a slot too.
	if ss.WaitCount < 1 || ss.WaitCount > 2 || ss.WaitTimeouts < 1 || ss.WaitDuration < 50*time.Millisecond {
		t.Fatalf("after one wait that timed out: %+v", ss)
	}
}
