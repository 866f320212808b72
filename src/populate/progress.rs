//! Progress of a fill: counters updated by the copier, and a reporter that shows them —
//! a progress bar with rate and ETA on a terminal (`bar`, drawn by `indicatif`, as rclone
//! and s5cmd users expect), one JSON object per line on stdout for machines (`json`: the
//! volume populator controller reads these), or nothing. It must not copy.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::integrity::Checked;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// `bar` when stderr is a terminal, else `none`.
    Auto,
    /// A bar with bytes, files, rate and ETA on stderr (drawn only on a terminal).
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

    /// The bar's message: files done of all.
    fn files_message(&self) -> String {
        format!(
            "{}/{} files",
            self.files_done.load(Ordering::Relaxed),
            self.files_total
        )
    }
}

/// `  42% [=========>          ] 134.0 MiB / 319.1 MiB  200/201 files  8.0 MiB/s  ETA 23s`
fn bar_style() -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(
        "{percent:>3}% [{wide_bar}] {binary_bytes} / {binary_total_bytes}  {msg}  {binary_bytes_per_sec}  ETA {eta}",
    )
    .expect("a valid template")
    .progress_chars("=> ")
}

/// A running reporter; give it back to [`finish_reporter`].
pub struct Reporter {
    task: tokio::task::JoinHandle<()>,
    bar: Option<indicatif::ProgressBar>,
}

fn new_bar(progress: &Progress, target: indicatif::ProgressDrawTarget) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(Some(progress.bytes_total), target)
        .with_style(bar_style());
    bar.set_message(progress.files_message());
    bar
}

fn update_bar(bar: &indicatif::ProgressBar, progress: &Progress) {
    bar.set_position(progress.bytes_done.load(Ordering::Relaxed));
    bar.set_message(progress.files_message());
}

/// Starts the reporter; it stops at [`finish_reporter`] (after a final line).
pub fn spawn_reporter(progress: Arc<Progress>, mode: ProgressMode) -> Option<Reporter> {
    let mode = match mode {
        ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
        ProgressMode::Auto => ProgressMode::None,
        m => m,
    };
    match mode {
        ProgressMode::Bar => {
            let bar = new_bar(&progress, indicatif::ProgressDrawTarget::stderr_with_hz(4));
            let b = bar.clone();
            let task = tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tick.tick().await;
                    update_bar(&b, &progress);
                }
            });
            Some(Reporter {
                task,
                bar: Some(bar),
            })
        }
        ProgressMode::Json => {
            let task = tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    println!("{}", progress.json_line(false));
                }
            });
            Some(Reporter { task, bar: None })
        }
        _ => None,
    }
}

/// Stops the reporter and prints the final state in its format.
pub fn finish_reporter(reporter: Option<Reporter>, progress: &Progress, mode: ProgressMode) {
    let Some(r) = reporter else { return };
    r.task.abort();
    match r.bar {
        Some(bar) => {
            update_bar(&bar, progress);
            bar.finish();
        }
        None if mode == ProgressMode::Json => println!("{}", progress.json_line(true)),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_shows_bytes_files_rate_and_eta() {
        let p = Progress::new(300 * 1024 * 1024, 201);
        p.bytes_done.store(100 * 1024 * 1024, Ordering::Relaxed);
        p.files_done.store(67, Ordering::Relaxed);
        let term = indicatif::InMemoryTerm::new(2, 110);
        let bar = new_bar(
            &p,
            indicatif::ProgressDrawTarget::term_like(Box::new(term.clone())),
        );
        update_bar(&bar, &p);
        bar.tick();
        let shown = term.contents();
        for part in [
            "33% [",
            "=>",
            "100.00 MiB / 300.00 MiB",
            "67/201 files",
            "/s",
            "ETA ",
        ] {
            assert!(shown.contains(part), "{part:?} missing from {shown:?}");
        }
    }
}
