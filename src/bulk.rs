//! Bulk jobs, client side (giftctl and giftload use this). A job is a durable record on giftd
//! (`job_open`: its kind and card count, idempotent on the job id) plus one operation per card,
//! keyed `<job>/<index>`, sent in batch frames. Every card's operation is idempotent on its key, so
//! running a job again (after a kill, a lost connection, or only to see its summary) applies nothing
//! twice and answers with the same summary. Taking a job back is one reversal per card, keyed
//! `<job>/<index>/r`, naming the card's operation.

use crate::card_number::CardNumber;
use crate::client::Client;
use crate::model::{Money, ResultCode};
use crate::wire::{BatchItem, IdemRef, JobKind, JobReply, Reply, Request, BATCH_ITEMS_MAX, STRING_BYTES_MAX};
use anyhow::{bail, Context};
use std::collections::{BTreeMap, VecDeque};

/// Longest job id: its cards' keys add `/<index>/r` (up to 10 bytes) and must fit a key.
pub const JOB_ID_BYTES_MAX: usize = STRING_BYTES_MAX - 10;
/// Failures a summary lists one by one (the counts cover all of them).
pub const FAILURES_LISTED_MAX: usize = 100;

/// The cards of a job.
#[derive(Clone, Debug)]
pub enum Cards {
    /// `first`, `first + 1`, …, `first + count − 1`, all as long as `first`.
    Range {
        first: CardNumber,
        count: u64,
    },
    Manifest(Vec<CardNumber>),
}

impl Cards {
    pub fn count(&self) -> u64 {
        match self {
            Cards::Range { count, .. } => *count,
            Cards::Manifest(v) => v.len() as u64,
        }
    }

    /// The `i`-th card; None past the range's end or if the number would grow a digit.
    pub fn get(&self, i: u64) -> Option<CardNumber> {
        match self {
            Cards::Manifest(v) => v.get(i as usize).cloned(),
            Cards::Range { first, count } => {
                if i >= *count {
                    return None;
                }
                let digits = first.expose();
                let n = digits.parse::<u64>().ok()?.checked_add(i)?;
                CardNumber::parse(&format!("{n:0width$}", width = digits.len()))
                    .filter(|c| c.expose().len() == digits.len())
            }
        }
    }

    /// Whether every number of a range exists (its last number has as many digits as its first).
    pub fn check(&self) -> anyhow::Result<()> {
        if self.count() == 0 {
            bail!("a job needs at least one card");
        }
        if let Cards::Range { count, .. } = self {
            if self.get(count - 1).is_none() {
                bail!("the range runs past the last number of its length");
            }
        }
        Ok(())
    }
}

/// What to do to each card.
#[derive(Clone, Debug)]
pub enum Work {
    /// Create inactive cards (a reseller's inventory) with this value and expiry.
    Issue { program: String, money: Money, expiry_ms: Option<i64> },
    /// Activate cards, loading this value if given.
    Activate { load: Option<Money> },
}

impl Work {
    pub fn kind(&self) -> JobKind {
        match self {
            Work::Issue { .. } => JobKind::Issue,
            Work::Activate { .. } => JobKind::Activate,
        }
    }
}

/// How a job's cards came out: a count per outcome, and the first failures one by one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub counts: BTreeMap<&'static str, u64>,
    /// (index in the job, last 4 digits, result) of the first failures.
    pub failures: Vec<(u64, String, ResultCode)>,
}

impl Summary {
    fn add(&mut self, outcome: &'static str, failed: Option<(u64, String, ResultCode)>) {
        *self.counts.entry(outcome).or_default() += 1;
        if let Some(f) = failed {
            if self.failures.len() < FAILURES_LISTED_MAX {
                self.failures.push(f);
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }
}

/// The job's card `i`'s key.
pub fn card_key(job: &str, i: u64) -> String {
    format!("{job}/{i}")
}

pub fn check_job_id(job: &str) -> anyhow::Result<()> {
    if job.is_empty() || job.len() > JOB_ID_BYTES_MAX || job.contains('/') || !job.bytes().all(|b| b.is_ascii_graphic())
    {
        bail!("a job id is 1 to {JOB_ID_BYTES_MAX} printable characters without '/'");
    }
    Ok(())
}

/// The name a card's outcome is counted under, and whether it is a failure.
fn outcome_of(kind: Option<JobKind>, reply: &Reply) -> (&'static str, bool) {
    let result = reply.result();
    let approved_minor = match reply {
        Reply::Card(o) | Reply::Issued(o, _) => o.approved_minor,
        Reply::Parts(p) => p.approved_minor,
        _ => 0,
    };
    match (kind, result) {
        (Some(JobKind::Issue), ResultCode::Approved) => ("issued", false),
        (Some(JobKind::Issue), ResultCode::CardExists) => ("already_exists", true),
        (Some(JobKind::Activate), ResultCode::Approved) => ("activated", false),
        (Some(JobKind::Activate), ResultCode::AlreadyActive) => ("already_active", true),
        (Some(_), ResultCode::CardNotFound) => ("not_found", true),
        // Taking back: a reversal that found nothing to undo (the card's operation was declined
        // or never made) succeeds with nothing moved.
        (None, ResultCode::Approved)
            if approved_minor == 0 && matches!(reply, Reply::Parts(p) if p.parts.is_none()) =>
        {
            ("nothing_to_undo", false)
        }
        (None, ResultCode::Approved) => ("reversed", false),
        (None, ResultCode::CardUsed | ResultCode::InsufficientFunds) => ("used", true),
        (_, other) => (other.name(), true),
    }
}

/// Sends `items` (built lazily, `total` of them) in batches of `chunk`, `window` batches in flight,
/// and counts each reply with `count(index, reply)`.
async fn drive(
    c: Client,
    total: u64,
    chunk: usize,
    window: usize,
    mut item: impl FnMut(u64) -> anyhow::Result<Request>,
    mut count: impl FnMut(u64, &Reply),
    mut progress: impl FnMut(u64, u64),
) -> anyhow::Result<()> {
    let chunk = chunk.clamp(1, BATCH_ITEMS_MAX) as u64;
    let (mut tx, mut rx) = c.into_split();
    let mut in_flight: VecDeque<(u64, u64, u64)> = VecDeque::new();
    let (mut next, mut done) = (0u64, 0u64);
    while done < total {
        while next < total && in_flight.len() < window.max(1) {
            let end = (next + chunk).min(total);
            let items = (next..end).map(|i| item(i).map(|r| BatchItem::of(&r))).collect::<anyhow::Result<Vec<_>>>()?;
            let id = tx.send(&Request::Batch { atomic: None, items });
            in_flight.push_back((id, next, end));
            next = end;
        }
        tx.flush().await?;
        let (id, from, to) = in_flight.pop_front().expect("a batch is in flight");
        let (got, reply) = rx.recv().await?;
        if got != id {
            bail!("reply for request {got}, expected {id}");
        }
        let Reply::Batch(replies) = reply else { bail!("a batch was answered {}", reply.result().name()) };
        if replies.len() as u64 != to - from {
            bail!("a batch of {} got {} replies", to - from, replies.len());
        }
        for (i, (_, r)) in (from..to).zip(replies.iter()) {
            count(i, r);
        }
        done = to;
        progress(done, total);
    }
    Ok(())
}

/// A job of a merchant on a giftd, and how it is sent: `chunk` cards a batch frame, `window` batch
/// frames in flight.
#[derive(Clone, Copy, Debug)]
pub struct Job<'a> {
    pub addr: &'a str,
    pub merchant: &'a str,
    pub id: &'a str,
    pub chunk: usize,
    pub window: usize,
}

/// Runs (or runs again) `job`: records it, then does `work` to every card.
pub async fn run(
    job: Job<'_>,
    cards: &Cards,
    work: &Work,
    progress: impl FnMut(u64, u64),
) -> anyhow::Result<(JobReply, Summary)> {
    let Job { addr, merchant, id: job, chunk, window } = job;
    check_job_id(job)?;
    cards.check()?;
    let mut c = Client::connect(addr).await?;
    let open = Request::JobOpen {
        idem: IdemRef { merchant: merchant.into(), key: job.into() },
        kind: work.kind(),
        count: u32::try_from(cards.count()).context("too many cards for one job")?,
    };
    let opened = match c.call(&open).await? {
        Reply::Job(j) => j,
        other => bail!("job_open answered {}", other.result().name()),
    };
    if opened.result != ResultCode::Approved {
        // The id is taken by a job of another kind or size: nothing of this one is sent.
        return Ok((opened, Summary::default()));
    }
    let idem = |i: u64| IdemRef { merchant: merchant.into(), key: card_key(job, i) };
    let item = |i: u64| -> anyhow::Result<Request> {
        let number = cards.get(i).context("card index past the job's cards")?;
        Ok(match work {
            Work::Issue { program, money, expiry_ms } => Request::Issue {
                idem: idem(i),
                number: Some(number),
                program: program.clone(),
                money: *money,
                expiry_ms: *expiry_ms,
                active: false,
                virtual_card: false,
                email: None,
                case: None,
            },
            Work::Activate { load } => Request::Activate { idem: idem(i), number, load: *load },
        })
    };
    let mut summary = Summary::default();
    let kind = Some(work.kind());
    let count = |i: u64, r: &Reply| {
        let (name, failed) = outcome_of(kind, r);
        let last4 = cards.get(i).map(|n| String::from_utf8_lossy(&n.last4()).into_owned()).unwrap_or_default();
        summary.add(name, failed.then(|| (i, last4, r.result())));
    };
    drive(c, cards.count(), chunk, window, item, count, progress).await?;
    Ok((opened, summary))
}

/// Takes back what `job` did: every card's operation is reversed, where it still can be (a card
/// used since is reported, not touched).
pub async fn reverse(job: Job<'_>, progress: impl FnMut(u64, u64)) -> anyhow::Result<(JobReply, Summary)> {
    let Job { addr, merchant, id: job, chunk, window } = job;
    check_job_id(job)?;
    let mut c = Client::connect(addr).await?;
    let found = match c.call(&Request::JobGet { merchant: merchant.into(), job: job.into() }).await? {
        Reply::Job(j) => j,
        other => bail!("job_get answered {}", other.result().name()),
    };
    if found.result != ResultCode::Approved {
        return Ok((found, Summary::default()));
    }
    let item = |i: u64| -> anyhow::Result<Request> {
        Ok(Request::Reverse {
            idem: IdemRef { merchant: merchant.into(), key: format!("{}/r", card_key(job, i)) },
            original: card_key(job, i),
        })
    };
    let mut summary = Summary::default();
    let count = |i: u64, r: &Reply| {
        let (name, failed) = outcome_of(None, r);
        summary.add(name, failed.then(|| (i, String::new(), r.result())));
    };
    drive(c, found.count as u64, chunk, window, item, count, progress).await?;
    Ok((found, summary))
}
