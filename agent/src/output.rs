//! Turning a script's raw output into log lines: split on newlines, cut overlong lines, and cap what
//! is kept per script run so a chatty script costs bounded memory. No I/O here.

use tether_shared::limits;
use tether_shared::proto::LogStream;

/// Appended to a line cut at [`limits::MAX_LOG_LINE`].
pub const LINE_CUT_MARKER: &str = " [line truncated]";

/// Splits a byte stream into lines of at most `max` bytes (plus the cut marker). Holds at most `max`
/// bytes however long a line gets.
#[derive(Debug)]
pub struct LineCutter {
    buf: Vec<u8>,
    cut: bool,
    max: usize,
}

impl LineCutter {
    pub fn new(max: usize) -> Self {
        LineCutter { buf: Vec::new(), cut: false, max }
    }

    /// Feeds bytes; `emit` gets every line completed by them.
    pub fn feed(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(String)) {
        while let Some(i) = bytes.iter().position(|&b| b == b'\n') {
            self.take(&bytes[..i]);
            emit(self.end_line());
            bytes = &bytes[i + 1..];
        }
        self.take(bytes);
    }

    /// End of stream: emits a last line that had no newline.
    pub fn finish(&mut self, emit: &mut impl FnMut(String)) {
        if !self.buf.is_empty() || self.cut {
            emit(self.end_line());
        }
    }

    fn take(&mut self, part: &[u8]) {
        let room = self.max.saturating_sub(self.buf.len());
        if part.len() > room {
            self.buf.extend_from_slice(&part[..room]);
            self.cut = true;
        } else {
            self.buf.extend_from_slice(part);
        }
    }

    fn end_line(&mut self) -> String {
        let mut cut = std::mem::take(&mut self.cut);
        let mut raw: &[u8] = &self.buf;
        if cut {
            // Do not end a cut line on half a character.
            if let Err(e) = std::str::from_utf8(raw) {
                if e.error_len().is_none() {
                    raw = &raw[..e.valid_up_to()];
                }
            }
        } else if let Some(stripped) = raw.strip_suffix(b"\r") {
            raw = stripped;
        }
        let mut line = String::from_utf8_lossy(raw).into_owned();
        self.buf.clear();
        // Replacement characters can make the text longer than the bytes were.
        if line.len() > self.max {
            let mut end = self.max;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
            cut = true;
        }
        if cut {
            line.push_str(LINE_CUT_MARKER);
        }
        line
    }
}

/// One script run's output on both streams, with the per-run cap on kept bytes.
#[derive(Debug)]
pub struct ScriptOutput {
    stdout: LineCutter,
    stderr: LineCutter,
    kept: u64,
    cap: u64,
    exhausted: bool,
}

impl Default for ScriptOutput {
    fn default() -> Self {
        Self::new(limits::MAX_LOG_LINE, limits::MAX_SCRIPT_OUTPUT)
    }
}

impl ScriptOutput {
    pub fn new(max_line: usize, cap: u64) -> Self {
        ScriptOutput {
            stdout: LineCutter::new(max_line),
            stderr: LineCutter::new(max_line),
            kept: 0,
            cap,
            exhausted: false,
        }
    }

    /// Feeds raw bytes read from `stream`; `emit` gets the lines to keep, and once the cap is reached
    /// one marker line. Everything after the marker is discarded without being looked at.
    pub fn feed(&mut self, stream: LogStream, bytes: &[u8], emit: &mut impl FnMut(LogStream, String)) {
        if self.exhausted {
            return;
        }
        let ScriptOutput { stdout, stderr, kept, cap, exhausted } = self;
        let cutter = match stream {
            LogStream::Stdout => stdout,
            LogStream::Stderr => stderr,
        };
        cutter.feed(bytes, &mut |line| admit(kept, *cap, exhausted, stream, line, emit));
    }

    /// The stream reached its end.
    pub fn finish(&mut self, stream: LogStream, emit: &mut impl FnMut(LogStream, String)) {
        if self.exhausted {
            return;
        }
        let ScriptOutput { stdout, stderr, kept, cap, exhausted } = self;
        let cutter = match stream {
            LogStream::Stdout => stdout,
            LogStream::Stderr => stderr,
        };
        cutter.finish(&mut |line| admit(kept, *cap, exhausted, stream, line, emit));
    }

    /// Bytes of kept lines so far, a newline counted per line.
    pub fn kept(&self) -> u64 {
        self.kept
    }

    pub fn is_exhausted(&self) -> bool {
        self.exhausted
    }
}

fn admit(
    kept: &mut u64,
    cap: u64,
    exhausted: &mut bool,
    stream: LogStream,
    line: String,
    emit: &mut impl FnMut(LogStream, String),
) {
    if *exhausted {
        return;
    }
    let cost = line.len() as u64 + 1;
    if *kept + cost <= cap {
        *kept += cost;
        emit(stream, line);
    } else {
        *exhausted = true;
        emit(stream, truncation_marker(cap));
    }
}

/// The one line that replaces everything past the cap.
pub fn truncation_marker(cap: u64) -> String {
    format!("[output truncated: script printed more than {}; the rest is discarded]", human_bytes(cap))
}

fn human_bytes(n: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    const KIB: u64 = 1024;
    if n >= MIB && n % MIB == 0 {
        format!("{} MiB", n / MIB)
    } else if n >= KIB && n % KIB == 0 {
        format!("{} KiB", n / KIB)
    } else {
        format!("{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(max: usize, chunks: &[&[u8]]) -> Vec<String> {
        let mut c = LineCutter::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            c.feed(chunk, &mut |l| out.push(l));
        }
        c.finish(&mut |l| out.push(l));
        out
    }

    #[test]
    fn splits_lines_across_chunks() {
        assert_eq!(lines(100, &[b"one\ntw", b"o\n", b"\nthree"]), vec!["one", "two", "", "three"]);
        assert_eq!(lines(100, &[b"crlf\r\n"]), vec!["crlf"]);
        assert_eq!(lines(100, &[b""]), Vec::<String>::new());
        assert_eq!(lines(100, &[b"end\n"]), vec!["end"]);
    }

    #[test]
    fn cuts_long_lines_with_a_marker() {
        let out = lines(8, &[b"0123456789abc", b"def\nshort\n"]);
        assert_eq!(out, vec![format!("01234567{LINE_CUT_MARKER}"), "short".to_string()]);
        let out = lines(4, &[b"abcd\nabcde"]);
        assert_eq!(out, vec!["abcd".to_string(), format!("abcd{LINE_CUT_MARKER}")]);
    }

    #[test]
    fn cut_never_splits_a_character_and_invalid_bytes_stay_in_bounds() {
        // "é" is two bytes; the cut falls in its middle.
        let out = lines(4, &["abcé".as_bytes(), b"\n"]);
        assert_eq!(out, vec![format!("abc{LINE_CUT_MARKER}")]);
        // Four invalid bytes become four 3-byte replacement characters: cut back to the limit.
        let out = lines(4, &[&[0xff, 0xff, 0xff, 0xff, b'\n']]);
        assert_eq!(out, vec![format!("\u{fffd}{LINE_CUT_MARKER}")]);
    }

    #[test]
    fn real_limit_line_fits_the_protocol_check() {
        let long = vec![b'x'; limits::MAX_LOG_LINE * 3];
        let out = lines(limits::MAX_LOG_LINE, &[&long, b"\n"]);
        assert_eq!(out.len(), 1);
        assert!(out[0].len() <= limits::MAX_LOG_LINE + 64);
        assert!(out[0].ends_with(LINE_CUT_MARKER));
    }

    #[test]
    fn output_cap_keeps_whole_lines_then_one_marker() {
        let mut o = ScriptOutput::new(100, 20);
        let mut out = Vec::new();
        let mut emit = |s: LogStream, l: String| out.push((s, l));
        o.feed(LogStream::Stdout, b"aaaa\nbbbb\n", &mut emit);
        o.feed(LogStream::Stderr, b"cccc\nddddd\neeee\n", &mut emit);
        o.feed(LogStream::Stdout, b"ffff\n", &mut emit);
        o.finish(LogStream::Stdout, &mut emit);
        o.finish(LogStream::Stderr, &mut emit);
        assert_eq!(
            out,
            vec![
                (LogStream::Stdout, "aaaa".to_string()),
                (LogStream::Stdout, "bbbb".to_string()),
                (LogStream::Stderr, "cccc".to_string()),
                (
                    LogStream::Stderr,
                    "[output truncated: script printed more than 20 bytes; the rest is discarded]".to_string()
                ),
            ]
        );
        assert_eq!(o.kept(), 15);
        assert!(o.is_exhausted());
    }

    #[test]
    fn default_marker_names_one_mib() {
        assert_eq!(
            truncation_marker(limits::MAX_SCRIPT_OUTPUT),
            "[output truncated: script printed more than 1 MiB; the rest is discarded]"
        );
    }
}
