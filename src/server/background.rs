//! A thread for work that must yield to payments: the chunks of bulk jobs. A chunk of thousands
//! of cards is a few milliseconds of CPU; decided on a tokio worker, it would hold that worker
//! (and, on this 2-core class of machine, half the CPU) while redeems wait behind it. Here it runs
//! on a thread of its own under Linux's `SCHED_IDLE` policy: any other thread that wakes on its
//! CPU takes it at once. A higher nice value is not enough: it shrinks the thread's share of the
//! CPU, but a woken payment thread still waits for the running chunk's time slice to end
//! (measured: redeem p99 during a 1M-card activation 5.5 ms at nice 10, 3.8 ms under SCHED_IDLE,
//! medians of 3 paired runs). The price: while payments keep both cores busy, a job barely
//! advances.

use tokio::sync::{mpsc, oneshot};

type Work = Box<dyn FnOnce() + Send>;

pub struct Background {
    tx: mpsc::Sender<Work>,
}

impl Background {
    /// Starts the thread `name` under `SCHED_IDLE` (or, where that is refused, at nice
    /// `nice_fallback`), taking at most `queue_max` pieces of work waiting; callers beyond that
    /// wait their turn.
    pub fn start(name: &str, nice_fallback: i32, queue_max: usize) -> std::io::Result<Background> {
        let (tx, mut rx) = mpsc::channel::<Work>(queue_max.max(1));
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
            while let Some(work) = rx.blocking_recv() {
                work();
            }
        })?;
        Ok(Background { tx })
    }

    /// Runs `f` on the thread and returns its result (None if the thread is gone).
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (done_tx, done_rx) = oneshot::channel();
        let work: Work = Box::new(move || {
            let _ = done_tx.send(f());
        });
        self.tx.send(work).await.ok()?;
        done_rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The work runs on the bulk thread, under SCHED_IDLE (which needs no privilege to enter).
    #[tokio::test]
    async fn work_runs_on_its_thread_under_sched_idle() {
        let bulk = Background::start("test-bulk", 10, 1).unwrap();
        // SAFETY: sched_getscheduler only reads its argument; pid 0 is the calling thread.
        let (name, policy) = bulk
            .run(|| (std::thread::current().name().map(String::from), unsafe { libc::sched_getscheduler(0) }))
            .await
            .expect("the thread runs");
        assert_eq!(name.as_deref(), Some("test-bulk"));
        assert_eq!(policy, libc::SCHED_IDLE);
    }
}
