//! Turns a recursive listing into a plan: which directories to create, which files to
//! copy where, and which keys cannot be written safely. The safety rule lives here and only
//! here: a target path is built from key components that each passed
//! [`crate::fs::names::invalid_reason`], so no `..`, absolute key, NUL or empty component
//! can ever name a path outside the target; no component may take a name fillfs keeps for
//! itself (part files anywhere, the fill's state in the target's root), so no key can
//! overwrite them; and two keys listed as one path are both refused, so neither is
//! written under the other's name (a backstop: the store's listing keeps a root key's
//! leading `/`, which is refused as unsafe on its own). (Links in the target are `target.rs`'s business.)
//! It must not do I/O.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::SystemTime;

use crate::fs::names::invalid_reason;
use crate::store::Listed;

/// Suffix of a file being written; renamed away when the file is complete.
pub const PART_SUFFIX: &str = ".fillfs-part";

/// Prefix of the part file of a name too long for [`PART_SUFFIX`] (see `part_file.rs`).
pub const PART_PREFIX: &str = ".fillfs-part-";

/// Prefix of the fill's own state in the target's root: `.fillfs-populate.journal` and
/// `.fillfs-populate.lock`.
pub const STATE_PREFIX: &str = ".fillfs-populate";

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
        if p.ends_with(PART_SUFFIX) || p.starts_with(PART_PREFIX) {
            return Err(format!(
                "a name ending in {PART_SUFFIX} or beginning with {PART_PREFIX} is reserved for fillfs's partial files"
            ));
        }
    }
    if parts[0].starts_with(STATE_PREFIX) {
        return Err(format!(
            "a name beginning with {STATE_PREFIX} is reserved for fillfs's fill state (journal, lock) in the target's root"
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
    let mut listed = std::collections::HashMap::<PathBuf, usize>::new();
    for f in &files {
        *listed.entry(f.rel.clone()).or_default() += 1;
    }
    for f in files {
        if dirs.contains(&f.rel) {
            plan.rejected
                .push((f.key, "is also a directory prefix".to_string()));
        } else if listed[&f.rel] > 1 {
            plan.rejected.push((
                f.key,
                "listed more than once: another key (one beginning with '/', which the store lists without it) would be written under this name"
                    .to_string(),
            ));
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

    fn file(name: &str) -> Listed {
        Listed::test_file(name)
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
            file("d.fillfs-part/x"),
            file(&format!(".fillfs-part-{}", "0".repeat(32))),
            file(".fillfs-populate.journal"),
            file(".fillfs-populate.lock/x"),
            Listed::Dir {
                name: "../d".into(),
            },
            Listed::Dir {
                name: ".fillfs-populate.journal".into(),
            },
        ]);
        assert_eq!(p.files.len(), 1);
        assert_eq!(p.files[0].rel, PathBuf::from("ok/a.txt"));
        assert_eq!(p.rejected.len(), 13, "{:?}", p.rejected);
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
    fn fill_state_names_are_reserved_only_in_the_root() {
        let p = plan(vec![
            file(".fillfs-populate.journal"),
            file("sub/.fillfs-populate.journal"),
        ]);
        assert_eq!(p.files.len(), 1);
        assert_eq!(
            p.files[0].rel,
            PathBuf::from("sub/.fillfs-populate.journal")
        );
        assert!(p.rejected[0].1.contains("reserved"), "{:?}", p.rejected);
    }

    #[test]
    fn keys_listed_as_one_path_are_all_refused() {
        // `/abs/x` and `abs/x`, as the store lists a bucket's root.
        let p = plan(vec![file("abs/x"), file("abs/x"), file("ok")]);
        assert_eq!(p.files.len(), 1);
        assert_eq!(p.files[0].rel, PathBuf::from("ok"));
        assert_eq!(p.rejected.len(), 2);
        assert!(p.rejected[0].1.contains("'/'"), "{:?}", p.rejected);
    }

    #[test]
    fn a_file_shadowed_by_a_prefix_is_rejected() {
        let p = plan(vec![file("both"), file("both/child")]);
        assert_eq!(p.files.len(), 1);
        assert_eq!(p.rejected[0].0, "both");
    }
}
