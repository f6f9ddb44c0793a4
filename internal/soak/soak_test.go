package soak

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

func TestMain(m *testing.M) { os.Exit(softhsmtest.Main(m)) }

// TestSoakShort is the soak in short form, run in CI: 8 goroutines sign
// with an EC and an RSA key for 8 s while the p11-kit server is killed and
// restarted, paused and resumed, or restarted frozen during the
// re-initialization, about every second.
func TestSoakShort(t *testing.T) {
	softhsmtest.RequireRemote(t)
	var log strings.Builder
	res, err := Run(Options{Duration: 8 * time.Second, OutageEvery: time.Second, Workers: 8, Log: &log})
	t.Logf("outages:\n%s\n%v", log.String(), res)
	if err != nil {
		t.Fatal(err)
	}
	if !res.OK() {
		t.Fatal("the soak broke a promise (see the report above)")
	}
	if res.Kills == 0 || res.Freezes == 0 || res.Outages == 0 {
		t.Fatal("no outage happened: the soak tested nothing")
	}
}

// TestGroupSoakShort is the group soak in short form, run in CI: 8
// goroutines sign through a group of 3 members for 8 s while each member's
// HSM is killed, paused or restarted frozen about every 1.5 s, with one
// member up at all times: no signature may fail.
func TestGroupSoakShort(t *testing.T) {
	softhsmtest.RequireRemote(t)
	var log strings.Builder
	res, err := RunGroup(Options{Duration: 8 * time.Second, OutageEvery: 1500 * time.Millisecond, Workers: 8, Log: &log}, 3)
	t.Logf("outages:\n%s\n%v", log.String(), res)
	if err != nil {
		t.Fatal(err)
	}
	if !res.OK() {
		t.Fatal("the group soak broke a promise (see the report above)")
	}
	if res.Kills == 0 || res.Pauses+res.Freezes == 0 || res.MostDown < 2 {
		t.Fatalf("the chaos was too mild: %d kills, %d pauses, %d freezes, at most %d down at once", res.Kills, res.Pauses, res.Freezes, res.MostDown)
	}
}
