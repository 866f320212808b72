//! The checkpoint of a multipart upload of a file: which upload, how it is cut, which parts
//! are done (with their ETags and checksums) and which version of the source it is of.
//! Kept in a state directory as one JSON file per (store, key, source path), replaced
//! atomically (write + rename), so a crash leaves the last whole version. It must not send
//! requests or decide what to resume (`mod.rs` does, confirming parts with ListParts).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

/// One part the store acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DonePart {
    pub etag: String,
    pub size: u64,
    pub crc64: u64,
    /// Lowercase hex.
    pub md5: String,
}

/// The source's version: a change of either means starting over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceVersion {
    pub size: u64,
    pub mtime_ns: i128,
}

impl SourceVersion {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        SourceVersion {
            size: meta.len(),
            mtime_ns,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    /// `scheme://bucket/key` as the user would write it.
    pub object: String,
    pub upload_id: String,
    pub part_size: u64,
    pub source: SourceVersion,
    pub parts: BTreeMap<u32, DonePart>,
}

/// Where the checkpoints of a state directory live.
#[derive(Debug, Clone)]
pub struct CheckpointDir(PathBuf);

impl CheckpointDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CheckpointDir(dir.into())
    }

    /// The file of an upload of `source` to `object` (the name hashes both).
    pub fn file_for(&self, object: &str, source: &Path) -> PathBuf {
        let mut h = Md5::new();
        h.update(object.as_bytes());
        h.update([0]);
        h.update(source.as_os_str().as_encoded_bytes());
        let d = h.finalize();
        let name: String = d.iter().map(|b| format!("{b:02x}")).collect();
        self.0.join(format!("{name}.json"))
    }
}

impl Checkpoint {
    /// The checkpoint at `path`; `None` if there is none or it cannot be read (a damaged
    /// checkpoint only costs the resume).
    pub fn load(path: &Path) -> Option<Checkpoint> {
        let text = std::fs::read(path).ok()?;
        match serde_json::from_slice::<Checkpoint>(&text) {
            Ok(c) if c.version == 1 => Some(c),
            _ => {
                tracing::warn!(path = %path.display(), "ignoring an unreadable upload checkpoint");
                None
            }
        }
    }

    /// Writes the checkpoint atomically (a temporary file renamed over the old one).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, path)
    }

    pub fn remove(path: &Path) {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_round_trips_and_a_damaged_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let cd = CheckpointDir::new(dir.path());
        let f = cd.file_for("s3://b/k", Path::new("/data/x"));
        assert_ne!(f, cd.file_for("s3://b/k2", Path::new("/data/x")));
        let mut c = Checkpoint {
            version: 1,
            object: "s3://b/k".into(),
            upload_id: "u".into(),
            part_size: 8 << 20,
            source: SourceVersion {
                size: 3,
                mtime_ns: 7,
            },
            parts: BTreeMap::new(),
        };
        c.parts.insert(
            1,
            DonePart {
                etag: "\"e\"".into(),
                size: 3,
                crc64: 9,
                md5: "m".into(),
            },
        );
        c.save(&f).unwrap();
        assert_eq!(Checkpoint::load(&f), Some(c));
        std::fs::write(&f, b"{not json").unwrap();
        assert_eq!(Checkpoint::load(&f), None);
    }
}
