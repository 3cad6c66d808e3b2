//! Health and metrics end to end: the coordinator's `/readyz` and `/metrics` on the API port, and
//! the agent's `/metrics` on `--metrics-listen`, scraped with a plain HTTP GET as Prometheus would.

use std::process::{Command, Stdio};
use tether_tests::{bin, external, get, wait_until, Agent, Coordinator, LONG};

fn scrape(addr: &str) -> String {
    let (code, body) = get(addr, "/metrics").unwrap_or_else(|e| panic!("GET http://{addr}/metrics: {e}"));
    assert_eq!(code, 200, "{body}");
    body
}

/// The value of one series (`name{labels}` exactly as exposed), or `None` if it is not there.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn expect(text: &str, series: &str, want: f64) {
    assert_eq!(value(text, series), Some(want), "{series} in\n{text}");
}

fn api_addr(c: &Coordinator) -> String {
    c.api_url().trim_start_matches("http://").to_string()
}

const RUNS: &str = r#"
heartbeat_timeout = "15s"
[[script]]
name = "setup"
run = "echo ready"
"#;

#[test]
fn coordinator_metrics_count_workspaces_agents_transitions_and_requests() {
    let c = Coordinator::start();
    let _alpha = external(&c, "alpha", RUNS);
    let _beta = external(&c, "beta", RUNS);
    // Never gets an agent: stopped while waiting for one.
    c.create("gamma", RUNS, &[]);
    c.ok(&["workspace", "stop", "gamma"]);
    // Its provisioner fails.
    let fails = "provisioner = \"command\"\n[command]\nstart = \"echo 'no capacity' >&2; exit 3\"\n";
    c.create("delta", fails, &["--start"]);
    // Created, never started.
    c.create("epsilon", "provisioner = \"process\"\n", &[]);
    for (name, status) in [("alpha", "running"), ("beta", "running"), ("gamma", "stopped"), ("delta", "failed")] {
        let w = c.wait_for(name, "running,unhealthy,stopped,failed", LONG);
        assert_eq!(w["status"], status, "{w}");
    }

    let addr = api_addr(&c);
    assert_eq!(get(&addr, "/readyz").unwrap(), (200, "ready\n".to_string()));
    assert_eq!(get(&addr, "/healthz").unwrap(), (200, "ok\n".to_string()));

    let text = scrape(&addr);
    for (status, n) in [
        ("pending", 1.0),
        ("starting", 0.0),
        ("running", 2.0),
        ("unhealthy", 0.0),
        ("stopping", 0.0),
        ("stopped", 1.0),
        ("failed", 1.0),
        ("deleting", 0.0),
        ("deleted", 0.0),
    ] {
        expect(&text, &format!("tether_workspaces{{status=\"{status}\"}}"), n);
    }
    expect(&text, "tether_agents_connected", 2.0);
    expect(&text, "tether_agents_heartbeat_lag_seconds{le=\"+Inf\"}", 2.0);
    let lag = value(&text, "tether_agent_heartbeat_lag_seconds_max").expect("max heartbeat lag");
    assert!(lag >= 0.0, "{lag}");
    expect(&text, "tether_agent_connections_total", 2.0);
    expect(&text, "tether_agent_reconnects_total", 0.0);
    // alpha and beta went from created to running; gamma from its stop request to stopped; delta's
    // failed start is no sample.
    expect(&text, "tether_workspace_transition_seconds_count{transition=\"start\"}", 2.0);
    expect(&text, "tether_workspace_transition_seconds_count{transition=\"stop\"}", 1.0);
    expect(&text, "tether_ssh_connections_total{outcome=\"accepted\"}", 0.0);
    expect(&text, "tether_ssh_connections_active", 0.0);
    // Five `workspace create` calls, by route template.
    let creates =
        "tether_api_request_duration_seconds_count{method=\"POST\",route=\"/api/v1/workspaces\",status=\"2xx\"}";
    expect(&text, creates, 5.0);
    let waits = "tether_api_request_duration_seconds_count{method=\"GET\",route=\"/api/v1/workspaces/{name}/wait\",status=\"2xx\"}";
    assert!(value(&text, waits).is_some_and(|n| n >= 4.0), "{waits} in\n{text}");
    assert!(text.contains("# TYPE tether_api_request_duration_seconds histogram"), "{text}");
    for name in ["alpha", "beta", "gamma", "delta", "epsilon"] {
        assert!(!text.contains(name), "a workspace name in the metrics:\n{text}");
    }

    // A request for a workspace that does not exist is timed under its template, not its path.
    assert!(c.fails(&["workspace", "show", "nosuch"]).contains("no workspace 'nosuch'"));
    let text = scrape(&addr);
    let shows =
        "tether_api_request_duration_seconds_count{method=\"GET\",route=\"/api/v1/workspaces/{name}\",status=\"4xx\"}";
    expect(&text, shows, 1.0);
    assert!(!text.contains("nosuch"), "{text}");
}

#[test]
fn agent_serves_its_own_metrics_when_asked() {
    let mut c = Coordinator::start();
    let template = r#"
heartbeat_timeout = "3s"
[[script]]
name = "fine"
run = "echo fine"

[[script]]
name = "lint"
run = "exit 3"
blocks_login = false
"#;
    let created = c.create("metered", template, &[]);
    let token = created["agent_token"].as_str().expect("agent_token");
    let data_dir = c.data_dir().join("agent-metered");
    std::fs::create_dir_all(&data_dir).unwrap();
    let log = data_dir.with_extension("log");
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new(bin("tether-agent"))
        .env("TETHER_COORDINATOR", c.agent_addr())
        .env("TETHER_CA", c.ca_path())
        .env("TETHER_AGENT_TOKEN", token)
        .env("TETHER_AGENT_DATA_DIR", &data_dir)
        .env("TETHER_AGENT_METRICS_LISTEN", "127.0.0.1:0")
        .env("TETHER_LOG", "debug")
        .current_dir(&data_dir)
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .expect("spawn tether-agent");
    let agent = Agent { child, data_dir, log };
    assert_eq!(c.wait_for("metered", "running,unhealthy,failed", LONG)["status"], "running");

    let mut addr = String::new();
    wait_until("the agent to log its metrics address", LONG, || {
        let text = agent.log_text();
        let found = text.lines().find_map(|l| l.split("metrics listening on ").nth(1));
        addr = found.and_then(|a| a.split_whitespace().next()).unwrap_or_default().to_string();
        !addr.is_empty()
    });
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");

    let text = scrape(&addr);
    expect(&text, "tether_agent_tunnel_connected", 1.0);
    expect(&text, "tether_agent_tunnel_connections_total", 1.0);
    expect(&text, "tether_agent_tunnel_reconnects_total", 0.0);
    expect(&text, "tether_agent_script_runs_total{phase=\"start\",outcome=\"ok\"}", 1.0);
    expect(&text, "tether_agent_script_runs_total{phase=\"start\",outcome=\"exit_failure\"}", 1.0);
    expect(&text, "tether_agent_script_runs_total{phase=\"stop\",outcome=\"ok\"}", 0.0);
    expect(&text, "tether_agent_script_duration_seconds_count{phase=\"start\"}", 2.0);
    expect(&text, "tether_agent_script_duration_seconds_bucket{phase=\"start\",le=\"+Inf\"}", 2.0);
    expect(&text, "tether_agent_ssh_connections", 0.0);
    expect(&text, "tether_agent_log_lines_dropped_total", 0.0);
    assert!(value(&text, "tether_agent_log_lines_queued_total").is_some_and(|n| n >= 1.0), "{text}");
    wait_until("a heartbeat to be counted", LONG, || {
        value(&scrape(&addr), "tether_agent_heartbeats_sent_total").is_some_and(|n| n >= 1.0)
    });
    assert_eq!(get(&addr, "/").unwrap().0, 404);

    // The coordinator dies and comes back: the agent says it is disconnected, then reconnects, and
    // both sides count the reconnection.
    c.kill();
    wait_until("the agent to notice", LONG, || value(&scrape(&addr), "tether_agent_tunnel_connected") == Some(0.0));
    c.restart();
    wait_until("the agent to reconnect", LONG, || {
        let text = scrape(&addr);
        value(&text, "tether_agent_tunnel_connected") == Some(1.0)
            && value(&text, "tether_agent_tunnel_reconnects_total") == Some(1.0)
    });
    let text = scrape(&api_addr(&c));
    expect(&text, "tether_agent_connections_total", 1.0);
    expect(&text, "tether_agent_reconnects_total", 1.0);
    expect(&text, "tether_agents_connected", 1.0);
}
