//! SSH users for end-to-end tests: a throwaway key, a Tether user with it, and an ssh config written
//! by `tether config-ssh`, used with the stock OpenSSH client exactly as a developer would.

use crate::{bin, Coordinator};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[derive(Clone)]
pub struct SshUser {
    pub name: String,
    pub dir: PathBuf,
    /// Private key; the public one is beside it with `.pub`.
    pub key: PathBuf,
    /// The ssh config file `tether config-ssh` manages.
    pub config: PathBuf,
    /// The user's API token.
    pub token: String,
}

/// Makes an ed25519 key pair at `path` (no passphrase).
pub fn keygen(path: &Path, comment: &str) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .output()
        .expect("run ssh-keygen (is openssh-client installed?)");
    assert!(out.status.success(), "ssh-keygen failed: {}", String::from_utf8_lossy(&out.stderr));
}

impl SshUser {
    /// Adds user `name` with a new key and runs `tether config-ssh` for them into their own
    /// directory. Options the user had before (`BatchMode`, a timeout) stay above the managed block.
    pub fn add(coord: &Coordinator, name: &str) -> SshUser {
        let dir = coord.data_dir().join(format!("user-{name}"));
        std::fs::create_dir_all(&dir).expect("user dir");
        let key = dir.join("id_ed25519");
        keygen(&key, &format!("{name}@test"));
        let added = coord.json(&["user", "add", name, "--ssh-key", key.with_extension("pub").to_str().expect("utf-8")]);
        let token = added["token"].as_str().expect("user token").to_string();
        let config = dir.join("config");
        std::fs::write(&config, "BatchMode yes\nConnectTimeout 30\nServerAliveInterval 5\nServerAliveCountMax 4\n")
            .expect("ssh config");
        let user = SshUser { name: name.to_string(), dir, key, config, token };
        user.config_ssh(coord);
        user
    }

    /// Runs `tether config-ssh` for this user again.
    pub fn config_ssh(&self, coord: &Coordinator) -> String {
        coord.ok(&[
            "config-ssh",
            "--user",
            &self.name,
            "--ssh-config",
            self.config.to_str().expect("utf-8"),
            "--identity",
            self.key.to_str().expect("utf-8"),
        ])
    }

    /// `ssh -F CONFIG` with nothing else: the config alone must be enough.
    pub fn ssh(&self) -> Command {
        let mut c = Command::new("ssh");
        c.arg("-F").arg(&self.config);
        c
    }

    /// `ssh -F CONFIG HOST COMMAND`.
    pub fn run(&self, host: &str, command: &str) -> Output {
        self.ssh().arg(host).arg(command).output().expect("run ssh")
    }

    /// Like [`SshUser::run`], and the command must succeed; returns stdout.
    pub fn ok(&self, host: &str, command: &str) -> String {
        let out = self.run(host, command);
        assert!(
            out.status.success(),
            "ssh {host} {command:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The `tether` CLI with this user's token (as on a laptop: no data directory).
    pub fn tether(&self, coord: &Coordinator) -> Command {
        let mut c = Command::new(bin("tether"));
        c.env("TETHER_URL", coord.api_url())
            .env("TETHER_TOKEN", &self.token)
            .env_remove("TETHER_DATA_DIR")
            .env("HOME", &self.dir);
        c
    }
}
