package hsm

import (
	"slices"
	"sync"
	"testing"
	"time"
)

// recorder is a callback that records what it is given and can be held
// inside a call.
type recorder struct {
	mu   sync.Mutex
	got  []int
	hold chan struct{} // when not nil, each call waits for it to be closed
	in   chan int      // each call sends its value here first, if not nil
}

func (r *recorder) f(v int) {
	if r.in != nil {
		r.in <- v
	}
	if r.hold != nil {
		<-r.hold
	}
	r.mu.Lock()
	r.got = append(r.got, v)
	r.mu.Unlock()
}

func (r *recorder) values() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.got)
}

func seq(from, to int) []int {
	var s []int
	for i := from; i <= to; i++ {
		s = append(s, i)
	}
	return s
}

// TestNotifierOrder: changes sent from several goroutines are delivered
// one at a time, and those of one goroutine in their order; close delivers
// what was queued before it and wait returns once the callback is done.
func TestNotifierOrder(t *testing.T) {
	var mu sync.Mutex
	var got [4][]int
	calls, running := 0, 0
	n := newNotifier(func(v int) {
		mu.Lock()
		running++
		if running > 1 {
			t.Error("two callbacks at once")
		}
		mu.Unlock()
		time.Sleep(10 * time.Microsecond)
		mu.Lock()
		got[v/1000] = append(got[v/1000], v%1000)
		calls++
		running--
		mu.Unlock()
	})
	n.start()
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 50 {
				n.send(g*1000 + i)
			}
		})
	}
	wg.Wait()
	n.close()
	if !n.wait(time.Now().Add(10 * time.Second)) {
		t.Fatal("wait timed out")
	}
	if calls != 200 || n.droppedCount() != 0 {
		t.Fatalf("%d calls, %d dropped; want 200, 0", calls, n.droppedCount())
	}
	for g := range got {
		if !slices.Equal(got[g], seq(0, 49)) {
			t.Fatalf("goroutine %d's changes delivered as %v", g, got[g])
		}
	}
	n.send(7) // after close: ignored, not counted
	if calls != 200 || n.droppedCount() != 0 {
		t.Fatalf("a send after close: %d calls, %d dropped", calls, n.droppedCount())
	}
	n.close() // again: nothing more
}

// TestNotifierOverflow: with the callback held, changes beyond notifyQueue
// push the oldest waiting ones out, counted; the last one delivered is the
// latest; send never blocks.
func TestNotifierOverflow(t *testing.T) {
	r := &recorder{hold: make(chan struct{}), in: make(chan int, 1)}
	n := newNotifier(r.f)
	n.start()
	n.send(0)
	<-r.in // the callback holds 0: the queue is empty
	r.in = nil
	const extra = 10
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 1; i <= notifyQueue+extra; i++ {
			n.send(i)
		}
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("send blocked on a full queue")
	}
	if d := n.droppedCount(); d != extra {
		t.Fatalf("%d dropped, want %d", d, extra)
	}
	close(r.hold)
	n.close()
	if !n.wait(time.Now().Add(10 * time.Second)) {
		t.Fatal("wait timed out")
	}
	want := append([]int{0}, seq(extra+1, notifyQueue+extra)...)
	if got := r.values(); !slices.Equal(got, want) {
		t.Fatalf("delivered %d changes, %v ... %v; want 0, then %d to %d", len(got), got[:min(3, len(got))], got[max(0, len(got)-3):], extra+1, notifyQueue+extra)
	}
}

// TestNotifierCloseFromCallback: close and wait called by the callback
// return at once; the callback that called them is the last one, even with
// changes queued behind it; wait from outside then returns.
func TestNotifierCloseFromCallback(t *testing.T) {
	var n *notifier[int]
	release := make(chan struct{})
	waited := make(chan time.Duration, 1)
	var got []int
	n = newNotifier(func(v int) {
		got = append(got, v)
		if v == 0 {
			<-release
			if !n.inCallback() {
				t.Error("inCallback is false inside the callback")
			}
			start := time.Now()
			n.close()
			if n.wait(time.Now().Add(time.Minute)) {
				t.Error("wait from inside the callback says the callback is done")
			}
			waited <- time.Since(start)
		}
	})
	n.start()
	n.send(0)
	n.send(1)
	n.send(2)
	if n.inCallback() {
		t.Fatal("inCallback is true outside the callback")
	}
	close(release)
	select {
	case d := <-waited:
		if d > time.Second {
			t.Fatalf("close and wait from inside the callback took %v", d)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("close and wait from inside the callback have not returned")
	}
	if !n.wait(time.Now().Add(10 * time.Second)) {
		t.Fatal("wait from outside timed out")
	}
	if !slices.Equal(got, []int{0}) {
		t.Fatalf("delivered %v; want only 0: no callback after the one that closed", got)
	}
}

// TestNotifierWaitBounded: a callback that does not return holds wait until
// its deadline, not longer; a later wait sees it finish.
func TestNotifierWaitBounded(t *testing.T) {
	r := &recorder{hold: make(chan struct{}), in: make(chan int, 1)}
	n := newNotifier(r.f)
	n.start()
	n.send(1)
	<-r.in
	n.close()
	const bound = 100 * time.Millisecond
	start := time.Now()
	if n.wait(start.Add(bound)) {
		t.Fatal("wait says a held callback is done")
	}
	if d := time.Since(start); d < bound || d > bound+2*time.Second {
		t.Fatalf("wait returned after %v; want %v", d, bound)
	}
	close(r.hold)
	if !n.wait(time.Now().Add(10 * time.Second)) {
		t.Fatal("the released callback did not finish")
	}
	if !n.wait(time.Now().Add(-time.Second)) {
		t.Fatal("wait after the end, with a past deadline, says not done")
	}
}

// TestNotifierNil: a nil notifier (no callback) does nothing.
func TestNotifierNil(t *testing.T) {
	n := newNotifier[int](nil)
	if n != nil {
		t.Fatal("newNotifier(nil) is not nil")
	}
	n.start()
	n.send(1)
	n.close()
	if !n.wait(time.Now()) || n.droppedCount() != 0 {
		t.Fatal("a nil notifier waits or drops")
	}
}

// TestNotifierSendCloseRace: sends racing with close neither panic (a send
// on a closed channel) nor deliver after the end.
func TestNotifierSendCloseRace(t *testing.T) {
	for range 50 {
		r := &recorder{}
		n := newNotifier(r.f)
		n.start()
		var wg sync.WaitGroup
		for g := range 4 {
			wg.Go(func() {
				for i := range 100 {
					n.send(g*100 + i)
				}
			})
		}
		n.close()
		wg.Wait()
		if !n.wait(time.Now().Add(10 * time.Second)) {
			t.Fatal("wait timed out")
		}
		before := len(r.values())
		n.send(-1)
		time.Sleep(time.Millisecond)
		if after := len(r.values()); after != before {
			t.Fatalf("%d deliveries after the end", after-before)
		}
	}
}

// TestGoid: goid tells goroutines apart and is stable in one.
func TestGoid(t *testing.T) {
	a, b := goid(), goid()
	other := make(chan uint64)
	go func() { other <- goid() }()
	o := <-other
	if a == 0 || a != b || o == 0 || o == a {
		t.Fatalf("goid: %d, %d here, %d in another goroutine", a, b, o)
	}
}

// TestGroupCloseFromGroupCallback: Group.Close called from inside
// GroupConfig.OnStateChange returns without waiting for that callback, its
// caller, closes the members, and no callback follows (not even the change
// to GroupClosed).
func TestGroupCloseFromGroupCallback(t *testing.T) {
	f := newGroupFixture(t, 1, ecKey(t))
	var g *Group
	ready := make(chan struct{})
	closed := make(chan error, 1)
	var mu sync.Mutex
	var seen []GroupState
	g, err := OpenGroupConfig(GroupConfig{Members: f.configs(), OnStateChange: func(c GroupStateChange) {
		<-ready
		mu.Lock()
		seen = append(seen, c.To)
		mu.Unlock()
		if c.To == GroupUnavailable {
			closed <- g.Close()
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	close(ready)
	if err := f.srvs[0].Kill(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-closed:
		if err != nil {
			t.Fatalf("Close from the group's callback: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close from inside the group's callback has not returned")
	}
	if g.State() != GroupClosed || g.Members()[0].State() != StateClosed {
		t.Fatalf("group %v, member %v after Close", g.State(), g.Members()[0].State())
	}
	if err := g.Close(); err != nil {
		t.Fatalf("Close again: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if seen[len(seen)-1] != GroupUnavailable {
		t.Fatalf("callbacks for %v: one followed the callback that closed the group", seen)
	}
}

// TestGroupCloseBoundedByCallback: a group callback that does not return
// holds Group.Close for the members' bound, DrainTimeout plus ProbeTimeout,
// and no longer.
func TestGroupCloseBoundedByCallback(t *testing.T) {
	f := newGroupFixture(t, 1, ecKey(t))
	release := make(chan struct{})
	defer close(release)
	// ProbeTimeout stays the fixture's second: it also bounds Open, which
	// a loaded machine can make slow.
	g, err := OpenGroupConfig(GroupConfig{Members: f.configs(func(_ int, c *Config) {
		c.DrainTimeout = 100 * time.Millisecond
	}), OnStateChange: func(c GroupStateChange) {
		if c.To == GroupClosed {
			<-release
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	bound := g.Members()[0].cfg.closeBound()
	if d := time.Since(start); d < bound-50*time.Millisecond || d > bound+2*time.Second {
		t.Fatalf("Close with a callback that does not return took %v; want about %v", d, bound)
	}
}
