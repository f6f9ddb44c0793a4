package hsmprom

import (
	"strconv"

	"github.com/ce46d8f2/hsm"
	"github.com/prometheus/client_golang/prometheus"
)

// groupStates are the values of hsm_group_state's state label.
var groupStates = [...]hsm.GroupState{hsm.GroupHealthy, hsm.GroupDegraded, hsm.GroupUnavailable, hsm.GroupClosed}

// groupCollector reads one GroupStats snapshot per Collect.
type groupCollector struct {
	g *hsm.Group

	state, stateChange, members, healthy                 *prometheus.Desc
	operations, failovers, failed, eventsDropped         *prometheus.Desc
	memberUp, memberOps, memberFailovers, memberInFlight *prometheus.Desc
	memberExcluded                                       *prometheus.Desc
}

// NewGroupCollector returns a collector of g's own metrics, hsm_group_*:
// the group's state, its members and how many are healthy, its operations,
// failovers and failures, and per member (label member, the index given
// to OpenGroup) whether it is healthy, the group's operations on it, the
// failovers away from it, its calls in flight and the keys it is excluded
// for. The members' own metrics come from a NewCollector per member (see
// the package documentation). Each Collect calls g.Stats once and makes no
// PKCS#11 call. It panics if g is nil.
func NewGroupCollector(g *hsm.Group) prometheus.Collector {
	if g == nil {
		panic("hsmprom: NewGroupCollector with a nil *hsm.Group")
	}
	desc := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("hsm_group_"+name, help, labels, nil)
	}
	return &groupCollector{
		g: g,
		state: desc("state",
			"Whether the group is in this state (1) or not (0): healthy (every member healthy), degraded (some), unavailable (none: operations fail fast), closed.",
			"state"),
		stateChange: desc("state_change_timestamp_seconds", "Unix time of the group's last state change."),
		members:     desc("members", "Members of the group."),
		healthy:     desc("healthy_members", "Members of the group that are healthy now."),
		operations:  desc("operations_total", "Operations of the group's keys."),
		failovers: desc("failovers_total",
			"Operations repeated on another member after failing on one because of its HSM (once per repetition)."),
		failed: desc("operations_failed_total",
			"Operations that failed because no member could do them (not for bad input)."),
		eventsDropped: desc("state_events_dropped_total",
			"Group state changes not delivered to GroupConfig.OnStateChange because it fell behind."),
		memberUp: desc("member_up",
			"Whether the member is healthy (1) or not (0).", "member"),
		memberOps: desc("member_operations_total",
			"The group's operations given to the member.", "member"),
		memberFailovers: desc("member_failovers_total",
			"The group's operations that failed on the member and were repeated on another.", "member"),
		memberInFlight: desc("member_operations_in_flight",
			"The group's operations on the member now, including any abandoned while its HSM did not answer.", "member"),
		memberExcluded: desc("member_excluded_keys",
			"Keys of the group for which the member holds another key: it is never used for them.", "member"),
	}
}

// Describe implements prometheus.Collector.
func (c *groupCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		c.state, c.stateChange, c.members, c.healthy,
		c.operations, c.failovers, c.failed, c.eventsDropped,
		c.memberUp, c.memberOps, c.memberFailovers, c.memberInFlight, c.memberExcluded,
	} {
		ch <- d
	}
}

// Collect implements prometheus.Collector: one GroupStats snapshot, sent
// as constant metrics.
func (c *groupCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.g.Stats()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	for _, st := range groupStates {
		v := 0.0
		if st == s.State {
			v = 1
		}
		gauge(c.state, v, st.String())
	}
	gauge(c.stateChange, float64(s.Since.UnixNano())/1e9)
	gauge(c.members, float64(len(s.Members)))
	gauge(c.healthy, float64(s.Healthy))
	counter(c.operations, float64(s.Operations))
	counter(c.failovers, float64(s.Failovers))
	counter(c.failed, float64(s.Failed))
	counter(c.eventsDropped, float64(s.EventsDropped))
	for i, m := range s.Members {
		member := strconv.Itoa(i)
		up := 0.0
		if m.Stats.State == hsm.StateHealthy {
			up = 1
		}
		gauge(c.memberUp, up, member)
		counter(c.memberOps, float64(m.Operations), member)
		counter(c.memberFailovers, float64(m.Failovers), member)
		gauge(c.memberInFlight, float64(m.InFlight), member)
		gauge(c.memberExcluded, float64(len(m.Excluded)), member)
	}
}
