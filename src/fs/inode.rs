//! The inode table: stable inode numbers for the paths the kernel has seen.
//!
//! One inode per (parent, name); its attributes are refreshed whenever the parent's listing
//! is refreshed. Inodes are kept for the life of the mount (the kernel's `forget` is not
//! tracked yet), which costs ~150 bytes per entry seen. It must not do I/O.

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

    /// Inserts or refreshes child `name` of `parent`; a path that changed kind (file ↔ dir)
    /// gets a new inode so the kernel never sees a file turn into a directory in place.
    pub fn upsert(
        &mut self,
        parent: &Node,
        name: &str,
        kind: Kind,
        meta: Option<&ObjectMeta>,
    ) -> Arc<Node> {
        let key = match kind {
            Kind::File => format!("{}{name}", parent.key),
            Kind::Dir => format!("{}{name}/", parent.key),
        };
        let existing = self
            .by_name
            .get(&(parent.ino, name.to_string()))
            .and_then(|ino| self.nodes.get(ino))
            .filter(|n| n.kind == kind)
            .map(|n| n.ino);
        let ino = existing.unwrap_or_else(|| {
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
            version: meta.map_or(Version::Any, ObjectMeta::version),
        });
        self.nodes.insert(ino, node.clone());
        self.by_name.insert((parent.ino, name.to_string()), ino);
        node
    }
}

impl Default for InodeTable {
    fn default() -> Self {
        Self::new()
    }
}
