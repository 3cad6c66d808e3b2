//! Workspace templates: the TOML file ops write, parsed and checked in full before anything uses it.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;
use tether_shared::limits;
use tether_shared::proto::{Manifest, Script, ScriptTrigger, SshSettings};

/// Largest template file accepted.
pub const MAX_TEMPLATE: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProvisionerKind {
    /// `tether-agent` as a local child process in a per-workspace directory.
    Process,
    /// Ops-provided start/stop/delete commands.
    Command,
    /// Nothing: someone else starts the agent with the token `create` prints.
    External,
}

impl ProvisionerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProvisionerKind::Process => "process",
            ProvisionerKind::Command => "command",
            ProvisionerKind::External => "external",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Template {
    pub provisioner: ProvisionerKind,
    pub connection_timeout: Duration,
    pub heartbeat_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub working_dir: Option<String>,
    pub env: BTreeMap<String, String>,
    pub command: Option<CommandSpec>,
    pub scripts: Vec<Script>,
    pub ssh: SshSettings,
}

#[derive(Debug, Clone)]
pub struct CommandSpec {
    pub start: String,
    pub stop: Option<String>,
    pub delete: Option<String>,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template is {0} bytes, over the limit of {MAX_TEMPLATE}")]
    TooLarge(usize),
    #[error("{0}")]
    Parse(String),
    /// Every problem found: one alone as it is, several one per line (as the configuration's are).
    #[error("{}", problems(.0))]
    Invalid(Vec<String>),
}

fn problems(all: &[String]) -> String {
    match all {
        [one] => one.clone(),
        many => format!("{} problems:\n  {}", many.len(), many.join("\n  ")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    provisioner: Option<ProvisionerKind>,
    connection_timeout: Option<String>,
    heartbeat_timeout: Option<String>,
    shutdown_timeout: Option<String>,
    working_dir: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    command: Option<RawCommand>,
    #[serde(default)]
    script: Vec<RawScript>,
    ssh: Option<RawSsh>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSsh {
    motd: Option<String>,
    #[serde(default)]
    allowed_env: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    start: String,
    stop: Option<String>,
    delete: Option<String>,
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScript {
    name: String,
    run: String,
    on: Option<ScriptTrigger>,
    schedule: Option<String>,
    timeout: Option<String>,
    #[serde(default)]
    blocks_login: bool,
}

pub const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(15);
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_SCRIPT_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(600);

/// Names of workspaces, users and scripts: a DNS label, so `NAME.tether` works as a host name.
pub fn check_name(kind: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= limits::MAX_NAME
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{kind} name '{}' is not valid: use 1 to {} lowercase letters, digits and '-', not starting or ending with '-'",
            name.chars().take(80).collect::<String>(),
            limits::MAX_NAME
        ))
    }
}

fn duration(field: &str, value: Option<&str>, default: Duration, errors: &mut Vec<String>) -> Duration {
    let Some(v) = value else { return default };
    match humantime::parse_duration(v.trim()) {
        Ok(d) if d.is_zero() => {
            errors.push(format!("{field} must be more than zero"));
            default
        }
        Ok(d) if d > Duration::from_secs(7 * 24 * 3600) => {
            errors.push(format!("{field} '{v}' is over the limit of 7 days"));
            default
        }
        Ok(d) => d,
        Err(e) => {
            errors.push(format!("{field} '{v}' is not a duration like \"90s\" or \"5m\": {e}"));
            default
        }
    }
}

impl Template {
    /// Parses and checks a template, reporting every problem at once.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        if text.len() > MAX_TEMPLATE {
            return Err(TemplateError::TooLarge(text.len()));
        }
        let raw: RawTemplate = toml::from_str(text).map_err(|e| TemplateError::Parse(e.to_string()))?;
        let mut errors = Vec::new();
        let provisioner = raw.provisioner.unwrap_or(ProvisionerKind::External);
        let connection_timeout =
            duration("connection_timeout", raw.connection_timeout.as_deref(), DEFAULT_CONNECTION_TIMEOUT, &mut errors);
        let heartbeat_timeout =
            duration("heartbeat_timeout", raw.heartbeat_timeout.as_deref(), DEFAULT_HEARTBEAT_TIMEOUT, &mut errors);
        if heartbeat_timeout < Duration::from_secs(2) {
            errors.push("heartbeat_timeout must be at least 2s".into());
        }
        let shutdown_timeout =
            duration("shutdown_timeout", raw.shutdown_timeout.as_deref(), DEFAULT_SHUTDOWN_TIMEOUT, &mut errors);
        // Under a second is a typo ("1ms" for "1m"): the agent would have no time to connect, or
        // the stop scripts none to run.
        for (name, d) in [("connection_timeout", connection_timeout), ("shutdown_timeout", shutdown_timeout)] {
            if d < Duration::from_secs(1) {
                errors.push(format!("{name} must be at least 1s (is it a typo for minutes?)"));
            }
        }
        let command = match (provisioner, raw.command) {
            (ProvisionerKind::Command, Some(c)) => Some(CommandSpec {
                timeout: duration("command.timeout", c.timeout.as_deref(), DEFAULT_COMMAND_TIMEOUT, &mut errors),
                start: c.start,
                stop: c.stop,
                delete: c.delete,
            }),
            (ProvisionerKind::Command, None) => {
                errors.push("provisioner \"command\" needs a [command] table with at least `start`".into());
                None
            }
            (_, Some(_)) => {
                errors.push(format!(
                    "[command] is only used with provisioner = \"command\", not \"{}\"",
                    provisioner.as_str()
                ));
                None
            }
            (_, None) => None,
        };
        if raw.env.len() > limits::MAX_ENV {
            errors.push(format!("env has {} variables, over the limit of {}", raw.env.len(), limits::MAX_ENV));
        }
        for (k, v) in &raw.env {
            let shown: String = k.chars().take(80).collect();
            // A name a shell can use: `$BAD NAME` or `$1X` never reach a script as meant.
            let name_ok = k.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !name_ok {
                errors.push(format!(
                    "env variable name '{shown}' is not a variable name (letters, digits and '_', not starting with a digit)"
                ));
            } else if k == "TETHER_WORKSPACE" {
                errors.push("env variable TETHER_WORKSPACE is set by Tether itself (the workspace's name)".to_string());
            }
            if v.contains('\0') {
                errors.push(format!("env variable '{shown}' has a NUL byte in its value"));
            }
            if k.len() > limits::MAX_TEXT {
                errors.push(format!(
                    "env variable name '{shown}…' is {} bytes, over the limit of {}",
                    k.len(),
                    limits::MAX_TEXT
                ));
            }
            if v.len() > limits::MAX_ENV_VALUE {
                errors.push(format!(
                    "env variable '{k}' is {} bytes, over the limit of {}",
                    v.len(),
                    limits::MAX_ENV_VALUE
                ));
            }
        }
        if raw.script.len() > limits::MAX_SCRIPTS {
            errors.push(format!("{} scripts, over the limit of {}", raw.script.len(), limits::MAX_SCRIPTS));
        }
        let mut scripts = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, s) in raw.script.into_iter().enumerate() {
            let at = format!("script {} ('{}')", i + 1, s.name);
            if let Err(e) = check_name("script", &s.name) {
                errors.push(e);
            }
            if !seen.insert(s.name.clone()) {
                errors.push(format!("{at}: two scripts are named '{}'", s.name));
            }
            if s.run.trim().is_empty() {
                errors.push(format!("{at}: `run` is empty"));
            }
            if s.run.len() > limits::MAX_SCRIPT_LEN {
                errors.push(format!(
                    "{at}: `run` is {} bytes, over the limit of {}",
                    s.run.len(),
                    limits::MAX_SCRIPT_LEN
                ));
            }
            let on = s.on.unwrap_or(ScriptTrigger::Start);
            match (on, &s.schedule) {
                (ScriptTrigger::Cron, None) => errors.push(format!("{at}: on = \"cron\" needs a `schedule`")),
                (ScriptTrigger::Start | ScriptTrigger::Stop, Some(_)) => {
                    errors.push(format!("{at}: `schedule` is only used with on = \"cron\""))
                }
                _ => {}
            }
            let timeout =
                duration(&format!("{at}: timeout"), s.timeout.as_deref(), DEFAULT_SCRIPT_TIMEOUT, &mut errors);
            scripts.push(Script {
                name: s.name,
                run: s.run,
                on,
                schedule: s.schedule,
                timeout_ms: timeout.as_millis() as u64,
                blocks_login: s.blocks_login,
            });
        }
        let ssh =
            raw.ssh.map_or_else(SshSettings::default, |s| SshSettings { motd: s.motd, allowed_env: s.allowed_env });
        if ssh.motd.as_ref().is_some_and(|m| m.len() > limits::MAX_MOTD) {
            errors.push(format!("ssh.motd is over the limit of {} bytes", limits::MAX_MOTD));
        }
        if ssh.allowed_env.len() > limits::MAX_ENV {
            errors.push(format!(
                "ssh.allowed_env has {} entries, over the limit of {}",
                ssh.allowed_env.len(),
                limits::MAX_ENV
            ));
        }
        for name in &ssh.allowed_env {
            let stem = name.strip_suffix('*').unwrap_or(name);
            if name.len() > limits::MAX_TEXT {
                errors.push(format!(
                    "ssh.allowed_env entry '{}…' is {} bytes, over the limit of {}",
                    name.chars().take(80).collect::<String>(),
                    name.len(),
                    limits::MAX_TEXT
                ));
            } else if stem.is_empty() || !stem.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                errors.push(format!(
                    "ssh.allowed_env entry '{}' is not a variable name (letters, digits, '_', optionally ending in '*')",
                    name.chars().take(80).collect::<String>()
                ));
            }
        }
        if !errors.is_empty() {
            return Err(TemplateError::Invalid(errors));
        }
        Ok(Template {
            ssh,
            provisioner,
            connection_timeout,
            heartbeat_timeout,
            shutdown_timeout,
            working_dir: raw.working_dir,
            env: raw.env,
            command,
            scripts,
        })
    }

    /// Whether agents accept the manifest they would get, checked once when a workspace is created
    /// (each field is checked by `parse` already; this guards against the two drifting apart). It
    /// fits a frame: the template's own size limit is far below one.
    pub fn check_manifest(&self) -> Result<(), TemplateError> {
        let probe = self.manifest(&"w".repeat(limits::MAX_NAME), u64::MAX, None);
        probe
            .validate()
            .map_err(|e| TemplateError::Invalid(vec![format!("the manifest agents would get is not valid: {e}")]))
    }

    /// The agent's manifest for one build.
    pub fn manifest(&self, workspace: &str, build: u64, working_dir: Option<String>) -> Manifest {
        Manifest {
            workspace: workspace.to_string(),
            build,
            scripts: self.scripts.clone(),
            env: self.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            working_dir: self.working_dir.clone().or(working_dir),
            shutdown_timeout_ms: self.shutdown_timeout.as_millis() as u64,
            ssh: self.ssh.clone(),
        }
    }

    /// Heartbeat interval given to agents: a third of the timeout, at most 5 s.
    pub fn heartbeat_interval(&self) -> Duration {
        (self.heartbeat_timeout / 3).min(Duration::from_secs(5))
    }

    pub fn script(&self, name: &str) -> Option<&Script> {
        self.scripts.iter().find(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_an_agent_would_refuse_are_refused_here() {
        let long_name = format!("provisioner = \"process\"\n[env]\n{} = \"x\"\n", "A".repeat(2000));
        let err = Template::parse(&long_name).unwrap_err().to_string();
        assert!(err.contains("is 2000 bytes, over the limit of 1024"), "{err}");
        for (name, says) in [
            ("\"BAD NAME\"", "env variable name 'BAD NAME' is not a variable name"),
            ("1X", "env variable name '1X' is not a variable name"),
            ("\"A=B\"", "env variable name 'A=B' is not a variable name"),
            ("TETHER_WORKSPACE", "env variable TETHER_WORKSPACE is set by Tether itself"),
        ] {
            let err = Template::parse(&format!("[env]\n{name} = \"x\"\n")).unwrap_err().to_string();
            assert!(err.contains(says), "{name}: {err}");
        }
        assert!(Template::parse("[env]\n_GOOD_1 = \"x\"\n").is_ok());
        let long_allowed = format!("[ssh]\nallowed_env = [\"{}\"]\n", "B".repeat(2000));
        let err = Template::parse(&long_allowed).unwrap_err().to_string();
        assert!(err.contains("ssh.allowed_env entry"), "{err}");
    }

    #[test]
    fn timeouts_under_a_second_are_refused_as_typos() {
        let err =
            Template::parse("shutdown_timeout = \"1ms\"\nconnection_timeout = \"500ms\"\n").unwrap_err().to_string();
        assert!(err.contains("shutdown_timeout must be at least 1s"), "{err}");
        assert!(err.contains("connection_timeout must be at least 1s"), "{err}");
        assert!(Template::parse("shutdown_timeout = \"1s\"\n").is_ok());
    }

    #[test]
    fn the_readme_template_is_valid_as_printed() {
        let readme = include_str!("../../README.md");
        let section = &readme[readme.find("## Templates").expect("a Templates section")..];
        let start = section.find("```toml\n").expect("a toml block") + "```toml\n".len();
        let block = &section[start..start + section[start..].find("```").unwrap()];
        let t = Template::parse(block).unwrap_or_else(|e| panic!("README template: {e}"));
        t.check_manifest().unwrap();
        assert_eq!(t.scripts[0].name, "install-deps");
        assert_eq!(t.ssh.allowed_env, ["GIT_*"]);
    }

    #[test]
    fn parses_the_documented_example() {
        let t = Template::parse(
            r#"
provisioner = "process"
connection_timeout = "120s"
heartbeat_timeout = "15s"

[[script]]
name = "install-deps"
run = "sleep 1; echo installed"
on = "start"
timeout = "60s"
blocks_login = true
"#,
        )
        .unwrap();
        assert_eq!(t.provisioner, ProvisionerKind::Process);
        assert_eq!(t.heartbeat_timeout, Duration::from_secs(15));
        assert_eq!(t.scripts[0].timeout_ms, 60_000);
        assert!(t.scripts[0].blocks_login);
        assert_eq!(t.heartbeat_interval(), Duration::from_secs(5));
    }

    #[test]
    fn reports_every_problem() {
        let err = Template::parse(
            r#"
provisioner = "command"
heartbeat_timeout = "soon"
[[script]]
name = "Bad Name"
run = ""
[[script]]
name = "x"
run = "true"
on = "cron"
"#,
        )
        .unwrap_err()
        .to_string();
        for want in [
            "heartbeat_timeout 'soon' is not a duration",
            "needs a [command] table",
            "script name 'Bad Name' is not valid",
            "`run` is empty",
            "needs a `schedule`",
        ] {
            assert!(err.contains(want), "missing {want:?} in {err}");
        }
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let err = Template::parse("provisioner = \"process\"\nheartbeat = \"5s\"\n").unwrap_err().to_string();
        assert!(err.contains("heartbeat") && err.contains("line 2"), "{err}");
    }
}
