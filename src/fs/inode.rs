//! The inode table: stable inode numbers for the paths the kernel has seen.
//!
//! One inode per (parent, name) *and version*: a file's attributes are refreshed whenever
//! the parent's listing is refreshed, but a listing that shows the file with another
//! version (a new ETag, or a new size or mtime where there is none) gives the path a new
//! inode. Each inode is therefore one version of one object, for good: its handles read
//! that version or fail, and the kernel's page cache of an inode never mixes two versions,
//! so files can be opened with `FOPEN_KEEP_CACHE`. The replaced inode stays valid for the
//! files still open on it. Inodes are kept for the life of the mount (the kernel's
//! `forget` is not tracked yet), which costs ~150 bytes per entry or version seen. It must
//! not do I/O.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use crate::store::{ObjectMeta, Version};

pub type Ino = u64;
pub const ROOT_INO: Ino = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

/// What the file system knows of one path.
#[derive(Debug, Clone)]
pub struct Node {
    pub ino: Ino,
    pub parent: Ino,
    pub name: String,
    /// Key relative to the mount's prefix: `"a/b"` for a file, `"a/b/"` for a directory,
    /// `""` for the root.
    pub key: String,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    /// What every read of this inode is pinned to ([`Version::Any`] for directories).
    pub version: Version,
}

#[derive(Debug)]
pub struct InodeTable {
    nodes: HashMap<Ino, Arc<Node>>,
    by_name: HashMap<(Ino, String), Ino>,
    next: Ino,
    mount_time: SystemTime,
}

impl InodeTable {
    pub fn new() -> Self {
        let now = SystemTime::now();
        let root = Node {
            ino: ROOT_INO,
            parent: ROOT_INO,
            name: String::new(),
            key: String::new(),
            kind: Kind::Dir,
            size: 0,
            mtime: now,
            version: Version::Any,
        };
        InodeTable {
            nodes: HashMap::from([(ROOT_INO, Arc::new(root))]),
            by_name: HashMap::new(),
            next: ROOT_INO + 1,
            mount_time: now,
        }
    }

    pub fn get(&self, ino: Ino) -> Option<Arc<Node>> {
        self.nodes.get(&ino).cloned()
    }

    /// The node now named `name` in directory `parent` (the newest version listed).
    pub fn child(&self, parent: Ino, name: &str) -> Option<Arc<Node>> {
        let ino = self.by_name.get(&(parent, name.to_string()))?;
        self.nodes.get(ino).cloned()
    }

    /// Inserts or refreshes child `name` of `parent`. A path that changed kind (file ↔ dir)
    /// or version gets a new inode, so the kernel never sees a file turn into a directory
    /// or into other bytes in place. Returns the node and whether it replaced an inode the
    /// kernel may still have cached under this name.
    pub fn upsert(
        &mut self,
        parent: &Node,
        name: &str,
        kind: Kind,
        meta: Option<&ObjectMeta>,
    ) -> (Arc<Node>, bool) {
        let key = match kind {
            Kind::File => format!("{}{name}", parent.key),
            Kind::Dir => format!("{}{name}/", parent.key),
        };
        let version = meta.map_or(Version::Any, ObjectMeta::version);
        let previous = self
            .by_name
            .get(&(parent.ino, name.to_string()))
            .and_then(|ino| self.nodes.get(ino));
        let same = previous
            .filter(|n| n.kind == kind && n.version == version)
            .map(|n| n.ino);
        let replaced = previous.is_some() && same.is_none();
        let ino = same.unwrap_or_else(|| {
            let ino = self.next;
            self.next += 1;
            ino
        });
        let node = Arc::new(Node {
            ino,
            parent: parent.ino,
            name: name.to_string(),
            key,
            kind,
            size: meta.map_or(0, |m| m.size),
            mtime: meta.and_then(|m| m.mtime).unwrap_or(self.mount_time),
            version,
        });
        self.nodes.insert(ino, node.clone());
        self.by_name.insert((parent.ino, name.to_string()), ino);
        (node, replaced)
    }
}

impl Default for InodeTable {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(etag: &str, size: u64) -> ObjectMeta {
        ObjectMeta {
            size,
            mtime: None,
            etag: Some(etag.into()),
        }
    }

    #[test]
    fn a_new_version_is_a_new_inode_and_the_old_one_stays_readable() {
        let mut t = InodeTable::new();
        let root = t.get(ROOT_INO).unwrap();
        let (a, replaced) = t.upsert(&root, "f", Kind::File, Some(&meta("\"a\"", 5)));
        assert!(!replaced);
        let (again, replaced) = t.upsert(&root, "f", Kind::File, Some(&meta("\"a\"", 5)));
        assert_eq!(
            (again.ino, replaced),
            (a.ino, false),
            "same version, same inode"
        );
        let (b, replaced) = t.upsert(&root, "f", Kind::File, Some(&meta("\"b\"", 5)));
        assert!(replaced && b.ino != a.ino);
        assert_eq!(b.version, Version::ETag("\"b\"".into()));
        let old = t.get(a.ino).expect("open handles keep using the old inode");
        assert_eq!(old.version, Version::ETag("\"a\"".into()));
        let (d, replaced) = t.upsert(&root, "f", Kind::Dir, None);
        assert!(replaced && d.ino != b.ino, "a file that became a directory");
    }
}
