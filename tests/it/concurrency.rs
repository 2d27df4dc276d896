//! Many clients racing on one card: no overdraft, every approval accounted for exactly, and the
//! once-only rules (idempotency keys, invoices, card numbers) hold under contention.

use crate::{balance, call, idem, issue, num, redeem_req, timed, usd, Giftd, MERCHANT};
use giftd::client::Client;
use giftd::model::{Outcome, ResultCode};
use giftd::wire::Request;
use rand::Rng;
use std::sync::Arc;
use tokio::sync::Barrier;

const CLIENTS: usize = 64;
const REDEEMS_PER_CLIENT: usize = 8;

/// `clients` tasks, each with its own connection; once all are connected, task `t` sends
/// `make(t, 0..per_client)` one after the other. Returns every (request, outcome).
async fn race<F>(g: &Giftd, clients: usize, per_client: usize, make: F) -> Vec<(Request, Outcome)>
where
    F: Fn(usize, usize) -> Request + Send + Sync + 'static,
{
    let (barrier, make) = (Arc::new(Barrier::new(clients)), Arc::new(make));
    let tasks: Vec<_> = (0..clients)
        .map(|t| {
            let (addr, barrier, make) = (g.addr().to_string(), barrier.clone(), make.clone());
            tokio::spawn(async move {
                let mut c = timed("connect", Client::connect(&addr)).await.expect("connect");
                // Everyone connected before anyone sends, so the requests really race.
                barrier.wait().await;
                let mut out = Vec::with_capacity(per_client);
                for i in 0..per_client {
                    let req = make(t, i);
                    let o = call(&mut c, &req).await;
                    out.push((req, o));
                }
                out
            })
        })
        .collect();
    let mut all = Vec::with_capacity(clients * per_client);
    for t in tasks {
        all.extend(timed("client task", t).await.expect("client task panicked"));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_redeems_never_overdraw_one_card() {
    let g = Giftd::start();
    let n = "6035719920000018";
    let initial = 5_000;
    issue(&mut g.client().await, n, usd(initial)).await;

    let results = race(&g, CLIENTS, REDEEMS_PER_CLIENT, move |t, i| {
        let mut rng = rand::thread_rng();
        redeem_req(n, &format!("race-{t}-{i}"), usd(rng.gen_range(1..=300)), rng.gen_bool(0.3))
    })
    .await;
    assert_eq!(results.len(), CLIENTS * REDEEMS_PER_CLIENT);

    let mut approved = Vec::new();
    for (req, o) in &results {
        let Request::Redeem { money, allow_partial: partial, .. } = req else { unreachable!() };
        let amount = money.minor;
        let card = o.card.expect("a redeem on an existing card reports it");
        assert!(card.balance_minor >= 0, "{o:?}");
        match o.result {
            ResultCode::Approved => {
                assert!(o.approved_minor > 0 && o.approved_minor <= amount, "{o:?} for {amount}");
                if !partial {
                    assert_eq!(o.approved_minor, amount, "full approval without allow_partial: {o:?}");
                } else if o.approved_minor < amount {
                    assert_eq!(card.balance_minor, 0, "a partial approval takes everything available: {o:?}");
                }
                approved.push((card.balance_minor, o.approved_minor));
            }
            ResultCode::InsufficientFunds => {
                assert_eq!(o.approved_minor, 0);
                assert!(card.available_minor() < amount, "declined although {amount} was available: {o:?}");
                if *partial {
                    assert_eq!(card.available_minor(), 0, "partial declined with funds left: {o:?}");
                }
            }
            other => panic!("unexpected result {other:?}: {o:?}"),
        }
    }
    let total: i64 = approved.iter().map(|a| a.1).sum();
    let fin = balance(&mut g.client().await, n).await;
    assert!(fin >= 0);
    assert_eq!(initial - total, fin, "Σ approved must equal the balance drop exactly");
    // Linearizable: the approvals, ordered by the balance they left, form one unbroken chain.
    approved.sort_by_key(|a| std::cmp::Reverse(a.0));
    let mut before = initial;
    for (after, amount) in &approved {
        assert_eq!(before - amount, *after, "approvals do not chain: {approved:?}");
        before = *after;
    }
    assert_eq!(before, fin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_retries_of_one_key_apply_once() {
    let g = Giftd::start();
    let n = "6035719920001016";
    issue(&mut g.client().await, n, usd(10_000)).await;
    // 32 connections send the very same request (same key, same content) 4 times each.
    let results = race(&g, 32, 4, move |_, _| redeem_req(n, "same-key-1", usd(700), false)).await;
    let first = results[0].1;
    assert_eq!((first.result, first.approved_minor), (ResultCode::Approved, 700));
    assert!(results.iter().all(|(_, o)| *o == first), "every retry gets the one original outcome");
    assert_eq!(balance(&mut g.client().await, n).await, 9_300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_sales_with_one_invoice_approve_once() {
    let g = Giftd::with_config("[programs.pos]\ninvoice_required = true\n");
    let cards = ["6035719920002014", "6035719920002022"];
    let mut c = g.client().await;
    for (i, n) in cards.iter().enumerate() {
        let req = Request::Issue {
            idem: idem(MERCHANT, &format!("inv-issue-{i}")),
            number: Some(num(n)),
            program: "pos".into(),
            money: usd(10_000),
            expiry_ms: None,
            active: true,
            virtual_card: false,
            email: None,
            case: None,
        };
        assert_eq!(call(&mut c, &req).await.result, ResultCode::Approved);
    }
    // 32 connections, different keys, both cards, one invoice number of one merchant.
    let results = race(&g, 32, 1, move |t, _| Request::Redeem {
        idem: idem(MERCHANT, &format!("inv-race-{t}")),
        number: num(cards[t % 2]),
        money: usd(100),
        allow_partial: false,
        invoice: Some("INV-RACE-1".into()),
        pin: None,
    })
    .await;
    let approved = results.iter().filter(|(_, o)| o.result == ResultCode::Approved).count();
    let reused = results.iter().filter(|(_, o)| o.result == ResultCode::InvoiceReused).count();
    assert_eq!((approved, reused), (1, 31), "{results:?}");
    let total = balance(&mut c, cards[0]).await + balance(&mut c, cards[1]).await;
    assert_eq!(total, 20_000 - 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_issues_of_one_number_create_one_card() {
    let g = Giftd::start();
    let n = "6035719920003012";
    let results = race(&g, 32, 1, move |t, _| Request::Issue {
        idem: idem(MERCHANT, &format!("issue-race-{t}")),
        number: Some(num(n)),
        program: "default".into(),
        money: usd(1_000 + t as i64),
        expiry_ms: None,
        active: true,
        virtual_card: false,
        email: None,
        case: None,
    })
    .await;
    let winners: Vec<&(Request, Outcome)> = results.iter().filter(|(_, o)| o.result == ResultCode::Approved).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let won = winners[0].1.approved_minor;
    for (_, o) in &results {
        if o.result != ResultCode::Approved {
            assert_eq!(o.result, ResultCode::CardExists, "{o:?}");
            assert_eq!(o.card.expect("card_exists shows the card").balance_minor, won);
        }
    }
    assert_eq!(balance(&mut g.client().await, n).await, won);
}

/// Authorizations, captures, voids, redeems and split redeems racing on the same three cards from
/// many clients: no card ever shows a negative available amount, and every cent is accounted for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_captures_and_redeems_race_without_overdraft() {
    use crate::holds::{authorize_req, capture_req, void_req};
    use crate::payments::split_req;
    use giftd::engine::SplitOrder;
    use giftd::wire::Reply;

    const CARDS: [&str; 3] = ["6035719920000216", "6035719920000224", "6035719920000232"];
    const INITIAL: i64 = 20_000;
    let g = Giftd::start();
    {
        let mut c = g.client().await;
        for n in CARDS {
            issue(&mut c, n, usd(INITIAL)).await;
        }
    }
    let barrier = Arc::new(Barrier::new(CLIENTS / 2));
    let tasks: Vec<_> = (0..CLIENTS / 2)
        .map(|t| {
            let (addr, barrier) = (g.addr().to_string(), barrier.clone());
            tokio::spawn(async move {
                let mut c = timed("connect", Client::connect(&addr)).await.expect("connect");
                barrier.wait().await;
                // (debited by redeems, captures and splits; holds this client still has open)
                let (mut debited, mut open) = (0i64, Vec::new());
                for i in 0..12 {
                    let (card, amount) = {
                        let mut rng = rand::thread_rng();
                        (CARDS[rng.gen_range(0..3)], rng.gen_range(1..=1_500))
                    };
                    let choice = rand::thread_rng().gen_range(0..4);
                    let reply = match choice {
                        0 => {
                            let req = authorize_req(card, &format!("a{t}-{i}"), usd(amount), true, 600);
                            timed("authorize", c.call(&req)).await.expect("authorize")
                        }
                        1 if !open.is_empty() => {
                            let (hold, held): (u64, i64) = open.remove(0);
                            let take = held / 2 + 1;
                            let reply = timed("capture", c.call(&capture_req(&format!("c{t}-{i}"), hold, usd(take))))
                                .await
                                .expect("capture");
                            assert_eq!(reply.result(), ResultCode::Approved, "capture of an open hold: {reply:?}");
                            reply
                        }
                        2 => {
                            let req = split_req(&format!("s{t}-{i}"), &CARDS, usd(amount), SplitOrder::Smallest);
                            timed("split", c.call(&req)).await.expect("split")
                        }
                        _ => timed("redeem", c.call(&redeem_req(card, &format!("r{t}-{i}"), usd(amount), true)))
                            .await
                            .expect("redeem"),
                    };
                    match reply {
                        Reply::Hold(o) if o.result == ResultCode::Approved => {
                            let h = o.hold.expect("approved authorization carries its hold");
                            open.push((h.id, h.amount_minor));
                        }
                        Reply::Card(o) if o.result == ResultCode::Approved => {
                            let v = o.card.expect("approved card outcome has the card");
                            assert!(v.held_minor <= v.balance_minor, "held above balance: {o:?}");
                            debited += o.approved_minor;
                        }
                        Reply::Parts(p) if p.result == ResultCode::Approved => debited += p.approved_minor,
                        other => assert!(
                            matches!(other.result(), ResultCode::InsufficientFunds),
                            "unexpected answer {other:?}"
                        ),
                    }
                }
                // Release what is still held, so the cards end with nothing held.
                for (n, (hold, held)) in open.into_iter().enumerate() {
                    let reply = timed("void", c.call(&void_req(&format!("v{t}-{n}"), hold))).await.expect("void");
                    match reply {
                        Reply::Card(o) => assert_eq!((o.result, o.approved_minor), (ResultCode::Approved, held)),
                        other => panic!("void: {other:?}"),
                    }
                }
                debited
            })
        })
        .collect();
    let mut debited = 0;
    for t in tasks {
        debited += timed("client task", t).await.expect("client task panicked");
    }
    let mut c = g.client().await;
    let mut left = 0;
    for n in CARDS {
        let v = crate::view(&mut c, n).await;
        assert_eq!(v.held_minor, 0, "every hold was captured or voided");
        assert!(v.balance_minor >= 0);
        left += v.balance_minor;
    }
    assert_eq!(left + debited, 3 * INITIAL, "conservation: Σ loaded = Σ balances + redeemed + captured");
}
