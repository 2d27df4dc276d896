//! The shared vocabulary of giftd: words that mean the same thing in the wire format, the engine, the
//! store, metrics and giftctl. Money is integer minor units of an ISO 4217 currency, never a float.

use rust_decimal::Decimal;
use std::fmt;
use std::str::FromStr;

/// An ISO 4217 currency that giftd knows the minor-unit exponent of.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

/// Currencies and their minor-unit exponents. A currency not listed is refused (`unknown_currency`),
/// because an amount cannot be exact without knowing its exponent.
const CURRENCIES: &[(&[u8; 3], u32)] = &[
    (b"AUD", 2),
    (b"BHD", 3),
    (b"BRL", 2),
    (b"CAD", 2),
    (b"CHF", 2),
    (b"CLP", 0),
    (b"CNY", 2),
    (b"CZK", 2),
    (b"DKK", 2),
    (b"EUR", 2),
    (b"GBP", 2),
    (b"HKD", 2),
    (b"HUF", 2),
    (b"INR", 2),
    (b"ISK", 0),
    (b"JOD", 3),
    (b"JPY", 0),
    (b"KRW", 0),
    (b"KWD", 3),
    (b"MXN", 2),
    (b"NOK", 2),
    (b"NZD", 2),
    (b"OMR", 3),
    (b"PLN", 2),
    (b"SEK", 2),
    (b"SGD", 2),
    (b"TND", 3),
    (b"USD", 2),
    (b"VND", 0),
    (b"ZAR", 2),
];

impl Currency {
    /// Accepts only known codes, so every `Currency` value has an exponent.
    pub fn from_code(code: [u8; 3]) -> Option<Currency> {
        CURRENCIES.iter().any(|(c, _)| **c == code).then_some(Currency(code))
    }

    pub fn parse(s: &str) -> Option<Currency> {
        let b = s.as_bytes();
        if b.len() != 3 {
            return None;
        }
        Currency::from_code([b[0], b[1], b[2]])
    }

    pub fn code(self) -> [u8; 3] {
        self.0
    }

    pub fn as_str(&self) -> &str {
        // Only known (ASCII) codes are ever constructed.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }

    /// Digits after the decimal point: 2 for USD, 0 for JPY, 3 for KWD.
    pub fn exponent(self) -> u32 {
        CURRENCIES.iter().find(|(c, _)| **c == self.0).map(|(_, e)| *e).unwrap_or(2)
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An amount in minor units of a currency (cents for USD).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Money {
    pub currency: Currency,
    pub minor: i64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AmountError {
    #[error("not a decimal amount")]
    NotDecimal,
    #[error("{currency} has {exponent} decimal places")]
    TooPrecise { currency: Currency, exponent: u32 },
    #[error("amount out of range")]
    OutOfRange,
    #[error("amount must not be negative")]
    Negative,
}

/// Parses "100.00" in `currency` into minor units, exactly. "1.005" USD is refused, not rounded.
pub fn parse_amount(s: &str, currency: Currency) -> Result<i64, AmountError> {
    let d = Decimal::from_str(s.trim()).map_err(|_| AmountError::NotDecimal)?;
    if d.is_sign_negative() && !d.is_zero() {
        return Err(AmountError::Negative);
    }
    let exponent = currency.exponent();
    let d = d.normalize();
    if d.scale() > exponent {
        return Err(AmountError::TooPrecise { currency, exponent });
    }
    let scaled = d.checked_mul(Decimal::from(10i64.pow(exponent))).ok_or(AmountError::OutOfRange)?;
    i64::try_from(scaled).map_err(|_| AmountError::OutOfRange)
}

/// Formats minor units as a decimal string with the currency's exponent: 10000 USD → "100.00".
pub fn format_amount(minor: i64, currency: Currency) -> String {
    Decimal::new(minor, currency.exponent()).to_string()
}

/// A card's status as callers see it. `Expired` is derived from the expiry time, never stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    Inactive = 0,
    Active = 1,
    Suspended = 2,
    PinLocked = 3,
    Expired = 4,
    Closed = 5,
}

impl Status {
    pub const ALL: [Status; 6] =
        [Status::Inactive, Status::Active, Status::Suspended, Status::PinLocked, Status::Expired, Status::Closed];

    pub fn from_u8(v: u8) -> Option<Status> {
        Some(match v {
            0 => Status::Inactive,
            1 => Status::Active,
            2 => Status::Suspended,
            3 => Status::PinLocked,
            4 => Status::Expired,
            5 => Status::Closed,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Status::Inactive => "inactive",
            Status::Active => "active",
            Status::Suspended => "suspended",
            Status::PinLocked => "pin_locked",
            Status::Expired => "expired",
            Status::Closed => "closed",
        }
    }
}

/// Why a card is suspended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum LockReason {
    None = 0,
    Fraud = 1,
    Lost = 2,
    Stolen = 3,
    CustomerRequest = 4,
    System = 5,
}

impl LockReason {
    pub const ALL: [LockReason; 5] =
        [LockReason::Fraud, LockReason::Lost, LockReason::Stolen, LockReason::CustomerRequest, LockReason::System];

    pub fn from_u8(v: u8) -> Option<LockReason> {
        Some(match v {
            0 => LockReason::None,
            1 => LockReason::Fraud,
            2 => LockReason::Lost,
            3 => LockReason::Stolen,
            4 => LockReason::CustomerRequest,
            5 => LockReason::System,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            LockReason::None => "none",
            LockReason::Fraud => "fraud",
            LockReason::Lost => "lost",
            LockReason::Stolen => "stolen",
            LockReason::CustomerRequest => "customer_request",
            LockReason::System => "system",
        }
    }

    pub fn parse(s: &str) -> Option<LockReason> {
        LockReason::ALL.into_iter().find(|r| r.name() == s)
    }
}

/// What a history entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TxnKind {
    Issue = 1,
    Activate = 2,
    Redeem = 3,
    Reload = 4,
    Lock = 5,
    Unlock = 6,
    /// A hold opened; the amount is what it holds.
    Authorize = 7,
    /// A hold captured; the amount is the (negative) change of balance. The rest is released.
    Capture = 8,
    /// A hold released by its holder; the amount is what it held.
    Void = 9,
    /// A hold released at its deadline, by giftd itself; the amount is what it held.
    HoldExpired = 10,
    /// Money credited back for an earlier spend (or, where the program allows, for none).
    Refund = 11,
    /// An earlier mutation undone; the amount is the change of balance (0 for a released hold).
    Reversal = 12,
    /// The remaining balance paid out (negative); the card is closed.
    CashOut = 13,
    /// Member id or VIP flag set.
    Register = 14,
    /// The whole balance moved to another card (negative); the card is closed.
    TransferOut = 15,
    /// A balance moved in from another card.
    TransferIn = 16,
    /// An internal note appended (its text is in the card's notes).
    Note = 17,
    /// An expired or suspended card made usable again under its program's policy.
    Reactivate = 18,
    /// A PIN set (or replaced) by the back office.
    PinSet = 19,
    /// A wrong PIN, counted towards the lock (the entry that reaches the limit locks the card).
    PinFailed = 20,
    /// A PIN checked and found right.
    PinVerified = 21,
    /// A PIN lock lifted by the back office.
    PinReset = 22,
}

impl TxnKind {
    pub fn from_u8(v: u8) -> Option<TxnKind> {
        Some(match v {
            1 => TxnKind::Issue,
            2 => TxnKind::Activate,
            3 => TxnKind::Redeem,
            4 => TxnKind::Reload,
            5 => TxnKind::Lock,
            6 => TxnKind::Unlock,
            7 => TxnKind::Authorize,
            8 => TxnKind::Capture,
            9 => TxnKind::Void,
            10 => TxnKind::HoldExpired,
            11 => TxnKind::Refund,
            12 => TxnKind::Reversal,
            13 => TxnKind::CashOut,
            14 => TxnKind::Register,
            15 => TxnKind::TransferOut,
            16 => TxnKind::TransferIn,
            17 => TxnKind::Note,
            18 => TxnKind::Reactivate,
            19 => TxnKind::PinSet,
            20 => TxnKind::PinFailed,
            21 => TxnKind::PinVerified,
            22 => TxnKind::PinReset,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            TxnKind::Issue => "issue",
            TxnKind::Activate => "activate",
            TxnKind::Redeem => "redeem",
            TxnKind::Reload => "reload",
            TxnKind::Lock => "lock",
            TxnKind::Unlock => "unlock",
            TxnKind::Authorize => "authorize",
            TxnKind::Capture => "capture",
            TxnKind::Void => "void",
            TxnKind::HoldExpired => "hold_expired",
            TxnKind::Refund => "refund",
            TxnKind::Reversal => "reversal",
            TxnKind::CashOut => "cash_out",
            TxnKind::Register => "register",
            TxnKind::TransferOut => "transfer_out",
            TxnKind::TransferIn => "transfer_in",
            TxnKind::Note => "note",
            TxnKind::Reactivate => "reactivate",
            TxnKind::PinSet => "pin_set",
            TxnKind::PinFailed => "pin_failed",
            TxnKind::PinVerified => "pin_verified",
            TxnKind::PinReset => "pin_reset",
        }
    }
}

macro_rules! result_codes {
    ($($name:ident = $num:literal, $text:literal;)*) => {
        /// Result codes, numbered for the wire. A number is never reused. Engine decisions (20 and up)
        /// are declared in precedence order: when several apply, the first listed is returned. Request
        /// errors (1..=19) are found while decoding, so the first bad field in body order wins.
        /// protocol/results.md documents them in the same order.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum ResultCode { $($name = $num,)* }

        impl ResultCode {
            pub const ALL: &'static [ResultCode] = &[$(ResultCode::$name,)*];

            pub fn from_u16(v: u16) -> Option<ResultCode> {
                match v { $($num => Some(ResultCode::$name),)* _ => None }
            }

            /// The snake_case name used by giftctl's JSON and by metrics labels.
            pub fn name(self) -> &'static str {
                match self { $(ResultCode::$name => $text,)* }
            }
        }
    };
}

result_codes! {
    Approved = 0, "approved";
    // Stream and request errors: decided before the engine, never recorded, nothing changes.
    FrameTooLarge = 1, "frame_too_large";
    MalformedFrame = 2, "malformed_frame";
    UnsupportedVersion = 3, "unsupported_version";
    HandshakeRequired = 4, "handshake_required";
    UnknownOpcode = 5, "unknown_opcode";
    Unauthenticated = 14, "unauthenticated";
    Forbidden = 15, "forbidden";
    MalformedRequest = 6, "malformed_request";
    BadCardNumber = 7, "bad_card_number";
    UnknownCurrency = 8, "unknown_currency";
    BadAmount = 9, "bad_amount";
    MissingKey = 10, "missing_key";
    ShuttingDown = 11, "shutting_down";
    BadPin = 12, "bad_pin";
    RateLimited = 16, "rate_limited";
    BadProgramSettings = 13, "bad_program_settings";
    // Engine decisions, in the order the engine checks them.
    IdempotencyMismatch = 20, "idempotency_mismatch";
    OriginalReversed = 44, "original_reversed";
    CardNotFound = 21, "card_not_found";
    TransferTargetNotFound = 50, "transfer_target_not_found";
    HoldNotFound = 36, "hold_not_found";
    OriginalNotFound = 39, "original_not_found";
    CardExists = 22, "card_exists";
    UnknownProgram = 23, "unknown_program";
    JobNotFound = 63, "job_not_found";
    JobChunkMismatch = 65, "job_chunk_mismatch";
    BadCheckDigit = 57, "bad_check_digit";
    CardClosed = 24, "card_closed";
    CardSuspended = 25, "card_suspended";
    CardPinLocked = 26, "card_pin_locked";
    CardExpired = 27, "card_expired";
    CardInactive = 28, "card_inactive";
    AlreadyActive = 29, "already_active";
    NotSuspended = 30, "not_suspended";
    NotPinLocked = 61, "not_pin_locked";
    NotEligible = 53, "not_eligible";
    TransferTargetNotActive = 51, "transfer_target_not_active";
    PinRequired = 58, "pin_required";
    PinNotSet = 59, "pin_not_set";
    PinIncorrect = 60, "pin_incorrect";
    CurrencyMismatch = 31, "currency_mismatch";
    ProgramMismatch = 52, "program_mismatch";
    CaptureExceedsHold = 37, "capture_exceeds_hold";
    RefundReferenceRequired = 45, "refund_reference_required";
    NotReversible = 40, "not_reversible";
    OriginalCardMismatch = 46, "original_card_mismatch";
    AlreadyReversed = 41, "already_reversed";
    ReversalWindowPassed = 43, "reversal_window_passed";
    CardUsed = 62, "card_used";
    VoidWindowPassed = 47, "void_window_passed";
    RefundExceedsOriginal = 42, "refund_exceeds_original";
    InvoiceRequired = 32, "invoice_required";
    InvoiceReused = 33, "invoice_reused";
    HoldsOpen = 48, "holds_open";
    CashOutAboveLimit = 49, "cash_out_above_limit";
    LoadBelowMinimum = 54, "load_below_minimum";
    LoadAboveMaximum = 55, "load_above_maximum";
    DailyLoadLimitExceeded = 56, "daily_load_limit_exceeded";
    MaxBalanceExceeded = 34, "max_balance_exceeded";
    TooManyHolds = 38, "too_many_holds";
    InsufficientFunds = 35, "insufficient_funds";
    BatchAborted = 64, "batch_aborted";
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd() -> Currency {
        Currency::parse("USD").unwrap()
    }

    #[test]
    fn amounts_parse_exactly() {
        let jpy = Currency::parse("JPY").unwrap();
        let kwd = Currency::parse("KWD").unwrap();
        let cases: &[(&str, Currency, Result<i64, AmountError>)] = &[
            ("100.00", usd(), Ok(10_000)),
            ("1", usd(), Ok(100)),
            ("0.1", usd(), Ok(10)),
            ("1.005", usd(), Err(AmountError::TooPrecise { currency: usd(), exponent: 2 })),
            ("1.50", jpy, Err(AmountError::TooPrecise { currency: jpy, exponent: 0 })),
            ("1.00", jpy, Ok(1)),
            ("1.234", kwd, Ok(1234)),
            ("-1", usd(), Err(AmountError::Negative)),
            ("abc", usd(), Err(AmountError::NotDecimal)),
            ("99999999999999999999", usd(), Err(AmountError::OutOfRange)),
        ];
        for (s, c, want) in cases {
            assert_eq!(&parse_amount(s, *c), want, "{s} {c}");
        }
    }

    #[test]
    fn amounts_format_with_exponent() {
        assert_eq!(format_amount(10_000, usd()), "100.00");
        assert_eq!(format_amount(5, usd()), "0.05");
        assert_eq!(format_amount(7, Currency::parse("JPY").unwrap()), "7");
    }

    #[test]
    fn result_codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for &c in ResultCode::ALL {
            assert!(seen.insert(c as u16), "{c:?} reuses a number");
            assert_eq!(ResultCode::from_u16(c as u16), Some(c));
        }
    }

    #[test]
    fn unknown_currency_is_refused() {
        assert_eq!(Currency::parse("XXX"), None);
        assert_eq!(Currency::parse("usd"), None);
        assert_eq!(Currency::parse("US"), None);
    }
}

/// What callers see of a card in a reply. `available` is derived: balance − held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CardView {
    pub last4: [u8; 4],
    pub status: Status,
    pub reason: LockReason,
    pub currency: Currency,
    pub balance_minor: i64,
    pub held_minor: i64,
    pub expiry_ms: Option<i64>,
}

impl CardView {
    pub fn available_minor(&self) -> i64 {
        (self.balance_minor - self.held_minor).max(0)
    }
}

/// A hold (pre-authorization) as callers see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldView {
    /// Unique across all cards and never reused; capture and void name the hold by it.
    pub id: u64,
    pub amount_minor: i64,
    /// When giftd releases the hold by itself (ms since the Unix epoch).
    pub expires_ms: i64,
}

/// The result of a card operation (issue, activate, balance, redeem, reload, lock, unlock, and the
/// hold operations). A retry with the same idempotency key gets this value again, so its encoding
/// is the same byte for byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub result: ResultCode,
    /// The amount that moved: approved for a redeem (partial approvals included), loaded for a
    /// reload or activation, the initial value for an issue, held for an authorization, captured
    /// for a capture, released for a void, 0 otherwise.
    pub approved_minor: i64,
    pub card: Option<CardView>,
    /// The hold an approved authorization opened (its reply carries it).
    pub hold: Option<HoldView>,
}

/// Hours, rounded down, for the sentences support reads.
pub fn hours(ms: i64) -> i64 {
    ms / 3_600_000
}

impl Outcome {
    pub fn declined(result: ResultCode, card: Option<CardView>) -> Outcome {
        Outcome { result, approved_minor: 0, card, hold: None }
    }

    pub fn approved(approved_minor: i64, card: CardView) -> Outcome {
        Outcome { result: ResultCode::Approved, approved_minor, card: Some(card), hold: None }
    }
}

/// One card's share of a multi-card answer (split redeem, reversal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartView {
    pub last4: [u8; 4],
    /// Signed change of that card's balance (0 when only a hold was released).
    pub amount_minor: i64,
    pub balance_after_minor: i64,
}

/// The per-card amounts of a multi-card answer, all in one currency.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parts {
    pub currency: Currency,
    pub items: Vec<PartView>,
}

/// An internal note on a card, as callers see it. Notes are append-only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoteView {
    pub at_ms: i64,
    /// Who wrote it: the request's merchant (operator) id, or `giftd` for notes giftd appends.
    pub author: String,
    pub text: String,
}

/// One history entry as callers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnView {
    pub seq: u64,
    pub kind: TxnKind,
    /// Signed: negative for money leaving the card.
    pub amount_minor: i64,
    pub balance_after_minor: i64,
    pub at_ms: i64,
    pub merchant: String,
}
