//! The wire protocol over real TCP: corrupt and oversized frames, the handshake, request errors that
//! leave the connection usable, and pipelining.

use crate::{balance, call, check, issue, num, redeem, redeem_req, timed, usd, Giftd, MERCHANT};
use bytes::BytesMut;
use futures_util::StreamExt;
use giftd::client::Client;
use giftd::model::{LockReason, ResultCode};
use giftd::wire::{self, decode_reply, encode_request_body, Frame, FrameCodec, Reply, Request, AMOUNT_MINOR_MAX};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

const REDEEM: u8 = 0x13;
const BALANCE: u8 = 0x12;

/// A whole frame with an arbitrary header.
pub fn frame(version: u8, opcode: u8, flags: u16, request_id: u64, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + body.len());
    v.extend_from_slice(&((12 + body.len()) as u32).to_le_bytes());
    v.push(version);
    v.push(opcode);
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&request_id.to_le_bytes());
    v.extend_from_slice(body);
    v
}

fn body_of(req: &Request) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode_request_body(&mut b, req);
    b.to_vec()
}

fn str8(v: &mut Vec<u8>, s: &[u8]) {
    v.push(s.len() as u8);
    v.extend_from_slice(s);
}

/// A redeem body with every field under the test's control (the typed encoder only builds valid ones).
fn redeem_body(key: &str, number: &str, currency: &[u8; 3], minor: i64) -> Vec<u8> {
    let mut v = Vec::new();
    str8(&mut v, MERCHANT.as_bytes());
    str8(&mut v, key.as_bytes());
    str8(&mut v, number.as_bytes());
    v.extend_from_slice(currency);
    v.extend_from_slice(&minor.to_le_bytes());
    v.push(0);
    str8(&mut v, b""); // no invoice
    str8(&mut v, b""); // no PIN
    v
}

/// Writes raw bytes on a handshaken client and returns the next frame.
pub async fn exchange(c: &mut Client, bytes: &[u8]) -> Frame {
    c.tx.send_raw(bytes);
    timed("flush", c.tx.flush()).await.expect("flush");
    timed("reply frame", c.rx.recv_frame()).await.expect("a reply frame")
}

#[track_caller]
pub fn assert_error_frame(f: &Frame, opcode: u8, request_id: u64, code: ResultCode) {
    assert_eq!(
        (f.header.opcode, f.header.request_id, &f.body[..]),
        (opcode, request_id, &(code as u16).to_le_bytes()[..]),
        "expected {code:?}"
    );
}

/// The server closes the connection: no further frame arrives.
async fn assert_closed(c: &mut Client) {
    let next = timed("close", c.rx.recv_frame()).await;
    assert!(next.is_err(), "connection should be closed, got {next:?}");
}

/// A connection without the handshake.
struct Raw {
    wr: OwnedWriteHalf,
    rd: FramedRead<OwnedReadHalf, FrameCodec>,
}

impl Raw {
    async fn connect(addr: &str) -> Raw {
        let s = timed("connect", TcpStream::connect(addr)).await.expect("connect");
        let (rd, wr) = s.into_split();
        Raw { wr, rd: FramedRead::new(rd, FrameCodec::new(wire::FRAME_BYTES_MAX)) }
    }

    /// Writes `bytes`, then returns the next frame (None once the server has closed).
    async fn exchange(&mut self, bytes: &[u8]) -> Option<Frame> {
        timed("write", self.wr.write_all(bytes)).await.expect("write");
        self.next().await
    }

    async fn next(&mut self) -> Option<Frame> {
        match timed("read", self.rd.next()).await {
            Some(Ok(f)) => Some(f),
            Some(Err(_)) | None => None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_closes_only_its_connection() {
    let g = Giftd::start();
    let mut good = g.client().await;
    let n = "6035719940000014";
    issue(&mut good, n, usd(10_000)).await;
    let mut bad = g.client().await;
    assert_eq!(bad.hello.frame_bytes_max as usize, wire::FRAME_BYTES_MAX);

    // Exactly at the limit is a frame (its body is nonsense: a request error, connection kept).
    let mut body = body_of(&Request::Balance { number: num(n) });
    body.resize(wire::FRAME_BYTES_MAX - 16, b'9');
    let f = exchange(&mut bad, &frame(1, BALANCE, 0, 41, &body)).await;
    assert_error_frame(&f, BALANCE | 0x80, 41, ResultCode::MalformedRequest);
    assert_eq!(balance(&mut bad, n).await, 10_000);

    // One byte more: a connection-level error (opcode 0x80, request id 0), then the close. Only the
    // header is sent: the server must refuse on the length alone.
    let mut header = frame(1, REDEEM, 0, 42, &[]);
    header[..4].copy_from_slice(&((wire::FRAME_BYTES_MAX - 3) as u32).to_le_bytes());
    let f = exchange(&mut bad, &header).await;
    assert_error_frame(&f, 0x80, 0, ResultCode::FrameTooLarge);
    assert_closed(&mut bad).await;

    // A hostile 4 GiB length on a fresh connection: the same.
    let mut huge = g.client().await;
    let f = exchange(&mut huge, &u32::MAX.to_le_bytes()).await;
    assert_error_frame(&f, 0x80, 0, ResultCode::FrameTooLarge);
    assert_closed(&mut huge).await;

    // The other connection and the card are untouched.
    assert_eq!(balance(&mut good, n).await, 10_000);
    check(&redeem(&mut good, n, "after-bad", usd(100), false).await, ResultCode::Approved, 100, Some(9_900));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_headers_close_the_connection() {
    let g = Giftd::start();
    let mut good = g.client().await;
    let n = "6035719940001012";
    issue(&mut good, n, usd(10_000)).await;
    let redeem = frame(1, REDEEM, 0, 5, &body_of(&redeem_req(n, "corrupt-1", usd(100), false)));

    // Version 2 in the header of an otherwise valid redeem.
    let mut c = g.client().await;
    let mut v2 = redeem.clone();
    v2[4] = 2;
    assert_error_frame(&exchange(&mut c, &v2).await, 0x80, 0, ResultCode::UnsupportedVersion);
    assert_closed(&mut c).await;

    // Reserved flags set.
    let mut c = g.client().await;
    let mut flagged = redeem.clone();
    flagged[6] = 1;
    assert_error_frame(&exchange(&mut c, &flagged).await, 0x80, 0, ResultCode::MalformedFrame);
    assert_closed(&mut c).await;

    // A length shorter than the header.
    let mut c = g.client().await;
    assert_error_frame(&exchange(&mut c, &[3, 0, 0, 0, 1, 2, 3]).await, 0x80, 0, ResultCode::MalformedFrame);
    assert_closed(&mut c).await;

    // None of these redeems happened; the key is still free.
    assert_eq!(balance(&mut good, n).await, 10_000);
    check(&call(&mut good, &redeem_req(n, "corrupt-1", usd(100), false)).await, ResultCode::Approved, 100, Some(9_900));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_comes_first() {
    let g = Giftd::start();
    let n = "6035719940002010";
    issue(&mut g.client().await, n, usd(10_000)).await;

    // A request before hello: handshake_required for that request, then the close.
    let mut r = Raw::connect(g.addr()).await;
    let f = r.exchange(&frame(1, BALANCE, 0, 7, &body_of(&Request::Balance { number: num(n) }))).await;
    assert_error_frame(&f.expect("a reply"), BALANCE | 0x80, 7, ResultCode::HandshakeRequired);
    assert!(r.next().await.is_none(), "closed after handshake_required");

    // A mutation before hello is not applied.
    let mut r = Raw::connect(g.addr()).await;
    let f = r.exchange(&frame(1, REDEEM, 0, 8, &body_of(&redeem_req(n, "early", usd(100), false)))).await;
    assert_error_frame(&f.expect("a reply"), REDEEM | 0x80, 8, ResultCode::HandshakeRequired);
    assert!(r.next().await.is_none());

    // An unknown opcode before hello is also a missing handshake.
    let mut r = Raw::connect(g.addr()).await;
    let f = r.exchange(&frame(1, 0x7e, 0, 9, b"junk")).await;
    assert_error_frame(&f.expect("a reply"), 0x7e | 0x80, 9, ResultCode::HandshakeRequired);
    assert!(r.next().await.is_none());

    // A hello offering only versions the server does not speak.
    let mut r = Raw::connect(g.addr()).await;
    let hello = Request::Hello { min_version: 2, max_version: 9, client: "from-the-future".into() };
    let f = r.exchange(&frame(1, 0x01, 0, 1, &body_of(&hello))).await;
    assert_error_frame(&f.expect("a reply"), 0x81, 1, ResultCode::UnsupportedVersion);
    assert!(r.next().await.is_none());

    // A proper hello, by hand, then a request.
    let mut r = Raw::connect(g.addr()).await;
    let hello = Request::Hello { min_version: 1, max_version: 3, client: "raw-test".into() };
    let f = r.exchange(&frame(1, 0x01, 0, 1, &body_of(&hello))).await.expect("hello reply");
    match decode_reply(f.header.opcode, &f.body).expect("hello reply decodes") {
        Reply::Hello(h) => assert_eq!((h.result, h.version), (ResultCode::Approved, 1)),
        other => panic!("{other:?}"),
    }
    let f = r.exchange(&frame(1, BALANCE, 0, 2, &body_of(&Request::Balance { number: num(n) }))).await.expect("reply");
    assert_eq!(f.header.request_id, 2);
    assert_eq!(decode_reply(f.header.opcode, &f.body).expect("decodes").result(), ResultCode::Approved);

    assert_eq!(balance(&mut g.client().await, n).await, 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_keep_the_connection_and_change_nothing() {
    let g = Giftd::start();
    let mut c = g.client().await;
    let n = "6035719940003018";
    issue(&mut c, n, usd(10_000)).await;

    // Unknown opcode: answered with its request id, the connection stays usable.
    assert_error_frame(
        &exchange(&mut c, &frame(1, 0x7e, 0, 99, b"\x01\x02")).await,
        0xfe,
        99,
        ResultCode::UnknownOpcode,
    );
    assert_eq!(balance(&mut c, n).await, 10_000);

    let good = redeem_body("bad-1", n, b"USD", 100);
    let mut truncated = good.clone();
    truncated.pop();
    let mut trailing = good.clone();
    trailing.push(0);
    let mut bad_bool = good.clone();
    let at = bad_bool.len() - 3;
    bad_bool[at] = 2;
    let mut bad_pin = good.clone();
    bad_pin.pop();
    str8(&mut bad_pin, b"12x4");
    let cases: Vec<(&str, Vec<u8>, ResultCode)> = vec![
        ("truncated", truncated, ResultCode::MalformedRequest),
        ("trailing byte", trailing, ResultCode::MalformedRequest),
        ("bool 2", bad_bool, ResultCode::MalformedRequest),
        ("empty body", Vec::new(), ResultCode::MalformedRequest),
        ("zero amount", redeem_body("bad-1", n, b"USD", 0), ResultCode::BadAmount),
        ("negative amount", redeem_body("bad-1", n, b"USD", -100), ResultCode::BadAmount),
        ("huge amount", redeem_body("bad-1", n, b"USD", AMOUNT_MINOR_MAX + 1), ResultCode::BadAmount),
        ("unknown currency", redeem_body("bad-1", n, b"XXX", 100), ResultCode::UnknownCurrency),
        ("lowercase currency", redeem_body("bad-1", n, b"usd", 100), ResultCode::UnknownCurrency),
        ("short number", redeem_body("bad-1", "60357199", b"USD", 100), ResultCode::BadCardNumber),
        ("20 digits", redeem_body("bad-1", "60357199400030180000", b"USD", 100), ResultCode::BadCardNumber),
        ("letter in number", redeem_body("bad-1", "603571994000301A", b"USD", 100), ResultCode::BadCardNumber),
        ("empty key", redeem_body("", n, b"USD", 100), ResultCode::MissingKey),
        ("PIN not digits", bad_pin, ResultCode::BadPin),
    ];
    for (i, (name, body, code)) in cases.iter().enumerate() {
        let id = 100 + i as u64;
        let f = exchange(&mut c, &frame(1, REDEEM, 0, id, body)).await;
        assert_eq!((f.header.opcode, f.header.request_id), (REDEEM | 0x80, id), "{name}");
        let reply = decode_reply(f.header.opcode, &f.body).expect("decodable");
        assert_eq!(reply, Reply::Error(*code), "{name}");
        assert_eq!(balance(&mut c, n).await, 10_000, "{name} changed the balance");
    }
    // Typed requests with values the decoder refuses.
    let refused = [
        Request::History { number: num(n), before_seq: 0, limit: 0, kind: None },
        Request::History { number: num(n), before_seq: 0, limit: wire::HISTORY_PAGE_MAX + 1, kind: None },
        Request::Lock { idem: crate::idem(MERCHANT, "bad-1"), number: num(n), reason: LockReason::None },
        Request::Issue {
            idem: crate::idem(MERCHANT, "bad-1"),
            number: Some(num("6035719940003026")),
            program: String::new(),
            money: usd(100),
            expiry_ms: None,
            active: true,
            virtual_card: false,
            email: None,
            case: None,
        },
    ];
    for r in &refused {
        let reply = timed("call", c.call(r)).await.expect("reply");
        assert_eq!(reply, Reply::Error(ResultCode::MalformedRequest), "{r:?}");
    }
    // Nothing was recorded under the key used by all of the above: it is still free.
    check(&redeem(&mut c, n, "bad-1", usd(100), false).await, ResultCode::Approved, 100, Some(9_900));
    let o = call(&mut c, &Request::Balance { number: num("6035719940003026") }).await;
    assert_eq!(o.result, ResultCode::CardNotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_pipelined_requests_in_one_write() {
    let g = Giftd::start();
    let mut c = g.client().await;
    let n = "6035719940004016";
    issue(&mut c, n, usd(10_000)).await;
    let reqs: Vec<Request> = (0..100)
        .map(|i| {
            if i % 2 == 0 {
                redeem_req(n, &format!("pipe-{i}"), usd(1), false)
            } else {
                Request::Balance { number: num(n) }
            }
        })
        .collect();
    // ClientWriter buffers every request and flush() writes them with one write_all.
    let ids: Vec<u64> = reqs.iter().map(|r| c.tx.send(r)).collect();
    timed("flush", c.tx.flush()).await.expect("flush");
    let mut expected_balance = 10_000;
    for (i, id) in ids.iter().enumerate() {
        let (got, reply) = timed("pipelined reply", c.rx.recv()).await.expect("reply");
        assert_eq!(got, *id, "reply {i} out of order");
        let Reply::Card(o) = reply else { panic!("reply {i}: {reply:?}") };
        if i % 2 == 0 {
            expected_balance -= 1;
            check(&o, ResultCode::Approved, 1, Some(expected_balance));
        } else {
            // A balance inquiry sees the redeem pipelined just before it.
            check(&o, ResultCode::Approved, 0, Some(expected_balance));
        }
    }
    assert_eq!(balance(&mut c, n).await, 10_000 - 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_limits_apply_to_frames_and_pipelines() {
    let g = Giftd::with_config("[limits]\nframe_bytes_max = 1024\ninflight_per_connection_max = 2\n");
    let mut c = g.client().await;
    assert_eq!((c.hello.frame_bytes_max, c.hello.inflight_max), (1024, 2));
    let n = "6035719940005013";
    issue(&mut c, n, usd(10_000)).await;

    // 300 pipelined requests with only 2 in flight per connection: backpressure, not a deadlock.
    let ids: Vec<u64> = (0..300).map(|i| c.tx.send(&redeem_req(n, &format!("bp-{i}"), usd(10), false))).collect();
    timed("flush", c.tx.flush()).await.expect("flush");
    for (i, id) in ids.iter().enumerate() {
        let (got, reply) = timed("pipelined reply", c.rx.recv()).await.expect("reply");
        assert_eq!(got, *id);
        let Reply::Card(o) = reply else { panic!("{reply:?}") };
        check(&o, ResultCode::Approved, 10, Some(10_000 - 10 * (i as i64 + 1)));
    }

    // A frame of exactly 1024 bytes is read; 1025 is refused.
    let mut body = body_of(&Request::Balance { number: num(n) });
    body.resize(1024 - 16, b'7');
    assert_error_frame(
        &exchange(&mut c, &frame(1, BALANCE, 0, 500, &body)).await,
        BALANCE | 0x80,
        500,
        ResultCode::MalformedRequest,
    );
    body.push(b'7');
    assert_error_frame(&exchange(&mut c, &frame(1, BALANCE, 0, 501, &body)).await, 0x80, 0, ResultCode::FrameTooLarge);
    assert_closed(&mut c).await;
    assert_eq!(balance(&mut g.client().await, n).await, 7_000);
}
