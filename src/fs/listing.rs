//! One directory listing as it arrives. A LIST of 20,000 objects is 20 pages, one round
//! trip each; the entries of each page are published as soon as the page is in, so the
//! first `readdir` page is answered after the first LIST page and the kernel takes the
//! entries of one page while the next is fetched. Lookups find a name as soon as its page
//! is in, and wait for the end only for a name not (yet) listed.
//!
//! Owns: the entries published so far (in the order they came, which is the order
//! directory handles hand them to the kernel), an index by name, and how the listing
//! ended. [`Merge`] decides what a LIST item becomes: names a file system cannot show are
//! hidden, and a key that is both an object and a prefix is shown once, as the directory.
//! It must not do I/O or touch inodes: the task that feeds it (in [`super::Fs`]) does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::watch;

use super::inode::{Ino, Kind};
use super::names;
use crate::error::{Error, Result};
use crate::store::{Listed, ObjectMeta};

/// One child in a directory listing.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: Ino,
    pub name: String,
    pub kind: Kind,
}

/// What the listing has published.
#[derive(Default)]
struct State {
    entries: Vec<DirEntry>,
    index: HashMap<String, usize>,
    /// `Some` once the last page is in (or the listing failed).
    end: Option<std::result::Result<(), Arc<Error>>>,
}

/// A directory listing, complete or still arriving; shared by the lookups and directory
/// handles that use it.
pub struct DirListing {
    state: watch::Sender<State>,
}

impl std::fmt::Debug for DirListing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.borrow();
        f.debug_struct("DirListing")
            .field("entries", &s.entries.len())
            .field("ended", &s.end.is_some())
            .finish()
    }
}

impl DirListing {
    pub fn new() -> Arc<Self> {
        Arc::new(DirListing {
            state: watch::Sender::new(State::default()),
        })
    }

    /// Publishes entries that arrived (readers waiting for them wake up).
    pub fn publish(&self, entries: Vec<DirEntry>) {
        if entries.is_empty() {
            return;
        }
        self.state.send_modify(|s| {
            for e in entries {
                s.index.insert(e.name.clone(), s.entries.len());
                s.entries.push(e);
            }
        });
    }

    /// Ends the listing: complete, or failed with `error` (readers past what was
    /// published get it). Only the first end counts.
    pub fn finish(&self, result: std::result::Result<(), Error>) {
        let result = result.map_err(Arc::new);
        self.state.send_if_modified(|s| {
            if s.end.is_some() {
                return false;
            }
            s.end = Some(result);
            true
        });
    }

    /// Whether the listing ended in an error (a new lookup should list again).
    pub fn failed(&self) -> bool {
        matches!(self.state.borrow().end, Some(Err(_)))
    }

    /// Calls `f` with the entries from index `from` on, once there is at least one or the
    /// listing has ended (then the slice may be empty: the end of the directory).
    pub async fn read_from<R>(&self, from: usize, f: impl FnOnce(&[DirEntry]) -> R) -> Result<R> {
        let mut rx = self.state.subscribe();
        let s = rx
            .wait_for(|s| s.entries.len() > from || s.end.is_some())
            .await
            .map_err(|_| Error::errno(libc::EIO))?;
        match &s.end {
            Some(Err(e)) if s.entries.len() <= from => Err(Error::Shared(e.clone())),
            _ => Ok(f(s.entries.get(from..).unwrap_or_default())),
        }
    }

    /// The inode listed under `name`: as soon as the page holding it is in; `None` once the
    /// listing has ended without it.
    pub async fn find(&self, name: &str) -> Result<Option<Ino>> {
        let mut rx = self.state.subscribe();
        let s = rx
            .wait_for(|s| s.index.contains_key(name) || s.end.is_some())
            .await
            .map_err(|_| Error::errno(libc::EIO))?;
        match (s.index.get(name), &s.end) {
            (Some(&i), _) => Ok(Some(s.entries[i].ino)),
            (None, Some(Err(e))) => Err(Error::Shared(e.clone())),
            (None, _) => Ok(None),
        }
    }

    /// Every entry, once the listing has ended.
    pub async fn all(&self) -> Result<Vec<DirEntry>> {
        let mut rx = self.state.subscribe();
        let s = rx
            .wait_for(|s| s.end.is_some())
            .await
            .map_err(|_| Error::errno(libc::EIO))?;
        match &s.end {
            Some(Err(e)) => Err(Error::Shared(e.clone())),
            _ => Ok(s.entries.clone()),
        }
    }
}

/// Ends a listing (if anybody still holds it) when dropped, with an error if it had not
/// ended: the task feeding it stopped early.
pub struct EndsOnDrop(pub std::sync::Weak<DirListing>);

impl Drop for EndsOnDrop {
    fn drop(&mut self) {
        if let Some(listing) = self.0.upgrade() {
            listing.finish(Err(Error::errno(libc::EIO)));
        }
    }
}

/// A child as the listing shows it, before it has an inode.
#[derive(Debug, Clone)]
pub struct Child {
    pub name: String,
    pub kind: Kind,
    pub meta: Option<ObjectMeta>,
}

/// Turns LIST items, in the order they arrive, into the children to show.
///
/// A key that is both an object (`a`) and a prefix (`a/`) shows as the directory. S3 and
/// OSS pages come in key order (within a page OpenDAL hands on the prefixes first), and
/// `a/` can be on a later page than `a` (`a-1`, `a.txt` sort between them), so an object
/// is held back until the listing has passed where its prefix would be. Where items do not
/// arrive in key order (a local directory), a name is never both.
pub struct Merge {
    dir: String,
    /// Objects not yet shown, by the key their prefix would have (`name/`).
    held: BTreeMap<String, ObjectMeta>,
    shown: HashSet<String>,
}

impl Merge {
    /// Merges the listing of directory key `dir` (for logs).
    pub fn new(dir: &str) -> Self {
        Merge {
            dir: dir.to_string(),
            held: BTreeMap::new(),
            shown: HashSet::new(),
        }
    }

    /// Takes one item; appends to `out` the children it lets through.
    pub fn push(&mut self, item: Listed, out: &mut Vec<Child>) {
        let (name, meta) = match item {
            Listed::Dir { name } => (name, None),
            Listed::File { name, meta } => (name, Some(meta)),
        };
        if let Some(why) = names::invalid_reason(&name) {
            tracing::warn!(dir = %self.dir, name = %name.escape_debug(), "hiding key: {why}");
            return;
        }
        match meta {
            Some(_) if self.shown.contains(&name) => {
                // Its prefix came first, on the same page.
                tracing::warn!(dir = %self.dir, name = %name, "key is both an object and a prefix; showing the directory");
            }
            Some(meta) => {
                self.release_before(&name, out);
                self.held.insert(format!("{name}/"), meta);
            }
            None => {
                let key = format!("{name}/");
                self.release_before(&key, out);
                if self.held.remove(&key).is_some() {
                    tracing::warn!(dir = %self.dir, name = %name, "key is both an object and a prefix; showing the directory");
                }
                self.show(name, Kind::Dir, None, out);
            }
        }
    }

    /// The listing is complete: everything held is shown.
    pub fn finish(&mut self, out: &mut Vec<Child>) {
        for (key, meta) in std::mem::take(&mut self.held) {
            self.show(key_name(key), Kind::File, Some(meta), out);
        }
    }

    /// Shows the objects whose prefix would sort before `key`: the listing is past them.
    fn release_before(&mut self, key: &str, out: &mut Vec<Child>) {
        let later = self.held.split_off(key);
        for (key, meta) in std::mem::replace(&mut self.held, later) {
            self.show(key_name(key), Kind::File, Some(meta), out);
        }
    }

    fn show(&mut self, name: String, kind: Kind, meta: Option<ObjectMeta>, out: &mut Vec<Child>) {
        if self.shown.insert(name.clone()) {
            out.push(Child { name, kind, meta });
        } else {
            tracing::warn!(dir = %self.dir, name = %name, "listed twice; shown once");
        }
    }
}

/// `name/` → `name`.
fn key_name(mut key: String) -> String {
    key.pop();
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> Listed {
        Listed::test_file(name)
    }

    fn dir(name: &str) -> Listed {
        Listed::Dir { name: name.into() }
    }

    fn merged(items: Vec<Listed>) -> Vec<(String, Kind)> {
        let mut m = Merge::new("d/");
        let mut out = Vec::new();
        for i in items {
            m.push(i, &mut out);
        }
        m.finish(&mut out);
        out.into_iter().map(|c| (c.name, c.kind)).collect()
    }

    #[test]
    fn an_object_and_a_prefix_of_one_name_show_once_as_the_directory() {
        // Key order: "a" < "a-1" < "a.txt" < "a/" < "b".
        let got = merged(vec![
            file("a"),
            file("a-1"),
            file("a.txt"),
            dir("a"),
            file("b"),
        ]);
        assert_eq!(
            got,
            [
                ("a-1".into(), Kind::File),
                ("a.txt".into(), Kind::File),
                ("a".into(), Kind::Dir),
                ("b".into(), Kind::File),
            ]
        );
    }

    #[test]
    fn pages_that_give_their_prefixes_first_merge_the_same() {
        // OpenDAL's S3 lister: each page's prefixes, then its objects. Page 1 holds the
        // object "a" and "a-1"; page 2 the prefix "a/" and the object "b". Then one page
        // with both "c" and "c/".
        let got = merged(vec![
            file("a"),
            file("a-1"),
            dir("a"),
            file("b"),
            dir("c"),
            file("c"),
        ]);
        assert_eq!(
            got,
            [
                ("a-1".into(), Kind::File),
                ("a".into(), Kind::Dir),
                ("b".into(), Kind::File),
                ("c".into(), Kind::Dir),
            ]
        );
    }

    #[test]
    fn objects_are_shown_as_soon_as_the_listing_is_past_their_prefix() {
        let mut m = Merge::new("");
        let mut out = Vec::new();
        m.push(file("f1"), &mut out);
        m.push(file("f2"), &mut out);
        assert_eq!(out.len(), 1, "f1 is out once f2 (> 'f1/') is listed");
        m.push(file("f2-x"), &mut out);
        assert_eq!(out.len(), 1, "f2 waits: 'f2-x' < 'f2/'");
        m.push(dir("g"), &mut out);
        let names: Vec<_> = out.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["f1", "f2-x", "f2", "g"],
            "held ones go in the order of their prefixes"
        );
    }

    #[test]
    fn names_a_file_system_cannot_show_are_hidden_and_repeats_shown_once() {
        let got = merged(vec![
            file(".."),
            dir("x"),
            dir("x"),
            file("ok"),
            file("a\0b"),
        ]);
        assert_eq!(got, [("x".into(), Kind::Dir), ("ok".into(), Kind::File)]);
    }

    #[tokio::test]
    async fn readers_get_each_page_as_it_is_published_and_the_error_past_it() {
        let l = DirListing::new();
        let entry = |i: u64| DirEntry {
            ino: i,
            name: format!("e{i}"),
            kind: Kind::File,
        };
        let waiting = tokio::spawn({
            let l = l.clone();
            async move { l.read_from(0, |e| e.len()).await.unwrap() }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "nothing published yet");
        l.publish(vec![entry(1), entry(2)]);
        assert_eq!(waiting.await.unwrap(), 2);
        assert_eq!(l.find("e2").await.unwrap(), Some(2), "found before the end");
        let later = tokio::spawn({
            let l = l.clone();
            async move { l.find("e9").await.is_err() }
        });
        l.publish(vec![entry(3)]);
        assert_eq!(l.read_from(2, |e| e[0].ino).await.unwrap(), 3);
        l.finish(Err(Error::errno(libc::EIO)));
        assert!(l.failed());
        assert!(later.await.unwrap(), "a name never listed gets the error");
        assert_eq!(
            l.read_from(1, |e| e.len()).await.unwrap(),
            2,
            "published entries stay readable"
        );
        assert!(l.read_from(3, |e| e.len()).await.is_err());
        assert!(l.all().await.is_err());
    }

    #[tokio::test]
    async fn a_complete_listing_ends_with_an_empty_page() {
        let l = DirListing::new();
        l.finish(Ok(()));
        assert_eq!(l.read_from(0, |e| e.len()).await.unwrap(), 0);
        assert_eq!(l.find("x").await.unwrap(), None);
        assert!(!l.failed());
    }
}
