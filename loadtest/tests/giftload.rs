//! giftload against a real giftd (started by `--spawn`): the report is the contract scripts and the
//! README's figures rely on, so these runs check it, and that `--rate` really paces the load.
//! giftd is found next to giftload; `cargo test --workspace` builds both into the same directory.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn giftload(args: &[&str]) -> Value {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_giftload"));
    let giftd = exe.with_file_name("giftd");
    assert!(giftd.exists(), "{} is missing: build the workspace's binaries first", giftd.display());
    let out = Command::new(&exe)
        .args(["--spawn", "--json", "--cards", "200"])
        .args(args)
        .env("GIFTD_BIN", &giftd)
        .output()
        .expect("run giftload");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "giftload {args:?} failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not one JSON object ({e}): {stdout}"))
}

#[test]
fn closed_loop_reports_an_audited_run() {
    let r = giftload(&["--connections", "2", "--pipeline", "4", "--duration-secs", "1"]);
    assert_eq!(r["audit"], "ok");
    assert_eq!(r["durability"], "sync");
    assert_eq!(r["rate"], Value::Null);
    assert_eq!(r["balances_checked"], 200);
    assert!(r["ops"].as_u64().unwrap() > 0, "{r}");
    assert!(r["p50_us"].as_u64().unwrap() <= r["p99_us"].as_u64().unwrap(), "{r}");
}

#[test]
fn the_latency_log_has_every_reply_of_the_report() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("latency.txt");
    let r = giftload(&["--rate", "300", "--duration-secs", "1", "--latency-log", log.to_str().unwrap()]);
    let text = std::fs::read_to_string(&log).expect("the log is written");
    let mut lines = text.lines();
    let header = lines.next().expect("a header");
    assert!(header.starts_with("# redeem start_unix_ms 1"), "{header}");
    let samples: Vec<(u64, u64)> = lines
        .map(|l| {
            let (sent, latency) = l.split_once(' ').unwrap_or_else(|| panic!("two numbers: {l:?}"));
            (sent.parse().unwrap(), latency.parse().unwrap())
        })
        .collect();
    assert_eq!(samples.len() as u64, r["ops"].as_u64().unwrap(), "one line per reply: {r}");
    // Sends are spread over the second the load ran, and no latency exceeds the report's maximum
    // (the histogram rounds to 3 significant digits, hence the margin).
    assert!(samples.iter().all(|(sent, _)| *sent < 2_000_000), "{samples:?}");
    let max = r["max_us"].as_u64().unwrap();
    assert!(samples.iter().all(|(_, l)| *l <= max + max / 100 + 1), "max {max}: {samples:?}");
}

#[test]
fn open_loop_sends_at_the_offered_rate() {
    // 200/s over 4 connections for 2 s is 400 requests. A closed loop would send thousands; the
    // lower bound leaves room for a slow shared machine.
    let r = giftload(&["--connections", "4", "--pipeline", "1", "--rate", "200", "--duration-secs", "2"]);
    assert_eq!(r["audit"], "ok");
    assert_eq!(r["rate"], 200);
    let ops = r["ops"].as_u64().unwrap();
    assert!((200..=404).contains(&ops), "{ops} requests at 200/s for 2 s: {r}");
}

#[test]
fn rate_is_checked() {
    let exe = env!("CARGO_BIN_EXE_giftload");
    let out = Command::new(exe).args(["--rate", "0"]).output().expect("run giftload");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rate must be between"), "{out:?}");
}

#[test]
fn every_workload_runs_in_one_audited_run() {
    let r = giftload(&[
        "--connections",
        "2",
        "--pipeline",
        "4",
        "--duration-secs",
        "1",
        "--workload",
        "redeem,auth-capture,split3,batch:64,batch-atomic:64,batch-each:64",
    ]);
    assert_eq!(r["audit"], "ok", "{r}");
    let per = r["workloads"].as_array().unwrap_or_else(|| panic!("no workloads in {r}"));
    let names: Vec<&str> = per.iter().map(|w| w["workload"].as_str().unwrap()).collect();
    assert_eq!(names, ["redeem", "auth-capture", "split3", "batch", "batch-atomic", "batch-each"]);
    for w in per {
        assert!(w["ops"].as_u64().unwrap() > 0, "{w}");
        assert_eq!(w["errors"], 0, "{w}");
    }
    // A pair is two requests.
    let pairs = &per[1];
    let (requests, units) = (pairs["requests_per_sec"].as_f64().unwrap(), pairs["ops_per_sec"].as_f64().unwrap());
    assert!((requests - 2.0 * units).abs() <= 0.2, "both are rounded to 0.1: {pairs}");
    // The top level repeats the first workload's figures.
    assert_eq!(r["ops"], per[0]["ops"]);
}

#[test]
fn unknown_workload_is_refused() {
    let exe = env!("CARGO_BIN_EXE_giftload");
    let out = Command::new(exe).args(["--workload", "redeem,bogus"]).output().expect("run giftload");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"), "{out:?}");
}

/// Against a giftd that lists clients, giftload authenticates every connection with --client and
/// --key-file (and without them it is refused).
#[test]
fn authenticates_as_a_configured_client() {
    use std::io::BufRead;
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_giftload"));
    let dir = tempfile::tempdir().expect("temp dir");
    let key = dir.path().join("bench.key");
    std::fs::write(&key, "07".repeat(32)).expect("key file");
    let config = dir.path().join("giftd.toml");
    let toml = format!("[[clients]]\nname = \"bench\"\nrole = \"operator\"\nkey_file = \"{}\"\n", key.display());
    std::fs::write(&config, toml).expect("config");
    let mut giftd = Command::new(exe.with_file_name("giftd"))
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start giftd");
    let mut line = String::new();
    std::io::BufReader::new(giftd.stdout.take().expect("stdout")).read_line(&mut line).expect("ready line");
    let addr = line.split_whitespace().find_map(|w| w.strip_prefix("listen=")).expect("listen=").to_string();
    let run = |extra: &[&str]| {
        Command::new(&exe)
            .args(["--addr", &addr, "--json", "--cards", "50", "--connections", "2", "--duration-secs", "1"])
            .args(extra)
            .output()
            .expect("run giftload")
    };
    let refused = run(&[]);
    assert!(!refused.status.success(), "giftload ran on a giftd that requires auth without a key");
    let out = run(&["--client", "bench", "--key-file", key.to_str().expect("utf-8 path")]);
    let _ = giftd.kill();
    let _ = giftd.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(r["audit"], "ok", "{r}");
    assert!(r["ops"].as_u64().unwrap() > 0, "{r}");
}
