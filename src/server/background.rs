//! A thread for work that must yield to payments: the chunks of bulk jobs. A chunk of thousands
//! of cards is a few milliseconds of CPU; decided on a tokio worker, it would hold that worker
//! (and, on this 2-core class of machine, half the CPU) while redeems wait behind it. Here it runs
//! on a thread of its own under Linux's `SCHED_IDLE` policy: any other thread that wakes on its
//! CPU takes it at once. A higher nice value is not enough: it shrinks the thread's share of the
//! CPU, but a woken payment thread still waits for the running chunk's time slice to end
//! (measured: redeem p99 during a 1M-card activation 5.5 ms at nice 10, 3.8 ms under SCHED_IDLE,
//! medians of 3 paired runs). The price: while payments keep both cores busy, a job barely
//! advances.
//!
//! `SCHED_IDLE` governs only the thread's own CPU. What a chunk costs after its decision (the
//! committer writing thousands of entries, a longer WAL sync, the flushes) runs at normal priority
//! on the payments' path, so while payments flow the thread is also paced ([`Pace`]): it changes
//! at most `limits.bulk_beside_payments_cards_per_sec` cards a second, and runs flat out again once
//! no payment has come for [`PAYMENTS_QUIET_MS`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Bulk work runs unpaced once no payment request has arrived for this long: a job speeds up
/// within a second of the payments stopping, and a payment every few hundred milliseconds keeps
/// it paced.
pub const PAYMENTS_QUIET_MS: u64 = 1000;

/// A piece of work, returning how many cards it changed (what the pace charges it).
type Work = Box<dyn FnOnce() -> u64 + Send>;

pub struct Background {
    tx: mpsc::Sender<Work>,
    pace: std::sync::Arc<Pace>,
}

/// The bulk thread's pace while payments flow: a piece of work that changed n cards holds the
/// next one until n / `cards_per_sec` seconds after it started (a replayed chunk changes none,
/// and holds nothing back). No budget is saved up: after a pause the next piece starts at once,
/// but never early. Hand-written rather than a rate limiter's `check_n`: the cost is known only
/// once the work is done, and a piece of work must never be refused for being larger than a burst.
/// The bulk thread keeps its own next start time.
pub struct Pace {
    /// The pace; 0 turns it off, so that the connections skip even the clock.
    cards_per_sec: u64,
    epoch: Instant,
    /// When the last payment request arrived, in µs since `epoch`, plus one (0: none yet). Written
    /// at most once a millisecond, so the connections' cores do not pass its cache line around at
    /// every request.
    payment_at_us: AtomicU64,
    /// Seconds the bulk thread has waited for its pace.
    waited_seconds: prometheus::Counter,
}

impl Pace {
    /// A pace of `cards_per_sec` (0: none) that counts its waits in `waited_seconds`.
    pub fn new(cards_per_sec: u64, waited_seconds: prometheus::Counter) -> Pace {
        Pace { cards_per_sec, epoch: Instant::now(), payment_at_us: AtomicU64::new(0), waited_seconds }
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// A payment (an admitted request other than a bulk job's) arrived at `at`.
    pub fn payment(&self, at: Instant) {
        if self.cards_per_sec == 0 {
            return;
        }
        let now = at.saturating_duration_since(self.epoch).as_micros() as u64 + 1;
        let last = self.payment_at_us.load(Ordering::Relaxed);
        if last == 0 || now.saturating_sub(last) >= 1000 {
            // `fetch_max`, not a store: a connection preempted after reading its clock must not
            // date the last payment back.
            self.payment_at_us.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// Whether payments are flowing: one arrived within the last [`PAYMENTS_QUIET_MS`].
    fn paced(&self) -> bool {
        let last = self.payment_at_us.load(Ordering::Relaxed);
        self.cards_per_sec > 0 && last != 0 && (self.now_us() + 1).saturating_sub(last) < PAYMENTS_QUIET_MS * 1000
    }

    /// Blocks the calling (bulk) thread until `next_at`, if payments flow; returns when the work
    /// starts.
    fn wait(&self, next_at: Instant) -> Instant {
        let now = Instant::now();
        if next_at <= now || !self.paced() {
            return now;
        }
        std::thread::sleep(next_at - now);
        let resumed = Instant::now();
        self.waited_seconds.inc_by((resumed - now).as_secs_f64());
        resumed
    }

    /// When the work after the one that started at `started` and changed `cards` cards may start:
    /// that many cards' time after it. Work done while payments were quiet is free, so that its
    /// debt does not hold back a job when they start.
    fn next_start(&self, started: Instant, cards: u64) -> Instant {
        if self.paced() {
            started + Duration::from_micros(cards.saturating_mul(1_000_000) / self.cards_per_sec)
        } else {
            started
        }
    }
}

impl Background {
    /// Starts the thread `name` under `SCHED_IDLE` (or, where that is refused, at nice
    /// `nice_fallback`), taking at most `queue_max` pieces of work waiting; callers beyond that
    /// wait their turn. While payments flow, its work keeps to `pace`.
    pub fn start(name: &str, nice_fallback: i32, queue_max: usize, pace: Pace) -> std::io::Result<Background> {
        let (tx, mut rx) = mpsc::channel::<Work>(queue_max.max(1));
        let pace = std::sync::Arc::new(pace);
        let paced = pace.clone();
        std::thread::Builder::new().name(name.into()).spawn(move || {
            // SAFETY: both calls only read their arguments (the parameter lives on this stack);
            // pid 0 and `gettid` name this thread (Linux: policy and nice value are per thread).
            // A failure leaves the thread at normal priority, which is still correct, only less
            // kind to payments.
            let idle = libc::sched_param { sched_priority: 0 };
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) } != 0 {
                let tid = unsafe { libc::gettid() };
                if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice_fallback) } != 0 {
                    tracing::warn!("could not lower the bulk thread's priority; bulk work competes with payments");
                }
            }
            // When the next piece of work may start, if payments flow then.
            let mut next_at = Instant::now();
            while let Some(work) = rx.blocking_recv() {
                let started = paced.wait(next_at);
                let cards = work();
                next_at = paced.next_start(started, cards);
            }
        })?;
        Ok(Background { tx, pace })
    }

    /// The pace of the thread's work, which the connections tell of every payment.
    pub fn pace(&self) -> &Pace {
        &self.pace
    }

    /// Runs `f` on the thread and returns its result (None if the thread is gone); `cards` says
    /// how many cards the result changed.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
        cards: impl FnOnce(&T) -> u64 + Send + 'static,
    ) -> Option<T> {
        let (done_tx, done_rx) = oneshot::channel();
        let work: Work = Box::new(move || {
            let out = f();
            let n = cards(&out);
            let _ = done_tx.send(out);
            n
        });
        self.tx.send(work).await.ok()?;
        done_rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waits() -> prometheus::Counter {
        prometheus::Counter::new("paced_seconds", "test").unwrap()
    }

    /// The work runs on the bulk thread, under SCHED_IDLE (which needs no privilege to enter).
    #[tokio::test]
    async fn work_runs_on_its_thread_under_sched_idle() {
        let bulk = Background::start("test-bulk", 10, 1, Pace::new(0, waits())).unwrap();
        // SAFETY: sched_getscheduler only reads its argument; pid 0 is the calling thread.
        let (name, policy) = bulk
            .run(|| (std::thread::current().name().map(String::from), unsafe { libc::sched_getscheduler(0) }), |_| 0)
            .await
            .expect("the thread runs");
        assert_eq!(name.as_deref(), Some("test-bulk"));
        assert_eq!(policy, libc::SCHED_IDLE);
    }

    /// Only while payments flow does work wait for its cards: 50,000 cards at 100,000 a second
    /// hold the next piece half a second after the first began.
    #[test]
    fn work_is_charged_for_its_cards_only_while_payments_flow() {
        let mut pace = Pace::new(100_000, waits());
        // An epoch ten seconds back, so that a payment can be dated before the quiet time.
        pace.epoch = Instant::now().checked_sub(Duration::from_secs(10)).expect("the clock is past 10 s");
        let started = Instant::now();
        assert_eq!(pace.next_start(started, 50_000), started, "no payment yet: the job runs flat out");

        pace.payment(Instant::now());
        assert_eq!(pace.next_start(started, 50_000), started + Duration::from_millis(500));

        // A payment older than the quiet time no longer paces: no wait, and the debt is forgiven.
        let quiet_us = PAYMENTS_QUIET_MS * 1000;
        pace.payment_at_us.store(pace.now_us() - quiet_us, Ordering::Relaxed);
        let before = Instant::now();
        let resumed = pace.wait(before + Duration::from_secs(60));
        assert!(resumed - before < Duration::from_secs(30), "a quiet pace does not wait for the debt");
        assert_eq!(pace.next_start(started, 50_000), started);
    }

    /// A paced wait sleeps until its start and counts the wait; 0 cards a second never paces.
    #[test]
    fn a_paced_wait_sleeps_until_its_start_and_counts_it() {
        let waited = waits();
        let pace = Pace::new(1_000, waited.clone());
        pace.payment(Instant::now());
        let started = pace.wait(Instant::now());
        let next_at = pace.next_start(started, 20);
        pace.payment(Instant::now());
        let resumed = pace.wait(next_at);
        assert!(resumed >= started + Duration::from_millis(20), "20 cards at 1,000 a second take 20 ms");
        assert!(waited.get() > 0.0);

        let never = Pace::new(0, waits());
        never.payment(Instant::now());
        assert!(!never.paced());
    }
}
