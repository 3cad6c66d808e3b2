//! The CLI's HTTP client: finds the coordinator (flags, environment, or its data directory) and
//! turns API errors into messages.

use crate::server::{CoordinatorInfo, ADMIN_TOKEN_FILE, INFO_FILE};
use anyhow::{anyhow, bail, Context};
use serde::de::DeserializeOwned;
use std::path::Path;
use std::time::Duration;

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    /// `--url`/`--token` win; otherwise the coordinator's data directory supplies both.
    pub fn discover(url: Option<String>, token: Option<String>, data_dir: &Path) -> anyhow::Result<Client> {
        let (url, token) = match (url, token) {
            (Some(u), Some(t)) => (u, t),
            (url, token) => {
                let info_path = data_dir.join(INFO_FILE);
                let info: Option<CoordinatorInfo> =
                    std::fs::read(&info_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
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
        Ok(Client::new(url, token))
    }

    pub fn new(base: String, token: String) -> Client {
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).build().unwrap_or_default();
        Client { http, base: base.trim_end_matches('/').to_string(), token }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// An HTTP/1.1 upgrade to `protocol`: the raw byte stream after a 101, or the API's error.
    pub async fn upgrade(&self, path: &str, protocol: &str) -> anyhow::Result<reqwest::Upgraded> {
        let resp = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.token)
            .header(reqwest::header::CONNECTION, "upgrade")
            .header(reqwest::header::UPGRADE, protocol)
            .send()
            .await
            .map_err(|e| anyhow!("cannot reach the coordinator at {}: {}", self.base, e.without_url()))?;
        let status = resp.status();
        if status != reqwest::StatusCode::SWITCHING_PROTOCOLS {
            let body = resp.bytes().await.unwrap_or_default();
            bail!("{}", api_error(status, &body));
        }
        resp.upgrade().await.map_err(|e| anyhow!("upgrading the connection: {e}"))
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| anyhow!("cannot reach the coordinator at {}: {}", self.base, e.without_url()))?;
        let status = resp.status();
        let body = resp.bytes().await.context("reading the coordinator's answer")?;
        if !status.is_success() {
            bail!("{}", api_error(status, &body));
        }
        serde_json::from_slice(&body)
            .with_context(|| format!("the coordinator's answer is not what this CLI expects (HTTP {status})"))
    }

    /// A POST whose answer is a byte stream rather than JSON: the response after a success status,
    /// for the caller to read in chunks; otherwise the API's error.
    pub async fn post_raw(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let resp = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| anyhow!("cannot reach the coordinator at {}: {}", self.base, e.without_url()))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.bytes().await.unwrap_or_default();
            bail!("{}", api_error(status, &body));
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

/// The `error` sentence of an API error answer, or the bare HTTP status.
fn api_error(status: reqwest::StatusCode, body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| format!("HTTP {status}"))
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
