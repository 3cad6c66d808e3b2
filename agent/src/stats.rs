//! Heartbeat numbers: cpu, memory, disk, load and uptime. One `System` lives as long as the agent,
//! and each beat refreshes only cpu usage and memory, which cost microseconds. Disk space is measured
//! off the runtime's thread (see [`Disk`]).

use crate::ssh::activity::Activity;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use sysinfo::System;
use tether_shared::proto::Heartbeat;

const CGROUP_V2_CPU_MAX: &str = "/sys/fs/cgroup/cpu.max";
const CGROUP_V1_CPU_DIRS: &[&str] = &["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"];

/// Samples system numbers for heartbeats.
pub struct Stats {
    sys: Option<System>,
    disk: Disk,
    ssh: Option<Arc<Activity>>,
}

impl Stats {
    pub fn new(home: PathBuf) -> Self {
        let sys = match System::new() {
            Ok(mut sys) => {
                // CPU usage is a difference between two refreshes: take the first one now.
                sys.refresh_cpu_usage();
                Some(sys)
            }
            Err(e) => {
                tracing::warn!(error = %e, "system statistics are unavailable; heartbeats carry zeros");
                None
            }
        };
        Stats { sys, disk: Disk::new(home), ssh: None }
    }

    /// Reports SSH activity from these counters in each heartbeat.
    pub fn with_ssh(mut self, activity: Arc<Activity>) -> Self {
        self.ssh = Some(activity);
        self
    }

    pub fn sample(&mut self, now_ms: i64) -> Heartbeat {
        let mut hb = Heartbeat { sent_at_ms: now_ms, ..Heartbeat::default() };
        let mut host_cpus = 0;
        if let Some(sys) = &mut self.sys {
            sys.refresh_cpu_usage();
            sys.refresh_memory();
            hb.cpu_percent = sys.global_cpu_usage();
            host_cpus = sys.cpus().len();
            match sys.cgroup_limits() {
                Some(limits) => {
                    hb.mem_total = limits.total_memory;
                    hb.mem_used = limits.total_memory.saturating_sub(limits.free_memory);
                }
                None => {
                    hb.mem_total = sys.total_memory();
                    hb.mem_used = sys.used_memory();
                }
            }
        }
        if host_cpus == 0 {
            host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        }
        hb.cpu_limit = cpu_limit().unwrap_or(host_cpus as f32);
        if let Ok(load) = System::load_average() {
            hb.load = [load.one as f32, load.five as f32, load.fifteen as f32];
        }
        hb.uptime_s = System::uptime().unwrap_or(0);
        if let Some(ssh) = &self.ssh {
            hb.ssh = ssh.snapshot();
        }
        if let Some((used, total)) = self.disk.latest() {
            (hb.disk_used, hb.disk_total) = (used, total);
        }
        hb
    }
}

/// The space on the volume holding the workspace user's home, measured on the blocking pool.
/// `statvfs` on a network filesystem whose server has gone can block for minutes, and the agent's
/// one worker thread also carries every SSH session and the tunnel: a stuck measurement must stall
/// neither. Each beat reports the latest figures and starts the next measurement, unless the last
/// one has not answered yet (then at most one thread is stuck, and beats go on without new figures).
struct Disk {
    home: Arc<PathBuf>,
    latest: Arc<Mutex<Option<(u64, u64)>>>,
    measuring: Arc<AtomicBool>,
}

impl Disk {
    fn new(home: PathBuf) -> Self {
        let disk = Disk { home: Arc::new(home), latest: Arc::default(), measuring: Arc::default() };
        // The first heartbeat goes as soon as the tunnel is up: measure now so it has figures.
        disk.measure();
        disk
    }

    /// The latest figures (used, total), if any measurement has answered; starts the next one.
    fn latest(&self) -> Option<(u64, u64)> {
        let latest = *self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        self.measure();
        latest
    }

    fn measure(&self) {
        if self.measuring.swap(true, Ordering::AcqRel) {
            return;
        }
        let (home, latest, measuring) = (self.home.clone(), self.latest.clone(), self.measuring.clone());
        let job = move || {
            if let Ok(fs) = nix::sys::statvfs::statvfs(home.as_path()) {
                *latest.lock().unwrap_or_else(PoisonError::into_inner) = Some(disk_space(&fs));
            }
            measuring.store(false, Ordering::Release);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(job)),
            // Outside a runtime (a unit test) there is no worker to protect.
            Err(_) => job(),
        }
    }
}

/// (used, total) bytes, as `df` counts them: the total is what the workspace's user can fill, used
/// plus available, so blocks reserved for root count in neither and `used / total` is `df`'s Use%.
// The statvfs field types differ between platforms; on 64-bit Linux they are already u64.
#[allow(clippy::useless_conversion)]
fn disk_space(fs: &nix::sys::statvfs::Statvfs) -> (u64, u64) {
    let unit = u64::from(fs.fragment_size());
    let blocks = u64::from(fs.blocks());
    let free = u64::from(fs.blocks_free());
    let available = u64::from(fs.blocks_available()).min(free);
    let used = blocks.saturating_sub(free);
    (used.saturating_mul(unit), used.saturating_add(available).saturating_mul(unit))
}

/// CPUs the cgroup allows, when it sets a quota.
fn cpu_limit() -> Option<f32> {
    if let Ok(text) = std::fs::read_to_string(CGROUP_V2_CPU_MAX) {
        return parse_cpu_max(&text);
    }
    for dir in CGROUP_V1_CPU_DIRS {
        let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).ok();
        if let (Some(quota), Some(period)) = (read("cpu.cfs_quota_us"), read("cpu.cfs_period_us")) {
            return parse_quota(quota.trim(), period.trim());
        }
    }
    None
}

/// Parses cgroup v2 `cpu.max`: `QUOTA PERIOD` gives QUOTA/PERIOD CPUs; `max` means no limit.
pub fn parse_cpu_max(text: &str) -> Option<f32> {
    let mut parts = text.split_whitespace();
    let quota = parts.next()?;
    let period = parts.next().unwrap_or("100000");
    parse_quota(quota, period)
}

fn parse_quota(quota: &str, period: &str) -> Option<f32> {
    // "max" (v2) and "-1" (v1) both mean unlimited and fail to parse as a positive number.
    let quota: f64 = quota.parse().ok().filter(|q: &f64| *q > 0.0)?;
    let period: f64 = period.parse().ok().filter(|p: &f64| *p > 0.0)?;
    Some((quota / period) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max_parsing() {
        assert_eq!(parse_cpu_max("200000 100000\n"), Some(2.0));
        assert_eq!(parse_cpu_max("50000 100000"), Some(0.5));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max(""), None);
        assert_eq!(parse_cpu_max("garbage"), None);
        assert_eq!(parse_quota("-1", "100000"), None);
        assert_eq!(parse_quota("150000", "100000"), Some(1.5));
    }

    #[test]
    fn a_sample_has_plausible_numbers() {
        // Outside a runtime the disk is measured in place, when `Stats` is made.
        let mut stats = Stats::new(std::env::temp_dir());
        let hb = stats.sample(42);
        assert_eq!(hb.sent_at_ms, 42);
        assert!(hb.mem_total > 0 && hb.mem_used <= hb.mem_total, "{hb:?}");
        assert!(hb.cpu_limit > 0.0, "{hb:?}");
        assert!(hb.disk_total > 0 && hb.disk_used <= hb.disk_total, "{hb:?}");
        assert!((0.0..=100.0 * 1024.0).contains(&hb.cpu_percent), "{hb:?}");
    }
}
