//! The business rules: pure functions from (card, program, request, time) to a decision. No locks,
//! no IO, no clock of their own. The checks run in the precedence order of `ResultCode`.

use super::card::{CardRecord, Hold, Lifecycle, HOLDS_PER_CARD_MAX};
use super::journal::{ChunkKind, JobSpec};
use super::program::utc_day;
use super::program::Program;
use crate::card_number::{CardKey, PinProof};
use crate::model::{LockReason, Money, ResultCode, Status, TxnKind};
use std::sync::Arc;

/// A mutation of one card or more, after the wire layer has validated its fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `expiry_ms` None: the program's default expiry (or none). With a `case`, the first issue
    /// for that case answers every later one (a compensation card is issued once per case).
    Issue {
        program: String,
        money: Money,
        expiry_ms: Option<i64>,
        active: bool,
        number: IssueNumber,
        virtual_card: bool,
        email: Option<String>,
        case: Option<String>,
    },
    Activate {
        load: Option<Money>,
    },
    Redeem {
        money: Money,
        allow_partial: bool,
        invoice: Option<String>,
        pin: Option<PinProof>,
    },
    Reload {
        money: Money,
    },
    Lock {
        reason: LockReason,
    },
    Unlock,
    /// Opens a hold of `money` (or of what is available, with `allow_partial`) for `ttl_ms`
    /// (None: the program's default; cut to the program's maximum).
    Authorize {
        money: Money,
        allow_partial: bool,
        ttl_ms: Option<i64>,
        pin: Option<PinProof>,
    },
    /// Takes `money` (at most what the hold holds) and releases the rest.
    Capture {
        hold_id: u64,
        money: Money,
    },
    /// Releases the hold.
    Void {
        hold_id: u64,
    },
    /// Credits `money` back, for the spend whose idempotency key (same merchant) is `original`,
    /// or for none where the program allows it.
    Refund {
        money: Money,
        original: Option<String>,
    },
    /// Undoes the mutation whose idempotency key (same merchant) is `original`.
    Reverse {
        original: String,
    },
    /// Pays out the whole balance and closes the card.
    CashOut,
    /// Appends an internal note (the merchant is its author).
    Note {
        text: String,
    },
    /// Makes an expired or suspended card usable again, under the program's policy.
    Reactivate,
    /// Moves the whole balance to another card of the same currency and program, and closes this
    /// one (a lost or damaged card).
    Transfer {
        to: (CardKey, [u8; 4]),
    },
    /// Links the card to a member id (None: unlinks it) and sets or clears VIP.
    Register {
        member: Option<String>,
        vip: bool,
    },
    /// Sets (or replaces) the card's PIN.
    PinSet {
        pin: PinProof,
    },
    /// Checks a PIN: a wrong one counts towards the lock, a right one clears the count.
    PinVerify {
        pin: PinProof,
    },
    /// Lifts a PIN lock (and clears the count of wrong PINs).
    PinReset,
    /// A batch under its own idempotency key of single-card money operations (redeem, reload,
    /// activate), each card at most once: applied all or nothing, or each item on its own.
    Keyed {
        items: Vec<KeyedItem>,
        all_or_nothing: bool,
    },
    /// Records a bulk job (its kind, card count and chunk size); nothing else changes.
    JobOpen {
        spec: JobSpec,
    },
    /// One chunk of job `job`: the cards from its `first`, each decided on its own (issued or
    /// activated), or the reversal of the chunk that starts there (no cards: the chunk's record
    /// names them).
    JobChunk {
        job: String,
        first: u32,
        work: ChunkWork,
        cards: Vec<ChunkCard>,
    },
    /// Creates or replaces a program; `settings` is its canonical text, kept by the journal.
    ProgramSet {
        program: Arc<Program>,
        settings: String,
    },
    /// Takes `money` from several cards, all or nothing, in `order`.
    SplitRedeem {
        cards: Vec<(CardKey, [u8; 4])>,
        money: Money,
        order: SplitOrder,
    },
}

/// What a chunk does to each of its cards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkWork {
    /// Inactive cards with this value and expiry (None: the program's default).
    Issue {
        program: String,
        money: Money,
        expiry_ms: Option<i64>,
    },
    Activate {
        load: Option<Money>,
    },
    /// Takes back what the chunk at the same place did.
    Reverse,
}

impl ChunkWork {
    pub fn kind(&self) -> ChunkKind {
        match self {
            ChunkWork::Issue { .. } => ChunkKind::Issue,
            ChunkWork::Activate { .. } => ChunkKind::Activate,
            ChunkWork::Reverse => ChunkKind::Reverse,
        }
    }
}

/// A card of a chunk: its key, its last 4 digits, and whether its number passes the Luhn check
/// (for programs that require one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkCard {
    pub key: CardKey,
    pub last4: [u8; 4],
    pub luhn_ok: bool,
}

/// One operation of a batch under its own key, on its card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyedItem {
    pub card: CardKey,
    pub last4: [u8; 4],
    pub op: Op,
}

/// The money an operation moves, for the operations a batch under its own key may hold.
pub fn money_of(op: &Op) -> Option<Money> {
    match op {
        Op::Redeem { money, .. } | Op::Reload { money } => Some(*money),
        Op::Activate { load } => *load,
        _ => None,
    }
}

/// The number an issue gives its card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IssueNumber {
    /// The caller's (in the mutation's card); `luhn_ok`: whether its last digit is its Luhn check
    /// digit, which matters where the program asks for it.
    Supplied { luhn_ok: bool },
    /// Random numbers giftd generated, keyed: the first that is not a card yet is used (its index
    /// comes back in the answer, so the caller can return that number, once).
    Generated(Vec<(CardKey, [u8; 4])>),
}

/// What a decision does to the card's PIN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinChange {
    None,
    /// A new PIN; the count of wrong PINs starts again.
    Set(PinProof),
    /// A wrong PIN: counted, and the card locks at the program's limit.
    Failed {
        lock: bool,
    },
    /// A right PIN: the count starts again.
    Verified,
    /// The lock lifted and the count cleared.
    Reset,
}

/// The order a split redeem takes from its cards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SplitOrder {
    /// As the request lists them.
    Given = 0,
    /// Soonest expiry first; cards that never expire last.
    Expiry = 1,
    /// Smallest available amount first, so small balances are used up.
    Smallest = 2,
}

impl SplitOrder {
    pub fn from_u8(v: u8) -> Option<SplitOrder> {
        Some(match v {
            0 => SplitOrder::Given,
            1 => SplitOrder::Expiry,
            2 => SplitOrder::Smallest,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SplitOrder::Given => "given",
            SplitOrder::Expiry => "expiry",
            SplitOrder::Smallest => "smallest",
        }
    }

    pub fn parse(s: &str) -> Option<SplitOrder> {
        [SplitOrder::Given, SplitOrder::Expiry, SplitOrder::Smallest].into_iter().find(|o| o.name() == s)
    }
}

impl Op {
    /// A plain issue: a supplied number (with a valid check digit), plastic, no email, no case.
    pub fn issue(program: &str, money: Money, expiry_ms: Option<i64>, active: bool) -> Op {
        Op::Issue {
            program: program.into(),
            money,
            expiry_ms,
            active,
            number: IssueNumber::Supplied { luhn_ok: true },
            virtual_card: false,
            email: None,
            case: None,
        }
    }

    /// The hold an operation names: such an operation reaches its card through the hold.
    pub fn hold_id(&self) -> Option<u64> {
        match self {
            Op::Capture { hold_id, .. } | Op::Void { hold_id } => Some(*hold_id),
            _ => None,
        }
    }
}

/// What a decision does to the card's holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldChange {
    None,
    /// A new hold; the engine gives it its id when it applies the decision.
    Open {
        amount_minor: i64,
        expires_ms: i64,
        /// The authorizing merchant: only it may capture or void the hold.
        merchant: Box<str>,
    },
    /// The hold leaves the card (captured, voided or expired) and stops reserving its amount.
    Close {
        id: u64,
    },
}

/// A registration's new values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub vip: bool,
    pub member: Option<Box<str>>,
}

/// What an approved operation does to an existing card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub kind: TxnKind,
    /// Signed change of the balance.
    pub delta_minor: i64,
    pub lifecycle: Lifecycle,
    pub lock: LockReason,
    /// The amount reported as approved (or loaded, held, captured, released).
    pub approved_minor: i64,
    pub hold: HoldChange,
    /// Set by a registration.
    pub register: Option<Registration>,
    /// A new expiry (reactivation).
    pub new_expiry_ms: Option<i64>,
    pub pin: PinChange,
    /// Counted towards the card's daily load limit.
    pub loaded_minor: i64,
}

impl Decision {
    /// A decision of `kind` that moves `delta_minor` and leaves the rest of the card as it is: the
    /// base every rule starts from.
    pub fn keep(card: &CardRecord, kind: TxnKind, delta_minor: i64, approved_minor: i64) -> Decision {
        Decision {
            kind,
            delta_minor,
            lifecycle: card.lifecycle,
            lock: card.lock,
            approved_minor,
            hold: HoldChange::None,
            register: None,
            new_expiry_ms: None,
            pin: PinChange::None,
            loaded_minor: 0,
        }
    }

    /// The amount its history entry records: the change of balance, except for the hold
    /// operations that leave the balance alone, which record the amount held or released.
    pub fn history_amount(&self) -> i64 {
        match self.kind {
            TxnKind::Authorize | TxnKind::Void | TxnKind::HoldExpired => self.approved_minor,
            TxnKind::Reversal if self.delta_minor == 0 => self.approved_minor,
            _ => self.delta_minor,
        }
    }

    /// Applies the decision to `card`; its history entry is the card's `txn_count`-th. A hold the
    /// decision opens gets `new_hold_id`.
    pub fn apply(&self, card: &mut CardRecord, now_ms: i64, new_hold_id: u64) {
        match &self.hold {
            HoldChange::None => {}
            &HoldChange::Open { amount_minor, expires_ms, ref merchant } => {
                let merchant = merchant.clone();
                card.holds.push(Hold { id: new_hold_id, amount_minor, expires_ms, opened_ms: now_ms, merchant });
                card.held_minor += amount_minor;
            }
            &HoldChange::Close { id } => {
                if let Some(i) = card.holds.iter().position(|h| h.id == id) {
                    card.held_minor -= card.holds.remove(i).amount_minor;
                }
            }
        }
        if let Some(r) = &self.register {
            card.vip = r.vip;
            card.member = r.member.clone();
        }
        if let Some(e) = self.new_expiry_ms {
            card.expiry_ms = Some(e);
        }
        match self.pin {
            PinChange::None => {}
            PinChange::Set(p) => {
                card.pin = Some(p);
                card.pin_failures = 0;
            }
            PinChange::Failed { lock } => {
                card.pin_failures = card.pin_failures.saturating_add(1);
                card.pin_locked |= lock;
            }
            PinChange::Verified => card.pin_failures = 0,
            PinChange::Reset => {
                card.pin_failures = 0;
                card.pin_locked = false;
            }
        }
        if self.loaded_minor > 0 {
            // Saturating: with no daily limit a card may be loaded without end, and a count stuck
            // at the top still refuses every load under a limit set later.
            card.loaded_today_minor = card.loaded_on(now_ms).saturating_add(self.loaded_minor);
            card.load_day = utc_day(now_ms);
        }
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

/// A load of `money` onto `card` (None: a new card) under the program's single-load bounds and
/// daily limit. An issue of value 0 is no load.
fn check_load_limits(
    program: &Program,
    card: Option<&CardRecord>,
    money: &Money,
    now_ms: i64,
) -> Result<(), ResultCode> {
    if money.minor == 0 {
        return Ok(());
    }
    let (min, max) = program.load_bounds_minor(money.currency);
    if min.is_some_and(|min| money.minor < min) {
        return Err(ResultCode::LoadBelowMinimum);
    }
    if max.is_some_and(|max| money.minor > max) {
        return Err(ResultCode::LoadAboveMaximum);
    }
    let today = card.map_or(0, |c| c.loaded_on(now_ms));
    if program.daily_load_max_minor(money.currency).is_some_and(|max| today.saturating_add(money.minor) > max) {
        return Err(ResultCode::DailyLoadLimitExceeded);
    }
    Ok(())
}

/// Where the program asks for a PIN, or the request brings one, the PIN must be the card's.
fn check_pin(card: &CardRecord, program: &Program, pin: Option<&PinProof>) -> Result<(), ResultCode> {
    match (pin, &card.pin) {
        (None, _) if program.pin_required => Err(ResultCode::PinRequired),
        (None, _) => Ok(()),
        (Some(_), None) => Err(ResultCode::PinNotSet),
        (Some(given), Some(set)) if given.matches(set) => Ok(()),
        (Some(_), Some(_)) => Err(ResultCode::PinIncorrect),
    }
}

/// The PIN change an approved spend with a PIN makes: the count of wrong PINs starts again.
fn pin_verified(card: &CardRecord, pin: Option<&PinProof>) -> PinChange {
    if pin.is_some() && card.pin_failures > 0 {
        PinChange::Verified
    } else {
        PinChange::None
    }
}

/// A wrong PIN on `card`: counted, and the card locks once the program's tries are used up.
pub fn pin_failure(card: &CardRecord, program: &Program) -> Decision {
    let lock = card.pin_failures.saturating_add(1) >= program.pin_tries_max;
    Decision { pin: PinChange::Failed { lock }, ..Decision::keep(card, TxnKind::PinFailed, 0, 0) }
}

/// Decides an issue of a number not yet known (the caller checks that under the card's lock).
pub fn decide_issue(program: Option<&Program>, last4: [u8; 4], op: &Op, now_ms: i64) -> Result<CardRecord, ResultCode> {
    let Op::Issue { money, expiry_ms, active, number, virtual_card, email, .. } = op else {
        unreachable!("decide_issue is only called for Op::Issue");
    };
    let program = program.ok_or(ResultCode::UnknownProgram)?;
    if program.luhn_required && *number == (IssueNumber::Supplied { luhn_ok: false }) {
        return Err(ResultCode::BadCheckDigit);
    }
    if program.currency.is_some_and(|c| c != money.currency) {
        return Err(ResultCode::CurrencyMismatch);
    }
    check_load_limits(program, None, money, now_ms)?;
    checked_load(program, 0, money)?;
    let expiry_ms = expiry_ms.or_else(|| program.expiry_default_ms.map(|d| now_ms.saturating_add(d)));
    // An expiry in the past is accepted: cards imported from another system may be born expired.
    Ok(CardRecord {
        last4,
        program: program.name.clone(),
        currency: money.currency,
        balance_minor: money.minor,
        held_minor: 0,
        holds: Vec::new(),
        lifecycle: if *active { Lifecycle::Active } else { Lifecycle::Inactive },
        lock: LockReason::None,
        pin_locked: false,
        vip: false,
        member: None,
        expiry_ms,
        created_ms: now_ms,
        updated_ms: now_ms,
        txn_count: 1,
        last_txn_id: 0,
        last_note_id: 0,
        pin: None,
        pin_failures: 0,
        load_day: utc_day(now_ms),
        loaded_today_minor: money.minor,
        virtual_card: *virtual_card,
        email: email.as_deref().map(Into::into),
    })
}

/// Decides a program update. A program's currency, once set, stays: cards were issued in it.
pub fn decide_program_set(current: Option<&Program>, new: &Program) -> Result<(), ResultCode> {
    match current.and_then(|c| c.currency) {
        Some(c) if new.currency != Some(c) => Err(ResultCode::CurrencyMismatch),
        _ => Ok(()),
    }
}

/// Decides an operation on an existing card. `invoice_used` says whether the request's invoice
/// number was already accepted for this merchant.
pub fn decide(
    card: &CardRecord,
    program: &Program,
    op: &Op,
    merchant: &str,
    invoice_used: bool,
    now_ms: i64,
) -> Result<Decision, ResultCode> {
    let status = card.status(now_ms);
    let same = |kind, delta_minor, approved_minor| Decision::keep(card, kind, delta_minor, approved_minor);
    match op {
        Op::Issue { .. } => Err(ResultCode::CardExists),
        Op::Refund { .. }
        | Op::Reverse { .. }
        | Op::SplitRedeem { .. }
        | Op::Transfer { .. }
        | Op::Reactivate
        | Op::JobOpen { .. }
        | Op::JobChunk { .. }
        | Op::Keyed { .. }
        | Op::ProgramSet { .. } => {
            unreachable!(
                "refunds, reversals, split redeems, transfers, reactivations and programs have their own rules"
            )
        }
        Op::Activate { load } => {
            match status {
                Status::Inactive => {}
                Status::Active => return Err(ResultCode::AlreadyActive),
                other => require_active(other)?,
            }
            let loaded = match load {
                Some(m) => {
                    require_currency(card, m)?;
                    check_load_limits(program, Some(card), m, now_ms)?;
                    checked_load(program, card.balance_minor, m)?;
                    m.minor
                }
                None => 0,
            };
            Ok(Decision {
                lifecycle: Lifecycle::Active,
                loaded_minor: loaded,
                ..same(TxnKind::Activate, loaded, loaded)
            })
        }
        Op::Redeem { money, allow_partial, invoice, pin } => {
            require_active(status)?;
            check_pin(card, program, pin.as_ref())?;
            require_currency(card, money)?;
            if program.invoice_required && invoice.is_none() {
                return Err(ResultCode::InvoiceRequired);
            }
            if invoice.is_some() && invoice_used {
                return Err(ResultCode::InvoiceReused);
            }
            let approved = spendable(card, money, *allow_partial, now_ms)?;
            Ok(Decision { pin: pin_verified(card, pin.as_ref()), ..same(TxnKind::Redeem, -approved, approved) })
        }
        Op::Authorize { money, allow_partial, ttl_ms, pin } => {
            require_active(status)?;
            check_pin(card, program, pin.as_ref())?;
            require_currency(card, money)?;
            if card.holds.len() >= HOLDS_PER_CARD_MAX {
                return Err(ResultCode::TooManyHolds);
            }
            let held = spendable(card, money, *allow_partial, now_ms)?;
            let expires_ms = program.hold_deadline_ms(now_ms, *ttl_ms);
            Ok(Decision {
                hold: HoldChange::Open { amount_minor: held, expires_ms, merchant: merchant.into() },
                pin: pin_verified(card, pin.as_ref()),
                ..same(TxnKind::Authorize, 0, held)
            })
        }
        Op::Capture { hold_id, money } => {
            let hold = open_hold(card, *hold_id, merchant, now_ms)?;
            // The money was reserved when the card could spend, so a card that expired or was
            // PIN-locked since still pays what it promised; a closed or suspended one does not.
            match status {
                Status::Closed => return Err(ResultCode::CardClosed),
                Status::Suspended => return Err(ResultCode::CardSuspended),
                _ => {}
            }
            require_currency(card, money)?;
            if money.minor > hold.amount_minor {
                return Err(ResultCode::CaptureExceedsHold);
            }
            Ok(Decision {
                hold: HoldChange::Close { id: hold.id },
                ..same(TxnKind::Capture, -money.minor, money.minor)
            })
        }
        Op::Void { hold_id } => {
            // Whatever the card's status: a void only gives the cardholder back what was reserved.
            // Past the program's window the merchant may no longer void; the hold then runs to
            // its deadline (or is captured).
            let hold = open_hold(card, *hold_id, merchant, now_ms)?;
            if now_ms - hold.opened_ms > program.void_window_ms {
                return Err(ResultCode::VoidWindowPassed);
            }
            Ok(Decision { hold: HoldChange::Close { id: hold.id }, ..same(TxnKind::Void, 0, hold.amount_minor) })
        }
        Op::Reload { money } => {
            require_active(status)?;
            require_currency(card, money)?;
            check_load_limits(program, Some(card), money, now_ms)?;
            checked_load(program, card.balance_minor, money)?;
            Ok(Decision { loaded_minor: money.minor, ..same(TxnKind::Reload, money.minor, money.minor) })
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
        Op::CashOut => {
            // An expired, inactive or PIN-locked card may be paid out: it is the holder's money.
            // A suspended one may not (it may be a fraud case), nor one with money still held.
            match status {
                Status::Closed => return Err(ResultCode::CardClosed),
                Status::Suspended => return Err(ResultCode::CardSuspended),
                _ => {}
            }
            if card.held_at(now_ms) > 0 {
                return Err(ResultCode::HoldsOpen);
            }
            if program.cash_out_max_minor(card.currency).is_some_and(|max| card.balance_minor > max) {
                return Err(ResultCode::CashOutAboveLimit);
            }
            let paid = card.balance_minor;
            Ok(Decision { lifecycle: Lifecycle::Closed, ..same(TxnKind::CashOut, -paid, paid) })
        }
        // An agent may set a PIN on any card that is not closed; a PIN lock stays until reset.
        Op::PinSet { pin } => {
            if status == Status::Closed {
                return Err(ResultCode::CardClosed);
            }
            Ok(Decision { pin: PinChange::Set(*pin), ..same(TxnKind::PinSet, 0, 0) })
        }
        Op::PinVerify { pin } => {
            // The lock itself, not the status: a card suspended as well still has its PIN locked.
            if status == Status::Closed {
                return Err(ResultCode::CardClosed);
            }
            if card.pin_locked {
                return Err(ResultCode::CardPinLocked);
            }
            check_pin(card, program, Some(pin))?;
            Ok(Decision { pin: pin_verified(card, Some(pin)), ..same(TxnKind::PinVerified, 0, 0) })
        }
        Op::PinReset => {
            if status == Status::Closed {
                return Err(ResultCode::CardClosed);
            }
            if !card.pin_locked && card.pin_failures == 0 {
                return Err(ResultCode::NotPinLocked);
            }
            Ok(Decision { pin: PinChange::Reset, ..same(TxnKind::PinReset, 0, 0) })
        }
        // Notes are for the record, whatever the card's state, closed cards included.
        Op::Note { .. } => Ok(same(TxnKind::Note, 0, 0)),
        Op::Register { member, vip } => {
            if status == Status::Closed {
                return Err(ResultCode::CardClosed);
            }
            let register = Registration { vip: *vip, member: member.as_deref().map(Into::into) };
            Ok(Decision { register: Some(register), ..same(TxnKind::Register, 0, 0) })
        }
    }
}

/// What a spend of `money` may take: all of it, or with `allow_partial` what is available.
fn spendable(card: &CardRecord, money: &Money, allow_partial: bool, now_ms: i64) -> Result<i64, ResultCode> {
    let available = card.available_at(now_ms);
    if money.minor <= available {
        Ok(money.minor)
    } else if allow_partial && available > 0 {
        Ok(available)
    } else {
        Err(ResultCode::InsufficientFunds)
    }
}

/// The open hold `id`, if `merchant` opened it: another merchant's hold is not found, as if it did
/// not exist, so its id tells that merchant nothing.
fn open_hold(card: &CardRecord, id: u64, merchant: &str, now_ms: i64) -> Result<Hold, ResultCode> {
    open_hold_of_any(card, id, now_ms).and_then(|h| {
        if *h.merchant == *merchant {
            Ok(h)
        } else {
            Err(ResultCode::HoldNotFound)
        }
    })
}

/// The card's hold `id` if it is still open at `now_ms`, whoever opened it. A hold past its
/// deadline is released, whether or not giftd has written the release yet. A reversal uses it: it
/// names its original under its own merchant, so the hold is that merchant's already.
fn open_hold_of_any(card: &CardRecord, id: u64, now_ms: i64) -> Result<Hold, ResultCode> {
    card.holds.iter().find(|h| h.id == id && h.expires_ms > now_ms).cloned().ok_or(ResultCode::HoldNotFound)
}

/// The release of the card's first hold that is past its deadline at `now_ms`, if any: giftd
/// decides it by itself, with no request.
pub fn expiry(card: &CardRecord, now_ms: i64) -> Option<Decision> {
    let hold = card.holds.iter().find(|h| h.expires_ms <= now_ms)?;
    Some(Decision {
        hold: HoldChange::Close { id: hold.id },
        ..Decision::keep(card, TxnKind::HoldExpired, 0, hold.amount_minor)
    })
}

/// What a referenced refund knows of its original spend.
#[derive(Clone, Copy, Debug)]
pub struct RefundOf {
    /// The original's kind (only spends can be refunded).
    pub kind: TxnKind,
    /// What the original took from this card; `None` when it took nothing from it.
    pub taken_minor: Option<i64>,
    /// Refunded to this card for that original so far.
    pub refunded_minor: i64,
    pub reversed: bool,
}

/// Decides a refund of `money` to `card`, for `original` (None: unreferenced).
pub fn decide_refund(
    card: &CardRecord,
    program: &Program,
    money: &Money,
    original: Option<RefundOf>,
    now_ms: i64,
) -> Result<Decision, ResultCode> {
    // Money goes back to whoever paid, whatever happened to the card since, unless it is closed.
    if card.status(now_ms) == Status::Closed {
        return Err(ResultCode::CardClosed);
    }
    require_currency(card, money)?;
    match original {
        None => {
            if !program.unreferenced_refunds {
                return Err(ResultCode::RefundReferenceRequired);
            }
            checked_load(program, card.balance_minor, money)?;
        }
        Some(o) => {
            if !matches!(o.kind, TxnKind::Redeem | TxnKind::Capture) {
                return Err(ResultCode::NotReversible);
            }
            let Some(taken) = o.taken_minor else { return Err(ResultCode::OriginalCardMismatch) };
            if o.reversed {
                return Err(ResultCode::AlreadyReversed);
            }
            if money.minor > taken - o.refunded_minor {
                return Err(ResultCode::RefundExceedsOriginal);
            }
        }
    }
    Ok(Decision::keep(card, TxnKind::Refund, money.minor, money.minor))
}

/// Decides how a reversal undoes one card's part of an earlier mutation of `kind`, which moved
/// `amount_minor` (of which `refunded_minor` was refunded since) or opened hold `hold_id`.
#[allow(clippy::too_many_arguments)]
pub fn decide_reversal(
    card: &CardRecord,
    kind: TxnKind,
    amount_minor: i64,
    refunded_minor: i64,
    hold_id: u64,
    changed_since: bool,
    now_ms: i64,
) -> Result<Decision, ResultCode> {
    let status = card.status(now_ms);
    if status == Status::Closed {
        return Err(ResultCode::CardClosed);
    }
    let undo = |delta_minor: i64, lifecycle| Decision {
        lifecycle,
        ..Decision::keep(card, TxnKind::Reversal, delta_minor, delta_minor.abs())
    };
    match kind {
        // Spends come back, less what was refunded already.
        TxnKind::Redeem | TxnKind::Capture => Ok(undo(amount_minor - refunded_minor, card.lifecycle)),
        // Loads go away only if the money is still there to take.
        TxnKind::Reload | TxnKind::Activate => {
            // An activation is undone only on a card nothing happened to since (a reseller's job
            // taken back): a card in use is the holder's now.
            if kind == TxnKind::Activate && changed_since {
                return Err(ResultCode::CardUsed);
            }
            if card.available_at(now_ms) < amount_minor {
                return Err(ResultCode::InsufficientFunds);
            }
            let lifecycle = if kind == TxnKind::Activate { Lifecycle::Inactive } else { card.lifecycle };
            Ok(undo(-amount_minor, lifecycle))
        }
        TxnKind::Authorize => {
            let hold = open_hold_of_any(card, hold_id, now_ms)?;
            Ok(Decision {
                approved_minor: hold.amount_minor,
                hold: HoldChange::Close { id: hold.id },
                ..undo(0, card.lifecycle)
            })
        }
        _ => Err(ResultCode::NotReversible),
    }
}

/// Decides a split redeem over `cards` (in request order): which cards give how much, in the order
/// they are taken from (cards that give nothing are left out), all or nothing. A card that cannot
/// spend (status, currency) declines the whole request with its reason.
pub fn decide_split(
    cards: &[&CardRecord],
    programs: &[&Program],
    money: &Money,
    order: SplitOrder,
    now_ms: i64,
) -> Result<Vec<(usize, i64)>, ResultCode> {
    for (card, program) in cards.iter().zip(programs) {
        require_active(card.status(now_ms))?;
        // A split redeem carries no PIN, so it cannot spend from a card whose program wants one.
        check_pin(card, program, None)?;
        require_currency(card, money)?;
    }
    let mut turn: Vec<usize> = (0..cards.len()).collect();
    // Stable sorts: ties keep the request's order.
    match order {
        SplitOrder::Given => {}
        SplitOrder::Expiry => turn.sort_by_key(|&i| cards[i].expiry_ms.unwrap_or(i64::MAX)),
        SplitOrder::Smallest => turn.sort_by_key(|&i| cards[i].available_at(now_ms)),
    }
    let mut left = money.minor;
    let mut take = Vec::with_capacity(cards.len());
    for i in turn {
        let t = cards[i].available_at(now_ms).min(left);
        if t > 0 {
            take.push((i, t));
            left -= t;
        }
    }
    if left > 0 {
        return Err(ResultCode::InsufficientFunds);
    }
    Ok(take)
}

/// A spend of `minor` from `card` as a split redeem's part.
pub fn split_part(card: &CardRecord, minor: i64) -> Decision {
    Decision::keep(card, TxnKind::Redeem, -minor, minor)
}

/// A note appended to `card`: nothing else changes.
pub fn note(card: &CardRecord) -> Decision {
    Decision::keep(card, TxnKind::Note, 0, 0)
}

/// Decides a transfer of `from`'s whole balance to `to`: the decisions for each card.
pub fn decide_transfer(
    from: &CardRecord,
    to: &CardRecord,
    to_program: &Program,
    now_ms: i64,
) -> Result<(Decision, Decision), ResultCode> {
    // The card given up may be lost, stolen (suspended), expired or PIN-locked: that is why its
    // balance moves. It must not be closed already, nor have money held.
    if from.status(now_ms) == Status::Closed {
        return Err(ResultCode::CardClosed);
    }
    if to.status(now_ms) != Status::Active {
        return Err(ResultCode::TransferTargetNotActive);
    }
    if to.currency != from.currency {
        return Err(ResultCode::CurrencyMismatch);
    }
    if to.program != from.program {
        return Err(ResultCode::ProgramMismatch);
    }
    if from.held_at(now_ms) > 0 {
        return Err(ResultCode::HoldsOpen);
    }
    let amount = from.balance_minor;
    checked_load(to_program, to.balance_minor, &Money { currency: to.currency, minor: amount })?;
    let out = Decision { lifecycle: Lifecycle::Closed, ..Decision::keep(from, TxnKind::TransferOut, -amount, amount) };
    let into = Decision::keep(to, TxnKind::TransferIn, amount, amount);
    Ok((out, into))
}

/// Decides a reactivation under `program`'s policy. Approved: the decision and the note to append.
/// Declined: the code and a sentence a support agent can read to the customer.
pub fn decide_reactivate(
    card: &CardRecord,
    program: &Program,
    now_ms: i64,
) -> Result<(Decision, String), (ResultCode, String)> {
    let no = |why: String| Err((ResultCode::NotEligible, why));
    // A VIP is eligible only where the program's policy says VIPs are.
    let vip_counts = card.vip && program.reactivation_vip_eligible;
    let vip = match (card.vip, vip_counts) {
        (false, _) => "not VIP",
        (true, false) => "VIP but the program does not reactivate VIPs",
        (true, true) => "VIP",
    };
    let (lock, why) = match card.status(now_ms) {
        Status::Closed => return no("card closed: not eligible for reactivation".into()),
        Status::Active => return no("card is active: nothing to reactivate".into()),
        Status::Inactive => return no("card was never activated: activate it instead".into()),
        Status::PinLocked => return no("card is PIN-locked: reset the PIN lock instead".into()),
        Status::Suspended if card.lock == LockReason::Fraud => {
            return no("suspended for fraud: not eligible for reactivation".into())
        }
        Status::Suspended if !vip_counts => {
            return no(format!("suspended ({}), {vip}: not eligible for reactivation", card.lock.name()))
        }
        Status::Suspended => (LockReason::None, "Reactivated per policy – VIP customer".to_string()),
        Status::Expired => {
            let ago_ms = now_ms - card.expiry_ms.unwrap_or(now_ms);
            let grace_h = crate::model::hours(program.reactivation_grace_ms);
            if vip_counts {
                (card.lock, "Reactivated per policy – VIP customer".to_string())
            } else if ago_ms <= program.reactivation_grace_ms {
                (card.lock, format!("Reactivated per policy – expired <{grace_h}h"))
            } else {
                let h = crate::model::hours(ago_ms);
                return no(format!("expired {h} h ago, {vip}: not eligible for reactivation (grace {grace_h} h)"));
            }
        }
    };
    // A card that has expired gets a new expiry; a suspended one that has not keeps its own.
    let expired = card.expiry_ms.is_some_and(|e| e <= now_ms);
    let d = Decision {
        lock,
        new_expiry_ms: expired.then(|| now_ms + program.reactivation_extension_ms),
        ..Decision::keep(card, TxnKind::Reactivate, 0, 0)
    };
    Ok((d, why))
}
