// Package hsmprom exports the health and activity of an *hsm.Provider as
// Prometheus metrics, in the manner of client_golang's
// collectors.NewDBStatsCollector: a fixed set of descriptions, and constant
// metrics built from one hsm.Provider.Stats snapshot per scrape. A scrape
// makes no PKCS#11 call and never waits for the HSM, so it is cheap and
// safe while the HSM is down or hangs.
//
// Register the collector once per provider:
//
//	prometheus.MustRegister(hsmprom.NewCollector(p))
//
// Every metric is named hsm_*. To export several providers from one
// registry, give each its own constant labels with
// prometheus.WrapRegistererWith; the series then differ by that label and
// the registrations do not conflict:
//
//	prometheus.WrapRegistererWith(prometheus.Labels{"hsm": "primary"}, reg).MustRegister(hsmprom.NewCollector(p1))
//	prometheus.WrapRegistererWith(prometheus.Labels{"hsm": "backup"}, reg).MustRegister(hsmprom.NewCollector(p2))
//
// An hsm.Group has metrics of its own, hsm_group_* (NewGroupCollector:
// state, healthy members, operations, failovers, failures, and per member
// whether it is up, its share of the operations, its failovers and the keys
// it is excluded for); its members' provider metrics come from one
// NewCollector per member, labelled:
//
//	reg.MustRegister(hsmprom.NewGroupCollector(g))
//	for i, p := range g.Members() {
//		prometheus.WrapRegistererWith(prometheus.Labels{"member": strconv.Itoa(i)}, reg).MustRegister(hsmprom.NewCollector(p))
//	}
//
// # Metrics
//
// State and identity (gauges):
//
//	hsm_state{state}                       1 for the provider's current state, 0 for the others;
//	                                       state is healthy, unavailable, reinitializing, failed or closed
//	hsm_state_change_timestamp_seconds     Unix time of the last state change
//	hsm_generation                         generation of the PKCS#11 library instance (1 after Open, +1 per re-initialization)
//	hsm_token_info{token,serial,model,manufacturer}
//	                                       1, describing the token (absent once the provider is closed)
//
// Operations:
//
//	hsm_operations_total                   counter: operations admitted (signatures, decryptions, key agreements, lookups, writes; not probes)
//	hsm_operations_refused_total           counter: operations refused without a PKCS#11 call (ErrStaleKey, ErrUnavailable, ErrClosed)
//	hsm_operations_failed_total            counter: admitted operations (and probes) that failed with a PKCS#11 error
//	hsm_pkcs11_errors_total{code}          counter: those errors by return value, e.g. code="CKR_DEVICE_ERROR (0x30)" (hsm.CodeName)
//	hsm_operations_in_flight               gauge: operations inside the PKCS#11 library now
//	hsm_operation_duration_seconds{op}     histogram: time from admission (the wait for a session included) to the
//	                                       end of the PKCS#11 calls, by op: sign, decrypt, lookup, write,
//	                                       check (health probes, URI checks, proofs of possession), derive
//	                                       (ECDH key agreements)
//
// Recovery:
//
//	hsm_reinitializations_total            counter: re-initializations that succeeded
//	hsm_reinitialization_failures_total    counter: re-initializations that failed
//	hsm_probes_total                       counter: health probes run
//	hsm_probe_failures_total               counter: probes that found the HSM lost or hung
//	hsm_state_events_dropped_total         counter: state changes not delivered to Config.OnStateChange
//
// Session pool (named as go_sql_* of collectors.NewDBStatsCollector):
//
//	hsm_max_sessions                       gauge: capacity of the pool
//	hsm_open_sessions                      gauge: operation sessions open (in use plus idle)
//	hsm_in_use_sessions                    gauge: operations holding a session slot
//	hsm_idle_sessions                      gauge: open sessions idle in the pool
//	hsm_session_wait_count_total           counter: operations that found every slot taken and waited
//	hsm_session_wait_duration_seconds_total counter: total time those operations waited
//	hsm_session_wait_timeouts_total        counter: waits that ended with ErrBusy
//
// Alert on hsm_state{state="healthy"} == 0 (the HSM is lost, or recovery
// has stopped when state="failed"), on increase(hsm_reinitializations_total)
// and on rate(hsm_session_wait_timeouts_total) > 0 (the pool is too small
// or the HSM too slow).
package hsmprom

import (
	"math"

	"github.com/ce46d8f2/hsm"
	"github.com/prometheus/client_golang/prometheus"
)

// states are the values of hsm_state's state label, every one reported on
// each scrape so that the series exist before the state first changes.
var states = [...]hsm.State{
	hsm.StateHealthy,
	hsm.StateUnavailable,
	hsm.StateReinitializing,
	hsm.StateFailed,
	hsm.StateClosed,
}

// collector reads one Stats snapshot per Collect; its descriptions are
// fixed at construction.
type collector struct {
	p *hsm.Provider

	state, stateChange, generation, tokenInfo *prometheus.Desc

	operations, refused, failed, errors, inFlight, duration *prometheus.Desc

	reinits, reinitFailures, probes, probeFailures, eventsDropped *prometheus.Desc

	maxSessions, openSessions, inUseSessions, idleSessions *prometheus.Desc
	waitCount, waitDuration, waitTimeouts                  *prometheus.Desc
}

// NewCollector returns a collector that exports p's Stats as the hsm_*
// metrics listed in the package documentation. Each Collect calls p.Stats
// once (and p.TokenInfo), and makes no PKCS#11 call; the collector keeps
// working after p is closed, reporting state "closed". It is safe for
// concurrent use. It panics if p is nil.
//
// Register one collector per provider; to tell several providers apart,
// register each through prometheus.WrapRegistererWith with a label of its
// own (see the package documentation).
func NewCollector(p *hsm.Provider) prometheus.Collector {
	if p == nil {
		panic("hsmprom: NewCollector with a nil *hsm.Provider")
	}
	desc := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("hsm_"+name, help, labels, nil)
	}
	return &collector{
		p: p,

		state: desc("state",
			"Whether the provider is in this state (1) or not (0): healthy admits operations; unavailable and reinitializing refuse them while the HSM is lost or being re-initialized; failed means automatic recovery stopped (wrong PIN, another token); closed means Close was called.",
			"state"),
		stateChange: desc("state_change_timestamp_seconds",
			"Unix time of the provider's last state change (Open counts as one)."),
		generation: desc("generation",
			"Generation of the PKCS#11 library instance: 1 after Open, incremented by each successful re-initialization."),
		tokenInfo: desc("token_info",
			"Token used by the provider, as its current generation found it; always 1.",
			"token", "serial", "model", "manufacturer"),

		operations: desc("operations_total",
			"Operations admitted to the PKCS#11 library: signatures, decryptions, key agreements, key and certificate lookups, writes (health probes are counted in hsm_probes_total)."),
		refused: desc("operations_refused_total",
			"Operations refused without a PKCS#11 call: stale key, provider unavailable or closed."),
		failed: desc("operations_failed_total",
			"Admitted operations that failed with a PKCS#11 error (failed health probes are counted in hsm_probe_failures_total)."),
		errors: desc("pkcs11_errors_total",
			"PKCS#11 errors of admitted operations and health probes, by return value.",
			"code"),
		inFlight: desc("operations_in_flight",
			"Operations inside the PKCS#11 library now."),
		duration: desc("operation_duration_seconds",
			"Time operations took from admission, including the wait for a session, to the end of their PKCS#11 calls, by kind; refused operations are not timed.",
			"op"),

		reinits: desc("reinitializations_total",
			"Re-initializations of the PKCS#11 library (C_Finalize, C_Initialize, login) that succeeded."),
		reinitFailures: desc("reinitialization_failures_total",
			"Re-initializations of the PKCS#11 library that failed."),
		probes: desc("probes_total",
			"Health probes of the HSM run."),
		probeFailures: desc("probe_failures_total",
			"Health probes that found the HSM lost or hung."),
		eventsDropped: desc("state_events_dropped_total",
			"State changes not delivered to Config.OnStateChange because it fell behind."),

		maxSessions: desc("max_sessions",
			"Capacity of the session pool: Config.MaxSessions, lowered to what the token allows."),
		openSessions: desc("open_sessions",
			"Operation sessions open, in use and idle (the login session is not counted)."),
		inUseSessions: desc("in_use_sessions",
			"Operations holding a session slot."),
		idleSessions: desc("idle_sessions",
			"Open sessions idle in the pool."),
		waitCount: desc("session_wait_count_total",
			"Operations that found every session slot taken and waited."),
		waitDuration: desc("session_wait_duration_seconds_total",
			"Total time operations waited for a session slot."),
		waitTimeouts: desc("session_wait_timeouts_total",
			"Waits for a session slot that ended with ErrBusy."),
	}
}

// Describe implements prometheus.Collector: it sends the fixed set of
// descriptions.
func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		c.state, c.stateChange, c.generation, c.tokenInfo,
		c.operations, c.refused, c.failed, c.errors, c.inFlight, c.duration,
		c.reinits, c.reinitFailures, c.probes, c.probeFailures, c.eventsDropped,
		c.maxSessions, c.openSessions, c.inUseSessions, c.idleSessions,
		c.waitCount, c.waitDuration, c.waitTimeouts,
	} {
		ch <- d
	}
}

// Collect implements prometheus.Collector: it takes one snapshot of the
// provider's Stats and sends it as constant metrics.
func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := c.p.Stats()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}

	known := false
	for _, st := range states {
		v := 0.0
		if st == s.State {
			v, known = 1, true
		}
		gauge(c.state, v, st.String())
	}
	if !known { // a state this package does not know yet: still show it
		gauge(c.state, 1, s.State.String())
	}
	gauge(c.stateChange, float64(s.Since.UnixNano())/1e9)
	gauge(c.generation, float64(s.Generation))
	if t := c.p.TokenInfo(); t != (hsm.TokenInfo{}) {
		gauge(c.tokenInfo, 1, t.Label, t.Serial, t.Model, t.Manufacturer)
	}

	counter(c.operations, float64(s.Operations))
	counter(c.refused, float64(s.Refused))
	counter(c.failed, float64(s.Failed))
	for code, n := range s.ErrorsByCode {
		counter(c.errors, float64(n), code)
	}
	gauge(c.inFlight, float64(s.InFlight))
	for op, h := range s.Latency {
		ch <- prometheus.MustNewConstHistogram(c.duration, h.Count, h.Sum.Seconds(), buckets(h), op)
	}

	counter(c.reinits, float64(s.Reinitializations))
	counter(c.reinitFailures, float64(s.ReinitializationFailures))
	counter(c.probes, float64(s.Probes))
	counter(c.probeFailures, float64(s.ProbeFailures))
	counter(c.eventsDropped, float64(s.EventsDropped))

	ss := s.Sessions
	gauge(c.maxSessions, float64(ss.MaxSessions))
	gauge(c.openSessions, float64(ss.Open))
	gauge(c.inUseSessions, float64(ss.InUse))
	gauge(c.idleSessions, float64(ss.Idle))
	counter(c.waitCount, float64(ss.WaitCount))
	counter(c.waitDuration, ss.WaitDuration.Seconds())
	counter(c.waitTimeouts, float64(ss.WaitTimeouts))
}

// buckets converts h's cumulative buckets to Prometheus' form: upper bounds
// in seconds, without the unbounded bucket (Prometheus adds +Inf itself,
// with the count).
func buckets(h hsm.Histogram) map[float64]uint64 {
	m := make(map[float64]uint64, len(h.Buckets))
	for _, b := range h.Buckets {
		if b.UpperBound == math.MaxInt64 {
			continue
		}
		m[b.UpperBound.Seconds()] = b.Count
	}
	return m
}
