//! Resume state of a fill, kept in the target: `.fillfs-populate.journal`. Its first line
//! names the source; each later line records one finished file (size, ETag, path). A file
//! is recorded only after it was written, checked and renamed from its `.fillfs-part` name,
//! so after a SIGKILL every recorded file is complete and every other file is redone. The
//! journal is deleted when the fill succeeds. It must not decide what to copy.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

pub const JOURNAL_NAME: &str = ".fillfs-populate.journal";
const HEADER: &str = "fillfs-populate-journal v1";

pub struct Journal {
    path: PathBuf,
    header: String,
    /// Opened (and created) at the first record, so a fill refused before copying writes
    /// nothing to the target.
    file: Mutex<Option<File>>,
    done: HashMap<String, (u64, String)>,
}

impl Journal {
    /// Reads the journal of `target`, if any. Refuses a journal of another source.
    pub fn load(target: &Path, source: &str) -> Result<Journal> {
        let path = target.join(JOURNAL_NAME);
        let mut done = HashMap::new();
        if path.exists() {
            let mut lines = BufReader::new(File::open(&path)?).lines();
            let header = lines.next().transpose()?.unwrap_or_default();
            let recorded = header.strip_prefix(HEADER).map(str::trim).unwrap_or("");
            if recorded != source {
                return Err(Error::InvalidOption(format!(
                    "{} holds an unfinished fill of {recorded:?}, not {source:?}; finish that fill or delete {}",
                    target.display(),
                    path.display()
                )));
            }
            for line in lines {
                let line = line?;
                let mut f = line.splitn(4, '\t');
                if let (Some("done"), Some(size), Some(etag), Some(rel)) =
                    (f.next(), f.next(), f.next(), f.next())
                    && let Ok(size) = size.parse()
                    && let Ok(rel) = serde_json::from_str::<String>(rel)
                {
                    done.insert(rel, (size, etag.to_string()));
                }
                // A torn last line (killed mid-write) is ignored: that file is redone.
            }
        }
        Ok(Journal {
            path,
            header: format!("{HEADER} {source}"),
            file: Mutex::new(None),
            done,
        })
    }

    /// Files recorded as finished by an earlier run.
    pub fn finished_count(&self) -> usize {
        self.done.len()
    }

    /// True when `rel` was finished by an earlier run with this size and ETag.
    pub fn is_done(&self, rel: &str, size: u64, etag: Option<&str>) -> bool {
        self.done
            .get(rel)
            .is_some_and(|(s, e)| *s == size && e == etag.unwrap_or("-"))
    }

    /// Bytes of the files an earlier run finished.
    pub fn finished_bytes(&self) -> u64 {
        self.done.values().map(|(s, _)| s).sum()
    }

    pub fn record(&self, rel: &str, size: u64, etag: Option<&str>) -> Result<()> {
        let etag = etag.unwrap_or("-").replace(['\t', '\n'], "");
        let mut guard = self.file.lock().expect("journal lock");
        if guard.is_none() {
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            if file.metadata()?.len() == 0 {
                writeln!(file, "{}", self.header)?;
            }
            *guard = Some(file);
        }
        let f = guard.as_mut().expect("journal open");
        // The path as a JSON string: names may hold tabs or newlines.
        writeln!(f, "done\t{size}\t{etag}\t{}", serde_json::Value::from(rel))?;
        Ok(())
    }

    /// The fill succeeded: the journal is no longer needed.
    pub fn finish(self) -> Result<()> {
        drop(self.file);
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}
