//! The engine: every business rule, and the in-memory cards they apply to.
//!
//! [`rules`] decides; [`Engine`] serializes decisions per card (dashmap shard locks), enforces
//! idempotency and invoice uniqueness, and hands each decision's effects to the [`Journal`] while the
//! card is still locked, so the journal's order matches the order decisions were made in.
//!
//! Lock order, always: idempotency slot → invoice slot → card → journal. Nothing here awaits.

pub mod card;
pub mod journal;
pub mod program;
pub mod rules;

pub use card::{CardRecord, Lifecycle};
pub use journal::{
    Appended, CardChange, Effects, IdemKey, IdemRecord, InvoiceKey, Journal, LedgerDelta, MemoryJournal, TxnRecord,
};
pub use program::{Program, Programs};
pub use rules::Op;

use crate::card_number::CardKey;
use crate::model::{Currency, HoldView, Outcome, ResultCode, TxnKind};
use card::Card;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use rules::{Decision, HoldChange};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The merchant named in the history entries of decisions giftd makes by itself (hold expiry).
pub const SYSTEM_MERCHANT: &str = "giftd";

/// A validated mutation, keyed: the card number is already replaced by its key.
#[derive(Clone, Debug)]
pub struct Mutation {
    pub idem: IdemKey,
    /// Keyed digest of the request's content: a retry must match it.
    pub fingerprint: [u8; 16],
    /// The card, for operations that name one; capture and void name a hold instead, and the
    /// engine finds its card.
    pub card: Option<CardKey>,
    /// The number's last 4 digits (kept by an issue; zeros when no number was given).
    pub last4: [u8; 4],
    pub op: Op,
}

/// The engine's answer: the outcome, and the commit group the reply must wait for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Executed {
    pub outcome: Outcome,
    pub group: u64,
    pub replayed: bool,
}

/// A recently used idempotency key, kept in memory at least until its group is durable.
struct RecentIdem {
    record: IdemRecord,
    group: u64,
    at_ms: i64,
}

/// What recovery loaded, for the conservation check and the startup log.
#[derive(Debug, Default)]
pub struct Restored {
    pub cards: u64,
    pub balance_minor_by_currency: BTreeMap<Currency, i128>,
    /// Programs referenced by cards but missing from the configuration (default rules apply).
    pub unknown_programs: Vec<String>,
    /// Open holds (some may be past their deadline: the expiry sweep releases them first thing).
    pub holds: u64,
}

pub struct Engine {
    cards: DashMap<CardKey, Card>,
    idem: DashMap<IdemKey, RecentIdem>,
    invoices: DashMap<InvoiceKey, (u64, i64)>,
    /// Open holds → their card: capture and void name only the hold.
    holds: DashMap<u64, CardKey>,
    /// Open holds by deadline, so expiry visits only what is due, never every card. A leaf lock:
    /// taken under a card's lock or alone, never the other way round.
    deadlines: Mutex<BTreeSet<(i64, u64)>>,
    /// The next hold id. Ids are never reused: the journal keeps the high-water mark durable with
    /// each hold that uses one.
    next_hold_id: AtomicU64,
    programs: Programs,
    journal: Arc<dyn Journal>,
    /// Sweeps of the recent maps so far.
    evictions: AtomicU64,
}

impl Engine {
    pub fn new(programs: Programs, journal: Arc<dyn Journal>) -> Engine {
        Engine {
            cards: DashMap::new(),
            idem: DashMap::new(),
            invoices: DashMap::new(),
            holds: DashMap::new(),
            deadlines: Mutex::new(BTreeSet::new()),
            next_hold_id: AtomicU64::new(1),
            programs,
            journal,
            evictions: AtomicU64::new(0),
        }
    }

    /// Loads persisted cards (at startup, before any request). `hold_id_next` is the journal's
    /// durable high-water mark of hold ids: new holds are numbered from above it and above every
    /// open hold.
    pub fn restore(&self, cards: impl IntoIterator<Item = (CardKey, CardRecord)>, hold_id_next: u64) -> Restored {
        let mut out = Restored::default();
        let mut next_hold_id = hold_id_next.max(1);
        let mut deadlines = self.deadlines.lock().expect("deadlines lock");
        for (key, mut rec) in cards {
            for h in &rec.holds {
                self.holds.insert(h.id, key);
                deadlines.insert((h.expires_ms, h.id));
                next_hold_id = next_hold_id.max(h.id + 1);
                out.holds += 1;
            }
            let program = match self.programs.get(&rec.program) {
                Some(p) => p.clone(),
                None => {
                    if !out.unknown_programs.iter().any(|n| **n == *rec.program) {
                        out.unknown_programs.push(rec.program.to_string());
                    }
                    Arc::new(Program::new(&rec.program))
                }
            };
            rec.program = program.name.clone();
            *out.balance_minor_by_currency.entry(rec.currency).or_default() += rec.balance_minor as i128;
            out.cards += 1;
            self.cards.insert(key, Card { rec, program, last_group: 0 });
        }
        self.next_hold_id.store(next_hold_id, Ordering::SeqCst);
        out
    }

    /// Decides and records a mutation. Exactly-once per idempotency key: a retry with the same
    /// content gets the original outcome, with different content `idempotency_mismatch`.
    pub fn execute(&self, m: Mutation, now_ms: i64) -> Executed {
        let evictions = self.evictions.load(Ordering::SeqCst);
        if let Some(recent) = self.idem.get(&m.idem) {
            return replay(&recent.record, recent.group, &m.fingerprint);
        }
        // Keys older than the memory window are answered by the store. Its record may be written
        // but not yet synced (a retry racing its original), so the reply waits for every group
        // appended so far, which includes the original's.
        if let Some(record) = self.journal.find_idem(&m.idem) {
            return replay(&record, self.journal.latest_group(), &m.fingerprint);
        }
        let invoice = match &m.op {
            Op::Redeem { invoice: Some(i), .. } => Some(InvoiceKey::new(m.idem.merchant(), i)),
            _ => None,
        };
        let mut invoice_in_store = invoice.as_ref().is_some_and(|k| self.journal.invoice_used(k));

        let slot = match self.idem.entry(m.idem.clone()) {
            Entry::Occupied(e) => return replay(&e.get().record, e.get().group, &m.fingerprint),
            Entry::Vacant(v) => v,
        };
        let invoice_slot = invoice.map(|k| self.invoices.entry(k));
        // A sweep between the store lookups above and taking the slots could have dropped this key
        // (or invoice) from memory after the store missed it. What a sweep drops is durable, so
        // asking the store again, now under the slots, settles it. Sweeps run about once a second,
        // so this second lookup is rare.
        if self.evictions.load(Ordering::SeqCst) != evictions {
            if let Some(record) = self.journal.find_idem(&m.idem) {
                return replay(&record, 0, &m.fingerprint);
            }
            if let Some(Entry::Vacant(v)) = &invoice_slot {
                invoice_in_store = self.journal.invoice_used(v.key());
            }
        }
        let invoice_used = invoice_in_store || matches!(invoice_slot, Some(Entry::Occupied(_)));

        // The invoice is claimed only by an approved spend, so a declined sale can be retried.
        let claim = match &invoice_slot {
            Some(Entry::Vacant(v)) => Some(v.key().clone()),
            _ => None,
        };
        let card = m.card.or_else(|| m.op.hold_id().and_then(|id| self.holds.get(&id).map(|c| *c)));
        let (outcome, group) = match (&m.op, card) {
            (Op::Issue { program, .. }, Some(card)) => self.issue(&m, card, program, now_ms),
            (_, Some(card)) => self.change(&m, card, invoice_used, claim, now_ms),
            (_, None) => {
                let code = if m.card.is_none() { ResultCode::HoldNotFound } else { ResultCode::CardNotFound };
                self.declined(&m, Outcome::declined(code, None))
            }
        };
        let record = IdemRecord { fingerprint: m.fingerprint, outcome };
        if outcome.result == ResultCode::Approved {
            if let Some(Entry::Vacant(v)) = invoice_slot {
                v.insert((group, now_ms));
            }
        }
        slot.insert(RecentIdem { record, group, at_ms: now_ms });
        Executed { outcome, group, replayed: false }
    }

    /// Adds the idempotency record to `effects` and appends them to the journal.
    fn record(&self, m: &Mutation, outcome: Outcome, mut effects: Effects) -> (Outcome, Appended) {
        effects.idem = Some((m.idem.clone(), IdemRecord { fingerprint: m.fingerprint, outcome }));
        (outcome, self.journal.append(effects))
    }

    /// Records a decision that changes no card (a decline): only its idempotency record.
    fn declined(&self, m: &Mutation, outcome: Outcome) -> (Outcome, u64) {
        let (outcome, at) = self.record(m, outcome, Effects::default());
        (outcome, at.group)
    }

    /// A change just applied to `rec`, with its history entry linked to the card's previous one.
    /// The journal gives the entry its id; the caller then stores it in its `rec.last_txn_id`.
    fn change_of(
        card: CardKey,
        merchant: &str,
        rec: &CardRecord,
        kind: TxnKind,
        amount_minor: i64,
        now_ms: i64,
    ) -> CardChange {
        let txn = TxnRecord {
            id: 0,
            prev_id: rec.last_txn_id,
            card,
            seq: rec.txn_count,
            kind,
            amount_minor,
            balance_after_minor: rec.balance_minor,
            at_ms: now_ms,
            merchant: merchant.into(),
        };
        CardChange { record: rec.clone(), txn }
    }

    fn issue(&self, m: &Mutation, key: CardKey, program: &str, now_ms: i64) -> (Outcome, u64) {
        let program = self.programs.get(program);
        let Op::Issue { money, .. } = &m.op else { unreachable!("issue() is called for Op::Issue") };
        match self.cards.entry(key) {
            Entry::Occupied(e) => {
                self.declined(m, Outcome::declined(ResultCode::CardExists, Some(e.get().rec.view(now_ms))))
            }
            Entry::Vacant(v) => match rules::decide_issue(program, m.last4, &m.op, now_ms) {
                Err(code) => self.declined(m, Outcome::declined(code, None)),
                Ok(mut rec) => {
                    let outcome = Outcome::approved(money.minor, rec.view(now_ms));
                    let effects = Effects {
                        change: Some(Self::change_of(
                            key,
                            m.idem.merchant(),
                            &rec,
                            TxnKind::Issue,
                            money.minor,
                            now_ms,
                        )),
                        ledger: Some(LedgerDelta {
                            currency: money.currency,
                            credit_minor: money.minor,
                            debit_minor: 0,
                        }),
                        ..Effects::default()
                    };
                    // Appended while the vacant entry still holds the shard lock.
                    let (outcome, at) = self.record(m, outcome, effects);
                    rec.last_txn_id = at.txn_id;
                    let program = program.expect("decide_issue checked the program").clone();
                    v.insert(Card { rec, program, last_group: at.group });
                    (outcome, at.group)
                }
            },
        }
    }

    fn change(
        &self,
        m: &Mutation,
        key: CardKey,
        invoice_used: bool,
        claim: Option<InvoiceKey>,
        now_ms: i64,
    ) -> (Outcome, u64) {
        let Some(mut card) = self.cards.get_mut(&key) else {
            return self.declined(m, Outcome::declined(ResultCode::CardNotFound, None));
        };
        let card = &mut *card;
        // Holds past their deadline are released (and written) before anything else is decided, so
        // the card's history shows the release before the decision that may spend the money.
        self.release_due(key, card, now_ms);
        match rules::decide(&card.rec, &card.program, &m.op, invoice_used, now_ms) {
            Err(code) => self.declined(m, Outcome::declined(code, Some(card.rec.view(now_ms)))),
            Ok(d) => {
                let (outcome, effects) = self.apply(key, card, m.idem.merchant(), &d, now_ms);
                let effects = Effects { invoice: claim, ..effects };
                // Appended under the card's lock: the journal sees this card's changes in order.
                let (outcome, at) = self.record(m, outcome, effects);
                card.rec.last_txn_id = at.txn_id;
                card.last_group = at.group;
                (outcome, at.group)
            }
        }
    }

    /// Applies an approved decision to the card in memory and to the hold index, and returns the
    /// outcome and the effects to journal. The caller holds the card's lock and appends at once.
    fn apply(&self, key: CardKey, card: &mut Card, merchant: &str, d: &Decision, now_ms: i64) -> (Outcome, Effects) {
        let mut opened = None;
        let mut hold_id_next = None;
        match d.hold {
            HoldChange::None => {}
            HoldChange::Open { amount_minor, expires_ms } => {
                let id = self.next_hold_id.fetch_add(1, Ordering::SeqCst);
                opened = Some(HoldView { id, amount_minor, expires_ms });
                hold_id_next = Some(id + 1);
                self.holds.insert(id, key);
                self.deadlines.lock().expect("deadlines lock").insert((expires_ms, id));
            }
            HoldChange::Close { id } => {
                if let Some(h) = card.rec.holds.iter().find(|h| h.id == id) {
                    self.deadlines.lock().expect("deadlines lock").remove(&(h.expires_ms, id));
                }
                self.holds.remove(&id);
            }
        }
        d.apply(&mut card.rec, now_ms, opened.map_or(0, |h| h.id));
        assert!(card.rec.check().is_ok(), "card invariant broken by {:?}: {:?}", d.kind, card.rec.check());
        let outcome = Outcome { hold: opened, ..Outcome::approved(d.approved_minor, card.rec.view(now_ms)) };
        let effects = Effects {
            change: Some(Self::change_of(key, merchant, &card.rec, d.kind, d.history_amount(), now_ms)),
            ledger: (d.delta_minor != 0).then_some(LedgerDelta {
                currency: card.rec.currency,
                credit_minor: d.delta_minor.max(0),
                debit_minor: (-d.delta_minor).max(0),
            }),
            hold_id_next,
            ..Effects::default()
        };
        (outcome, effects)
    }

    /// Releases (and journals) every hold of the card that is past its deadline at `now_ms`.
    fn release_due(&self, key: CardKey, card: &mut Card, now_ms: i64) {
        while let Some(d) = rules::expiry(&card.rec, now_ms) {
            let (_, effects) = self.apply(key, card, SYSTEM_MERCHANT, &d, now_ms);
            let at = self.journal.append(effects);
            card.rec.last_txn_id = at.txn_id;
            card.last_group = at.group;
        }
    }

    /// The earliest deadline of an open hold, for the expiry timer.
    pub fn next_hold_deadline(&self) -> Option<i64> {
        self.deadlines.lock().expect("deadlines lock").first().map(|(at, _)| *at)
    }

    /// Releases holds whose deadline is at or before `now_ms`, at most `max` of them (so a burst of
    /// deadlines is worked off in bounded steps between requests). Returns how many it released.
    /// Visits only due holds, in deadline order.
    pub fn expire_holds(&self, now_ms: i64, max: usize) -> usize {
        let mut released = 0;
        while released < max {
            let id = {
                let mut deadlines = self.deadlines.lock().expect("deadlines lock");
                match deadlines.first() {
                    Some(&(at, id)) if at <= now_ms => {
                        deadlines.remove(&(at, id));
                        id
                    }
                    _ => break,
                }
            };
            // The index is read and dropped before the card is locked (lock order: card first).
            let Some(key) = self.holds.get(&id).map(|k| *k) else { continue };
            if let Some(mut card) = self.cards.get_mut(&key) {
                let before = card.rec.holds.len();
                self.release_due(key, &mut card, now_ms);
                released += before - card.rec.holds.len();
            }
        }
        released
    }

    /// A balance inquiry, and the group the reply must wait for (the card's last change).
    pub fn balance(&self, card: &CardKey, now_ms: i64) -> (Outcome, u64) {
        match self.cards.get(card) {
            None => (Outcome::declined(ResultCode::CardNotFound, None), 0),
            Some(c) => (Outcome::approved(0, c.rec.view(now_ms)), c.last_group),
        }
    }

    /// A copy of the card's record and the group of its last change.
    pub fn snapshot(&self, card: &CardKey) -> Option<(CardRecord, u64)> {
        self.cards.get(card).map(|c| (c.rec.clone(), c.last_group))
    }

    /// Forgets in-memory idempotency keys and invoices that are durable and older than
    /// `older_than_ms`; the store answers for them from then on.
    pub fn evict_recent(&self, durable_group: u64, older_than_ms: i64) {
        // Counted before anything is dropped: see `execute`.
        self.evictions.fetch_add(1, Ordering::SeqCst);
        self.idem.retain(|_, r| r.group > durable_group || r.at_ms >= older_than_ms);
        self.invoices.retain(|_, (g, at)| *g > durable_group || *at >= older_than_ms);
    }

    /// Idempotency keys held in memory.
    pub fn recent_keys(&self) -> usize {
        self.idem.len()
    }
}

fn replay(record: &IdemRecord, group: u64, fingerprint: &[u8; 16]) -> Executed {
    if record.fingerprint == *fingerprint {
        Executed { outcome: record.outcome, group, replayed: true }
    } else {
        // The decline reveals that the key is taken, so it too waits until the original is durable.
        Executed { outcome: Outcome::declined(ResultCode::IdempotencyMismatch, None), group, replayed: false }
    }
}

#[cfg(test)]
mod tests;
