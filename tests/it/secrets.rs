//! Card numbers never reach disk, logs or metrics in clear (DOMAIN.md, Security).

use crate::giftctl::json;
use crate::harness::{files_under, read_all};
use crate::{call, check, http_get, idem, issue, num, redeem, timed, usd, Giftd, MERCHANT};
use giftd::model::{LockReason, ResultCode};
use giftd::wire::Request;
use std::os::unix::fs::PermissionsExt;

/// 16, 17, 18 and 19 digits: two driven over TCP, two through giftctl.
const TCP_NUMBERS: [&str; 2] = ["6035719960000013", "60357199600001021"];
const CTL_NUMBERS: [&str; 2] = ["603571996000020334", "6035719960000304512"];
/// Refused as a card number (20 digits), but it still crossed the wire.
const TOO_LONG: &str = "60357199600004045678";
/// The merchant id giftctl acts as.
const CTL_MERCHANT: &str = "m-ctl-secrets";
/// A PIN distinctive enough that finding it in the data would not be chance.
const PIN: &str = "90817263";
/// Never issued: only looked up.
const UNKNOWN: &str = "6035719960000501";

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Every file in the data dir and the log, each searched for each needle.
fn scan(g: &Giftd, needles: &[&str]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut files = files_under(&g.data_dir());
    files.push(g.log_path());
    for f in &files {
        let bytes = read_all(f);
        for n in needles {
            if let Some(at) = find(&bytes, n.as_bytes()) {
                hits.push(format!("{n} in {} at byte {at}", f.display()));
            }
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn card_numbers_are_not_stored_or_logged_in_clear() {
    let mut g = Giftd::start();
    let mut c = g.client().await;
    for (i, n) in TCP_NUMBERS.iter().enumerate() {
        issue(&mut c, n, usd(10_000)).await;
        check(
            &redeem(&mut c, n, &format!("sec-r{i}"), usd(1_234), false).await,
            ResultCode::Approved,
            1_234,
            Some(8_766),
        );
        check(
            &redeem(&mut c, n, &format!("sec-x{i}"), usd(99_999), false).await,
            ResultCode::InsufficientFunds,
            0,
            None,
        );
        let reload = Request::Reload { idem: idem(MERCHANT, &format!("sec-l{i}")), number: num(n), money: usd(100) };
        check(&call(&mut c, &reload).await, ResultCode::Approved, 100, Some(8_866));
        let lock =
            Request::Lock { idem: idem(MERCHANT, &format!("sec-k{i}")), number: num(n), reason: LockReason::Fraud };
        check(&call(&mut c, &lock).await, ResultCode::Approved, 0, Some(8_866));
        let unlock = Request::Unlock { idem: idem(MERCHANT, &format!("sec-u{i}")), number: num(n) };
        check(&call(&mut c, &unlock).await, ResultCode::Approved, 0, Some(8_866));
        for r in [
            Request::Lookup { number: num(n) },
            Request::History { number: num(n), before_seq: 0, limit: 10, kind: None },
        ] {
            assert_eq!(timed("read", c.call(&r)).await.expect("reply").result(), ResultCode::Approved);
        }
    }
    assert_eq!(call(&mut c, &Request::Balance { number: num(UNKNOWN) }).await.result, ResultCode::CardNotFound);
    // A redeem whose number is refused by the decoder (built by hand: the typed encoder won't).
    let mut body = Vec::new();
    for s in [MERCHANT, "sec-bad", TOO_LONG] {
        body.push(s.len() as u8);
        body.extend_from_slice(s.as_bytes());
    }
    body.extend_from_slice(b"USD");
    body.extend_from_slice(&100i64.to_le_bytes());
    body.extend_from_slice(&[0, 0]);
    let mut frame = ((12 + body.len()) as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&[1, 0x13, 0, 0]);
    frame.extend_from_slice(&77u64.to_le_bytes());
    frame.extend_from_slice(&body);
    c.tx.send_raw(&frame);
    timed("flush", c.tx.flush()).await.expect("flush");
    let f = timed("reply", c.rx.recv_frame()).await.expect("reply");
    assert_eq!(&f.body[..], &(ResultCode::BadCardNumber as u16).to_le_bytes());

    for (i, n) in CTL_NUMBERS.iter().enumerate() {
        let key = format!("sec-ctl-i{i}");
        let m = ["--merchant", CTL_MERCHANT];
        json(
            &g,
            &[&["issue", "--number", n, "--currency", "USD", "--amount", "50.00", "--active", "--key", &key][..], &m]
                .concat(),
        );
        let key = format!("sec-ctl-r{i}");
        let v = json(&g, &[&["redeem", "--number", n, "--amount", "5.00", "--key", &key][..], &m].concat());
        assert_eq!(v["balance"], "45.00", "{v}");
        json(&g, &[&["lock", "--number", n, "--reason", "lost"][..], &m].concat());
        json(&g, &[&["unlock", "--number", n][..], &m].concat());
        json(&g, &["lookup", "--number", n]);
        json(&g, &["history", "--number", n]);
    }
    // A PIN, set and tried, and a generated number: neither may be written anywhere either.
    let pin = giftd::card_number::Pin::parse(PIN).expect("PIN");
    let set = Request::PinSet { idem: idem(MERCHANT, "sec-p1"), number: num(TCP_NUMBERS[0]), pin: pin.clone() };
    check(&call(&mut c, &set).await, ResultCode::Approved, 0, None);
    let verify = Request::PinVerify { idem: idem(MERCHANT, "sec-p2"), number: num(TCP_NUMBERS[0]), pin };
    check(&call(&mut c, &verify).await, ResultCode::Approved, 0, None);
    let v = json(&g, &["issue", "--generate", "--currency", "USD", "--amount", "1.00", "--active", "--key", "sec-g1"]);
    let generated = v["number"].as_str().expect("generated number").to_string();
    let (_, metrics) = http_get(g.metrics_addr(), "/metrics").await;
    drop(c);

    // A clean stop, a restart (recovery reads everything back) and another stop.
    g.stop_cleanly();
    g.restart();
    let mut c = g.client().await;
    assert_eq!(crate::balance(&mut c, TCP_NUMBERS[0]).await, 8_866);
    drop(c);
    g.stop_cleanly();

    let mut needles: Vec<&str> = TCP_NUMBERS.iter().chain(&CTL_NUMBERS).copied().collect();
    needles.extend([TOO_LONG, UNKNOWN, PIN, generated.as_str()]);
    let hits = scan(&g, &needles);
    assert!(hits.is_empty(), "card numbers found in clear:\n{}", hits.join("\n"));
    for n in &needles {
        assert!(!metrics.contains(n), "{n} in /metrics");
    }
    // The scan does read the data: the merchant ids (not secret, kept in history values) are there.
    for m in [MERCHANT, CTL_MERCHANT] {
        assert!(!scan(&g, &[m]).is_empty(), "the scan should find merchant id {m} in the data dir");
    }

    for file in ["secret.key", "pin.key"] {
        let mode = std::fs::metadata(g.data_dir().join(file)).expect(file).permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{file} mode {:o}", mode & 0o777);
    }
    let read = |f: &str| std::fs::read(g.data_dir().join(f)).expect(f);
    assert_ne!(read("secret.key"), read("pin.key"), "the PIN key is a second secret");
}
