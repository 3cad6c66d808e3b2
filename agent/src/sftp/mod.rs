//! An SFTP server (protocol version 3 with OpenSSH's extensions) on a byte stream: the `sftp`
//! subsystem for workspaces without OpenSSH's `sftp-server`. The SSH server runs it as
//! `tether-agent sftp-server`, with the channel on stdin and stdout and the user's home as the
//! working directory.
//!
//! - `wire`: packet decoding and encoding, no I/O.
//! - `session`: handles and filesystem operations, one request at a time.
//! - `listing`: `ls -l` lines for directory listings.
//!
//! Written here rather than on russh-sftp 3.0: that crate turns non-UTF-8 file names into
//! different names, keeps looping after an I/O error on its stream, and its server runs detached
//! with no way to learn when it ends.
//!
//! Limits: requests up to [`MAX_PACKET`] bytes (a longer one ends the session, as with OpenSSH),
//! reads and writes up to [`MAX_READ`], [`MAX_HANDLES`] open handles. Replies are buffered up to
//! about [`FLUSH_AT`] and written before more requests are read, so a client that stops reading
//! stops the server.

mod listing;
mod session;
mod wire;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::SystemTime;

pub use session::Session;
pub use wire::DecodeError;

/// Largest request accepted, as OpenSSH's sftp-server.
pub const MAX_PACKET: usize = 256 * 1024;
/// Largest read or write, leaving room for the header; announced through limits@openssh.com, so
/// OpenSSH's client reads and writes in pieces of this size.
pub const MAX_READ: usize = MAX_PACKET - 1024;
/// Open files and directories per session.
pub const MAX_HANDLES: usize = 1024;
/// Queued replies are written out once they reach this size, or when no request is waiting.
pub const FLUSH_AT: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SftpError {
    #[error("reading a request: {0}")]
    Read(io::Error),
    #[error("writing a reply: {0}")]
    Write(io::Error),
    #[error("the input ended inside a request")]
    Truncated,
    #[error("request of {len} bytes is over the limit of {MAX_PACKET}")]
    TooLong { len: usize },
    #[error("no working directory: {0}")]
    Home(io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// The client broke the protocol; the session ends.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("request of type {0} before init")]
    BeforeInit(u8),
    #[error("malformed request: {0}")]
    Malformed(DecodeError),
}

/// Serves SFTP on stdin and stdout, relative to the working directory, until stdin ends.
pub fn serve_stdio() -> Result<(), SftpError> {
    let home = std::env::current_dir().map_err(SftpError::Home)?;
    // Our own handles on fds 0 and 1: Rust's stdout is line-buffered, which suits text, not this.
    let input = io::stdin().as_fd().try_clone_to_owned().map_err(SftpError::Read)?;
    let output = io::stdout().as_fd().try_clone_to_owned().map_err(SftpError::Write)?;
    serve(std::fs::File::from(input), std::fs::File::from(output), home)
}

/// Serves one SFTP session: requests from `input`, replies to `output`, relative paths under
/// `home`. Returns when `input` ends between two requests.
pub fn serve(input: impl Read, mut output: impl Write, home: PathBuf) -> Result<(), SftpError> {
    tracing::debug!(home = %home.display(), "sftp session starts");
    let mut input = BufReader::with_capacity(64 * 1024, input);
    let mut session = Session::new(home);
    // Allocated (and zeroed) once; a request is read straight into it.
    let mut packet = vec![0; MAX_PACKET];
    let mut out = Vec::with_capacity(FLUSH_AT + MAX_PACKET);
    let result = loop {
        if !out.is_empty() && (out.len() >= FLUSH_AT || input.buffer().is_empty()) {
            output.write_all(&out).and_then(|()| output.flush()).map_err(SftpError::Write)?;
            out.clear();
        }
        let len = match read_packet(&mut input, &mut packet) {
            Ok(Some(len)) => len,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        if let Err(e) = session.handle(&packet[..len], SystemTime::now(), &mut out) {
            break Err(e.into());
        }
    };
    // Replies already made go out even when the session ends on an error.
    let flushed = output.write_all(&out).and_then(|()| output.flush()).map_err(SftpError::Write);
    tracing::debug!(ok = result.is_ok(), "sftp session ends");
    result.and(flushed)
}

/// Reads one length-prefixed packet into the start of `packet` (`MAX_PACKET` long) and returns its
/// length; `None` at a clean end of input.
fn read_packet(input: &mut impl BufRead, packet: &mut [u8]) -> Result<Option<usize>, SftpError> {
    if input.fill_buf().map_err(SftpError::Read)?.is_empty() {
        return Ok(None);
    }
    let mut len = [0; 4];
    input.read_exact(&mut len).map_err(truncated)?;
    let len = u32::from_be_bytes(len) as usize;
    let body = packet.get_mut(..len).ok_or(SftpError::TooLong { len })?;
    input.read_exact(body).map_err(truncated)?;
    Ok(Some(len))
}

fn truncated(e: io::Error) -> SftpError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        SftpError::Truncated
    } else {
        SftpError::Read(e)
    }
}

#[cfg(test)]
mod tests {
    use super::wire::client::*;
    use super::*;

    fn framed(bodies: &[Vec<u8>]) -> Vec<u8> {
        let mut v = Vec::new();
        for b in bodies {
            v.extend_from_slice(&(b.len() as u32).to_be_bytes());
            v.extend_from_slice(b);
        }
        v
    }

    fn run(input: &[u8]) -> (Result<(), SftpError>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let mut output = Vec::new();
        let result = serve(input, &mut output, dir.path().to_path_buf());
        (result, output)
    }

    #[test]
    fn replies_in_order_until_eof() {
        let init = vec![1, 0, 0, 0, 3];
        let input = framed(&[init, Req::new(REALPATH, 7).string(b".").0, Req::new(STAT, 8).string(b"nope").0]);
        let (result, output) = run(&input);
        result.unwrap();
        let kinds: Vec<(u8, u32)> = replies(&output).into_iter().map(|mut r| (r.kind, r.u32())).collect();
        assert_eq!(kinds, [(VERSION_REPLY, 3), (NAME, 7), (STATUS, 8)]);
    }

    #[test]
    fn framing_errors_end_the_session() {
        let (result, _) = run(&[]);
        result.unwrap();
        let (result, _) = run(&[0, 0]);
        assert_eq!(result.unwrap_err().to_string(), "the input ended inside a request");
        let (result, _) = run(&[0, 0, 0, 9, 1, 0]);
        assert_eq!(result.unwrap_err().to_string(), "the input ended inside a request");
        let (result, output) = run(&framed(&[vec![1, 0, 0, 0, 3], vec![0; MAX_PACKET + 1]]));
        assert_eq!(
            result.unwrap_err().to_string(),
            format!("request of {} bytes is over the limit of 262144", MAX_PACKET + 1)
        );
        assert_eq!(replies(&output).len(), 1, "the version reply still went out");
    }
}
