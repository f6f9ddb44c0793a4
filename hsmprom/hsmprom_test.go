package hsmprom_test

import (
	"context"
	"crypto"
	"crypto/sha256"
	"errors"
	"fmt"
	"math"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/hsmprom"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
)

func TestMain(m *testing.M) { os.Exit(softhsmtest.Main(m)) }

// open opens a provider for tok through module (SoftHSM in process, or
// p11-kit's client for a served token) and closes it when the test ends.
func open(t *testing.T, module string, tok *softhsmtest.Token, mod ...func(*hsm.Config)) *hsm.Provider {
	t.Helper()
	cfg := hsm.Config{Path: module, TokenLabel: tok.Label, PIN: tok.PIN}
	for _, m := range mod {
		m(&cfg)
	}
	p, err := hsm.Open(cfg)
	if err != nil {
		t.Fatalf("Open(%v): %v", cfg, err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return p
}

// local is a fresh in-process SoftHSM token with a P-256 key "k", and a
// provider for it.
func local(t *testing.T, mod ...func(*hsm.Config)) (*hsm.Provider, *softhsmtest.Token) {
	t.Helper()
	tok := softhsmtest.NewToken(t, "prom")
	tok.GenerateKey(t, softhsmtest.P256, []byte{1}, "k")
	return open(t, softhsmtest.SoftHSMModule, tok, mod...), tok
}

// remote is a fresh token with a P-256 key "k" served by p11-kit server (a
// network HSM), and a provider that reaches it through p11-kit's client
// with one session: p11-kit 0.24.1's client can hang when the server dies
// under several threads (see the core's outage tests).
func remote(t *testing.T, mod ...func(*hsm.Config)) (*hsm.Provider, *softhsmtest.Server) {
	t.Helper()
	tok := softhsmtest.NewToken(t, "promremote")
	tok.GenerateKey(t, softhsmtest.P256, []byte{1}, "k")
	srv := softhsmtest.StartServer(t, tok)
	mod = append([]func(*hsm.Config){func(c *hsm.Config) { c.MaxSessions = 1 }}, mod...)
	return open(t, srv.Module(), tok, mod...), srv
}

func signer(t *testing.T, p *hsm.Provider) *hsm.Signer {
	t.Helper()
	s, err := p.Signer(hsm.KeyRef{Label: "k"})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func sign(s crypto.Signer) error {
	digest := sha256.Sum256([]byte("hsmprom"))
	_, err := s.Sign(nil, digest[:], crypto.SHA256)
	return err
}

func signN(t *testing.T, s crypto.Signer, n int) {
	t.Helper()
	for range n {
		if err := sign(s); err != nil {
			t.Fatal(err)
		}
	}
}

// registry is a pedantic registry (it checks every collected metric
// against the descriptions) with a collector for p.
func registry(t *testing.T, p *hsm.Provider) *prometheus.Registry {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(hsmprom.NewCollector(p)); err != nil {
		t.Fatal(err)
	}
	return reg
}

// series returns the metrics of family name whose labels include want
// (name=value pairs).
func series(t *testing.T, g prometheus.Gatherer, name string, want ...string) []*dto.Metric {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var out []*dto.Metric
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(want); i += 2 {
				if !slices.ContainsFunc(m.GetLabel(), func(l *dto.LabelPair) bool {
					return l.GetName() == want[i] && l.GetValue() == want[i+1]
				}) {
					continue next
				}
			}
			out = append(out, m)
		}
	}
	return out
}

// value is the value of the one series of name with labels want: a
// counter's or gauge's value, a histogram's sample count.
func value(t *testing.T, g prometheus.Gatherer, name string, want ...string) float64 {
	t.Helper()
	ms := series(t, g, name, want...)
	if len(ms) != 1 {
		t.Fatalf("%s%v: %d series, want 1", name, want, len(ms))
	}
	m := ms[0]
	switch {
	case m.Counter != nil:
		return m.GetCounter().GetValue()
	case m.Gauge != nil:
		return m.GetGauge().GetValue()
	case m.Histogram != nil:
		return float64(m.GetHistogram().GetSampleCount())
	}
	t.Fatalf("%s%v: unexpected type %v", name, want, m)
	return 0
}

// snapshot gathers g once, so that several values read from it come from
// one scrape.
func snapshot(t *testing.T, g prometheus.Gatherer) prometheus.Gatherer {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	return prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) { return mfs, nil })
}

// stateIs checks that hsm_state is 1 for state alone, in one scrape.
func stateIs(t *testing.T, g prometheus.Gatherer, state hsm.State, want ...string) {
	t.Helper()
	g = snapshot(t, g)
	for _, st := range []hsm.State{hsm.StateHealthy, hsm.StateUnavailable, hsm.StateReinitializing, hsm.StateFailed, hsm.StateClosed} {
		w := 0.0
		if st == state {
			w = 1
		}
		if got := value(t, g, "hsm_state", append([]string{"state", st.String()}, want...)...); got != w {
			t.Errorf("hsm_state{state=%q} = %v, want %v", st, got, w)
		}
	}
}

const stateHelp = `# HELP hsm_state Whether the provider is in this state (1) or not (0): healthy admits operations; unavailable and reinitializing refuse them while the HSM is lost or being re-initialized; failed means automatic recovery stopped (wrong PIN, another token); closed means Close was called.
# TYPE hsm_state gauge
`

// TestLint: the metrics pass client_golang's linter (promlint), a
// pedantic registry finds every metric described, all are named hsm_*, and
// a fresh provider has the expected number of series.
func TestLint(t *testing.T) {
	p, _ := local(t)
	signN(t, signer(t, p), 1)
	reg := registry(t, p)

	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, pr := range problems {
		t.Errorf("lint: %s: %s", pr.Metric, pr.Text)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if !strings.HasPrefix(mf.GetName(), "hsm_") {
			t.Errorf("metric %s is not named hsm_*", mf.GetName())
		}
		if mf.GetHelp() == "" {
			t.Errorf("metric %s has no help", mf.GetName())
		}
	}
	// 5 states, 6 latency histograms (sign, decrypt, lookup, write, check,
	// derive), no PKCS#11 error yet, and 19 single series: state change,
	// generation, token info, 3 operation counters, in flight, 2
	// re-initialization, 2 probe counters, events dropped, 4 session
	// gauges, 3 wait counters.
	if n := testutil.CollectAndCount(hsmprom.NewCollector(p)); n != 5+6+19 {
		t.Errorf("CollectAndCount = %d, want 30", n)
	}
	tok := p.TokenInfo()
	if got := value(t, reg, "hsm_token_info", "token", tok.Label, "serial", tok.Serial); got != 1 {
		t.Errorf("hsm_token_info = %v", got)
	}
	if got, now := value(t, reg, "hsm_state_change_timestamp_seconds"), float64(time.Now().Unix()); got <= 0 || got > now+1 {
		t.Errorf("hsm_state_change_timestamp_seconds = %v, now %v", got, now)
	}
}

// TestSignaturesCounted: five signatures grow hsm_operations_total and the
// sign histogram's count by five; the histogram has the provider's bucket
// bounds in seconds, cumulative, without a second +Inf bucket.
func TestSignaturesCounted(t *testing.T) {
	p, _ := local(t, func(c *hsm.Config) { c.MaxSessions = 4 })
	s := signer(t, p)
	reg := registry(t, p)

	ops := value(t, reg, "hsm_operations_total")
	signs := value(t, reg, "hsm_operation_duration_seconds", "op", "sign")
	const n = 5
	signN(t, s, n)
	if got := value(t, reg, "hsm_operations_total") - ops; got != n {
		t.Errorf("hsm_operations_total grew by %v, want %d", got, n)
	}
	if got := value(t, reg, "hsm_operation_duration_seconds", "op", "sign") - signs; got != n {
		t.Errorf("sign histogram count grew by %v, want %d", got, n)
	}
	if got := value(t, reg, "hsm_operation_duration_seconds", "op", "lookup"); got < 1 {
		t.Errorf("lookup histogram count %v, want at least the Signer lookup", got)
	}
	for _, op := range []string{"sign", "decrypt", "lookup", "write", "check"} {
		value(t, reg, "hsm_operation_duration_seconds", "op", op) // present, even with no observation
	}

	h := series(t, reg, "hsm_operation_duration_seconds", "op", "sign")[0].GetHistogram()
	bs := h.GetBucket()
	if len(bs) != 16 || bs[0].GetUpperBound() != 0.0001 || bs[len(bs)-1].GetUpperBound() != 10 {
		t.Fatalf("buckets %v, want 16 from 100µs to 10s in seconds", bs)
	}
	last := uint64(0)
	for _, b := range bs {
		if math.IsInf(b.GetUpperBound(), 1) || b.GetCumulativeCount() < last {
			t.Fatalf("buckets %v: not cumulative, or +Inf among them", bs)
		}
		last = b.GetCumulativeCount()
	}
	if last > h.GetSampleCount() || h.GetSampleSum() <= 0 || h.GetSampleSum() > 60*n {
		t.Errorf("count %d, last bucket %d, sum %vs", h.GetSampleCount(), last, h.GetSampleSum())
	}

	for _, g := range []struct {
		name string
		want float64
	}{
		{"hsm_generation", 1},
		{"hsm_max_sessions", 4},
		{"hsm_in_use_sessions", 0},
		{"hsm_operations_in_flight", 0},
		{"hsm_operations_refused_total", 0},
		{"hsm_operations_failed_total", 0},
		{"hsm_reinitializations_total", 0},
		{"hsm_session_wait_timeouts_total", 0},
	} {
		if got := value(t, reg, g.name); got != g.want {
			t.Errorf("%s = %v, want %v", g.name, got, g.want)
		}
	}
	if open, idle := value(t, reg, "hsm_open_sessions"), value(t, reg, "hsm_idle_sessions"); open < 1 || open > 4 || idle != open {
		t.Errorf("after sequential signatures: %v sessions open, %v idle; want 1 to 4, all idle", open, idle)
	}
	if err := testutil.CollectAndCompare(hsmprom.NewCollector(p), strings.NewReader(stateHelp+`
hsm_state{state="closed"} 0
hsm_state{state="failed"} 0
hsm_state{state="healthy"} 1
hsm_state{state="reinitializing"} 0
hsm_state{state="unavailable"} 0
`), "hsm_state"); err != nil {
		t.Error(err)
	}
}

// TestReinitializeAndStaleKey: a re-initialization moves hsm_generation to
// 2 and counts in hsm_reinitializations_total; a key of generation 1 is
// then refused without a PKCS#11 call, in hsm_operations_refused_total.
func TestReinitializeAndStaleKey(t *testing.T) {
	p, _ := local(t)
	s := signer(t, p)
	reg := registry(t, p)
	ops := value(t, reg, "hsm_operations_total")

	if err := p.Reinitialize(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := sign(s); !errors.Is(err, hsm.ErrStaleKey) {
		t.Fatalf("old key after re-initialization: %v, want ErrStaleKey", err)
	}
	stateIs(t, reg, hsm.StateHealthy)
	for _, g := range []struct {
		name string
		want float64
	}{
		{"hsm_generation", 2},
		{"hsm_reinitializations_total", 1},
		{"hsm_reinitialization_failures_total", 0},
		{"hsm_operations_refused_total", 1},
		{"hsm_operations_total", ops},
	} {
		if got := value(t, reg, g.name); got != g.want {
			t.Errorf("%s = %v, want %v", g.name, got, g.want)
		}
	}
}

// TestClosedProvider: the collector keeps working after Close: state
// closed, no token info, and operations refused.
func TestClosedProvider(t *testing.T) {
	p, _ := local(t)
	s := signer(t, p)
	reg := registry(t, p)
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := sign(s); !errors.Is(err, hsm.ErrClosed) {
		t.Fatalf("sign after Close: %v, want ErrClosed", err)
	}
	if err := testutil.GatherAndCompare(reg, strings.NewReader(stateHelp+`
hsm_state{state="closed"} 1
hsm_state{state="failed"} 0
hsm_state{state="healthy"} 0
hsm_state{state="reinitializing"} 0
hsm_state{state="unavailable"} 0
`), "hsm_state"); err != nil {
		t.Error(err)
	}
	if ms := series(t, reg, "hsm_token_info"); len(ms) != 0 {
		t.Errorf("hsm_token_info of a closed provider: %v", ms)
	}
	if got := value(t, reg, "hsm_operations_refused_total"); got != 1 {
		t.Errorf("hsm_operations_refused_total = %v, want 1", got)
	}
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) != 0 {
		t.Errorf("lint after Close: %v %v", problems, err)
	}
}

// lostCode checks that err is a device loss and returns the name its CKR
// code has in hsm_pkcs11_errors_total.
func lostCode(t *testing.T, err error) string {
	t.Helper()
	var e *hsm.Error
	if !errors.Is(err, hsm.ErrDeviceLost) || !errors.As(err, &e) || e.Code == 0 {
		t.Fatalf("sign with the HSM killed: %v, want a device-loss *hsm.Error", err)
	}
	return hsm.CodeName(e.Code)
}

// TestOutageManualRecovery: a network HSM (p11-kit) is killed; the next
// signature fails with a device-loss code, which is counted by code, and
// the provider is unavailable; a re-initialization while the HSM is down
// counts as a failure; after the restart one succeeds: healthy, generation
// 2. Recovery is driven by hand so that every count is exact.
func TestOutageManualRecovery(t *testing.T) {
	p, srv := remote(t, func(c *hsm.Config) {
		c.DisableAutoRecovery = true
		c.ProbeInterval = -1
	})
	s := signer(t, p)
	reg := registry(t, p)
	signN(t, s, 1)
	failed := value(t, reg, "hsm_operations_failed_total")

	if err := srv.Kill(); err != nil {
		t.Fatal(err)
	}
	code := lostCode(t, sign(s))
	stateIs(t, reg, hsm.StateUnavailable)
	if got := value(t, reg, "hsm_pkcs11_errors_total", "code", code); got != 1 {
		t.Errorf("hsm_pkcs11_errors_total{code=%q} = %v, want 1", code, got)
	}
	if got := value(t, reg, "hsm_operations_failed_total") - failed; got != 1 {
		t.Errorf("hsm_operations_failed_total grew by %v, want 1", got)
	}
	if err := sign(s); !errors.Is(err, hsm.ErrUnavailable) {
		t.Fatalf("sign while unavailable: %v, want ErrUnavailable", err)
	}
	if got := value(t, reg, "hsm_operations_refused_total"); got != 1 {
		t.Errorf("hsm_operations_refused_total = %v, want 1", got)
	}

	if err := p.Reinitialize(t.Context()); err == nil {
		t.Fatal("re-initialized with the HSM down")
	}
	stateIs(t, reg, hsm.StateUnavailable)
	if got := value(t, reg, "hsm_reinitialization_failures_total"); got != 1 {
		t.Errorf("hsm_reinitialization_failures_total = %v, want 1", got)
	}

	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	if err := p.Reinitialize(t.Context()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := p.WaitHealthy(ctx); err != nil {
		t.Fatal(err)
	}
	signN(t, signer(t, p), 1)
	stateIs(t, reg, hsm.StateHealthy)
	for _, g := range []struct {
		name string
		want float64
	}{
		{"hsm_generation", 2},
		{"hsm_reinitializations_total", 1},
		{"hsm_reinitialization_failures_total", 1},
	} {
		if got := value(t, reg, g.name); got != g.want {
			t.Errorf("%s = %v, want %v", g.name, got, g.want)
		}
	}
}

// TestOutageAutomaticRecovery: as an operator sees an outage with automatic
// recovery: the HSM is killed, a signature fails and is counted by code,
// the provider is not healthy; the HSM is restarted and the provider
// recovers by itself with exactly one re-initialization.
func TestOutageAutomaticRecovery(t *testing.T) {
	p, srv := remote(t, func(c *hsm.Config) { c.ProbeInterval = -1 })
	s := signer(t, p)
	reg := registry(t, p)
	signN(t, s, 1)

	if err := srv.Kill(); err != nil {
		t.Fatal(err)
	}
	code := lostCode(t, sign(s))
	// The provider is unavailable, or already trying to re-initialize
	// (one scrape: the monitor moves it between the two).
	scrape := snapshot(t, reg)
	if got := value(t, scrape, "hsm_state", "state", "healthy"); got != 0 {
		t.Errorf(`hsm_state{state="healthy"} = %v after the loss, want 0`, got)
	}
	if got := value(t, scrape, "hsm_state", "state", "unavailable") + value(t, scrape, "hsm_state", "state", "reinitializing"); got != 1 {
		t.Errorf("unavailable + reinitializing = %v, want 1", got)
	}
	if got := value(t, scrape, "hsm_pkcs11_errors_total", "code", code); got < 1 {
		t.Errorf("hsm_pkcs11_errors_total{code=%q} = %v, want at least 1", code, got)
	}

	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := p.WaitHealthy(ctx); err != nil {
		t.Fatal(err)
	}
	stateIs(t, reg, hsm.StateHealthy)
	if got := value(t, reg, "hsm_reinitializations_total"); got != 1 {
		t.Errorf("hsm_reinitializations_total = %v, want 1", got)
	}
	if got := value(t, reg, "hsm_generation"); got != 2 {
		t.Errorf("hsm_generation = %v, want 2", got)
	}
	t.Logf("re-initializations that failed while the HSM was down: %v", value(t, reg, "hsm_reinitialization_failures_total"))
}

// TestTwoProviders: two providers (SoftHSM in process, and another token
// through p11-kit) registered in one registry through
// prometheus.WrapRegistererWith: no conflict, distinct series told apart
// by the hsm label, each counting its own operations, and a clean lint.
// Without the wrapping the second registration is refused.
func TestTwoProviders(t *testing.T) {
	primary, _ := local(t)
	backup, _ := remote(t)

	reg := prometheus.NewPedanticRegistry()
	for name, p := range map[string]*hsm.Provider{"primary": primary, "backup": backup} {
		if err := prometheus.WrapRegistererWith(prometheus.Labels{"hsm": name}, reg).Register(hsmprom.NewCollector(p)); err != nil {
			t.Fatalf("register %s: %v", name, err)
		}
	}
	if err := reg.Register(hsmprom.NewCollector(backup)); err == nil {
		t.Error("two collectors without distinguishing labels registered in one registry")
	}

	signN(t, signer(t, primary), 3)
	signN(t, signer(t, backup), 2)
	for name, want := range map[string]float64{"primary": 3, "backup": 2} {
		if got := value(t, reg, "hsm_operation_duration_seconds", "hsm", name, "op", "sign"); got != want {
			t.Errorf("%s: %v signatures, want %v", name, got, want)
		}
		stateIs(t, reg, hsm.StateHealthy, "hsm", name)
		tok := map[string]*hsm.Provider{"primary": primary, "backup": backup}[name].TokenInfo()
		if got := value(t, reg, "hsm_token_info", "hsm", name, "serial", tok.Serial); got != 1 {
			t.Errorf("%s: hsm_token_info = %v", name, got)
		}
	}
	if n := len(series(t, reg, "hsm_state")); n != 10 {
		t.Errorf("%d hsm_state series, want 5 per provider", n)
	}
	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, pr := range problems {
		t.Errorf("lint: %s: %s", pr.Metric, pr.Text)
	}
}

// TestNilProvider: NewCollector refuses a nil provider at once rather than
// at the first scrape.
func TestNilProvider(t *testing.T) {
	defer func() {
		if r := recover(); r == nil || !strings.Contains(fmt.Sprint(r), "nil") {
			t.Errorf("NewCollector(nil): recovered %v, want a panic naming nil", r)
		}
	}()
	hsmprom.NewCollector(nil)
}
