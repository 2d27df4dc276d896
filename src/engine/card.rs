//! A card as the engine keeps it, and what of it is persisted.

use crate::card_number::PinProof;
use crate::model::{CardView, Currency, HoldView, LockReason, Status};

/// Open holds one card may have. Each is a few bytes in the card's record, which every change
/// rewrites, so the list stays short; a processor holding more is declined `too_many_holds`.
pub const HOLDS_PER_CARD_MAX: usize = 16;

/// An open hold, as the card's record keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    pub id: u64,
    pub amount_minor: i64,
    pub expires_ms: i64,
    /// When it was authorized: a void is accepted within the program's window from this.
    pub opened_ms: i64,
    /// The merchant id that authorized it. Only that merchant may capture or void it (hold ids
    /// are small counters: one merchant could otherwise capture another's hold by guessing its
    /// id), and its release at the deadline is written under it, so that merchant's event stream
    /// shows it.
    pub merchant: Box<str>,
}

impl Hold {
    pub fn view(&self) -> HoldView {
        HoldView { id: self.id, amount_minor: self.amount_minor, expires_ms: self.expires_ms }
    }
}
use std::sync::Arc;

/// Where a card is in its life. Suspension and expiry are not here: a suspension is a lock reason
/// laid over the lifecycle (unlock returns the card to where it was) and expiry is derived from time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Lifecycle {
    Inactive = 0,
    Active = 1,
    Closed = 2,
}

impl Lifecycle {
    pub fn from_u8(v: u8) -> Option<Lifecycle> {
        Some(match v {
            0 => Lifecycle::Inactive,
            1 => Lifecycle::Active,
            2 => Lifecycle::Closed,
            _ => return None,
        })
    }
}

/// The persisted state of one card. No card number: the key is its keyed hash, and `last4` is all
/// that is kept for display.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CardRecord {
    pub last4: [u8; 4],
    pub program: Arc<str>,
    pub currency: Currency,
    pub balance_minor: i64,
    /// Σ of `holds`, including any past their deadline that giftd has not released yet.
    pub held_minor: i64,
    /// Open holds, oldest first.
    pub holds: Vec<Hold>,
    pub lifecycle: Lifecycle,
    /// `None` unless the card is suspended.
    pub lock: LockReason,
    pub pin_locked: bool,
    /// The holder is a VIP (set by register): the reactivation policy treats VIPs differently.
    pub vip: bool,
    /// The loyalty member id the card is registered to, if any.
    pub member: Option<Box<str>>,
    pub expiry_ms: Option<i64>,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// History entries written so far; entry sequence numbers run 1..=txn_count.
    pub txn_count: u64,
    /// The journal's id of the newest history entry (0: none). Each entry names the one before it,
    /// so a card's history is a chain read back from here.
    pub last_txn_id: u64,
    /// The history id of the newest note (0: none); each note names the one before it.
    pub last_note_id: u64,
    /// The keyed hash of the card's PIN (None: no PIN set).
    pub pin: Option<PinProof>,
    /// Wrong PINs in a row; reaching the program's `pin_tries_max` sets `pin_locked`.
    pub pin_failures: u8,
    /// The UTC day (`program::utc_day`) of `loaded_today_minor`.
    pub load_day: i64,
    /// Loaded on `load_day`, for the program's daily load limit.
    pub loaded_today_minor: i64,
    /// A virtual (e-)card rather than plastic.
    pub virtual_card: bool,
    /// Where an e-card is delivered (the recipient email), if any.
    pub email: Option<Box<str>>,
}

impl CardRecord {
    /// An active USD card of the default program with only a balance, as tests of other layers
    /// need one (the engine's own tests issue theirs through the rules).
    #[cfg(test)]
    pub fn plain_for_tests(balance_minor: i64, created_ms: i64) -> CardRecord {
        CardRecord {
            last4: *b"0042",
            program: "default".into(),
            currency: Currency::from_code(*b"USD").expect("USD"),
            balance_minor,
            held_minor: 0,
            holds: Vec::new(),
            lifecycle: Lifecycle::Active,
            lock: LockReason::None,
            pin_locked: false,
            vip: false,
            member: None,
            expiry_ms: None,
            created_ms,
            updated_ms: created_ms,
            txn_count: 1,
            last_txn_id: 0,
            last_note_id: 0,
            pin: None,
            pin_failures: 0,
            load_day: 0,
            loaded_today_minor: 0,
            virtual_card: false,
            email: None,
        }
    }

    /// The status callers see. Precedence: closed, suspended, PIN-locked, expired, then lifecycle.
    pub fn status(&self, now_ms: i64) -> Status {
        if self.lifecycle == Lifecycle::Closed {
            Status::Closed
        } else if self.lock != LockReason::None {
            Status::Suspended
        } else if self.pin_locked {
            Status::PinLocked
        } else if self.expiry_ms.is_some_and(|e| e <= now_ms) {
            Status::Expired
        } else if self.lifecycle == Lifecycle::Active {
            Status::Active
        } else {
            Status::Inactive
        }
    }

    /// What the holds still reserve at `now_ms`. A hold past its deadline reserves nothing, even
    /// in the moment before giftd releases it, so every reader sees the same available amount.
    pub fn held_at(&self, now_ms: i64) -> i64 {
        self.holds.iter().filter(|h| h.expires_ms > now_ms).map(|h| h.amount_minor).sum()
    }

    pub fn available_at(&self, now_ms: i64) -> i64 {
        (self.balance_minor - self.held_at(now_ms)).max(0)
    }

    /// Whether a hold is past its deadline and waits to be released.
    /// Loaded so far on the UTC day of `now_ms`.
    pub fn loaded_on(&self, now_ms: i64) -> i64 {
        if self.load_day == super::program::utc_day(now_ms) {
            self.loaded_today_minor
        } else {
            0
        }
    }

    pub fn has_due_holds(&self, now_ms: i64) -> bool {
        self.holds.iter().any(|h| h.expires_ms <= now_ms)
    }

    pub fn view(&self, now_ms: i64) -> CardView {
        CardView {
            last4: self.last4,
            status: self.status(now_ms),
            reason: self.lock,
            currency: self.currency,
            balance_minor: self.balance_minor,
            held_minor: self.held_at(now_ms),
            expiry_ms: self.expiry_ms,
        }
    }

    /// Invariants checked when a record is written and again when it is read back.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.balance_minor < 0 {
            return Err("negative balance");
        }
        if self.held_minor < 0 || self.held_minor > self.balance_minor {
            return Err("held outside 0..=balance");
        }
        if self.holds.iter().map(|h| h.amount_minor).sum::<i64>() != self.held_minor {
            return Err("held is not the sum of the holds");
        }
        if self.holds.len() > HOLDS_PER_CARD_MAX || self.holds.iter().any(|h| h.amount_minor <= 0) {
            return Err("holds out of bounds");
        }
        Ok(())
    }
}

/// A card in memory: its record, its program's rules, and the commit group of its last change. A
/// read of the card waits until that group is durable, so no reply shows state a crash could undo.
pub(crate) struct Card {
    pub rec: CardRecord,
    /// The program's slot: an admin update reaches the card at once.
    pub program: super::program::ProgramSlot,
    pub last_group: u64,
}
