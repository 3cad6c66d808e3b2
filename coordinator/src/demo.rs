//! `tether demo`: a coordinator on embedded defaults, one sample workspace taken through its whole
//! life (start, timings, a killed agent, recovery, stop), shown as a user would see it.

use crate::cli::{timings_table, ServeArgs};
use crate::client::Client;
use crate::server::{self, ServeConfig};
use crate::view::{LogsView, SpanView, WorkspaceView};
use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub const TEMPLATE: &str = include_str!("demo.template.toml");

pub async fn run(dir: Option<PathBuf>, keep_running: bool, serve: &ServeArgs) -> anyhow::Result<()> {
    let (data_dir, _temp) = match dir {
        Some(d) => (d, None),
        None => {
            let t = tempfile::Builder::new().prefix("tether-demo-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let running = server::start(ServeConfig {
        data_dir: data_dir.clone(),
        listen_http: "127.0.0.1:0".parse()?,
        listen_quic: "127.0.0.1:0".parse()?,
        advertise_quic: None,
        agent_binary: serve.agent_binary.clone(),
        max_agents: 100,
        listen_ssh: serve.listen_ssh.0,
        advertise_ssh: None,
        ssh_login_grace: serve.ssh_login_grace,
        listen_https: serve.listen_https.0,
        advertise_https: None,
        tls_cert: None,
        tls_key: None,
        keep_audit: None,
        keep_builds: None,
        max_build_log_bytes: serve.max_build_log_mib * 1024 * 1024,
    })
    .await?;
    let info = running.info.clone();
    println!("Tether demo");
    println!("  coordinator  {} (agents dial {} over QUIC)", info.api_url, info.agent_coordinator);
    println!("  data         {}", data_dir.display());
    let template_path = data_dir.join("demo.toml");
    std::fs::write(&template_path, TEMPLATE)?;
    let client = Client::discover(None, None, None, &data_dir)?;
    let engine = running.engine.clone();
    // A directory an earlier demo used: its workspace goes first, so this one starts afresh.
    if engine.store.workspace("demo").await?.is_some() {
        println!("\n$ tether workspace delete demo --wait    # the earlier demo's workspace in this directory");
        let _: WorkspaceView = client.delete("/workspaces/demo").await?;
        let until = crate::cli::settled_statuses(crate::cli::STOPPING);
        let w = crate::cli::wait_for(&client, "demo", &until, Duration::from_secs(120)).await?;
        if w.status != tether_shared::WorkspaceStatus::Deleted {
            anyhow::bail!("the earlier demo workspace could not be deleted: {} ({})", w.status, w.status_reason);
        }
    }

    // Print every status change as it happens, from the recorded transitions.
    let t0 = tether_shared::now_ms();
    let watcher = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let mut rx = engine.subscribe_changes();
            let (mut printed, mut id) = (0, None);
            loop {
                // The live workspace (an earlier demo's, deleted, may hold the name too).
                let row = match engine.store.workspace("demo").await {
                    Ok(Some(row)) => Some(row),
                    _ => engine.store.workspace_any("demo").await.ok().flatten(),
                };
                if let Some(row) = row {
                    if id != Some(row.id) {
                        (printed, id) = (0, Some(row.id));
                    }
                    if let Ok(history) = engine.store.transitions(row.id, 1000).await {
                        // This run's changes only, not an earlier demo's in the same directory.
                        for t in history.iter().skip(printed).filter(|t| t.at >= t0) {
                            println!("  {:>6.2}s  {:<10} {}", (t.at - t0) as f64 / 1000.0, t.to, t.reason);
                        }
                        printed = printed.max(history.len());
                    }
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    };
    let step = |s: &str| println!("\n$ {s}");

    step(&format!("tether workspace create demo --template {}", template_path.display()));
    let body = serde_json::json!({ "name": "demo", "template": TEMPLATE, "start": false });
    let _: serde_json::Value = client.post("/workspaces", &body).await?;
    tokio::task::yield_now().await;

    step("tether workspace start demo --wait");
    let _: WorkspaceView = client.post("/workspaces/demo/start", &serde_json::json!({})).await?;
    let w = crate::cli::wait_for(&client, "demo", "running,unhealthy,failed", Duration::from_secs(120)).await?;
    settle().await;
    if w.status != tether_shared::WorkspaceStatus::Running {
        anyhow::bail!("the demo workspace did not reach running: {} ({})", w.status, w.status_reason);
    }

    step("tether workspace timings demo");
    let spans: Vec<SpanView> = client.get("/workspaces/demo/timings").await?;
    print!("{}", timings_table(&spans));
    let chatty: LogsView = client.get("/workspaces/demo/logs?source=chatty&limit=10000").await?;
    // The command works only while the demo's coordinator runs.
    let see = if keep_running { "; see them with `tether workspace logs demo --script chatty`" } else { "" };
    println!("\n(script 'chatty' printed {} lines{see})", chatty.lines.len());

    let pid_path = data_dir.join("workspaces/demo/agent.pid");
    let pid: i32 = std::fs::read_to_string(&pid_path)
        .with_context(|| format!("reading {}", pid_path.display()))?
        .trim()
        .parse()
        .context("agent pid")?;
    step(&format!("kill -9 {pid}    # the agent dies without a word"));
    kill(Pid::from_raw(pid), Signal::SIGKILL).context("killing the agent")?;
    crate::cli::wait_for(&client, "demo", "unhealthy", Duration::from_secs(60)).await?;
    settle().await;

    step("tether workspace start demo --wait    # bring the agent back; start scripts do not run again");
    let _: WorkspaceView = client.post("/workspaces/demo/start", &serde_json::json!({})).await?;
    crate::cli::wait_for(&client, "demo", "running,failed", Duration::from_secs(60)).await?;
    settle().await;
    let after: Vec<SpanView> = client.get("/workspaces/demo/timings").await?;
    let scripts = |s: &[SpanView]| s.iter().filter(|s| s.stage == "script").count();
    println!("  script runs recorded: {} before the restart, {} after", scripts(&spans), scripts(&after));

    if keep_running {
        println!("\nThe coordinator keeps running. In another terminal:");
        println!("  export TETHER_DATA_DIR={}", data_dir.display());
        println!("  tether workspace list");
        println!("  tether workspace logs demo --follow");
        println!("Press Ctrl-C to stop the workspace and the coordinator.");
        tokio::signal::ctrl_c().await?;
    }

    step("tether workspace stop demo --wait");
    let _: WorkspaceView = client.post("/workspaces/demo/stop", &serde_json::json!({})).await?;
    crate::cli::wait_for(&client, "demo", "stopped,failed,running,unhealthy", Duration::from_secs(90)).await?;
    settle().await;
    watcher.abort();
    let _ = Arc::strong_count(&engine);
    running.shutdown().await?;
    println!("\nDone. Next: `tether serve` runs a coordinator for real; see README.md.");
    Ok(())
}

/// Gives the status printer a moment to print the change the API just reported.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}
