//! Model-based property test: random sequences of payment operations (with retries, reversals that
//! come before their originals, expiring holds under a controlled clock) run against the engine and
//! against a small reference model written separately here, from the protocol pages rather than
//! from `rules.rs`. Every answer, and every card's final state, must agree; and a restart from the
//! journal must rebuild the same cards.
//!
//! `GIFTD_MODEL_SEQUENCES` sets how many sequences run (default 3,000), `GIFTD_MODEL_SEED` the first
//! seed (a failure names the seed that reproduces it).

use super::*;
use crate::model::{Money, Status};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

const START_MS: i64 = 1_800_000_000_000;
const HOUR_MS: i64 = 3_600_000;
const CARDS: u8 = 4;
const OPS_PER_SEQUENCE: usize = 60;

fn usd(minor: i64) -> Money {
    Money { currency: Currency::parse("USD").unwrap(), minor }
}

fn eur(minor: i64) -> Money {
    Money { currency: Currency::parse("EUR").unwrap(), minor }
}

fn key(n: u8) -> CardKey {
    CardKey([n; 32])
}

/// One step of a sequence. Cards are 1..=CARDS (card 0 never exists). Keys are short strings.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    /// `pin`: none, the card's PIN (true) or a wrong one (false).
    Redeem {
        card: u8,
        money: Money,
        partial: bool,
        pin: Option<bool>,
    },
    Reload {
        card: u8,
        money: Money,
    },
    Authorize {
        card: u8,
        money: Money,
        partial: bool,
        ttl_ms: i64,
        pin: Option<bool>,
    },
    PinSet {
        card: u8,
    },
    PinVerify {
        card: u8,
        right: bool,
    },
    PinReset {
        card: u8,
    },
    Capture {
        hold: u64,
        money: Money,
    },
    Void {
        hold: u64,
    },
    Refund {
        card: u8,
        money: Money,
        original: Option<String>,
    },
    Reverse {
        original: String,
    },
    Split {
        cards: Vec<u8>,
        money: Money,
        order: SplitOrder,
    },
    Lock {
        card: u8,
    },
    Unlock {
        card: u8,
    },
    CashOut {
        card: u8,
    },
    Transfer {
        from: u8,
        to: u8,
    },
    Note {
        card: u8,
    },
    Register {
        card: u8,
        vip: bool,
    },
    Reactivate {
        card: u8,
    },
}

/// What both sides answer: result, amount, and the parts' (card, amount) when listed.
#[derive(Clone, Debug, PartialEq)]
struct Said {
    result: ResultCode,
    approved: i64,
    hold: Option<u64>,
    parts: Vec<(u8, i64)>,
    /// The sentence a reactivation answers with.
    reason: Option<String>,
}

impl Said {
    fn no(result: ResultCode) -> Said {
        Said { result, approved: 0, hold: None, parts: Vec::new(), reason: None }
    }
    fn yes(approved: i64) -> Said {
        Said { result: ResultCode::Approved, approved, hold: None, parts: Vec::new(), reason: None }
    }
    fn because(self, reason: &str) -> Said {
        Said { reason: Some(reason.to_string()), ..self }
    }
}

// ----------------------------------------------------------------------------------------------
// The reference model.

#[derive(Clone, Debug)]
struct MHold {
    id: u64,
    card: u8,
    amount: i64,
    expires: i64,
    opened: i64,
}

/// The sequences' program lets a hold be voided for 2 hours (the clock often moves further) ...
const VOID_WINDOW_MS: i64 = 2 * HOUR_MS;
/// ... takes single loads of 0.05 to 150.00 and at most 300.00 a card a UTC day, the issue's
/// 100.00 included, and locks a card at the third wrong PIN in a row.
const LOAD_MIN: i64 = 5;
const LOAD_MAX: i64 = 15_000;
const DAILY_LOAD_MAX: i64 = 30_000;
const PIN_TRIES: u8 = 3;

#[derive(Clone, Debug)]
struct MCard {
    balance: i64,
    locked: bool,
    closed: bool,
    vip: bool,
    pin_set: bool,
    pin_failures: u8,
    pin_locked: bool,
    /// (UTC day, loaded that day).
    loaded: (i64, i64),
}

/// What an approved reversible step did, and what happened to it since.
#[derive(Clone, Debug)]
struct MEffect {
    kind: TxnKind,
    at: i64,
    parts: Vec<(u8, i64)>,
    hold: u64,
    refunded: Vec<i64>,
    reversal: Option<Said>,
}

#[derive(Clone, Debug)]
enum MKey {
    Used {
        step: Step,
        said: Said,
        effect: Option<usize>,
    },
    /// Claimed by a reversal that came first.
    Barred,
}

struct Model {
    now: i64,
    cards: HashMap<u8, MCard>,
    holds: Vec<MHold>,
    next_hold: u64,
    keys: HashMap<String, MKey>,
    effects: Vec<MEffect>,
}

impl Model {
    fn new() -> Model {
        let day = START_MS / (24 * HOUR_MS);
        let card = MCard {
            balance: 10_000,
            locked: false,
            closed: false,
            vip: false,
            pin_set: false,
            pin_failures: 0,
            pin_locked: false,
            loaded: (day, 10_000),
        };
        let cards = (1..=CARDS).map(|c| (c, card.clone())).collect();
        Model { now: START_MS, cards, holds: Vec::new(), next_hold: 1, keys: HashMap::new(), effects: Vec::new() }
    }

    fn open_holds(&self, card: u8) -> impl Iterator<Item = &MHold> {
        let now = self.now;
        self.holds.iter().filter(move |h| h.card == card && h.expires > now)
    }

    fn available(&self, card: u8) -> i64 {
        let held: i64 = self.open_holds(card).map(|h| h.amount).sum();
        (self.cards[&card].balance - held).max(0)
    }

    /// Spend checks shared by redeem and authorize: status, currency, then funds.
    fn spendable(&self, card: u8, money: &Money, partial: bool) -> Result<i64, ResultCode> {
        let avail = self.available(card);
        if money.minor <= avail {
            Ok(money.minor)
        } else if partial && avail > 0 {
            Ok(avail)
        } else {
            Err(ResultCode::InsufficientFunds)
        }
    }

    fn status(&self, card: u8) -> Result<(), ResultCode> {
        let c = &self.cards[&card];
        if c.closed {
            Err(ResultCode::CardClosed)
        } else if c.locked {
            Err(ResultCode::CardSuspended)
        } else if c.pin_locked {
            Err(ResultCode::CardPinLocked)
        } else {
            Ok(())
        }
    }

    fn status_and_currency(&self, card: u8, money: &Money) -> Result<(), ResultCode> {
        self.status(card)?;
        if money.currency != usd(0).currency {
            return Err(ResultCode::CurrencyMismatch);
        }
        Ok(())
    }

    /// A PIN given with a spend (after the status checks, before the currency): a wrong one is
    /// counted even though the spend is declined.
    fn check_pin(&mut self, card: u8, pin: Option<bool>) -> Result<(), ResultCode> {
        let c = self.cards.get_mut(&card).unwrap();
        match pin {
            None => Ok(()),
            Some(_) if !c.pin_set => Err(ResultCode::PinNotSet),
            Some(true) => Ok(()),
            Some(false) => {
                c.pin_failures += 1;
                c.pin_locked |= c.pin_failures >= PIN_TRIES;
                Err(ResultCode::PinIncorrect)
            }
        }
    }

    /// An approved spend with the right PIN starts the count of wrong ones again.
    fn pin_ok(&mut self, card: u8, pin: Option<bool>) {
        if pin == Some(true) {
            self.cards.get_mut(&card).unwrap().pin_failures = 0;
        }
    }

    fn spend_checks(&mut self, card: u8, money: &Money, pin: Option<bool>) -> Result<(), ResultCode> {
        self.status(card)?;
        self.check_pin(card, pin)?;
        self.status_and_currency(card, money)
    }

    fn apply(&mut self, k: &str, step: &Step) -> Said {
        match self.keys.get(k) {
            Some(MKey::Barred) => return Said::no(ResultCode::OriginalReversed),
            Some(MKey::Used { step: s, said, .. }) => {
                return if s == step { said.clone() } else { Said::no(ResultCode::IdempotencyMismatch) };
            }
            None => {}
        }
        let (said, effect) = self.decide(step);
        let effect = effect.map(|e| {
            self.effects.push(e);
            self.effects.len() - 1
        });
        // A reversal of a key never seen bars that key (decide() does it); the reversal's own key
        // is recorded here like any other.
        self.keys.insert(k.to_string(), MKey::Used { step: step.clone(), said: said.clone(), effect });
        said
    }

    fn decide(&mut self, step: &Step) -> (Said, Option<MEffect>) {
        let now = self.now;
        match step.clone() {
            Step::Redeem { card, money, partial, pin } => {
                let r = self.spend_checks(card, &money, pin).and_then(|()| self.spendable(card, &money, partial));
                match r {
                    Err(c) => (Said::no(c), None),
                    Ok(a) => {
                        self.pin_ok(card, pin);
                        self.cards.get_mut(&card).unwrap().balance -= a;
                        let e = effect(TxnKind::Redeem, now, vec![(card, a)], 0);
                        (Said::yes(a), Some(e))
                    }
                }
            }
            Step::Reload { card, money } => match self.status_and_currency(card, &money).and_then(|()| {
                let day = now / (24 * HOUR_MS);
                let c = &self.cards[&card];
                let today = if c.loaded.0 == day { c.loaded.1 } else { 0 };
                if money.minor < LOAD_MIN {
                    Err(ResultCode::LoadBelowMinimum)
                } else if money.minor > LOAD_MAX {
                    Err(ResultCode::LoadAboveMaximum)
                } else if today + money.minor > DAILY_LOAD_MAX {
                    Err(ResultCode::DailyLoadLimitExceeded)
                } else {
                    Ok(today)
                }
            }) {
                Err(c) => (Said::no(c), None),
                Ok(today) => {
                    let c = self.cards.get_mut(&card).unwrap();
                    c.loaded = (now / (24 * HOUR_MS), today + money.minor);
                    c.balance += money.minor;
                    (Said::yes(money.minor), Some(effect(TxnKind::Reload, now, vec![(card, money.minor)], 0)))
                }
            },
            Step::Authorize { card, money, partial, ttl_ms, pin } => {
                let r = self.spend_checks(card, &money, pin).and_then(|()| {
                    if self.open_holds(card).count() >= card::HOLDS_PER_CARD_MAX {
                        return Err(ResultCode::TooManyHolds);
                    }
                    self.spendable(card, &money, partial)
                });
                match r {
                    Err(c) => (Said::no(c), None),
                    Ok(a) => {
                        self.pin_ok(card, pin);
                        let id = self.next_hold;
                        self.next_hold += 1;
                        self.holds.push(MHold { id, card, amount: a, expires: now + ttl_ms, opened: now });
                        let said = Said { hold: Some(id), ..Said::yes(a) };
                        (said, Some(effect(TxnKind::Authorize, now, vec![(card, a)], id)))
                    }
                }
            }
            Step::Capture { hold, money } => {
                let Some(i) = self.holds.iter().position(|h| h.id == hold && h.expires > now) else {
                    return (Said::no(ResultCode::HoldNotFound), None);
                };
                let h = self.holds[i].clone();
                let r = if self.cards[&h.card].closed {
                    Err(ResultCode::CardClosed)
                } else if self.cards[&h.card].locked {
                    Err(ResultCode::CardSuspended)
                } else if money.currency != usd(0).currency {
                    Err(ResultCode::CurrencyMismatch)
                } else if money.minor > h.amount {
                    Err(ResultCode::CaptureExceedsHold)
                } else {
                    Ok(())
                };
                match r {
                    Err(c) => (Said::no(c), None),
                    Ok(()) => {
                        self.holds.remove(i);
                        self.cards.get_mut(&h.card).unwrap().balance -= money.minor;
                        let e = effect(TxnKind::Capture, now, vec![(h.card, money.minor)], 0);
                        (Said::yes(money.minor), Some(e))
                    }
                }
            }
            Step::Void { hold } => match self.holds.iter().position(|h| h.id == hold && h.expires > now) {
                None => (Said::no(ResultCode::HoldNotFound), None),
                Some(i) if now - self.holds[i].opened > VOID_WINDOW_MS => {
                    (Said::no(ResultCode::VoidWindowPassed), None)
                }
                Some(i) => {
                    let h = self.holds.remove(i);
                    (Said::yes(h.amount), None)
                }
            },
            Step::Refund { card, money, original } => (self.refund(card, &money, original.as_deref()), None),
            Step::Reverse { original } => (self.reverse(&original), None),
            Step::Split { cards, money, order } => self.split(&cards, &money, order),
            Step::Lock { card } => {
                if self.cards[&card].closed {
                    return (Said::no(ResultCode::CardClosed), None);
                }
                self.cards.get_mut(&card).unwrap().locked = true;
                (Said::yes(0), None)
            }
            Step::Note { .. } => (Said::yes(0), None),
            Step::PinSet { card } => {
                let c = self.cards.get_mut(&card).unwrap();
                if c.closed {
                    return (Said::no(ResultCode::CardClosed), None);
                }
                (c.pin_set, c.pin_failures) = (true, 0);
                (Said::yes(0), None)
            }
            Step::PinVerify { card, right } => {
                let c = &self.cards[&card];
                if c.closed {
                    return (Said::no(ResultCode::CardClosed), None);
                }
                if c.pin_locked {
                    return (Said::no(ResultCode::CardPinLocked), None);
                }
                match self.check_pin(card, Some(right)) {
                    Err(code) => (Said::no(code), None),
                    Ok(()) => {
                        self.pin_ok(card, Some(true));
                        (Said::yes(0), None)
                    }
                }
            }
            Step::PinReset { card } => {
                let c = self.cards.get_mut(&card).unwrap();
                if c.closed {
                    return (Said::no(ResultCode::CardClosed), None);
                }
                if !c.pin_locked && c.pin_failures == 0 {
                    return (Said::no(ResultCode::NotPinLocked), None);
                }
                (c.pin_locked, c.pin_failures) = (false, 0);
                (Said::yes(0), None)
            }
            Step::Register { card, vip } => {
                if self.cards[&card].closed {
                    return (Said::no(ResultCode::CardClosed), None);
                }
                self.cards.get_mut(&card).unwrap().vip = vip;
                (Said::yes(0), None)
            }
            // No card of these sequences expires, and locks are for loss: only a VIP's suspension
            // is lifted.
            Step::Reactivate { card } => {
                let c = self.cards.get_mut(&card).unwrap();
                let no = Said::no(ResultCode::NotEligible);
                let said = if c.closed {
                    no.because("card closed: not eligible for reactivation")
                } else if !c.locked && c.pin_locked {
                    no.because("card is PIN-locked: reset the PIN lock instead")
                } else if !c.locked {
                    no.because("card is active: nothing to reactivate")
                } else if !c.vip {
                    no.because("suspended (lost), not VIP: not eligible for reactivation")
                } else {
                    c.locked = false;
                    Said::yes(0).because("Reactivated per policy – VIP customer")
                };
                (said, None)
            }
            Step::CashOut { card } => {
                let c = &self.cards[&card];
                let code = if c.closed {
                    Some(ResultCode::CardClosed)
                } else if c.locked {
                    Some(ResultCode::CardSuspended)
                } else if self.open_holds(card).next().is_some() {
                    Some(ResultCode::HoldsOpen)
                } else {
                    None
                };
                if let Some(code) = code {
                    return (Said::no(code), None);
                }
                let c = self.cards.get_mut(&card).unwrap();
                let paid = c.balance;
                (c.balance, c.closed) = (0, true);
                (Said::yes(paid), None)
            }
            Step::Transfer { from, to } => {
                let (f, t) = (&self.cards[&from], &self.cards[&to]);
                let code = if f.closed {
                    Some(ResultCode::CardClosed)
                } else if t.closed || t.locked || t.pin_locked {
                    Some(ResultCode::TransferTargetNotActive)
                } else if self.open_holds(from).next().is_some() {
                    Some(ResultCode::HoldsOpen)
                } else {
                    None
                };
                if let Some(code) = code {
                    return (Said::no(code), None);
                }
                let amount = f.balance;
                let f = self.cards.get_mut(&from).unwrap();
                (f.balance, f.closed) = (0, true);
                self.cards.get_mut(&to).unwrap().balance += amount;
                (Said { parts: vec![(from, -amount), (to, amount)], ..Said::yes(amount) }, None)
            }
            Step::Unlock { card } => {
                if self.cards[&card].closed {
                    return (Said::no(ResultCode::CardClosed), None);
                }
                if !self.cards[&card].locked {
                    return (Said::no(ResultCode::NotSuspended), None);
                }
                self.cards.get_mut(&card).unwrap().locked = false;
                (Said::yes(0), None)
            }
        }
    }

    fn refund(&mut self, card: u8, money: &Money, original: Option<&str>) -> Said {
        let eff = match original.map(|o| self.keys.get(o)) {
            Some(None) => return Said::no(ResultCode::OriginalNotFound),
            Some(Some(MKey::Barred)) | None => None,
            Some(Some(MKey::Used { effect, .. })) => *effect,
        };
        if self.cards[&card].closed {
            return Said::no(ResultCode::CardClosed);
        }
        if money.currency != usd(0).currency {
            return Said::no(ResultCode::CurrencyMismatch);
        }
        if original.is_none() {
            // The default program takes referenced refunds only.
            return Said::no(ResultCode::RefundReferenceRequired);
        }
        let Some(e) = eff.filter(|&e| matches!(self.effects[e].kind, TxnKind::Redeem | TxnKind::Capture)) else {
            return Said::no(ResultCode::NotReversible);
        };
        let Some(part) = self.effects[e].parts.iter().position(|(c, _)| *c == card) else {
            return Said::no(ResultCode::OriginalCardMismatch);
        };
        if self.effects[e].reversal.is_some() {
            return Said::no(ResultCode::AlreadyReversed);
        }
        let left = self.effects[e].parts[part].1 - self.effects[e].refunded[part];
        if money.minor > left {
            return Said::no(ResultCode::RefundExceedsOriginal);
        }
        self.effects[e].refunded[part] += money.minor;
        self.cards.get_mut(&card).unwrap().balance += money.minor;
        Said::yes(money.minor)
    }

    fn reverse(&mut self, original: &str) -> Said {
        let eff = match self.keys.get(original) {
            None => {
                self.keys.insert(original.to_string(), MKey::Barred);
                return Said::yes(0);
            }
            Some(MKey::Barred) => return Said::yes(0),
            Some(MKey::Used { said, effect: None, .. }) => {
                return if said.result == ResultCode::Approved {
                    Said::no(ResultCode::NotReversible)
                } else {
                    Said::yes(0)
                };
            }
            Some(MKey::Used { effect: Some(e), .. }) => *e,
        };
        if let Some(first) = &self.effects[eff].reversal {
            return first.clone();
        }
        let e = self.effects[eff].clone();
        if self.now - e.at > 24 * HOUR_MS {
            return Said::no(ResultCode::ReversalWindowPassed);
        }
        let mut deltas = Vec::new();
        for (i, (card, amount)) in e.parts.iter().enumerate() {
            if self.cards[card].closed {
                return Said::no(ResultCode::CardClosed);
            }
            let d = match e.kind {
                TxnKind::Redeem | TxnKind::Capture => amount - e.refunded[i],
                TxnKind::Reload => {
                    if self.available(*card) < *amount {
                        return Said::no(ResultCode::InsufficientFunds);
                    }
                    -amount
                }
                TxnKind::Authorize => {
                    if !self.holds.iter().any(|h| h.id == e.hold && h.expires > self.now) {
                        return Said::no(ResultCode::HoldNotFound);
                    }
                    0
                }
                other => unreachable!("no effect of kind {other:?}"),
            };
            deltas.push((*card, d));
        }
        let mut said = Said::yes(0);
        for (card, d) in &deltas {
            self.cards.get_mut(card).unwrap().balance += d;
            said.approved += d.abs();
            said.parts.push((*card, *d));
        }
        if e.kind == TxnKind::Authorize {
            let i = self.holds.iter().position(|h| h.id == e.hold).unwrap();
            said.approved = self.holds.remove(i).amount;
        }
        self.effects[eff].reversal = Some(said.clone());
        said
    }

    fn split(&mut self, cards: &[u8], money: &Money, order: SplitOrder) -> (Said, Option<MEffect>) {
        for &c in cards {
            if let Err(code) = self.status_and_currency(c, money) {
                return (Said::no(code), None);
            }
        }
        let mut turn: Vec<u8> = cards.to_vec();
        match order {
            SplitOrder::Given | SplitOrder::Expiry => {} // no card expires in this model
            SplitOrder::Smallest => turn.sort_by_key(|&c| self.available(c)),
        }
        let mut left = money.minor;
        let mut took = Vec::new();
        for c in turn {
            let t = self.available(c).min(left);
            if t > 0 {
                took.push((c, t));
                left -= t;
            }
        }
        if left > 0 {
            return (Said::no(ResultCode::InsufficientFunds), None);
        }
        for (c, t) in &took {
            self.cards.get_mut(c).unwrap().balance -= t;
        }
        let said = Said { parts: took.iter().map(|(c, t)| (*c, -t)).collect(), ..Said::yes(money.minor) };
        (said, Some(effect(TxnKind::Redeem, self.now, took, 0)))
    }
}

fn effect(kind: TxnKind, at: i64, parts: Vec<(u8, i64)>, hold: u64) -> MEffect {
    let refunded = vec![0; parts.len()];
    MEffect { kind, at, parts, hold, refunded, reversal: None }
}

// ----------------------------------------------------------------------------------------------
// The engine side.

fn to_op(step: &Step) -> (Option<CardKey>, Op) {
    match step.clone() {
        Step::Redeem { card, money, partial, pin } => {
            let pin = pin.map(|right| pin_of(card, right));
            (Some(key(card)), Op::Redeem { money, allow_partial: partial, invoice: None, pin })
        }
        Step::Reload { card, money } => (Some(key(card)), Op::Reload { money }),
        Step::Authorize { card, money, partial, ttl_ms, pin } => {
            let pin = pin.map(|right| pin_of(card, right));
            (Some(key(card)), Op::Authorize { money, allow_partial: partial, ttl_ms: Some(ttl_ms), pin })
        }
        Step::PinSet { card } => (Some(key(card)), Op::PinSet { pin: pin_of(card, true) }),
        Step::PinVerify { card, right } => (Some(key(card)), Op::PinVerify { pin: pin_of(card, right) }),
        Step::PinReset { card } => (Some(key(card)), Op::PinReset),
        Step::Capture { hold, money } => (None, Op::Capture { hold_id: hold, money }),
        Step::Void { hold } => (None, Op::Void { hold_id: hold }),
        Step::Refund { card, money, original } => (Some(key(card)), Op::Refund { money, original }),
        Step::Reverse { original } => (None, Op::Reverse { original }),
        Step::Split { cards, money, order } => {
            let cards = cards.iter().map(|&c| (key(c), [b'0', b'0', b'0', b'0' + c])).collect();
            (None, Op::SplitRedeem { cards, money, order })
        }
        Step::Lock { card } => (Some(key(card)), Op::Lock { reason: crate::model::LockReason::Lost }),
        Step::CashOut { card } => (Some(key(card)), Op::CashOut),
        Step::Transfer { from, to } => (Some(key(from)), Op::Transfer { to: (key(to), [b'0', b'0', b'0', b'0' + to]) }),
        Step::Note { card } => (Some(key(card)), Op::Note { text: format!("note on card {card}") }),
        Step::Register { card, vip } => (Some(key(card)), Op::Register { member: None, vip }),
        Step::Reactivate { card } => (Some(key(card)), Op::Reactivate),
        Step::Unlock { card } => (Some(key(card)), Op::Unlock),
    }
}

/// Card `card`'s PIN proof, or a wrong one.
fn pin_of(card: u8, right: bool) -> crate::card_number::PinProof {
    crate::card_number::PinProof(if right { [card; 16] } else { [0xEE; 16] })
}

fn run_engine(e: &Engine, k: &str, step: &Step, now: i64) -> Said {
    let (card, op) = to_op(step);
    let digest = <sha2::Sha256 as sha2::Digest>::digest(format!("{step:?}").as_bytes());
    let mut fingerprint = [0u8; 16];
    fingerprint.copy_from_slice(&digest[..16]);
    let last4 = [b'0', b'0', b'0', b'0' + card.map_or(0, |c| c.0[0])];
    let done = e.execute(
        Mutation { idem: IdemKey::new("m", k), fingerprint, card, last4, op, batched: false, looked_up: None },
        now,
    );
    let parts =
        done.parts.map(|p| p.items.iter().map(|i| (i.last4[3] - b'0', i.amount_minor)).collect()).unwrap_or_default();
    Said {
        result: done.outcome.result,
        approved: done.outcome.approved_minor,
        hold: done.outcome.hold.map(|h| h.id),
        parts,
        reason: done.reason,
    }
}

// ----------------------------------------------------------------------------------------------
// Generation.

fn money(rng: &mut StdRng) -> Money {
    let minor = match rng.gen_range(0..10) {
        0 => rng.gen_range(5_000..20_000),
        _ => rng.gen_range(1..3_000),
    };
    if rng.gen_ratio(1, 30) {
        eur(minor)
    } else {
        usd(minor)
    }
}

fn card_of(rng: &mut StdRng) -> u8 {
    rng.gen_range(1..=CARDS)
}

/// A new step, or a retry (same key, same or other content) of an earlier one. In a `holds_heavy`
/// sequence most steps are small authorizations, so cards reach their limit of open holds.
fn step(rng: &mut StdRng, n: usize, done: &[(String, Step)], model: &Model, holds_heavy: bool) -> (String, Step) {
    if holds_heavy && rng.gen_ratio(3, 4) {
        let ttl_ms = rng.gen_range(HOUR_MS..8 * HOUR_MS);
        return (
            format!("k{n}"),
            Step::Authorize { card: 1, money: usd(rng.gen_range(1..50)), partial: false, ttl_ms, pin: None },
        );
    }
    if !done.is_empty() && rng.gen_ratio(1, 8) {
        let (k, s) = done[rng.gen_range(0..done.len())].clone();
        // Mostly the same request again; sometimes other content under the same key.
        return if rng.gen_ratio(4, 5) { (k, s) } else { (k, Step::Void { hold: 999_999 }) };
    }
    let k = format!("k{n}");
    let earlier = |rng: &mut StdRng| -> String {
        if done.is_empty() || rng.gen_ratio(1, 6) {
            // A key that may come later (a reversal before its original) or never.
            format!("k{}", n + rng.gen_range(1..4))
        } else {
            done[rng.gen_range(0..done.len())].0.clone()
        }
    };
    let hold = |rng: &mut StdRng| -> u64 {
        if model.next_hold > 1 && rng.gen_ratio(9, 10) {
            rng.gen_range(1..model.next_hold)
        } else {
            rng.gen_range(1..100)
        }
    };
    // Mostly no PIN; sometimes the card's, sometimes a wrong one.
    let pin = |rng: &mut StdRng| match rng.gen_range(0..10) {
        0..=6 => None,
        7..=8 => Some(true),
        _ => Some(false),
    };
    if rng.gen_ratio(1, 12) {
        let card = card_of(rng);
        let s = match rng.gen_range(0..10) {
            0..=2 => Step::PinSet { card },
            3..=7 => Step::PinVerify { card, right: rng.gen_bool(0.4) },
            _ => Step::PinReset { card },
        };
        return (k, s);
    }
    let s = match rng.gen_range(0..100) {
        0..=19 => Step::Redeem { card: card_of(rng), money: money(rng), partial: rng.gen_bool(0.3), pin: pin(rng) },
        20..=26 => Step::Reload { card: card_of(rng), money: money(rng) },
        27..=41 => Step::Authorize {
            card: card_of(rng),
            money: money(rng),
            partial: rng.gen_bool(0.3),
            ttl_ms: rng.gen_range(1..4 * HOUR_MS),
            pin: pin(rng),
        },
        42..=53 => Step::Capture { hold: hold(rng), money: money(rng) },
        54..=58 => Step::Void { hold: hold(rng) },
        59..=70 => {
            let original = if rng.gen_ratio(1, 10) { None } else { Some(earlier(rng)) };
            // Mostly a refund that fits what the original took from one of its cards, so that
            // several refunds of one spend add up to its limit.
            let part = original.as_deref().and_then(|o| match model.keys.get(o) {
                Some(MKey::Used { effect: Some(e), .. }) => {
                    let parts = &model.effects[*e].parts;
                    parts.get(rng.gen_range(0..parts.len().max(1))).copied()
                }
                _ => None,
            });
            match part {
                Some((card, taken)) if taken > 0 && rng.gen_ratio(4, 5) => {
                    Step::Refund { card, money: usd(rng.gen_range(1..=taken)), original }
                }
                _ => Step::Refund { card: card_of(rng), money: money(rng), original },
            }
        }
        71..=82 => Step::Reverse { original: earlier(rng) },
        83..=94 => {
            let mut cards: Vec<u8> = (1..=CARDS).collect();
            // A random subset of 1..=3 cards in random order.
            for i in (1..cards.len()).rev() {
                cards.swap(i, rng.gen_range(0..=i));
            }
            cards.truncate(rng.gen_range(1..=3));
            let order = if rng.gen_bool(0.5) { SplitOrder::Given } else { SplitOrder::Smallest };
            Step::Split { cards, money: money(rng), order }
        }
        95..=96 => Step::Lock { card: card_of(rng) },
        97 => Step::Unlock { card: card_of(rng) },
        98 if rng.gen_ratio(1, 3) => Step::CashOut { card: card_of(rng) },
        98 if rng.gen_bool(0.5) => Step::Note { card: card_of(rng) },
        98 => Step::Register { card: card_of(rng), vip: rng.gen_bool(0.5) },
        99 if rng.gen_ratio(1, 3) => Step::Reactivate { card: card_of(rng) },
        _ => {
            let from = card_of(rng);
            Step::Transfer { from, to: from % CARDS + 1 }
        }
    };
    (k, s)
}

fn programs() -> Programs {
    let cents = |minor: i64| Some(rust_decimal::Decimal::new(minor, 2));
    Programs::new([Program {
        void_window_ms: VOID_WINDOW_MS,
        load_min: cents(LOAD_MIN),
        load_max: cents(LOAD_MAX),
        daily_load_max: cents(DAILY_LOAD_MAX),
        pin_tries_max: PIN_TRIES,
        ..Program::new("default")
    }])
}

fn run_sequence(seed: u64, seen: &mut HashMap<ResultCode, u64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let journal = Arc::new(MemoryJournal::default());
    let engine = Engine::new(programs(), journal.clone());
    for c in 1..=CARDS {
        let op = Op::issue("default", usd(10_000), None, true);
        let m = Mutation {
            idem: IdemKey::new("m", &format!("issue-{c}")),
            fingerprint: [c; 16],
            card: Some(key(c)),
            last4: [b'0', b'0', b'0', b'0' + c],
            op,
            batched: false,
            looked_up: None,
        };
        assert_eq!(engine.execute(m, START_MS).outcome.result, ResultCode::Approved);
    }
    let mut model = Model::new();
    let holds_heavy = seed.is_multiple_of(10);
    let mut done: Vec<(String, Step)> = Vec::new();
    let mut log = Vec::new();
    for n in 0..OPS_PER_SEQUENCE {
        // The clock moves: mostly a little, sometimes past hold deadlines or the reversal window.
        model.now += match rng.gen_range(0..20) {
            0 => 25 * HOUR_MS,
            1..=3 => rng.gen_range(HOUR_MS..3 * HOUR_MS),
            _ => rng.gen_range(0..60_000),
        };
        // Now and then giftd's own expiry sweep runs, or memory forgets what is durable.
        if rng.gen_ratio(1, 5) {
            engine.expire_holds(model.now, usize::MAX);
        }
        if rng.gen_ratio(1, 10) {
            engine.evict_recent(u64::MAX, i64::MAX);
        }
        let (k, s) = step(&mut rng, n, &done, &model, holds_heavy);
        let want = model.apply(&k, &s);
        let got = run_engine(&engine, &k, &s, model.now);
        log.push(format!("{k} {s:?} → {want:?}"));
        *seen.entry(want.result).or_default() += 1;
        assert_eq!(got, want, "seed {seed}, step {n}: {k} {s:?}\nsteps so far:\n{}", log.join("\n"));
        if !done.iter().any(|(dk, _)| dk == &k) {
            done.push((k, s));
        }
    }
    for c in 1..=CARDS {
        let (rec, _) = engine.snapshot(&key(c)).unwrap();
        let view = rec.view(model.now);
        let mc = &model.cards[&c];
        let held: i64 = model.open_holds(c).map(|h| h.amount).sum();
        let status = if mc.closed {
            Status::Closed
        } else if mc.locked {
            Status::Suspended
        } else if mc.pin_locked {
            Status::PinLocked
        } else {
            Status::Active
        };
        assert_eq!(
            (view.balance_minor, view.held_minor, view.status, rec.pin_failures),
            (mc.balance, held, status, mc.pin_failures),
            "seed {seed}: card {c} at the end\n{}",
            log.join("\n")
        );
    }
    // A restart from what was journalled rebuilds the same cards.
    let again = Engine::new(programs(), Arc::new(MemoryJournal::default()));
    again.restore(journal.cards(), journal.hold_id_next());
    for c in 1..=CARDS {
        assert_eq!(again.snapshot(&key(c)).unwrap().0, engine.snapshot(&key(c)).unwrap().0, "seed {seed}: card {c}");
    }
}

#[test]
fn engine_agrees_with_the_reference_model() {
    let sequences: u64 = std::env::var("GIFTD_MODEL_SEQUENCES").ok().and_then(|v| v.parse().ok()).unwrap_or(3_000);
    let first: u64 = std::env::var("GIFTD_MODEL_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let mut seen = HashMap::new();
    for seed in first..first + sequences {
        run_sequence(seed, &mut seen);
    }
    // The sequences must reach every answer these operations can give, or agreeing proves little.
    use ResultCode::*;
    let expected = [
        Approved,
        IdempotencyMismatch,
        OriginalReversed,
        HoldNotFound,
        OriginalNotFound,
        CardSuspended,
        NotSuspended,
        CurrencyMismatch,
        CaptureExceedsHold,
        RefundReferenceRequired,
        NotReversible,
        OriginalCardMismatch,
        AlreadyReversed,
        ReversalWindowPassed,
        VoidWindowPassed,
        RefundExceedsOriginal,
        TooManyHolds,
        InsufficientFunds,
        NotEligible,
        CardClosed,
        HoldsOpen,
        TransferTargetNotActive,
        CardPinLocked,
        PinNotSet,
        PinIncorrect,
        NotPinLocked,
        LoadBelowMinimum,
        LoadAboveMaximum,
        DailyLoadLimitExceeded,
    ];
    if sequences >= 1_000 {
        for code in expected {
            assert!(seen.get(&code).copied().unwrap_or(0) > 0, "no sequence reached {code:?}: {seen:?}");
        }
    }
}
