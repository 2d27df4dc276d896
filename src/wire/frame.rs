//! Framing: `u32 length | u8 version | u8 opcode | u16 flags | u64 request_id | body`, little-endian.
//! `length` counts every byte after itself.

use super::{HEADER_BYTES, VERSION};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    pub opcode: u8,
    pub flags: u16,
    pub request_id: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    pub body: Bytes,
}

/// Errors that make the rest of the stream unreadable; the connection is closed after reporting them.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {frame_bytes} bytes exceeds the maximum of {frame_bytes_max}")]
    TooLarge { frame_bytes: u64, frame_bytes_max: usize },
    #[error("frame length {0} is shorter than the header")]
    TooShort(u32),
    #[error("frame has version {0}, this connection speaks {VERSION}")]
    Version(u8),
    #[error("frame flags {0:#06x} are reserved and must be zero")]
    Flags(u16),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Decodes frames no larger than `frame_bytes_max`, and encodes them.
#[derive(Clone, Debug)]
pub struct FrameCodec {
    pub frame_bytes_max: usize,
    /// A batch or job chunk frame (request or reply) may be this large; every other frame
    /// `frame_bytes_max`.
    pub batch_frame_bytes_max: usize,
}

impl FrameCodec {
    pub fn new(frame_bytes_max: usize) -> FrameCodec {
        FrameCodec { frame_bytes_max, batch_frame_bytes_max: frame_bytes_max.max(super::BATCH_FRAME_BYTES_MAX) }
    }

    pub fn with_batch_max(frame_bytes_max: usize, batch_frame_bytes_max: usize) -> FrameCodec {
        FrameCodec { frame_bytes_max, batch_frame_bytes_max }
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([src[0], src[1], src[2], src[3]]);
        let frame_bytes = 4 + len as u64;
        // Checked before anything is reserved, so a hostile length never becomes an allocation.
        if frame_bytes > self.frame_bytes_max as u64 {
            // Only a batch or a job chunk may be larger: its opcode (byte 5) decides, before anything is buffered.
            // Past the batch limit no opcode can help, so that is refused at once.
            let most = self.frame_bytes_max.max(self.batch_frame_bytes_max);
            if frame_bytes > most as u64 {
                return Err(FrameError::TooLarge { frame_bytes, frame_bytes_max: most });
            }
            if src.len() < 6 {
                return Ok(None);
            }
            let opcode = src[5] & !super::REPLY_BIT;
            let batch =
                opcode == super::message::Opcode::Batch as u8 || opcode == super::message::Opcode::JobChunk as u8;
            let max = if batch { self.batch_frame_bytes_max } else { self.frame_bytes_max };
            if frame_bytes > max as u64 {
                return Err(FrameError::TooLarge { frame_bytes, frame_bytes_max: max });
            }
        }
        if (frame_bytes as usize) < HEADER_BYTES {
            return Err(FrameError::TooShort(len));
        }
        if src.len() < frame_bytes as usize {
            // Room for at most one ordinary frame at a time: a header claiming a large batch makes
            // the buffer grow with the bytes that actually arrive, not all at once.
            src.reserve((frame_bytes as usize - src.len()).min(self.frame_bytes_max));
            return Ok(None);
        }
        let mut raw = src.split_to(frame_bytes as usize);
        raw.advance(4);
        let header = Header {
            version: raw.get_u8(),
            opcode: raw.get_u8(),
            flags: raw.get_u16_le(),
            request_id: raw.get_u64_le(),
        };
        if header.version != VERSION {
            return Err(FrameError::Version(header.version));
        }
        if header.flags != 0 {
            return Err(FrameError::Flags(header.flags));
        }
        Ok(Some(Frame { header, body: raw.freeze() }))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        let at = begin_frame(dst, frame.header.opcode, frame.header.request_id);
        dst.put_slice(&frame.body);
        finish_frame(dst, at);
        Ok(())
    }
}

/// Writes a header with a placeholder length; the body follows, then [`finish_frame`]. This lets
/// callers encode a body straight into the output buffer without an intermediate allocation.
pub fn begin_frame(dst: &mut BytesMut, opcode: u8, request_id: u64) -> usize {
    let at = dst.len();
    dst.put_u32_le(0);
    dst.put_u8(VERSION);
    dst.put_u8(opcode);
    dst.put_u16_le(0);
    dst.put_u64_le(request_id);
    at
}

pub fn finish_frame(dst: &mut BytesMut, at: usize) {
    let len = (dst.len() - at - 4) as u32;
    dst[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> FrameCodec {
        FrameCodec::new(64)
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let mut buf = BytesMut::new();
        let f = Frame {
            header: Header { version: 1, opcode: 0x12, flags: 0, request_id: 7 },
            body: Bytes::from_static(b"abc"),
        };
        codec().encode(f.clone(), &mut buf).unwrap();
        let whole = buf.clone();
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            assert!(codec().decode(&mut part).unwrap().is_none(), "cut at {cut}");
        }
        assert_eq!(codec().decode(&mut buf).unwrap(), Some(f));
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut buf = BytesMut::from(&u32::MAX.to_le_bytes()[..]);
        let cap = buf.capacity();
        assert!(matches!(codec().decode(&mut buf), Err(FrameError::TooLarge { .. })));
        assert_eq!(buf.capacity(), cap);
    }

    #[test]
    fn short_length_bad_version_and_flags_are_stream_errors() {
        let mut buf = BytesMut::from(&[3u8, 0, 0, 0, 1, 2, 3][..]);
        assert!(matches!(codec().decode(&mut buf), Err(FrameError::TooShort(3))));
        let mut raw = BytesMut::new();
        let at = begin_frame(&mut raw, 0x12, 1);
        finish_frame(&mut raw, at);
        let mut v2 = raw.clone();
        v2[4] = 2;
        assert!(matches!(codec().decode(&mut v2), Err(FrameError::Version(2))));
        let mut fl = raw.clone();
        fl[6] = 1;
        assert!(matches!(codec().decode(&mut fl), Err(FrameError::Flags(1))));
    }
}
