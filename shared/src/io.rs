//! Reading and writing frames on async streams (QUIC streams in practice).

use crate::frame::{self, FrameError};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Reads one frame's payload into `buf`. `Ok(false)` on a clean end of stream between frames.
pub async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<bool, FrameError> {
    read_payload_max(r, buf, crate::limits::MAX_FRAME).await
}

/// Like [`read_payload`], with a lower limit than [`crate::limits::MAX_FRAME`] for this frame. The
/// buffer grows with the bytes that arrive, not with the length the header claims, so a peer that
/// announces a large frame and sends nothing costs nothing.
pub async fn read_payload_max<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<bool, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 { Ok(false) } else { Err(FrameError::Truncated) };
        }
        got += n;
    }
    let len = frame::payload_len(header)?;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    buf.clear();
    // `len` fits in u64: it is at most MAX_FRAME.
    r.take(len as u64).read_to_end(buf).await?;
    if buf.len() < len {
        return Err(FrameError::Truncated);
    }
    Ok(true)
}

/// Reads and decodes one message; `Ok(None)` on a clean end of stream.
pub async fn read_msg<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<T>, FrameError> {
    if !read_payload(r, buf).await? {
        return Ok(None);
    }
    frame::decode(buf).map(Some)
}

/// Encodes and writes one message.
pub async fn write_msg<T: Serialize, W: AsyncWrite + Unpin>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let bytes = frame::encode(msg)?;
    w.write_all(&bytes).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_frame_announced_but_not_sent_allocates_nothing_and_is_truncated() {
        let header = (crate::limits::MAX_FRAME as u32).to_be_bytes();
        let mut input: &[u8] = &[&header[..], b"only this"].concat();
        let mut buf = Vec::new();
        let err = read_payload(&mut input, &mut buf).await.unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");
        assert!(buf.capacity() < 64 * 1024, "capacity {} for 9 bytes received", buf.capacity());
    }

    #[tokio::test]
    async fn a_lower_limit_refuses_a_larger_frame_before_reading_it() {
        let mut input: &[u8] = &[0, 0, 1, 0, 0xff];
        let err = read_payload_max(&mut input, &mut Vec::new(), 255).await.unwrap_err();
        assert_eq!(err.to_string(), "frame of 256 bytes is over the limit of 255 bytes");
    }

    #[tokio::test]
    async fn frames_round_trip_and_a_clean_end_is_not_an_error() {
        let mut bytes = frame::encode(&"hello".to_string()).unwrap();
        bytes.extend(frame::encode(&"world".to_string()).unwrap());
        let mut input: &[u8] = &bytes;
        let mut buf = Vec::new();
        assert_eq!(read_msg::<String, _>(&mut input, &mut buf).await.unwrap().as_deref(), Some("hello"));
        assert_eq!(read_msg::<String, _>(&mut input, &mut buf).await.unwrap().as_deref(), Some("world"));
        assert_eq!(read_msg::<String, _>(&mut input, &mut buf).await.unwrap(), None);
    }
}
