//! The `ls -l` style "long name" of directory entries, byte for byte as OpenSSH's sftp-server
//! writes it (stock `sftp`'s `ls -l` prints it verbatim), and the user and group names it shows.

use std::collections::HashMap;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;

/// The fields of a long name that come from `lstat`.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub mode: u32,
    pub nlink: u64,
    pub size: u64,
    pub mtime: i64,
}

impl From<&Metadata> for Entry {
    fn from(m: &Metadata) -> Self {
        Entry { mode: m.mode(), nlink: m.nlink(), size: m.size(), mtime: m.mtime() }
    }
}

/// `-rw-r--r--    1 alice    staff        4096 Nov 23 09:09 notes.txt`: OpenSSH's `ls_file`, with
/// times in UTC (OpenSSH uses the server's local time zone; workspaces normally run in UTC).
pub fn long_name(name: &[u8], e: Entry, user: &str, group: &str, now: i64) -> Vec<u8> {
    // A file from the last six months shows its time of day, an older or future one its year.
    const HALF_YEAR: i64 = 365 * 24 * 60 * 60 / 2;
    let (year, month, day, hour, minute) = civil(e.mtime);
    let month = MONTHS[month as usize - 1];
    let time = if now - HALF_YEAR < e.mtime && now >= e.mtime {
        format!("{month} {day:>2} {hour:02}:{minute:02}")
    } else {
        format!("{month} {day:>2}  {year}")
    };
    let mut line =
        format!("{} {:>3} {user:<8} {group:<8} {:>8} {time} ", mode_string(e.mode), e.nlink, e.size).into_bytes();
    line.extend_from_slice(name);
    line
}

const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/// BSD `strmode`: type letter, nine permission letters (with setuid, setgid and sticky folded
/// in), and a trailing space where an ACL marker would go.
fn mode_string(mode: u32) -> String {
    let kind = match mode & 0o170000 {
        0o040000 => 'd',
        0o120000 => 'l',
        0o100000 => '-',
        0o020000 => 'c',
        0o060000 => 'b',
        0o010000 => 'p',
        0o140000 => 's',
        _ => '?',
    };
    let bit = |mask: u32, c: char| if mode & mask != 0 { c } else { '-' };
    let exec = |x: u32, special: u32, set: char| match (mode & x != 0, mode & special != 0) {
        (true, true) => set,
        (false, true) => set.to_ascii_uppercase(),
        (true, false) => 'x',
        (false, false) => '-',
    };
    [
        kind,
        bit(0o400, 'r'),
        bit(0o200, 'w'),
        exec(0o100, 0o4000, 's'),
        bit(0o040, 'r'),
        bit(0o020, 'w'),
        exec(0o010, 0o2000, 's'),
        bit(0o004, 'r'),
        bit(0o002, 'w'),
        exec(0o001, 0o1000, 't'),
        ' ',
    ]
    .iter()
    .collect()
}

/// Seconds since the epoch to UTC `(year, month, day, hour, minute)` (Howard Hinnant's
/// `civil_from_days`).
fn civil(t: i64) -> (i64, u32, u32, u32, u32) {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, (secs / 3600) as u32, (secs % 3600 / 60) as u32)
}

/// User and group names by id, looked up once each (`getpwuid` may read a file every call).
#[derive(Default)]
pub struct Owners {
    users: HashMap<u32, Option<String>>,
    groups: HashMap<u32, Option<String>>,
}

/// Ids come from the files on disk and from clients; the cache starts over past this many.
const MAX_CACHED: usize = 4096;

impl Owners {
    pub fn user(&mut self, uid: u32) -> Option<&str> {
        if self.users.len() >= MAX_CACHED {
            self.users.clear();
        }
        self.users
            .entry(uid)
            .or_insert_with(|| nix::unistd::User::from_uid(uid.into()).ok().flatten().map(|u| u.name))
            .as_deref()
    }

    pub fn group(&mut self, gid: u32) -> Option<&str> {
        if self.groups.len() >= MAX_CACHED {
            self.groups.clear();
        }
        self.groups
            .entry(gid)
            .or_insert_with(|| nix::unistd::Group::from_gid(gid.into()).ok().flatten().map(|g| g.name))
            .as_deref()
    }

    /// The long name of an entry, with names for its owner and group, or their numbers.
    pub fn long_name(&mut self, name: &[u8], m: &Metadata, now: i64) -> Vec<u8> {
        let user = self.user(m.uid()).map_or_else(|| m.uid().to_string(), str::to_string);
        let group = self.group(m.gid()).map_or_else(|| m.gid().to_string(), str::to_string);
        long_name(name, m.into(), &user, &group, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(mode: u32, nlink: u64, size: u64, mtime: i64, now: i64, expected: &str) {
        let line = long_name(b"f", Entry { mode, nlink, size, mtime }, "alice", "staff", now);
        assert_eq!(String::from_utf8(line).unwrap(), expected);
    }

    #[test]
    fn long_names_look_like_openssh() {
        let now = 1_795_424_997; // 2026-11-23 09:09:57 UTC
        check(0o100644, 1, 5, now - 60, now, "-rw-r--r--    1 alice    staff           5 Nov 23 09:08 f");
        // Older than half a year, and in the future: the year instead of the time.
        check(0o040755, 12, 4096, 1_577_836_800, now, "drwxr-xr-x   12 alice    staff        4096 Jan  1  2020 f");
        check(0o120777, 1, 3, now + 3600, now, "lrwxrwxrwx    1 alice    staff           3 Nov 23  2026 f");
        check(0o104755, 1, 0, 0, now, "-rwsr-xr-x    1 alice    staff           0 Jan  1  1970 f");
        check(0o042700, 1, 0, 0, now, "drwx--S---    1 alice    staff           0 Jan  1  1970 f");
        check(0o041777, 1, 0, 0, now, "drwxrwxrwt    1 alice    staff           0 Jan  1  1970 f");
        check(0o041776, 1, 0, 0, now, "drwxrwxrwT    1 alice    staff           0 Jan  1  1970 f");
        check(0o010600, 1, 0, 0, now, "prw-------    1 alice    staff           0 Jan  1  1970 f");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1, 0, 0));
        assert_eq!(civil(951_782_400), (2000, 2, 29, 0, 0));
        assert_eq!(civil(1_795_424_997), (2026, 11, 23, 9, 9));
        assert_eq!(civil(-1), (1969, 12, 31, 23, 59));
    }
}
