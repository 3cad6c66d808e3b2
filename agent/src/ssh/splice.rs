//! Moving bytes between an SSH channel and a local stream, with bounded buffers both ways.
//!
//! Toward the client, every write waits for the client's channel window. From the client, packets
//! are taken from russh as they arrive and held in an [`inbound::Queue`](super::inbound::Queue), which
//! withholds the client's window while the local side is behind (see `inbound`).

use super::activity::Activity;
use super::inbound::Queue;
use russh::server::Msg;
use russh::{Channel, ChannelMsg, ChannelReadHalf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes read from a local source per write toward the client.
pub const COPY_CHUNK: usize = 32 * 1024;

/// What a copier toward the client is doing, for telling an idle source from a slow client.
#[derive(Debug, Default)]
pub struct PumpState {
    /// Completed reads from the source.
    pub reads: AtomicU64,
    /// True while waiting on the client (window or queue), false while waiting on the source.
    pub writing: AtomicBool,
}

/// Copies `from` to the channel writer `to` until end of file. A pty's EIO after its last process
/// exits counts as end of file. Returns the bytes copied.
pub async fn pump_out<R, W>(from: &mut R, to: &mut W, activity: &Activity, state: &PumpState) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(nix::libc::EIO) => return Ok(total),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        state.reads.fetch_add(1, Ordering::Relaxed);
        state.writing.store(true, Ordering::Relaxed);
        let written = to.write_all(&buf[..n]).await;
        state.writing.store(false, Ordering::Relaxed);
        written?;
        activity.sent(n);
        total += n as u64;
    }
}

/// How the client's side of a channel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundEnd {
    /// The client sent EOF; the local side's write half was shut down.
    Eof,
    /// The client closed the channel, or the connection ended.
    Closed,
    /// The local side stopped accepting bytes.
    LocalFailed,
}

/// Feeds the client's data to `to` until the client's EOF or close. Packets are taken from russh as
/// they arrive (into `input`, which withholds the client's window while `to` is behind), so russh's
/// session loop never waits on this channel.
pub async fn pump_in<W>(rx: &mut ChannelReadHalf, to: &mut W, activity: &Activity, input: &mut Queue) -> InboundEnd
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut eof = false;
    loop {
        if eof && input.is_empty() {
            let _ = to.shutdown().await;
            return InboundEnd::Eof;
        }
        tokio::select! {
            msg = rx.wait(), if !eof && input.has_room() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    activity.received(data.len());
                    input.push(data);
                }
                Some(ChannelMsg::Eof) => eof = true,
                Some(ChannelMsg::Close) | None => return InboundEnd::Closed,
                Some(_) => {}
            },
            written = to.write(input.front()), if !input.is_empty() => match written {
                Ok(n) if n > 0 => input.consume(n),
                _ => {
                    input.clear();
                    return InboundEnd::LocalFailed;
                }
            },
        }
    }
}

/// Waits for the client to close the channel, dropping anything it still sends.
pub async fn until_closed(rx: &mut ChannelReadHalf) {
    while let Some(msg) = rx.wait().await {
        if matches!(msg, ChannelMsg::Close) {
            return;
        }
    }
}

/// Splices a channel and a local stream (a forwarded TCP or Unix connection, an agent socket) until
/// both directions are done or either side gives up, then closes the channel.
pub async fn splice<S>(channel: Channel<Msg>, stream: S, activity: &Activity, mut input: Queue)
where
    S: AsyncRead + AsyncWrite + Send,
{
    let (mut rx, tx) = channel.split();
    let (mut local_read, mut local_write) = tokio::io::split(stream);
    let mut writer = tx.make_writer();
    let state = PumpState::default();
    let out = async {
        if let Err(e) = pump_out(&mut local_read, &mut writer, activity, &state).await {
            tracing::debug!(error = %e, "forwarded connection: reading the local side");
        }
        let _ = tx.eof().await;
    };
    tokio::pin!(out);
    let mut out_done = false;
    let end = {
        let inbound = pump_in(&mut rx, &mut local_write, activity, &mut input);
        tokio::pin!(inbound);
        loop {
            tokio::select! {
                () = &mut out, if !out_done => out_done = true,
                end = &mut inbound => break end,
            }
        }
    };
    match end {
        InboundEnd::Closed => {}
        InboundEnd::LocalFailed => {
            let _ = tx.close().await;
        }
        InboundEnd::Eof => {
            if !out_done {
                tokio::select! {
                    () = &mut out => {}
                    () = until_closed(&mut rx) => return,
                }
            }
            let _ = tx.close().await;
        }
    }
}
