//! Security alert rules: thresholds on what decisions did, counted over sliding windows in memory.
//! The card rules and the reversal rule are checked while the decision is made, under its card
//! locks, so a fired alert (and the card's suspension) is appended with the decision, in one write
//! (see `Engine::screen`). The enumeration rule counts unknown cards per client, over reads and
//! mutations alike, once their answers are known (`Engine::unknown_cards`). Replays are never
//! counted by the card rules: they decide nothing.
//!
//! A rule fires when its count over the last window (a minute, or an hour) reaches its threshold,
//! once: a burst raises one alert, and the rule fires again for that key only after the count has
//! fallen under the threshold and reached it again. Each key keeps the times of at most its
//! threshold's count of events, in maps of two generations (at most `EVENTS_MAX` times per rule):
//! a key seen again moves to the current generation, and once that holds half the keys allowed,
//! the previous one is forgotten and the current one takes its place. So a flood of distinct
//! keys costs bounded memory, the newest keys are always counted, and only a key not seen while
//! half the bound of others came is forgotten. The counts are not durable: a restart starts every
//! window afresh. The wrong-PIN rule needs no window: the card's own durable count of consecutive failures
//! is used.

use crate::card_number::{CardKey, CardKeyState};
use crate::model::{Currency, TxnKind};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::sync::Mutex;

/// Keys (cards, clients, merchants) one rule counts at most at a time. The velocity rule counts
/// every card redeemed within its minute: with fewer keys than that, cards are forgotten before
/// their minute is out (their redemptions go uncounted) and keys move between generations at every
/// event, which cost a batch of 8,192 redeems over 65,536 cards 9 % of its CPU with 100,000 keys.
/// At the default threshold (20) the event bound below allows 500,000.
const KEYS_MAX: usize = 1_000_000;
/// Event times one rule keeps at most (keys × threshold): bounds them to about 80 MB, and with
/// the keys themselves (about 100 bytes each) a rule to about 180 MB.
const EVENTS_MAX: usize = 10_000_000;
/// The largest threshold a count rule accepts (the configuration checks it).
pub const COUNT_MAX: u32 = 10_000;
const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;

/// The rules, by the name alerts and metrics carry. The set is closed: a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    /// Consecutive wrong PINs on one card.
    PinFailures = 1,
    /// Requests naming an unknown card, from one client, in a minute: someone guessing numbers.
    Enumeration = 2,
    /// Approved redemptions (redeems, captures, split and batch parts) on one card in a minute.
    Velocity = 3,
    /// One approved amount on one card above the currency's threshold.
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

impl AlertRules {
    /// Whether the rule that fired asks for the card to be suspended.
    pub fn suspends(&self, rule: Rule) -> bool {
        match rule {
            Rule::PinFailures => self.pin_failures.is_some_and(|t| t.suspend),
            Rule::Velocity => self.velocity_per_minute.is_some_and(|t| t.suspend),
            Rule::LargeAmount => self.large_amount_suspend,
            Rule::Enumeration | Rule::Reversals => false,
        }
    }
}

/// A fired rule, as recorded durably and logged. It names the card by its last 4 digits only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertRecord {
    pub rule: Rule,
    pub at_ms: i64,
    /// The card's last 4 digits (zeros for rules about a merchant or a client).
    pub last4: [u8; 4],
    /// The merchant id of the request that fired the rule (empty for a read, which names none).
    pub merchant: Box<str>,
    /// The client the enumeration rule counted: its configured name, or its address when giftd
    /// lists no clients. Empty for the other rules, which count by card or merchant.
    pub client: Box<str>,
    /// What reached the threshold: a count, or the amount in minor units (large_amount).
    pub observed: i64,
    pub threshold: i64,
    /// The amount's currency, for large_amount.
    pub currency: Option<Currency>,
    /// The rule suspended the card.
    pub suspended: bool,
}

impl AlertRecord {
    fn new(rule: Rule, at_ms: i64, merchant: &str, observed: i64, threshold: i64) -> AlertRecord {
        AlertRecord {
            rule,
            at_ms,
            last4: [b'0'; 4],
            merchant: merchant.into(),
            client: "".into(),
            observed,
            threshold,
            currency: None,
            suspended: false,
        }
    }
}

/// What a decision did to one card, as the card rules see it: an approved change, or a wrong PIN
/// counted.
pub struct CardEvent {
    pub card: CardKey,
    pub last4: [u8; 4],
    pub currency: Currency,
    pub kind: TxnKind,
    /// The change's amount as its history entry has it (a debit is negative).
    pub amount_minor: i64,
    /// The card's consecutive wrong PINs after the change.
    pub pin_failures: u8,
}

impl CardEvent {
    /// A redemption, for the velocity rule: money spent from the card at a merchant.
    fn redemption(&self) -> bool {
        matches!(self.kind, TxnKind::Redeem | TxnKind::Capture)
    }

    /// The amount the large-amount rule judges: what moved in or out of the card, or what a hold
    /// reserves. Releases, reversals and status changes move no amount a customer chose.
    fn amount(&self) -> Option<i64> {
        use TxnKind::*;
        matches!(self.kind, Issue | Activate | Redeem | Reload | Authorize | Capture | Refund | CashOut | TransferOut)
            .then(|| self.amount_minor.saturating_abs())
            .filter(|a| *a > 0)
    }
}

/// The times of a key's latest events, oldest first: at most the rule's threshold of them.
type Times = VecDeque<i64>;

/// The keys a window counts, in two generations (see the module's comment). Finding a key seen in
/// the current generation is one hash lookup; a linked least-recently-used list would also move
/// it to the front (a few more cache misses per event, measured at 4 to 7 % of a batch's CPU).
struct Generations<K, S> {
    current: HashMap<K, Times, S>,
    previous: HashMap<K, Times, S>,
    /// Keys the current generation takes before it becomes the previous one.
    keys_per_generation: usize,
}

impl<K: Hash + Eq, S: BuildHasher + Clone> Generations<K, S> {
    fn times(&mut self, key: K) -> &mut Times {
        if !self.current.contains_key(&key) {
            let times = self.previous.remove(&key).unwrap_or_default();
            if self.current.len() >= self.keys_per_generation {
                let empty = HashMap::with_hasher(self.current.hasher().clone());
                self.previous = std::mem::replace(&mut self.current, empty);
            }
            return self.current.entry(key).or_insert(times);
        }
        self.current.get_mut(&key).expect("just checked")
    }
}

/// Counts per key over a sliding window.
struct Window<K: Hash + Eq, S: BuildHasher = std::collections::hash_map::RandomState> {
    len_ms: i64,
    keys: Mutex<Generations<K, S>>,
}

impl<K: Hash + Eq, S: BuildHasher + Clone> Window<K, S> {
    fn with_hasher(len_ms: i64, hasher: S) -> Self {
        let keys = Generations {
            current: HashMap::with_hasher(hasher.clone()),
            previous: HashMap::with_hasher(hasher),
            keys_per_generation: KEYS_MAX / 2,
        };
        Window { len_ms, keys: Mutex::new(keys) }
    }

    /// Adds `n` events at `now_ms` to `key`'s; returns whether they brought its count over the last
    /// window up to `threshold` (from under it).
    fn crossed(&self, key: K, n: u32, threshold: u32, now_ms: i64) -> bool {
        self.crossed_in(&mut self.keys.lock().expect("alert window lock"), key, n, threshold, now_ms)
    }

    /// [`Window::crossed`], with the window's keys already locked (`keys` is `self.keys`).
    fn crossed_in(&self, keys: &mut Generations<K, S>, key: K, n: u32, threshold: u32, now_ms: i64) -> bool {
        let times = keys.times(key);
        while times.front().is_some_and(|t| *t <= now_ms - self.len_ms) {
            times.pop_front();
        }
        let before = times.len() as u64;
        // Only the newest `threshold` times matter: make room first, so the deque never grows
        // past the threshold.
        let add = n.min(threshold) as usize;
        while times.len() + add > threshold as usize {
            times.pop_front();
        }
        times.extend(std::iter::repeat_n(now_ms, add));
        before < threshold as u64 && before + n as u64 >= threshold as u64
    }

    /// Keeps at most `EVENTS_MAX` event times under this threshold.
    fn fit(&self, threshold: Option<u32>) {
        let keys = threshold.map_or(KEYS_MAX, |t| (EVENTS_MAX / t.max(1) as usize).clamp(2, KEYS_MAX));
        self.keys.lock().expect("alert window lock").keys_per_generation = keys / 2;
    }
}

/// The rules' counts.
pub struct Watcher {
    velocity: Window<CardKey, CardKeyState>,
    enumeration: Window<Box<str>>,
    reversals: Window<Box<str>>,
}

impl Default for Watcher {
    fn default() -> Watcher {
        Watcher {
            velocity: Window::with_hasher(MINUTE_MS, CardKeyState::default()),
            enumeration: Window::with_hasher(MINUTE_MS, Default::default()),
            reversals: Window::with_hasher(HOUR_MS, Default::default()),
        }
    }
}

impl Watcher {
    /// Sizes the count maps for these rules' thresholds.
    pub fn fit(&self, rules: &AlertRules) {
        self.velocity.fit(rules.velocity_per_minute.map(|t| t.count));
        self.enumeration.fit(rules.enumeration_per_minute);
        self.reversals.fit(rules.reversals_per_hour);
    }

    /// The card rules that fire on these changes, each with its change's index, in order, without
    /// `suspended` set (the engine suspends). The velocity window is locked once for up to 256 of
    /// them: a batch's thousands of changes then take a few locks, not one each, and the cache
    /// misses of their lookups are not kept apart by a lock's barrier. The lookups were 9 to 11 %
    /// of a keyed batch's CPU; locked once for all, its CPU per item was 3.0 to 3.2 µs against 3.1
    /// to 3.6 (3 pairs).
    pub fn cards(
        &self,
        rules: &AlertRules,
        merchant: &str,
        events: &[CardEvent],
        now_ms: i64,
    ) -> Vec<(usize, AlertRecord)> {
        let mut fired = Vec::new();
        /// Redemptions counted under one hold of the lock: a batch's thousands would otherwise
        /// hold it for a millisecond or more, and every redeem alone meanwhile would wait.
        const HELD_EVENTS_MAX: usize = 256;
        // Taken at the first redemption: a decision that redeems nothing leaves the window alone.
        let (mut velocity_keys, mut held) = (None, 0);
        for (i, e) in events.iter().enumerate() {
            let card_alert = |rule, observed, threshold| AlertRecord {
                last4: e.last4,
                ..AlertRecord::new(rule, now_ms, merchant, observed, threshold)
            };
            if let Some(t) = rules.pin_failures {
                if e.kind == TxnKind::PinFailed && e.pin_failures as u32 == t.count {
                    fired.push((i, card_alert(Rule::PinFailures, e.pin_failures as i64, t.count as i64)));
                }
            }
            if let Some(t) = rules.velocity_per_minute.filter(|_| e.redemption()) {
                if held == HELD_EVENTS_MAX {
                    (velocity_keys, held) = (None, 0);
                }
                let keys = velocity_keys.get_or_insert_with(|| self.velocity.keys.lock().expect("alert window lock"));
                held += 1;
                if self.velocity.crossed_in(keys, e.card, 1, t.count, now_ms) {
                    fired.push((i, card_alert(Rule::Velocity, t.count as i64, t.count as i64)));
                }
            }
            if let (Some(amount), Some(limit)) = (e.amount(), rules.large_amount_minor.get(&e.currency)) {
                if amount > *limit {
                    let alert = card_alert(Rule::LargeAmount, amount, *limit);
                    fired.push((i, AlertRecord { currency: Some(e.currency), ..alert }));
                }
            }
        }
        fired
    }

    /// The reversal rule, on an approved reversal by `merchant`.
    pub fn reversal(&self, rules: &AlertRules, merchant: &str, now_ms: i64) -> Option<AlertRecord> {
        let n = rules.reversals_per_hour?;
        self.reversals
            .crossed(merchant.into(), 1, n, now_ms)
            .then(|| AlertRecord::new(Rule::Reversals, now_ms, merchant, n as i64, n as i64))
    }

    /// The enumeration rule, on `unknown` answers of `card_not_found` to `client`.
    pub fn unknown_cards(
        &self,
        rules: &AlertRules,
        client: &str,
        merchant: &str,
        unknown: u32,
        now_ms: i64,
    ) -> Option<AlertRecord> {
        let n = rules.enumeration_per_minute?;
        self.enumeration.crossed(client.into(), unknown, n, now_ms).then(|| AlertRecord {
            client: client.into(),
            ..AlertRecord::new(Rule::Enumeration, now_ms, merchant, n as i64, n as i64)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window() -> Window<Box<str>> {
        Window::with_hasher(MINUTE_MS, Default::default())
    }

    #[test]
    fn a_window_fires_once_as_the_count_reaches_the_threshold_and_slides() {
        let w = window();
        let at = |t: i64| w.crossed("k".into(), 1, 3, t);
        // Two events late in one minute and the third early in the next: three within 60 s.
        assert_eq!([at(50_000), at(59_000), at(61_000)], [false, false, true]);
        // Still at or over the threshold: no second alert for the same burst.
        assert!(!at(62_000));
        assert!(!at(110_000), "59, 61, 62 and 110 are within the minute: still over");
        // At 123 s, 61 and 62 have left: 110 and 123 are two, under the threshold again.
        assert!(!at(123_000));
        assert!(at(125_000), "110, 123, 125: the count reached 3 again");
    }

    /// A decision's changes are judged in order under a few holds of the window's lock: the count
    /// carries across them, and the rule fires once, at the change that reaches the threshold.
    #[test]
    fn a_batch_of_changes_fires_the_velocity_rule_once_at_its_crossing() {
        let w = Watcher::default();
        let rules =
            AlertRules { velocity_per_minute: Some(Threshold { count: 300, suspend: false }), ..Default::default() };
        let event = |card: u8, kind| CardEvent {
            card: CardKey([card; 32]),
            last4: *b"0001",
            currency: Currency::parse("USD").unwrap(),
            kind,
            amount_minor: -100,
            pin_failures: 0,
        };
        // 600 redemptions of card 1, with a reload of card 2 (not a redemption) every tenth.
        let events: Vec<CardEvent> =
            (0..600).map(|i| if i % 10 == 9 { event(2, TxnKind::Reload) } else { event(1, TxnKind::Redeem) }).collect();
        let fired: Vec<(usize, Rule)> =
            w.cards(&rules, "m1", &events, 1_000).into_iter().map(|(i, a)| (i, a.rule)).collect();
        // The 300th redemption of card 1 is change 332 (every tenth change is card 2's reload).
        assert_eq!(fired, [(332, Rule::Velocity)]);
    }

    #[test]
    fn a_window_counts_several_events_at_once_and_keys_apart() {
        let w = window();
        assert!(!w.crossed("a".into(), 4, 5, 0));
        assert!(!w.crossed("b".into(), 4, 5, 0), "another key counts on its own");
        assert!(w.crossed("a".into(), 8192, 5, 1), "a batch crossing the threshold fires once");
        assert!(w.crossed("c".into(), 5, 5, 1), "exactly the threshold at once fires");
    }

    #[test]
    fn a_full_window_forgets_the_keys_not_seen_for_a_generation_and_keeps_counting() {
        let w = window();
        w.keys.lock().unwrap().keys_per_generation = 2;
        let seen = |k: &str, t| w.crossed(k.into(), 1, 2, t);
        assert_eq!([seen("old", 0), seen("a", 0)], [false, false]);
        assert!(!seen("b", 0), "a new key is counted when the generation is full: 'old' and 'a' step back");
        assert!(seen("a", 1), "'a', seen again, comes back with its count");
        assert!(!seen("c", 1), "the current generation ('b', 'a') is full: 'old' is forgotten");
        assert!(!seen("old", 1), "'old' was forgotten: this is its first event again");
        assert!(!seen("d", 2), "the generation ('c', 'old') is full again: they step back");
        assert!(seen("c", 3), "'c' stepped back, not away: its first event still counts");
    }
}
