//! A file being written by a fill: `NAME.fillfs-part` in the target, created (and for large
//! files preallocated) before the first byte arrives, written with positional writes by any
//! number of ranges at once, and renamed to `NAME` only by [`PartFile::finish`], after its
//! mode, owner and mtime are set through the same descriptor. Nothing ever looks complete
//! before it is.
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

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::plan::PART_SUFFIX;
use crate::error::Result;

/// What a finished file gets besides its bytes.
#[derive(Debug, Clone, Copy)]
pub struct FileAttrs {
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mtime: Option<SystemTime>,
}

/// An open `NAME.fillfs-part`.
#[derive(Debug)]
pub struct PartFile {
    file: File,
    part: PathBuf,
    early_writeback: bool,
}

/// `dir/NAME` → `dir/NAME.fillfs-part`.
pub fn part_path(final_path: &Path) -> PathBuf {
    let mut name = final_path.file_name().expect("file name").to_os_string();
    name.push(PART_SUFFIX);
    final_path.with_file_name(name)
}

impl PartFile {
    /// Creates (or truncates) the part file of `final_path`. With `preallocate`, reserves
    /// `size` bytes up front, which also fails fast with ENOSPC; file systems without
    /// `fallocate` get a sparse file of that size instead.
    pub fn create(
        final_path: &Path,
        size: u64,
        preallocate: bool,
        early_writeback: bool,
    ) -> Result<PartFile> {
        let part = part_path(final_path);
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .read(true)
            .mode(0o600)
            .open(&part)?;
        if preallocate && size > 0 {
            match nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, size as i64)
            {
                Ok(()) => {}
                Err(nix::errno::Errno::ENOSPC) => {
                    return Err(std::io::Error::from(nix::errno::Errno::ENOSPC).into());
                }
                Err(_) => file.set_len(size)?,
            }
        }
        Ok(PartFile {
            file,
            part,
            early_writeback,
        })
    }

    pub fn path(&self) -> &Path {
        &self.part
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

    /// Sets mode, owner and mtime, then renames the part file to `final_path`: from here on
    /// the file looks complete.
    pub fn finish(self, final_path: &Path, attrs: FileAttrs) -> Result<()> {
        let f = &self.file;
        f.set_permissions(std::fs::Permissions::from_mode(attrs.mode))?;
        if attrs.uid.is_some() || attrs.gid.is_some() {
            std::os::unix::fs::fchown(f, attrs.uid, attrs.gid)?;
        }
        if let Some(mtime) = attrs.mtime {
            f.set_times(
                std::fs::FileTimes::new()
                    .set_modified(mtime)
                    .set_accessed(mtime),
            )?;
        }
        std::fs::rename(&self.part, final_path)?;
        Ok(())
    }

    /// Removes the part file (after a failed copy).
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.part);
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

    #[test]
    fn vectored_writes_land_back_to_back_past_the_iov_limit() {
        let dir = tempfile::tempdir().unwrap();
        let p = PartFile::create(&dir.path().join("v"), 0, false, true).unwrap();
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
        let p = PartFile::create(&final_path, 8, true, true).unwrap();
        assert_eq!(p.path(), dir.path().join("a.bin.fillfs-part"));
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
        p.finish(
            &final_path,
            FileAttrs {
                mode: 0o640,
                uid: None,
                gid: None,
                mtime: Some(mtime),
            },
        )
        .unwrap();
        let m = std::fs::metadata(&final_path).unwrap();
        assert_eq!(std::fs::read(&final_path).unwrap(), b"12345678");
        assert_eq!(m.permissions().mode() & 0o777, 0o640);
        assert_eq!(m.modified().unwrap(), mtime);
        assert!(!dir.path().join("a.bin.fillfs-part").exists());

        let other = dir.path().join("b.bin");
        let p = PartFile::create(&other, 4, false, false).unwrap();
        p.write_chunks_at(&[bytes::Bytes::from_static(b"x")], 0)
            .unwrap();
        p.discard();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
