//! A pipelined connection. giftd answers each connection's requests in the order they were sent (its
//! writer releases replies in request order), so the requests in flight are a FIFO queue and every
//! reply is matched against the oldest one: a reply out of order is a protocol failure, not a lookup.

use anyhow::{anyhow, bail, Result};
use giftd::client::{Client, ClientReader, ClientWriter, Credentials};
use giftd::wire::{Reply, Request};
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// A request in flight.
pub struct Sent {
    pub id: u64,
    /// What the caller needs to check the reply (a card index).
    pub tag: usize,
    /// When the request's latency starts: when it was written to the socket, or, for a paced
    /// request held back because the connection's window was full, when it was due (see
    /// [`Pipe::push_due`]).
    pub at: Instant,
    /// Set for a request held back by a full window: its latency counts from this, not from the write.
    due: Option<Instant>,
}

pub struct Pipe {
    tx: ClientWriter,
    rx: ClientReader,
    inflight: VecDeque<Sent>,
    /// The newest `unflushed` entries of `inflight` are still in the write buffer.
    unflushed: usize,
    /// giftd's per-connection in-flight limit, from the handshake.
    pub inflight_max: usize,
}

/// Who every connection authenticates as (`--client`, `--key-file`), for a giftd that lists
/// clients; set once at start.
pub static CREDENTIALS: std::sync::OnceLock<Credentials> = std::sync::OnceLock::new();

impl Pipe {
    pub async fn connect(addr: &str) -> Result<Pipe> {
        let c = Client::connect_as(addr, CREDENTIALS.get()).await?;
        let inflight_max = c.hello.inflight_max as usize;
        let (tx, rx) = c.into_split();
        Ok(Pipe { tx, rx, inflight: VecDeque::with_capacity(256), unflushed: 0, inflight_max })
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Buffers a request; nothing is written until the next [`Pipe::next`] finds no reply ready.
    pub fn push(&mut self, req: &Request, tag: usize) {
        self.push_due(req, tag, None);
    }

    /// [`Pipe::push`] for a paced request that should have left at `due` but was held back because
    /// the window was full: giftd's slowness delayed it, so its latency counts from `due`. Without
    /// this a slow server would slow the load down and hide its own latency (coordinated omission).
    pub fn push_due(&mut self, req: &Request, tag: usize, due: Option<Instant>) {
        let id = self.tx.send(req);
        // The real send time is stamped at flush; until then any instant will do.
        let at = self.inflight.back().map_or_else(Instant::now, |s| s.at);
        self.inflight.push_back(Sent { id, tag, at, due });
        self.unflushed += 1;
    }

    /// Writes the buffered requests. Paced loops flush before they wait, so that [`Pipe::next`]
    /// never holds a write when it is cancelled.
    pub async fn flush(&mut self) -> Result<()> {
        // One clock read per batch: every request of the batch leaves in the same write.
        let now = Instant::now();
        let n = self.inflight.len();
        for s in self.inflight.range_mut(n - self.unflushed..) {
            s.at = s.due.map_or(now, |due| due.min(now));
        }
        self.unflushed = 0;
        self.tx.flush().await
    }

    /// The next reply and the request it answers. Replies already received come first; buffered
    /// requests are written only once none is ready, so a burst of replies costs one write, not one
    /// per reply (on a 2-core machine giftload's syscalls are giftd's lost CPU time). Cancel-safe
    /// when nothing is buffered.
    pub async fn next(&mut self) -> Result<(Sent, Reply)> {
        let (id, reply) = loop {
            if self.unflushed == 0 {
                if self.inflight.is_empty() {
                    bail!("waiting for a reply with no request in flight");
                }
                break self.rx.recv().await?;
            }
            // `recv` is cancel-safe (the frame decoder keeps partial frames in its buffer), so
            // polling it once and dropping it when nothing is ready loses nothing.
            tokio::select! {
                biased;
                r = self.rx.recv() => break r?,
                () = std::future::ready(()) => self.flush().await?,
            }
        };
        let Some(sent) = self.inflight.pop_front() else {
            bail!("reply for request {id}, which was never sent");
        };
        if sent.id != id {
            bail!("reply for request {id}, expected {} (replies must come in request order)", sent.id);
        }
        Ok((sent, reply))
    }
}

/// Sends one request per index of `range`, keeping at most `window` in flight, and hands every reply
/// to `check`. Bounded in count by the range; callers bound it in time.
pub async fn sweep(
    pipe: &mut Pipe,
    range: Range<usize>,
    window: usize,
    make: impl Fn(usize) -> Request,
    mut check: impl FnMut(usize, Reply) -> Result<()>,
) -> Result<()> {
    let mut next = range.start;
    loop {
        while next < range.end && pipe.in_flight() < window {
            pipe.push(&make(next), next);
            next += 1;
        }
        if pipe.in_flight() == 0 {
            return Ok(());
        }
        let (sent, reply) = pipe.next().await?;
        check(sent.tag, reply)?;
    }
}

/// Requests kept in flight per connection by [`sweep_all`]; below giftd's default limit (256).
const SWEEP_WINDOW: usize = 128;

/// [`sweep`] over `0..n`, split into contiguous ranges over `conns` connections, within `limit`.
/// Each connection folds its replies into its own `S`; the caller merges them.
pub async fn sweep_all<S, M, C>(
    addr: &str,
    n: usize,
    conns: usize,
    limit: Duration,
    make: M,
    check: C,
) -> Result<Vec<S>>
where
    S: Default + Send + 'static,
    M: Fn(usize) -> Request + Send + Sync + 'static,
    C: Fn(usize, Reply, &mut S) -> Result<()> + Send + Sync + 'static,
{
    let (make, check) = (Arc::new(make), Arc::new(check));
    let per = n.div_ceil(conns.max(1)).max(1);
    let mut tasks = JoinSet::new();
    for start in (0..n).step_by(per) {
        let range = start..(start + per).min(n);
        let mut pipe = Pipe::connect(addr).await?;
        let window = pipe.inflight_max.clamp(1, SWEEP_WINDOW);
        let (make, check) = (make.clone(), check.clone());
        tasks.spawn(async move {
            let mut state = S::default();
            sweep(&mut pipe, range, window, |i| make(i), |i, r| check(i, r, &mut state)).await?;
            Ok::<S, anyhow::Error>(state)
        });
    }
    let all = async {
        let mut out = Vec::with_capacity(tasks.len());
        while let Some(joined) = tasks.join_next().await {
            out.push(joined??);
        }
        Ok(out)
    };
    // On timeout the JoinSet is dropped, which aborts the connections still running.
    tokio::time::timeout(limit, all).await.map_err(|_| anyhow!("not finished after {limit:?}"))?
}
