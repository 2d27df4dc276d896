//! Codec throughput: decoding a redeem request frame and encoding its reply.

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use giftd::card_number::CardNumber;
use giftd::model::{CardView, Currency, LockReason, Money, Outcome, ResultCode, Status};
use giftd::wire::{decode_request, encode_reply, encode_request, FrameCodec, IdemRef, Reply, Request};
use tokio_util::codec::Decoder;

fn redeem() -> Request {
    Request::Redeem {
        idem: IdemRef { merchant: "merchant-0001".into(), key: "k-00000000000000000001".into() },
        number: CardNumber::parse("6035719900001234567").unwrap(),
        money: Money { currency: Currency::parse("USD").unwrap(), minor: 100 },
        allow_partial: false,
        invoice: None,
        pin: None,
    }
}

fn bench(c: &mut Criterion) {
    let mut frame = BytesMut::new();
    encode_request(&mut frame, 42, &redeem());
    let frame = frame.freeze();
    c.bench_function("decode redeem frame", |b| {
        let mut codec = FrameCodec::new(64 * 1024);
        b.iter(|| {
            let mut buf = BytesMut::from(&frame[..]);
            let f = codec.decode(&mut buf).unwrap().unwrap();
            black_box(decode_request(f.header.opcode, &f.body).unwrap())
        })
    });
    let reply = Reply::Card(Outcome {
        result: ResultCode::Approved,
        approved_minor: 100,
        card: Some(CardView {
            last4: *b"4567",
            status: Status::Active,
            reason: LockReason::None,
            currency: Currency::parse("USD").unwrap(),
            balance_minor: 9_900,
            held_minor: 0,
            expiry_ms: None,
        }),
        hold: None,
    });
    c.bench_function("encode redeem reply", |b| {
        let mut out = BytesMut::with_capacity(64 * 1024);
        b.iter(|| {
            out.clear();
            encode_reply(&mut out, 0x13, 42, black_box(&reply));
            black_box(out.len())
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
