//! The engine's redeem decision, end to end in memory: idempotency slot, card lock, rule, journal
//! append (in-memory journal, so no IO is measured).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use giftd::card_number::CardKey;
use giftd::engine::{Engine, IdemKey, MemoryJournal, Mutation, Op, Programs};
use giftd::model::{Currency, Money};
use std::sync::Arc;

const CARDS: u32 = 100_000;

fn key(i: u32) -> CardKey {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&i.to_le_bytes());
    CardKey(k)
}

fn bench(c: &mut Criterion) {
    let usd = Currency::parse("USD").unwrap();
    let engine = Engine::new(Programs::default(), Arc::new(MemoryJournal::default()));
    for i in 0..CARDS {
        let op = Op::Issue {
            program: "default".into(),
            money: Money { currency: usd, minor: i64::MAX / 4 },
            expiry_ms: None,
            active: true,
        };
        engine.execute(
            Mutation {
                idem: IdemKey::new("m", &format!("i{i}")),
                fingerprint: [0; 16],
                card: key(i),
                last4: *b"0000",
                op,
            },
            0,
        );
    }
    let mut n: u32 = 0;
    c.bench_function("engine redeem (in-memory journal)", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            let op = Op::Redeem { money: Money { currency: usd, minor: 100 }, allow_partial: false, invoice: None };
            let m = Mutation {
                idem: IdemKey::new("m", &format!("r{n}")),
                fingerprint: [1; 16],
                card: key(n % CARDS),
                last4: *b"0000",
                op,
            };
            black_box(engine.execute(m, 1))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
