//! The engine: every business rule, and the in-memory cards they apply to.
//!
//! [`rules`] decides; [`Engine`] serializes decisions per card (a mutex per card), enforces
//! idempotency and invoice uniqueness, and hands each decision's effects to the [`Journal`] while the
//! cards are still locked, so the journal's order matches the order decisions were made in.
//!
//! Lock order, always: idempotency slot → invoice slot → cards (in key order) → journal. The hold
//! index, the deadline set and the settlement map are leaves. Two slots of the idempotency map are
//! never held at once: an operation that names an earlier mutation reads (or, for a reversal,
//! claims) that mutation's key before it takes its own. Nothing here awaits.

pub mod access;
pub mod alerts;
pub mod card;
pub mod journal;
pub mod program;
pub mod rules;

pub use card::{CardRecord, Lifecycle};
pub use journal::{
    Appended, Bulk, CardChange, Changes, ChunkKind, ChunkRecord, Effect, EffectParts, EffectTxns, Effects, IdemKey,
    IdemRecord, InvoiceKey, JobSpec, Journal, LedgerDelta, MemoryJournal, NoteRecord, Settled, TxnRecord,
};
pub use program::{Program, ProgramSlot, Programs};
pub use rules::{ChunkCard, ChunkWork, IssueNumber, KeyedItem, Op, SplitOrder};

use crate::card_number::{CardKey, CardKeyState};
use crate::model::{Currency, HoldView, LockReason, Money, Outcome, PartView, Parts, ResultCode, Status, TxnKind};
use alerts::{AlertRecord, AlertRules, Watcher};
use card::Card;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use rules::{Decision, HoldChange, RefundOf};
use smallvec::SmallVec;
use std::collections::HashMap;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// The merchant named in the history entries of decisions giftd makes by itself (hold expiry).
pub const SYSTEM_MERCHANT: &str = "giftd";
/// Most cards one split redeem may name.
pub const SPLIT_CARDS_MAX: usize = 8;
/// The fingerprint every compensation issue is recorded with: a case's first card answers every
/// later issue for the case, whatever its content.
const CASE_FINGERPRINT: [u8; 16] = *b"compensation-cas";

/// A validated mutation, keyed: the card number is already replaced by its key.
#[derive(Clone, Debug)]
pub struct Mutation {
    pub idem: IdemKey,
    /// Keyed digest of the request's content: a retry must match it.
    pub fingerprint: [u8; 16],
    /// The card, for operations that name one; capture and void name a hold, reversals an earlier
    /// mutation, and split redeems several cards (in the op), and the engine finds their cards.
    pub card: Option<CardKey>,
    /// The number's last 4 digits (kept by an issue; zeros when no number was given).
    pub last4: [u8; 4],
    pub op: Op,
    /// One item of a batch: its write may wait for the batch's (`Effects::batched`).
    pub batched: bool,
    /// Its key's store lookup, made with the rest of its batch's keys ([`Engine::look_up`]).
    pub looked_up: Option<LookedUp>,
}

/// A key as the store had it, looked up before its decision together with the other keys of its
/// batch. It stands for the store lookup `execute` would make, only earlier: the eviction count
/// is the one read before the lookup, so a sweep since then makes the decision ask the store
/// again, under the key's slot, as it does after its own lookup.
#[derive(Clone, Debug)]
pub struct LookedUp {
    key: IdemKey,
    evictions: u64,
    record: Option<IdemRecord>,
}

/// The engine's answer: the outcome (and per-card parts, for the operations that list them), and
/// the commit group the reply must wait for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Executed {
    pub outcome: Outcome,
    pub parts: Option<Parts>,
    /// The explanation the reply carries (reactivate).
    pub reason: Option<String>,
    pub group: u64,
    pub replayed: bool,
    /// Which generated number an approved issue used (index into its candidates); only the first
    /// answer says, since no one may learn a card's number from a replay.
    pub issued: Option<u8>,
    /// An all-or-nothing batch's answer for each item.
    pub items: Option<Vec<Outcome>>,
    /// A job chunk's answer for each card, and whether it changed the card.
    pub chunk: Option<Vec<(ResultCode, bool)>>,
    /// Security rules this decision fired (each durable before the reply, like the decision).
    pub alerts: Vec<AlertRecord>,
}

/// A recently used idempotency key, kept in memory at least until its group is durable.
struct RecentIdem {
    record: IdemRecord,
    group: u64,
    at_ms: i64,
}

/// A mutation's settlement state changed recently, kept in memory at least until durable.
struct RecentSettled {
    state: Settled,
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

/// What the cards hold now, for dashboards: counted over every card in memory.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Cards by status, indexed by `Status as usize`.
    pub cards_by_status: [u64; Status::ALL.len()],
    /// Open holds that still reserve money (not past their deadline).
    pub holds_open: u64,
    /// Per currency: Σ balances (what the issuer owes holders) and Σ of what open holds reserve.
    pub liability_minor: BTreeMap<Currency, i128>,
    pub held_minor: BTreeMap<Currency, i128>,
}

/// A card's cell: the map's shard lock is held only to find it, the card's own mutex while
/// deciding, so several cards can be locked at once (in key order) for a multi-card operation.
type CardCell = Arc<Mutex<Card>>;

/// Several cards, locked in key order for one multi-card decision.
struct Locked<'a> {
    keys: Vec<CardKey>,
    guards: Vec<MutexGuard<'a, Card>>,
}

impl Locked<'_> {
    /// The card's place: `keys` is sorted (the lock order), so a batch of thousands finds each
    /// card in a few comparisons.
    fn at(&self, key: &CardKey) -> usize {
        self.keys.binary_search(key).expect("every card of the operation is locked")
    }

    fn card(&mut self, key: &CardKey) -> &mut Card {
        let i = self.at(key);
        &mut self.guards[i]
    }

    fn card_ref(&self, key: &CardKey) -> &Card {
        &self.guards[self.at(key)]
    }
}

/// The cards a decision holds locked, for [`Engine::screen`] to find a card a rule suspends.
trait HeldCards {
    fn held(&mut self, key: &CardKey) -> Option<&mut Card>;
}

impl HeldCards for Locked<'_> {
    fn held(&mut self, key: &CardKey) -> Option<&mut Card> {
        let i = self.keys.binary_search(key).ok()?;
        Some(&mut self.guards[i])
    }
}

/// The one card a single-card decision holds.
struct OneCard<'a> {
    key: CardKey,
    card: &'a mut Card,
}

impl HeldCards for OneCard<'_> {
    fn held(&mut self, key: &CardKey) -> Option<&mut Card> {
        (*key == self.key).then_some(&mut *self.card)
    }
}

/// A decision that holds no card (a reversal with nothing to undo).
struct NoCards;

impl HeldCards for NoCards {
    fn held(&mut self, _: &CardKey) -> Option<&mut Card> {
        None
    }
}

/// Cards an alert rule suspended, each with the place of its lock among the decision's changes.
type Suspended = SmallVec<[(CardKey, usize); 1]>;

/// Points each suspended card at its lock's history entry, the card's newest: called once the
/// decision is appended, after the caller pointed its cards at their own entries.
fn point_suspended(at: Appended, suspended: &Suspended, cards: &mut dyn HeldCards) {
    for (key, i) in suspended {
        if let Some(card) = cards.held(key) {
            card.rec.last_txn_id = at.first_txn_id + *i as u64;
            card.last_group = at.group;
        }
    }
}

/// What a decision answers, before it is recorded under its key.
struct Answer {
    outcome: Outcome,
    parts: Option<Parts>,
    effect: Option<Effect>,
    reason: Option<String>,
    /// An all-or-nothing batch's answer for each item.
    items: Option<Vec<Outcome>>,
    /// A job's record, or a job chunk's.
    bulk: Option<Bulk>,
}

impl Answer {
    fn plain(outcome: Outcome) -> Answer {
        Answer { outcome, parts: None, effect: None, reason: None, items: None, bulk: None }
    }
}

/// Shards of the card map. Many, so that growing one (a bulk issue adds a million cards) moves
/// a few thousand entries under its lock, never a large share of all cards.
const CARD_SHARDS: usize = 256;

pub struct Engine {
    cards: DashMap<CardKey, CardCell, CardKeyState>,
    idem: DashMap<IdemKey, RecentIdem>,
    settled: DashMap<IdemKey, RecentSettled>,
    invoices: DashMap<InvoiceKey, (u64, i64)>,
    /// Open holds → their card: capture and void name only the hold.
    holds: DashMap<u64, CardKey>,
    /// Open holds by deadline, so expiry visits only what is due, never every card. A leaf lock:
    /// taken under a card's lock or alone, never the other way round.
    deadlines: Mutex<BTreeSet<(i64, u64)>>,
    /// The next hold id. Ids are never reused: the journal keeps the high-water mark durable with
    /// each hold that uses one.
    next_hold_id: AtomicU64,
    /// Programs by name. Read when a card is issued or restored; cards hold their program's slot.
    programs: RwLock<HashMap<Arc<str>, ProgramSlot>>,
    /// Slots of programs that cards name but no configuration or update defines: default rules
    /// apply to those cards, yet no card may be issued in such a program until an admin sets it
    /// (its slot then joins `programs`, and reaches these cards). A leaf lock.
    orphans: Mutex<HashMap<Arc<str>, ProgramSlot>>,
    journal: Arc<dyn Journal>,
    /// Sweeps of the recent maps so far.
    evictions: AtomicU64,
    /// Held while a job chunk is decided: one at a time (see `execute_chunk`).
    chunks: Mutex<()>,
    alert_rules: arc_swap::ArcSwap<AlertRules>,
    watcher: Watcher,
}

impl Engine {
    pub fn new(programs: Programs, journal: Arc<dyn Journal>) -> Engine {
        Engine {
            cards: DashMap::with_hasher_and_shard_amount(CardKeyState::default(), CARD_SHARDS),
            idem: DashMap::new(),
            settled: DashMap::new(),
            invoices: DashMap::new(),
            holds: DashMap::new(),
            deadlines: Mutex::new(BTreeSet::new()),
            next_hold_id: AtomicU64::new(1),
            programs: RwLock::new(programs.into_slots()),
            orphans: Mutex::new(HashMap::new()),
            journal,
            evictions: AtomicU64::new(0),
            chunks: Mutex::new(()),
            alert_rules: arc_swap::ArcSwap::from_pointee(AlertRules::default()),
            watcher: Watcher::default(),
        }
    }

    /// Replaces the security alert rules (at startup, from the configuration).
    pub fn set_alert_rules(&self, rules: AlertRules) {
        self.watcher.fit(&rules);
        self.alert_rules.store(Arc::new(rules));
    }

    /// Judges a decision by the card rules and the reversal rule before it is committed, so that
    /// what fires is appended with it, in one write: after a crash an acknowledged decision always
    /// has its alert, and no request is decided on a card between its decision and its suspension.
    /// A rule that suspends adds the card's fraud lock (by `giftd`) after the decision's own
    /// changes, which keep their places (the idempotency record's effect and the callers count on
    /// them). The reply still shows the card as the decision left it. Returns where each lock went,
    /// for [`point_suspended`] once the ids are known; what fired is added to `fired`.
    fn screen(
        &self,
        m: &Mutation,
        result: ResultCode,
        effects: &mut Effects,
        cards: &mut dyn HeldCards,
        fired: &mut Vec<AlertRecord>,
        now_ms: i64,
    ) -> Suspended {
        let mut suspended = Suspended::new();
        if !matches!(result, ResultCode::Approved | ResultCode::PinIncorrect) {
            return suspended;
        }
        let rules = self.alert_rules.load();
        let merchant = m.idem.merchant();
        let mut new = Vec::new();
        let events: SmallVec<[alerts::CardEvent; 2]> = effects
            .changes
            .iter()
            .map(|c| alerts::CardEvent {
                card: c.txn.card,
                last4: c.record.last4,
                currency: c.record.currency,
                kind: c.txn.kind,
                amount_minor: c.txn.amount_minor,
                pin_failures: c.record.pin_failures,
            })
            .collect();
        for (i, mut alert) in self.watcher.cards(&rules, merchant, &events, now_ms) {
            let key = events[i].card;
            if rules.suspends(alert.rule) && !suspended.iter().any(|(k, _)| *k == key) {
                if let Some(card) = cards.held(&key).filter(|c| c.rec.lock == LockReason::None) {
                    let program = card.program.load();
                    let lock = Op::Lock { reason: LockReason::Fraud };
                    if let Ok(d) = rules::decide(&card.rec, &program, &lock, SYSTEM_MERCHANT, false, now_ms) {
                        let (_, change, _) = self.apply(key, card, SYSTEM_MERCHANT, &d, now_ms);
                        suspended.push((key, effects.changes.len()));
                        effects.changes.push(change.after_earlier());
                        alert.suspended = true;
                    }
                }
            }
            new.push(alert);
        }
        if result == ResultCode::Approved && matches!(m.op, Op::Reverse { .. }) {
            new.extend(self.watcher.reversal(&rules, merchant, now_ms));
        }
        fired.extend(new.iter().cloned());
        effects.alerts.extend(new);
        suspended
    }

    /// Whether the enumeration rule is on (so the server need not name the client otherwise).
    pub fn counts_unknown_cards(&self) -> bool {
        self.alert_rules.load().enumeration_per_minute.is_some()
    }

    /// Counts `unknown` answers of `card_not_found` to `client` (its configured name, or its
    /// address) for the enumeration rule, whatever asked: balance, lookup and history reads as much
    /// as mutations. When that brings the client's count over the last minute to the threshold, the
    /// alert is appended on its own (it belongs to no one decision) and returned with its group,
    /// which the reply then waits for.
    pub fn unknown_cards(&self, client: &str, merchant: &str, unknown: u32, now_ms: i64) -> Option<(AlertRecord, u64)> {
        let rules = self.alert_rules.load();
        let alert = self.watcher.unknown_cards(&rules, client, merchant, unknown, now_ms)?;
        let at = self.journal.append(Effects { alerts: vec![alert.clone()], ..Effects::default() });
        Some((alert, at.group))
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
            let program = self.programs.read().expect("programs lock").get(&rec.program).cloned();
            let program = match program {
                Some(p) => p,
                None => {
                    // Default rules apply until an admin sets the program; it then reaches these
                    // cards through the slot. It is not issuable meanwhile (a program dropped from
                    // the configuration stays closed to new cards).
                    let mut orphans = self.orphans.lock().expect("orphans lock");
                    orphans
                        .entry(rec.program.clone())
                        .or_insert_with(|| {
                            out.unknown_programs.push(rec.program.to_string());
                            Arc::new(arc_swap::ArcSwap::from_pointee(Program::new(&rec.program)))
                        })
                        .clone()
                }
            };
            rec.program = program.load().name.clone();
            *out.balance_minor_by_currency.entry(rec.currency).or_default() += rec.balance_minor as i128;
            out.cards += 1;
            self.cards.insert(key, Arc::new(Mutex::new(Card { rec, program, last_group: 0 })));
        }
        self.next_hold_id.store(next_hold_id, Ordering::SeqCst);
        out
    }

    /// Counts every card by status and sums balances and holds per currency. Each card is read
    /// under its own lock, one at a time, so a census is a consistent view of each card but not a
    /// snapshot of all of them. The cells are gathered first, so no shard lock is held while a
    /// card's lock is awaited (a decision may hold a card and then want a shard).
    pub fn census(&self, now_ms: i64) -> Census {
        let cells: Vec<CardCell> = self.cards.iter().map(|c| c.value().clone()).collect();
        let mut out = Census::default();
        for cell in cells {
            let card = cell.lock().expect("card lock");
            let rec = &card.rec;
            out.cards_by_status[rec.status(now_ms) as usize] += 1;
            *out.liability_minor.entry(rec.currency).or_default() += rec.balance_minor as i128;
            let held = rec.held_at(now_ms);
            if held > 0 {
                *out.held_minor.entry(rec.currency).or_default() += held as i128;
            }
            out.holds_open += rec.holds.iter().filter(|h| h.expires_ms > now_ms).count() as u64;
        }
        out
    }

    fn cell(&self, key: &CardKey) -> Option<CardCell> {
        self.cards.get(key).map(|c| c.clone())
    }

    /// A bulk job as `job_open` recorded it, and the group to wait for.
    pub fn job(&self, merchant: &str, job: &str) -> Option<(JobSpec, u64)> {
        let key = IdemKey::job(merchant, job);
        if let Some(r) = self.idem.get(&key) {
            return r.record.job().map(|j| (j, r.group));
        }
        self.journal.find_idem(&key).and_then(|r| r.job()).map(|j| (j, self.journal.latest_group()))
    }

    /// Whether a chunk fits its job: the job is open, the chunk starts at a chunk boundary and
    /// holds that chunk's cards, and does the job's kind of work (or takes a chunk back). Else the
    /// decline and the group it waits for.
    fn chunk_fits(
        &self,
        merchant: &str,
        job: &str,
        first: u32,
        work: &ChunkWork,
        cards: usize,
    ) -> Result<(), (ResultCode, u64)> {
        let Some((spec, group)) = self.job(merchant, job) else { return Err((ResultCode::JobNotFound, 0)) };
        let size = spec.count.saturating_sub(first).min(spec.chunk_cards as u32) as usize;
        let fits = first < spec.count
            && first.is_multiple_of(spec.chunk_cards as u32)
            && match work {
                ChunkWork::Reverse => cards == 0,
                _ => work.kind() == spec.kind && cards == size,
            };
        if fits {
            Ok(())
        } else {
            Err((ResultCode::JobChunkMismatch, group))
        }
    }

    /// The program's current rules.
    pub fn program(&self, name: &str) -> Option<Arc<Program>> {
        self.programs.read().expect("programs lock").get(name).map(|s| s.load_full())
    }

    /// Every program's current rules, by name.
    pub fn programs(&self) -> Vec<Arc<Program>> {
        let mut v: Vec<Arc<Program>> =
            self.programs.read().expect("programs lock").values().map(|s| s.load_full()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Replaces programs with what the journal kept of admin updates (at startup, before
    /// `restore`): an update made over the wire outlives the config file it started from.
    pub fn restore_programs(&self, programs: impl IntoIterator<Item = Program>) {
        let mut map = self.programs.write().expect("programs lock");
        for p in programs {
            match map.get(&*p.name) {
                Some(slot) => slot.store(Arc::new(p)),
                None => {
                    map.insert(p.name.clone(), Arc::new(arc_swap::ArcSwap::from_pointee(p)));
                }
            }
        }
    }

    /// Looks a batch's keys up in the store in one read, before any of its items is decided: each
    /// item's `Mutation::looked_up`, in `keys` order.
    pub fn look_up(&self, keys: Vec<IdemKey>) -> Vec<LookedUp> {
        // Read before the lookup, as `execute` reads it before its own.
        let evictions = self.evictions.load(Ordering::SeqCst);
        let records = self.journal.find_idems(&keys);
        keys.into_iter().zip(records).map(|(key, record)| LookedUp { key, evictions, record }).collect()
    }

    /// Decides and records a mutation. Exactly-once per idempotency key: a retry with the same
    /// content gets the original outcome, with different content `idempotency_mismatch`.
    pub fn execute(&self, mut m: Mutation, now_ms: i64) -> Executed {
        // A compensation issue is keyed by its case, for every caller: whoever issues again for the
        // same case, with whatever content, gets the first card's answer. Cases live under the
        // empty merchant, which no request can name.
        // The issuer is kept for the card's history (only a case issue needs the copy, so nothing
        // is allocated for other requests).
        let case_author: Option<Box<str>> = match &m.op {
            Op::Issue { case: Some(case), .. } => {
                let author = m.idem.merchant().into();
                m.idem = IdemKey::new("", case);
                m.fingerprint = CASE_FINGERPRINT;
                Some(author)
            }
            _ => None,
        };
        // Only an issued card binds a case: a declined compensation issue (a mistyped program, say)
        // changed nothing, so the next issue for the case is decided afresh.
        let case_issue = case_author.is_some();
        if matches!(m.op, Op::JobChunk { .. }) {
            return self.execute_chunk(m, now_ms);
        }
        let binds = |r: &IdemRecord| !case_issue || r.outcome.result == ResultCode::Approved;
        // A lookup made for another key (a case replaced the request's) is not this one's.
        let looked_up = m.looked_up.take().filter(|l| l.key == m.idem);
        let evictions = looked_up.as_ref().map_or_else(|| self.evictions.load(Ordering::SeqCst), |l| l.evictions);
        if let Some(recent) = self.idem.get(&m.idem).filter(|r| binds(&r.record)) {
            return replay(&recent.record, recent.group, &m.fingerprint);
        }
        // Keys older than the memory window are answered by the store. Its record may be written
        // but not yet synced (a retry racing its original), so the reply waits for every group
        // appended so far, which includes the original's.
        let stored = match looked_up {
            Some(l) => l.record,
            None => self.journal.find_idem(&m.idem),
        };
        if let Some(record) = stored.filter(|r| binds(r)) {
            return replay(&record, self.journal.latest_group(), &m.fingerprint);
        }
        // The mutation a refund or reversal names is looked up before this request's own slot is
        // taken (see the lock order above).
        let original = match &m.op {
            Op::Refund { original: Some(k), .. } => {
                let key = IdemKey::new(m.idem.merchant(), k);
                Some((self.original(&key, false, evictions, now_ms), key))
            }
            Op::Reverse { original } => {
                let key = IdemKey::new(m.idem.merchant(), original);
                Some((self.original(&key, true, evictions, now_ms), key))
            }
            _ => None,
        };
        let invoice = match &m.op {
            Op::Redeem { invoice: Some(i), .. } => Some(InvoiceKey::new(m.idem.merchant(), i)),
            _ => None,
        };
        let mut invoice_in_store = invoice.as_ref().is_some_and(|k| self.journal.invoice_used(k));

        let slot = match self.idem.entry(m.idem.clone()) {
            Entry::Occupied(e) if binds(&e.get().record) => {
                return replay(&e.get().record, e.get().group, &m.fingerprint)
            }
            // Vacant, or a case whose issue was declined: decided now, and the slot overwritten.
            e => e,
        };
        let invoice_slot = invoice.map(|k| self.invoices.entry(k));
        // A sweep between the store lookups above and taking the slots could have dropped this key
        // (or invoice) from memory after the store missed it. What a sweep drops is durable, so
        // asking the store again, now under the slots, settles it. Sweeps run about once a second,
        // so this second lookup is rare.
        if self.evictions.load(Ordering::SeqCst) != evictions {
            if let Some(record) = self.journal.find_idem(&m.idem).filter(|r| binds(r)) {
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
        let mut issued = None;
        let mut fired = Vec::new();
        // The card a capture or void acts on is found by its hold, before the decision closes it.
        let card = m.card.or_else(|| m.op.hold_id().and_then(|id| self.holds.get(&id).map(|c| *c)));
        let (record, group) = match (&m.op, original) {
            (Op::Issue { program, number, .. }, _) => {
                let candidates = match number {
                    IssueNumber::Supplied { .. } => vec![(m.card.expect("an issue names its card"), m.last4)],
                    IssueNumber::Generated(c) => c.clone(),
                };
                let author = case_author.as_deref().unwrap_or(m.idem.merchant());
                let (record, group, index) = self.issue(&m, author, &candidates, program, &mut fired, now_ms);
                issued = index.filter(|_| matches!(number, IssueNumber::Generated(_)));
                (record, group)
            }
            (Op::ProgramSet { program, settings }, _) => self.set_program(&m, program, settings),
            (Op::Keyed { items, all_or_nothing: true }, _) => self.atomic(&m, items, &mut fired, now_ms),
            (Op::Keyed { items, all_or_nothing: false }, _) => self.each(&m, items, &mut fired, now_ms),
            // A job's record is its idempotency record: its count is the answer.
            (Op::JobOpen { spec }, _) => {
                let outcome =
                    Outcome { approved_minor: spec.count as i64, ..Outcome::declined(ResultCode::Approved, None) };
                let answer = Answer { bulk: Some(Bulk::Job(*spec)), ..Answer::plain(outcome) };
                let (record, at) = self.commit(&m, answer, Effects::default());
                (record, at.group)
            }
            (Op::SplitRedeem { cards, money, order }, _) => self.split(&m, cards, money, *order, &mut fired, now_ms),
            (Op::Reverse { .. }, Some((orig, key))) => self.reverse(&m, &key, orig, &mut fired, now_ms),
            (Op::Refund { money, .. }, orig) => self.refund(&m, money, orig, &mut fired, now_ms),
            (Op::Reactivate, _) => self.reactivate(&m, m.card.expect("a reactivation names its card"), now_ms),
            (Op::Transfer { to }, _) => {
                self.transfer(&m, m.card.expect("a transfer names its card"), to.0, &mut fired, now_ms)
            }
            _ => match card {
                Some(card) => self.change(&m, card, invoice_used, claim, &mut fired, now_ms),
                None => {
                    let code = if m.card.is_none() { ResultCode::HoldNotFound } else { ResultCode::CardNotFound };
                    self.declined(&m, Outcome::declined(code, None))
                }
            },
        };
        if record.outcome.result == ResultCode::Approved {
            if let Some(Entry::Vacant(v)) = invoice_slot {
                v.insert((group, now_ms));
            }
        }
        let done = Executed {
            outcome: record.outcome,
            parts: record.parts.as_deref().cloned(),
            reason: record.reason.as_deref().map(str::to_string),
            group,
            replayed: false,
            issued,
            items: record.items.as_deref().cloned(),
            chunk: record.chunk().map(|c| c.results.clone()),
            alerts: fired,
        };
        slot.insert(RecentIdem { record, group, at_ms: now_ms });
        done
    }

    /// A chunk of a bulk job. Chunks are decided one at a time (`chunks`), and only chunks use
    /// chunk keys (a job id holds no `/`), so that lock, not the key's idempotency slot, makes a
    /// chunk exactly-once: a chunk of thousands of cards takes milliseconds, and holding a shard
    /// of the idempotency map that long would stall every payment whose key falls in it.
    fn execute_chunk(&self, m: Mutation, now_ms: i64) -> Executed {
        let Op::JobChunk { job, first, work, cards } = &m.op else { unreachable!("execute_chunk is for chunks") };
        let _one_at_a_time = self.chunks.lock().expect("chunks lock");
        // A chunk belongs to an open job, at its place: checked before anything is recorded, so
        // that a chunk sent before its job (or out of place) binds nothing.
        if let Err((code, group)) = self.chunk_fits(m.idem.merchant(), job, *first, work, cards.len()) {
            return Executed { group, ..Executed::of(Outcome::declined(code, None)) };
        }
        let evictions = self.evictions.load(Ordering::SeqCst);
        if let Some(recent) = self.idem.get(&m.idem) {
            return replay(&recent.record, recent.group, &m.fingerprint);
        }
        // What a sweep drops from memory is durable: asked after memory, the store has it.
        if let Some(record) = self.journal.find_idem(&m.idem) {
            return replay(&record, self.journal.latest_group(), &m.fingerprint);
        }
        let (record, group) = match work {
            ChunkWork::Reverse => {
                let key = IdemKey::chunk(m.idem.merchant(), job, *first, false);
                let original = self.original(&key, true, evictions, now_ms);
                self.chunk_reverse(&m, original, now_ms)
            }
            ChunkWork::Issue { program, money, expiry_ms } => {
                self.chunk_issue(&m, program, *money, *expiry_ms, cards, now_ms)
            }
            ChunkWork::Activate { load } => self.chunk_activate(&m, *load, cards, now_ms),
        };
        let done = Executed { group, chunk: record.chunk().map(|c| c.results.clone()), ..Executed::of(record.outcome) };
        self.idem.insert(m.idem, RecentIdem { record, group, at_ms: now_ms });
        done
    }

    /// The record of the mutation `key` names, for a refund or reversal. A reversal of a key never
    /// decided claims it with a tombstone, durably, so that the late original is declined
    /// (`original_reversed`) instead of applied; taking the key's slot serializes the two.
    fn original(&self, key: &IdemKey, reversal: bool, evictions: u64, now_ms: i64) -> Option<IdemRecord> {
        if let Some(r) = self.idem.get(key) {
            return Some(r.record.clone());
        }
        if let Some(r) = self.durable_original(key) {
            return Some(r);
        }
        if !reversal {
            return None;
        }
        match self.idem.entry(key.clone()) {
            Entry::Occupied(e) => Some(e.get().record.clone()),
            Entry::Vacant(v) => {
                // As in `execute`: a sweep since the store missed may have moved it there.
                if self.evictions.load(Ordering::SeqCst) != evictions {
                    if let Some(r) = self.durable_original(key) {
                        return Some(r);
                    }
                }
                let outcome = Outcome::declined(ResultCode::OriginalReversed, None);
                let record = IdemRecord { tombstone: true, ..IdemRecord::new([0; 16], outcome) };
                let at =
                    self.journal.append(Effects { idem: Some((key.clone(), record.clone())), ..Effects::default() });
                v.insert(RecentIdem { record: record.clone(), group: at.group, at_ms: now_ms });
                Some(record)
            }
        }
    }

    /// A mutation's record as the store has it, with its effect rebuilt from history.
    fn durable_original(&self, key: &IdemKey) -> Option<IdemRecord> {
        let mut r = self.journal.find_idem(key)?;
        if let (None, Some(txns)) = (&r.effect, r.effect_txns) {
            r.effect = self.journal.effect_of(txns, r.outcome.hold.map_or(0, |h| h.id));
        }
        if let Some(Bulk::Chunk(c)) = r.bulk.as_deref_mut() {
            let changed = c.results.iter().filter(|(_, changed)| *changed).count();
            if c.kind == ChunkKind::Activate && c.changed.is_empty() && changed > 0 {
                c.changed = self.journal.cards_of(c.first_txn_id, changed);
            }
        }
        Some(r)
    }

    /// Appends a decision's effects with its idempotency record; returns the record and where it went.
    fn commit(&self, m: &Mutation, answer: Answer, mut effects: Effects) -> (IdemRecord, Appended) {
        // A single-card record has no heap parts, so this copy allocates nothing.
        let mut record = IdemRecord {
            fingerprint: m.fingerprint,
            outcome: answer.outcome,
            parts: answer.parts.map(Box::new),
            effect: answer.effect,
            effect_txns: None,
            tombstone: false,
            reason: answer.reason.map(Into::into),
            items: answer.items.map(Box::new),
            bulk: answer.bulk.map(Box::new),
        };
        effects.idem = Some((m.idem.clone(), record.clone()));
        effects.batched = m.batched;
        let own = record.effect.as_ref().map(|e| EffectTxns::of(0, e, &effects.changes));
        let at = self.journal.append(effects);
        // The journal points its copy at the history entries it numbered; so does memory's.
        record.effect_txns = own.map(|t| EffectTxns { first: at.first_txn_id, ..t });
        if let Some(Bulk::Chunk(c)) = record.bulk.as_deref_mut() {
            c.first_txn_id = at.first_txn_id;
        }
        (record, at)
    }

    /// Judges, appends and points a decision about one card: the card rules see its changes (a
    /// suspension they ask for joins them), then the card is pointed at its newest entry, its own
    /// or the fraud lock's.
    #[allow(clippy::too_many_arguments)]
    fn commit_card(
        &self,
        m: &Mutation,
        answer: Answer,
        mut effects: Effects,
        key: CardKey,
        card: &mut Card,
        fired: &mut Vec<AlertRecord>,
        now_ms: i64,
    ) -> (IdemRecord, Appended) {
        let held = &mut OneCard { key, card };
        let suspended = self.screen(m, answer.outcome.result, &mut effects, held, fired, now_ms);
        let (record, at) = self.commit(m, answer, effects);
        (held.card.rec.last_txn_id, held.card.last_group) = (at.first_txn_id, at.group);
        point_suspended(at, &suspended, held);
        (record, at)
    }

    /// Records a decision that changes no card (a decline): only its idempotency record.
    fn declined(&self, m: &Mutation, outcome: Outcome) -> (IdemRecord, u64) {
        let (record, at) = self.commit(m, Answer::plain(outcome), Effects::default());
        (record, at.group)
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

    /// Issues the first of `candidates` that is not a card yet (a supplied number is the only
    /// candidate; generated numbers are several, so a collision picks the next). Returns which.
    fn issue(
        &self,
        m: &Mutation,
        author: &str,
        candidates: &[(CardKey, [u8; 4])],
        program: &str,
        fired: &mut Vec<AlertRecord>,
        now_ms: i64,
    ) -> (IdemRecord, u64, Option<u8>) {
        let program = self.programs.read().expect("programs lock").get(program).cloned();
        let Op::Issue { money, .. } = &m.op else { unreachable!("issue() is called for Op::Issue") };
        let mut last_taken = None;
        for (i, &(key, last4)) in candidates.iter().enumerate() {
            let v = match self.cards.entry(key) {
                Entry::Occupied(e) => {
                    // Locked after the shard is let go: a job chunk holds new cards' locks while it
                    // publishes them, shard by shard.
                    let cell = e.get().clone();
                    drop(e);
                    last_taken = Some(cell.lock().expect("card lock").rec.view(now_ms));
                    continue;
                }
                Entry::Vacant(v) => v,
            };
            let rules = program.as_ref().map(|s| s.load_full());
            return match rules::decide_issue(rules.as_deref(), last4, &m.op, now_ms) {
                Err(code) => {
                    let (record, group) = self.declined(m, Outcome::declined(code, None));
                    (record, group, None)
                }
                Ok(rec) => {
                    let outcome = Outcome::approved(money.minor, rec.view(now_ms));
                    let change = Self::change_of(key, author, &rec, TxnKind::Issue, money.minor, now_ms);
                    let program = program.expect("decide_issue checked the program");
                    let mut card = Card { rec, program, last_group: 0 };
                    let effects = Effects {
                        changes: smallvec::smallvec![change],
                        ledger: Some(LedgerDelta {
                            currency: money.currency,
                            credit_minor: money.minor,
                            debit_minor: 0,
                        }),
                        ..Effects::default()
                    };
                    // Appended while the vacant entry still holds the shard lock.
                    let (record, at) =
                        self.commit_card(m, Answer::plain(outcome), effects, key, &mut card, fired, now_ms);
                    v.insert(Arc::new(Mutex::new(card)));
                    (record, at.group, Some(i as u8))
                }
            };
        }
        // Every candidate is a card already: a supplied number (its card is shown: it is the
        // caller's), or (never seen in practice) every generated one, whose cards are strangers'.
        let supplied = matches!(m.op, Op::Issue { number: IssueNumber::Supplied { .. }, .. });
        let shown = if supplied { last_taken } else { None };
        let (record, group) = self.declined(m, Outcome::declined(ResultCode::CardExists, shown));
        (record, group, None)
    }

    /// Creates or replaces a program. A program's currency, once set, stays: its cards were issued
    /// in it.
    fn set_program(&self, m: &Mutation, program: &Arc<Program>, settings: &str) -> (IdemRecord, u64) {
        let mut map = self.programs.write().expect("programs lock");
        let current = map.get(&program.name).map(|s| s.load_full());
        if let Err(code) = rules::decide_program_set(current.as_deref(), program) {
            drop(map);
            return self.declined(m, Outcome::declined(code, None));
        }
        let effects = Effects { program: Some((program.name.clone(), settings.into())), ..Effects::default() };
        // Appended under the table's lock, so the journal keeps the updates of one program in the
        // order memory applied them.
        let (record, at) = self.commit(m, Answer::plain(Outcome::declined(ResultCode::Approved, None)), effects);
        match map.get(&program.name) {
            Some(slot) => slot.store(program.clone()),
            None => {
                // A program its cards named without a definition gets one: the same slot, so
                // those cards follow it.
                let orphan = self.orphans.lock().expect("orphans lock").remove(&program.name);
                let slot = orphan.unwrap_or_else(|| Arc::new(arc_swap::ArcSwap::new(program.clone())));
                slot.store(program.clone());
                map.insert(program.name.clone(), slot);
            }
        }
        (record, at.group)
    }

    fn change(
        &self,
        m: &Mutation,
        key: CardKey,
        invoice_used: bool,
        claim: Option<InvoiceKey>,
        fired: &mut Vec<AlertRecord>,
        now_ms: i64,
    ) -> (IdemRecord, u64) {
        let Some(cell) = self.cell(&key) else {
            return self.declined(m, Outcome::declined(ResultCode::CardNotFound, None));
        };
        let mut card = cell.lock().expect("card lock");
        let card = &mut *card;
        // Holds past their deadline are released (and written) before anything else is decided, so
        // the card's history shows the release before the decision that may spend the money.
        self.release_due(key, card, now_ms);
        // A guard, not a clone: every card of a program shares one `Arc`, and bumping its count on
        // every decision would bounce that cache line between cores.
        let program = card.program.load();
        match rules::decide(&card.rec, &program, &m.op, m.idem.merchant(), invoice_used, now_ms) {
            Err(ResultCode::PinIncorrect) => {
                // A declined request that still changes the card: the wrong PIN is counted (and
                // may lock the card), durably, so the count survives a restart.
                let d = rules::pin_failure(&card.rec, &program);
                let (_, change, mut effects) = self.apply(key, card, m.idem.merchant(), &d, now_ms);
                effects.changes.push(change);
                let outcome = Outcome::declined(ResultCode::PinIncorrect, Some(card.rec.view(now_ms)));
                let (record, at) = self.commit_card(m, Answer::plain(outcome), effects, key, card, fired, now_ms);
                (record, at.group)
            }
            Err(code) => {
                // A hold that is gone, or another merchant's, answers as an id never opened does:
                // without the card, which the caller named only through the hold.
                let view = (code != ResultCode::HoldNotFound).then(|| card.rec.view(now_ms));
                self.declined(m, Outcome::declined(code, view))
            }
            Ok(d) => {
                let prev_note_id = card.rec.last_note_id;
                let (outcome, change, mut effects) = self.apply(key, card, m.idem.merchant(), &d, now_ms);
                effects.changes.push(change);
                effects.invoice = claim;
                if let Op::Note { text } = &m.op {
                    let author = m.idem.merchant().into();
                    effects.note = Some((
                        0,
                        NoteRecord { prev_id: prev_note_id, at_ms: now_ms, author, text: text.as_str().into() },
                    ));
                }
                let effect = reversible(&m.op).then(|| Effect {
                    at_ms: now_ms,
                    kind: d.kind,
                    currency: card.rec.currency,
                    parts: smallvec::smallvec![(key, d.approved_minor)],
                    hold_id: outcome.hold.map_or(0, |h| h.id),
                });
                // Appended under the card's lock: the journal sees this card's changes in order.
                let answer = Answer { outcome, parts: None, effect, reason: None, items: None, bulk: None };
                let (record, at) = self.commit_card(m, answer, effects, key, card, fired, now_ms);
                if d.kind == TxnKind::Note {
                    card.rec.last_note_id = at.first_txn_id;
                }
                (record, at.group)
            }
        }
    }

    /// Applies an approved decision to the card in memory and to the hold index, and returns the
    /// outcome, the card change and the rest of the effects to journal. The caller holds the card's
    /// lock and appends at once.
    fn apply(
        &self,
        key: CardKey,
        card: &mut Card,
        merchant: &str,
        d: &Decision,
        now_ms: i64,
    ) -> (Outcome, CardChange, Effects) {
        let mut opened = None;
        let mut hold_id_next = None;
        match d.hold {
            HoldChange::None => {}
            HoldChange::Open { amount_minor, expires_ms, .. } => {
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
        let change = Self::change_of(key, merchant, &card.rec, d.kind, d.history_amount(), now_ms);
        let effects = Effects {
            ledger: (d.delta_minor != 0).then_some(LedgerDelta {
                currency: card.rec.currency,
                credit_minor: d.delta_minor.max(0),
                debit_minor: (-d.delta_minor).max(0),
            }),
            hold_id_next,
            ..Effects::default()
        };
        (outcome, change, effects)
    }

    /// Releases (and journals) every hold of the card that is past its deadline at `now_ms`.
    fn release_due(&self, key: CardKey, card: &mut Card, now_ms: i64) {
        while let Some(d) = rules::expiry(&card.rec, now_ms) {
            // Written under the merchant whose hold it was (giftd releases it, as its kind says),
            // so that merchant's event stream shows its hold lapse.
            let merchant = match d.hold {
                HoldChange::Close { id } => card.rec.holds.iter().find(|h| h.id == id).map(|h| h.merchant.clone()),
                _ => None,
            };
            let merchant = merchant.unwrap_or_else(|| SYSTEM_MERCHANT.into());
            let (_, change, mut effects) = self.apply(key, card, &merchant, &d, now_ms);
            effects.changes.push(change);
            let at = self.journal.append(effects);
            card.rec.last_txn_id = at.first_txn_id;
            card.last_group = at.group;
        }
    }

    /// Locks the cards `keys` names in one global order (by key), so two multi-card operations
    /// can never wait for each other. `None` if a card does not exist.
    fn lock_all(&self, keys: &[CardKey]) -> Option<Vec<(CardKey, CardCell)>> {
        let mut sorted: Vec<CardKey> = keys.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        sorted.into_iter().map(|k| self.cell(&k).map(|c| (k, c))).collect()
    }

    /// The cells of those of `keys` that exist, once each, in key order (the lock order), for
    /// [`Engine::lock_cells`]: unlike [`Engine::lock_all`], a missing card leaves the others.
    fn existing_cells(&self, mut keys: Vec<CardKey>) -> Vec<(CardKey, CardCell)> {
        keys.sort_unstable();
        keys.dedup();
        keys.into_iter().filter_map(|k| self.cell(&k).map(|c| (k, c))).collect()
    }

    /// Locks `cells` (already in key order, from [`Engine::lock_all`] or [`Engine::existing_cells`])
    /// and releases their due holds.
    fn lock_cells<'a>(&self, cells: &'a [(CardKey, CardCell)], now_ms: i64) -> Locked<'a> {
        let mut guards: Vec<MutexGuard<'a, Card>> = cells.iter().map(|(_, c)| c.lock().expect("card lock")).collect();
        for ((key, _), g) in cells.iter().zip(guards.iter_mut()) {
            self.release_due(*key, g, now_ms);
        }
        Locked { keys: cells.iter().map(|(k, _)| *k).collect(), guards }
    }

    /// A split redeem: several cards, one amount, all or nothing, one journal append.
    fn split(
        &self,
        m: &Mutation,
        cards: &[(CardKey, [u8; 4])],
        money: &crate::model::Money,
        order: SplitOrder,
        fired: &mut Vec<AlertRecord>,
        now_ms: i64,
    ) -> (IdemRecord, u64) {
        let keys: Vec<CardKey> = cards.iter().map(|(k, _)| *k).collect();
        let Some(cells) = self.lock_all(&keys) else {
            return self.declined(m, Outcome::declined(ResultCode::CardNotFound, None));
        };
        let mut locked = self.lock_cells(&cells, now_ms);
        let decided = {
            let recs: Vec<&CardRecord> = keys.iter().map(|k| &locked.card_ref(k).rec).collect();
            let programs: Vec<Arc<Program>> = keys.iter().map(|k| locked.card_ref(k).program.load_full()).collect();
            let programs: Vec<&Program> = programs.iter().map(|p| &**p).collect();
            rules::decide_split(&recs, &programs, money, order, now_ms)
        };
        let take = match decided {
            Err(code) => return self.declined(m, Outcome::declined(code, None)),
            Ok(t) => t,
        };
        let mut effects = Effects::default();
        let mut items = Vec::with_capacity(take.len());
        let mut parts = EffectParts::with_capacity(take.len());
        for &(i, minor) in &take {
            let g = locked.card(&keys[i]);
            let d = rules::split_part(&g.rec, minor);
            let (_, change, _) = self.apply(keys[i], g, m.idem.merchant(), &d, now_ms);
            effects.changes.push(change);
            items.push(PartView { last4: g.rec.last4, amount_minor: -minor, balance_after_minor: g.rec.balance_minor });
            parts.push((keys[i], minor));
        }
        effects.ledger = Some(LedgerDelta { currency: money.currency, credit_minor: 0, debit_minor: money.minor });
        let outcome = Outcome { result: ResultCode::Approved, approved_minor: money.minor, card: None, hold: None };
        let effect = Effect { at_ms: now_ms, kind: TxnKind::Redeem, currency: money.currency, parts, hold_id: 0 };
        let answer = Answer {
            outcome,
            parts: Some(Parts { currency: money.currency, items }),
            effect: Some(effect),
            reason: None,
            items: None,
            bulk: None,
        };
        let suspended = self.screen(m, ResultCode::Approved, &mut effects, &mut locked, fired, now_ms);
        let (record, appended) = self.commit(m, answer, effects);
        for (n, &(i, _)) in take.iter().enumerate() {
            let g = locked.card(&keys[i]);
            g.rec.last_txn_id = appended.first_txn_id + n as u64;
            g.last_group = appended.group;
        }
        point_suspended(appended, &suspended, &mut locked);
        (record, appended.group)
    }

    /// Reactivates a card under its program's policy and appends the note that says why; a decline
    /// says why not.
    fn reactivate(&self, m: &Mutation, key: CardKey, now_ms: i64) -> (IdemRecord, u64) {
        let Some(cell) = self.cell(&key) else {
            return self.declined(m, Outcome::declined(ResultCode::CardNotFound, None));
        };
        let mut card = cell.lock().expect("card lock");
        let card = &mut *card;
        self.release_due(key, card, now_ms);
        let (d, why) = match rules::decide_reactivate(&card.rec, &card.program.load(), now_ms) {
            Err((code, why)) => {
                let answer =
                    Answer { reason: Some(why), ..Answer::plain(Outcome::declined(code, Some(card.rec.view(now_ms)))) };
                let (record, at) = self.commit(m, answer, Effects::default());
                return (record, at.group);
            }
            Ok(d) => d,
        };
        let (_, change, mut effects) = self.apply(key, card, m.idem.merchant(), &d, now_ms);
        effects.changes.push(change);
        let prev_id = card.rec.last_note_id;
        let (outcome, change, _) = self.apply(key, card, m.idem.merchant(), &rules::note(&card.rec), now_ms);
        effects.changes.push(change.after_earlier());
        let author = m.idem.merchant().into();
        effects.note = Some((1, NoteRecord { prev_id, at_ms: now_ms, author, text: why.as_str().into() }));
        let (record, at) = self.commit(m, Answer { reason: Some(why), ..Answer::plain(outcome) }, effects);
        // Entries: the reactivation, then its note (the card's newest entry and note).
        (card.rec.last_txn_id, card.rec.last_note_id, card.last_group) =
            (at.first_txn_id + 1, at.first_txn_id + 1, at.group);
        (record, at.group)
    }

    /// Moves one card's whole balance to another and closes the first, in one append.
    fn transfer(
        &self,
        m: &Mutation,
        from: CardKey,
        to: CardKey,
        fired: &mut Vec<AlertRecord>,
        now_ms: i64,
    ) -> (IdemRecord, u64) {
        let Some(cells) = self.lock_all(&[from, to]) else {
            // Cards are never removed, so whichever is missing now was missing for lock_all.
            let code =
                if self.cell(&from).is_none() { ResultCode::CardNotFound } else { ResultCode::TransferTargetNotFound };
            return self.declined(m, Outcome::declined(code, None));
        };
        let mut locked = self.lock_cells(&cells, now_ms);
        let decided = {
            let (f, t) = (locked.card_ref(&from), locked.card_ref(&to));
            rules::decide_transfer(&f.rec, &t.rec, &t.program.load(), now_ms)
        };
        let (out, into) = match decided {
            Err(code) => {
                return self.declined(m, Outcome::declined(code, Some(locked.card_ref(&from).rec.view(now_ms))))
            }
            Ok(d) => d,
        };
        let mut effects = Effects::default();
        let mut items = Vec::with_capacity(2);
        for (key, d) in [(from, &out), (to, &into)] {
            let card = locked.card(&key);
            let (_, change, _) = self.apply(key, card, m.idem.merchant(), d, now_ms);
            effects.changes.push(change);
            items.push(PartView {
                last4: card.rec.last4,
                amount_minor: d.delta_minor,
                balance_after_minor: card.rec.balance_minor,
            });
        }
        // The closed card says where its money went, for the next agent who looks it up.
        let currency = locked.card_ref(&from).rec.currency;
        let to_last4 = String::from_utf8_lossy(&locked.card_ref(&to).rec.last4).into_owned();
        let text = format!(
            "Balance of {} {currency} transferred to card ending {to_last4}; card closed",
            crate::model::format_amount(out.approved_minor, currency)
        );
        let card = locked.card(&from);
        let prev_id = card.rec.last_note_id;
        let (_, change, _) = self.apply(from, card, m.idem.merchant(), &rules::note(&card.rec), now_ms);
        effects.changes.push(change.after_earlier());
        let author = m.idem.merchant().into();
        effects.note = Some((2, NoteRecord { prev_id, at_ms: now_ms, author, text: text.into() }));
        // Money moves between two cards: nothing enters or leaves the ledger.
        let outcome =
            Outcome { result: ResultCode::Approved, approved_minor: out.approved_minor, card: None, hold: None };
        let answer = Answer {
            outcome,
            parts: Some(Parts { currency, items }),
            effect: None,
            reason: None,
            items: None,
            bulk: None,
        };
        let suspended = self.screen(m, ResultCode::Approved, &mut effects, &mut locked, fired, now_ms);
        let (record, appended) = self.commit(m, answer, effects);
        // Entries: the move out, the move in, then the old card's note (its newest entry).
        let note_id = appended.first_txn_id + 2;
        let card = locked.card(&from);
        (card.rec.last_txn_id, card.rec.last_note_id, card.last_group) = (note_id, note_id, appended.group);
        let card = locked.card(&to);
        (card.rec.last_txn_id, card.last_group) = (appended.first_txn_id + 1, appended.group);
        point_suspended(appended, &suspended, &mut locked);
        (record, appended.group)
    }

    /// The settlement state of mutation `key`: recent in memory, else durable, else none yet.
    /// Called under the lock of the mutation's card(s), which serializes refunds and reversals.
    fn settled_of(&self, key: &IdemKey) -> Settled {
        if let Some(s) = self.settled.get(key) {
            return s.state.clone();
        }
        self.journal.find_settled(key).unwrap_or_default()
    }

    /// A refund to the mutation's card, for the spend `original` names (or none).
    fn refund(
        &self,
        m: &Mutation,
        money: &crate::model::Money,
        original: Option<(Option<IdemRecord>, IdemKey)>,
        fired: &mut Vec<AlertRecord>,
        now_ms: i64,
    ) -> (IdemRecord, u64) {
        let key = m.card.expect("a refund names its card");
        let Some(cell) = self.cell(&key) else {
            return self.declined(m, Outcome::declined(ResultCode::CardNotFound, None));
        };
        let (orig, orig_key) = match original {
            None => (None, None),
            Some((None, _)) => return self.declined(m, Outcome::declined(ResultCode::OriginalNotFound, None)),
            Some((Some(r), k)) => (Some(r), Some(k)),
        };
        let mut card = cell.lock().expect("card lock");
        let card = &mut *card;
        self.release_due(key, card, now_ms);
        let mut settled = orig_key.as_ref().map(|k| self.settled_of(k));
        let reference = orig.as_ref().map(|r| match &r.effect {
            // A declined (or not reversible) original took nothing to give back.
            None => RefundOf { kind: TxnKind::Issue, taken_minor: None, refunded_minor: 0, reversed: false },
            Some(e) => {
                let part = e.parts.iter().position(|(c, _)| *c == key);
                let st = settled.as_ref().expect("a referenced refund has a settlement state");
                RefundOf {
                    kind: e.kind,
                    taken_minor: part.map(|i| e.parts[i].1),
                    refunded_minor: part.and_then(|i| st.refunded_minor.get(i).copied()).unwrap_or(0),
                    reversed: st.reversal.is_some(),
                }
            }
        });
        match rules::decide_refund(&card.rec, &card.program.load(), money, reference, now_ms) {
            Err(code) => self.declined(m, Outcome::declined(code, Some(card.rec.view(now_ms)))),
            Ok(d) => {
                let (outcome, change, mut effects) = self.apply(key, card, m.idem.merchant(), &d, now_ms);
                effects.changes.push(change);
                if let (Some(e), Some(st), Some(k)) =
                    (orig.as_ref().and_then(|r| r.effect.as_ref()), &mut settled, &orig_key)
                {
                    st.refunded_minor.resize(e.parts.len(), 0);
                    let i = e.parts.iter().position(|(c, _)| *c == key).expect("decide_refund checked the card");
                    st.refunded_minor[i] += money.minor;
                    effects.settled = Some((k.clone(), st.clone()));
                }
                let (record, at) = self.commit_card(m, Answer::plain(outcome), effects, key, card, fired, now_ms);
                if let (Some(st), Some(k)) = (settled, orig_key) {
                    if orig.as_ref().is_some_and(|r| r.effect.is_some()) {
                        self.settled.insert(k, RecentSettled { state: st, group: at.group, at_ms: now_ms });
                    }
                }
                (record, at.group)
            }
        }
    }

    /// A reversal of the mutation `key` names: every card it touched is put back, atomically.
    fn reverse(
        &self,
        m: &Mutation,
        key: &IdemKey,
        original: Option<IdemRecord>,
        fired: &mut Vec<AlertRecord>,
        now_ms: i64,
    ) -> (IdemRecord, u64) {
        let orig = original.expect("a reversal always finds or claims its original");
        let txns = orig.effect_txns;
        let Some(effect) = orig.effect else {
            // Nothing to undo: the original was declined or never came (the tombstone now bars
            // it), and reversing what took no effect is a no-op that succeeds. An approved
            // original without an effect is of a kind that cannot be undone.
            if !orig.tombstone && orig.outcome.result == ResultCode::Approved {
                return self.declined(m, Outcome::declined(ResultCode::NotReversible, None));
            }
            let outcome = Outcome { result: ResultCode::Approved, approved_minor: 0, card: None, hold: None };
            let mut effects = Effects::default();
            self.screen(m, ResultCode::Approved, &mut effects, &mut NoCards, fired, now_ms);
            let (record, at) = self.commit(m, Answer::plain(outcome), effects);
            return (record, at.group);
        };
        let keys: Vec<CardKey> = effect.parts.iter().map(|(k, _)| *k).collect();
        let Some(cells) = self.lock_all(&keys) else {
            return self.declined(m, Outcome::declined(ResultCode::CardNotFound, None));
        };
        let mut locked = self.lock_cells(&cells, now_ms);
        let mut settled = self.settled_of(key);
        if let Some((outcome, parts)) = &settled.reversal {
            // Reversed already: the same answer again, and nothing changes.
            let answer =
                Answer { outcome: *outcome, parts: parts.clone(), effect: None, reason: None, items: None, bulk: None };
            let mut effects = Effects::default();
            self.screen(m, outcome.result, &mut effects, &mut NoCards, fired, now_ms);
            let (record, at) = self.commit(m, answer, effects);
            return (record, at.group);
        }
        let window_ms = locked.card_ref(&keys[0]).program.load().reversal_window_ms;
        if now_ms - effect.at_ms > window_ms {
            return self.declined(m, Outcome::declined(ResultCode::ReversalWindowPassed, None));
        }
        let mut decisions = Vec::with_capacity(keys.len());
        for (i, (k, amount)) in effect.parts.iter().enumerate() {
            let refunded = settled.refunded_minor.get(i).copied().unwrap_or(0);
            match rules::decide_reversal(
                &locked.card_ref(k).rec,
                effect.kind,
                *amount,
                refunded,
                effect.hold_id,
                // Changed since: its newest history entry is no longer one the original appended
                // (its own, or giftd's fraud lock when a rule the original fired suspended it: the
                // holder did nothing since, and an activation is still taken back).
                txns.is_some_and(|t| !t.holds(locked.card_ref(k).rec.last_txn_id)),
                now_ms,
            ) {
                Ok(d) => decisions.push(d),
                Err(code) => return self.declined(m, Outcome::declined(code, None)),
            }
        }
        let mut effects = Effects::default();
        let mut items = Vec::with_capacity(keys.len());
        let mut delta_total = 0i64;
        let mut approved_total = 0i64;
        for (k, d) in keys.iter().zip(&decisions) {
            let g = locked.card(k);
            let (_, change, e) = self.apply(*k, g, m.idem.merchant(), d, now_ms);
            effects.changes.push(change);
            effects.hold_id_next = effects.hold_id_next.or(e.hold_id_next);
            items.push(PartView {
                last4: g.rec.last4,
                amount_minor: d.delta_minor,
                balance_after_minor: g.rec.balance_minor,
            });
            delta_total += d.delta_minor;
            approved_total += d.approved_minor;
        }
        if delta_total != 0 {
            effects.ledger = Some(LedgerDelta {
                currency: effect.currency,
                credit_minor: delta_total.max(0),
                debit_minor: (-delta_total).max(0),
            });
        }
        let outcome = Outcome { result: ResultCode::Approved, approved_minor: approved_total, card: None, hold: None };
        let parts = Some(Parts { currency: effect.currency, items });
        settled.reversal = Some((outcome, parts.clone()));
        effects.settled = Some((key.clone(), settled.clone()));
        // The reversal rule counts this merchant's reversals; the card rules see no amount here.
        let suspended = self.screen(m, ResultCode::Approved, &mut effects, &mut locked, fired, now_ms);
        debug_assert!(suspended.is_empty(), "a reversal suspends no card");
        let (record, appended) =
            self.commit(m, Answer { outcome, parts, effect: None, reason: None, items: None, bulk: None }, effects);
        self.settled.insert(key.clone(), RecentSettled { state: settled, group: appended.group, at_ms: now_ms });
        for (n, k) in keys.iter().enumerate() {
            let g = locked.card(k);
            g.rec.last_txn_id = appended.first_txn_id + n as u64;
            g.last_group = appended.group;
        }
        (record, appended.group)
    }

    /// An all-or-nothing batch: every item decided in order against the cards as the items before
    /// it left them, with all its cards locked; applied in one append if every item is approved,
    /// else nothing is, and each item says why (the first declined its own code, the others
    /// `batch_aborted`). One idempotency record, the batch's, answers a retry item by item.
    fn atomic(
        &self,
        m: &Mutation,
        items: &[KeyedItem],
        fired: &mut Vec<AlertRecord>,
        now_ms: i64,
    ) -> (IdemRecord, u64) {
        let aborted = |failed: usize, code: ResultCode, view| -> Vec<Outcome> {
            (0..items.len())
                .map(|i| {
                    if i == failed {
                        Outcome::declined(code, view)
                    } else {
                        Outcome::declined(ResultCode::BatchAborted, None)
                    }
                })
                .collect()
        };
        let abort = |failed: usize, code: ResultCode, view| {
            let outcome = Outcome::declined(code, None);
            let answer = Answer { items: Some(aborted(failed, code, view)), ..Answer::plain(outcome) };
            let (record, at) = self.commit(m, answer, Effects::default());
            (record, at.group)
        };
        let keys: Vec<CardKey> = items.iter().map(|i| i.card).collect();
        // Cards are never removed: a card missing for lock_all but found now was issued in between,
        // and the next try locks it.
        let cells = loop {
            if let Some(cells) = self.lock_all(&keys) {
                break cells;
            }
            if let Some(missing) = keys.iter().position(|k| self.cell(k).is_none()) {
                return abort(missing, ResultCode::CardNotFound, None);
            }
        };
        let mut locked = self.lock_cells(&cells, now_ms);
        // Each item's place among the locked cards, searched for once rather than at every step.
        let at: Vec<usize> = keys.iter().map(|k| locked.at(k)).collect();
        // Decided on copies first: nothing is applied until every item is approved.
        let mut scratch: Vec<CardRecord> = at.iter().map(|&j| locked.guards[j].rec.clone()).collect();
        let mut decisions = Vec::with_capacity(items.len());
        let currency = items.iter().find_map(|i| rules::money_of(&i.op)).map(|m| m.currency);
        for (i, item) in items.iter().enumerate() {
            let card = &locked.guards[at[i]];
            let view = Some(card.rec.view(now_ms));
            let program = card.program.load();
            match rules::decide(&scratch[i], &program, &item.op, m.idem.merchant(), false, now_ms) {
                // One currency per batch, so that its ledger change is one sum: checked after the
                // item's own rules, which answer first as they would for the item alone.
                Ok(_) if rules::money_of(&item.op).is_some_and(|m| Some(m.currency) != currency) => {
                    return abort(i, ResultCode::CurrencyMismatch, view);
                }
                Ok(d) => {
                    d.apply(&mut scratch[i], now_ms, 0);
                    decisions.push(d);
                }
                Err(code) => return abort(i, code, view),
            }
        }
        let mut batch = KeyedChanges::new(items.len());
        for ((item, d), &j) in items.iter().zip(&decisions).zip(&at) {
            let (outcome, change, _) = self.apply(item.card, &mut locked.guards[j], m.idem.merchant(), d, now_ms);
            batch.add(j, outcome, change, d);
        }
        self.commit_keyed(m, batch, currency, &mut locked, fired, now_ms)
    }

    /// A batch of independent items under its own key: every item decided in order, on its own,
    /// against its card (each card comes once); the approved ones applied, and all of it appended
    /// at once with the batch's one idempotency record, so that a retry under the key gets every
    /// item's reply and nothing is applied twice. The batch's cards stay locked until that append:
    /// a request on one of them decided in between would otherwise precede the batch's change in
    /// the journal while it followed it in memory. An item whose card does not exist is declined
    /// `card_not_found`; one in another currency than the batch's (its first money item's),
    /// `currency_mismatch`, after its own rules, so that the batch's ledger change is one sum.
    fn each(&self, m: &Mutation, items: &[KeyedItem], fired: &mut Vec<AlertRecord>, now_ms: i64) -> (IdemRecord, u64) {
        // A card issued after this lookup is not in the batch: its item is declined, as it would
        // have been had the batch come a moment earlier.
        let cells = self.existing_cells(items.iter().map(|i| i.card).collect());
        let mut locked = self.lock_cells(&cells, now_ms);
        let merchant = m.idem.merchant();
        let currency = items.iter().find_map(|i| rules::money_of(&i.op)).map(|m| m.currency);
        let mut batch = KeyedChanges::new(items.len());
        // Whether each locked card has changed in this batch yet.
        let mut changed = vec![false; locked.keys.len()];
        for item in items {
            let Ok(j) = locked.keys.binary_search(&item.card) else {
                batch.outcomes.push(Outcome::declined(ResultCode::CardNotFound, None));
                continue;
            };
            let card = &mut locked.guards[j];
            let program = card.program.load();
            let decided = rules::decide(&card.rec, &program, &item.op, merchant, false, now_ms);
            match decided {
                Ok(_) if rules::money_of(&item.op).is_some_and(|m| Some(m.currency) != currency) => {
                    batch.outcomes.push(Outcome::declined(ResultCode::CurrencyMismatch, Some(card.rec.view(now_ms))));
                }
                Ok(d) => {
                    let (outcome, mut change, _) = self.apply(item.card, card, merchant, &d, now_ms);
                    // The wire sends each card once; were one named twice, its second change
                    // would follow the first, which has no id yet.
                    if std::mem::replace(&mut changed[j], true) {
                        change = change.after_earlier();
                    }
                    batch.add(j, outcome, change, &d);
                }
                Err(code) => batch.outcomes.push(Outcome::declined(code, Some(card.rec.view(now_ms)))),
            }
        }
        self.commit_keyed(m, batch, currency, &mut locked, fired, now_ms)
    }

    /// Appends a keyed batch's changes with its record (its ledger change is one sum, in the
    /// batch's currency), judged by the alert rules, then points each changed card at its entry.
    fn commit_keyed(
        &self,
        m: &Mutation,
        batch: KeyedChanges,
        currency: Option<Currency>,
        locked: &mut Locked<'_>,
        fired: &mut Vec<AlertRecord>,
        now_ms: i64,
    ) -> (IdemRecord, u64) {
        let KeyedChanges { mut effects, outcomes, changed, credit, debit, total } = batch;
        if let Some(currency) = currency.filter(|_| credit + debit > 0) {
            effects.ledger = Some(LedgerDelta { currency, credit_minor: credit, debit_minor: debit });
        }
        let outcome = Outcome { approved_minor: total, ..Outcome::declined(ResultCode::Approved, None) };
        let answer = Answer { items: Some(outcomes), ..Answer::plain(outcome) };
        let suspended = self.screen(m, ResultCode::Approved, &mut effects, locked, fired, now_ms);
        let (record, appended) = self.commit(m, answer, effects);
        // In the order of the changes, so that a card changed twice ends at its last.
        for (n, &j) in changed.iter().enumerate() {
            let card = &mut locked.guards[j];
            card.rec.last_txn_id = appended.first_txn_id + n as u64;
            card.last_group = appended.group;
        }
        point_suspended(appended, &suspended, locked);
        (record, appended.group)
    }

    /// Records a chunk's answers with its changes (one append). The caller then points the
    /// changed cards at their history entries: they follow one apart from `first_txn_id`, in the
    /// order of the changes.
    fn commit_chunk(&self, m: &Mutation, chunk: ChunkRecord, effects: Effects) -> (IdemRecord, Appended) {
        let changed = chunk.results.iter().filter(|(_, c)| *c).count();
        debug_assert_eq!(changed, effects.changes.len());
        let outcome = Outcome { approved_minor: changed as i64, ..Outcome::declined(ResultCode::Approved, None) };
        let effects = Effects { bulk: true, ..effects };
        self.commit(m, Answer { bulk: Some(Bulk::Chunk(chunk)), ..Answer::plain(outcome) }, effects)
    }

    /// A job chunk that issues inactive cards, each on its own (a card that exists is
    /// `card_exists`, a number the program refuses gets that program's answer). The new cards are
    /// locked before they are published in the card map, so no request decides on a card before
    /// its issue is journalled.
    fn chunk_issue(
        &self,
        m: &Mutation,
        program: &str,
        money: Money,
        expiry_ms: Option<i64>,
        cards: &[ChunkCard],
        now_ms: i64,
    ) -> (IdemRecord, u64) {
        let slot = self.programs.read().expect("programs lock").get(program).cloned();
        let rules = slot.as_ref().map(|s| s.load_full());
        let mut op = Op::Issue {
            program: program.to_string(),
            money,
            expiry_ms,
            active: false,
            number: IssueNumber::Supplied { luhn_ok: true },
            virtual_card: false,
            email: None,
            case: None,
        };
        let mut results = Vec::with_capacity(cards.len());
        let mut fresh: Vec<(usize, CardKey, CardCell)> = Vec::new();
        for (i, c) in cards.iter().enumerate() {
            if self.cards.contains_key(&c.key) {
                results.push((ResultCode::CardExists, false));
                continue;
            }
            if let Op::Issue { number, .. } = &mut op {
                *number = IssueNumber::Supplied { luhn_ok: c.luhn_ok };
            }
            match rules::decide_issue(rules.as_deref(), c.last4, &op, now_ms) {
                Err(code) => results.push((code, false)),
                Ok(rec) => {
                    let program = slot.clone().expect("decide_issue checked the program");
                    results.push((ResultCode::Approved, true));
                    fresh.push((i, c.key, Arc::new(Mutex::new(Card { rec, program, last_group: 0 }))));
                }
            }
        }
        let mut guards: Vec<MutexGuard<'_, Card>> =
            fresh.iter().map(|(_, _, c)| c.lock().expect("card lock")).collect();
        let mut effects = Effects::default();
        let mut published = Vec::with_capacity(guards.len());
        for ((i, key, cell), guard) in fresh.iter().zip(guards.iter_mut()) {
            match self.cards.entry(*key) {
                Entry::Vacant(v) => {
                    v.insert(cell.clone());
                    let merchant = m.idem.merchant();
                    effects.changes.push(Self::change_of(
                        *key,
                        merchant,
                        &guard.rec,
                        TxnKind::Issue,
                        money.minor,
                        now_ms,
                    ));
                    published.push(&mut **guard);
                }
                // Issued since it was looked at (by another request, or earlier in this chunk).
                Entry::Occupied(_) => results[*i] = (ResultCode::CardExists, false),
            }
        }
        if !published.is_empty() {
            let credit_minor = money.minor * published.len() as i64;
            effects.ledger = Some(LedgerDelta { currency: money.currency, credit_minor, debit_minor: 0 });
        }
        let chunk = ChunkRecord {
            kind: ChunkKind::Issue,
            at_ms: now_ms,
            amount_minor: money.minor,
            results,
            changed: Vec::new(),
            first_txn_id: 0,
        };
        let (record, at) = self.commit_chunk(m, chunk, effects);
        for (n, card) in published.iter_mut().enumerate() {
            card.rec.last_txn_id = at.first_txn_id + n as u64;
            card.last_group = at.group;
        }
        (record, at.group)
    }

    /// A job chunk that activates cards, each on its own, with the rules of a single activation.
    /// Its cards are locked in key order for the chunk's one append.
    fn chunk_activate(&self, m: &Mutation, load: Option<Money>, cards: &[ChunkCard], now_ms: i64) -> (IdemRecord, u64) {
        let cells = self.existing_cells(cards.iter().map(|c| c.key).collect());
        let mut locked = self.lock_cells(&cells, now_ms);
        let op = Op::Activate { load };
        let mut results = Vec::with_capacity(cards.len());
        let mut effects = Effects::default();
        let mut changed = Vec::new();
        let mut credit_minor = 0i64;
        for c in cards {
            let Ok(at) = locked.keys.binary_search(&c.key) else {
                results.push((ResultCode::CardNotFound, false));
                continue;
            };
            let card = &mut *locked.guards[at];
            let decision = rules::decide(&card.rec, &card.program.load(), &op, m.idem.merchant(), false, now_ms);
            match decision {
                Err(code) => results.push((code, false)),
                Ok(d) => {
                    let (_, change, _) = self.apply(c.key, card, m.idem.merchant(), &d, now_ms);
                    effects.changes.push(change);
                    changed.push(c.key);
                    credit_minor += d.delta_minor;
                    results.push((ResultCode::Approved, true));
                }
            }
        }
        if let Some(load) = load.filter(|_| credit_minor > 0) {
            effects.ledger = Some(LedgerDelta { currency: load.currency, credit_minor, debit_minor: 0 });
        }
        let chunk = ChunkRecord {
            kind: ChunkKind::Activate,
            at_ms: now_ms,
            amount_minor: load.map_or(0, |l| l.minor),
            results,
            changed,
            first_txn_id: 0,
        };
        let (record, at) = self.commit_chunk(m, chunk, effects);
        // Each changed card once (a card's activation is its only change in the chunk).
        let changed = record.chunk().map_or(&[][..], |c| &c.changed);
        for (n, key) in changed.iter().enumerate() {
            let card = locked.card(key);
            card.rec.last_txn_id = at.first_txn_id + n as u64;
            card.last_group = at.group;
        }
        (record, at.group)
    }

    /// Takes back what the chunk `original` did: each card it activated is made inactive and its
    /// load taken back, unless the card changed since (`card_used`) or the program's reversal
    /// window has passed. Cards it did not change have nothing to undo. A chunk never sent is
    /// barred by the tombstone `original` left, and its reversal changes nothing.
    fn chunk_reverse(&self, m: &Mutation, original: Option<IdemRecord>, now_ms: i64) -> (IdemRecord, u64) {
        let orig = original.expect("a reversal always finds or claims its original");
        let mut chunk = ChunkRecord {
            kind: ChunkKind::Reverse,
            at_ms: now_ms,
            amount_minor: 0,
            results: Vec::new(),
            changed: Vec::new(),
            first_txn_id: 0,
        };
        let Some(done) = orig.chunk().filter(|_| !orig.tombstone) else {
            let (record, at) = self.commit_chunk(m, chunk, Effects::default());
            return (record, at.group);
        };
        chunk.amount_minor = done.amount_minor;
        if done.kind != ChunkKind::Activate {
            // Issued cards stay: an issue cannot be taken back.
            chunk.results = done
                .results
                .iter()
                .map(|&(_, c)| (if c { ResultCode::NotReversible } else { ResultCode::Approved }, false))
                .collect();
            let (record, at) = self.commit_chunk(m, chunk, Effects::default());
            return (record, at.group);
        }
        let cells = self.existing_cells(done.changed.clone());
        let mut locked = self.lock_cells(&cells, now_ms);
        let mut effects = Effects::default();
        let mut reversed = Vec::new();
        let (mut debit_minor, mut currency) = (0i64, None);
        let mut n = 0u64;
        for &(_, was_changed) in &done.results {
            if !was_changed {
                chunk.results.push((ResultCode::Approved, false));
                continue;
            }
            let (key, txn) = (done.changed[n as usize], done.first_txn_id + n);
            n += 1;
            let Ok(at) = locked.keys.binary_search(&key) else {
                chunk.results.push((ResultCode::CardNotFound, false));
                continue;
            };
            let card = &mut *locked.guards[at];
            let window_ms = card.program.load().reversal_window_ms;
            if now_ms - done.at_ms > window_ms {
                chunk.results.push((ResultCode::ReversalWindowPassed, false));
                continue;
            }
            // Changed since: its newest history entry is no longer the activation.
            let used = card.rec.last_txn_id != txn;
            match rules::decide_reversal(&card.rec, TxnKind::Activate, done.amount_minor, 0, 0, used, now_ms) {
                Err(code) => chunk.results.push((code, false)),
                Ok(d) => {
                    let (_, change, _) = self.apply(key, card, m.idem.merchant(), &d, now_ms);
                    effects.changes.push(change);
                    debit_minor -= d.delta_minor;
                    currency = Some(card.rec.currency);
                    reversed.push(key);
                    chunk.results.push((ResultCode::Approved, true));
                }
            }
        }
        if let Some(currency) = currency.filter(|_| debit_minor > 0) {
            effects.ledger = Some(LedgerDelta { currency, credit_minor: 0, debit_minor });
        }
        let (record, at) = self.commit_chunk(m, chunk, effects);
        for (n, key) in reversed.iter().enumerate() {
            let card = locked.card(key);
            card.rec.last_txn_id = at.first_txn_id + n as u64;
            card.last_group = at.group;
        }
        (record, at.group)
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
            // The index is read and dropped before the card is locked (it is a leaf lock).
            let Some(key) = self.holds.get(&id).map(|k| *k) else { continue };
            if let Some(cell) = self.cell(&key) {
                let mut card = cell.lock().expect("card lock");
                let before = card.rec.holds.len();
                self.release_due(key, &mut card, now_ms);
                released += before - card.rec.holds.len();
            }
        }
        released
    }

    /// A balance inquiry, and the group the reply must wait for (the card's last change).
    pub fn balance(&self, card: &CardKey, now_ms: i64) -> (Outcome, u64) {
        match self.cell(card) {
            None => (Outcome::declined(ResultCode::CardNotFound, None), 0),
            Some(cell) => {
                let c = cell.lock().expect("card lock");
                (Outcome::approved(0, c.rec.view(now_ms)), c.last_group)
            }
        }
    }

    /// A copy of the card's record and the group of its last change.
    pub fn snapshot(&self, card: &CardKey) -> Option<(CardRecord, u64)> {
        self.cell(card).map(|cell| {
            let c = cell.lock().expect("card lock");
            (c.rec.clone(), c.last_group)
        })
    }

    /// Forgets in-memory idempotency keys, settlement states and invoices that are durable and
    /// older than `older_than_ms`; the store answers for them from then on.
    pub fn evict_recent(&self, durable_group: u64, older_than_ms: i64) {
        // Counted before anything is dropped: see `execute`.
        self.evictions.fetch_add(1, Ordering::SeqCst);
        self.idem.retain(|_, r| r.group > durable_group || r.at_ms >= older_than_ms);
        self.settled.retain(|_, r| r.group > durable_group || r.at_ms >= older_than_ms);
        self.invoices.retain(|_, (g, at)| *g > durable_group || *at >= older_than_ms);
    }

    /// Idempotency keys held in memory.
    pub fn recent_keys(&self) -> usize {
        self.idem.len()
    }
}

/// What a keyed batch's approved items change, gathered for one append.
struct KeyedChanges {
    effects: Effects,
    /// Every item's reply, in the batch's order.
    outcomes: Vec<Outcome>,
    /// The locked card of each change, in the order of the changes.
    changed: Vec<usize>,
    credit: i64,
    debit: i64,
    total: i64,
}

impl KeyedChanges {
    fn new(items: usize) -> KeyedChanges {
        let mut effects = Effects::default();
        // Grown once: a change is a few hundred bytes, and doubling copied them all each time.
        effects.changes.reserve(items);
        let (outcomes, changed) = (Vec::with_capacity(items), Vec::with_capacity(items));
        KeyedChanges { effects, outcomes, changed, credit: 0, debit: 0, total: 0 }
    }

    /// An approved item, applied to its card (locked card `j`).
    fn add(&mut self, j: usize, outcome: Outcome, change: CardChange, d: &rules::Decision) {
        self.effects.changes.push(change);
        self.changed.push(j);
        self.outcomes.push(outcome);
        self.credit += d.delta_minor.max(0);
        self.debit += (-d.delta_minor).max(0);
        self.total += d.approved_minor;
    }
}

/// Whether an approved `op` can later be refunded or reversed by its key, so its record keeps
/// what it did.
fn reversible(op: &Op) -> bool {
    matches!(
        op,
        Op::Redeem { .. } | Op::Capture { .. } | Op::Reload { .. } | Op::Activate { .. } | Op::Authorize { .. }
    )
}

impl Executed {
    /// An answer with nothing but its outcome.
    fn of(outcome: Outcome) -> Executed {
        Executed {
            outcome,
            parts: None,
            reason: None,
            group: 0,
            replayed: false,
            issued: None,
            items: None,
            chunk: None,
            alerts: Vec::new(),
        }
    }
}

fn replay(record: &IdemRecord, group: u64, fingerprint: &[u8; 16]) -> Executed {
    if record.tombstone {
        // A reversal came first: the original is declined, whatever it says.
        Executed { group, ..Executed::of(record.outcome) }
    } else if record.fingerprint == *fingerprint {
        Executed {
            parts: record.parts.as_deref().cloned(),
            reason: record.reason.as_deref().map(str::to_string),
            group,
            replayed: true,
            items: record.items.as_deref().cloned(),
            chunk: record.chunk().map(|c| c.results.clone()),
            ..Executed::of(record.outcome)
        }
    } else {
        // The decline reveals that the key is taken, so it too waits until the original is durable.
        Executed { group, ..Executed::of(Outcome::declined(ResultCode::IdempotencyMismatch, None)) }
    }
}

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;
