//! Configuration: a TOML file (every key optional, unknown keys refused), then command-line flags.
//! `giftd.example.toml` at the top of the repository documents every key with its default; a test
//! checks that it parses and equals [`Config::default`].

use crate::engine::Program;
use crate::model::Currency;
use crate::wire::AMOUNT_MINOR_MAX;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: String,
    pub metrics_listen: String,
    /// Hex of the 32-byte card-number key. When absent, `data_dir/secret.key` is used (created on
    /// first start with mode 0600).
    pub secret_hex: Option<String>,
    /// Hex of the 32-byte PIN key, separate from the card-number key. When absent,
    /// `data_dir/pin.key` is used (created on first start with mode 0600).
    pub pin_secret_hex: Option<String>,
    pub durability: DurabilityConfig,
    pub limits: Limits,
    pub alerts: AlertsConfig,
    pub programs: BTreeMap<String, ProgramConfig>,
    /// The clients that may connect (`[[clients]]`). With none, authentication is off and every
    /// connection may do everything (a development setup; giftd warns at start).
    pub clients: Vec<ClientConfig>,
}

/// One client: its name, role and key. It authenticates with `auth`, an HMAC of its connection's
/// nonce under its key, so the key itself never crosses the network.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub name: String,
    /// "operator", "processor", "merchant" or "reseller" (see `protocol/ops/auth.md`).
    pub role: String,
    /// The merchant id a merchant or reseller acts under; required for those roles, refused for
    /// the others.
    #[serde(default)]
    pub merchant: Option<String>,
    /// The client's 32-byte key as 64 hex digits, inline or (`key_file`) in a file: exactly one.
    #[serde(default)]
    pub key_hex: Option<String>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Requests a second this client may make, over all its connections together (a batch
    /// counts its items); 0: no limit. Bursts of up to one second's worth pass.
    #[serde(default)]
    pub requests_per_second: u32,
}

impl ClientConfig {
    /// The client's key, read from its file when it has one.
    pub fn key(&self) -> Result<[u8; 32], String> {
        let text = match (&self.key_hex, &self.key_file) {
            (Some(h), None) => h.clone(),
            (None, Some(path)) => {
                std::fs::read_to_string(path).map_err(|e| format!("key_file {}: {e}", path.display()))?
            }
            _ => return Err("needs exactly one of key_hex and key_file".into()),
        };
        crate::card_number::parse_secret_hex(text.trim()).ok_or_else(|| "key must be 64 hex digits".into())
    }

    fn problems(&self) -> Vec<String> {
        let mut errs = Vec::new();
        let at = format!("clients[{:?}]", self.name);
        let printable = |s: &str| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic());
        if !printable(&self.name) {
            errs.push(format!("{at}.name must be 1 to 64 printable ASCII characters without spaces"));
        }
        match crate::engine::access::Role::parse(&self.role) {
            None => errs.push(format!(
                "{at}.role must be \"operator\", \"processor\", \"merchant\" or \"reseller\", not {:?}",
                self.role
            )),
            Some(r) if r.bound_to_merchant() && !self.merchant.as_deref().is_some_and(printable) => {
                errs.push(format!("{at}.merchant is required for a {} (1 to 64 printable characters)", r.name()))
            }
            Some(r) if !r.bound_to_merchant() && self.merchant.is_some() => {
                errs.push(format!("{at}.merchant is only for merchants and resellers, not a {}", r.name()))
            }
            Some(_) => {}
        }
        if let Err(e) = self.key() {
            errs.push(format!("{at}: {e}"));
        }
        errs
    }
}

/// Security alert rules. A count of 0 turns its rule off. A rule that fires writes a durable alert,
/// logs it (card by its last 4 digits) and counts it in `giftd_alerts_total{rule}`; the card rules
/// may also suspend the card (reason: fraud).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsConfig {
    /// Consecutive wrong PINs on one card.
    pub pin_failures: u32,
    pub pin_failures_suspend: bool,
    /// Answers of `card_not_found` to one client within a minute, reads and mutations alike
    /// (enumeration).
    pub unknown_cards_per_minute: u32,
    /// Approved redemptions on one card within a minute (velocity): redeems, captures, split and
    /// batch parts.
    pub redemptions_per_card_per_minute: u32,
    pub velocity_suspend: bool,
    /// Per currency code, a decimal string: one approved amount above it fires.
    pub large_amount: BTreeMap<String, String>,
    pub large_amount_suspend: bool,
    /// Approved reversals by one merchant within an hour.
    pub reversals_per_merchant_per_hour: u32,
}

impl Default for AlertsConfig {
    fn default() -> AlertsConfig {
        AlertsConfig {
            pin_failures: 3,
            pin_failures_suspend: false,
            unknown_cards_per_minute: 30,
            redemptions_per_card_per_minute: 20,
            velocity_suspend: false,
            large_amount: BTreeMap::new(),
            large_amount_suspend: false,
            reversals_per_merchant_per_hour: 50,
        }
    }
}

impl AlertsConfig {
    fn problems(&self) -> Vec<String> {
        let mut errs = Vec::new();
        let max = crate::engine::alerts::COUNT_MAX;
        for (name, n) in [
            ("pin_failures", self.pin_failures),
            ("unknown_cards_per_minute", self.unknown_cards_per_minute),
            ("redemptions_per_card_per_minute", self.redemptions_per_card_per_minute),
            ("reversals_per_merchant_per_hour", self.reversals_per_merchant_per_hour),
        ] {
            if n > max {
                errs.push(format!("alerts.{name} must be at most {max} (0 turns the rule off), not {n}"));
            }
        }
        // A card counts at most 255 consecutive wrong PINs: a higher threshold could never fire.
        if self.pin_failures > u8::MAX as u32 {
            errs.push(format!("alerts.pin_failures must be at most 255, not {}", self.pin_failures));
        }
        for (code, amount) in &self.large_amount {
            match Currency::parse(code) {
                None => errs.push(format!("alerts.large_amount: {code:?} is not a known ISO 4217 code")),
                Some(c) => match crate::model::parse_amount(amount, c) {
                    Ok(minor) if minor > 0 => {}
                    _ => errs.push(format!(
                        "alerts.large_amount.{code} must be a positive amount in {code}, not {amount:?}"
                    )),
                },
            }
        }
        errs
    }

    /// The engine's form: counts of 0 become `None`, amounts become minor units.
    pub fn rules(&self) -> crate::engine::alerts::AlertRules {
        use crate::engine::alerts::Threshold;
        let on = |n: u32| (n > 0).then_some(n);
        crate::engine::alerts::AlertRules {
            pin_failures: on(self.pin_failures).map(|count| Threshold { count, suspend: self.pin_failures_suspend }),
            enumeration_per_minute: on(self.unknown_cards_per_minute),
            velocity_per_minute: on(self.redemptions_per_card_per_minute)
                .map(|count| Threshold { count, suspend: self.velocity_suspend }),
            large_amount_minor: self
                .large_amount
                .iter()
                .filter_map(|(code, amount)| {
                    let c = Currency::parse(code)?;
                    Some((c, crate::model::parse_amount(amount, c).ok()?))
                })
                .collect(),
            large_amount_suspend: self.large_amount_suspend,
            reversals_per_hour: on(self.reversals_per_merchant_per_hour),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DurabilityConfig {
    /// "sync" (default: fsync before every reply) or "relaxed" (fsync every `relaxed_interval_ms`).
    pub mode: String,
    pub relaxed_interval_ms: u64,
    /// How often changed cards are written to the card table. A restart loads that table and then
    /// replays the history written since, so this bounds restart time, not what survives a crash.
    pub checkpoint_interval_ms: u64,
    /// The most RocksDB's flushes and compactions write a second, in MiB; 0: no limit. Every WAL
    /// fsync waits for the table data sent before it, so this keeps background writes from
    /// lengthening the fsyncs replies wait for. It must exceed the rate decisions write history
    /// (a 1M-card activation: about 75 MB/s), or writes stall.
    pub table_write_mib_per_sec: u64,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub connections_max: usize,
    /// Requests read from one connection whose replies are not yet written; reading pauses at this.
    pub inflight_per_connection_max: usize,
    pub frame_bytes_max: usize,
    /// A batch frame (up to 8,192 operations) may be this large, request or reply.
    pub batch_frame_bytes_max: usize,
    pub idle_timeout_secs: u64,
    /// How long SIGTERM waits for in-flight requests before exiting anyway.
    pub shutdown_grace_secs: u64,
    /// How long idempotency keys and invoices stay in memory once durable; older ones are answered
    /// from the store. Memory grows with this window times the request rate (about 300 bytes a
    /// key: 2 s at 130k/s is ~80 MB), and the sweep that trims it locks each shard in turn, so it
    /// is short; its only job is to cover the moment between a request's store lookup and its
    /// claim of the key. Measured at 64×16: 2 s serves 17 % more redeems than 10 s, with half the
    /// p99.
    pub idem_memory_secs: u64,
    /// Requests a second one connection may make (a batch counts its items); 0: no limit.
    /// Bursts of up to one second's worth pass. Clients' own rates are in `[[clients]]`.
    pub requests_per_second_per_connection: u32,
    /// After SIGTERM, how long giftd answers `/readyz` 503 and keeps serving before it stops
    /// accepting and drains: the time a load balancer needs to stop sending it new work.
    pub shutdown_delay_ms: u64,
    /// When clients are configured, a connection that has not authenticated this long after it
    /// opened is closed, so unauthenticated connections cannot hold the connection slots.
    pub auth_timeout_ms: u64,
    /// While payments flow (within the last second, an admitted request other than hello, auth,
    /// subscribe and a bulk job's own), bulk job chunks change at most this many cards a second;
    /// 0: no pace. A job's chunks cost payments
    /// more than their own CPU (see `server::background`).
    pub bulk_beside_payments_cards_per_sec: u64,
}

/// One program's settings, as the config file and the `program_set` operation write them. Every
/// key is optional; absent keys take the defaults below. Limits are decimal strings in the card's
/// currency ("500.00").
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProgramConfig {
    /// ISO 4217 code: the program's cards are issued in this currency only (absent: any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    pub invoice_required: bool,
    /// A decimal string in the card's currency, e.g. "500.00".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_balance: Option<String>,
    /// Smallest and largest single load (issue value above 0, activation load, reload).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_min: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_max: Option<String>,
    /// Most one card may be loaded with in one UTC day.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_load_max: Option<String>,
    /// A card issued without an expiry expires this long after its issue (absent: never).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expiry_default_secs: Option<u64>,
    /// How long a hold lasts when the authorization names no TTL.
    pub hold_ttl_default_secs: u64,
    /// The longest TTL an authorization may ask for; a longer one is cut to this.
    pub hold_ttl_max_secs: u64,
    /// How long after a mutation a reversal of it is accepted.
    pub reversal_window_secs: u64,
    /// How long after an authorization its hold may be voided.
    pub void_window_secs: u64,
    /// Whether a refund may name no original spend.
    pub unreferenced_refunds: bool,
    /// A decimal string: cash-out is allowed only for balances up to this (absent: any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cash_out_max: Option<String>,
    /// Whether VIP cards are reactivated whatever their expiry.
    pub reactivation_vip_eligible: bool,
    /// How long after expiry a card that is not VIP may still be reactivated.
    pub reactivation_grace_secs: u64,
    /// A reactivated card expires this long after its reactivation.
    pub reactivation_extension_secs: u64,
    /// Every redeem and authorization must carry the card's PIN.
    pub pin_required: bool,
    /// Consecutive wrong PINs that lock the card.
    pub pin_tries_max: u8,
    /// Supplied card numbers must carry a valid Luhn check digit.
    pub luhn_required: bool,
    /// Generated numbers start with these digits ...
    pub number_prefix: String,
    /// ... and have this many digits, the Luhn check digit included.
    pub number_length: u8,
}

impl Default for ProgramConfig {
    fn default() -> ProgramConfig {
        ProgramConfig::from_program(&Program::new(crate::engine::program::DEFAULT_PROGRAM))
    }
}

/// A limit as the config file writes it: a decimal from 0 to 10^15.
fn limit_of(s: &str) -> Option<Decimal> {
    Decimal::from_str(s.trim()).ok().filter(|d| !d.is_sign_negative() && *d <= Decimal::from(AMOUNT_MINOR_MAX))
}

impl ProgramConfig {
    /// Settings as `program_set` carries them: the body of a TOML table (`key = value` lines).
    pub fn parse(text: &str) -> Result<ProgramConfig, String> {
        toml::from_str(text).map_err(|e| e.message().to_string())
    }

    /// The settings as TOML lines: every key, so a reader sees the defaults that apply too.
    pub fn to_text(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Every problem with program `name`'s settings, each in a sentence naming its key.
    pub fn problems(&self, name: &str) -> Vec<String> {
        let mut errs = Vec::new();
        if name.is_empty() || name.len() > crate::wire::PROGRAM_BYTES_MAX || !name.bytes().all(|b| b.is_ascii_graphic())
        {
            errs.push(format!("program name {name:?} must be 1 to 32 printable ASCII bytes"));
        }
        if let Some(c) = &self.currency {
            if Currency::parse(c).is_none() {
                errs.push(format!("programs.{name}.currency must be a known ISO 4217 code, not {c:?}"));
            }
        }
        for (key, v) in [
            ("max_balance", &self.max_balance),
            ("cash_out_max", &self.cash_out_max),
            ("load_min", &self.load_min),
            ("load_max", &self.load_max),
            ("daily_load_max", &self.daily_load_max),
        ] {
            if let Some(m) = v {
                if limit_of(m).is_none() {
                    errs.push(format!("programs.{name}.{key} must be a decimal from 0 to 10^15, not {m:?}"));
                }
            }
        }
        if let (Some(lo), Some(hi)) =
            (self.load_min.as_deref().and_then(limit_of), self.load_max.as_deref().and_then(limit_of))
        {
            if lo > hi {
                errs.push(format!("programs.{name}.load_min must not be above load_max"));
            }
        }
        let cap = crate::engine::program::HOLD_TTL_CEILING_SECS;
        if !(1..=cap).contains(&self.hold_ttl_max_secs) {
            errs.push(format!("programs.{name}.hold_ttl_max_secs must be between 1 and {cap}"));
        }
        if !(1..=cap).contains(&self.reversal_window_secs) {
            errs.push(format!("programs.{name}.reversal_window_secs must be between 1 and {cap}"));
        }
        if !(1..=cap).contains(&self.reactivation_grace_secs) || !(1..=cap).contains(&self.reactivation_extension_secs)
        {
            errs.push(format!(
                "programs.{name}.reactivation_grace_secs and _extension_secs must be between 1 and {cap}"
            ));
        }
        if !(1..=cap).contains(&self.void_window_secs) {
            errs.push(format!("programs.{name}.void_window_secs must be between 1 and {cap}"));
        }
        if !(1..=self.hold_ttl_max_secs).contains(&self.hold_ttl_default_secs) {
            errs.push(format!("programs.{name}.hold_ttl_default_secs must be between 1 and hold_ttl_max_secs"));
        }
        // A century is the longest default expiry: beyond it the figure is surely a typo.
        if self.expiry_default_secs.is_some_and(|s| !(1..=100 * 366 * 86_400).contains(&s)) {
            errs.push(format!("programs.{name}.expiry_default_secs must be between 1 and 100 years"));
        }
        if !(1..=20).contains(&self.pin_tries_max) {
            errs.push(format!("programs.{name}.pin_tries_max must be between 1 and 20"));
        }
        let len = self.number_length as usize;
        let (lo, hi) = (crate::card_number::CARD_NUMBER_DIGITS_MIN, crate::card_number::CARD_NUMBER_DIGITS_MAX);
        if !(lo..=hi).contains(&len) {
            errs.push(format!("programs.{name}.number_length must be between {lo} and {hi}"));
        }
        let random_min = crate::engine::program::NUMBER_RANDOM_DIGITS_MIN;
        if self.number_prefix.is_empty()
            || !self.number_prefix.bytes().all(|b| b.is_ascii_digit())
            || self.number_prefix.len() + random_min + 1 > len
        {
            errs.push(format!(
                "programs.{name}.number_prefix must be digits leaving at least {random_min} random digits and \
                 the check digit in number_length"
            ));
        }
        errs
    }

    /// The program these settings describe; call only once `problems` found none.
    pub fn to_program(&self, name: &str) -> Program {
        Program {
            name: name.into(),
            invoice_required: self.invoice_required,
            max_balance: self.max_balance.as_deref().and_then(limit_of),
            hold_ttl_default_ms: self.hold_ttl_default_secs as i64 * 1000,
            hold_ttl_max_ms: self.hold_ttl_max_secs as i64 * 1000,
            reversal_window_ms: self.reversal_window_secs as i64 * 1000,
            void_window_ms: self.void_window_secs as i64 * 1000,
            unreferenced_refunds: self.unreferenced_refunds,
            cash_out_max: self.cash_out_max.as_deref().and_then(limit_of),
            reactivation_vip_eligible: self.reactivation_vip_eligible,
            reactivation_grace_ms: self.reactivation_grace_secs as i64 * 1000,
            reactivation_extension_ms: self.reactivation_extension_secs as i64 * 1000,
            currency: self.currency.as_deref().and_then(Currency::parse),
            load_min: self.load_min.as_deref().and_then(limit_of),
            load_max: self.load_max.as_deref().and_then(limit_of),
            daily_load_max: self.daily_load_max.as_deref().and_then(limit_of),
            expiry_default_ms: self.expiry_default_secs.map(|s| s as i64 * 1000),
            pin_required: self.pin_required,
            pin_tries_max: self.pin_tries_max,
            luhn_required: self.luhn_required,
            number_prefix: self.number_prefix.as_str().into(),
            number_length: self.number_length,
        }
    }

    /// The settings of a program (the inverse of `to_program`: program times are whole seconds).
    pub fn from_program(p: &Program) -> ProgramConfig {
        // As written ("500.00" stays "500.00"): the scale is kept from the settings it came from.
        let dec = |d: Option<Decimal>| d.map(|d| d.to_string());
        ProgramConfig {
            currency: p.currency.map(|c| c.as_str().to_string()),
            invoice_required: p.invoice_required,
            max_balance: dec(p.max_balance),
            load_min: dec(p.load_min),
            load_max: dec(p.load_max),
            daily_load_max: dec(p.daily_load_max),
            expiry_default_secs: p.expiry_default_ms.map(|ms| (ms / 1000) as u64),
            hold_ttl_default_secs: (p.hold_ttl_default_ms / 1000) as u64,
            hold_ttl_max_secs: (p.hold_ttl_max_ms / 1000) as u64,
            reversal_window_secs: (p.reversal_window_ms / 1000) as u64,
            void_window_secs: (p.void_window_ms / 1000) as u64,
            unreferenced_refunds: p.unreferenced_refunds,
            cash_out_max: dec(p.cash_out_max),
            reactivation_vip_eligible: p.reactivation_vip_eligible,
            reactivation_grace_secs: (p.reactivation_grace_ms / 1000) as u64,
            reactivation_extension_secs: (p.reactivation_extension_ms / 1000) as u64,
            pin_required: p.pin_required,
            pin_tries_max: p.pin_tries_max,
            luhn_required: p.luhn_required,
            number_prefix: p.number_prefix.to_string(),
            number_length: p.number_length,
        }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            data_dir: PathBuf::from("./data"),
            listen: "127.0.0.1:7420".into(),
            metrics_listen: "127.0.0.1:9420".into(),
            secret_hex: None,
            pin_secret_hex: None,
            durability: DurabilityConfig::default(),
            limits: Limits::default(),
            alerts: AlertsConfig::default(),
            programs: BTreeMap::new(),
            clients: Vec::new(),
        }
    }
}

impl Default for DurabilityConfig {
    fn default() -> DurabilityConfig {
        DurabilityConfig {
            mode: "sync".into(),
            relaxed_interval_ms: 10,
            checkpoint_interval_ms: 5_000,
            table_write_mib_per_sec: crate::store::TABLE_WRITE_BYTES_PER_SEC >> 20,
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connections_max: 1024,
            inflight_per_connection_max: 256,
            frame_bytes_max: crate::wire::FRAME_BYTES_MAX,
            batch_frame_bytes_max: crate::wire::BATCH_FRAME_BYTES_MAX,
            idle_timeout_secs: 300,
            shutdown_grace_secs: 10,
            idem_memory_secs: 2,
            requests_per_second_per_connection: 0,
            shutdown_delay_ms: 0,
            auth_timeout_ms: 10_000,
            bulk_beside_payments_cards_per_sec: 100_000,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let cfg: Config = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        cfg.validate().map_err(|errs| format!("{}: {}", path.display(), errs.join("; ")))?;
        Ok(cfg)
    }

    /// Every problem at once, so an operator fixes the file in one pass.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        if !matches!(self.durability.mode.as_str(), "sync" | "relaxed") {
            errs.push(format!("durability.mode must be \"sync\" or \"relaxed\", not {:?}", self.durability.mode));
        }
        if self.durability.relaxed_interval_ms == 0 {
            errs.push("durability.relaxed_interval_ms must be at least 1".into());
        }
        if !(10..=600_000).contains(&self.durability.checkpoint_interval_ms) {
            errs.push("durability.checkpoint_interval_ms must be between 10 and 600000".into());
        }
        let table_write = self.durability.table_write_mib_per_sec;
        if table_write != 0 && !(16..=65_536).contains(&table_write) {
            errs.push("durability.table_write_mib_per_sec must be 0 (no limit) or between 16 and 65536".into());
        }
        let l = &self.limits;
        for (name, v) in [
            ("limits.connections_max", l.connections_max),
            ("limits.inflight_per_connection_max", l.inflight_per_connection_max),
            ("limits.idle_timeout_secs", l.idle_timeout_secs as usize),
        ] {
            if v == 0 {
                errs.push(format!("{name} must be at least 1"));
            }
        }
        if !(1..=86_400).contains(&l.idem_memory_secs) {
            errs.push("limits.idem_memory_secs must be between 1 and 86400".into());
        }
        if !(1024..=16 * 1024 * 1024).contains(&l.frame_bytes_max) {
            errs.push("limits.frame_bytes_max must be between 1024 and 16777216".into());
        }
        if !(l.frame_bytes_max..=16 * 1024 * 1024).contains(&l.batch_frame_bytes_max) {
            errs.push("limits.batch_frame_bytes_max must be between frame_bytes_max and 16777216".into());
        }
        for (key, v) in [("secret_hex", &self.secret_hex), ("pin_secret_hex", &self.pin_secret_hex)] {
            if v.as_deref().is_some_and(|s| crate::card_number::parse_secret_hex(s).is_none()) {
                errs.push(format!("{key} must be 64 hex digits"));
            }
        }
        if self.secret_hex.is_some() && self.secret_hex == self.pin_secret_hex {
            errs.push("pin_secret_hex must differ from secret_hex".into());
        }
        errs.extend(self.alerts.problems());
        if !(1..=600_000).contains(&l.auth_timeout_ms) {
            errs.push("limits.auth_timeout_ms must be between 1 and 600000".into());
        }
        // The bulk thread's wait after a chunk is not interrupted (by payments stopping or a
        // drain): at 10,000 cards a second, a 4,096-card chunk holds the next for 0.4 s at most.
        let pace = l.bulk_beside_payments_cards_per_sec;
        if pace != 0 && pace < 10_000 {
            errs.push("limits.bulk_beside_payments_cards_per_sec must be 0 (no pace) or at least 10000".into());
        }
        if l.shutdown_delay_ms > 600_000 {
            errs.push("limits.shutdown_delay_ms must be at most 600000".into());
        }
        let mut names = std::collections::HashSet::new();
        for c in &self.clients {
            errs.extend(c.problems());
            if !names.insert(c.name.as_str()) {
                errs.push(format!("clients: the name {:?} is used twice", c.name));
            }
        }
        for (name, p) in &self.programs {
            errs.extend(p.problems(name));
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }

    pub fn durability(&self) -> crate::store::Durability {
        match self.durability.mode.as_str() {
            "relaxed" => crate::store::Durability::Relaxed { interval_ms: self.durability.relaxed_interval_ms },
            _ => crate::store::Durability::Sync,
        }
    }

    pub fn store_tuning(&self) -> crate::store::Tuning {
        crate::store::Tuning {
            checkpoint_every: std::time::Duration::from_millis(self.durability.checkpoint_interval_ms),
            table_write_bytes_per_sec: self.durability.table_write_mib_per_sec << 20,
        }
    }

    pub fn programs(&self) -> Vec<Program> {
        self.programs.iter().map(|(name, p)| p.to_program(name)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_equals_defaults() {
        let text = include_str!("../giftd.example.toml");
        let cfg: Config = toml::from_str(text).unwrap();
        let mut want = Config::default();
        want.programs.insert("default".into(), ProgramConfig::default());
        assert_eq!(cfg, want);
    }

    #[test]
    fn bad_values_are_all_reported() {
        let cfg: Config = toml::from_str(
            "[durability]\nmode = \"fast\"\ntable_write_mib_per_sec = 8\n[limits]\nconnections_max = 0\n\
             idem_memory_secs = 0\nbulk_beside_payments_cards_per_sec = 9999\n[programs.x]\nmax_balance = \"-1\"\n[programs.y]\nmax_balance = \"1e30\"\n",
        )
        .unwrap();
        let errs = cfg.validate().unwrap_err();
        assert_eq!(errs.len(), 7, "{errs:?}");
        for pace in [0, 10_000] {
            let cfg: Config =
                toml::from_str(&format!("[limits]\nbulk_beside_payments_cards_per_sec = {pace}\n")).unwrap();
            assert_eq!(cfg.validate(), Ok(()), "a pace of {pace}");
        }
    }

    #[test]
    fn each_bad_client_entry_is_named() {
        let key = "ab".repeat(32);
        let entry = |name: &str, role: &str, merchant: Option<&str>, key: &str| {
            let m = merchant.map_or(String::new(), |m| format!("merchant = \"{m}\"\n"));
            format!("[[clients]]\nname = \"{name}\"\nrole = \"{role}\"\n{m}{key}\n")
        };
        let good = [
            entry("ho", "operator", None, &format!("key_hex = \"{key}\"")),
            entry("pos", "merchant", Some("m-1"), &format!("key_hex = \"{key}\"")),
        ]
        .concat();
        let cfg: Config = toml::from_str(&good).unwrap();
        assert_eq!(cfg.validate(), Ok(()));
        for (text, want) in [
            (entry("a", "admin", None, &format!("key_hex = \"{key}\"")), "role must be"),
            (entry("a", "merchant", None, &format!("key_hex = \"{key}\"")), "merchant is required"),
            (entry("a", "operator", Some("m-1"), &format!("key_hex = \"{key}\"")), "only for merchants"),
            (entry("a b", "operator", None, &format!("key_hex = \"{key}\"")), "name must be"),
            (entry("a", "operator", None, "key_hex = \"abcd\""), "64 hex digits"),
            (entry("a", "operator", None, ""), "exactly one of key_hex and key_file"),
            (entry("a", "operator", None, "key_file = \"/nonexistent/giftd.key\""), "/nonexistent/giftd.key"),
            (format!("{good}{}", entry("ho", "processor", None, &format!("key_hex = \"{key}\""))), "used twice"),
        ] {
            let cfg: Config = toml::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let errs = cfg.validate().unwrap_err();
            assert!(errs.len() == 1 && errs[0].contains(want), "{text}: {errs:?}");
        }
    }

    #[test]
    fn program_settings_round_trip_through_text() {
        let text = "currency = \"USD\"\nmax_balance = \"500.00\"\nload_min = \"5\"\nload_max = \"200\"\n\
                    daily_load_max = \"300\"\nexpiry_default_secs = 31536000\npin_required = true\n\
                    pin_tries_max = 5\nluhn_required = true\nnumber_prefix = \"603571\"\nnumber_length = 19\n";
        let cfg = ProgramConfig::parse(text).unwrap();
        assert_eq!(cfg.problems("mall"), Vec::<String>::new());
        let program = cfg.to_program("mall");
        assert_eq!(program.load_max, Some(Decimal::new(200, 0)));
        assert_eq!(program.pin_tries_max, 5);
        let back = ProgramConfig::from_program(&program);
        assert_eq!(ProgramConfig::parse(&back.to_text()).unwrap().to_program("mall"), program);
    }

    #[test]
    fn program_problems_name_their_keys() {
        let cfg = ProgramConfig::parse(
            "currency = \"XXX\"\nload_min = \"10\"\nload_max = \"5\"\npin_tries_max = 0\nnumber_prefix = \"6x\"\n",
        )
        .unwrap();
        let errs = cfg.problems("p");
        for key in ["currency", "load_min", "pin_tries_max", "number_prefix"] {
            assert!(errs.iter().any(|e| e.contains(key)), "{key} not in {errs:?}");
        }
        assert!(ProgramConfig::parse("pin_required = 3").is_err());
        assert!(ProgramConfig::parse("no_such_key = 1").is_err());
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Config>("[limits]\nconections_max = 5\n").is_err());
    }
}
