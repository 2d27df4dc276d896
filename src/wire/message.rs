//! Typed requests and replies, and their body layouts. One `match` arm per operation in each
//! direction; `protocol/ops/*.md` describes the same layouts in prose and hex.

use super::frame::{begin_frame, finish_frame};
use super::REPLY_BIT;
use crate::card_number::{CardNumber, Pin};
use crate::engine::access::Role;
use crate::engine::{ChunkWork, SplitOrder, SPLIT_CARDS_MAX};
use crate::model::{
    CardView, Currency, HoldView, LockReason, Money, NoteView, Outcome, PartView, Parts, ResultCode, Status, TxnKind,
    TxnView,
};
use bytes::{BufMut, BytesMut};

/// Longest merchant id, idempotency key, invoice number or client name, in bytes.
pub const STRING_BYTES_MAX: usize = 64;
/// Longest program name, in bytes.
pub const PROGRAM_BYTES_MAX: usize = 32;
/// Largest single amount in minor units (10^15): sums of a few never overflow an i64.
pub const AMOUNT_MINOR_MAX: i64 = 1_000_000_000_000_000;
/// Most history entries one page may return.
pub const HISTORY_PAGE_MAX: u16 = 100;
/// Longest explanation in a reply, in bytes of UTF-8.
pub const REASON_BYTES_MAX: usize = 500;
/// Longest note text, in bytes of UTF-8.
pub const NOTE_BYTES_MAX: usize = 500;
/// Notes a lookup shows, newest first.
pub const LOOKUP_NOTES_MAX: usize = 10;
/// Longest recipient email, in bytes (RFC 5321's limit on a path).
pub const EMAIL_BYTES_MAX: usize = 254;
/// Longest program settings text (the config file's keys, one `key = value` per line).
pub const PROGRAM_SETTINGS_BYTES_MAX: usize = 4096;
/// Most operations one batch may carry.
pub const BATCH_ITEMS_MAX: usize = 8192;
/// Most cards one bulk job may name.
pub const JOB_CARDS_MAX: u32 = 10_000_000;
/// Most cards one chunk of a job may hold (a job's chunk size is 1 to this).
pub const JOB_CHUNK_CARDS_MAX: u16 = 4096;
/// Most events one `subscribe` reply frame carries.
pub const EVENTS_PER_FRAME_MAX: usize = 64;
/// The largest encoded event (a history entry with the longest program, merchant and email).
pub const EVENT_BYTES_MAX: usize = 394;
/// The bit of a `subscribe` kinds mask that selects alerts; bit `k` selects history entries of
/// `TxnKind` code `k`. A mask of 0 selects everything.
pub const EVENT_KIND_ALERT_BIT: u64 = 1 << 63;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Hello = 0x01,
    Auth = 0x02,
    Issue = 0x10,
    Activate = 0x11,
    Balance = 0x12,
    Redeem = 0x13,
    Reload = 0x14,
    Lock = 0x15,
    Unlock = 0x16,
    Lookup = 0x17,
    History = 0x18,
    Authorize = 0x19,
    Capture = 0x1A,
    Void = 0x1B,
    Refund = 0x1C,
    Reverse = 0x1D,
    SplitRedeem = 0x1E,
    CashOut = 0x1F,
    Register = 0x20,
    Transfer = 0x21,
    Note = 0x22,
    Reactivate = 0x23,
    PinSet = 0x24,
    PinVerify = 0x25,
    PinReset = 0x26,
    ProgramGet = 0x27,
    ProgramSet = 0x28,
    Batch = 0x30,
    JobOpen = 0x31,
    JobGet = 0x32,
    JobChunk = 0x33,
    Subscribe = 0x34,
}

impl Opcode {
    pub const ALL: [Opcode; 32] = [
        Opcode::Hello,
        Opcode::Auth,
        Opcode::Issue,
        Opcode::Activate,
        Opcode::Balance,
        Opcode::Redeem,
        Opcode::Reload,
        Opcode::Lock,
        Opcode::Unlock,
        Opcode::Lookup,
        Opcode::History,
        Opcode::Authorize,
        Opcode::Capture,
        Opcode::Void,
        Opcode::Refund,
        Opcode::Reverse,
        Opcode::SplitRedeem,
        Opcode::CashOut,
        Opcode::Register,
        Opcode::Transfer,
        Opcode::Note,
        Opcode::Reactivate,
        Opcode::PinSet,
        Opcode::PinVerify,
        Opcode::PinReset,
        Opcode::ProgramGet,
        Opcode::ProgramSet,
        Opcode::Batch,
        Opcode::JobOpen,
        Opcode::JobGet,
        Opcode::JobChunk,
        Opcode::Subscribe,
    ];

    pub fn from_u8(v: u8) -> Option<Opcode> {
        Opcode::ALL.into_iter().find(|o| *o as u8 == v)
    }

    /// Dense index for metric arrays.
    pub fn index(self) -> usize {
        Opcode::ALL.iter().position(|o| *o == self).unwrap_or(0)
    }

    pub fn name(self) -> &'static str {
        match self {
            Opcode::Hello => "hello",
            Opcode::Auth => "auth",
            Opcode::Issue => "issue",
            Opcode::Activate => "activate",
            Opcode::Balance => "balance",
            Opcode::Redeem => "redeem",
            Opcode::Reload => "reload",
            Opcode::Lock => "lock",
            Opcode::Unlock => "unlock",
            Opcode::Lookup => "lookup",
            Opcode::History => "history",
            Opcode::Authorize => "authorize",
            Opcode::Capture => "capture",
            Opcode::Void => "void",
            Opcode::Refund => "refund",
            Opcode::Reverse => "reverse",
            Opcode::SplitRedeem => "split_redeem",
            Opcode::CashOut => "cash_out",
            Opcode::Register => "register",
            Opcode::Transfer => "transfer",
            Opcode::Note => "note",
            Opcode::Reactivate => "reactivate",
            Opcode::PinSet => "pin_set",
            Opcode::PinVerify => "pin_verify",
            Opcode::PinReset => "pin_reset",
            Opcode::ProgramGet => "program_get",
            Opcode::ProgramSet => "program_set",
            Opcode::Batch => "batch",
            Opcode::JobOpen => "job_open",
            Opcode::JobGet => "job_get",
            Opcode::Subscribe => "subscribe",
            Opcode::JobChunk => "job_chunk",
        }
    }

    /// Whether an operation may be an item of a batch: every card operation; not the handshake or
    /// authentication, a
    /// batch, the reads that page through the store (lookup, history, job_get) or program admin.
    pub fn batchable(self) -> bool {
        !matches!(
            self,
            Opcode::Hello
                | Opcode::Auth
                | Opcode::Lookup
                | Opcode::History
                | Opcode::ProgramGet
                | Opcode::ProgramSet
                | Opcode::Batch
                | Opcode::JobGet
                | Opcode::JobChunk
                | Opcode::Subscribe
        )
    }
}

/// Who asks, and the idempotency key of a mutation: a retry carries the same pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdemRef {
    pub merchant: String,
    pub key: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Hello {
        min_version: u8,
        max_version: u8,
        client: String,
    },
    /// Authenticates the connection as a configured client: `proof` is HMAC-SHA-256 under the
    /// client's key of [`auth_message`] (this connection's hello nonce and the client's name).
    Auth {
        client: String,
        proof: [u8; 32],
    },
    /// `number` None: giftd generates one (random, Luhn, in the program's format) and returns it
    /// in the first answer only. `case`: a compensation case; the case's first card answers every
    /// later issue for it.
    Issue {
        idem: IdemRef,
        number: Option<CardNumber>,
        program: String,
        money: Money,
        expiry_ms: Option<i64>,
        active: bool,
        virtual_card: bool,
        email: Option<String>,
        case: Option<String>,
    },
    Activate {
        idem: IdemRef,
        number: CardNumber,
        load: Option<Money>,
    },
    Balance {
        number: CardNumber,
    },
    Redeem {
        idem: IdemRef,
        number: CardNumber,
        money: Money,
        allow_partial: bool,
        invoice: Option<String>,
        pin: Option<Pin>,
    },
    Reload {
        idem: IdemRef,
        number: CardNumber,
        money: Money,
    },
    Lock {
        idem: IdemRef,
        number: CardNumber,
        reason: LockReason,
    },
    Unlock {
        idem: IdemRef,
        number: CardNumber,
    },
    Lookup {
        number: CardNumber,
    },
    /// `kind`: only entries of this kind (None: all).
    History {
        number: CardNumber,
        before_seq: u64,
        limit: u16,
        kind: Option<TxnKind>,
    },
    /// `ttl_secs` 0: the program's default.
    Authorize {
        idem: IdemRef,
        number: CardNumber,
        money: Money,
        allow_partial: bool,
        ttl_secs: u32,
        pin: Option<Pin>,
    },
    Capture {
        idem: IdemRef,
        hold_id: u64,
        money: Money,
    },
    Void {
        idem: IdemRef,
        hold_id: u64,
    },
    /// `original`: the idempotency key (same merchant) of the spend refunded; None: unreferenced.
    Refund {
        idem: IdemRef,
        number: CardNumber,
        money: Money,
        original: Option<String>,
    },
    Reverse {
        idem: IdemRef,
        original: String,
    },
    SplitRedeem {
        idem: IdemRef,
        money: Money,
        order: SplitOrder,
        numbers: Vec<CardNumber>,
    },
    CashOut {
        idem: IdemRef,
        number: CardNumber,
    },
    /// `member`: None unlinks the card from any member.
    Register {
        idem: IdemRef,
        number: CardNumber,
        member: Option<String>,
        vip: bool,
    },
    /// `number` gives up its whole balance to `to` and is closed.
    Transfer {
        idem: IdemRef,
        number: CardNumber,
        to: CardNumber,
    },
    /// The merchant is the note's author.
    Note {
        idem: IdemRef,
        number: CardNumber,
        text: String,
    },
    Reactivate {
        idem: IdemRef,
        number: CardNumber,
    },
    PinSet {
        idem: IdemRef,
        number: CardNumber,
        pin: Pin,
    },
    PinVerify {
        idem: IdemRef,
        number: CardNumber,
        pin: Pin,
    },
    PinReset {
        idem: IdemRef,
        number: CardNumber,
    },
    ProgramGet {
        name: String,
    },
    /// Creates or replaces program `name` with `settings` (the config file's keys; absent keys
    /// take their defaults).
    ProgramSet {
        idem: IdemRef,
        name: String,
        settings: String,
    },
    /// Several operations in one frame, all answered in one reply once every decision is durable.
    /// Items are kept encoded: each is decoded (and refused) on its own.
    Batch {
        mode: BatchMode,
        items: Vec<BatchItem>,
    },
    /// Records a bulk job: `key` is the job id; its cards are sent in chunks of `chunk_cards`.
    JobOpen {
        idem: IdemRef,
        kind: JobKind,
        count: u32,
        chunk_cards: u16,
    },
    /// The chunk of job `job` that starts at its card `first`: the work done to each of `numbers`,
    /// or (`Reverse`, no numbers) the reversal of that chunk.
    JobChunk {
        merchant: String,
        job: String,
        first: u32,
        work: ChunkWork,
        numbers: Vec<CardNumber>,
    },
    JobGet {
        merchant: String,
        job: String,
    },
    /// Every committed history entry and alert with an id above `from`, in commit order, then
    /// each new one as it becomes durable. Empty `merchant`/`program`: any; `kinds`: see
    /// [`EVENT_KIND_ALERT_BIT`]. The connection carries nothing else afterwards.
    Subscribe {
        from: u64,
        merchant: String,
        program: String,
        kinds: u64,
    },
}

/// How a batch's items are decided: its flags byte, and the batch's own key when it has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchMode {
    /// Flags 0: each item is a request of its own, idempotent on its own key.
    Items,
    /// Flags 1: one mutation, idempotent on the batch's key, of redeems, reloads and activations on
    /// distinct cards, applied all or nothing.
    AllOrNothing(IdemRef),
    /// Flags 2: the same items under the batch's key, each decided on its own.
    Each(IdemRef),
}

impl BatchMode {
    /// The batch's own key: the mutation a keyed batch is.
    pub fn key(&self) -> Option<&IdemRef> {
        match self {
            BatchMode::Items => None,
            BatchMode::AllOrNothing(idem) | BatchMode::Each(idem) => Some(idem),
        }
    }
}

/// One operation of a batch: its opcode and its request body, as a frame would carry them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchItem {
    pub opcode: u8,
    pub body: bytes::Bytes,
}

impl BatchItem {
    pub fn of(req: &Request) -> BatchItem {
        let mut body = BytesMut::new();
        encode_request_body(&mut body, req);
        BatchItem { opcode: req.opcode() as u8, body: body.freeze() }
    }
}

/// What a bulk job does to each of its cards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum JobKind {
    Issue = 1,
    Activate = 2,
}

impl JobKind {
    pub fn from_u8(v: u8) -> Option<JobKind> {
        match v {
            1 => Some(JobKind::Issue),
            2 => Some(JobKind::Activate),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            JobKind::Issue => "issue",
            JobKind::Activate => "activate",
        }
    }
}

impl Request {
    /// The merchant id the request acts under, when it names one: a mutation's idempotency
    /// merchant, a job's merchant. Reads, the handshake and a subscription name none (a
    /// subscription's merchant is a filter).
    pub fn merchant(&self) -> Option<&str> {
        match self {
            Request::Batch { mode, .. } => mode.key().map(|idem| &*idem.merchant),
            Request::JobOpen { idem, .. } => Some(&idem.merchant),
            Request::JobChunk { merchant, .. } | Request::JobGet { merchant, .. } => Some(merchant),
            other => other.idem().map(|idem| &*idem.merchant),
        }
    }

    /// The merchant and key a mutation is idempotent on, as it names them. None for reads, the
    /// handshake, a subscription, batches and the job operations, whose keys live in namespaces
    /// of their own.
    pub fn idem(&self) -> Option<&IdemRef> {
        match self {
            Request::Hello { .. }
            | Request::Auth { .. }
            | Request::Balance { .. }
            | Request::Lookup { .. }
            | Request::History { .. }
            | Request::ProgramGet { .. }
            | Request::Subscribe { .. }
            | Request::Batch { .. }
            | Request::JobChunk { .. }
            | Request::JobGet { .. }
            | Request::JobOpen { .. } => None,
            Request::Issue { idem, .. }
            | Request::Activate { idem, .. }
            | Request::Redeem { idem, .. }
            | Request::Reload { idem, .. }
            | Request::Lock { idem, .. }
            | Request::Unlock { idem, .. }
            | Request::Authorize { idem, .. }
            | Request::Capture { idem, .. }
            | Request::Void { idem, .. }
            | Request::Refund { idem, .. }
            | Request::Reverse { idem, .. }
            | Request::SplitRedeem { idem, .. }
            | Request::CashOut { idem, .. }
            | Request::Register { idem, .. }
            | Request::Transfer { idem, .. }
            | Request::Note { idem, .. }
            | Request::Reactivate { idem, .. }
            | Request::PinSet { idem, .. }
            | Request::PinVerify { idem, .. }
            | Request::PinReset { idem, .. }
            | Request::ProgramSet { idem, .. } => Some(idem),
        }
    }

    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Hello { .. } => Opcode::Hello,
            Request::Auth { .. } => Opcode::Auth,
            Request::Issue { .. } => Opcode::Issue,
            Request::Activate { .. } => Opcode::Activate,
            Request::Balance { .. } => Opcode::Balance,
            Request::Redeem { .. } => Opcode::Redeem,
            Request::Reload { .. } => Opcode::Reload,
            Request::Lock { .. } => Opcode::Lock,
            Request::Unlock { .. } => Opcode::Unlock,
            Request::Lookup { .. } => Opcode::Lookup,
            Request::History { .. } => Opcode::History,
            Request::Authorize { .. } => Opcode::Authorize,
            Request::Capture { .. } => Opcode::Capture,
            Request::Void { .. } => Opcode::Void,
            Request::Refund { .. } => Opcode::Refund,
            Request::Reverse { .. } => Opcode::Reverse,
            Request::SplitRedeem { .. } => Opcode::SplitRedeem,
            Request::CashOut { .. } => Opcode::CashOut,
            Request::Register { .. } => Opcode::Register,
            Request::Transfer { .. } => Opcode::Transfer,
            Request::Note { .. } => Opcode::Note,
            Request::Reactivate { .. } => Opcode::Reactivate,
            Request::PinSet { .. } => Opcode::PinSet,
            Request::PinVerify { .. } => Opcode::PinVerify,
            Request::PinReset { .. } => Opcode::PinReset,
            Request::ProgramGet { .. } => Opcode::ProgramGet,
            Request::ProgramSet { .. } => Opcode::ProgramSet,
            Request::Batch { .. } => Opcode::Batch,
            Request::JobOpen { .. } => Opcode::JobOpen,
            Request::JobGet { .. } => Opcode::JobGet,
            Request::Subscribe { .. } => Opcode::Subscribe,
            Request::JobChunk { .. } => Opcode::JobChunk,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloReply {
    pub result: ResultCode,
    pub version: u8,
    pub frame_bytes_max: u32,
    pub inflight_max: u32,
    pub server: String,
    /// Fresh random bytes for this connection, which an `auth` proof covers (so a proof seen on
    /// one connection is worth nothing on another).
    pub nonce: [u8; AUTH_NONCE_BYTES],
}

/// An approved `auth`: the role the connection now has and the merchant id it is bound to
/// (empty for operators and processors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthReply {
    pub result: ResultCode,
    pub role: Role,
    pub merchant: String,
}

/// Bytes of a hello's nonce.
pub const AUTH_NONCE_BYTES: usize = 16;

/// What an `auth` proof is the HMAC of: a fixed label, the connection's nonce and the client name,
/// so a proof is bound to one connection and one client.
pub fn auth_message(nonce: &[u8; AUTH_NONCE_BYTES], client: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + AUTH_NONCE_BYTES + client.len());
    m.extend_from_slice(b"giftd auth v1\0");
    m.extend_from_slice(nonce);
    m.extend_from_slice(client.as_bytes());
    m
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LookupReply {
    pub result: ResultCode,
    pub card: Option<CardView>,
    pub program: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub txn_count: u64,
    /// Newest first.
    pub recent: Vec<TxnView>,
    /// Open holds, oldest first.
    pub holds: Vec<HoldView>,
    pub vip: bool,
    /// Empty when the card is not registered to a member.
    pub member: String,
    /// The newest notes, newest first.
    pub notes: Vec<NoteView>,
    pub pin_set: bool,
    /// Wrong PINs in a row so far.
    pub pin_failures: u8,
    pub virtual_card: bool,
    /// Empty when the card has no recipient email.
    pub email: String,
}

/// A job's record: what it does, how many cards it has and its chunk size (zeros when not found).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobReply {
    pub result: ResultCode,
    /// None when not found or declined.
    pub kind: Option<JobKind>,
    pub count: u32,
    pub chunk_cards: u16,
}

/// One committed event of a subscription. Cards appear by their last 4 digits only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventView {
    Txn {
        id: u64,
        kind: TxnKind,
        last4: [u8; 4],
        program: String,
        merchant: String,
        currency: Currency,
        amount_minor: i64,
        balance_after_minor: i64,
        at_ms: i64,
        /// The recipient of an e-card, on its issue entry (empty otherwise).
        email: String,
    },
    Alert {
        id: u64,
        /// `engine::alerts::Rule` code.
        rule: u8,
        last4: [u8; 4],
        merchant: String,
        /// The client the enumeration rule counted (empty for the other rules).
        client: String,
        currency: Option<Currency>,
        observed: i64,
        threshold: i64,
        suspended: bool,
        at_ms: i64,
    },
}

impl EventView {
    pub fn id(&self) -> u64 {
        match self {
            EventView::Txn { id, .. } | EventView::Alert { id, .. } => *id,
        }
    }
}

/// A subscription's frame: events in id order, and whether they reach what was durable when the
/// frame was sent (`caught_up`; an empty frame may say just that).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventsReply {
    pub result: ResultCode,
    pub caught_up: bool,
    pub events: Vec<EventView>,
}

/// A job chunk's answer: each card's result, in the chunk's order, and whether it changed the
/// card (a reversal approves a card it had nothing to undo, without changing it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkReply {
    pub result: ResultCode,
    pub items: Vec<(ResultCode, bool)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramReply {
    pub result: ResultCode,
    pub name: String,
    /// Approved: the program's settings, every key. `bad_program_settings`: what is wrong.
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryReply {
    pub result: ResultCode,
    /// The card's currency (absent when the card is not found).
    pub currency: Option<Currency>,
    /// Newest first.
    pub txns: Vec<TxnView>,
    /// Pass as `before_seq` to get the next (older) page; 0 when there is none.
    pub next_before_seq: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartsReply {
    pub result: ResultCode,
    /// The total that moved (split redeem: taken; reversal: put back or released).
    pub approved_minor: i64,
    /// Absent when declined.
    pub parts: Option<Parts>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Hello(HelloReply),
    Auth(AuthReply),
    Card(Outcome),
    /// An authorization's outcome: a card outcome followed by the hold it opened.
    Hold(Outcome),
    /// A multi-card outcome (split redeem, reversal): the total and each card's part.
    Parts(PartsReply),
    /// A card outcome and the sentence that explains it (reactivate).
    Explained(Outcome, String),
    /// An issue's outcome and, in the first answer to a generated issue only, the new number.
    Issued(Outcome, Option<CardNumber>),
    Program(ProgramReply),
    /// A batch's replies, one per item in order: the reply opcode (with the reply bit) and reply.
    Batch(Vec<(u8, Reply)>),
    Job(JobReply),
    Chunk(ChunkReply),
    Events(EventsReply),
    Lookup(LookupReply),
    History(HistoryReply),
    /// A request error: the body is the result code alone.
    Error(ResultCode),
}

impl Reply {
    pub fn result(&self) -> ResultCode {
        match self {
            Reply::Hello(h) => h.result,
            Reply::Auth(a) => a.result,
            Reply::Card(o) | Reply::Hold(o) => o.result,
            Reply::Parts(p) => p.result,
            Reply::Explained(o, _) | Reply::Issued(o, _) => o.result,
            Reply::Program(p) => p.result,
            Reply::Batch(_) => ResultCode::Approved,
            Reply::Job(j) => j.result,
            Reply::Chunk(c) => c.result,
            Reply::Events(e) => e.result,
            Reply::Lookup(l) => l.result,
            Reply::History(h) => h.result,
            Reply::Error(c) => *c,
        }
    }
}

/// Why a well-framed body was refused; the connection stays open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeError(pub ResultCode);

struct Reader<'a> {
    buf: &'a [u8],
}

type Res<T> = Result<T, DecodeError>;
const MALFORMED: DecodeError = DecodeError(ResultCode::MalformedRequest);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Res<&'a [u8]> {
        if self.buf.len() < n {
            return Err(MALFORMED);
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Res<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Res<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().map_err(|_| MALFORMED)?))
    }
    fn u32(&mut self) -> Res<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| MALFORMED)?))
    }
    fn u64(&mut self) -> Res<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| MALFORMED)?))
    }
    fn i64(&mut self) -> Res<i64> {
        Ok(self.u64()? as i64)
    }
    fn bool(&mut self) -> Res<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(MALFORMED),
        }
    }
    /// A u8-length-prefixed string of printable ASCII, at most `max` bytes.
    fn str8(&mut self, max: usize) -> Res<String> {
        let n = self.u8()? as usize;
        let b = self.take(n)?;
        if n > max || !b.iter().all(|c| c.is_ascii_graphic() || *c == b' ') {
            return Err(MALFORMED);
        }
        String::from_utf8(b.to_vec()).map_err(|_| MALFORMED)
    }
    /// A u16-length-prefixed UTF-8 string of at most `max` bytes, without control characters.
    fn str16(&mut self, max: usize) -> Res<String> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| MALFORMED)?;
        if n > max || s.chars().any(char::is_control) {
            return Err(MALFORMED);
        }
        Ok(s.to_string())
    }
    /// Settings text: like `str16`, but line breaks and tabs are allowed (TOML lines).
    fn text16(&mut self, max: usize) -> Res<String> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| MALFORMED)?;
        if n > max || s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
            return Err(MALFORMED);
        }
        Ok(s.to_string())
    }
    /// A str8 PIN, empty for none; anything else must be 4 to 12 digits.
    fn pin(&mut self) -> Res<Option<Pin>> {
        let n = self.u8()? as usize;
        let b = self.take(n)?;
        if n == 0 {
            return Ok(None);
        }
        std::str::from_utf8(b).ok().and_then(Pin::parse).map(Some).ok_or(DecodeError(ResultCode::BadPin))
    }
    /// A card number, or none when the field is empty (an issue that asks giftd to generate one).
    fn number_or_none(&mut self) -> Res<Option<CardNumber>> {
        if self.buf.first() == Some(&0) {
            self.take(1)?;
            return Ok(None);
        }
        self.number().map(Some)
    }
    fn number(&mut self) -> Res<CardNumber> {
        let n = self.u8()? as usize;
        let b = self.take(n)?;
        std::str::from_utf8(b).ok().and_then(CardNumber::parse).ok_or(DecodeError(ResultCode::BadCardNumber))
    }
    fn currency(&mut self) -> Res<Currency> {
        let c = self.take(3)?;
        Currency::from_code([c[0], c[1], c[2]]).ok_or(DecodeError(ResultCode::UnknownCurrency))
    }
    /// Money whose amount must be in `1..=AMOUNT_MINOR_MAX` (or 0 too, when `zero_ok`).
    fn money(&mut self, zero_ok: bool) -> Res<Money> {
        let currency = self.currency()?;
        let minor = self.i64()?;
        let low = if zero_ok { 0 } else { 1 };
        if !(low..=AMOUNT_MINOR_MAX).contains(&minor) {
            return Err(DecodeError(ResultCode::BadAmount));
        }
        Ok(Money { currency, minor })
    }
    /// A flag and an i64 that is always present; when the flag is 0 the value must be 0 too, so one
    /// request has one encoding (and one idempotency fingerprint).
    fn opt_i64(&mut self) -> Res<Option<i64>> {
        let present = self.bool()?;
        let v = self.i64()?;
        if !present && v != 0 {
            return Err(MALFORMED);
        }
        Ok(present.then_some(v))
    }
    fn hold(&mut self) -> Res<Option<HoldView>> {
        let present = self.bool()?;
        let h = HoldView { id: self.u64()?, amount_minor: self.i64()?, expires_ms: self.i64()? };
        if !present && h != (HoldView { id: 0, amount_minor: 0, expires_ms: 0 }) {
            return Err(MALFORMED);
        }
        Ok(present.then_some(h))
    }
    fn idem(&mut self) -> Res<IdemRef> {
        let merchant = self.str8(STRING_BYTES_MAX)?;
        let key = self.str8(STRING_BYTES_MAX)?;
        if merchant.is_empty() || key.is_empty() {
            return Err(DecodeError(ResultCode::MissingKey));
        }
        Ok(IdemRef { merchant, key })
    }
    fn view(&mut self) -> Res<Option<CardView>> {
        if !self.bool()? {
            return Ok(None);
        }
        let l = self.take(4)?;
        Ok(Some(CardView {
            last4: [l[0], l[1], l[2], l[3]],
            status: Status::from_u8(self.u8()?).ok_or(MALFORMED)?,
            reason: LockReason::from_u8(self.u8()?).ok_or(MALFORMED)?,
            currency: self.currency()?,
            balance_minor: self.i64()?,
            held_minor: self.i64()?,
            expiry_ms: self.opt_i64()?,
        }))
    }
    fn txn(&mut self) -> Res<TxnView> {
        Ok(TxnView {
            seq: self.u64()?,
            kind: TxnKind::from_u8(self.u8()?).ok_or(MALFORMED)?,
            amount_minor: self.i64()?,
            balance_after_minor: self.i64()?,
            at_ms: self.i64()?,
            merchant: self.str8(STRING_BYTES_MAX)?,
        })
    }
    fn txns(&mut self) -> Res<Vec<TxnView>> {
        let n = self.u16()? as usize;
        // Each entry takes at least 34 bytes, so a lying count cannot reserve more than the body holds.
        let mut v = Vec::with_capacity(n.min(self.buf.len() / 34));
        for _ in 0..n {
            v.push(self.txn()?);
        }
        Ok(v)
    }
    fn program_name(&mut self) -> Res<String> {
        let name = self.str8(PROGRAM_BYTES_MAX)?;
        if name.is_empty() || name.contains(' ') {
            return Err(MALFORMED);
        }
        Ok(name)
    }
    fn result(&mut self) -> Res<ResultCode> {
        ResultCode::from_u16(self.u16()?).ok_or(MALFORMED)
    }
    fn end(&self) -> Res<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(MALFORMED)
        }
    }
}

/// Decodes a request body. Field validation (card number, currency, amount, key) happens here, so
/// everything after the wire layer holds only well-formed values.
pub fn decode_request(opcode: u8, body: &[u8]) -> Result<Request, DecodeError> {
    let op = Opcode::from_u8(opcode).ok_or(DecodeError(ResultCode::UnknownOpcode))?;
    let mut r = Reader { buf: body };
    let req = match op {
        Opcode::Hello => {
            Request::Hello { min_version: r.u8()?, max_version: r.u8()?, client: r.str8(STRING_BYTES_MAX)? }
        }
        Opcode::Auth => {
            let client = r.str8(STRING_BYTES_MAX)?;
            if client.is_empty() {
                return Err(MALFORMED);
            }
            Request::Auth { client, proof: r.take(32)?.try_into().map_err(|_| MALFORMED)? }
        }
        Opcode::Issue => {
            let (idem, number) = (r.idem()?, r.number_or_none()?);
            let program = r.program_name()?;
            let money = r.money(true)?;
            let expiry_ms = r.opt_i64()?;
            let active = r.bool()?;
            let virtual_card = r.bool()?;
            let email = r.str8(EMAIL_BYTES_MAX)?;
            // Not a full RFC 5322 check: enough to catch a field filled with something else.
            if !email.is_empty()
                && (email.contains(' ')
                    || !email.split_once('@').is_some_and(|(a, b)| !a.is_empty() && b.contains('.')))
            {
                return Err(MALFORMED);
            }
            let case = r.str8(STRING_BYTES_MAX)?;
            Request::Issue {
                idem,
                number,
                program,
                money,
                expiry_ms,
                active,
                virtual_card,
                email: (!email.is_empty()).then_some(email),
                case: (!case.is_empty()).then_some(case),
            }
        }
        Opcode::Activate => {
            let (idem, number) = (r.idem()?, r.number()?);
            let load = if r.bool()? { Some(r.money(false)?) } else { None };
            Request::Activate { idem, number, load }
        }
        Opcode::Balance => Request::Balance { number: r.number()? },
        Opcode::Redeem => {
            let (idem, number) = (r.idem()?, r.number()?);
            let money = r.money(false)?;
            let allow_partial = r.bool()?;
            let invoice = r.str8(STRING_BYTES_MAX)?;
            let invoice = (!invoice.is_empty()).then_some(invoice);
            let pin = r.pin()?;
            Request::Redeem { idem, number, money, allow_partial, invoice, pin }
        }
        Opcode::Reload => Request::Reload { idem: r.idem()?, number: r.number()?, money: r.money(false)? },
        Opcode::Lock => {
            let (idem, number) = (r.idem()?, r.number()?);
            let reason = LockReason::from_u8(r.u8()?).filter(|r| *r != LockReason::None).ok_or(MALFORMED)?;
            Request::Lock { idem, number, reason }
        }
        Opcode::Unlock => Request::Unlock { idem: r.idem()?, number: r.number()? },
        Opcode::Lookup => Request::Lookup { number: r.number()? },
        Opcode::History => {
            let number = r.number()?;
            let before_seq = r.u64()?;
            let limit = r.u16()?;
            if limit == 0 || limit > HISTORY_PAGE_MAX {
                return Err(MALFORMED);
            }
            let kind = match r.u8()? {
                0 => None,
                k => Some(TxnKind::from_u8(k).ok_or(MALFORMED)?),
            };
            Request::History { number, before_seq, limit, kind }
        }
        Opcode::Authorize => {
            let (idem, number) = (r.idem()?, r.number()?);
            let money = r.money(false)?;
            let allow_partial = r.bool()?;
            let ttl_secs = u32::from_le_bytes(r.take(4)?.try_into().map_err(|_| MALFORMED)?);
            let pin = r.pin()?;
            Request::Authorize { idem, number, money, allow_partial, ttl_secs, pin }
        }
        Opcode::Capture => Request::Capture { idem: r.idem()?, hold_id: r.u64()?, money: r.money(false)? },
        Opcode::Void => Request::Void { idem: r.idem()?, hold_id: r.u64()? },
        Opcode::Refund => {
            let (idem, number) = (r.idem()?, r.number()?);
            let money = r.money(false)?;
            let original = r.str8(STRING_BYTES_MAX)?;
            Request::Refund { idem, number, money, original: (!original.is_empty()).then_some(original) }
        }
        Opcode::Reverse => {
            let idem = r.idem()?;
            let original = r.str8(STRING_BYTES_MAX)?;
            if original.is_empty() {
                return Err(DecodeError(ResultCode::MissingKey));
            }
            Request::Reverse { idem, original }
        }
        Opcode::SplitRedeem => {
            let idem = r.idem()?;
            let money = r.money(false)?;
            let order = SplitOrder::from_u8(r.u8()?).ok_or(MALFORMED)?;
            let n = r.u8()? as usize;
            if !(1..=SPLIT_CARDS_MAX).contains(&n) {
                return Err(MALFORMED);
            }
            let mut numbers: Vec<CardNumber> = Vec::with_capacity(n);
            for _ in 0..n {
                let number = r.number()?;
                // The same card twice would be one card counted twice.
                if numbers.iter().any(|x| x.expose() == number.expose()) {
                    return Err(MALFORMED);
                }
                numbers.push(number);
            }
            Request::SplitRedeem { idem, money, order, numbers }
        }
        Opcode::CashOut => Request::CashOut { idem: r.idem()?, number: r.number()? },
        Opcode::Register => {
            let (idem, number) = (r.idem()?, r.number()?);
            let member = r.str8(STRING_BYTES_MAX)?;
            let vip = r.bool()?;
            Request::Register { idem, number, member: (!member.is_empty()).then_some(member), vip }
        }
        Opcode::Transfer => {
            let (idem, number) = (r.idem()?, r.number()?);
            let to = r.number()?;
            // A card cannot give its balance to itself.
            if to.expose() == number.expose() {
                return Err(MALFORMED);
            }
            Request::Transfer { idem, number, to }
        }
        Opcode::Note => {
            let (idem, number) = (r.idem()?, r.number()?);
            let text = r.str16(NOTE_BYTES_MAX)?;
            if text.is_empty() {
                return Err(MALFORMED);
            }
            Request::Note { idem, number, text }
        }
        Opcode::Reactivate => Request::Reactivate { idem: r.idem()?, number: r.number()? },
        Opcode::PinSet | Opcode::PinVerify => {
            let (idem, number) = (r.idem()?, r.number()?);
            let pin = r.pin()?.ok_or(DecodeError(ResultCode::BadPin))?;
            if op == Opcode::PinSet {
                Request::PinSet { idem, number, pin }
            } else {
                Request::PinVerify { idem, number, pin }
            }
        }
        Opcode::PinReset => Request::PinReset { idem: r.idem()?, number: r.number()? },
        Opcode::ProgramGet => Request::ProgramGet { name: r.program_name()? },
        Opcode::ProgramSet => {
            let idem = r.idem()?;
            let name = r.program_name()?;
            let settings = r.text16(PROGRAM_SETTINGS_BYTES_MAX)?;
            Request::ProgramSet { idem, name, settings }
        }
        Opcode::Batch => {
            let mode = match r.u8()? {
                0 => BatchMode::Items,
                1 => BatchMode::AllOrNothing(r.idem()?),
                2 => BatchMode::Each(r.idem()?),
                _ => return Err(MALFORMED),
            };
            let n = r.u16()? as usize;
            if !(1..=BATCH_ITEMS_MAX).contains(&n) {
                return Err(MALFORMED);
            }
            // Each item takes at least 3 bytes, so a lying count reserves no more than the body holds.
            let mut items = Vec::with_capacity(n.min(r.buf.len() / 3));
            for _ in 0..n {
                let opcode = r.u8()?;
                let len = r.u16()? as usize;
                let body = bytes::Bytes::copy_from_slice(r.take(len)?);
                items.push(BatchItem { opcode, body });
            }
            Request::Batch { mode, items }
        }
        Opcode::JobOpen => {
            let idem = r.idem()?;
            // Chunks are keyed `<job>/@<first>`: a job id holds no `/`, so no two keys meet.
            if idem.key.contains('/') {
                return Err(MALFORMED);
            }
            let kind = JobKind::from_u8(r.u8()?).ok_or(MALFORMED)?;
            let count = r.u32()?;
            if count == 0 || count > JOB_CARDS_MAX {
                return Err(MALFORMED);
            }
            let chunk_cards = r.u16()?;
            if chunk_cards == 0 || chunk_cards > JOB_CHUNK_CARDS_MAX {
                return Err(MALFORMED);
            }
            Request::JobOpen { idem, kind, count, chunk_cards }
        }
        Opcode::JobChunk => {
            let merchant = r.str8(STRING_BYTES_MAX)?;
            let job = r.str8(STRING_BYTES_MAX)?;
            if merchant.is_empty() || job.is_empty() {
                return Err(DecodeError(ResultCode::MissingKey));
            }
            if job.contains('/') {
                return Err(MALFORMED);
            }
            let first = r.u32()?;
            let work = match r.u8()? {
                1 => {
                    let program = r.program_name()?;
                    let money = r.money(true)?;
                    ChunkWork::Issue { program, money, expiry_ms: r.opt_i64()? }
                }
                2 => ChunkWork::Activate { load: if r.bool()? { Some(r.money(false)?) } else { None } },
                3 => ChunkWork::Reverse,
                _ => return Err(MALFORMED),
            };
            let n = r.u16()? as usize;
            let reverse = work == ChunkWork::Reverse;
            if (reverse && n != 0) || (!reverse && !(1..=JOB_CHUNK_CARDS_MAX as usize).contains(&n)) {
                return Err(MALFORMED);
            }
            // Each number takes at least 13 bytes, so a lying count reserves no more than the body holds.
            let mut numbers = Vec::with_capacity(n.min(r.buf.len() / 13));
            for _ in 0..n {
                numbers.push(r.number()?);
            }
            Request::JobChunk { merchant, job, first, work, numbers }
        }
        Opcode::JobGet => {
            let merchant = r.str8(STRING_BYTES_MAX)?;
            let job = r.str8(STRING_BYTES_MAX)?;
            if merchant.is_empty() || job.is_empty() {
                return Err(DecodeError(ResultCode::MissingKey));
            }
            Request::JobGet { merchant, job }
        }
        Opcode::Subscribe => {
            let from = r.u64()?;
            let merchant = r.str8(STRING_BYTES_MAX)?;
            let program = r.str8(PROGRAM_BYTES_MAX)?;
            let kinds = r.u64()?;
            Request::Subscribe { from, merchant, program, kinds }
        }
    };
    r.end()?;
    Ok(req)
}

fn put_str8(dst: &mut BytesMut, s: &str) {
    debug_assert!(s.len() <= 255);
    dst.put_u8(s.len() as u8);
    dst.put_slice(s.as_bytes());
}

fn put_str16(dst: &mut BytesMut, s: &str) {
    debug_assert!(s.len() <= u16::MAX as usize);
    dst.put_u16_le(s.len() as u16);
    dst.put_slice(s.as_bytes());
}

fn put_money(dst: &mut BytesMut, m: &Money) {
    dst.put_slice(&m.currency.code());
    dst.put_i64_le(m.minor);
}

fn put_opt_i64(dst: &mut BytesMut, v: Option<i64>) {
    dst.put_u8(v.is_some() as u8);
    dst.put_i64_le(v.unwrap_or(0));
}

fn put_idem(dst: &mut BytesMut, idem: &IdemRef, number: &CardNumber) {
    put_str8(dst, &idem.merchant);
    put_str8(dst, &idem.key);
    put_str8(dst, number.expose());
}

/// Encodes a request body (no header).
pub fn encode_request_body(dst: &mut BytesMut, req: &Request) {
    match req {
        Request::Hello { min_version, max_version, client } => {
            dst.put_u8(*min_version);
            dst.put_u8(*max_version);
            put_str8(dst, client);
        }
        Request::Auth { client, proof } => {
            put_str8(dst, client);
            dst.put_slice(proof);
        }
        Request::Issue { idem, number, program, money, expiry_ms, active, virtual_card, email, case } => {
            put_str8(dst, &idem.merchant);
            put_str8(dst, &idem.key);
            put_str8(dst, number.as_ref().map_or("", |n| n.expose()));
            put_str8(dst, program);
            put_money(dst, money);
            put_opt_i64(dst, *expiry_ms);
            dst.put_u8(*active as u8);
            dst.put_u8(*virtual_card as u8);
            put_str8(dst, email.as_deref().unwrap_or(""));
            put_str8(dst, case.as_deref().unwrap_or(""));
        }
        Request::Activate { idem, number, load } => {
            put_idem(dst, idem, number);
            dst.put_u8(load.is_some() as u8);
            if let Some(m) = load {
                put_money(dst, m);
            }
        }
        Request::Balance { number } | Request::Lookup { number } => put_str8(dst, number.expose()),
        Request::Redeem { idem, number, money, allow_partial, invoice, pin } => {
            put_idem(dst, idem, number);
            put_money(dst, money);
            dst.put_u8(*allow_partial as u8);
            put_str8(dst, invoice.as_deref().unwrap_or(""));
            put_str8(dst, pin.as_ref().map_or("", |p| p.expose()));
        }
        Request::Reload { idem, number, money } => {
            put_idem(dst, idem, number);
            put_money(dst, money);
        }
        Request::Lock { idem, number, reason } => {
            put_idem(dst, idem, number);
            dst.put_u8(*reason as u8);
        }
        Request::Unlock { idem, number } => put_idem(dst, idem, number),
        Request::History { number, before_seq, limit, kind } => {
            put_str8(dst, number.expose());
            dst.put_u64_le(*before_seq);
            dst.put_u16_le(*limit);
            dst.put_u8(kind.map_or(0, |k| k as u8));
        }
        Request::Authorize { idem, number, money, allow_partial, ttl_secs, pin } => {
            put_idem(dst, idem, number);
            put_money(dst, money);
            dst.put_u8(*allow_partial as u8);
            dst.put_u32_le(*ttl_secs);
            put_str8(dst, pin.as_ref().map_or("", |p| p.expose()));
        }
        Request::Capture { idem, hold_id, money } => {
            put_str8(dst, &idem.merchant);
            put_str8(dst, &idem.key);
            dst.put_u64_le(*hold_id);
            put_money(dst, money);
        }
        Request::Void { idem, hold_id } => {
            put_str8(dst, &idem.merchant);
            put_str8(dst, &idem.key);
            dst.put_u64_le(*hold_id);
        }
        Request::Refund { idem, number, money, original } => {
            put_idem(dst, idem, number);
            put_money(dst, money);
            put_str8(dst, original.as_deref().unwrap_or(""));
        }
        Request::Reverse { idem, original } => {
            put_str8(dst, &idem.merchant);
            put_str8(dst, &idem.key);
            put_str8(dst, original);
        }
        Request::SplitRedeem { idem, money, order, numbers } => {
            put_str8(dst, &idem.merchant);
            put_str8(dst, &idem.key);
            put_money(dst, money);
            dst.put_u8(*order as u8);
            dst.put_u8(numbers.len() as u8);
            for n in numbers {
                put_str8(dst, n.expose());
            }
        }
        Request::CashOut { idem, number } => put_idem(dst, idem, number),
        Request::Register { idem, number, member, vip } => {
            put_idem(dst, idem, number);
            put_str8(dst, member.as_deref().unwrap_or(""));
            dst.put_u8(*vip as u8);
        }
        Request::Transfer { idem, number, to } => {
            put_idem(dst, idem, number);
            put_str8(dst, to.expose());
        }
        Request::Note { idem, number, text } => {
            put_idem(dst, idem, number);
            put_str16(dst, text);
        }
        Request::Reactivate { idem, number } | Request::PinReset { idem, number } => put_idem(dst, idem, number),
        Request::PinSet { idem, number, pin } | Request::PinVerify { idem, number, pin } => {
            put_idem(dst, idem, number);
            put_str8(dst, pin.expose());
        }
        Request::ProgramGet { name } => put_str8(dst, name),
        Request::Batch { mode, items } => {
            dst.put_u8(match mode {
                BatchMode::Items => 0,
                BatchMode::AllOrNothing(_) => 1,
                BatchMode::Each(_) => 2,
            });
            if let Some(idem) = mode.key() {
                put_str8(dst, &idem.merchant);
                put_str8(dst, &idem.key);
            }
            dst.put_u16_le(items.len() as u16);
            for i in items {
                dst.put_u8(i.opcode);
                dst.put_u16_le(i.body.len() as u16);
                dst.put_slice(&i.body);
            }
        }
        Request::JobOpen { idem, kind, count, chunk_cards } => {
            put_str8(dst, &idem.merchant);
            put_str8(dst, &idem.key);
            dst.put_u8(*kind as u8);
            dst.put_u32_le(*count);
            dst.put_u16_le(*chunk_cards);
        }
        Request::JobChunk { merchant, job, first, work, numbers } => {
            put_str8(dst, merchant);
            put_str8(dst, job);
            dst.put_u32_le(*first);
            match work {
                ChunkWork::Issue { program, money, expiry_ms } => {
                    dst.put_u8(1);
                    put_str8(dst, program);
                    put_money(dst, money);
                    put_opt_i64(dst, *expiry_ms);
                }
                ChunkWork::Activate { load } => {
                    dst.put_u8(2);
                    dst.put_u8(load.is_some() as u8);
                    if let Some(m) = load {
                        put_money(dst, m);
                    }
                }
                ChunkWork::Reverse => dst.put_u8(3),
            }
            dst.put_u16_le(numbers.len() as u16);
            for n in numbers {
                put_str8(dst, n.expose());
            }
        }
        Request::JobGet { merchant, job } => {
            put_str8(dst, merchant);
            put_str8(dst, job);
        }
        Request::Subscribe { from, merchant, program, kinds } => {
            dst.put_u64_le(*from);
            put_str8(dst, merchant);
            put_str8(dst, program);
            dst.put_u64_le(*kinds);
        }
        Request::ProgramSet { idem, name, settings } => {
            put_str8(dst, &idem.merchant);
            put_str8(dst, &idem.key);
            put_str8(dst, name);
            put_str16(dst, settings);
        }
    }
}

/// Encodes a whole request frame.
pub fn encode_request(dst: &mut BytesMut, request_id: u64, req: &Request) {
    let at = begin_frame(dst, req.opcode() as u8, request_id);
    encode_request_body(dst, req);
    finish_frame(dst, at);
}

fn put_view(dst: &mut BytesMut, v: &Option<CardView>) {
    let Some(v) = v else {
        dst.put_u8(0);
        return;
    };
    dst.put_u8(1);
    dst.put_slice(&v.last4);
    dst.put_u8(v.status as u8);
    dst.put_u8(v.reason as u8);
    dst.put_slice(&v.currency.code());
    dst.put_i64_le(v.balance_minor);
    dst.put_i64_le(v.held_minor);
    put_opt_i64(dst, v.expiry_ms);
}

fn put_txns(dst: &mut BytesMut, txns: &[TxnView]) {
    dst.put_u16_le(txns.len() as u16);
    for t in txns {
        dst.put_u64_le(t.seq);
        dst.put_u8(t.kind as u8);
        dst.put_i64_le(t.amount_minor);
        dst.put_i64_le(t.balance_after_minor);
        dst.put_i64_le(t.at_ms);
        put_str8(dst, &t.merchant);
    }
}

/// Encodes a reply body (no header).
pub fn encode_reply_body(dst: &mut BytesMut, reply: &Reply) {
    match reply {
        Reply::Error(code) => dst.put_u16_le(*code as u16),
        Reply::Hello(h) => {
            dst.put_u16_le(h.result as u16);
            dst.put_u8(h.version);
            dst.put_u32_le(h.frame_bytes_max);
            dst.put_u32_le(h.inflight_max);
            put_str8(dst, &h.server);
            dst.put_slice(&h.nonce);
        }
        Reply::Auth(a) => {
            dst.put_u16_le(a.result as u16);
            dst.put_u8(a.role as u8);
            put_str8(dst, &a.merchant);
        }
        Reply::Card(o) => {
            dst.put_u16_le(o.result as u16);
            dst.put_i64_le(o.approved_minor);
            put_view(dst, &o.card);
        }
        Reply::Hold(o) => {
            dst.put_u16_le(o.result as u16);
            dst.put_i64_le(o.approved_minor);
            put_view(dst, &o.card);
            let h = o.hold.unwrap_or(HoldView { id: 0, amount_minor: 0, expires_ms: 0 });
            dst.put_u8(o.hold.is_some() as u8);
            dst.put_u64_le(h.id);
            dst.put_i64_le(h.amount_minor);
            dst.put_i64_le(h.expires_ms);
        }
        Reply::Explained(o, reason) => {
            dst.put_u16_le(o.result as u16);
            dst.put_i64_le(o.approved_minor);
            put_view(dst, &o.card);
            put_str16(dst, reason);
        }
        Reply::Issued(o, number) => {
            dst.put_u16_le(o.result as u16);
            dst.put_i64_le(o.approved_minor);
            put_view(dst, &o.card);
            put_str8(dst, number.as_ref().map_or("", |n| n.expose()));
        }
        Reply::Program(p) => {
            dst.put_u16_le(p.result as u16);
            put_str8(dst, &p.name);
            put_str16(dst, &p.text);
        }
        Reply::Batch(items) => {
            dst.put_u16_le(ResultCode::Approved as u16);
            dst.put_u16_le(items.len() as u16);
            for (opcode, reply) in items {
                dst.put_u8(*opcode);
                let at = dst.len();
                dst.put_u16_le(0);
                encode_reply_body(dst, reply);
                let len = (dst.len() - at - 2) as u16;
                dst[at..at + 2].copy_from_slice(&len.to_le_bytes());
            }
        }
        Reply::Job(j) => {
            dst.put_u16_le(j.result as u16);
            dst.put_u8(j.kind.map_or(0, |k| k as u8));
            dst.put_u32_le(j.count);
            dst.put_u16_le(j.chunk_cards);
        }
        Reply::Events(e) => {
            dst.put_u16_le(e.result as u16);
            dst.put_u8(e.caught_up as u8);
            dst.put_u16_le(e.events.len() as u16);
            for ev in &e.events {
                match ev {
                    EventView::Txn {
                        id,
                        kind,
                        last4,
                        program,
                        merchant,
                        currency,
                        amount_minor,
                        balance_after_minor,
                        at_ms,
                        email,
                    } => {
                        dst.put_u64_le(*id);
                        dst.put_u8(1);
                        dst.put_u8(*kind as u8);
                        dst.put_slice(last4);
                        put_str8(dst, program);
                        put_str8(dst, merchant);
                        dst.put_slice(&currency.code());
                        dst.put_i64_le(*amount_minor);
                        dst.put_i64_le(*balance_after_minor);
                        dst.put_i64_le(*at_ms);
                        put_str8(dst, email);
                    }
                    EventView::Alert {
                        id,
                        rule,
                        last4,
                        merchant,
                        client,
                        currency,
                        observed,
                        threshold,
                        suspended,
                        at_ms,
                    } => {
                        dst.put_u64_le(*id);
                        dst.put_u8(2);
                        dst.put_u8(*rule);
                        dst.put_slice(last4);
                        put_str8(dst, merchant);
                        dst.put_slice(&currency.map_or([0; 3], |c| c.code()));
                        dst.put_i64_le(*observed);
                        dst.put_i64_le(*threshold);
                        dst.put_u8(*suspended as u8);
                        dst.put_i64_le(*at_ms);
                        put_str8(dst, client);
                    }
                }
            }
        }
        Reply::Chunk(c) => {
            dst.put_u16_le(c.result as u16);
            dst.put_u16_le(c.items.len() as u16);
            for (code, changed) in &c.items {
                dst.put_u16_le(*code as u16);
                dst.put_u8(*changed as u8);
            }
        }
        Reply::Parts(p) => {
            dst.put_u16_le(p.result as u16);
            dst.put_i64_le(p.approved_minor);
            match &p.parts {
                None => {
                    dst.put_u8(0);
                    dst.put_slice(&[0; 3]);
                    dst.put_u8(0);
                }
                Some(parts) => {
                    dst.put_u8(1);
                    dst.put_slice(&parts.currency.code());
                    dst.put_u8(parts.items.len() as u8);
                    for i in &parts.items {
                        dst.put_slice(&i.last4);
                        dst.put_i64_le(i.amount_minor);
                        dst.put_i64_le(i.balance_after_minor);
                    }
                }
            }
        }
        Reply::Lookup(l) => {
            dst.put_u16_le(l.result as u16);
            put_view(dst, &l.card);
            put_str8(dst, &l.program);
            dst.put_i64_le(l.created_ms);
            dst.put_i64_le(l.updated_ms);
            dst.put_u64_le(l.txn_count);
            put_txns(dst, &l.recent);
            dst.put_u8(l.holds.len() as u8);
            for h in &l.holds {
                dst.put_u64_le(h.id);
                dst.put_i64_le(h.amount_minor);
                dst.put_i64_le(h.expires_ms);
            }
            dst.put_u8(l.vip as u8);
            put_str8(dst, &l.member);
            dst.put_u8(l.notes.len() as u8);
            for n in &l.notes {
                dst.put_i64_le(n.at_ms);
                put_str8(dst, &n.author);
                put_str16(dst, &n.text);
            }
            dst.put_u8(l.pin_set as u8);
            dst.put_u8(l.pin_failures);
            dst.put_u8(l.virtual_card as u8);
            put_str8(dst, &l.email);
        }
        Reply::History(h) => {
            dst.put_u16_le(h.result as u16);
            dst.put_u8(h.currency.is_some() as u8);
            dst.put_slice(&h.currency.map(|c| c.code()).unwrap_or([0; 3]));
            put_txns(dst, &h.txns);
            dst.put_u64_le(h.next_before_seq);
        }
    }
}

/// Encodes a whole reply frame for a request with `opcode` and `request_id`.
pub fn encode_reply(dst: &mut BytesMut, opcode: u8, request_id: u64, reply: &Reply) {
    let at = begin_frame(dst, opcode | REPLY_BIT, request_id);
    encode_reply_body(dst, reply);
    finish_frame(dst, at);
}

/// Decodes a reply body; `opcode` is the reply frame's opcode (with the reply bit).
pub fn decode_reply(opcode: u8, body: &[u8]) -> Result<Reply, DecodeError> {
    // A bare result code is a request error, whatever the opcode: this also reads the server's
    // answer to an opcode this client does not know, and the connection-level error frame (0x80).
    if opcode & REPLY_BIT != 0 && body.len() == 2 {
        let mut r = Reader { buf: body };
        return Ok(Reply::Error(r.result()?));
    }
    let op = Opcode::from_u8(opcode & !REPLY_BIT)
        .filter(|_| opcode & REPLY_BIT != 0)
        .ok_or(DecodeError(ResultCode::UnknownOpcode))?;
    let mut r = Reader { buf: body };
    let result = r.result()?;
    if r.buf.is_empty() {
        return Ok(Reply::Error(result));
    }
    let reply = match op {
        Opcode::Hello => Reply::Hello(HelloReply {
            result,
            version: r.u8()?,
            frame_bytes_max: u32::from_le_bytes(r.take(4)?.try_into().map_err(|_| MALFORMED)?),
            inflight_max: u32::from_le_bytes(r.take(4)?.try_into().map_err(|_| MALFORMED)?),
            server: r.str8(STRING_BYTES_MAX)?,
            nonce: r.take(AUTH_NONCE_BYTES)?.try_into().map_err(|_| MALFORMED)?,
        }),
        Opcode::Auth => Reply::Auth(AuthReply {
            result,
            role: Role::from_u8(r.u8()?).ok_or(MALFORMED)?,
            merchant: r.str8(STRING_BYTES_MAX)?,
        }),
        Opcode::Lookup => Reply::Lookup(LookupReply {
            result,
            card: r.view()?,
            program: r.str8(PROGRAM_BYTES_MAX)?,
            created_ms: r.i64()?,
            updated_ms: r.i64()?,
            txn_count: r.u64()?,
            recent: r.txns()?,
            holds: {
                let n = r.u8()? as usize;
                let mut holds = Vec::with_capacity(n.min(crate::engine::card::HOLDS_PER_CARD_MAX));
                for _ in 0..n {
                    holds.push(HoldView { id: r.u64()?, amount_minor: r.i64()?, expires_ms: r.i64()? });
                }
                holds
            },
            vip: r.bool()?,
            member: r.str8(STRING_BYTES_MAX)?,
            notes: {
                let n = r.u8()? as usize;
                let mut notes = Vec::with_capacity(n.min(LOOKUP_NOTES_MAX));
                for _ in 0..n {
                    notes.push(NoteView {
                        at_ms: r.i64()?,
                        author: r.str8(STRING_BYTES_MAX)?,
                        text: r.str16(NOTE_BYTES_MAX)?,
                    });
                }
                notes
            },
            pin_set: r.bool()?,
            pin_failures: r.u8()?,
            virtual_card: r.bool()?,
            email: r.str8(EMAIL_BYTES_MAX)?,
        }),
        Opcode::History => {
            let has = r.bool()?;
            let code = r.take(3)?;
            let currency =
                if has { Some(Currency::from_code([code[0], code[1], code[2]]).ok_or(MALFORMED)?) } else { None };
            Reply::History(HistoryReply { result, currency, txns: r.txns()?, next_before_seq: r.u64()? })
        }
        Opcode::Authorize => {
            Reply::Hold(Outcome { result, approved_minor: r.i64()?, card: r.view()?, hold: r.hold()? })
        }
        Opcode::Reactivate => {
            let outcome = Outcome { result, approved_minor: r.i64()?, card: r.view()?, hold: None };
            Reply::Explained(outcome, r.str16(REASON_BYTES_MAX)?)
        }
        Opcode::Issue => {
            let outcome = Outcome { result, approved_minor: r.i64()?, card: r.view()?, hold: None };
            Reply::Issued(outcome, r.number_or_none()?)
        }
        Opcode::Batch => {
            let n = r.u16()? as usize;
            let mut items = Vec::with_capacity(n.min(r.buf.len() / 5));
            for _ in 0..n {
                let opcode = r.u8()?;
                let len = r.u16()? as usize;
                let body = r.take(len)?;
                // An item is never itself a batch (only refused as one, with a code-only reply),
                // so this recursion is one level deep.
                if opcode & !REPLY_BIT == Opcode::Batch as u8 && body.len() != 2 {
                    return Err(MALFORMED);
                }
                items.push((opcode, decode_reply(opcode, body)?));
            }
            Reply::Batch(items)
        }
        Opcode::JobOpen | Opcode::JobGet => {
            let kind = match r.u8()? {
                0 => None,
                k => Some(JobKind::from_u8(k).ok_or(MALFORMED)?),
            };
            Reply::Job(JobReply { result, kind, count: r.u32()?, chunk_cards: r.u16()? })
        }
        Opcode::Subscribe => {
            let caught_up = r.bool()?;
            let n = r.u16()? as usize;
            if n > EVENTS_PER_FRAME_MAX {
                return Err(MALFORMED);
            }
            let mut events = Vec::with_capacity(n);
            for _ in 0..n {
                let id = r.u64()?;
                let last4 = |r: &mut Reader| -> Res<[u8; 4]> { r.take(4)?.try_into().map_err(|_| MALFORMED) };
                events.push(match r.u8()? {
                    1 => EventView::Txn {
                        id,
                        kind: TxnKind::from_u8(r.u8()?).ok_or(MALFORMED)?,
                        last4: last4(&mut r)?,
                        program: r.str8(PROGRAM_BYTES_MAX)?,
                        merchant: r.str8(STRING_BYTES_MAX)?,
                        currency: r.currency()?,
                        amount_minor: r.i64()?,
                        balance_after_minor: r.i64()?,
                        at_ms: r.i64()?,
                        email: r.str8(EMAIL_BYTES_MAX)?,
                    },
                    2 => EventView::Alert {
                        id,
                        rule: r.u8()?,
                        last4: last4(&mut r)?,
                        merchant: r.str8(STRING_BYTES_MAX)?,
                        currency: {
                            let code: [u8; 3] = r.take(3)?.try_into().map_err(|_| MALFORMED)?;
                            if code == [0; 3] {
                                None
                            } else {
                                Some(Currency::from_code(code).ok_or(MALFORMED)?)
                            }
                        },
                        observed: r.i64()?,
                        threshold: r.i64()?,
                        suspended: r.bool()?,
                        at_ms: r.i64()?,
                        client: r.str8(STRING_BYTES_MAX)?,
                    },
                    _ => return Err(MALFORMED),
                });
            }
            Reply::Events(EventsReply { result, caught_up, events })
        }
        Opcode::JobChunk => {
            let n = r.u16()? as usize;
            if n > JOB_CHUNK_CARDS_MAX as usize {
                return Err(MALFORMED);
            }
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push((r.result()?, r.bool()?));
            }
            Reply::Chunk(ChunkReply { result, items })
        }
        Opcode::ProgramGet | Opcode::ProgramSet => Reply::Program(ProgramReply {
            result,
            name: r.str8(PROGRAM_BYTES_MAX)?,
            text: r.text16(PROGRAM_SETTINGS_BYTES_MAX)?,
        }),
        Opcode::Reverse | Opcode::SplitRedeem | Opcode::Transfer => {
            let approved_minor = r.i64()?;
            let present = r.bool()?;
            let code = r.take(3)?;
            let n = r.u8()? as usize;
            let parts = if present {
                let currency = Currency::from_code([code[0], code[1], code[2]]).ok_or(MALFORMED)?;
                let mut items = Vec::with_capacity(n.min(SPLIT_CARDS_MAX));
                for _ in 0..n {
                    let l = r.take(4)?;
                    items.push(PartView {
                        last4: [l[0], l[1], l[2], l[3]],
                        amount_minor: r.i64()?,
                        balance_after_minor: r.i64()?,
                    });
                }
                Some(Parts { currency, items })
            } else {
                if n != 0 || code != [0; 3] {
                    return Err(MALFORMED);
                }
                None
            };
            Reply::Parts(PartsReply { result, approved_minor, parts })
        }
        _ => Reply::Card(Outcome { result, approved_minor: r.i64()?, card: r.view()?, hold: None }),
    };
    r.end()?;
    Ok(reply)
}
