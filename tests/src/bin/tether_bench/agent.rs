//! `tether-bench agent`: the real `tether-agent` binary against a real coordinator. Measures the time
//! from starting the agent process to its workspace running (no scripts), and the agent's resident
//! memory once idle with heartbeats flowing.

use crate::coordinator::{sibling_binary, Coordinator};
use crate::host;
use crate::report::{median_max, mib, verdict, Block};
use crate::swarm::round;
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TEMPLATE: &str = "";
/// Targets from the issue.
const TARGET_START_MS: f64 = 200.0;
const TARGET_IDLE_RSS_MIB: f64 = 15.0;
/// How long the long poll for `running` may take before a run counts as failed.
const WAIT_TIMEOUT_S: u64 = 30;

#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Agent starts to time, each with a fresh workspace and data directory.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// How long the agents stay connected and idle before their memory is read.
    #[arg(long, default_value_t = 20)]
    pub idle_secs: u64,
    /// TETHER_LOG for the coordinator.
    #[arg(long, default_value = "info")]
    pub coordinator_log: String,
}

/// A started `tether-agent`, killed when dropped.
struct AgentProcess {
    child: Child,
    log: PathBuf,
}

impl AgentProcess {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Times `runs` agent starts and reads idle memory, printing the summary; returns the figures.
pub async fn run(args: &AgentArgs, machine: &Value) -> anyhow::Result<Value> {
    let tether = sibling_binary("tether")?;
    let agent_bin = sibling_binary("tether-agent")?;
    let runs = args.runs.max(1);
    let (coord, _) = Coordinator::start(tether, &args.coordinator_log).await?;
    let mut agents: Vec<AgentProcess> = Vec::new();
    let mut start_ms = Vec::new();
    let mut ready_span_ms = Vec::new();
    let mut per_run = Vec::new();
    for i in 0..runs {
        let name = format!("agent-run-{i:02}");
        let (token, _) = coord.api.create(&name, TEMPLATE).await?;
        let dir = coord.data_dir().join(format!("agent-{i:02}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = coord.data_dir().join(format!("agent-{i:02}.log"));
        let log_file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;

        // The long poll goes first and is parked at the coordinator before the agent exists, so the
        // answer comes from the status change itself, with no polling delay.
        let api = coord.api.clone();
        let wait_name = name.clone();
        let wait = tokio::spawn(async move {
            let r = api.wait_running(&wait_name, WAIT_TIMEOUT_S).await;
            (r, Instant::now())
        });
        tokio::time::sleep(Duration::from_millis(100)).await;

        let mut cmd = Command::new(&agent_bin);
        cmd.env("TETHER_COORDINATOR", &coord.info.agent_coordinator)
            .env("TETHER_CA", &coord.info.ca_cert)
            .env("TETHER_AGENT_TOKEN", &token)
            .env("TETHER_AGENT_DATA_DIR", &dir)
            .env("TETHER_LOG", "warn")
            .env_remove("TETHER_CA_SHA256")
            .env_remove("TETHER_AGENT_TOKEN_FILE")
            .env_remove("TETHER_LOG_FORMAT")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let spawned = Instant::now();
        let child = cmd.spawn().with_context(|| format!("starting {}", agent_bin.display()))?;
        let mut agent = AgentProcess { child, log };
        let (result, answered) = wait.await.context("wait task")?;
        let view = match result {
            Ok(v) => v,
            Err(e) => {
                let exited = agent.child.try_wait().ok().flatten();
                bail!(
                    "run {i}: workspace {name} did not reach running: {e:#}\nagent exited: {exited:?}\n--- agent log ---\n{}\n--- coordinator log ---\n{}",
                    agent.log_tail(),
                    coord.log_tail(20)
                );
            }
        };
        if view["status"] != "running" {
            bail!("run {i}: the wait for running answered with status {}", view["status"]);
        }
        let ms = (answered - spawned).as_secs_f64() * 1000.0;
        let spans = coord.api.timings(&name).await?;
        let ready = spans
            .iter()
            .find(|s| s["stage"] == "agent" && s["name"] == "ready")
            .and_then(|s| s["duration_ms"].as_f64());
        eprintln!(
            "run {i}: spawn -> running {ms:.1} ms; agent ready span {}",
            ready.map_or("missing".to_string(), |r| format!("{r:.0} ms"))
        );
        start_ms.push(ms);
        if let Some(r) = ready {
            ready_span_ms.push(r);
        }
        per_run.push(
            json!({ "workspace": name, "spawn_to_running_ms": round(ms, 2), "ready_span_ms": ready, "spans": spans }),
        );
        agents.push(agent);
    }

    // Idle: every agent stays connected; heartbeats flow.
    eprintln!("{} agents connected; idle for {} s", agents.len(), args.idle_secs);
    let cpu0: Vec<_> = agents.iter().map(|a| host::cpu(Some(a.child.id()))).collect::<Result<_, _>>()?;
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let mut idle = Vec::new();
    for (a, c0) in agents.iter_mut().zip(&cpu0) {
        if let Some(status) = a.child.try_wait()? {
            bail!("an agent exited while idle ({status})\n--- agent log ---\n{}", a.log_tail());
        }
        let mem = host::memory(Some(a.child.id()))?;
        let cores = host::cpu(Some(a.child.id()))?.cores_since(c0);
        idle.push((mem, cores));
    }
    let counts = coord.api.status_counts().await?;
    let still_running = counts.running();
    drop(agents);

    let rss_mib: Vec<f64> = idle.iter().map(|(m, _)| m.rss_kib as f64 / 1024.0).collect();
    let hwm_mib: Vec<f64> = idle.iter().map(|(m, _)| m.hwm_kib as f64 / 1024.0).collect();
    let cores: Vec<f64> = idle.iter().map(|(_, c)| *c).collect();
    let (start_med, start_max) = median_max(&start_ms).unwrap_or_default();
    let (rss_med, rss_max) = median_max(&rss_mib).unwrap_or_default();
    let (_, hwm_max) = median_max(&hwm_mib).unwrap_or_default();
    let (cores_med, cores_max) = median_max(&cores).unwrap_or_default();
    let last = idle.last().map(|(m, _)| *m).unwrap_or_default();

    let mut b = Block::default();
    b.title(&format!("tether-bench agent: {runs} runs"));
    b.line("machine", host::machine_line(machine));
    b.line(
        "agent spawn -> workspace running",
        format!(
            "median {start_med:.1} ms, max {start_max:.1} ms   [target < {TARGET_START_MS:.0} ms: {}]",
            verdict(start_max < TARGET_START_MS)
        ),
    );
    b.line(
        "agent's own ready span (process start -> ready)",
        match median_max(&ready_span_ms) {
            Some((m, x)) => {
                format!("median {m:.0} ms, max {x:.0} ms ({} of {runs} runs reported it)", ready_span_ms.len())
            }
            None => "not reported by the agent".into(),
        },
    );
    b.line(
        format!("idle agents after {} s (heartbeats flowing)", args.idle_secs).as_str(),
        format!(
            "VmRSS median {rss_med:.1} MiB, max {rss_max:.1} MiB; VmHWM max {hwm_max:.1} MiB   [target < {TARGET_IDLE_RSS_MIB:.0} MiB: {}]",
            verdict(rss_max < TARGET_IDLE_RSS_MIB)
        ),
    );
    b.line(
        "one idle agent (the last started)",
        format!("VmRSS {}, VmHWM {}, anon {}", mib(last.rss_kib), mib(last.hwm_kib), mib(last.anon_kib)),
    );
    b.line("idle agent CPU", format!("median {cores_med:.4} cores, max {cores_max:.4} cores"));
    b.line("workspaces running at the end of the idle time", format!("{still_running} of {runs}"));
    let figures = json!({
        "runs": runs,
        "spawn_to_running_ms": { "median": round(start_med, 2), "max": round(start_max, 2), "all": start_ms.iter().map(|v| round(*v, 2)).collect::<Vec<_>>() },
        "ready_span_ms": ready_span_ms,
        "idle_secs": args.idle_secs,
        "idle_rss_mib": { "median": round(rss_med, 2), "max": round(rss_max, 2) },
        "idle_hwm_mib_max": round(hwm_max, 2),
        "idle_cores": { "median": round(cores_med, 5), "max": round(cores_max, 5) },
        "one_agent_memory": last.json(),
        "running_at_end": still_running,
        "targets": {
            "spawn_to_running_ms": { "target_below": TARGET_START_MS, "measured_max": round(start_max, 2), "pass": start_max < TARGET_START_MS },
            "idle_rss_mib": { "target_below": TARGET_IDLE_RSS_MIB, "measured_max": round(rss_max, 2), "pass": rss_max < TARGET_IDLE_RSS_MIB },
        },
        "per_run": per_run,
    });
    print!("{}", b.finish());
    Ok(figures)
}
