//! Reading and writing frames on async streams (QUIC streams in practice).

use crate::frame::{self, FrameError};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Reads one frame's payload into `buf`. `Ok(false)` on a clean end of stream between frames.
pub async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<bool, FrameError> {
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
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
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
