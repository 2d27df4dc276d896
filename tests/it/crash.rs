//! kill -9 at a random moment under pipelined load, restart on the same data, retry: every
//! acknowledged redeem survives, and every idempotency key takes effect at most once.

use crate::{balance, issue, redeem_req, timed, usd, Giftd};
use giftd::client::Client;
use giftd::model::{Outcome, ResultCode};
use giftd::wire::{Reply, Request};
use rand::Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

const CYCLES: usize = 3;
const CONNECTIONS: usize = 4;
/// Requests per write on each connection.
const WINDOW: usize = 8;
/// Upper bound on windows per connection per cycle (the kill normally comes long before).
const WINDOWS_MAX: usize = 2_000;
pub const AMOUNT: i64 = 100;

/// What the drivers saw: keys possibly sent (recorded before the write) and acknowledged outcomes.
#[derive(Default)]
pub struct Ledger {
    pub sent: Vec<String>,
    pub acked: HashMap<String, Outcome>,
}

/// Shared by the drivers of one run: the ledger, and one semaphore permit per acknowledgement (so a
/// test can wait for "at least k acknowledged" without polling).
pub struct Load {
    pub ledger: Mutex<Ledger>,
    pub acks: Semaphore,
}

/// One connection: windows of pipelined redeems of [`AMOUNT`] until the server goes away.
pub async fn drive(addr: String, number: &'static str, tag: String, load: Arc<Load>) {
    let Ok(Ok(c)) = tokio::time::timeout(crate::TIMEOUT, Client::connect(&addr)).await else { return };
    let (mut tx, mut rx) = c.into_split();
    for w in 0..WINDOWS_MAX {
        let mut ids = Vec::with_capacity(WINDOW);
        for i in 0..WINDOW {
            let key = format!("{tag}-w{w}-{i}");
            load.ledger.lock().unwrap().sent.push(key.clone());
            ids.push((tx.send(&redeem_req(number, &key, usd(AMOUNT), false)), key));
        }
        if !matches!(tokio::time::timeout(crate::TIMEOUT, tx.flush()).await, Ok(Ok(()))) {
            return;
        }
        for (id, key) in ids {
            let Ok(Ok((got, reply))) = tokio::time::timeout(crate::TIMEOUT, rx.recv()).await else { return };
            assert_eq!(got, id, "replies come back in request order");
            match reply {
                Reply::Card(o) => {
                    assert_eq!(o.result, ResultCode::Approved, "{key}: {o:?}");
                    load.ledger.lock().unwrap().acked.insert(key, o);
                    load.acks.add_permits(1);
                }
                other => panic!("{key}: unexpected reply {other:?}"),
            }
        }
    }
}

/// Starts `connections` drivers on `number`.
pub fn start_drivers(
    g: &Giftd,
    number: &'static str,
    tag: &str,
    connections: usize,
) -> (Arc<Load>, Vec<JoinHandle<()>>) {
    let load = Arc::new(Load { ledger: Mutex::default(), acks: Semaphore::new(0) });
    let tasks = (0..connections)
        .map(|conn| tokio::spawn(drive(g.addr().to_string(), number, format!("{tag}-n{conn}"), load.clone())))
        .collect();
    (load, tasks)
}

/// After a restart: checks that every acknowledged redeem survived, retries every key that was sent
/// but not acknowledged, replays the acknowledged ones, and checks each key took effect exactly once.
/// `start` is the balance before the drivers began; returns the balance after the retries.
pub async fn verify_exactly_once(c: &mut Client, n: &str, start: i64, load: &Load, what: &str) -> i64 {
    let Ledger { sent, acked } = std::mem::take(&mut *load.ledger.lock().unwrap());
    let unacked: Vec<&String> = sent.iter().filter(|k| !acked.contains_key(*k)).collect();
    let after_restart = balance(c, n).await;
    let applied = (start - after_restart) / AMOUNT;
    eprintln!("{what}: {} sent, {} acknowledged, {applied} applied before the restart", sent.len(), acked.len());
    let acked_sum = acked.len() as i64 * AMOUNT;
    assert!(
        after_restart <= start - acked_sum,
        "{what}: acknowledged redeems lost: balance {after_restart}, start {start}, acknowledged {acked_sum}"
    );
    assert!(
        after_restart >= start - acked_sum - unacked.len() as i64 * AMOUNT,
        "{what}: more debited than was sent: balance {after_restart}, start {start}"
    );
    assert_eq!((start - after_restart) % AMOUNT, 0, "{what}: partial debit");

    // Retry every key that was sent but not acknowledged: each applies at most once.
    let retries: Vec<Request> = unacked.iter().map(|k| redeem_req(n, k, usd(AMOUNT), false)).collect();
    let retried = pipeline(c, &retries).await;
    let mut finals: Vec<Outcome> = Vec::with_capacity(sent.len());
    for (k, o) in unacked.iter().zip(&retried) {
        assert_eq!((o.result, o.approved_minor), (ResultCode::Approved, AMOUNT), "{what}: retry of {k}: {o:?}");
        finals.push(*o);
    }
    // Replaying acknowledged keys returns the original outcome and debits nothing.
    let keys: Vec<&String> = acked.keys().collect();
    let replays: Vec<Request> = keys.iter().map(|k| redeem_req(n, k, usd(AMOUNT), false)).collect();
    let replayed = pipeline(c, &replays).await;
    for (k, o) in keys.iter().zip(&replayed) {
        assert_eq!(o, &acked[*k], "{what}: replay of acknowledged {k}");
        finals.push(*o);
    }
    let fin = balance(c, n).await;
    assert_eq!(fin, start - sent.len() as i64 * AMOUNT, "{what}: each distinct key debits exactly once");
    // Exactly once, per key: the balances the approvals left are start−100, start−200, … each once.
    let mut left: Vec<i64> = finals.iter().map(|o| o.card.expect("card").balance_minor).collect();
    left.sort_unstable_by_key(|b| std::cmp::Reverse(*b));
    let want: Vec<i64> = (1..=sent.len() as i64).map(|i| start - i * AMOUNT).collect();
    assert_eq!(left, want, "{what}: approvals do not form one chain");
    fin
}

/// Sends every request pipelined on one connection, in chunks, and returns the outcomes in order.
pub async fn pipeline(c: &mut Client, reqs: &[Request]) -> Vec<Outcome> {
    let mut out = Vec::with_capacity(reqs.len());
    for chunk in reqs.chunks(64) {
        let ids: Vec<u64> = chunk.iter().map(|r| c.tx.send(r)).collect();
        timed("flush", c.tx.flush()).await.expect("flush");
        for id in ids {
            let (got, reply) = timed("pipelined reply", c.rx.recv()).await.expect("reply");
            assert_eq!(got, id);
            match reply {
                Reply::Card(o) | Reply::Issued(o, None) => out.push(o),
                other => panic!("unexpected reply {other:?}"),
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_redeems_survive_kill9_and_retries_apply_once() {
    // The default checkpoint interval is longer than the test: every restart replays all history.
    kill9_cycles(Giftd::start(), "6035719930000016").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_redeems_survive_kill9_racing_checkpoints() {
    let g = Giftd::with_config("[durability]\ncheckpoint_interval_ms = 10\n");
    let log = kill9_cycles(g, "6035719930000024").await;
    // At least one restart started from a checkpoint rather than from the beginning.
    let replays = replayed_entries(&log);
    assert!(replays.len() > CYCLES, "recovery lines: {replays:?}");
    assert!(replays.iter().any(|&r| r > 0) && replays.iter().any(|&r| r < 50), "replayed: {replays:?}");
}

/// `replayed_history_entries` of every recovery in a giftd log.
pub fn replayed_entries(log: &[u8]) -> Vec<u64> {
    String::from_utf8_lossy(log)
        .lines()
        .filter_map(|l| l.split("replayed_history_entries=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Kill -9 under load, restart and verify, [`CYCLES`] times; then a clean stop and start. Returns
/// giftd's log.
async fn kill9_cycles(mut g: Giftd, n: &'static str) -> Vec<u8> {
    let initial = 10_000_000;
    issue(&mut g.client().await, n, usd(initial)).await;
    let (mut start, mut txns, mut acked_total) = (initial, 1u64, 0);

    for cycle in 0..CYCLES {
        let (load, drivers) = start_drivers(&g, n, &format!("crash-c{cycle}"), CONNECTIONS);
        let delay = rand::thread_rng().gen_range(50..=400);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        g.kill9();
        for d in drivers {
            timed("driver", d).await.expect("driver panicked");
        }
        let sent = load.ledger.lock().unwrap().sent.len() as u64;
        acked_total += load.ledger.lock().unwrap().acked.len();

        // Restart: recovery must pass its conservation check (giftd exits 65 otherwise).
        g.restart();
        let mut c = g.client().await;
        start = verify_exactly_once(&mut c, n, start, &load, &format!("cycle {cycle}, kill after {delay} ms")).await;
        txns += sent;
        let l = match timed("lookup", c.call(&Request::Lookup { number: crate::num(n) })).await.expect("lookup") {
            Reply::Lookup(l) => l,
            other => panic!("{other:?}"),
        };
        assert_eq!(l.txn_count, txns, "cycle {cycle}: one history entry per applied redeem");
    }
    assert!(acked_total > 0, "no redeem was acknowledged in {CYCLES} cycles: the test exercised nothing");
    // The history survived every crash whole: entries 1..=txns, each balance following from the last.
    let (mut c, mut before, mut expect_seq, mut balance_after) = (g.client().await, 0u64, txns, start);
    for _ in 0..=txns / 100 + 1 {
        let req = Request::History { number: crate::num(n), before_seq: before, limit: 100, kind: None };
        let Reply::History(h) = timed("history", c.call(&req)).await.expect("history") else { panic!("history reply") };
        for t in &h.txns {
            assert_eq!((t.seq, t.balance_after_minor), (expect_seq, balance_after), "history entry {t:?}");
            balance_after -= t.amount_minor;
            expect_seq -= 1;
        }
        before = h.next_before_seq;
        if before == 0 {
            break;
        }
    }
    assert_eq!((expect_seq, balance_after), (0, 0), "history covers every entry back to the issue");
    drop(c);
    // A final clean stop and start still passes recovery.
    g.stop_cleanly();
    g.restart();
    assert_eq!(balance(&mut g.client().await, n).await, start);
    // SIGTERM writes a full checkpoint: that start replayed nothing.
    assert_eq!(replayed_entries(&g.log()).last(), Some(&0), "a clean stop leaves nothing to replay");
    g.log()
}

/// Many cards (several checkpoint chunks), two kills: cards changed only before the first kill are
/// replayed at the first restart, and must then reach the card table through the next checkpoint,
/// or the second restart would lose them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_cards_survive_later_checkpoints_and_kills() {
    const CARDS: u64 = 5_000;
    let mut g = Giftd::with_config("[durability]\ncheckpoint_interval_ms = 10\n");
    let numbers: Vec<String> = (0..CARDS).map(|i| format!("60357199400{i:05}")).collect();
    let mut c = g.client().await;
    let issues: Vec<Request> = numbers.iter().map(|n| crate::issue_req(n, usd(1_000))).collect();
    assert!(pipeline(&mut c, &issues).await.iter().all(|o| o.result == ResultCode::Approved));
    let redeem = |range: std::ops::Range<usize>, tag: &str| -> Vec<Request> {
        numbers[range].iter().map(|n| redeem_req(n, &format!("{tag}-{n}"), usd(AMOUNT), false)).collect()
    };
    let half = CARDS as usize / 2;
    assert!(pipeline(&mut c, &redeem(0..half, "first")).await.iter().all(|o| o.result == ResultCode::Approved));
    drop(c);
    g.kill9();
    g.restart();
    let mut c = g.client().await;
    assert!(pipeline(&mut c, &redeem(half..CARDS as usize, "second"))
        .await
        .iter()
        .all(|o| o.result == ResultCode::Approved));
    // Let several checkpoints complete, so the history of the first half is no longer replayed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(c);
    g.kill9();
    // Checkpoints went into the card table as files; a file cut off by a crash before RocksDB took
    // it in is only debris, and the next start must neither trust it nor keep it.
    let debris = g.data_dir().join("checkpoint").join("00000000000000000099.sst");
    std::fs::write(&debris, b"cut off mid-write").expect("plant a torn checkpoint file");
    g.restart();
    assert!(!debris.exists(), "a checkpoint file left by a crash is removed at start");
    let replays = replayed_entries(&g.log());
    assert_eq!(replays.len(), 3, "{replays:?}");
    assert!(replays[2] < CARDS / 2, "the last restart started from a checkpoint: {replays:?}");
    let mut c = g.client().await;
    let balances: Vec<Request> = numbers.iter().map(|n| Request::Balance { number: crate::num(n) }).collect();
    for (n, o) in numbers.iter().zip(pipeline(&mut c, &balances).await) {
        assert_eq!(o.card.map(|v| v.balance_minor), Some(1_000 - AMOUNT), "card {n}");
    }
}
