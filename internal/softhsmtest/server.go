package softhsmtest

import (
	"testing"

	"github.com/ce46d8f2/hsm/internal/softhsm"
)

// Server serves one token through `p11-kit server`; see softhsm.Server.
type Server = softhsm.Server

// Serve is softhsm.Serve: it starts p11-kit server for tok on the process's
// socket. One server runs at a time: a second Serve waits until the first
// is stopped with Stop.
func Serve(tok *Token, more ...*Token) (*Server, error) { return softhsm.Serve(tok, more...) }

// ServeOwn is softhsm.ServeOwn: a p11-kit server for tok on a socket of
// its own, reached through a copy of the client module, so that several
// run at once (the members of an hsm.Group).
func ServeOwn(tok *Token) (*Server, error) { return softhsm.ServeOwn(tok) }

// StartServer is Serve for tests: it stops the server when the test ends,
// fails the test on error, and skips it where p11-kit is not installed
// (outside CI).
func StartServer(t testing.TB, tok *Token, more ...*Token) *Server {
	t.Helper()
	RequireRemote(t)
	s, err := softhsm.Serve(tok, more...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

// StartOwnServer is softhsm.ServeOwn for tests: a server on a socket of
// its own, reached through a copy of the client module (Module), so that
// several run at once. It stops the server when the test ends.
func StartOwnServer(t testing.TB, tok *Token) *Server {
	t.Helper()
	RequireRemote(t)
	s, err := softhsm.ServeOwn(tok)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}
