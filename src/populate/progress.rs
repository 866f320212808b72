//! Progress of a fill: counters updated by the copier, and a reporter that shows them —
//! a one-line status on a terminal (`bar`), one JSON object per line on stdout for machines
//! (`json`: the volume populator controller reads these), or nothing. It must not copy.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::integrity::Checked;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// `bar` when stderr is a terminal, else `none`.
    Auto,
    Bar,
    Json,
    None,
}

/// Finished files by how their content was checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckCounts {
    pub crc64: u64,
    pub md5: u64,
    pub size_only: u64,
}

impl std::fmt::Display for CheckCounts {
    /// `checked: 3 by CRC-64, 1 by MD5, 2 by size only` (zero counts left out).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = [
            (self.crc64, "by CRC-64"),
            (self.md5, "by MD5"),
            (self.size_only, "by size only"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, how)| format!("{n} {how}"))
        .collect();
        if parts.is_empty() {
            return Ok(());
        }
        write!(f, "checked: {}", parts.join(", "))
    }
}

/// One `--progress json` line: what `fillfs populate` prints once a second and the volume
/// populator controller reads back from the fill pod's log. One type on both sides.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProgressLine {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub files_done: u64,
    pub files_total: u64,
    /// Of `bytes_total`, one decimal.
    pub percent: f64,
    pub rate_mib_s: f64,
    pub elapsed_s: f64,
    /// The last line of a fill that succeeded.
    pub done: bool,
}

impl ProgressLine {
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("a progress line serializes")
    }

    /// The last progress line in a log (other lines, such as log messages, are skipped).
    pub fn last_in(log: &str) -> Option<ProgressLine> {
        log.lines()
            .rev()
            .find_map(|l| serde_json::from_str::<ProgressLine>(l.trim()).ok())
    }
}

#[derive(Debug)]
pub struct Progress {
    pub bytes_total: u64,
    pub files_total: u64,
    pub bytes_done: AtomicU64,
    pub files_done: AtomicU64,
    /// Finished files by how their content was checked (see `integrity.rs`).
    pub checked_crc64: AtomicU64,
    pub checked_md5: AtomicU64,
    pub checked_size_only: AtomicU64,
    started: Instant,
}

impl Progress {
    pub fn new(bytes_total: u64, files_total: u64) -> Self {
        Progress {
            bytes_total,
            files_total,
            bytes_done: AtomicU64::new(0),
            files_done: AtomicU64::new(0),
            checked_crc64: AtomicU64::new(0),
            checked_md5: AtomicU64::new(0),
            checked_size_only: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    pub fn check_counts(&self) -> CheckCounts {
        CheckCounts {
            crc64: self.checked_crc64.load(Ordering::Relaxed),
            md5: self.checked_md5.load(Ordering::Relaxed),
            size_only: self.checked_size_only.load(Ordering::Relaxed),
        }
    }

    pub fn count_checked(&self, how: Checked) {
        match how {
            Checked::Crc64 => &self.checked_crc64,
            Checked::Md5 => &self.checked_md5,
            Checked::SizeOnly => &self.checked_size_only,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn snapshot(&self) -> (u64, u64, f64) {
        let bytes = self.bytes_done.load(Ordering::Relaxed);
        let files = self.files_done.load(Ordering::Relaxed);
        let secs = self.elapsed().as_secs_f64().max(1e-9);
        (bytes, files, bytes as f64 / (1024.0 * 1024.0) / secs)
    }

    /// One machine-readable line.
    pub fn json_line(&self, done: bool) -> String {
        let (bytes, files, rate) = self.snapshot();
        ProgressLine {
            bytes_done: bytes,
            bytes_total: self.bytes_total,
            files_done: files,
            files_total: self.files_total,
            percent: if self.bytes_total == 0 {
                100.0
            } else {
                (bytes as f64 * 1000.0 / self.bytes_total as f64).round() / 10.0
            },
            rate_mib_s: (rate * 10.0).round() / 10.0,
            elapsed_s: (self.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            done,
        }
        .to_line()
    }

    fn bar_line(&self) -> String {
        let (bytes, files, rate) = self.snapshot();
        let pct = if self.bytes_total == 0 {
            100.0
        } else {
            bytes as f64 * 100.0 / self.bytes_total as f64
        };
        format!(
            "{pct:5.1}%  {} / {}  {files}/{} files  {rate:.0} MiB/s",
            bytesize::ByteSize(bytes).display().iec(),
            bytesize::ByteSize(self.bytes_total).display().iec(),
            self.files_total
        )
    }
}

/// Starts the reporter; it stops when the returned handle is aborted (after a final line).
pub fn spawn_reporter(
    progress: Arc<Progress>,
    mode: ProgressMode,
) -> Option<tokio::task::JoinHandle<()>> {
    let mode = match mode {
        ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
        ProgressMode::Auto => ProgressMode::None,
        m => m,
    };
    let period = match mode {
        ProgressMode::Bar => Duration::from_millis(250),
        ProgressMode::Json => Duration::from_secs(1),
        _ => return None,
    };
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            match mode {
                ProgressMode::Bar => {
                    let mut e = std::io::stderr().lock();
                    let _ = write!(e, "\r{:<78}", progress.bar_line());
                    let _ = e.flush();
                }
                _ => println!("{}", progress.json_line(false)),
            }
        }
    }))
}

/// Stops the reporter and prints the final state in its format.
pub fn finish_reporter(
    handle: Option<tokio::task::JoinHandle<()>>,
    progress: &Progress,
    mode: ProgressMode,
) {
    if let Some(h) = handle {
        h.abort();
        match mode {
            ProgressMode::Json => println!("{}", progress.json_line(true)),
            _ => eprintln!("\r{:<78}", progress.bar_line()),
        }
    }
}
