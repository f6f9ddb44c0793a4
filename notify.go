package hsm

import (
	"bytes"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// notifyQueue is how many changes wait for a slow OnStateChange callback
// (Config's and GroupConfig's) before the oldest waiting one is dropped.
const notifyQueue = 256

// notifier delivers the changes of a Provider's or a Group's state to the
// user's OnStateChange callback: in order, one at a time, from a goroutine
// of its own, never under a lock of its owner's.
//
// The owner queues a change with send, which never blocks, so that it may
// be called under the owner's locks and a slow callback does not slow the
// owner. When notifyQueue changes are already waiting, the oldest waiting
// one is dropped and counted: the last change delivered is always the
// latest.
//
// The owner's Close calls close, which ends the stream after the changes
// queued before, and then wait, which waits for the callback to return for
// the last time, until the deadline of the owner's Close (see
// Config.closeBound). Called from inside the callback, close also stops
// the delivery after the callback that called it, and wait returns at once
// instead of waiting for its own caller.
//
// The methods of a nil *notifier (no callback) do nothing.
type notifier[T any] struct {
	f     func(T)
	queue chan T
	done  chan struct{} // closed when run has returned: no callback runs or will
	// runner is the goroutine id of run, set before its first callback; 0
	// until then.
	runner  atomic.Uint64
	muted   atomic.Bool // close was called from inside the callback: start no other
	dropped atomic.Uint64

	mu     sync.Mutex // protects following field; orders send and close
	closed bool       // queue is closed
}

// newNotifier returns a notifier for f, or nil when f is nil. It does not
// start delivering until start.
func newNotifier[T any](f func(T)) *notifier[T] {
	if f == nil {
		return nil
	}
	return &notifier[T]{f: f, queue: make(chan T, notifyQueue), done: make(chan struct{})}
}

// start starts the goroutine that calls the callback. It ends once close
// has been called and the changes queued before are delivered.
func (n *notifier[T]) start() {
	if n != nil {
		go n.run()
	}
}

func (n *notifier[T]) run() {
	defer close(n.done)
	n.runner.Store(goid())
	for v := range n.queue {
		if !n.muted.Load() {
			n.f(v)
		}
	}
}

// send queues v for the callback, dropping the oldest change waiting when
// the queue is full. After close it does nothing. It never blocks.
func (n *notifier[T]) send(v T) {
	if n == nil {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return
	}
	for {
		select {
		case n.queue <- v:
			return
		default:
		}
		// Full. Only send, under n.mu, adds to the queue: once one change
		// is taken out, by this receive or by run, v fits.
		select {
		case <-n.queue:
			n.dropped.Add(1)
		default:
		}
	}
}

// close ends the stream: the changes queued before are still delivered,
// later sends are ignored. Called from inside the callback, it also stops
// the delivery after that callback: no other starts. It does not wait.
// Calling it again does nothing more.
func (n *notifier[T]) close() {
	if n == nil {
		return
	}
	if n.inCallback() {
		n.muted.Store(true)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.closed {
		n.closed = true
		close(n.queue)
	}
}

// wait waits, after close, until the callback has returned for the last
// time, or until deadline; it reports whether the callback is done. Called
// from inside the callback (its own caller), it returns false at once.
func (n *notifier[T]) wait(deadline time.Time) bool {
	if n == nil {
		return true
	}
	if n.inCallback() {
		return false
	}
	select {
	case <-n.done:
		return true
	default:
	}
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-n.done:
		return true
	case <-t.C:
		return false
	}
}

// droppedCount returns how many changes were dropped because the callback
// fell behind.
func (n *notifier[T]) droppedCount() uint64 {
	if n == nil {
		return 0
	}
	return n.dropped.Load()
}

// inCallback reports whether it is called from inside the callback, or
// from what the callback calls in its own goroutine: whether the caller is
// the notifier's goroutine, which does nothing but call the callback.
//
// There is no way to know that without the goroutine's identity. Close
// takes no argument that could carry a token from the callback (a context,
// a value passed to the callback), and what Close could see instead, that
// a callback is running, does not tell the callback calling Close from
// another goroutine calling Close meanwhile: the first must not wait (it
// would wait for itself until the deadline), the second must (the user
// may free what the callback uses once Close has returned). So the
// notifier's goroutine records its id, and Close compares its own.
func (n *notifier[T]) inCallback() bool {
	id := n.runner.Load()
	return id != 0 && id == goid()
}

// goid returns the id of the calling goroutine, read from the first line of
// its stack trace ("goroutine 18 [running]:"), a format runtime.Stack has
// kept since Go 1 and that net/http's HTTP/2 code reads as well. Should it
// ever change, goid returns 0, which inCallback treats as "not the
// callback": Close from inside a callback then waits until its deadline
// instead of returning at once, bounded still.
func goid() uint64 {
	var buf [32]byte
	b := buf[:runtime.Stack(buf[:], false)]
	b, ok := bytes.CutPrefix(b, []byte("goroutine "))
	if !ok {
		return 0
	}
	var id uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			break
		}
		id = id*10 + uint64(c-'0')
	}
	return id
}
