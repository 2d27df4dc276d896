//! The engine's redeem decision: idempotency slot, card lock, rule, effects handed to the journal.
//! The journal here discards what it is given, so only the decision is measured (no IO, no growth).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use giftd::card_number::CardKey;
use giftd::engine::{
    Appended, Effect, Effects, Engine, IdemKey, IdemRecord, InvoiceKey, Journal, Mutation, Op, Programs, Settled,
};
use giftd::model::{Currency, Money};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const CARDS: u32 = 100_000;
/// Recent idempotency keys are forgotten this often, as giftd's sweep does, so the map stays small.
const EVICT_EVERY: u32 = 1 << 16;

#[derive(Default)]
struct DiscardJournal {
    group: AtomicU64,
    txn_id: AtomicU64,
}

impl Journal for DiscardJournal {
    fn find_idem(&self, _: &IdemKey) -> Option<IdemRecord> {
        None
    }
    fn invoice_used(&self, _: &InvoiceKey) -> bool {
        false
    }
    fn find_settled(&self, _: &IdemKey) -> Option<Settled> {
        None
    }
    fn effect_of(&self, _: giftd::engine::EffectTxns, _: u64) -> Option<Effect> {
        None
    }
    fn cards_of(&self, _: u64, _: usize) -> Vec<giftd::card_number::CardKey> {
        Vec::new()
    }
    fn latest_group(&self) -> u64 {
        self.group.load(Ordering::Relaxed)
    }
    fn append(&self, effects: Effects) -> Appended {
        let n = effects.changes.len() as u64;
        let first_txn_id = if n > 0 { self.txn_id.fetch_add(n, Ordering::Relaxed) + 1 } else { 0 };
        black_box(effects);
        Appended { group: self.group.fetch_add(1, Ordering::Relaxed) + 1, first_txn_id }
    }
}

fn key(i: u32) -> CardKey {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&i.to_le_bytes());
    CardKey(k)
}

fn bench(c: &mut Criterion) {
    let usd = Currency::parse("USD").unwrap();
    let engine = Engine::new(Programs::default(), Arc::new(DiscardJournal::default()));
    for i in 0..CARDS {
        let money = Money { currency: usd, minor: i64::MAX / 4 };
        let op = Op::issue("default", money, None, true);
        let idem = IdemKey::new("m", &format!("i{i}"));
        engine.execute(
            Mutation {
                idem,
                fingerprint: [0; 16],
                card: Some(key(i)),
                last4: *b"0000",
                op,
                batched: false,
                looked_up: None,
            },
            0,
        );
    }
    let mut n: u32 = 0;
    c.bench_function("engine redeem decision", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            if n.is_multiple_of(EVICT_EVERY) {
                engine.evict_recent(u64::MAX, i64::MAX);
            }
            let op = Op::Redeem {
                money: Money { currency: usd, minor: 100 },
                allow_partial: false,
                invoice: None,
                pin: None,
            };
            let idem = IdemKey::new("m", &format!("r{n}"));
            let m = Mutation {
                idem,
                fingerprint: [1; 16],
                card: Some(key(n % CARDS)),
                last4: *b"0000",
                op,
                batched: false,
                looked_up: None,
            };
            black_box(engine.execute(m, 1))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
