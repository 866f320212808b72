//! One fill at a time per target. Two fills writing the same part files interleave their
//! ranges and can both finish "successfully" with corrupt files, so a fill holds an
//! exclusive `flock` on TARGET's directory for its whole run, taken before the listing and
//! released when the fill ends (or its process dies: the kernel drops the lock, so a killed
//! fill never blocks the next one).
//!
//! The lock is on the directory itself, not on a file in it: a lock file that is removed
//! at the end can be locked by two processes at once (one holds the removed file's lock,
//! the other a new file's). Who holds it is written to `.fillfs-populate.lock` (`pid 12 on
//! host fill-pod-x since 2026-05-01T10:00:00Z`), a name the plan refuses for keys, which a
//! refused fill quotes in its error ([`Error::Locked`], permanent: exit 2). The holder
//! removes that file when it lets go. Block targets (`--block`, `--mkfs`) are locked the
//! same way on the device node ([`DeviceLock`]); there the holder's pid comes from
//! `/proc/locks`. It must not do anything else with the target.

use std::fs::File;
use std::io::{Read, Write};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

use super::target::Target;
use crate::error::{Error, Result};

pub const LOCK_NAME: &str = ".fillfs-populate.lock";

/// The target's lock, held until dropped.
#[derive(Debug)]
pub struct FillLock {
    /// `None` on a file system that cannot lock (see [`FillLock::acquire`]).
    dir: Option<Flock<File>>,
}

impl FillLock {
    /// Takes the lock of `target`, or fails at once naming who holds it.
    pub fn acquire(target: &Target) -> Result<FillLock> {
        let dir = File::from(
            nix::fcntl::openat(
                target.root(),
                ".",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(std::io::Error::from)?,
        );
        let dir = match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((dir, Errno::EWOULDBLOCK)) => {
                return Err(Error::Locked {
                    target: target.path().display().to_string(),
                    holder: holder(&dir)
                        .unwrap_or_else(|| "its pid and host are not recorded yet".into()),
                });
            }
            // NFS without a lock manager, some FUSE file systems: a fill there is not
            // refused, and cannot refuse a second one.
            Err((_, e @ (Errno::ENOLCK | Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL))) => {
                tracing::warn!(target = %target.path().display(), error = %e, "the target's file system cannot be locked; a second fill into it would not be refused");
                return Ok(FillLock { dir: None });
            }
            Err((_, e)) => return Err(std::io::Error::from(e).into()),
        };
        let me = format!(
            "pid {} on host {} since {}",
            std::process::id(),
            hostname(),
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        );
        // Whatever sits at the name (a stale record, a planted link) is replaced.
        let _ = nix::unistd::unlinkat(&*dir, LOCK_NAME, UnlinkatFlags::NoRemoveDir);
        let written = nix::fcntl::openat(
            &*dir,
            LOCK_NAME,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .map_err(std::io::Error::from)
        .and_then(|fd| File::from(fd).write_all(format!("{me}\n").as_bytes()));
        if let Err(e) = written {
            // The lock holds without the record; a refused fill just cannot say who.
            tracing::debug!(error = %e, "could not record the lock holder");
        }
        tracing::debug!(holder = %me, "target locked");
        Ok(FillLock { dir: Some(dir) })
    }
}

impl Drop for FillLock {
    fn drop(&mut self) {
        // Removed while still locked; the lock goes with the descriptor right after.
        if let Some(dir) = &self.dir {
            let _ = nix::unistd::unlinkat(&**dir, LOCK_NAME, UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// A block target's lock (the device node or image file), held until dropped.
#[derive(Debug)]
pub struct DeviceLock {
    _file: Flock<File>,
}

impl DeviceLock {
    /// Takes the lock of device (or image file) `path`, or fails at once naming the pid
    /// that holds it.
    pub fn acquire(path: &std::path::Path) -> Result<DeviceLock> {
        let file = File::open(path)
            .map_err(|e| Error::InvalidOption(format!("target {}: {e}", path.display())))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(file) => Ok(DeviceLock { _file: file }),
            Err((file, Errno::EWOULDBLOCK)) => Err(Error::Locked {
                target: path.display().to_string(),
                holder: device_holder(&file).map_or_else(
                    || "its pid is not known".into(),
                    |pid| format!("pid {pid} on host {}", hostname()),
                ),
            }),
            Err((_, e)) => Err(std::io::Error::from(e).into()),
        }
    }
}

/// The pid `/proc/locks` shows holding a `flock` on `file`'s inode.
fn device_holder(file: &File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata().ok()?;
    let dev = m.dev();
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        m.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        // 1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&id.as_str()))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

/// What the holder recorded, read without following a link.
fn holder(dir: &File) -> Option<String> {
    let fd = nix::fcntl::openat(
        dir,
        LOCK_NAME,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let mut text = String::new();
    File::from(fd).take(1024).read_to_string(&mut text).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// This machine's (or pod's: a container has its own) host name.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "an unknown host".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_record() {
        let dir = tempfile::tempdir().unwrap();
        let target = Target::open(dir.path()).unwrap();
        let first = FillLock::acquire(&target).unwrap();
        // Another open file description of the same directory: as another process would.
        let again = Target::open(dir.path()).unwrap();
        match FillLock::acquire(&again) {
            Err(Error::Locked { holder, .. }) => {
                assert!(
                    holder.starts_with(&format!("pid {} on host ", std::process::id())),
                    "{holder}"
                );
                assert!(holder.contains(" since "), "{holder}");
            }
            other => panic!("{other:?}"),
        }
        drop(first);
        assert!(
            !dir.path().join(LOCK_NAME).exists(),
            "the record goes with the lock"
        );
        let _second = FillLock::acquire(&again).unwrap();
    }

    #[test]
    fn an_image_file_is_locked_and_the_holder_found_in_proc_locks() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::write(&img, b"").unwrap();
        let first = DeviceLock::acquire(&img).unwrap();
        match DeviceLock::acquire(&img) {
            Err(Error::Locked { holder, .. }) => assert!(
                holder.starts_with(&format!("pid {} on host", std::process::id())),
                "{holder}"
            ),
            other => panic!("{other:?}"),
        }
        drop(first);
        DeviceLock::acquire(&img).unwrap();
    }
}
