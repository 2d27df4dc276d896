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

const NEW_CARD: &str = "6035719900009002";

fn transfer_req(key: &str) -> Request {
    Request::Transfer { idem: idem("ops", key), number: num(CARD), to: num(NEW_CARD) }
}

#[tokio::test]
async fn transfer_moves_a_lost_cards_balance_and_closes_it() {
    use crate::payments::parts;
    let g = Giftd::start();
    let mut c = g.client().await;
    issue(&mut c, CARD, usd(7_500)).await;
    issue(&mut c, NEW_CARD, usd(500)).await;
    let lock = Request::Lock { idem: idem("ops", "l1"), number: num(CARD), reason: giftd::model::LockReason::Lost };
    check(&call(&mut c, &lock).await, ResultCode::Approved, 0, Some(7_500));
    let p = parts(&mut c, &transfer_req("t1")).await;
    assert_eq!((p.result, p.approved_minor), (ResultCode::Approved, 7_500));
    let items: Vec<(i64, i64)> =
        p.parts.unwrap().items.iter().map(|i| (i.amount_minor, i.balance_after_minor)).collect();
    assert_eq!(items, [(-7_500, 0), (7_500, 8_000)]);
    let old = view(&mut c, CARD).await;
    assert_eq!((old.balance_minor, old.status), (0, Status::Closed));
    assert_eq!(view(&mut c, NEW_CARD).await.balance_minor, 8_000);
    let again = parts(&mut c, &transfer_req("t2")).await;
    assert_eq!(again.result, ResultCode::CardClosed);
}

/// kill -9 while transfers are in flight: after the restart, each pair of cards either both
/// changed or neither did, and every acknowledged transfer is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_in_flight_at_kill9_are_all_or_nothing() {
    const PAIRS: usize = 300;
    let mut g = Giftd::start();
    let mut c = g.client().await;
    // Different last six digits: issue_req keys by them.
    let from = |i: usize| format!("6035719910{i:06}");
    let to = |i: usize| format!("6035719920{:06}", 500_000 + i);
    let mut issues = Vec::new();
    for i in 0..PAIRS {
        issues.push(crate::issue_req(&from(i), usd(1_000 + i as i64)));
        issues.push(crate::issue_req(&to(i), usd(100)));
    }
    for o in crate::crash::pipeline(&mut c, &issues).await {
        assert_eq!(o.result, ResultCode::Approved);
    }
    // Pipelined transfers on one connection; kill once some are acknowledged.
    let (mut tx, mut rx) = c.into_split();
    let reqs: Vec<Request> = (0..PAIRS)
        .map(|i| Request::Transfer { idem: idem("ops", &format!("t{i}")), number: num(&from(i)), to: num(&to(i)) })
        .collect();
    let ids: Vec<u64> = reqs.iter().map(|r| tx.send(r)).collect();
    timed("flush", tx.flush()).await.expect("flush");
    let mut acked = 0;
    for id in ids.iter().take(20) {
        let (got, reply) = timed("transfer reply", rx.recv()).await.expect("reply");
        assert_eq!((got, reply.result()), (*id, ResultCode::Approved));
        acked += 1;
    }
    g.kill9();
    g.restart();
    let mut c = g.client().await;
    let (mut moved, mut stayed) = (0, 0);
    for i in 0..PAIRS {
        let (a, b) = (view(&mut c, &from(i)).await, view(&mut c, &to(i)).await);
        let initial = 1_000 + i as i64;
        match (a.balance_minor, a.status, b.balance_minor) {
            (0, Status::Closed, bal) if bal == 100 + initial => moved += 1,
            (bal, Status::Active, 100) if bal == initial => {
                assert!(i >= acked, "acknowledged transfer {i} was lost");
                stayed += 1;
            }
            other => panic!("pair {i} is half-moved: {other:?}"),
        }
    }
    eprintln!("{acked} acknowledged, {moved} moved, {stayed} not moved");
    assert_eq!(moved + stayed, PAIRS);
    assert!(moved >= acked, "{moved} moved, {acked} acknowledged");
}

fn note_req(key: &str, author: &str, text: &str) -> Request {
    Request::Note { idem: idem(author, key), number: num(CARD), text: text.into() }
}

#[tokio::test]
async fn notes_are_appended_newest_first_and_survive_a_crash() {
    let mut g = Giftd::start();
    let mut c = g.client().await;
    issue(&mut c, CARD, usd(1_000)).await;
    check(&call(&mut c, &note_req("n1", "ops-ann", "Customer called: card lost")).await, ResultCode::Approved, 0, None);
    check(&call(&mut c, &note_req("n2", "ops-bob", "Replacement sent – case 77")).await, ResultCode::Approved, 0, None);
    // A retry writes nothing more.
    call(&mut c, &note_req("n2", "ops-bob", "Replacement sent – case 77")).await;
    let texts = |l: &LookupReply| -> Vec<(String, String)> {
        l.notes.iter().map(|n| (n.author.clone(), n.text.clone())).collect()
    };
    let want = vec![
        ("ops-bob".to_string(), "Replacement sent – case 77".to_string()),
        ("ops-ann".to_string(), "Customer called: card lost".to_string()),
    ];
    assert_eq!(texts(&lookup(&mut c).await), want);
    drop(c);
    g.kill9();
    g.restart();
    let mut c = g.client().await;
    let l = lookup(&mut c).await;
    assert_eq!(texts(&l), want);
    assert_eq!(l.recent.first().map(|t| t.kind), Some(TxnKind::Note));
    // A transfer leaves a note on the card it closes, naming the card that got the balance.
    issue(&mut c, NEW_CARD, usd(0)).await;
    crate::payments::parts(&mut c, &transfer_req("t1")).await;
    let l = lookup(&mut c).await;
    assert_eq!(l.notes.len(), 3);
    assert_eq!(l.notes[0].text, "Balance of 10.00 USD transferred to card ending 9002; card closed");
}

#[tokio::test]
async fn reactivation_over_tcp_answers_with_its_reason_and_leaves_a_note() {
    let g = Giftd::start();
    let mut c = g.client().await;
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let expired = |number: &str, hours_ago: i64, key: &str| Request::Issue {
        idem: idem(MERCHANT, key),
        number: Some(num(number)),
        program: "default".into(),
        money: usd(2_000),
        expiry_ms: Some(now_ms - hours_ago * 3_600_000 - 60_000),
        active: true,
        virtual_card: false,
        email: None,
        case: None,
    };
    call(&mut c, &expired(CARD, 30, "i1")).await;
    call(&mut c, &expired(NEW_CARD, 2, "i2")).await;
    let react = |number: &str, key: &str| Request::Reactivate { idem: idem("ops", key), number: num(number) };
    let explained = |reply: Reply| match reply {
        Reply::Explained(o, reason) => (o, reason),
        other => panic!("expected an explained reply, got {other:?}"),
    };
    let (o, why) = explained(timed("reactivate", c.call(&react(CARD, "re1"))).await.unwrap());
    assert_eq!(o.result, ResultCode::NotEligible);
    assert_eq!(why, "expired 30 h ago, not VIP: not eligible for reactivation (grace 24 h)");
    let (o, why) = explained(timed("reactivate", c.call(&react(NEW_CARD, "re2"))).await.unwrap());
    assert_eq!((o.result, why.as_str()), (ResultCode::Approved, "Reactivated per policy – expired <24h"));
    assert_eq!(o.card.unwrap().status, Status::Active);
    // Once VIP, the card expired 30 h ago is eligible.
    check(&call(&mut c, &register_req("g1", None, true)).await, ResultCode::Approved, 0, None);
    let (o, why) = explained(timed("reactivate", c.call(&react(CARD, "re3"))).await.unwrap());
    assert_eq!((o.result, why.as_str()), (ResultCode::Approved, "Reactivated per policy – VIP customer"));
    let l = lookup(&mut c).await;
    assert_eq!(l.notes.first().map(|n| n.text.as_str()), Some("Reactivated per policy – VIP customer"));
    // The reactivation and its note are two entries of one decision; the card's history, read
    // back along its chain, shows both (the note names the reactivation as the entry before it).
    let kinds: Vec<TxnKind> = l.recent.iter().map(|t| t.kind).collect();
    assert_eq!(kinds[..4], [TxnKind::Note, TxnKind::Reactivate, TxnKind::Register, TxnKind::Issue], "{kinds:?}");
    assert_eq!(l.txn_count as usize, l.recent.len(), "every entry is on the chain");
    // The decline's retry gives the same sentence.
    let (_, again) = explained(timed("reactivate", c.call(&react(CARD, "re1"))).await.unwrap());
    assert_eq!(again, "expired 30 h ago, not VIP: not eligible for reactivation (grace 24 h)");
}

#[tokio::test]
async fn history_filters_by_kind_and_pages_through() {
    let g = Giftd::start();
    let mut c = g.client().await;
    issue(&mut c, CARD, usd(10_000)).await;
    for i in 0..7 {
        crate::redeem(&mut c, CARD, &format!("r{i}"), usd(100 + i), false).await;
        call(&mut c, &note_req(&format!("n{i}"), "ops", &format!("note {i}"))).await;
    }
    let page = |before_seq, kind| Request::History { number: num(CARD), before_seq, limit: 3, kind };
    let mut amounts = Vec::new();
    let mut before = 0;
    for _ in 0..10 {
        let h = match timed("history", c.call(&page(before, Some(TxnKind::Redeem)))).await.unwrap() {
            Reply::History(h) => h,
            other => panic!("{other:?}"),
        };
        assert!(h.txns.iter().all(|t| t.kind == TxnKind::Redeem), "{h:?}");
        amounts.extend(h.txns.iter().map(|t| t.amount_minor));
        before = h.next_before_seq;
        if before == 0 {
            break;
        }
    }
    assert_eq!(amounts, [-106, -105, -104, -103, -102, -101, -100], "every redeem once, newest first");
    let notes = match timed("history", c.call(&page(0, Some(TxnKind::Note)))).await.unwrap() {
        Reply::History(h) => h.txns.len(),
        other => panic!("{other:?}"),
    };
    assert_eq!(notes, 3);
}
