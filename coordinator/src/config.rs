//! The coordinator's settings: one TOML file, `TETHER_…` environment variables and flags, in rising
//! order of precedence.
//!
//! Every setting is a flag of `tether serve` (plus the global `--data-dir`, `--log` and
//! `--log-format`). Its key in the file is the flag's name with underscores (`--listen-http` is
//! `listen_http`) and its variable is the one the flag's help names (`TETHER_LISTEN_HTTP`), so the
//! three can never drift apart: this module reads the list from the clap definitions. Values from
//! the file and the environment go through the flag's own parser, every problem is collected with
//! the file and line, and the caller exits with [`EXIT_CONFIG`] before any port is bound.

use crate::cli::Cli;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, CommandFactory, FromArgMatches};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// `EX_USAGE` from sysexits.h: the configuration is wrong; restarting will not help.
pub const EXIT_CONFIG: i32 = 64;
/// A configuration file is a few kilobytes; anything near this is not one.
pub const MAX_FILE: u64 = 1 << 20;
/// Global flags that are coordinator settings (the others, `--url` and `--token`, belong to the
/// command-line client).
const GLOBAL_SETTINGS: &[&str] = &["data_dir", "log", "log_format"];
/// The flag that names the file; not a key in it.
const CONFIG_ARG: &str = "config";

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env(String),
    File { line: usize },
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag => f.write_str("flag"),
            Source::Env(name) => write!(f, "environment {name}"),
            Source::File { line } => write!(f, "file, line {line}"),
            Source::Default => f.write_str("default"),
        }
    }
}

/// One setting as `tether serve` will use it.
#[derive(Debug, Clone)]
pub struct Setting {
    pub key: String,
    /// `None` when the setting is unset and has no default.
    pub value: Option<String>,
    pub source: Source,
}

/// The parsed command line, with the file and environment folded in.
pub struct Resolved {
    pub cli: Cli,
    pub file: Option<PathBuf>,
    pub settings: Vec<Setting>,
}

/// Why the configuration was refused: every problem found, one per line.
#[derive(Debug)]
pub enum ConfigError {
    /// A bad command line; clap's own message (and `--help`, `--version`).
    Usage(clap::Error),
    Invalid(Vec<String>),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Usage(e) => write!(f, "{e}"),
            ConfigError::Invalid(problems) => {
                writeln!(f, "invalid configuration ({} problem{}):", problems.len(), plural(problems.len()))?;
                for p in problems {
                    writeln!(f, "  {p}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The CLI with every environment variable switched off, so that the matches say which values
/// were typed on the command line; the environment is then read here, in its place in the order.
fn bare_command() -> clap::Command {
    fn no_env(a: Arg) -> Arg {
        a.env(None::<&str>)
    }
    let mut cmd = Cli::command().mut_args(no_env);
    let names: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_string()).collect();
    for name in names {
        cmd = cmd.mut_subcommand(name, |s| {
            let inner: Vec<String> = s.get_subcommands().map(|s| s.get_name().to_string()).collect();
            inner.into_iter().fold(s.mut_args(no_env), |s, n| s.mut_subcommand(n, |c| c.mut_args(no_env)))
        });
    }
    cmd
}

/// The subcommand path whose arguments are the coordinator's settings, if `argv` runs one.
fn settings_command(m: &ArgMatches) -> Option<(Vec<&'static str>, &ArgMatches)> {
    match m.subcommand() {
        Some(("serve", sm)) => Some((vec!["serve"], sm)),
        Some(("config", cm)) => match cm.subcommand() {
            Some(("check", sm)) => Some((vec!["config", "check"], sm)),
            _ => None,
        },
        _ => None,
    }
}

/// The settings' definitions: the global ones, then the subcommand's.
fn setting_args(root: &clap::Command, path: &[&str]) -> Vec<Arg> {
    let mut out: Vec<Arg> =
        root.get_arguments().filter(|a| GLOBAL_SETTINGS.contains(&a.get_id().as_str())).cloned().collect();
    let mut cmd = root;
    for name in path {
        cmd = cmd.find_subcommand(name).expect("settings subcommand exists");
    }
    out.extend(
        cmd.get_arguments()
            .filter(|a| !a.is_global_set() && !matches!(a.get_id().as_str(), CONFIG_ARG | "help" | "version"))
            .cloned(),
    );
    out
}

/// Parses the command line the way `tether` runs: for `serve` and `config check`, with the
/// configuration file and the environment folded in (`Ok(Some)`); for every other command `Ok(None)`
/// and the caller parses as usual.
pub fn resolve(argv: &[OsString], env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Resolved>, ConfigError> {
    let bare = bare_command();
    let matches = bare.clone().try_get_matches_from(argv).map_err(ConfigError::Usage)?;
    let Some((path, sm)) = settings_command(&matches) else { return Ok(None) };
    // The environment variable names, from the real definitions (the bare ones have none).
    let real = Cli::command();
    let args = setting_args(&real, &path);

    let file = match sm.get_one::<PathBuf>(CONFIG_ARG) {
        Some(p) => Some(p.clone()),
        None => env("TETHER_CONFIG").filter(|v| !v.is_empty()).map(PathBuf::from),
    };
    let mut problems = Vec::new();
    let table = match &file {
        Some(f) => match read_file(f) {
            Ok(t) => t,
            Err(p) => {
                problems.push(p);
                FileTable::default()
            }
        },
        None => FileTable::default(),
    };
    let shown = file.as_deref().map(|f| f.display().to_string()).unwrap_or_default();

    // Keys in the file that no flag has.
    let known: Vec<String> = args.iter().map(|a| a.get_id().to_string()).collect();
    for (key, entry) in &table.entries {
        if !known.contains(key) {
            let hint = suggest(key, &known).map(|k| format!(" (did you mean '{k}'?)")).unwrap_or_default();
            problems.push(format!("{shown}:{}: unknown key '{key}'{hint}", entry.line));
        }
    }

    let mut extra: Vec<OsString> = Vec::new();
    let mut settings = Vec::new();
    for arg in &args {
        let key = arg.get_id().to_string();
        let long = format!("--{}", arg.get_long().unwrap_or(&key));
        let is_switch = matches!(arg.get_action(), ArgAction::SetTrue);
        if sm.value_source(&key) == Some(ValueSource::CommandLine) {
            let value = if is_switch {
                Some("true".into())
            } else {
                sm.get_raw(&key).and_then(|mut v| v.next()).map(|v| v.to_string_lossy().into_owned())
            };
            settings.push(Setting { key, value, source: Source::Flag });
            continue;
        }
        let env_name = arg.get_env().map(|e| e.to_string_lossy().into_owned());
        if let Some((name, value)) = env_name.as_ref().and_then(|n| env(n).filter(|v| !v.is_empty()).map(|v| (n, v))) {
            let mut apply = |value: String| {
                extra.push(format!("{long}={value}").into());
                settings.push(Setting { key: key.clone(), value: Some(value), source: Source::Env(name.clone()) });
            };
            if is_switch {
                match parse_bool(&value) {
                    Some(true) => {
                        extra.push(long.clone().into());
                        settings.push(Setting { key, value: Some("true".into()), source: Source::Env(name.clone()) });
                    }
                    Some(false) => {
                        settings.push(Setting { key, value: Some("false".into()), source: Source::Env(name.clone()) })
                    }
                    None => problems.push(format!("environment {name}: '{value}' is not true or false")),
                }
            } else {
                match check_value(arg, &value) {
                    Ok(()) => apply(value),
                    Err(e) => problems.push(format!("environment {name}: {e}")),
                }
            }
            continue;
        }
        if let Some(entry) = table.entries.get(&key) {
            let at = format!("{shown}:{}: {key}", entry.line);
            match (&entry.value, is_switch) {
                (toml::Value::Boolean(b), true) => {
                    if *b {
                        extra.push(long.clone().into());
                    }
                    settings.push(Setting {
                        key,
                        value: Some(b.to_string()),
                        source: Source::File { line: entry.line },
                    });
                }
                (other, true) => problems.push(format!("{at}: expected true or false, found {}", kind(other))),
                // `data_dir = 5` is a mistake, not the path "5": only counts may be numbers.
                (number @ (toml::Value::Integer(_) | toml::Value::Float(_)), false)
                    if !NUMBER_SETTINGS.contains(&key.as_str()) =>
                {
                    problems.push(format!("{at}: expected a string (in quotes), found {}", kind(number)))
                }
                (toml::Value::String(_) | toml::Value::Integer(_) | toml::Value::Float(_), false) => {
                    let value = match &entry.value {
                        toml::Value::String(s) => s.clone(),
                        v => v.to_string(),
                    };
                    match check_value(arg, &value) {
                        Ok(()) => {
                            extra.push(format!("{long}={value}").into());
                            settings.push(Setting {
                                key,
                                value: Some(value),
                                source: Source::File { line: entry.line },
                            });
                        }
                        Err(e) => problems.push(format!("{at}: {e}")),
                    }
                }
                (other, false) => problems.push(format!("{at}: expected a string or a number, found {}", kind(other))),
            }
            continue;
        }
        let value = arg.get_default_values().first().map(|v| v.to_string_lossy().into_owned());
        settings.push(Setting { key, value, source: Source::Default });
    }
    problems.extend(cross_checks(&settings, &shown));
    if !problems.is_empty() {
        // The file's problems in the order of its lines (messages start `FILE:LINE:`).
        let line = |p: &String| -> usize {
            p.strip_prefix(shown.as_str())
                .filter(|_| !shown.is_empty())
                .and_then(|rest| rest.strip_prefix(':'))
                .and_then(|rest| rest.split(':').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        problems.sort_by_key(line);
        return Err(ConfigError::Invalid(problems));
    }

    let mut full: Vec<OsString> = argv.to_vec();
    full.extend(extra);
    let matches = bare.try_get_matches_from(full).map_err(ConfigError::Usage)?;
    let cli = Cli::from_arg_matches(&matches).map_err(ConfigError::Usage)?;
    Ok(Some(Resolved { cli, file, settings }))
}

/// Settings that are only wrong together, or name files that must be readable: checked here so
/// that `config check` finds them too, before anything is bound.
fn cross_checks(settings: &[Setting], file: &str) -> Vec<String> {
    let get = |key: &str| settings.iter().find(|s| s.key == key).and_then(|s| s.value.clone().map(|v| (v, s)));
    // Where a setting came from, as the file's own problems are given: `FILE:LINE: key`, or
    // `key (flag)`, `key (environment TETHER_…)`.
    let at = |s: &Setting, what: &str| match &s.source {
        Source::File { line } if !file.is_empty() => format!("{file}:{line}: {what}"),
        other => format!("{what} ({other})"),
    };
    let mut problems = Vec::new();
    match (get("tls_cert"), get("tls_key")) {
        (Some((cert, s)), Some((key, _))) => {
            if let Err(e) = crate::https::load_pem(Path::new(&cert), Path::new(&key)) {
                problems.push(format!("{}: {e}", at(s, "tls_cert and tls_key")));
            }
        }
        (Some((_, s)), None) | (None, Some((_, s))) => problems.push(format!(
            "{} needs {}: set both tls_cert and tls_key, or neither for a certificate from the coordinator's own CA",
            at(s, &s.key),
            if s.key == "tls_cert" { "tls_key" } else { "tls_cert" }
        )),
        (None, None) => {}
    }
    // The TCP listeners: two on one port would only fail at bind time, after the data directory
    // was made. (The QUIC tunnel is UDP: it shares HTTPS's port number by default.)
    let tcp: Vec<(std::net::SocketAddr, &Setting)> = ["listen_http", "listen_https", "listen_ssh"]
        .iter()
        .filter_map(|k| get(k))
        .filter_map(|(v, s)| v.parse::<std::net::SocketAddr>().ok().map(|a| (a, s)))
        .filter(|(a, _)| a.port() != 0)
        .collect();
    for (i, (a, sa)) in tcp.iter().enumerate() {
        for (b, sb) in &tcp[i + 1..] {
            let overlap = a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
            if a.port() == b.port() && overlap {
                problems.push(format!(
                    "{} and {} both listen on TCP port {}: give each its own port (or `off`)",
                    at(sa, &sa.key),
                    at(sb, &sb.key),
                    a.port()
                ));
            }
        }
    }
    problems
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn kind(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// Runs a value through its flag's own parser (in a command holding that flag alone, so nothing
/// else in the environment interferes), and turns clap's message into one line.
fn check_value(arg: &Arg, value: &str) -> Result<(), String> {
    let long = arg.get_long().unwrap_or("value").to_string();
    let solo = clap::Command::new("check")
        .no_binary_name(true)
        .disable_help_flag(true)
        .arg(arg.clone().env(None::<&str>).global(false).required(false));
    // `--flag=value`, so a value that starts with `-` is still a value.
    let result = solo.try_get_matches_from([format!("--{long}={value}")]);
    result.map(|_| ()).map_err(|e| {
        if e.kind() == clap::error::ErrorKind::InvalidValue {
            let names: Vec<String> = arg.get_possible_values().iter().map(|p| p.get_name().to_string()).collect();
            if !names.is_empty() {
                return format!("'{value}' is not one of: {}", names.join(", "));
            }
        }
        let text = e.render().to_string();
        let first = text.lines().next().unwrap_or("").trim_start_matches("error: ").to_string();
        // clap names the flag (`invalid value 'x' for '--max-agents <N>': detail`); here the key or
        // the variable says which, so keep the detail, with the value unless it already says it.
        match first.split_once("': ") {
            Some((head, detail)) if head.starts_with("invalid value") => {
                if detail.contains(value) {
                    detail.to_string()
                } else {
                    format!("'{value}': {detail}")
                }
            }
            _ => first,
        }
    })
}

/// The file's top-level keys with their lines.
#[derive(Default)]
struct FileTable {
    entries: BTreeMap<String, Entry>,
}

struct Entry {
    line: usize,
    value: toml::Value,
}

fn read_file(path: &Path) -> Result<FileTable, String> {
    let shown = path.display();
    let f = std::fs::File::open(path).map_err(|e| format!("{shown}: cannot read the configuration file: {e}"))?;
    let mut bytes = Vec::new();
    f.take(MAX_FILE + 1).read_to_end(&mut bytes).map_err(|e| format!("{shown}: cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(format!("{shown}: larger than {} KiB; is this the configuration file?", MAX_FILE / 1024));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        format!("{shown}:{}: not UTF-8 text", line_of(&String::from_utf8_lossy(&e.into_bytes()[..at]), at))
    })?;
    parse_table(&text).map_err(|(line, msg)| format!("{shown}:{line}: {msg}"))
}

/// The file's settings whose values are numbers; every other one is a string or a boolean.
const NUMBER_SETTINGS: &[&str] = &["max_agents", "max_build_log_mib"];

/// Parses the file's text; on a syntax error, the line and toml's message.
fn parse_table(text: &str) -> Result<FileTable, (usize, String)> {
    type Raw = BTreeMap<toml::Spanned<String>, toml::Spanned<toml::Value>>;
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(1, |s| line_of(text, s.start));
        let mut message = e.message().trim().to_string();
        // toml's message does not say which key: its span does.
        if message == "duplicate key" {
            if let Some(key) = e.span().and_then(|s| text.get(s)).map(str::trim).filter(|k| !k.is_empty()) {
                message = format!("duplicate key '{}'", key.chars().take(64).collect::<String>());
            }
        }
        (line, message)
    })?;
    let entries = raw
        .into_iter()
        .map(|(k, v)| {
            let line = line_of(text, k.span().start);
            (k.into_inner(), Entry { line, value: v.into_inner() })
        })
        .collect();
    Ok(FileTable { entries })
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

/// The known key nearest to a misspelt one, if any is near.
fn suggest<'a>(key: &str, known: &'a [String]) -> Option<&'a str> {
    let norm = key.replace('-', "_").to_ascii_lowercase();
    known
        .iter()
        .map(|k| (edit_distance(&norm, k), k))
        .filter(|(d, _)| *d <= 2.max(key.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.as_str())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb { prev } else { 1 + prev.min(row[j]).min(cur) };
            prev = cur;
        }
    }
    row[b.len()]
}

/// Variables the product sets or reads that are not `tether` flags: the agent's own, and those given
/// to provisioner commands and scripts. Any `TETHER_AGENT_…` is the agent's.
const OTHER_VARIABLES: &[&str] = &[
    "TETHER_CONFIG",
    "TETHER_COORDINATOR",
    "TETHER_CA_SHA256",
    "TETHER_WORKSPACE",
    "TETHER_BUILD",
    "TETHER_TRANSITION",
];

/// Warnings for `TETHER_…` variables in `names` that no flag and no part of Tether reads (mistyped,
/// usually), each with the nearest setting's variable when one is near. They are ignored, as
/// before; `serve` logs these and `config check` prints them.
pub fn unknown_variables(names: impl IntoIterator<Item = String>) -> Vec<String> {
    fn collect(c: &clap::Command, into: &mut Vec<String>) {
        into.extend(c.get_arguments().filter_map(|a| a.get_env()).map(|e| e.to_string_lossy().into_owned()));
        for sub in c.get_subcommands() {
            collect(sub, into);
        }
    }
    let mut known = Vec::new();
    collect(&Cli::command(), &mut known);
    known.sort();
    known.dedup();
    let mut unknown: Vec<String> = names
        .into_iter()
        .filter(|n| n.starts_with("TETHER_") && !n.starts_with("TETHER_AGENT_"))
        .filter(|n| !known.contains(n) && !OTHER_VARIABLES.contains(&n.as_str()))
        .collect();
    unknown.sort();
    // Compared as the keys are, without the prefix: a typo there is a typo in a few letters.
    let stems: Vec<String> = known.iter().map(|k| k.trim_start_matches("TETHER_").to_ascii_lowercase()).collect();
    unknown
        .into_iter()
        .map(|name| {
            let hint = suggest(name.trim_start_matches("TETHER_"), &stems)
                .map(|k| format!(" (did you mean TETHER_{}?)", k.to_ascii_uppercase()))
                .unwrap_or_default();
            let name: String = name.chars().take(64).collect();
            format!("environment variable {name} is not a Tether setting and is ignored{hint}")
        })
        .collect()
}

/// `tether config check`'s report: the file, then each setting with its value and source.
pub fn report(resolved: &Resolved) -> String {
    let mut out = String::new();
    match &resolved.file {
        Some(f) => out.push_str(&format!("configuration OK: {}\n", f.display())),
        None => out.push_str("configuration OK (no file: --config or TETHER_CONFIG names one)\n"),
    }
    let width = resolved.settings.iter().map(|s| s.key.len()).max().unwrap_or(0);
    for s in &resolved.settings {
        let value = match (s.value.as_deref(), s.key.as_str()) {
            (Some(v), _) => format!("{v:?}"),
            // Unset, the data directory is still somewhere: say where.
            (None, "data_dir") => format!("(unset: {})", crate::cli::default_data_dir().display()),
            (None, _) => "(unset)".to_string(),
        };
        out.push_str(&format!("  {:<width$} = {:<28} # {}\n", s.key, value, s.source));
    }
    out
}

/// A configuration file with every setting, commented out at its default, with its flag, variable
/// and help: `tether config example`, and `packaging/tether.toml`.
pub fn example() -> String {
    let root = Cli::command();
    let mut out = String::from(
        "# Tether coordinator configuration (`tether serve --config FILE`, or TETHER_CONFIG=FILE).\n\
         #\n\
         # Every key is also a flag of `tether serve` and an environment variable; a flag wins over\n\
         # the variable, and the variable over this file. Check a file with `tether config check\n\
         # --config FILE`. Generated by `tether config example`.\n",
    );
    for arg in setting_args(&root, &["serve"]) {
        let key = arg.get_id().to_string();
        out.push('\n');
        if let Some(help) = arg.get_help() {
            for line in wrap(&help.to_string(), 96) {
                out.push_str(&format!("# {line}\n"));
            }
        }
        let env = arg.get_env().map(|e| format!(", {}", e.to_string_lossy())).unwrap_or_default();
        out.push_str(&format!("# --{}{env}\n", arg.get_long().unwrap_or(&key)));
        let default = arg.get_default_values().first().map(|v| v.to_string_lossy().into_owned());
        match (default, matches!(arg.get_action(), ArgAction::SetTrue)) {
            (_, true) => out.push_str(&format!("#{key} = false\n")),
            (Some(d), false) if d.parse::<i64>().is_ok() => out.push_str(&format!("#{key} = {d}\n")),
            (Some(d), false) => out.push_str(&format!("#{key} = {}\n", toml::Value::String(d))),
            (None, false) => out.push_str(&format!("# (unset by default)\n#{key} = \"\"\n")),
        }
    }
    out
}

/// Words into lines of at most `width` characters (a longer word gets a line of its own).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<OsString> {
        std::iter::once("tether").chain(args.iter().copied()).map(OsString::from).collect()
    }

    fn with_file(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tether.toml");
        std::fs::write(&path, text).unwrap();
        let p = path.display().to_string();
        (dir, p)
    }

    fn serve(r: &Resolved) -> &crate::cli::ServeArgs {
        match &r.cli.command {
            crate::cli::Command::Serve(a) => a,
            other => panic!("not serve: {other:?}"),
        }
    }

    #[test]
    fn flag_beats_environment_beats_file_beats_default() {
        let (_d, file) =
            with_file("listen_http = \"127.0.0.1:1001\"\nlisten_quic = \"127.0.0.1:1002\"\nmax_agents = 7\n");
        let env = |k: &str| match k {
            "TETHER_LISTEN_QUIC" => Some("127.0.0.1:2002".to_string()),
            "TETHER_LISTEN_HTTP" => Some("127.0.0.1:2001".to_string()),
            _ => None,
        };
        let r =
            resolve(&argv(&["serve", "--config", &file, "--listen-http", "127.0.0.1:3001"]), &env).unwrap().unwrap();
        let s = serve(&r);
        assert_eq!(s.listen_http.to_string(), "127.0.0.1:3001");
        assert_eq!(s.listen_quic.to_string(), "127.0.0.1:2002");
        assert_eq!(s.max_agents, 7);
        let source = |k: &str| r.settings.iter().find(|s| s.key == k).unwrap().source.clone();
        assert_eq!(source("listen_http"), Source::Flag);
        assert_eq!(source("listen_quic"), Source::Env("TETHER_LISTEN_QUIC".into()));
        assert_eq!(source("max_agents"), Source::File { line: 3 });
        assert_eq!(source("advertise_ssh"), Source::Default);
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let (_d, file) = with_file(
            "# comment\nlisten_http = \"nowhere\"\nmax_agents = \"many\"\nlisen_quic = \"127.0.0.1:1\"\n[ssh]\nport = 22\nlog_format = \"xml\"\n",
        );
        let env = |k: &str| (k == "TETHER_ADVERTISE_SSH").then(String::new);
        let err = match resolve(&argv(&["serve", "--config", &file]), &env) {
            Err(ConfigError::Invalid(p)) => p,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("accepted"),
        };
        let all = err.join("\n");
        assert!(all.contains(&format!("{file}:2: listen_http: 'nowhere'")), "{all}");
        assert!(all.contains(&format!("{file}:3: max_agents: 'many'")), "{all}");
        assert!(all.contains(&format!("{file}:4: unknown key 'lisen_quic' (did you mean 'listen_quic'?)")), "{all}");
        assert!(all.contains(&format!("{file}:5: unknown key 'ssh'")), "{all}");
        assert_eq!(err.len(), 4, "{all}");
    }

    #[test]
    fn two_tcp_listeners_on_one_port_are_refused_before_anything_binds() {
        let (_d, file) = with_file("listen_https = \"0.0.0.0:7443\"\n");
        match resolve(&argv(&["serve", "--config", &file, "--listen-ssh", "127.0.0.1:7443"]), &|_| None) {
            Err(ConfigError::Invalid(p)) => assert_eq!(
                p,
                [format!(
                    "{file}:1: listen_https and listen_ssh (flag) both listen on TCP port 7443: give each its own \
                     port (or `off`)"
                )]
            ),
            other => panic!("accepted: {:?}", other.is_ok()),
        }
        // The QUIC tunnel is UDP: sharing HTTPS's port number is the default. Port 0 picks a free one.
        let ok = argv(&["serve", "--listen-http", "127.0.0.1:0", "--listen-https", "127.0.0.1:0"]);
        assert!(resolve(&ok, &|_| None).is_ok());
    }

    #[test]
    fn a_number_where_a_string_belongs_and_a_duplicate_key_are_named() {
        let (_d, file) = with_file("data_dir = 5\nmax_agents = 7\nlisten_http = 80\n");
        match resolve(&argv(&["serve", "--config", &file]), &|_| None) {
            Err(ConfigError::Invalid(p)) => assert_eq!(
                p,
                [
                    format!("{file}:1: data_dir: expected a string (in quotes), found an integer"),
                    format!("{file}:3: listen_http: expected a string (in quotes), found an integer"),
                ]
            ),
            other => panic!("accepted: {:?}", other.is_ok()),
        }
        let (_d, file) = with_file("max_agents = 5\nmax_agents = 6\n");
        match resolve(&argv(&["serve", "--config", &file]), &|_| None) {
            Err(ConfigError::Invalid(p)) => assert_eq!(p, [format!("{file}:2: duplicate key 'max_agents'")]),
            other => panic!("accepted: {:?}", other.is_ok()),
        }
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let (_d, file) = with_file("max_agents = 5\nlisten_http = \n");
        match resolve(&argv(&["serve", "--config", &file]), &|_| None) {
            Err(ConfigError::Invalid(p)) => assert!(p[0].starts_with(&format!("{file}:2: ")), "{p:?}"),
            _ => panic!("accepted"),
        }
    }

    #[test]
    fn bad_environment_values_are_reported_with_the_variable() {
        let env = |k: &str| (k == "TETHER_MAX_AGENTS").then(|| "lots".to_string());
        match resolve(&argv(&["serve"]), &env) {
            Err(ConfigError::Invalid(p)) => assert!(p[0].starts_with("environment TETHER_MAX_AGENTS: 'lots'"), "{p:?}"),
            _ => panic!("accepted"),
        }
    }

    #[test]
    fn other_commands_are_left_to_clap() {
        assert!(resolve(&argv(&["workspace", "list"]), &|_| None).unwrap().is_none());
    }

    #[test]
    fn the_example_is_a_valid_configuration() {
        let text = example();
        let uncommented: String = text
            .lines()
            .filter_map(|l| l.strip_prefix('#').filter(|l| l.contains(" = ")))
            .filter(|l| !l.ends_with("\"\""))
            .map(|l| format!("{l}\n"))
            .collect();
        let (_d, file) = with_file(&uncommented);
        let r = resolve(&argv(&["serve", "--config", &file]), &|_| None).unwrap().unwrap();
        assert!(r.settings.iter().any(|s| matches!(s.source, Source::File { .. })));
    }
}
