//! Observability with the real tools: promtool checks a live scrape, a real Prometheus server
//! scrapes giftd and answers a PromQL query, the alert rules pass their promtool unit tests, and
//! the Grafana dashboard asks only for metrics giftd exports. promtool and prometheus come from
//! Debian's `prometheus` package, which `make test` installs.

use crate::holds::authorize;
use crate::lifecycle::sample;
use crate::{call, http_get, idem, issue, num, redeem, usd, Giftd, MERCHANT, TIMEOUT};
use giftd::model::{LockReason, ResultCode};
use giftd::wire::Request;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

/// Runs a tool to completion; panics with its output unless it succeeds.
fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run ({e}); is Debian's prometheus installed?"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({:?}):\n{text}", out.status);
    text
}

/// A live scrape after some traffic: promtool finds nothing to fix in it, and the gauges count the
/// cards, holds and liabilities that the traffic made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_scrape_passes_promtool_and_counts_cards_holds_and_liability() {
    let g = Giftd::start();
    let (status, body) = http_get(g.metrics_addr(), "/readyz").await;
    assert_eq!((status, body.trim()), (200, "ready"));
    let mut c = g.client().await;
    let cards = ["6035719980000012", "6035719980000020", "6035719980000038"];
    for n in cards {
        issue(&mut c, n, usd(10_000)).await;
    }
    let hold = authorize(&mut c, cards[0], "obs-a1", usd(2_500), false, 600).await;
    assert_eq!(hold.result, ResultCode::Approved);
    assert_eq!(redeem(&mut c, cards[1], "obs-r1", usd(1_000), false).await.result, ResultCode::Approved);
    let lock = Request::Lock { idem: idem(MERCHANT, "obs-l1"), number: num(cards[2]), reason: LockReason::Lost };
    assert_eq!(call(&mut c, &lock).await.result, ResultCode::Approved);

    let (status, body) = http_get(g.metrics_addr(), "/metrics").await;
    assert_eq!(status, 200);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    promtool.stdin.take().expect("stdin").write_all(body.as_bytes()).expect("write scrape");
    let out = promtool.wait_with_output().expect("promtool");
    let problems = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && problems.trim().is_empty(), "promtool check metrics:\n{problems}\n{body}");

    let at = |series: &str| sample(&body, series).unwrap_or_else(|| panic!("{series} missing:\n{body}"));
    assert_eq!(at(r#"giftd_cards{status="active"}"#), 2.0);
    assert_eq!(at(r#"giftd_cards{status="suspended"}"#), 1.0);
    assert_eq!(at(r#"giftd_cards{status="inactive"}"#), 0.0);
    assert_eq!(at("giftd_holds_open"), 1.0);
    assert_eq!(at(r#"giftd_held_minor_units{currency="USD"}"#), 2_500.0);
    assert_eq!(at(r#"giftd_liability_minor_units{currency="USD"}"#), 29_000.0);
    assert_eq!(at("giftd_ready"), 1.0);
    assert_eq!(at("giftd_requests_in_flight"), 0.0);
    assert_eq!(at("giftd_rocksdb_write_stopped"), 0.0);
    assert!(at("giftd_rocksdb_memtable_bytes") > 0.0);
    assert_eq!(at("giftd_rocksdb_write_stall_seconds_total"), 0.0);
    // WAL buckets reach past the request-latency range, up to disk stalls of seconds.
    assert!(at(r#"giftd_wal_fsync_seconds_bucket{le="2.5"}"#) > 0.0);
    assert!(at(r#"giftd_wal_write_seconds_bucket{le="2.5"}"#) > 0.0);
    // The commit it was built from: this test runs in a git checkout, so build.rs found one.
    let build = body.lines().find(|l| l.starts_with("giftd_build_info{")).unwrap_or_else(|| panic!("{body}"));
    let revision = build.split("revision=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("");
    assert!(revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit()), "{build}");
    assert!(build.ends_with(&format!(",version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))), "{build}");
}

/// A fresh scrape is small: each operation's approved count, no other request series, no latency
/// histogram until an operation happens; then only what happened appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_scrape_shows_only_series_that_can_be_nonzero() {
    let g = Giftd::start();
    let body = http_get(g.metrics_addr(), "/metrics").await.1;
    let requests: Vec<&str> = body.lines().filter(|l| l.starts_with("giftd_requests_total{")).collect();
    assert_eq!(requests.len(), giftd::wire::Opcode::ALL.len(), "{requests:#?}");
    assert!(requests.iter().all(|l| l.ends_with(r#",result="approved"} 0"#)), "{requests:#?}");
    assert!(!body.contains("giftd_request_duration_seconds"), "{body}");
    let samples = body.lines().filter(|l| !l.starts_with('#')).count();
    assert!(samples < 200, "{samples} samples in a fresh scrape:\n{body}");

    let mut c = g.client().await;
    let n = "6035719980000087";
    issue(&mut c, n, usd(100)).await;
    assert_eq!(redeem(&mut c, n, "fresh-1", usd(500), false).await.result, ResultCode::InsufficientFunds);
    let body = http_get(g.metrics_addr(), "/metrics").await.1;
    assert_eq!(sample(&body, r#"giftd_requests_total{op="redeem",result="insufficient_funds"}"#), Some(1.0));
    assert_eq!(sample(&body, r#"giftd_requests_total{op="redeem",result="approved"}"#), Some(0.0));
    assert_eq!(sample(&body, r#"giftd_request_duration_seconds_count{op="redeem"}"#), Some(1.0));
    assert_eq!(sample(&body, r#"giftd_request_duration_seconds_count{op="issue"}"#), Some(1.0));
    assert_eq!(body.matches("giftd_request_duration_seconds_count{").count(), 3, "hello, issue and redeem: {body}");
}

/// The figures add up after a known amount of work: 5 approved redeems are 5 durations of op
/// redeem, WAL groups were written and synced, bytes written; a restart reports its recovery; an
/// open subscription is counted while it lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_the_values_of_what_happened() {
    let mut g = Giftd::start();
    let mut c = g.client().await;
    let n = "6035719980000095";
    issue(&mut c, n, usd(10_000)).await;
    for i in 0..5 {
        assert_eq!(redeem(&mut c, n, &format!("val-{i}"), usd(100), false).await.result, ResultCode::Approved);
    }
    let body = http_get(g.metrics_addr(), "/metrics").await.1;
    let at = |series: &str| sample(&body, series).unwrap_or_else(|| panic!("{series} missing:\n{body}"));
    assert_eq!(at(r#"giftd_requests_total{op="redeem",result="approved"}"#), 5.0);
    assert_eq!(at(r#"giftd_request_duration_seconds_count{op="redeem"}"#), 5.0);
    assert_eq!(at(r#"giftd_request_duration_seconds_bucket{op="redeem",le="+Inf"}"#), 5.0);
    assert!(at(r#"giftd_request_duration_seconds_sum{op="redeem"}"#) > 0.0);
    // Every decision was written and synced before its reply: 6 decisions, in 1 to 6 groups.
    let groups = at("giftd_wal_write_seconds_count");
    assert!((1.0..=6.0).contains(&groups), "{groups} groups");
    assert_eq!(at("giftd_wal_group_size_count"), groups);
    assert_eq!(at("giftd_wal_group_size_sum"), 6.0);
    assert!(at("giftd_wal_fsync_seconds_count") >= 1.0);
    assert!(at("giftd_wal_fsync_seconds_sum") > 0.0);
    // Each group's wait for the committer is counted once; each sync counts the longest wait of
    // the groups it covers.
    assert_eq!(at(r#"giftd_commit_wait_seconds_count{stage="write"}"#), groups);
    let syncs = at(r#"giftd_commit_wait_seconds_count{stage="sync"}"#);
    assert!((1.0..=groups).contains(&syncs), "{syncs} syncs waited for, {groups} groups");
    assert!(syncs <= at("giftd_wal_fsync_seconds_count"));
    // A redeem's history entry carries the card record: a few dozen bytes each, at least.
    assert!(at("giftd_wal_written_bytes_total") > 6.0 * 30.0, "{}", at("giftd_wal_written_bytes_total"));

    drop(c);
    g.restart();
    let body = http_get(g.metrics_addr(), "/metrics").await.1;
    let at = |series: &str| sample(&body, series).unwrap_or_else(|| panic!("{series} missing:\n{body}"));
    assert_eq!(at("giftd_recovery_cards"), 1.0, "the one card, recovered after kill -9");
    let recovery = at("giftd_recovery_seconds");
    assert!(recovery > 0.0 && recovery < 30.0, "{recovery}");
    assert_eq!(at(r#"giftd_requests_total{op="redeem",result="approved"}"#), 0.0, "a new process counts anew");

    assert_eq!(at("giftd_subscriptions_open"), 0.0);
    let mut sub = g.client().await.subscribe(0, "", "", 0).await.expect("subscribe");
    let mut seen = 0;
    loop {
        let frame = crate::timed("events frame", sub.next()).await.expect("events frame");
        seen += frame.events.len();
        if frame.caught_up {
            break;
        }
    }
    assert_eq!(seen, 6, "the issue and 5 redeems");
    let body = http_get(g.metrics_addr(), "/metrics").await.1;
    assert_eq!(sample(&body, "giftd_subscriptions_open"), Some(1.0), "{body}");
    assert_eq!(sample(&body, "giftd_subscriptions_events_sent_total"), Some(6.0), "{body}");
    drop(sub);
    // giftd notices the close on its next read of that connection: wait for it, bounded.
    let deadline = Instant::now() + TIMEOUT;
    while sample(&http_get(g.metrics_addr(), "/metrics").await.1, "giftd_subscriptions_open") != Some(0.0) {
        assert!(Instant::now() < deadline, "the subscription was still counted open {TIMEOUT:?} after it closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Frames giftd cannot read and unknown opcodes name no operation: they are counted as requests of
/// op `unknown` with their result (and no duration), so the error-ratio alert, which divides the
/// protocol errors by all requests, sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_are_counted_as_requests_of_op_unknown() {
    use crate::protocol::{assert_error_frame, exchange, frame};
    let g = Giftd::start();
    let mut c = g.client().await;
    // An unknown opcode is answered (opcode | 0x80) and the connection goes on.
    assert_error_frame(&exchange(&mut c, &frame(1, 0x7e, 0, 5, b"")).await, 0xfe, 5, ResultCode::UnknownOpcode);
    // A frame shorter than its header, and one longer than the limit: each answered, then closed.
    let malformed = exchange(&mut g.client().await, &[3, 0, 0, 0, 1, 2, 3]).await;
    assert_error_frame(&malformed, 0x80, 0, ResultCode::MalformedFrame);
    let too_large = exchange(&mut g.client().await, &u32::MAX.to_le_bytes()).await;
    assert_error_frame(&too_large, 0x80, 0, ResultCode::FrameTooLarge);

    let body = http_get(g.metrics_addr(), "/metrics").await.1;
    let at = |result: &str| sample(&body, &format!("giftd_requests_total{{op=\"unknown\",result=\"{result}\"}}"));
    assert_eq!(at("unknown_opcode"), Some(1.0), "{body}");
    assert_eq!(at("malformed_frame"), Some(1.0), "{body}");
    assert_eq!(at("frame_too_large"), Some(1.0), "{body}");
    assert_eq!(sample(&body, "giftd_protocol_errors_total"), Some(2.0), "the two closed connections: {body}");
    assert!(!body.contains(r#"giftd_request_duration_seconds_count{op="unknown"}"#), "{body}");
}

/// Percent-encodes a PromQL query for a URL.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A Prometheus server, killed when dropped.
struct Prometheus {
    child: Child,
    addr: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A real Prometheus (Debian's) scrapes giftd every second, with the alert rules loaded; its query
/// API returns the count of approved redeems that giftd answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_giftd_and_answers_promql() {
    let g = Giftd::start();
    let mut c = g.client().await;
    let n = "6035719980000046";
    issue(&mut c, n, usd(10_000)).await;
    for i in 0..3 {
        assert_eq!(redeem(&mut c, n, &format!("prom-{i}"), usd(100), false).await.result, ResultCode::Approved);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: giftd\n    static_configs:\n      - targets: ['{}']\n",
        deploy("prometheus/alerts.yml").display(),
        g.metrics_addr()
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).expect("config");
    let addr = format!("127.0.0.1:{}", free_loopback_port());
    let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("prometheus (Debian package prometheus)");
    let prom = Prometheus { child, addr };
    let query = format!(
        "/api/v1/query?query={}",
        url_encode(r#"giftd_requests_total{job="giftd",op="redeem",result="approved"}"#)
    );
    let deadline = Instant::now() + TIMEOUT * 2;
    let last = loop {
        let answer = match tokio::net::TcpStream::connect(&prom.addr).await {
            Ok(_) => Some(http_get(&prom.addr, &query).await.1),
            Err(_) => None,
        };
        if let Some(body) = &answer {
            let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            if v["data"]["result"][0]["value"][1] == "3" {
                break body.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw 3 approved redeems; last answer {answer:?}; log:\n{}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(last.contains(r#""status":"success""#), "{last}");
    // The alert rules loaded into the real server, not only into promtool.
    let (_, rules) = http_get(&prom.addr, "/api/v1/rules").await;
    assert!(rules.contains("GiftdFsyncSlow") && rules.contains("GiftdNotReady"), "{rules}");
}

/// The alert rules' own unit tests (`promtool test rules`), and the example config checks out.
#[test]
fn alert_rules_pass_their_promtool_unit_tests() {
    let dir = deploy("prometheus");
    run_ok(Command::new("promtool").args(["check", "rules", "alerts.yml"]).current_dir(&dir), "promtool check rules");
    let text = run_ok(
        Command::new("promtool").args(["test", "rules", "alerts_test.yml"]).current_dir(&dir),
        "promtool test rules",
    );
    assert!(text.contains("SUCCESS"), "{text}");
    run_ok(
        Command::new("promtool").args(["check", "config", "prometheus.yml"]).current_dir(&dir),
        "promtool check config",
    );
}

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// Every metric the dashboard asks for is one giftd exports (a renamed metric would leave a panel
/// silently empty), and the dashboard picks its datasource from a variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_asks_only_for_exported_metrics() {
    let text = std::fs::read_to_string(deploy("grafana/giftd.json")).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let variables = dashboard["templating"]["list"].as_array().expect("templating variables");
    assert!(variables.iter().any(|v| v["type"] == "datasource" && v["query"] == "prometheus"), "{variables:?}");
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    assert!(all.len() >= 10, "panels with queries: {}", all.len());

    let g = Giftd::start();
    // Per-currency series exist once a card holds that currency.
    issue(&mut g.client().await, "6035719980000053", usd(500)).await;
    let body = http_get(g.metrics_addr(), "/metrics").await.1;
    let exported: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
    let mut missing = Vec::new();
    for e in &all {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("giftd_") {
            let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            rest = &rest[i + name.len()..];
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name);
            if !exported.contains(&name.as_str()) && !exported.contains(&base) {
                missing.push(name);
            }
        }
    }
    assert!(missing.is_empty(), "the dashboard uses metrics giftd does not export: {missing:?}");
}

/// Security alerts over TCP: velocity fires exactly at its threshold and suspends the card (which
/// stays suspended after a restart), enumeration counts balance reads and mutations of unknown
/// cards by client and fires exactly at its threshold, once; each is counted by rule and logged
/// with the card's last 4 digits only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_fire_at_their_threshold_and_suspend_over_tcp() {
    let mut g = Giftd::with_config(
        "[alerts]\nredemptions_per_card_per_minute = 3\nvelocity_suspend = true\nunknown_cards_per_minute = 3\n",
    );
    let n = "6035719980000061";
    let mut c = g.client().await;
    issue(&mut c, n, usd(10_000)).await;
    let alerts = |body: &str, rule: &str| sample(body, &format!("giftd_alerts_total{{rule=\"{rule}\"}}"));
    for i in 0..2 {
        assert_eq!(redeem(&mut c, n, &format!("vel-{i}"), usd(100), false).await.result, ResultCode::Approved);
    }
    let body = http_get(g.metrics_addr(), "/metrics").await.1;
    assert_eq!(alerts(&body, "velocity"), Some(0.0), "two redemptions are below the threshold of 3");
    assert_eq!(redeem(&mut c, n, "vel-2", usd(100), false).await.result, ResultCode::Approved);
    let body = http_get(g.metrics_addr(), "/metrics").await.1;
    assert_eq!(alerts(&body, "velocity"), Some(1.0), "the third fires");
    assert_eq!(redeem(&mut c, n, "vel-3", usd(100), false).await.result, ResultCode::CardSuspended);

    let unknown = "6035719980000079";
    let probe = Request::Balance { number: num(unknown) };
    assert_eq!(redeem(&mut c, unknown, "enum-0", usd(100), false).await.result, ResultCode::CardNotFound);
    assert_eq!(call(&mut c, &probe).await.result, ResultCode::CardNotFound);
    let body = http_get(g.metrics_addr(), "/metrics").await.1;
    assert_eq!(alerts(&body, "enumeration"), Some(0.0), "a mutation and a read: 2, under the threshold of 3");
    // A second connection of the same client (here: the same address) shares its count.
    let mut other = g.client().await;
    assert_eq!(call(&mut other, &probe).await.result, ResultCode::CardNotFound);
    let body = http_get(g.metrics_addr(), "/metrics").await.1;
    assert_eq!(alerts(&body, "enumeration"), Some(1.0), "the third unknown card fires");
    assert_eq!(call(&mut other, &probe).await.result, ResultCode::CardNotFound);
    let body = http_get(g.metrics_addr(), "/metrics").await.1;
    assert_eq!(alerts(&body, "enumeration"), Some(1.0), "once per burst");

    let log = String::from_utf8_lossy(&g.log()).into_owned();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("security alert")).collect();
    assert_eq!(lines.len(), 2, "{log}");
    assert!(
        lines[0].contains("velocity") && lines[0].contains("****0061") && lines[0].contains("suspended=true"),
        "{}",
        lines[0]
    );
    assert!(lines[1].contains("enumeration") && lines[1].contains("client=127.0.0.1"), "{}", lines[1]);
    assert!(!log.contains(n) && !log.contains(unknown), "no full card number in the log");

    // The suspension was written with its alert: it survives kill -9 and a restart.
    drop((c, other));
    g.restart();
    let mut c = g.client().await;
    assert_eq!(redeem(&mut c, n, "vel-4", usd(100), false).await.result, ResultCode::CardSuspended);
}

/// The other three rules over TCP, each at exactly its threshold: a large reload and two wrong
/// PINs suspend their cards (in the decision's own write, so the suspension and the alert survive
/// kill -9 with it), and a merchant's second reversal in the hour fires. The alerts reach a
/// subscriber in commit order, each right after what fired it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_amounts_wrong_pins_and_reversals_fire_at_their_threshold_over_tcp() {
    use crate::payments::{parts, reverse_req};
    use giftd::card_number::Pin;
    use giftd::wire::EventView;
    let mut g = Giftd::with_config(
        "[alerts]\npin_failures = 2\npin_failures_suspend = true\nreversals_per_merchant_per_hour = 2\n\
         large_amount_suspend = true\nredemptions_per_card_per_minute = 0\n[alerts.large_amount]\nUSD = \"50.00\"\n",
    );
    let (big, pinned, spent) = ("6035719980000087", "6035719980000095", "6035719980000103");
    let mut c = g.client().await;
    for n in [big, pinned, spent] {
        issue(&mut c, n, usd(4_000)).await;
    }
    let alerts = |body: &str, rule: &str| sample(body, &format!("giftd_alerts_total{{rule=\"{rule}\"}}"));
    let reload = |key: &str, minor| Request::Reload { idem: idem(MERCHANT, key), number: num(big), money: usd(minor) };
    assert_eq!(call(&mut c, &reload("l1", 5_000)).await.result, ResultCode::Approved, "50.00 is not above 50.00");
    let body = http_get(g.metrics_addr(), "/metrics").await.1;
    assert_eq!(alerts(&body, "large_amount"), Some(0.0), "at the threshold is not above it");
    assert_eq!(call(&mut c, &reload("l2", 5_001)).await.result, ResultCode::Approved, "the decision stands");
    assert_eq!(redeem(&mut c, big, "after-big", usd(100), false).await.result, ResultCode::CardSuspended);

    let pin = |p: &str| Pin::parse(p).expect("test PIN");
    let set = Request::PinSet { idem: idem(MERCHANT, "ps"), number: num(pinned), pin: pin("4821") };
    assert_eq!(call(&mut c, &set).await.result, ResultCode::Approved);
    let verify = |key: &str| Request::PinVerify { idem: idem(MERCHANT, key), number: num(pinned), pin: pin("1111") };
    assert_eq!(call(&mut c, &verify("v1")).await.result, ResultCode::PinIncorrect);
    let body = http_get(g.metrics_addr(), "/metrics").await.1;
    assert_eq!(alerts(&body, "pin_failures"), Some(0.0), "one wrong PIN is under the threshold of 2");
    assert_eq!(call(&mut c, &verify("v2")).await.result, ResultCode::PinIncorrect);
    assert_eq!(redeem(&mut c, pinned, "after-pin", usd(100), false).await.result, ResultCode::CardSuspended);

    for key in ["s1", "s2"] {
        assert_eq!(redeem(&mut c, spent, key, usd(100), false).await.result, ResultCode::Approved);
    }
    assert_eq!(parts(&mut c, &reverse_req("b1", "s1")).await.result, ResultCode::Approved);
    let body = http_get(g.metrics_addr(), "/metrics").await.1;
    assert_eq!(alerts(&body, "reversals"), Some(0.0), "one reversal is under the threshold of 2");
    assert_eq!(parts(&mut c, &reverse_req("b2", "s2")).await.result, ResultCode::Approved);
    let body = http_get(g.metrics_addr(), "/metrics").await.1;
    for rule in ["large_amount", "pin_failures", "reversals"] {
        assert_eq!(alerts(&body, rule), Some(1.0), "{rule} fired once");
    }

    // Durable with their decisions: after kill -9, the cards are still suspended, and a
    // subscriber from the start sees each alert right after the entry that fired it (a suspending
    // rule's after the card's lock entry).
    drop(c);
    g.kill9();
    g.restart();
    let mut c = g.client().await;
    assert_eq!(redeem(&mut c, big, "after-restart", usd(100), false).await.result, ResultCode::CardSuspended);
    let mut sub = g.client().await.subscribe(0, "", "", 0).await.expect("subscribe");
    let seen = crate::events::until_caught_up(&mut sub).await;
    let fired: Vec<(u8, bool, String)> = seen
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match e {
            EventView::Alert { rule, suspended, last4, .. } => {
                let kind = |e: &EventView| match e {
                    EventView::Txn { kind, .. } => format!("{kind:?}"),
                    EventView::Alert { .. } => "alert".into(),
                };
                let before = format!("{}+{}", kind(&seen[i - 2]), kind(&seen[i - 1]));
                assert_eq!(e.id(), seen[i - 1].id() + 1, "an alert follows what fired it");
                assert_eq!(seen[i - 1].id(), seen[i - 2].id() + 1);
                Some((*rule, *suspended, format!("{}:{before}", String::from_utf8_lossy(last4))))
            }
            EventView::Txn { .. } => None,
        })
        .collect();
    use giftd::engine::alerts::Rule;
    assert_eq!(
        fired,
        vec![
            (Rule::LargeAmount as u8, true, "0087:Reload+Lock".to_string()),
            (Rule::PinFailures as u8, true, "0095:PinFailed+Lock".to_string()),
            (Rule::Reversals as u8, false, "0000:Reversal+Reversal".to_string()),
        ]
    );
}

/// A processor takes back an activation whose large load made giftd suspend the card: the holder
/// did nothing since (the lock is giftd's own, in the activation's write), so the activation is
/// undone, after a restart too, where the original is read back from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_that_tripped_a_suspending_rule_is_still_reversed() {
    use crate::payments::{parts, reverse_req};
    let mut g = Giftd::with_config(
        "[alerts]
large_amount_suspend = true
[alerts.large_amount]
USD = \"50.00\"\n",
    );
    let (a, b) = ("6035719980000129", "6035719980000137");
    let mut c = g.client().await;
    for (n, key) in [(a, "act-a"), (b, "act-b")] {
        let mut issue = crate::issue_req(n, usd(0));
        if let Request::Issue { active, .. } = &mut issue {
            *active = false;
        }
        assert_eq!(call(&mut c, &issue).await.result, ResultCode::Approved);
        let activate = Request::Activate { idem: idem(MERCHANT, key), number: num(n), load: Some(usd(9_000)) };
        assert_eq!(call(&mut c, &activate).await.result, ResultCode::Approved);
        assert_eq!(redeem(&mut c, n, &format!("spend-{key}"), usd(100), false).await.result, ResultCode::CardSuspended);
    }
    let back = parts(&mut c, &reverse_req("back-a", "act-a")).await;
    assert_eq!((back.result, back.approved_minor), (ResultCode::Approved, 9_000));
    let v = crate::view(&mut c, a).await;
    assert_eq!((v.status, v.balance_minor), (giftd::model::Status::Suspended, 0), "back to no value, still locked");
    drop(c);
    g.kill9();
    g.restart();
    let mut c = g.client().await;
    assert_eq!(parts(&mut c, &reverse_req("back-b", "act-b")).await.result, ResultCode::Approved);
    assert_eq!(crate::view(&mut c, b).await.balance_minor, 0);
}

/// With `--log-format json` (here through its environment variable) every line giftd logs is one
/// JSON object with its fields at the top level, for a log collector: a security alert can be
/// filtered by rule, and still names its card by the last 4 digits only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_alerts_fields() {
    let g = Giftd::with_env(
        Some("[alerts]\nlarge_amount_suspend = true\n[alerts.large_amount]\nUSD = \"50.00\"\n"),
        &[("GIFTD_LOG_FORMAT", "json")],
    );
    let n = "6035719980000111";
    let mut c = g.client().await;
    issue(&mut c, n, usd(9_000)).await;
    drop(c);
    let log = String::from_utf8_lossy(&g.log()).into_owned();
    let lines: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"))).collect();
    assert!(lines.iter().any(|l| l["message"] == "giftd ready" && l["level"] == "INFO"), "{log}");
    let alert = lines.iter().find(|l| l["message"] == "security alert").unwrap_or_else(|| panic!("{log}"));
    assert_eq!(
        (&alert["rule"], &alert["card"], &alert["suspended"]),
        (&"large_amount".into(), &"****0111".into(), &true.into())
    );
    assert!(!log.contains(n), "no full card number in the log");
}
