package hsm

import (
	"bytes"
	"runtime"
	"strings"
	"testing"
	"time"
)

// goroutines returns the stack of every goroutine of the process (system
// goroutines excluded, as runtime.Stack does), keyed by goroutine id.
func goroutines() map[string]string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	all := map[string]string{}
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		// "goroutine 42 [chan receive]:\n..."
		id, _, ok := strings.Cut(strings.TrimPrefix(string(g), "goroutine "), " ")
		if ok {
			all[id] = string(g)
		}
	}
	return all
}

// leakedSince returns the stacks of the goroutines that are not in before,
// once they have not ended within wait (goroutines that are stopping get
// that long to go).
func leakedSince(before map[string]string, wait time.Duration) []string {
	deadline := time.Now().Add(wait)
	for {
		var leaked []string
		for id, stack := range goroutines() {
			if _, ok := before[id]; !ok {
				leaked = append(leaked, stack)
			}
		}
		if len(leaked) == 0 || time.Now().After(deadline) {
			return leaked
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// checkGoroutines fails t when the test leaves a goroutine behind that
// was not running when checkGoroutines was called: every goroutine the test
// started must have ended within 5 s of its end. Tests of this package do
// not run in parallel, so every new goroutine is the test's.
func checkGoroutines(t *testing.T) {
	t.Helper()
	before := goroutines()
	t.Cleanup(func() {
		for _, stack := range leakedSince(before, 5*time.Second) {
			t.Errorf("goroutine left running:\n%s", stack)
		}
	})
}

// TestLeakCheck: leakedSince reports a goroutine started after the
// snapshot and still blocked, and nothing once it has ended.
func TestLeakCheck(t *testing.T) {
	before := goroutines()
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		<-stop
	}()
	leaked := leakedSince(before, 50*time.Millisecond)
	if len(leaked) != 1 || !strings.Contains(leaked[0], "TestLeakCheck") {
		t.Fatalf("a blocked goroutine: leakedSince reported %d goroutines, want it alone:\n%s", len(leaked), strings.Join(leaked, "\n\n"))
	}
	close(stop)
	<-done
	if leaked := leakedSince(before, 5*time.Second); len(leaked) != 0 {
		t.Fatalf("after the goroutine ended: leakedSince reported\n%s", strings.Join(leaked, "\n\n"))
	}
}
