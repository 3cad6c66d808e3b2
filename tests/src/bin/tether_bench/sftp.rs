//! `tether-bench sftp`: the agent's built-in SFTP server against OpenSSH's `sftp-server`, with the
//! same `sftp` client (`sftp -D SERVER`, no SSH in between), in the same run, alternating rounds.
//! Both ends of each transfer are the page cache and /dev/null, so the disk stays out of it.

use crate::coordinator::sibling_binary;
use crate::host;
use crate::report::{median_max, Block};
use anyhow::{bail, Context};
use rand::{RngCore, SeedableRng};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

const OPENSSH_SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";

#[derive(Debug, Clone, clap::Args)]
pub struct SftpArgs {
    /// Size of the file moved each way, in MiB.
    #[arg(long, default_value_t = 256)]
    pub mib: usize,
    /// Measured rounds per direction and server (after one warm-up round); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
}

/// Runs one `sftp -D server -b batch` in `dir`; its time.
fn transfer(dir: &Path, server: &str, batch: &Path) -> anyhow::Result<f64> {
    let started = Instant::now();
    let out = Command::new("sftp")
        .args(["-q", "-D", server, "-b"])
        .arg(batch)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running sftp (install openssh-client)")?;
    if !out.status.success() {
        bail!("sftp -D {server} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(started.elapsed().as_secs_f64())
}

pub async fn run(args: &SftpArgs, machine: &Value) -> anyhow::Result<Value> {
    if args.mib == 0 || args.rounds == 0 {
        bail!("--mib and --rounds must be at least 1");
    }
    if !Path::new(OPENSSH_SFTP_SERVER).exists() {
        bail!("{OPENSSH_SFTP_SERVER} is not installed (apt-get install openssh-server): it is the baseline");
    }
    let ours = format!("{} sftp-server", sibling_binary("tether-agent")?.display());
    let servers = [("tether-agent sftp-server", ours.as_str()), ("OpenSSH sftp-server", OPENSSH_SFTP_SERVER)];
    let dir = tempfile::Builder::new().prefix("tether-bench-sftp-").tempdir()?;
    let d = dir.path();
    let mut data = vec![0u8; args.mib << 20];
    rand::rngs::StdRng::seed_from_u64(2).fill_bytes(&mut data);
    std::fs::write(d.join("big.bin"), &data)?;
    drop(data);

    let mut b = Block::default();
    b.title(&format!("tether-bench sftp: {} MiB each way, median of {} rounds", args.mib, args.rounds));
    b.line("machine", host::machine_line(machine));
    let mut figures = serde_json::Map::new();
    for (what, batch) in [("get", "get big.bin /dev/null\n"), ("put", "put big.bin /dev/null\n")] {
        let batch_file = d.join(format!("{what}.batch"));
        std::fs::write(&batch_file, batch)?;
        let mut times: [Vec<f64>; 2] = [vec![], vec![]];
        // A warm-up round, then alternating servers, so both see the same machine.
        for round in 0..=args.rounds {
            for (i, (_, server)) in servers.iter().enumerate() {
                // Nothing else runs in this benchmark, so blocking here holds nobody up.
                let t = transfer(d, server, &batch_file)?;
                if round > 0 {
                    times[i].push(t);
                }
            }
            eprintln!("sftp {what}: round {round} of {}", args.rounds);
        }
        let medians: Vec<f64> = times.iter().map(|t| median_max(t).map_or(f64::NAN, |(m, _)| m)).collect();
        for ((name, _), m) in servers.iter().zip(&medians) {
            b.line(&format!("{what}: {name}"), format!("{:.0} MiB/s ({m:.2} s)", args.mib as f64 / m));
        }
        let ratio = medians[1] / medians[0];
        b.line(&format!("{what}: throughput ours / OpenSSH"), format!("{ratio:.2}"));
        figures
            .insert(what.to_string(), json!({ "ours_s": times[0], "openssh_s": times[1], "throughput_ratio": ratio }));
    }
    print!("{}", b.finish());
    Ok(json!({ "mib": args.mib, "rounds": args.rounds, "results": figures }))
}
