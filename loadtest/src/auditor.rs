//! The auditor: checks every reply as it arrives, keeps what giftd said it took from each card, and at
//! the end reads every balance back. giftd promises that an approved reply means a durable debit, so
//! for every card: balance == initial − Σ approved, exactly. A lost, doubled or invented debit shows up
//! as a mismatch on its card.

use crate::pipe::sweep_all;
use crate::workload::{Run, INITIAL_MINOR, REDEEM_MINOR, SETUP_CONNECTIONS, SPLIT_MINOR};
use anyhow::Result;
use giftd::card_number::CardNumber;
use giftd::model::{Currency, ResultCode, Status};
use giftd::wire::{Reply, Request};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Examples kept of each kind of finding; counts are always complete.
pub const EXAMPLES_MAX: usize = 5;

/// Σ approved minor units per card, from the replies. Shared by all connections: one relaxed atomic
/// add per approval is cheaper than a table per connection, and the sums are only read after every
/// connection has finished.
pub struct Ledger {
    approved: Vec<AtomicI64>,
}

impl Ledger {
    pub fn new(cards: usize) -> Ledger {
        Ledger { approved: (0..cards).map(|_| AtomicI64::new(0)).collect() }
    }

    fn add(&self, card: usize, minor: i64) {
        self.approved[card].fetch_add(minor, Ordering::Relaxed);
    }

    pub fn approved(&self, card: usize) -> i64 {
        self.approved[card].load(Ordering::Relaxed)
    }
}

/// What the reply checks found, per connection and then merged.
#[derive(Default)]
pub struct Findings {
    /// Requests not approved, by result name. Every request of these workloads must be approved.
    pub errors: BTreeMap<&'static str, u64>,
    /// Replies that contradict their request (another amount, another card): count and first few.
    pub anomalies: u64,
    pub examples: Vec<String>,
}

impl Findings {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    fn error(&mut self, name: &'static str) {
        *self.errors.entry(name).or_default() += 1;
    }

    /// `what` is only formatted for the first few, so a flood of anomalies costs no allocations.
    pub fn anomaly(&mut self, what: impl FnOnce() -> String) {
        self.anomalies += 1;
        if self.examples.len() < EXAMPLES_MAX {
            self.examples.push(what());
        }
    }

    pub fn merge(&mut self, other: Findings) {
        for (name, n) in other.errors {
            *self.errors.entry(name).or_default() += n;
        }
        self.anomalies += other.anomalies;
        let room = EXAMPLES_MAX.saturating_sub(self.examples.len());
        self.examples.extend(other.examples.into_iter().take(room));
    }
}

/// Checks one redeem reply for card `idx` and records what it approved.
pub fn check_redeem(ledger: &Ledger, idx: usize, card: &CardNumber, usd: Currency, reply: &Reply, f: &mut Findings) {
    match reply {
        Reply::Card(o) if o.result == ResultCode::Approved => {
            // Record what giftd says it took, even if it is wrong: the balance check then tells
            // whether the reply or the balance is the liar.
            ledger.add(idx, o.approved_minor);
            if o.approved_minor != REDEEM_MINOR {
                f.anomaly(|| format!("card #{idx} {card}: approved {} instead of {REDEEM_MINOR}", o.approved_minor));
            }
            match &o.card {
                Some(v) if v.last4 == card.last4() && v.currency == usd && v.balance_minor >= 0 => {}
                other => f.anomaly(|| format!("card #{idx} {card}: approved redeem shows card {other:?}")),
            }
        }
        Reply::Card(o) => {
            f.error(o.result.name());
            if o.approved_minor != 0 {
                f.anomaly(|| format!("card #{idx} {card}: {} with approved {}", o.result.name(), o.approved_minor));
            }
        }
        Reply::Error(code) => f.error(code.name()),
        _ => f.error("unexpected_reply_kind"),
    }
}

/// Checks an authorization reply for card `idx`; returns the hold to capture when approved.
pub fn check_hold(idx: usize, card: &CardNumber, reply: &Reply, f: &mut Findings) -> Option<u64> {
    match reply {
        Reply::Hold(o) if o.result == ResultCode::Approved => match o.hold {
            Some(h) if h.amount_minor == REDEEM_MINOR && o.approved_minor == REDEEM_MINOR => Some(h.id),
            _ => {
                f.anomaly(|| format!("card #{idx} {card}: approved authorization {o:?}"));
                None
            }
        },
        other => {
            f.error(other.result().name());
            None
        }
    }
}

/// Checks a split redeem's reply over `cards` (in the order named, which is the order taken) and
/// records what it took from each.
pub fn check_split(ledger: &Ledger, cards: &[usize], run: &Run, reply: &Reply, f: &mut Findings) {
    let Reply::Parts(p) = reply else {
        f.error(reply.result().name());
        return;
    };
    if p.result != ResultCode::Approved {
        f.error(p.result.name());
        return;
    }
    let Some(parts) = &p.parts else {
        f.anomaly(|| "approved split without parts".to_string());
        return;
    };
    let mut next = cards.iter();
    let mut total = 0;
    for part in &parts.items {
        // Parts come in the order taken, skipping cards that gave nothing.
        match next.find(|&&c| run.cards[c].last4() == part.last4) {
            Some(&c) => {
                ledger.add(c, -part.amount_minor);
                total -= part.amount_minor;
            }
            None => f.anomaly(|| format!("split over {cards:?}: part {part:?} names none of its cards")),
        }
    }
    if total != SPLIT_MINOR || p.approved_minor != SPLIT_MINOR {
        f.anomaly(|| format!("split over {cards:?}: took {total}, approved {}, asked {SPLIT_MINOR}", p.approved_minor));
    }
}

/// The final state check.
#[derive(Default)]
pub struct BalanceAudit {
    pub checked: u64,
    pub mismatches: u64,
    pub examples: Vec<String>,
}

/// Reads every card's balance back (pipelined, over a few connections) and compares it with
/// initial − Σ approved. giftd answers a balance only once the card's last change is durable.
pub async fn audit_balances(addr: &str, run: Arc<Run>, ledger: Arc<Ledger>) -> Result<BalanceAudit> {
    let r = run.clone();
    let make = move |i: usize| Request::Balance { number: r.cards[i].clone() };
    let r = run.clone();
    let check = move |i: usize, reply: Reply, a: &mut BalanceAudit| {
        a.checked += 1;
        let approved = ledger.approved(i);
        let expected = INITIAL_MINOR - approved;
        let problem = match &reply {
            Reply::Card(o) if o.result == ResultCode::Approved => match &o.card {
                Some(v) if v.balance_minor == expected && v.held_minor == 0 && v.status == Status::Active => None,
                Some(v) => Some(format!(
                    "balance {} (held {}, {}), expected {expected} = {INITIAL_MINOR} − {approved} approved",
                    v.balance_minor,
                    v.held_minor,
                    v.status.name()
                )),
                None => Some("approved balance reply without a card".to_string()),
            },
            other => Some(format!("balance inquiry: {}", other.result().name())),
        };
        if let Some(p) = problem {
            a.mismatches += 1;
            if a.examples.len() < EXAMPLES_MAX {
                a.examples.push(format!("card #{i} {}: {p}", r.cards[i]));
            }
        }
        Ok(())
    };
    let parts = sweep_all(addr, run.cards.len(), SETUP_CONNECTIONS, run.setup_limit(), make, check).await?;
    let mut out = BalanceAudit::default();
    for p in parts {
        out.checked += p.checked;
        out.mismatches += p.mismatches;
        let room = EXAMPLES_MAX.saturating_sub(out.examples.len());
        out.examples.extend(p.examples.into_iter().take(room));
    }
    Ok(out)
}
