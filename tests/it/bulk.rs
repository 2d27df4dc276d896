//! Batch frames and bulk jobs over TCP: items decided each on their own, jobs by range and by
//! manifest, resubmission by job id, partial failures, taking a job back, and kill -9 in the middle
//! of a job.

use crate::{call, check, eur, idem, num, timed, usd, Giftd, MERCHANT};
use giftd::bulk::{self, Cards, Job, Work};
use giftd::model::ResultCode;
use giftd::wire::{BatchItem, BatchMode, Reply, Request};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const FIRST: &str = "6035719980000000";

fn job<'a>(g: &'a Giftd, id: &'a str, chunk: usize) -> Job<'a> {
    Job { addr: g.addr(), credentials: None, merchant: "reseller-9", id, chunk, window: 3 }
}

fn range(count: u64) -> Cards {
    Cards::Range { first: num(FIRST), count }
}

fn nth(i: u64) -> String {
    range(i + 1).get(i).expect("in range").expose().to_string()
}

#[tokio::test]
async fn batch_items_are_decided_each_on_its_own() {
    let g = Giftd::start();
    let mut c = g.client().await;
    let a = nth(0);
    let mut malformed = BatchItem::of(&crate::redeem_req(&a, "b-3", usd(100), false));
    malformed.body.truncate(malformed.body.len() - 1);
    let items = vec![
        BatchItem::of(&crate::issue_req(&a, usd(1_000))),
        BatchItem::of(&crate::redeem_req(&a, "b-1", usd(300), false)),
        BatchItem::of(&crate::redeem_req(&nth(1), "b-2", usd(100), false)),
        malformed,
        BatchItem::of(&Request::Lookup { number: num(&a) }),
        BatchItem { opcode: 0x7f, body: bytes::Bytes::from_static(b"\x00") },
        BatchItem { opcode: 0x30, body: bytes::Bytes::from_static(b"\x00\x00") },
        BatchItem::of(&Request::Balance { number: num(&a) }),
    ];
    let req = Request::Batch { mode: BatchMode::Items, items };
    let reply = timed("batch", c.call(&req)).await.expect("batch");
    let Reply::Batch(replies) = &reply else { panic!("{reply:?}") };
    let got: Vec<(u8, ResultCode)> = replies.iter().map(|(op, r)| (*op, r.result())).collect();
    use ResultCode::*;
    assert_eq!(
        got,
        [
            (0x90, Approved),
            (0x93, Approved),
            (0x93, CardNotFound),
            (0x93, MalformedRequest),
            (0x97, MalformedRequest),
            (0xff, UnknownOpcode),
            (0xb0, MalformedRequest),
            (0x92, Approved),
        ]
    );
    let Reply::Card(balance) = &replies[7].1 else { panic!("{:?}", replies[7]) };
    assert_eq!(balance.card.unwrap().balance_minor, 700, "items run in order: the balance sees the redeem");
    // The same batch again: every mutation replays, nothing is applied twice, the reply is the same.
    assert_eq!(timed("batch again", c.call(&req)).await.expect("batch"), reply);
    assert_eq!(crate::balance(&mut c, &a).await, 700);
    // Each item is idempotent as if sent alone: the redeem's key answers a plain retry too.
    check(&call(&mut c, &crate::redeem_req(&a, "b-1", usd(300), false)).await, Approved, 300, Some(700));
    // A batch of none, or of more than 8,192, is refused whole.
    let empty =
        timed("empty", c.call(&Request::Batch { mode: BatchMode::Items, items: Vec::new() })).await.expect("reply");
    assert_eq!(empty, Reply::Error(MalformedRequest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_by_range_and_manifest_are_idempotent_and_report_each_outcome() {
    let mut g = Giftd::start();
    let issue = Work::Issue { program: "default".into(), money: usd(2_500), expiry_ms: None };
    let (opened, s) = bulk::run(job(&g, "inv-1", 500), &range(3_000), &issue, |_, _| {}).await.expect("issue job");
    assert_eq!((opened.result, opened.count), (ResultCode::Approved, 3_000));
    assert_eq!(s.counts.get("issued"), Some(&3_000));
    // The cards are inventory: inactive, with their value.
    let mut c = g.client().await;
    let v = crate::view(&mut c, &nth(2_999)).await;
    assert_eq!((v.status, v.balance_minor), (giftd::model::Status::Inactive, 2_500));

    // A manifest: two cards activated beforehand, one unknown number.
    let single = Request::Activate { idem: idem(MERCHANT, "pre-1"), number: num(&nth(10)), load: None };
    check(&call(&mut c, &single).await, ResultCode::Approved, 0, None);
    let manifest: Vec<_> = [nth(9), nth(10), "6035719989999999".to_string(), nth(11)].iter().map(|n| num(n)).collect();
    let load = Work::Activate { load: Some(usd(500)) };
    let (_, s) = bulk::run(job(&g, "act-m", 2), &Cards::Manifest(manifest.clone()), &load, |_, _| {}).await.unwrap();
    let want: Vec<(&str, u64)> = vec![("activated", 2), ("already_active", 1), ("not_found", 1)];
    assert_eq!(s.counts.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(), want);
    assert_eq!(
        s.failures.iter().map(|f| (f.0, f.2)).collect::<Vec<_>>(),
        [(1, ResultCode::AlreadyActive), (2, ResultCode::CardNotFound)]
    );
    // Running it again applies nothing and answers the same summary.
    let (_, again) = bulk::run(job(&g, "act-m", 3), &Cards::Manifest(manifest), &load, |_, _| {}).await.unwrap();
    assert_eq!(again, s);
    assert_eq!(crate::balance(&mut c, &nth(9)).await, 3_000, "loaded once");
    // The same id for another job is refused before any card is touched.
    let (other, none) = bulk::run(job(&g, "act-m", 2), &range(5), &load, |_, _| {}).await.unwrap();
    assert_eq!((other.result, none.total()), (ResultCode::IdempotencyMismatch, 0));

    // Through giftctl: a range activation, then taken back with two cards used in between.
    let ctl = |args: &[&str]| crate::giftctl::json(&g, &[args, &["--merchant", "reseller-9"][..]].concat());
    let first = nth(100);
    let v = ctl(&[
        "bulk",
        "activate",
        "--first",
        &first,
        "--count",
        "200",
        "--amount",
        "5.00",
        "--currency",
        "USD",
        "--job",
        "act-r",
        "--chunk",
        "64",
    ]);
    assert_eq!(v["summary"]["activated"], 200, "{v}");
    crate::redeem(&mut c, &nth(150), "use-1", usd(100), false).await;
    let note = Request::Note { idem: idem("ops", "n-1"), number: num(&nth(160)), text: "customer called".into() };
    call(&mut c, &note).await;
    // After a restart the job's chunks are read back from the store, which keeps no list of the
    // cards a chunk changed: the reversal finds them through the chunks' history entries.
    drop(c);
    g.restart();
    let mut c = g.client().await;
    let ctl = |args: &[&str]| crate::giftctl::json(&g, &[args, &["--merchant", "reseller-9"][..]].concat());
    let v = ctl(&["bulk", "reverse", "--job", "act-r"]);
    assert_eq!((v["summary"]["reversed"].as_u64(), v["summary"]["used"].as_u64()), (Some(198), Some(2)), "{v}");
    let used: Vec<u64> = v["failures"].as_array().unwrap().iter().map(|f| f["index"].as_u64().unwrap()).collect();
    assert_eq!(used, [50, 60]);
    let v = crate::view(&mut c, &nth(101)).await;
    assert_eq!((v.status, v.balance_minor), (giftd::model::Status::Inactive, 2_500), "back to inventory");
    assert_eq!(crate::view(&mut c, &nth(150)).await.balance_minor, 2_900, "a used card is left alone");
    let v = ctl(&["bulk", "reverse", "--job", "nope"]);
    assert_eq!(v["result"], "job_not_found", "{v}");
}

/// `giftctl bulk issue --generate`: new random numbers, kept in the first round's file before any
/// is issued; the same command again resumes from it; a number that was a card already is
/// replaced by a new one, in a round of its own; the manifest, written once every card is issued,
/// lists the box's cards and then drives the activation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giftctl_generates_a_manifest_issues_it_and_resumes_from_it() {
    use std::os::unix::fs::PermissionsExt;
    let g = Giftd::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("box-7.csv");
    let file = path.to_str().unwrap();
    let ctl = |args: &[&str]| crate::giftctl::json(&g, &[args, &["--merchant", "reseller-9"][..]].concat());
    let issue = |count: &'static str| {
        [
            "bulk",
            "issue",
            "--generate",
            count,
            "--prefix",
            "6035",
            "--manifest",
            file,
            "--amount",
            "10.00",
            "--currency",
            "USD",
            "--job",
            "gen-7",
            "--chunk",
            "1000",
        ]
    };
    let v = ctl(&issue("2500"));
    assert_eq!((v["generated"].as_u64(), v["summary"]["issued"].as_u64()), (Some(2_500), Some(2_500)), "{v}");
    assert_eq!((v["replaced"].as_u64(), v["rounds"].as_u64(), v["listed"].as_bool()), (Some(0), Some(1), Some(true)));
    let text = std::fs::read_to_string(&path).unwrap();
    let round0 = bulk::round_path(&path, 0);
    let round0_text = std::fs::read_to_string(&round0).unwrap();
    let (header, rest) = round0_text.split_once('\n').unwrap();
    assert!(header.starts_with("# giftctl bulk issue --generate: round 0 of job gen-7 of merchant \"reseller-9\""));
    assert!(rest == text, "no number was a card: the box is round 0's numbers");
    assert_eq!(std::fs::metadata(&round0).unwrap().permissions().mode() & 0o777, 0o600);
    let numbers: Vec<&str> = text.lines().collect();
    assert_eq!(numbers.len(), 2_500);
    assert_eq!(numbers.iter().collect::<std::collections::HashSet<_>>().len(), 2_500, "distinct");
    assert!(numbers.iter().all(|n| n.len() == 16 && n.starts_with("6035") && num(n).luhn_ok()));
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);

    // Run again (after a lost connection, say): nothing is made, nothing is issued twice.
    let again = ctl(&issue("2500"));
    assert_eq!((again["generated"].as_u64(), &again["summary"]), (Some(0), &v["summary"]), "{again}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "the manifest is kept as it was");
    // Another count with the same file would be another job: refused, and the file kept.
    let mut args = vec!["--addr", g.addr()];
    args.extend_from_slice(&issue("100"));
    args.extend_from_slice(&["--merchant", "reseller-9"]);
    let (code, out, err) = crate::giftctl::run(&args);
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(err.contains("was drawn for another job, merchant, format or count"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    // So would the same box under another merchant (or job id): its cards would all be cards
    // already, and all be "replaced" by new ones. Refused.
    args.truncate(args.len() - 2);
    args[5] = "2500";
    args.extend_from_slice(&["--merchant", "reseller-10"]);
    let (code, _, err) = crate::giftctl::run(&args);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("was drawn for another job"), "{err}");
    assert!(!err.contains(numbers[0]), "no number in the message");
    // A '~' is the rounds' in a generated box's job id.
    let mut args: Vec<&str> = issue("10").to_vec();
    args[13] = "gen~9";
    let (code, _, err) = crate::giftctl::run(&[&["--addr", g.addr()][..], &args].concat());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("without '/' or '~'"), "{err}");
    // A format without nine random digits is refused before any file is written.
    let short = dir.path().join("short.csv");
    let (code, _, err) = crate::giftctl::run(&[
        "--addr",
        g.addr(),
        "bulk",
        "issue",
        "--generate",
        "5",
        "--prefix",
        "6035123",
        "--manifest",
        short.to_str().unwrap(),
        "--amount",
        "1.00",
        "--currency",
        "USD",
        "--job",
        "gen-8",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(!short.exists() && !bulk::round_path(&short, 0).exists());
    // A file of the same name not made by --generate is never taken for a box's list.
    let mut args = vec!["--addr", g.addr()];
    args.extend_from_slice(&issue("2500"));
    let foreign = dir.path().join("foreign.csv");
    std::fs::write(&foreign, "6035000000000006\n").unwrap();
    args[9] = foreign.to_str().unwrap();
    let (code, _, err) = crate::giftctl::run(&args);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("foreign.csv exists"), "{err}");

    // A drawn number that is a card already (here: round 0's file holds one of the box's numbers
    // again, as if drawn, second of two, in a chunk of its own) is not issued; a new number
    // replaces it, drawn and issued in round 1 under a job of its own, and the manifest lists the
    // new number, never the other card's.
    let taken = dir.path().join("taken.csv");
    let j = Job { addr: g.addr(), credentials: None, merchant: "reseller-9", id: "gen-taken", chunk: 1, window: 1 };
    let header = bulk::round_header(j, ("6035", 16), 0, 2);
    std::fs::write(bulk::round_path(&taken, 0), format!("{header}\n6035000000000006\n{}\n", numbers[0])).unwrap();
    let mut args: Vec<&str> = issue("2").to_vec();
    args[7] = taken.to_str().unwrap();
    args[13] = "gen-taken";
    args[15] = "1";
    let v = ctl(&args);
    assert_eq!(&v["summary"], &serde_json::json!({ "issued": 2 }), "{v}");
    assert_eq!((v["replaced"].as_u64(), v["rounds"].as_u64(), v["generated"].as_u64()), (Some(1), Some(2), Some(1)));
    let listed = std::fs::read_to_string(&taken).unwrap();
    let listed: Vec<&str> = listed.lines().collect();
    assert_eq!((listed.len(), listed[0]), (2, "6035000000000006"), "{listed:?}");
    assert!(listed[1] != numbers[0] && listed[1].starts_with("6035") && num(listed[1]).luhn_ok());
    let round1 = std::fs::read_to_string(bulk::round_path(&taken, 1)).unwrap();
    assert_eq!(
        round1,
        format!("{}\n{}\n", bulk::round_header(Job { id: "gen-taken", ..j }, ("6035", 16), 1, 1), listed[1])
    );
    let j1 = ctl(&["bulk", "issue", "--manifest", bulk::round_path(&taken, 1).to_str().unwrap(), "--amount", "10.00"]
        .iter()
        .chain(&["--currency", "USD", "--job", "gen-taken~1"])
        .copied()
        .collect::<Vec<_>>());
    assert_eq!(&j1["summary"], &serde_json::json!({ "issued": 1 }), "round 1's job issued it: {j1}");
    let mut c = g.client().await;
    assert_eq!(
        crate::view(&mut c, listed[1]).await.status,
        giftd::model::Status::Inactive,
        "the replacement is a card"
    );
    // Run again: the same jobs and numbers, nothing drawn, the list as it was.
    let again = ctl(&args);
    assert_eq!(
        (again["generated"].as_u64(), &again["summary"], again["replaced"].as_u64()),
        (Some(0), &v["summary"], Some(1))
    );
    assert_eq!(std::fs::read_to_string(&taken).unwrap(), format!("{}\n", listed.join("\n")));
    // Cut off before the list was written (here: removed): the next run writes the same list.
    std::fs::remove_file(&taken).unwrap();
    let again = ctl(&args);
    assert_eq!((again["generated"].as_u64(), again["listed"].as_bool()), (Some(0), Some(true)), "{again}");
    assert_eq!(std::fs::read_to_string(&taken).unwrap(), format!("{}\n", listed.join("\n")));

    // The file is the reseller's list of the box's cards: it activates them.
    let v = ctl(&["bulk", "activate", "--manifest", file, "--job", "act-7"]);
    assert_eq!(v["summary"]["activated"], 2_500, "{v}");
    let card = crate::view(&mut c, numbers[1_234]).await;
    assert_eq!((card.status, card.balance_minor), (giftd::model::Status::Active, 1_000));

    // Lost files are not made again: the job run with a new one sends other numbers, and every
    // chunk is declined, issuing none of them; no manifest lists them.
    let lost = dir.path().join("box-7-again.csv");
    let mut args: Vec<&str> = issue("2500").to_vec();
    args[7] = lost.to_str().unwrap();
    let (code, out, err) =
        crate::giftctl::run(&[&["--addr", g.addr(), "--json"][..], &args, &["--merchant", "reseller-9"]].concat());
    assert_eq!(code, 1, "a box not listed is a failure: {err}");
    assert!(err.contains("was not written"), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((v["generated"].as_u64(), v["summary"]["idempotency_mismatch"].as_u64()), (Some(2_500), Some(2_500)));
    assert_eq!(v["listed"].as_bool(), Some(false), "{v}");
    assert!(!lost.exists());
    let other = std::fs::read_to_string(bulk::round_path(&lost, 0)).unwrap();
    let other = other.lines().nth(1).unwrap(); // after the header
    let o = call(&mut c, &Request::Balance { number: num(other) }).await;
    assert_eq!(o.result, ResultCode::CardNotFound);
}

/// On a terminal, giftctl draws a progress bar for a job (and clears it); with --json, nothing.
#[test]
fn giftctl_draws_a_progress_bar_on_a_terminal_only() {
    let g = Giftd::start();
    let issue = |job: &str, json: bool| {
        // Each job its own cards.
        let first = nth(if json { 80_000 } else { 30_000 });
        let mut args = vec!["--addr", g.addr()];
        args.extend(json.then_some("--json"));
        args.extend(["bulk", "issue", "--count", "40000", "--amount", "1.00", "--currency", "USD", "--chunk", "256"]);
        args.extend(["--first", &first, "--job", job, "--window", "1"]);
        crate::giftctl::run_on_terminal(&args)
    };
    let (code, out, drawn) = issue("bar-1", false);
    assert_eq!(code, 0, "{out} {drawn}");
    assert!(out.contains("issued 40000"), "{out}");
    assert!(drawn.contains("bar-1 [") && drawn.contains("/40,000 cards"), "no bar drawn: {drawn:?}");
    let (code, out, drawn) = issue("bar-2", true);
    assert_eq!(code, 0, "{out} {drawn}");
    assert!(out.contains(r#""issued":40000"#), "{out}");
    assert_eq!(drawn, "", "--json draws nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_killed_midway_finishes_exactly_once_when_run_again() {
    const N: u64 = 20_000;
    let mut g = Giftd::start();
    let issue = Work::Issue { program: "default".into(), money: usd(1_000), expiry_ms: None };
    bulk::run(job(&g, "inv-k", 2_000), &range(N), &issue, |_, _| {}).await.expect("issue job");
    // Activation with a load, killed once at least a fifth of it is acknowledged.
    let done = Arc::new(AtomicU64::new(0));
    let addr = g.addr().to_string();
    let seen = done.clone();
    let running = tokio::spawn(async move {
        let j = Job { addr: &addr, credentials: None, merchant: "reseller-9", id: "act-k", chunk: 256, window: 2 };
        bulk::run(j, &range(N), &Work::Activate { load: Some(usd(700)) }, |d, _| seen.store(d, Ordering::SeqCst)).await
    });
    let deadline = std::time::Instant::now() + crate::TIMEOUT;
    while done.load(Ordering::SeqCst) < N / 5 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let at_kill = done.load(Ordering::SeqCst);
    assert!(at_kill >= N / 5, "the job did not get a fifth done in time");
    g.kill9();
    let cut = timed("job end", running).await.expect("task");
    assert!(cut.is_err() || at_kill == N, "the job saw the kill");
    // Restarted (the conservation check passes), the same job finishes: every card once.
    g.restart();
    let j = job(&g, "act-k", 4_096);
    let (_, s) = bulk::run(j, &range(N), &Work::Activate { load: Some(usd(700)) }, |_, _| {}).await.unwrap();
    assert_eq!(s.counts.get("activated"), Some(&N), "{s:?}");
    let mut c = g.client().await;
    for i in [0, at_kill.saturating_sub(1), at_kill, N / 2, N - 1] {
        assert_eq!(crate::balance(&mut c, &nth(i)).await, 1_700, "card #{i} loaded exactly once");
    }
}

/// While payments flow, a job keeps to `limits.bulk_beside_payments_cards_per_sec` (and the scrape
/// counts its waits); with no payment it runs flat out. Lower bounds only: the pace makes a job at
/// least so slow, whatever the machine.
#[tokio::test]
async fn a_job_beside_payments_keeps_to_its_pace() {
    const N: u64 = 6_000;
    const CARDS_PER_SEC: u64 = 20_000;
    let g = Giftd::with_config(&format!("[limits]\nbulk_beside_payments_cards_per_sec = {CARDS_PER_SEC}\n"));
    let issue = Work::Issue { program: "default".into(), money: usd(1_000), expiry_ms: None };
    bulk::run(job(&g, "inv-p", 1_000), &range(N), &issue, |_, _| {}).await.expect("issue job");
    let paced = "giftd_bulk_paced_seconds_total";
    assert_eq!(crate::metric(&g, paced).await, 0.0, "no payment came: the issue ran unpaced");

    // Payments flow from here to the end: one balance inquiry now, so that giftd has seen one
    // before the job starts, then one every 10 ms.
    let mut c = g.client().await;
    crate::balance(&mut c, &nth(0)).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let halt = stop.clone();
    let payments = tokio::spawn(async move {
        while !halt.load(Ordering::SeqCst) {
            crate::balance(&mut c, &nth(0)).await;
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    });
    let started = std::time::Instant::now();
    let (_, s) =
        bulk::run(job(&g, "act-p", 1_000), &range(N), &Work::Activate { load: None }, |_, _| {}).await.unwrap();
    let took = started.elapsed();
    assert_eq!(s.counts.get("activated"), Some(&N), "{s:?}");
    // Each chunk after the first waits for the one before: 5,000 cards at 20,000 a second.
    let floor = std::time::Duration::from_millis((N - 1_000) * 1_000 / CARDS_PER_SEC);
    assert!(took >= floor, "the activation took {took:?}, under its pace's {floor:?}");
    let waited = crate::metric(&g, paced).await;
    assert!(waited > 0.0, "the scrape counts the pace's waits");

    // Run again once the last chunk's 50 ms are over, it changes nothing and so waits for
    // nothing, though payments still flow.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let (_, again) =
        bulk::run(job(&g, "act-p", 1_000), &range(N), &Work::Activate { load: None }, |_, _| {}).await.unwrap();
    stop.store(true, Ordering::SeqCst);
    timed("payments", payments).await.expect("payments task");
    assert_eq!(again.counts, s.counts);
    assert_eq!(crate::metric(&g, paced).await, waited, "a replayed job is not paced");
}

#[tokio::test]
async fn an_all_or_nothing_batch_applies_every_item_or_none() {
    let mut g = Giftd::start();
    let mut c = g.client().await;
    let (a, b, z) = (nth(0), nth(1), nth(2));
    for n in [&a, &b] {
        crate::issue(&mut c, n, usd(1_000)).await;
    }
    let atomic = |key: &str, items: Vec<Request>| Request::Batch {
        mode: BatchMode::AllOrNothing(idem("res-1", key)),
        items: items.iter().map(BatchItem::of).collect(),
    };
    let results = |reply: &Reply| -> Vec<(ResultCode, i64)> {
        let Reply::Batch(items) = reply else { panic!("{reply:?}") };
        items
            .iter()
            .map(|(_, r)| match r {
                Reply::Card(o) => (o.result, o.approved_minor),
                other => panic!("{other:?}"),
            })
            .collect()
    };
    // The second item cannot be paid: nothing is applied, and each item says why.
    let redeem = |n: &str, k: &str, minor| crate::redeem_req(n, k, usd(minor), false);
    let reload =
        |n: &str, k: &str, minor| Request::Reload { idem: idem(MERCHANT, k), number: num(n), money: usd(minor) };
    let short = atomic("ab-1", vec![reload(&a, "i1", 500), redeem(&b, "i2", 5_000)]);
    let reply = timed("atomic", c.call(&short)).await.expect("reply");
    use ResultCode::*;
    assert_eq!(results(&reply), [(BatchAborted, 0), (InsufficientFunds, 0)]);
    assert_eq!((crate::balance(&mut c, &a).await, crate::balance(&mut c, &b).await), (1_000, 1_000));
    // The same batch key answers the same again; other content under it is a mismatch.
    assert_eq!(timed("again", c.call(&short)).await.expect("reply"), reply);
    let other = atomic("ab-1", vec![reload(&a, "i1", 1)]);
    assert_eq!(results(&timed("other", c.call(&other)).await.expect("reply")), [(IdempotencyMismatch, 0)]);
    // Every item fits: all applied at once; the items see each other's effects in order.
    let ok = atomic("ab-2", vec![reload(&a, "i3", 500), redeem(&b, "i4", 900), redeem(&a, "i5", 1_500)]);
    let wrong_order = timed("ok", c.call(&ok)).await.expect("reply");
    assert_eq!(wrong_order, Reply::Error(MalformedRequest), "card a twice: refused whole");
    let ok = atomic("ab-2", vec![reload(&a, "i3", 500), redeem(&b, "i4", 900)]);
    let reply = timed("ok", c.call(&ok)).await.expect("reply");
    assert_eq!(results(&reply), [(Approved, 500), (Approved, 900)]);
    // An unknown card aborts the lot; items an all-or-nothing batch cannot hold refuse it whole.
    let unknown = atomic("ab-3", vec![reload(&a, "i6", 1), redeem(&z, "i7", 1)]);
    let r = timed("unknown", c.call(&unknown)).await.expect("reply");
    assert_eq!(results(&r), [(BatchAborted, 0), (CardNotFound, 0)]);
    let lock = Request::Lock { idem: idem(MERCHANT, "i8"), number: num(&a), reason: giftd::model::LockReason::Lost };
    let refused = timed("refused", c.call(&atomic("ab-4", vec![lock]))).await.expect("reply");
    assert_eq!(refused, Reply::Error(MalformedRequest));
    // Durable as one: after kill -9 both changes are there, and the key still answers the same.
    drop(c);
    g.kill9();
    g.restart();
    let mut c = g.client().await;
    assert_eq!((crate::balance(&mut c, &a).await, crate::balance(&mut c, &b).await), (1_500, 100));
    assert_eq!(timed("after restart", c.call(&ok)).await.expect("reply"), reply);
}

async fn balances(c: &mut giftd::client::Client, cards: &[&String]) -> Vec<i64> {
    let mut got = Vec::new();
    for n in cards {
        got.push(crate::balance(c, n).await);
    }
    got
}

#[tokio::test]
async fn a_batch_under_its_key_decides_each_item_and_answers_a_retry_whole() {
    use ResultCode::*;
    let mut g = Giftd::start();
    let mut c = g.client().await;
    let (a, b, d, e, z) = (nth(0), nth(1), nth(2), nth(3), nth(4));
    for n in [&a, &b, &d] {
        crate::issue(&mut c, n, usd(1_000)).await;
    }
    crate::issue(&mut c, &e, eur(1_000)).await;
    let each = |key: &str, items: Vec<Request>| Request::Batch {
        mode: BatchMode::Each(idem("res-1", key)),
        items: items.iter().map(BatchItem::of).collect(),
    };
    let results = |reply: &Reply| -> Vec<(ResultCode, i64, Option<i64>)> {
        let Reply::Batch(items) = reply else { panic!("{reply:?}") };
        items
            .iter()
            .map(|(_, r)| match r {
                Reply::Card(o) => (o.result, o.approved_minor, o.card.map(|v| v.balance_minor)),
                other => panic!("{other:?}"),
            })
            .collect()
    };
    let redeem = |n: &str, minor| crate::redeem_req(n, "item", usd(minor), false);
    let reload = |n: &str, m| Request::Reload { idem: idem(MERCHANT, "item"), number: num(n), money: m };
    // Each item on its own: a declined one (with its card as it is), an unknown card and one in
    // another currency than the batch's change nothing for the approved ones around them.
    let batch = each(
        "eb-1",
        vec![reload(&a, usd(500)), redeem(&b, 5_000), redeem(&z, 100), reload(&e, eur(100)), redeem(&d, 300)],
    );
    let reply = timed("each", c.call(&batch)).await.expect("reply");
    let want = [
        (Approved, 500, Some(1_500)),
        (InsufficientFunds, 0, Some(1_000)),
        (CardNotFound, 0, None),
        (CurrencyMismatch, 0, Some(1_000)),
        (Approved, 300, Some(700)),
    ];
    assert_eq!(results(&reply), want);
    let cards = [&a, &b, &d, &e];
    assert_eq!(balances(&mut c, &cards).await, [1_500, 1_000, 700, 1_000]);
    // A retry under the key gets the same reply, byte for byte, and applies nothing again; other
    // content under it is a mismatch in every item's reply.
    assert_eq!(timed("again", c.call(&batch)).await.expect("reply"), reply);
    assert_eq!(balances(&mut c, &cards).await, [1_500, 1_000, 700, 1_000]);
    let other = each("eb-1", vec![reload(&a, usd(1)), redeem(&b, 1)]);
    let mismatch = results(&timed("other", c.call(&other)).await.expect("reply"));
    assert_eq!(mismatch, [(IdempotencyMismatch, 0, None), (IdempotencyMismatch, 0, None)]);
    // A card named twice, or an operation a keyed batch cannot hold, refuses the batch whole.
    let twice = each("eb-2", vec![reload(&a, usd(1)), redeem(&a, 1)]);
    assert_eq!(timed("twice", c.call(&twice)).await.expect("reply"), Reply::Error(MalformedRequest));
    let balance = Request::Balance { number: num(&a) };
    assert_eq!(
        timed("balance", c.call(&each("eb-3", vec![balance]))).await.expect("reply"),
        Reply::Error(MalformedRequest)
    );
    // The batch is not undone by its key: it changed several cards, each on its own.
    let reverse = Request::Reverse { idem: idem("res-1", "rv-1"), original: "eb-1".into() };
    match timed("reverse", c.call(&reverse)).await.expect("reply") {
        Reply::Parts(p) => assert_eq!((p.result, p.approved_minor), (NotReversible, 0)),
        other => panic!("{other:?}"),
    }
    let refund = Request::Refund {
        idem: idem("res-1", "rf-1"),
        number: num(&b),
        money: usd(100),
        original: Some("eb-1".into()),
    };
    assert_eq!(call(&mut c, &refund).await.result, NotReversible);
    // Durable as one write: after kill -9 the changes are there and the key answers the same.
    drop(c);
    g.kill9();
    g.restart();
    let mut c = g.client().await;
    assert_eq!(balances(&mut c, &cards).await, [1_500, 1_000, 700, 1_000]);
    assert_eq!(timed("after restart", c.call(&batch)).await.expect("reply"), reply);
}

#[tokio::test]
async fn a_chunk_fits_its_job_replays_and_is_barred_once_taken_back_unsent() {
    use giftd::engine::ChunkWork;
    use giftd::wire::{ChunkReply, JobKind};
    use ResultCode::*;
    let g = Giftd::start();
    let mut c = g.client().await;
    let cards: Vec<String> = (0..3).map(nth).collect();
    for n in &cards {
        let mut req = crate::issue_req(n, usd(1_000));
        if let Request::Issue { active, .. } = &mut req {
            *active = false;
        }
        check(&call(&mut c, &req).await, Approved, 1_000, Some(1_000));
    }
    let load = ChunkWork::Activate { load: Some(usd(500)) };
    let chunk = |first: u32, work: ChunkWork, n: &[String]| Request::JobChunk {
        merchant: "res-7".into(),
        job: "j-1".into(),
        first,
        work,
        numbers: n.iter().map(|s| num(s)).collect(),
    };
    let ask = |reply: Reply| match reply {
        Reply::Chunk(ChunkReply { result, items }) => (result, items),
        other => panic!("{other:?}"),
    };
    // Before its job is opened a chunk binds nothing: job_not_found, and the card is untouched.
    let early = chunk(0, load.clone(), &cards[..2]);
    assert_eq!(ask(timed("early", c.call(&early)).await.unwrap()), (JobNotFound, vec![]));
    assert_eq!(crate::view(&mut c, &cards[0]).await.status, giftd::model::Status::Inactive);
    let open = Request::JobOpen { idem: idem("res-7", "j-1"), kind: JobKind::Activate, count: 3, chunk_cards: 2 };
    let Reply::Job(j) = timed("open", c.call(&open)).await.unwrap() else { panic!() };
    assert_eq!((j.result, j.kind, j.count, j.chunk_cards), (Approved, Some(JobKind::Activate), 3, 2));
    // Out of place, of the wrong size, or of the wrong kind: job_chunk_mismatch, nothing recorded.
    let issue = ChunkWork::Issue { program: "default".into(), money: usd(1), expiry_ms: None };
    for bad in [chunk(1, load.clone(), &cards[1..3]), chunk(0, load.clone(), &cards[..1]), chunk(0, issue, &cards[..2])]
    {
        assert_eq!(ask(timed("bad", c.call(&bad)).await.unwrap()), (JobChunkMismatch, vec![]), "{bad:?}");
    }
    // The first chunk now: each card answered; again, the same bytes; other cards there, a mismatch.
    let first = chunk(0, load.clone(), &cards[..2]);
    let got = ask(timed("chunk", c.call(&first)).await.unwrap());
    assert_eq!(got, (Approved, vec![(Approved, true), (Approved, true)]));
    assert_eq!(ask(timed("again", c.call(&first)).await.unwrap()), got);
    let other = chunk(0, load.clone(), &[cards[1].clone(), cards[0].clone()]);
    assert_eq!(ask(timed("other", c.call(&other)).await.unwrap()), (IdempotencyMismatch, vec![]));
    assert_eq!(crate::balance(&mut c, &cards[0]).await, 1_500, "loaded once");
    // The last chunk is taken back before it is sent: nothing to undo, and the chunk is barred.
    let back = chunk(2, ChunkWork::Reverse, &[]);
    assert_eq!(ask(timed("back", c.call(&back)).await.unwrap()), (Approved, vec![]));
    let late = chunk(2, load.clone(), &cards[2..]);
    assert_eq!(ask(timed("late", c.call(&late)).await.unwrap()), (OriginalReversed, vec![]));
    assert_eq!(crate::view(&mut c, &cards[2]).await.status, giftd::model::Status::Inactive, "never activated");
    // The first chunk taken back: both cards inactive again with their load gone; again, the same.
    let back = chunk(0, ChunkWork::Reverse, &[]);
    let undone = ask(timed("back 0", c.call(&back)).await.unwrap());
    assert_eq!(undone, (Approved, vec![(Approved, true), (Approved, true)]));
    assert_eq!(ask(timed("back 0 again", c.call(&back)).await.unwrap()), undone);
    let v = crate::view(&mut c, &cards[1]).await;
    assert_eq!((v.status, v.balance_minor), (giftd::model::Status::Inactive, 1_000));
}
