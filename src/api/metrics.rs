//! Prometheus metrics (`presence_bridge_*`, units in names, `_total` counters).
//!
//! The hot paths (stanza reading, the sequencer, the writer) count in plain atomics; a scrape
//! folds their deltas into the registry's counters and reads the gauges, so no metric update
//! ever sits on the presence path. The API's own metrics (HTTP, WebSocket) are updated in place.

use std::sync::Mutex;
use std::sync::atomic::Ordering;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::AppState;

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(h.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    h
}

const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Every metric of the bridge.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    stanzas_in: IntCounterVec,
    parse_errors: IntCounter,
    dropped: IntCounterVec,
    probes: IntCounter,
    keepalives: IntCounter,
    events: IntCounter,
    changes: IntCounter,
    online_users: IntGauge,
    online_resources: IntGauge,
    known_users: IntGauge,
    xmpp_connected: IntGauge,
    xmpp_stale: IntGauge,
    xmpp_reconnects: IntCounter,
    xmpp_privileges: IntGaugeVec,
    /// Open WebSocket sessions.
    pub ws_sessions: IntGauge,
    /// Frames sent to WebSocket clients.
    pub ws_frames: IntCounter,
    /// Bytes sent to WebSocket clients.
    pub ws_bytes: IntCounter,
    /// Resyncs sent, by reason.
    pub ws_resyncs: IntCounterVec,
    /// Sessions closed by the server, by reason.
    pub ws_closed: IntCounterVec,
    /// Stanza read → WebSocket write latency.
    pub e2e_latency: Histogram,
    /// HTTP requests by route, method and status.
    pub http_requests: IntCounterVec,
    /// HTTP latency by route.
    pub http_latency: HistogramVec,
    store_queue: IntGauge,
    store_written: IntCounter,
    store_spooled_total: IntCounter,
    store_replayed: IntCounter,
    store_skipped: IntCounter,
    store_spooled: IntGauge,
    store_spooling: IntGauge,
    /// Batch sizes written to Postgres.
    pub store_batch_size: Histogram,
    /// Batch write latency.
    pub store_batch_latency: Histogram,
    last: Mutex<Last>,
}

#[derive(Debug, Default)]
struct Last {
    vals: Vec<u64>,
}

impl Metrics {
    /// Registers everything.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let http_latency = HistogramVec::new(
            HistogramOpts::new(
                "presence_bridge_http_request_duration_seconds",
                "HTTP request latency by route",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        r.register(Box::new(http_latency.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        Metrics {
            stanzas_in: counter_vec(
                &r,
                "presence_bridge_stanzas_in_total",
                "Stanzas read from the XMPP server, by type",
                &["type"],
            ),
            parse_errors: counter(
                &r,
                "presence_bridge_stanza_parse_errors_total",
                "Stanzas that failed to parse (skipped)",
            ),
            dropped: counter_vec(
                &r,
                "presence_bridge_presence_dropped_total",
                "Presence stanzas dropped, by reason",
                &["reason"],
            ),
            probes: counter(
                &r,
                "presence_bridge_probes_sent_total",
                "Presence probes sent during resyncs",
            ),
            keepalives: counter(
                &r,
                "presence_bridge_xmpp_keepalives_sent_total",
                "Keepalive pings sent to the XMPP server",
            ),
            events: counter(
                &r,
                "presence_bridge_events_total",
                "Presence events handed to the engine",
            ),
            changes: counter(
                &r,
                "presence_bridge_changes_total",
                "Changes emitted by the engine",
            ),
            online_users: gauge(
                &r,
                "presence_bridge_online_users",
                "Users with at least one resource online",
            ),
            online_resources: gauge(&r, "presence_bridge_online_resources", "Online resources"),
            known_users: gauge(
                &r,
                "presence_bridge_known_users",
                "Users in the presence map (online or not)",
            ),
            xmpp_connected: gauge(
                &r,
                "presence_bridge_xmpp_connected",
                "1 while the XMPP component is connected",
            ),
            xmpp_stale: gauge(
                &r,
                "presence_bridge_xmpp_stale",
                "1 while presence is stale (disconnected after having been connected)",
            ),
            xmpp_reconnects: counter(
                &r,
                "presence_bridge_xmpp_reconnects_total",
                "Successful XMPP reconnections",
            ),
            xmpp_privileges: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "presence_bridge_xmpp_privilege",
                        "XEP-0356 permissions granted (1)",
                    ),
                    &["access", "type"],
                )
                .unwrap_or_else(|e| panic!("{e}"));
                r.register(Box::new(g.clone()))
                    .unwrap_or_else(|e| panic!("{e}"));
                g
            },
            ws_sessions: gauge(&r, "presence_bridge_ws_sessions", "Open WebSocket sessions"),
            ws_frames: counter(
                &r,
                "presence_bridge_ws_frames_sent_total",
                "WebSocket frames sent",
            ),
            ws_bytes: counter(
                &r,
                "presence_bridge_ws_bytes_sent_total",
                "WebSocket payload bytes sent",
            ),
            ws_resyncs: counter_vec(
                &r,
                "presence_bridge_ws_resyncs_total",
                "Resyncs sent to WebSocket clients, by reason",
                &["reason"],
            ),
            ws_closed: counter_vec(
                &r,
                "presence_bridge_ws_closed_total",
                "WebSocket sessions closed by the server, by reason",
                &["reason"],
            ),
            e2e_latency: histogram(
                &r,
                "presence_bridge_stanza_to_ws_seconds",
                "Latency from reading a stanza to writing its change to a WebSocket",
                LATENCY_BUCKETS.to_vec(),
            ),
            http_requests: counter_vec(
                &r,
                "presence_bridge_http_requests_total",
                "HTTP requests by route, method and status",
                &["route", "method", "status"],
            ),
            http_latency,
            store_queue: gauge(
                &r,
                "presence_bridge_store_queue_depth",
                "Events waiting for the store writer",
            ),
            store_written: counter(
                &r,
                "presence_bridge_store_events_written_total",
                "Events written to Postgres",
            ),
            store_spooled_total: counter(
                &r,
                "presence_bridge_store_events_spooled_total",
                "Events appended to the spool",
            ),
            store_replayed: counter(
                &r,
                "presence_bridge_store_events_replayed_total",
                "Events replayed from the spool",
            ),
            store_skipped: counter(
                &r,
                "presence_bridge_store_spool_records_skipped_total",
                "Torn or corrupt spool records skipped",
            ),
            store_spooled: gauge(
                &r,
                "presence_bridge_store_spooled_events",
                "Events waiting in the spool",
            ),
            store_spooling: gauge(
                &r,
                "presence_bridge_store_spooling",
                "1 while batches go to the spool",
            ),
            store_batch_size: histogram(
                &r,
                "presence_bridge_store_batch_events",
                "Events per batch written",
                vec![
                    1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 50000.0,
                ],
            ),
            store_batch_latency: histogram(
                &r,
                "presence_bridge_store_batch_write_seconds",
                "Batch write latency",
                LATENCY_BUCKETS.to_vec(),
            ),
            registry: r,
            last: Mutex::new(Last::default()),
        }
    }

    /// Folds the hot-path counters in and renders the text format.
    pub fn render(&self, st: &AppState) -> String {
        let c = st.component.as_ref().map(|h| h.counters().clone());
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let mut cur: Vec<u64> = Vec::new();
        if let Some(c) = &c {
            cur.extend([
                load(&c.presence_in),
                load(&c.message_in),
                load(&c.iq_in),
                load(&c.parse_errors),
                load(&c.dropped_foreign),
                load(&c.dropped_oversized),
                load(&c.dropped_other),
                load(&c.probes_sent),
                load(&c.keepalives_sent),
                load(&c.events),
            ]);
        } else {
            cur.extend([0; 10]);
        }
        cur.push(st.engine.seq());
        let status = st.component.as_ref().map(|h| h.status());
        cur.push(status.as_ref().map_or(0, |s| s.reconnects));
        let store = st
            .store
            .as_ref()
            .map(|s| (s.status(), s.counters().clone(), s.queue_depth()));
        if let Some((_, k, _)) = &store {
            cur.extend([
                load(&k.events_written),
                load(&k.events_spooled),
                load(&k.events_replayed),
                load(&k.spool_records_skipped),
            ]);
        } else {
            cur.extend([0; 4]);
        }
        {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if last.vals.len() != cur.len() {
                last.vals = vec![0; cur.len()];
            }
            let d: Vec<u64> = cur
                .iter()
                .zip(&last.vals)
                .map(|(n, o)| n.saturating_sub(*o))
                .collect();
            last.vals.clone_from(&cur);
            self.stanzas_in
                .with_label_values(&["presence"])
                .inc_by(d[0]);
            self.stanzas_in.with_label_values(&["message"]).inc_by(d[1]);
            self.stanzas_in.with_label_values(&["iq"]).inc_by(d[2]);
            self.parse_errors.inc_by(d[3]);
            self.dropped
                .with_label_values(&["foreign_domain"])
                .inc_by(d[4]);
            self.dropped.with_label_values(&["oversized"]).inc_by(d[5]);
            self.dropped.with_label_values(&["other"]).inc_by(d[6]);
            self.probes.inc_by(d[7]);
            self.keepalives.inc_by(d[8]);
            self.events.inc_by(d[9]);
            self.changes.inc_by(d[10]);
            self.xmpp_reconnects.inc_by(d[11]);
            self.store_written.inc_by(d[12]);
            self.store_spooled_total.inc_by(d[13]);
            self.store_replayed.inc_by(d[14]);
            self.store_skipped.inc_by(d[15]);
        }
        let stats = st.engine.stats();
        self.online_users.set(stats.online_users as i64);
        self.online_resources.set(stats.online_resources as i64);
        self.known_users.set(st.engine.known_count() as i64);
        if let Some(s) = &status {
            self.xmpp_connected.set(i64::from(s.connected));
            self.xmpp_stale.set(i64::from(s.stale));
            self.xmpp_privileges.reset();
            for (access, ty) in &s.privileges {
                self.xmpp_privileges
                    .with_label_values(&[access.as_str(), ty.as_str()])
                    .set(1);
            }
        }
        if let Some((s, _, depth)) = &store {
            self.store_queue.set(*depth as i64);
            self.store_spooled.set(s.spooled_events as i64);
            self.store_spooling
                .set(i64::from(s.mode == crate::store::StoreMode::Spooling));
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
