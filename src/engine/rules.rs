//! The business rules: pure functions from (card, program, request, time) to a decision. No locks,
//! no IO, no clock of their own. The checks run in the precedence order of `ResultCode`.

use super::card::{CardRecord, Lifecycle};
use super::program::Program;
use crate::model::{LockReason, Money, ResultCode, Status, TxnKind};
use std::sync::Arc;

/// A mutation of one card, after the wire layer has validated its fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Issue { program: String, money: Money, expiry_ms: Option<i64>, active: bool },
    Activate { load: Option<Money> },
    Redeem { money: Money, allow_partial: bool, invoice: Option<String> },
    Reload { money: Money },
    Lock { reason: LockReason },
    Unlock,
}

/// What an approved operation does to an existing card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub kind: TxnKind,
    /// Signed change of the balance.
    pub delta_minor: i64,
    pub lifecycle: Lifecycle,
    pub lock: LockReason,
    /// The amount reported as approved (or loaded).
    pub approved_minor: i64,
}

impl Decision {
    /// Applies the decision to `card`; its history entry is the card's `txn_count`-th.
    pub fn apply(&self, card: &mut CardRecord, now_ms: i64) {
        card.balance_minor += self.delta_minor;
        card.lifecycle = self.lifecycle;
        card.lock = self.lock;
        card.updated_ms = now_ms;
        card.txn_count += 1;
    }
}

/// Spending and loading need an active card; the status names the first reason it is not.
fn require_active(status: Status) -> Result<(), ResultCode> {
    match status {
        Status::Active => Ok(()),
        Status::Closed => Err(ResultCode::CardClosed),
        Status::Suspended => Err(ResultCode::CardSuspended),
        Status::PinLocked => Err(ResultCode::CardPinLocked),
        Status::Expired => Err(ResultCode::CardExpired),
        Status::Inactive => Err(ResultCode::CardInactive),
    }
}

fn require_currency(card: &CardRecord, money: &Money) -> Result<(), ResultCode> {
    if card.currency == money.currency {
        Ok(())
    } else {
        Err(ResultCode::CurrencyMismatch)
    }
}

/// The balance after adding `load_minor`, if the program's maximum allows it.
fn checked_load(program: &Program, card_balance_minor: i64, money: &Money) -> Result<i64, ResultCode> {
    let after = card_balance_minor.checked_add(money.minor).ok_or(ResultCode::MaxBalanceExceeded)?;
    match program.max_balance_minor(money.currency) {
        Some(max) if after > max => Err(ResultCode::MaxBalanceExceeded),
        _ => Ok(after),
    }
}

/// Decides an issue of a number not yet known (the caller checks that under the card's lock).
pub fn decide_issue(
    program: Option<&Arc<Program>>,
    last4: [u8; 4],
    op: &Op,
    now_ms: i64,
) -> Result<CardRecord, ResultCode> {
    let Op::Issue { money, expiry_ms, active, .. } = op else {
        unreachable!("decide_issue is only called for Op::Issue");
    };
    let program = program.ok_or(ResultCode::UnknownProgram)?;
    checked_load(program, 0, money)?;
    // An expiry in the past is accepted: cards imported from another system may be born expired.
    Ok(CardRecord {
        last4,
        program: program.name.clone(),
        currency: money.currency,
        balance_minor: money.minor,
        held_minor: 0,
        lifecycle: if *active { Lifecycle::Active } else { Lifecycle::Inactive },
        lock: LockReason::None,
        pin_locked: false,
        expiry_ms: *expiry_ms,
        created_ms: now_ms,
        updated_ms: now_ms,
        txn_count: 1,
        last_txn_id: 0,
    })
}

/// Decides an operation on an existing card. `invoice_used` says whether the request's invoice
/// number was already accepted for this merchant.
pub fn decide(
    card: &CardRecord,
    program: &Program,
    op: &Op,
    invoice_used: bool,
    now_ms: i64,
) -> Result<Decision, ResultCode> {
    let status = card.status(now_ms);
    let same = |kind, delta_minor, approved_minor| Decision {
        kind,
        delta_minor,
        lifecycle: card.lifecycle,
        lock: card.lock,
        approved_minor,
    };
    match op {
        Op::Issue { .. } => Err(ResultCode::CardExists),
        Op::Activate { load } => {
            match status {
                Status::Inactive => {}
                Status::Active => return Err(ResultCode::AlreadyActive),
                other => require_active(other)?,
            }
            let loaded = match load {
                Some(m) => {
                    require_currency(card, m)?;
                    checked_load(program, card.balance_minor, m)?;
                    m.minor
                }
                None => 0,
            };
            Ok(Decision { lifecycle: Lifecycle::Active, ..same(TxnKind::Activate, loaded, loaded) })
        }
        Op::Redeem { money, allow_partial, invoice } => {
            require_active(status)?;
            require_currency(card, money)?;
            if program.invoice_required && invoice.is_none() {
                return Err(ResultCode::InvoiceRequired);
            }
            if invoice.is_some() && invoice_used {
                return Err(ResultCode::InvoiceReused);
            }
            let available = card.available_minor();
            let approved = if money.minor <= available {
                money.minor
            } else if *allow_partial && available > 0 {
                available
            } else {
                return Err(ResultCode::InsufficientFunds);
            };
            Ok(same(TxnKind::Redeem, -approved, approved))
        }
        Op::Reload { money } => {
            require_active(status)?;
            require_currency(card, money)?;
            checked_load(program, card.balance_minor, money)?;
            Ok(same(TxnKind::Reload, money.minor, money.minor))
        }
        Op::Lock { reason } => {
            if status == Status::Closed {
                return Err(ResultCode::CardClosed);
            }
            Ok(Decision { lock: *reason, ..same(TxnKind::Lock, 0, 0) })
        }
        Op::Unlock => {
            if status == Status::Closed {
                return Err(ResultCode::CardClosed);
            }
            if card.lock == LockReason::None {
                return Err(ResultCode::NotSuspended);
            }
            Ok(Decision { lock: LockReason::None, ..same(TxnKind::Unlock, 0, 0) })
        }
    }
}
