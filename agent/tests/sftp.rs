//! `tether-agent sftp-server` driven by OpenSSH's own `sftp` client (`sftp -D`, no SSH in between),
//! and by a small raw client for what `sftp` does not show (long names, readlink, exit status).
//! Where OpenSSH's sftp-server is installed, the same batches run through it too and must print the
//! same thing.

use rand::{RngCore, SeedableRng};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

const OPENSSH_SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";

fn ours() -> String {
    format!("{} sftp-server", env!("CARGO_BIN_EXE_tether-agent"))
}

fn openssh() -> Option<&'static str> {
    let found = Path::new(OPENSSH_SFTP_SERVER).exists();
    if !found {
        eprintln!("{OPENSSH_SFTP_SERVER} is not installed: skipping the comparison with it");
    }
    found.then_some(OPENSSH_SFTP_SERVER)
}

/// Runs `sftp -D server -b batch` in `dir`. The server inherits `dir` as its working directory.
fn sftp(dir: &Path, server: &str, batch: &str) -> Output {
    let batch_dir = tempfile::tempdir().unwrap();
    let batch_file = batch_dir.path().join("batch");
    std::fs::write(&batch_file, batch).unwrap();
    Command::new("sftp")
        .args(["-q", "-D", server, "-b"])
        .arg(&batch_file)
        .current_dir(dir)
        .env("TZ", "UTC")
        .stdin(Stdio::null())
        .output()
        .expect("running sftp (install openssh-client)")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn sftp_ok(dir: &Path, server: &str, batch: &str) -> String {
    let out = sftp(dir, server, batch);
    assert!(
        out.status.success(),
        "sftp failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    std::fs::write(path, &data).unwrap();
    data
}

fn set_mtime(path: &Path, t: SystemTime) {
    std::fs::File::options().write(true).open(path).unwrap().set_modified(t).unwrap();
}

fn user_and_group() -> (String, String) {
    let user = nix::unistd::User::from_uid(nix::unistd::getuid()).unwrap().map(|u| u.name);
    let group = nix::unistd::Group::from_gid(nix::unistd::getgid()).unwrap().map(|g| g.name);
    (
        user.unwrap_or_else(|| nix::unistd::getuid().to_string()),
        group.unwrap_or_else(|| nix::unistd::getgid().to_string()),
    )
}

/// A directory with a bit of everything: old and recent files, setuid bits, a symlink, a subdirectory.
fn tree(root: &Path) -> PathBuf {
    let tree = root.join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("old.txt"), b"old").unwrap();
    set_mtime(&tree.join("old.txt"), SystemTime::UNIX_EPOCH + Duration::from_secs(1_577_836_800));
    std::fs::write(tree.join("recent.txt"), b"recent file").unwrap();
    std::fs::write(tree.join("tool"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(tree.join("tool"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::create_dir(tree.join("sub")).unwrap();
    std::os::unix::fs::symlink("old.txt", tree.join("link")).unwrap();
    tree
}

#[test]
fn listings_match_openssh() {
    let root = tempfile::tempdir().unwrap();
    let tree = tree(root.path());
    let (user, group) = user_and_group();
    let batch = "ls -la tree\nls -l tree/old.txt\nls -1 tree\nls -n tree/tool\n";
    let got = sftp_ok(root.path(), &ours(), batch);
    let old = format!("-rw-r--r--    ? {user:<8} {group:<8}        3 Jan  1  2020 tree/old.txt");
    assert!(got.contains(&old), "no line {old:?} in:\n{got}");
    assert!(got.contains("sftp> ls -1 tree\ntree/link\ntree/old.txt\ntree/recent.txt\ntree/sub\ntree/tool\n"), "{got}");
    assert!(got.contains(" tree/..\n"), "`ls -a` shows . and ..:\n{got}");
    if let Some(openssh) = openssh() {
        assert_eq!(got, sftp_ok(root.path(), openssh, batch));
    }

    // `sftp` formats `ls -l` itself; other clients show the server's long names.
    let ours = Raw::spawn(&ours(), root.path()).long_names(b"tree");
    let mode_and_size = ours.iter().find(|(n, _)| n == "tool").map(|(_, l)| l.clone()).unwrap();
    assert!(mode_and_size.starts_with(&format!("-rwsr-xr-x    1 {user:<8} {group:<8}       10 ")), "{mode_and_size}");
    assert!(mode_and_size.ends_with(" tool"), "{mode_and_size}");
    if let Some(openssh) = openssh() {
        assert_eq!(ours, Raw::spawn(openssh, root.path()).long_names(b"tree"));
    }
    drop(tree);
}

#[test]
fn put_and_get_are_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = random_file(&d.join("src.bin"), 5 * 1024 * 1024 + 12_345, 1);
    std::fs::set_permissions(d.join("src.bin"), std::fs::Permissions::from_mode(0o640)).unwrap();
    set_mtime(&d.join("src.bin"), SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000));
    // Halves for reput (the server appends) and reget (the client does).
    std::fs::write(d.join("partial-up.bin"), &src[..1024 * 1024 + 7]).unwrap();
    std::fs::write(d.join("partial-down.bin"), &src[..2 * 1024 * 1024]).unwrap();

    sftp_ok(
        d,
        &ours(),
        "put src.bin up.bin\nget up.bin down.bin\nput -p src.bin kept.bin\nreput src.bin partial-up.bin\n\
         reget up.bin partial-down.bin\nput -f src.bin synced.bin\n",
    );
    for name in ["up.bin", "down.bin", "kept.bin", "partial-up.bin", "partial-down.bin", "synced.bin"] {
        assert!(std::fs::read(d.join(name)).unwrap() == src, "{name} differs from src.bin");
    }
    let kept = std::fs::metadata(d.join("kept.bin")).unwrap();
    assert_eq!((kept.mode() & 0o7777, kept.mtime()), (0o640, 1_600_000_000), "put -p keeps mode and time");
}

#[test]
fn file_operations() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let home = std::fs::canonicalize(d).unwrap();
    std::fs::write(d.join("src"), b"content").unwrap();
    std::fs::write(d.join("other"), b"other").unwrap();

    let out = sftp_ok(
        d,
        &ours(),
        "pwd\nmkdir dir\ncd dir\npwd\nput src a\nrename a b\nln -s b link\nln b hard\n\
         cp b copy\nchmod 600 copy\nrm hard\ncd ..\n-rename -l other dir/b\nrename other dir/b\ndf\n",
    );
    assert!(out.contains(&format!("Remote working directory: {}\n", home.display())), "{out}");
    assert!(out.contains(&format!("Remote working directory: {}/dir\n", home.display())), "{out}");
    let sub = d.join("dir");
    assert_eq!(std::fs::read_link(sub.join("link")).unwrap(), Path::new("b"), "the link is stored as given");
    assert_eq!(std::fs::metadata(sub.join("copy")).unwrap().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read(sub.join("copy")).unwrap(), b"content", "cp (copy-data)");
    assert_eq!(std::fs::read(sub.join("b")).unwrap(), b"other", "posix-rename replaces, plain rename did not");
    assert!(!sub.join("hard").exists() && !d.join("other").exists());

    let mut raw = Raw::spawn(&ours(), d);
    assert_eq!(raw.readlink(b"dir/link"), Ok(b"b".to_vec()));
    assert_eq!(
        raw.readlink(b"dir/b").unwrap_err(),
        (5, "readlink \"dir/b\": Invalid argument".into()),
        "EINVAL, as OpenSSH maps it"
    );
    drop(raw);

    sftp_ok(d, &ours(), "rm dir/b\nrm dir/link\nrm dir/copy\nrmdir dir\n");
    assert!(!sub.exists());
}

#[test]
fn errors_fail_the_batch_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let home = std::fs::canonicalize(d).unwrap().display().to_string();
    std::fs::create_dir(d.join("full")).unwrap();
    std::fs::write(d.join("full/f"), b"f").unwrap();

    let batch =
        "-mkdir full\n-rmdir full\n-rm missing.txt\n-rename -l missing.txt x\n-cd full/f\nget missing.bin\nls\n";
    let ours_out = sftp(d, &ours(), batch);
    assert!(!ours_out.status.success(), "a failed get fails the batch");
    let stdout = text(&ours_out.stdout);
    assert!(stdout.ends_with("sftp> get missing.bin\n"), "the batch stops at the failed get:\n{stdout}");
    let stderr = text(&ours_out.stderr);
    for line in [
        format!("remote mkdir \"{home}/full\": Failure"),
        format!("remote rmdir \"{home}/full\": Failure"),
        format!("remote delete {home}/missing.txt: No such file or directory"),
        format!("remote rename \"{home}/missing.txt\" to \"{home}/x\": No such file or directory"),
        format!("Can't change directory: \"{home}/full/f\" is not a directory"),
        format!("File \"{home}/missing.bin\" not found."),
    ] {
        assert!(stderr.contains(&line), "no {line:?} in stderr:\n{stderr}");
    }
    if let Some(openssh) = openssh() {
        let theirs = sftp(d, openssh, batch);
        assert_eq!((text(&theirs.stdout), text(&theirs.stderr)), (stdout, stderr));
    }
}

#[test]
fn exits_zero_at_eof_and_nonzero_on_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let run = |input: &[u8]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tether-agent"))
            .arg("sftp-server")
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = run(&[0, 0, 0, 5, 1, 0, 0, 0, 3]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout[..4], (out.stdout.len() as u32 - 4).to_be_bytes(), "one packet");
    assert_eq!(out.stdout[4..9], [2, 0, 0, 0, 3], "a version 3 reply");
    assert!(out.stderr.is_empty(), "nothing on stderr: {}", text(&out.stderr));

    let out = run(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("sftp: request of 4294967295 bytes is over the limit of 262144"),
        "{}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty());
}

/// A minimal SFTP client on a server's stdin and stdout.
struct Raw {
    child: std::process::Child,
    next_id: u32,
}

impl Raw {
    fn spawn(server: &str, dir: &Path) -> Raw {
        let mut argv = server.split(' ');
        let child = Command::new(argv.next().unwrap())
            .args(argv)
            .current_dir(dir)
            .env("TZ", "UTC")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut raw = Raw { child, next_id: 0 };
        raw.send(&[1, 0, 0, 0, 3]);
        let (kind, body) = raw.recv();
        assert_eq!((kind, &body[..4]), (2, &[0, 0, 0, 3][..]));
        raw
    }

    fn send(&mut self, body: &[u8]) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
        stdin.write_all(body).unwrap();
    }

    /// A request of `kind` with string fields; returns the reply's type and body after its id.
    fn call(&mut self, kind: u8, strings: &[&[u8]]) -> (u8, Vec<u8>) {
        self.next_id += 1;
        let mut body = vec![kind];
        body.extend_from_slice(&self.next_id.to_be_bytes());
        for s in strings {
            body.extend_from_slice(&(s.len() as u32).to_be_bytes());
            body.extend_from_slice(s);
        }
        self.send(&body);
        let (kind, reply) = self.recv();
        assert_eq!(reply[..4], self.next_id.to_be_bytes());
        (kind, reply[4..].to_vec())
    }

    fn recv(&mut self) -> (u8, Vec<u8>) {
        let stdout = self.child.stdout.as_mut().unwrap();
        let mut len = [0; 4];
        stdout.read_exact(&mut len).unwrap();
        let mut body = vec![0; u32::from_be_bytes(len) as usize];
        stdout.read_exact(&mut body).unwrap();
        (body[0], body[1..].to_vec())
    }

    /// Names and long names of a directory, sorted by name.
    fn long_names(&mut self, path: &[u8]) -> Vec<(String, String)> {
        let (kind, handle) = self.call(11, &[path]);
        assert_eq!(kind, 102, "opendir gives a handle");
        let handle = Fields(&handle).string();
        let mut all = Vec::new();
        loop {
            let (kind, body) = self.call(12, &[&handle]);
            if kind == 101 {
                assert_eq!(body[..4], [0, 0, 0, 1], "readdir ends with EOF");
                break;
            }
            let mut f = Fields(&body);
            for _ in 0..f.u32() {
                let name = text(&f.string());
                let long = text(&f.string());
                f.attrs();
                all.push((name, long));
            }
        }
        all.sort();
        all
    }

    /// The link's target, or the status code and message.
    fn readlink(&mut self, path: &[u8]) -> Result<Vec<u8>, (u32, String)> {
        let (kind, body) = self.call(19, &[path]);
        let mut f = Fields(&body);
        match kind {
            104 => {
                assert_eq!(f.u32(), 1);
                Ok(f.string())
            }
            101 => Err((f.u32(), text(&f.string()))),
            other => panic!("reply type {other} to readlink"),
        }
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().unwrap();
        if !std::thread::panicking() {
            assert!(status.success(), "server exit status {status}");
        }
    }
}

struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn u32(&mut self) -> u32 {
        let (head, rest) = self.0.split_at(4);
        self.0 = rest;
        u32::from_be_bytes(head.try_into().unwrap())
    }

    fn string(&mut self) -> Vec<u8> {
        let len = self.u32() as usize;
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        s.to_vec()
    }

    fn attrs(&mut self) {
        let flags = self.u32();
        let words = [(1, 2), (2, 2), (4, 1), (8, 2)].iter().filter(|(bit, _)| flags & bit != 0).map(|(_, n)| n).sum();
        for _ in 0..words {
            self.u32();
        }
    }
}
