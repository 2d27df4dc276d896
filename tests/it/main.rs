//! Integration tests: each test starts its own giftd child process (see [`harness::Giftd`]) and talks
//! to it over TCP, through `giftd::client`, raw frames, giftctl or HTTP.

mod access;
mod backoffice;
mod bulk;
mod concurrency;
mod crash;
mod events;
mod giftctl;
mod harness;
mod holds;
mod lifecycle;
mod observability;
mod ops;
mod payments;
mod policy;
mod protocol;
mod secrets;
mod wal_failure;

use giftd::card_number::CardNumber;
use giftd::client::Client;
use giftd::model::{CardView, Currency, Money, Outcome, ResultCode};
use giftd::wire::{IdemRef, Reply, Request};
use std::future::Future;
use std::time::Duration;

pub use harness::Giftd;

/// The bound on any single network wait: generous, for a loaded 2-core machine.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The merchant most tests act as.
pub const MERCHANT: &str = "m-store-17";

/// Awaits `f`, failing the test if it takes longer than [`TIMEOUT`].
pub async fn timed<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(TIMEOUT, f).await.unwrap_or_else(|_| panic!("{what}: no answer within {TIMEOUT:?}"))
}

pub fn usd(minor: i64) -> Money {
    Money { currency: Currency::parse("USD").expect("USD"), minor }
}

pub fn eur(minor: i64) -> Money {
    Money { currency: Currency::parse("EUR").expect("EUR"), minor }
}

pub fn num(s: &str) -> CardNumber {
    CardNumber::parse(s).unwrap_or_else(|| panic!("bad test card number {s}"))
}

pub fn idem(merchant: &str, key: &str) -> IdemRef {
    IdemRef { merchant: merchant.into(), key: key.into() }
}

/// An issue of an active card in the default program, no expiry, keyed by the number's last digits.
pub fn issue_req(number: &str, money: Money) -> Request {
    Request::Issue {
        idem: idem(MERCHANT, &format!("issue-{}", &number[number.len() - 6..])),
        number: Some(num(number)),
        program: "default".into(),
        money,
        expiry_ms: None,
        active: true,
        virtual_card: false,
        email: None,
        case: None,
    }
}

/// A redeem by [`MERCHANT`] without invoice.
pub fn redeem_req(number: &str, key: &str, money: Money, allow_partial: bool) -> Request {
    Request::Redeem { idem: idem(MERCHANT, key), number: num(number), money, allow_partial, invoice: None, pin: None }
}

/// Sends `req` and returns the card outcome; panics on any other kind of reply.
pub async fn call(c: &mut Client, req: &Request) -> Outcome {
    match timed("call", c.call(req)).await.expect("call") {
        // An issue of a supplied number answers a card outcome and no number.
        Reply::Card(o) | Reply::Issued(o, None) => o,
        other => panic!("expected a card outcome for {:?}, got {other:?}", req.opcode()),
    }
}

/// Issues an active card in the default program and checks it was approved.
pub async fn issue(c: &mut Client, number: &str, money: Money) -> Outcome {
    let o = call(c, &issue_req(number, money)).await;
    check(&o, ResultCode::Approved, money.minor, Some(money.minor));
    o
}

pub async fn redeem(c: &mut Client, number: &str, key: &str, money: Money, allow_partial: bool) -> Outcome {
    call(c, &redeem_req(number, key, money, allow_partial)).await
}

/// The card as a balance inquiry sees it (the card must exist).
pub async fn view(c: &mut Client, number: &str) -> CardView {
    let o = call(c, &Request::Balance { number: num(number) }).await;
    assert_eq!(o.result, ResultCode::Approved, "balance of …{}", &number[number.len() - 4..]);
    o.card.expect("balance reply carries the card")
}

pub async fn balance(c: &mut Client, number: &str) -> i64 {
    view(c, number).await.balance_minor
}

/// Checks an outcome's result, approved amount and (when given) the balance it reports.
#[track_caller]
pub fn check(o: &Outcome, result: ResultCode, approved_minor: i64, balance_minor: Option<i64>) {
    assert_eq!(o.result, result, "result of {o:?}");
    assert_eq!(o.approved_minor, approved_minor, "approved amount of {o:?}");
    if let Some(b) = balance_minor {
        let card = o.card.unwrap_or_else(|| panic!("outcome without card: {o:?}"));
        assert_eq!(card.balance_minor, b, "balance in {o:?}");
        assert!(card.balance_minor >= 0 && card.available_minor() <= card.balance_minor, "{o:?}");
    }
}

/// A plain HTTP/1.1 GET; returns the status code and the body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = timed("http connect", tokio::net::TcpStream::connect(addr)).await.expect("http connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    timed("http write", s.write_all(req.as_bytes())).await.expect("http write");
    let mut raw = Vec::new();
    timed("http read", s.read_to_end(&mut raw)).await.expect("http read");
    let text = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end in {text:?}"));
    let status =
        head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("status line: {head}"));
    (status, body.to_string())
}

/// One sample of a scrape of `g`'s metrics: the series whose name and labels are exactly `series`
/// (it must be there).
pub async fn metric(g: &Giftd, series: &str) -> f64 {
    let (status, body) = http_get(g.metrics_addr(), "/metrics").await;
    assert_eq!(status, 200);
    lifecycle::sample(&body, series).unwrap_or_else(|| panic!("{series} missing:\n{body}"))
}
