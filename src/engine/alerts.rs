//! Security alert rules: thresholds on what decisions just did, counted in fixed windows in memory,
//! checked after each fresh decision (never on a replay). A rule fires exactly when its count
//! reaches the threshold, once per window, so a burst raises one alert, not one per request.
//!
//! Counting is cheap (a map entry per card or merchant seen in the current window) and the maps are
//! bounded: past `WATCHED_MAX` keys, old windows are dropped first, and if the map is still full a
//! new key is not counted. The counts are not durable: a restart starts every window afresh. The
//! wrong-PIN rule needs no window: the card's own durable counter of consecutive failures is used.

use crate::card_number::{CardKey, CardKeyState};
use crate::model::Currency;
use dashmap::DashMap;
use std::collections::BTreeMap;

/// Keys (cards, merchants) one rule counts at most at a time.
const WATCHED_MAX: usize = 100_000;
const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;

/// The rules, by the name alerts and metrics carry. The set is closed: a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    /// Consecutive wrong PINs on one card.
    PinFailures = 1,
    /// Mutations naming an unknown card, from one merchant, in a minute: someone guessing numbers.
    Enumeration = 2,
    /// Approved redemptions on one card in a minute.
    Velocity = 3,
    /// One approved amount above the currency's threshold.
    LargeAmount = 4,
    /// Approved reversals by one merchant in an hour.
    Reversals = 5,
}

impl Rule {
    pub const ALL: [Rule; 5] =
        [Rule::PinFailures, Rule::Enumeration, Rule::Velocity, Rule::LargeAmount, Rule::Reversals];

    pub fn name(self) -> &'static str {
        match self {
            Rule::PinFailures => "pin_failures",
            Rule::Enumeration => "enumeration",
            Rule::Velocity => "velocity",
            Rule::LargeAmount => "large_amount",
            Rule::Reversals => "reversals",
        }
    }

    pub fn from_u8(v: u8) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| *r as u8 == v)
    }

    /// Whether the rule is about one card (and so may suspend it).
    pub fn card_scoped(self) -> bool {
        matches!(self, Rule::PinFailures | Rule::Velocity | Rule::LargeAmount)
    }
}

/// A count threshold; `suspend` also suspends the card (reason: fraud) for card rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threshold {
    pub count: u32,
    pub suspend: bool,
}

/// The configured rules; `None` turns a rule off.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AlertRules {
    pub pin_failures: Option<Threshold>,
    pub enumeration_per_minute: Option<u32>,
    pub velocity_per_minute: Option<Threshold>,
    /// Per currency: an approved amount above this many minor units fires.
    pub large_amount_minor: BTreeMap<Currency, i64>,
    pub large_amount_suspend: bool,
    pub reversals_per_hour: Option<u32>,
}

/// A fired rule, as recorded durably and logged. It names the card by its last 4 digits only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertRecord {
    pub rule: Rule,
    pub at_ms: i64,
    /// The card's last 4 digits (zeros for rules about a merchant).
    pub last4: [u8; 4],
    pub merchant: Box<str>,
    /// What reached the threshold: a count, or the amount in minor units (large_amount).
    pub observed: i64,
    pub threshold: i64,
    /// The amount's currency, for large_amount.
    pub currency: Option<Currency>,
    /// The rule suspended the card.
    pub suspended: bool,
}

/// What one fresh decision did, as the rules see it.
pub struct Observed<'a> {
    pub merchant: &'a str,
    pub card: Option<CardKey>,
    pub card_not_found: bool,
    /// An approved redemption (velocity counts these).
    pub redeemed: bool,
    pub reversed: bool,
    /// The approved amount and its currency, for money-moving approvals.
    pub amount: Option<(Currency, i64)>,
    /// The card's consecutive wrong PINs after a decision that counted one.
    pub pin_failures: Option<u8>,
}

/// A count in a fixed window: (window start, count).
type Window = (i64, u32);

/// Counts in their current windows.
#[derive(Default)]
pub struct Watcher {
    velocity: DashMap<CardKey, Window, CardKeyState>,
    enumeration: DashMap<Box<str>, Window>,
    reversals: DashMap<Box<str>, Window>,
}

/// Adds one to `key`'s count in the window of `len_ms` holding `now_ms`; returns the new count, or
/// `None` when the map is full of current windows and `key` is new.
fn count<K: Eq + std::hash::Hash + Clone, S: std::hash::BuildHasher + Clone>(
    map: &DashMap<K, Window, S>,
    key: &K,
    now_ms: i64,
    len_ms: i64,
) -> Option<u32> {
    let start = now_ms - now_ms.rem_euclid(len_ms);
    if let Some(mut w) = map.get_mut(key) {
        if w.0 != start {
            *w = (start, 0);
        }
        w.1 += 1;
        return Some(w.1);
    }
    if map.len() >= WATCHED_MAX {
        map.retain(|_, w| w.0 == start);
        if map.len() >= WATCHED_MAX {
            return None;
        }
    }
    let mut w = map.entry(key.clone()).or_insert((start, 0));
    if w.0 != start {
        *w = (start, 0);
    }
    w.1 += 1;
    Some(w.1)
}

impl Watcher {
    /// The rules that fire on this decision, without `suspended` set (the engine suspends).
    pub fn observe(&self, rules: &AlertRules, o: &Observed<'_>, last4: [u8; 4], now_ms: i64) -> Vec<AlertRecord> {
        let mut fired = Vec::new();
        let mut fire = |rule: Rule, observed: i64, threshold: i64, currency: Option<Currency>| {
            let last4 = if rule.card_scoped() { last4 } else { [b'0'; 4] };
            fired.push(AlertRecord {
                rule,
                at_ms: now_ms,
                last4,
                merchant: o.merchant.into(),
                observed,
                threshold,
                currency,
                suspended: false,
            });
        };
        if let (Some(t), Some(n)) = (rules.pin_failures, o.pin_failures) {
            if n as u32 == t.count {
                fire(Rule::PinFailures, n as i64, t.count as i64, None);
            }
        }
        if let (Some(t), true, Some(card)) = (rules.velocity_per_minute, o.redeemed, o.card) {
            if count(&self.velocity, &card, now_ms, MINUTE_MS) == Some(t.count) {
                fire(Rule::Velocity, t.count as i64, t.count as i64, None);
            }
        }
        if let Some((currency, amount)) = o.amount {
            if let Some(limit) = rules.large_amount_minor.get(&currency) {
                if amount > *limit {
                    fire(Rule::LargeAmount, amount, *limit, Some(currency));
                }
            }
        }
        if let (Some(n), true) = (rules.enumeration_per_minute, o.card_not_found) {
            if count(&self.enumeration, &Box::<str>::from(o.merchant), now_ms, MINUTE_MS) == Some(n) {
                fire(Rule::Enumeration, n as i64, n as i64, None);
            }
        }
        if let (Some(n), true) = (rules.reversals_per_hour, o.reversed) {
            if count(&self.reversals, &Box::<str>::from(o.merchant), now_ms, HOUR_MS) == Some(n) {
                fire(Rule::Reversals, n as i64, n as i64, None);
            }
        }
        fired
    }

    /// Whether the rule that fired asks for the card to be suspended.
    pub fn suspends(rules: &AlertRules, rule: Rule) -> bool {
        match rule {
            Rule::PinFailures => rules.pin_failures.is_some_and(|t| t.suspend),
            Rule::Velocity => rules.velocity_per_minute.is_some_and(|t| t.suspend),
            Rule::LargeAmount => rules.large_amount_suspend,
            Rule::Enumeration | Rule::Reversals => false,
        }
    }

    /// Drops counts of windows that have ended (called with the idempotency sweep).
    pub fn sweep(&self, now_ms: i64) {
        self.velocity.retain(|_, w| now_ms - w.0 < MINUTE_MS);
        self.enumeration.retain(|_, w| now_ms - w.0 < MINUTE_MS);
        self.reversals.retain(|_, w| now_ms - w.0 < HOUR_MS);
    }
}
