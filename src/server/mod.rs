//! The server: tokio, connections, backpressure, shutdown. It turns wire requests into engine calls
//! (replacing card numbers with keys) and holds every reply until its commit group is durable.

pub mod access;
pub mod background;
mod connection;
mod events;
pub mod http;

use crate::card_number::{Keyer, PinKeyer};
use crate::config::Limits;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What every connection shares.
pub struct Shared {
    pub engine: Engine,
    pub store: Arc<Store>,
    pub keyer: Keyer,
    pub pin_keyer: PinKeyer,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// The configured clients and the request rates.
    pub access: access::Access,
    /// Where job chunks are decided: a thread that yields to payments.
    pub bulk: background::Background,
}

/// Milliseconds since the Unix epoch: the clock the engine is given.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Accepts connections until `shutdown` fires, then waits (up to the grace period) for every
/// connection to finish its in-flight requests. Returns whether the drain finished in time.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) -> bool {
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(shared.limits.connections_max));
    tracker.spawn(evict_loop(shared.clone(), shutdown.clone()));
    tracker.spawn(expiry_loop(shared.clone(), shutdown.clone()));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((sock, peer)) => match slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    shared.metrics.connections_accepted.inc();
                    let (shared, shutdown) = (shared.clone(), shutdown.clone());
                    tracker.spawn(async move {
                        shared.metrics.connections_open.inc();
                        connection::run(sock, peer, shared.clone(), shutdown).await;
                        shared.metrics.connections_open.dec();
                        drop(permit);
                    });
                }
                Err(_) => {
                    shared.metrics.connections_rejected.inc();
                    tracing::warn!(%peer, limit = shared.limits.connections_max, "connection limit reached; closing");
                }
            },
            Err(e) => {
                // Out of descriptors, or a connection reset before accept: log and keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    drop(listener);
    tracker.close();
    let grace = Duration::from_secs(shared.limits.shutdown_grace_secs);
    tokio::time::timeout(grace, tracker.wait()).await.is_ok()
}

/// Brings the gauges a scrape shows up to date: the commit queue and RocksDB's figures every time,
/// the card census (a walk over every card) at most once a second. Blocking: run it off the
/// async workers.
pub fn refresh_metrics(shared: &Shared) {
    shared.metrics.set_store_stats(&shared.store.stats());
    shared.metrics.set_subscriptions_lag(*shared.store.durable_txn_id().borrow());
    if shared.metrics.census_due() {
        shared.metrics.set_census(&shared.engine.census(now_ms()));
    }
}

/// Holds released per step of the expiry loop; a burst of deadlines is worked off in steps of
/// this size, with the other tasks served between them.
const EXPIRY_STEP_HOLDS_MAX: usize = 512;
/// The expiry loop looks at the earliest deadline at least this often, since a new hold may come
/// due sooner than the one it was sleeping for.
const EXPIRY_CHECK_MS_MAX: i64 = 1000;

/// Releases holds at their deadlines, with no caller: the engine keeps them ordered by deadline,
/// so this visits only what is due. After a restart the first turn releases what came due while
/// giftd was down.
async fn expiry_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let now = now_ms();
        let wait_ms = shared
            .engine
            .next_hold_deadline()
            .map_or(EXPIRY_CHECK_MS_MAX, |at| (at - now).clamp(0, EXPIRY_CHECK_MS_MAX));
        if wait_ms > 0 {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(wait_ms as u64)) => {}
            }
            continue;
        }
        let released = shared.engine.expire_holds(now, EXPIRY_STEP_HOLDS_MAX);
        shared.metrics.holds_expired.inc_by(released as u64);
        tokio::task::yield_now().await;
        if shutdown.is_cancelled() {
            return;
        }
    }
}

/// Forgets durable idempotency keys and invoices older than the memory window, every second (so
/// each sweep has about a second's worth of keys to drop).
async fn evict_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    let window_ms = shared.limits.idem_memory_secs as i64 * 1000;
    let durable = shared.store.durable();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let d = *durable.borrow();
        shared.engine.evict_recent(d, now_ms() - window_ms);
        shared.metrics.idem_keys_in_memory.set(shared.engine.recent_keys() as i64);
    }
}
