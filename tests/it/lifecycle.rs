//! Process lifecycle: graceful shutdown under load, the metrics endpoint, the connection limit.

use crate::crash::{start_drivers, verify_exactly_once};
use crate::{http_get, issue, redeem, timed, usd, Giftd, TIMEOUT};
use giftd::client::Client;
use giftd::model::ResultCode;
use std::time::Instant;

/// The value of the sample whose name and labels are exactly `series`, if present.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_0_and_keeps_every_acknowledged_request() {
    let mut g = Giftd::start();
    let n: &'static str = "6035719970000015";
    let start = 5_000_000;
    issue(&mut g.client().await, n, usd(start)).await;
    let (load, drivers) = start_drivers(&g, n, "term", 4);
    // Signal once requests are flowing: at least 40 acknowledged.
    let flowing = timed("first acknowledgements", load.acks.acquire_many(40)).await.expect("semaphore open");
    flowing.forget();
    let status = g.sigterm();
    assert_eq!(status.code(), Some(0), "giftd exit after SIGTERM: {status:?}; log:\n{}", g.log_tail(20));
    for d in drivers {
        timed("driver", d).await.expect("driver panicked");
    }
    let log = String::from_utf8_lossy(&g.log()).into_owned();
    assert!(log.contains("SIGTERM: draining"), "log:\n{log}");
    assert!(log.contains("stopped; WAL synced"), "log:\n{log}");

    g.restart();
    let mut c = g.client().await;
    // A drained server answered everything it applied: the balance dropped by the acknowledged
    // redeems exactly (requests it never read were not applied).
    let acked = load.ledger.lock().unwrap().acked.len() as i64;
    assert_eq!(
        crate::balance(&mut c, n).await,
        start - acked * crate::crash::AMOUNT,
        "applied but unanswered at drain"
    );
    let fin = verify_exactly_once(&mut c, n, start, &load, "after SIGTERM").await;
    assert!(fin <= start - 40 * crate::crash::AMOUNT, "at least the 40 acknowledged redeems are kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_healthz_are_served() {
    let g = Giftd::start();
    let mut c = g.client().await;
    let n = "6035719970001013";
    issue(&mut c, n, usd(1_000)).await;
    assert_eq!(redeem(&mut c, n, "m1", usd(100), false).await.result, ResultCode::Approved);
    assert_eq!(redeem(&mut c, n, "m2", usd(200), false).await.result, ResultCode::Approved);
    assert_eq!(redeem(&mut c, n, "m3", usd(5_000), false).await.result, ResultCode::InsufficientFunds);

    let (status, body) = http_get(g.metrics_addr(), "/metrics").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(sample(&body, r#"giftd_requests_total{op="redeem",result="approved"}"#), Some(2.0), "{body}");
    assert_eq!(sample(&body, r#"giftd_requests_total{op="redeem",result="insufficient_funds"}"#), Some(1.0), "{body}");
    assert_eq!(sample(&body, r#"giftd_requests_total{op="issue",result="approved"}"#), Some(1.0), "{body}");
    assert!(body.contains("# TYPE giftd_wal_group_size histogram"), "{body}");
    let groups = sample(&body, "giftd_wal_group_size_count").expect("giftd_wal_group_size_count");
    let decisions = sample(&body, "giftd_wal_group_size_sum").expect("giftd_wal_group_size_sum");
    assert!(groups >= 1.0 && decisions >= 4.0, "4 decisions were committed: count {groups}, sum {decisions}");
    assert!(!body.contains(n) && !body.contains(MERCHANT_LABEL), "no card numbers or merchant ids in metrics");

    // A replay and a corrupt stream are counted too.
    assert_eq!(redeem(&mut c, n, "m1", usd(100), false).await.approved_minor, 100);
    let mut bad = g.client().await;
    bad.tx.send_raw(&[3, 0, 0, 0, 1, 2, 3]);
    timed("flush", bad.tx.flush()).await.expect("flush");
    assert!(timed("error frame", bad.rx.recv_frame()).await.is_ok());
    let (_, body) = http_get(g.metrics_addr(), "/metrics").await;
    assert_eq!(sample(&body, "giftd_idempotent_replays_total"), Some(1.0), "{body}");
    assert_eq!(sample(&body, "giftd_protocol_errors_total"), Some(1.0), "{body}");
    assert_eq!(sample(&body, r#"giftd_requests_total{op="redeem",result="approved"}"#), Some(3.0), "{body}");

    let (status, body) = http_get(g.metrics_addr(), "/healthz").await;
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, _) = http_get(g.metrics_addr(), "/no-such-page").await;
    assert_eq!(status, 404);
}

const MERCHANT_LABEL: &str = crate::MERCHANT;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_and_exits_0_too() {
    let mut g = Giftd::start();
    let n = "6035719970003019";
    let mut c = g.client().await;
    issue(&mut c, n, usd(1_000)).await;
    assert_eq!(redeem(&mut c, n, "int-1", usd(250), false).await.result, ResultCode::Approved);
    let status = g.signal_and_wait(libc::SIGINT);
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(timed("closed", c.call(&giftd::wire::Request::Balance { number: crate::num(n) })).await.is_err());
    g.restart();
    assert_eq!(crate::balance(&mut g.client().await, n).await, 750);
}

#[test]
fn bad_configuration_exits_64_with_every_problem_named() {
    let (status, out, err) = crate::harness::run_to_exit(
        "[durability]\nmode = \"fast\"\n[limits]\nconnections_max = 0\n[programs.capped]\nmax_balance = \"-1\"\n",
    );
    assert_eq!(status.code(), Some(64), "stderr: {err}");
    assert!(!out.contains("giftd ready"), "{out}");
    for problem in ["durability.mode", "limits.connections_max", "programs.capped.max_balance"] {
        assert!(err.contains(problem), "{problem} not named in: {err}");
    }
    let (status, _, err) = crate::harness::run_to_exit("[limits]\nconections_max = 5\n");
    assert_eq!(status.code(), Some(64), "an unknown key is refused: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_closes_the_extra_connection() {
    let g = Giftd::with_config("[limits]\nconnections_max = 2\n");
    let n = "6035719970002011";
    let mut c1 = g.client().await;
    let mut c2 = g.client().await;
    issue(&mut c1, n, usd(1_000)).await;

    let third = timed("third connection", Client::connect(g.addr())).await;
    assert!(third.is_err(), "a third connection must be refused while two are open");
    // The two admitted connections are unaffected.
    assert_eq!(crate::balance(&mut c2, n).await, 1_000);
    assert_eq!(redeem(&mut c1, n, "lim-1", usd(100), false).await.result, ResultCode::Approved);
    let (_, body) = http_get(g.metrics_addr(), "/metrics").await;
    assert!(sample(&body, "giftd_connections_rejected_total").unwrap_or(0.0) >= 1.0, "{body}");
    assert_eq!(sample(&body, "giftd_connections_open"), Some(2.0), "{body}");

    // Closing one frees its slot (once the server has seen the close): a new connection then works.
    drop(c1);
    let deadline = Instant::now() + TIMEOUT;
    let mut c3 = loop {
        match Client::connect(g.addr()).await {
            Ok(c) => break c,
            Err(e) => assert!(Instant::now() < deadline, "slot never freed: {e:#}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(crate::balance(&mut c3, n).await, 900);
    assert_eq!(crate::balance(&mut c2, n).await, 900);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let g = Giftd::with_config("[limits]\nidle_timeout_secs = 1\n");
    let mut idle = g.client().await;
    let started = Instant::now();
    // No request: the server closes the connection after about a second.
    assert!(timed("idle close", idle.rx.recv_frame()).await.is_err(), "an idle connection is closed");
    assert!(started.elapsed() >= std::time::Duration::from_millis(500), "closed too early: {:?}", started.elapsed());
    // A busy one is not closed in between requests.
    let mut busy = g.client().await;
    let n = "6035719970004017";
    issue(&mut busy, n, usd(1_000)).await;
    assert_eq!(crate::balance(&mut busy, n).await, 1_000);
}

/// A SIGTERM sent the moment giftd says it is ready drains it (exit 0), rather than killing it
/// with the default action: the handlers are installed before the ready line.
#[test]
fn sigterm_right_after_ready_exits_0() {
    for _ in 0..5 {
        let mut g = Giftd::start();
        g.stop_cleanly();
    }
}
