//! Resume state of a fill, kept in the target's root: `.fillfs-populate.journal` (a name the
//! plan refuses for keys, so no object can overwrite it). Its first line names the source;
//! each later line records one finished file: the path and the version copied (size, ETag,
//! mtime, and the CRC-64 the store declared, when it did). A file is recorded only after it
//! was written, checked and renamed from its part-file name, so after a SIGKILL every
//! recorded file is complete and every other file is redone. The journal is deleted when the
//! fill succeeds.
//!
//! What it answers is [`Journal::lookup`]: the version a file was copied from. The caller
//! compares it with the listing, and a recorded file of another version is copied again,
//! whatever its size and mtime say. The journal is opened beneath the target's descriptor
//! without following a link; a link (or anything but a file) at its name is replaced. It
//! must not decide what to copy.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

use super::target::Target;
use crate::error::{Error, Result};

pub const JOURNAL_NAME: &str = ".fillfs-populate.journal";
const HEADER: &str = "fillfs-populate-journal v2";
/// Journals of earlier versions name no ETag-and-mtime version; their files are redone.
const OLD_HEADER: &str = "fillfs-populate-journal v1";

/// The version of an object a finished file was copied from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub size: u64,
    pub etag: Option<String>,
    /// Nanoseconds since the epoch of the object's Last-Modified (the file's mtime).
    pub mtime_ns: Option<u128>,
    /// The CRC-64 the store declared for the object, when it did.
    pub crc64: Option<u64>,
}

impl Copied {
    pub fn new(
        size: u64,
        etag: Option<&str>,
        mtime: Option<SystemTime>,
        crc64: Option<u64>,
    ) -> Copied {
        Copied {
            size,
            etag: etag.map(str::to_string),
            mtime_ns: nanos(mtime),
            crc64,
        }
    }

    /// Whether this is the version a listing describes (the CRC-64 is not listed).
    pub fn is(&self, size: u64, etag: Option<&str>, mtime: Option<SystemTime>) -> bool {
        self.size == size && self.etag.as_deref() == etag && self.mtime_ns == nanos(mtime)
    }
}

fn nanos(t: Option<SystemTime>) -> Option<u128> {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
}

fn field<T: std::str::FromStr>(s: &str) -> Option<Option<T>> {
    if s == "-" {
        Some(None)
    } else {
        s.parse().ok().map(Some)
    }
}

pub struct Journal {
    target: Arc<Target>,
    header: String,
    /// Opened (and created) at the first record, so a fill refused before copying writes
    /// nothing to the target.
    file: Mutex<Option<File>>,
    done: HashMap<String, Copied>,
}

impl Journal {
    /// Reads the journal of `target`, if any. Refuses a journal of another source.
    pub fn load(target: Arc<Target>, source: &str) -> Result<Journal> {
        let mut done = HashMap::new();
        let opened = nix::fcntl::openat(
            target.root(),
            JOURNAL_NAME,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        );
        let file = match opened {
            Ok(fd) => Some(File::from(fd)),
            Err(Errno::ENOENT) => None,
            // A link where the journal goes: not ours, and never followed (replaced at the
            // first record).
            Err(Errno::ELOOP) => None,
            Err(e) => return Err(std::io::Error::from(e).into()),
        };
        if let Some(file) = file.filter(|f| f.metadata().is_ok_and(|m| m.is_file())) {
            let mut lines = BufReader::new(file).lines();
            let first = lines.next().transpose()?.unwrap_or_default();
            let (version, recorded) = match first.strip_prefix(HEADER) {
                Some(rest) => (2, rest.trim()),
                None => (
                    1,
                    first.strip_prefix(OLD_HEADER).map(str::trim).unwrap_or(""),
                ),
            };
            if recorded != source {
                return Err(Error::InvalidOption(format!(
                    "{} holds an unfinished fill of {recorded:?}, not {source:?}; finish that fill or delete {}",
                    target.path().display(),
                    target.display(JOURNAL_NAME.as_ref())
                )));
            }
            if version == 1 {
                tracing::info!(
                    "the journal of an earlier fillfs records no versions; its files are checked again"
                );
            }
            for line in lines.filter(|_| version == 2) {
                let line = line?;
                // done \t size \t etag \t mtime_ns \t crc64 \t "path" (a JSON string: names
                // may hold tabs or newlines). A torn last line (killed mid-write) is ignored:
                // that file is redone.
                let f: Vec<&str> = line.splitn(6, '\t').collect();
                if let ["done", size, etag, mtime, crc, rel] = f[..]
                    && let Ok(size) = size.parse()
                    && let Some(mtime_ns) = field(mtime)
                    && let Some(crc64) = field::<String>(crc)
                    && let Ok(rel) = serde_json::from_str::<String>(rel)
                {
                    let etag = (etag != "-").then(|| etag.to_string());
                    let crc64 = crc64.and_then(|c| u64::from_str_radix(&c, 16).ok());
                    done.insert(
                        rel,
                        Copied {
                            size,
                            etag,
                            mtime_ns,
                            crc64,
                        },
                    );
                }
            }
        }
        Ok(Journal {
            target,
            header: format!("{HEADER} {source}"),
            file: Mutex::new(None),
            done,
        })
    }

    /// Files recorded as finished by an earlier run.
    pub fn finished_count(&self) -> usize {
        self.done.len()
    }

    /// The version an earlier run copied `rel` from, if it finished it.
    pub fn lookup(&self, rel: &str) -> Option<&Copied> {
        self.done.get(rel)
    }

    /// Bytes of the files an earlier run finished.
    pub fn finished_bytes(&self) -> u64 {
        self.done.values().map(|c| c.size).sum()
    }

    fn open_for_append(&self) -> Result<File> {
        let open = || {
            nix::fcntl::openat(
                self.target.root(),
                JOURNAL_NAME,
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_APPEND
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
        };
        let not_a_journal = || Error::UnsafeTarget {
            path: self.target.display(JOURNAL_NAME.as_ref()),
            reason: "not a regular file, where fillfs keeps its journal (remove it)".into(),
        };
        let fd = match open() {
            Err(Errno::ELOOP | Errno::EISDIR | Errno::ENXIO) => {
                // Not a journal: a link, or something else at the name fillfs keeps for it
                // (a directory stays, and is named).
                let _ = nix::unistd::unlinkat(
                    self.target.root(),
                    JOURNAL_NAME,
                    UnlinkatFlags::NoRemoveDir,
                );
                open().map_err(|_| not_a_journal())?
            }
            other => other.map_err(std::io::Error::from)?,
        };
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(not_a_journal());
        }
        Ok(file)
    }

    pub fn record(&self, rel: &str, copied: &Copied) -> Result<()> {
        let clean = |s: &str| s.replace(['\t', '\n'], "");
        let etag = copied
            .etag
            .as_deref()
            .map(clean)
            .unwrap_or_else(|| "-".into());
        let mtime = copied
            .mtime_ns
            .map(|n| n.to_string())
            .unwrap_or_else(|| "-".into());
        let crc = copied
            .crc64
            .map(|c| format!("{c:016x}"))
            .unwrap_or_else(|| "-".into());
        let mut guard = self.file.lock().expect("journal lock");
        if guard.is_none() {
            let mut file = self.open_for_append()?;
            if file.metadata()?.len() == 0 {
                writeln!(file, "{}", self.header)?;
            }
            *guard = Some(file);
        }
        let f = guard.as_mut().expect("journal open");
        let line = format!(
            "done\t{}\t{etag}\t{mtime}\t{crc}\t{}\n",
            copied.size,
            serde_json::Value::from(rel)
        );
        f.write_all(line.as_bytes())?;
        Ok(())
    }

    /// The fill succeeded: the journal is no longer needed.
    pub fn finish(self) -> Result<()> {
        drop(self.file);
        match nix::unistd::unlinkat(self.target.root(), JOURNAL_NAME, UnlinkatFlags::NoRemoveDir) {
            Err(e) if e != Errno::ENOENT => Err(std::io::Error::from(e).into()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_versions_and_reads_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let target = Arc::new(Target::open(dir.path()).unwrap());
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 123);
        let j = Journal::load(target.clone(), "s3://b/p/").unwrap();
        j.record(
            "a\tb",
            &Copied::new(5, Some("\"e1\""), Some(t), Some(0xabc)),
        )
        .unwrap();
        j.record("c", &Copied::new(0, None, None, None)).unwrap();
        drop(j);
        let j = Journal::load(target.clone(), "s3://b/p/").unwrap();
        assert_eq!(j.finished_count(), 2);
        let a = j.lookup("a\tb").unwrap();
        assert!(a.is(5, Some("\"e1\""), Some(t)));
        assert!(!a.is(5, Some("\"e2\""), Some(t)), "another ETag");
        assert!(!a.is(
            5,
            Some("\"e1\""),
            Some(t + std::time::Duration::from_nanos(1))
        ));
        assert_eq!(a.crc64, Some(0xabc));
        assert!(j.lookup("c").unwrap().is(0, None, None));
        assert!(matches!(
            Journal::load(target.clone(), "s3://b/other/"),
            Err(Error::InvalidOption(_))
        ));
        j.finish().unwrap();
        assert!(!dir.path().join(JOURNAL_NAME).exists());
    }

    #[test]
    fn a_directory_at_the_journal_name_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(JOURNAL_NAME)).unwrap();
        let target = Arc::new(Target::open(dir.path()).unwrap());
        let j = Journal::load(target, "s3://b/").unwrap();
        match j.record("x", &Copied::new(1, None, None, None)) {
            Err(Error::UnsafeTarget { path, .. }) => assert!(path.ends_with(JOURNAL_NAME)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_link_at_the_journal_name_is_replaced_not_followed() {
        let outer = tempfile::tempdir().unwrap();
        let t = outer.path().join("t");
        std::fs::create_dir(&t).unwrap();
        let victim = outer.path().join("victim");
        std::os::unix::fs::symlink(&victim, t.join(JOURNAL_NAME)).unwrap();
        let target = Arc::new(Target::open(&t).unwrap());
        let j = Journal::load(target, "s3://b/").unwrap();
        j.record("x", &Copied::new(1, None, None, None)).unwrap();
        assert!(!victim.exists());
        assert!(
            std::fs::symlink_metadata(t.join(JOURNAL_NAME))
                .unwrap()
                .is_file()
        );
    }
}
