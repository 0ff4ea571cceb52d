//! Prometheus metrics (`GET /metrics` on the admin listener).
//!
//! Counters on the request path are plain atomics handed out at start (no label look-up per
//! request); gauges that describe the session table (live sessions, users at the limit, open
//! WebSockets) are computed when Prometheus scrapes, from the table itself.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::events::{Events, Kind};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabel {
    upstream: String,
    operation: String,
}

/// What the metrics show of one Qlik node, read at scrape time.
pub struct NodeView {
    pub name: String,
    pub up: bool,
    pub live_sessions: i64,
    pub in_flight: i64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabel {
    upstream: String,
    cause: String,
}

/// The metrics of one guard.
pub struct Metrics {
    registry: Registry,
    by_class: [Counter; 5],
    duration: Histogram,
    upstream_errors: Family<UpstreamLabel, Counter>,
    events: Family<KindLabel, Counter>,
    sessions_live: Gauge,
    users_at_limit: Gauge,
    store_up: Gauge,
    store_calls: Counter,
    store_errors: Counter,
    websockets_open: Gauge,
    node_up: Family<NodeLabel, Gauge>,
    node_sessions: Family<NodeLabel, Gauge>,
    node_in_flight: Family<NodeLabel, Gauge>,
    qps_api_failures: Family<ApiLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests: Family<ClassLabel, Counter> = Family::default();
        registry.register(
            "qsguard_requests",
            "Requests answered, by status class",
            requests.clone(),
        );
        let by_class = ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|c| {
            requests
                .get_or_create(&ClassLabel { class: c.into() })
                .clone()
        });
        let duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "qsguard_request_duration_seconds",
            "Time from the request head to the end of the response",
            duration.clone(),
        );
        let upstream_errors: Family<UpstreamLabel, Counter> = Family::default();
        registry.register(
            "qsguard_upstream_errors",
            "Requests that failed at a Qlik node (unreachable, timeout, broken)",
            upstream_errors.clone(),
        );
        let events: Family<KindLabel, Counter> = Family::default();
        registry.register(
            "qsguard_events",
            "Cookie and session events, by kind",
            events.clone(),
        );
        let sessions_live = Gauge::default();
        registry.register(
            "qsguard_sessions_live",
            "Live Qlik sessions known to the guard",
            sessions_live.clone(),
        );
        let users_at_limit = Gauge::default();
        registry.register(
            "qsguard_users_at_limit",
            "Users with as many live sessions as sessions.max_per_user",
            users_at_limit.clone(),
        );
        let websockets_open = Gauge::default();
        registry.register(
            "qsguard_websockets_open",
            "Open WebSocket tunnels",
            websockets_open.clone(),
        );
        let node_up: Family<NodeLabel, Gauge> = Family::default();
        registry.register(
            "qsguard_upstream_up",
            "1 when the Qlik node is up",
            node_up.clone(),
        );
        let node_sessions: Family<NodeLabel, Gauge> = Family::default();
        registry.register(
            "qsguard_upstream_live_sessions",
            "Live sessions on the Qlik node",
            node_sessions.clone(),
        );
        let node_in_flight: Family<NodeLabel, Gauge> = Family::default();
        registry.register(
            "qsguard_upstream_in_flight",
            "Requests on their way to the Qlik node",
            node_in_flight.clone(),
        );
        let store_up = Gauge::default();
        store_up.set(-1);
        registry.register(
            "qsguard_cluster_store_up",
            "1 while the pair's store ([cluster]) answers, 0 while it does not (the guard decides from its own table), -1 for a single guard",
            store_up.clone(),
        );
        let store_calls = Counter::default();
        registry.register(
            "qsguard_cluster_store_calls",
            "Calls to the pair's store (reserve, look-up, and the batched writes)",
            store_calls.clone(),
        );
        let store_errors = Counter::default();
        registry.register(
            "qsguard_cluster_store_errors",
            "Calls to the pair's store that failed or passed cluster.store_timeout",
            store_errors.clone(),
        );
        let qps_api_failures: Family<ApiLabel, Counter> = Family::default();
        registry.register(
            "qsguard_qps_api_failures",
            "Failed calls to a node's QPS REST API, by operation (owner, end, list)",
            qps_api_failures.clone(),
        );
        Metrics {
            store_up,
            store_calls,
            store_errors,
            qps_api_failures,
            node_up,
            node_sessions,
            node_in_flight,
            registry,
            by_class,
            duration,
            upstream_errors,
            events,
            sessions_live,
            users_at_limit,
            websockets_open,
        }
    }

    /// One answered request.
    pub fn request(&self, status: u16, seconds: f64) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].inc();
        self.duration.observe(seconds);
    }

    pub fn upstream_error(&self, upstream: &str, cause: &str) {
        self.upstream_errors
            .get_or_create(&UpstreamLabel {
                upstream: upstream.into(),
                cause: cause.into(),
            })
            .inc();
    }

    /// Brings the QPS REST API failure counters up to `counts` (node, operation, failures so
    /// far), which the session guard keeps; called before [`Metrics::render`].
    pub fn qps_api_failures(&self, counts: &[(String, &str, u64)]) {
        for (node, op, want) in counts {
            let c = self.qps_api_failures.get_or_create(&ApiLabel {
                upstream: node.clone(),
                operation: (*op).into(),
            });
            let have = c.get();
            if *want > have {
                c.inc_by(want - have);
            }
        }
    }

    /// The pair's store: whether it answers, and the calls and failures so far (kept by the
    /// cluster); called before [`Metrics::render`].
    pub fn cluster(&self, up: bool, calls: u64, errors: u64) {
        self.store_up.set(i64::from(up));
        for (c, want) in [(&self.store_calls, calls), (&self.store_errors, errors)] {
            let have = c.get();
            if want > have {
                c.inc_by(want - have);
            }
        }
    }

    /// The Prometheus text exposition, with the gauges read now.
    pub fn render(
        &self,
        events: &Events,
        sessions_live: i64,
        users_at_limit: i64,
        websockets_open: i64,
        nodes: &[NodeView],
    ) -> String {
        for n in nodes {
            let l = NodeLabel {
                upstream: n.name.clone(),
            };
            self.node_up.get_or_create(&l).set(n.up as i64);
            self.node_sessions.get_or_create(&l).set(n.live_sessions);
            self.node_in_flight.get_or_create(&l).set(n.in_flight);
        }
        for k in Kind::ALL {
            let c = self.events.get_or_create(&KindLabel {
                kind: k.as_str().into(),
            });
            let want = events.count(k);
            let have = c.get();
            if want > have {
                c.inc_by(want - have);
            }
        }
        self.sessions_live.set(sessions_live);
        self.users_at_limit.set(users_at_limit);
        self.websockets_open.set(websockets_open);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_counted() {
        let m = Metrics::new();
        m.request(200, 0.002);
        m.request(502, 0.1);
        m.upstream_error("qlik1", "unreachable");
        let ev = Events::new(10);
        ev.emit(super::super::events::NewEvent::new(Kind::CookieLost, "x"));
        let nodes = [NodeView {
            name: "qlik1".into(),
            up: true,
            live_sessions: 3,
            in_flight: 1,
        }];
        m.qps_api_failures(&[("qlik1".into(), "owner", 2)]);
        let text = m.render(&ev, 7, 1, 2, &nodes);
        assert!(
            text.contains("qsguard_requests_total{class=\"2xx\"} 1"),
            "{text}"
        );
        assert!(text.contains("qsguard_requests_total{class=\"5xx\"} 1"));
        assert!(text
            .contains("qsguard_upstream_errors_total{upstream=\"qlik1\",cause=\"unreachable\"} 1"));
        assert!(text.contains("qsguard_events_total{kind=\"cookie_lost\"} 1"));
        assert!(
            text.contains(
                "qsguard_qps_api_failures_total{upstream=\"qlik1\",operation=\"owner\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("qsguard_sessions_live 7"));
        assert!(text.contains("qsguard_users_at_limit 1"));
        assert!(text.contains("qsguard_websockets_open 2"));
        assert!(text.contains("qsguard_request_duration_seconds_bucket"));
        assert!(
            text.contains("qsguard_upstream_up{upstream=\"qlik1\"} 1"),
            "{text}"
        );
        assert!(text.contains("qsguard_upstream_live_sessions{upstream=\"qlik1\"} 3"));
        assert!(text.contains("qsguard_upstream_in_flight{upstream=\"qlik1\"} 1"));
    }
}
