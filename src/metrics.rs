//! Prometheus metrics. Label values come from closed sets (operation names, result code names);
//! never card numbers, merchant ids or client addresses. Hot-path handles are resolved on first use
//! into arrays indexed by operation and result, so recording a request is two atomic adds, and a
//! scrape shows only the series that happened (and each operation's approved count from the
//! start), not every operation × result pair.

use crate::engine::alerts::Rule;
use crate::engine::Census;
use crate::model::{ResultCode, Status};
use crate::wire::Opcode;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

/// The git commit giftd was built from (see build.rs).
const REVISION: &str = env!("GIFTD_REVISION");

/// Latency buckets from 25 µs to 50 ms: they resolve the sub-millisecond range the targets live in.
const LATENCY_BUCKETS_SECONDS: &[f64] =
    &[0.000_025, 0.000_05, 0.000_1, 0.000_2, 0.000_3, 0.000_5, 0.000_75, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05];
/// The `op` label of a request whose operation is unknown: its opcode is not one giftd has, or its
/// frame could not be read at all (too large, malformed, another protocol version). Such answers
/// are protocol errors the error-ratio alert counts, so they must be requests too.
pub const OP_UNKNOWN: &str = "unknown";
/// WAL write and fsync buckets: the request-latency resolution from 25 µs to 50 ms, then on to
/// 2.5 s, since stalls of 50 ms to 2 s have been measured on a busy disk (a checkpoint or a
/// compaction writing back behind the WAL). 10 ms stays a bound: the fsync alert's threshold.
const WAL_BUCKETS_SECONDS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_2, 0.000_3, 0.000_5, 0.000_75, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5,
];
const GROUP_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];

/// One more than the largest result code: the request counters are a table indexed by code, so a
/// request finds its series without a search.
const RESULT_SLOTS: usize = {
    let mut max = 0;
    let mut i = 0;
    while i < ResultCode::ALL.len() {
        if ResultCode::ALL[i] as usize > max {
            max = ResultCode::ALL[i] as usize;
        }
        i += 1;
    }
    max + 1
};

/// A commit group's waits, as `giftd_commit_wait_seconds` labels them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitStage {
    /// For the committer to take the group (behind the group it is writing).
    Write,
    /// For the fdatasync that covers the written group (behind the sync running).
    Sync,
}

impl CommitStage {
    const ALL: [CommitStage; 2] = [CommitStage::Write, CommitStage::Sync];

    fn label(self) -> &'static str {
        match self {
            CommitStage::Write => "write",
            CommitStage::Sync => "sync",
        }
    }
}

pub struct Metrics {
    pub registry: Registry,
    requests_vec: IntCounterVec,
    latency_vec: HistogramVec,
    /// Indexed by `Opcode::index`, then by result code (`RESULT_SLOTS`); the last row is
    /// [`OP_UNKNOWN`].
    requests: Vec<Vec<OnceLock<IntCounter>>>,
    /// Indexed by `Opcode::index`.
    latency: Vec<OnceLock<Histogram>>,
    wal_group_size: Histogram,
    wal_write_seconds: Histogram,
    wal_fsync_seconds: Histogram,
    /// By `CommitStage`, resolved once: observed for every commit group.
    commit_wait_seconds: [Histogram; 2],
    wal_bytes: IntCounter,
    pub connections_open: IntGauge,
    pub connections_accepted: IntCounter,
    pub connections_rejected: IntCounter,
    pub protocol_errors: IntCounter,
    pub idempotent_replays: IntCounter,
    pub holds_expired: IntCounter,
    pub idem_keys_in_memory: IntGauge,
    pub cards_recovered: IntGauge,
    pub recovery_seconds: prometheus::Gauge,
    /// Replies queued on connections, decided or not yet durable.
    pub requests_in_flight: IntGauge,
    pub subscriptions_open: IntGauge,
    pub subscriptions_events_sent: IntCounter,
    subscriptions_lag: IntGauge,
    /// Each open subscription's position (the last id it has sent or passed over), for the lag a
    /// scrape shows. A subscription holds the only strong reference: a position whose
    /// subscription has ended is dropped at the next open or scrape, so this holds no more than
    /// the connections limit.
    subscription_positions: std::sync::Mutex<Vec<Weak<AtomicU64>>>,
    /// 1 once recovered and accepting, 0 before and while draining: what `/readyz` answers.
    pub ready: IntGauge,
    cards: IntGaugeVec,
    holds_open: IntGauge,
    held_minor: IntGaugeVec,
    liability_minor: IntGaugeVec,
    commit_queue: IntGauge,
    memtable_bytes: IntGauge,
    pending_compaction_bytes: IntGauge,
    write_stopped: IntGauge,
    write_delayed: IntGauge,
    /// Follows RocksDB's own cumulative figure; the lock makes two scrapes at once add each
    /// second once.
    write_stall_seconds: prometheus::Counter,
    write_stall_lock: std::sync::Mutex<()>,
    /// Security alerts fired, indexed by `Rule as usize - 1`.
    alerts: Vec<IntCounter>,
    /// Requests refused `rate_limited`, by the rate they exceeded: the client's (shared by its
    /// connections) or the connection's.
    pub rate_limited_client: IntCounter,
    pub rate_limited_connection: IntCounter,
    /// `auth` requests refused: an unknown client or a wrong proof.
    pub auth_failures: IntCounter,
    /// Seconds the bulk thread waited for its pace while payments flowed
    /// (`limits.bulk_beside_payments_cards_per_sec`): a job slowed so that payments keep their
    /// latency.
    pub bulk_paced_seconds: prometheus::Counter,
    /// When the census gauges were last refreshed: a scrape storm counts the cards at most once a
    /// second.
    census_at: std::sync::Mutex<Option<std::time::Instant>>,
}

/// Storage figures, read when metrics are scraped.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Decisions appended and waiting for the committer.
    pub commit_queue_decisions: usize,
    pub memtable_bytes: u64,
    pub pending_compaction_bytes: u64,
    /// RocksDB has stopped all writes (every decision waits), or is slowing them down.
    pub write_stopped: bool,
    pub write_delayed: bool,
    /// Seconds writes have waited on RocksDB's write controller since the store was opened (None
    /// when unknown): it counts the stalls that begin and end between two scrapes.
    pub write_stall_seconds: Option<f64>,
}

/// The shortest time between two card censuses.
const CENSUS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("metric")
}

fn gauge_vec(name: &str, help: &str, label: &str) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), &[label]).expect("metric")
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests_vec = IntCounterVec::new(
            Opts::new(
                "giftd_requests_total",
                "Requests answered, by operation (unknown: an unknown opcode or an unreadable frame) and result code.",
            ),
            &["op", "result"],
        )
        .expect("metric");
        let latency_vec = HistogramVec::new(
            HistogramOpts::new(
                "giftd_request_duration_seconds",
                "From a request's frame read to its reply ready to write (durable wait included; the socket write is not), by operation.",
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
            .buckets(WAL_BUCKETS_SECONDS.to_vec()),
        )
        .expect("metric");
        let wal_fsync_seconds = Histogram::with_opts(
            HistogramOpts::new("giftd_wal_fsync_seconds", "Seconds per WAL fdatasync.")
                .buckets(WAL_BUCKETS_SECONDS.to_vec()),
        )
        .expect("metric");
        let commit_wait_seconds = HistogramVec::new(
            HistogramOpts::new(
                "giftd_commit_wait_seconds",
                "Seconds a commit group waited: stage=\"write\" from its first decision until the committer took it \
                 (behind the group being written), stage=\"sync\" from the end of its write until the fdatasync \
                 that covers it began (behind the sync running; the longest-waiting group of each sync). \
                 Batch items wait on purpose until their batch asks for the write.",
            )
            .buckets(WAL_BUCKETS_SECONDS.to_vec()),
            &["stage"],
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
        let idem_keys_in_memory = IntGauge::new(
            "giftd_idempotency_keys_in_memory",
            "Idempotency keys held in memory (recent or not yet durable); older ones are in the store.",
        )
        .expect("metric");
        let cards_recovered = IntGauge::new("giftd_recovery_cards", "Cards loaded at the last start.").expect("metric");
        let recovery_seconds =
            prometheus::Gauge::new("giftd_recovery_seconds", "Seconds the last start spent recovering.")
                .expect("metric");
        let requests_in_flight = gauge(
            "giftd_requests_in_flight",
            "Requests read whose replies are not yet ready to write (decided replies wait to be durable), over all connections.",
        );
        let subscriptions_open = gauge("giftd_subscriptions_open", "Event subscriptions being served now.");
        let subscriptions_events_sent = IntCounter::new(
            "giftd_subscriptions_events_sent_total",
            "Events written to subscribers (each subscriber's copy counts).",
        )
        .expect("metric");
        let subscriptions_lag = gauge(
            "giftd_subscriptions_lag_events",
            "Events the furthest-behind open subscription has yet to send or pass over: the durable id minus its position (0 with none open).",
        );
        let ready = gauge("giftd_ready", "1 when recovered and accepting requests; 0 while starting or draining.");
        let cards =
            gauge_vec("giftd_cards", "Cards in memory by status (counted at scrape, at most once a second).", "status");
        let holds_open = gauge("giftd_holds_open", "Open holds that still reserve money.");
        let held_minor = gauge_vec(
            "giftd_held_minor_units",
            "Money reserved by open holds, per currency, in minor units (cents for USD).",
            "currency",
        );
        let liability_minor = gauge_vec(
            "giftd_liability_minor_units",
            "Outstanding liability per currency: the sum of card balances, in minor units (cents for USD).",
            "currency",
        );
        let commit_queue =
            gauge("giftd_commit_queue_decisions", "Decisions appended and waiting for the committer to write them.");
        let memtable_bytes = gauge("giftd_rocksdb_memtable_bytes", "Bytes in RocksDB memtables, all column families.");
        let pending_compaction_bytes = gauge(
            "giftd_rocksdb_pending_compaction_bytes",
            "RocksDB's estimate of bytes compaction must rewrite; growth ends in write stalls.",
        );
        let write_stopped =
            gauge("giftd_rocksdb_write_stopped", "1 while RocksDB stops all writes (every decision waits).");
        let write_delayed =
            gauge("giftd_rocksdb_write_delayed", "1 while RocksDB slows writes down to let compaction catch up.");
        let write_stall_seconds = prometheus::Counter::new(
            "giftd_rocksdb_write_stall_seconds_total",
            "Seconds writes waited because RocksDB delayed or stopped them (since the start; a wait counts when it ends).",
        )
        .expect("metric");
        let alerts_vec = IntCounterVec::new(
            Opts::new("giftd_alerts_total", "Security alerts fired, by rule (each also written durably and logged)."),
            &["rule"],
        )
        .expect("metric");
        let alerts = Rule::ALL.iter().map(|r| alerts_vec.with_label_values(&[r.name()])).collect();
        let rate_limited_vec = IntCounterVec::new(
            Opts::new(
                "giftd_rate_limited_requests_total",
                "Requests refused rate_limited (a batch counts its items), by the rate exceeded: client or connection.",
            ),
            &["scope"],
        )
        .expect("metric");
        let auth_failures = IntCounter::new(
            "giftd_auth_failures_total",
            "Auth requests refused (unknown client or wrong proof); each closes its connection.",
        )
        .expect("metric");
        let bulk_paced_seconds = prometheus::Counter::new(
            "giftd_bulk_paced_seconds_total",
            "Seconds bulk job chunks waited, while payments flowed, to stay within limits.bulk_beside_payments_cards_per_sec.",
        )
        .expect("metric");
        let build_info = IntGaugeVec::new(
            Opts::new("giftd_build_info", "Always 1; the labels say which giftd is running (version, git commit)."),
            &["version", "revision"],
        )
        .expect("metric");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), REVISION]).set(1);
        for c in [
            Box::new(requests_vec.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency_vec.clone()),
            Box::new(wal_group_size.clone()),
            Box::new(wal_write_seconds.clone()),
            Box::new(wal_fsync_seconds.clone()),
            Box::new(commit_wait_seconds.clone()),
            Box::new(wal_bytes.clone()),
            Box::new(connections_open.clone()),
            Box::new(connections_accepted.clone()),
            Box::new(connections_rejected.clone()),
            Box::new(protocol_errors.clone()),
            Box::new(idempotent_replays.clone()),
            Box::new(holds_expired.clone()),
            Box::new(idem_keys_in_memory.clone()),
            Box::new(cards_recovered.clone()),
            Box::new(recovery_seconds.clone()),
            Box::new(requests_in_flight.clone()),
            Box::new(ready.clone()),
            Box::new(subscriptions_open.clone()),
            Box::new(subscriptions_events_sent.clone()),
            Box::new(subscriptions_lag.clone()),
            Box::new(cards.clone()),
            Box::new(holds_open.clone()),
            Box::new(held_minor.clone()),
            Box::new(liability_minor.clone()),
            Box::new(commit_queue.clone()),
            Box::new(memtable_bytes.clone()),
            Box::new(pending_compaction_bytes.clone()),
            Box::new(write_stopped.clone()),
            Box::new(write_delayed.clone()),
            Box::new(write_stall_seconds.clone()),
            Box::new(build_info),
            Box::new(alerts_vec),
            Box::new(rate_limited_vec.clone()),
            Box::new(auth_failures.clone()),
            Box::new(bulk_paced_seconds.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        let requests: Vec<Vec<OnceLock<IntCounter>>> =
            (0..=Opcode::ALL.len()).map(|_| (0..RESULT_SLOTS).map(|_| OnceLock::new()).collect()).collect();
        let latency = Opcode::ALL.iter().map(|_| OnceLock::new()).collect();
        let metrics = Metrics {
            registry,
            requests_vec,
            latency_vec,
            requests,
            latency,
            wal_group_size,
            wal_write_seconds,
            wal_fsync_seconds,
            commit_wait_seconds: CommitStage::ALL.map(|s| commit_wait_seconds.with_label_values(&[s.label()])),
            wal_bytes,
            connections_open,
            connections_accepted,
            connections_rejected,
            protocol_errors,
            idempotent_replays,
            holds_expired,
            idem_keys_in_memory,
            cards_recovered,
            recovery_seconds,
            requests_in_flight,
            subscriptions_open,
            subscriptions_events_sent,
            subscriptions_lag,
            subscription_positions: std::sync::Mutex::new(Vec::new()),
            ready,
            cards,
            holds_open,
            held_minor,
            liability_minor,
            commit_queue,
            memtable_bytes,
            pending_compaction_bytes,
            write_stopped,
            write_delayed,
            write_stall_seconds,
            write_stall_lock: std::sync::Mutex::new(()),
            alerts,
            rate_limited_client: rate_limited_vec.with_label_values(&["client"]),
            rate_limited_connection: rate_limited_vec.with_label_values(&["connection"]),
            auth_failures,
            bulk_paced_seconds,
            census_at: std::sync::Mutex::new(None),
        };
        // Each operation's approved count exists from the start: a rate over it then sees the
        // first requests too, and a dashboard lists every operation at 0 rather than nothing.
        for op in Opcode::ALL {
            metrics.requests_of(Some(op), ResultCode::Approved);
        }
        metrics
    }

    pub fn alert(&self, rule: Rule) {
        self.alerts[rule as usize - 1].inc();
    }

    /// Whether a census is due (and if so, marks it taken now).
    pub fn census_due(&self) -> bool {
        let mut at = self.census_at.lock().expect("census lock");
        if at.is_some_and(|t| t.elapsed() < CENSUS_INTERVAL) {
            return false;
        }
        *at = Some(std::time::Instant::now());
        true
    }

    pub fn set_census(&self, census: &Census) {
        for s in Status::ALL {
            self.cards.with_label_values(&[s.name()]).set(census.cards_by_status[s as usize] as i64);
        }
        self.holds_open.set(census.holds_open as i64);
        let minor = |v: i128| i64::try_from(v).unwrap_or(i64::MAX);
        // Every currency with cards gets both series, so a currency whose holds all closed shows 0.
        for (currency, sum) in &census.liability_minor {
            let label = [currency.as_str()];
            self.liability_minor.with_label_values(&label).set(minor(*sum));
            self.held_minor.with_label_values(&label).set(minor(census.held_minor.get(currency).copied().unwrap_or(0)));
        }
    }

    pub fn set_store_stats(&self, stats: &StoreStats) {
        self.commit_queue.set(stats.commit_queue_decisions as i64);
        self.memtable_bytes.set(stats.memtable_bytes as i64);
        self.pending_compaction_bytes.set(stats.pending_compaction_bytes as i64);
        self.write_stopped.set(stats.write_stopped as i64);
        self.write_delayed.set(stats.write_delayed as i64);
        if let Some(total) = stats.write_stall_seconds {
            let _one_at_a_time = self.write_stall_lock.lock().expect("write stall lock");
            let counted = self.write_stall_seconds.get();
            if total > counted {
                self.write_stall_seconds.inc_by(total - counted);
            }
        }
    }

    /// Counts an answer. A request of no known operation (`None`) is counted under
    /// [`OP_UNKNOWN`], without a duration: it was never decided.
    pub fn request(&self, op: Option<Opcode>, result: ResultCode, elapsed: Duration) {
        self.requests_of(op, result).inc();
        if let Some(op) = op {
            let latency = self.latency[op.index()].get_or_init(|| self.latency_vec.with_label_values(&[op.name()]));
            latency.observe(elapsed.as_secs_f64());
        }
    }

    /// The series of `op` and `result`, created on first use.
    fn requests_of(&self, op: Option<Opcode>, result: ResultCode) -> &IntCounter {
        let r = result as usize;
        let (row, name) = op.map_or((Opcode::ALL.len(), OP_UNKNOWN), |op| (op.index(), op.name()));
        self.requests[row][r].get_or_init(|| self.requests_vec.with_label_values(&[name, result.name()]))
    }

    /// A subscription's position, starting at `from`, which it moves as it goes; the lag gauge
    /// follows it while the subscription holds it.
    pub fn subscription_position(&self, from: u64) -> Arc<AtomicU64> {
        let position = Arc::new(AtomicU64::new(from));
        let mut positions = self.subscription_positions.lock().expect("subscription positions lock");
        positions.retain(|p| p.strong_count() > 0);
        positions.push(Arc::downgrade(&position));
        position
    }

    /// Sets the lag gauge: how far the furthest-behind open subscription is from `durable_txn_id`.
    pub fn set_subscriptions_lag(&self, durable_txn_id: u64) {
        let mut positions = self.subscription_positions.lock().expect("subscription positions lock");
        positions.retain(|p| p.strong_count() > 0);
        let lag = positions
            .iter()
            .filter_map(Weak::upgrade)
            .map(|p| durable_txn_id.saturating_sub(p.load(Ordering::Relaxed)))
            .max()
            .unwrap_or(0);
        self.subscriptions_lag.set(i64::try_from(lag).unwrap_or(i64::MAX));
    }

    pub fn wal_observe(&self, decisions: usize, bytes: usize, elapsed: Duration) {
        self.wal_group_size.observe(decisions as f64);
        self.wal_write_seconds.observe(elapsed.as_secs_f64());
        self.wal_bytes.inc_by(bytes as u64);
    }

    pub fn wal_fsync_observe(&self, elapsed: Duration) {
        self.wal_fsync_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn commit_wait_observe(&self, stage: CommitStage, elapsed: Duration) {
        self.commit_wait_seconds[stage as usize].observe(elapsed.as_secs_f64());
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
