//! `tether serve`: binds the HTTP API and the agent tunnel, writes `coordinator.json`, and runs until
//! the shutdown future resolves. Takes its settings already parsed; `main` stays thin.

use crate::api::{self, ApiState};
use crate::datalock::LockError;
use crate::engine::{Engine, EngineConfig};
use crate::pki::{self, Pki};
use crate::store::Store;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen_http: SocketAddr,
    pub listen_quic: SocketAddr,
    /// The QUIC address agents should dial, when it differs from the bound one.
    pub advertise_quic: Option<String>,
    /// `tether-agent` for the process provisioner; defaults to the one next to `tether`.
    pub agent_binary: Option<PathBuf>,
    pub max_agents: usize,
    /// The SSH front door's TCP address; `None` turns it off.
    pub listen_ssh: Option<SocketAddr>,
    /// The HOST:PORT users dial for the front door, when it differs from the bound address.
    pub advertise_ssh: Option<String>,
    /// What workspace host names end in (`.tether`).
    pub ssh_host_suffix: String,
    /// Time from connecting to the front door to logging in.
    pub ssh_login_grace: Duration,
    /// The HTTPS listener (the API and the agent download); `None` turns it off.
    pub listen_https: Option<SocketAddr>,
    /// The `https://HOST[:PORT]` URL workspaces use, when it differs from the bound address.
    pub advertise_https: Option<String>,
    /// Ops' own certificate chain and key (PEM) for HTTPS; otherwise the coordinator's CA issues one.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// How long ended SSH connections stay in the audit log; `None` is for ever.
    pub keep_audit: Option<Duration>,
    /// How long earlier builds' logs and timings are kept; `None` is for ever.
    pub keep_builds: Option<Duration>,
    /// Most log bytes kept per build.
    pub max_build_log_bytes: u64,
}

/// What `tether serve` writes to `DATA/coordinator.json` once its ports are bound.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CoordinatorInfo {
    pub version: String,
    pub pid: u32,
    pub http_addr: SocketAddr,
    pub quic_addr: SocketAddr,
    pub ssh_addr: Option<SocketAddr>,
    /// What `tether config-ssh` writes as the front door's address.
    pub ssh_front_door: Option<String>,
    pub api_url: String,
    /// The HTTPS listener's bound address and the URL workspaces use; `None` when it is off.
    #[serde(default)]
    pub https_addr: Option<SocketAddr>,
    #[serde(default)]
    pub https_url: Option<String>,
    pub agent_coordinator: String,
    pub ca_cert: PathBuf,
    pub ca_sha256: String,
    pub admin_token_file: PathBuf,
}

const UDP_BUFFER: usize = 4 << 20;

pub const INFO_FILE: &str = "coordinator.json";
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// A coordinator that is up: its addresses and a handle to stop it.
pub struct Running {
    pub info: CoordinatorInfo,
    pub engine: Arc<Engine>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Graceful stop: agents are asked to reconnect later, then the ports close.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        let result = self.task.await.context("coordinator task")?;
        // After a clean stop the CLI says no coordinator runs here, not that it cannot reach one.
        if let Some(dir) = self.info.admin_token_file.parent() {
            let path = dir.join(INFO_FILE);
            let ours = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<CoordinatorInfo>(&b).ok())
                .is_some_and(|i| i.pid == self.info.pid);
            if ours {
                let _ = std::fs::remove_file(&path);
            }
        }
        result
    }
}

fn default_agent_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("tether-agent")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("tether-agent"))
}

/// Makes the admin token on first start: the hash goes into the database, the token itself into a
/// file only the coordinator's user can read, for the CLI on this machine.
async fn admin_token(store: &Store, data_dir: &Path) -> anyhow::Result<String> {
    if let Some(hash) = store.setting("admin_token_hash").await? {
        return Ok(hash);
    }
    let token = pki::new_token("tether_admin");
    let hash = pki::hash_token(&token);
    pki::write_private(&data_dir.join(ADMIN_TOKEN_FILE), format!("{token}\n").as_bytes())?;
    store.set_setting("admin_token_hash", &hash).await?;
    info!(file = %data_dir.join(ADMIN_TOKEN_FILE).display(), "created the admin API token");
    Ok(hash)
}

/// Binds and starts a coordinator in this process.
pub async fn start(config: ServeConfig) -> anyhow::Result<Running> {
    let data_dir = std::path::absolute(&config.data_dir).context("data directory")?;
    // Private, as `admin restore` makes it: the database holds the audit log and users' keys, and
    // the CA's private key is beside it.
    tether_shared::fs::create_private_dir(&data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    // First: a second coordinator must not touch the database, the keys or `coordinator.json`.
    let lock = match crate::datalock::lock(&data_dir, "serve") {
        Ok(lock) => Some(lock),
        Err(e @ LockError::Held { .. }) => {
            anyhow::bail!("{e}; stop it first, or use another data directory")
        }
        Err(e @ LockError::Unsupported { .. }) => {
            warn!(error = %e, "running without the data directory's lock: make sure no other coordinator uses it");
            None
        }
        Err(e) => return Err(e.into()),
    };
    // The ports first: one in use must not leave a new CA and admin token behind.
    let http = tokio::net::TcpListener::bind(config.listen_http)
        .await
        .with_context(|| format!("binding the HTTP API on {}", config.listen_http))?;
    let http_addr = http.local_addr()?;
    let udp = std::net::UdpSocket::bind(config.listen_quic)
        .with_context(|| format!("binding the agent tunnel (QUIC) on {}", config.listen_quic))?;
    let quic_addr = udp.local_addr()?;
    // Thousands of agents reconnecting at once overflow Linux's default 208 KB receive buffer; the
    // kernel caps the request at net.core.rmem_max.
    match quinn::udp::UdpSocketState::new((&udp).into())
        .and_then(|s| s.set_recv_buffer_size((&udp).into(), UDP_BUFFER).map(|_| s))
    {
        Ok(state) => {
            let got = state.recv_buffer_size((&udp).into()).unwrap_or(0);
            if got < UDP_BUFFER {
                warn!(granted = got, wanted = UDP_BUFFER, "UDP receive buffer is small; raise net.core.rmem_max");
            }
        }
        Err(e) => warn!(error = %e, "could not size the UDP receive buffer"),
    }
    let ssh = match config.listen_ssh {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the SSH front door on {addr}"))?,
        ),
        None => None,
    };
    let ssh_addr = ssh.as_ref().map(|l| l.local_addr()).transpose()?;
    let https = match config.listen_https {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the HTTPS API on {addr}"))?,
        ),
        None => None,
    };
    let https_addr = https.as_ref().map(|l| l.local_addr()).transpose()?;
    let pki = Pki::load_or_create(&data_dir)?;
    let reachable = |a: SocketAddr| -> SocketAddr {
        if a.ip().is_unspecified() {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), a.port())
        } else {
            a
        }
    };
    let ssh_front_door = ssh_addr.map(|a| config.advertise_ssh.clone().unwrap_or_else(|| reachable(a).to_string()));
    let mut names =
        crate::sshca::SshNames::new(&config.ssh_host_suffix).map_err(|e| anyhow::anyhow!("--ssh-host-suffix {e}"))?;
    names.front_door_hosts = ssh_front_door.iter().filter_map(|a| crate::https::host_of(a)).collect();
    // HOST:PORT (`--advertise-ssh` is checked to be one, and a bound address is).
    names.front_door_port =
        ssh_front_door.as_deref().and_then(|a| a.rsplit_once(':')).and_then(|(_, p)| p.parse().ok()).unwrap_or(22);
    let ssh_ca = crate::sshca::SshCa::load_or_create(&data_dir, names).context("loading the SSH CA")?;
    let store = Store::open(&data_dir.join("tether.db")).await.context("opening the database")?;
    let admin_hash = admin_token(&store, &data_dir).await?;
    match store.end_stale_audit(tether_shared::now_ms()).await {
        Ok(0) => {}
        Ok(n) => info!(connections = n, "ssh audit: ended the connections the last run left open"),
        Err(e) => warn!(error = %e, "ssh audit: could not end the connections the last run left open"),
    }
    let own_tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(crate::https::load_pem(cert, key).context("loading --tls-cert and --tls-key")?),
        (None, None) => None,
        _ => anyhow::bail!(
            "--tls-cert and --tls-key go together: set both, or neither for a certificate from the coordinator's own CA"
        ),
    };

    let endpoint = quinn::Endpoint::new(
        pki.endpoint_config(),
        Some(pki.server_config(8)?),
        udp,
        Arc::new(tether_shared::udp::Runtime),
    )
    .context("starting the QUIC endpoint")?;

    let agent_coordinator = config.advertise_quic.clone().unwrap_or_else(|| reachable(quic_addr).to_string());
    let https_url =
        https_addr.map(|a| config.advertise_https.clone().unwrap_or_else(|| format!("https://{}", reachable(a))));
    let api_url = format!("http://{}", reachable(http_addr));
    let tls = match (&https_addr, own_tls) {
        (None, _) => None,
        (Some(_), Some((chain, key))) => {
            Some(crate::https::server_config(chain, key).context("--tls-cert and --tls-key")?)
        }
        (Some(bound), None) => {
            // Every name a workspace or a user might reach this coordinator by.
            let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
            if !bound.ip().is_unspecified() {
                names.push(bound.ip().to_string());
            }
            let advertised = [&config.advertise_https, &config.advertise_quic, &config.advertise_ssh];
            names.extend(advertised.into_iter().flatten().filter_map(|a| crate::https::host_of(a)));
            let mut seen = std::collections::HashSet::new();
            names.retain(|n| seen.insert(n.clone()));
            let (chain, key) = pki.https_certificate(&names).context("issuing the HTTPS certificate")?;
            Some(crate::https::server_config(chain, key).context("the HTTPS certificate")?)
        }
    };
    let info = CoordinatorInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        http_addr,
        quic_addr,
        ssh_addr,
        ssh_front_door: ssh_front_door.clone(),
        api_url: api_url.clone(),
        https_addr,
        https_url: https_url.clone(),
        agent_coordinator: agent_coordinator.clone(),
        ca_cert: pki.ca_path.clone(),
        ca_sha256: pki.fingerprint.clone(),
        admin_token_file: data_dir.join(ADMIN_TOKEN_FILE),
    };

    let agent_binary = config.agent_binary.clone().unwrap_or_else(default_agent_binary);
    let dist = crate::dist::Dist::new(crate::dist::DistConfig {
        binary: agent_binary.clone(),
        ca_pem: pki.ca_pem()?,
        url: https_url.clone().unwrap_or_else(|| api_url.clone()),
        own_ca: config.tls_cert.is_none(),
        agent_coordinator: agent_coordinator.clone(),
    });
    let engine = Engine::new(
        store,
        pki,
        ssh_ca,
        EngineConfig {
            ssh_front_door: ssh_front_door.clone(),
            data_dir: data_dir.clone(),
            agent_coordinator_addr: agent_coordinator,
            agent_binary,
            max_wait: Duration::from_secs(300),
            https_url: https_url.clone(),
            max_build_log_bytes: config.max_build_log_bytes,
        },
    );
    engine.resume().await.context("resuming workspaces")?;

    let info_json = serde_json::to_vec_pretty(&info)?;
    let tmp = data_dir.join("coordinator.json.tmp");
    std::fs::write(&tmp, info_json)?;
    std::fs::rename(&tmp, data_dir.join(INFO_FILE))?;
    let or_off = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_string(), |a| a.to_string());
    info!(http = %http_addr, https = %or_off(https_addr), quic = %quic_addr, ssh = %or_off(ssh_addr), data_dir = %data_dir.display(), "coordinator listening");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = {
        let engine = engine.clone();
        tokio::spawn(async move {
            // Owned until the coordinator has stopped, however `Running` is dropped.
            let _lock = lock;
            let tunnel = tokio::spawn(crate::tunnel::serve(endpoint.clone(), engine.clone(), config.max_agents));
            let front_door = ssh.map(|listener| {
                let fd =
                    crate::frontdoor::FrontDoorConfig { max_connections: 10_000, login_grace: config.ssh_login_grace };
                tokio::spawn(crate::frontdoor::serve(listener, engine.clone(), fd))
            });
            let clock = tokio::spawn({
                let engine = engine.clone();
                async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut n: u64 = 0;
                    loop {
                        tick.tick().await;
                        engine.sweep().await;
                        n += 1;
                        if n.is_multiple_of(5) {
                            engine.metrics.upkeep();
                        }
                        if n.is_multiple_of(30) {
                            engine.persist_last_seen().await;
                        }
                    }
                }
            });
            let purge = tokio::spawn(crate::retention::run(engine.clone(), config.keep_audit, config.keep_builds));
            let router = api::router(
                ApiState { engine: engine.clone(), admin_token_hash: Arc::new(admin_hash), ssh_ends: Arc::default() },
                crate::dist::router(dist.clone()),
            );
            tokio::spawn(async move { dist.prepare().await });
            let (https_stop_tx, https_stop_rx) = tokio::sync::watch::channel(false);
            let https_task = https.zip(tls).map(|(listener, tls)| {
                let drops = engine.metrics.http_drops("https");
                tokio::spawn(crate::https::serve(listener, Some(tls), router.clone(), https_stop_rx, "https", drops))
            });
            let (http_stop_tx, http_stop_rx) = tokio::sync::watch::channel(false);
            let drops = engine.metrics.http_drops("http");
            let http_task = tokio::spawn(crate::https::serve(http, None, router, http_stop_rx, "http", drops));
            let _ = stop_rx.await;
            engine.begin_shutdown();
            // SSH connections first, while their agents are still there: each client is told why
            // (the agents' own hang-up below would end them as lost), and its audit record closed.
            let ssh = engine.end_ssh(|_, _, _| true, "the coordinator is shutting down");
            if ssh > 0 {
                info!(connections = ssh, "shutting down: ending ssh connections");
                let ended = async {
                    while engine.ssh_splicing.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(2), ended).await;
            }
            info!("shutting down: asking agents to reconnect later");
            engine.ask_agents_to_reconnect(Duration::from_secs(10));
            // Let the reconnect requests reach the agents, which then hang up, before the endpoint
            // goes; new connections are refused meanwhile (tunnel::serve).
            let hung_up = async {
                while engine.connected_agents() > 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            if tokio::time::timeout(Duration::from_secs(3), hung_up).await.is_err() {
                warn!(still_connected = engine.connected_agents(), "agents did not hang up in time; closing anyway");
            }
            engine.persist_last_seen().await;
            endpoint.close(crate::tunnel::CLOSE_SHUTDOWN.into(), b"coordinator shutting down");
            let _ = http_stop_tx.send(true);
            let _ = https_stop_tx.send(true);
            clock.abort();
            purge.abort();
            tunnel.abort();
            if let Some(fd) = front_door {
                fd.abort();
            }
            // Each listener's drain is bounded by https::DRAIN_TIMEOUT, and says when it ran out.
            let _ = http_task.await;
            if let Some(task) = https_task {
                let _ = task.await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
            engine.store_close().await;
            Ok(())
        })
    };
    Ok(Running { info, engine, stop: stop_tx, task })
}

/// Runs a coordinator until `shutdown` resolves.
pub async fn run(config: ServeConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let running = start(config).await?;
    shutdown.await;
    running.shutdown().await
}
