//! The event stream over TCP: commit order, filters, follow, alerts in the stream, resuming from a
//! position after a reconnect and after kill -9 with no gap and no duplicate, and a stalled
//! subscriber that does not hold back payments.

use crate::{call, idem, issue, metric, num, redeem, timed, usd, Giftd, MERCHANT};
use giftd::client::{Client, Subscription};
use giftd::model::{ResultCode, TxnKind};
use giftd::wire::{EventView, Request, EVENT_KIND_ALERT_BIT};

const NO_VELOCITY: &str = "[alerts]\nredemptions_per_card_per_minute = 0\n";

/// Every event up to the first frame that says the subscription caught up.
pub async fn until_caught_up(sub: &mut Subscription) -> Vec<EventView> {
    let mut all = Vec::new();
    loop {
        let frame = timed("events frame", sub.next()).await.expect("events frame");
        assert_eq!(frame.result, ResultCode::Approved);
        all.extend(frame.events);
        if frame.caught_up {
            return all;
        }
    }
}

async fn events(c: Client, from: u64, merchant: &str, kinds: u64) -> Vec<EventView> {
    let mut sub = c.subscribe(from, merchant, "", kinds).await.expect("subscribe");
    until_caught_up(&mut sub).await
}

fn kind_of(e: &EventView) -> Option<TxnKind> {
    match e {
        EventView::Txn { kind, .. } => Some(*kind),
        EventView::Alert { .. } => None,
    }
}

/// A redeem of `minor` USD cents by `merchant`.
pub fn redeem_as(merchant: &str, number: &str, key: &str, minor: i64) -> Request {
    Request::Redeem {
        idem: idem(merchant, key),
        number: num(number),
        money: usd(minor),
        allow_partial: false,
        invoice: None,
        pin: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_come_in_commit_order_filtered_and_followed() {
    let g = Giftd::with_config("[alerts]\nredemptions_per_card_per_minute = 2\n");
    let mut c = g.client().await;
    let (a, b) = ("6035719990000011", "6035719990000029");
    issue(&mut c, a, usd(10_000)).await;
    issue(&mut c, b, usd(5_000)).await;
    assert_eq!(redeem(&mut c, a, "ev-1", usd(100), false).await.result, ResultCode::Approved);
    assert_eq!(redeem(&mut c, a, "ev-2", usd(200), false).await.result, ResultCode::Approved);
    assert_eq!(call(&mut c, &redeem_as("m-other", b, "ev-3", 300)).await.result, ResultCode::Approved);

    let all = events(g.client().await, 0, "", 0).await;
    let ids: Vec<u64> = all.iter().map(EventView::id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
    let kinds: Vec<Option<TxnKind>> = all.iter().map(kind_of).collect();
    use TxnKind::*;
    // The second redemption of card a fired the velocity rule: its alert follows its entry.
    assert_eq!(kinds, vec![Some(Issue), Some(Issue), Some(Redeem), Some(Redeem), None, Some(Redeem)], "{all:?}");
    match &all[3] {
        EventView::Txn { last4, merchant, amount_minor, balance_after_minor, program, .. } => {
            assert_eq!(
                (last4, merchant.as_str(), *amount_minor, *balance_after_minor),
                (b"0011", MERCHANT, -200, 9_700)
            );
            assert_eq!(program, "default");
        }
        other => panic!("{other:?}"),
    }
    match &all[4] {
        EventView::Alert { rule, last4, merchant, observed, threshold, .. } => {
            assert_eq!(giftd::engine::alerts::Rule::from_u8(*rule), Some(giftd::engine::alerts::Rule::Velocity));
            assert_eq!((last4, merchant.as_str(), *observed, *threshold), (b"0011", MERCHANT, 2, 2));
        }
        other => panic!("{other:?}"),
    }

    // A merchant sees its own traffic; a kinds mask selects alerts alone.
    let other = events(g.client().await, 0, "m-other", 0).await;
    assert_eq!(other.iter().map(EventView::id).collect::<Vec<_>>(), vec![ids[5]]);
    let alerts = events(g.client().await, 0, "", EVENT_KIND_ALERT_BIT).await;
    assert_eq!(alerts.iter().map(EventView::id).collect::<Vec<_>>(), vec![ids[4]]);
    let redeems = events(g.client().await, ids[2], "", 1 << (Redeem as u8)).await;
    assert_eq!(
        redeems.iter().map(EventView::id).collect::<Vec<_>>(),
        vec![ids[3], ids[5]],
        "after a position, one kind"
    );

    // Following: a new decision reaches a caught-up subscriber once durable.
    let mut sub = g.client().await.subscribe(ids[5], "", "", 0).await.expect("subscribe");
    assert!(until_caught_up(&mut sub).await.is_empty());
    assert_eq!(redeem(&mut c, b, "ev-4", usd(50), false).await.result, ResultCode::Approved);
    let mut next = until_caught_up(&mut sub).await;
    if next.len() < 2 {
        // The entry and its alert may become durable in two groups.
        next.extend(until_caught_up(&mut sub).await);
    }
    // Card b's second redemption in the minute: its entry, then the velocity alert.
    assert_eq!(next.len(), 2, "{next:?}");
    assert!(matches!(&next[0], EventView::Txn { kind: Redeem, last4, .. } if last4 == b"0029"), "{next:?}");
    assert!(matches!(&next[1], EventView::Alert { last4, .. } if last4 == b"0029"), "{next:?}");
    assert!(next[0].id() > ids[5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_resumes_without_gap_or_duplicate_across_kill9() {
    // Velocity alerts off: their count would depend on where minutes begin.
    let mut g = Giftd::with_config(NO_VELOCITY);
    let n = "6035719990000037";
    let mut c = g.client().await;
    issue(&mut c, n, usd(1_000_000)).await;
    for i in 0..30 {
        redeem(&mut c, n, &format!("rs-a{i}"), usd(10), false).await;
    }
    // A consumer reads part of the stream, remembers where it was, and goes away.
    let first = events(g.client().await, 0, "", 0).await;
    let seen = first[..20].to_vec();
    let resume_at = seen.last().expect("events").id();
    for i in 0..30 {
        redeem(&mut c, n, &format!("rs-b{i}"), usd(10), false).await;
    }
    drop(c);
    g.restart();
    let mut c = g.client().await;
    for i in 0..30 {
        redeem(&mut c, n, &format!("rs-c{i}"), usd(10), false).await;
    }
    let rest = events(g.client().await, resume_at, "", 0).await;
    let everything = events(g.client().await, 0, "", 0).await;
    assert_eq!(everything.len(), 91, "the issue and 90 redemptions");
    let mut joined = seen;
    joined.extend(rest);
    assert_eq!(joined, everything, "resumed stream = the whole stream: no gap, no duplicate");
}

/// A subscriber that stops reading holds back nothing but itself: payments go on, and it later
/// reads everything from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_does_not_hold_back_payments() {
    let g = Giftd::with_config(NO_VELOCITY);
    let n = "6035719990000045";
    let mut c = g.client().await;
    issue(&mut c, n, usd(100_000_000)).await;
    // Subscribed, then not read while 80k events are committed: some 5 MB of frames, more than
    // loopback's socket buffers hold, so the subscription's writes block.
    let mut stalled = g.client().await.subscribe(0, "", "", 0).await.expect("subscribe");
    let (batches, per_batch) = (10, 8_000);
    let started = std::time::Instant::now();
    for b in 0..batches {
        let items = (0..per_batch)
            .map(|i| giftd::wire::BatchItem::of(&redeem_as(MERCHANT, n, &format!("st-{b}-{i}"), 1)))
            .collect();
        match call_batch(&mut c, Request::Batch { mode: giftd::wire::BatchMode::Items, items }).await {
            giftd::wire::Reply::Batch(replies) => {
                assert!(replies.iter().all(|(_, r)| r.result() == ResultCode::Approved), "batch {b}")
            }
            other => panic!("{other:?}"),
        }
    }
    let payments = started.elapsed();
    let total = batches * per_batch + 1;
    // The scrape shows how far behind it is: its socket holds far fewer than the 80k events.
    let lag = metric(&g, "giftd_subscriptions_lag_events").await;
    assert!(lag > 10_000.0, "a subscriber stalled for 80k events lags by {lag}");
    assert_eq!(metric(&g, "giftd_subscriptions_open").await, 1.0);
    let mut all = Vec::with_capacity(total);
    while all.len() < total {
        all.extend(until_caught_up(&mut stalled).await);
    }
    assert_eq!(all.len(), total, "the stalled subscriber catches up with every event");
    assert!(all.windows(2).all(|w| w[0].id() < w[1].id()));
    // Caught up (its caught-up frame is written after its position moves): no lag, every event sent.
    assert_eq!(metric(&g, "giftd_subscriptions_lag_events").await, 0.0);
    assert_eq!(metric(&g, "giftd_subscriptions_events_sent_total").await, total as f64);
    eprintln!("{} redeems with a stalled subscriber took {payments:?}", total - 1);
}

async fn call_batch(c: &mut Client, req: Request) -> giftd::wire::Reply {
    timed("batch", c.call(&req)).await.expect("batch reply")
}

/// A subscriber that does not read does not hold back the drain either: at SIGTERM its
/// subscription ends (it resumes later from the last id it saw) and giftd exits well within the
/// grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_does_not_hold_back_the_drain() {
    let mut g = Giftd::with_config(&format!("{NO_VELOCITY}[limits]\nshutdown_grace_secs = 60\n"));
    let n = "6035719990000052";
    let mut c = g.client().await;
    issue(&mut c, n, usd(100_000_000)).await;
    let stalled = g.client().await.subscribe(0, "", "", 0).await.expect("subscribe");
    // As above: more frames than loopback's socket buffers hold, so the subscription's write waits.
    for b in 0..10 {
        let items = (0..8_000)
            .map(|i| giftd::wire::BatchItem::of(&redeem_as(MERCHANT, n, &format!("sd-{b}-{i}"), 1)))
            .collect();
        call_batch(&mut c, Request::Batch { mode: giftd::wire::BatchMode::Items, items }).await;
    }
    drop(c);
    let signalled = std::time::Instant::now();
    g.signal(libc::SIGTERM);
    let status = g.wait_exit(std::time::Duration::from_secs(45));
    let took = signalled.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(took < std::time::Duration::from_secs(10), "the drain waited {took:?} for a subscriber that does not read");
    assert!(String::from_utf8_lossy(&g.log()).contains("drained=true"), "{}", g.log_tail(5));
    drop(stalled);
}

/// An issue of an active card in `program`, with a recipient email when given.
fn issue_in(program: &str, number: &str, minor: i64, email: Option<&str>) -> Request {
    match crate::issue_req(number, usd(minor)) {
        Request::Issue { idem, number, money, expiry_ms, active, virtual_card, case, .. } => Request::Issue {
            idem,
            number,
            program: program.into(),
            money,
            expiry_ms,
            active,
            virtual_card,
            email: email.map(str::to_string),
            case,
        },
        other => unreachable!("issue_req builds an issue: {other:?}"),
    }
}

/// A subscription to one program gets that program's entries only, in order; alerts name no
/// program, so it gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_filter_gets_only_that_programs_entries() {
    let g = Giftd::with_config(
        "[alerts]\nredemptions_per_card_per_minute = 1\n[programs.mall]\ninvoice_required = false\n",
    );
    let mut c = g.client().await;
    let (plain, mall) = ("6035719990000060", "6035719990000078");
    issue(&mut c, plain, usd(10_000)).await;
    assert_eq!(call(&mut c, &issue_in("mall", mall, 10_000, None)).await.result, ResultCode::Approved);
    for (i, n) in [plain, mall, plain, mall].into_iter().enumerate() {
        assert_eq!(redeem(&mut c, n, &format!("pf-{i}"), usd(100), false).await.result, ResultCode::Approved);
    }
    let all = events(g.client().await, 0, "", 0).await;
    assert!(all.iter().any(|e| matches!(e, EventView::Alert { .. })), "velocity alerts fired: {all:?}");
    let in_mall: Vec<EventView> =
        all.iter().filter(|e| matches!(e, EventView::Txn { program, .. } if program == "mall")).cloned().collect();
    use TxnKind::*;
    assert_eq!(in_mall.iter().map(kind_of).collect::<Vec<_>>(), vec![Some(Issue), Some(Redeem), Some(Redeem)]);
    assert!(in_mall.iter().all(|e| matches!(e, EventView::Txn { last4, .. } if last4 == b"0078")), "{in_mall:?}");

    let mut sub = g.client().await.subscribe(0, "", "mall", 0).await.expect("subscribe");
    assert_eq!(until_caught_up(&mut sub).await, in_mall, "the mall program's entries, nothing else");
}

/// E-card delivery: an issue with a recipient email is an issue event carrying it; other events
/// carry none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issue_event_carries_its_recipient_email() {
    let g = Giftd::with_config(NO_VELOCITY);
    let mut c = g.client().await;
    let (gift, plain) = ("6035719990000086", "6035719990000094");
    let req = issue_in("default", gift, 2_500, Some("ann@example.com"));
    assert_eq!(call(&mut c, &req).await.result, ResultCode::Approved);
    issue(&mut c, plain, usd(1_000)).await;
    assert_eq!(redeem(&mut c, gift, "em-1", usd(500), false).await.result, ResultCode::Approved);

    let issues = events(g.client().await, 0, "", 1 << (TxnKind::Issue as u8)).await;
    let emails: Vec<(&[u8; 4], &str, i64)> = issues
        .iter()
        .map(|e| match e {
            EventView::Txn { kind: TxnKind::Issue, last4, email, amount_minor, .. } => {
                (last4, email.as_str(), *amount_minor)
            }
            other => panic!("not an issue: {other:?}"),
        })
        .collect();
    assert_eq!(emails, vec![(b"0086", "ann@example.com", 2_500), (b"0094", "", 1_000)]);
    let all = events(g.client().await, 0, "", 0).await;
    assert!(
        matches!(all.last(), Some(EventView::Txn { kind: TxnKind::Redeem, email, .. }) if email.is_empty()),
        "{all:?}"
    );
}

/// A child process killed when dropped (a failed assertion must not leave it running).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `giftctl events --from N` prints exactly the events after N and exits; with `--follow` it
/// stays, and prints what is committed after it started, as it happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giftctl_events_from_a_position_and_following() {
    use std::io::BufRead;
    let g = Giftd::with_config(NO_VELOCITY);
    let mut c = g.client().await;
    let n = "6035719990000102";
    issue(&mut c, n, usd(10_000)).await;
    for i in 0..3 {
        assert_eq!(redeem(&mut c, n, &format!("gf-{i}"), usd(100), false).await.result, ResultCode::Approved);
    }
    let all = events(g.client().await, 0, "", 0).await;
    let ids: Vec<u64> = all.iter().map(EventView::id).collect();
    assert_eq!(ids.len(), 4, "{all:?}");
    let json_ids = |out: &str| -> Vec<u64> {
        assert!(!out.contains(n), "no full card number in {out}");
        out.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"))["id"].as_u64())
            .map(|id| id.expect("an id"))
            .collect()
    };

    let (code, out, err) = crate::giftctl::run(&["--addr", g.addr(), "events", "--from", &ids[1].to_string()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_ids(&out), ids[2..].to_vec(), "exactly the events after the position");

    let last = ids[3].to_string();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_giftctl"))
        .args(["--addr", g.addr(), "events", "--from", &last, "--follow"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn giftctl");
    let mut child = Killed(child);
    let stdout = child.0.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let next_line = || rx.recv_timeout(crate::TIMEOUT).expect("giftctl --follow printed the new event");
    for i in 0..2 {
        assert_eq!(redeem(&mut c, n, &format!("gf-new-{i}"), usd(100), false).await.result, ResultCode::Approved);
        let line = next_line();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!((v["kind"].as_str(), v["amount"].as_str()), (Some("redeem"), Some("-1.00")), "{line}");
        assert!(v["id"].as_u64() > Some(ids[3]), "{line}");
    }
    assert!(child.0.try_wait().expect("try_wait").is_none(), "--follow keeps running once caught up");
    drop(child);
    assert!(rx.recv_timeout(std::time::Duration::from_millis(200)).is_err(), "nothing else was printed");
}
