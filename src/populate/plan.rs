//! Turns a recursive listing into a plan: which directories to create, which files to
//! copy where, and which keys cannot be written safely. The safety rule lives here and only
//! here: a target path is built from key components that each passed
//! [`crate::fs::names::invalid_reason`], so no `..`, absolute key, NUL or empty component
//! can ever name a path outside the target. It must not do I/O.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::SystemTime;

use crate::fs::names::invalid_reason;
use crate::store::Listed;

/// Suffix of a file being written; renamed away when the file is complete.
pub const PART_SUFFIX: &str = ".fillfs-part";

#[derive(Debug, Clone)]
pub struct FileJob {
    /// Key relative to the source root.
    pub key: String,
    /// Path relative to the target.
    pub rel: PathBuf,
    pub size: u64,
    pub etag: Option<String>,
    pub mtime: Option<SystemTime>,
}

#[derive(Debug, Default)]
pub struct Plan {
    /// Directories to create, parents before children.
    pub dirs: Vec<PathBuf>,
    pub files: Vec<FileJob>,
    /// Keys that cannot be written safely, with the reason.
    pub rejected: Vec<(String, String)>,
}

impl Plan {
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

fn components(key: &str) -> Result<Vec<&str>, String> {
    let parts: Vec<&str> = key.split('/').collect();
    for p in &parts {
        if let Some(why) = invalid_reason(p) {
            return Err(why.to_string());
        }
    }
    if parts.last().is_some_and(|n| n.ends_with(PART_SUFFIX)) {
        return Err(format!(
            "name ends in {PART_SUFFIX}, which fillfs reserves for partial files"
        ));
    }
    Ok(parts)
}

/// Builds the plan. Objects whose path is also a directory prefix are rejected (the
/// directory wins, as in `fillfs mount`).
pub fn plan(listing: Vec<Listed>) -> Plan {
    let mut plan = Plan::default();
    let mut dirs = BTreeSet::new();
    let mut files = Vec::new();
    for item in listing {
        match item {
            Listed::Dir { name } => match components(&name) {
                Ok(parts) => {
                    for i in 1..=parts.len() {
                        dirs.insert(parts[..i].iter().collect::<PathBuf>());
                    }
                }
                Err(why) => plan.rejected.push((format!("{name}/"), why)),
            },
            Listed::File { name, meta } => match components(&name) {
                Ok(parts) => {
                    for i in 1..parts.len() {
                        dirs.insert(parts[..i].iter().collect::<PathBuf>());
                    }
                    let rel: PathBuf = parts.iter().collect();
                    files.push(FileJob {
                        key: name,
                        rel,
                        size: meta.size,
                        etag: meta.etag,
                        mtime: meta.mtime,
                    });
                }
                Err(why) => plan.rejected.push((name, why)),
            },
        }
    }
    for f in files {
        if dirs.contains(&f.rel) {
            plan.rejected
                .push((f.key, "is also a directory prefix".to_string()));
        } else {
            plan.files.push(f);
        }
    }
    plan.dirs = dirs.into_iter().collect(); // BTreeSet order: parents first
    plan.files.sort_by(|a, b| a.rel.cmp(&b.rel));
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ObjectMeta;

    fn file(name: &str) -> Listed {
        Listed::File {
            name: name.into(),
            meta: ObjectMeta {
                size: 1,
                mtime: None,
                etag: None,
            },
        }
    }

    #[test]
    fn hostile_keys_never_become_paths() {
        let p = plan(vec![
            file("ok/a.txt"),
            file("../escape"),
            file("/abs"),
            file("a//b"),
            file("x/./y"),
            file("x/../../y"),
            file("nul\0byte"),
            file("sneaky.fillfs-part"),
            Listed::Dir {
                name: "../d".into(),
            },
        ]);
        assert_eq!(p.files.len(), 1);
        assert_eq!(p.files[0].rel, PathBuf::from("ok/a.txt"));
        assert_eq!(p.rejected.len(), 8, "{:?}", p.rejected);
        for d in &p.dirs {
            assert!(
                d.components()
                    .all(|c| matches!(c, std::path::Component::Normal(_))),
                "{d:?}"
            );
        }
    }

    #[test]
    fn directories_come_from_prefixes_and_markers_parents_first() {
        let p = plan(vec![
            file("a/b/c.txt"),
            Listed::Dir {
                name: "empty".into(),
            },
            file("top"),
        ]);
        assert_eq!(
            p.dirs,
            vec![
                PathBuf::from("a"),
                PathBuf::from("a/b"),
                PathBuf::from("empty")
            ]
        );
        assert_eq!(p.files.len(), 2);
    }

    #[test]
    fn a_file_shadowed_by_a_prefix_is_rejected() {
        let p = plan(vec![file("both"), file("both/child")]);
        assert_eq!(p.files.len(), 1);
        assert_eq!(p.rejected[0].0, "both");
    }
}
