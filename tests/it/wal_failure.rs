//! A failed WAL write stops giftd with exit status 74 (never continue on unknown durability), and
//! a restart loses nothing that was acknowledged before the failure.

use crate::crash::{start_drivers, verify_exactly_once, AMOUNT};
use crate::{issue, usd, Giftd};
use std::time::Duration;

/// Small enough to be reached in a second or two of redeems, large enough for startup files.
const FILE_SIZE_LIMIT_BYTES: u64 = 4 << 20;
const EXIT_IO_ERROR: i32 = 74;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_wal_write_stops_giftd_and_loses_nothing_acknowledged() {
    let mut g = Giftd::with_file_size_limit(FILE_SIZE_LIMIT_BYTES);
    let n = "6035719930000019";
    let start = 10_000_000;
    issue(&mut g.client().await, n, usd(start)).await;
    let (load, drivers) = start_drivers(&g, n, "walfail", 4);
    let status = tokio::task::spawn_blocking(move || {
        let status = g.wait_exit(Duration::from_secs(120));
        (g, status)
    })
    .await
    .expect("waiter");
    let (mut g, status) = status;
    for d in drivers {
        d.await.expect("driver");
    }
    assert_eq!(status.code(), Some(EXIT_IO_ERROR), "exit status {status:?}; log:\n{}", g.log_tail(20));
    let log = String::from_utf8_lossy(&g.log()).into_owned();
    assert!(log.contains("failed; stopping: durability is unknown"), "log says why:\n{}", g.log_tail(20));
    let acked = load.ledger.lock().unwrap().acked.len();
    assert!(acked > 0, "some redeems were acknowledged before the failure");

    g.lift_file_size_limit();
    g.restart();
    let mut c = g.client().await;
    let fin = verify_exactly_once(&mut c, n, start, &load, "after WAL failure").await;
    assert!(fin <= start - acked as i64 * AMOUNT);
}
