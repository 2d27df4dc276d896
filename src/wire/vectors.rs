//! Runs the hex vectors of `protocol/vectors.txt` against the codec, so the spec's examples cannot
//! drift from the implementation. The file's header describes its format.

use super::*;
use crate::model::ResultCode;
use bytes::BytesMut;
use std::collections::HashSet;
use tokio_util::codec::Decoder;

const VECTORS: &str = include_str!("../../protocol/vectors.txt");

/// `(name, kind, bytes)` per vector; a line starting with whitespace continues the previous hex.
fn parse() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out: Vec<(&str, &str, String)> = Vec::new();
    for line in VECTORS.lines() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        if line.starts_with(char::is_whitespace) {
            out.last_mut().expect("continuation line before the first vector").2.push_str(line);
            continue;
        }
        let mut cols = line.splitn(3, '|').map(str::trim);
        let (Some(name), Some(kind), Some(hex)) = (cols.next(), cols.next(), cols.next()) else {
            panic!("not `name | kind | hex`: {line}");
        };
        out.push((name, kind, hex.to_string()));
    }
    out.into_iter()
        .map(|(name, kind, hex)| {
            let bytes =
                hex::decode(hex.replace(char::is_whitespace, "")).unwrap_or_else(|e| panic!("{name}: bad hex: {e}"));
            (name, kind, bytes)
        })
        .collect()
}

/// Checks one vector; `kind` says what the bytes must do (see the file's header).
fn check(name: &str, kind: &str, bytes: &[u8]) {
    let mut buf = BytesMut::from(bytes);
    let decoded = FrameCodec::new(FRAME_BYTES_MAX).decode(&mut buf);
    if let Some(want) = kind.strip_prefix("stream:") {
        // The error frame's code for each stream error, as server/connection.rs sends it.
        let got = match decoded {
            Err(FrameError::TooLarge { .. }) => ResultCode::FrameTooLarge,
            Err(FrameError::Version(_)) => ResultCode::UnsupportedVersion,
            Err(FrameError::TooShort(_) | FrameError::Flags(_)) => ResultCode::MalformedFrame,
            other => panic!("{name}: expected a stream error, got {other:?}"),
        };
        assert_eq!(got.name(), want, "{name}");
        return;
    }
    let frame = match decoded {
        Ok(Some(frame)) => frame,
        other => panic!("{name}: expected one whole frame, got {other:?}"),
    };
    assert!(buf.is_empty(), "{name}: {} bytes after the frame", buf.len());
    let Header { opcode, request_id, .. } = frame.header;
    let mut again = BytesMut::new();
    match kind {
        "request" => {
            let req = decode_request(opcode, &frame.body).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            encode_request(&mut again, request_id, &req);
        }
        "reply" => {
            let reply = decode_reply(opcode, &frame.body).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            encode_reply(&mut again, opcode, request_id, &reply);
        }
        _ => {
            let want = kind.strip_prefix("error:").unwrap_or_else(|| panic!("{name}: unknown kind {kind:?}"));
            match decode_request(opcode, &frame.body) {
                Err(DecodeError(code)) => assert_eq!(code.name(), want, "{name}"),
                Ok(req) => panic!("{name}: expected {want}, decoded {req:?}"),
            }
            return;
        }
    }
    // Hex, so a failure shows where the bytes differ.
    assert_eq!(hex::encode(&again), hex::encode(bytes), "{name}: re-encoding differs");
}

#[test]
fn vectors_match_the_codec() {
    let vectors = parse();
    let mut names = HashSet::new();
    let mut requested = HashSet::new();
    for (name, kind, bytes) in &vectors {
        assert!(names.insert(*name), "{name}: duplicate name");
        check(name, kind, bytes);
        if *kind == "request" {
            requested.insert(bytes[5]); // the header's opcode byte
        }
    }
    for op in Opcode::ALL {
        assert!(requested.contains(&(op as u8)), "no request vector for {}", op.name());
    }
}
