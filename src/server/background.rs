//! A thread for work that must yield to payments: the chunks of bulk jobs. A chunk of thousands
//! of cards is a few milliseconds of CPU; decided on a tokio worker, it would hold that worker
//! (and, on this 2-core class of machine, half the CPU) while redeems wait behind it. Here it runs
//! on a thread of its own at a lower priority (a higher nice value), so the scheduler gives the
//! CPU to the workers and the committer first, and bulk work takes what payments leave.

use tokio::sync::{mpsc, oneshot};

type Work = Box<dyn FnOnce() + Send>;

pub struct Background {
    tx: mpsc::Sender<Work>,
}

impl Background {
    /// Starts the thread `name` at `nice` (Linux: a thread's nice value is its own), taking at
    /// most `queue_max` pieces of work waiting; callers beyond that wait their turn.
    pub fn start(name: &str, nice: i32, queue_max: usize) -> std::io::Result<Background> {
        let (tx, mut rx) = mpsc::channel::<Work>(queue_max.max(1));
        std::thread::Builder::new().name(name.into()).spawn(move || {
            // SAFETY: setpriority only reads its integer arguments; `gettid` names this thread.
            // A failure leaves the thread at normal priority, which is still correct, only less
            // kind to payments.
            let tid = unsafe { libc::gettid() };
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
                tracing::warn!("could not lower the bulk thread's priority; bulk work competes with payments");
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
