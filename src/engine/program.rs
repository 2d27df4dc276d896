//! Programs: the brand or reseller scheme a card belongs to, and the rules it sets.

use crate::model::Currency;
use arc_swap::ArcSwap;
use rust_decimal::Decimal;
use std::collections::HashMap;
use std::sync::Arc;

pub const DEFAULT_PROGRAM: &str = "default";
/// A hold lasts 7 days unless its authorization or its program says otherwise.
pub const HOLD_TTL_DEFAULT_SECS: u64 = 7 * 86_400;
/// The longest a program lets a hold last unless configured otherwise: 30 days.
pub const HOLD_TTL_MAX_SECS: u64 = 30 * 86_400;
/// A hold may be voided as long as it may last (30 days) unless its program sets a shorter window.
pub const VOID_WINDOW_SECS: u64 = HOLD_TTL_MAX_SECS;
/// An expired card is reactivated without VIP status up to 24 hours after it expired ...
pub const REACTIVATION_GRACE_SECS: u64 = 86_400;
/// ... and reactivation gives it 7 more days.
pub const REACTIVATION_EXTENSION_SECS: u64 = 7 * 86_400;
/// A mutation may be reversed for 24 hours unless its program says otherwise.
pub const REVERSAL_WINDOW_SECS: u64 = 86_400;
/// No program may let a hold outlive a year: held money must come back to the cardholder.
pub const HOLD_TTL_CEILING_SECS: u64 = 366 * 86_400;
/// Consecutive wrong PINs that lock a card unless its program says otherwise.
pub const PIN_TRIES_DEFAULT: u8 = 3;
/// Generated card numbers start with this unless the program names its own prefix.
pub const NUMBER_PREFIX_DEFAULT: &str = "60";
/// Generated card numbers have this many digits (check digit included) unless the program says.
pub const NUMBER_LENGTH_DEFAULT: u8 = 16;
/// A generated number keeps at least this many random digits, so numbers cannot be guessed from
/// one another: 10^9 possibilities per prefix at the least.
pub const NUMBER_RANDOM_DIGITS_MIN: usize = 9;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Program {
    pub name: Arc<str>,
    /// Every spend must carry a POS invoice number, used once per merchant.
    pub invoice_required: bool,
    /// Largest balance a card may reach, in the card's currency.
    pub max_balance: Option<Decimal>,
    /// A hold's TTL when its authorization names none.
    pub hold_ttl_default_ms: i64,
    /// The longest TTL a hold gets; a longer request is cut to this (the reply shows the deadline).
    pub hold_ttl_max_ms: i64,
    /// How long after a mutation its reversal is accepted.
    pub reversal_window_ms: i64,
    /// How long after an authorization its hold may be voided.
    pub void_window_ms: i64,
    /// Whether a refund may name no original spend (off: every refund must reference one).
    pub unreferenced_refunds: bool,
    /// Cash-out is allowed only for balances up to this (None: any balance).
    pub cash_out_max: Option<Decimal>,
    /// Whether a VIP card is reactivated whatever its expiry (and lifted from a suspension other
    /// than fraud).
    pub reactivation_vip_eligible: bool,
    /// How long after expiry a card that is not VIP may still be reactivated.
    pub reactivation_grace_ms: i64,
    /// A reactivated card's new expiry is this long from the reactivation.
    pub reactivation_extension_ms: i64,
    /// The one currency the program's cards are issued in (None: any).
    pub currency: Option<Currency>,
    /// Smallest and largest single load (issue value above 0, activation load, reload).
    pub load_min: Option<Decimal>,
    pub load_max: Option<Decimal>,
    /// Most one card may be loaded with in one UTC day, all loads together.
    pub daily_load_max: Option<Decimal>,
    /// A card issued with no expiry expires this long after its issue (None: never).
    pub expiry_default_ms: Option<i64>,
    /// Every redeem and authorization must carry the card's PIN.
    pub pin_required: bool,
    /// Consecutive wrong PINs that lock the card (`pin_locked`).
    pub pin_tries_max: u8,
    /// Supplied card numbers must carry a valid Luhn check digit.
    pub luhn_required: bool,
    /// Generated numbers: these leading digits, then random digits, then a Luhn check digit,
    /// `number_length` digits in all.
    pub number_prefix: Box<str>,
    pub number_length: u8,
}

impl Program {
    pub fn new(name: &str) -> Program {
        Program {
            name: name.into(),
            invoice_required: false,
            max_balance: None,
            hold_ttl_default_ms: HOLD_TTL_DEFAULT_SECS as i64 * 1000,
            hold_ttl_max_ms: HOLD_TTL_MAX_SECS as i64 * 1000,
            reversal_window_ms: REVERSAL_WINDOW_SECS as i64 * 1000,
            void_window_ms: VOID_WINDOW_SECS as i64 * 1000,
            unreferenced_refunds: false,
            cash_out_max: None,
            reactivation_vip_eligible: true,
            reactivation_grace_ms: REACTIVATION_GRACE_SECS as i64 * 1000,
            reactivation_extension_ms: REACTIVATION_EXTENSION_SECS as i64 * 1000,
            currency: None,
            load_min: None,
            load_max: None,
            daily_load_max: None,
            expiry_default_ms: None,
            pin_required: false,
            pin_tries_max: PIN_TRIES_DEFAULT,
            luhn_required: false,
            number_prefix: NUMBER_PREFIX_DEFAULT.into(),
            number_length: NUMBER_LENGTH_DEFAULT,
        }
    }

    /// The deadline of a hold opened at `now_ms` that asked for `ttl_ms` (None: the default).
    pub fn hold_deadline_ms(&self, now_ms: i64, ttl_ms: Option<i64>) -> i64 {
        now_ms.saturating_add(ttl_ms.unwrap_or(self.hold_ttl_default_ms).clamp(1, self.hold_ttl_max_ms))
    }

    /// `max_balance` in minor units of `currency`; a limit finer than the currency rounds down, and
    /// one too large to represent is no limit at all (config validation keeps it far below that).
    pub fn max_balance_minor(&self, currency: Currency) -> Option<i64> {
        self.max_balance.map(|d| minor_of(d, currency))
    }

    /// `cash_out_max` in minor units of `currency`, rounded down like `max_balance`.
    pub fn cash_out_max_minor(&self, currency: Currency) -> Option<i64> {
        self.cash_out_max.map(|d| minor_of(d, currency))
    }

    /// The single-load bounds in minor units of `currency` (a minimum finer than the currency
    /// rounds down too: the limit is never stricter than configured).
    pub fn load_bounds_minor(&self, currency: Currency) -> (Option<i64>, Option<i64>) {
        (self.load_min.map(|d| minor_of(d, currency)), self.load_max.map(|d| minor_of(d, currency)))
    }

    pub fn daily_load_max_minor(&self, currency: Currency) -> Option<i64> {
        self.daily_load_max.map(|d| minor_of(d, currency))
    }
}

/// The UTC day (days since the Unix epoch) of a time: daily load limits count per such day.
pub fn utc_day(now_ms: i64) -> i64 {
    now_ms.div_euclid(86_400_000)
}

/// The program table. Each program sits in a slot that an admin update swaps atomically: cards
/// hold their program's slot, so an update reaches every card at once without a lookup per
/// decision.
pub type ProgramSlot = Arc<ArcSwap<Program>>;

fn minor_of(d: Decimal, currency: Currency) -> i64 {
    d.checked_mul(Decimal::from(10i64.pow(currency.exponent())))
        .and_then(|scaled| i64::try_from(scaled.trunc()).ok())
        .unwrap_or(i64::MAX)
}

/// The programs giftd starts with. `default` always exists.
#[derive(Clone, Debug)]
pub struct Programs {
    map: HashMap<Arc<str>, Arc<Program>>,
}

impl Programs {
    pub fn new(programs: impl IntoIterator<Item = Program>) -> Programs {
        let mut map: HashMap<Arc<str>, Arc<Program>> =
            programs.into_iter().map(|p| (p.name.clone(), Arc::new(p))).collect();
        map.entry(DEFAULT_PROGRAM.into()).or_insert_with(|| Arc::new(Program::new(DEFAULT_PROGRAM)));
        Programs { map }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Program>> {
        self.map.get(name)
    }

    pub fn into_slots(self) -> HashMap<Arc<str>, ProgramSlot> {
        self.map.into_iter().map(|(k, v)| (k, Arc::new(ArcSwap::new(v)))).collect()
    }
}

impl Default for Programs {
    fn default() -> Programs {
        Programs::new([])
    }
}
