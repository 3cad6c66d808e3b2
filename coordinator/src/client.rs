//! The CLI's HTTP client: finds the coordinator (flags, environment, or its data directory) and
//! turns API errors into messages.

use crate::server::{CoordinatorInfo, ADMIN_TOKEN_FILE, INFO_FILE};
use anyhow::{anyhow, bail, Context};
use serde::de::DeserializeOwned;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest CA file read, so a wrong path fails cleanly.
const MAX_CA_FILE: u64 = 1024 * 1024;

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    ca: Option<PathBuf>,
}

impl Client {
    /// `--url`/`--token` win; otherwise the coordinator's data directory supplies both. An https://
    /// URL is checked against the system's roots and the coordinator's CA (`--ca`, or the data
    /// directory's).
    pub fn discover(
        url: Option<String>,
        token: Option<String>,
        ca: Option<PathBuf>,
        data_dir: &Path,
    ) -> anyhow::Result<Client> {
        let info_path = data_dir.join(INFO_FILE);
        let info = || -> Option<CoordinatorInfo> {
            std::fs::read(&info_path).ok().and_then(|b| serde_json::from_slice(&b).ok())
        };
        let ca = ca.or_else(|| info().map(|i| i.ca_cert).filter(|p| p.is_file()));
        let (url, token) = match (url, token) {
            (Some(u), Some(t)) => (u, t),
            (url, token) => {
                let info = info();
                let url = match url.or(info.as_ref().map(|i| i.api_url.clone())) {
                    Some(u) => u,
                    None => bail!(
                        "no coordinator to talk to: pass --url and --token (or TETHER_URL and TETHER_TOKEN), \
                         or --data-dir of a coordinator on this machine (no {} found)",
                        info_path.display()
                    ),
                };
                let token = match token {
                    Some(t) => t,
                    None => {
                        let p = data_dir.join(ADMIN_TOKEN_FILE);
                        std::fs::read_to_string(&p)
                            .with_context(|| {
                                format!("no API token: pass --token or TETHER_TOKEN (reading {})", p.display())
                            })?
                            .trim()
                            .to_string()
                    }
                };
                (url, token)
            }
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("--url '{url}' is not a URL: give it with its scheme, e.g. http://127.0.0.1:7080 or https://tether.example.com:7443");
        }
        Client::with_ca(url, token, ca)
    }

    pub fn new(base: String, token: String) -> Client {
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).build().unwrap_or_default();
        Client { http, base: base.trim_end_matches('/').to_string(), token, ca: None }
    }

    /// A client that also trusts the CA certificates in the PEM file `ca`.
    pub fn with_ca(base: String, token: String, ca: Option<PathBuf>) -> anyhow::Result<Client> {
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
        if let Some(path) = &ca {
            let mut pem = Vec::new();
            std::fs::File::open(path)
                .and_then(|f| f.take(MAX_CA_FILE).read_to_end(&mut pem))
                .with_context(|| format!("reading the CA file {}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| anyhow!("the CA file {} is not PEM certificates: {e}", path.display()))?;
            if certs.is_empty() {
                bail!("the CA file {} holds no certificate", path.display());
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| anyhow!("setting up the HTTP client: {}", chain(&e)))?;
        Ok(Client { http, base: base.trim_end_matches('/').to_string(), token, ca })
    }

    /// The CA file this client trusts besides the system's roots, if any.
    pub fn ca(&self) -> Option<&Path> {
        self.ca.as_deref()
    }

    fn unreachable(&self, e: reqwest::Error) -> anyhow::Error {
        let (builder, connect) = (e.is_builder(), e.is_connect());
        let why = chain(&e.without_url());
        let tls = why.contains("certificate") || why.contains("tls") || why.contains("TLS");
        // The scheme that does not match the port: TLS bytes read as HTTP, or HTTP read as TLS.
        let tls_port = self.base.starts_with("http://") && why.contains("invalid HTTP version");
        let plain_port = self.base.starts_with("https://")
            && (why.contains("InvalidContentType") || why.contains("corrupt message"));
        let hint = if tls_port {
            "; that port speaks HTTPS: give the URL as https://"
        } else if plain_port {
            "; that port speaks plain HTTP: give the URL as http://"
        } else if tls && self.base.starts_with("https://") {
            "; pass the coordinator's CA with --ca FILE (TETHER_CA) if its certificate is its own"
        } else {
            ""
        };
        let message = format!("cannot reach the coordinator at {}: {why}{hint}", self.base);
        anyhow::Error::new(Unreachable { message, transient: !tls && !builder && !tls_port && !plain_port, connect })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// An HTTP/1.1 upgrade to `protocol`: the raw byte stream after a 101, with the answer's
    /// headers, or the API's error.
    pub async fn upgrade(
        &self,
        path: &str,
        protocol: &str,
    ) -> anyhow::Result<(reqwest::Upgraded, reqwest::header::HeaderMap)> {
        let resp = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.token)
            .header(reqwest::header::CONNECTION, "upgrade")
            .header(reqwest::header::UPGRADE, protocol)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        if status != reqwest::StatusCode::SWITCHING_PROTOCOLS {
            let body = resp.bytes().await.unwrap_or_default();
            return Err(api_error(status, &body).into());
        }
        let headers = resp.headers().clone();
        let stream = resp.upgrade().await.map_err(|e| anyhow!("upgrading the connection: {e}"))?;
        Ok((stream, headers))
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let resp = req.bearer_auth(&self.token).send().await.map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let body = resp.bytes().await.context("reading the coordinator's answer")?;
        if !status.is_success() {
            return Err(api_error(status, &body).into());
        }
        serde_json::from_slice(&body)
            .with_context(|| format!("the coordinator's answer is not what this CLI expects (HTTP {status})"))
    }

    /// A POST whose answer is a byte stream rather than JSON: the response after a success status,
    /// for the caller to read in chunks; otherwise the API's error.
    pub async fn post_raw(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let resp =
            self.http.post(self.url(path)).bearer_auth(&self.token).send().await.map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.bytes().await.unwrap_or_default();
            return Err(api_error(status, &body).into());
        }
        Ok(resp)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.get(self.url(path))).await
    }

    /// A long-poll: no overall request timeout, the server bounds the wait.
    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<T> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.delete(self.url(path))).await
    }
}

/// The coordinator did not answer: not running, restarting, or not reachable from here.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Unreachable {
    message: String,
    /// Worth trying again (it may be restarting), as a certificate problem is not.
    pub transient: bool,
    /// No connection was made (refused, no route), as opposed to one cut off.
    pub connect: bool,
}

/// An error and its causes, `a: b: c` (reqwest's own message leaves out why a request failed).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The coordinator answered with an error.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiFailure {
    pub status: reqwest::StatusCode,
    /// The `error` sentence of the answer (or the bare HTTP status), with a hint for a route the
    /// coordinator does not have.
    message: String,
    /// The coordinator has no such route: it is older than this CLI, most likely.
    pub no_route: bool,
}

/// The `error` sentence of an API error answer, or the bare HTTP status.
fn api_error(status: reqwest::StatusCode, body: &[u8]) -> ApiFailure {
    let sentence = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string));
    let no_route = status == reqwest::StatusCode::NOT_FOUND && sentence.as_deref() == Some(crate::api::NO_ROUTE);
    let message = match sentence {
        // The CLI asked for something this coordinator does not know: upgrading the CLI before
        // the coordinator is the usual way to get here.
        Some(s) if no_route => format!(
            "{s}: the coordinator is probably older than this CLI (tether {}); upgrade it, or use the CLI of its version",
            env!("CARGO_PKG_VERSION")
        ),
        Some(s) => s,
        None => format!("HTTP {status}"),
    };
    ApiFailure { status, message, no_route }
}

/// Percent-encodes a path segment or query value.
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_the_coordinator_lacks_is_told_as_a_version_mismatch() {
        let f = api_error(reqwest::StatusCode::NOT_FOUND, br#"{"error":"no such API route"}"#);
        assert!(f.no_route);
        assert!(f.to_string().starts_with("no such API route: the coordinator is probably older than this CLI"), "{f}");
        // Any other 404 is what it says.
        let f = api_error(reqwest::StatusCode::NOT_FOUND, br#"{"error":"no workspace 'x'"}"#);
        assert!(!f.no_route);
        assert_eq!(f.to_string(), "no workspace 'x'");
        assert_eq!(api_error(reqwest::StatusCode::BAD_GATEWAY, b"<html>").to_string(), "HTTP 502 Bad Gateway");
    }
}
