//! A protocol client: connect, handshake, then either one call at a time ([`Client::call`]) or
//! pipelined through [`Client::into_split`]. giftctl, giftload and the tests all use it.

use crate::wire::{self, decode_reply, encode_request, AuthReply, Frame, FrameCodec, HelloReply, Reply, Request};
use anyhow::{anyhow, bail, Context};
use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

pub struct Client {
    pub tx: ClientWriter,
    pub rx: ClientReader,
    pub hello: HelloReply,
    /// Who the server says this connection is, when it authenticated.
    pub auth: Option<AuthReply>,
}

/// A client's name and key, for a server that requires authentication. The key never leaves this
/// process: `auth` sends an HMAC of the connection's nonce under it.
#[derive(Clone)]
pub struct Credentials {
    pub name: String,
    key: [u8; 32],
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn new(name: &str, key: [u8; 32]) -> Credentials {
        Credentials { name: name.to_string(), key }
    }

    /// Reads the key from a file of 64 hex digits (surrounding whitespace ignored).
    pub fn from_key_file(name: &str, path: &std::path::Path) -> anyhow::Result<Credentials> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading key file {}", path.display()))?;
        let key = crate::card_number::parse_secret_hex(text.trim())
            .ok_or_else(|| anyhow!("key file {}: not 64 hex digits", path.display()))?;
        Ok(Credentials::new(name, key))
    }

    /// The `auth` proof for a connection whose hello carried `nonce`.
    pub fn proof(&self, nonce: &[u8; wire::AUTH_NONCE_BYTES]) -> [u8; 32] {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(&wire::auth_message(nonce, &self.name));
        mac.finalize().into_bytes().into()
    }
}

pub struct ClientWriter {
    wr: OwnedWriteHalf,
    buf: BytesMut,
    next_id: u64,
}

pub struct ClientReader {
    frames: FramedRead<OwnedReadHalf, FrameCodec>,
}

impl Client {
    /// Connects and performs the version handshake, without authenticating.
    pub async fn connect(addr: &str) -> anyhow::Result<Client> {
        Client::connect_as(addr, None).await
    }

    /// Connects, performs the version handshake and, given credentials, authenticates.
    pub async fn connect_as(addr: &str, credentials: Option<&Credentials>) -> anyhow::Result<Client> {
        let sock = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        sock.set_nodelay(true)?;
        let (rd, wr) = sock.into_split();
        let mut c = Client {
            tx: ClientWriter { wr, buf: BytesMut::with_capacity(4096), next_id: 1 },
            // A client takes what its server sends: batch replies as large as any server may allow.
            rx: ClientReader {
                frames: FramedRead::new(rd, FrameCodec::with_batch_max(wire::FRAME_BYTES_MAX, 16 * 1024 * 1024)),
            },
            hello: HelloReply {
                result: crate::model::ResultCode::Approved,
                version: 0,
                frame_bytes_max: 0,
                inflight_max: 0,
                server: String::new(),
                nonce: [0; wire::AUTH_NONCE_BYTES],
            },
            auth: None,
        };
        let hello =
            Request::Hello { min_version: wire::VERSION, max_version: wire::VERSION, client: "giftd-client".into() };
        match c.call(&hello).await? {
            Reply::Hello(h) => c.hello = h,
            other => bail!("handshake refused: {}", other.result().name()),
        }
        if let Some(cred) = credentials {
            let auth = Request::Auth { client: cred.name.clone(), proof: cred.proof(&c.hello.nonce) };
            match c.call(&auth).await? {
                Reply::Auth(a) => c.auth = Some(a),
                other => bail!("authentication as {:?} refused: {}", cred.name, other.result().name()),
            }
        }
        Ok(c)
    }

    /// Sends one request and waits for its reply.
    pub async fn call(&mut self, req: &Request) -> anyhow::Result<Reply> {
        let id = self.tx.send(req);
        self.tx.flush().await?;
        let (got, reply) = self.rx.recv().await?;
        if got != id {
            bail!("reply for request {got}, expected {id}");
        }
        Ok(reply)
    }

    pub fn into_split(self) -> (ClientWriter, ClientReader) {
        (self.tx, self.rx)
    }

    /// Subscribes to committed events after `from` (see `protocol/ops/subscribe.md`); the
    /// connection then carries only the subscription's frames.
    pub async fn subscribe(
        mut self,
        from: u64,
        merchant: &str,
        program: &str,
        kinds: u64,
    ) -> anyhow::Result<Subscription> {
        let req = Request::Subscribe { from, merchant: merchant.into(), program: program.into(), kinds };
        let request_id = self.tx.send(&req);
        self.tx.flush().await?;
        Ok(Subscription { rx: self.rx, _tx: self.tx, request_id })
    }
}

/// An open event subscription. Dropping it closes the connection, which ends it.
pub struct Subscription {
    rx: ClientReader,
    /// Kept open: closing the write side would end the subscription.
    _tx: ClientWriter,
    request_id: u64,
}

impl Subscription {
    /// The next frame of events (possibly empty, saying only that it caught up). A refused
    /// subscription is an error.
    pub async fn next(&mut self) -> anyhow::Result<wire::EventsReply> {
        let (id, reply) = self.rx.recv().await?;
        if id != self.request_id {
            bail!("frame for request {id}, expected {}", self.request_id);
        }
        match reply {
            Reply::Events(e) => Ok(e),
            other => bail!("subscription refused: {}", other.result().name()),
        }
    }
}

impl ClientWriter {
    /// Buffers a request; returns its request id. Nothing is sent until [`ClientWriter::flush`].
    pub fn send(&mut self, req: &Request) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        encode_request(&mut self.buf, id, req);
        id
    }

    /// Buffers raw bytes (for tests of malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.wr.write_all(&self.buf).await?;
        self.buf.clear();
        Ok(())
    }
}

impl ClientReader {
    /// The next reply: its request id and decoded body.
    pub async fn recv(&mut self) -> anyhow::Result<(u64, Reply)> {
        let f = self.recv_frame().await?;
        let reply = decode_reply(f.header.opcode, &f.body).map_err(|e| anyhow!("undecodable reply: {:?}", e.0))?;
        Ok((f.header.request_id, reply))
    }

    pub async fn recv_frame(&mut self) -> anyhow::Result<Frame> {
        match self.frames.next().await {
            Some(Ok(f)) => Ok(f),
            Some(Err(e)) => Err(e.into()),
            None => bail!("connection closed by server"),
        }
    }
}
