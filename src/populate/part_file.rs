//! A file being written by a fill: `NAME.fillfs-part` in the target, created (and for large
//! files preallocated) before the first byte arrives, written with positional writes by any
//! number of ranges at once, and renamed to `NAME` only by [`PartFile::finish`], after its
//! mode, owner, mtime and version are set through the same descriptor. Nothing ever looks
//! complete before it is.
//!
//! **Names.** `NAME.fillfs-part` when that fits in 255 bytes; for longer names (244–255
//! bytes) `.fillfs-part-<MD5 of NAME>`, in the same directory. Either is derived from `NAME`
//! alone ([`part_name`]), so a rerun finds an interrupted fill's part files. The plan refuses
//! keys with either form, so the name is fillfs's: whatever sits there (a leftover, a planted
//! link) is removed, and the part file is created with `O_CREAT | O_EXCL | O_NOFOLLOW` in a
//! directory reached without following links (`target.rs`).
//!
//! **Who removes them.** [`PartFiles`] knows every part file of a fill that is neither
//! finished nor discarded. A fill that stops on an error calls [`PartFiles::remove_all`]
//! before it returns: from then on no part file can be created or renamed, and every one
//! still known is removed, so a failed fill leaves none behind (a killed one leaves them to
//! the next run, which replaces them).
//!
//! **The version.** A finished file carries the ETag it was copied from in the user xattr
//! `user.fillfs.etag`, so a later fill can tell a file of the listed version from one of the
//! same size and mtime (file systems without user xattrs fall back to size and mtime).
//!
//! Every call here is blocking file I/O: the copier runs them on tokio's blocking pool, one
//! hop per step (create, each range, finish), so the runtime's workers only move bytes
//! between the network and these calls.
//!
//! **Early writeback.** After each write the kernel is asked to start writing that range to
//! the device (`sync_file_range(SYNC_FILE_RANGE_WRITE)`: it queues the I/O and returns; it
//! waits for nothing). Left alone, the kernel keeps dirty pages until 10 % of RAM is dirty
//! or 30 s have passed, so a fill of a few GiB ends with all of it still in memory and the
//! unmount that follows every fill (or `--fsync`) pays for the whole device write at the end.
//! Started early, the device writes while the network reads, and the final flush finds
//! little left. It must not decide what to fetch or check (see `copy.rs`).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use md5::{Digest, Md5};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

use super::plan::{PART_PREFIX, PART_SUFFIX};
use super::target::{Dir, Target, set_owner_and_mode};
use crate::error::{Error, Result};

/// Longest file name Linux accepts.
const NAME_MAX: usize = 255;

/// The user xattr holding the ETag a finished file was copied from.
pub const ETAG_XATTR: &str = "user.fillfs.etag";

/// What a finished file gets besides its bytes.
#[derive(Debug, Clone, Default)]
pub struct FileAttrs {
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mtime: Option<SystemTime>,
    /// The ETag of the object version copied, kept in [`ETAG_XATTR`].
    pub etag: Option<String>,
}

/// The part-file name of `name`: `NAME.fillfs-part`, or `.fillfs-part-<md5 hex>` when that
/// would be longer than 255 bytes.
pub fn part_name(name: &OsStr) -> OsString {
    if name.len() + PART_SUFFIX.len() <= NAME_MAX {
        let mut n = name.to_os_string();
        n.push(PART_SUFFIX);
        n
    } else {
        let digest = Md5::digest(name.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        OsString::from(format!("{PART_PREFIX}{hex}"))
    }
}

/// The part files of one fill that are neither finished nor discarded (see the module
/// comment).
#[derive(Debug)]
pub struct PartFiles {
    target: Arc<Target>,
    live: Mutex<Live>,
}

#[derive(Debug, Default)]
struct Live {
    /// Set by [`PartFiles::remove_all`]: nothing may be created or renamed any more.
    stopped: bool,
    next_id: u64,
    files: HashMap<u64, (Arc<Dir>, OsString)>,
}

/// Why a part file could not be created or finished: the fill stopped.
fn stopped() -> Error {
    Error::Io(std::io::Error::new(
        std::io::ErrorKind::Interrupted,
        "the fill stopped",
    ))
}

impl PartFiles {
    pub fn new(target: Arc<Target>) -> Arc<PartFiles> {
        Arc::new(PartFiles {
            target,
            live: Mutex::new(Live::default()),
        })
    }

    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }

    /// Creates the part file of `rel` (a path relative to the target whose directory
    /// exists), replacing whatever has its name. With `preallocate`, reserves `size` bytes
    /// up front, which also fails fast with ENOSPC; file systems without `fallocate` get a
    /// sparse file of that size instead.
    pub fn create(
        self: &Arc<Self>,
        rel: &Path,
        size: u64,
        preallocate: bool,
        early_writeback: bool,
    ) -> Result<PartFile> {
        let dir = Arc::new(self.target.dir(rel.parent().unwrap_or(Path::new("")))?);
        let name = rel
            .file_name()
            .expect("a file of the plan has a name")
            .to_os_string();
        let part = part_name(&name);
        match nix::unistd::unlinkat(dir.fd(), part.as_os_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(self.io_error(&dir, &part, e)),
        }
        let fd = nix::fcntl::openat(
            dir.fd(),
            part.as_os_str(),
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| self.io_error(&dir, &part, e))?;
        let file = File::from(fd);
        let id = {
            let mut live = self.live.lock().expect("part files lock");
            if live.stopped {
                drop(live);
                let _ =
                    nix::unistd::unlinkat(dir.fd(), part.as_os_str(), UnlinkatFlags::NoRemoveDir);
                return Err(stopped());
            }
            live.next_id += 1;
            let id = live.next_id;
            live.files.insert(id, (dir.clone(), part.clone()));
            id
        };
        let p = PartFile {
            file,
            dir,
            name,
            part,
            early_writeback,
            owner: self.clone(),
            id,
        };
        if preallocate && size > 0 {
            match nix::fcntl::fallocate(
                &p.file,
                nix::fcntl::FallocateFlags::empty(),
                0,
                size as i64,
            ) {
                Ok(()) => {}
                Err(Errno::ENOSPC) => {
                    p.unlink();
                    return Err(std::io::Error::from(Errno::ENOSPC).into());
                }
                Err(_) => p.file.set_len(size)?,
            }
        }
        Ok(p)
    }

    /// Stops the fill's part files: none can be created or renamed from now on, and every
    /// one not finished or discarded is removed. Returns how many were removed.
    pub fn remove_all(&self) -> usize {
        let files = {
            let mut live = self.live.lock().expect("part files lock");
            live.stopped = true;
            std::mem::take(&mut live.files)
        };
        let mut removed = 0;
        for (dir, part) in files.into_values() {
            if nix::unistd::unlinkat(dir.fd(), part.as_os_str(), UnlinkatFlags::NoRemoveDir).is_ok()
            {
                removed += 1;
            }
        }
        removed
    }

    /// Removes the part files an interrupted fill left for `rels` (files about to be
    /// copied). Returns how many were removed and the bytes they held.
    pub fn reclaim<'a>(&self, rels: impl IntoIterator<Item = &'a Path>) -> (u64, u64) {
        let (mut files, mut bytes) = (0, 0);
        let mut dir: Option<Dir> = None;
        for rel in rels {
            let parent = rel.parent().unwrap_or(Path::new(""));
            if dir.as_ref().is_none_or(|d| d.rel() != parent) {
                dir = self.target.dir(parent).ok();
            }
            let (Some(d), Some(name)) = (&dir, rel.file_name()) else {
                continue;
            };
            let part = part_name(name);
            if let Some(st) = super::target::regular_file(d, &part)
                && nix::unistd::unlinkat(d.fd(), part.as_os_str(), UnlinkatFlags::NoRemoveDir)
                    .is_ok()
            {
                files += 1;
                bytes += st.st_blocks as u64 * 512;
            }
        }
        (files, bytes)
    }

    fn forget(&self, id: u64) -> bool {
        let mut live = self.live.lock().expect("part files lock");
        live.files.remove(&id).is_some() && !live.stopped
    }

    fn io_error(&self, dir: &Dir, name: &OsStr, e: Errno) -> Error {
        Error::Io(std::io::Error::new(
            std::io::Error::from(e).kind(),
            format!("{}: {e}", self.target.display(&dir.rel().join(name))),
        ))
    }
}

/// An open part file.
#[derive(Debug)]
pub struct PartFile {
    file: File,
    dir: Arc<Dir>,
    /// The final name, in `dir`.
    name: OsString,
    part: OsString,
    early_writeback: bool,
    owner: Arc<PartFiles>,
    id: u64,
}

impl PartFile {
    /// A path naming this open file (through `/proc/self/fd`), to read it again: whatever
    /// happens to the names in the target meanwhile, it is this file that is read.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// The part file's name relative to the target, for messages and tests.
    pub fn rel(&self) -> PathBuf {
        self.dir.rel().join(&self.part)
    }

    /// Writes `chunks`, back to back, at `offset` and starts their writeback.
    pub fn write_chunks_at(&self, chunks: &[bytes::Bytes], offset: u64) -> std::io::Result<()> {
        let len = write_all_vectored_at(&self.file, chunks, offset)?;
        if self.early_writeback {
            start_writeback(&self.file, offset, len);
        }
        Ok(())
    }

    /// Length on disk now.
    pub fn len_on_disk(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Sets owner, mode, mtime and version, then renames the part file to its final name
    /// (replacing whatever has it: the key's file wins): from here on the file looks
    /// complete. Fails without renaming once the fill has stopped.
    pub fn finish(self, attrs: &FileAttrs) -> Result<()> {
        let f = &self.file;
        set_owner_and_mode(f, (attrs.uid, attrs.gid), attrs.mode)?;
        if let Some(mtime) = attrs.mtime {
            f.set_times(
                std::fs::FileTimes::new()
                    .set_modified(mtime)
                    .set_accessed(mtime),
            )?;
        }
        if let Some(etag) = &attrs.etag {
            set_etag(f, etag);
        }
        if !self.owner.forget(self.id) {
            return Err(stopped());
        }
        nix::fcntl::renameat(
            self.dir.fd(),
            self.part.as_os_str(),
            self.dir.fd(),
            self.name.as_os_str(),
        )
        .map_err(|e| self.owner.io_error(&self.dir, &self.name, e))?;
        Ok(())
    }

    /// Removes the part file's name (after a failed copy; writes of aborted ranges may
    /// still hold the descriptor).
    pub fn unlink(&self) {
        if self.owner.forget(self.id) {
            let _ = nix::unistd::unlinkat(
                self.dir.fd(),
                self.part.as_os_str(),
                UnlinkatFlags::NoRemoveDir,
            );
        }
    }

    /// Removes the part file (after a failed copy).
    pub fn discard(self) {
        self.unlink();
    }
}

/// Records `etag` on a finished file. A file system without user xattrs (or a full one)
/// only loses the check it allows; the file itself is complete.
fn set_etag(f: &File, etag: &str) {
    let name = std::ffi::CString::new(ETAG_XATTR).expect("no NUL");
    // SAFETY: fsetxattr reads `name` (NUL-terminated) and `etag.len()` bytes of `etag`,
    // both alive for the call, on a descriptor we own.
    let r = unsafe {
        libc::fsetxattr(
            f.as_raw_fd(),
            name.as_ptr(),
            etag.as_ptr().cast(),
            etag.len(),
            0,
        )
    };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not record the ETag in an xattr");
    }
}

/// What [`read_etag`] found on a file.
#[derive(Debug, PartialEq, Eq)]
pub enum RecordedEtag {
    Some(String),
    /// The file has none (written by something else, or before fillfs recorded them).
    None,
    /// The file system keeps no user xattrs: nothing can be told from them.
    Unsupported,
}

/// The ETag a finished file was copied from, read from `name` in `dir` without following
/// a link.
pub fn read_etag(dir: &Dir, name: &OsStr) -> RecordedEtag {
    let Ok(fd) = nix::fcntl::openat(
        dir.fd(),
        name,
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) else {
        return RecordedEtag::None;
    };
    let xname = std::ffi::CString::new(ETAG_XATTR).expect("no NUL");
    let mut buf = vec![0u8; 1024];
    // SAFETY: fgetxattr writes at most `buf.len()` bytes into `buf`, alive for the call.
    let n = unsafe {
        libc::fgetxattr(
            fd.as_fd().as_raw_fd(),
            xname.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return match Errno::last() {
            Errno::ENOTSUP => RecordedEtag::Unsupported,
            _ => RecordedEtag::None,
        };
    }
    buf.truncate(n as usize);
    match String::from_utf8(buf) {
        Ok(s) => RecordedEtag::Some(s),
        Err(e) => RecordedEtag::Some(String::from_utf8_lossy(&e.into_bytes()).into_owned()),
    }
}

/// Writes `chunks` back to back at `offset` with as few `pwritev` calls as the kernel
/// allows (1024 buffers each), so bytes that arrived in many network chunks are written
/// without first being copied into one buffer. Returns the bytes written. (std has no
/// positional vectored write; nix's `pwritev` does not loop over short writes.)
pub fn write_all_vectored_at(
    file: &File,
    chunks: &[bytes::Bytes],
    offset: u64,
) -> std::io::Result<u64> {
    const IOV_MAX: usize = 1024;
    let mut slices: Vec<std::io::IoSlice<'_>> = chunks
        .iter()
        .filter(|c| !c.is_empty())
        .map(|c| std::io::IoSlice::new(c))
        .collect();
    let mut rest = &mut slices[..];
    let mut at = offset;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(IOV_MAX)];
        let n = match nix::sys::uio::pwritev(file, batch, at as i64) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        at += n as u64;
        std::io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(at - offset)
}

/// Asks the kernel to start writing `len` bytes at `offset` to the device. Only a hint:
/// file systems that cannot (tmpfs, some FUSE) ignore it or fail, and neither matters.
/// `nix` 0.30 has no wrapper for this call.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: a plain syscall on a descriptor we own for the duration of the call; it reads
    // no memory of ours.
    let _ = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn parts(dir: &Path) -> Arc<PartFiles> {
        PartFiles::new(Arc::new(Target::open(dir).unwrap()))
    }

    #[test]
    fn vectored_writes_land_back_to_back_past_the_iov_limit() {
        let dir = tempfile::tempdir().unwrap();
        let p = parts(dir.path())
            .create(Path::new("v"), 0, false, true)
            .unwrap();
        // 2,500 chunks of varied sizes, some empty: more than one pwritev's worth.
        let chunks: Vec<bytes::Bytes> = (0..2500u32)
            .map(|i| bytes::Bytes::from(vec![(i % 251) as u8; (i % 7) as usize]))
            .collect();
        let want: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        p.write_chunks_at(&chunks, 3).unwrap();
        let got = std::fs::read(p.path()).unwrap();
        assert_eq!(&got[..3], &[0, 0, 0]);
        assert_eq!(&got[3..], &want[..]);
    }

    #[test]
    fn finish_renames_with_attributes_and_discard_removes() {
        let dir = tempfile::tempdir().unwrap();
        let final_path = dir.path().join("a.bin");
        let parts = parts(dir.path());
        let p = parts.create(Path::new("a.bin"), 8, true, true).unwrap();
        assert_eq!(p.rel(), Path::new("a.bin.fillfs-part"));
        p.write_chunks_at(&[bytes::Bytes::from_static(b"5678")], 4)
            .unwrap();
        p.write_chunks_at(
            &[
                bytes::Bytes::from_static(b"12"),
                bytes::Bytes::from_static(b"34"),
            ],
            0,
        )
        .unwrap();
        assert_eq!(p.len_on_disk().unwrap(), 8);
        assert!(!final_path.exists(), "not complete before finish");
        let mtime = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
        p.finish(&FileAttrs {
            mode: 0o640,
            mtime: Some(mtime),
            etag: Some("\"abc\"".into()),
            ..Default::default()
        })
        .unwrap();
        let m = std::fs::metadata(&final_path).unwrap();
        assert_eq!(std::fs::read(&final_path).unwrap(), b"12345678");
        assert_eq!(m.permissions().mode() & 0o777, 0o640);
        assert_eq!(m.modified().unwrap(), mtime);
        assert!(!dir.path().join("a.bin.fillfs-part").exists());
        let root = parts.target().dir(Path::new("")).unwrap();
        assert!(
            matches!(
                read_etag(&root, OsStr::new("a.bin")),
                RecordedEtag::Some(e) if e == "\"abc\""
            ) || read_etag(&root, OsStr::new("a.bin")) == RecordedEtag::Unsupported
        );

        let p = parts.create(Path::new("b.bin"), 4, false, false).unwrap();
        p.write_chunks_at(&[bytes::Bytes::from_static(b"x")], 0)
            .unwrap();
        p.discard();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn long_names_get_short_part_names_derived_from_them() {
        assert_eq!(part_name(OsStr::new("x")), "x.fillfs-part");
        let fits = "a".repeat(255 - PART_SUFFIX.len());
        assert_eq!(
            part_name(OsStr::new(&fits)),
            format!("{fits}.fillfs-part").as_str()
        );
        let long = "b".repeat(255);
        let p = part_name(OsStr::new(&long));
        assert!(
            p.len() < 64 && p.to_string_lossy().starts_with(PART_PREFIX),
            "{p:?}"
        );
        assert_eq!(p, part_name(OsStr::new(&long)), "derived, not random");
        assert_ne!(p, part_name(OsStr::new(&"c".repeat(255))));

        let dir = tempfile::tempdir().unwrap();
        let parts = parts(dir.path());
        let f = parts.create(Path::new(&long), 3, true, false).unwrap();
        f.write_chunks_at(&[bytes::Bytes::from_static(b"abc")], 0)
            .unwrap();
        f.finish(&FileAttrs {
            mode: 0o644,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(std::fs::read(dir.path().join(&long)).unwrap(), b"abc");
    }

    #[test]
    fn whatever_has_a_part_name_is_replaced_and_links_are_not_followed() {
        let outer = tempfile::tempdir().unwrap();
        let t = outer.path().join("t");
        std::fs::create_dir(&t).unwrap();
        let victim = outer.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let long = "l".repeat(250);
        for name in ["short", long.as_str()] {
            std::os::unix::fs::symlink(&victim, t.join(part_name(OsStr::new(name)))).unwrap();
        }
        let parts = parts(&t);
        for name in ["short", long.as_str()] {
            let p = parts.create(Path::new(name), 4, true, false).unwrap();
            p.write_chunks_at(&[bytes::Bytes::from_static(b"data")], 0)
                .unwrap();
            p.finish(&FileAttrs {
                mode: 0o666,
                ..Default::default()
            })
            .unwrap();
            assert_eq!(std::fs::read(t.join(name)).unwrap(), b"data");
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read_dir(&t).unwrap().count(), 2);
    }

    #[test]
    fn remove_all_removes_what_is_unfinished_and_stops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let parts = parts(dir.path());
        let done = parts.create(Path::new("done"), 1, false, false).unwrap();
        done.finish(&FileAttrs::default()).unwrap();
        let a = parts.create(Path::new("a"), 1 << 20, true, false).unwrap();
        let b = parts.create(Path::new("b"), 1 << 20, true, false).unwrap();
        assert_eq!(parts.remove_all(), 2);
        assert!(parts.create(Path::new("c"), 1, false, false).is_err());
        assert!(
            a.finish(&FileAttrs::default()).is_err(),
            "no rename after a stop"
        );
        b.discard();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("done")]);
    }

    #[test]
    fn reclaim_removes_the_part_files_of_files_to_copy() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/x.fillfs-part"), vec![1u8; 8192]).unwrap();
        std::fs::write(dir.path().join("y.fillfs-part"), b"other").unwrap();
        let parts = parts(dir.path());
        let (files, bytes) = parts.reclaim([Path::new("d/x"), Path::new("d/absent")]);
        assert_eq!(files, 1);
        assert!(bytes >= 8192);
        assert!(!dir.path().join("d/x.fillfs-part").exists());
        assert!(
            dir.path().join("y.fillfs-part").exists(),
            "only those asked for"
        );
    }
}
