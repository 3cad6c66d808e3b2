//! A workspace image that has no agent in it: an empty directory whose only programs are a shell,
//! curl and the few tools the coordinator's init script runs, started the way an image's entry point
//! would (`curl -fsSL --cacert ca.pem https://COORDINATOR/agent/init.sh | sh`) with nothing in the
//! environment but PATH, HOME and the agent token. Plus the HTTPS listener itself.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tether_tests::{bin, wait_until, Coordinator, LONG};

const TEMPLATE: &str = r#"
[[script]]
name = "hello"
run = "true"
"#;

/// Everything the image has: a shell, curl, and what init.sh runs besides shell builtins
/// (`uname -m` for the architecture check, `sha256sum` to check the agent, `mkdir -p`, `chmod`, `mv`
/// and `rm` to keep the download in the data directory).
const IMAGE_TOOLS: &[&str] = &["sh", "curl", "sha256sum", "uname", "mkdir", "chmod", "mv", "rm"];

/// An "image": a directory with `bin/` holding only [`IMAGE_TOOLS`], also used as `HOME`.
struct Image {
    dir: tempfile::TempDir,
}

impl Image {
    fn new() -> Image {
        let dir = tempfile::Builder::new().prefix("tether-image-").tempdir().expect("tempdir");
        let bin_dir = dir.path().join("bin");
        std::fs::create_dir(&bin_dir).expect("bin");
        for tool in IMAGE_TOOLS {
            let real = which(tool).unwrap_or_else(|| panic!("this test needs `{tool}` on the machine running it"));
            std::os::unix::fs::symlink(&real, bin_dir.join(tool)).expect("symlink");
        }
        Image { dir }
    }

    fn home(&self) -> &Path {
        self.dir.path()
    }

    /// Where init.sh keeps the agent: the agent's own default data directory under `HOME`.
    fn data_dir(&self) -> PathBuf {
        self.home().join(".local/state/tether-agent")
    }

    fn cached_agent(&self) -> PathBuf {
        self.data_dir().join("tether-agent")
    }

    /// `env -i PATH=IMAGE/bin HOME=IMAGE VARS… sh -c 'curl … init.sh | sh'`, in its own process group,
    /// with `curl --cacert CACERT` if given.
    fn command(&self, coord: &Coordinator, env: &[(&str, &str)], cacert: Option<&Path>) -> Command {
        let cacert = cacert.map(|p| format!("--cacert '{}' ", p.display())).unwrap_or_default();
        let line = format!("curl -fsSL {cacert}'{}/agent/init.sh' | sh", coord.https_url());
        let mut cmd = Command::new(self.home().join("bin/sh"));
        cmd.env_clear()
            .env("PATH", self.home().join("bin"))
            .env("HOME", self.home())
            .envs(env.iter().copied())
            .arg("-c")
            .arg(line)
            .current_dir(self.home())
            .stdin(Stdio::null())
            .process_group(0);
        cmd
    }

    /// Starts the image, fetching init.sh with the coordinator's CA; its output (init.sh's, then the
    /// agent's) goes to `log`.
    fn start(&self, coord: &Coordinator, token: &str, log: &Path) -> Started {
        self.start_with(coord, &[("TETHER_AGENT_TOKEN", token)], Some(&coord.ca_path()), log)
    }

    fn start_with(&self, coord: &Coordinator, env: &[(&str, &str)], cacert: Option<&Path>, log: &Path) -> Started {
        let f = std::fs::File::create(log).expect("log");
        let child = self
            .command(coord, env, cacert)
            .stdout(f.try_clone().expect("log"))
            .stderr(f)
            .spawn()
            .expect("start the image");
        Started { child, log: log.to_path_buf() }
    }

    /// Runs the image to its end (for starts that must fail).
    fn run(&self, coord: &Coordinator, env: &[(&str, &str)]) -> Output {
        self.command(coord, env, Some(&coord.ca_path())).output().expect("run the image")
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// A started image: init.sh, then the agent it execs, all in one process group.
struct Started {
    child: Child,
    log: PathBuf,
}

impl Started {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pgid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// SIGTERM to the whole group, as a container stop does; waits until every process is gone.
    fn stop(&mut self) {
        let _ = nix::sys::signal::killpg(self.pgid(), nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        let pgid = self.pgid();
        wait_until("the image's processes to exit", LONG, || nix::sys::signal::killpg(pgid, None).is_err());
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(self.pgid(), nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().expect("hash").to_string()
}

fn inode(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).expect("metadata"))
}

/// `curl -fsS --cacert CA URL`, as a user would check the HTTPS listener.
fn curl(coord: &Coordinator, args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-fsS", "--max-time", "60", "--cacert"])
        .arg(coord.ca_path())
        .args(args)
        .output()
        .expect("curl")
}

fn curl_ok(coord: &Coordinator, args: &[&str]) -> String {
    let out = curl(coord, args);
    assert!(out.status.success(), "curl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn an_image_with_only_a_shell_and_curl_runs_the_coordinators_agent() {
    let c = Coordinator::start();
    let created = c.create("img", TEMPLATE, &[]);
    let token = created["agent_token"].as_str().expect("agent_token").to_string();
    let image = Image::new();
    let real_sha = sha256_of(&bin("tether-agent"));

    // First start: the agent is downloaded, checked, cached and run.
    let mut first = image.start(&c, &token, &image.home().join("start-1.log"));
    let w = c.wait_for("img", "running", LONG);
    assert_eq!(w["status"], "running", "{w}");
    assert!(first.log().contains(&format!("downloaded tether-agent {}", env!("CARGO_PKG_VERSION"))), "{}", first.log());
    assert_eq!(sha256_of(&image.cached_agent()), real_sha, "the cache holds the coordinator's agent");
    assert_eq!(
        std::fs::read_to_string(image.data_dir().join("ca.pem")).expect("ca.pem in the data directory"),
        std::fs::read_to_string(c.ca_path()).unwrap(),
        "the agent pins the CA the script brought"
    );
    let agent_build = c.show("img")["build"].clone();
    first.stop();
    c.wait_for("img", "stopped", LONG);

    // Second start: the cached binary is used as it is, not downloaded again.
    let cached_inode = inode(&image.cached_agent());
    let second = image.start(&c, &token, &image.home().join("start-2.log"));
    wait_until("the second start to connect", LONG, || second.log().contains("connected to the coordinator"));
    c.wait_for("img", "running", LONG);
    let log = second.log();
    assert!(log.contains("starting the cached tether-agent"), "{log}");
    assert!(!log.contains("downloaded"), "{log}");
    assert_eq!(inode(&image.cached_agent()), cached_inode, "the cached file was not replaced");
    assert_ne!(c.show("img")["build"], agent_build, "a new build started with the second agent");
    let mut second = second;
    second.stop();
    c.wait_for("img", "stopped", LONG);

    // A cached binary that no longer matches the published hash is replaced, not run.
    std::fs::write(image.cached_agent(), "#!/bin/sh\necho tampered > \"$HOME/tampered\"\n").unwrap();
    let third = image.start(&c, &token, &image.home().join("start-3.log"));
    c.wait_for("img", "running", LONG);
    assert!(third.log().contains("downloaded tether-agent"), "{}", third.log());
    assert_eq!(sha256_of(&image.cached_agent()), real_sha);
    assert!(!image.home().join("tampered").exists(), "the tampered cache never ran");
}

/// A plain-HTTP server standing in for a proxy or mirror that hands out a changed agent: answers
/// every request (at most a few) with `body`.
fn tampering_server(body: &'static [u8]) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                match stream.read(&mut buf) {
                    // A signal to the test process (a child's SIGCHLD) interrupts a read with a timeout.
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(body));
        }
    });
    format!("http://{addr}")
}

#[test]
fn init_refuses_what_it_cannot_trust() {
    let c = Coordinator::start();
    let created = c.create("img", TEMPLATE, &[]);
    let token = created["agent_token"].as_str().expect("agent_token").to_string();
    let published = curl_ok(&c, &[&format!("{}/agent/tether-agent.sha256", c.https_url())]);
    let published = published.split_whitespace().next().expect("hash").to_string();
    let text =
        |out: &Output| format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));

    // The agent comes from somewhere that changed it: refused, nothing cached, nothing run.
    let image = Image::new();
    let mirror = tampering_server(b"#!/bin/sh\necho pwned\n");
    let out = image.run(&c, &[("TETHER_AGENT_TOKEN", &token), ("TETHER_URL", &mirror)]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("refusing to run the downloaded tether-agent: its sha256 is "), "{said}");
    assert!(said.contains(&format!("but the coordinator published {published}")), "{said}");
    assert!(!said.contains("pwned"), "{said}");
    let left: Vec<_> = std::fs::read_dir(image.data_dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("ca.pem")], "no agent and no partial download kept");

    // No token: nothing is downloaded.
    let image = Image::new();
    let out = image.run(&c, &[]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("tether-agent init: no agent token: set TETHER_AGENT_TOKEN"), "{said}");
    assert!(!image.data_dir().exists(), "{said}");

    // A machine the served agent was not built for (an image whose `uname -m` says riscv64).
    let image = Image::new();
    let uname = image.home().join("bin/uname");
    std::fs::remove_file(&uname).unwrap();
    std::fs::write(&uname, "#!/bin/sh\necho riscv64\n").unwrap();
    std::fs::set_permissions(&uname, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = image.run(&c, &[("TETHER_AGENT_TOKEN", &token)]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    let arch = std::env::consts::ARCH;
    assert!(
        said.contains(&format!("this machine is riscv64, but the coordinator serves a tether-agent for linux-{arch}")),
        "{said}"
    );
    assert!(!image.cached_agent().exists());

    assert_ne!(c.show("img")["status"], "running", "no agent ever connected");
}

#[test]
fn the_https_listener_serves_the_api_and_the_agent() {
    let c = Coordinator::start();
    let url = c.https_url();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    assert_eq!(curl_ok(&c, &[&format!("{url}/healthz")]), "ok\n");
    // The certificate names localhost too.
    let port = url.rsplit(':').next().unwrap();
    assert_eq!(curl_ok(&c, &[&format!("https://localhost:{port}/healthz")]), "ok\n");

    // The JSON API, with the admin token.
    let admin = std::fs::read_to_string(c.data_dir().join("admin-token")).unwrap();
    let auth = format!("Authorization: Bearer {}", admin.trim());
    c.create("one", TEMPLATE, &[]);
    let list = curl_ok(&c, &["-H", &auth, &format!("{url}/api/v1/workspaces")]);
    let list: serde_json::Value = serde_json::from_str(&list).expect("json");
    assert_eq!(list[0]["name"], "one", "{list}");
    let out = curl(&c, &[&format!("{url}/api/v1/workspaces")]);
    assert_eq!(out.status.code(), Some(22), "no token, no API: curl -f exits 22 on HTTP 401");

    // The published hash is the served binary's, in `sha256sum -c` form.
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("tether-agent");
    curl_ok(&c, &["-o", agent.to_str().unwrap(), &format!("{url}/agent/tether-agent")]);
    let sums = curl_ok(&c, &[&format!("{url}/agent/tether-agent.sha256")]);
    assert_eq!(sums, format!("{}  tether-agent\n", sha256_of(&agent)));
    assert_eq!(sha256_of(&agent), sha256_of(&bin("tether-agent")), "it serves the agent next to tether");
    std::fs::write(dir.path().join("tether-agent.sha256"), &sums).unwrap();
    let check = Command::new("sha256sum").args(["-c", "tether-agent.sha256"]).current_dir(dir.path()).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));

    assert_eq!(curl_ok(&c, &[&format!("{url}/agent/ca.pem")]), std::fs::read_to_string(c.ca_path()).unwrap());
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(c.data_dir().join("coordinator.json")).unwrap()).unwrap();
    assert_eq!(info["https_addr"].as_str().map(|a| a.ends_with(port)), Some(true), "{info}");
    // The plain HTTP API serves the same routes.
    let script = curl_ok(&c, &[&format!("{}/agent/init.sh", c.api_url())]);
    assert!(script.starts_with("#!/bin/sh\n") && script.contains(&format!("default_url='{url}'")), "{script}");

    // The CLI over HTTPS, as on a laptop: no data directory, the URL, the token and the CA.
    let home = tempfile::tempdir().unwrap();
    let tether = |args: &[&str]| {
        Command::new(bin("tether"))
            .env_clear()
            .env("HOME", home.path())
            .env("TETHER_URL", &url)
            .env("TETHER_TOKEN", admin.trim())
            .args(args)
            .output()
            .unwrap()
    };
    let ca = c.ca_path();
    let out = tether(&["--ca", ca.to_str().unwrap(), "workspace", "list", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "one", "{list}");
    let out = tether(&["workspace", "list"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(said.contains(&format!("cannot reach the coordinator at {url}: ")), "{said}");
    assert!(said.contains("certificate") && said.contains("--ca FILE (TETHER_CA)"), "{said}");

    // A client that connects and never says hello is dropped after the handshake deadline.
    let mut idle = std::net::TcpStream::connect(url.trim_start_matches("https://")).unwrap();
    idle.set_read_timeout(Some(LONG)).unwrap();
    let opened = Instant::now();
    let n = idle.read(&mut [0u8; 16]).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(opened.elapsed() < Duration::from_secs(30), "closed after {:?}", opened.elapsed());
}

#[test]
fn tether_ssh_goes_through_the_https_port() {
    let c = Coordinator::start();
    let alice = tether_tests::ssh::SshUser::add(&c, "alice");
    let created = c.create("dev", TEMPLATE, &["--owner", "alice"]);
    let token = created["agent_token"].as_str().expect("agent_token");
    let _agent = tether_tests::Agent::start(&c, token, &c.data_dir().join("agent-dev"));
    c.wait_for("dev", "running", LONG);

    // `--ca` reaches the `tether ssh --stdio` that OpenSSH runs as its ProxyCommand.
    let out = alice
        .tether(&c)
        .env("TETHER_URL", c.https_url())
        .env_remove("TETHER_CA")
        .args(["--ca", c.ca_path().to_str().unwrap()])
        .args(["ssh", "dev", "--", "-i", alice.key.to_str().unwrap(), "-o", "BatchMode=yes", "echo via-https"])
        .output()
        .unwrap();
    assert!(out.status.success(), "tether ssh: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "via-https");
}

/// Runs openssl (the test's stand-in for a public certificate authority).
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn with_a_certificate_ops_supply_images_trust_it_as_they_trust_any_site() {
    // A "public" CA and a certificate it issued for 127.0.0.1, as ops would get one.
    let pki = tempfile::tempdir().unwrap();
    let d = pki.path();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let ca_subject = ["-subj", "/CN=Test Public CA", "-days", "2"];
    openssl(d, &[&["req", "-x509"][..], &ec, &ca_subject, &["-keyout", "ca.key", "-out", "public-ca.pem"]].concat());
    openssl(d, &[&["req", "-subj", "/CN=127.0.0.1"][..], &ec, &["-keyout", "key.pem", "-out", "leaf.csr"]].concat());
    std::fs::write(d.join("leaf.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n").unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "public-ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ],
    );
    let path = |f: &str| d.join(f);
    let c = Coordinator::start_with(&[
        "--tls-cert",
        path("cert.pem").to_str().unwrap(),
        "--tls-key",
        path("key.pem").to_str().unwrap(),
    ]);
    let created = c.create("img", TEMPLATE, &[]);
    let token = created["agent_token"].as_str().expect("agent_token").to_string();

    // The image trusts the public CA the way curl trusts the system's roots (CURL_CA_BUNDLE), and
    // fetches init.sh without --cacert; the script pins the coordinator's own CA for the tunnel.
    let image = Image::new();
    let public_ca = path("public-ca.pem");
    let env = [("TETHER_AGENT_TOKEN", token.as_str()), ("CURL_CA_BUNDLE", public_ca.to_str().unwrap())];
    let started = image.start_with(&c, &env, None, &image.home().join("start.log"));
    c.wait_for("img", "running", LONG);
    assert!(started.log().contains("downloaded tether-agent"), "{}", started.log());
    assert_eq!(
        std::fs::read_to_string(image.data_dir().join("ca.pem")).unwrap(),
        std::fs::read_to_string(c.ca_path()).unwrap(),
        "the agent pins the coordinator's own CA, not the public one"
    );

    // The coordinator's own CA does not vouch for this certificate; the public one does.
    let url = c.https_url();
    assert_eq!(curl(&c, &[&format!("{url}/healthz")]).status.code(), Some(60), "curl: certificate problem");
    let out =
        Command::new("curl").arg("-fsS").arg("--cacert").arg(&public_ca).arg(format!("{url}/agent/init.sh")).output();
    let script = String::from_utf8_lossy(&out.unwrap().stdout).into_owned();
    assert!(script.contains("own_ca='0'"), "{script}");
}
