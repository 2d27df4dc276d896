//! Prometheus metrics. Label values come from closed sets (operation names, result code names);
//! never card numbers, merchant ids or client addresses. Hot-path handles are resolved once into
//! arrays indexed by operation and result, so recording a request is two atomic adds.

use crate::model::ResultCode;
use crate::wire::Opcode;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use std::time::Duration;

/// Latency buckets from 25 µs to 50 ms: they resolve the sub-millisecond range the targets live in.
const LATENCY_BUCKETS_SECONDS: &[f64] =
    &[0.000_025, 0.000_05, 0.000_1, 0.000_2, 0.000_3, 0.000_5, 0.000_75, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05];
const GROUP_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];

pub struct Metrics {
    pub registry: Registry,
    requests: Vec<Vec<IntCounter>>,
    latency: Vec<Histogram>,
    wal_group_size: Histogram,
    wal_write_seconds: Histogram,
    wal_fsync_seconds: Histogram,
    wal_bytes: IntCounter,
    pub connections_open: IntGauge,
    pub connections_accepted: IntCounter,
    pub connections_rejected: IntCounter,
    pub protocol_errors: IntCounter,
    pub idempotent_replays: IntCounter,
    pub holds_expired: IntCounter,
    pub idem_keys_memory: IntGauge,
    pub cards_recovered: IntGauge,
    pub recovery_seconds: prometheus::Gauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests_vec = IntCounterVec::new(
            Opts::new("giftd_requests_total", "Requests answered, by operation and result code."),
            &["op", "result"],
        )
        .expect("metric");
        let latency_vec = HistogramVec::new(
            HistogramOpts::new(
                "giftd_request_duration_seconds",
                "From request decoded to reply written, durable wait included, by operation.",
            )
            .buckets(LATENCY_BUCKETS_SECONDS.to_vec()),
            &["op"],
        )
        .expect("metric");
        let wal_group_size = Histogram::with_opts(
            HistogramOpts::new("giftd_wal_group_size", "Decisions committed per WAL write and sync.")
                .buckets(GROUP_SIZE_BUCKETS.to_vec()),
        )
        .expect("metric");
        let wal_write_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "giftd_wal_write_seconds",
                "Seconds per commit group written (WAL append and memtable insert; the fsync is separate).",
            )
            .buckets(LATENCY_BUCKETS_SECONDS.to_vec()),
        )
        .expect("metric");
        let wal_fsync_seconds = Histogram::with_opts(
            HistogramOpts::new("giftd_wal_fsync_seconds", "Seconds per WAL fdatasync.")
                .buckets(LATENCY_BUCKETS_SECONDS.to_vec()),
        )
        .expect("metric");
        let wal_bytes =
            IntCounter::new("giftd_wal_written_bytes_total", "Bytes of write batches committed.").expect("metric");
        let connections_open = IntGauge::new("giftd_connections_open", "Client connections open now.").expect("metric");
        let connections_accepted =
            IntCounter::new("giftd_connections_accepted_total", "Client connections accepted.").expect("metric");
        let connections_rejected = IntCounter::new(
            "giftd_connections_rejected_total",
            "Client connections closed at once because the connection limit was reached.",
        )
        .expect("metric");
        let protocol_errors = IntCounter::new(
            "giftd_protocol_errors_total",
            "Connections closed for a corrupt stream (bad length, version, flags) or a missing handshake.",
        )
        .expect("metric");
        let idempotent_replays = IntCounter::new(
            "giftd_idempotent_replays_total",
            "Mutations answered from their idempotency record instead of being applied again.",
        )
        .expect("metric");
        let holds_expired = IntCounter::new(
            "giftd_holds_expired_total",
            "Holds released by giftd at their deadline (not captured or voided in time).",
        )
        .expect("metric");
        let idem_keys_memory = IntGauge::new(
            "giftd_idempotency_keys_memory",
            "Idempotency keys held in memory (recent or not yet durable); older ones are in the store.",
        )
        .expect("metric");
        let cards_recovered = IntGauge::new("giftd_recovery_cards", "Cards loaded at the last start.").expect("metric");
        let recovery_seconds =
            prometheus::Gauge::new("giftd_recovery_seconds", "Seconds the last start spent recovering.")
                .expect("metric");
        for c in [
            Box::new(requests_vec.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency_vec.clone()),
            Box::new(wal_group_size.clone()),
            Box::new(wal_write_seconds.clone()),
            Box::new(wal_fsync_seconds.clone()),
            Box::new(wal_bytes.clone()),
            Box::new(connections_open.clone()),
            Box::new(connections_accepted.clone()),
            Box::new(connections_rejected.clone()),
            Box::new(protocol_errors.clone()),
            Box::new(idempotent_replays.clone()),
            Box::new(holds_expired.clone()),
            Box::new(idem_keys_memory.clone()),
            Box::new(cards_recovered.clone()),
            Box::new(recovery_seconds.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        let requests = Opcode::ALL
            .iter()
            .map(|op| ResultCode::ALL.iter().map(|r| requests_vec.with_label_values(&[op.name(), r.name()])).collect())
            .collect();
        let latency = Opcode::ALL.iter().map(|op| latency_vec.with_label_values(&[op.name()])).collect();
        Metrics {
            registry,
            requests,
            latency,
            wal_group_size,
            wal_write_seconds,
            wal_fsync_seconds,
            wal_bytes,
            connections_open,
            connections_accepted,
            connections_rejected,
            protocol_errors,
            idempotent_replays,
            holds_expired,
            idem_keys_memory,
            cards_recovered,
            recovery_seconds,
        }
    }

    pub fn request(&self, op: Opcode, result: ResultCode, elapsed: Duration) {
        let r = ResultCode::ALL.iter().position(|c| *c == result).unwrap_or(0);
        self.requests[op.index()][r].inc();
        self.latency[op.index()].observe(elapsed.as_secs_f64());
    }

    pub fn wal_observe(&self, decisions: usize, bytes: usize, elapsed: Duration) {
        self.wal_group_size.observe(decisions as f64);
        self.wal_write_seconds.observe(elapsed.as_secs_f64());
        self.wal_bytes.inc_by(bytes as u64);
    }

    pub fn wal_fsync_observe(&self, elapsed: Duration) {
        self.wal_fsync_seconds.observe(elapsed.as_secs_f64());
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding");
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}
