//! Engine rules, table-driven, against the in-memory journal.

use super::*;
use crate::card_number::PinProof;
use crate::model::{LockReason, Money, Status};
use rust_decimal::Decimal;

const NOW: i64 = 1_800_000_000_000;
const HOUR_MS: i64 = 3_600_000;

fn usd(minor: i64) -> Money {
    Money { currency: crate::model::Currency::parse("USD").unwrap(), minor }
}

fn eur(minor: i64) -> Money {
    Money { currency: crate::model::Currency::parse("EUR").unwrap(), minor }
}

fn engine() -> (Engine, Arc<MemoryJournal>) {
    let journal = Arc::new(MemoryJournal::default());
    let programs = Programs::new([
        Program { invoice_required: true, ..Program::new("pos") },
        Program { max_balance: Some(Decimal::new(50000, 2)), ..Program::new("capped") },
    ]);
    (Engine::new(programs, journal.clone()), journal)
}

fn card(n: u8) -> CardKey {
    CardKey([n; 32])
}

/// A job's chunk is marked for the journal as bulk work (which it lets into its commit pipeline
/// one at a time); the job's opening and a payment are not.
#[test]
fn a_job_chunk_is_appended_as_bulk_work_and_a_payment_is_not() {
    let (e, journal) = engine();
    let mutation = |idem: IdemKey, op: Op| Mutation {
        idem,
        fingerprint: [7; 16],
        card: None,
        last4: *b"0000",
        op,
        batched: false,
        looked_up: None,
    };
    let spec = JobSpec { kind: ChunkKind::Issue, count: 2, chunk_cards: 2 };
    let open = e.execute(mutation(IdemKey::job("m1", "j"), Op::JobOpen { spec }), NOW);
    assert_eq!(open.outcome.result, ResultCode::Approved);
    assert_eq!(journal.bulk_appends(), 0);
    let cards = (1..=2).map(|n| ChunkCard { key: card(n), last4: *b"0001", luhn_ok: true }).collect();
    let work = ChunkWork::Issue { program: "default".into(), money: usd(1_000), expiry_ms: None };
    let op = Op::JobChunk { job: "j".into(), first: 0, work, cards };
    let chunk = e.execute(mutation(IdemKey::chunk("m1", "j", 0, false), op), NOW);
    assert_eq!(chunk.outcome.result, ResultCode::Approved);
    assert_eq!(chunk.chunk.as_ref().map(|r| r.len()), Some(2));
    assert_eq!(journal.bulk_appends(), 1);
    run(&e, "activate", card(1), Op::Activate { load: None }, NOW);
    run(&e, "redeem", card(1), redeem(100, false), NOW);
    assert_eq!(journal.bulk_appends(), 1, "payments are not bulk work");
}

struct Req {
    merchant: &'static str,
    key: String,
    card: CardKey,
    op: Op,
}

fn m(r: Req) -> Mutation {
    // The fingerprint stands for the request content: derive it from the op's debug form.
    let digest = <sha2::Sha256 as sha2::Digest>::digest(format!("{:?}{:?}", r.card, r.op).as_bytes());
    let mut fingerprint = [0u8; 16];
    fingerprint.copy_from_slice(&digest[..16]);
    // Card n's number ends in n, as four digits.
    let mut last4 = [0u8; 4];
    last4.copy_from_slice(format!("{:04}", r.card.0[0]).as_bytes());
    Mutation {
        idem: IdemKey::new(r.merchant, &r.key),
        fingerprint,
        card: Some(r.card),
        last4,
        op: r.op,
        batched: false,
        looked_up: None,
    }
}

fn run(e: &Engine, key: &str, c: CardKey, op: Op, now: i64) -> Executed {
    e.execute(m(Req { merchant: "m1", key: key.into(), card: c, op }), now)
}

fn issue(e: &Engine, c: CardKey, program: &str, money: Money, expiry_ms: Option<i64>, active: bool) -> Executed {
    let key = format!("issue-{:?}", c);
    run(e, &key, c, Op::issue(program, money, expiry_ms, active), NOW)
}

fn redeem(minor: i64, partial: bool) -> Op {
    Op::Redeem { money: usd(minor), allow_partial: partial, invoice: None, pin: None }
}

/// One row: a card set up by `setup`, then `op`, expecting `result`, `approved` and the balance after.
struct Case {
    name: &'static str,
    setup: fn(&Engine),
    op: Op,
    now: i64,
    result: ResultCode,
    approved: i64,
    balance_after: Option<i64>,
}

fn active_100(e: &Engine) {
    issue(e, card(1), "default", usd(10_000), None, true);
}
fn inactive_100(e: &Engine) {
    issue(e, card(1), "default", usd(10_000), None, false);
}
fn expiring(e: &Engine) {
    issue(e, card(1), "default", usd(10_000), Some(NOW + HOUR_MS), true);
}
fn locked(e: &Engine) {
    active_100(e);
    run(e, "lock", card(1), Op::Lock { reason: LockReason::Lost }, NOW);
}
fn pos_card(e: &Engine) {
    issue(e, card(1), "pos", usd(10_000), None, true);
}
fn capped(e: &Engine) {
    issue(e, card(1), "capped", usd(40_000), None, true);
}
fn nothing(_: &Engine) {}

#[test]
fn rules_table() {
    use ResultCode::*;
    let cases = vec![
        Case {
            name: "redeem within balance",
            setup: active_100,
            op: redeem(2_500, false),
            now: NOW,
            result: Approved,
            approved: 2_500,
            balance_after: Some(7_500),
        },
        Case {
            name: "redeem exactly the balance",
            setup: active_100,
            op: redeem(10_000, false),
            now: NOW,
            result: Approved,
            approved: 10_000,
            balance_after: Some(0),
        },
        Case {
            name: "redeem over balance",
            setup: active_100,
            op: redeem(10_001, false),
            now: NOW,
            result: InsufficientFunds,
            approved: 0,
            balance_after: Some(10_000),
        },
        Case {
            name: "partial redeem approves what is available",
            setup: active_100,
            op: redeem(15_000, true),
            now: NOW,
            result: Approved,
            approved: 10_000,
            balance_after: Some(0),
        },
        Case {
            name: "redeem on unknown card",
            setup: nothing,
            op: redeem(1, false),
            now: NOW,
            result: CardNotFound,
            approved: 0,
            balance_after: None,
        },
        Case {
            name: "redeem on inactive card",
            setup: inactive_100,
            op: redeem(1, false),
            now: NOW,
            result: CardInactive,
            approved: 0,
            balance_after: Some(10_000),
        },
        Case {
            name: "redeem before expiry",
            setup: expiring,
            op: redeem(1, false),
            now: NOW + HOUR_MS - 1,
            result: Approved,
            approved: 1,
            balance_after: Some(9_999),
        },
        Case {
            name: "redeem at expiry",
            setup: expiring,
            op: redeem(1, false),
            now: NOW + HOUR_MS,
            result: CardExpired,
            approved: 0,
            balance_after: Some(10_000),
        },
        Case {
            name: "redeem on suspended card",
            setup: locked,
            op: redeem(1, false),
            now: NOW,
            result: CardSuspended,
            approved: 0,
            balance_after: Some(10_000),
        },
        Case {
            name: "redeem in another currency",
            setup: active_100,
            op: Op::Redeem { money: eur(1), allow_partial: false, invoice: None, pin: None },
            now: NOW,
            result: CurrencyMismatch,
            approved: 0,
            balance_after: Some(10_000),
        },
        Case {
            name: "program requires an invoice",
            setup: pos_card,
            op: redeem(1, false),
            now: NOW,
            result: InvoiceRequired,
            approved: 0,
            balance_after: Some(10_000),
        },
        Case {
            name: "invoice given",
            setup: pos_card,
            op: Op::Redeem { money: usd(1), allow_partial: false, invoice: Some("INV-1".into()), pin: None },
            now: NOW,
            result: Approved,
            approved: 1,
            balance_after: Some(9_999),
        },
        Case {
            name: "reload",
            setup: active_100,
            op: Op::Reload { money: usd(500) },
            now: NOW,
            result: Approved,
            approved: 500,
            balance_after: Some(10_500),
        },
        Case {
            name: "reload on inactive card",
            setup: inactive_100,
            op: Op::Reload { money: usd(500) },
            now: NOW,
            result: CardInactive,
            approved: 0,
            balance_after: Some(10_000),
        },
        Case {
            name: "reload up to the program maximum",
            setup: capped,
            op: Op::Reload { money: usd(10_000) },
            now: NOW,
            result: Approved,
            approved: 10_000,
            balance_after: Some(50_000),
        },
        Case {
            name: "reload over the program maximum",
            setup: capped,
            op: Op::Reload { money: usd(10_001) },
            now: NOW,
            result: MaxBalanceExceeded,
            approved: 0,
            balance_after: Some(40_000),
        },
        Case {
            name: "activate an inactive card with a load",
            setup: inactive_100,
            op: Op::Activate { load: Some(usd(2_000)) },
            now: NOW,
            result: Approved,
            approved: 2_000,
            balance_after: Some(12_000),
        },
        Case {
            name: "activate an active card",
            setup: active_100,
            op: Op::Activate { load: None },
            now: NOW,
            result: AlreadyActive,
            approved: 0,
            balance_after: Some(10_000),
        },
        Case {
            name: "activate with a foreign load",
            setup: inactive_100,
            op: Op::Activate { load: Some(eur(1)) },
            now: NOW,
            result: CurrencyMismatch,
            approved: 0,
            balance_after: Some(10_000),
        },
        Case {
            name: "lock",
            setup: active_100,
            op: Op::Lock { reason: LockReason::Fraud },
            now: NOW,
            result: Approved,
            approved: 0,
            balance_after: Some(10_000),
        },
        Case {
            name: "unlock a card that is not locked",
            setup: active_100,
            op: Op::Unlock,
            now: NOW,
            result: NotSuspended,
            approved: 0,
            balance_after: Some(10_000),
        },
        Case {
            name: "unlock a locked card",
            setup: locked,
            op: Op::Unlock,
            now: NOW,
            result: Approved,
            approved: 0,
            balance_after: Some(10_000),
        },
        Case {
            name: "issue over an existing number",
            setup: active_100,
            op: Op::issue("default", usd(1), None, true),
            now: NOW,
            result: CardExists,
            approved: 0,
            balance_after: Some(10_000),
        },
        Case {
            name: "issue in an unknown program",
            setup: nothing,
            op: Op::issue("nope", usd(1), None, true),
            now: NOW,
            result: UnknownProgram,
            approved: 0,
            balance_after: None,
        },
        Case {
            name: "issue born expired is accepted",
            setup: nothing,
            op: Op::issue("default", usd(700), Some(NOW - 1), true),
            now: NOW,
            result: Approved,
            approved: 700,
            balance_after: Some(700),
        },
        Case {
            name: "issue over the program maximum",
            setup: nothing,
            op: Op::issue("capped", usd(50_001), None, true),
            now: NOW,
            result: MaxBalanceExceeded,
            approved: 0,
            balance_after: None,
        },
    ];
    for c in cases {
        let (e, _) = engine();
        (c.setup)(&e);
        let got = run(&e, "the-op", card(1), c.op.clone(), c.now);
        assert_eq!(got.outcome.result, c.result, "{}", c.name);
        assert_eq!(got.outcome.approved_minor, c.approved, "{}", c.name);
        let balance = e.snapshot(&card(1)).map(|(r, _)| r.balance_minor);
        assert_eq!(balance, c.balance_after, "{}", c.name);
        if let (Some(v), Some(b)) = (got.outcome.card, c.balance_after) {
            assert_eq!(v.balance_minor, b, "{}: reply shows the balance after", c.name);
        }
    }
}

#[test]
fn status_precedence() {
    let (e, _) = engine();
    issue(&e, card(1), "default", usd(100), Some(NOW - 1), false);
    let status = |e: &Engine| e.balance(&card(1), NOW).0.card.unwrap().status;
    assert_eq!(status(&e), Status::Expired, "expired beats inactive");
    run(&e, "l", card(1), Op::Lock { reason: LockReason::Stolen }, NOW);
    assert_eq!(status(&e), Status::Suspended, "suspended beats expired");
    assert_eq!(e.balance(&card(1), NOW).0.card.unwrap().reason, LockReason::Stolen);
    run(&e, "u", card(1), Op::Unlock, NOW);
    assert_eq!(status(&e), Status::Expired, "unlock returns to the lifecycle state");
}

#[test]
fn idempotent_retry_replays_and_mismatch_declines() {
    let (e, j) = engine();
    active_100(&e);
    let first = run(&e, "k1", card(1), redeem(1_000, false), NOW);
    let again = run(&e, "k1", card(1), redeem(1_000, false), NOW + 5);
    assert_eq!(first.outcome, again.outcome);
    assert!(again.replayed);
    assert_eq!(e.snapshot(&card(1)).unwrap().0.balance_minor, 9_000, "applied once");
    let other = run(&e, "k1", card(1), redeem(2_000, false), NOW);
    assert_eq!(other.outcome.result, ResultCode::IdempotencyMismatch);
    assert_eq!(other.group, first.group, "the mismatch waits for the original to be durable");
    // The same key from another merchant is another key.
    let m2 = e.execute(m(Req { merchant: "m2", key: "k1".into(), card: card(1), op: redeem(1_000, false) }), NOW);
    assert_eq!(m2.outcome.result, ResultCode::Approved);
    assert!(!m2.replayed);
    // After the in-memory window, the journal answers.
    e.evict_recent(u64::MAX, i64::MAX);
    let late = run(&e, "k1", card(1), redeem(1_000, false), NOW + 10);
    assert!(late.replayed);
    assert_eq!(late.outcome, first.outcome);
    assert_eq!(j.txns().iter().filter(|t| t.kind == TxnKind::Redeem).count(), 2);
}

#[test]
fn declines_are_replayed_too() {
    let (e, _) = engine();
    active_100(&e);
    let first = run(&e, "big", card(1), redeem(20_000, false), NOW);
    assert_eq!(first.outcome.result, ResultCode::InsufficientFunds);
    run(&e, "topup", card(1), Op::Reload { money: usd(20_000) }, NOW);
    let again = run(&e, "big", card(1), redeem(20_000, false), NOW);
    assert_eq!(again.outcome, first.outcome, "a retry gets the original answer");
}

#[test]
fn invoice_is_accepted_once_per_merchant_ever() {
    let (e, _) = engine();
    pos_card(&e);
    issue(&e, card(2), "pos", usd(10_000), None, true);
    let with_invoice =
        |inv: &str, minor| Op::Redeem { money: usd(minor), allow_partial: false, invoice: Some(inv.into()), pin: None };
    assert_eq!(run(&e, "a", card(1), with_invoice("INV-9", 100), NOW).outcome.result, ResultCode::Approved);
    assert_eq!(run(&e, "b", card(2), with_invoice("INV-9", 100), NOW).outcome.result, ResultCode::InvoiceReused);
    // A declined sale does not use up its invoice.
    assert_eq!(
        run(&e, "c", card(1), with_invoice("INV-10", 1_000_000), NOW).outcome.result,
        ResultCode::InsufficientFunds
    );
    assert_eq!(run(&e, "d", card(1), with_invoice("INV-10", 100), NOW).outcome.result, ResultCode::Approved);
    // Still refused once only the journal remembers it.
    e.evict_recent(u64::MAX, i64::MAX);
    assert_eq!(run(&e, "e", card(2), with_invoice("INV-9", 100), NOW).outcome.result, ResultCode::InvoiceReused);
    // Another merchant may use the same invoice number.
    let other =
        e.execute(m(Req { merchant: "m2", key: "f".into(), card: card(2), op: with_invoice("INV-9", 100) }), NOW);
    assert_eq!(other.outcome.result, ResultCode::Approved);
}

#[test]
fn restore_rebuilds_cards_and_sums() {
    let (e, j) = engine();
    active_100(&e);
    issue(&e, card(2), "default", eur(500), None, true);
    run(&e, "r", card(1), redeem(1_000, false), NOW);
    let (e2, _) = engine();
    let restored = e2.restore(j.cards(), j.hold_id_next());
    assert_eq!(restored.cards, 2);
    assert_eq!(restored.balance_minor_by_currency.get(&usd(0).currency), Some(&9_000));
    assert_eq!(restored.balance_minor_by_currency.get(&eur(0).currency), Some(&500));
    assert_eq!(e2.snapshot(&card(1)).unwrap().0, e.snapshot(&card(1)).unwrap().0);
}

#[test]
fn concurrent_redeems_never_overdraw() {
    let (e, _) = engine();
    active_100(&e);
    let e = Arc::new(e);
    let approved: i64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let e = e.clone();
                s.spawn(move || {
                    (0..200)
                        .map(|i| run(&e, &format!("t{t}-{i}"), card(1), redeem(7, true), NOW).outcome.approved_minor)
                        .sum::<i64>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let balance = e.snapshot(&card(1)).unwrap().0.balance_minor;
    assert_eq!(approved + balance, 10_000);
    assert_eq!(balance, 0, "1600 × 0.07 exceeds 100.00, so the card is drained");
}

/// A capture or void: it names a hold, not a card.
fn run_hold(e: &Engine, key: &str, op: Op, now: i64) -> Executed {
    let mut mutation = m(Req { merchant: "m1", key: key.into(), card: card(0), op });
    mutation.card = None;
    e.execute(mutation, now)
}

fn authorize(e: &Engine, key: &str, minor: i64, ttl_ms: i64, now: i64) -> crate::model::HoldView {
    let op = Op::Authorize { money: usd(minor), allow_partial: false, ttl_ms: Some(ttl_ms), pin: None };
    let done = run(e, key, card(1), op, now);
    assert_eq!(done.outcome.result, ResultCode::Approved, "{done:?}");
    done.outcome.hold.expect("an approved authorization carries its hold")
}

#[test]
fn holds_expire_by_deadline_under_a_controlled_clock() {
    let (e, j) = engine();
    active_100(&e);
    let a = authorize(&e, "a", 1_000, HOUR_MS, NOW);
    let b = authorize(&e, "b", 2_000, 2 * HOUR_MS, NOW);
    assert_eq!((a.expires_ms, b.expires_ms), (NOW + HOUR_MS, NOW + 2 * HOUR_MS));
    assert_eq!(e.next_hold_deadline(), Some(NOW + HOUR_MS));
    assert_eq!(e.expire_holds(NOW + HOUR_MS - 1, 100), 0, "nothing is due a millisecond early");
    // At its deadline the hold reserves nothing, even before the release is written...
    let (o, _) = e.balance(&card(1), NOW + HOUR_MS);
    assert_eq!(o.card.unwrap().held_minor, 2_000);
    // ...and the sweep writes the release, visiting only what is due.
    assert_eq!(e.expire_holds(NOW + HOUR_MS, 100), 1);
    assert_eq!(e.next_hold_deadline(), Some(NOW + 2 * HOUR_MS));
    let last = j.txns().last().cloned().unwrap();
    assert_eq!(
        (last.kind, last.amount_minor, &*last.merchant),
        (TxnKind::HoldExpired, 1_000, "m1"),
        "under the hold's merchant"
    );
    let capture = |key: &str, id, now| run_hold(&e, key, Op::Capture { hold_id: id, money: usd(1) }, now);
    assert_eq!(capture("c1", a.id, NOW + HOUR_MS).outcome.result, ResultCode::HoldNotFound);
    // A hold past its deadline cannot be captured even if the sweep has not run yet.
    assert_eq!(capture("c2", b.id, NOW + 2 * HOUR_MS).outcome.result, ResultCode::HoldNotFound);
    assert_eq!(e.snapshot(&card(1)).unwrap().0.holds, vec![], "the capture attempt released it first");
    assert_eq!(e.next_hold_deadline(), None);
}

#[test]
fn census_counts_statuses_balances_and_live_holds() {
    let (e, _) = engine();
    active_100(&e);
    let h = authorize(&e, "a", 1_500, HOUR_MS, NOW);
    authorize(&e, "b", 500, 2 * HOUR_MS, NOW);
    issue(&e, card(2), "default", usd(2_000), None, false);
    issue(&e, card(3), "default", eur(700), Some(NOW + HOUR_MS), true);
    issue(&e, card(4), "default", usd(300), None, true);
    run(&e, "lock4", card(4), Op::Lock { reason: LockReason::Lost }, NOW);
    let census = e.census(NOW);
    let by = |s: Status| census.cards_by_status[s as usize];
    assert_eq!((by(Status::Active), by(Status::Inactive), by(Status::Suspended), by(Status::Expired)), (2, 1, 1, 0));
    let usd_code = usd(0).currency;
    let eur_code = eur(0).currency;
    assert_eq!(census.liability_minor.get(&usd_code), Some(&12_300));
    assert_eq!(census.liability_minor.get(&eur_code), Some(&700));
    assert_eq!((census.holds_open, census.held_minor.get(&usd_code)), (2, Some(&2_000)));
    // An hour on: card 3 has expired and the first hold reserves nothing, released or not.
    let later = e.census(h.expires_ms);
    assert_eq!(
        (later.cards_by_status[Status::Expired as usize], later.cards_by_status[Status::Active as usize]),
        (1, 1)
    );
    assert_eq!((later.holds_open, later.held_minor.get(&usd_code)), (1, Some(&500)));
}

#[test]
fn a_decision_first_releases_the_cards_due_holds() {
    let (e, j) = engine();
    active_100(&e);
    authorize(&e, "a", 10_000, HOUR_MS, NOW);
    assert_eq!(run(&e, "r1", card(1), redeem(1, false), NOW).outcome.result, ResultCode::InsufficientFunds);
    let done = run(&e, "r2", card(1), redeem(10_000, false), NOW + HOUR_MS);
    assert_eq!(done.outcome.result, ResultCode::Approved);
    let kinds: Vec<TxnKind> = j.txns().iter().map(|t| t.kind).collect();
    assert_eq!(kinds, [TxnKind::Issue, TxnKind::Authorize, TxnKind::HoldExpired, TxnKind::Redeem]);
    let rec = e.snapshot(&card(1)).unwrap().0;
    assert_eq!((rec.balance_minor, rec.held_minor, rec.txn_count), (0, 0, 4));
}

#[test]
fn capture_takes_part_and_releases_the_rest() {
    let (e, j) = engine();
    active_100(&e);
    let h = authorize(&e, "a", 3_000, HOUR_MS, NOW);
    let over = run_hold(&e, "c0", Op::Capture { hold_id: h.id, money: usd(3_001) }, NOW);
    assert_eq!(over.outcome.result, ResultCode::CaptureExceedsHold);
    let done = run_hold(&e, "c1", Op::Capture { hold_id: h.id, money: usd(2_000) }, NOW);
    assert_eq!((done.outcome.result, done.outcome.approved_minor), (ResultCode::Approved, 2_000));
    let rec = e.snapshot(&card(1)).unwrap().0;
    assert_eq!((rec.balance_minor, rec.held_minor, rec.available_at(NOW)), (8_000, 0, 8_000));
    assert_eq!(j.txns().last().map(|t| (t.kind, t.amount_minor)), Some((TxnKind::Capture, -2_000)));
    assert_eq!(e.next_hold_deadline(), None, "a captured hold leaves the deadline order");
    let void = run_hold(&e, "v1", Op::Void { hold_id: h.id }, NOW);
    assert_eq!(void.outcome.result, ResultCode::HoldNotFound);
}

#[test]
fn only_the_authorizing_merchant_captures_or_voids_a_hold() {
    let (e, _) = engine();
    active_100(&e);
    let h = authorize(&e, "a", 3_000, HOUR_MS, NOW);
    let as_other = |key: &str, op: Op| {
        let mut mutation = m(Req { merchant: "m2", key: key.into(), card: card(0), op });
        mutation.card = None;
        e.execute(mutation, NOW)
    };
    // To another merchant the hold does not exist: the same answer as for an id never opened,
    // which shows no card.
    let never = as_other("x0", Op::Void { hold_id: h.id + 100 }).outcome;
    assert_eq!((never.result, never.card), (ResultCode::HoldNotFound, None));
    for (key, op) in [("x1", Op::Capture { hold_id: h.id, money: usd(1) }), ("x2", Op::Void { hold_id: h.id })] {
        let o = as_other(key, op).outcome;
        assert_eq!((o.result, o.card, o.approved_minor), (ResultCode::HoldNotFound, None, 0));
    }
    assert_eq!(e.snapshot(&card(1)).unwrap().0.held_minor, 3_000, "the hold is untouched");
    let done = run_hold(&e, "c1", Op::Capture { hold_id: h.id, money: usd(3_000) }, NOW);
    assert_eq!(done.outcome.result, ResultCode::Approved);
}

#[test]
fn restore_rebuilds_holds_and_never_reuses_an_id() {
    let (e, j) = engine();
    active_100(&e);
    let kept = authorize(&e, "a", 1_000, HOUR_MS, NOW);
    let gone = authorize(&e, "b", 1_000, HOUR_MS, NOW);
    run_hold(&e, "v", Op::Void { hold_id: gone.id }, NOW);
    let (e2, _) = engine();
    let restored = e2.restore(j.cards(), j.hold_id_next());
    assert_eq!(restored.holds, 1);
    assert_eq!(e2.next_hold_deadline(), Some(kept.expires_ms));
    let fresh = authorize(&e2, "c", 500, HOUR_MS, NOW);
    assert!(fresh.id > gone.id, "{fresh:?} reuses an id up to {gone:?}");
    let cap = run_hold(&e2, "d", Op::Capture { hold_id: kept.id, money: usd(1_000) }, NOW);
    assert_eq!(cap.outcome.result, ResultCode::Approved);
}

/// A reversal or split redeem: no card of its own.
fn run_cardless(e: &Engine, key: &str, op: Op, now: i64) -> Executed {
    run_hold(e, key, op, now)
}

fn refund(minor: i64, original: Option<&str>) -> Op {
    Op::Refund { money: usd(minor), original: original.map(str::to_string) }
}

fn reverse(original: &str) -> Op {
    Op::Reverse { original: original.into() }
}

fn balance_of(e: &Engine, c: CardKey) -> i64 {
    e.snapshot(&c).unwrap().0.balance_minor
}

#[test]
fn refunds_never_exceed_what_the_original_took() {
    let (e, _) = engine();
    active_100(&e);
    assert_eq!(run(&e, "r", card(1), redeem(3_000, false), NOW).outcome.result, ResultCode::Approved);
    let result = |key: &str, op| run(&e, key, card(1), op, NOW).outcome.result;
    assert_eq!(result("f1", refund(1_000, Some("r"))), ResultCode::Approved);
    assert_eq!(result("f2", refund(2_001, Some("r"))), ResultCode::RefundExceedsOriginal);
    assert_eq!(result("f3", refund(2_000, Some("r"))), ResultCode::Approved);
    assert_eq!(result("f4", refund(1, Some("r"))), ResultCode::RefundExceedsOriginal);
    assert_eq!(balance_of(&e, card(1)), 10_000);
    assert_eq!(result("f5", refund(1, Some("nope"))), ResultCode::OriginalNotFound);
    assert_eq!(result("f6", refund(1, None)), ResultCode::RefundReferenceRequired);
    // Only spends are refunded.
    assert_eq!(run(&e, "l", card(1), Op::Reload { money: usd(100) }, NOW).outcome.result, ResultCode::Approved);
    assert_eq!(result("f7", refund(1, Some("l"))), ResultCode::NotReversible);
    // The refund is credited to the card the original took from.
    issue(&e, card(2), "default", usd(500), None, true);
    assert_eq!(run(&e, "f8", card(2), refund(1, Some("r")), NOW).outcome.result, ResultCode::OriginalCardMismatch);
    assert_eq!(run(&e, "r2", card(2), redeem(100, false), NOW).outcome.result, ResultCode::Approved);
    assert_eq!(result("f9", refund(1, Some("r2"))), ResultCode::OriginalCardMismatch);
    // Once the store alone remembers the refunds, they still count.
    e.evict_recent(u64::MAX, i64::MAX);
    assert_eq!(run(&e, "f10", card(2), refund(101, Some("r2")), NOW).outcome.result, ResultCode::RefundExceedsOriginal);
    assert_eq!(run(&e, "f11", card(2), refund(100, Some("r2")), NOW).outcome.result, ResultCode::Approved);
    assert_eq!(run(&e, "f12", card(2), refund(1, Some("r2")), NOW).outcome.result, ResultCode::RefundExceedsOriginal);
}

#[test]
fn reversal_puts_back_what_is_left_and_twice_is_the_first_answer() {
    let (e, _) = engine();
    active_100(&e);
    run(&e, "r", card(1), redeem(3_000, false), NOW);
    run(&e, "f", card(1), refund(1_000, Some("r")), NOW);
    let first = run_cardless(&e, "v1", reverse("r"), NOW + 1);
    assert_eq!((first.outcome.result, first.outcome.approved_minor), (ResultCode::Approved, 2_000));
    let parts = first.parts.clone().unwrap();
    assert_eq!(parts.items.len(), 1);
    assert_eq!((parts.items[0].amount_minor, parts.items[0].balance_after_minor), (2_000, 10_000));
    let second = run_cardless(&e, "v2", reverse("r"), NOW + 2);
    assert_eq!((second.outcome, second.parts), (first.outcome, first.parts), "the first reversal's answer");
    assert_eq!(balance_of(&e, card(1)), 10_000);
    // A reversed spend takes no more refunds.
    assert_eq!(run(&e, "f2", card(1), refund(1, Some("r")), NOW).outcome.result, ResultCode::AlreadyReversed);
    // Past the program's window (24 h) a reversal is declined.
    run(&e, "r3", card(1), redeem(100, false), NOW);
    let late = run_cardless(&e, "v3", reverse("r3"), NOW + 24 * HOUR_MS + 1);
    assert_eq!(late.outcome.result, ResultCode::ReversalWindowPassed);
}

#[test]
fn a_reversal_before_its_original_declines_the_original() {
    let (e, j) = engine();
    active_100(&e);
    let early = run_cardless(&e, "v", reverse("late"), NOW);
    assert_eq!((early.outcome.result, early.outcome.approved_minor), (ResultCode::Approved, 0));
    let late = run(&e, "late", card(1), redeem(1_000, false), NOW);
    assert_eq!(late.outcome.result, ResultCode::OriginalReversed);
    assert_eq!(balance_of(&e, card(1)), 10_000);
    // Still so when only the store remembers the tombstone.
    e.evict_recent(u64::MAX, i64::MAX);
    assert_eq!(run(&e, "late", card(1), redeem(1_000, false), NOW).outcome.result, ResultCode::OriginalReversed);
    assert_eq!(j.txns().iter().filter(|t| t.kind == TxnKind::Redeem).count(), 0);
    // Reversing a declined request is a no-op that succeeds.
    assert_eq!(run(&e, "big", card(1), redeem(1_000_000, false), NOW).outcome.result, ResultCode::InsufficientFunds);
    let undo = run_cardless(&e, "v2", reverse("big"), NOW);
    assert_eq!((undo.outcome.result, undo.outcome.approved_minor), (ResultCode::Approved, 0));
    // Locks are not reversible.
    run(&e, "lock", card(1), Op::Lock { reason: LockReason::Lost }, NOW);
    assert_eq!(run_cardless(&e, "v3", reverse("lock"), NOW).outcome.result, ResultCode::NotReversible);
}

#[test]
fn reversals_of_loads_and_holds() {
    let (e, _) = engine();
    inactive_100(&e);
    run(&e, "act", card(1), Op::Activate { load: Some(usd(500)) }, NOW);
    run(&e, "rl", card(1), Op::Reload { money: usd(700) }, NOW);
    let h = authorize(&e, "auth", 200, HOUR_MS, NOW);
    assert_eq!(run_cardless(&e, "v1", reverse("auth"), NOW).outcome.approved_minor, 200);
    assert_eq!(e.snapshot(&card(1)).unwrap().0.held_minor, 0);
    let cap = run_hold(&e, "c", Op::Capture { hold_id: h.id, money: usd(1) }, NOW);
    assert_eq!(cap.outcome.result, ResultCode::HoldNotFound, "a reversed authorization's hold is gone");
    assert_eq!(run_cardless(&e, "v2", reverse("rl"), NOW).outcome.result, ResultCode::Approved);
    assert_eq!(balance_of(&e, card(1)), 10_500);
    // An activation is taken back only from a card nothing happened to since: this one is in use.
    run(&e, "spend", card(1), redeem(10_200, false), NOW);
    assert_eq!(run_cardless(&e, "v3", reverse("act"), NOW).outcome.result, ResultCode::CardUsed);
    let (o, _) = e.balance(&card(1), NOW);
    assert_eq!((o.card.unwrap().balance_minor, o.card.unwrap().status), (300, Status::Active));
}

#[test]
fn split_redeem_takes_in_order_all_or_nothing() {
    let (e, j) = engine();
    issue(&e, card(1), "default", usd(5_000), Some(NOW + 2 * HOUR_MS), true);
    issue(&e, card(2), "default", usd(3_000), Some(NOW + HOUR_MS), true);
    issue(&e, card(3), "default", usd(1_000), None, true);
    let cards = vec![(card(1), *b"0001"), (card(2), *b"0002"), (card(3), *b"0003")];
    let split = |key: &str, minor, order| {
        run_cardless(&e, key, Op::SplitRedeem { cards: cards.clone(), money: usd(minor), order }, NOW)
    };
    let taken = |x: &Executed| -> Vec<(String, i64)> {
        let p = x.parts.as_ref().unwrap();
        p.items.iter().map(|i| (String::from_utf8_lossy(&i.last4).into_owned(), i.amount_minor)).collect()
    };
    let s = split("s1", 6_000, SplitOrder::Given);
    assert_eq!(taken(&s), vec![("0001".into(), -5_000), ("0002".into(), -1_000)]);
    let s = split("s2", 2_500, SplitOrder::Smallest);
    assert_eq!(taken(&s), vec![("0003".into(), -1_000), ("0002".into(), -1_500)]);
    assert_eq!(split("s3", 501, SplitOrder::Expiry).outcome.result, ResultCode::InsufficientFunds);
    let s = split("s4", 500, SplitOrder::Expiry);
    assert_eq!(taken(&s), vec![("0002".into(), -500)]);
    assert_eq!((balance_of(&e, card(1)), balance_of(&e, card(2)), balance_of(&e, card(3))), (0, 0, 0));
    // Its reversal puts each part back, in one append.
    let before = j.txns().len();
    let v = run_cardless(&e, "v1", reverse("s2"), NOW);
    assert_eq!(v.outcome.approved_minor, 2_500);
    assert_eq!((balance_of(&e, card(2)), balance_of(&e, card(3))), (1_500, 1_000));
    assert_eq!(j.txns().len(), before + 2);
    // A refund of a split credits the named card's part only.
    assert_eq!(
        run(&e, "f1", card(2), refund(1_001, Some("s1")), NOW).outcome.result,
        ResultCode::RefundExceedsOriginal
    );
    assert_eq!(run(&e, "f2", card(2), refund(1_000, Some("s1")), NOW).outcome.result, ResultCode::Approved);
    // A card that cannot spend declines the whole request.
    run(&e, "lock", card(3), Op::Lock { reason: LockReason::Fraud }, NOW);
    assert_eq!(split("s5", 100, SplitOrder::Given).outcome.result, ResultCode::CardSuspended);
}

#[test]
fn a_keyed_batch_of_independent_items_is_one_append_and_chains_each_card() {
    let (e, j) = engine();
    // Issued in the reverse of key order, so that the batch's order is not the lock order.
    for c in [4, 3, 2, 1] {
        issue(&e, card(c), "default", usd(1_000), None, true);
    }
    let item = |c: u8, op| rules::KeyedItem { card: card(c), last4: [b'0', b'0', b'0', b'0' + c], op };
    let items = vec![
        item(3, redeem(400, false)),
        item(2, redeem(5_000, false)),
        item(9, redeem(1, false)),
        item(1, Op::Reload { money: usd(250) }),
    ];
    let before = j.txns();
    let b = run_cardless(&e, "kb", Op::Keyed { items, all_or_nothing: false }, NOW);
    let got: Vec<_> = b.items.as_ref().unwrap().iter().map(|o| (o.result, o.approved_minor)).collect();
    use ResultCode::*;
    assert_eq!(got, [(Approved, 400), (InsufficientFunds, 0), (CardNotFound, 0), (Approved, 250)]);
    assert_eq!((b.outcome.result, b.outcome.approved_minor), (Approved, 650));
    assert_eq!([3, 2, 1].map(|c| balance_of(&e, card(c))), [600, 1_000, 1_250]);
    // The two approved changes, in the batch's order, one after the other in one append; each
    // names its card's previous entry, and each card now points at its own.
    let txns = j.txns();
    let new: Vec<_> = txns[before.len()..].iter().map(|t| (t.card, t.kind, t.amount_minor)).collect();
    assert_eq!(new, [(card(3), TxnKind::Redeem, -400), (card(1), TxnKind::Reload, 250)]);
    let issued = |c| before.iter().rfind(|t| t.card == card(c)).unwrap().id;
    assert_eq!(txns[before.len()].prev_id, issued(3));
    assert_eq!(txns[before.len() + 1].prev_id, issued(1));
    assert_eq!(txns[before.len() + 1].id, txns[before.len()].id + 1);
    let next = run(&e, "after", card(1), redeem(50, false), NOW);
    assert_eq!(next.outcome.result, Approved);
    assert_eq!(j.txns().last().unwrap().prev_id, txns[before.len() + 1].id);
    assert_eq!(e.snapshot(&card(2)).unwrap().0.last_txn_id, issued(2), "a declined item changes nothing");
    // Other content under the batch's key is a mismatch, and nothing moves.
    let items = vec![item(3, redeem(400, false))];
    let other = run_cardless(&e, "kb", Op::Keyed { items, all_or_nothing: false }, NOW);
    assert_eq!(other.outcome.result, IdempotencyMismatch);
    assert_eq!(balance_of(&e, card(3)), 600);
    // The wire refuses a card named twice; the engine still chains such changes one after the other.
    let items = vec![item(4, redeem(100, false)), item(4, redeem(200, false))];
    let twice = run_cardless(&e, "kb2", Op::Keyed { items, all_or_nothing: false }, NOW);
    let got: Vec<_> = twice.items.as_ref().unwrap().iter().map(|o| (o.result, o.approved_minor)).collect();
    assert_eq!(got, [(Approved, 100), (Approved, 200)]);
    assert_eq!(balance_of(&e, card(4)), 700);
    let txns = j.txns();
    let (first, second) = (&txns[txns.len() - 2], &txns[txns.len() - 1]);
    assert_eq!((second.card, second.prev_id), (card(4), first.id));
    assert_eq!(e.snapshot(&card(4)).unwrap().0.last_txn_id, second.id);
}

#[test]
fn concurrent_split_redeems_never_deadlock_or_overdraw() {
    let (e, _) = engine();
    for i in 1..=4 {
        issue(&e, card(i), "default", usd(10_000), None, true);
    }
    let e = Arc::new(e);
    let approved: i64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u8)
            .map(|t| {
                let e = e.clone();
                s.spawn(move || {
                    // Each thread names the cards in a different order.
                    let mut cards: Vec<(CardKey, [u8; 4])> = (1..=4).map(|i| (card(i), *b"0000")).collect();
                    cards.rotate_left(t as usize);
                    (0..300)
                        .map(|i| {
                            let op = Op::SplitRedeem { cards: cards.clone(), money: usd(70), order: SplitOrder::Given };
                            run_cardless(&e, &format!("t{t}-{i}"), op, NOW).outcome.approved_minor
                        })
                        .sum::<i64>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let left: i64 = (1..=4).map(|i| balance_of(&e, card(i))).sum();
    assert_eq!(approved + left, 40_000, "conservation");
    assert_eq!(approved % 70, 0, "all or nothing: every split took exactly 0.70");
    assert!(left < 70, "1,200 splits of 0.70 ask more than the 400.00 there is, so all of it went: {left} left");
}

#[test]
fn cash_out_pays_the_balance_and_closes_the_card() {
    let programs = Programs::new([Program { cash_out_max: Some(Decimal::new(5_000, 2)), ..Program::new("small") }]);
    let journal = Arc::new(MemoryJournal::default());
    let e = Engine::new(programs, journal.clone());
    issue(&e, card(1), "small", usd(5_000), None, true);
    issue(&e, card(2), "small", usd(5_001), None, true);
    issue(&e, card(3), "default", usd(9_000), Some(NOW - HOUR_MS), true);
    let cash_out = |key: &str, c| run(&e, key, c, Op::CashOut, NOW).outcome;
    // Above the program's limit: declined, nothing changes.
    assert_eq!(cash_out("x2", card(2)).result, ResultCode::CashOutAboveLimit);
    // Money still held must be settled first.
    let h = authorize(&e, "a", 1_000, HOUR_MS, NOW);
    assert_eq!(cash_out("x1", card(1)).result, ResultCode::HoldsOpen);
    run_hold(&e, "v", Op::Void { hold_id: h.id }, NOW);
    let paid = cash_out("x1b", card(1));
    assert_eq!((paid.result, paid.approved_minor), (ResultCode::Approved, 5_000));
    let v = paid.card.unwrap();
    assert_eq!((v.balance_minor, v.status), (0, Status::Closed));
    assert_eq!(cash_out("x1c", card(1)).result, ResultCode::CardClosed);
    assert_eq!(run(&e, "r", card(1), Op::Reload { money: usd(1) }, NOW).outcome.result, ResultCode::CardClosed);
    // An expired card is paid out (the default program has no limit); a suspended one is not.
    assert_eq!(cash_out("x3", card(3)).approved_minor, 9_000);
    run(&e, "lock", card(2), Op::Lock { reason: LockReason::Fraud }, NOW);
    assert_eq!(cash_out("x2b", card(2)).result, ResultCode::CardSuspended);
    // The ledger counts what left: a restart's conservation check sees the payouts.
    let payouts: Vec<i64> =
        journal.txns().iter().filter(|t| t.kind == TxnKind::CashOut).map(|t| t.amount_minor).collect();
    assert_eq!(payouts, [-5_000, -9_000]);
    let restored = Engine::new(Programs::default(), Arc::new(MemoryJournal::default())).restore(journal.cards(), 1);
    assert_eq!(restored.balance_minor_by_currency.get(&usd(0).currency), Some(&5_001));
}

#[test]
fn register_sets_member_and_vip() {
    let (e, _) = engine();
    active_100(&e);
    let op = |member: Option<&str>, vip| Op::Register { member: member.map(str::to_string), vip };
    assert_eq!(run(&e, "g1", card(1), op(Some("M-7"), true), NOW).outcome.result, ResultCode::Approved);
    let rec = e.snapshot(&card(1)).unwrap().0;
    assert_eq!((rec.vip, rec.member.as_deref()), (true, Some("M-7")));
    run(&e, "g2", card(1), op(None, false), NOW);
    let rec = e.snapshot(&card(1)).unwrap().0;
    assert_eq!((rec.vip, rec.member.as_deref()), (false, None));
    assert_eq!(run(&e, "g3", card(9), op(None, true), NOW).outcome.result, ResultCode::CardNotFound);
}

#[test]
fn transfer_moves_everything_or_nothing() {
    let programs = Programs::new([Program { max_balance: Some(Decimal::new(15_000, 2)), ..Program::new("capped") }]);
    let journal = Arc::new(MemoryJournal::default());
    let e = Engine::new(programs, journal.clone());
    issue(&e, card(1), "capped", usd(10_000), None, true);
    issue(&e, card(2), "capped", usd(3_000), None, true);
    issue(&e, card(3), "default", usd(3_000), None, true);
    issue(&e, card(4), "capped", eur(3_000), None, true);
    issue(&e, card(5), "capped", usd(6_000), None, true);
    let transfer =
        |key: &str, from, to: CardKey| run(&e, key, from, Op::Transfer { to: (to, *b"0000") }, NOW).outcome.result;
    assert_eq!(transfer("t1", card(1), card(3)), ResultCode::ProgramMismatch);
    assert_eq!(transfer("t2", card(1), card(4)), ResultCode::CurrencyMismatch);
    assert_eq!(transfer("t3", card(1), card(5)), ResultCode::MaxBalanceExceeded, "160.00 > 150.00");
    assert_eq!(transfer("t4", card(1), card(9)), ResultCode::TransferTargetNotFound);
    assert_eq!(transfer("t5", card(9), card(1)), ResultCode::CardNotFound);
    let h = authorize(&e, "a", 100, HOUR_MS, NOW);
    assert_eq!(transfer("t6", card(1), card(2)), ResultCode::HoldsOpen);
    run_hold(&e, "v", Op::Void { hold_id: h.id }, NOW);
    // A lost card (suspended) gives its balance away; the whole move is one append.
    run(&e, "lost", card(1), Op::Lock { reason: LockReason::Lost }, NOW);
    let before = j_len(&journal);
    let done = run(&e, "t7", card(1), Op::Transfer { to: (card(2), *b"0002") }, NOW);
    assert_eq!((done.outcome.result, done.outcome.approved_minor), (ResultCode::Approved, 10_000));
    assert_eq!(j_len(&journal), before + 3, "the move out, the move in, the old card's note");
    let (from, to) = (e.snapshot(&card(1)).unwrap().0, e.snapshot(&card(2)).unwrap().0);
    assert_eq!((from.balance_minor, from.status(NOW), to.balance_minor), (0, Status::Closed, 13_000));
    // The old card changed twice in one append: its note names the move out as the entry before.
    let txns = journal.txns();
    let (out, note) = (&txns[txns.len() - 3], &txns[txns.len() - 1]);
    assert_eq!(
        (out.kind, note.kind, note.prev_id, from.last_txn_id),
        (TxnKind::TransferOut, TxnKind::Note, out.id, note.id)
    );
    assert_eq!(transfer("t8", card(1), card(2)), ResultCode::CardClosed);
    assert_eq!(transfer("t9", card(2), card(1)), ResultCode::TransferTargetNotActive);
}

fn j_len(j: &MemoryJournal) -> usize {
    j.txns().len()
}

#[test]
fn reactivation_follows_the_policy_and_says_why() {
    let (e, j) = engine();
    // Card n expired `ago` hours before NOW.
    let expired = |n: u8, ago: i64| issue(&e, card(n), "default", usd(1_000), Some(NOW - ago * HOUR_MS), true);
    expired(1, 23);
    expired(2, 25);
    expired(3, 25);
    run(&e, "vip", card(3), Op::Register { member: None, vip: true }, NOW);
    issue(&e, card(4), "default", usd(1_000), None, true);
    expired(5, 1);
    run(&e, "close", card(5), Op::CashOut, NOW);
    expired(6, 1);
    run(&e, "fraud", card(6), Op::Lock { reason: LockReason::Fraud }, NOW);
    issue(&e, card(7), "default", usd(1_000), None, true);
    run(&e, "lost", card(7), Op::Lock { reason: LockReason::Lost }, NOW);
    let go = |n: u8| run(&e, &format!("re{n}"), card(n), Op::Reactivate, NOW);
    let cases: [(u8, ResultCode, &str); 7] = [
        (1, ResultCode::Approved, "Reactivated per policy – expired <24h"),
        (2, ResultCode::NotEligible, "expired 25 h ago, not VIP: not eligible for reactivation (grace 24 h)"),
        (3, ResultCode::Approved, "Reactivated per policy – VIP customer"),
        (4, ResultCode::NotEligible, "card is active: nothing to reactivate"),
        (5, ResultCode::NotEligible, "card closed: not eligible for reactivation"),
        (6, ResultCode::NotEligible, "suspended for fraud: not eligible for reactivation"),
        (7, ResultCode::NotEligible, "suspended (lost), not VIP: not eligible for reactivation"),
    ];
    for (n, result, reason) in cases {
        let done = go(n);
        assert_eq!((done.outcome.result, done.reason.as_deref()), (result, Some(reason)), "card {n}");
    }
    // Approved: active, a new expiry 7 days on, and the note is in the journal.
    let (rec, _) = e.snapshot(&card(1)).unwrap();
    assert_eq!((rec.status(NOW), rec.expiry_ms), (Status::Active, Some(NOW + 7 * 24 * HOUR_MS)));
    assert!(rec.last_note_id > 0);
    let kinds: Vec<TxnKind> = j.txns().iter().filter(|t| t.card == card(1)).map(|t| t.kind).collect();
    assert_eq!(kinds, [TxnKind::Issue, TxnKind::Reactivate, TxnKind::Note]);
    // A VIP suspended (not for fraud) is reactivated: the suspension is lifted.
    run(&e, "vip7", card(7), Op::Register { member: None, vip: true }, NOW);
    assert_eq!(run(&e, "re7b", card(7), Op::Reactivate, NOW).outcome.result, ResultCode::Approved);
    assert_eq!(e.snapshot(&card(7)).unwrap().0.status(NOW), Status::Active);
}

#[test]
fn a_program_may_leave_vips_out_of_reactivation() {
    let strict = Program { reactivation_vip_eligible: false, ..Program::new("strict") };
    let e = Engine::new(Programs::new([strict]), Arc::new(MemoryJournal::default()));
    issue(&e, card(1), "strict", usd(1_000), Some(NOW - 25 * HOUR_MS), true);
    issue(&e, card(2), "strict", usd(1_000), Some(NOW - 23 * HOUR_MS), true);
    for c in [1, 2] {
        run(&e, &format!("vip{c}"), card(c), Op::Register { member: None, vip: true }, NOW);
    }
    let one = run(&e, "re1", card(1), Op::Reactivate, NOW);
    let why =
        "expired 25 h ago, VIP but the program does not reactivate VIPs: not eligible for reactivation (grace 24 h)";
    assert_eq!((one.outcome.result, one.reason.as_deref()), (ResultCode::NotEligible, Some(why)));
    // The grace still applies to everyone.
    let two = run(&e, "re2", card(2), Op::Reactivate, NOW);
    assert_eq!(
        (two.outcome.result, two.reason.as_deref()),
        (ResultCode::Approved, Some("Reactivated per policy – expired <24h"))
    );
}

fn issue_op(program: &str, money: Money, number: IssueNumber, case: Option<&str>) -> Op {
    Op::Issue {
        program: program.into(),
        money,
        expiry_ms: None,
        active: true,
        number,
        virtual_card: false,
        email: None,
        case: case.map(str::to_string),
    }
}

#[test]
fn loads_respect_single_and_daily_limits() {
    let limited = Program {
        load_min: Some(Decimal::new(500, 2)),
        load_max: Some(Decimal::new(20_000, 2)),
        daily_load_max: Some(Decimal::new(30_000, 2)),
        ..Program::new("limited")
    };
    let journal = Arc::new(MemoryJournal::default());
    let e = Engine::new(Programs::new([limited]), journal.clone());
    let reload = |key: &str, minor, now| run(&e, key, card(1), Op::Reload { money: usd(minor) }, now).outcome.result;
    // The issue's value is the day's first load.
    assert_eq!(issue(&e, card(2), "limited", usd(25_000), None, true).outcome.result, ResultCode::LoadAboveMaximum);
    assert_eq!(issue(&e, card(1), "limited", usd(10_000), None, true).outcome.result, ResultCode::Approved);
    assert_eq!(reload("r1", 499, NOW), ResultCode::LoadBelowMinimum);
    assert_eq!(reload("r2", 20_001, NOW), ResultCode::LoadAboveMaximum);
    assert_eq!(reload("r3", 20_000, NOW), ResultCode::Approved, "100 + 200 = the daily 300");
    assert_eq!(reload("r4", 500, NOW + HOUR_MS), ResultCode::DailyLoadLimitExceeded);
    // The count is durable: a restart from the journal still knows today's loads.
    let again = Engine::new(
        Programs::new([Program { daily_load_max: Some(Decimal::new(30_000, 2)), ..Program::new("limited") }]),
        Arc::new(MemoryJournal::default()),
    );
    again.restore(journal.cards(), 1);
    let r = again
        .execute(m(Req { merchant: "m1", key: "r5".into(), card: card(1), op: Op::Reload { money: usd(500) } }), NOW);
    assert_eq!(r.outcome.result, ResultCode::DailyLoadLimitExceeded);
    // The next UTC day starts from zero; an issue of value 0 is no load at all.
    assert_eq!(reload("r6", 500, NOW + 24 * HOUR_MS), ResultCode::Approved);
    assert_eq!(issue(&e, card(3), "limited", usd(0), None, false).outcome.result, ResultCode::Approved);
}

#[test]
fn wrong_pins_lock_the_card_durably_and_a_right_one_resets_the_count() {
    let pinned = Program { pin_required: true, pin_tries_max: 3, ..Program::new("pinned") };
    let journal = Arc::new(MemoryJournal::default());
    let e = Engine::new(Programs::new([pinned.clone()]), journal.clone());
    issue(&e, card(1), "pinned", usd(10_000), None, true);
    let (right, wrong) = (PinProof([1; 16]), PinProof([2; 16]));
    let pay = |e: &Engine, key: &str, pin: Option<PinProof>| {
        let op = Op::Redeem { money: usd(100), allow_partial: false, invoice: None, pin };
        e.execute(m(Req { merchant: "m1", key: key.into(), card: card(1), op }), NOW).outcome
    };
    let failures = |e: &Engine| e.snapshot(&card(1)).unwrap().0.pin_failures;
    assert_eq!(pay(&e, "p0", None).result, ResultCode::PinRequired);
    assert_eq!(pay(&e, "p1", Some(right)).result, ResultCode::PinNotSet);
    assert_eq!(run(&e, "set", card(1), Op::PinSet { pin: right }, NOW).outcome.result, ResultCode::Approved);
    assert_eq!(pay(&e, "p2", Some(wrong)).result, ResultCode::PinIncorrect);
    // A retry of the same request is the same answer, not a second wrong PIN.
    assert_eq!(pay(&e, "p2", Some(wrong)).result, ResultCode::PinIncorrect);
    assert_eq!(failures(&e), 1);
    assert_eq!(pay(&e, "p3", Some(wrong)).result, ResultCode::PinIncorrect);
    assert_eq!(failures(&e), 2);
    assert_eq!(pay(&e, "p4", Some(right)).result, ResultCode::Approved);
    assert_eq!(failures(&e), 0, "a right PIN starts the count again");
    for (i, tries) in (1..=3).enumerate() {
        let o = pay(&e, &format!("w{i}"), Some(wrong));
        assert_eq!(o.result, ResultCode::PinIncorrect);
        let status = o.card.unwrap().status;
        assert_eq!(status == Status::PinLocked, tries == 3, "wrong PIN {tries} of 3: {status:?}");
    }
    assert_eq!(pay(&e, "p5", Some(right)).result, ResultCode::CardPinLocked, "locked: even the right PIN");
    assert_eq!(run(&e, "v1", card(1), Op::PinVerify { pin: right }, NOW).outcome.result, ResultCode::CardPinLocked);
    // The lock and the count survive a restart.
    let again = Engine::new(Programs::new([pinned]), Arc::new(MemoryJournal::default()));
    again.restore(journal.cards(), 1);
    let rec = again.snapshot(&card(1)).unwrap().0;
    assert_eq!((rec.pin_locked, rec.pin_failures), (true, 3));
    assert_eq!(pay(&again, "p6", Some(right)).result, ResultCode::CardPinLocked);
    let reset = |e: &Engine, key: &str| run(e, key, card(1), Op::PinReset, NOW).outcome.result;
    assert_eq!(reset(&again, "r1"), ResultCode::Approved);
    assert_eq!(reset(&again, "r2"), ResultCode::NotPinLocked);
    assert_eq!(pay(&again, "p7", Some(right)).result, ResultCode::Approved);
    // Standalone verification counts too, and the history says what happened.
    assert_eq!(run(&again, "v2", card(1), Op::PinVerify { pin: wrong }, NOW).outcome.result, ResultCode::PinIncorrect);
    assert_eq!(run(&again, "v3", card(1), Op::PinVerify { pin: right }, NOW).outcome.result, ResultCode::Approved);
    let kinds: Vec<TxnKind> = journal.txns().iter().map(|t| t.kind).collect();
    assert_eq!(kinds.iter().filter(|k| **k == TxnKind::PinFailed).count(), 5);
    assert!(kinds.contains(&TxnKind::PinSet));
    // A split redeem carries no PIN, so it cannot spend from a card whose program wants one.
    issue(&again, card(2), "default", usd(100), None, true);
    let split = Op::SplitRedeem {
        cards: vec![(card(1), *b"0001"), (card(2), *b"0002")],
        money: usd(200),
        order: SplitOrder::Given,
    };
    assert_eq!(run_hold(&again, "s", split, NOW).outcome.result, ResultCode::PinRequired);
}

#[test]
fn issues_follow_their_program() {
    let strict = Program {
        luhn_required: true,
        currency: Some(usd(0).currency),
        expiry_default_ms: Some(365 * 24 * HOUR_MS),
        ..Program::new("strict")
    };
    let (e, _) = (Engine::new(Programs::new([strict]), Arc::new(MemoryJournal::default())), ());
    let go = |key: &str, c, op| run(&e, key, c, op, NOW).outcome;
    let bad = IssueNumber::Supplied { luhn_ok: false };
    let good = IssueNumber::Supplied { luhn_ok: true };
    assert_eq!(go("i1", card(1), issue_op("strict", usd(100), bad.clone(), None)).result, ResultCode::BadCheckDigit);
    assert_eq!(
        go("i2", card(1), issue_op("default", usd(100), bad, None)).result,
        ResultCode::Approved,
        "default asks no Luhn"
    );
    assert_eq!(
        go("i3", card(2), issue_op("strict", eur(100), good.clone(), None)).result,
        ResultCode::CurrencyMismatch
    );
    let o = go("i4", card(2), issue_op("strict", usd(100), good, None));
    assert_eq!(o.card.unwrap().expiry_ms, Some(NOW + 365 * 24 * HOUR_MS), "the program's default expiry");
    // Generated numbers: one that is a card already is skipped for the next.
    let candidates = vec![(card(1), *b"0001"), (card(3), *b"0003"), (card(4), *b"0004")];
    let done = run(&e, "g1", card(0), issue_op("default", usd(500), IssueNumber::Generated(candidates), None), NOW);
    assert_eq!((done.outcome.result, done.issued), (ResultCode::Approved, Some(1)));
    assert_eq!(e.snapshot(&card(3)).unwrap().0.balance_minor, 500);
    assert!(e.snapshot(&card(4)).is_none());
    // Its replay says nothing of the number.
    let again = run(
        &e,
        "g1",
        card(0),
        issue_op("default", usd(500), IssueNumber::Generated(vec![(card(5), *b"0005")]), None),
        NOW,
    );
    assert_eq!(again.issued, None);
    // Were every generated number a card already, the decline shows none of those strangers' cards.
    let taken = vec![(card(1), *b"0001"), (card(3), *b"0003")];
    let done = run(&e, "g2", card(0), issue_op("default", usd(1), IssueNumber::Generated(taken), None), NOW);
    assert_eq!((done.outcome.result, done.outcome.card), (ResultCode::CardExists, None));
    // Compensation: a second issue for the same case, by anyone, with other content, gets the first card.
    let first = e.execute(
        m(Req {
            merchant: "ann",
            key: "c1".into(),
            card: card(6),
            op: issue_op("default", usd(1_000), IssueNumber::Supplied { luhn_ok: true }, Some("CASE-9")),
        }),
        NOW,
    );
    let second = e.execute(
        m(Req {
            merchant: "bob",
            key: "c2".into(),
            card: card(7),
            op: issue_op("default", usd(2_000), IssueNumber::Supplied { luhn_ok: true }, Some("CASE-9")),
        }),
        NOW,
    );
    assert_eq!(first.outcome, second.outcome);
    assert!(second.replayed && e.snapshot(&card(7)).is_none(), "no second card for the case");
    // A declined compensation issue binds nothing: the agent corrects the program and issues again.
    let issue_for = |key: &str, program: &str, c: u8| {
        let op = issue_op(program, usd(500), IssueNumber::Supplied { luhn_ok: true }, Some("CASE-10"));
        e.execute(m(Req { merchant: "ann", key: key.into(), card: card(c), op }), NOW).outcome.result
    };
    assert_eq!(issue_for("c3", "defualt", 8), ResultCode::UnknownProgram);
    e.evict_recent(u64::MAX, i64::MAX);
    assert_eq!(issue_for("c4", "defualt", 8), ResultCode::UnknownProgram, "declined again, from the store's record");
    assert_eq!(issue_for("c5", "default", 8), ResultCode::Approved);
    assert_eq!(issue_for("c6", "default", 9), ResultCode::Approved);
    assert!(e.snapshot(&card(9)).is_none(), "the case is bound now: card 8's answer, no card 9");
}

#[test]
fn program_updates_reach_existing_cards_and_are_journaled() {
    let (e, j) = engine();
    active_100(&e);
    assert_eq!(run(&e, "r1", card(1), redeem(100, false), NOW).outcome.result, ResultCode::Approved);
    let set = |key: &str, p: Program| {
        let op = Op::ProgramSet { settings: format!("{p:?}"), program: Arc::new(p) };
        let mut mutation = m(Req { merchant: "ops", key: key.into(), card: card(0), op });
        mutation.card = None;
        e.execute(mutation, NOW).outcome.result
    };
    let usd_only = Program { pin_required: true, currency: Some(usd(0).currency), ..Program::new("default") };
    assert_eq!(set("s1", usd_only.clone()), ResultCode::Approved);
    assert_eq!(
        run(&e, "r2", card(1), redeem(100, false), NOW).outcome.result,
        ResultCode::PinRequired,
        "the card sees the update"
    );
    assert!(e.program("default").unwrap().pin_required);
    // A program's currency, once set, stays.
    assert_eq!(set("s2", Program { currency: Some(eur(0).currency), ..usd_only }), ResultCode::CurrencyMismatch);
    // New programs are created; the journal keeps every accepted update for the next start.
    assert_eq!(set("s3", Program::new("mall")), ResultCode::Approved);
    assert!(e.program("mall").is_some());
    let mut names: Vec<String> = j.programs().into_iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    assert_eq!(names, ["default", "mall"]);
}

#[test]
fn an_activation_is_taken_back_only_from_a_card_untouched_since() {
    let (e, _) = engine();
    for c in [1, 2] {
        issue(&e, card(c), "default", usd(1_000), None, false);
        let op = Op::Activate { load: Some(usd(500)) };
        assert_eq!(run(&e, &format!("act{c}"), card(c), op, NOW).outcome.result, ResultCode::Approved);
    }
    // A note in the very millisecond of the activation still counts as a use.
    run(&e, "note", card(2), Op::Note { text: "called".into() }, NOW);
    let back = |key: &str, original: &str| run_hold(&e, key, Op::Reverse { original: original.into() }, NOW);
    assert_eq!(back("r2", "act2").outcome.result, ResultCode::CardUsed);
    let done = back("r1", "act1");
    assert_eq!((done.outcome.result, done.outcome.approved_minor), (ResultCode::Approved, 500));
    let rec = e.snapshot(&card(1)).unwrap().0;
    assert_eq!((rec.status(NOW), rec.balance_minor), (Status::Inactive, 1_000));
}

#[test]
fn an_activation_whose_large_load_suspended_the_card_is_still_taken_back() {
    let (e, j) = engine();
    e.set_alert_rules(rules(|r| {
        r.large_amount_minor.insert(usd(0).currency, 5_000);
        r.large_amount_suspend = true;
    }));
    for c in [1, 2, 3] {
        issue(&e, card(c), "default", usd(1_000), None, false);
        let done = run(&e, &format!("act{c}"), card(c), Op::Activate { load: Some(usd(9_000)) }, NOW);
        assert_eq!(done.outcome.result, ResultCode::Approved);
        assert!(done.alerts[0].suspended, "the load is large: giftd suspends the card in the same append");
        assert_eq!(e.snapshot(&card(c)).unwrap().0.lock, LockReason::Fraud);
    }
    // The processor timed out and takes the activation back: the holder did nothing since, so
    // giftd's own lock is no use of the card. The card goes back to inventory, still suspended.
    let back = |key: &str, original: &str| run_hold(&e, key, Op::Reverse { original: original.into() }, NOW + 1);
    let done = back("r1", "act1");
    assert_eq!((done.outcome.result, done.outcome.approved_minor), (ResultCode::Approved, 9_000));
    let rec = e.snapshot(&card(1)).unwrap().0;
    assert_eq!((rec.lifecycle, rec.lock, rec.balance_minor), (Lifecycle::Inactive, LockReason::Fraud, 1_000));
    // The same from the store's record (the memory's evicted): the own entries are recorded too.
    e.evict_recent(u64::MAX, i64::MAX);
    assert_eq!(back("r2", "act2").outcome.result, ResultCode::Approved);
    // A change after the lock (an operator's note) is a change since: the card is left as it is.
    run(&e, "note", card(3), Op::Note { text: "customer called".into() }, NOW + 1);
    assert_eq!(back("r3", "act3").outcome.result, ResultCode::CardUsed);
    assert_eq!(balance_of(&e, card(3)), 10_000);
    assert_eq!(j.txns().iter().filter(|t| t.kind == TxnKind::Reversal).count(), 2, "r1 and r2 only");
}

#[test]
fn a_program_missing_from_the_configuration_issues_nothing_until_set() {
    let journal = Arc::new(MemoryJournal::default());
    let e = Engine::new(Programs::new([Program { pin_required: true, ..Program::new("gone") }]), journal.clone());
    issue(&e, card(1), "gone", usd(1_000), None, true);
    // Restarted with "gone" dropped from the configuration: its card keeps working, by default rules.
    let again = Engine::new(Programs::default(), Arc::new(MemoryJournal::default()));
    let restored = again.restore(journal.cards(), 1);
    assert_eq!(restored.unknown_programs, ["gone"]);
    assert_eq!(run(&again, "r1", card(1), redeem(100, false), NOW).outcome.result, ResultCode::Approved);
    assert_eq!(issue(&again, card(2), "gone", usd(100), None, true).outcome.result, ResultCode::UnknownProgram);
    // Once an admin sets it, it is issuable, and the old card follows it.
    let op = Op::ProgramSet {
        program: Arc::new(Program { pin_required: true, ..Program::new("gone") }),
        settings: String::new(),
    };
    let mut mutation = m(Req { merchant: "ops", key: "set".into(), card: card(0), op });
    mutation.card = None;
    assert_eq!(again.execute(mutation, NOW).outcome.result, ResultCode::Approved);
    assert_eq!(run(&again, "r2", card(1), redeem(100, false), NOW).outcome.result, ResultCode::PinRequired);
    assert_eq!(issue(&again, card(3), "gone", usd(100), None, true).outcome.result, ResultCode::Approved);
}

fn rules(f: impl FnOnce(&mut alerts::AlertRules)) -> alerts::AlertRules {
    let mut r = alerts::AlertRules::default();
    f(&mut r);
    r
}

/// A start for tests that count within a minute.
const MINUTE_START: i64 = NOW - NOW % 60_000;

#[test]
fn velocity_fires_exactly_at_the_threshold_once_per_burst_over_a_sliding_minute() {
    let (e, j) = engine();
    e.set_alert_rules(rules(|r| r.velocity_per_minute = Some(alerts::Threshold { count: 3, suspend: false })));
    active_100(&e);
    let fired = |key: &str, at: i64| run(&e, key, card(1), redeem(100, false), at).alerts;
    assert!(fired("r1", MINUTE_START).is_empty());
    assert!(fired("r2", MINUTE_START + 1).is_empty());
    let third = fired("r3", MINUTE_START + 2);
    assert_eq!(third.len(), 1, "{third:?}");
    let a = &third[0];
    assert_eq!(
        (a.rule, a.observed, a.threshold, &*a.merchant, a.suspended),
        (alerts::Rule::Velocity, 3, 3, "m1", false)
    );
    assert_eq!(&a.last4, b"0001", "the card by its last 4 digits");
    assert!(fired("r4", MINUTE_START + 3).is_empty(), "once per burst, not once per request above it");
    // A retry is a replay, not a redemption: it fires nothing and counts nothing.
    assert!(fired("r3", MINUTE_START + 4).is_empty());
    assert_eq!(j.alerts().len(), 1, "the alert was journaled once");
    // The window slides: a minute after r1, r2 to r4 are still within it; nothing fires anew.
    assert!(fired("r5", MINUTE_START + 60_000).is_empty());
    // Ten seconds later only r5 is left in it: r6 makes two, and r7 three again.
    assert!(fired("r6", MINUTE_START + 70_000).is_empty());
    assert_eq!(fired("r7", MINUTE_START + 70_001).len(), 1, "r5, r6, r7: three within a minute");
    // The alert takes the id after its decision's entry, in the same append.
    let (ids, txns) = (j.alerts(), j.txns());
    // txns: the issue, then r1, r2, r3 (which fired), r4.
    assert_eq!(ids[0].0, txns[3].id + 1);
    assert_eq!(txns[4].id, ids[0].0 + 1);
}

#[test]
fn a_rule_that_suspends_locks_the_card_for_fraud_in_the_decisions_own_append() {
    let (e, j) = engine();
    e.set_alert_rules(rules(|r| r.velocity_per_minute = Some(alerts::Threshold { count: 2, suspend: true })));
    active_100(&e);
    assert!(run(&e, "r1", card(1), redeem(100, false), MINUTE_START).alerts.is_empty());
    let second = run(&e, "r2", card(1), redeem(100, false), MINUTE_START + 1);
    assert_eq!(second.outcome.result, ResultCode::Approved, "the decision that fires the rule stands");
    assert!(second.alerts[0].suspended);
    let (rec, group) = e.snapshot(&card(1)).unwrap();
    assert_eq!(rec.lock, LockReason::Fraud);
    let txns = j.txns();
    let (spent, lock) = (&txns[txns.len() - 2], &txns[txns.len() - 1]);
    assert_eq!((spent.kind, lock.kind, &*lock.merchant), (TxnKind::Redeem, TxnKind::Lock, SYSTEM_MERCHANT));
    assert_eq!(lock.prev_id, spent.id, "the lock follows the redeem in the card's chain");
    assert_eq!(rec.last_txn_id, lock.id, "the card's newest entry is its lock");
    assert_eq!(j.alerts()[0].0, lock.id + 1, "the alert follows the lock");
    assert!(j.alerts()[0].1.suspended);
    assert_eq!(group, second.group, "decision, lock and alert are one append: one group");
    let third = run(&e, "r3", card(1), redeem(100, false), MINUTE_START + 2);
    assert_eq!(third.outcome.result, ResultCode::CardSuspended);
    assert_eq!(balance_of(&e, card(1)), 9_800);
}

#[test]
fn large_amounts_fire_above_their_currencys_threshold_only() {
    let (e, j) = engine();
    active_100(&e);
    issue(&e, card(2), "default", eur(100_000), None, true);
    e.set_alert_rules(rules(|r| {
        r.large_amount_minor.insert(usd(0).currency, 5_000);
    }));
    assert!(run(&e, "at", card(1), redeem(5_000, false), NOW).alerts.is_empty(), "at the threshold is not above it");
    let over = run(&e, "over", card(1), Op::Reload { money: usd(5_001) }, NOW).alerts;
    assert_eq!(over.len(), 1);
    assert_eq!((over[0].rule, over[0].observed, over[0].threshold), (alerts::Rule::LargeAmount, 5_001, 5_000));
    assert_eq!(over[0].currency, Some(usd(0).currency));
    let euros = Op::Redeem { money: eur(90_000), allow_partial: false, invoice: None, pin: None };
    assert!(run(&e, "eur", card(2), euros, NOW).alerts.is_empty(), "no EUR threshold is set");
    assert_eq!(j.alerts().len(), 1);
}

#[test]
fn every_path_that_moves_money_is_judged_card_by_card() {
    let (e, j) = engine();
    e.set_alert_rules(rules(|r| {
        r.large_amount_minor.insert(usd(0).currency, 5_000);
        r.large_amount_suspend = true;
        r.velocity_per_minute = Some(alerts::Threshold { count: 2, suspend: false });
    }));
    // An issue's value is an amount: the new card is suspended with its issue.
    let big = issue(&e, card(1), "default", usd(8_000), None, true);
    assert_eq!((big.alerts.len(), big.alerts[0].rule, big.alerts[0].suspended), (1, alerts::Rule::LargeAmount, true));
    assert_eq!(e.snapshot(&card(1)).unwrap().0.lock, LockReason::Fraud);
    for c in 2..=4 {
        assert!(issue(&e, card(c), "default", usd(4_000), None, true).alerts.is_empty());
    }
    // A split redeem's parts are redemptions of their cards: the second on card 2 in the minute.
    assert!(run(&e, "rd", card(2), redeem(100, false), NOW).alerts.is_empty());
    let cards = vec![(card(2), *b"0002"), (card(3), *b"0003")];
    let split = run_cardless(&e, "sp", Op::SplitRedeem { cards, money: usd(4_500), order: SplitOrder::Given }, NOW);
    assert_eq!(split.outcome.result, ResultCode::Approved);
    let rules_fired: Vec<_> = split.alerts.iter().map(|a| (a.rule, a.last4)).collect();
    assert_eq!(rules_fired, vec![(alerts::Rule::Velocity, *b"0002")], "card 3's first redemption fires nothing");
    // A transfer moves a card's whole balance: over the threshold, the source card is suspended.
    issue(&e, card(5), "default", usd(0), None, true);
    for (key, c) in [("l1", card(4)), ("l2", card(4))] {
        run(&e, key, c, Op::Reload { money: usd(1_000) }, NOW);
    }
    let moved = run(&e, "tr", card(4), Op::Transfer { to: (card(5), *b"0005") }, NOW);
    assert_eq!(moved.outcome.result, ResultCode::Approved);
    assert_eq!((moved.alerts.len(), moved.alerts[0].observed, &moved.alerts[0].last4), (1, 6_000, b"0004"));
    // The source was closed by the transfer before the rule ran: a closed card is not locked.
    assert!(!moved.alerts[0].suspended);
    assert_eq!(e.snapshot(&card(4)).unwrap().0.lock, LockReason::None);
    // An all-or-nothing batch is judged item by item: its redeem is card 3's second redemption in
    // the minute, and its reload over the threshold suspends card 5.
    let items = vec![
        rules::KeyedItem { card: card(3), last4: *b"0003", op: redeem(100, false) },
        rules::KeyedItem { card: card(5), last4: *b"0005", op: Op::Reload { money: usd(6_000) } },
    ];
    let batch = run_cardless(&e, "at", Op::Keyed { items, all_or_nothing: true }, NOW);
    assert_eq!(batch.outcome.result, ResultCode::Approved);
    let fired: Vec<_> = batch.alerts.iter().map(|a| (a.rule, a.last4, a.suspended)).collect();
    assert_eq!(fired, vec![(alerts::Rule::Velocity, *b"0003", false), (alerts::Rule::LargeAmount, *b"0005", true)]);
    assert_eq!(e.snapshot(&card(5)).unwrap().0.lock, LockReason::Fraud);
    let txns = j.txns();
    let lock = txns.last().unwrap();
    assert_eq!((lock.kind, lock.card, lock.prev_id), (TxnKind::Lock, card(5), txns[txns.len() - 2].id));
    assert_eq!(j.alerts().len(), 5, "issue, split, transfer, batch (two)");
}

#[test]
fn unknown_cards_to_one_client_fire_enumeration_at_the_threshold() {
    let (e, j) = engine();
    e.set_alert_rules(rules(|r| r.enumeration_per_minute = Some(3)));
    // The engine no longer counts a mutation's own card_not_found: the server counts every such
    // answer, reads included, by client.
    let probe = e.execute(m(Req { merchant: "m1", key: "p1".into(), card: card(9), op: redeem(100, false) }), NOW);
    assert_eq!((probe.outcome.result, probe.alerts.len()), (ResultCode::CardNotFound, 0));
    assert!(e.unknown_cards("10.0.0.7", "", 1, MINUTE_START).is_none());
    assert!(e.unknown_cards("10.0.0.7", "", 1, MINUTE_START + 1).is_none());
    assert!(e.unknown_cards("pos-2", "m2", 2, MINUTE_START + 2).is_none(), "another client counts apart");
    let (a, group) = e.unknown_cards("10.0.0.7", "", 1, MINUTE_START + 3).expect("the third fires");
    assert_eq!((a.rule, &*a.client, &*a.merchant, a.last4), (alerts::Rule::Enumeration, "10.0.0.7", "", *b"0000"));
    assert!(!a.suspended && group > 0);
    assert!(e.unknown_cards("10.0.0.7", "", 1, MINUTE_START + 4).is_none(), "once per burst");
    // A batch's unknown items count at once.
    let (b, _) = e.unknown_cards("pos-2", "m2", 5, MINUTE_START + 5).expect("2 + 5 reach 3");
    assert_eq!((&*b.client, &*b.merchant), ("pos-2", "m2"));
    assert_eq!(j.alerts().len(), 2);
}

#[test]
fn wrong_pins_fire_at_the_threshold_and_reversals_per_merchant_per_hour() {
    let (e, j) = engine();
    e.set_alert_rules(rules(|r| {
        r.pin_failures = Some(alerts::Threshold { count: 2, suspend: false });
        r.reversals_per_hour = Some(2);
    }));
    active_100(&e);
    assert_eq!(
        run(&e, "set", card(1), Op::PinSet { pin: PinProof([1; 16]) }, NOW).outcome.result,
        ResultCode::Approved
    );
    let wrong = |key: &str| {
        let op = Op::PinVerify { pin: PinProof([2; 16]) };
        run(&e, key, card(1), op, NOW).alerts
    };
    assert!(wrong("w1").is_empty());
    let second = wrong("w2");
    assert_eq!((second.len(), second[0].rule, second[0].observed), (1, alerts::Rule::PinFailures, 2));
    for i in 0..2 {
        run(&e, &format!("s{i}"), card(1), Op::Reload { money: usd(100) }, NOW);
    }
    assert!(run_hold(&e, "b0", reverse("s0"), NOW).alerts.is_empty());
    let back = run_hold(&e, "b1", reverse("s1"), NOW);
    assert_eq!(back.outcome.result, ResultCode::Approved);
    assert_eq!((back.alerts.len(), back.alerts[0].rule), (1, alerts::Rule::Reversals));
    assert_eq!(j.alerts().len(), 2);
}
