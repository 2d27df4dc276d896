//! On-disk record layouts (little-endian, versioned by a leading byte). These are the store's own
//! formats, separate from the wire's: the two evolve independently.

use crate::card_number::{CardKey, PinProof};
use crate::engine::alerts::{AlertRecord, Rule};
use crate::engine::card::{Hold, HOLDS_PER_CARD_MAX};
use crate::engine::{
    Bulk, CardRecord, ChunkKind, ChunkRecord, EffectTxns, IdemRecord, JobSpec, Lifecycle, NoteRecord, Settled,
    TxnRecord,
};
use crate::model::{CardView, Currency, HoldView, LockReason, Outcome, PartView, Parts, ResultCode, Status, TxnKind};
use bytes::BufMut;

// Version 2 of cards and history entries added the history chain (card's newest entry id, each
// entry's previous id); version 3 of cards added holds, version 4 the VIP flag and member id,
// version 5 the newest note's id, version 6 the PIN (proof and failures), the day's loads, the
// virtual flag and the email, version 7 each hold's merchant tag, version 8 made numbers variable
// length (LEB128, signed ones zigzag) and flags one byte (history version 3 did the same and
// dropped what the card record already says: the entry's sequence number and balance after),
// version 9 keeps each hold's merchant id in place of its tag.
// Version 3 of idempotency records added the
// hold, the parts, the effect and the tombstone flag, version 4 the reason, version 5 an
// all-or-nothing batch's item answers, version 6 a bulk job's record or a job chunk's, version 7
// leaves out a chunk's changed cards (its history entries name them).
// Nothing deployed holds
// an older version.
const CARD_V9: u8 = 9;
const NOTE_V1: u8 = 1;
// v2 adds the client the enumeration rule counted; v1 (without it) is still read.
const ALERT_V1: u8 = 1;
const ALERT_V2: u8 = 2;
// v8 adds how many entries the decision appended in all (`EffectTxns::entries`); v7 (without it:
// its parts' only) is still read.
const IDEM_V7: u8 = 7;
const IDEM_V8: u8 = 8;
/// Most cards a job chunk's record lists.
const CHUNK_CARDS_MAX: usize = 4096;
/// Most item answers an idempotency record holds (an all-or-nothing batch's).
const ITEMS_MAX: usize = 8192;
const SETTLED_V1: u8 = 1;
/// Most parts an effect or an answer lists (a split redeem's cards).
const PARTS_MAX: usize = 64;
const TXN_V3: u8 = 3;

#[derive(Debug, thiserror::Error)]
#[error("corrupt {what} record")]
pub struct Corrupt {
    pub what: &'static str,
}

struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Corrupt> {
        if self.buf.len() < n {
            return Err(Corrupt { what: self.what });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, Corrupt> {
        Ok(self.take(1)?[0])
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], Corrupt> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn i64(&mut self) -> Result<i64, Corrupt> {
        Ok(i64::from_le_bytes(self.arr()?))
    }
    fn hold(&mut self) -> Result<HoldView, Corrupt> {
        Ok(HoldView { id: self.i64()? as u64, amount_minor: self.i64()?, expires_ms: self.i64()? })
    }
    /// An unsigned LEB128 number of at most ten bytes.
    fn uv(&mut self) -> Result<u64, Corrupt> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8()?;
            let bits = (b & 0x7f) as u64;
            // The tenth byte holds the top bit only.
            if i == 9 && bits > 1 {
                break;
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Corrupt { what: self.what })
    }
    /// A zigzag-encoded signed number.
    fn zz(&mut self) -> Result<i64, Corrupt> {
        let v = self.uv()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }
    fn opt_i64(&mut self) -> Result<Option<i64>, Corrupt> {
        let present = self.u8()? == 1;
        let v = self.i64()?;
        Ok(present.then_some(v))
    }
    fn str8(&mut self) -> Result<&'a str, Corrupt> {
        let n = self.u8()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| Corrupt { what: self.what })
    }
    fn currency(&mut self) -> Result<Currency, Corrupt> {
        Currency::from_code(self.arr()?).ok_or(Corrupt { what: self.what })
    }
    fn some<T>(&self, v: Option<T>) -> Result<T, Corrupt> {
        v.ok_or(Corrupt { what: self.what })
    }
    fn version(&mut self, want: u8) -> Result<(), Corrupt> {
        let v = self.u8()?;
        self.some((v == want).then_some(()))
    }
}

fn put_str8(dst: &mut Vec<u8>, s: &str) {
    dst.put_u8(s.len() as u8);
    dst.put_slice(s.as_bytes());
}

/// Unsigned LEB128: seven bits a byte, low first; small numbers (counts, ids, amounts) take a byte
/// or a few instead of eight.
fn put_uv(dst: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        dst.put_u8(v as u8 | 0x80);
        v >>= 7;
    }
    dst.put_u8(v as u8);
}

/// Zigzag, then LEB128: a signed number small in magnitude stays short.
fn put_zz(dst: &mut Vec<u8>, v: i64) {
    put_uv(dst, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_opt_i64(dst: &mut Vec<u8>, v: Option<i64>) {
    dst.put_u8(v.is_some() as u8);
    dst.put_i64_le(v.unwrap_or(0));
}

fn put_hold(dst: &mut Vec<u8>, h: &HoldView) {
    dst.put_u64_le(h.id);
    dst.put_i64_le(h.amount_minor);
    dst.put_i64_le(h.expires_ms);
}

/// Flags of a card record, one bit each.
const FLAG_PIN_LOCKED: u8 = 1;
const FLAG_VIP: u8 = 2;
const FLAG_PIN: u8 = 4;
const FLAG_VIRTUAL: u8 = 8;
const FLAG_EXPIRY: u8 = 16;
const FLAGS_ALL: u8 = FLAG_PIN_LOCKED | FLAG_VIP | FLAG_PIN | FLAG_VIRTUAL | FLAG_EXPIRY;

/// A card record (about 45 bytes for a plain card): it is written with every history entry and in
/// every checkpoint, so its size is most of what each decision costs the disk.
pub fn encode_card(dst: &mut Vec<u8>, c: &CardRecord) {
    dst.put_u8(CARD_V9);
    dst.put_slice(&c.last4);
    dst.put_u8(c.lifecycle as u8);
    dst.put_u8(c.lock as u8);
    let flags = [
        (c.pin_locked, FLAG_PIN_LOCKED),
        (c.vip, FLAG_VIP),
        (c.pin.is_some(), FLAG_PIN),
        (c.virtual_card, FLAG_VIRTUAL),
        (c.expiry_ms.is_some(), FLAG_EXPIRY),
    ];
    dst.put_u8(flags.iter().filter(|(on, _)| *on).fold(0, |f, (_, bit)| f | bit));
    dst.put_slice(&c.currency.code());
    put_zz(dst, c.balance_minor);
    put_zz(dst, c.held_minor);
    if let Some(e) = c.expiry_ms {
        put_zz(dst, e);
    }
    put_zz(dst, c.created_ms);
    // Timestamps near each other: the second as a difference.
    put_zz(dst, c.updated_ms.wrapping_sub(c.created_ms));
    put_uv(dst, c.txn_count);
    put_uv(dst, c.last_txn_id);
    put_str8(dst, &c.program);
    dst.put_u8(c.holds.len() as u8);
    for h in &c.holds {
        put_uv(dst, h.id);
        put_zz(dst, h.amount_minor);
        put_zz(dst, h.opened_ms);
        put_zz(dst, h.expires_ms.wrapping_sub(h.opened_ms));
        put_str8(dst, &h.merchant);
    }
    put_str8(dst, c.member.as_deref().unwrap_or(""));
    put_uv(dst, c.last_note_id);
    if let Some(p) = c.pin {
        dst.put_slice(&p.0);
    }
    dst.put_u8(c.pin_failures);
    put_zz(dst, c.load_day);
    put_zz(dst, c.loaded_today_minor);
    put_str8(dst, c.email.as_deref().unwrap_or(""));
}

pub fn decode_card(buf: &[u8]) -> Result<CardRecord, Corrupt> {
    let mut r = Reader { buf, what: "card" };
    let rec = r.card()?;
    if !r.buf.is_empty() {
        return Err(Corrupt { what: "card" });
    }
    Ok(rec)
}

impl Reader<'_> {
    fn card(&mut self) -> Result<CardRecord, Corrupt> {
        let r = self;
        r.version(CARD_V9)?;
        let last4 = r.arr()?;
        let lifecycle = Lifecycle::from_u8(r.u8()?);
        let lifecycle = r.some(lifecycle)?;
        let lock = LockReason::from_u8(r.u8()?);
        let lock = r.some(lock)?;
        let flags = r.u8()?;
        if flags & !FLAGS_ALL != 0 {
            return Err(Corrupt { what: "card" });
        }
        let currency = r.currency()?;
        let balance_minor = r.zz()?;
        let held_minor = r.zz()?;
        let expiry_ms = if flags & FLAG_EXPIRY != 0 { Some(r.zz()?) } else { None };
        let created_ms = r.zz()?;
        let updated_ms = created_ms.wrapping_add(r.zz()?);
        let txn_count = r.uv()?;
        let last_txn_id = r.uv()?;
        let program = r.str8()?.into();
        let n = r.u8()? as usize;
        if n > HOLDS_PER_CARD_MAX {
            return Err(Corrupt { what: "card" });
        }
        let mut holds = Vec::with_capacity(n);
        for _ in 0..n {
            let id = r.uv()?;
            let amount_minor = r.zz()?;
            let opened_ms = r.zz()?;
            let expires_ms = opened_ms.wrapping_add(r.zz()?);
            holds.push(Hold { id, amount_minor, expires_ms, opened_ms, merchant: r.str8()?.into() });
        }
        let member = r.str8()?;
        let member = (!member.is_empty()).then(|| member.into());
        let last_note_id = r.uv()?;
        let pin = if flags & FLAG_PIN != 0 { Some(PinProof(r.arr()?)) } else { None };
        let rec = CardRecord {
            last4,
            lifecycle,
            lock,
            pin_locked: flags & FLAG_PIN_LOCKED != 0,
            currency,
            balance_minor,
            held_minor,
            expiry_ms,
            created_ms,
            updated_ms,
            txn_count,
            last_txn_id,
            program,
            holds,
            vip: flags & FLAG_VIP != 0,
            member,
            last_note_id,
            pin,
            pin_failures: r.u8()?,
            load_day: r.zz()?,
            loaded_today_minor: r.zz()?,
            virtual_card: flags & FLAG_VIRTUAL != 0,
            email: {
                let email = r.str8()?;
                (!email.is_empty()).then(|| email.into())
            },
        };
        // Paired assertion: the invariants checked before writing hold again after reading.
        rec.check().map_err(|_| Corrupt { what: "card" })?;
        Ok(rec)
    }
}

/// History is keyed by entry id, big-endian so that key order is id order: new entries append.
pub fn history_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// A history entry carries the card record as the entry left it: restart replays entries written
/// after the last checkpoint of the card table, so a change needs no card-table write of its own.
/// The entry's sequence number and balance after are the card's (`txn_count`, `balance_minor`), and
/// its id is the key: none is written twice.
pub fn encode_history(dst: &mut Vec<u8>, t: &TxnRecord, card: &CardRecord) {
    debug_assert!(t.seq == card.txn_count && t.balance_after_minor == card.balance_minor && t.id == card.last_txn_id);
    dst.put_u8(TXN_V3);
    dst.put_slice(&t.card.0);
    put_uv(dst, t.prev_id);
    dst.put_u8(t.kind as u8);
    put_zz(dst, t.amount_minor);
    put_str8(dst, &t.merchant);
    encode_card(dst, card);
    // Usually the card's own update time: a difference of zero, one byte.
    put_zz(dst, t.at_ms.wrapping_sub(card.updated_ms));
}

/// The card a history entry is about, read without decoding the rest of the entry.
pub fn history_card(buf: &[u8]) -> Result<CardKey, Corrupt> {
    let mut r = Reader { buf, what: "history" };
    r.version(TXN_V3)?;
    Ok(CardKey(r.arr()?))
}

pub fn decode_history(key: &[u8], buf: &[u8]) -> Result<(TxnRecord, CardRecord), Corrupt> {
    let mut k = Reader { buf: key, what: "history key" };
    let id = u64::from_be_bytes(k.arr()?);
    let mut r = Reader { buf, what: "history" };
    r.version(TXN_V3)?;
    let card = CardKey(r.arr()?);
    let prev_id = r.uv()?;
    let kind = TxnKind::from_u8(r.u8()?);
    let kind = r.some(kind)?;
    let amount_minor = r.zz()?;
    let merchant = r.str8()?.into();
    let rec = r.card()?;
    let at_ms = rec.updated_ms.wrapping_add(r.zz()?);
    // The record is the card as this entry left it.
    if rec.last_txn_id != id || !r.buf.is_empty() {
        return Err(Corrupt { what: "history" });
    }
    let txn = TxnRecord {
        id,
        prev_id,
        card,
        seq: rec.txn_count,
        kind,
        amount_minor,
        balance_after_minor: rec.balance_minor,
        at_ms,
        merchant,
    };
    Ok((txn, rec))
}

fn put_view(dst: &mut Vec<u8>, card: &Option<CardView>) {
    match card {
        None => dst.put_u8(0),
        Some(v) => {
            dst.put_u8(1);
            dst.put_slice(&v.last4);
            dst.put_u8(v.status as u8);
            dst.put_u8(v.reason as u8);
            dst.put_slice(&v.currency.code());
            dst.put_i64_le(v.balance_minor);
            dst.put_i64_le(v.held_minor);
            put_opt_i64(dst, v.expiry_ms);
        }
    }
}

fn put_outcome(dst: &mut Vec<u8>, o: &Outcome) {
    dst.put_u16_le(o.result as u16);
    dst.put_i64_le(o.approved_minor);
    put_view(dst, &o.card);
    match &o.hold {
        None => dst.put_u8(0),
        Some(h) => {
            dst.put_u8(1);
            put_hold(dst, h);
        }
    }
}

fn put_parts(dst: &mut Vec<u8>, parts: Option<&Parts>) {
    match parts {
        None => dst.put_u8(0),
        Some(p) => {
            dst.put_u8(1);
            dst.put_slice(&p.currency.code());
            dst.put_u8(p.items.len() as u8);
            for i in &p.items {
                dst.put_slice(&i.last4);
                dst.put_i64_le(i.amount_minor);
                dst.put_i64_le(i.balance_after_minor);
            }
        }
    }
}

impl Reader<'_> {
    fn view(&mut self) -> Result<Option<CardView>, Corrupt> {
        if self.u8()? != 1 {
            return Ok(None);
        }
        let last4 = self.arr()?;
        let status = Status::from_u8(self.u8()?);
        let reason = LockReason::from_u8(self.u8()?);
        Ok(Some(CardView {
            last4,
            status: self.some(status)?,
            reason: self.some(reason)?,
            currency: self.currency()?,
            balance_minor: self.i64()?,
            held_minor: self.i64()?,
            expiry_ms: self.opt_i64()?,
        }))
    }

    fn outcome(&mut self) -> Result<Outcome, Corrupt> {
        let result = ResultCode::from_u16(u16::from_le_bytes(self.arr()?));
        let result = self.some(result)?;
        let approved_minor = self.i64()?;
        let card = self.view()?;
        let hold = if self.u8()? == 1 { Some(self.hold()?) } else { None };
        Ok(Outcome { result, approved_minor, card, hold })
    }

    fn count(&mut self) -> Result<usize, Corrupt> {
        let n = self.u8()? as usize;
        if n > PARTS_MAX {
            return Err(Corrupt { what: self.what });
        }
        Ok(n)
    }

    fn parts(&mut self) -> Result<Option<Parts>, Corrupt> {
        if self.u8()? != 1 {
            return Ok(None);
        }
        let currency = self.currency()?;
        let n = self.count()?;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(PartView { last4: self.arr()?, amount_minor: self.i64()?, balance_after_minor: self.i64()? });
        }
        Ok(Some(Parts { currency, items }))
    }
}

pub fn encode_idem(dst: &mut Vec<u8>, rec: &IdemRecord) {
    dst.put_u8(IDEM_V8);
    dst.put_slice(&rec.fingerprint);
    put_outcome(dst, &rec.outcome);
    put_parts(dst, rec.parts.as_deref());
    dst.put_u8(rec.tombstone as u8);
    let reason = rec.reason.as_deref().unwrap_or("");
    dst.put_u16_le(reason.len() as u16);
    dst.put_slice(reason.as_bytes());
    // The effect itself is in the history entries this points at (see `IdemRecord::effect`).
    match rec.effect_txns {
        None => dst.put_u8(0),
        Some(t) => {
            dst.put_u8(1);
            dst.put_u64_le(t.first);
            dst.put_u8(t.parts);
            dst.put_u8(t.entries);
        }
    }
    match &rec.items {
        None => dst.put_u8(0),
        Some(items) => {
            dst.put_u8(1);
            dst.put_u16_le(items.len() as u16);
            for o in items.iter() {
                put_outcome(dst, o);
            }
        }
    }
    match rec.bulk.as_deref() {
        None => dst.put_u8(0),
        Some(Bulk::Job(j)) => {
            dst.put_u8(1);
            dst.put_u8(j.kind as u8);
            dst.put_u32_le(j.count);
            dst.put_u16_le(j.chunk_cards);
        }
        Some(Bulk::Chunk(c)) => {
            dst.put_u8(2);
            dst.put_u8(c.kind as u8);
            dst.put_i64_le(c.at_ms);
            dst.put_i64_le(c.amount_minor);
            dst.put_u64_le(c.first_txn_id);
            dst.put_u16_le(c.results.len() as u16);
            for (code, changed) in &c.results {
                dst.put_u16_le(*code as u16);
                dst.put_u8(*changed as u8);
            }
            // The changed cards are not written: they are the cards of the chunk's history
            // entries (32 bytes a card less in every activation's WAL).
        }
    }
}

fn read_bulk(r: &mut Reader<'_>) -> Result<Option<Box<Bulk>>, Corrupt> {
    let bulk = match r.u8()? {
        0 => return Ok(None),
        1 => {
            let kind = ChunkKind::from_u8(r.u8()?);
            let kind = r.some(kind)?;
            let count = u32::from_le_bytes(r.arr()?);
            Bulk::Job(JobSpec { kind, count, chunk_cards: u16::from_le_bytes(r.arr()?) })
        }
        2 => {
            let kind = ChunkKind::from_u8(r.u8()?);
            let kind = r.some(kind)?;
            let (at_ms, amount_minor, first_txn_id) = (r.i64()?, r.i64()?, r.i64()? as u64);
            let n = u16::from_le_bytes(r.arr()?) as usize;
            if n > CHUNK_CARDS_MAX {
                return Err(Corrupt { what: r.what });
            }
            let mut results = Vec::with_capacity(n);
            for _ in 0..n {
                let code = ResultCode::from_u16(u16::from_le_bytes(r.arr()?));
                let code = r.some(code)?;
                results.push((code, r.u8()? == 1));
            }
            Bulk::Chunk(ChunkRecord { kind, at_ms, amount_minor, results, changed: Vec::new(), first_txn_id })
        }
        _ => return Err(Corrupt { what: r.what }),
    };
    Ok(Some(Box::new(bulk)))
}

pub fn decode_idem(buf: &[u8]) -> Result<IdemRecord, Corrupt> {
    let mut r = Reader { buf, what: "idempotency" };
    let version = r.u8()?;
    if version != IDEM_V7 && version != IDEM_V8 {
        return Err(Corrupt { what: "idempotency" });
    }
    let fingerprint = r.arr()?;
    let outcome = r.outcome()?;
    let parts = r.parts()?.map(Box::new);
    let tombstone = r.u8()? == 1;
    let n = u16::from_le_bytes(r.arr()?) as usize;
    let reason = std::str::from_utf8(r.take(n)?).map_err(|_| Corrupt { what: "idempotency" })?;
    let reason = (!reason.is_empty()).then(|| reason.into());
    let effect_txns = if r.u8()? == 1 {
        let (first, parts) = (r.i64()? as u64, r.u8()?);
        let entries = if version == IDEM_V7 { parts } else { r.u8()? };
        Some(EffectTxns { first, parts, entries })
    } else {
        None
    };
    let items = if r.u8()? == 1 {
        let n = u16::from_le_bytes(r.arr()?) as usize;
        if n > ITEMS_MAX {
            return Err(Corrupt { what: "idempotency" });
        }
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(r.outcome()?);
        }
        Some(Box::new(v))
    } else {
        None
    };
    let bulk = read_bulk(&mut r)?;
    Ok(IdemRecord { fingerprint, outcome, parts, effect: None, effect_txns, tombstone, reason, items, bulk })
}

pub fn encode_settled(dst: &mut Vec<u8>, s: &Settled) {
    dst.put_u8(SETTLED_V1);
    dst.put_u8(s.refunded_minor.len() as u8);
    for r in &s.refunded_minor {
        dst.put_i64_le(*r);
    }
    match &s.reversal {
        None => dst.put_u8(0),
        Some((o, parts)) => {
            dst.put_u8(1);
            put_outcome(dst, o);
            put_parts(dst, parts.as_ref());
        }
    }
}

pub fn decode_settled(buf: &[u8]) -> Result<Settled, Corrupt> {
    let mut r = Reader { buf, what: "settled" };
    r.version(SETTLED_V1)?;
    let n = r.count()?;
    let mut refunded_minor = Vec::with_capacity(n);
    for _ in 0..n {
        refunded_minor.push(r.i64()?);
    }
    let reversal = if r.u8()? == 1 { Some((r.outcome()?, r.parts()?)) } else { None };
    Ok(Settled { refunded_minor, reversal })
}

pub fn encode_note(dst: &mut Vec<u8>, n: &NoteRecord) {
    dst.put_u8(NOTE_V1);
    dst.put_u64_le(n.prev_id);
    dst.put_i64_le(n.at_ms);
    put_str8(dst, &n.author);
    dst.put_u16_le(n.text.len() as u16);
    dst.put_slice(n.text.as_bytes());
}

pub fn decode_note(buf: &[u8]) -> Result<NoteRecord, Corrupt> {
    let mut r = Reader { buf, what: "note" };
    r.version(NOTE_V1)?;
    let prev_id = r.i64()? as u64;
    let at_ms = r.i64()?;
    let author = r.str8()?.into();
    let n = u16::from_le_bytes(r.arr()?) as usize;
    let text = std::str::from_utf8(r.take(n)?).map_err(|_| Corrupt { what: "note" })?.into();
    Ok(NoteRecord { prev_id, at_ms, author, text })
}

/// An alert, under its id in the sequence it shares with history entries (`history_key`).
pub fn encode_alert(dst: &mut Vec<u8>, a: &AlertRecord) {
    dst.put_u8(ALERT_V2);
    dst.put_u8(a.rule as u8);
    dst.put_i64_le(a.at_ms);
    dst.put_slice(&a.last4);
    put_str8(dst, &a.merchant);
    put_str8(dst, &a.client);
    dst.put_i64_le(a.observed);
    dst.put_i64_le(a.threshold);
    match a.currency {
        Some(c) => dst.put_slice(&c.code()),
        None => dst.put_slice(b"\0\0\0"),
    }
    dst.put_u8(a.suspended as u8);
}

pub fn decode_alert(buf: &[u8]) -> Result<AlertRecord, Corrupt> {
    let mut r = Reader { buf, what: "alert" };
    let version = r.u8()?;
    if version != ALERT_V1 && version != ALERT_V2 {
        return Err(Corrupt { what: "alert" });
    }
    let rule = Rule::from_u8(r.u8()?);
    let rule = r.some(rule)?;
    let at_ms = r.i64()?;
    let last4 = r.arr()?;
    let merchant = r.str8()?.into();
    let client = if version == ALERT_V1 { "".into() } else { r.str8()?.into() };
    let observed = r.i64()?;
    let threshold = r.i64()?;
    let code: [u8; 3] = r.arr()?;
    let currency = if code == [0; 3] { None } else { Some(r.some(Currency::from_code(code))?) };
    let suspended = r.u8()? != 0;
    Ok(AlertRecord { rule, at_ms, last4, merchant, client, observed, threshold, currency, suspended })
}

pub fn totals_key(c: Currency) -> [u8; 10] {
    let mut k = *b"totals/\0\0\0";
    k[7..].copy_from_slice(&c.code());
    k
}

pub fn encode_totals(credit: i128, debit: i128) -> [u8; 32] {
    let mut v = [0u8; 32];
    v[..16].copy_from_slice(&credit.to_le_bytes());
    v[16..].copy_from_slice(&debit.to_le_bytes());
    v
}

pub fn decode_totals(key: &[u8], buf: &[u8]) -> Result<(Currency, i128, i128), Corrupt> {
    let bad = Corrupt { what: "totals" };
    if key.len() != 10 || buf.len() != 32 {
        return Err(bad);
    }
    let c = Currency::from_code([key[7], key[8], key[9]]).ok_or(Corrupt { what: "totals" })?;
    let credit = i128::from_le_bytes(buf[..16].try_into().map_err(|_| Corrupt { what: "totals" })?);
    let debit = i128::from_le_bytes(buf[16..].try_into().map_err(|_| Corrupt { what: "totals" })?);
    Ok((c, credit, debit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Effect;

    #[test]
    fn card_and_history_records_round_trip() {
        let card = CardRecord {
            last4: *b"1234",
            program: "default".into(),
            currency: Currency::from_code(*b"USD").unwrap(),
            balance_minor: 9_950,
            held_minor: 50,
            holds: vec![Hold {
                id: 9,
                amount_minor: 50,
                expires_ms: 1_800_000_000_000,
                opened_ms: 1_700_000_000_500,
                merchant: "m-store-17".into(),
            }],
            lifecycle: Lifecycle::Active,
            lock: LockReason::None,
            pin_locked: false,
            vip: true,
            member: Some("M-0042".into()),
            expiry_ms: Some(1_900_000_000_000),
            created_ms: 1_700_000_000_000,
            updated_ms: 1_700_000_001_000,
            txn_count: 3,
            last_txn_id: 77,
            last_note_id: 70,
            pin: Some(PinProof([9; 16])),
            pin_failures: 2,
            load_day: 20_000,
            loaded_today_minor: 12_345,
            virtual_card: true,
            email: Some("ann@example.com".into()),
        };
        let note = NoteRecord {
            prev_id: 12,
            at_ms: 5,
            author: "ops-ann".into(),
            text: "Reactivated per policy – VIP customer".into(),
        };
        let mut nb = Vec::new();
        encode_note(&mut nb, &note);
        assert_eq!(decode_note(&nb).unwrap(), note);
        assert!(decode_note(&nb[..nb.len() - 1]).is_err(), "a truncated note is corrupt");
        let mut buf = Vec::new();
        encode_card(&mut buf, &card);
        assert_eq!(decode_card(&buf).unwrap(), card);
        assert!(decode_card(&buf[..buf.len() - 1]).is_err(), "a truncated record is corrupt");

        let txn = TxnRecord {
            id: 77,
            prev_id: 41,
            card: CardKey([7; 32]),
            seq: 3,
            kind: TxnKind::Redeem,
            amount_minor: -50,
            balance_after_minor: 9_950,
            at_ms: 1_700_000_001_000,
            merchant: "m-1".into(),
        };
        buf.clear();
        encode_history(&mut buf, &txn, &card);
        assert_eq!(decode_history(&history_key(77), &buf).unwrap(), (txn, card.clone()));
        assert!(decode_history(&history_key(78), &buf).is_err(), "the record must be the one the entry left");
        // Keys sort as ids do, so new entries append.
        assert!(history_key(255) < history_key(256));
    }

    #[test]
    fn numbers_keep_their_value_at_every_length() {
        let mut buf = Vec::new();
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u32::MAX as u64, u64::MAX - 1, u64::MAX] {
            buf.clear();
            put_uv(&mut buf, v);
            let mut r = Reader { buf: &buf, what: "test" };
            assert_eq!(r.uv().unwrap(), v);
            assert!(r.buf.is_empty());
        }
        for v in [0i64, -1, 1, -64, 64, i64::MIN, i64::MAX, 1_800_000_000_000, -1_800_000_000_000] {
            buf.clear();
            put_zz(&mut buf, v);
            assert_eq!(Reader { buf: &buf, what: "test" }.zz().unwrap(), v);
        }
        // Eleven bytes, or a tenth byte past 64 bits, or a number cut short: corrupt, not misread.
        for bad in [&[0xff; 11][..], &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02], &[0x80]] {
            assert!(Reader { buf: bad, what: "test" }.uv().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_plain_card_record_is_small_and_a_longer_one_is_corrupt() {
        let card = CardRecord {
            updated_ms: 1_800_000_004_000,
            txn_count: 2,
            last_txn_id: 1_500_000,
            load_day: 20_833,
            loaded_today_minor: 500,
            ..CardRecord::plain_for_tests(500, 1_800_000_000_000)
        };
        let mut buf = Vec::new();
        encode_card(&mut buf, &card);
        // Every checkpoint and every history entry carries one: it was 135 bytes at version 7.
        assert!(buf.len() <= 48, "{} bytes", buf.len());
        assert_eq!(decode_card(&buf).unwrap(), card);
        buf.push(0);
        assert!(decode_card(&buf).is_err(), "a byte past the record is corrupt");
    }

    #[test]
    fn alerts_round_trip() {
        for (rule, currency) in [(Rule::LargeAmount, Currency::parse("EUR")), (Rule::Enumeration, None)] {
            let a = AlertRecord {
                rule,
                at_ms: 1_800_000_000_123,
                last4: *b"4242",
                merchant: "m-store-17".into(),
                client: if rule == Rule::Enumeration { "pos-gateway-2" } else { "" }.into(),
                observed: 250_000,
                threshold: 100_000,
                currency,
                suspended: rule == Rule::LargeAmount,
            };
            let mut buf = Vec::new();
            encode_alert(&mut buf, &a);
            assert_eq!(decode_alert(&buf).expect("decodes"), a);
            assert!(decode_alert(&buf[..buf.len() - 1]).is_err(), "a torn record is corrupt, not misread");
            // Version 1, written before alerts named a client, still reads, with no client.
            let client_at = 1 + 1 + 8 + 4 + 1 + a.merchant.len();
            let mut v1 = buf.clone();
            v1[0] = ALERT_V1;
            v1.drain(client_at..client_at + 1 + a.client.len());
            assert_eq!(decode_alert(&v1).expect("v1 decodes"), AlertRecord { client: "".into(), ..a.clone() });
        }
    }

    #[test]
    fn idempotency_records_round_trip_with_their_hold() {
        let usd = Currency::from_code(*b"USD").unwrap();
        let card = CardView {
            last4: *b"0042",
            status: Status::Active,
            reason: LockReason::None,
            currency: usd,
            balance_minor: 1_000,
            held_minor: 300,
            expiry_ms: None,
        };
        let hold = HoldView { id: 5, amount_minor: 300, expires_ms: 1_700_000_000_000 };
        let parts = Parts {
            currency: usd,
            items: vec![PartView { last4: *b"0042", amount_minor: -300, balance_after_minor: 700 }],
        };
        let effect = Effect {
            at_ms: 9,
            kind: TxnKind::Redeem,
            currency: usd,
            parts: smallvec::smallvec![(CardKey([1; 32]), 300)],
            hold_id: 0,
        };
        let records = [
            IdemRecord::new([3; 16], Outcome { hold: Some(hold), ..Outcome::approved(300, card) }),
            IdemRecord::new([4; 16], Outcome::declined(ResultCode::HoldNotFound, None)),
            IdemRecord {
                parts: Some(Box::new(parts.clone())),
                effect_txns: Some(EffectTxns { first: 41, parts: 2, entries: 3 }),
                ..IdemRecord::new([5; 16], Outcome::approved(300, card))
            },
            IdemRecord {
                tombstone: true,
                ..IdemRecord::new([0; 16], Outcome::declined(ResultCode::OriginalReversed, None))
            },
            IdemRecord {
                items: Some(Box::new(vec![
                    Outcome::approved(300, card),
                    Outcome::declined(ResultCode::BatchAborted, None),
                ])),
                ..IdemRecord::new([7; 16], Outcome::declined(ResultCode::Approved, None))
            },
            IdemRecord {
                bulk: Some(Box::new(Bulk::Job(JobSpec {
                    kind: ChunkKind::Activate,
                    count: 1_000_000,
                    chunk_cards: 4096,
                }))),
                ..IdemRecord::new([8; 16], Outcome::declined(ResultCode::Approved, None))
            },
            IdemRecord {
                bulk: Some(Box::new(Bulk::Chunk(ChunkRecord {
                    kind: ChunkKind::Activate,
                    at_ms: 1_700_000_000_000,
                    amount_minor: 500,
                    results: vec![(ResultCode::Approved, true), (ResultCode::AlreadyActive, false)],
                    changed: Vec::new(),
                    first_txn_id: 99,
                }))),
                ..IdemRecord::new([9; 16], Outcome::declined(ResultCode::Approved, None))
            },
        ];
        for rec in records {
            let mut buf = Vec::new();
            encode_idem(&mut buf, &rec);
            assert_eq!(decode_idem(&buf).unwrap(), rec);
            assert!(decode_idem(&buf[..buf.len() - 1]).is_err(), "a truncated record is corrupt");
        }
        // A chunk's changed cards are not written: its history entries name them.
        let chunk = |changed| ChunkRecord {
            kind: ChunkKind::Activate,
            at_ms: 1,
            amount_minor: 500,
            results: vec![(ResultCode::Approved, true)],
            changed,
            first_txn_id: 7,
        };
        let with_cards = IdemRecord {
            bulk: Some(Box::new(Bulk::Chunk(chunk(vec![CardKey([2; 32])])))),
            ..IdemRecord::new([9; 16], Outcome::declined(ResultCode::Approved, None))
        };
        let mut buf = Vec::new();
        encode_idem(&mut buf, &with_cards);
        let read = decode_idem(&buf).unwrap();
        assert_eq!(read.bulk.as_deref(), Some(&Bulk::Chunk(chunk(Vec::new()))));
        // The effect itself is not written: only where its history entries are.
        let with_effect = IdemRecord {
            effect: Some(effect),
            effect_txns: Some(EffectTxns { first: 7, parts: 1, entries: 2 }),
            ..IdemRecord::new([6; 16], Outcome::approved(300, card))
        };
        let mut buf = Vec::new();
        encode_idem(&mut buf, &with_effect);
        assert_eq!(decode_idem(&buf).unwrap(), IdemRecord { effect: None, ..with_effect.clone() });
        // A v7 record (written before the count of all the decision's entries) reads as one whose
        // entries are its parts'.
        let txns = [[1u8].as_slice(), &7u64.to_le_bytes(), &[1, 2]].concat();
        let at = buf.windows(txns.len()).position(|w| w == txns).expect("the effect's entries in the record");
        let mut v7 = buf.clone();
        v7[0] = IDEM_V7;
        v7.remove(at + txns.len() - 1);
        let read = decode_idem(&v7).unwrap();
        assert_eq!(read.effect_txns, Some(EffectTxns { first: 7, parts: 1, entries: 1 }));
        v7[0] = 6;
        assert!(decode_idem(&v7).is_err(), "an unknown version is corrupt");
        let settled =
            Settled { refunded_minor: vec![100, 0], reversal: Some((Outcome::approved(200, card), Some(parts))) };
        let mut buf = Vec::new();
        encode_settled(&mut buf, &settled);
        assert_eq!(decode_settled(&buf).unwrap(), settled);
    }
}
