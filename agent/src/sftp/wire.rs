//! SFTP version 3 on the wire (draft-ietf-secsh-filexfer-02 as OpenSSH speaks it, with OpenSSH's
//! extensions): bounds-checked request decoding and reply encoding, no I/O.
//!
//! Paths and handles stay byte strings: Unix file names need not be UTF-8.

use std::fmt;

/// The only protocol version served; OpenSSH's client and server speak nothing else.
pub const VERSION: u32 = 3;

pub const FXP_INIT: u8 = 1;
const FXP_VERSION: u8 = 2;
const FXP_OPEN: u8 = 3;
const FXP_CLOSE: u8 = 4;
const FXP_READ: u8 = 5;
const FXP_WRITE: u8 = 6;
const FXP_LSTAT: u8 = 7;
const FXP_FSTAT: u8 = 8;
const FXP_SETSTAT: u8 = 9;
const FXP_FSETSTAT: u8 = 10;
const FXP_OPENDIR: u8 = 11;
const FXP_READDIR: u8 = 12;
const FXP_REMOVE: u8 = 13;
const FXP_MKDIR: u8 = 14;
const FXP_RMDIR: u8 = 15;
const FXP_REALPATH: u8 = 16;
const FXP_STAT: u8 = 17;
const FXP_RENAME: u8 = 18;
const FXP_READLINK: u8 = 19;
const FXP_SYMLINK: u8 = 20;
const FXP_STATUS: u8 = 101;
const FXP_HANDLE: u8 = 102;
const FXP_DATA: u8 = 103;
const FXP_NAME: u8 = 104;
const FXP_ATTRS: u8 = 105;
const FXP_EXTENDED: u8 = 200;
const FXP_EXTENDED_REPLY: u8 = 201;

/// Open flags (`pflags` of SSH_FXP_OPEN).
pub const FXF_READ: u32 = 0x01;
pub const FXF_WRITE: u32 = 0x02;
pub const FXF_APPEND: u32 = 0x04;
pub const FXF_CREAT: u32 = 0x08;
pub const FXF_TRUNC: u32 = 0x10;
pub const FXF_EXCL: u32 = 0x20;

const ATTR_SIZE: u32 = 0x01;
const ATTR_UIDGID: u32 = 0x02;
const ATTR_PERMISSIONS: u32 = 0x04;
const ATTR_ACMODTIME: u32 = 0x08;
const ATTR_EXTENDED: u32 = 0x8000_0000;

/// Extensions announced in the version reply, with their versions, as OpenSSH's sftp-server does.
pub const EXTENSIONS: &[(&str, &str)] = &[
    ("posix-rename@openssh.com", "1"),
    ("statvfs@openssh.com", "2"),
    ("fstatvfs@openssh.com", "2"),
    ("hardlink@openssh.com", "1"),
    ("fsync@openssh.com", "1"),
    ("lsetstat@openssh.com", "1"),
    ("limits@openssh.com", "1"),
    ("expand-path@openssh.com", "1"),
    ("copy-data", "1"),
    ("home-directory", "1"),
    ("users-groups-by-id@openssh.com", "1"),
];

/// SSH_FX_* status codes a server may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusCode {
    Ok = 0,
    Eof = 1,
    NoSuchFile = 2,
    PermissionDenied = 3,
    Failure = 4,
    BadMessage = 5,
    OpUnsupported = 8,
}

/// File attributes; a field is on the wire only when it is `Some`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Attrs {
    pub size: Option<u64>,
    /// `(uid, gid)`.
    pub owner: Option<(u32, u32)>,
    /// The whole `st_mode`, file type bits included.
    pub permissions: Option<u32>,
    /// `(atime, mtime)` in seconds since the epoch.
    pub times: Option<(u32, u32)>,
}

/// One decoded request. Borrows its strings from the packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Request<'a> {
    Init {
        version: u32,
    },
    Open {
        path: &'a [u8],
        flags: u32,
        attrs: Attrs,
    },
    Close {
        handle: &'a [u8],
    },
    Read {
        handle: &'a [u8],
        offset: u64,
        len: u32,
    },
    Write {
        handle: &'a [u8],
        offset: u64,
        data: &'a [u8],
    },
    Lstat {
        path: &'a [u8],
    },
    Fstat {
        handle: &'a [u8],
    },
    SetStat {
        path: &'a [u8],
        attrs: Attrs,
    },
    FSetStat {
        handle: &'a [u8],
        attrs: Attrs,
    },
    OpenDir {
        path: &'a [u8],
    },
    ReadDir {
        handle: &'a [u8],
    },
    Remove {
        path: &'a [u8],
    },
    MkDir {
        path: &'a [u8],
        attrs: Attrs,
    },
    RmDir {
        path: &'a [u8],
    },
    RealPath {
        path: &'a [u8],
    },
    Stat {
        path: &'a [u8],
    },
    /// Fails when `to` exists (SFTP v3 semantics); `PosixRename` replaces it.
    Rename {
        from: &'a [u8],
        to: &'a [u8],
    },
    ReadLink {
        path: &'a [u8],
    },
    /// In OpenSSH's order, which every client follows: the target first, then the new link.
    Symlink {
        target: &'a [u8],
        link: &'a [u8],
    },
    PosixRename {
        from: &'a [u8],
        to: &'a [u8],
    },
    StatVfs {
        path: &'a [u8],
    },
    FStatVfs {
        handle: &'a [u8],
    },
    HardLink {
        target: &'a [u8],
        link: &'a [u8],
    },
    Fsync {
        handle: &'a [u8],
    },
    LSetStat {
        path: &'a [u8],
        attrs: Attrs,
    },
    Limits,
    ExpandPath {
        path: &'a [u8],
    },
    /// `len` 0 copies to the end of the source.
    CopyData {
        from: &'a [u8],
        from_offset: u64,
        len: u64,
        to: &'a [u8],
        to_offset: u64,
    },
    HomeDirectory {
        user: &'a [u8],
    },
    /// Packed big-endian ids.
    UsersGroupsById {
        uids: &'a [u8],
        gids: &'a [u8],
    },
    UnknownExtension {
        name: &'a [u8],
    },
    Unknown {
        kind: u8,
    },
}

/// A packet that ends early. `id` is known when the packet got that far, so the request can be
/// answered with SSH_FX_BAD_MESSAGE instead of ending the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError {
    pub kind: Option<u8>,
    pub id: Option<u32>,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, self.id) {
            (None, _) => write!(f, "empty request"),
            (Some(kind), None) => write!(f, "request of type {kind} ends before its id"),
            (Some(kind), Some(id)) => write!(f, "request {id} of type {kind} is truncated"),
        }
    }
}

/// The request was shorter than its fields say.
struct Truncated;

impl<'a> Request<'a> {
    /// Decodes one packet without its length prefix. Returns the request id with the request; INIT
    /// has no id and gets 0. Bytes after the last field are ignored, as OpenSSH does.
    pub fn decode(packet: &'a [u8]) -> Result<(u32, Request<'a>), DecodeError> {
        let mut r = Reader(packet);
        let kind = r.u8().map_err(|_| DecodeError { kind: None, id: None })?;
        let id = r.u32().map_err(|_| DecodeError { kind: Some(kind), id: None })?;
        if kind == FXP_INIT {
            return Ok((0, Request::Init { version: id }));
        }
        let request = decode_body(kind, &mut r).map_err(|_| DecodeError { kind: Some(kind), id: Some(id) })?;
        Ok((id, request))
    }
}

fn decode_body<'a>(kind: u8, r: &mut Reader<'a>) -> Result<Request<'a>, Truncated> {
    Ok(match kind {
        FXP_OPEN => Request::Open { path: r.string()?, flags: r.u32()?, attrs: r.attrs()? },
        FXP_CLOSE => Request::Close { handle: r.string()? },
        FXP_READ => Request::Read { handle: r.string()?, offset: r.u64()?, len: r.u32()? },
        FXP_WRITE => Request::Write { handle: r.string()?, offset: r.u64()?, data: r.string()? },
        FXP_LSTAT => Request::Lstat { path: r.string()? },
        FXP_FSTAT => Request::Fstat { handle: r.string()? },
        FXP_SETSTAT => Request::SetStat { path: r.string()?, attrs: r.attrs()? },
        FXP_FSETSTAT => Request::FSetStat { handle: r.string()?, attrs: r.attrs()? },
        FXP_OPENDIR => Request::OpenDir { path: r.string()? },
        FXP_READDIR => Request::ReadDir { handle: r.string()? },
        FXP_REMOVE => Request::Remove { path: r.string()? },
        FXP_MKDIR => Request::MkDir { path: r.string()?, attrs: r.attrs()? },
        FXP_RMDIR => Request::RmDir { path: r.string()? },
        FXP_REALPATH => Request::RealPath { path: r.string()? },
        FXP_STAT => Request::Stat { path: r.string()? },
        FXP_RENAME => Request::Rename { from: r.string()?, to: r.string()? },
        FXP_READLINK => Request::ReadLink { path: r.string()? },
        FXP_SYMLINK => Request::Symlink { target: r.string()?, link: r.string()? },
        FXP_EXTENDED => match r.string()? {
            b"posix-rename@openssh.com" => Request::PosixRename { from: r.string()?, to: r.string()? },
            b"statvfs@openssh.com" => Request::StatVfs { path: r.string()? },
            b"fstatvfs@openssh.com" => Request::FStatVfs { handle: r.string()? },
            b"hardlink@openssh.com" => Request::HardLink { target: r.string()?, link: r.string()? },
            b"fsync@openssh.com" => Request::Fsync { handle: r.string()? },
            b"lsetstat@openssh.com" => Request::LSetStat { path: r.string()?, attrs: r.attrs()? },
            b"limits@openssh.com" => Request::Limits,
            b"expand-path@openssh.com" => Request::ExpandPath { path: r.string()? },
            b"copy-data" => Request::CopyData {
                from: r.string()?,
                from_offset: r.u64()?,
                len: r.u64()?,
                to: r.string()?,
                to_offset: r.u64()?,
            },
            b"home-directory" => Request::HomeDirectory { user: r.string()? },
            b"users-groups-by-id@openssh.com" => Request::UsersGroupsById { uids: r.string()?, gids: r.string()? },
            name => Request::UnknownExtension { name },
        },
        kind => Request::Unknown { kind },
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(Truncated)?;
        self.0 = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, Truncated> {
        Ok(self.take::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, Truncated> {
        self.take().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, Truncated> {
        self.take().map(u64::from_be_bytes)
    }

    fn string(&mut self) -> Result<&'a [u8], Truncated> {
        let len = self.u32()? as usize;
        if self.0.len() < len {
            return Err(Truncated);
        }
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(s)
    }

    fn attrs(&mut self) -> Result<Attrs, Truncated> {
        let flags = self.u32()?;
        let mut a = Attrs::default();
        if flags & ATTR_SIZE != 0 {
            a.size = Some(self.u64()?);
        }
        if flags & ATTR_UIDGID != 0 {
            a.owner = Some((self.u32()?, self.u32()?));
        }
        if flags & ATTR_PERMISSIONS != 0 {
            a.permissions = Some(self.u32()?);
        }
        if flags & ATTR_ACMODTIME != 0 {
            a.times = Some((self.u32()?, self.u32()?));
        }
        if flags & ATTR_EXTENDED != 0 {
            // Extended attributes are read and dropped. Each pair takes at least 8 bytes, so a huge
            // count runs out of packet quickly.
            let count = self.u32()?;
            for _ in 0..count {
                self.string()?;
                self.string()?;
            }
        }
        Ok(a)
    }
}

/// One reply being appended to an output buffer; its length prefix is filled in on drop.
pub struct Frame<'o> {
    out: &'o mut Vec<u8>,
    start: usize,
}

impl<'o> Frame<'o> {
    fn new(out: &'o mut Vec<u8>, kind: u8) -> Self {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        out.push(kind);
        Frame { out, start }
    }

    /// Starts an SSH_FXP_EXTENDED_REPLY; the caller appends the extension's fields.
    pub fn extended_reply(out: &'o mut Vec<u8>, id: u32) -> Self {
        let mut f = Frame::new(out, FXP_EXTENDED_REPLY);
        f.u32(id);
        f
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn string(&mut self, s: &[u8]) -> &mut Self {
        // Replies are capped far below 4 GiB before they are sent (see `Session::handle`).
        self.u32(s.len() as u32);
        self.out.extend_from_slice(s);
        self
    }

    pub fn attrs(&mut self, a: &Attrs) -> &mut Self {
        let flags = a.size.map_or(0, |_| ATTR_SIZE)
            | a.owner.map_or(0, |_| ATTR_UIDGID)
            | a.permissions.map_or(0, |_| ATTR_PERMISSIONS)
            | a.times.map_or(0, |_| ATTR_ACMODTIME);
        self.u32(flags);
        if let Some(size) = a.size {
            self.u64(size);
        }
        if let Some((uid, gid)) = a.owner {
            self.u32(uid).u32(gid);
        }
        if let Some(perm) = a.permissions {
            self.u32(perm);
        }
        if let Some((atime, mtime)) = a.times {
            self.u32(atime).u32(mtime);
        }
        self
    }
}

impl Drop for Frame<'_> {
    fn drop(&mut self) {
        let len = (self.out.len() - self.start - 4) as u32;
        self.out[self.start..self.start + 4].copy_from_slice(&len.to_be_bytes());
    }
}

/// SSH_FXP_VERSION with [`EXTENSIONS`].
pub fn version(out: &mut Vec<u8>) {
    let mut f = Frame::new(out, FXP_VERSION);
    f.u32(VERSION);
    for (name, version) in EXTENSIONS {
        f.string(name.as_bytes()).string(version.as_bytes());
    }
}

/// Longest status message sent; messages quote paths and handles, which clients choose.
pub const MAX_MESSAGE: usize = 1024;

pub fn status(out: &mut Vec<u8>, id: u32, code: StatusCode, message: &str) {
    let mut end = message.len().min(MAX_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    Frame::new(out, FXP_STATUS).u32(id).u32(code as u32).string(&message.as_bytes()[..end]).string(b"");
}

pub fn handle(out: &mut Vec<u8>, id: u32, handle: &[u8]) {
    Frame::new(out, FXP_HANDLE).u32(id).string(handle);
}

pub fn data(out: &mut Vec<u8>, id: u32, data: &[u8]) {
    Frame::new(out, FXP_DATA).u32(id).string(data);
}

pub fn attrs(out: &mut Vec<u8>, id: u32, attrs: &Attrs) {
    Frame::new(out, FXP_ATTRS).u32(id).attrs(attrs);
}

/// One entry of an SSH_FXP_NAME reply.
pub struct Name {
    pub name: Vec<u8>,
    pub long_name: Vec<u8>,
    pub attrs: Attrs,
}

pub fn names(out: &mut Vec<u8>, id: u32, names: &[Name]) {
    let mut f = Frame::new(out, FXP_NAME);
    f.u32(id).u32(names.len() as u32);
    for n in names {
        f.string(&n.name).string(&n.long_name).attrs(&n.attrs);
    }
}

/// An SSH_FXP_NAME with one path and no attributes, the answer to realpath and its relatives.
pub fn path_name(out: &mut Vec<u8>, id: u32, path: &[u8]) {
    Frame::new(out, FXP_NAME).u32(id).u32(1).string(path).string(path).attrs(&Attrs::default());
}

/// Test-side helpers: a client's encoder and a reply decoder.
#[cfg(test)]
pub mod client {
    use super::*;

    pub const OPEN: u8 = FXP_OPEN;
    pub const CLOSE: u8 = FXP_CLOSE;
    pub const READ: u8 = FXP_READ;
    pub const WRITE: u8 = FXP_WRITE;
    pub const OPENDIR: u8 = FXP_OPENDIR;
    pub const READDIR: u8 = FXP_READDIR;
    pub const READLINK: u8 = FXP_READLINK;
    pub const REALPATH: u8 = FXP_REALPATH;
    pub const SETSTAT: u8 = FXP_SETSTAT;
    pub const STAT: u8 = FXP_STAT;
    pub const RENAME: u8 = FXP_RENAME;
    pub const EXTENDED: u8 = FXP_EXTENDED;
    pub const STATUS: u8 = FXP_STATUS;
    pub const HANDLE: u8 = FXP_HANDLE;
    pub const DATA: u8 = FXP_DATA;
    pub const NAME: u8 = FXP_NAME;
    pub const ATTRS: u8 = FXP_ATTRS;
    pub const VERSION_REPLY: u8 = FXP_VERSION;
    pub const EXTENDED_REPLY: u8 = FXP_EXTENDED_REPLY;

    /// Builds a request body (no length prefix): type, id, then fields.
    pub struct Req(pub Vec<u8>);

    impl Req {
        pub fn new(kind: u8, id: u32) -> Self {
            let mut v = vec![kind];
            v.extend_from_slice(&id.to_be_bytes());
            Req(v)
        }
        pub fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn string(mut self, s: &[u8]) -> Self {
            self = self.u32(s.len() as u32);
            self.0.extend_from_slice(s);
            self
        }
        pub fn attrs(mut self, a: &Attrs) -> Self {
            let mut out = Vec::new();
            {
                let mut f = Frame::new(&mut out, 0);
                f.attrs(a);
            }
            self.0.extend_from_slice(&out[5..]);
            self
        }
    }

    /// A decoded reply: its type, then the body after the type byte.
    pub struct Reply<'a> {
        pub kind: u8,
        r: Reader<'a>,
    }

    /// Splits a buffer of replies into their bodies.
    pub fn replies(mut out: &[u8]) -> Vec<Reply<'_>> {
        let mut v = Vec::new();
        while !out.is_empty() {
            let len = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
            let body = &out[4..4 + len];
            v.push(Reply { kind: body[0], r: Reader(&body[1..]) });
            out = &out[4 + len..];
        }
        v
    }

    impl<'a> Reply<'a> {
        pub fn u32(&mut self) -> u32 {
            self.r.u32().ok().expect("u32 in reply")
        }
        pub fn u64(&mut self) -> u64 {
            self.r.u64().ok().expect("u64 in reply")
        }
        pub fn string(&mut self) -> &'a [u8] {
            self.r.string().ok().expect("string in reply")
        }
        pub fn attrs(&mut self) -> Attrs {
            self.r.attrs().ok().expect("attrs in reply")
        }
        pub fn is_empty(&self) -> bool {
            self.r.0.is_empty()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::client::*;
    use super::*;
    use rand::{Rng, SeedableRng};

    fn samples() -> Vec<Vec<u8>> {
        let attrs = Attrs { size: Some(7), owner: Some((1, 2)), permissions: Some(0o100644), times: Some((3, 4)) };
        vec![
            Req::new(OPEN, 1).string(b"a").u32(FXF_READ).attrs(&attrs).0,
            Req::new(WRITE, 2).string(b"h").u64(9).string(b"data").0,
            Req::new(READ, 3).string(b"h").u64(9).u32(100).0,
            Req::new(EXTENDED, 4).string(b"copy-data").string(b"h").u64(0).u64(0).string(b"g").u64(0).0,
            Req::new(EXTENDED, 5).string(b"lsetstat@openssh.com").string(b"p").attrs(&attrs).0,
            Req::new(RENAME, 6).string(b"from").string(b"to").0,
        ]
    }

    #[test]
    fn requests_decode_with_their_fields() {
        let attrs = Attrs { size: Some(7), owner: Some((1, 2)), permissions: Some(0o100644), times: Some((3, 4)) };
        let p = samples();
        assert_eq!(Request::decode(&p[0]), Ok((1, Request::Open { path: b"a", flags: FXF_READ, attrs })));
        assert_eq!(Request::decode(&p[1]), Ok((2, Request::Write { handle: b"h", offset: 9, data: b"data" })));
        assert_eq!(
            Request::decode(&p[3]),
            Ok((4, Request::CopyData { from: b"h", from_offset: 0, len: 0, to: b"g", to_offset: 0 }))
        );
        assert_eq!(Request::decode(&p[4]), Ok((5, Request::LSetStat { path: b"p", attrs })));
        assert_eq!(Request::decode(&[FXP_INIT, 0, 0, 0, 3]), Ok((0, Request::Init { version: 3 })));
        assert_eq!(Request::decode(&Req::new(99, 8).0), Ok((8, Request::Unknown { kind: 99 })));
    }

    #[test]
    fn every_truncation_is_an_error_that_keeps_the_id_when_it_got_that_far() {
        for packet in samples() {
            let id = u32::from_be_bytes(packet[1..5].try_into().unwrap());
            for cut in 0..packet.len() {
                let err = Request::decode(&packet[..cut]).unwrap_err();
                assert_eq!(err.id, (cut >= 5).then_some(id), "cut at {cut} of {packet:?}");
            }
        }
    }

    #[test]
    fn random_and_mutated_packets_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let samples = samples();
        for i in 0..20_000 {
            let mut packet = if i % 2 == 0 {
                samples[i % samples.len()].clone()
            } else {
                (0..rng.random_range(0..64)).map(|_| rng.random()).collect()
            };
            for _ in 0..rng.random_range(0..4) {
                if !packet.is_empty() {
                    let at = rng.random_range(0..packet.len());
                    packet[at] = rng.random();
                }
            }
            let _ = Request::decode(&packet);
        }
        // A huge extended-attribute count in a short packet.
        let mut p = Req::new(OPEN, 1).string(b"a").u32(0).0;
        p.extend_from_slice(&ATTR_EXTENDED.to_be_bytes());
        p.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(Request::decode(&p).unwrap_err().id, Some(1));
    }

    #[test]
    fn attrs_round_trip_and_frames_get_their_length() {
        let a = Attrs { size: Some(1 << 40), owner: None, permissions: Some(0o40755), times: Some((5, 6)) };
        let mut out = Vec::new();
        attrs(&mut out, 9, &a);
        status(&mut out, 10, StatusCode::NoSuchFile, "gone");
        let mut r = replies(&out);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].kind, r[0].u32(), r[0].attrs()), (ATTRS, 9, a));
        assert!(r[0].is_empty());
        assert_eq!(
            (r[1].kind, r[1].u32(), r[1].u32(), r[1].string(), r[1].string()),
            (STATUS, 10, 2, &b"gone"[..], &b""[..])
        );

        let mut out = Vec::new();
        status(&mut out, 1, StatusCode::Failure, &"é".repeat(MAX_MESSAGE));
        let mut r = replies(&out).remove(0);
        r.u32();
        r.u32();
        assert_eq!(r.string(), "é".repeat(MAX_MESSAGE / 2).as_bytes(), "cut at a character boundary");
    }
}
