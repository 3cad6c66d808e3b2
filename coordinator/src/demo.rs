//! `tether demo`: a coordinator on embedded defaults, one sample workspace taken through its whole
//! life (start, timings, a killed agent, recovery, stop), shown as a user would see it.

use crate::cli::{timings_table, ServeArgs};
use crate::client::Client;
use crate::server::{self, ServeConfig};
use crate::view::{LogsView, SpanView, WorkspaceView};
use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const TEMPLATE: &str = include_str!("demo.template.toml");

/// The file that marks a directory as a demo's: `--dir` refuses one that holds anything else, so a
/// real coordinator's data (with a workspace that happens to be named `demo`) is never used.
const MARKER: &str = ".tether-demo";

/// Stdout closed under the demo (`tether demo | head`): it stops telling and cleans up.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
struct StdoutClosed;

/// Prints a line of the demo's story; an error once stdout is closed.
fn say(args: std::fmt::Arguments) -> Result<(), StdoutClosed> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{args}").and_then(|()| out.flush()).map_err(|_| StdoutClosed)
}

macro_rules! say {
    ($($t:tt)*) => { say(format_args!($($t)*)) };
}

/// Makes `dir` the demo's, or refuses it: it must be new, empty, or an earlier demo's.
fn claim(dir: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if !dir.join(MARKER).exists() && entries.next().is_some() {
                anyhow::bail!(
                    "{} holds files that are not an earlier demo's (a coordinator's data directory?); give --dir a \
                     new or empty directory",
                    dir.display()
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    }
    std::fs::write(dir.join(MARKER), "made by `tether demo`\n").with_context(|| format!("writing in {}", dir.display()))
}

pub async fn run(dir: Option<PathBuf>, keep_running: bool, serve: &ServeArgs) -> anyhow::Result<()> {
    let (data_dir, temp) = match dir {
        Some(d) => {
            claim(&d)?;
            (d, None)
        }
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
        ssh_host_suffix: serve.ssh_host_suffix.clone(),
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
    let client = Client::discover(None, None, None, &data_dir)?;
    let engine = running.engine.clone();
    let t0 = tether_shared::now_ms();
    let watcher = tokio::spawn(print_changes(engine.clone(), t0));
    // Whatever ends the story (its end, Ctrl-C, a closed stdout, an error), the workspace is stopped
    // (its agent is a process of ours, which would outlive us) and the coordinator shut down.
    let mut interrupted = false;
    let told = tokio::select! {
        r = story(&running.info, &client, &engine, &data_dir, keep_running) => r,
        r = tokio::signal::ctrl_c() => {
            if !keep_running {
                eprintln!("interrupted: stopping the demo's workspace and coordinator");
                interrupted = true;
            }
            r.map_err(anyhow::Error::from)
        }
    };
    let closed = told.as_ref().is_err_and(|e| e.is::<StdoutClosed>());
    let stopped = stop(&client, &data_dir, !closed).await;
    watcher.abort();
    running.shutdown().await?;
    match told {
        Err(e) if e.is::<StdoutClosed>() => return Ok(()),
        Err(e) => return Err(e),
        Ok(()) => {}
    }
    stopped?;
    if interrupted {
        drop(temp);
        std::process::exit(130);
    }
    let _ = say!("\nDone. Next: `tether serve` runs a coordinator for real; see README.md.");
    Ok(())
}

/// Prints every status change of the demo workspace as it happens, from the recorded transitions.
async fn print_changes(engine: Arc<crate::engine::Engine>, t0: i64) {
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
                    if say!("  {:>6.2}s  {:<10} {}", (t.at - t0) as f64 / 1000.0, t.to, t.reason).is_err() {
                        return;
                    }
                }
                printed = printed.max(history.len());
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// The demo proper, up to the stop: with `keep_running`, it waits there until cancelled.
async fn story(
    info: &server::CoordinatorInfo,
    client: &Client,
    engine: &Arc<crate::engine::Engine>,
    data_dir: &Path,
    keep_running: bool,
) -> anyhow::Result<()> {
    say!("Tether demo")?;
    say!("  coordinator  {} (agents dial {} over QUIC)", info.api_url, info.agent_coordinator)?;
    say!("  data         {}", data_dir.display())?;
    let template_path = data_dir.join("demo.toml");
    std::fs::write(&template_path, TEMPLATE)?;
    // A directory an earlier demo used: its workspace goes first, so this one starts afresh.
    if engine.store.workspace("demo").await?.is_some() {
        say!("\n$ tether workspace delete demo --wait    # the earlier demo's workspace in this directory")?;
        let _: WorkspaceView = client.delete("/workspaces/demo").await?;
        let until = crate::cli::settled_statuses(crate::cli::STOPPING);
        let w = crate::cli::wait_for(client, "demo", &until, Duration::from_secs(120)).await?;
        if w.status != tether_shared::WorkspaceStatus::Deleted {
            anyhow::bail!("the earlier demo workspace could not be deleted: {} ({})", w.status, w.status_reason);
        }
    }
    let step = |s: &str| say!("\n$ {s}");

    step(&format!("tether workspace create demo --template {}", template_path.display()))?;
    let body = serde_json::json!({ "name": "demo", "template": TEMPLATE, "start": false });
    let _: serde_json::Value = client.post("/workspaces", &body).await?;
    settle().await;

    step("tether workspace start demo --wait")?;
    let _: WorkspaceView = client.post("/workspaces/demo/start", &serde_json::json!({})).await?;
    let w = crate::cli::wait_for(client, "demo", "running,unhealthy,failed", Duration::from_secs(120)).await?;
    settle().await;
    if w.status != tether_shared::WorkspaceStatus::Running {
        anyhow::bail!("the demo workspace did not reach running: {} ({})", w.status, w.status_reason);
    }

    step("tether workspace timings demo")?;
    let spans: Vec<SpanView> = client.get("/workspaces/demo/timings").await?;
    say!("{}", timings_table(&spans).trim_end())?;
    let chatty: LogsView = client.get("/workspaces/demo/logs?source=chatty&limit=10000").await?;
    // The command works only while the demo's coordinator runs.
    let see = if keep_running { "; see them with `tether workspace logs demo --script chatty`" } else { "" };
    say!("\n(script 'chatty' printed {} lines{see})", chatty.lines.len())?;

    let pid = agent_pid(data_dir)?;
    step(&format!("kill -9 {pid}    # the agent dies without a word"))?;
    kill(Pid::from_raw(pid), Signal::SIGKILL).context("killing the agent")?;
    crate::cli::wait_for(client, "demo", "unhealthy", Duration::from_secs(60)).await?;
    settle().await;

    step("tether workspace start demo --wait    # bring the agent back; start scripts do not run again")?;
    let _: WorkspaceView = client.post("/workspaces/demo/start", &serde_json::json!({})).await?;
    crate::cli::wait_for(client, "demo", "running,failed", Duration::from_secs(60)).await?;
    settle().await;
    let after: Vec<SpanView> = client.get("/workspaces/demo/timings").await?;
    let scripts = |s: &[SpanView]| s.iter().filter(|s| s.stage == "script").count();
    say!("  script runs recorded: {} before the restart, {} after", scripts(&spans), scripts(&after))?;

    if keep_running {
        say!("\nThe coordinator keeps running. In another terminal:")?;
        say!("  export TETHER_DATA_DIR={}", data_dir.display())?;
        say!("  tether workspace list")?;
        say!("  tether workspace logs demo --follow")?;
        say!("Press Ctrl-C to stop the workspace and the coordinator.")?;
        std::future::pending::<()>().await;
    }
    Ok(())
}

fn agent_pid(data_dir: &Path) -> anyhow::Result<i32> {
    let pid_path = data_dir.join("workspaces/demo/agent.pid");
    std::fs::read_to_string(&pid_path)
        .with_context(|| format!("reading {}", pid_path.display()))?
        .trim()
        .parse()
        .context("agent pid")
}

/// Stops the demo's workspace, if it has one that is not stopped; told as a step unless `tell` is
/// off. Its agent is killed if the stop does not end with it.
async fn stop(client: &Client, data_dir: &Path, tell: bool) -> anyhow::Result<()> {
    use tether_shared::WorkspaceStatus::*;
    let Ok(w) = client.get::<WorkspaceView>("/workspaces/demo").await else { return Ok(()) };
    if matches!(w.status, Stopped | Deleted | Failed)
        || (w.status == Pending && w.status_reason == crate::status::CREATED_NOT_STARTED)
    {
        return Ok(());
    }
    if tell {
        let _ = say!("\n$ tether workspace stop demo --wait");
    }
    let stopped = async {
        let _: WorkspaceView = client.post("/workspaces/demo/stop", &serde_json::json!({})).await?;
        crate::cli::wait_for(client, "demo", "stopped,failed,running,unhealthy", Duration::from_secs(90)).await
    };
    let result = stopped.await;
    settle().await;
    if !matches!(&result, Ok(w) if w.status == Stopped) {
        // The agent must not outlive the demo, whatever the stop said.
        if let Ok(pid) = agent_pid(data_dir) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    result.map(|_| ())
}

/// Gives the status printer a moment to print the change the API just reported.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}
