//! The coordinator under test: a real `tether serve` child process on 127.0.0.1 in a temporary data
//! directory, and a small client for the parts of its HTTP API the benchmark uses.

use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest a coordinator may take to write `coordinator.json` after it is spawned.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest one ordinary API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Times one creation is retried after "database is locked".
const MAX_LOCKED_RETRIES: u32 = 100;

/// A binary of this workspace, from the directory the benchmark itself runs from.
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the tether-bench executable")?;
    let path = exe.parent().ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?.join(name);
    if !path.exists() {
        bail!("{} does not exist; build it with `cargo build --release --workspace`", path.display());
    }
    Ok(path)
}

/// What `coordinator.json` says, the parts the benchmark uses.
#[derive(Debug, Clone)]
pub struct Info {
    pub api_url: String,
    pub agent_coordinator: String,
    pub http_addr: SocketAddr,
    pub quic_addr: SocketAddr,
    pub ca_cert: PathBuf,
    pub admin_token_file: PathBuf,
}

impl Info {
    fn read(path: &Path) -> anyhow::Result<Info> {
        let v: Value =
            serde_json::from_slice(&std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
                .with_context(|| format!("parsing {}", path.display()))?;
        let s = |k: &str| v[k].as_str().map(str::to_string).ok_or_else(|| anyhow!("{} has no '{k}'", path.display()));
        let addr = |k: &str| -> anyhow::Result<SocketAddr> {
            s(k)?.parse().with_context(|| format!("'{k}' in {}", path.display()))
        };
        Ok(Info {
            api_url: s("api_url")?,
            agent_coordinator: s("agent_coordinator")?,
            http_addr: addr("http_addr")?,
            quic_addr: addr("quic_addr")?,
            ca_cert: PathBuf::from(s("ca_cert")?),
            admin_token_file: PathBuf::from(s("admin_token_file")?),
        })
    }
}

/// When a (re)start happened.
#[derive(Debug, Clone, Copy)]
pub struct Started {
    /// Just before the process was spawned.
    pub spawned: Instant,
    /// When `coordinator.json` appeared (ports bound, workspaces resumed).
    pub ready: Instant,
}

pub struct Coordinator {
    binary: PathBuf,
    /// Removed on drop unless [`Coordinator::keep`] is called.
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    log_filter: String,
    child: Option<Child>,
    pub info: Info,
    pub api: Api,
}

impl Coordinator {
    /// Starts `tether serve` in a fresh temporary data directory, on 127.0.0.1 with ports chosen by
    /// the kernel.
    pub async fn start(binary: PathBuf, log_filter: &str) -> anyhow::Result<(Coordinator, Started)> {
        let dir =
            tempfile::Builder::new().prefix("tether-bench-").tempdir().context("creating a temporary directory")?;
        let path = dir.path().to_path_buf();
        let (child, info, started) = spawn(&binary, &path, log_filter, 0, 0).await?;
        let api = Api::new(&info)?;
        let log_filter = log_filter.to_string();
        Ok((Coordinator { binary, dir: Some(dir), path, log_filter, child: Some(child), info, api }, started))
    }

    pub fn data_dir(&self) -> &Path {
        &self.path
    }

    pub fn log_path(&self) -> PathBuf {
        self.path.join("coordinator.log")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, then reap: no goodbye to anyone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same HTTP and QUIC ports and the same data directory.
    pub async fn start_again(&mut self) -> anyhow::Result<Started> {
        self.kill();
        let (http, quic) = (self.info.http_addr.port(), self.info.quic_addr.port());
        let (child, info, started) = spawn(&self.binary, &self.path, &self.log_filter, http, quic).await?;
        self.child = Some(child);
        self.api = Api::new(&info)?;
        self.info = info;
        Ok(started)
    }

    /// Keeps the data directory (database, log) when this is dropped.
    pub fn keep(&mut self) -> &Path {
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
        }
        &self.path
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn spawn(
    binary: &Path,
    dir: &Path,
    log_filter: &str,
    http_port: u16,
    quic_port: u16,
) -> anyhow::Result<(Child, Info, Started)> {
    let info_path = dir.join("coordinator.json");
    let _ = std::fs::remove_file(&info_path);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("coordinator.log"))
        .context("opening the coordinator log")?;
    let mut cmd = Command::new(binary);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(dir)
        .arg("--listen-http")
        .arg(format!("127.0.0.1:{http_port}"))
        .arg("--listen-quic")
        .arg(format!("127.0.0.1:{quic_port}"))
        .args(["--listen-https", "127.0.0.1:0"])
        .env("TETHER_LOG", log_filter)
        .env_remove("TETHER_MAX_AGENTS")
        .env_remove("TETHER_ADVERTISE_QUIC")
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("coordinator log")?)
        .stderr(log);
    let spawned = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {}", binary.display()))?;
    let deadline = spawned + START_TIMEOUT;
    loop {
        if info_path.exists() {
            break;
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "tether serve exited with {status} before it was ready; see {}",
                dir.join("coordinator.log").display()
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("tether serve did not write coordinator.json within {}s", START_TIMEOUT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ready = Instant::now();
    let info = Info::read(&info_path)?;
    Ok((child, info, Started { spawned, ready }))
}

/// The coordinator's HTTP API, as an admin.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    fn new(info: &Info) -> anyhow::Result<Api> {
        let token = std::fs::read_to_string(&info.admin_token_file)
            .with_context(|| format!("reading {}", info.admin_token_file.display()))?
            .trim()
            .to_string();
        // No proxy: the coordinator is on loopback, whatever the environment says.
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;
        Ok(Api { http, base: format!("{}/api/v1", info.api_url), token })
    }

    async fn send(&self, req: reqwest::RequestBuilder, what: &str, timeout: Duration) -> anyhow::Result<Value> {
        let resp = req.bearer_auth(&self.token).timeout(timeout).send().await.with_context(|| what.to_string())?;
        let status = resp.status();
        let body = resp.text().await.with_context(|| format!("{what}: reading the response"))?;
        if !status.is_success() {
            bail!("{what}: HTTP {status}: {}", body.chars().take(500).collect::<String>());
        }
        serde_json::from_str(&body).with_context(|| format!("{what}: response is not JSON"))
    }

    /// Creates a workspace without starting it; returns its agent token and how many times the
    /// request was retried because the coordinator's database was locked (HTTP 500). Retrying is
    /// safe there: the failing transaction is the one that inserts the workspace, so nothing was
    /// stored.
    pub async fn create(&self, name: &str, template: &str) -> anyhow::Result<(String, u32)> {
        let body = serde_json::json!({ "name": name, "template": template, "start": false });
        let what = format!("creating workspace {name}");
        let mut retries = 0;
        loop {
            let req = self.http.post(format!("{}/workspaces", self.base)).json(&body);
            match self.send(req, &what, REQUEST_TIMEOUT).await {
                Ok(v) => {
                    let token =
                        v["agent_token"].as_str().ok_or_else(|| anyhow!("{what}: no agent_token in the answer"))?;
                    return Ok((token.to_string(), retries));
                }
                Err(e) if retries < MAX_LOCKED_RETRIES && format!("{e:#}").contains("database is locked") => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(rand::random_range(5..50))).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn status_counts(&self) -> anyhow::Result<StatusCounts> {
        let v = self
            .send(
                self.http.get(format!("{}/status-counts", self.base)),
                "reading status counts",
                Duration::from_secs(10),
            )
            .await?;
        let map: BTreeMap<String, i64> = serde_json::from_value(v).context("status counts")?;
        Ok(StatusCounts(map))
    }

    /// Long-polls until the workspace is running (the server holds the request).
    pub async fn wait_running(&self, name: &str, timeout_s: u64) -> anyhow::Result<Value> {
        let url = format!("{}/workspaces/{name}/wait?for=running&timeout={timeout_s}", self.base);
        self.send(self.http.get(url), &format!("waiting for {name} to run"), Duration::from_secs(timeout_s + 10)).await
    }

    pub async fn timings(&self, name: &str) -> anyhow::Result<Vec<Value>> {
        let v = self
            .send(self.http.get(format!("{}/workspaces/{name}/timings", self.base)), "reading timings", REQUEST_TIMEOUT)
            .await?;
        serde_json::from_value(v).context("timings")
    }
}

/// `/api/v1/status-counts`: workspaces per status.
#[derive(Debug, Clone, Default)]
pub struct StatusCounts(pub BTreeMap<String, i64>);

impl StatusCounts {
    pub fn get(&self, status: &str) -> i64 {
        self.0.get(status).copied().unwrap_or(0)
    }

    pub fn running(&self) -> i64 {
        self.get("running")
    }

    pub fn unhealthy(&self) -> i64 {
        self.get("unhealthy")
    }

    /// "running 9990, starting 10": the non-zero counts.
    pub fn brief(&self) -> String {
        let parts: Vec<String> = self.0.iter().filter(|(_, n)| **n != 0).map(|(s, n)| format!("{s} {n}")).collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}
