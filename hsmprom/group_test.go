package hsmprom_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"strings"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/hsmprom"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestGroupCollector: a group of two members holding one key, a SoftHSM
// token in this process and one behind a p11-kit server (two modules, so
// that the server's loss takes one member): the group's metrics follow its signatures,
// the loss of a member (degraded, member_up 0, operations on the other)
// and Close; the members' own collectors register beside it under a
// member label; the linter finds nothing.
func TestGroupCollector(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	var cfgs []hsm.Config
	srvs := make([]*softhsmtest.Server, 2)
	for i := range 2 {
		tok := softhsmtest.NewToken(t, "promgroup")
		tok.ImportKey(t, key, []byte{1}, "k")
		path := softhsmtest.SoftHSMModule
		if i == 1 {
			srvs[i] = softhsmtest.StartServer(t, tok)
			path = srvs[i].Module()
		}
		cfgs = append(cfgs, hsm.Config{Path: path, TokenLabel: tok.Label, PIN: tok.PIN, MaxSessions: 1,
			ProbeInterval: -1, RecoveryBackoffMin: time.Second, RecoveryBackoffMax: time.Second})
	}
	g, err := hsm.OpenGroup(cfgs...)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	s, err := g.Signer(hsm.KeyRef{Label: "k"})
	if err != nil {
		t.Fatal(err)
	}

	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(hsmprom.NewGroupCollector(g))
	for i, p := range g.Members() {
		prometheus.WrapRegistererWith(prometheus.Labels{"member": string(rune('0' + i))}, reg).MustRegister(hsmprom.NewCollector(p))
	}
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
	for range 10 {
		if err := sign(s); err != nil {
			t.Fatal(err)
		}
	}
	const header = `
# HELP hsm_group_operations_total Operations of the group's keys.
# TYPE hsm_group_operations_total counter
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(header+"hsm_group_operations_total 10\n"), "hsm_group_operations_total"); err != nil {
		t.Fatal(err)
	}

	if err := srvs[1].Kill(); err != nil {
		t.Fatal(err)
	}
	for range 10 {
		if err := sign(s); err != nil { // failover: no error
			t.Fatal(err)
		}
	}
	want := `
# HELP hsm_group_healthy_members Members of the group that are healthy now.
# TYPE hsm_group_healthy_members gauge
hsm_group_healthy_members 1
# HELP hsm_group_member_up Whether the member is healthy (1) or not (0).
# TYPE hsm_group_member_up gauge
hsm_group_member_up{member="0"} 1
hsm_group_member_up{member="1"} 0
# HELP hsm_group_state Whether the group is in this state (1) or not (0): healthy (every member healthy), degraded (some), unavailable (none: operations fail fast), closed.
# TYPE hsm_group_state gauge
hsm_group_state{state="closed"} 0
hsm_group_state{state="degraded"} 1
hsm_group_state{state="healthy"} 0
hsm_group_state{state="unavailable"} 0
# HELP hsm_group_operations_failed_total Operations that failed because no member could do them (not for bad input).
# TYPE hsm_group_operations_failed_total counter
hsm_group_operations_failed_total 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"hsm_group_healthy_members", "hsm_group_member_up", "hsm_group_state", "hsm_group_operations_failed_total"); err != nil {
		t.Fatal(err)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	closed := `
# HELP hsm_group_state Whether the group is in this state (1) or not (0): healthy (every member healthy), degraded (some), unavailable (none: operations fail fast), closed.
# TYPE hsm_group_state gauge
hsm_group_state{state="closed"} 1
hsm_group_state{state="degraded"} 0
hsm_group_state{state="healthy"} 0
hsm_group_state{state="unavailable"} 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(closed), "hsm_group_state"); err != nil {
		t.Fatal(err)
	}
}
