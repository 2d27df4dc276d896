//! Protocol v1: the only module that knows byte layouts (see `protocol/` for the spec).
//!
//! Two phases, as in mini-redis: [`frame`] finds a whole frame in the stream (checking its length
//! against the maximum before buffering it), then [`message`] turns its body into a typed request or
//! reply. "Need more bytes" is not an error; a corrupt stream is, and closes only its connection.

pub mod frame;
pub mod message;

pub use frame::{Frame, FrameCodec, FrameError, Header};
pub use message::*;

/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Length prefix (4) + version (1) + opcode (1) + flags (2) + request id (8).
pub const HEADER_BYTES: usize = 16;
/// Default hard limit on one frame, header included.
pub const FRAME_BYTES_MAX: usize = 64 * 1024;
/// Default hard limit on one batch frame (a request or reply of opcode `batch`), header included:
/// 8,192 redeems and their replies fit.
pub const BATCH_FRAME_BYTES_MAX: usize = 1024 * 1024;
/// Replies set this bit on the request's opcode.
pub const REPLY_BIT: u8 = 0x80;

#[cfg(test)]
mod vectors;
