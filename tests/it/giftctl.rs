//! giftctl against a real giftd: JSON output, exit statuses.

use crate::harness::wait_exit;
use crate::{Giftd, TIMEOUT};
use serde_json::Value;
use std::io::Read;
use std::process::{Command, Stdio};

/// Runs giftctl with `args`; returns its exit status, stdout and stderr.
pub fn run(args: &[&str]) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_giftctl"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn giftctl");
    // Its output is one short line: it fits the pipe, so waiting before reading cannot deadlock.
    let status = wait_exit(&mut child, TIMEOUT).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("giftctl {args:?} did not finish within {TIMEOUT:?}")
    });
    let (mut out, mut err) = (String::new(), String::new());
    child.stdout.take().expect("stdout").read_to_string(&mut out).expect("read stdout");
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("read stderr");
    (status.code().unwrap_or_else(|| panic!("giftctl {args:?} killed by a signal")), out, err)
}

/// Runs giftctl with `args` and its stderr on a terminal (a pseudo-terminal of 120 columns); returns
/// its exit status, stdout and what it drew on the terminal.
pub fn run_on_terminal(args: &[&str]) -> (i32, String, String) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize { ws_row: 24, ws_col: 120, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: openpty writes two descriptors, which are then owned by the files made of them.
    let opened = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) };
    assert_eq!(opened, 0, "openpty");
    let (master, slave) = unsafe { (std::fs::File::from_raw_fd(master), std::fs::File::from_raw_fd(slave)) };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_giftctl"));
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::from(slave));
    let mut child = cmd.spawn().expect("spawn giftctl");
    // The terminal reads to its end (EIO) once no one holds its other side: our copy goes here.
    drop(cmd);
    let terminal = std::thread::spawn(move || {
        let (mut master, mut drawn, mut buf) = (master, Vec::new(), [0u8; 4096]);
        while let Ok(n @ 1..) = master.read(&mut buf) {
            drawn.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&drawn).into_owned()
    });
    let status = wait_exit(&mut child, TIMEOUT).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("giftctl {args:?} did not finish within {TIMEOUT:?}")
    });
    let mut out = String::new();
    child.stdout.take().expect("stdout").read_to_string(&mut out).expect("read stdout");
    (status.code().unwrap_or(-1), out, terminal.join().expect("terminal reader"))
}

/// Runs `giftctl --addr <g> --json <args>`, expects exit 0 and one JSON object.
pub fn json(g: &Giftd, args: &[&str]) -> Value {
    let mut all = vec!["--addr", g.addr(), "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = run(&all);
    assert_eq!(code, 0, "giftctl {args:?}: exit {code}, stderr {err}");
    let v: Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("giftctl {args:?}: not JSON ({e}): {out}"));
    assert!(v.is_object(), "{v}");
    v
}

/// Checks string (and number) fields of a giftctl JSON object.
#[track_caller]
fn expect(v: &Value, fields: &[(&str, &str)]) {
    for (k, want) in fields {
        let got = match &v[*k] {
            Value::String(s) => s.clone(),
            Value::Null => panic!("{k} missing in {v}"),
            other => other.to_string(),
        };
        assert_eq!(got, *want, "{k} in {v}");
    }
}

/// Exit status for a usage error, with nothing on stdout.
#[track_caller]
fn usage_error(args: &[&str]) {
    let (code, out, err) = run(args);
    assert_eq!(code, 2, "giftctl {args:?}: stdout {out} stderr {err}");
    assert!(out.is_empty(), "giftctl {args:?} printed {out}");
    assert!(!err.is_empty(), "giftctl {args:?} should say what is wrong");
}

#[test]
fn giftctl_drives_every_command_with_json() {
    let g = Giftd::start();
    let n = "6035719950000011";
    let v =
        json(&g, &["issue", "--number", n, "--currency", "USD", "--amount", "100.00", "--active", "--key", "ctl-i1"]);
    expect(&v, &[("result", "approved"), ("code", "0"), ("status", "active"), ("last4", "0011"), ("currency", "USD")]);
    expect(&v, &[("balance", "100.00"), ("available", "100.00"), ("held", "0.00"), ("approved", "100.00")]);
    expect(&v, &[("expires", "never")]);
    expect(&json(&g, &["balance", "--number", n]), &[("result", "approved"), ("balance", "100.00")]);

    let v = json(&g, &["redeem", "--number", n, "--amount", "30.00", "--key", "ctl-r1"]);
    expect(&v, &[("result", "approved"), ("approved", "30.00"), ("balance", "70.00"), ("available", "70.00")]);
    // Insufficient funds is an answer, not a failure: exit 0.
    let v = json(&g, &["redeem", "--number", n, "--amount", "100.00", "--key", "ctl-r2"]);
    expect(&v, &[("result", "insufficient_funds"), ("code", "35"), ("approved", "0.00"), ("balance", "70.00")]);
    let v = json(&g, &["redeem", "--number", n, "--amount", "100.00", "--partial", "--key", "ctl-r3"]);
    expect(&v, &[("result", "approved"), ("approved", "70.00"), ("balance", "0.00"), ("available", "0.00")]);
    // A retry with the same key answers the original outcome.
    let v = json(&g, &["redeem", "--number", n, "--amount", "30.00", "--key", "ctl-r1"]);
    expect(&v, &[("result", "approved"), ("approved", "30.00"), ("balance", "70.00")]);
    let v = json(&g, &["redeem", "--number", n, "--amount", "31.00", "--key", "ctl-r1"]);
    expect(&v, &[("result", "idempotency_mismatch")]);

    let v = json(&g, &["reload", "--number", n, "--amount", "25.50", "--key", "ctl-l1"]);
    expect(&v, &[("result", "approved"), ("approved", "25.50"), ("balance", "25.50")]);
    let v = json(&g, &["lock", "--number", n, "--reason", "stolen"]);
    expect(&v, &[("result", "approved"), ("status", "suspended"), ("lock_reason", "stolen")]);
    let v = json(&g, &["redeem", "--number", n, "--amount", "1.00", "--key", "ctl-r4"]);
    expect(&v, &[("result", "card_suspended"), ("status", "suspended"), ("balance", "25.50")]);
    let v = json(&g, &["unlock", "--number", n]);
    expect(&v, &[("result", "approved"), ("status", "active")]);
    assert!(v.get("lock_reason").is_none(), "no lock reason once unlocked: {v}");
    expect(&json(&g, &["unlock", "--number", n]), &[("result", "not_suspended")]);

    let v = json(&g, &["lookup", "--number", n]);
    expect(&v, &[("result", "approved"), ("status", "active"), ("balance", "25.50"), ("program", "default")]);
    expect(&v, &[("transactions", "6")]);
    let kinds: Vec<&str> =
        v["recent"].as_array().expect("recent").iter().map(|t| t["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["unlock", "lock", "reload", "redeem", "redeem", "issue"], "{v}");
    expect(&v["recent"][3], &[("seq", "3"), ("amount", "-70.00"), ("balance_after", "0.00")]);

    let v = json(&g, &["history", "--number", n, "--limit", "4"]);
    let seqs = |v: &Value| -> Vec<u64> {
        v["entries"].as_array().expect("entries").iter().map(|t| t["seq"].as_u64().unwrap()).collect()
    };
    assert_eq!(seqs(&v), [6, 5, 4, 3], "{v}");
    expect(&v, &[("result", "approved"), ("currency", "USD"), ("next_before", "3")]);
    let v = json(&g, &["history", "--number", n, "--limit", "4", "--before", "3"]);
    assert_eq!(seqs(&v), [2, 1], "{v}");
    expect(&v, &[("next_before", "0")]);

    // Inactive issue, then activation with its initial load.
    let m = "60357199500001019";
    let v = json(&g, &["issue", "--number", m, "--currency", "EUR", "--amount", "0"]);
    expect(&v, &[("result", "approved"), ("status", "inactive"), ("balance", "0.00"), ("currency", "EUR")]);
    let v = json(&g, &["activate", "--number", m, "--amount", "10.00", "--key", "ctl-a1"]);
    expect(&v, &[("result", "approved"), ("status", "active"), ("approved", "10.00"), ("balance", "10.00")]);
    let v = json(&g, &["redeem", "--number", m, "--amount", "1.00", "--currency", "USD", "--key", "ctl-r5"]);
    expect(&v, &[("result", "currency_mismatch"), ("balance", "10.00")]);

    // Born expired.
    let e = "603571995000020173";
    let v = json(
        &g,
        &[
            "issue",
            "--number",
            e,
            "--currency",
            "USD",
            "--amount",
            "5.00",
            "--active",
            "--expires",
            "2020-01-01T00:00:00Z",
        ],
    );
    expect(&v, &[("result", "approved"), ("status", "expired"), ("expires", "2020-01-01T00:00:00+00:00")]);
    expect(&json(&g, &["redeem", "--number", e, "--amount", "1.00", "--key", "ctl-r6"]), &[("result", "card_expired")]);

    // Zero-decimal currency.
    let y = "6035719950000300";
    expect(
        &json(&g, &["issue", "--number", y, "--currency", "JPY", "--amount", "1000", "--active"]),
        &[("balance", "1000")],
    );
    expect(
        &json(&g, &["redeem", "--number", y, "--amount", "250", "--key", "ctl-r7"]),
        &[("approved", "250"), ("balance", "750")],
    );

    let v = json(&g, &["balance", "--number", "6035719950000409"]);
    expect(&v, &[("result", "card_not_found"), ("code", "21")]);
    assert!(v.get("balance").is_none(), "{v}");
    let v = json(&g, &["redeem", "--number", "6035719950000409", "--amount", "1.00", "--key", "ctl-r8"]);
    expect(&v, &[("result", "card_not_found")]);
}

#[test]
fn giftctl_usage_errors_exit_2_and_change_nothing() {
    let g = Giftd::start();
    let n = "6035719950001019";
    json(&g, &["issue", "--number", n, "--currency", "USD", "--amount", "10.00", "--active", "--key", "u-i1"]);
    let a = g.addr();
    let new_card = "6035719950001027";
    let issue = |amount: &'static str, currency: &'static str, extra: &[&'static str]| {
        let mut v = vec!["issue", "--number", new_card, "--currency", currency, "--amount", amount];
        v.extend_from_slice(extra);
        v
    };
    let bad: Vec<Vec<&str>> = vec![
        issue("1.005", "USD", &[]),
        vec!["issue", "--number", "12345", "--currency", "USD", "--amount", "1.00"],
        issue("1.00", "XXX", &[]),
        issue("-1", "USD", &[]),
        issue("1", "USD", &["--expires", "soon"]),
        vec!["redeem", "--number", n, "--amount", "1.005", "--key", "u-r1"],
        vec!["redeem", "--number", n, "--amount", "lots", "--key", "u-r2"],
        vec!["lock", "--number", n, "--reason", "bored"],
        vec!["history", "--number", n, "--limit", "0"],
        vec!["frobnicate"],
        vec!["redeem", "--number", n, "--amount", "1.00"],
    ];
    for args in bad {
        let mut full = vec!["--addr", a, "--json"];
        full.extend(args);
        usage_error(&full);
    }

    expect(&json(&g, &["balance", "--number", n]), &[("balance", "10.00"), ("status", "active")]);
    expect(&json(&g, &["balance", "--number", "6035719950001027"]), &[("result", "card_not_found")]);
    // The keys used above were never recorded.
    let v = json(&g, &["redeem", "--number", n, "--amount", "1.00", "--key", "u-r1"]);
    expect(&v, &[("result", "approved"), ("balance", "9.00")]);
}

#[test]
fn giftctl_unreachable_server_exits_1() {
    // A port that was just free: nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let addr = format!("127.0.0.1:{port}");
    for args in [
        vec!["balance", "--number", "6035719950002017"],
        vec!["redeem", "--number", "6035719950002017", "--amount", "1.00", "--key", "x"],
    ] {
        let mut all = vec!["--addr", addr.as_str(), "--json"];
        all.extend(args);
        let (code, out, err) = run(&all);
        assert_eq!(code, 1, "{all:?}: stdout {out} stderr {err}");
        assert!(out.is_empty(), "{out}");
        assert!(err.contains(&addr), "the error names the address: {err}");
    }
}

#[test]
fn giftctl_authorizes_captures_and_voids() {
    let g = Giftd::start();
    let n = "6035719950000029";
    json(&g, &["issue", "--number", n, "--currency", "USD", "--amount", "100.00", "--active", "--key", "ctl-i1"]);
    let v = json(&g, &["authorize", "--number", n, "--amount", "40.00", "--key", "ctl-a1", "--ttl-secs", "600"]);
    expect(&v, &[("result", "approved"), ("approved", "40.00"), ("balance", "100.00"), ("held", "40.00")]);
    expect(&v, &[("available", "60.00")]);
    let hold = v["hold_id"].as_u64().unwrap_or_else(|| panic!("hold_id in {v}")).to_string();
    assert!(v["hold_expires"].as_str().is_some_and(|s| s.contains('T')), "{v}");
    expect(&json(&g, &["balance", "--number", n]), &[("held", "40.00"), ("available", "60.00")]);
    let v = json(&g, &["lookup", "--number", n]);
    assert_eq!(v["holds"][0]["hold_id"].to_string(), hold, "{v}");
    expect(&v["holds"][0], &[("amount", "40.00")]);

    let v = json(&g, &["capture", "--hold", &hold, "--amount", "15.00", "--key", "ctl-c1"]);
    expect(&v, &[("result", "approved"), ("approved", "15.00"), ("balance", "85.00"), ("held", "0.00")]);
    let v = json(&g, &["void", "--hold", &hold, "--key", "ctl-v1"]);
    expect(&v, &[("result", "hold_not_found"), ("code", "36")]);

    let v = json(&g, &["authorize", "--number", n, "--amount", "500.00", "--partial", "--key", "ctl-a2"]);
    expect(&v, &[("result", "approved"), ("approved", "85.00"), ("available", "0.00")]);
    let hold = v["hold_id"].as_u64().unwrap().to_string();
    // A capture in another currency is declined, never converted.
    let v = json(&g, &["capture", "--hold", &hold, "--amount", "1.00", "--currency", "EUR", "--key", "ctl-c2"]);
    expect(&v, &[("result", "currency_mismatch")]);
    let v = json(&g, &["void", "--hold", &hold, "--key", "ctl-v2"]);
    expect(&v, &[("result", "approved"), ("approved", "85.00"), ("held", "0.00"), ("available", "85.00")]);

    usage_error(&["--addr", g.addr(), "authorize", "--number", n, "--amount", "1.00", "--key", "k", "--ttl-secs", "0"]);
    usage_error(&["--addr", g.addr(), "capture", "--hold", "x", "--amount", "1.00", "--key", "k"]);
}

#[test]
fn giftctl_refunds_reverses_and_splits() {
    let g = Giftd::start();
    let (a, b) = ("6035719950000037", "6035719950000045");
    json(&g, &["issue", "--number", a, "--currency", "USD", "--amount", "50.00", "--active", "--key", "ctl-i1"]);
    json(&g, &["issue", "--number", b, "--currency", "USD", "--amount", "20.00", "--active", "--key", "ctl-i2"]);

    let v = json(&g, &["split-redeem", "--numbers", &format!("{a},{b}"), "--amount", "60.00", "--key", "ctl-s1"]);
    expect(&v, &[("result", "approved"), ("approved", "60.00"), ("currency", "USD")]);
    assert_eq!(v["parts"][0]["last4"], "0037", "{v}");
    expect(&v["parts"][0], &[("amount", "-50.00"), ("balance_after", "0.00")]);
    expect(&v["parts"][1], &[("last4", "0045"), ("amount", "-10.00"), ("balance_after", "10.00")]);
    let v = json(&g, &["split-redeem", "--numbers", &format!("{a},{b}"), "--amount", "99.00", "--key", "ctl-s2"]);
    expect(&v, &[("result", "insufficient_funds")]);
    assert!(v.get("parts").is_none(), "{v}");

    let v = json(&g, &["refund", "--number", b, "--amount", "4.00", "--key", "ctl-f1", "--original", "ctl-s1"]);
    expect(&v, &[("result", "approved"), ("approved", "4.00"), ("balance", "14.00")]);
    let v = json(&g, &["refund", "--number", b, "--amount", "7.00", "--key", "ctl-f2", "--original", "ctl-s1"]);
    expect(&v, &[("result", "refund_exceeds_original"), ("code", "42")]);
    let v = json(&g, &["refund", "--number", b, "--amount", "1.00", "--key", "ctl-f3"]);
    expect(&v, &[("result", "refund_reference_required")]);

    let v = json(&g, &["reverse", "--original", "ctl-s1", "--key", "ctl-v1"]);
    expect(&v, &[("result", "approved"), ("approved", "56.00")]);
    expect(&v["parts"][0], &[("last4", "0037"), ("amount", "50.00"), ("balance_after", "50.00")]);
    expect(&v["parts"][1], &[("last4", "0045"), ("amount", "6.00"), ("balance_after", "20.00")]);
    let v = json(&g, &["reverse", "--original", "ctl-s1", "--key", "ctl-v2"]);
    expect(&v, &[("result", "approved"), ("approved", "56.00")]);
    expect(&json(&g, &["balance", "--number", a]), &[("balance", "50.00")]);

    usage_error(&[
        "--addr",
        g.addr(),
        "split-redeem",
        "--numbers",
        a,
        "--amount",
        "1.00",
        "--key",
        "k",
        "--order",
        "random",
    ]);
    usage_error(&["--addr", g.addr(), "reverse", "--original", "", "--key", "k"]);
}

#[test]
fn giftctl_registers_and_cashes_out() {
    let g = Giftd::start();
    let n = "6035719950000052";
    json(&g, &["issue", "--number", n, "--currency", "USD", "--amount", "12.34", "--active", "--key", "ctl-i1"]);
    expect(&json(&g, &["register", "--number", n, "--member", "M-9", "--vip"]), &[("result", "approved")]);
    let v = json(&g, &["lookup", "--number", n]);
    assert_eq!((v["vip"].as_bool(), v["member"].as_str()), (Some(true), Some("M-9")), "{v}");
    // What is not given is kept.
    expect(&json(&g, &["register", "--number", n, "--no-vip"]), &[("result", "approved")]);
    let v = json(&g, &["lookup", "--number", n]);
    assert_eq!((v["vip"].as_bool(), v["member"].as_str()), (Some(false), Some("M-9")), "{v}");
    let v = json(&g, &["cash-out", "--number", n, "--key", "ctl-x1"]);
    expect(&v, &[("result", "approved"), ("approved", "12.34"), ("balance", "0.00"), ("status", "closed")]);
    let v = json(&g, &["cash-out", "--number", n, "--key", "ctl-x2"]);
    expect(&v, &[("result", "card_closed"), ("code", "24")]);
    usage_error(&["--addr", g.addr(), "register", "--number", n, "--vip", "--no-vip"]);
}

#[test]
fn giftctl_transfers() {
    let g = Giftd::start();
    let (a, b) = ("6035719950000060", "6035719950000078");
    json(&g, &["issue", "--number", a, "--currency", "USD", "--amount", "25.00", "--active", "--key", "ctl-i1"]);
    json(&g, &["issue", "--number", b, "--currency", "USD", "--amount", "5.00", "--active", "--key", "ctl-i2"]);
    let v = json(&g, &["note", "--number", a, "--text", "Card reported damaged", "--merchant", "ops-ann"]);
    expect(&v, &[("result", "approved")]);
    let v = json(&g, &["transfer", "--from", a, "--to", b, "--key", "ctl-t1"]);
    expect(&v, &[("result", "approved"), ("approved", "25.00"), ("currency", "USD")]);
    expect(&v["parts"][0], &[("last4", "0060"), ("amount", "-25.00"), ("balance_after", "0.00")]);
    expect(&v["parts"][1], &[("last4", "0078"), ("amount", "25.00"), ("balance_after", "30.00")]);
    expect(&json(&g, &["balance", "--number", a]), &[("status", "closed")]);
    let v = json(&g, &["lookup", "--number", a]);
    expect(
        &v["notes"][0],
        &[("author", "giftctl"), ("text", "Balance of 25.00 USD transferred to card ending 0078; card closed")],
    );
    expect(&v["notes"][1], &[("author", "ops-ann"), ("text", "Card reported damaged")]);
    usage_error(&["--addr", g.addr(), "transfer", "--from", a, "--to", a, "--key", "k"]);
    usage_error(&["--addr", g.addr(), "note", "--number", a, "--text", ""]);
}

#[test]
fn giftctl_reactivate_explains_itself() {
    let g = Giftd::start();
    let n = "6035719950000086";
    let expired = (chrono::Utc::now() - chrono::Duration::minutes(30 * 60 + 1)).to_rfc3339();
    json(
        &g,
        &[
            "issue",
            "--number",
            n,
            "--currency",
            "USD",
            "--amount",
            "9.00",
            "--active",
            "--expires",
            &expired,
            "--key",
            "ctl-i1",
        ],
    );
    let v = json(&g, &["reactivate", "--number", n, "--key", "ctl-r1"]);
    expect(&v, &[("result", "not_eligible"), ("code", "53"), ("status", "expired")]);
    assert!(v["reason"].as_str().is_some_and(|r| r.starts_with("expired 30 h ago, not VIP")), "{v}");
    json(&g, &["register", "--number", n, "--vip"]);
    let v = json(&g, &["reactivate", "--number", n, "--key", "ctl-r2"]);
    expect(&v, &[("result", "approved"), ("status", "active"), ("reason", "Reactivated per policy – VIP customer")]);
}

#[test]
fn giftctl_generates_numbers_manages_pins_and_programs() {
    let g = Giftd::start();
    // A program made from giftctl, changed key by key; `program get` shows every key.
    let v =
        json(&g, &["program", "set", "--name", "gifts", "--set", "pin_required=true", "--set", "max_balance=300.00"]);
    expect(&v, &[("result", "approved"), ("program", "gifts")]);
    assert_eq!(
        (v["settings"]["pin_required"].as_bool(), v["settings"]["max_balance"].as_str()),
        (Some(true), Some("300.00")),
        "{v}"
    );
    let v = json(&g, &["program", "set", "--name", "gifts", "--set", "pin_tries_max=5", "--unset", "max_balance"]);
    assert_eq!(v["settings"]["pin_tries_max"].as_i64(), Some(5), "{v}");
    assert!(v["settings"].get("max_balance").is_none() && v["settings"]["pin_required"].as_bool() == Some(true), "{v}");
    let v = json(&g, &["program", "set", "--name", "gifts", "--set", "pin_tries_max=0"]);
    expect(&v, &[("result", "bad_program_settings"), ("code", "13")]);
    assert!(v["reason"].as_str().is_some_and(|r| r.contains("pin_tries_max")), "{v}");
    expect(&json(&g, &["program", "get", "--name", "nope"]), &[("result", "unknown_program")]);

    // A generated, virtual card: the number shows once.
    let issue = ["issue", "--generate", "--virtual", "--email", "ann@example.com", "--program", "gifts"];
    let v =
        json(&g, &[&issue[..], &["--currency", "USD", "--amount", "20.00", "--active", "--key", "ctl-g1"]].concat());
    expect(&v, &[("result", "approved"), ("balance", "20.00")]);
    let n = v["number"].as_str().expect("number in the first answer").to_string();
    assert!(n.starts_with("60") && n.len() == 16 && n.ends_with(v["last4"].as_str().unwrap()), "{v}");
    let again =
        json(&g, &[&issue[..], &["--currency", "USD", "--amount", "20.00", "--active", "--key", "ctl-g1"]].concat());
    assert!(again.get("number").is_none(), "a replay never shows the number: {again}");
    let v = json(&g, &["lookup", "--number", &n]);
    assert_eq!(
        (v["virtual"].as_bool(), v["email"].as_str(), v["pin_set"].as_bool()),
        (Some(true), Some("ann@example.com"), Some(false)),
        "{v}"
    );

    // PINs: required by the program, set, verified, locked after 5, reset.
    expect(
        &json(&g, &["redeem", "--number", &n, "--amount", "1.00", "--key", "ctl-r0"]),
        &[("result", "pin_required")],
    );
    expect(&json(&g, &["pin", "set", "--number", &n, "--pin", "2468"]), &[("result", "approved")]);
    expect(&json(&g, &["pin", "verify", "--number", &n, "--pin", "2468"]), &[("result", "approved")]);
    let v = json(&g, &["redeem", "--number", &n, "--amount", "1.00", "--key", "ctl-r1", "--pin", "2468"]);
    expect(&v, &[("result", "approved"), ("balance", "19.00")]);
    for i in 0..5 {
        let v = json(&g, &["pin", "verify", "--number", &n, "--pin", "1357", "--key", &format!("ctl-w{i}")]);
        expect(&v, &[("result", "pin_incorrect"), ("code", "60")]);
        let last = v["reason"].as_str().is_some_and(|r| r.contains("the card is now PIN-locked"));
        assert_eq!(last, i == 4, "only the fifth wrong PIN says it locked the card: {v}");
    }
    let v = json(&g, &["lookup", "--number", &n]);
    expect(&v, &[("status", "pin_locked"), ("pin_failures", "5")]);
    expect(&json(&g, &["pin", "reset", "--number", &n]), &[("result", "approved"), ("status", "active")]);
    expect(&json(&g, &["pin", "reset", "--number", &n]), &[("result", "not_pin_locked")]);
    usage_error(&["--addr", g.addr(), "pin", "set", "--number", &n, "--pin", "12"]);
    usage_error(&["--addr", g.addr(), "issue", "--currency", "USD", "--amount", "1"]);
}

/// `giftctl events`: JSON lines in commit order, filtered, resumable from the last id seen; the
/// card by its last 4 digits only; a bad kind is a usage error.
#[test]
fn giftctl_events_lists_resumes_and_filters() {
    let g = Giftd::start();
    let n = "6035719950000086";
    json(&g, &["issue", "--number", n, "--currency", "USD", "--amount", "25.00", "--active", "--key", "ev-i1"]);
    json(&g, &["redeem", "--number", n, "--amount", "5.00", "--key", "ev-r1"]);
    json(&g, &["redeem", "--number", n, "--amount", "2.50", "--key", "ev-r2", "--merchant", "m-other"]);
    let lines = |args: &[&str]| -> Vec<Value> {
        let mut all = vec!["--addr", g.addr(), "events"];
        all.extend_from_slice(args);
        let (code, out, err) = run(&all);
        assert_eq!(code, 0, "giftctl events {args:?}: {err}");
        assert!(!out.contains(n), "no full card number in {out}");
        out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
    };
    let all = lines(&[]);
    assert_eq!(all.len(), 3, "{all:?}");
    expect(&all[0], &[("type", "txn"), ("kind", "issue"), ("card", "****0086"), ("amount", "25.00")]);
    expect(&all[1], &[("kind", "redeem"), ("amount", "-5.00"), ("balance_after", "20.00"), ("merchant", "giftctl")]);
    expect(&all[2], &[("kind", "redeem"), ("merchant", "m-other"), ("balance_after", "17.50")]);
    let first_id = all[0]["id"].as_u64().expect("id").to_string();
    let rest = lines(&["--from", &first_id]);
    assert_eq!(rest, all[1..].to_vec(), "resumed after the first: the other two, once");
    let other = lines(&["--merchant", "m-other"]);
    assert_eq!(other, all[2..].to_vec());
    let issues = lines(&["--kinds", "issue,alert"]);
    assert_eq!(issues, all[..1].to_vec());
    usage_error(&["--addr", g.addr(), "events", "--kinds", "nonsense"]);
}
