//! Splitting a byte stream into bounded log lines: the agent's script output and the coordinator's
//! provisioning output. No I/O here.

/// Appended to a line cut at its limit.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits;

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
}
