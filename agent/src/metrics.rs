//! The agent's own Prometheus metrics, served on `--metrics-listen` only (off by default).
//!
//! [`AgentMetrics`] counts what nothing else counts (tunnel connections, heartbeats, script runs),
//! updated by the tunnel and the phases; the rest is read at scrape time from where it already
//! lives: the outboxes and the SSH activity counters. The exposition is written by hand: a dozen
//! fixed series do not need a metrics library in every workspace.
//!
//! The HTTP side is as small as it can be: one `GET /metrics` per connection, a request head of at
//! most [`MAX_REQUEST_HEAD`] bytes that must arrive within [`REQUEST_TIMEOUT`], at most
//! [`MAX_CONNECTIONS`] connections at once (more are closed at once), then the connection closes.

use crate::outbox::Outboxes;
use crate::phase::PhaseKind;
use crate::ssh::activity::Activity;
use std::fmt::{Display, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tether_shared::SpanStatus;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head (request line and headers) read.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// A connection's whole request and answer must fit in this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 4;

/// Upper bounds (seconds) of the script duration histogram; `+Inf` is added.
const SCRIPT_BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];
const PHASES: [PhaseKind; 2] = [PhaseKind::Start, PhaseKind::Stop];

fn phase_label(kind: PhaseKind) -> &'static str {
    match kind {
        PhaseKind::Start => "start",
        PhaseKind::Stop => "stop",
    }
}

/// Script runs of one phase: counts by outcome and a duration histogram.
#[derive(Debug, Default, Clone)]
struct ScriptStats {
    /// Indexed like `SpanStatus::ALL`.
    outcomes: [u64; 4],
    /// Runs at or under each of `SCRIPT_BUCKETS`, cumulative at render time only.
    buckets: [u64; SCRIPT_BUCKETS.len()],
    count: u64,
    sum_seconds: f64,
}

/// Counters the agent keeps for its metrics; cheap to update from any task.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    tunnel_connected: AtomicBool,
    tunnel_connections: AtomicU64,
    heartbeats: AtomicU64,
    /// Start phase, then stop phase.
    scripts: Mutex<[ScriptStats; 2]>,
}

impl AgentMetrics {
    /// A connection to the coordinator is welcomed and has its manifest.
    pub fn tunnel_up(&self) {
        self.tunnel_connections.fetch_add(1, Ordering::Relaxed);
        self.tunnel_connected.store(true, Ordering::Relaxed);
    }

    /// That connection ended.
    pub fn tunnel_down(&self) {
        self.tunnel_connected.store(false, Ordering::Relaxed);
    }

    pub fn heartbeat_sent(&self) {
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
    }

    pub fn script_ended(&self, kind: PhaseKind, status: SpanStatus, took: Duration) {
        let mut scripts = self.scripts.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut scripts[PHASES.iter().position(|p| *p == kind).unwrap_or(0)];
        if let Some(i) = SpanStatus::ALL.iter().position(|w| *w == status) {
            s.outcomes[i] += 1;
        }
        let secs = took.as_secs_f64();
        if let Some(i) = SCRIPT_BUCKETS.iter().position(|b| secs <= *b) {
            s.buckets[i] += 1;
        }
        s.count += 1;
        s.sum_seconds += secs;
    }
}

/// Everything a scrape reads.
pub struct Scrape {
    pub metrics: Arc<AgentMetrics>,
    pub outboxes: Arc<Outboxes>,
    pub ssh: Arc<Activity>,
}

/// Prometheus text format, one family at a time.
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                let _ = write!(self.0, "{k}=\"{v}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

impl Scrape {
    pub fn render(&self) -> String {
        let m = &self.metrics;
        let mut out = Exposition(String::with_capacity(4096));
        out.family("tether_agent_build_info", "gauge", "Always 1; the version label says which agent this is.");
        out.sample("tether_agent_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);

        let connections = m.tunnel_connections.load(Ordering::Relaxed);
        let connected = u8::from(m.tunnel_connected.load(Ordering::Relaxed));
        out.one("tether_agent_tunnel_connected", "gauge", "1 while connected to the coordinator.", connected);
        out.one(
            "tether_agent_tunnel_connections_total",
            "counter",
            "Connections to the coordinator that were welcomed and fetched the manifest.",
            connections,
        );
        out.one(
            "tether_agent_tunnel_reconnects_total",
            "counter",
            "Welcomed connections after the first of this agent process.",
            connections.saturating_sub(1),
        );
        out.one(
            "tether_agent_heartbeats_sent_total",
            "counter",
            "Heartbeats sent to the coordinator.",
            m.heartbeats.load(Ordering::Relaxed),
        );

        let scripts = m.scripts.lock().unwrap_or_else(|e| e.into_inner()).clone();
        out.family("tether_agent_script_runs_total", "counter", "Script runs that ended, by phase and outcome.");
        for (kind, s) in PHASES.iter().zip(&scripts) {
            for (status, n) in SpanStatus::ALL.iter().zip(s.outcomes) {
                out.sample(
                    "tether_agent_script_runs_total",
                    &[("phase", phase_label(*kind)), ("outcome", status.as_str())],
                    n,
                );
            }
        }
        let name = "tether_agent_script_duration_seconds";
        out.family(name, "histogram", "How long scripts ran, by phase.");
        for (kind, s) in PHASES.iter().zip(&scripts) {
            let phase = phase_label(*kind);
            let mut cumulative = 0;
            for (bound, n) in SCRIPT_BUCKETS.iter().zip(s.buckets) {
                cumulative += n;
                out.sample(&format!("{name}_bucket"), &[("phase", phase), ("le", &bound.to_string())], cumulative);
            }
            out.sample(&format!("{name}_bucket"), &[("phase", phase), ("le", "+Inf")], s.count);
            out.sample(&format!("{name}_sum"), &[("phase", phase)], s.sum_seconds);
            out.sample(&format!("{name}_count"), &[("phase", phase)], s.count);
        }

        let ssh = self.ssh.snapshot();
        out.one("tether_agent_ssh_connections", "gauge", "SSH connections open now.", ssh.connections);
        out.one(
            "tether_agent_ssh_sessions",
            "gauge",
            "SSH sessions (shells, commands, subsystems) open now.",
            ssh.sessions,
        );
        out.family("tether_agent_ssh_bytes_total", "counter", "SSH channel bytes: in from clients, out to clients.");
        out.sample("tether_agent_ssh_bytes_total", &[("direction", "in")], ssh.bytes_in);
        out.sample("tether_agent_ssh_bytes_total", &[("direction", "out")], ssh.bytes_out);

        let o = self.outboxes.stats();
        out.one(
            "tether_agent_log_lines_queued_total",
            "counter",
            "Log lines queued for the coordinator.",
            o.logs_queued,
        );
        out.one(
            "tether_agent_log_lines_pending",
            "gauge",
            "Log lines queued and not yet acknowledged by the coordinator.",
            o.logs_pending,
        );
        out.one(
            "tether_agent_log_lines_dropped_total",
            "counter",
            "Unacknowledged log lines dropped because too many waited for the coordinator.",
            o.logs_dropped,
        );
        out.one(
            "tether_agent_events_pending",
            "gauge",
            "Events (lifecycle changes, spans) not yet acknowledged by the coordinator.",
            o.events_pending,
        );
        out.one(
            "tether_agent_events_dropped_total",
            "counter",
            "Unacknowledged events dropped because too many waited for the coordinator.",
            o.events_dropped,
        );
        out.0
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, scrape: Arc<Scrape>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: give it a moment rather than spin.
                tracing::warn!(error = %e, "metrics: accepting a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!("metrics: too many connections; closing one");
            continue;
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &scrape)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics: connection failed"),
                Err(_) => tracing::debug!("metrics: request not complete in time"),
            }
        });
    }
}

async fn answer(mut stream: TcpStream, scrape: &Scrape) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let reply = loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head_end(&head) {
            break respond(&head[..end], || scrape.render());
        }
        if head.len() > MAX_REQUEST_HEAD {
            break reply(431, "Request Header Fields Too Large", &[], "request head over 8 KiB\n", true);
        }
    };
    stream.write_all(&reply).await?;
    stream.shutdown().await
}

/// Where the request head ends (the blank line), if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The whole answer to a request head; `body` is only called for a scrape.
fn respond(head: &[u8], body: impl FnOnce() -> String) -> Vec<u8> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line).unwrap_or("").trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return reply(400, "Bad Request", &[], "malformed request line\n", true);
    };
    if !version.starts_with("HTTP/1.") {
        return reply(400, "Bad Request", &[], "only HTTP/1.x is served\n", true);
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return reply(404, "Not Found", &[], "not found; metrics are at /metrics\n", true);
    }
    let with_body = match method {
        "GET" => true,
        "HEAD" => false,
        _ => return reply(405, "Method Not Allowed", &[("Allow", "GET, HEAD")], "use GET\n", true),
    };
    let content_type = [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")];
    reply(200, "OK", &content_type, &body(), with_body)
}

fn reply(code: u16, reason: &str, headers: &[(&str, &str)], body: &str, with_body: bool) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {code} {reason}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !headers.iter().any(|(k, _)| *k == "Content-Type") {
        out.push_str("Content-Type: text/plain; charset=utf-8\r\n");
    }
    for (k, v) in headers {
        let _ = write!(out, "{k}: {v}\r\n");
    }
    out.push_str("\r\n");
    if with_body {
        out.push_str(body);
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_shared::proto::LogStream;

    fn answer_to(head: &str) -> String {
        String::from_utf8(respond(head.as_bytes(), || "body\n".to_string())).unwrap()
    }

    fn value<'a>(text: &'a str, series: &str) -> &'a str {
        let line = text.lines().find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '));
        line.and_then(|l| l.rsplit(' ').next()).unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    #[test]
    fn only_get_metrics_is_served() {
        let ok = answer_to("GET /metrics HTTP/1.1\r\nHost: x");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("Content-Length: 5\r\n") && ok.ends_with("\r\n\r\nbody\n"), "{ok}");
        assert!(answer_to("GET /metrics?x=1 HTTP/1.0").starts_with("HTTP/1.1 200 "));
        let head = answer_to("HEAD /metrics HTTP/1.1");
        assert!(head.starts_with("HTTP/1.1 200 ") && head.ends_with("\r\n\r\n"), "{head}");
        assert!(answer_to("GET / HTTP/1.1").starts_with("HTTP/1.1 404 "));
        assert!(answer_to("POST /metrics HTTP/1.1").starts_with("HTTP/1.1 405 "));
        for bad in ["", "GET", "GET /metrics", "GET /metrics HTTP/2 extra", "GET /metrics SSH-2.0", "\u{0}\u{1}"] {
            assert!(answer_to(bad).starts_with("HTTP/1.1 400 "), "{bad:?}");
        }
        let not_utf8 = respond(b"GET /metrics \xff\xfe", String::new);
        assert!(not_utf8.starts_with(b"HTTP/1.1 400 "));
    }

    #[test]
    fn the_request_head_ends_at_a_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\n"), Some(20));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    #[test]
    fn render_counts_what_happened() {
        let m = Arc::new(AgentMetrics::default());
        // Room for three of the lines below ("line" from script "s").
        let outboxes = Arc::new(Outboxes::new(1 << 20, 3 * (crate::outbox::ITEM_OVERHEAD + 5)));
        let ssh = Arc::new(Activity::default());
        let scrape = Scrape { metrics: m.clone(), outboxes: outboxes.clone(), ssh: ssh.clone() };
        let text = scrape.render();
        assert_eq!(value(&text, "tether_agent_tunnel_connected"), "0");
        assert_eq!(value(&text, "tether_agent_script_runs_total{phase=\"start\",outcome=\"ok\"}"), "0");

        m.tunnel_up();
        m.tunnel_down();
        m.tunnel_up();
        m.heartbeat_sent();
        m.script_ended(PhaseKind::Start, SpanStatus::Ok, Duration::from_millis(300));
        m.script_ended(PhaseKind::Start, SpanStatus::ExitFailure, Duration::from_secs(7));
        m.script_ended(PhaseKind::Stop, SpanStatus::TimedOut, Duration::from_secs(5000));
        for _ in 0..5 {
            outboxes.push_log(1, "s", LogStream::Stdout, 0, "line".into());
        }
        let _conn = ssh.connection();
        ssh.received(10);
        let text = scrape.render();
        for (series, want) in [
            ("tether_agent_tunnel_connected", "1"),
            ("tether_agent_tunnel_connections_total", "2"),
            ("tether_agent_tunnel_reconnects_total", "1"),
            ("tether_agent_heartbeats_sent_total", "1"),
            ("tether_agent_script_runs_total{phase=\"start\",outcome=\"ok\"}", "1"),
            ("tether_agent_script_runs_total{phase=\"start\",outcome=\"exit_failure\"}", "1"),
            ("tether_agent_script_runs_total{phase=\"stop\",outcome=\"timed_out\"}", "1"),
            ("tether_agent_script_duration_seconds_bucket{phase=\"start\",le=\"0.5\"}", "1"),
            ("tether_agent_script_duration_seconds_bucket{phase=\"start\",le=\"10\"}", "2"),
            ("tether_agent_script_duration_seconds_bucket{phase=\"stop\",le=\"3600\"}", "0"),
            ("tether_agent_script_duration_seconds_bucket{phase=\"stop\",le=\"+Inf\"}", "1"),
            ("tether_agent_script_duration_seconds_sum{phase=\"start\"}", "7.3"),
            ("tether_agent_script_duration_seconds_count{phase=\"start\"}", "2"),
            ("tether_agent_ssh_connections", "1"),
            ("tether_agent_ssh_bytes_total{direction=\"in\"}", "10"),
            ("tether_agent_log_lines_queued_total", "5"),
            ("tether_agent_log_lines_pending", "3"),
            ("tether_agent_log_lines_dropped_total", "2"),
        ] {
            assert_eq!(value(&text, series), want, "{series}");
        }
        // Every sample belongs to a family announced before it.
        let mut families = Vec::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                families.push(rest.split(' ').next().unwrap().to_string());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(families.iter().any(|f| name.starts_with(f.as_str())), "{name} has no TYPE line");
            }
        }
    }
}
