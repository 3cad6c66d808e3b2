//! One SFTP session: its open handles, and what each request does to the filesystem.
//!
//! Requests are served one at a time, in order, like OpenSSH's sftp-server; clients keep many in
//! flight, so the pipe stays full. Relative paths are relative to the session's home (the working
//! directory the SSH server started us in).

use super::listing::Owners;
use super::wire::{self, Attrs, Frame, Name, Request, StatusCode};
use super::{ProtocolError, MAX_HANDLES, MAX_PACKET, MAX_READ};
use nix::errno::Errno;
use nix::fcntl::{OFlag, AT_FDCWD};
use nix::sys::stat::{FchmodatFlags, Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Directory entries per SSH_FXP_NAME reply, as OpenSSH sends.
const READDIR_BATCH: usize = 100;

pub struct Session {
    home: PathBuf,
    handles: Handles,
    owners: Owners,
    initialized: bool,
    /// Read buffer, reused: one read is at most `MAX_READ`.
    scratch: Vec<u8>,
}

/// Why a request failed: becomes its SSH_FXP_STATUS reply.
#[derive(Debug)]
struct Failure {
    code: StatusCode,
    message: String,
}

impl Failure {
    fn new(code: StatusCode, message: impl Into<String>) -> Self {
        Failure { code, message: message.into() }
    }

    /// `open "notes.txt": No such file or directory`.
    fn io(op: &str, path: &[u8], err: impl Into<io::Error>) -> Self {
        let err = err.into();
        Failure {
            code: status_of(&err),
            message: format!("{op} {:?}: {}", String::from_utf8_lossy(path), reason(&err)),
        }
    }

    /// `rename "a" to "b": File exists`.
    fn io2(op: &str, from: &[u8], to: &[u8], err: impl Into<io::Error>) -> Self {
        let err = err.into();
        let (from, to) = (String::from_utf8_lossy(from), String::from_utf8_lossy(to));
        Failure { code: status_of(&err), message: format!("{op} {from:?} to {to:?}: {}", reason(&err)) }
    }
}

/// OpenSSH's `errno_to_portable`, so clients that act on the code see what they expect.
fn status_of(err: &io::Error) -> StatusCode {
    match err.raw_os_error().map(Errno::from_raw) {
        Some(Errno::ENOENT | Errno::ENOTDIR | Errno::EBADF | Errno::ELOOP) => StatusCode::NoSuchFile,
        Some(Errno::EPERM | Errno::EACCES | Errno::EFAULT) => StatusCode::PermissionDenied,
        Some(Errno::ENAMETOOLONG | Errno::EINVAL) => StatusCode::BadMessage,
        Some(Errno::ENOSYS) => StatusCode::OpUnsupported,
        Some(_) => StatusCode::Failure,
        None => match err.kind() {
            io::ErrorKind::NotFound => StatusCode::NoSuchFile,
            io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
            // A path with a NUL byte in it.
            io::ErrorKind::InvalidInput => StatusCode::BadMessage,
            _ => StatusCode::Failure,
        },
    }
}

/// `strerror` without Rust's " (os error N)" suffix.
fn reason(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(code) => Errno::from_raw(code).desc().to_string(),
        None => err.to_string(),
    }
}

enum Handle {
    File { file: File, name: Vec<u8> },
    Dir { entries: fs::ReadDir, path: PathBuf, name: Vec<u8>, dots_sent: bool },
}

/// Open files and directories by handle. A handle is a 4-byte counter, so a closed handle is not
/// reused until the counter wraps.
#[derive(Default)]
struct Handles {
    open: HashMap<u32, Handle>,
    next: u32,
}

impl Handles {
    fn check_room(&self) -> Result<(), Failure> {
        if self.open.len() >= MAX_HANDLES {
            return Err(Failure::new(
                StatusCode::Failure,
                format!("too many open handles (the limit is {MAX_HANDLES}); close some"),
            ));
        }
        Ok(())
    }

    fn insert(&mut self, h: Handle) -> Result<[u8; 4], Failure> {
        self.check_room()?;
        loop {
            let id = self.next;
            self.next = self.next.wrapping_add(1);
            if let std::collections::hash_map::Entry::Vacant(slot) = self.open.entry(id) {
                slot.insert(h);
                return Ok(id.to_be_bytes());
            }
        }
    }

    fn id(raw: &[u8]) -> Result<u32, Failure> {
        <[u8; 4]>::try_from(raw).map(u32::from_be_bytes).map_err(|_| Self::unknown(raw))
    }

    fn unknown(raw: &[u8]) -> Failure {
        Failure::new(StatusCode::Failure, format!("no open handle {raw:02x?}"))
    }

    fn get(&mut self, raw: &[u8]) -> Result<&mut Handle, Failure> {
        self.open.get_mut(&Self::id(raw)?).ok_or_else(|| Self::unknown(raw))
    }

    fn file(&mut self, raw: &[u8]) -> Result<(&File, &[u8]), Failure> {
        match self.get(raw)? {
            Handle::File { file, name } => Ok((file, name)),
            Handle::Dir { .. } => {
                Err(Failure::new(StatusCode::Failure, "a directory handle where a file handle belongs"))
            }
        }
    }

    fn remove(&mut self, raw: &[u8]) -> Result<Handle, Failure> {
        self.open.remove(&Self::id(raw)?).ok_or_else(|| Self::unknown(raw))
    }
}

fn attrs_of(m: &fs::Metadata) -> Attrs {
    // SFTP v3 times are 32 bits; OpenSSH truncates the same way.
    Attrs {
        size: Some(m.size()),
        owner: Some((m.uid(), m.gid())),
        permissions: Some(m.mode()),
        times: Some((m.atime() as u32, m.mtime() as u32)),
    }
}

fn os(raw: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(raw))
}

fn timespec(secs: u32) -> TimeSpec {
    TimeSpec::new(secs.into(), 0)
}

impl Session {
    pub fn new(home: PathBuf) -> Self {
        Session {
            home,
            handles: Handles::default(),
            owners: Owners::default(),
            initialized: false,
            scratch: vec![0; MAX_READ],
        }
    }

    /// Handles one request (a packet without its length prefix) and appends exactly one reply to
    /// `out`. An error means the client broke the protocol and the session must end.
    pub fn handle(&mut self, packet: &[u8], now: SystemTime, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        let (id, request) = match Request::decode(packet) {
            Ok(decoded) => decoded,
            Err(err) => match err.id {
                Some(id) if self.initialized => {
                    wire::status(out, id, StatusCode::BadMessage, &err.to_string());
                    return Ok(());
                }
                _ => return Err(ProtocolError::Malformed(err)),
            },
        };
        if !self.initialized && !matches!(request, Request::Init { .. }) {
            return Err(ProtocolError::BeforeInit(packet[0]));
        }
        let mark = out.len();
        let result = self.dispatch(id, request, now, out);
        let result = match result {
            Ok(()) if out.len() - mark > MAX_PACKET + 4 => Err(Failure::new(
                StatusCode::Failure,
                format!("the reply is {} bytes, over the limit of {MAX_PACKET}", out.len() - mark - 4),
            )),
            other => other,
        };
        if let Err(failure) = result {
            out.truncate(mark);
            wire::status(out, id, failure.code, &failure.message);
        }
        Ok(())
    }

    fn path(&self, raw: &[u8]) -> PathBuf {
        // An empty path stays empty, so the system call fails with ENOENT as it does for OpenSSH.
        if raw.is_empty() {
            PathBuf::new()
        } else {
            self.home.join(os(raw))
        }
    }

    fn ok(out: &mut Vec<u8>, id: u32) -> Result<(), Failure> {
        wire::status(out, id, StatusCode::Ok, "Success");
        Ok(())
    }

    fn dispatch(&mut self, id: u32, request: Request<'_>, now: SystemTime, out: &mut Vec<u8>) -> Result<(), Failure> {
        match request {
            Request::Init { .. } => {
                self.initialized = true;
                wire::version(out);
                Ok(())
            }
            Request::Open { path, flags, attrs } => self.open(id, path, flags, attrs, out),
            Request::Close { handle } => {
                self.handles.remove(handle)?;
                Self::ok(out, id)
            }
            Request::Read { handle, offset, len } => self.read(id, handle, offset, len, out),
            Request::Write { handle, offset, data } => {
                let (file, name) = self.handles.file(handle)?;
                file.write_all_at(data, offset).map_err(|e| Failure::io("write", name, e))?;
                Self::ok(out, id)
            }
            Request::Lstat { path } => {
                let m = fs::symlink_metadata(self.path(path)).map_err(|e| Failure::io("lstat", path, e))?;
                wire::attrs(out, id, &attrs_of(&m));
                Ok(())
            }
            Request::Stat { path } => {
                let m = fs::metadata(self.path(path)).map_err(|e| Failure::io("stat", path, e))?;
                wire::attrs(out, id, &attrs_of(&m));
                Ok(())
            }
            Request::Fstat { handle } => {
                let m = match self.handles.get(handle)? {
                    Handle::File { file, name } => file.metadata().map_err(|e| Failure::io("fstat", name, e))?,
                    Handle::Dir { path, name, .. } => {
                        fs::symlink_metadata(path).map_err(|e| Failure::io("fstat", name, e))?
                    }
                };
                wire::attrs(out, id, &attrs_of(&m));
                Ok(())
            }
            Request::SetStat { path, attrs } => {
                self.set_attrs(&self.path(path), &attrs, true).map_err(|e| Failure::io("setstat", path, e))?;
                Self::ok(out, id)
            }
            Request::LSetStat { path, attrs } => {
                if attrs.size.is_some() {
                    return Err(Failure::new(StatusCode::BadMessage, "lsetstat cannot set a size"));
                }
                self.set_attrs(&self.path(path), &attrs, false).map_err(|e| Failure::io("lsetstat", path, e))?;
                Self::ok(out, id)
            }
            Request::FSetStat { handle, attrs } => {
                let (file, name) = self.handles.file(handle)?;
                set_file_attrs(file, &attrs).map_err(|e| Failure::io("fsetstat", name, e))?;
                Self::ok(out, id)
            }
            Request::OpenDir { path } => {
                self.handles.check_room()?;
                let full = self.path(path);
                let entries = fs::read_dir(&full).map_err(|e| Failure::io("opendir", path, e))?;
                let h =
                    self.handles.insert(Handle::Dir { entries, path: full, name: path.to_vec(), dots_sent: false })?;
                wire::handle(out, id, &h);
                Ok(())
            }
            Request::ReadDir { handle } => self.readdir(id, handle, now, out),
            Request::Remove { path } => {
                fs::remove_file(self.path(path)).map_err(|e| Failure::io("remove", path, e))?;
                Self::ok(out, id)
            }
            Request::MkDir { path, attrs } => {
                let mode = attrs.permissions.map_or(0o777, |p| p & 0o7777);
                fs::DirBuilder::new().mode(mode).create(self.path(path)).map_err(|e| Failure::io("mkdir", path, e))?;
                Self::ok(out, id)
            }
            Request::RmDir { path } => {
                fs::remove_dir(self.path(path)).map_err(|e| Failure::io("rmdir", path, e))?;
                Self::ok(out, id)
            }
            Request::RealPath { path } => {
                let full = if path.is_empty() { self.home.clone() } else { self.path(path) };
                let real = realpath(&full).map_err(|e| Failure::io("realpath", path, e))?;
                wire::path_name(out, id, real.as_os_str().as_bytes());
                Ok(())
            }
            Request::Rename { from, to } => {
                rename_no_replace(&self.path(from), &self.path(to)).map_err(|e| Failure::io2("rename", from, to, e))?;
                Self::ok(out, id)
            }
            Request::PosixRename { from, to } => {
                fs::rename(self.path(from), self.path(to)).map_err(|e| Failure::io2("rename", from, to, e))?;
                Self::ok(out, id)
            }
            Request::ReadLink { path } => {
                let target = fs::read_link(self.path(path)).map_err(|e| Failure::io("readlink", path, e))?;
                wire::path_name(out, id, target.as_os_str().as_bytes());
                Ok(())
            }
            Request::Symlink { target, link } => {
                // The target is stored as given: a relative link stays relative.
                std::os::unix::fs::symlink(os(target), self.path(link))
                    .map_err(|e| Failure::io2("symlink", link, target, e))?;
                Self::ok(out, id)
            }
            Request::HardLink { target, link } => {
                fs::hard_link(self.path(target), self.path(link)).map_err(|e| Failure::io2("link", link, target, e))?;
                Self::ok(out, id)
            }
            Request::StatVfs { path } => {
                let st = nix::sys::statvfs::statvfs(&self.path(path)).map_err(|e| Failure::io("statvfs", path, e))?;
                statvfs_reply(out, id, &st);
                Ok(())
            }
            Request::FStatVfs { handle } => {
                let (file, name) = self.handles.file(handle)?;
                let st = nix::sys::statvfs::fstatvfs(file).map_err(|e| Failure::io("fstatvfs", name, e))?;
                statvfs_reply(out, id, &st);
                Ok(())
            }
            Request::Fsync { handle } => {
                let (file, name) = self.handles.file(handle)?;
                file.sync_all().map_err(|e| Failure::io("fsync", name, e))?;
                Self::ok(out, id)
            }
            Request::Limits => {
                let max_read = MAX_READ as u64;
                Frame::extended_reply(out, id)
                    .u64(MAX_PACKET as u64)
                    .u64(max_read)
                    .u64(max_read)
                    .u64(MAX_HANDLES as u64);
                Ok(())
            }
            Request::ExpandPath { path } => {
                let full = self.expand(path)?;
                let real = realpath(&full).map_err(|e| Failure::io("expand-path", path, e))?;
                wire::path_name(out, id, real.as_os_str().as_bytes());
                Ok(())
            }
            Request::CopyData { from, from_offset, len, to, to_offset } => {
                self.copy_data(from, from_offset, len, to, to_offset)?;
                Self::ok(out, id)
            }
            Request::HomeDirectory { user } => {
                let home = if user.is_empty() { self.home.clone() } else { home_of(user)? };
                wire::path_name(out, id, home.as_os_str().as_bytes());
                Ok(())
            }
            Request::UsersGroupsById { uids, gids } => self.users_groups_by_id(id, uids, gids, out),
            Request::UnknownExtension { name } => Err(Failure::new(
                StatusCode::OpUnsupported,
                format!("unknown extension {:?}", String::from_utf8_lossy(name)),
            )),
            Request::Unknown { kind } => {
                Err(Failure::new(StatusCode::OpUnsupported, format!("unknown request type {kind}")))
            }
        }
    }

    fn open(&mut self, id: u32, path: &[u8], flags: u32, attrs: Attrs, out: &mut Vec<u8>) -> Result<(), Failure> {
        self.handles.check_room()?;
        let mut oflag = match (flags & wire::FXF_READ != 0, flags & wire::FXF_WRITE != 0) {
            (true, true) => OFlag::O_RDWR,
            (false, true) => OFlag::O_WRONLY,
            _ => OFlag::O_RDONLY,
        };
        for (bit, f) in [
            (wire::FXF_APPEND, OFlag::O_APPEND),
            (wire::FXF_CREAT, OFlag::O_CREAT),
            (wire::FXF_TRUNC, OFlag::O_TRUNC),
            (wire::FXF_EXCL, OFlag::O_EXCL),
        ] {
            if flags & bit != 0 {
                oflag |= f;
            }
        }
        let mode = Mode::from_bits_truncate(attrs.permissions.map_or(0o666, |p| p & 0o7777));
        let fd = nix::fcntl::open(&self.path(path), oflag | OFlag::O_CLOEXEC | OFlag::O_NOCTTY, mode)
            .map_err(|e| Failure::io("open", path, e))?;
        let h = self.handles.insert(Handle::File { file: File::from(fd), name: path.to_vec() })?;
        wire::handle(out, id, &h);
        Ok(())
    }

    fn read(&mut self, id: u32, handle: &[u8], offset: u64, len: u32, out: &mut Vec<u8>) -> Result<(), Failure> {
        // Longer reads are cut short, as OpenSSH does; the client asks again for the rest.
        let len = (len as usize).min(MAX_READ);
        let (file, name) = self.handles.file(handle)?;
        let buf = &mut self.scratch[..len];
        let mut filled = 0;
        while filled < len {
            match file.read_at(&mut buf[filled..], offset.saturating_add(filled as u64)) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) if filled > 0 => break,
                Err(e) => return Err(Failure::io("read", name, e)),
            }
        }
        if filled == 0 {
            wire::status(out, id, StatusCode::Eof, "End of file");
        } else {
            wire::data(out, id, &buf[..filled]);
        }
        Ok(())
    }

    fn readdir(&mut self, id: u32, handle: &[u8], now: SystemTime, out: &mut Vec<u8>) -> Result<(), Failure> {
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let Handle::Dir { entries, path, name, dots_sent } = self.handles.get(handle)? else {
            return Err(Failure::new(StatusCode::Failure, "a file handle where a directory handle belongs"));
        };
        let owners = &mut self.owners;
        let mut entry = |file_name: &[u8], m: &fs::Metadata| Name {
            name: file_name.to_vec(),
            long_name: owners.long_name(file_name, m, now),
            attrs: attrs_of(m),
        };
        let mut names = Vec::new();
        // std's ReadDir skips "." and ".."; OpenSSH lists them and `ls -a` shows them.
        if !*dots_sent {
            *dots_sent = true;
            for (dot, p) in [(&b"."[..], path.clone()), (&b".."[..], path.join(".."))] {
                if let Ok(m) = fs::symlink_metadata(p) {
                    names.push(entry(dot, &m));
                }
            }
        }
        while names.len() < READDIR_BATCH {
            match entries.next() {
                None => break,
                // Gone since the directory was read: skip it, as OpenSSH does.
                Some(Ok(dir_entry)) => {
                    let Ok(m) = dir_entry.metadata() else { continue };
                    names.push(entry(dir_entry.file_name().as_bytes(), &m));
                }
                Some(Err(e)) if names.is_empty() => return Err(Failure::io("readdir", name, e)),
                Some(Err(_)) => break,
            }
        }
        if names.is_empty() {
            wire::status(out, id, StatusCode::Eof, "End of file");
        } else {
            wire::names(out, id, &names);
        }
        Ok(())
    }

    fn set_attrs(&self, path: &Path, a: &Attrs, follow: bool) -> io::Result<()> {
        // The order of OpenSSH's sftp-server: size, permissions, times, owner.
        if let Some(size) = a.size {
            let size = i64::try_from(size).map_err(|_| io::Error::from(Errno::EFBIG))?;
            nix::unistd::truncate(path, size)?;
        }
        if let Some(perm) = a.permissions {
            let flag = if follow { FchmodatFlags::FollowSymlink } else { FchmodatFlags::NoFollowSymlink };
            nix::sys::stat::fchmodat(AT_FDCWD, path, Mode::from_bits_truncate(perm & 0o7777), flag)?;
        }
        if let Some((atime, mtime)) = a.times {
            let flag = if follow { UtimensatFlags::FollowSymlink } else { UtimensatFlags::NoFollowSymlink };
            nix::sys::stat::utimensat(AT_FDCWD, path, &timespec(atime), &timespec(mtime), flag)?;
        }
        if let Some((uid, gid)) = a.owner {
            let flag = if follow { nix::fcntl::AtFlags::empty() } else { nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW };
            nix::unistd::fchownat(AT_FDCWD, path, Some(uid.into()), Some(gid.into()), flag)?;
        }
        Ok(())
    }

    /// OpenSSH's expand-path: `~` and `~/x` are the home, `~user/x` another user's, and a relative
    /// path is relative to the home.
    fn expand(&self, path: &[u8]) -> Result<PathBuf, Failure> {
        let Some(rest) = path.strip_prefix(b"~") else {
            return Ok(self.path(if path.is_empty() { b"." } else { path }));
        };
        let (user, rest) = match rest.iter().position(|&b| b == b'/') {
            Some(slash) => (&rest[..slash], &rest[slash + 1..]),
            None => (rest, &b""[..]),
        };
        let home = if user.is_empty() { self.home.clone() } else { home_of(user)? };
        Ok(home.join(os(rest)))
    }

    fn copy_data(&mut self, from: &[u8], from_offset: u64, len: u64, to: &[u8], to_offset: u64) -> Result<(), Failure> {
        let refuse = |why: &str| Err(Failure::new(StatusCode::Failure, format!("copy-data: {why}")));
        let (src, name) = self.handles.file(from)?;
        let src = src.try_clone().map_err(|e| Failure::io("copy-data", name, e))?;
        let (dst, dst_name) = self.handles.file(to)?;
        let same = match (src.metadata(), dst.metadata()) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            (Err(e), _) | (_, Err(e)) => return Err(Failure::io("copy-data", dst_name, e)),
        };
        if from == to || same {
            return refuse("the source and the destination are the same file");
        }
        let until_eof = len == 0;
        let mut left = if until_eof { u64::MAX - from_offset } else { len };
        let (mut at, mut to_at) = (from_offset, to_offset);
        let buf = &mut self.scratch[..];
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = match src.read_at(&mut buf[..want], at) {
                Ok(0) if until_eof => return Ok(()),
                Ok(0) => return Err(Failure::new(StatusCode::Eof, "copy-data: the source ended early")),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::io("copy-data: read", from, e)),
            };
            dst.write_all_at(&buf[..n], to_at).map_err(|e| Failure::io("copy-data: write", dst_name, e))?;
            (at, to_at, left) = (at + n as u64, to_at + n as u64, left - n as u64);
        }
        Ok(())
    }

    fn users_groups_by_id(&mut self, id: u32, uids: &[u8], gids: &[u8], out: &mut Vec<u8>) -> Result<(), Failure> {
        if uids.len() % 4 != 0 || gids.len() % 4 != 0 {
            return Err(Failure::new(StatusCode::BadMessage, "users-groups-by-id: id lists are not 4-byte ids"));
        }
        let ids = |raw: &[u8]| raw.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect();
        let (uids, gids): (Vec<u32>, Vec<u32>) = (ids(uids), ids(gids));
        // Each list is one string of strings; an unknown id gets an empty name.
        let mut users = Vec::new();
        for uid in uids {
            let name = self.owners.user(uid).unwrap_or("");
            users.extend_from_slice(&(name.len() as u32).to_be_bytes());
            users.extend_from_slice(name.as_bytes());
        }
        let mut groups = Vec::new();
        for gid in gids {
            let name = self.owners.group(gid).unwrap_or("");
            groups.extend_from_slice(&(name.len() as u32).to_be_bytes());
            groups.extend_from_slice(name.as_bytes());
        }
        Frame::extended_reply(out, id).string(&users).string(&groups);
        Ok(())
    }
}

fn set_file_attrs(file: &File, a: &Attrs) -> io::Result<()> {
    if let Some(size) = a.size {
        file.set_len(size)?;
    }
    if let Some(perm) = a.permissions {
        file.set_permissions(fs::Permissions::from_mode(perm & 0o7777))?;
    }
    if let Some((atime, mtime)) = a.times {
        nix::sys::stat::futimens(file, &timespec(atime), &timespec(mtime))?;
    }
    if let Some((uid, gid)) = a.owner {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// The canonical path. Like OpenSSH's, the last component may be missing: clients resolve a name
/// before they create it.
fn realpath(path: &Path) -> io::Result<PathBuf> {
    match fs::canonicalize(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => match (path.parent(), path.file_name()) {
            (Some(parent), Some(name)) => Ok(fs::canonicalize(parent)?.join(name)),
            _ => Err(e),
        },
        other => other,
    }
}

/// SSH_FXP_RENAME must not replace an existing file. `RENAME_NOREPLACE` makes that atomic where the
/// filesystem supports it; elsewhere, check first.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    use nix::fcntl::{renameat2, RenameFlags};
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
            if fs::symlink_metadata(to).is_ok() {
                return Err(Errno::EEXIST.into());
            }
            fs::rename(from, to)
        }
        other => Ok(other?),
    }
}

fn home_of(user: &[u8]) -> Result<PathBuf, Failure> {
    let name = String::from_utf8_lossy(user);
    match std::str::from_utf8(user).ok().map(nix::unistd::User::from_name) {
        Some(Ok(Some(u))) => Ok(u.dir),
        _ => Err(Failure::new(StatusCode::NoSuchFile, format!("no user {name:?}"))),
    }
}

fn statvfs_reply(out: &mut Vec<u8>, id: u32, st: &nix::sys::statvfs::Statvfs) {
    use nix::sys::statvfs::FsFlags;
    // Flag bits of OpenSSH's statvfs extension.
    let flags =
        u64::from(st.flags().contains(FsFlags::ST_RDONLY)) | u64::from(st.flags().contains(FsFlags::ST_NOSUID)) << 1;
    Frame::extended_reply(out, id)
        .u64(st.block_size())
        .u64(st.fragment_size())
        .u64(st.blocks())
        .u64(st.blocks_free())
        .u64(st.blocks_available())
        .u64(st.files())
        .u64(st.files_free())
        .u64(st.files_available())
        .u64(st.filesystem_id())
        .u64(flags)
        .u64(st.name_max());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sftp::wire::client::*;

    struct Harness {
        dir: tempfile::TempDir,
        session: Session,
        next_id: u32,
    }

    impl Harness {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let mut session = Session::new(dir.path().to_path_buf());
            let mut out = Vec::new();
            session.handle(&[1, 0, 0, 0, 3], UNIX_EPOCH, &mut out).unwrap();
            let mut r = replies(&out);
            assert_eq!((r[0].kind, r[0].u32()), (VERSION_REPLY, 3));
            Harness { dir, session, next_id: 1 }
        }

        /// Sends a request built by `build(id)` and returns the one reply's bytes.
        fn call(&mut self, kind: u8, build: impl FnOnce(Req) -> Req) -> Vec<u8> {
            self.next_id += 1;
            let req = build(Req::new(kind, self.next_id));
            let mut out = Vec::new();
            self.session.handle(&req.0, UNIX_EPOCH, &mut out).unwrap();
            let mut r = replies(&out);
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].u32(), self.next_id, "reply id");
            out
        }

        /// The status code and message of a reply that must be a status.
        fn status(&mut self, kind: u8, build: impl FnOnce(Req) -> Req) -> (u32, String) {
            let out = self.call(kind, build);
            let mut r = replies(&out).remove(0);
            assert_eq!(r.kind, STATUS);
            r.u32();
            (r.u32(), String::from_utf8(r.string().to_vec()).unwrap())
        }

        fn handle(&mut self, kind: u8, build: impl FnOnce(Req) -> Req) -> Vec<u8> {
            let out = self.call(kind, build);
            let mut r = replies(&out).remove(0);
            assert_eq!(r.kind, HANDLE);
            r.u32();
            r.string().to_vec()
        }
    }

    #[test]
    fn requests_before_init_and_packets_without_an_id_end_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Session::new(dir.path().to_path_buf());
        let mut out = Vec::new();
        let err = s.handle(&Req::new(STAT, 1).string(b".").0, UNIX_EPOCH, &mut out).unwrap_err();
        assert_eq!(err.to_string(), "request of type 17 before init");
        let mut h = Harness::new();
        let err = h.session.handle(&[STAT, 0, 0], UNIX_EPOCH, &mut out).unwrap_err();
        assert_eq!(err.to_string(), "malformed request: request of type 17 ends before its id");
        assert!(out.is_empty());
    }

    #[test]
    fn malformed_and_unknown_requests_get_a_status_with_their_id() {
        let mut h = Harness::new();
        assert_eq!(h.status(STAT, |r| r.u32(10)), (5, "request 2 of type 17 is truncated".into()));
        assert_eq!(h.status(77, |r| r), (8, "unknown request type 77".into()));
        assert_eq!(
            h.status(EXTENDED, |r| r.string(b"nope@example.com")),
            (8, "unknown extension \"nope@example.com\"".into())
        );
    }

    #[test]
    fn errors_carry_the_right_code_and_say_what_failed() {
        let mut h = Harness::new();
        assert_eq!(
            h.status(OPEN, |r| r.string(b"missing").u32(wire::FXF_READ).attrs(&Attrs::default())),
            (2, "open \"missing\": No such file or directory".into())
        );
        std::fs::write(h.dir.path().join("a"), b"a").unwrap();
        std::fs::write(h.dir.path().join("b"), b"b").unwrap();
        assert_eq!(h.status(RENAME, |r| r.string(b"a").string(b"b")), (4, "rename \"a\" to \"b\": File exists".into()));
        assert_eq!(h.status(READ, |r| r.string(b"xx").u64(0).u32(1)), (4, "no open handle [78, 78]".into()));
        let dir = h.handle(OPENDIR, |r| r.string(b"."));
        assert_eq!(
            h.status(READ, |r| r.string(&dir).u64(0).u32(1)),
            (4, "a directory handle where a file handle belongs".into())
        );
        let nul = h.status(STAT, |r| r.string(b"a\0b"));
        assert_eq!(nul.0, 5, "{nul:?}");
    }

    #[test]
    fn errno_to_status_code_as_openssh() {
        let code = |errno: Errno| status_of(&io::Error::from(errno));
        assert_eq!(code(Errno::ENOENT), StatusCode::NoSuchFile);
        assert_eq!(code(Errno::ENOTDIR), StatusCode::NoSuchFile);
        assert_eq!(code(Errno::EACCES), StatusCode::PermissionDenied);
        assert_eq!(code(Errno::EPERM), StatusCode::PermissionDenied);
        assert_eq!(code(Errno::EINVAL), StatusCode::BadMessage);
        assert_eq!(code(Errno::ENOSYS), StatusCode::OpUnsupported);
        assert_eq!(code(Errno::EEXIST), StatusCode::Failure);
        assert_eq!(code(Errno::ENOSPC), StatusCode::Failure);
        let denied = Failure::io("open", b"secret", Errno::EACCES);
        assert_eq!(denied.message, "open \"secret\": Permission denied");
    }

    #[test]
    fn reads_are_capped_and_end_with_eof() {
        let mut h = Harness::new();
        let content: Vec<u8> = (0..MAX_READ + 10).map(|i| i as u8).collect();
        std::fs::write(h.dir.path().join("f"), &content).unwrap();
        let f = h.handle(OPEN, |r| r.string(b"f").u32(wire::FXF_READ).attrs(&Attrs::default()));
        let out = h.call(READ, |r| r.string(&f).u64(0).u32(u32::MAX));
        let mut r = replies(&out).remove(0);
        assert_eq!((r.kind, r.u32()), (DATA, h.next_id));
        assert_eq!(r.string(), &content[..MAX_READ]);
        let out = h.call(READ, |r| r.string(&f).u64(MAX_READ as u64).u32(100));
        let mut r = replies(&out).remove(0);
        r.u32();
        assert_eq!(r.string(), &content[MAX_READ..]);
        assert_eq!(h.status(READ, |r| r.string(&f).u64(content.len() as u64).u32(100)), (1, "End of file".into()));
        assert_eq!(h.status(CLOSE, |r| r.string(&f)), (0, "Success".into()));
        assert_eq!(h.status(CLOSE, |r| r.string(&f)).0, 4);
    }

    #[test]
    fn open_honours_append_and_exclusive_create() {
        let mut h = Harness::new();
        let create = wire::FXF_WRITE | wire::FXF_CREAT | wire::FXF_EXCL;
        let perm = Attrs { permissions: Some(0o600), ..Attrs::default() };
        let f = h.handle(OPEN, |r| r.string(b"log").u32(create).attrs(&perm));
        assert_eq!(h.status(WRITE, |r| r.string(&f).u64(0).string(b"one\n")).0, 0);
        assert_eq!(h.status(CLOSE, |r| r.string(&f)).0, 0);
        assert_eq!(h.status(OPEN, |r| r.string(b"log").u32(create).attrs(&perm)).0, 4, "O_EXCL");
        let f = h.handle(OPEN, |r| r.string(b"log").u32(wire::FXF_WRITE | wire::FXF_APPEND).attrs(&Attrs::default()));
        assert_eq!(h.status(WRITE, |r| r.string(&f).u64(0).string(b"two\n")).0, 0);
        let log = h.dir.path().join("log");
        assert_eq!(std::fs::read(&log).unwrap(), b"one\ntwo\n");
        assert_eq!(std::fs::metadata(&log).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn handles_are_capped() {
        let mut h = Harness::new();
        let handles: Vec<_> = (0..MAX_HANDLES).map(|_| h.handle(OPENDIR, |r| r.string(b"."))).collect();
        assert_eq!(
            h.status(OPENDIR, |r| r.string(b".")),
            (4, format!("too many open handles (the limit is {MAX_HANDLES}); close some"))
        );
        assert_eq!(h.status(CLOSE, |r| r.string(&handles[7])).0, 0);
        h.handle(OPENDIR, |r| r.string(b"."));
    }

    #[test]
    fn readdir_lists_dots_then_entries_then_eof() {
        let mut h = Harness::new();
        std::fs::write(h.dir.path().join("file"), b"x").unwrap();
        std::fs::create_dir(h.dir.path().join("many")).unwrap();
        for i in 0..150 {
            std::fs::write(h.dir.path().join(format!("many/{i}")), b"").unwrap();
        }
        let d = h.handle(OPENDIR, |r| r.string(b"many"));
        let mut counts = Vec::new();
        loop {
            let out = h.call(READDIR, |r| r.string(&d));
            let mut r = replies(&out).remove(0);
            if r.kind == STATUS {
                break;
            }
            r.u32();
            counts.push(r.u32());
        }
        assert_eq!(counts, [READDIR_BATCH as u32, 52], "batches of 100, dots included");

        let d = h.handle(OPENDIR, |r| r.string(b"."));
        let out = h.call(READDIR, |r| r.string(&d));
        let mut r = replies(&out).remove(0);
        assert_eq!(r.kind, NAME);
        r.u32();
        let mut names = Vec::new();
        for _ in 0..r.u32() {
            let name = r.string().to_vec();
            let long = String::from_utf8(r.string().to_vec()).unwrap();
            assert!(long.ends_with(&format!(" {}", String::from_utf8_lossy(&name))), "{long}");
            r.attrs();
            names.push(name);
        }
        names.sort();
        assert_eq!(names, [&b"."[..], b"..", b"file", b"many"]);
        assert_eq!(h.status(READDIR, |r| r.string(&d)).0, 1);
    }

    #[test]
    fn realpath_readlink_and_setstat() {
        let mut h = Harness::new();
        let home = std::fs::canonicalize(h.dir.path()).unwrap();
        let path_of = |out: Vec<u8>| {
            let mut r = replies(&out).remove(0);
            assert_eq!(r.kind, NAME);
            r.u32();
            assert_eq!(r.u32(), 1);
            PathBuf::from(OsStr::from_bytes(r.string()))
        };
        assert_eq!(path_of(h.call(REALPATH, |r| r.string(b""))), home);
        std::fs::create_dir(h.dir.path().join("sub")).unwrap();
        assert_eq!(path_of(h.call(REALPATH, |r| r.string(b"sub/../."))), home);
        assert_eq!(path_of(h.call(REALPATH, |r| r.string(b"not-yet"))), home.join("not-yet"));
        assert_eq!(h.status(REALPATH, |r| r.string(b"no/such")).0, 2);
        assert_eq!(h.status(REALPATH, |r| r.string(b"no/..")).0, 2);
        std::os::unix::fs::symlink("some/target", h.dir.path().join("link")).unwrap();
        assert_eq!(path_of(h.call(READLINK, |r| r.string(b"link"))), PathBuf::from("some/target"));
        assert_eq!(path_of(h.call(EXTENDED, |r| r.string(b"expand-path@openssh.com").string(b"~/x"))), home.join("x"));

        std::fs::write(h.dir.path().join("f"), b"12345").unwrap();
        let attrs = Attrs { size: Some(2), permissions: Some(0o640), times: Some((100, 200)), owner: None };
        assert_eq!(h.status(SETSTAT, |r| r.string(b"f").attrs(&attrs)).0, 0);
        let out = h.call(STAT, |r| r.string(b"f"));
        let mut r = replies(&out).remove(0);
        r.u32();
        let got = r.attrs();
        assert_eq!((got.size, got.permissions, got.times), (Some(2), Some(0o100640), Some((100, 200))));
    }

    #[test]
    fn limits_and_statvfs_replies() {
        let mut h = Harness::new();
        let out = h.call(EXTENDED, |r| r.string(b"limits@openssh.com"));
        let mut r = replies(&out).remove(0);
        assert_eq!(r.kind, EXTENDED_REPLY);
        r.u32();
        assert_eq!([r.u64(), r.u64(), r.u64(), r.u64()], [MAX_PACKET as u64, MAX_READ as u64, MAX_READ as u64, 1024]);
        let out = h.call(EXTENDED, |r| r.string(b"statvfs@openssh.com").string(b"."));
        let mut r = replies(&out).remove(0);
        assert_eq!(r.kind, EXTENDED_REPLY);
        r.u32();
        let fields: Vec<u64> = (0..11).map(|_| r.u64()).collect();
        assert!(fields[0] > 0 && fields[2] > 0, "{fields:?}");
        assert!(r.is_empty());
    }
}
