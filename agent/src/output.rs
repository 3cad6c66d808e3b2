//! Turning a script's raw output into log lines: split on newlines, cut overlong lines, and cap what
//! is kept per script run so a chatty script costs bounded memory. No I/O here.

use tether_shared::limits;
use tether_shared::proto::LogStream;

pub use tether_shared::lines::{LineCutter, LINE_CUT_MARKER};

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
