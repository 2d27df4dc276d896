//! Clients, roles and rates over TCP: a giftd with `[[clients]]` answers nothing but the handshake
//! until a connection authenticates; a wrong proof closes it; each role does only what it may, a
//! bound client only under its own merchant id and its own events; rates refuse with
//! `rate_limited`, change nothing, and are counted; and SIGTERM with a delay turns `/readyz` to 503
//! while giftd still serves.

use crate::events::redeem_as;
use crate::giftctl;
use crate::{balance, call, http_get, idem, issue, metric, num, timed, usd, Giftd, MERCHANT};
use giftd::client::{Client, Credentials};
use giftd::engine::access::Role;
use giftd::model::{LockReason, ResultCode};
use giftd::wire::{BatchItem, BatchMode, EventView, Reply, Request};
use std::time::{Duration, Instant};

/// Four clients, one per role; client `n`'s key is 32 bytes of `n`.
const CLIENTS: &str = r#"
[[clients]]
name = "head-office"
role = "operator"
key_hex = "0101010101010101010101010101010101010101010101010101010101010101"

[[clients]]
name = "proc-1"
role = "processor"
key_hex = "0202020202020202020202020202020202020202020202020202020202020202"

[[clients]]
name = "pos-1"
role = "merchant"
merchant = "m-1"
key_hex = "0303030303030303030303030303030303030303030303030303030303030303"

[[clients]]
name = "res-1"
role = "reseller"
merchant = "r-1"
key_hex = "0404040404040404040404040404040404040404040404040404040404040404"
"#;

fn operator() -> Credentials {
    Credentials::new("head-office", [1; 32])
}
fn processor() -> Credentials {
    Credentials::new("proc-1", [2; 32])
}
fn merchant() -> Credentials {
    Credentials::new("pos-1", [3; 32])
}
fn reseller() -> Credentials {
    Credentials::new("res-1", [4; 32])
}

async fn code(c: &mut Client, req: &Request) -> ResultCode {
    timed("call", c.call(req)).await.expect("call").result()
}

fn issue_as(merchant: &str, number: &str, key: &str) -> Request {
    Request::Issue {
        idem: idem(merchant, key),
        number: Some(num(number)),
        program: "default".into(),
        money: usd(5_000),
        expiry_ms: None,
        active: false,
        virtual_card: false,
        email: None,
        case: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_must_authenticate_and_a_wrong_proof_closes_it() {
    let g = Giftd::with_config(CLIENTS);
    let n = "6035718880000011";
    issue(&mut g.client_as(&operator()).await, n, usd(10_000)).await;

    // Handshaken but not authenticated: every operation, a batch as a whole, is refused and the
    // connection stays open.
    let mut c = g.client().await;
    assert_eq!(code(&mut c, &Request::Balance { number: num(n) }).await, ResultCode::Unauthenticated);
    assert_eq!(code(&mut c, &redeem_as("m-1", n, "u-1", 100)).await, ResultCode::Unauthenticated);
    let batch =
        Request::Batch { mode: BatchMode::Items, items: vec![BatchItem::of(&Request::Balance { number: num(n) })] };
    assert_eq!(code(&mut c, &batch).await, ResultCode::Unauthenticated);

    // Then it authenticates on the same connection and is served.
    let proof = merchant().proof(&c.hello.nonce);
    match timed("auth", c.call(&Request::Auth { client: "pos-1".into(), proof })).await.expect("auth") {
        Reply::Auth(a) => {
            assert_eq!((a.result, a.role, a.merchant.as_str()), (ResultCode::Approved, Role::Merchant, "m-1"))
        }
        other => panic!("auth answered {other:?}"),
    }
    assert_eq!(code(&mut c, &Request::Balance { number: num(n) }).await, ResultCode::Approved);

    // A proof is good for the connection whose nonce it covers only: replayed on another, refused.
    let mut other = g.client().await;
    let replayed = Request::Auth { client: "pos-1".into(), proof };
    assert_eq!(code(&mut other, &replayed).await, ResultCode::Unauthenticated);
    assert!(timed("closed", other.call(&Request::Balance { number: num(n) })).await.is_err(), "still open");

    // A wrong key and an unknown name are refused alike, and close the connection.
    for bad in [Credentials::new("pos-1", [9; 32]), Credentials::new("nobody", [3; 32])] {
        let Err(err) = Client::connect_as(g.addr(), Some(&bad)).await else { panic!("{bad:?} was let in") };
        assert!(format!("{err:#}").contains("unauthenticated"), "{err:#}");
    }
    assert_eq!(metric(&g, "giftd_auth_failures_total").await, 3.0);
    assert_eq!(balance(&mut g.client_as(&operator()).await, n).await, 10_000, "nothing was spent");
    let log = String::from_utf8_lossy(&g.log()).into_owned();
    assert!(log.contains("auth refused") && !log.contains("090909"), "the log names the refusal, never a key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_does_not_authenticate_in_time_is_closed() {
    let g = Giftd::with_config(&format!("{CLIENTS}\n[limits]\nauth_timeout_ms = 300\n"));
    let (mut idle, mut authed) = (g.client().await, g.client_as(&operator()).await);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let n = "6035718880000094";
    assert!(timed("closed", idle.call(&Request::Balance { number: num(n) })).await.is_err(), "still open");
    // An authenticated connection is not subject to it.
    assert_eq!(code(&mut authed, &Request::Balance { number: num(n) }).await, ResultCode::CardNotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_does_what_it_may_and_bound_clients_only_for_their_merchant() {
    let g = Giftd::with_config(CLIENTS);
    let (a, b) = ("6035718880000029", "6035718880000037");
    let mut op = g.client_as(&operator()).await;
    issue(&mut op, a, usd(10_000)).await;

    // A merchant's till: payments under its own merchant id, nothing of the back office.
    let mut pos = g.client_as(&merchant()).await;
    assert_eq!(code(&mut pos, &redeem_as("m-1", a, "p-1", 1_000)).await, ResultCode::Approved);
    assert_eq!(code(&mut pos, &redeem_as("m-2", a, "p-2", 1_000)).await, ResultCode::Forbidden);
    assert_eq!(code(&mut pos, &Request::Balance { number: num(a) }).await, ResultCode::Approved);
    let lock = Request::Lock { idem: idem("m-1", "p-3"), number: num(a), reason: LockReason::Lost };
    let back_office = [
        lock.clone(),
        Request::Lookup { number: num(a) },
        Request::History { number: num(a), before_seq: 0, limit: 10, kind: None },
        Request::ProgramSet { idem: idem("m-1", "p-4"), name: "default".into(), settings: String::new() },
        Request::Note { idem: idem("m-1", "p-5"), number: num(a), text: "x".into() },
        issue_as("m-1", b, "p-6"),
    ];
    for req in &back_office {
        assert_eq!(code(&mut pos, req).await, ResultCode::Forbidden, "{:?}", req.opcode());
    }

    // A processor pays for any merchant, and has no back office either.
    let mut proc = g.client_as(&processor()).await;
    assert_eq!(code(&mut proc, &redeem_as("m-9", a, "q-1", 500)).await, ResultCode::Approved);
    assert_eq!(code(&mut proc, &lock).await, ResultCode::Forbidden);

    // A hold is captured or voided by the merchant that opened it only: to another, its id is
    // not found.
    let auth = Request::Authorize {
        idem: idem("m-9", "q-2"),
        number: num(a),
        money: usd(2_000),
        allow_partial: false,
        ttl_secs: 600,
        pin: None,
    };
    let hold_id = match timed("authorize", proc.call(&auth)).await.expect("authorize") {
        Reply::Hold(o) => o.hold.expect("an approved authorization opens a hold").id,
        other => panic!("authorize answered {other:?}"),
    };
    let capture = |m: &str, key: &str| Request::Capture { idem: idem(m, key), hold_id, money: usd(2_000) };
    let void = |m: &str, key: &str| Request::Void { idem: idem(m, key), hold_id };
    assert_eq!(code(&mut pos, &capture("m-1", "p-9")).await, ResultCode::HoldNotFound);
    assert_eq!(code(&mut pos, &void("m-1", "p-10")).await, ResultCode::HoldNotFound);
    assert_eq!(code(&mut proc, &void("m-9", "q-3")).await, ResultCode::Approved);

    // A reseller issues and activates under its own id, and does not spend.
    let mut res = g.client_as(&reseller()).await;
    assert_eq!(code(&mut res, &issue_as("r-1", b, "r-1")).await, ResultCode::Approved);
    assert_eq!(code(&mut res, &issue_as("r-2", "6035718880000045", "r-2")).await, ResultCode::Forbidden);
    let activate = Request::Activate { idem: idem("r-1", "r-3"), number: num(b), load: None };
    assert_eq!(code(&mut res, &activate).await, ResultCode::Approved);
    assert_eq!(code(&mut res, &redeem_as("r-1", b, "r-4", 100)).await, ResultCode::Forbidden);
    let job_get = |m: &str| Request::JobGet { merchant: m.into(), job: "j-1".into() };
    assert_eq!(code(&mut res, &job_get("r-1")).await, ResultCode::JobNotFound);
    assert_eq!(code(&mut res, &job_get("r-2")).await, ResultCode::Forbidden);

    // Batch items are judged one by one ...
    let items = vec![
        BatchItem::of(&redeem_as("m-1", a, "p-7", 100)),
        BatchItem::of(&redeem_as("m-2", a, "p-8", 100)),
        BatchItem::of(&lock),
        BatchItem::of(&Request::Balance { number: num(a) }),
    ];
    match timed("batch", pos.call(&Request::Batch { mode: BatchMode::Items, items })).await.expect("batch") {
        Reply::Batch(r) => {
            let codes: Vec<ResultCode> = r.iter().map(|(_, r)| r.result()).collect();
            use ResultCode::*;
            assert_eq!(codes, vec![Approved, Forbidden, Forbidden, Approved]);
        }
        other => panic!("batch answered {other:?}"),
    }
    // ... and a batch under its own key (all or nothing, or each item on its own) under another
    // merchant, or with an item under one, is refused whole.
    let keyed = |mode: fn(giftd::wire::IdemRef) -> BatchMode, m: &str, item_m: &str| Request::Batch {
        mode: mode(idem(m, "ab-1")),
        items: vec![
            BatchItem::of(&redeem_as("m-1", a, "ab-i1", 100)),
            BatchItem::of(&redeem_as(item_m, b, "ab-i2", 100)),
        ],
    };
    for mode in [BatchMode::AllOrNothing as fn(_) -> _, BatchMode::Each] {
        assert_eq!(code(&mut pos, &keyed(mode, "m-2", "m-1")).await, ResultCode::Forbidden);
        assert_eq!(code(&mut pos, &keyed(mode, "m-1", "m-2")).await, ResultCode::Forbidden);
    }

    // What was refused changed nothing: 100.00 − 10.00 − 5.00 − 1.00 (the hold was voided).
    assert_eq!(balance(&mut op, a).await, 8_400);
    assert_eq!(balance(&mut op, b).await, 5_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_follows_only_its_own_events_and_head_office_follows_all() {
    let g = Giftd::with_config(CLIENTS);
    let n = "6035718880000052";
    let mut op = g.client_as(&operator()).await;
    issue(&mut op, n, usd(10_000)).await;
    let mut proc = g.client_as(&processor()).await;
    for (m, key) in [("m-1", "e-1"), ("m-2", "e-2"), ("m-1", "e-3")] {
        assert_eq!(code(&mut proc, &redeem_as(m, n, key, 100)).await, ResultCode::Approved);
    }
    // A hold of m-1's for a second: giftd releases it by itself, under m-1.
    let hold = Request::Authorize {
        idem: idem("m-1", "h-1"),
        number: num(n),
        money: usd(100),
        allow_partial: false,
        ttl_secs: 1,
        pin: None,
    };
    assert_eq!(code(&mut proc, &hold).await, ResultCode::Approved);
    let merchants = |events: Vec<EventView>| {
        events
            .into_iter()
            .map(|e| match e {
                EventView::Txn { merchant, kind, .. } => format!("{merchant}:{kind:?}"),
                EventView::Alert { merchant, .. } => format!("{merchant}:alert"),
            })
            .collect::<Vec<_>>()
    };
    let caught_up = |c: Client, filter: &'static str| async move {
        let mut sub = c.subscribe(0, filter, "", 0).await.expect("subscribe");
        let mut events = Vec::new();
        loop {
            let frame = timed("events", sub.next()).await?;
            events.extend(frame.events);
            if frame.caught_up {
                return anyhow::Ok(events);
            }
        }
    };
    // The merchant asks for everything and gets its own traffic only, its hold's release included
    // (written within moments of the deadline).
    let deadline = Instant::now() + Duration::from_secs(10);
    let own = loop {
        let own = merchants(caught_up(g.client_as(&merchant()).await, "").await.expect("own events"));
        if own.len() == 4 || Instant::now() > deadline {
            break own;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(own, vec!["m-1:Redeem", "m-1:Redeem", "m-1:Authorize", "m-1:HoldExpired"]);
    // Another merchant's events are refused.
    let err = caught_up(g.client_as(&merchant()).await, "m-2").await.expect_err("refused");
    assert!(format!("{err:#}").contains("forbidden"), "{err:#}");
    // A processor has no event stream.
    let err = caught_up(g.client_as(&processor()).await, "").await.expect_err("refused");
    assert!(format!("{err:#}").contains("forbidden"), "{err:#}");
    // Head office sees everything: the issue, the three redeems, the hold and its release.
    let all = caught_up(g.client_as(&operator()).await, "").await.expect("all events");
    let all: Vec<String> = merchants(all).into_iter().map(|e| e.split(':').next().unwrap().to_string()).collect();
    assert_eq!(all, vec![MERCHANT, "m-1", "m-2", "m-1", "m-1", "m-1"]);
}

/// Sends `reqs` pipelined on one connection; returns each reply's result in order.
async fn pipelined(c: Client, reqs: &[Request]) -> Vec<ResultCode> {
    let (mut tx, mut rx) = c.into_split();
    for r in reqs {
        tx.send(r);
    }
    timed("send", tx.flush()).await.expect("send");
    let mut out = Vec::new();
    for _ in reqs {
        out.push(timed("reply", rx.recv()).await.expect("reply").1.result());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rates_refuse_with_rate_limited_change_nothing_and_are_counted() {
    let config = format!(
        "{CLIENTS}\n[[clients]]\nname = \"slow\"\nrole = \"processor\"\nrequests_per_second = 5\nkey_hex = \"{}\"\n\
         \n[limits]\nrequests_per_second_per_connection = 40\n",
        "05".repeat(32)
    );
    let g = Giftd::with_config(&config);
    let slow = Credentials::new("slow", [5; 32]);
    let n = "6035718880000060";
    let mut op = g.client_as(&operator()).await;
    issue(&mut op, n, usd(100_000)).await;

    // The client's rate (5 a second, bursts of 5), shared by its two connections: of 20 redeems
    // sent at once, about 5 pass. The refused ones spend nothing.
    let reqs: Vec<Request> = (0..20).map(|i| redeem_as("m-1", n, &format!("rl-{i}"), 100)).collect();
    let (first, second) = reqs.split_at(10);
    let started = Instant::now();
    let (c1, c2) = (g.client_as(&slow).await, g.client_as(&slow).await);
    let (r1, r2) = tokio::join!(pipelined(c1, first), pipelined(c2, second));
    let results: Vec<ResultCode> = r1.into_iter().chain(r2).collect();
    let passed = results.iter().filter(|r| **r == ResultCode::Approved).count();
    let limited = results.iter().filter(|r| **r == ResultCode::RateLimited).count();
    assert_eq!(passed + limited, 20, "{results:?}");
    // Five, plus one a 200 ms for the time the test took (two handshakes included).
    let refill = (started.elapsed().as_millis() / 200) as usize;
    assert!(passed >= 5 && passed <= 5 + refill + 1, "{passed} passed in {:?}: {results:?}", started.elapsed());
    assert_eq!(balance(&mut op, n).await, 100_000 - 100 * passed as i64);

    // A batch larger than a second's worth never passes, however long the client waited.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let items = (0..6).map(|_| BatchItem::of(&Request::Balance { number: num(n) })).collect();
    let mut c = g.client_as(&slow).await;
    assert_eq!(code(&mut c, &Request::Batch { mode: BatchMode::Items, items }).await, ResultCode::RateLimited);

    // The connection's rate (40 a second) holds for a client without a rate of its own.
    let balances: Vec<Request> = (0..100).map(|_| Request::Balance { number: num(n) }).collect();
    let results = pipelined(g.client_as(&processor()).await, &balances).await;
    let conn_passed = results.iter().filter(|r| **r == ResultCode::Approved).count();
    let conn_limited = results.iter().filter(|r| **r == ResultCode::RateLimited).count();
    assert_eq!(conn_passed + conn_limited, 100);
    assert!(conn_passed >= 40 && conn_limited > 0, "{conn_passed} passed, {conn_limited} limited");

    let client_scope = metric(&g, "giftd_rate_limited_requests_total{scope=\"client\"}").await;
    assert_eq!(client_scope, (limited + 6) as f64, "a batch counts its items");
    let conn_scope = metric(&g, "giftd_rate_limited_requests_total{scope=\"connection\"}").await;
    assert_eq!(conn_scope, conn_limited as f64);
    let by_result = metric(&g, "giftd_requests_total{op=\"redeem\",result=\"rate_limited\"}").await;
    assert_eq!(by_result, limited as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_delay_turns_readyz_503_while_giftd_still_serves() {
    let mut g = Giftd::with_config("[limits]\nshutdown_delay_ms = 4000\n");
    let n = "6035718880000078";
    let mut c = g.client().await;
    issue(&mut c, n, usd(1_000)).await;
    assert_eq!(http_get(g.metrics_addr(), "/readyz").await.0, 200);
    let signalled = Instant::now();
    g.signal(libc::SIGTERM);
    let deadline = signalled + Duration::from_secs(3);
    while http_get(g.metrics_addr(), "/readyz").await.0 != 503 {
        assert!(Instant::now() < deadline, "/readyz still 200 three seconds after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&g, "giftd_ready").await, 0.0);
    // Not ready, and still serving: the open connection and a new one.
    assert!(signalled.elapsed() < Duration::from_secs(4), "the checks below must fall inside the delay");
    assert_eq!(call(&mut c, &redeem_as(MERCHANT, n, "late-1", 100)).await.result, ResultCode::Approved);
    let mut fresh = g.client().await;
    assert_eq!(balance(&mut fresh, n).await, 900);
    let status = g.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    assert!(signalled.elapsed() >= Duration::from_secs(4), "exited before the delay ended");
    let log = String::from_utf8_lossy(&g.log()).into_owned();
    assert!(log.contains("not ready; serving until the delay ends"), "{log}");
}

#[test]
fn giftctl_authenticates_with_a_key_file() {
    let g = Giftd::with_config(CLIENTS);
    let dir = tempfile::tempdir().expect("temp dir");
    let key = dir.path().join("head-office.key");
    std::fs::write(&key, format!("{}\n", "01".repeat(32))).expect("key file");
    let key = key.to_str().expect("utf-8 path");
    let n = "6035718880000086";
    let args = ["issue", "--number", n, "--amount", "10.00", "--currency", "USD", "--key", "i-1"];
    let mut with_key = vec!["--client", "head-office", "--key-file", key];
    with_key.extend_from_slice(&args);
    let v = giftctl::json(&g, &with_key);
    assert_eq!(v["result"], "approved", "{v}");
    // Without the key, giftd refuses; with another client's name, the proof is wrong.
    let (_, out, _) = giftctl::run(&[&["--addr", g.addr(), "--json", "balance", "--number", n][..]].concat());
    assert!(out.contains("unauthenticated"), "{out}");
    let (code, out, err) = giftctl::run(
        &[&["--addr", g.addr(), "--json", "--client", "pos-1", "--key-file", key, "balance", "--number", n][..]]
            .concat(),
    );
    assert_ne!(code, 0);
    assert!(format!("{out}{err}").contains("unauthenticated"), "{out}{err}");
}
