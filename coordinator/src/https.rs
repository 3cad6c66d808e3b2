//! The HTTP listeners: the API port, and the HTTPS one that serves the same router (the JSON API and
//! the agent download) over TLS. The HTTPS certificate is one the coordinator's own CA issues at each
//! start, or one ops supply (`--tls-cert`, `--tls-key`, e.g. a public certificate). On both,
//! connections are capped, and a TLS handshake, a request's headers and every write have deadlines,
//! so idle, slow or stalled peers cannot pile up.

use crate::places::{source_of, Places};
use crate::ratelimit::RateLimiter;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics::Counter;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::time::Sleep;
use tracing::{debug, warn};

/// Connections open at once, and from one source (an IPv4 address or an IPv6 /64); more are closed
/// as they are accepted. A source is allowed a quarter: one client cannot take every place, while
/// a host that boots many workspaces at once (each fetching the agent) still gets plenty.
pub const MAX_CONNECTIONS: usize = 4096;
pub const MAX_CONNECTIONS_PER_SOURCE: usize = MAX_CONNECTIONS / 4;
/// Time a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Time open requests get to finish at shutdown.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a write to a client may wait for the client to read, as nginx's `send_timeout`: a client
/// that stops reading a response (say the agent download) would otherwise keep its place for good.
/// Long polls are unaffected (they wait without writing), and so are `tether ssh` connections
/// once upgraded: a suspended SSH client may stop reading for as long as it likes.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Counters of connections a listener closed on its own.
#[derive(Clone)]
pub struct Drops {
    /// Refused at accept: the listener or the source had no place left.
    pub connection_limit: Counter,
    /// Closed because a write waited [`WRITE_STALL_TIMEOUT`] for the client to read.
    pub write_stalled: Counter,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    #[error("{}: {message}", path.display())]
    Pem { path: PathBuf, message: String },
    #[error("{}: holds no certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error("the private key in {} is not the key of the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{}, {}: {message}", cert.display(), key.display())]
    Unusable { cert: PathBuf, key: PathBuf, message: String },
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
}

/// Reads a certificate chain (leaf first) and its private key from PEM files.
pub fn load_pem(cert: &Path, key: &Path) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), HttpsError> {
    let pem = |path: &Path| {
        let path = path.to_path_buf();
        move |e: rustls_pki_types::pem::Error| HttpsError::Pem { path, message: e.to_string() }
    };
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert).map_err(pem(cert))?.collect::<Result<_, _>>().map_err(pem(cert))?;
    if chain.is_empty() {
        return Err(HttpsError::NoCertificate(cert.to_path_buf()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(pem(key))?;
    // The pair must make a server configuration: a key of another certificate (or of a kind
    // rustls cannot sign with) is found here, when `config check` runs, and not once `serve` has
    // begun to create its files.
    match server_config(chain.clone(), key_der.clone_key()) {
        Ok(_) => Ok((chain, key_der)),
        Err(HttpsError::Tls(rustls::Error::InconsistentKeys(_))) => {
            Err(HttpsError::KeyMismatch { cert: cert.to_path_buf(), key: key.to_path_buf() })
        }
        Err(e) => {
            Err(HttpsError::Unusable { cert: cert.to_path_buf(), key: key.to_path_buf(), message: e.to_string() })
        }
    }
}

/// The host part of `HOST:PORT`, `[V6]:PORT` or a URL, for a certificate name.
pub fn host_of(addr: &str) -> Option<String> {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split_once(']').map(|(h, _)| h)?
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    (!host.is_empty()).then(|| host.to_string())
}

/// `https://HOST[:PORT]`, as workspaces will fetch from it; kept without a trailing `/`.
pub fn parse_https_url(s: &str) -> Result<String, String> {
    let bad = |why: &str| format!("'{s}' is not an https://HOST[:PORT] URL ({why})");
    let rest = s.strip_prefix("https://").ok_or_else(|| bad("it must start with https://"))?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains(|c: char| c.is_whitespace() || "/?#@'\"\\".contains(c)) {
        return Err(bad("give only the host and port"));
    }
    host_of(rest).ok_or_else(|| bad("no host"))?;
    let after_host = rest.rsplit_once(']').map_or(rest, |(_, p)| p);
    if let Some((_, port)) = after_host.rsplit_once(':') {
        port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| bad("the port is not 1-65535"))?;
    }
    Ok(format!("https://{rest}"))
}

/// The TLS settings: TLS 1.3 and 1.2 (BusyBox's wget speaks only 1.2), HTTP/1.1.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, HttpsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(tether_shared::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `router` on `listener`, over TLS with `tls`, until `shutdown` turns true, then lets open
/// requests finish for up to [`DRAIN_TIMEOUT`]. `what` names the listener in logs.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
    what: &'static str,
    drops: Drops,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let sources = Places::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_SOURCE);
    // Log lines about refused connections: one every 10 s per source address.
    let mut refusals_logged = RateLimiter::new(0.1, 1);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stopped(&mut shutdown) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                warn!(error = %e, "{what}: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let place = match sources.take(peer.ip()) {
            Ok(place) => place,
            Err(full) => {
                drops.connection_limit.increment(1);
                let source = source_of(peer.ip()).to_string();
                if let Some(earlier) = refusals_logged.log_line(&source, Instant::now()) {
                    warn!(%peer, "{what}: refusing connection: {}{earlier}", full.describe("are open"));
                }
                continue;
            }
        };
        // Never refused: each permit is held with a place, and there are as many permits as places.
        // The permits are what shutdown waits on.
        let Ok(permit) = open.clone().try_acquire_owned() else { continue };
        // No Nagle delay: `tether ssh` carries interactive SSH over these ports.
        let _ = tcp.set_nodelay(true);
        let (acceptor, router, shutdown) = (acceptor.clone(), router.clone(), shutdown.clone());
        let stalled = drops.write_stalled.clone();
        tokio::spawn(async move {
            match acceptor {
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => return debug!(%peer, error = %e, "{what}: tls handshake failed"),
                        Err(_) => return debug!(%peer, "{what}: tls handshake timed out"),
                    };
                    connection(tls, peer, router, shutdown, what, stalled).await
                }
                None => connection(tcp, peer, router, shutdown, what, stalled).await,
            }
            drop((permit, place));
        });
    }
    drop(listener);
    // Every permit back means every connection has finished.
    let all = MAX_CONNECTIONS as u32;
    if tokio::time::timeout(DRAIN_TIMEOUT, open.acquire_many(all)).await.is_err() {
        warn!("{what}: open requests did not finish in time");
    }
}

/// Resolves once shutdown is asked for (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// One HTTP/1.1 connection: requests' headers within [`HEADER_TIMEOUT`], writes within
/// [`WRITE_STALL_TIMEOUT`] until an upgrade, upgrades allowed.
async fn connection<S>(
    stream: S,
    peer: SocketAddr,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
    what: &'static str,
    stalled: Counter,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stream = WriteDeadline::new(stream, WRITE_STALL_TIMEOUT, stalled);
    let upgrading = stream.upgrading();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        // What handlers read the client's address from, and what an upgrade lifts the write
        // deadline with.
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(upgrading.clone());
        tower_service::Service::call(&mut router.clone(), req)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stopped(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "{what}: connection ended with an error");
    }
}

/// Set by a handler that upgrades its connection (`tether ssh`): from then on the connection's
/// writes may wait for the client as long as it takes. Found in each request's extensions.
#[derive(Debug, Clone, Default)]
pub struct Upgrading(Arc<AtomicBool>);

impl Upgrading {
    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// `inner`, whose writes (and flushes and shutdowns) fail with [`io::ErrorKind::TimedOut`] when one
/// waits `limit` for the peer to make room, unless [`Upgrading`] was set first. Counts each such
/// failure in `stalled`.
struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    stalled: Counter,
    /// Armed while a write waits; disarmed by any progress.
    waiting: Option<Pin<Box<Sleep>>>,
    upgrading: Upgrading,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S, limit: Duration, stalled: Counter) -> Self {
        WriteDeadline { inner, limit, stalled, waiting: None, upgrading: Upgrading::default() }
    }

    fn upgrading(&self) -> Upgrading {
        self.upgrading.clone()
    }

    /// Passes on a write's outcome: progress disarms the deadline; waiting arms it (or, once it has
    /// passed, fails).
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() || self.upgrading.0.load(Ordering::Relaxed) {
            self.waiting = None;
            return poll;
        }
        let limit = self.limit;
        let waiting = self.waiting.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match waiting.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.stalled.increment(1);
                // Once: hyper does not write again after an error.
                self.waiting = None;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client read nothing for {}s", limit.as_secs()),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_from_addresses_and_urls() {
        for (input, want) in [
            ("tether.example.com:7443", Some("tether.example.com")),
            ("https://tether.example.com:7443/", Some("tether.example.com")),
            ("https://tether.example.com", Some("tether.example.com")),
            ("[2001:db8::1]:7443", Some("2001:db8::1")),
            ("https://[::1]:7443/x", Some("::1")),
            ("10.0.0.1:2222", Some("10.0.0.1")),
            (":7443", None),
        ] {
            assert_eq!(host_of(input).as_deref(), want, "{input}");
        }
    }

    #[test]
    fn advertised_urls_are_https_with_a_host() {
        assert_eq!(parse_https_url("https://tether.example.com:7443/").unwrap(), "https://tether.example.com:7443");
        assert_eq!(parse_https_url("https://[::1]:7443").unwrap(), "https://[::1]:7443");
        assert_eq!(parse_https_url("https://h").unwrap(), "https://h");
        for bad in [
            "http://h:7443",
            "h:7443",
            "https://",
            "https://h:0",
            "https://h:x",
            "https://h/p",
            "https://u@h",
            "https://h'",
        ] {
            assert!(parse_https_url(bad).is_err(), "{bad}");
        }
    }
}
