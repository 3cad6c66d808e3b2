//! `tether-bench agents`: N simulated agents against one real coordinator. Measures how long N
//! workspaces take to reach `running`, whether they hold it, the coordinator's memory per agent and
//! CPU at steady state, and how long a SIGKILLed and restarted coordinator takes to get every agent
//! back, counting any workspace that flaps to `unhealthy` meanwhile.

use crate::coordinator::{sibling_binary, Api, Coordinator, StatusCounts};
use crate::host::{self, UdpCounters};
use crate::report::{mib, secs, verdict, Block};
use crate::swarm::{round, Swarm, SwarmConfig};
use anyhow::Context;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_shared::tls::{self, CaPin};

/// An external workspace with no scripts and the default heartbeat timeout, spelled out.
const TEMPLATE: &str = "heartbeat_timeout = \"15s\"\n";
/// Targets from the issue.
const TARGET_KIB_PER_AGENT: f64 = 100.0;
const TARGET_CORES: f64 = 0.5;

#[derive(Debug, Clone, clap::Args)]
pub struct AgentsArgs {
    /// Number of simulated agents; repeat to run several sizes one after another.
    #[arg(long = "n", default_values_t = [10_000usize])]
    pub n: Vec<usize>,
    /// Heartbeat at the interval the coordinator sends in its welcome (5 s for a 15 s heartbeat
    /// timeout), as the agent does. This is the default; the flag only makes it explicit.
    #[arg(long, conflicts_with = "heartbeat_ms")]
    pub heartbeat_interval_from_server: bool,
    /// Heartbeat at this fixed interval instead of the welcome's.
    #[arg(long, value_name = "MS")]
    pub heartbeat_ms: Option<u64>,
    /// Length of the steady-state measurement window.
    #[arg(long, default_value_t = 30)]
    pub steady_secs: u64,
    /// Wait after all workspaces run before measuring steady state.
    #[arg(long, default_value_t = 10)]
    pub settle_secs: u64,
    /// Longest wait for all N workspaces to run after the agents start dialling.
    #[arg(long, default_value_t = 180)]
    pub ramp_timeout_secs: u64,
    /// Longest wait for all N agents to be back after the coordinator restart.
    #[arg(long, default_value_t = 180)]
    pub restart_timeout_secs: u64,
    /// How long after the restart to watch for workspaces turning unhealthy.
    #[arg(long, default_value_t = 30)]
    pub restart_watch_secs: u64,
    /// Skip the restart measurement.
    #[arg(long)]
    pub no_restart: bool,
    /// Connections between dialling and fully set up at once, in the load generator.
    #[arg(long, default_value_t = 200)]
    pub handshakes: usize,
    /// Simulated agents per client UDP socket (quinn endpoint).
    #[arg(long, default_value_t = 2500)]
    pub per_endpoint: usize,
    /// Receive buffer for each client UDP socket, in bytes (capped by net.core.rmem_max); 0 keeps
    /// the system default. Many simulated agents share one socket, where real agents have one
    /// each, so the default buffer would drop what a fleet would not.
    #[arg(long, default_value_t = 4 << 20)]
    pub client_recv_buffer: usize,
    /// When the coordinator answers an agent's lifecycle events with an error, drop the connection
    /// and dial again. By default the simulated agents do what tether-agent does: stay connected
    /// and resend the events only on their next connection.
    #[arg(long)]
    pub reconnect_on_events_error: bool,
    /// Stop waiting for all N to run once nothing has changed for this long with every agent
    /// connected.
    #[arg(long, default_value_t = 20)]
    pub stall_secs: u64,
    /// Workspace-creation requests in flight at once.
    #[arg(long, default_value_t = 16)]
    pub create_concurrency: usize,
    /// TETHER_LOG for the coordinator; its log goes to coordinator.log in its data directory.
    #[arg(long, default_value = "info")]
    pub coordinator_log: String,
    /// Keep each coordinator's data directory (database and log); kept anyway when N is not held.
    #[arg(long)]
    pub keep: bool,
}

/// Runs every size asked for, printing each summary as it finishes; returns the figures.
pub async fn run(args: &AgentsArgs, machine: &Value) -> anyhow::Result<Value> {
    let tether = sibling_binary("tether")?;
    let mut results = Vec::new();
    let mut held_sizes = Vec::new();
    for &n in &args.n {
        if n == 0 {
            continue;
        }
        match run_one(n, args, &tether).await {
            Ok((block, figures)) => {
                if figures["held"].as_bool() == Some(true) {
                    held_sizes.push(n);
                }
                print!("{block}");
                results.push(figures);
            }
            Err(e) => {
                let mut b = Block::default();
                b.title(&format!("tether-bench agents: N = {n}"));
                b.line("result", format!("ERROR: {e:#}"));
                print!("{}", b.finish());
                results.push(json!({ "n": n, "held": false, "error": format!("{e:#}") }));
            }
        }
    }
    let mut b = Block::default();
    b.title("tether-bench agents: overall");
    b.line("machine", host::machine_line(machine));
    let tried: Vec<String> = args.n.iter().map(usize::to_string).collect();
    let largest = held_sizes.iter().max();
    b.line(
        "largest N held (every workspace running)",
        match largest {
            Some(n) => format!("{n} (tried: {})", tried.join(", ")),
            None => format!("none (tried: {})", tried.join(", ")),
        },
    );
    b.note(format!(
        "{:>7}  {:>4}  {:>13}  {:>9}  {:>11}  {:>12}  {:>13}",
        "N", "held", "all running", "KiB/agent", "cores", "restart back", "max unhealthy"
    ));
    for r in &results {
        let secs_or_dash = |v: &Value| v.as_f64().map_or("-".to_string(), |s| format!("{s:.1} s"));
        b.note(format!(
            "{:>7}  {:>4}  {:>13}  {:>9}  {:>11}  {:>12}  {:>13}",
            r["n"].as_u64().unwrap_or(0),
            if r["held"] == true { "yes" } else { "no" },
            secs_or_dash(&r["ramp"]["all_running_s"]),
            r["steady"]["rss_per_agent_kib"].as_f64().map_or("-".into(), |v| format!("{v:.1}")),
            r["steady"]["coordinator_cores"].as_f64().map_or("-".into(), |v| format!("{v:.3}")),
            secs_or_dash(&r["restart"]["all_back_s"]),
            r["restart"]["max_unhealthy_in_watch"].as_i64().map_or("-".into(), |v| v.to_string()),
        ));
    }
    b.note(format!(
        "targets: < {TARGET_KIB_PER_AGENT:.0} KiB coordinator RSS per agent, < {TARGET_CORES} core at steady state, \
         no workspace unhealthy after a restart"
    ));
    print!("{}", b.finish());
    Ok(json!({ "largest_n_held": largest, "runs": results }))
}

fn progress(t0: Instant, msg: impl std::fmt::Display) {
    eprintln!("[{:>7.1}s] {msg}", t0.elapsed().as_secs_f64());
}

async fn run_one(n: usize, args: &AgentsArgs, tether: &std::path::Path) -> anyhow::Result<(String, Value)> {
    let t0 = Instant::now();
    progress(t0, format!("N = {n}: starting the coordinator"));
    let (mut coord, first_start) = Coordinator::start(tether.to_path_buf(), &args.coordinator_log).await?;
    let udp_start = UdpCounters::read();
    let mut outcome = measure(n, args, &mut coord, t0).await;
    coord.kill();
    let mut kept = None;
    if let Ok((_, figures)) = &mut outcome {
        figures["coordinator_first_start_s"] = json!(round((first_start.ready - first_start.spawned).as_secs_f64(), 3));
        if args.keep || figures["held"].as_bool() != Some(true) {
            kept = Some(coord.keep().to_path_buf());
        }
    } else {
        kept = Some(coord.keep().to_path_buf());
    }
    let udp = UdpCounters::read().since(&udp_start);
    match &mut outcome {
        Ok((block, figures)) => {
            let mut b = Block::default();
            b.line(
                "UDP drops in this namespace (whole run)",
                format!("{} receive-buffer overflows, {} receive errors", udp.rcvbuf_errors, udp.in_errors),
            );
            if let Some(dir) = &kept {
                b.line("coordinator data and log kept in", dir.display());
            }
            block.push_str(&b.finish());
            figures["udp_drops"] = json!({ "rcvbuf_errors": udp.rcvbuf_errors, "in_errors": udp.in_errors });
            figures["kept_data_dir"] = json!(kept);
        }
        Err(e) => {
            if let Some(dir) = &kept {
                progress(t0, format!("N = {n} failed ({e:#}); coordinator data and log kept in {}", dir.display()));
            }
        }
    }
    outcome
}

async fn measure(n: usize, args: &AgentsArgs, coord: &mut Coordinator, t0: Instant) -> anyhow::Result<(String, Value)> {
    let pid = coord.pid().context("coordinator pid")?;

    // Workspaces.
    progress(t0, format!("creating {n} workspaces, {} requests in flight", args.create_concurrency));
    let created_at = Instant::now();
    let (tokens, create_retries) = create_workspaces(&coord.api, n, args.create_concurrency, t0).await?;
    let create_s = created_at.elapsed().as_secs_f64();
    progress(
        t0,
        format!("created {n} workspaces in {create_s:.1} s ({create_retries} retried after 'database is locked')"),
    );

    // Baseline before any agent connects.
    let before = Before {
        memory: host::memory(Some(pid))?,
        cpu: host::cpu(Some(pid))?,
        generator_cpu: host::cpu(None)?,
        machine_cpu: host::machine_cpu(),
        create_s,
        create_retries,
    };

    // Agents.
    let ca = std::fs::read(&coord.info.ca_cert).with_context(|| format!("reading {}", coord.info.ca_cert.display()))?;
    let client = tls::client_config(CaPin::from_pem(&ca, &coord.info.ca_cert.display().to_string())?)?;
    let heartbeat = args.heartbeat_ms.map(Duration::from_millis);
    let ramp_start = Instant::now();
    let swarm = Swarm::launch(
        SwarmConfig {
            coordinator: coord.info.quic_addr,
            client,
            per_endpoint: args.per_endpoint,
            handshakes: args.handshakes,
            heartbeat,
            recv_buffer: (args.client_recv_buffer > 0).then_some(args.client_recv_buffer),
            reconnect_on_events_error: args.reconnect_on_events_error,
        },
        tokens,
    )?;
    progress(
        t0,
        format!(
            "{n} simulated agents dialling over {} client endpoints (UDP receive buffer {} KiB each)",
            swarm.endpoints(),
            swarm.recv_buffer / 1024
        ),
    );
    let result = with_swarm(n, args, coord, t0, &swarm, ramp_start, &before).await;
    coord.kill();
    swarm.shutdown().await;
    result
}

/// What was measured before the agents started dialling.
struct Before {
    memory: host::Memory,
    cpu: host::CpuSample,
    generator_cpu: host::CpuSample,
    machine_cpu: host::CpuSample,
    create_s: f64,
    create_retries: usize,
}

/// Ramp, steady state and restart, with the simulated agents running.
async fn with_swarm(
    n: usize,
    args: &AgentsArgs,
    coord: &mut Coordinator,
    t0: Instant,
    swarm: &Swarm,
    ramp_start: Instant,
    before: &Before,
) -> anyhow::Result<(String, Value)> {
    let target = n as i64;
    let pid = coord.pid().context("coordinator pid")?;
    let Before {
        memory: mem_base,
        cpu: cpu_base,
        generator_cpu: gen_cpu_base,
        machine_cpu: m_base,
        create_s,
        create_retries,
    } = before;
    let (create_s, create_retries) = (*create_s, *create_retries);

    // Ramp: until status-counts shows every workspace running.
    let deadline = ramp_start + Duration::from_secs(args.ramp_timeout_secs);
    let mut welcomed_at = None;
    let mut running_at = None;
    let mut counts = StatusCounts::default();
    let mut last_print = Instant::now();
    let mut stalled = false;
    let mut last_state = None;
    let mut last_change = Instant::now();
    loop {
        let snap = swarm.snapshot();
        if welcomed_at.is_none() && snap.welcomed >= n {
            welcomed_at = Some(Instant::now());
        }
        match coord.api.status_counts().await {
            Ok(c) => counts = c,
            Err(e) => progress(t0, format!("status counts: {e:#}")),
        }
        if counts.running() >= target {
            running_at = Some(Instant::now());
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        let state = (counts.0.clone(), snap.welcomed, snap.connected, snap.attempts);
        if last_state.as_ref() != Some(&state) {
            last_state = Some(state);
            last_change = Instant::now();
        } else if snap.connected >= n && last_change.elapsed() >= Duration::from_secs(args.stall_secs) {
            stalled = true;
            break;
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            progress(
                t0,
                format!(
                    "ramp: welcomed {}/{n}, connected {}, failed attempts {}; workspaces: {}",
                    snap.welcomed,
                    snap.connected,
                    snap.failed_attempts,
                    counts.brief()
                ),
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let ramp_end = Instant::now();
    let ramp_snap = swarm.snapshot();
    let quic_port = [coord.info.quic_addr.port()];
    let gen_ports = swarm.local_ports();
    let drops_ramp = (host::udp_socket_drops(&quic_port), host::udp_socket_drops(&gen_ports));
    let cpu_ramp = host::cpu(Some(pid))?;
    let gen_cpu_ramp = host::cpu(None)?;
    let ramp_use = CpuUse::between((cpu_base, gen_cpu_base, m_base), (&cpu_ramp, &gen_cpu_ramp, &host::machine_cpu()));
    let ramp_secs = |t: Option<Instant>| t.map(|t| round((t - ramp_start).as_secs_f64(), 3));
    match running_at {
        Some(t) => progress(t0, format!("all {n} workspaces running after {:.2} s", (t - ramp_start).as_secs_f64())),
        None => progress(
            t0,
            format!(
                "NOT all running after {:.0} s{}: {}; welcomed {}/{n}, {} connected with their lifecycle events refused",
                ramp_end.duration_since(ramp_start).as_secs_f64(),
                if stalled { " (stalled: every agent connected, nothing changing)" } else { "" },
                counts.brief(),
                ramp_snap.welcomed,
                ramp_snap.events_refused_now
            ),
        ),
    }
    let ramp_cpu_s = cpu_ramp.cpu_s - cpu_base.cpu_s;
    let ramp = json!({
        "handshakes_in_flight_limit": args.handshakes,
        "client_endpoints": swarm.endpoints(),
        "client_socket_recv_buffer_bytes": swarm.recv_buffer,
        "all_welcomed_s": ramp_secs(welcomed_at),
        "all_running_s": ramp_secs(running_at),
        "stalled": stalled,
        "connected_with_events_refused": ramp_snap.events_refused_now,
        "welcomed": ramp_snap.welcomed,
        "status_counts_at_end": counts.0,
        "coordinator_cpu_s": round(ramp_cpu_s, 3),
        "coordinator_cpu_ms_per_agent": round(ramp_cpu_s * 1000.0 / n as f64, 3),
        "generator_cpu_s": round(gen_cpu_ramp.cpu_s - gen_cpu_base.cpu_s, 3),
        "cpu_use_cores": ramp_use.json(),
        "setup_mean_ms": round(ramp_snap.setup_mean_ms, 2),
        "setup_max_ms": round(ramp_snap.setup_max_ms, 2),
        "failed_attempts": ramp_snap.failed_attempts,
        "udp_drops_coordinator_socket": drops_ramp.0,
        "udp_drops_generator_sockets": drops_ramp.1,
    });

    // Steady state.
    progress(t0, format!("settling for {} s", args.settle_secs));
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    progress(t0, format!("steady state: measuring for {} s", args.steady_secs));
    let snap0 = swarm.snapshot();
    let drops0 = (host::udp_socket_drops(&quic_port), host::udp_socket_drops(&gen_ports));
    let c0 = host::cpu(Some(pid))?;
    let g0 = host::cpu(None)?;
    let m0 = host::machine_cpu();
    let udp0 = UdpCounters::read();
    let window_end = Instant::now() + Duration::from_secs(args.steady_secs);
    let mut checks = Vec::new();
    loop {
        let left = window_end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        tokio::time::sleep(left.min(Duration::from_secs(5))).await;
        let at = round(c0.at.elapsed().as_secs_f64(), 1);
        match coord.api.status_counts().await {
            Ok(c) => {
                checks.push(json!({ "t_s": at, "running": c.running(), "unhealthy": c.unhealthy(), "counts": c.0 }))
            }
            Err(e) => checks.push(json!({ "t_s": at, "error": format!("{e:#}") })),
        }
    }
    let c1 = host::cpu(Some(pid))?;
    let g1 = host::cpu(None)?;
    let m1 = host::machine_cpu();
    let udp1 = UdpCounters::read().since(&udp0);
    let snap1 = swarm.snapshot();
    let drops1 = (host::udp_socket_drops(&quic_port), host::udp_socket_drops(&gen_ports));
    let mem_steady = host::memory(Some(pid))?;
    let gen_mem = host::memory(None)?;
    let coord_cores = c1.cores_since(&c0);
    let gen_cores = g1.cores_since(&g0);
    let machine_cores = m1.cores_since(&m0);
    let window_s = c1.at.duration_since(c0.at).as_secs_f64().max(1e-9);
    let heartbeats = snap1.heartbeats - snap0.heartbeats;
    // Loopback: every datagram either side sends is received once in this namespace.
    let datagrams_per_s = udp1.in_datagrams as f64 / window_s;
    let holding = |c: &Value| c["running"].as_i64() == Some(target) && c["unhealthy"].as_i64() == Some(0);
    let violations: Vec<&Value> = checks.iter().filter(|c| !holding(c)).collect();
    let held = running_at.is_some() && !checks.is_empty() && violations.is_empty();
    let kib_per_agent = (mem_steady.rss_kib as f64 - mem_base.rss_kib as f64) / n as f64;
    let anon_kib_per_agent = (mem_steady.anon_kib as f64 - mem_base.anon_kib as f64) / n as f64;
    let min_running = checks.iter().filter_map(|c| c["running"].as_i64()).min();
    let max_unhealthy = checks.iter().filter_map(|c| c["unhealthy"].as_i64()).max();
    progress(
        t0,
        format!("steady state: coordinator {coord_cores:.3} cores, {} RSS; held: {held}", mib(mem_steady.rss_kib)),
    );
    let steady = json!({
        "window_s": round(c1.at.duration_since(c0.at).as_secs_f64(), 2),
        "settle_s": args.settle_secs,
        "coordinator_cores": round(coord_cores, 4),
        "generator_cores": round(gen_cores, 4),
        "machine_busy_cores": round(machine_cores, 4),
        "udp_datagrams_per_s": round(datagrams_per_s, 1),
        "udp_datagrams_per_heartbeat": round(udp1.in_datagrams as f64 / heartbeats.max(1) as f64, 2),
        "coordinator_memory_baseline": mem_base.json(),
        "coordinator_memory_steady": mem_steady.json(),
        "rss_per_agent_kib": round(kib_per_agent, 2),
        "rss_anon_per_agent_kib": round(anon_kib_per_agent, 2),
        "generator_memory": gen_mem.json(),
        "connected_agents": snap1.connected,
        "heartbeats_sent": snap1.heartbeats - snap0.heartbeats,
        "connections_lost": snap1.lost - snap0.lost,
        "connected_with_events_refused": snap1.events_refused_now,
        "udp_drops_coordinator_socket": drops1.0 - drops0.0,
        "udp_drops_generator_sockets": drops1.1 - drops0.1,
        "checks": checks,
        "min_running": min_running,
        "max_unhealthy": max_unhealthy,
    });

    // Restart.
    let drops_before_restart = (host::udp_socket_drops(&quic_port), host::udp_socket_drops(&gen_ports));
    let restart = if args.no_restart { Value::Null } else { restart(n, args, coord, swarm, t0).await? };
    // The restarted coordinator has a new socket on the same port, counting from zero.
    let drops_end = (host::udp_socket_drops(&quic_port), host::udp_socket_drops(&gen_ports));

    // Summary.
    let final_snap = swarm.snapshot();
    let mut b = Block::default();
    b.title(&format!("tether-bench agents: N = {n}"));
    b.line(
        format!("create {n} workspaces ({} in flight)", args.create_concurrency).as_str(),
        format!(
            "{} ({:.0}/s); {create_retries} requests retried after HTTP 500 'database is locked'",
            secs(create_s),
            n as f64 / create_s.max(1e-9)
        ),
    );
    b.line(
        "load generator set-up",
        format!(
            "{} client sockets of up to {} agents, {} KiB receive buffer each, up to {} set-ups in flight",
            swarm.endpoints(),
            args.per_endpoint,
            swarm.recv_buffer / 1024,
            args.handshakes
        ),
    );
    b.line(
        "ramp: all agents welcomed",
        match welcomed_at {
            Some(t) => {
                format!("{} ({:.0}/s)", secs((t - ramp_start).as_secs_f64()), n as f64 / (t - ramp_start).as_secs_f64())
            }
            None => format!("not within {} s ({} of {n})", args.ramp_timeout_secs, ramp_snap.welcomed),
        },
    );
    b.line(
        "ramp: all workspaces running",
        match running_at {
            Some(t) => secs((t - ramp_start).as_secs_f64()),
            None => format!(
                "NO: {} after {:.0} s{}",
                counts.brief(),
                ramp_end.duration_since(ramp_start).as_secs_f64(),
                if stalled { ", stalled (every agent connected, nothing changing)" } else { "" }
            ),
        },
    );
    if ramp_snap.events_refused_now > 0 || snap1.events_refused_now > 0 {
        b.line(
            "agents stuck with refused lifecycle events",
            format!(
                "{} at the end of the ramp, {} at the end of the steady window (connected, heartbeating, events \
                 answered with an error and not resent until the next connection, as tether-agent does)",
                ramp_snap.events_refused_now, snap1.events_refused_now
            ),
        );
    }
    b.line(
        "ramp: coordinator CPU per agent connect",
        format!("{:.2} ms ({:.1} CPU-s in all)", ramp_cpu_s * 1000.0 / n as f64, ramp_cpu_s),
    );
    b.line("ramp: CPU use (cores)", ramp_use.describe());
    b.line(
        "ramp: connection set-up (dial to events ack)",
        format!(
            "mean {:.1} ms, max {:.1} ms, with up to {} in flight; {} failed attempts",
            ramp_snap.setup_mean_ms, ramp_snap.setup_max_ms, args.handshakes, ramp_snap.failed_attempts
        ),
    );
    b.line(
        "held: every workspace running",
        format!(
            "{} ({} checks over {} s; min running {}, max unhealthy {})",
            if held { "YES" } else { "NO" },
            checks.len(),
            args.steady_secs,
            min_running.map_or("-".into(), |v| v.to_string()),
            max_unhealthy.map_or("-".into(), |v| v.to_string()),
        ),
    );
    b.line(
        "coordinator RSS per agent",
        format!(
            "{kib_per_agent:.1} KiB (baseline {} -> steady {}; anon {anon_kib_per_agent:.1} KiB/agent)   [target < {TARGET_KIB_PER_AGENT:.0} KiB: {}]",
            mib(mem_base.rss_kib),
            mib(mem_steady.rss_kib),
            verdict(kib_per_agent < TARGET_KIB_PER_AGENT)
        ),
    );
    b.line(
        format!("coordinator CPU at steady state ({} s)", args.steady_secs).as_str(),
        format!("{coord_cores:.3} cores   [target < {TARGET_CORES} core: {}]", verdict(coord_cores < TARGET_CORES)),
    );
    b.line(
        "load generator (same machine) at steady state",
        format!("{gen_cores:.3} cores, {} RSS", mib(gen_mem.rss_kib)),
    );
    b.line(
        "whole machine busy in the window",
        format!(
            "{machine_cores:.3} cores of {} (other processes and kernel: {:.3})",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            (machine_cores - coord_cores - gen_cores).max(0.0)
        ),
    );
    b.line(
        "heartbeats sent in the window",
        format!("{heartbeats} ({:.0}/s), {} connections lost", heartbeats as f64 / window_s, snap1.lost - snap0.lost),
    );
    b.line(
        "UDP datagrams on loopback in the window",
        format!(
            "{datagrams_per_s:.0}/s, {:.2} per heartbeat (both directions: QUIC ACKs and keep-alive PINGs included)",
            udp1.in_datagrams as f64 / heartbeats.max(1) as f64
        ),
    );
    if !restart.is_null() {
        let r = &restart;
        b.line(
            "restart: coordinator up (spawn -> coordinator.json)",
            secs(r["coordinator_ready_s"].as_f64().unwrap_or(0.0)),
        );
        b.line(
            "restart: all agents welcomed again",
            match r["all_welcomed_s"].as_f64() {
                Some(s) => secs(s),
                None => format!("not within {} s ({} of {n})", args.restart_timeout_secs, r["welcomed"]),
            },
        );
        b.line(
            "restart: all back (welcomed and running == N)",
            match r["all_back_s"].as_f64() {
                Some(s) => secs(s),
                None if r["stalled"] == true => format!(
                    "NO: stalled with every agent connected, {} with refused lifecycle events",
                    r["connected_with_events_refused"]
                ),
                None => format!("not within {} s", args.restart_timeout_secs),
            },
        );
        let flaps = r["max_unhealthy_in_watch"].as_i64().unwrap_or(-1);
        b.line(
            format!("restart: max unhealthy in {} s after", args.restart_watch_secs).as_str(),
            format!(
                "{flaps} (max not running: {}; max unhealthy until all back: {})   [no flapping: {}]",
                r["max_not_running_in_watch"],
                r["max_unhealthy_until_end"],
                verdict(flaps == 0)
            ),
        );
        b.line("restart: CPU use (cores)", r["cpu_use_cores"]["text"].as_str().unwrap_or("-"));
        b.line(
            "restart: new coordinator CPU",
            format!(
                "{} CPU-s until all back, {} CPU-s until the end of the watch; RSS then {}",
                r["coordinator_cpu_s"].as_f64().map_or("-".into(), |v| format!("{v:.1}")),
                r["coordinator_cpu_s_at_end"].as_f64().map_or("-".into(), |v| format!("{v:.1}")),
                mib(r["coordinator_rss_kib_after"].as_u64().unwrap_or(0))
            ),
        );
    }
    b.line(
        "UDP drops: coordinator socket / generator sockets",
        format!(
            "ramp {} / {}, steady window {} / {}, {} {} / {}",
            drops_ramp.0,
            drops_ramp.1,
            drops1.0 - drops0.0,
            drops1.1 - drops0.1,
            if restart.is_null() { "after the window" } else { "restart" },
            drops_end.0,
            drops_end.1 - drops_before_restart.1
        ),
    );
    if !final_snap.reasons.is_empty() {
        b.note("connection failures and losses seen by the simulated agents (whole run):");
        for (reason, count) in &final_snap.reasons {
            b.note(format!("  {count:>7}  {reason}"));
        }
    }
    let figures = json!({
        "n": n,
        "held": held,
        "agent_model": if args.reconnect_on_events_error { "reconnects when its events are refused" } else { "as tether-agent: stays connected when its events are refused" },
        "heartbeat": match args.heartbeat_ms { Some(ms) => json!({ "fixed_ms": ms }), None => json!("from the welcome") },
        "create": { "seconds": round(create_s, 3), "concurrency": args.create_concurrency, "retried_database_locked": create_retries },
        "ramp": ramp,
        "steady": steady,
        "restart": restart,
        "swarm": final_snap.json(),
        "udp_socket_drops": {
            "coordinator_until_restart": drops_before_restart.0,
            "coordinator_after_restart": if restart.is_null() { Value::Null } else { json!(drops_end.0) },
            "generator_total": drops_end.1,
        },
        "targets": {
            "rss_per_agent_kib": { "target_below": TARGET_KIB_PER_AGENT, "measured": round(kib_per_agent, 2), "pass": kib_per_agent < TARGET_KIB_PER_AGENT },
            "coordinator_cores": { "target_below": TARGET_CORES, "measured": round(coord_cores, 4), "pass": coord_cores < TARGET_CORES },
        },
    });
    Ok((b.finish(), figures))
}

/// SIGKILL, start again on the same ports and data directory, and time the way back.
async fn restart(
    n: usize,
    args: &AgentsArgs,
    coord: &mut Coordinator,
    swarm: &Swarm,
    t0: Instant,
) -> anyhow::Result<Value> {
    progress(t0, "restart: SIGKILL the coordinator and start it again");
    let before = swarm.snapshot();
    let gen0 = host::cpu(None)?;
    let m0 = host::machine_cpu();
    coord.kill();
    swarm.next_generation();
    let started = coord.start_again().await?;
    let pid = coord.pid().context("coordinator pid")?;
    let spawned = started.spawned;
    let ready_s = (started.ready - spawned).as_secs_f64();
    progress(t0, format!("restart: new coordinator up after {ready_s:.2} s"));
    let target = n as i64;
    let deadline = spawned + Duration::from_secs(args.restart_timeout_secs);
    let watch_end = spawned + Duration::from_secs(args.restart_watch_secs);
    let mut welcomed_at: Option<Instant> = None;
    let mut back_at: Option<Instant> = None;
    let mut back_cpu = None;
    let mut timeline = Vec::new();
    let mut max_unhealthy_watch = 0i64;
    let mut max_not_running_watch = 0i64;
    let mut max_unhealthy_all = 0i64;
    let mut next_sample = Instant::now();
    let mut last_state = None;
    let mut last_change = Instant::now();
    let mut stalled = false;
    loop {
        let now = Instant::now();
        let snap = swarm.snapshot();
        if welcomed_at.is_none() && snap.welcomed >= n {
            welcomed_at = Some(now);
            progress(
                t0,
                format!("restart: all {n} agents welcomed again after {:.2} s", (now - spawned).as_secs_f64()),
            );
        }
        // Status every second for the timeline; as often as we loop once everyone is welcomed.
        let sample = now >= next_sample;
        if sample || (welcomed_at.is_some() && back_at.is_none()) {
            if sample {
                next_sample += Duration::from_secs(1);
            }
            match coord.api.status_counts().await {
                Ok(c) => {
                    let t = Instant::now();
                    if t <= watch_end {
                        max_unhealthy_watch = max_unhealthy_watch.max(c.unhealthy());
                        max_not_running_watch = max_not_running_watch.max(target - c.running());
                    }
                    max_unhealthy_all = max_unhealthy_all.max(c.unhealthy());
                    if back_at.is_none() && welcomed_at.is_some() && c.running() >= target {
                        back_at = Some(t);
                        back_cpu = Some(host::cpu(Some(pid))?.cpu_s);
                        progress(
                            t0,
                            format!("restart: all back and running after {:.2} s", (t - spawned).as_secs_f64()),
                        );
                    }
                    let state = (c.0.clone(), snap.welcomed, snap.connected);
                    if last_state.as_ref() != Some(&state) {
                        last_state = Some(state);
                        last_change = t;
                    } else if back_at.is_none()
                        && welcomed_at.is_some()
                        && snap.connected >= n
                        && t >= watch_end
                        && last_change.elapsed() >= Duration::from_secs(args.stall_secs)
                    {
                        stalled = true;
                    }
                    if sample {
                        timeline.push(json!({
                            "t_s": round((t - spawned).as_secs_f64(), 2),
                            "running": c.running(),
                            "unhealthy": c.unhealthy(),
                            "starting": c.get("starting"),
                            "welcomed": snap.welcomed,
                            "connected": snap.connected,
                        }));
                        if timeline.len().is_multiple_of(5) {
                            progress(
                                t0,
                                format!(
                                    "restart +{:.0}s: welcomed {}/{n}, connected {}; workspaces: {}",
                                    (t - spawned).as_secs_f64(),
                                    snap.welcomed,
                                    snap.connected,
                                    c.brief()
                                ),
                            );
                        }
                    }
                }
                Err(e) => {
                    if sample {
                        timeline
                            .push(json!({ "t_s": round((now - spawned).as_secs_f64(), 2), "error": format!("{e:#}") }));
                    }
                }
            }
        }
        let now = Instant::now();
        if (back_at.is_some() && now >= watch_end) || now >= deadline || stalled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = swarm.snapshot();
    let mem_after = host::memory(Some(pid))?;
    let cpu_end = host::cpu(Some(pid))?;
    // The new process started from zero CPU time, at the spawn.
    let spawn_sample = host::CpuSample { cpu_s: 0.0, at: spawned };
    let restart_use = CpuUse::between((&spawn_sample, &gen0, &m0), (&cpu_end, &host::cpu(None)?, &host::machine_cpu()));
    let cpu_end = cpu_end.cpu_s;
    let since = |t: Option<Instant>| t.map(|t| round((t - spawned).as_secs_f64(), 3));
    Ok(json!({
        "coordinator_ready_s": round(ready_s, 3),
        "all_welcomed_s": since(welcomed_at),
        "all_back_s": since(back_at),
        "welcomed": after.welcomed,
        "stalled": stalled,
        "connected_with_events_refused": after.events_refused_now,
        "max_unhealthy_in_watch": max_unhealthy_watch,
        "max_not_running_in_watch": max_not_running_watch,
        "max_unhealthy_until_end": max_unhealthy_all,
        "watch_s": args.restart_watch_secs,
        "coordinator_cpu_s": back_cpu.map(|c| round(c, 3)),
        "coordinator_cpu_s_at_end": round(cpu_end, 3),
        "cpu_use_cores": restart_use.json(),
        "coordinator_rss_kib_after": mem_after.rss_kib,
        "failed_attempts": after.failed_attempts - before.failed_attempts,
        "connections_lost": after.lost - before.lost,
        "timeline": timeline,
    }))
}

/// Creates `bench-000000`… with bounded concurrency; returns the agent tokens and how many requests
/// had to be retried because the coordinator's database was locked.
/// CPU cores used over an interval by the coordinator, the load generator, and everything else.
struct CpuUse {
    coordinator: f64,
    generator: f64,
    machine: f64,
}

impl CpuUse {
    fn between(
        (c0, g0, m0): (&host::CpuSample, &host::CpuSample, &host::CpuSample),
        (c1, g1, m1): (&host::CpuSample, &host::CpuSample, &host::CpuSample),
    ) -> CpuUse {
        CpuUse { coordinator: c1.cores_since(c0), generator: g1.cores_since(g0), machine: m1.cores_since(m0) }
    }

    fn describe(&self) -> String {
        format!(
            "coordinator {:.2}, load generator {:.2}, everything else {:.2} (machine busy {:.2} of {})",
            self.coordinator,
            self.generator,
            (self.machine - self.coordinator - self.generator).max(0.0),
            self.machine,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        )
    }

    fn json(&self) -> Value {
        json!({
            "coordinator": round(self.coordinator, 3),
            "generator": round(self.generator, 3),
            "machine": round(self.machine, 3),
            "text": self.describe(),
        })
    }
}

async fn create_workspaces(
    api: &Api,
    n: usize,
    concurrency: usize,
    t0: Instant,
) -> anyhow::Result<(Vec<String>, usize)> {
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.clamp(1, n) {
        let (api, next, done, retries) = (api.clone(), next.clone(), done.clone(), retries.clone());
        workers.spawn(async move {
            let mut made = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(made);
                }
                let (token, retried) = api.create(&format!("bench-{i:06}"), TEMPLATE).await?;
                made.push((i, token));
                retries.fetch_add(retried as usize, Ordering::Relaxed);
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let mut tokens = vec![String::new(); n];
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    loop {
        tokio::select! {
            r = workers.join_next() => match r {
                Some(r) => for (i, t) in r.context("creation worker")?? { tokens[i] = t },
                None => break,
            },
            _ = tick.tick() => progress(t0, format!("created {}/{n}", done.load(Ordering::Relaxed))),
        }
    }
    Ok((tokens, retries.load(Ordering::Relaxed)))
}
