//! `tether-bench`: measures the real `tether` coordinator and `tether-agent` found next to this
//! executable, on 127.0.0.1, and prints what it measured in this run (and writes it as JSON with
//! `--json FILE`). Every wait has a deadline; it stops by itself.

#[path = "tether_bench/agent.rs"]
mod agent;
#[path = "tether_bench/agents.rs"]
mod agents;
#[path = "tether_bench/coordinator.rs"]
mod coordinator;
#[path = "tether_bench/host.rs"]
mod host;
#[path = "tether_bench/relay.rs"]
mod relay;
#[path = "tether_bench/report.rs"]
mod report;
#[path = "tether_bench/sftp.rs"]
mod sftp;
#[path = "tether_bench/ssh.rs"]
mod ssh;
#[path = "tether_bench/swarm.rs"]
mod swarm;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "tether-bench", about = "Benchmarks for the Tether coordinator and agent")]
struct Cli {
    /// Also write the figures to this file as JSON.
    #[arg(long, global = true, value_name = "FILE")]
    json: Option<PathBuf>,
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// Many simulated agents (real QUIC connections) against one coordinator: how many hold
    /// `running`, memory per agent, CPU at steady state, recovery from a coordinator restart.
    Agents(agents::AgentsArgs),
    /// The real tether-agent: start-to-running time and idle memory.
    Agent(agent::AgentArgs),
    /// The same OpenSSH client straight to a local sshd, through a local `ssh -J` hop, and
    /// through Tether's front door to an agent: throughput, setup time, echo latency, as ratios.
    Ssh(ssh::SshArgs),
    /// The agent's built-in SFTP server against OpenSSH's sftp-server, same client, same run.
    Sftp(sftp::SftpArgs),
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let machine = host::machine();
    let nofile = host::raise_nofile()?;
    eprintln!("machine: {}; open-files limit {nofile}", host::machine_line(&machine));
    let started_ms = tether_shared::now_ms();
    let (name, figures) = match &cli.command {
        Bench::Agents(a) => ("agents", agents::run(a, &machine).await?),
        Bench::Agent(a) => ("agent", agent::run(a, &machine).await?),
        Bench::Ssh(a) => ("ssh", ssh::run(a, &machine).await?),
        Bench::Sftp(a) => ("sftp", sftp::run(a, &machine).await?),
    };
    if let Some(path) = &cli.json {
        let binaries: Vec<_> = ["tether", "tether-agent"].into_iter().map(binary_identity).collect();
        let doc = serde_json::json!({
            "tool": "tether-bench",
            "version": env!("CARGO_PKG_VERSION"),
            "bench": name,
            "args": format!("{:?}", cli.command),
            "started_at_ms": started_ms,
            "finished_at_ms": tether_shared::now_ms(),
            "machine": machine,
            "binaries": binaries,
            "results": figures,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        eprintln!("figures written to {}", path.display());
    }
    Ok(())
}

/// Which build was measured: path, size and modification time of a sibling binary.
fn binary_identity(name: &str) -> serde_json::Value {
    let Ok(path) = coordinator::sibling_binary(name) else {
        return serde_json::json!({ "name": name, "found": false });
    };
    let meta = std::fs::metadata(&path).ok();
    let modified_ms = meta.as_ref().and_then(|m| m.modified().ok()).map(tether_shared::unix_ms);
    serde_json::json!({
        "name": name,
        "path": path,
        "bytes": meta.map(|m| m.len()),
        "modified_at_ms": modified_ms,
    })
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    // Ctrl-C drops the run, and with it every child process (their handles kill on drop).
    let result = tokio::select! {
        r = run(cli) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
