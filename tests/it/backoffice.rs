//! Back office over TCP: cash-out and register, and what a restart keeps of them.

use crate::holds::{authorize, void_req};
use crate::{call, check, idem, issue, num, timed, usd, view, Giftd, MERCHANT};
use giftd::client::Client;
use giftd::model::{ResultCode, Status, TxnKind};
use giftd::wire::{LookupReply, Reply, Request};

const CARD: &str = "6035719900009001";

fn cash_out_req(key: &str) -> Request {
    Request::CashOut { idem: idem(MERCHANT, key), number: num(CARD) }
}

fn register_req(key: &str, member: Option<&str>, vip: bool) -> Request {
    Request::Register { idem: idem("ops", key), number: num(CARD), member: member.map(str::to_string), vip }
}

async fn lookup(c: &mut Client) -> LookupReply {
    match timed("lookup", c.call(&Request::Lookup { number: num(CARD) })).await.expect("lookup") {
        Reply::Lookup(l) => l,
        other => panic!("expected a lookup reply, got {other:?}"),
    }
}

#[tokio::test]
async fn cash_out_settles_holds_first_then_closes_the_card_for_good() {
    let mut g = Giftd::start();
    let mut c = g.client().await;
    issue(&mut c, CARD, usd(4_250)).await;
    let hold = authorize(&mut c, CARD, "a1", usd(250), false, 600).await.hold.unwrap();
    check(&call(&mut c, &cash_out_req("x1")).await, ResultCode::HoldsOpen, 0, Some(4_250));
    check(&call(&mut c, &void_req("v1", hold.id)).await, ResultCode::Approved, 250, Some(4_250));
    let paid = call(&mut c, &cash_out_req("x2")).await;
    check(&paid, ResultCode::Approved, 4_250, Some(0));
    assert_eq!(paid.card.unwrap().status, Status::Closed);
    assert_eq!(call(&mut c, &cash_out_req("x2")).await, paid, "a retry answers as the first");
    check(&call(&mut c, &cash_out_req("x3")).await, ResultCode::CardClosed, 0, Some(0));
    let l = lookup(&mut c).await;
    assert_eq!(l.recent.first().map(|t| (t.kind, t.amount_minor)), Some((TxnKind::CashOut, -4_250)));
    // The payout left the ledger: a restart passes its conservation check and keeps the card closed.
    drop(c);
    g.kill9();
    g.restart();
    let mut c = g.client().await;
    let v = view(&mut c, CARD).await;
    assert_eq!((v.balance_minor, v.status), (0, Status::Closed));
}

#[tokio::test]
async fn cash_out_is_capped_by_the_program() {
    let g = Giftd::with_config("[programs.default]\ncash_out_max = \"40.00\"\n");
    let mut c = g.client().await;
    issue(&mut c, CARD, usd(4_001)).await;
    check(&call(&mut c, &cash_out_req("x1")).await, ResultCode::CashOutAboveLimit, 0, Some(4_001));
    crate::redeem(&mut c, CARD, "r1", usd(1), false).await;
    check(&call(&mut c, &cash_out_req("x2")).await, ResultCode::Approved, 4_000, Some(0));
}

#[tokio::test]
async fn register_sets_member_and_vip_and_survives_a_restart() {
    let mut g = Giftd::start();
    let mut c = g.client().await;
    issue(&mut c, CARD, usd(1_000)).await;
    let l = lookup(&mut c).await;
    assert_eq!((l.vip, l.member.as_str()), (false, ""));
    check(&call(&mut c, &register_req("g1", Some("M-1001"), true)).await, ResultCode::Approved, 0, Some(1_000));
    let l = lookup(&mut c).await;
    assert_eq!((l.vip, l.member.as_str()), (true, "M-1001"));
    assert_eq!(l.recent.first().map(|t| t.kind), Some(TxnKind::Register));
    drop(c);
    g.kill9();
    g.restart();
    let mut c = g.client().await;
    let l = lookup(&mut c).await;
    assert_eq!((l.vip, l.member.as_str()), (true, "M-1001"));
    check(&call(&mut c, &register_req("g2", None, false)).await, ResultCode::Approved, 0, None);
    let l = lookup(&mut c).await;
    assert_eq!((l.vip, l.member.as_str()), (false, ""));
}
