//! Holds over TCP: authorize, capture, void, expiry by deadline (also across a restart), hold ids
//! that never repeat, and replies that retries get back byte for byte.

use crate::{call, check, idem, issue, num, redeem, timed, usd, view, Giftd, MERCHANT};
use giftd::client::Client;
use giftd::model::{HoldView, Money, Outcome, ResultCode, TxnKind};
use giftd::wire::{Reply, Request};
use std::time::{Duration, Instant};

const CARD: &str = "6035719900007001";

pub fn authorize_req(number: &str, key: &str, money: Money, allow_partial: bool, ttl_secs: u32) -> Request {
    Request::Authorize { idem: idem(MERCHANT, key), number: num(number), money, allow_partial, ttl_secs }
}

pub fn capture_req(key: &str, hold_id: u64, money: Money) -> Request {
    Request::Capture { idem: idem(MERCHANT, key), hold_id, money }
}

pub fn void_req(key: &str, hold_id: u64) -> Request {
    Request::Void { idem: idem(MERCHANT, key), hold_id }
}

/// Sends an authorization and returns its outcome (which carries the hold when approved).
pub async fn authorize(c: &mut Client, number: &str, key: &str, money: Money, partial: bool, ttl: u32) -> Outcome {
    let req = authorize_req(number, key, money, partial, ttl);
    match timed("authorize", c.call(&req)).await.expect("authorize") {
        Reply::Hold(o) => o,
        other => panic!("expected a hold reply, got {other:?}"),
    }
}

fn hold_of(o: &Outcome) -> HoldView {
    o.hold.unwrap_or_else(|| panic!("approved authorization without its hold: {o:?}"))
}

/// The kinds and amounts of the card's history, oldest first.
async fn history_kinds(c: &mut Client, number: &str) -> Vec<(TxnKind, i64)> {
    let req = Request::History { number: num(number), before_seq: 0, limit: 100 };
    match timed("history", c.call(&req)).await.expect("history") {
        Reply::History(h) => h.txns.iter().rev().map(|t| (t.kind, t.amount_minor)).collect(),
        other => panic!("expected history, got {other:?}"),
    }
}

#[tokio::test]
async fn authorize_then_capture_part_releases_the_rest() {
    let g = Giftd::start();
    let mut c = g.client().await;
    issue(&mut c, CARD, usd(10_000)).await;

    let auth = authorize(&mut c, CARD, "a1", usd(3_000), false, 3_600).await;
    check(&auth, ResultCode::Approved, 3_000, Some(10_000));
    let hold = hold_of(&auth);
    assert_eq!(hold.amount_minor, 3_000);
    let v = auth.card.unwrap();
    assert_eq!((v.held_minor, v.available_minor()), (3_000, 7_000));
    // The deadline is the asked TTL from now (the clock is giftd's: allow for the round trip).
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    assert!((hold.expires_ms - (now_ms + 3_600_000)).abs() < 60_000, "{hold:?}");

    // A redeem can only spend what is available, not what is held.
    check(&redeem(&mut c, CARD, "r1", usd(7_001), false).await, ResultCode::InsufficientFunds, 0, Some(10_000));
    check(&redeem(&mut c, CARD, "r2", usd(1_000), false).await, ResultCode::Approved, 1_000, Some(9_000));

    // Capture 25.00 of the 30.00: the balance pays 25.00 and nothing stays held.
    let cap = call(&mut c, &capture_req("c1", hold.id, usd(2_500))).await;
    check(&cap, ResultCode::Approved, 2_500, Some(6_500));
    assert_eq!(cap.card.unwrap().held_minor, 0);
    // A hold captures once.
    let again = call(&mut c, &capture_req("c2", hold.id, usd(100))).await;
    check(&again, ResultCode::HoldNotFound, 0, None);
    // The retry of the first capture gets its original answer, and changes nothing.
    assert_eq!(call(&mut c, &capture_req("c1", hold.id, usd(2_500))).await, cap);
    assert_eq!(view(&mut c, CARD).await.balance_minor, 6_500);
    assert_eq!(
        history_kinds(&mut c, CARD).await,
        vec![
            (TxnKind::Issue, 10_000),
            (TxnKind::Authorize, 3_000),
            (TxnKind::Redeem, -1_000),
            (TxnKind::Capture, -2_500)
        ]
    );
}

#[tokio::test]
async fn capture_is_checked_against_the_hold() {
    let g = Giftd::start();
    let mut c = g.client().await;
    issue(&mut c, CARD, usd(10_000)).await;
    let hold = hold_of(&authorize(&mut c, CARD, "a1", usd(2_000), false, 600).await);

    check(
        &call(&mut c, &capture_req("c1", hold.id, usd(2_001))).await,
        ResultCode::CaptureExceedsHold,
        0,
        Some(10_000),
    );
    let eur = Money { currency: giftd::model::Currency::parse("EUR").unwrap(), ..usd(100) };
    check(&call(&mut c, &capture_req("c2", hold.id, eur)).await, ResultCode::CurrencyMismatch, 0, Some(10_000));
    check(&call(&mut c, &capture_req("c3", hold.id + 1000, usd(1))).await, ResultCode::HoldNotFound, 0, None);
    // None of the declines touched the hold: it still captures in full.
    check(&call(&mut c, &capture_req("c4", hold.id, usd(2_000))).await, ResultCode::Approved, 2_000, Some(8_000));
}

#[tokio::test]
async fn partial_authorization_void_and_limits() {
    let g = Giftd::start();
    let mut c = g.client().await;
    issue(&mut c, CARD, usd(5_000)).await;

    // Without partial approval an authorization beyond what is available is declined...
    let declined = authorize(&mut c, CARD, "a0", usd(9_000), false, 0).await;
    check(&declined, ResultCode::InsufficientFunds, 0, Some(5_000));
    assert_eq!(declined.hold, None);
    // ...with it, giftd holds what there is.
    let auth = authorize(&mut c, CARD, "a1", usd(9_000), true, 0).await;
    check(&auth, ResultCode::Approved, 5_000, Some(5_000));
    let hold = hold_of(&auth);
    assert_eq!(auth.card.unwrap().available_minor(), 0);
    // TTL 0 means the program's default: 7 days.
    let week_ms = 7 * 86_400_000;
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    assert!((hold.expires_ms - (now_ms + week_ms)).abs() < 60_000, "{hold:?}");
    // Nothing left to hold.
    check(&authorize(&mut c, CARD, "a2", usd(1), true, 0).await, ResultCode::InsufficientFunds, 0, Some(5_000));

    let void = call(&mut c, &void_req("v1", hold.id)).await;
    check(&void, ResultCode::Approved, 5_000, Some(5_000));
    assert_eq!(void.card.unwrap().available_minor(), 5_000);
    check(&call(&mut c, &void_req("v2", hold.id)).await, ResultCode::HoldNotFound, 0, None);
    check(&call(&mut c, &capture_req("c1", hold.id, usd(1))).await, ResultCode::HoldNotFound, 0, None);

    // A card holds at most 16 open holds.
    for i in 0..16 {
        check(&authorize(&mut c, CARD, &format!("m{i}"), usd(1), false, 0).await, ResultCode::Approved, 1, None);
    }
    check(&authorize(&mut c, CARD, "m16", usd(1), false, 0).await, ResultCode::TooManyHolds, 0, Some(5_000));
    assert_eq!(view(&mut c, CARD).await.held_minor, 16);
}

#[tokio::test]
async fn authorization_retry_returns_the_same_hold() {
    let g = Giftd::start();
    let mut c = g.client().await;
    issue(&mut c, CARD, usd(5_000)).await;
    let first = authorize(&mut c, CARD, "a1", usd(1_000), false, 60).await;
    let retry = authorize(&mut c, CARD, "a1", usd(1_000), false, 60).await;
    assert_eq!(retry, first, "a retry answers with the original hold, byte for byte");
    assert_eq!(view(&mut c, CARD).await.held_minor, 1_000, "and holds nothing more");
    // The same key with other content is refused.
    let other = authorize(&mut c, CARD, "a1", usd(1_001), false, 60).await;
    assert_eq!(other.result, ResultCode::IdempotencyMismatch);
}

#[tokio::test]
async fn a_hold_releases_itself_at_its_deadline() {
    let g = Giftd::start();
    let mut c = g.client().await;
    issue(&mut c, CARD, usd(5_000)).await;
    let short = hold_of(&authorize(&mut c, CARD, "a1", usd(1_000), false, 1).await);
    let long = hold_of(&authorize(&mut c, CARD, "a2", usd(500), false, 3_600).await);
    assert_eq!(view(&mut c, CARD).await.held_minor, 1_500);

    wait_released_to(&mut c, CARD, 500, Duration::from_secs(10)).await;
    // The release is written, with no caller: history shows it, by giftd.
    let kinds = history_kinds(&mut c, CARD).await;
    assert_eq!(kinds.last(), Some(&(TxnKind::HoldExpired, 1_000)), "{kinds:?}");
    check(&call(&mut c, &capture_req("c1", short.id, usd(1_000))).await, ResultCode::HoldNotFound, 0, None);
    // The other hold is untouched.
    check(&call(&mut c, &capture_req("c2", long.id, usd(500))).await, ResultCode::Approved, 500, Some(4_500));
    let metrics = crate::http_get(g.metrics_addr(), "/metrics").await.1;
    assert!(metrics.contains("giftd_holds_expired_total 1"), "{metrics}");
}

/// Polls until the card holds exactly `held`.
async fn wait_released_to(c: &mut Client, number: &str, held: i64, limit: Duration) {
    let until = Instant::now() + limit;
    while view(c, number).await.held_minor != held {
        assert!(Instant::now() < until, "held amount did not reach {held} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn holds_survive_a_crash_and_expire_while_giftd_is_down() {
    let mut g = Giftd::start();
    let mut c = g.client().await;
    issue(&mut c, CARD, usd(10_000)).await;
    let short = hold_of(&authorize(&mut c, CARD, "a1", usd(1_000), false, 2).await);
    let long = hold_of(&authorize(&mut c, CARD, "a2", usd(2_000), false, 3_600).await);
    drop(c);
    g.kill9();
    // The short hold's deadline passes while giftd is down.
    std::thread::sleep(Duration::from_millis(2_500));
    g.restart();
    let mut c = g.client().await;
    wait_released_to(&mut c, CARD, 2_000, Duration::from_secs(10)).await;
    let kinds = history_kinds(&mut c, CARD).await;
    assert_eq!(kinds.last(), Some(&(TxnKind::HoldExpired, 1_000)), "{kinds:?}");
    check(&call(&mut c, &capture_req("c1", short.id, usd(1))).await, ResultCode::HoldNotFound, 0, None);

    // A new hold never reuses an id, not even one whose hold is gone.
    let fresh = hold_of(&authorize(&mut c, CARD, "a3", usd(100), false, 3_600).await);
    assert!(fresh.id > long.id && fresh.id > short.id, "{fresh:?} after {short:?}, {long:?}");
    // The long hold is still open and captures after the crash.
    check(&call(&mut c, &capture_req("c2", long.id, usd(2_000))).await, ResultCode::Approved, 2_000, Some(8_000));
    assert_eq!(view(&mut c, CARD).await.held_minor, 100);

    // Once more through a clean stop, which checkpoints every card: still the same holds.
    drop(c);
    assert!(g.sigterm().success());
    g.restart();
    let mut c = g.client().await;
    let v = view(&mut c, CARD).await;
    assert_eq!((v.balance_minor, v.held_minor), (8_000, 100));
    check(&call(&mut c, &void_req("v1", fresh.id)).await, ResultCode::Approved, 100, Some(8_000));
    let newest = hold_of(&authorize(&mut c, CARD, "a4", usd(100), false, 3_600).await);
    assert!(newest.id > fresh.id, "{newest:?} after {fresh:?}");
}
