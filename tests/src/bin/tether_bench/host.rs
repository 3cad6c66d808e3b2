//! What the benchmark reads about the machine and its processes: resident memory and CPU time from
//! `/proc`, UDP drop counters, the open-files limit. Linux only, like the coordinator's deployment.

use anyhow::{anyhow, Context};
use std::time::Instant;

/// Resident memory of one process, from `/proc/PID/status`, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub anon_kib: u64,
    pub file_kib: u64,
    pub shmem_kib: u64,
}

impl Memory {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "vm_rss_kib": self.rss_kib,
            "vm_hwm_kib": self.hwm_kib,
            "rss_anon_kib": self.anon_kib,
            "rss_file_kib": self.file_kib,
            "rss_shmem_kib": self.shmem_kib,
        })
    }
}

/// `pid` is `None` for this process.
pub fn memory(pid: Option<u32>) -> anyhow::Result<Memory> {
    let path = proc_path(pid, "status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let mut m = Memory::default();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else { continue };
        let kib = || rest.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0);
        match key {
            "VmRSS" => m.rss_kib = kib(),
            "VmHWM" => m.hwm_kib = kib(),
            "RssAnon" => m.anon_kib = kib(),
            "RssFile" => m.file_kib = kib(),
            "RssShmem" => m.shmem_kib = kib(),
            _ => {}
        }
    }
    if m.rss_kib == 0 {
        return Err(anyhow!("no VmRSS in {path}"));
    }
    Ok(m)
}

/// User plus system CPU time a process has used so far, in seconds, with the wall-clock instant it
/// was read at.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    pub cpu_s: f64,
    pub at: Instant,
}

impl CpuSample {
    /// Cores used between `earlier` and `self`: CPU seconds per wall second.
    pub fn cores_since(&self, earlier: &CpuSample) -> f64 {
        let wall = self.at.saturating_duration_since(earlier.at).as_secs_f64();
        if wall <= 0.0 {
            return 0.0;
        }
        (self.cpu_s - earlier.cpu_s) / wall
    }
}

pub fn cpu(pid: Option<u32>) -> anyhow::Result<CpuSample> {
    let path = proc_path(pid, "stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let at = Instant::now();
    // The command name (field 2) may hold spaces and parentheses: fields are counted after the last ')'.
    let after = text.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("{path} has no ')'"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After ')': field 3 (state) is index 0, so utime (14) is index 11 and stime (15) index 12.
    let num = |i: usize| -> anyhow::Result<u64> {
        fields.get(i).and_then(|f| f.parse().ok()).ok_or_else(|| anyhow!("{path}: field {} is not a number", i + 3))
    };
    let ticks = num(11)? + num(12)?;
    Ok(CpuSample { cpu_s: ticks as f64 / clock_ticks() as f64, at })
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as u64,
        // POSIX requires the value; 100 is what Linux has always reported.
        _ => 100,
    })
}

fn proc_path(pid: Option<u32>, file: &str) -> String {
    match pid {
        Some(p) => format!("/proc/{p}/{file}"),
        None => format!("/proc/self/{file}"),
    }
}

/// Raises this process's open-files limit to its hard limit; children inherit it. Returns the new
/// soft limit.
pub fn raise_nofile() -> anyhow::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading the open-files limit")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising the open-files limit")?;
    }
    Ok(hard)
}

/// System-wide UDP counters of this network namespace (`/proc/net/snmp`): datagrams received,
/// dropped because a socket's receive buffer was full, and all receive errors.
#[derive(Debug, Clone, Copy, Default)]
pub struct UdpCounters {
    pub in_datagrams: u64,
    pub rcvbuf_errors: u64,
    pub in_errors: u64,
}

impl UdpCounters {
    pub fn read() -> UdpCounters {
        let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
        let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
        let (Some(names), Some(values)) = (lines.next(), lines.next()) else { return UdpCounters::default() };
        let mut d = UdpCounters::default();
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            match n {
                "InDatagrams" => d.in_datagrams = v.parse().unwrap_or(0),
                "RcvbufErrors" => d.rcvbuf_errors = v.parse().unwrap_or(0),
                "InErrors" => d.in_errors = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        d
    }

    pub fn since(&self, earlier: &UdpCounters) -> UdpCounters {
        UdpCounters {
            in_datagrams: self.in_datagrams.saturating_sub(earlier.in_datagrams),
            rcvbuf_errors: self.rcvbuf_errors.saturating_sub(earlier.rcvbuf_errors),
            in_errors: self.in_errors.saturating_sub(earlier.in_errors),
        }
    }
}

/// The machine the figures were measured on.
pub fn machine() -> serde_json::Value {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string()))
        .unwrap_or_default();
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default();
    serde_json::json!({
        "cpus": cpus,
        "cpu_model": model,
        "mem_total_kib": mem_kib,
        "kernel": read("/proc/sys/kernel/osrelease"),
        "net_core_rmem_max": read("/proc/sys/net/core/rmem_max"),
        "net_core_rmem_default": read("/proc/sys/net/core/rmem_default"),
    })
}

pub fn machine_line(m: &serde_json::Value) -> String {
    format!(
        "{} CPUs ({}), {:.1} GiB RAM, Linux {}, net.core.rmem_max={} rmem_default={}",
        m["cpus"],
        m["cpu_model"].as_str().unwrap_or("?"),
        m["mem_total_kib"].as_u64().unwrap_or(0) as f64 / 1024.0 / 1024.0,
        m["kernel"].as_str().unwrap_or("?"),
        m["net_core_rmem_max"].as_str().unwrap_or("?"),
        m["net_core_rmem_default"].as_str().unwrap_or("?"),
    )
}

/// Datagrams dropped so far by the 127.0.0.1 UDP sockets bound to `ports` (`/proc/net/udp`, last
/// column), summed. Counters belong to sockets: a restarted process starts again from zero.
pub fn udp_socket_drops(ports: &[u16]) -> u64 {
    let text = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = fields.get(1)?.split_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok())?;
            let drops: u64 = fields.last()?.parse().ok()?;
            ports.contains(&port).then_some(drops)
        })
        .sum()
}

/// CPU time the whole machine has spent busy so far (all processes, kernel included), in seconds,
/// from the first line of `/proc/stat`.
pub fn machine_cpu() -> CpuSample {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let at = Instant::now();
    let ticks: Vec<u64> = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|rest| rest.split_whitespace().filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal ...: busy is everything but idle and iowait,
    // and guest time, which is already counted in user.
    let busy: u64 = ticks.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum();
    CpuSample { cpu_s: busy as f64 / clock_ticks() as f64, at }
}
