//! Refunds, reversals and split tender over TCP, and what survives a restart of them.

use crate::holds::{authorize, capture_req};
use crate::{call, check, idem, issue, num, redeem, timed, usd, view, Giftd, MERCHANT};
use giftd::client::Client;
use giftd::engine::SplitOrder;
use giftd::model::{Money, ResultCode};
use giftd::wire::{PartsReply, Reply, Request};

const A: &str = "6035719900008001";
const B: &str = "6035719900008002";
const C: &str = "6035719900008003";

pub fn refund_req(number: &str, key: &str, money: Money, original: Option<&str>) -> Request {
    Request::Refund { idem: idem(MERCHANT, key), number: num(number), money, original: original.map(str::to_string) }
}

pub fn reverse_req(key: &str, original: &str) -> Request {
    Request::Reverse { idem: idem(MERCHANT, key), original: original.into() }
}

pub fn split_req(key: &str, numbers: &[&str], money: Money, order: SplitOrder) -> Request {
    Request::SplitRedeem { idem: idem(MERCHANT, key), money, order, numbers: numbers.iter().map(|n| num(n)).collect() }
}

/// Sends a request whose reply lists parts (reverse, split redeem).
pub async fn parts(c: &mut Client, req: &Request) -> PartsReply {
    match timed("parts", c.call(req)).await.expect("call") {
        Reply::Parts(p) => p,
        other => panic!("expected a parts reply, got {other:?}"),
    }
}

/// (last4, amount, balance after) of each part.
fn items(p: &PartsReply) -> Vec<(String, i64, i64)> {
    let parts = p.parts.as_ref().unwrap_or_else(|| panic!("no parts in {p:?}"));
    parts
        .items
        .iter()
        .map(|i| (String::from_utf8_lossy(&i.last4).into_owned(), i.amount_minor, i.balance_after_minor))
        .collect()
}

#[tokio::test]
async fn refunds_are_capped_by_what_the_spend_took() {
    let g = Giftd::start();
    let mut c = g.client().await;
    issue(&mut c, A, usd(10_000)).await;
    check(&redeem(&mut c, A, "r1", usd(4_000), false).await, ResultCode::Approved, 4_000, Some(6_000));
    check(&call(&mut c, &refund_req(A, "f1", usd(1_500), Some("r1"))).await, ResultCode::Approved, 1_500, Some(7_500));
    let over = call(&mut c, &refund_req(A, "f2", usd(2_501), Some("r1"))).await;
    check(&over, ResultCode::RefundExceedsOriginal, 0, Some(7_500));
    check(&call(&mut c, &refund_req(A, "f3", usd(2_500), Some("r1"))).await, ResultCode::Approved, 2_500, Some(10_000));
    // A retry is answered, not applied again.
    check(&call(&mut c, &refund_req(A, "f3", usd(2_500), Some("r1"))).await, ResultCode::Approved, 2_500, Some(10_000));
    assert_eq!(view(&mut c, A).await.balance_minor, 10_000);
    let unknown = call(&mut c, &refund_req(A, "f4", usd(1), Some("never-sent"))).await;
    check(&unknown, ResultCode::OriginalNotFound, 0, None);
    let unreferenced = call(&mut c, &refund_req(A, "f5", usd(1), None)).await;
    check(&unreferenced, ResultCode::RefundReferenceRequired, 0, Some(10_000));

    // A capture is refundable too, up to what it took.
    let hold = authorize(&mut c, A, "a1", usd(3_000), false, 600).await.hold.unwrap();
    check(&call(&mut c, &capture_req("c1", hold.id, usd(2_000))).await, ResultCode::Approved, 2_000, Some(8_000));
    check(
        &call(&mut c, &refund_req(A, "f6", usd(2_001), Some("c1"))).await,
        ResultCode::RefundExceedsOriginal,
        0,
        None,
    );
    check(&call(&mut c, &refund_req(A, "f7", usd(2_000), Some("c1"))).await, ResultCode::Approved, 2_000, Some(10_000));
}

#[tokio::test]
async fn unreferenced_refunds_where_the_program_allows_them() {
    let g = Giftd::with_config("[programs.default]\nunreferenced_refunds = true\nmax_balance = \"150.00\"\n");
    let mut c = g.client().await;
    issue(&mut c, A, usd(10_000)).await;
    check(&call(&mut c, &refund_req(A, "f1", usd(2_500), None)).await, ResultCode::Approved, 2_500, Some(12_500));
    // Without an original to cap it, the program's maximum balance does.
    let over = call(&mut c, &refund_req(A, "f2", usd(2_501), None)).await;
    check(&over, ResultCode::MaxBalanceExceeded, 0, Some(12_500));
}

#[tokio::test]
async fn reversal_undoes_once_and_a_second_gets_the_first_answer() {
    let g = Giftd::start();
    let mut c = g.client().await;
    issue(&mut c, A, usd(10_000)).await;
    redeem(&mut c, A, "r1", usd(2_000), false).await;
    let first = parts(&mut c, &reverse_req("v1", "r1")).await;
    assert_eq!((first.result, first.approved_minor), (ResultCode::Approved, 2_000));
    assert_eq!(items(&first), vec![("8001".into(), 2_000, 10_000)]);
    let retry = parts(&mut c, &reverse_req("v1", "r1")).await;
    assert_eq!(retry, first, "a retry of the reversal");
    let second = parts(&mut c, &reverse_req("v2", "r1")).await;
    assert_eq!(second, first, "another reversal of the same redeem: the first one's answer");
    assert_eq!(view(&mut c, A).await.balance_minor, 10_000);
    let refund = call(&mut c, &refund_req(A, "f1", usd(1), Some("r1"))).await;
    check(&refund, ResultCode::AlreadyReversed, 0, Some(10_000));

    // A reload that was spent since cannot be taken back.
    check(
        &call(&mut c, &Request::Reload { idem: idem(MERCHANT, "l1"), number: num(A), money: usd(500) }).await,
        ResultCode::Approved,
        500,
        Some(10_500),
    );
    redeem(&mut c, A, "r2", usd(10_100), false).await;
    let refused = parts(&mut c, &reverse_req("v3", "l1")).await;
    assert_eq!((refused.result, refused.parts), (ResultCode::InsufficientFunds, None));
}

#[tokio::test]
async fn a_reversal_that_comes_first_bars_its_original() {
    let mut g = Giftd::start();
    let mut c = g.client().await;
    issue(&mut c, A, usd(10_000)).await;
    // The processor timed out on "r-late" and reversed it; the redeem itself arrives afterwards.
    let early = parts(&mut c, &reverse_req("v1", "r-late")).await;
    assert_eq!((early.result, early.approved_minor, early.parts), (ResultCode::Approved, 0, None));
    let late = redeem(&mut c, A, "r-late", usd(1_000), false).await;
    check(&late, ResultCode::OriginalReversed, 0, None);
    // Also after a crash: the bar is durable.
    drop(c);
    g.kill9();
    g.restart();
    let mut c = g.client().await;
    check(&redeem(&mut c, A, "r-late", usd(1_000), false).await, ResultCode::OriginalReversed, 0, None);
    assert_eq!(view(&mut c, A).await.balance_minor, 10_000);
}

#[tokio::test]
async fn split_redeem_is_all_or_nothing_and_reverses_part_by_part() {
    let mut g = Giftd::start();
    let mut c = g.client().await;
    issue(&mut c, A, usd(5_000)).await;
    issue(&mut c, B, usd(2_000)).await;
    issue(&mut c, C, usd(1_000)).await;
    let s = parts(&mut c, &split_req("s1", &[A, B, C], usd(6_500), SplitOrder::Smallest)).await;
    assert_eq!((s.result, s.approved_minor), (ResultCode::Approved, 6_500));
    assert_eq!(items(&s), vec![("8003".into(), -1_000, 0), ("8002".into(), -2_000, 0), ("8001".into(), -3_500, 1_500)]);
    // More than the cards hold together: nothing is taken from any.
    let none = parts(&mut c, &split_req("s2", &[A, B], usd(1_501), SplitOrder::Given)).await;
    assert_eq!((none.result, none.parts), (ResultCode::InsufficientFunds, None));
    assert_eq!(view(&mut c, A).await.balance_minor, 1_500);
    let missing = parts(&mut c, &split_req("s3", &[A, "6035719900008999"], usd(1), SplitOrder::Given)).await;
    assert_eq!(missing.result, ResultCode::CardNotFound);

    // Refund one card's part, then reverse the rest, across a crash.
    check(&call(&mut c, &refund_req(B, "f1", usd(500), Some("s1"))).await, ResultCode::Approved, 500, Some(500));
    drop(c);
    g.kill9();
    g.restart();
    let mut c = g.client().await;
    let v = parts(&mut c, &reverse_req("v1", "s1")).await;
    assert_eq!((v.result, v.approved_minor), (ResultCode::Approved, 6_000));
    assert_eq!(
        items(&v),
        vec![("8003".into(), 1_000, 1_000), ("8002".into(), 1_500, 2_000), ("8001".into(), 3_500, 5_000)]
    );
    for (n, want) in [(A, 5_000), (B, 2_000), (C, 1_000)] {
        assert_eq!(view(&mut c, n).await.balance_minor, want);
    }
    // The split's retry still answers as it first did.
    let again = parts(&mut c, &split_req("s1", &[A, B, C], usd(6_500), SplitOrder::Smallest)).await;
    assert_eq!(again, s);
}
