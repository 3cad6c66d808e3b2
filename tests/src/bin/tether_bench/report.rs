//! The plain-text summary: labelled lines and verdicts against the targets.

use std::fmt::Write;

/// A summary block being written.
#[derive(Default)]
pub struct Block {
    text: String,
}

impl Block {
    pub fn title(&mut self, title: &str) {
        let _ = writeln!(self.text, "\n== {title} ==");
    }

    pub fn line(&mut self, label: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.text, "  {label:<44} {value}");
    }

    pub fn note(&mut self, text: impl std::fmt::Display) {
        let _ = writeln!(self.text, "  {text}");
    }

    pub fn finish(self) -> String {
        self.text
    }
}

pub fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "FAIL"
    }
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

pub fn secs(s: f64) -> String {
    format!("{s:.2} s")
}

/// Median and maximum; `None` for an empty list.
pub fn median_max(values: &[f64]) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len().is_multiple_of(2) { (v[mid - 1] + v[mid]) / 2.0 } else { v[mid] };
    Some((median, v[v.len() - 1]))
}
