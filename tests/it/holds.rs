//! Holds over TCP: authorize, capture, void, expiry by deadline (also across a restart), hold ids
//! that never repeat, and replies that retries get back byte for byte.

use crate::{call, check, idem, issue, num, redeem, timed, usd, view, Giftd, MERCHANT};
use giftd::client::Client;
use giftd::model::{HoldView, Money, Outcome, ResultCode, TxnKind};
use giftd::wire::{Reply, Request};
use std::time::{Duration, Instant};

const CARD: &str = "6035719900007001";

pub fn authorize_req(number: &str, key: &str, money: Money, allow_partial: bool, ttl_secs: u32) -> Request {
    Request::Authorize { idem: idem(MERCHANT, key), number: num(number), money, allow_partial, ttl_secs, pin: None }
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
    let req = Request::History { number: num(number), before_seq: 0, limit: 100, kind: None };
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

    // Lookup lists the open hold.
    let lookup = match timed("lookup", c.call(&Request::Lookup { number: num(CARD) })).await.expect("lookup") {
        Reply::Lookup(l) => l,
        other => panic!("expected a lookup reply, got {other:?}"),
    };
    assert_eq!(lookup.holds, vec![hold]);
    assert_eq!(lookup.recent.first().map(|t| (t.kind, t.amount_minor)), Some((TxnKind::Authorize, 3_000)));
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
    g.stop_cleanly();
    g.restart();
    let mut c = g.client().await;
    let v = view(&mut c, CARD).await;
    assert_eq!((v.balance_minor, v.held_minor), (8_000, 100));
    check(&call(&mut c, &void_req("v1", fresh.id)).await, ResultCode::Approved, 100, Some(8_000));
    let newest = hold_of(&authorize(&mut c, CARD, "a4", usd(100), false, 3_600).await);
    assert!(newest.id > fresh.id, "{newest:?} after {fresh:?}");
}

/// kill -9 while captures are in flight, with open holds, some of them short: after the restart
/// every acknowledged capture is there, a retry of each capture key applies it at most once, the
/// long holds not captured are still open, and the short ones expire as they would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_and_captures_in_flight_survive_kill9_exactly_once() {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    const CARDS: usize = 16;
    const HOLDS_PER_CARD: usize = 15;
    const HELD: i64 = 100;
    const TAKE: i64 = 60;
    const INITIAL: i64 = 100_000;
    let cards: Vec<String> = (0..CARDS).map(|i| format!("60357199000072{i:02}")).collect();
    let short_card = "6035719900007299";
    let mut g = Giftd::start();
    let mut c = g.client().await;
    // Long holds, to be captured under load, on every card; and short ones left to expire.
    let mut long: Vec<(u64, usize)> = Vec::new();
    for (ci, n) in cards.iter().enumerate() {
        issue(&mut c, n, usd(INITIAL)).await;
        for i in 0..HOLDS_PER_CARD {
            long.push((hold_of(&authorize(&mut c, n, &format!("a{ci}-{i}"), usd(HELD), false, 3_600).await).id, ci));
        }
    }
    issue(&mut c, short_card, usd(INITIAL)).await;
    let mut short = Vec::new();
    for i in 0..4 {
        short.push(hold_of(&authorize(&mut c, short_card, &format!("s{i}"), usd(HELD), false, 3).await).id);
    }
    // Captures of two thirds of the long holds, pipelined on 4 connections; the rest stay open.
    let to_capture: Vec<(u64, usize)> = long.iter().copied().filter(|(h, _)| h % 3 != 0).collect();
    let acked: Arc<Mutex<HashMap<u64, Outcome>>> = Arc::default();
    let tasks: Vec<_> = to_capture
        .chunks(to_capture.len().div_ceil(4))
        .map(|chunk| {
            let (addr, chunk, acked) = (g.addr().to_string(), chunk.to_vec(), acked.clone());
            tokio::spawn(async move {
                let Ok(Ok(c)) = tokio::time::timeout(crate::TIMEOUT, Client::connect(&addr)).await else { return };
                let (mut tx, mut rx) = c.into_split();
                for window in chunk.chunks(8) {
                    let ids: Vec<(u64, u64)> = window
                        .iter()
                        .map(|(h, _)| (tx.send(&capture_req(&format!("c{h}"), *h, usd(TAKE))), *h))
                        .collect();
                    if tx.flush().await.is_err() {
                        return;
                    }
                    for (id, hold) in ids {
                        let Ok(Ok((got, Reply::Card(o)))) = tokio::time::timeout(crate::TIMEOUT, rx.recv()).await
                        else {
                            return;
                        };
                        assert_eq!(got, id);
                        assert_eq!(o.result, ResultCode::Approved, "capture of hold {hold}: {o:?}");
                        acked.lock().unwrap().insert(hold, o);
                    }
                }
            })
        })
        .collect();
    // Kill once some, not all, captures are acknowledged.
    let until = Instant::now() + Duration::from_secs(20);
    while acked.lock().unwrap().len() < 16 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(c);
    g.kill9();
    for t in tasks {
        let _ = t.await;
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(!acked.is_empty(), "no capture was acknowledged before the kill");
    eprintln!("{} of {} captures acknowledged before kill -9", acked.len(), to_capture.len());
    // Past the short holds' deadlines while giftd is down.
    std::thread::sleep(Duration::from_secs(3));
    g.restart();
    let mut c = g.client().await;

    // Every capture key, retried: the acknowledged ones answer as before, the others apply now
    // (or answer as the capture that made it before the kill did). Each takes 60 exactly once.
    for (h, _) in &to_capture {
        let o = call(&mut c, &capture_req(&format!("c{h}"), *h, usd(TAKE))).await;
        assert_eq!((o.result, o.approved_minor), (ResultCode::Approved, TAKE), "retry of capture of {h}: {o:?}");
        if let Some(first) = acked.get(h) {
            assert_eq!(&o, first, "an acknowledged capture answers as it did");
        }
    }
    for (ci, n) in cards.iter().enumerate() {
        let captured = to_capture.iter().filter(|(_, c)| *c == ci).count() as i64;
        let open = HOLDS_PER_CARD as i64 - captured;
        let v = view(&mut c, n).await;
        assert_eq!((v.balance_minor, v.held_minor), (INITIAL - captured * TAKE, open * HELD), "card {n}");
    }
    wait_released_to(&mut c, short_card, 0, Duration::from_secs(10)).await;
    assert_eq!(view(&mut c, short_card).await.balance_minor, INITIAL);
    for h in short {
        check(&call(&mut c, &void_req(&format!("vs{h}"), h)).await, ResultCode::HoldNotFound, 0, None);
    }
    // A hold not captured is open and still captures.
    let (open_hold, _) = long.iter().copied().find(|(h, _)| h % 3 == 0).unwrap();
    check(&call(&mut c, &capture_req("c-open", open_hold, usd(HELD))).await, ResultCode::Approved, HELD, None);
}

#[tokio::test]
async fn a_void_past_the_programs_window_is_declined() {
    let g = Giftd::with_config("[programs.default]\nvoid_window_secs = 1\n");
    let mut c = g.client().await;
    issue(&mut c, CARD, usd(5_000)).await;
    let early = hold_of(&authorize(&mut c, CARD, "a1", usd(1_000), false, 600).await);
    check(&call(&mut c, &void_req("v1", early.id)).await, ResultCode::Approved, 1_000, Some(5_000));
    let late = hold_of(&authorize(&mut c, CARD, "a2", usd(1_000), false, 600).await);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let refused = call(&mut c, &void_req("v2", late.id)).await;
    check(&refused, ResultCode::VoidWindowPassed, 0, Some(5_000));
    assert_eq!(refused.card.unwrap().held_minor, 1_000, "the hold stays until captured or expired");
    // It can still be captured.
    check(&call(&mut c, &capture_req("c1", late.id, usd(1_000))).await, ResultCode::Approved, 1_000, Some(4_000));
}
