//! Length-prefixed frames: a 4-byte big-endian payload length, then a postcard-encoded message.
//! Pure functions over bytes; the async reading lives in [`crate::io`].

use crate::limits::MAX_FRAME;
use serde::{de::DeserializeOwned, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame could not be decoded as {what}: {source}")]
    Decode { what: &'static str, source: postcard::Error },
    #[error("message could not be encoded: {0}")]
    Encode(postcard::Error),
    #[error("hello frame is {len} bytes, too short to hold a protocol version")]
    NoVersion { len: usize },
    #[error("stream closed in the middle of a frame")]
    Truncated,
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` as one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 4];
    let out = postcard::to_extend(msg, std::mem::take(&mut out)).map_err(FrameError::Encode)?;
    finish(out)
}

/// Encodes the hello frame: length prefix, version, postcard body.
pub fn encode_versioned<T: Serialize>(version: u16, msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 4];
    out.extend_from_slice(&version.to_be_bytes());
    let out = postcard::to_extend(msg, out).map_err(FrameError::Encode)?;
    finish(out)
}

fn finish(mut out: Vec<u8>) -> Result<Vec<u8>, FrameError> {
    let len = out.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { len, max: MAX_FRAME });
    }
    // Fits: MAX_FRAME is far below u32::MAX.
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Reads a frame header, checking the length against the limit before anything is allocated.
pub fn payload_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { len, max: MAX_FRAME });
    }
    Ok(len)
}

/// Decodes one payload (without its length prefix). Trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let what = std::any::type_name::<T>().rsplit("::").next().unwrap_or("message");
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(|source| FrameError::Decode { what, source })?;
    if !rest.is_empty() {
        return Err(FrameError::Decode { what, source: postcard::Error::DeserializeBadEncoding });
    }
    Ok(msg)
}

/// Splits a hello payload into its protocol version and body.
pub fn split_version(payload: &[u8]) -> Result<(u16, &[u8]), FrameError> {
    if payload.len() < 2 {
        return Err(FrameError::NoVersion { len: payload.len() });
    }
    Ok((u16::from_be_bytes([payload[0], payload[1]]), &payload[2..]))
}

/// Splits whole frames off the front of `buf`: `Ok(Some((payload, consumed)))` for a complete frame,
/// `Ok(None)` when more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<(&[u8], usize)>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = payload_len([buf[0], buf[1], buf[2], buf[3]])?;
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some((&buf[4..4 + len], 4 + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::*;

    #[test]
    fn round_trip() {
        let msg = AgentMessage::Goodbye { reason: "sigterm".into() };
        let bytes = encode(&msg).unwrap();
        let (payload, used) = parse(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(decode::<AgentMessage>(payload).unwrap(), msg);
        assert!(parse(&bytes[..bytes.len() - 1]).unwrap().is_none());
    }

    #[test]
    fn oversized_header_is_refused_before_allocation() {
        let err = parse(&[0xff, 0xff, 0xff, 0xff, 0]).unwrap_err();
        assert_eq!(err.to_string(), format!("frame of 4294967295 bytes is over the limit of {MAX_FRAME} bytes"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [&[0xffu8; 16][..], &[9, 9, 9], &[], &[0x80, 0x80, 0x80, 0x80, 0x80, 0x80]] {
            let _ = decode::<AgentMessage>(bytes).unwrap_err();
            let _ = decode::<LogBatch>(bytes);
        }
    }

    #[test]
    fn version_prefix() {
        let hello = Hello {
            token: "t".into(),
            agent_version: "0".into(),
            instance: 7,
            sent_at_ms: 1,
            hostname: "h".into(),
            ssh_host_key: None,
        };
        let bytes = encode_versioned(PROTOCOL_VERSION, &hello).unwrap();
        let (payload, _) = parse(&bytes).unwrap().unwrap();
        let (v, body) = split_version(payload).unwrap();
        assert_eq!(v, PROTOCOL_VERSION);
        assert_eq!(decode::<Hello>(body).unwrap(), hello);
    }

    #[test]
    fn rejection_layout_is_frozen() {
        // An agent of any version decodes this: variant 0, code, message.
        let r = HelloReply::Rejected { code: RejectCode::BadToken, message: "no".into() };
        assert_eq!(postcard::to_allocvec(&r).unwrap(), vec![0, 0, 2, b'n', b'o']);
    }
}
