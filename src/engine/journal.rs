//! The engine's only window on durability. The store implements [`Journal`] with RocksDB and group
//! commit; [`MemoryJournal`] implements it in memory for engine tests and benches. The engine never
//! does IO itself: it hands each decision's [`Effects`] to the journal, under the card's lock, and
//! gets back the commit group that will make them durable.

use super::alerts::AlertRecord;
use super::card::CardRecord;
use crate::card_number::CardKey;
use crate::model::{Currency, Outcome, Parts, ResultCode, TxnKind};
use smallvec::SmallVec;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// Most decisions change one card, and most effects name one: inline, no allocation.
pub type Changes = SmallVec<[CardChange; 1]>;
pub type EffectParts = SmallVec<[(CardKey, i64); 1]>;

/// (merchant, idempotency key), as `len(merchant) | merchant | key`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct IdemKey(pub Box<[u8]>);

impl IdemKey {
    pub fn new(merchant: &str, key: &str) -> IdemKey {
        IdemKey(prefixed(merchant, key))
    }

    /// A bulk job's key: in a namespace of its own (a byte no request key can hold), so a job id
    /// never meets an ordinary request's key.
    pub fn job(merchant: &str, job: &str) -> IdemKey {
        IdemKey(prefixed(merchant, &format!("\u{1}job/{job}")))
    }

    /// The key of a job's chunk that starts at card `first`, in the job's namespace; `reversal`:
    /// the key of the chunk's reversal.
    pub fn chunk(merchant: &str, job: &str, first: u32, reversal: bool) -> IdemKey {
        let r = if reversal { "/r" } else { "" };
        IdemKey(prefixed(merchant, &format!("\u{1}job/{job}/@{first}{r}")))
    }

    pub fn merchant(&self) -> &str {
        let n = self.0[0] as usize;
        std::str::from_utf8(&self.0[1..1 + n]).unwrap_or("")
    }
}

/// (merchant, invoice number): an invoice is accepted once per merchant, ever.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct InvoiceKey(pub Box<[u8]>);

impl InvoiceKey {
    pub fn new(merchant: &str, invoice: &str) -> InvoiceKey {
        InvoiceKey(prefixed(merchant, invoice))
    }
}

fn prefixed(a: &str, b: &str) -> Box<[u8]> {
    let mut v = Vec::with_capacity(1 + a.len() + b.len());
    v.push(a.len() as u8);
    v.extend_from_slice(a.as_bytes());
    v.extend_from_slice(b.as_bytes());
    v.into_boxed_slice()
}

/// What a mutation's key answers on retry (its content fingerprint and its original answer), and
/// what it did, for a later refund or reversal that names it. Written once, never changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdemRecord {
    pub fingerprint: [u8; 16],
    pub outcome: Outcome,
    /// Per-card amounts, for the operations whose reply lists them (split redeem, reversal):
    /// boxed, so the record every redeem keeps in memory stays small.
    pub parts: Option<Box<Parts>>,
    /// What an approved, reversible mutation did; `None` for declines and for the rest. Only the
    /// engine's memory keeps it: the store keeps `effect_txns` instead, and rebuilds the effect from
    /// those history entries when a refund or reversal asks ([`Journal::effect_of`]).
    pub effect: Option<Effect>,
    /// Where the effect's history entries are.
    pub effect_txns: Option<EffectTxns>,
    /// Written by a reversal that arrived before its original: the original, when it comes, is
    /// declined `original_reversed` whatever its content.
    pub tombstone: bool,
    /// The sentence that explains the answer, for the operations whose reply carries one
    /// (reactivate: why not, or the note it appended).
    pub reason: Option<Box<str>>,
    /// Each item's answer, for an all-or-nothing batch (in item order).
    pub items: Option<Box<Vec<Outcome>>>,
    /// A bulk job's record, or the record of one chunk of its cards.
    pub bulk: Option<Box<Bulk>>,
}

impl IdemRecord {
    pub fn new(fingerprint: [u8; 16], outcome: Outcome) -> IdemRecord {
        IdemRecord {
            fingerprint,
            outcome,
            parts: None,
            effect: None,
            effect_txns: None,
            tombstone: false,
            reason: None,
            items: None,
            bulk: None,
        }
    }

    /// The chunk record this holds, if it is one.
    pub fn chunk(&self) -> Option<&ChunkRecord> {
        match self.bulk.as_deref() {
            Some(Bulk::Chunk(c)) => Some(c),
            _ => None,
        }
    }

    /// The job this records, if it is a job's record.
    pub fn job(&self) -> Option<JobSpec> {
        match self.bulk.as_deref() {
            Some(Bulk::Job(j)) => Some(*j),
            _ => None,
        }
    }
}

/// What a bulk job does to each card: 1 issue, 2 activate; chunks also 3, taking one back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ChunkKind {
    Issue = 1,
    Activate = 2,
    Reverse = 3,
}

impl ChunkKind {
    pub fn from_u8(v: u8) -> Option<ChunkKind> {
        match v {
            1 => Some(ChunkKind::Issue),
            2 => Some(ChunkKind::Activate),
            3 => Some(ChunkKind::Reverse),
            _ => None,
        }
    }
}

/// A bulk job as `job_open` recorded it: its cards are sent in chunks of `chunk_cards`, chunk `n`
/// holding cards `n * chunk_cards ..`, so that a job run again meets the same chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobSpec {
    pub kind: ChunkKind,
    pub count: u32,
    pub chunk_cards: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bulk {
    Job(JobSpec),
    Chunk(ChunkRecord),
}

/// One chunk of a bulk job, decided card by card and recorded once: each card's answer, and what
/// a reversal of the chunk needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkRecord {
    pub kind: ChunkKind,
    pub at_ms: i64,
    /// What each changed card got (an activation's load), for the reversal.
    pub amount_minor: i64,
    /// Each card's answer, in the chunk's order, and whether it changed the card.
    pub results: Vec<(ResultCode, bool)>,
    /// The cards changed, in the chunk's order (activation chunks only: what a reversal undoes).
    /// The journal does not keep them: they are the cards of the chunk's history entries, from
    /// `first_txn_id` on, and a record read back gets them from there ([`Journal::cards_of`]).
    pub changed: Vec<CardKey>,
    /// The history entry of the first change, assigned by [`Journal::append`]; the changes follow
    /// one apart, in the chunk's order.
    pub first_txn_id: u64,
}

/// What an approved mutation did to money, as a refund or reversal needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Effect {
    pub at_ms: i64,
    /// Redeem (one card or split), capture, reload, activate or authorize.
    pub kind: TxnKind,
    pub currency: Currency,
    /// Each card and the amount it gave (spends), got (loads) or had held (authorize), in the
    /// order taken.
    pub parts: EffectParts,
    /// The hold an authorization opened (0 otherwise).
    pub hold_id: u64,
}

impl Effect {
    /// Rebuilds an effect from its history entries (each with the card record it left). Every
    /// entry must be of one reversible kind; the amounts are what each card gave, got or held.
    pub fn from_history(entries: &[(TxnRecord, CardRecord)], hold_id: u64) -> Option<Effect> {
        let (first, card) = entries.first()?;
        Some(Effect {
            at_ms: first.at_ms,
            kind: first.kind,
            currency: card.currency,
            parts: entries.iter().map(|(t, _)| (t.card, t.amount_minor.abs())).collect(),
            hold_id,
        })
    }
}

/// A note as the store keeps it, keyed by its history entry's id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoteRecord {
    /// The card's previous note (0: none): a card's notes are a chain read back from its newest.
    pub prev_id: u64,
    pub at_ms: i64,
    pub author: Box<str>,
    pub text: Box<str>,
}

/// What later requests did to a mutation: refunds (per part of its effect) and its reversal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settled {
    pub refunded_minor: Vec<i64>,
    /// The first reversal's answer, which every later reversal of the same mutation gets too.
    pub reversal: Option<(Outcome, Option<Parts>)>,
}

/// One history entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnRecord {
    /// Unique across all cards, assigned by [`Journal::append`] (0 until then).
    pub id: u64,
    /// The card's previous entry (0: this is its first).
    pub prev_id: u64,
    pub card: CardKey,
    pub seq: u64,
    pub kind: TxnKind,
    pub amount_minor: i64,
    pub balance_after_minor: i64,
    pub at_ms: i64,
    pub merchant: Box<str>,
}

/// Money that entered (credit) or left (debit) the system, for the conservation check on restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LedgerDelta {
    pub currency: Currency,
    pub credit_minor: i64,
    pub debit_minor: i64,
}

/// A card's new state and the history entry that explains it: a card never changes without one.
#[derive(Clone, Debug)]
pub struct CardChange {
    /// The card after the change. Its `last_txn_id` is still the previous entry's (= `txn.prev_id`)
    /// until [`Journal::append`] assigns the new entry its id.
    pub record: CardRecord,
    pub txn: TxnRecord,
}

/// Everything one decision writes, committed atomically in one batch.
#[derive(Clone, Debug, Default)]
pub struct Effects {
    /// Card changes, one per card (several for a multi-card operation), in lock order.
    pub changes: Changes,
    pub idem: Option<(IdemKey, IdemRecord)>,
    /// The new state of the mutation a refund or reversal acted on.
    pub settled: Option<(IdemKey, Settled)>,
    /// A note's text, for the change at this index of `changes` (a `Note` entry): stored under
    /// that entry's id.
    pub note: Option<(usize, NoteRecord)>,
    pub invoice: Option<InvoiceKey>,
    pub ledger: Option<LedgerDelta>,
    /// Set by a decision that used a hold id: ids below this are taken. Kept durable with the hold
    /// itself, so a restart never hands out an id a durable hold has.
    pub hold_id_next: Option<u64>,
    /// A program created or replaced by an admin: its name and canonical settings text.
    pub program: Option<(Arc<str>, String)>,
    /// Security rules that fired on this decision. They take the next ids after the changes'
    /// entries (alerts and history entries share one sequence, in commit order).
    pub alerts: Vec<AlertRecord>,
    /// The first alert's id, assigned by the journal; the others follow, one apart.
    pub alert_id: u64,
    /// Made for one item of a batch, whose reply waits for all its items: the journal need not
    /// start writing it until the batch's handler asks (the store's `write_batched`), so a batch's
    /// items reach the store in a few large groups instead of many small ones.
    pub batched: bool,
    /// Made for a chunk of a bulk job (thousands of entries): the journal lets one chunk at a time
    /// into its commit pipeline, so that no payment waits behind the writes and syncs of two.
    pub bulk: bool,
}

impl Effects {
    /// Numbers the changes from `first` and the alerts after them; returns the next free id.
    /// A change [`CardChange::after_earlier`] marks (a card changed twice in one decision: a
    /// reactivation and its note, a change and the fraud lock an alert added) names the card's
    /// earlier change in this append as its previous entry: when it was made, that one had no id.
    pub fn assign_ids(&mut self, first: u64) -> u64 {
        let mut id = first;
        for i in 0..self.changes.len() {
            if self.changes[i].txn.prev_id == PREV_IN_APPEND {
                let card = self.changes[i].txn.card;
                let j = self.changes[..i].iter().rposition(|c| c.txn.card == card);
                let j = j.expect("a change marked after an earlier one follows a change of its card");
                self.changes[i].txn.prev_id = first + j as u64;
                // The earlier change may be a note, whose id it took only now.
                self.changes[i].record.last_note_id = self.changes[j].record.last_note_id;
            }
            self.changes[i].assign_id(id);
            id += 1;
        }
        self.alert_id = if self.alerts.is_empty() { 0 } else { id };
        id + self.alerts.len() as u64
    }
}

/// Where a mutation's history entries are: what the store keeps of its effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EffectTxns {
    /// The first entry's id (assigned by [`Journal::append`]).
    pub first: u64,
    /// The entries of the effect's card changes, one per part, from `first` on.
    pub parts: u8,
    /// Every entry the decision appended, from `first` on: its parts', then any that a rule it
    /// fired added (giftd's fraud lock on a card it suspended, or a reactivation's note).
    pub entries: u8,
}

impl EffectTxns {
    /// For an effect appended with `changes`, numbered from `first`.
    pub fn of(first: u64, effect: &Effect, changes: &[CardChange]) -> EffectTxns {
        // At most 64 parts, each with at most one entry more: well within a byte.
        EffectTxns { first, parts: effect.parts.len() as u8, entries: changes.len().min(u8::MAX as usize) as u8 }
    }

    /// Whether `id` is one of the decision's own entries.
    pub fn holds(&self, id: u64) -> bool {
        (self.first..self.first + self.entries as u64).contains(&id)
    }
}

/// Where [`Journal::append`] put a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub group: u64,
    /// The id of the first card change's history entry; the others follow, one apart (0: none).
    pub first_txn_id: u64,
}

/// The previous entry of a change that follows another change of its card in the same append (see
/// [`Effects::assign_ids`]). Never a real id: ids are assigned in order from 1.
const PREV_IN_APPEND: u64 = u64::MAX;

impl CardChange {
    /// Marks this change as following an earlier change of its card in the same decision: the
    /// journal links the two when it numbers them. (Marked rather than searched for: a job chunk
    /// appends thousands of changes, each of its own card.)
    pub fn after_earlier(mut self) -> CardChange {
        self.txn.prev_id = PREV_IN_APPEND;
        self
    }

    /// Gives the history entry `id` and makes it the card's newest (and, for a note, its newest
    /// note).
    pub fn assign_id(&mut self, id: u64) {
        self.txn.id = id;
        self.record.last_txn_id = id;
        if self.txn.kind == TxnKind::Note {
            self.record.last_note_id = id;
        }
    }
}

pub trait Journal: Send + Sync + 'static {
    /// A durable idempotency record, if the key was used before.
    fn find_idem(&self, key: &IdemKey) -> Option<IdemRecord>;
    /// The durable records of several keys, in `keys` order: a batch's keys in one read, which the
    /// store answers for less than it answers them one by one.
    fn find_idems(&self, keys: &[IdemKey]) -> Vec<Option<IdemRecord>> {
        keys.iter().map(|k| self.find_idem(k)).collect()
    }
    /// Whether a durable record says this invoice was used.
    fn invoice_used(&self, key: &InvoiceKey) -> bool;
    /// The durable settlement state of a mutation (refunds, reversal), if any was written.
    fn find_settled(&self, key: &IdemKey) -> Option<Settled>;
    /// The effect of a durable mutation, rebuilt from its history entries (`effect_txns` of its
    /// record; `hold_id` from its outcome). Called only for records the store returned, whose
    /// history was written in the same batch.
    fn effect_of(&self, txns: EffectTxns, hold_id: u64) -> Option<Effect>;
    /// The cards of the `count` history entries from `first_txn_id` on, in order (a job chunk's
    /// changed cards, for its reversal).
    fn cards_of(&self, first_txn_id: u64, count: usize) -> Vec<CardKey>;
    /// The newest commit group anything was appended to: a reply that depends on a record found in
    /// the store, possibly not yet synced, waits for this.
    fn latest_group(&self) -> u64;
    /// Queues `effects` and returns the commit group that will make them durable, and the ids it
    /// gave the history entries (consecutive, from `first_txn_id`). An idempotency record with an
    /// effect gets `effect_txns` pointing at those entries. Ids are never reused, not even across restarts, and grow
    /// in commit order, so the store keeps history in id order: appending, never inserting. The
    /// id becomes the entry's `id` and the card record's `last_txn_id`.
    /// Called with the card's lock held, so it must not block: it only appends to the open group.
    fn append(&self, effects: Effects) -> Appended;
}

/// An in-memory journal: every append is "durable" at once. For engine tests and benches.
#[derive(Default)]
pub struct MemoryJournal {
    inner: Mutex<MemoryInner>,
}

#[derive(Default)]
struct MemoryInner {
    group: u64,
    txn_id: u64,
    hold_id_next: u64,
    idem: HashMap<IdemKey, IdemRecord>,
    settled: HashMap<IdemKey, Settled>,
    invoices: HashSet<InvoiceKey>,
    cards: HashMap<CardKey, CardRecord>,
    txns: Vec<TxnRecord>,
    /// Each history entry's card record, as the store's history entries carry it.
    card_after: HashMap<u64, CardRecord>,
    programs: HashMap<Arc<str>, String>,
    /// Alerts by their id in the shared sequence.
    alerts: Vec<(u64, AlertRecord)>,
    /// Appends marked `Effects::bulk`.
    bulk_appends: usize,
}

impl MemoryJournal {
    /// How many appends were marked as a bulk job's chunk.
    pub fn bulk_appends(&self) -> usize {
        self.inner.lock().unwrap().bulk_appends
    }

    /// Every alert appended, with its id.
    pub fn alerts(&self) -> Vec<(u64, AlertRecord)> {
        self.inner.lock().unwrap().alerts.clone()
    }

    /// The persisted card records, as a restart would load them.
    pub fn cards(&self) -> Vec<(CardKey, CardRecord)> {
        let g = self.inner.lock().unwrap();
        g.cards.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    pub fn txns(&self) -> Vec<TxnRecord> {
        self.inner.lock().unwrap().txns.clone()
    }

    /// Programs set by admin updates (name, settings text), as a restart would read them.
    pub fn programs(&self) -> Vec<(Arc<str>, String)> {
        let g = self.inner.lock().unwrap();
        g.programs.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The durable hold-id high-water mark, as a restart would read it.
    pub fn hold_id_next(&self) -> u64 {
        self.inner.lock().unwrap().hold_id_next
    }
}

impl Journal for MemoryJournal {
    fn find_idem(&self, key: &IdemKey) -> Option<IdemRecord> {
        self.inner.lock().unwrap().idem.get(key).cloned()
    }

    fn find_settled(&self, key: &IdemKey) -> Option<Settled> {
        self.inner.lock().unwrap().settled.get(key).cloned()
    }

    fn effect_of(&self, txns: EffectTxns, hold_id: u64) -> Option<Effect> {
        let g = self.inner.lock().unwrap();
        let entries: Vec<(TxnRecord, CardRecord)> = (txns.first..txns.first + txns.parts as u64)
            .map(|id| {
                let t = g.txns.iter().find(|t| t.id == id)?;
                let card = g.card_after.get(&id)?;
                Some((t.clone(), card.clone()))
            })
            .collect::<Option<_>>()?;
        Effect::from_history(&entries, hold_id)
    }

    fn cards_of(&self, first_txn_id: u64, count: usize) -> Vec<CardKey> {
        let g = self.inner.lock().unwrap();
        let ids = first_txn_id..first_txn_id + count as u64;
        g.txns.iter().filter(|t| ids.contains(&t.id)).map(|t| t.card).collect()
    }

    fn invoice_used(&self, key: &InvoiceKey) -> bool {
        self.inner.lock().unwrap().invoices.contains(key)
    }

    fn latest_group(&self) -> u64 {
        self.inner.lock().unwrap().group
    }

    fn append(&self, mut effects: Effects) -> Appended {
        let mut g = self.inner.lock().unwrap();
        g.group += 1;
        g.bulk_appends += usize::from(effects.bulk);
        let first_txn_id = if effects.changes.is_empty() { 0 } else { g.txn_id + 1 };
        g.txn_id = effects.assign_ids(g.txn_id + 1) - 1;
        let effect_txns = effects
            .idem
            .as_ref()
            .and_then(|(_, r)| r.effect.as_ref())
            .map(|e| EffectTxns::of(first_txn_id, e, &effects.changes));
        for c in effects.changes {
            let id = c.txn.id;
            g.card_after.insert(id, c.record.clone());
            g.cards.insert(c.txn.card, c.record);
            g.txns.push(c.txn);
        }
        if let Some((k, mut r)) = effects.idem {
            // Kept as the store keeps it: the effect only by reference to its history entries.
            if r.effect.take().is_some() {
                r.effect_txns = effect_txns;
            }
            if let Some(Bulk::Chunk(c)) = r.bulk.as_deref_mut() {
                c.first_txn_id = first_txn_id;
                c.changed.clear();
            }
            g.idem.insert(k, r);
        }
        if let Some((k, s)) = effects.settled {
            g.settled.insert(k, s);
        }
        if let Some(i) = effects.invoice {
            g.invoices.insert(i);
        }
        if let Some(n) = effects.hold_id_next {
            g.hold_id_next = g.hold_id_next.max(n);
        }
        for (i, a) in effects.alerts.into_iter().enumerate() {
            g.alerts.push((effects.alert_id + i as u64, a));
        }
        if let Some((name, text)) = effects.program {
            g.programs.insert(name, text);
        }
        Appended { group: g.group, first_txn_id }
    }
}
