//! `/metrics`: renders the one registry every layer registered its metrics in (Prometheus text
//! format, `presence_bridge_*`, units in names, `_total` counters), and the API's own metrics.
//!
//! Nothing here copies values from other layers: the engine, the sources and the store update
//! their metrics where things happen (see [`crate::telemetry`]).

use prometheus::{
    Encoder, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry,
    TextEncoder,
};

use crate::telemetry::{self, LATENCY_BUCKETS};

/// The API's own metrics (HTTP, WebSocket, end-to-end latency).
#[derive(Debug, Clone)]
pub struct ApiMetrics {
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
    /// Keys held by each rate limiter after its last pruning.
    pub rate_limiter_keys: IntGaugeVec,
}

impl ApiMetrics {
    /// Registers the API's metrics in `r`.
    pub fn new(r: &Registry) -> Self {
        Self {
            ws_sessions: telemetry::gauge(
                r,
                "presence_bridge_ws_sessions",
                "Open WebSocket sessions",
            ),
            ws_frames: telemetry::counter(
                r,
                "presence_bridge_ws_frames_sent_total",
                "WebSocket frames sent",
            ),
            ws_bytes: telemetry::counter(
                r,
                "presence_bridge_ws_bytes_sent_total",
                "WebSocket payload bytes sent",
            ),
            ws_resyncs: telemetry::counter_vec(
                r,
                "presence_bridge_ws_resyncs_total",
                "Resyncs sent to WebSocket clients, by reason",
                &["reason"],
            ),
            ws_closed: telemetry::counter_vec(
                r,
                "presence_bridge_ws_closed_total",
                "WebSocket sessions closed by the server, by reason",
                &["reason"],
            ),
            e2e_latency: telemetry::histogram(
                r,
                "presence_bridge_stanza_to_ws_seconds",
                "Latency from reading a stanza to writing its change to a WebSocket (one observation per frame: its oldest change)",
                &LATENCY_BUCKETS,
            ),
            http_requests: telemetry::counter_vec(
                r,
                "presence_bridge_http_requests_total",
                "HTTP requests by route, method and status",
                &["route", "method", "status"],
            ),
            http_latency: telemetry::histogram_vec(
                r,
                "presence_bridge_http_request_duration_seconds",
                "HTTP request latency by route",
                &["route"],
                &LATENCY_BUCKETS,
            ),
            rate_limiter_keys: telemetry::gauge_vec(
                r,
                "presence_bridge_rate_limiter_keys",
                "Keys (tokens, IPs) each rate limiter holds after its last pruning",
                &["limiter"],
            ),
        }
    }
}

impl Default for ApiMetrics {
    /// Metrics in a private registry nobody renders (unit tests).
    fn default() -> Self {
        Self::new(&Registry::new())
    }
}

/// The registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}
