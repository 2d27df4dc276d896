//! The engine's only window on durability. The store implements [`Journal`] with RocksDB and group
//! commit; [`MemoryJournal`] implements it in memory for engine tests and benches. The engine never
//! does IO itself: it hands each decision's [`Effects`] to the journal, under the card's lock, and
//! gets back the commit group that will make them durable.

use super::card::CardRecord;
use crate::card_number::CardKey;
use crate::model::{Currency, Outcome, TxnKind};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// (merchant, idempotency key), as `len(merchant) | merchant | key`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct IdemKey(pub Box<[u8]>);

impl IdemKey {
    pub fn new(merchant: &str, key: &str) -> IdemKey {
        IdemKey(prefixed(merchant, key))
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

/// What a mutation's key answers on retry: its content fingerprint and its original outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdemRecord {
    pub fingerprint: [u8; 16],
    pub outcome: Outcome,
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
    pub change: Option<CardChange>,
    pub idem: Option<(IdemKey, IdemRecord)>,
    pub invoice: Option<InvoiceKey>,
    pub ledger: Option<LedgerDelta>,
    /// Set by a decision that used a hold id: ids below this are taken. Kept durable with the hold
    /// itself, so a restart never hands out an id a durable hold has.
    pub hold_id_next: Option<u64>,
}

/// Where [`Journal::append`] put a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub group: u64,
    pub txn_id: u64,
}

impl CardChange {
    /// Gives the history entry `id` and makes it the card's newest.
    pub fn assign_id(&mut self, id: u64) {
        self.txn.id = id;
        self.record.last_txn_id = id;
    }
}

pub trait Journal: Send + Sync + 'static {
    /// A durable idempotency record, if the key was used before.
    fn find_idem(&self, key: &IdemKey) -> Option<IdemRecord>;
    /// Whether a durable record says this invoice was used.
    fn invoice_used(&self, key: &InvoiceKey) -> bool;
    /// The newest commit group anything was appended to: a reply that depends on a record found in
    /// the store, possibly not yet synced, waits for this.
    fn latest_group(&self) -> u64;
    /// Queues `effects` and returns the commit group that will make them durable, and the id it
    /// gave the history entry (0 if none). Ids are never reused, not even across restarts, and grow
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
    invoices: HashSet<InvoiceKey>,
    cards: HashMap<CardKey, CardRecord>,
    txns: Vec<TxnRecord>,
}

impl MemoryJournal {
    /// The persisted card records, as a restart would load them.
    pub fn cards(&self) -> Vec<(CardKey, CardRecord)> {
        let g = self.inner.lock().unwrap();
        g.cards.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    pub fn txns(&self) -> Vec<TxnRecord> {
        self.inner.lock().unwrap().txns.clone()
    }

    /// The durable hold-id high-water mark, as a restart would read it.
    pub fn hold_id_next(&self) -> u64 {
        self.inner.lock().unwrap().hold_id_next
    }
}

impl Journal for MemoryJournal {
    fn find_idem(&self, key: &IdemKey) -> Option<IdemRecord> {
        self.inner.lock().unwrap().idem.get(key).copied()
    }

    fn invoice_used(&self, key: &InvoiceKey) -> bool {
        self.inner.lock().unwrap().invoices.contains(key)
    }

    fn latest_group(&self) -> u64 {
        self.inner.lock().unwrap().group
    }

    fn append(&self, effects: Effects) -> Appended {
        let mut g = self.inner.lock().unwrap();
        g.group += 1;
        let mut txn_id = 0;
        if let Some(mut c) = effects.change {
            g.txn_id += 1;
            txn_id = g.txn_id;
            c.assign_id(txn_id);
            g.cards.insert(c.txn.card, c.record);
            g.txns.push(c.txn);
        }
        if let Some((k, r)) = effects.idem {
            g.idem.insert(k, r);
        }
        if let Some(i) = effects.invoice {
            g.invoices.insert(i);
        }
        if let Some(n) = effects.hold_id_next {
            g.hold_id_next = g.hold_id_next.max(n);
        }
        Appended { group: g.group, txn_id }
    }
}
