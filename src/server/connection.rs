//! One client connection, one task. It reads and decides requests, queues each reply with the
//! commit group it depends on, and writes replies in request order once their group is durable,
//! batching whatever is ready into one write. The queue holds at most `inflight_per_connection_max`
//! replies: when it is full the task stops reading, and TCP pushes back on the client.

use super::access::{Gate, Scope};
use super::{now_ms, Shared};
use crate::card_number::{CardKey, CardNumber};
use crate::config::ProgramConfig;
use crate::engine::{
    CardRecord, ChunkCard, ChunkKind, ChunkWork, IssueNumber, JobSpec, Journal, LookedUp, Mutation, Op, Program,
};
use crate::model::{NoteView, ResultCode, TxnKind, TxnView};
use crate::wire::{
    self, decode_request, encode_reply, AuthReply, ChunkReply, DecodeError, Frame, FrameCodec, FrameError, HelloReply,
    HistoryReply, JobKind, JobReply, LookupReply, Opcode, PartsReply, ProgramReply, Reply, Request, HISTORY_PAGE_MAX,
};
use bytes::BytesMut;
use futures_util::StreamExt;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

/// Entries a lookup shows.
const LOOKUP_RECENT_TXNS: usize = 10;
const READ_BUFFER_BYTES: usize = 16 * 1024;

/// A decided request whose reply waits for `group` to be durable.
struct Pending {
    request_id: u64,
    /// The request's opcode byte (0 for a connection-level error).
    opcode: u8,
    /// None for an unknown opcode or a frame that could not be read: counted as op `unknown`.
    op: Option<Opcode>,
    group: u64,
    reply: Reply,
    started: Instant,
}

pub(super) async fn run(sock: TcpStream, peer: SocketAddr, shared: Arc<Shared>, shutdown: CancellationToken) {
    let _ = sock.set_nodelay(true);
    let (rd, mut wr) = sock.into_split();
    let codec = FrameCodec::with_batch_max(shared.limits.frame_bytes_max, shared.limits.batch_frame_bytes_max);
    let mut frames = FramedRead::with_capacity(rd, codec, READ_BUFFER_BYTES);
    let mut durable = shared.store.durable();
    let inflight_max = shared.limits.inflight_per_connection_max;
    let mut queue: VecDeque<Pending> = VecDeque::with_capacity(inflight_max.min(1024));
    let mut out = BytesMut::with_capacity(READ_BUFFER_BYTES);
    let idle = std::time::Duration::from_secs(shared.limits.idle_timeout_secs);
    // The idle timer is re-armed only when it fires, from the time of the last frame, so that
    // reading a frame costs no timer update.
    let mut last_frame_at = tokio::time::Instant::now();
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    let mut handshaken = false;
    // Who this connection is (until it authenticates: nobody, when clients are configured).
    let mut gate = Gate::new(&shared.access);
    // Until it authenticates, a connection may stay this long: it holds a connection slot.
    let auth_deadline = tokio::time::sleep(std::time::Duration::from_millis(shared.limits.auth_timeout_ms));
    tokio::pin!(auth_deadline);
    // Set when the connection must end: replies already queued are still written first.
    let mut closing = false;
    let mut in_flight = InFlight { gauge: &shared.metrics.requests_in_flight, counted: 0 };
    // Set by a `subscribe`: once the replies before it are written, the connection streams events.
    let mut subscription: Option<(u64, Request)> = None;
    loop {
        let durable_group = *durable.borrow_and_update();
        while queue.front().is_some_and(|p| p.group <= durable_group) {
            let p = queue.pop_front().expect("front exists");
            encode_reply(&mut out, p.opcode, p.request_id, &p.reply);
            shared.metrics.request(p.op, p.reply.result(), p.started.elapsed());
        }
        // Before the write: a client that has its reply must never find it still counted.
        in_flight.set(queue.len());
        // While more whole frames are already buffered, decide them first and write once after.
        let more_buffered = !closing && frame_buffered(frames.read_buffer()) && queue.len() < inflight_max;
        if !out.is_empty() && !more_buffered {
            if wr.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if closing && queue.is_empty() {
            break;
        }
        let can_read = !closing && queue.len() < inflight_max;
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if !closing => closing = true,
            // Before reading: a client that always has a frame ready must not outrun its deadline.
            _ = &mut auth_deadline, if !closing && gate.principal().is_none() => {
                tracing::info!(%peer, "not authenticated in time; closing");
                closing = true;
            }
            changed = durable.changed(), if !queue.is_empty() => {
                if changed.is_err() {
                    return;
                }
            }
            next = frames.next(), if can_read => match next {
                None => closing = true,
                Some(Ok(frame)) if handshaken && frame.header.opcode == Opcode::Subscribe as u8 => {
                    match admit_subscription(&shared, &gate, &frame.body) {
                        Ok(req) => {
                            subscription = Some((frame.header.request_id, req));
                            closing = true;
                        }
                        Err(code) => queue.push_back(Pending {
                            opcode: frame.header.opcode,
                            request_id: frame.header.request_id,
                            reply: Reply::Error(code),
                            group: 0,
                            op: Some(Opcode::Subscribe),
                            started: Instant::now(),
                        }),
                    }
                }
                Some(Ok(frame)) => {
                    last_frame_at = tokio::time::Instant::now();
                    let (pending, close) = decide(&shared, frame, &mut handshaken, &mut gate, peer).await;
                    queue.push_back(pending);
                    closing |= close;
                }
                Some(Err(e)) => {
                    closing = true;
                    // The stream cannot be resynchronised: say why, then close this connection only.
                    let code = match &e {
                        FrameError::TooLarge { .. } => ResultCode::FrameTooLarge,
                        FrameError::Version(_) => ResultCode::UnsupportedVersion,
                        FrameError::Io(_) => continue,
                        _ => ResultCode::MalformedFrame,
                    };
                    shared.metrics.protocol_errors.inc();
                    tracing::info!(%peer, error = %e, "corrupt stream; closing connection");
                    queue.push_back(connection_error(code));
                }
            },
            _ = &mut idle_timer, if can_read => {
                if last_frame_at.elapsed() >= idle && queue.is_empty() {
                    tracing::debug!(%peer, "idle timeout; closing");
                    closing = true;
                } else {
                    idle_timer.as_mut().reset(last_frame_at + idle);
                }
            }
        }
    }
    drop(in_flight);
    if let Some((request_id, req)) = subscription {
        return super::events::serve(wr, frames, shared.clone(), request_id, req, shutdown).await;
    }
    let _ = wr.shutdown().await;
}

/// Counts the unknown cards a reply answered (`card_not_found`, of a request or of batch items)
/// for the enumeration rule, by client: its configured name, or its IP address when giftd lists
/// no clients (every connection is then the same anonymous operator). The alert names the
/// client's own merchant id, if it has one: the ids in its requests are its own choice. Returns the
/// group of the alert that fired, which the reply waits for (0 if none).
fn screen_unknown_cards(shared: &Shared, gate: &Gate, peer: SocketAddr, reply: &Reply) -> u64 {
    let unknown = match reply {
        Reply::Batch(items) => items.iter().filter(|(_, r)| r.result() == ResultCode::CardNotFound).count(),
        r => usize::from(r.result() == ResultCode::CardNotFound),
    };
    if unknown == 0 || !shared.engine.counts_unknown_cards() {
        return 0;
    }
    let principal = gate.principal();
    let client = match principal.map(|p| p.name.as_str()).filter(|n| !n.is_empty()) {
        Some(name) => name.to_string(),
        None => address_of(peer.ip()),
    };
    let merchant = principal.and_then(|p| p.merchant.as_deref()).unwrap_or("");
    match shared.engine.unknown_cards(&client, merchant, unknown.min(u32::MAX as usize) as u32, now_ms()) {
        Some((alert, group)) => {
            report_alert(shared, &alert);
            group
        }
        None => 0,
    }
}

/// An anonymous client as the enumeration rule counts it: an IPv4 address, or an IPv6 address's
/// /64 prefix (a host is usually given a whole /64, and could otherwise change address at will).
fn address_of(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        ip => ip.to_canonical().to_string(),
    }
}

/// Counts a replay, and logs and counts each security alert the decision fired.
fn report(shared: &Shared, done: &crate::engine::Executed) {
    if done.replayed {
        shared.metrics.idempotent_replays.inc();
    }
    for a in &done.alerts {
        report_alert(shared, a);
    }
}

/// Logs and counts a security alert. The card appears by its last 4 digits only.
fn report_alert(shared: &Shared, a: &crate::engine::alerts::AlertRecord) {
    shared.metrics.alert(a.rule);
    tracing::warn!(
        rule = a.rule.name(),
        card = %format!("****{}", String::from_utf8_lossy(&a.last4)),
        merchant = %a.merchant,
        client = %a.client,
        observed = a.observed,
        threshold = a.threshold,
        currency = a.currency.as_ref().map_or("", |c| c.as_str()),
        suspended = a.suspended,
        "security alert"
    );
}

/// Keeps `giftd_requests_in_flight` equal to the sum of every connection's queued replies, even
/// when a connection ends with replies still queued (its write failed).
struct InFlight<'a> {
    gauge: &'a prometheus::IntGauge,
    counted: i64,
}

impl InFlight<'_> {
    fn set(&mut self, queued: usize) {
        let queued = queued as i64;
        if queued != self.counted {
            self.gauge.add(queued - self.counted);
            self.counted = queued;
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.gauge.sub(self.counted);
    }
}

/// Whether `buf` already holds a whole frame (judged by its length prefix alone).
fn frame_buffered(buf: &BytesMut) -> bool {
    buf.len() >= 4 && buf.len() >= 4 + u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
}

/// Decides one frame. Returns its pending reply and whether the connection must close after it.
async fn decide(
    shared: &Arc<Shared>,
    frame: Frame,
    handshaken: &mut bool,
    gate: &mut Gate,
    peer: SocketAddr,
) -> (Pending, bool) {
    let started = Instant::now();
    let opcode = frame.header.opcode;
    let request_id = frame.header.request_id;
    let op = Opcode::from_u8(opcode);
    // Until the handshake, anything but a hello ends the connection, before its body is read.
    let decoded = if !*handshaken && op != Some(Opcode::Hello) {
        Err(DecodeError(ResultCode::HandshakeRequired))
    } else {
        decode_as(gate, opcode, &frame.body)
    };
    let (reply, group, close) = match decoded {
        Err(DecodeError(code)) => (Reply::Error(code), 0, !*handshaken),
        Ok(Request::Hello { min_version, max_version, .. }) => {
            let ok = (min_version..=max_version).contains(&wire::VERSION);
            *handshaken |= ok;
            let reply = if ok { hello_reply(shared, gate) } else { Reply::Error(ResultCode::UnsupportedVersion) };
            (reply, 0, !ok)
        }
        Ok(Request::Auth { client, proof }) => match gate.authenticate(&shared.access, &client, &proof) {
            Some(p) => {
                let merchant = p.merchant.clone().unwrap_or_default();
                tracing::debug!(%peer, client = %client, role = p.role.name(), "authenticated");
                (Reply::Auth(AuthReply { result: ResultCode::Approved, role: p.role, merchant }), 0, false)
            }
            None => {
                shared.metrics.auth_failures.inc();
                tracing::warn!(%peer, client = %client, "auth refused (unknown client or wrong proof); closing");
                (Reply::Error(ResultCode::Unauthenticated), 0, true)
            }
        },
        Ok(req) => match admit(shared, gate, cost(&req)) {
            Err(code) => (Reply::Error(code), 0, false),
            Ok(()) => {
                if !matches!(req, Request::JobOpen { .. } | Request::JobChunk { .. } | Request::JobGet { .. }) {
                    shared.bulk.pace().payment(started);
                }
                let (reply, group) = match req {
                    Request::Batch { mode: wire::BatchMode::Items, items } => batch(shared, gate, items).await,
                    Request::Batch { mode: wire::BatchMode::AllOrNothing(idem), items } => {
                        keyed_batch(shared, gate, &frame.body, idem, true, &items)
                    }
                    Request::Batch { mode: wire::BatchMode::Each(idem), items } => {
                        keyed_batch(shared, gate, &frame.body, idem, false, &items)
                    }
                    req @ Request::JobChunk { .. } => job_chunk(shared, opcode, frame.body, req).await,
                    req => handle(shared, opcode, &frame.body, req, None).await,
                };
                let group = group.max(screen_unknown_cards(shared, gate, peer, &reply));
                (reply, group, false)
            }
        },
    };
    // A refused auth closes the connection too, but it is counted as an auth failure.
    if close && reply.result() != ResultCode::Unauthenticated {
        shared.metrics.protocol_errors.inc();
    }
    (Pending { request_id, opcode, op, group, reply, started }, close)
}

/// A request (or batch item) as this connection's client may make it: its role is judged from the
/// opcode before the body is read, then the merchant id the request names.
fn decode_as(gate: &Gate, opcode: u8, body: &[u8]) -> Result<Request, DecodeError> {
    if let Some(code) = Opcode::from_u8(opcode).and_then(|op| gate.refuse_op(op)) {
        return Err(DecodeError(code));
    }
    let req = decode_request(opcode, body)?;
    match gate.refuse_request(&req) {
        Some(code) => Err(DecodeError(code)),
        None => Ok(req),
    }
}

/// Requests a frame counts against the rates: a batch's items, else one.
fn cost(req: &Request) -> usize {
    match req {
        Request::Batch { items, .. } => items.len(),
        _ => 1,
    }
}

/// Takes `cost` requests from the connection's and its client's rates, counting a refusal.
fn admit(shared: &Shared, gate: &Gate, cost: usize) -> Result<(), ResultCode> {
    gate.admit(cost).map_err(|scope| {
        match scope {
            Scope::Client => shared.metrics.rate_limited_client.inc_by(cost as u64),
            Scope::Connection => shared.metrics.rate_limited_connection.inc_by(cost as u64),
        }
        ResultCode::RateLimited
    })
}

/// A subscription request as the connection's client may make it: its role must allow the event
/// stream, and a client bound to a merchant sees that merchant's events only (an empty filter
/// becomes its own merchant; another merchant's is `forbidden`).
fn admit_subscription(shared: &Shared, gate: &Gate, body: &[u8]) -> Result<Request, ResultCode> {
    if let Some(code) = gate.refuse_op(Opcode::Subscribe) {
        return Err(code);
    }
    let Request::Subscribe { from, merchant, program, kinds } =
        decode_request(Opcode::Subscribe as u8, body).map_err(|e| e.0)?
    else {
        unreachable!("a subscribe body decodes to a subscribe")
    };
    let merchant =
        gate.principal().and_then(|p| p.subscription_merchant(&merchant)).ok_or(ResultCode::Forbidden)?.to_string();
    admit(shared, gate, 1)?;
    Ok(Request::Subscribe { from, merchant, program, kinds })
}

fn connection_error(code: ResultCode) -> Pending {
    Pending { request_id: 0, opcode: 0, op: None, group: 0, reply: Reply::Error(code), started: Instant::now() }
}

fn hello_reply(shared: &Shared, gate: &Gate) -> Reply {
    Reply::Hello(HelloReply {
        result: ResultCode::Approved,
        version: wire::VERSION,
        frame_bytes_max: shared.limits.frame_bytes_max as u32,
        inflight_max: shared.limits.inflight_per_connection_max as u32,
        server: concat!("giftd ", env!("CARGO_PKG_VERSION")).into(),
        nonce: gate.nonce,
    })
}

/// Decides every item of a batch, in order, each on its own (one refused item changes nothing for
/// the others). The reply waits for the newest group any item depends on. The items' decisions
/// are handed to the committer a slice at a time (`Store::write_batched`), so a batch of
/// thousands is written in a few large groups and costs a few fsyncs.
async fn batch(shared: &Shared, gate: &Gate, items: Vec<wire::BatchItem>) -> (Reply, u64) {
    /// Batch items decided between two wakes of the committer: large enough that it writes few
    /// groups, small enough that it writes while the rest is decided.
    const ITEMS_PER_WRITE: usize = 1024;
    /// Wakes the committer however the batch ends, also if its task is dropped midway.
    struct WriteOnDrop<'a>(&'a crate::store::Store);
    impl Drop for WriteOnDrop<'_> {
        fn drop(&mut self) {
            self.0.write_batched();
        }
    }
    let _write = WriteOnDrop(&shared.store);
    // Every item is read first, so that their keys are looked up in the store in one read.
    let decoded: Vec<Result<Request, ResultCode>> = items
        .iter()
        .map(|item| match Opcode::from_u8(item.opcode) {
            None => Err(ResultCode::UnknownOpcode),
            Some(op) if !op.batchable() => Err(ResultCode::MalformedRequest),
            Some(_) => decode_as(gate, item.opcode, &item.body).map_err(|DecodeError(code)| code),
        })
        .collect();
    let keys = decoded
        .iter()
        .filter_map(|r| r.as_ref().ok()?.idem())
        .map(|idem| crate::engine::IdemKey::new(&idem.merchant, &idem.key))
        .collect();
    let mut looked_up = shared.engine.look_up(keys).into_iter();
    let mut replies = Vec::with_capacity(items.len());
    let mut group = 0;
    for (i, (item, req)) in items.iter().zip(decoded).enumerate() {
        if i % ITEMS_PER_WRITE == ITEMS_PER_WRITE - 1 {
            shared.store.write_batched();
        }
        let reply = match req {
            Err(code) => Reply::Error(code),
            Ok(req) => {
                let looked = if req.idem().is_some() { looked_up.next() } else { None };
                let (reply, g) = handle(shared, item.opcode, &item.body, req, Some(looked)).await;
                group = group.max(g);
                reply
            }
        };
        replies.push((item.opcode | wire::REPLY_BIT, reply));
    }
    (Reply::Batch(replies), group)
}

/// A chunk of a bulk job, keyed and decided on the bulk thread (see `background`), so that its
/// thousands of cards take the CPU payments leave, not a tokio worker.
async fn job_chunk(shared: &Arc<Shared>, opcode: u8, body: bytes::Bytes, req: Request) -> (Reply, u64) {
    let Request::JobChunk { merchant, job, first, work, numbers } = req else {
        unreachable!("job_chunk() is called for a job chunk")
    };
    let s = shared.clone();
    let decide = move || {
        let reversal = work == ChunkWork::Reverse;
        let cards = numbers
            .iter()
            .map(|n| ChunkCard { key: s.keyer.card_key(n), last4: n.last4(), luhn_ok: n.luhn_ok() })
            .collect();
        let m = Mutation {
            idem: crate::engine::IdemKey::chunk(&merchant, &job, first, reversal),
            fingerprint: s.keyer.fingerprint(opcode, &body),
            card: None,
            last4: [b'0'; 4],
            op: Op::JobChunk { job, first, work, cards },
            batched: false,
            looked_up: None,
        };
        s.engine.execute(m, now_ms())
    };
    // What the pace charges: the cards this chunk changed (a replay changes none).
    let changed = |done: &crate::engine::Executed| {
        if done.replayed {
            0
        } else {
            done.chunk.as_ref().map_or(0, |items| items.iter().filter(|(_, changed)| *changed).count() as u64)
        }
    };
    let decided = shared.bulk.run(decide, changed);
    let Some(done) = decided.await else { return (Reply::Error(ResultCode::ShuttingDown), 0) };
    report(shared, &done);
    (Reply::Chunk(ChunkReply { result: done.outcome.result, items: done.chunk.unwrap_or_default() }), done.group)
}

/// A batch under its own key, all or nothing or item by item: one mutation of the engine. Its items
/// must be redeems (without invoice or PIN, whose rules keep records of their own), reloads or
/// activations, each on another card; anything else refuses the whole batch before anything is
/// decided.
fn keyed_batch(
    shared: &Shared,
    gate: &Gate,
    body: &[u8],
    idem: wire::IdemRef,
    all_or_nothing: bool,
    items: &[wire::BatchItem],
) -> (Reply, u64) {
    let mut ops = Vec::with_capacity(items.len());
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    for item in items {
        // An item the client may not do refuses the whole batch, as any bad item does.
        let req = match decode_as(gate, item.opcode, &item.body) {
            Ok(r) => r,
            Err(DecodeError(code)) => return (Reply::Error(code), 0),
        };
        let (number, op) = match req {
            Request::Redeem { number, money, allow_partial, invoice: None, pin: None, .. } => {
                (number, Op::Redeem { money, allow_partial, invoice: None, pin: None })
            }
            Request::Reload { number, money, .. } => (number, Op::Reload { money }),
            Request::Activate { number, load, .. } => (number, Op::Activate { load }),
            _ => return (Reply::Error(ResultCode::MalformedRequest), 0),
        };
        let card = shared.keyer.card_key(&number);
        if !seen.insert(card) {
            return (Reply::Error(ResultCode::MalformedRequest), 0);
        }
        ops.push(crate::engine::KeyedItem { card, last4: number.last4(), op });
    }
    let m = Mutation {
        idem: crate::engine::IdemKey::new(&idem.merchant, &idem.key),
        fingerprint: shared.keyer.fingerprint(Opcode::Batch as u8, body),
        card: None,
        last4: [b'0'; 4],
        op: Op::Keyed { items: ops, all_or_nothing },
        batched: false,
        looked_up: None,
    };
    let done = shared.engine.execute(m, now_ms());
    report(shared, &done);
    let replies = match done.items {
        Some(outcomes) => {
            items.iter().zip(outcomes).map(|(i, o)| (i.opcode | wire::REPLY_BIT, Reply::Card(o))).collect()
        }
        // The batch's key was used for something else: every item says so.
        None => {
            let o = crate::model::Outcome::declined(done.outcome.result, None);
            items.iter().map(|i| (i.opcode | wire::REPLY_BIT, Reply::Card(o))).collect()
        }
    };
    (Reply::Batch(replies), done.group)
}

/// The fingerprint of a request that carries a PIN, taken with the PIN's proof in place of its
/// digits. Fingerprints are keyed with the card-number key and stored: were the digits in them,
/// that key alone would let anyone holding the data test PINs offline, which the separate PIN key
/// exists to prevent. None for a request without a PIN.
fn pin_free_fingerprint(shared: &Shared, opcode: u8, req: &Request) -> Option<[u8; 16]> {
    let (without, number, pin) = match req {
        Request::Redeem { number, pin: Some(pin), .. } | Request::Authorize { number, pin: Some(pin), .. } => {
            let mut r = req.clone();
            if let Request::Redeem { pin, .. } | Request::Authorize { pin, .. } = &mut r {
                *pin = None;
            }
            (r, number, pin)
        }
        Request::PinSet { idem, number, pin } | Request::PinVerify { idem, number, pin } => {
            (Request::PinReset { idem: idem.clone(), number: number.clone() }, number, pin)
        }
        _ => return None,
    };
    let mut buf = BytesMut::new();
    wire::encode_request_body(&mut buf, &without);
    buf.extend_from_slice(&shared.pin_keyer.proof(&shared.keyer.card_key(number), pin).0);
    Some(shared.keyer.fingerprint(opcode, &buf))
}

/// Decides one well-formed request. Returns the reply and the group it must wait for. `batch`:
/// the request is an item of a batch, with its key's store lookup when it has a key.
async fn handle(
    shared: &Shared,
    opcode: u8,
    body: &[u8],
    req: Request,
    batch: Option<Option<LookedUp>>,
) -> (Reply, u64) {
    let now = now_ms();
    let fingerprint =
        pin_free_fingerprint(shared, opcode, &req).unwrap_or_else(|| shared.keyer.fingerprint(opcode, body));
    let batched = batch.is_some();
    let mut looked_up = batch.flatten();
    let mut mutation = |idem: &wire::IdemRef, number: Option<&CardNumber>, op: Op| Mutation {
        idem: crate::engine::IdemKey::new(&idem.merchant, &idem.key),
        fingerprint,
        card: number.map(|n| shared.keyer.card_key(n)),
        last4: number.map_or([b'0'; 4], |n| n.last4()),
        op,
        batched,
        looked_up: looked_up.take(),
    };
    // Numbers generated for an issue: the reply returns the one the engine used, once.
    let mut generated: Vec<CardNumber> = Vec::new();
    let mut program_name = String::new();
    let mut program_text = String::new();
    let mut job_spec = None;
    let m = match req {
        Request::Hello { .. } | Request::Auth { .. } => unreachable!("hello and auth are answered by decide()"),
        // A subscription takes over its connection (`run`); it is never a batch item.
        Request::Subscribe { .. } => return (Reply::Error(ResultCode::MalformedRequest), 0),
        Request::Balance { number } => {
            let (outcome, group) = shared.engine.balance(&shared.keyer.card_key(&number), now);
            return (Reply::Card(outcome), group);
        }
        Request::Lookup { number } => return lookup(shared, &number).await,
        Request::History { number, before_seq, limit, kind } => {
            return history(shared, &number, before_seq, limit, kind).await
        }
        Request::Issue { idem, number, program, money, expiry_ms, active, virtual_card, email, case } => {
            let number_kind = match &number {
                Some(n) => IssueNumber::Supplied { luhn_ok: n.luhn_ok() },
                None => {
                    generated = generate_numbers(shared, &program);
                    let keyed = generated.iter().map(|n| (shared.keyer.card_key(n), n.last4())).collect();
                    IssueNumber::Generated(keyed)
                }
            };
            let op = Op::Issue { program, money, expiry_ms, active, number: number_kind, virtual_card, email, case };
            mutation(&idem, number.as_ref(), op)
        }
        Request::PinSet { idem, number, pin } => {
            let pin = shared.pin_keyer.proof(&shared.keyer.card_key(&number), &pin);
            mutation(&idem, Some(&number), Op::PinSet { pin })
        }
        Request::PinVerify { idem, number, pin } => {
            let pin = shared.pin_keyer.proof(&shared.keyer.card_key(&number), &pin);
            mutation(&idem, Some(&number), Op::PinVerify { pin })
        }
        Request::PinReset { idem, number } => mutation(&idem, Some(&number), Op::PinReset),
        Request::ProgramGet { name } => {
            let reply = match shared.engine.program(&name) {
                Some(p) => program_reply(ResultCode::Approved, &name, ProgramConfig::from_program(&p).to_text()),
                None => program_reply(ResultCode::UnknownProgram, &name, String::new()),
            };
            // What it shows may be an update not yet durable: wait for everything appended so far.
            return (reply, shared.store.latest_group());
        }
        Request::JobGet { merchant, job } => {
            return match shared.engine.job(&merchant, &job) {
                Some((spec, group)) => (job_reply(ResultCode::Approved, Some(spec)), group),
                None => (job_reply(ResultCode::JobNotFound, None), 0),
            };
        }
        Request::JobOpen { idem, kind, count, chunk_cards } => {
            let kind = match kind {
                JobKind::Issue => ChunkKind::Issue,
                JobKind::Activate => ChunkKind::Activate,
            };
            job_spec = Some(JobSpec { kind, count, chunk_cards });
            Mutation {
                idem: crate::engine::IdemKey::job(&idem.merchant, &idem.key),
                fingerprint: shared.keyer.fingerprint(opcode, body),
                card: None,
                last4: [b'0'; 4],
                op: Op::JobOpen { spec: JobSpec { kind, count, chunk_cards } },
                batched,
                looked_up: None,
            }
        }
        Request::JobChunk { .. } => unreachable!("a job chunk is answered by job_chunk()"),
        Request::Batch { .. } => unreachable!("a batch is answered by batch() or keyed_batch()"),
        Request::ProgramSet { idem, name, settings } => {
            let cfg = match ProgramConfig::parse(&settings) {
                Ok(cfg) => cfg,
                Err(e) => return (program_reply(ResultCode::BadProgramSettings, &name, e), 0),
            };
            let problems = cfg.problems(&name);
            if !problems.is_empty() {
                return (program_reply(ResultCode::BadProgramSettings, &name, problems.join("; ")), 0);
            }
            let op = Op::ProgramSet { program: Arc::new(cfg.to_program(&name)), settings: cfg.to_text() };
            program_text = cfg.to_text();
            program_name = name;
            mutation(&idem, None, op)
        }
        Request::Activate { idem, number, load } => mutation(&idem, Some(&number), Op::Activate { load }),
        Request::Redeem { idem, number, money, allow_partial, invoice, pin } => {
            let pin = pin.map(|p| shared.pin_keyer.proof(&shared.keyer.card_key(&number), &p));
            mutation(&idem, Some(&number), Op::Redeem { money, allow_partial, invoice, pin })
        }
        Request::Reload { idem, number, money } => mutation(&idem, Some(&number), Op::Reload { money }),
        Request::Lock { idem, number, reason } => mutation(&idem, Some(&number), Op::Lock { reason }),
        Request::Unlock { idem, number } => mutation(&idem, Some(&number), Op::Unlock),
        Request::Authorize { idem, number, money, allow_partial, ttl_secs, pin } => {
            let ttl_ms = (ttl_secs > 0).then_some(ttl_secs as i64 * 1000);
            let pin = pin.map(|p| shared.pin_keyer.proof(&shared.keyer.card_key(&number), &p));
            mutation(&idem, Some(&number), Op::Authorize { money, allow_partial, ttl_ms, pin })
        }
        Request::Capture { idem, hold_id, money } => mutation(&idem, None, Op::Capture { hold_id, money }),
        Request::Void { idem, hold_id } => mutation(&idem, None, Op::Void { hold_id }),
        Request::Refund { idem, number, money, original } => {
            mutation(&idem, Some(&number), Op::Refund { money, original })
        }
        Request::Reverse { idem, original } => mutation(&idem, None, Op::Reverse { original }),
        Request::CashOut { idem, number } => mutation(&idem, Some(&number), Op::CashOut),
        Request::Note { idem, number, text } => mutation(&idem, Some(&number), Op::Note { text }),
        Request::Reactivate { idem, number } => mutation(&idem, Some(&number), Op::Reactivate),
        Request::Transfer { idem, number, to } => {
            let to = (shared.keyer.card_key(&to), to.last4());
            mutation(&idem, Some(&number), Op::Transfer { to })
        }
        Request::Register { idem, number, member, vip } => mutation(&idem, Some(&number), Op::Register { member, vip }),
        Request::SplitRedeem { idem, money, order, numbers } => {
            let cards = numbers.iter().map(|n| (shared.keyer.card_key(n), n.last4())).collect();
            mutation(&idem, None, Op::SplitRedeem { cards, money, order })
        }
    };
    let op = Opcode::from_u8(opcode);
    let done = shared.engine.execute(m, now);
    report(shared, &done);
    let reply = match op {
        Some(Opcode::Authorize) => Reply::Hold(done.outcome),
        Some(Opcode::Reactivate) => Reply::Explained(done.outcome, done.reason.unwrap_or_default()),
        Some(Opcode::Issue) => {
            let number = done.issued.and_then(|i| generated.into_iter().nth(i as usize));
            Reply::Issued(done.outcome, number)
        }
        Some(Opcode::JobOpen) => {
            let spec = job_spec.filter(|_| done.outcome.result == ResultCode::Approved);
            job_reply(done.outcome.result, spec)
        }
        Some(Opcode::ProgramSet) => {
            // What this update set, from its own settings, not a later update's (which may not
            // be durable yet); a replay shows the settings as they are now.
            let text = match shared.engine.program(&program_name) {
                _ if done.outcome.result != ResultCode::Approved => String::new(),
                _ if !done.replayed => program_text,
                Some(p) => ProgramConfig::from_program(&p).to_text(),
                None => String::new(),
            };
            program_reply(done.outcome.result, &program_name, text)
        }
        Some(Opcode::Reverse | Opcode::SplitRedeem | Opcode::Transfer) => Reply::Parts(PartsReply {
            result: done.outcome.result,
            approved_minor: done.outcome.approved_minor,
            parts: done.parts,
        }),
        _ => Reply::Card(done.outcome),
    };
    (reply, done.group)
}

/// A job's record as a reply: zeros when there is none.
fn job_reply(result: ResultCode, spec: Option<JobSpec>) -> Reply {
    let kind = spec.and_then(|s| match s.kind {
        ChunkKind::Issue => Some(JobKind::Issue),
        ChunkKind::Activate => Some(JobKind::Activate),
        ChunkKind::Reverse => None,
    });
    let (count, chunk_cards) = spec.map_or((0, 0), |s| (s.count, s.chunk_cards));
    Reply::Job(JobReply { result, kind, count, chunk_cards })
}

/// Candidate numbers for a generated issue, in the program's format (the default's when the
/// program is unknown: the engine then declines `unknown_program`). Several, so that the engine
/// can skip one that is a card already without a second round trip; with at least 10^9 random
/// values per prefix, a second candidate is all but never needed.
fn generate_numbers(shared: &Shared, program: &str) -> Vec<CardNumber> {
    const CANDIDATES: usize = 4;
    let p = shared.engine.program(program).unwrap_or_else(|| Arc::new(Program::new(program)));
    let mut rng = rand::rngs::OsRng;
    (0..CANDIDATES).map(|_| CardNumber::generate(&p.number_prefix, p.number_length as usize, &mut rng)).collect()
}

fn program_reply(result: ResultCode, name: &str, mut text: String) -> Reply {
    if text.len() > wire::PROGRAM_SETTINGS_BYTES_MAX {
        let mut end = wire::PROGRAM_SETTINGS_BYTES_MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    Reply::Program(ProgramReply { result, name: name.to_string(), text })
}

/// Waits until `group` is durable. History is read from the store, so it must hold the card's
/// latest change before it is read.
async fn wait_durable(shared: &Shared, group: u64) {
    let mut durable = shared.store.durable();
    let _ = durable.wait_for(|d| *d >= group).await;
}

/// Up to `limit` entries older than `before_seq`, newest first (of one kind, when given), and where
/// to resume: the seq of the last entry looked at when more may follow, else 0.
fn txn_views(
    shared: &Shared,
    card: &CardKey,
    rec: &CardRecord,
    before_seq: u64,
    limit: usize,
    kind: Option<TxnKind>,
) -> (Vec<TxnView>, u64) {
    let (txns, resume) = shared.store.history(card, rec.last_txn_id, before_seq, limit, kind);
    let views = txns
        .into_iter()
        .map(|t| TxnView {
            seq: t.seq,
            kind: t.kind,
            amount_minor: t.amount_minor,
            balance_after_minor: t.balance_after_minor,
            at_ms: t.at_ms,
            merchant: t.merchant.into(),
        })
        .collect();
    (views, resume)
}

async fn lookup(shared: &Shared, number: &CardNumber) -> (Reply, u64) {
    let card = shared.keyer.card_key(number);
    let now = now_ms();
    let Some((rec, group)) = shared.engine.snapshot(&card) else {
        return (
            Reply::Lookup(LookupReply {
                result: ResultCode::CardNotFound,
                card: None,
                program: String::new(),
                created_ms: 0,
                updated_ms: 0,
                txn_count: 0,
                recent: Vec::new(),
                holds: Vec::new(),
                vip: false,
                member: String::new(),
                notes: Vec::new(),
                pin_set: false,
                pin_failures: 0,
                virtual_card: false,
                email: String::new(),
            }),
            0,
        );
    };
    wait_durable(shared, group).await;
    // Entries newer than the snapshot are left out so the reply is one consistent moment.
    let (recent, _) = txn_views(shared, &card, &rec, rec.txn_count + 1, LOOKUP_RECENT_TXNS, None);
    let reply = LookupReply {
        result: ResultCode::Approved,
        card: Some(rec.view(now)),
        program: rec.program.to_string(),
        created_ms: rec.created_ms,
        updated_ms: rec.updated_ms,
        txn_count: rec.txn_count,
        recent,
        // A hold past its deadline is released, even before giftd writes the release.
        holds: rec.holds.iter().filter(|h| h.expires_ms > now).map(|h| h.view()).collect(),
        vip: rec.vip,
        member: rec.member.as_deref().unwrap_or("").to_string(),
        notes: shared
            .store
            .notes(rec.last_note_id, wire::LOOKUP_NOTES_MAX)
            .into_iter()
            .map(|n| NoteView { at_ms: n.at_ms, author: n.author.into(), text: n.text.into() })
            .collect(),
        pin_set: rec.pin.is_some(),
        pin_failures: rec.pin_failures,
        virtual_card: rec.virtual_card,
        email: rec.email.as_deref().unwrap_or("").to_string(),
    };
    (Reply::Lookup(reply), group)
}

async fn history(
    shared: &Shared,
    number: &CardNumber,
    before_seq: u64,
    limit: u16,
    kind: Option<TxnKind>,
) -> (Reply, u64) {
    let card = shared.keyer.card_key(number);
    let Some((rec, group)) = shared.engine.snapshot(&card) else {
        let reply =
            HistoryReply { result: ResultCode::CardNotFound, currency: None, txns: Vec::new(), next_before_seq: 0 };
        return (Reply::History(reply), 0);
    };
    wait_durable(shared, group).await;
    let before = if before_seq == 0 { rec.txn_count + 1 } else { before_seq.min(rec.txn_count + 1) };
    let limit = limit.min(HISTORY_PAGE_MAX) as usize;
    let (txns, next_before_seq) = txn_views(shared, &card, &rec, before, limit, kind);
    (
        Reply::History(HistoryReply {
            result: ResultCode::Approved,
            currency: Some(rec.currency),
            txns,
            next_before_seq,
        }),
        group,
    )
}

#[cfg(test)]
mod tests {
    use super::address_of;

    #[test]
    fn anonymous_clients_are_counted_by_ipv4_address_or_ipv6_prefix() {
        assert_eq!(address_of("127.0.0.1".parse().unwrap()), "127.0.0.1");
        assert_eq!(address_of("::ffff:10.1.2.3".parse().unwrap()), "10.1.2.3");
        assert_eq!(address_of("2001:db8:1:2:aaaa::1".parse().unwrap()), "2001:db8:1:2::/64");
        assert_eq!(address_of("2001:db8:1:2:bbbb::9".parse().unwrap()), "2001:db8:1:2::/64");
    }
}
