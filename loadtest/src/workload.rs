//! The workload: durable redeems whose outcome is known in advance. Every card is issued active with
//! far more than the run can spend, and every redeem takes 1.00 without partial approval, so every
//! reply must be `approved`; anything else is a finding, never noise.

use crate::auditor::{self, Findings, Ledger};
use crate::pipe::{sweep_all, Pipe};
use anyhow::{bail, Result};
use giftd::card_number::CardNumber;
use giftd::model::{Currency, Money, ResultCode};
use giftd::wire::{BatchMode, IdemRef, Reply, Request};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const MERCHANT: &str = "giftload";
const PROGRAM: &str = "default";
/// 1,000,000.00 USD per card: a million redeems before a card could run dry, far beyond any run.
pub const INITIAL_MINOR: i64 = 100_000_000;
/// Each redeem takes 1.00 USD.
pub const REDEEM_MINOR: i64 = 100;
/// Card numbers hold the index in 10 digits; memory runs out long before that.
pub const CARDS_MAX: usize = 100_000_000;
/// How long replies may still arrive after the send deadline before the run counts as failed.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections used to issue cards and to read balances back (not part of the measurement).
pub const SETUP_CONNECTIONS: usize = 4;

/// What a load connection sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Redeems of 1.00 from random cards.
    Redeem,
    /// Authorize 1.00 on a random card, then capture all of it as soon as the hold comes back: a
    /// unit is the pair (two requests).
    AuthCapture,
    /// Split redeems of 3.00 naming three random cards in the given order. The cards are well
    /// funded, so the first one pays; giftd still locks and checks all three.
    Split3,
    /// Batch frames of this many redeems of 1.00 from random cards ("batch" or "batch:N"); an op
    /// is one redeem.
    Batch(u16),
    /// All-or-nothing batch frames ("batch-atomic" or "batch-atomic:N"): N redeems of 1.00 from N
    /// different random cards, one mutation under the batch's own key; an op is one redeem.
    AtomicBatch(u16),
    /// Batch frames of independent items under the batch's own key ("batch-each" or
    /// "batch-each:N"): N redeems of 1.00 from N different random cards, each decided on its own;
    /// an op is one redeem.
    EachBatch(u16),
}

/// Redeems per batch frame unless the workload names a size: the protocol's maximum.
pub const BATCH_DEFAULT: u16 = 8192;

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "redeem" => Kind::Redeem,
            "auth-capture" => Kind::AuthCapture,
            "split3" => Kind::Split3,
            "batch" => Kind::Batch(BATCH_DEFAULT),
            "batch-atomic" => Kind::AtomicBatch(BATCH_DEFAULT),
            "batch-each" => Kind::EachBatch(BATCH_DEFAULT),
            other => {
                let (name, n) = other.split_once(':')?;
                let n: u16 = n.parse().ok()?;
                if n == 0 || n as usize > giftd::wire::BATCH_ITEMS_MAX {
                    return None;
                }
                match name {
                    "batch" => Kind::Batch(n),
                    "batch-atomic" => Kind::AtomicBatch(n),
                    "batch-each" => Kind::EachBatch(n),
                    _ => return None,
                }
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Redeem => "redeem",
            Kind::AuthCapture => "auth-capture",
            Kind::Split3 => "split3",
            Kind::Batch(_) => "batch",
            Kind::AtomicBatch(_) => "batch-atomic",
            Kind::EachBatch(_) => "batch-each",
        }
    }

    /// Requests (frames) one op of this workload takes.
    pub fn requests_per_op(self) -> f64 {
        match self {
            Kind::AuthCapture => 2.0,
            Kind::Batch(n) | Kind::AtomicBatch(n) | Kind::EachBatch(n) => 1.0 / n as f64,
            _ => 1.0,
        }
    }

    /// Ops one finished unit counts for: a batch's redeems.
    pub fn ops_per_unit(self) -> u64 {
        match self {
            Kind::Batch(n) | Kind::AtomicBatch(n) | Kind::EachBatch(n) => n as u64,
            _ => 1,
        }
    }
}

/// A split redeem takes this much (three times a redeem).
pub const SPLIT_MINOR: i64 = 3 * REDEEM_MINOR;
/// Marks the tag of a capture (the rest of the tag is the card index).
const CAPTURE_TAG: usize = 1 << 62;

/// One run's identity and cards.
pub struct Run {
    /// Random 9-digit prefix of every card number and idempotency key, so runs against a long-lived
    /// server never collide with earlier runs.
    pub id: u64,
    /// Built once: the load loop only clones them into requests.
    pub cards: Vec<CardNumber>,
    pub usd: Currency,
}

impl Run {
    pub fn new(n: usize) -> Result<Run> {
        if !(1..=CARDS_MAX).contains(&n) {
            bail!("--cards must be between 1 and {CARDS_MAX}");
        }
        let id: u64 = rand::thread_rng().gen_range(100_000_000..1_000_000_000);
        // 9 + 10 = 19 digits, the longest number giftd accepts, so the index never needs truncating.
        let cards = (0..n).map(|i| CardNumber::parse(&format!("{id}{i:010}")).expect("19 digits")).collect();
        let Some(usd) = Currency::parse("USD") else { bail!("giftd does not know USD") };
        Ok(Run { id, cards, usd })
    }

    /// Setup phases get a minute plus 1 ms per card: generous, but never unbounded.
    pub fn setup_limit(&self) -> Duration {
        Duration::from_secs(60) + Duration::from_millis(self.cards.len() as u64)
    }
}

/// Issues every card, active, with [`INITIAL_MINOR`]. Any refusal stops the run: the audit is only
/// meaningful when every card starts from a known balance.
pub async fn preload(addr: &str, run: Arc<Run>) -> Result<()> {
    let r = run.clone();
    let make = move |i: usize| Request::Issue {
        idem: IdemRef { merchant: MERCHANT.into(), key: format!("{}-issue-{i}", r.id) },
        number: Some(r.cards[i].clone()),
        program: PROGRAM.into(),
        money: Money { currency: r.usd, minor: INITIAL_MINOR },
        expiry_ms: None,
        active: true,
        virtual_card: false,
        email: None,
        case: None,
    };
    let check = |i: usize, reply: Reply, _: &mut ()| match reply {
        Reply::Issued(o, None)
            if o.result == ResultCode::Approved && o.card.map(|c| c.balance_minor) == Some(INITIAL_MINOR) =>
        {
            Ok(())
        }
        Reply::Issued(o, _) if o.result == ResultCode::Approved => {
            bail!("issuing card #{i}: approved with {:?}", o.card)
        }
        other => bail!("issuing card #{i}: {}", other.result().name()),
    };
    sweep_all(addr, run.cards.len(), SETUP_CONNECTIONS, run.setup_limit(), make, check).await?;
    Ok(())
}

/// What the load phase is allowed to do.
pub struct Limits {
    pub kind: Kind,
    /// Requests each connection may have in flight.
    pub pipeline: usize,
    /// Open loop (--rate): each connection sends one request every `interval`, whatever the
    /// replies do, and holds back only when `pipeline` are in flight. `None`: closed loop, a new
    /// request as each reply arrives.
    pub pace: Option<Pace>,
    /// No request is sent after this.
    pub deadline: Instant,
    /// Shared across connections: (requests sent so far, --max-ops).
    pub budget: Option<(AtomicU64, u64)>,
    /// When the load began, and how many latency samples each connection keeps (0: none).
    pub start: Instant,
    pub samples_per_connection: usize,
}

/// A connection's share of an offered rate.
#[derive(Clone, Copy)]
pub struct Pace {
    pub start: Instant,
    /// Between two requests of one connection: connections ÷ rate.
    pub interval: Duration,
    pub connections: usize,
}

impl Pace {
    /// When connection `conn` sends its first request. Connections are staggered across one
    /// interval so that together they send evenly rather than in 64-request bursts.
    fn first_due(&self, conn: usize) -> Instant {
        self.start + self.interval.mul_f64(conn as f64 / self.connections as f64)
    }
}

impl Limits {
    fn may_send(&self, now: Instant) -> bool {
        now < self.deadline
            && self.budget.as_ref().is_none_or(|(sent, max)| sent.fetch_add(1, Ordering::Relaxed) < *max)
    }
}

/// What one load connection saw.
pub struct ConnReport {
    /// Send-to-reply latency of every answered request, in µs.
    pub hist: Histogram<u64>,
    /// The slowest reply (µs) and when it arrived: a stall shows up at a time one can correlate
    /// with giftd's log and metrics.
    pub slowest: (u64, Option<Instant>),
    /// Units finished (a redeem, an authorize-capture pair, a split), whatever their result.
    pub ops: u64,
    pub findings: Findings,
    /// Requests sent whose reply never came.
    pub unanswered: usize,
    pub failure: Option<String>,
    /// With --latency-log: (µs from the load's start to the send, latency in µs) of each reply.
    pub samples: Vec<(u64, u64)>,
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 µs to 1 min at 3 significant digits; slower replies are clamped (and the run fails anyway).
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Builds the workload's requests. A redeem reuses one request: only the key (written in place)
/// and the card number change, so it costs one small allocation (the number's clone), not four.
struct Requests {
    kind: Kind,
    redeem: Request,
    rng: StdRng,
    conn: usize,
    seq: u64,
    /// The cards of each split redeem (or batch) in flight, oldest first (replies come back in
    /// this order).
    splits: std::collections::VecDeque<Vec<usize>>,
}

impl Requests {
    fn new(run: &Run, conn: usize, kind: Kind) -> Requests {
        let redeem = Request::Redeem {
            idem: IdemRef { merchant: MERCHANT.into(), key: String::with_capacity(40) },
            number: run.cards[0].clone(),
            money: Money { currency: run.usd, minor: REDEEM_MINOR },
            allow_partial: false,
            invoice: None,
            pin: None,
        };
        Requests { kind, redeem, rng: StdRng::from_entropy(), conn, seq: 0, splits: Default::default() }
    }

    fn idem(&mut self, run: &Run) -> IdemRef {
        self.seq += 1;
        IdemRef {
            merchant: MERCHANT.into(),
            key: format!("{}-{}-{}-{}", run.id, self.kind.name(), self.conn, self.seq),
        }
    }

    /// Buffers the first request of a new unit.
    fn push(&mut self, pipe: &mut Pipe, run: &Run) {
        self.push_due(pipe, run, None);
    }

    /// [`Requests::push`] with the turn a held-back paced request missed.
    fn push_due(&mut self, pipe: &mut Pipe, run: &Run, due: Option<Instant>) {
        let i = self.rng.gen_range(0..run.cards.len());
        match self.kind {
            Kind::Redeem => {
                if let Request::Redeem { idem, number, .. } = &mut self.redeem {
                    idem.key.clear();
                    let _ = write!(idem.key, "{}-r-{}-{}", run.id, self.conn, self.seq);
                    *number = run.cards[i].clone();
                }
                self.seq += 1;
                pipe.push_due(&self.redeem, i, due);
            }
            Kind::AuthCapture => {
                let req = Request::Authorize {
                    idem: self.idem(run),
                    number: run.cards[i].clone(),
                    money: Money { currency: run.usd, minor: REDEEM_MINOR },
                    allow_partial: false,
                    ttl_secs: 600,
                    pin: None,
                };
                pipe.push_due(&req, i, due);
            }
            Kind::Split3 => {
                // Three different cards (all of them when the run has fewer).
                let n = run.cards.len();
                let cards = rand::seq::index::sample(&mut self.rng, n, n.min(3)).into_vec();
                let numbers = cards.iter().map(|&c| run.cards[c].clone()).collect();
                let req = Request::SplitRedeem {
                    idem: self.idem(run),
                    money: Money { currency: run.usd, minor: SPLIT_MINOR },
                    order: giftd::engine::SplitOrder::Given,
                    numbers,
                };
                pipe.push_due(&req, cards[0], due);
                self.splits.push_back(cards);
            }
            Kind::Batch(n) => {
                let mut cards = Vec::with_capacity(n as usize);
                let mut items = Vec::with_capacity(n as usize);
                for k in 0..n as usize {
                    let c = if k == 0 { i } else { self.rng.gen_range(0..run.cards.len()) };
                    if let Request::Redeem { idem, number, .. } = &mut self.redeem {
                        idem.key.clear();
                        let _ = write!(idem.key, "{}-b-{}-{}", run.id, self.conn, self.seq);
                        *number = run.cards[c].clone();
                    }
                    self.seq += 1;
                    items.push(giftd::wire::BatchItem::of(&self.redeem));
                    cards.push(c);
                }
                pipe.push_due(&Request::Batch { mode: BatchMode::Items, items }, i, due);
                self.splits.push_back(cards);
            }
            Kind::AtomicBatch(n) | Kind::EachBatch(n) => {
                // Each card at most once, as a batch under its own key requires.
                let count = run.cards.len().min(n as usize);
                let cards = rand::seq::index::sample(&mut self.rng, run.cards.len(), count).into_vec();
                let mut items = Vec::with_capacity(count);
                for &c in &cards {
                    // An item's own key must be there but is not used: the batch's key is.
                    if let Request::Redeem { idem, number, .. } = &mut self.redeem {
                        if idem.key.is_empty() {
                            idem.key.push_str("item");
                        }
                        *number = run.cards[c].clone();
                    }
                    items.push(giftd::wire::BatchItem::of(&self.redeem));
                }
                let idem = self.idem(run);
                let mode = match self.kind {
                    Kind::AtomicBatch(_) => BatchMode::AllOrNothing(idem),
                    _ => BatchMode::Each(idem),
                };
                pipe.push_due(&Request::Batch { mode, items }, i, due);
                self.splits.push_back(cards);
            }
        }
    }

    /// Checks a reply. Returns whether it finished its unit; an approved authorization instead
    /// buffers its capture (also after the deadline, so that no hold is left open).
    fn on_reply(
        &mut self,
        pipe: &mut Pipe,
        run: &Run,
        ledger: &Ledger,
        tag: usize,
        reply: &Reply,
        f: &mut Findings,
    ) -> bool {
        match self.kind {
            Kind::Redeem => {
                auditor::check_redeem(ledger, tag, &run.cards[tag], run.usd, reply, f);
                true
            }
            Kind::AuthCapture if tag & CAPTURE_TAG != 0 => {
                let i = tag & !CAPTURE_TAG;
                auditor::check_redeem(ledger, i, &run.cards[i], run.usd, reply, f);
                true
            }
            Kind::AuthCapture => match auditor::check_hold(tag, &run.cards[tag], reply, f) {
                Some(hold_id) => {
                    let req = Request::Capture {
                        idem: self.idem(run),
                        hold_id,
                        money: Money { currency: run.usd, minor: REDEEM_MINOR },
                    };
                    pipe.push(&req, tag | CAPTURE_TAG);
                    false
                }
                None => true,
            },
            Kind::Split3 => {
                let cards = self.splits.pop_front().expect("a split in flight for every split reply");
                auditor::check_split(ledger, &cards, run, reply, f);
                true
            }
            Kind::Batch(_) | Kind::AtomicBatch(_) | Kind::EachBatch(_) => {
                let cards = self.splits.pop_front().expect("a batch in flight for every batch reply");
                match reply {
                    Reply::Batch(items) if items.len() == cards.len() => {
                        for (&c, (_, r)) in cards.iter().zip(items) {
                            auditor::check_redeem(ledger, c, &run.cards[c], run.usd, r, f);
                        }
                    }
                    other => f.anomaly(|| format!("a batch of {} redeems got {other:?}", cards.len())),
                }
                true
            }
        }
    }
}

/// One load connection: P requests in flight until the deadline (or --max-ops), then the drain. A
/// replacement is buffered as each reply is checked; [`Pipe::next`] writes them in one batch.
pub async fn redeem_loop(
    mut pipe: Pipe,
    conn: usize,
    run: Arc<Run>,
    ledger: Arc<Ledger>,
    limits: Arc<Limits>,
) -> ConnReport {
    let mut rep = ConnReport {
        hist: new_histogram(),
        slowest: (0, None),
        ops: 0,
        findings: Findings::default(),
        unanswered: 0,
        failure: None,
        samples: Vec::with_capacity(limits.samples_per_connection.min(1 << 20)),
    };
    let hard_deadline = tokio::time::Instant::from_std(limits.deadline + DRAIN_TIMEOUT);
    let res = tokio::time::timeout_at(hard_deadline, drive(&mut pipe, conn, &run, &ledger, &limits, &mut rep)).await;
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => rep.failure = Some(format!("connection {conn}: {e:#}")),
        Err(_) => {
            rep.failure = Some(format!("connection {conn}: replies still missing {DRAIN_TIMEOUT:?} after the deadline"))
        }
    }
    rep.unanswered = pipe.in_flight();
    rep
}

async fn drive(
    pipe: &mut Pipe,
    conn: usize,
    run: &Run,
    ledger: &Ledger,
    limits: &Limits,
    rep: &mut ConnReport,
) -> Result<()> {
    let mut requests = Requests::new(run, conn, limits.kind);
    if let Some(pace) = limits.pace {
        return drive_paced(pipe, conn, run, ledger, limits, pace, rep, requests).await;
    }
    let mut sending = true;
    for _ in 0..limits.pipeline {
        if !limits.may_send(Instant::now()) {
            sending = false;
            break;
        }
        requests.push(pipe, run);
    }
    while pipe.in_flight() > 0 {
        let (sent, reply) = pipe.next().await?;
        let now = Instant::now();
        latency(rep, limits, now, &sent);
        if !requests.on_reply(pipe, run, ledger, sent.tag, &reply, &mut rep.findings) {
            continue;
        }
        rep.ops += limits.kind.ops_per_unit();
        if sending {
            if limits.may_send(now) {
                requests.push(pipe, run);
            } else {
                sending = false;
            }
        }
    }
    Ok(())
}

/// Records one reply's latency.
fn latency(rep: &mut ConnReport, limits: &Limits, now: Instant, sent: &crate::pipe::Sent) {
    let micros = now.saturating_duration_since(sent.at).as_micros() as u64;
    rep.hist.saturating_record(micros);
    if rep.samples.len() < limits.samples_per_connection {
        rep.samples.push((sent.at.saturating_duration_since(limits.start).as_micros() as u64, micros));
    }
    if micros > rep.slowest.0 {
        rep.slowest = (micros, Some(now));
    }
}

/// The open loop: requests leave on a schedule, not when replies come back, so the latency
/// measured is the latency at that offered rate. A request whose turn comes while the window is
/// full waits, and its latency counts from its turn (see [`Pipe::push_due`]). The schedule is kept
/// with tokio's millisecond timer, so requests leave up to ~1 ms after their turn; that delay is
/// giftload's own and is not counted.
#[allow(clippy::too_many_arguments)]
async fn drive_paced(
    pipe: &mut Pipe,
    conn: usize,
    run: &Run,
    ledger: &Ledger,
    limits: &Limits,
    pace: Pace,
    rep: &mut ConnReport,
    mut requests: Requests,
) -> Result<()> {
    let mut due = pace.first_due(conn);
    let mut sending = true;
    // Whether the last look found a turn due and the window full: the connection is behind
    // schedule because of giftd, and the requests sent to catch up count from their turns.
    let mut held = false;
    loop {
        let now = Instant::now();
        while sending && due <= now && pipe.in_flight() < limits.pipeline {
            if !limits.may_send(now) {
                sending = false;
                break;
            }
            requests.push_due(pipe, run, held.then_some(due));
            due += pace.interval;
        }
        held = sending && due <= now;
        pipe.flush().await?;
        if !sending && pipe.in_flight() == 0 {
            return Ok(());
        }
        let can_send = sending && pipe.in_flight() < limits.pipeline;
        if pipe.in_flight() == 0 {
            tokio::time::sleep_until(due.into()).await;
            continue;
        }
        tokio::select! {
            biased;
            r = pipe.next() => {
                let (sent, reply) = r?;
                latency(rep, limits, Instant::now(), &sent);
                if requests.on_reply(pipe, run, ledger, sent.tag, &reply, &mut rep.findings) {
                    rep.ops += limits.kind.ops_per_unit();
                }
            }
            () = tokio::time::sleep_until(due.into()), if can_send => {}
        }
        // Stop sending once the deadline passes, even while every turn finds the window full.
        if sending && Instant::now() >= limits.deadline {
            sending = false;
        }
    }
}

/// The merged result of the load phase.
pub struct LoadResult {
    pub hist: Histogram<u64>,
    /// Seconds from the start of the load to the slowest reply.
    pub slowest_at_secs: f64,
    pub ops: u64,
    /// From the first send to the last reply (or the drain timeout).
    pub elapsed: Duration,
    pub findings: Findings,
    pub unanswered: usize,
    pub failures: Vec<String>,
    /// With --latency-log: the load's start in Unix ms, and every connection's samples.
    pub start_unix_ms: u128,
    pub samples: Vec<(u64, u64)>,
}

/// What the load phase offers: how many connections, how deep, how long, and how fast.
#[derive(Clone, Copy)]
pub struct Shape {
    pub kind: Kind,
    pub connections: usize,
    pub pipeline: usize,
    pub duration: Duration,
    pub max_ops: Option<u64>,
    /// Offered redeems per second (open loop); `None`: closed loop.
    pub rate: Option<u64>,
    /// Latency samples kept in all (--latency-log), shared out over the connections.
    pub samples_max: usize,
}

pub async fn load(addr: &str, run: Arc<Run>, ledger: Arc<Ledger>, shape: &Shape) -> Result<LoadResult> {
    let Shape { kind, connections, pipeline, duration, max_ops, rate, samples_max } = *shape;
    // Connect and handshake first, so the measured time holds only redeems.
    let mut pipes = Vec::with_capacity(connections);
    for _ in 0..connections {
        pipes.push(Pipe::connect(addr).await?);
    }
    if let Some(p) = pipes.first() {
        if pipeline > p.inflight_max {
            eprintln!(
                "giftload: --pipeline {pipeline} exceeds giftd's in-flight limit {}; the excess waits in TCP buffers",
                p.inflight_max
            );
        }
    }
    let start = Instant::now();
    let start_unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let pace = rate.map(|r| Pace {
        start,
        interval: Duration::from_secs(1).mul_f64(connections as f64 / r as f64),
        connections,
    });
    let limits = Arc::new(Limits {
        kind,
        pipeline,
        pace,
        deadline: start + duration,
        budget: max_ops.map(|m| (AtomicU64::new(0), m)),
        start,
        samples_per_connection: samples_max / connections,
    });
    let tasks: Vec<_> = pipes
        .into_iter()
        .enumerate()
        .map(|(conn, pipe)| tokio::spawn(redeem_loop(pipe, conn, run.clone(), ledger.clone(), limits.clone())))
        .collect();
    let mut out = LoadResult {
        hist: new_histogram(),
        slowest_at_secs: 0.0,
        ops: 0,
        elapsed: Duration::ZERO,
        findings: Findings::default(),
        unanswered: 0,
        failures: Vec::new(),
        start_unix_ms,
        samples: Vec::new(),
    };
    let mut slowest = 0;
    for t in tasks {
        // Every task is bounded by its own drain deadline, so this join is bounded too.
        let rep = t.await?;
        out.hist.add(&rep.hist).map_err(|e| anyhow::anyhow!("merging histograms: {e:?}"))?;
        if let (micros, Some(at)) = rep.slowest {
            if micros > slowest {
                slowest = micros;
                out.slowest_at_secs = at.duration_since(start).as_secs_f64();
            }
        }
        out.ops += rep.ops;
        out.findings.merge(rep.findings);
        out.unanswered += rep.unanswered;
        out.failures.extend(rep.failure);
        out.samples.extend(rep.samples);
    }
    out.elapsed = start.elapsed();
    Ok(out)
}
