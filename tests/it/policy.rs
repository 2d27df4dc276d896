//! Programs and the policies they set, over TCP: PIN lockout (and its survival of kill -9),
//! generated and compensation issues, load limits, and admin updates of programs.

use crate::{call, check, idem, num, timed, usd, Giftd, MERCHANT};
use giftd::card_number::{CardNumber, Pin};
use giftd::client::Client;
use giftd::model::{Money, Outcome, ResultCode, Status};
use giftd::wire::{LookupReply, ProgramReply, Reply, Request};

const CARD: &str = "6035719970000017";

fn issue_in(program: &str, number: Option<&str>, key: &str, money: Money, case: Option<&str>) -> Request {
    Request::Issue {
        idem: idem("ops", key),
        number: number.map(num),
        program: program.into(),
        money,
        expiry_ms: None,
        active: true,
        virtual_card: number.is_none(),
        email: number.is_none().then(|| "ann@example.com".to_string()),
        case: case.map(str::to_string),
    }
}

fn pin(p: &str) -> Pin {
    Pin::parse(p).expect("test PIN")
}

fn pay(key: &str, minor: i64, p: Option<&str>) -> Request {
    Request::Redeem {
        idem: idem(MERCHANT, key),
        number: num(CARD),
        money: usd(minor),
        allow_partial: false,
        invoice: None,
        pin: p.map(pin),
    }
}

async fn issued(c: &mut Client, req: &Request) -> (Outcome, Option<CardNumber>) {
    match timed("issue", c.call(req)).await.expect("issue") {
        Reply::Issued(o, n) => (o, n),
        other => panic!("expected an issue reply, got {other:?}"),
    }
}

async fn lookup(c: &mut Client, number: &str) -> LookupReply {
    match timed("lookup", c.call(&Request::Lookup { number: num(number) })).await.expect("lookup") {
        Reply::Lookup(l) => l,
        other => panic!("expected a lookup reply, got {other:?}"),
    }
}

async fn program(c: &mut Client, req: &Request) -> ProgramReply {
    match timed("program", c.call(req)).await.expect("program") {
        Reply::Program(p) => p,
        other => panic!("expected a program reply, got {other:?}"),
    }
}

#[tokio::test]
async fn wrong_pins_lock_the_card_and_the_lock_survives_kill9() {
    let mut g = Giftd::with_config("[programs.pinned]\npin_required = true\npin_tries_max = 3\n");
    let mut c = g.client().await;
    check(
        &call(&mut c, &issue_in("pinned", Some(CARD), "i1", usd(5_000), None)).await,
        ResultCode::Approved,
        5_000,
        None,
    );
    check(&call(&mut c, &pay("p0", 100, None)).await, ResultCode::PinRequired, 0, Some(5_000));
    check(&call(&mut c, &pay("p1", 100, Some("4821"))).await, ResultCode::PinNotSet, 0, Some(5_000));
    let set = Request::PinSet { idem: idem("ops", "s1"), number: num(CARD), pin: pin("4821") };
    check(&call(&mut c, &set).await, ResultCode::Approved, 0, Some(5_000));
    for (i, key) in ["w1", "w2"].iter().enumerate() {
        let o = call(&mut c, &pay(key, 100, Some("1111"))).await;
        check(&o, ResultCode::PinIncorrect, 0, Some(5_000));
        assert_eq!(lookup(&mut c, CARD).await.pin_failures, i as u8 + 1);
    }
    // The same key with another PIN is other content: declined, and not counted.
    check(&call(&mut c, &pay("w1", 100, Some("1112"))).await, ResultCode::IdempotencyMismatch, 0, None);
    assert_eq!(lookup(&mut c, CARD).await.pin_failures, 2);
    // The count is durable: a kill -9 does not give the guesser fresh tries.
    drop(c);
    g.kill9();
    g.restart();
    let mut c = g.client().await;
    assert_eq!(lookup(&mut c, CARD).await.pin_failures, 2);
    let third = call(&mut c, &pay("w3", 100, Some("2222"))).await;
    check(&third, ResultCode::PinIncorrect, 0, Some(5_000));
    assert_eq!(third.card.unwrap().status, Status::PinLocked, "the third wrong PIN locks the card");
    check(&call(&mut c, &pay("p2", 100, Some("4821"))).await, ResultCode::CardPinLocked, 0, Some(5_000));
    let verify = Request::PinVerify { idem: idem("ops", "v1"), number: num(CARD), pin: pin("4821") };
    check(&call(&mut c, &verify).await, ResultCode::CardPinLocked, 0, None);
    drop(c);
    g.kill9();
    g.restart();
    let mut c = g.client().await;
    let l = lookup(&mut c, CARD).await;
    assert_eq!((l.card.unwrap().status, l.pin_set, l.pin_failures), (Status::PinLocked, true, 3));
    let reset = |key: &str| Request::PinReset { idem: idem("ops", key), number: num(CARD) };
    check(&call(&mut c, &reset("r1")).await, ResultCode::Approved, 0, Some(5_000));
    check(&call(&mut c, &reset("r2")).await, ResultCode::NotPinLocked, 0, Some(5_000));
    check(&call(&mut c, &pay("p3", 100, Some("4821"))).await, ResultCode::Approved, 100, Some(4_900));
    // An authorization checks the PIN too.
    let auth = Request::Authorize {
        idem: idem(MERCHANT, "a1"),
        number: num(CARD),
        money: usd(100),
        allow_partial: false,
        ttl_secs: 60,
        pin: Some(pin("9999")),
    };
    match timed("authorize", c.call(&auth)).await.expect("authorize") {
        Reply::Hold(o) => assert_eq!((o.result, o.hold), (ResultCode::PinIncorrect, None)),
        other => panic!("{other:?}"),
    }
    assert_eq!(lookup(&mut c, CARD).await.pin_failures, 1);
}

#[tokio::test]
async fn generated_numbers_are_returned_once_and_a_case_gets_one_card() {
    let g = Giftd::with_config(
        "[programs.mall]\nnumber_prefix = \"603571\"\nnumber_length = 19\n\
         [programs.strict]\nluhn_required = true\n",
    );
    let mut c = g.client().await;
    let req = issue_in("mall", None, "g1", usd(2_500), None);
    let (o, number) = issued(&mut c, &req).await;
    check(&o, ResultCode::Approved, 2_500, Some(2_500));
    let number = number.expect("the first answer carries the generated number");
    let digits = number.expose();
    assert!(digits.starts_with("603571") && digits.len() == 19 && number.luhn_ok(), "{number}");
    assert_eq!(o.card.unwrap().last4, number.last4());
    // The number works, and the card is virtual with its recipient.
    assert_eq!(crate::balance(&mut c, digits).await, 2_500);
    let l = lookup(&mut c, digits).await;
    assert_eq!((l.virtual_card, l.email.as_str(), l.program.as_str()), (true, "ann@example.com", "mall"));
    // A retry answers the same, without the number.
    let (again, none) = issued(&mut c, &req).await;
    assert_eq!((again, none), (o, None));
    // Another generated card gets another number.
    let (_, other) = issued(&mut c, &issue_in("mall", None, "g2", usd(100), None)).await;
    assert_ne!(other.expect("number").expose(), digits);

    // Compensation: the same case, by another key and even another number, returns the first card.
    let first = call(&mut c, &issue_in("default", Some(CARD), "c1", usd(1_000), Some("CASE-7781"))).await;
    check(&first, ResultCode::Approved, 1_000, Some(1_000));
    let second =
        call(&mut c, &issue_in("default", Some("6035719970000025"), "c2", usd(5_000), Some("CASE-7781"))).await;
    assert_eq!(second, first);
    assert_eq!(
        call(&mut c, &Request::Balance { number: num("6035719970000025") }).await.result,
        ResultCode::CardNotFound
    );

    // Where the program asks for it, a supplied number must pass Luhn.
    let bad = call(&mut c, &issue_in("strict", Some("4111111111111112"), "l1", usd(100), None)).await;
    check(&bad, ResultCode::BadCheckDigit, 0, None);
    let good = call(&mut c, &issue_in("strict", Some("4111111111111111"), "l2", usd(100), None)).await;
    check(&good, ResultCode::Approved, 100, Some(100));
}

#[tokio::test]
async fn program_updates_are_validated_durable_and_reach_existing_cards() {
    // The file says one thing; an admin update says another, and wins across restarts.
    let mut g = Giftd::with_config("[programs.mall]\nload_max = \"500.00\"\n");
    let mut c = g.client().await;
    check(
        &call(&mut c, &issue_in("mall", Some(CARD), "i1", usd(1_000), None)).await,
        ResultCode::Approved,
        1_000,
        None,
    );
    let reload = |key: &str, minor| Request::Reload { idem: idem(MERCHANT, key), number: num(CARD), money: usd(minor) };
    check(&call(&mut c, &reload("r1", 30_000)).await, ResultCode::Approved, 30_000, Some(31_000));
    let set = |key: &str, text: &str| Request::ProgramSet {
        idem: idem("ops", key),
        name: "mall".into(),
        settings: text.into(),
    };
    let refused = program(&mut c, &set("s0", "load_max = \"-5\"\npin_tries_max = 0\n")).await;
    assert_eq!(refused.result, ResultCode::BadProgramSettings);
    assert!(refused.text.contains("load_max") && refused.text.contains("pin_tries_max"), "{}", refused.text);
    let unknown = program(&mut c, &set("s0", "load_maximum = \"5\"\n")).await;
    assert_eq!(unknown.result, ResultCode::BadProgramSettings, "unknown keys are refused: {}", unknown.text);
    let ok =
        program(&mut c, &set("s1", "load_max = \"200.00\"\ndaily_load_max = \"600.00\"\ncurrency = \"USD\"\n")).await;
    assert_eq!(ok.result, ResultCode::Approved, "{}", ok.text);
    assert!(
        ok.text.contains("load_max = \"200.00\"") && ok.text.contains("pin_tries_max = 3"),
        "every key: {}",
        ok.text
    );
    // The card issued before the update follows it at once.
    check(&call(&mut c, &reload("r2", 30_000)).await, ResultCode::LoadAboveMaximum, 0, Some(31_000));
    check(&call(&mut c, &reload("r3", 20_000)).await, ResultCode::Approved, 20_000, Some(51_000));
    check(&call(&mut c, &reload("r4", 20_000)).await, ResultCode::DailyLoadLimitExceeded, 0, Some(51_000));
    // A program's currency stays once set.
    let eur = program(&mut c, &set("s2", "currency = \"EUR\"\n")).await;
    assert_eq!(eur.result, ResultCode::CurrencyMismatch);
    drop(c);
    g.kill9();
    g.restart();
    let mut c = g.client().await;
    let got = program(&mut c, &Request::ProgramGet { name: "mall".into() }).await;
    assert_eq!((got.result, got.text), (ResultCode::Approved, ok.text));
    check(&call(&mut c, &reload("r5", 30_000)).await, ResultCode::LoadAboveMaximum, 0, Some(51_000));
    let missing = program(&mut c, &Request::ProgramGet { name: "nope".into() }).await;
    assert_eq!(missing.result, ResultCode::UnknownProgram);
    assert!(
        String::from_utf8_lossy(&g.log()).contains("the stored settings replace the config file's"),
        "the restart says the file was overridden"
    );
}
