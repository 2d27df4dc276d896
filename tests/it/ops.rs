//! Every operation over TCP, with the business rules of DOMAIN.md.

use crate::{balance, call, check, eur, idem, issue, issue_req, num, redeem, timed, usd, view, Giftd, MERCHANT};
use giftd::client::Client;
use giftd::model::{LockReason, Outcome, ResultCode, Status, TxnKind};
use giftd::wire::{HistoryReply, LookupReply, Reply, Request};
use std::time::{SystemTime, UNIX_EPOCH};

const DAY_MS: i64 = 86_400_000;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as i64
}

async fn lookup(c: &mut Client, number: &str) -> LookupReply {
    match timed("lookup", c.call(&Request::Lookup { number: num(number) })).await.expect("lookup") {
        Reply::Lookup(l) => l,
        other => panic!("expected a lookup reply, got {other:?}"),
    }
}

async fn history(c: &mut Client, number: &str, before_seq: u64, limit: u16) -> HistoryReply {
    let req = Request::History { number: num(number), before_seq, limit, kind: None };
    match timed("history", c.call(&req)).await.expect("history") {
        Reply::History(h) => h,
        other => panic!("expected a history reply, got {other:?}"),
    }
}

fn lock_req(number: &str, key: &str, reason: LockReason) -> Request {
    Request::Lock { idem: idem(MERCHANT, key), number: num(number), reason }
}

fn unlock_req(number: &str, key: &str) -> Request {
    Request::Unlock { idem: idem(MERCHANT, key), number: num(number) }
}

fn reload_req(number: &str, key: &str, money: giftd::model::Money) -> Request {
    Request::Reload { idem: idem(MERCHANT, key), number: num(number), money }
}

/// A sale with an invoice number, by `merchant`.
fn sale(number: &str, merchant: &str, key: &str, minor: i64, invoice: Option<&str>) -> Request {
    Request::Redeem {
        idem: idem(merchant, key),
        number: num(number),
        money: usd(minor),
        allow_partial: false,
        invoice: invoice.map(str::to_string),
        pin: None,
    }
}

fn issue_in(number: &str, key: &str, program: &str, minor: i64, expiry_ms: Option<i64>, active: bool) -> Request {
    Request::Issue {
        idem: idem(MERCHANT, key),
        number: Some(num(number)),
        program: program.into(),
        money: usd(minor),
        expiry_ms,
        active,
        virtual_card: false,
        email: None,
        case: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_balance_and_duplicates() {
    let g = Giftd::start();
    let mut c = g.client().await;
    let n = "6035719910000017";
    let o = issue(&mut c, n, usd(10_000)).await;
    let v = o.card.expect("card");
    assert_eq!(&v.last4, b"0017");
    assert_eq!((v.status, v.reason, v.currency.as_str()), (Status::Active, LockReason::None, "USD"));
    assert_eq!((v.held_minor, v.available_minor(), v.expiry_ms), (0, 10_000, None));
    assert_eq!(view(&mut c, n).await, v, "a balance inquiry shows what the issue reported");

    // Same number again (another key): card_exists, the existing card untouched.
    let again = call(&mut c, &issue_in(n, "issue-dup", "default", 99, None, true)).await;
    check(&again, ResultCode::CardExists, 0, Some(10_000));

    let unknown = call(&mut c, &issue_in("6035719910000025", "issue-np", "no-such-program", 500, None, true)).await;
    check(&unknown, ResultCode::UnknownProgram, 0, None);
    let missing = call(&mut c, &Request::Balance { number: num("6035719910000025") }).await;
    assert_eq!((missing.result, missing.card), (ResultCode::CardNotFound, None));
    let r = redeem(&mut c, "6035719910000033", "r-nf", usd(100), false).await;
    assert_eq!((r.result, r.card), (ResultCode::CardNotFound, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactive_card_is_activated_with_or_without_load() {
    let g = Giftd::start();
    let mut c = g.client().await;
    let (a, b, m) = ("6035719910001015", "6035719910001023", "6035719910001031");
    let o = call(&mut c, &issue_in(a, "issue-a", "default", 0, None, false)).await;
    check(&o, ResultCode::Approved, 0, Some(0));
    assert_eq!(o.card.unwrap().status, Status::Inactive);
    // An inactive card can be looked up but not spent or reloaded.
    check(&redeem(&mut c, a, "r-a1", usd(100), true).await, ResultCode::CardInactive, 0, Some(0));
    check(&call(&mut c, &reload_req(a, "l-a1", usd(100))).await, ResultCode::CardInactive, 0, Some(0));
    assert_eq!(view(&mut c, a).await.status, Status::Inactive);

    let act =
        |number: &str, key: &str, load| Request::Activate { idem: idem(MERCHANT, key), number: num(number), load };
    let o = call(&mut c, &act(a, "act-a", Some(usd(2_500)))).await;
    check(&o, ResultCode::Approved, 2_500, Some(2_500));
    assert_eq!(o.card.unwrap().status, Status::Active);
    check(&call(&mut c, &act(a, "act-a2", None)).await, ResultCode::AlreadyActive, 0, Some(2_500));
    check(&redeem(&mut c, a, "r-a2", usd(500), false).await, ResultCode::Approved, 500, Some(2_000));

    // Issued with value but inactive: activation without load keeps the value.
    check(
        &call(&mut c, &issue_in(b, "issue-b", "default", 5_000, None, false)).await,
        ResultCode::Approved,
        5_000,
        Some(5_000),
    );
    let o = call(&mut c, &act(b, "act-b", None)).await;
    check(&o, ResultCode::Approved, 0, Some(5_000));
    assert_eq!(o.card.unwrap().status, Status::Active);

    // A load in another currency is declined and the card stays inactive.
    check(&call(&mut c, &issue_in(m, "issue-m", "default", 0, None, false)).await, ResultCode::Approved, 0, Some(0));
    let o = call(&mut c, &act(m, "act-m", Some(eur(1_000)))).await;
    check(&o, ResultCode::CurrencyMismatch, 0, Some(0));
    assert_eq!(o.card.unwrap().status, Status::Inactive);
    let o = call(&mut c, &act("6035719910001049", "act-nf", None)).await;
    check(&o, ResultCode::CardNotFound, 0, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeem_full_partial_and_insufficient_funds() {
    let g = Giftd::start();
    let mut c = g.client().await;
    let n = "60357199100020148";
    issue(&mut c, n, usd(10_000)).await;
    check(&redeem(&mut c, n, "r1", usd(3_000), false).await, ResultCode::Approved, 3_000, Some(7_000));
    // Without allow_partial, more than available is declined and nothing moves.
    check(&redeem(&mut c, n, "r2", usd(8_000), false).await, ResultCode::InsufficientFunds, 0, Some(7_000));
    // With allow_partial, what is available is approved (split tender).
    check(&redeem(&mut c, n, "r3", usd(8_000), true).await, ResultCode::Approved, 7_000, Some(0));
    check(&redeem(&mut c, n, "r4", usd(1), true).await, ResultCode::InsufficientFunds, 0, Some(0));
    check(&redeem(&mut c, n, "r5", usd(1), false).await, ResultCode::InsufficientFunds, 0, Some(0));
    let v = view(&mut c, n).await;
    assert_eq!((v.balance_minor, v.available_minor(), v.status), (0, 0, Status::Active));

    // Exactly the balance, and a partial request that is fully covered.
    let m = "60357199100020155";
    issue(&mut c, m, usd(2_000)).await;
    check(&redeem(&mut c, m, "r6", usd(500), true).await, ResultCode::Approved, 500, Some(1_500));
    check(&redeem(&mut c, m, "r7", usd(1_500), false).await, ResultCode::Approved, 1_500, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_within_program_max_balance() {
    let g = Giftd::with_config("[programs.capped]\nmax_balance = \"500.00\"\n");
    let mut c = g.client().await;
    let n = "6035719910003013";
    issue(&mut c, n, usd(1_000)).await;
    check(&call(&mut c, &reload_req(n, "l1", usd(1_550))).await, ResultCode::Approved, 1_550, Some(2_550));
    check(&call(&mut c, &reload_req(n, "l2", eur(100))).await, ResultCode::CurrencyMismatch, 0, Some(2_550));

    let capped = "6035719910003021";
    check(
        &call(&mut c, &issue_in(capped, "ic", "capped", 40_000, None, true)).await,
        ResultCode::Approved,
        40_000,
        Some(40_000),
    );
    check(&call(&mut c, &reload_req(capped, "l3", usd(10_000))).await, ResultCode::Approved, 10_000, Some(50_000));
    check(&call(&mut c, &reload_req(capped, "l4", usd(1))).await, ResultCode::MaxBalanceExceeded, 0, Some(50_000));
    let over = call(&mut c, &issue_in("6035719910003039", "io", "capped", 50_001, None, true)).await;
    check(&over, ResultCode::MaxBalanceExceeded, 0, None);
    let o = call(&mut c, &Request::Balance { number: num("6035719910003039") }).await;
    assert_eq!(o.result, ResultCode::CardNotFound, "a declined issue creates no card");

    // Reload needs an active card.
    check(&call(&mut c, &lock_req(n, "k1", LockReason::Fraud)).await, ResultCode::Approved, 0, Some(2_550));
    check(&call(&mut c, &reload_req(n, "l5", usd(100))).await, ResultCode::CardSuspended, 0, Some(2_550));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_and_unlock_with_reason() {
    let g = Giftd::start();
    let mut c = g.client().await;
    let n = "6035719910004011";
    issue(&mut c, n, usd(5_000)).await;
    let o = call(&mut c, &lock_req(n, "lock-1", LockReason::Lost)).await;
    check(&o, ResultCode::Approved, 0, Some(5_000));
    let v = o.card.unwrap();
    assert_eq!((v.status, v.reason), (Status::Suspended, LockReason::Lost));
    check(&redeem(&mut c, n, "r1", usd(100), false).await, ResultCode::CardSuspended, 0, Some(5_000));
    let l = lookup(&mut c, n).await;
    let lv = l.card.expect("card");
    assert_eq!((lv.status, lv.reason, lv.balance_minor), (Status::Suspended, LockReason::Lost, 5_000));
    // A second lock replaces the reason.
    let o = call(&mut c, &lock_req(n, "lock-2", LockReason::Stolen)).await;
    assert_eq!(o.card.unwrap().reason, LockReason::Stolen);

    let o = call(&mut c, &unlock_req(n, "unlock-1")).await;
    check(&o, ResultCode::Approved, 0, Some(5_000));
    let v = o.card.unwrap();
    assert_eq!((v.status, v.reason), (Status::Active, LockReason::None));
    check(&call(&mut c, &unlock_req(n, "unlock-2")).await, ResultCode::NotSuspended, 0, Some(5_000));
    check(&redeem(&mut c, n, "r2", usd(100), false).await, ResultCode::Approved, 100, Some(4_900));

    // An inactive card that is locked and unlocked returns to inactive, not active.
    let m = "6035719910004029";
    check(&call(&mut c, &issue_in(m, "im", "default", 0, None, false)).await, ResultCode::Approved, 0, Some(0));
    check(&call(&mut c, &lock_req(m, "lock-m", LockReason::CustomerRequest)).await, ResultCode::Approved, 0, Some(0));
    let o = call(&mut c, &unlock_req(m, "unlock-m")).await;
    assert_eq!((o.result, o.card.unwrap().status), (ResultCode::Approved, Status::Inactive));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_shows_record_and_recent_history_newest_first() {
    let g = Giftd::start();
    let mut c = g.client().await;
    let n = "6035719910005018";
    let expiry = now_ms() + 365 * DAY_MS;
    check(
        &call(&mut c, &issue_in(n, "issue", "default", 10_000, Some(expiry), true)).await,
        ResultCode::Approved,
        10_000,
        Some(10_000),
    );
    check(&redeem(&mut c, n, "r1", usd(1_000), false).await, ResultCode::Approved, 1_000, Some(9_000));
    check(&redeem(&mut c, n, "r2", usd(250), false).await, ResultCode::Approved, 250, Some(8_750));
    check(&call(&mut c, &reload_req(n, "l1", usd(500))).await, ResultCode::Approved, 500, Some(9_250));
    // A declined redeem is no history entry.
    check(&redeem(&mut c, n, "r3", usd(1_000_000), false).await, ResultCode::InsufficientFunds, 0, Some(9_250));
    check(&call(&mut c, &lock_req(n, "k1", LockReason::Fraud)).await, ResultCode::Approved, 0, Some(9_250));

    let l = lookup(&mut c, n).await;
    assert_eq!(l.result, ResultCode::Approved);
    assert_eq!(l.program, "default");
    assert_eq!(l.txn_count, 5);
    assert!(l.created_ms <= l.updated_ms, "{l:?}");
    let v = l.card.expect("card");
    assert_eq!((v.status, v.reason, v.expiry_ms), (Status::Suspended, LockReason::Fraud, Some(expiry)));
    assert_eq!((v.balance_minor, v.available_minor(), v.held_minor), (9_250, 9_250, 0));
    let got: Vec<(u64, TxnKind, i64, i64)> =
        l.recent.iter().map(|t| (t.seq, t.kind, t.amount_minor, t.balance_after_minor)).collect();
    assert_eq!(
        got,
        vec![
            (5, TxnKind::Lock, 0, 9_250),
            (4, TxnKind::Reload, 500, 9_250),
            (3, TxnKind::Redeem, -250, 8_750),
            (2, TxnKind::Redeem, -1_000, 9_000),
            (1, TxnKind::Issue, 10_000, 10_000),
        ]
    );
    assert!(l.recent.iter().all(|t| t.merchant == MERCHANT), "{:?}", l.recent);
    assert!(l.recent.windows(2).all(|w| w[0].at_ms >= w[1].at_ms), "{:?}", l.recent);

    let missing = lookup(&mut c, "6035719910005026").await;
    assert_eq!((missing.result, missing.card, missing.recent.len()), (ResultCode::CardNotFound, None, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_cover_every_entry_exactly_once() {
    let g = Giftd::start();
    let mut c = g.client().await;
    let n = "6035719910006016";
    issue(&mut c, n, usd(10_000)).await;
    let mut bal = 10_000;
    for i in 1..=23 {
        bal -= i;
        check(&redeem(&mut c, n, &format!("h{i}"), usd(i), false).await, ResultCode::Approved, i, Some(bal));
    }
    let total = 24u64;
    for limit in [1u16, 5, 6, 7, 23, 24, 100] {
        let (mut seen, mut before, mut pages) = (Vec::new(), 0u64, 0);
        loop {
            pages += 1;
            assert!(pages <= 30, "limit {limit}: paging does not end");
            let h = history(&mut c, n, before, limit).await;
            assert_eq!(h.result, ResultCode::Approved);
            assert_eq!(h.currency.map(|c| c.as_str().to_string()).as_deref(), Some("USD"));
            assert!(h.txns.len() <= limit as usize && !h.txns.is_empty(), "limit {limit}: page of {}", h.txns.len());
            seen.extend(h.txns.iter().map(|t| (t.seq, t.amount_minor, t.balance_after_minor)));
            if h.next_before_seq == 0 {
                break;
            }
            assert_eq!(h.next_before_seq, h.txns.last().unwrap().seq, "limit {limit}: cursor is the oldest seq shown");
            before = h.next_before_seq;
        }
        let seqs: Vec<u64> = seen.iter().map(|s| s.0).collect();
        assert_eq!(seqs, (1..=total).rev().collect::<Vec<_>>(), "limit {limit}: every entry once, newest first");
        assert_eq!(pages as u64, total.div_ceil(limit as u64), "limit {limit}: page count");
        // Each entry's balance follows from the one before it.
        for w in seen.windows(2) {
            assert_eq!(w[1].2 + w[0].1, w[0].2, "limit {limit}: entries {w:?}");
        }
    }
    // Lookup shows the newest entries, consecutive, newest first.
    let l = lookup(&mut c, n).await;
    assert_eq!(l.txn_count, total);
    let seqs: Vec<u64> = l.recent.iter().map(|t| t.seq).collect();
    assert!(!seqs.is_empty() && seqs.len() < total as usize, "{seqs:?}");
    assert_eq!(seqs, (total + 1 - seqs.len() as u64..=total).rev().collect::<Vec<_>>());
    // Past the oldest entry: an empty page, no cursor.
    let h = history(&mut c, n, 1, 10).await;
    assert_eq!((h.result, h.txns.len(), h.next_before_seq), (ResultCode::Approved, 0, 0));
    let h = history(&mut c, "6035719910006024", 0, 10).await;
    assert_eq!((h.result, h.currency, h.txns.len()), (ResultCode::CardNotFound, None, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_card_is_declined() {
    let g = Giftd::start();
    let mut c = g.client().await;
    let n = "6035719910007014";
    let past = now_ms() - DAY_MS;
    let o = call(&mut c, &issue_in(n, "issue", "default", 5_000, Some(past), true)).await;
    check(&o, ResultCode::Approved, 5_000, Some(5_000));
    assert_eq!(o.card.unwrap().status, Status::Expired);
    let v = view(&mut c, n).await;
    assert_eq!((v.status, v.expiry_ms, v.balance_minor), (Status::Expired, Some(past), 5_000));
    check(&redeem(&mut c, n, "r1", usd(100), true).await, ResultCode::CardExpired, 0, Some(5_000));
    check(&call(&mut c, &reload_req(n, "l1", usd(100))).await, ResultCode::CardExpired, 0, Some(5_000));
    assert_eq!(lookup(&mut c, n).await.card.unwrap().status, Status::Expired);

    // Expiry outranks inactivity: an expired inactive card cannot be activated.
    let i = "6035719910007030";
    let o = call(&mut c, &issue_in(i, "issue-i", "default", 0, Some(past), false)).await;
    assert_eq!(o.card.unwrap().status, Status::Expired);
    let act = Request::Activate { idem: idem(MERCHANT, "act-i"), number: num(i), load: Some(usd(500)) };
    check(&call(&mut c, &act).await, ResultCode::CardExpired, 0, Some(0));
    // A suspension is shown over the expiry, and lifting it leaves the card expired.
    check(&call(&mut c, &lock_req(n, "k1", LockReason::Stolen)).await, ResultCode::Approved, 0, Some(5_000));
    assert_eq!(view(&mut c, n).await.status, Status::Suspended);
    check(&redeem(&mut c, n, "r3", usd(100), false).await, ResultCode::CardSuspended, 0, Some(5_000));
    let o = call(&mut c, &unlock_req(n, "u1")).await;
    assert_eq!((o.result, o.card.unwrap().status), (ResultCode::Approved, Status::Expired));

    // One day left: still active.
    let m = "6035719910007022";
    let o = call(&mut c, &issue_in(m, "issue-m", "default", 5_000, Some(now_ms() + DAY_MS), true)).await;
    assert_eq!(o.card.unwrap().status, Status::Active);
    check(&redeem(&mut c, m, "r2", usd(100), false).await, ResultCode::Approved, 100, Some(4_900));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn currency_mismatch_is_declined_not_converted() {
    let g = Giftd::start();
    let mut c = g.client().await;
    let n = "6035719910008012";
    issue(&mut c, n, usd(10_000)).await;
    check(&redeem(&mut c, n, "r1", eur(100), false).await, ResultCode::CurrencyMismatch, 0, Some(10_000));
    check(&redeem(&mut c, n, "r2", eur(100), true).await, ResultCode::CurrencyMismatch, 0, Some(10_000));
    assert_eq!(balance(&mut c, n).await, 10_000);
    let e = "6035719910008020";
    check(&call(&mut c, &issue_req(e, eur(2_000))).await, ResultCode::Approved, 2_000, Some(2_000));
    check(&redeem(&mut c, e, "r3", eur(500), false).await, ResultCode::Approved, 500, Some(1_500));
    check(&redeem(&mut c, e, "r4", usd(500), false).await, ResultCode::CurrencyMismatch, 0, Some(1_500));
}

/// Sends `req` on `c` and returns the raw reply frame's opcode and body.
async fn raw_reply(c: &mut Client, req: &Request) -> (u8, Vec<u8>) {
    let id = c.tx.send(req);
    timed("flush", c.tx.flush()).await.expect("flush");
    let f = timed("reply", c.rx.recv_frame()).await.expect("reply frame");
    assert_eq!(f.header.request_id, id);
    (f.header.opcode, f.body.to_vec())
}

fn decode(op: u8, body: &[u8]) -> Outcome {
    match giftd::wire::decode_reply(op, body).expect("decodable") {
        Reply::Card(o) => o,
        other => panic!("expected a card outcome, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_retry_replays_identical_bytes_and_applies_once() {
    let mut g = Giftd::start();
    let n = "6035719910009010";
    let other = "6035719910009028";
    let mut c = g.client().await;
    issue(&mut c, n, usd(10_000)).await;
    issue(&mut c, other, usd(10_000)).await;

    let req = redeem_with_key(n, "pay-7781", 3_000);
    let first = raw_reply(&mut c, &req).await;
    check(&decode(first.0, &first.1), ResultCode::Approved, 3_000, Some(7_000));
    // The same request again, on this connection and on another: the same bytes, applied once.
    assert_eq!(raw_reply(&mut c, &req).await, first);
    let mut c2 = g.client().await;
    assert_eq!(raw_reply(&mut c2, &req).await, first);
    assert_eq!(balance(&mut c, n).await, 7_000);
    // An issue retried is replayed too (not card_exists).
    let issue_again = call(&mut c, &issue_req(n, usd(10_000))).await;
    check(&issue_again, ResultCode::Approved, 10_000, Some(10_000));

    // Same key, different content: declined, nothing applied.
    let mismatch = [
        redeem_with_key(n, "pay-7781", 3_100),
        redeem_with_key(other, "pay-7781", 3_000),
        Request::Redeem {
            idem: idem(MERCHANT, "pay-7781"),
            number: num(n),
            money: usd(3_000),
            allow_partial: true,
            invoice: None,
            pin: None,
        },
        Request::Reload { idem: idem(MERCHANT, "pay-7781"), number: num(n), money: usd(3_000) },
    ];
    for m in &mismatch {
        let o = call(&mut c, m).await;
        assert_eq!(o.result, ResultCode::IdempotencyMismatch, "{m:?}");
        assert_eq!(o.approved_minor, 0);
    }
    assert_eq!((balance(&mut c, n).await, balance(&mut c, other).await), (7_000, 10_000));
    // The key belongs to the merchant: another merchant's identical key is a new request.
    let m2 = Request::Redeem {
        idem: idem("m-other-88", "pay-7781"),
        number: num(n),
        money: usd(3_000),
        allow_partial: false,
        invoice: None,
        pin: None,
    };
    check(&call(&mut c, &m2).await, ResultCode::Approved, 3_000, Some(4_000));

    // A declined outcome is replayed as declined even once funds would suffice.
    let big = redeem_with_key(n, "pay-big", 5_000);
    let declined = raw_reply(&mut c, &big).await;
    check(&decode(declined.0, &declined.1), ResultCode::InsufficientFunds, 0, Some(4_000));
    check(&call(&mut c, &reload_req(n, "top-up", usd(10_000))).await, ResultCode::Approved, 10_000, Some(14_000));
    assert_eq!(raw_reply(&mut c, &big).await, declined);
    drop((c, c2));

    // Keys survive kill -9 and restart: replayed byte for byte, nothing applied again.
    g.restart();
    let mut c = g.client().await;
    assert_eq!(raw_reply(&mut c, &req).await, first);
    assert_eq!(raw_reply(&mut c, &big).await, declined);
    assert_eq!(call(&mut c, &mismatch[0]).await.result, ResultCode::IdempotencyMismatch);
    assert_eq!(balance(&mut c, n).await, 14_000);
    // And after a clean shutdown too.
    g.stop_cleanly();
    g.restart();
    let mut c = g.client().await;
    assert_eq!(raw_reply(&mut c, &req).await, first);
    assert_eq!(balance(&mut c, n).await, 14_000);
}

fn redeem_with_key(number: &str, key: &str, minor: i64) -> Request {
    crate::redeem_req(number, key, usd(minor), false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoice_required_and_used_once_per_merchant() {
    let mut g = Giftd::with_config("[programs.pos]\ninvoice_required = true\n");
    let mut c = g.client().await;
    let (n, n2) = ("6035719910010016", "6035719910010024");
    for (card, key) in [(n, "i1"), (n2, "i2")] {
        check(
            &call(&mut c, &issue_in(card, key, "pos", 10_000, None, true)).await,
            ResultCode::Approved,
            10_000,
            Some(10_000),
        );
    }
    let (a, b) = ("m-mall-a", "m-mall-b");
    check(&call(&mut c, &sale(n, a, "s0", 1_000, None)).await, ResultCode::InvoiceRequired, 0, Some(10_000));
    check(&call(&mut c, &sale(n, a, "s1", 1_000, Some("INV-1001"))).await, ResultCode::Approved, 1_000, Some(9_000));
    // Reused by the same merchant, with a new key, on this or another card: declined.
    check(&call(&mut c, &sale(n, a, "s2", 1_000, Some("INV-1001"))).await, ResultCode::InvoiceReused, 0, Some(9_000));
    check(&call(&mut c, &sale(n2, a, "s3", 1_000, Some("INV-1001"))).await, ResultCode::InvoiceReused, 0, Some(10_000));
    // Another merchant's invoice numbers are its own.
    check(&call(&mut c, &sale(n, b, "s4", 1_000, Some("INV-1001"))).await, ResultCode::Approved, 1_000, Some(8_000));
    // A declined sale does not use up its invoice number.
    check(
        &call(&mut c, &sale(n, a, "s5", 100_000, Some("INV-2002"))).await,
        ResultCode::InsufficientFunds,
        0,
        Some(8_000),
    );
    check(&call(&mut c, &sale(n, a, "s6", 500, Some("INV-2002"))).await, ResultCode::Approved, 500, Some(7_500));
    // A retry of the approved sale is a replay, not a reuse.
    check(&call(&mut c, &sale(n, a, "s1", 1_000, Some("INV-1001"))).await, ResultCode::Approved, 1_000, Some(9_000));
    assert_eq!(balance(&mut c, n).await, 7_500);
    drop(c);

    g.restart();
    let mut c = g.client().await;
    check(&call(&mut c, &sale(n, a, "s7", 100, Some("INV-1001"))).await, ResultCode::InvoiceReused, 0, Some(7_500));
    check(&call(&mut c, &sale(n, a, "s8", 100, Some("INV-2002"))).await, ResultCode::InvoiceReused, 0, Some(7_500));
    check(&call(&mut c, &sale(n, b, "s9", 100, Some("INV-1001"))).await, ResultCode::InvoiceReused, 0, Some(7_500));
    check(&call(&mut c, &sale(n, a, "s10", 100, Some("INV-3003"))).await, ResultCode::Approved, 100, Some(7_400));
    // Invoices are checked on cards whose program does not require them too.
    let d = "6035719910010032";
    issue(&mut c, d, usd(1_000)).await;
    check(&call(&mut c, &sale(d, a, "s11", 100, None)).await, ResultCode::Approved, 100, Some(900));
    check(&call(&mut c, &sale(d, a, "s12", 100, Some("INV-3003"))).await, ResultCode::InvoiceReused, 0, Some(900));
}

/// With a two-second memory window, keys and invoices leave memory while giftd runs; the store then
/// answers for them: the same replay, the same mismatch, the same invoice refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_invoices_are_answered_from_the_store_after_leaving_memory() {
    let g = Giftd::with_config("[limits]\nidem_memory_secs = 2\n");
    let mut c = g.client().await;
    let n = "6035719910020015";
    issue(&mut c, n, usd(10_000)).await;
    let first = raw_reply(&mut c, &redeem_with_key(n, "mem-1", 700)).await;
    check(
        &call(&mut c, &sale(n, MERCHANT, "mem-2", 300, Some("INV-77"))).await,
        ResultCode::Approved,
        300,
        Some(9_000),
    );
    // Wait (bounded) until a sweep has counted the keys in memory, then until one finds none left.
    let keys_in_memory = || async {
        let (_, text) = crate::http_get(g.metrics_addr(), "/metrics").await;
        text.lines().find_map(|l| l.strip_prefix("giftd_idempotency_keys_in_memory ")?.parse::<i64>().ok())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut seen = false;
    loop {
        match keys_in_memory().await {
            Some(k) if k >= 3 => seen = true,
            Some(0) if seen => break,
            _ => {}
        }
        assert!(std::time::Instant::now() < deadline, "keys never left memory (seen in memory: {seen})");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // In a batch, whose keys the store is asked for in one read before any item is decided: the
    // stored key replays, its other content is refused, a new key (twice) applies once.
    let items = [("mem-1", 700), ("mem-1", 701), ("mem-4", 100), ("mem-4", 100)]
        .map(|(key, minor)| giftd::wire::BatchItem::of(&redeem_with_key(n, key, minor)))
        .to_vec();
    let reply =
        timed("batch", c.call(&Request::Batch { mode: giftd::wire::BatchMode::Items, items })).await.expect("batch");
    let Reply::Batch(items) = reply else { panic!("{reply:?}") };
    let outcomes: Vec<Outcome> = items
        .into_iter()
        .map(|(_, r)| match r {
            Reply::Card(o) => o,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(outcomes[0], decode(first.0, &first.1), "the stored key replays its first outcome");
    check(&outcomes[1], ResultCode::IdempotencyMismatch, 0, None);
    check(&outcomes[2], ResultCode::Approved, 100, Some(8_900));
    assert_eq!(outcomes[3], outcomes[2], "the batch's own repeat replays");
    assert_eq!(raw_reply(&mut c, &redeem_with_key(n, "mem-1", 700)).await, first, "replayed byte for byte");
    check(&call(&mut c, &redeem_with_key(n, "mem-1", 701)).await, ResultCode::IdempotencyMismatch, 0, None);
    check(
        &call(&mut c, &sale(n, MERCHANT, "mem-3", 300, Some("INV-77"))).await,
        ResultCode::InvoiceReused,
        0,
        Some(8_900),
    );
    assert_eq!(balance(&mut c, n).await, 8_900, "nothing applied twice");
}

/// History entries of all cards share one id sequence, so each card's history is a chain through
/// other cards' entries; ids continue after a restart rather than starting again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_histories_stay_apart_across_a_restart() {
    let mut g = Giftd::start();
    let cards = ["6035719910007014", "6035719910007022", "6035719910007030"];
    let mut c = g.client().await;
    for n in cards {
        issue(&mut c, n, usd(1_000)).await;
    }
    // Card i is redeemed i+1 minor units each time, so every entry names its card.
    async fn round(c: &mut Client, cards: &[&str], r: u32) {
        for (i, n) in cards.iter().enumerate() {
            let req = redeem_with_key(n, &format!("il{r}-{i}"), i as i64 + 1);
            assert_eq!(call(c, &req).await.result, ResultCode::Approved);
        }
    }
    for r in 0..4 {
        round(&mut c, &cards, r).await;
    }
    drop(c);
    g.restart();
    let mut c = g.client().await;
    for r in 4..7 {
        round(&mut c, &cards, r).await;
    }
    for (i, n) in cards.iter().enumerate() {
        let step = i as i64 + 1;
        let h = history(&mut c, n, 0, 100).await;
        let got: Vec<(u64, i64, i64)> = h.txns.iter().map(|t| (t.seq, t.amount_minor, t.balance_after_minor)).collect();
        let mut want: Vec<(u64, i64, i64)> = (1..=7).map(|k| (k + 1, -step, 1_000 - step * k as i64)).collect();
        want.push((1, 1_000, 1_000));
        want.sort_by_key(|w| std::cmp::Reverse(w.0));
        assert_eq!(got, want, "card {i}: its own entries only, newest first, across the restart");
    }
}
