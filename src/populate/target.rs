//! TARGET as a directory descriptor, and every path beneath it resolved without following a
//! symbolic link.
//!
//! A fill may run as root, and a target is a volume other people write to. A link planted in
//! it (`TARGET/d -> /etc`, `TARGET/f.fillfs-part -> /etc/shadow`) must never make the fill
//! create, write, chmod, chown or rename anything outside. So nothing in `populate` names a
//! path under TARGET from `/`: [`Target::dir`] opens the directory it needs from TARGET's
//! descriptor with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` (where the kernel or a
//! seccomp profile refuses `openat2`, with one `O_NOFOLLOW` `openat` per component), and the
//! callers work on names inside it with `*at()` calls that do not follow a final link either
//! (`O_CREAT | O_EXCL | O_NOFOLLOW`, `renameat`, `unlinkat`, `mkdirat`) and set attributes
//! through descriptors (`fchmod`, `fchown`).
//!
//! What stands where a directory of the plan goes and is not one — a link, a file — stops the
//! fill with [`Error::UnsafeTarget`] naming it: fillfs does not remove what it did not write.
//! Names only fillfs writes (part files, the journal, the lock) are replaced whatever sits
//! there (`part_file.rs`, `journal.rs`, `lock.rs`). TARGET itself is whatever the caller
//! named, a link included. This module must not decide what to create (that is `plan.rs`).

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat, mkdirat};
use nix::unistd::{Gid, Uid};

use crate::error::{Error, Result};

/// The directory a fill writes into, open for the whole fill.
#[derive(Debug)]
pub struct Target {
    /// `O_RDONLY | O_DIRECTORY`: usable for `*at()` calls, `fchmod`, `syncfs` and `flock`.
    root: OwnedFd,
    path: PathBuf,
}

/// A directory beneath a [`Target`], reached without following a link. `O_PATH`: only a
/// handle for `*at()` calls.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    /// Relative to the target; empty for the target itself.
    rel: PathBuf,
}

impl Dir {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn rel(&self) -> &Path {
        &self.rel
    }
}

/// Set once `openat2` answered ENOSYS or EPERM (an old kernel, a seccomp profile without it).
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

const DIR_PATH: OFlag = OFlag::O_PATH
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

impl Target {
    /// Opens TARGET, which must be a directory.
    pub fn open(path: &Path) -> Result<Target> {
        let root = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::InvalidOption(format!("target {}: {e}", path.display())))?;
        Ok(Target {
            root,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// TARGET's own descriptor.
    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// `TARGET/rel`, for messages.
    pub fn display(&self, rel: &Path) -> String {
        self.path.join(rel).display().to_string()
    }

    /// Opens directory `rel` (plain components only, as the plan makes them) without
    /// following a link on the way. A link or a non-directory on the way is
    /// [`Error::UnsafeTarget`] naming it; a missing directory is `ENOENT`.
    pub fn dir(&self, rel: &Path) -> Result<Dir> {
        let opened = if rel.as_os_str().is_empty() {
            openat(self.root(), ".", DIR_PATH, Mode::empty())
        } else if !NO_OPENAT2.load(Ordering::Relaxed) {
            match self.openat2_dir(rel) {
                Err(Errno::ENOSYS | Errno::EPERM) => {
                    tracing::debug!(
                        "openat2 refused; resolving target paths component by component"
                    );
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                    self.walk_dir(rel)
                }
                other => other,
            }
        } else {
            self.walk_dir(rel)
        };
        match opened {
            Ok(fd) => Ok(Dir {
                fd,
                rel: rel.to_path_buf(),
            }),
            Err(Errno::ELOOP | Errno::ENOTDIR | Errno::EXDEV) => Err(self.explain(rel)),
            Err(e) => Err(Error::Io(std::io::Error::new(
                std::io::Error::from(e).kind(),
                format!("{}: {e}", self.display(rel)),
            ))),
        }
    }

    fn openat2_dir(&self, rel: &Path) -> nix::Result<OwnedFd> {
        let how = OpenHow::new().flags(DIR_PATH).resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
        // EAGAIN: a rename elsewhere in the tree raced the lookup; the kernel asks to retry.
        let mut tries = 0;
        loop {
            match openat2(self.root(), rel, how) {
                Err(Errno::EAGAIN) if tries < 16 => tries += 1,
                other => return other,
            }
        }
    }

    /// The same lookup as `openat2` with `RESOLVE_NO_SYMLINKS`, one component at a time:
    /// `O_NOFOLLOW | O_DIRECTORY` fails on a link or a non-directory (ELOOP or ENOTDIR).
    pub(crate) fn walk_dir(&self, rel: &Path) -> nix::Result<OwnedFd> {
        let mut fd = openat(self.root(), ".", DIR_PATH, Mode::empty())?;
        for c in rel.components() {
            let Component::Normal(name) = c else {
                return Err(Errno::EXDEV); // only plain names lead beneath
            };
            fd = openat(&fd, name, DIR_PATH, Mode::empty())?;
            // O_PATH | O_NOFOLLOW may hand back the link itself on some kernels.
            if !is_dir(&nix::sys::stat::fstat(&fd)?) {
                return Err(Errno::ENOTDIR);
            }
        }
        Ok(fd)
    }

    /// The error for a lookup of `rel` refused because of what stands on the way: names the
    /// first component that is a link or not a directory.
    fn explain(&self, rel: &Path) -> Error {
        let mut at = PathBuf::new();
        for c in rel.components() {
            at.push(c);
            let what = match fstatat(self.root(), &at, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) if is_dir(&st) => continue,
                Ok(st) if kind(&st) == SFlag::S_IFLNK => {
                    "a symbolic link where the fill needs a directory; fillfs never follows links in the target (remove it)"
                }
                Ok(_) => "not a directory, and the fill needs one here (remove it)",
                Err(_) => break,
            };
            return Error::UnsafeTarget {
                path: self.display(&at),
                reason: what.into(),
            };
        }
        Error::UnsafeTarget {
            path: self.display(rel),
            reason: "cannot be reached without following a link".into(),
        }
    }

    /// Creates directory `rel` (its parent must exist) with `mode` and owner; an existing
    /// directory is left as it is. Returns whether it was created. Something else at `rel`
    /// (a link, a file) is [`Error::UnsafeTarget`].
    pub fn create_dir(
        &self,
        rel: &Path,
        mode: u32,
        owner: (Option<u32>, Option<u32>),
    ) -> Result<bool> {
        let parent = self.dir(rel.parent().unwrap_or(Path::new("")))?;
        let name = rel.file_name().expect("a directory of the plan has a name");
        match mkdirat(parent.fd(), name, Mode::from_bits_truncate(0o700)) {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                return match fstatat(parent.fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(st) if is_dir(&st) => Ok(false),
                    _ => Err(self.explain(rel)),
                };
            }
            Err(e) => {
                return Err(Error::Io(std::io::Error::new(
                    std::io::Error::from(e).kind(),
                    format!("creating {}: {e}", self.display(rel)),
                )));
            }
        }
        // Created 0700, so nobody else can use it before it has its owner and mode.
        let dir = openat(
            parent.fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(std::io::Error::from)?;
        set_owner_and_mode(&dir, owner, mode)?;
        Ok(true)
    }
}

/// `fchown` (when an owner is asked for), then `fchmod` (after it: a chown clears set-id bits).
pub fn set_owner_and_mode(
    fd: &impl AsFd,
    (uid, gid): (Option<u32>, Option<u32>),
    mode: u32,
) -> Result<()> {
    if uid.is_some() || gid.is_some() {
        nix::unistd::fchown(fd, uid.map(Uid::from_raw), gid.map(Gid::from_raw))
            .map_err(std::io::Error::from)?;
    }
    nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(mode)).map_err(std::io::Error::from)?;
    Ok(())
}

fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

fn is_dir(st: &FileStat) -> bool {
    kind(st) == SFlag::S_IFDIR
}

/// Whether `name` in `dir` is a regular file (not following a link), with its stat.
pub fn regular_file(dir: &Dir, name: &OsStr) -> Option<FileStat> {
    fstatat(dir.fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        .ok()
        .filter(|st| kind(st) == SFlag::S_IFREG)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Target) {
        let outer = tempfile::tempdir().unwrap();
        let t = outer.path().join("t");
        std::fs::create_dir_all(t.join("a/b")).unwrap();
        std::fs::create_dir(outer.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(outer.path().join("elsewhere"), t.join("a/link")).unwrap();
        std::fs::write(t.join("a/file"), b"x").unwrap();
        let target = Target::open(&t).unwrap();
        (outer, target)
    }

    #[test]
    fn directories_are_reached_beneath_without_links_by_both_lookups() {
        let (_outer, t) = setup();
        for walk in [false, true] {
            let open = |rel: &str| {
                if walk {
                    t.walk_dir(Path::new(rel))
                } else {
                    t.openat2_dir(Path::new(rel))
                }
            };
            assert!(open("a/b").is_ok());
            assert!(matches!(open("a/link"), Err(Errno::ELOOP | Errno::ENOTDIR)));
            assert!(matches!(
                open("a/link/x"),
                Err(Errno::ELOOP | Errno::ENOTDIR)
            ));
            assert!(matches!(open("a/file"), Err(Errno::ENOTDIR)));
            assert!(open("../t").is_err(), "never above the target");
        }
    }

    #[test]
    fn what_stands_in_the_way_is_named_and_left_alone() {
        let (outer, t) = setup();
        match t.dir(Path::new("a/link/deeper")) {
            Err(Error::UnsafeTarget { path, reason }) => {
                assert!(path.ends_with("t/a/link"), "{path}");
                assert!(reason.contains("symbolic link"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            t.create_dir(Path::new("a/link"), 0o755, (None, None)),
            Err(Error::UnsafeTarget { .. })
        ));
        assert!(matches!(
            t.create_dir(Path::new("a/link/sub"), 0o755, (None, None)),
            Err(Error::UnsafeTarget { .. })
        ));
        assert!(matches!(
            t.create_dir(Path::new("a/file"), 0o755, (None, None)),
            Err(Error::UnsafeTarget { .. })
        ));
        assert_eq!(
            std::fs::read_dir(outer.path().join("elsewhere"))
                .unwrap()
                .count(),
            0
        );
        assert!(
            t.create_dir(Path::new("a/new"), 0o751, (None, None))
                .unwrap()
        );
        assert!(
            !t.create_dir(Path::new("a/new"), 0o751, (None, None))
                .unwrap()
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(t.path().join("a/new"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o751);
    }
}
