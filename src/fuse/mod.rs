//! The thin FUSE adapter: translates kernel requests into calls on [`crate::fs::Fs`] and
//! answers them from tokio tasks, so one slow fetch never holds up other requests (the
//! fuser request threads only dispatch). It holds no file system logic of its own.
//!
//! [`spawn`] mounts, tunes the kernel connection (read-ahead, background requests) and
//! serves from background threads, returning a [`MountHandle`] (the CSI node plugin holds
//! many). [`mount`] is `fillfs mount`: spawn, then serve until SIGINT/SIGTERM or `umount`.
//!
//! Files are opened with `FOPEN_KEEP_CACHE`: an inode is one version of an object (see
//! [`crate::fs::inode`]), so its page cache can never hold another version's bytes. When a
//! listing shows a new version, [`forget_replaced_names`] tells the kernel to drop the
//! name's cached entry, so the next open looks it up and gets the new inode.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request, SessionACL,
};
use tokio::runtime::Handle;

use crate::error::{Error, Result};
use crate::fs::{Fs, Ino, Kind, Node};

/// Kernel-side tuning asked for at INIT; the kernel may grant less.
const MAX_READAHEAD: u32 = 1024 * 1024;
const MAX_BACKGROUND: u16 = 256;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountConfig {
    pub fs_name: String,
    pub allow_other: bool,
    /// fuser request threads (each with its own /dev/fuse fd).
    pub threads: usize,
    /// Kernel read-ahead of the mount's backing device, in bytes (root only; 0 = leave it).
    pub kernel_read_ahead: u64,
}

struct Adapter {
    fs: Arc<Fs>,
    rt: Handle,
    ttl: Duration,
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.to_errno())
}

fn attr(fs: &Fs, n: &Node) -> FileAttr {
    let cfg = fs.config();
    let (kind, perm, nlink) = match n.kind {
        Kind::File => (FileType::RegularFile, cfg.file_mode, 1),
        Kind::Dir => (FileType::Directory, cfg.dir_mode, 2),
    };
    FileAttr {
        ino: INodeNo(n.ino),
        size: n.size,
        blocks: n.size.div_ceil(512),
        atime: n.mtime,
        mtime: n.mtime,
        ctime: n.mtime,
        crtime: n.mtime,
        kind,
        perm,
        nlink,
        uid: cfg.uid,
        gid: cfg.gid,
        rdev: 0,
        blksize: 1024 * 1024,
        flags: 0,
    }
}

/// One page of directory handle `fh` from the kernel's `offset`: entries are numbered
/// ".", "..", then the handle's listing; `add(next_offset, ino, name, kind)` returns true
/// once the reply is full. Waits only for the listing's entries from this page on (they
/// are published as LIST pages arrive, see [`crate::fs::listing`]), and each page costs
/// its own entries, not every entry before it. A failure is logged and turned into the
/// kernel's errno.
async fn dir_page(
    fs: &Fs,
    op: &str,
    ino: Ino,
    fh: u64,
    offset: u64,
    mut add: impl FnMut(u64, Ino, &str, Kind) -> bool,
) -> std::result::Result<(), Errno> {
    let fail = |e: Error| {
        log_failure(op, &format_args!("inode {ino}"), &e);
        errno(&e)
    };
    let listing = fs.dir_listing(fh, offset == 0).await.map_err(fail)?;
    let parent = fs.getattr(ino).map(|n| n.parent).unwrap_or(ino);
    let first = offset.saturating_sub(2) as usize;
    listing
        .read_from(first, |entries| {
            let dots = [(ino, ".", Kind::Dir), (parent, "..", Kind::Dir)];
            let listed = entries.iter().map(|e| (e.ino, e.name.as_str(), e.kind));
            let page = dots.into_iter().skip(offset as usize).chain(listed);
            for (i, (ino, name, kind)) in (offset..).zip(page) {
                if add(i + 1, ino, name, kind) {
                    break;
                }
            }
        })
        .await
        .map_err(fail)
}

/// Logs an error answered to the kernel: expected misses quietly, store failures loudly.
fn log_failure(op: &str, what: &dyn std::fmt::Display, e: &Error) {
    if e.to_errno() == libc::ENOENT {
        tracing::debug!(op, %what, "not found");
    } else {
        tracing::error!(op, %what, error = %e, "request failed");
    }
}

impl fuser::Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let ra = config
            .set_max_readahead(MAX_READAHEAD)
            .or_else(|max| config.set_max_readahead(max));
        let bg = config
            .set_max_background(MAX_BACKGROUND)
            .or_else(|max| config.set_max_background(max));
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        let _ =
            config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS | InitFlags::FUSE_ASYNC_READ);
        // Direct I/O submitted asynchronously (as libfuse asks by default): an O_DIRECT
        // reader's requests at iodepth 16 reach us together, not one at a time (measured:
        // fio randread 256 KiB at iodepth 16 was no faster than at iodepth 1 without it).
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        // Always READDIRPLUS (not the kernel's AUTO heuristic): attributes cost nothing
        // extra here, they come with the listing.
        if config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS)
            .is_err()
        {
            tracing::debug!("the kernel does not offer READDIRPLUS: plain READDIR");
        }
        tracing::debug!(?ra, ?bg, "kernel connection tuned");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (fs, ttl) = (self.fs.clone(), self.ttl);
        let Some(name) = name.to_str().map(str::to_string) else {
            reply.error(Errno::ENOENT);
            return;
        };
        self.rt.spawn(async move {
            match fs.lookup(parent.0, &name).await {
                Ok(n) => reply.entry(&ttl, &attr(&fs, &n), Generation(0)),
                Err(e) => {
                    log_failure("lookup", &name, &e);
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(n) => reply.attr(&self.ttl, &attr(&self.fs, &n)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            reply.error(Errno::from_i32(libc::EROFS));
            return;
        }
        match self.fs.open(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        tracing::trace!(ino = ino.0, fh = fh.0, offset, size, "read");
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            match fs.read(fh.0, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    log_failure("read", &format_args!("inode {} offset {offset}", ino.0), &e);
                    reply.error(Errno::EIO);
                }
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok(); // read-only: nothing to flush
    }

    /// Objects carry no extended attributes. Answered ENOSYS, which the kernel remembers
    /// for the whole mount: every later getxattr (and listxattr below) fails with
    /// EOPNOTSUPP at once, with no round trip. `ls -l` asks two of them per entry
    /// (`security.selinux`, `system.posix_acl_access`); answered ENODATA they cost 40,000
    /// round trips for 20,000 entries, most of a warm `ls -l` (bench/results/readpath.md).
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            let page = dir_page(
                &fs,
                "readdir",
                ino.0,
                fh.0,
                offset,
                |next, ino, name, kind| {
                    let kind = if kind == Kind::Dir {
                        FileType::Directory
                    } else {
                        FileType::RegularFile
                    };
                    reply.add(INodeNo(ino), next, kind, name)
                },
            );
            match page.await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    /// READDIR and LOOKUP in one (the connection asks for it at init): each entry comes
    /// with its attributes, from the handle's listing, so `ls -l` (or any walk that
    /// stats what it lists) costs the kernel no LOOKUP per entry: measured on 20,000
    /// objects in `bench/results/readpath.md`. The kernel keeps these entries as if looked
    /// up; inodes are never forgotten here, so nothing else is needed.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (fs, ttl) = (self.fs.clone(), self.ttl);
        self.rt.spawn(async move {
            let dir = ino.0;
            let page = dir_page(
                &fs,
                "readdirplus",
                dir,
                fh.0,
                offset,
                |next, entry, name, _| {
                    // The name as the newest listing has it: a listing taken before a path
                    // was replaced must not link the name to the old version in the kernel
                    // (plain READDIR creates no entries; this does).
                    let node = if next <= 2 {
                        fs.getattr(entry).ok()
                    } else {
                        fs.child(dir, name).or_else(|| fs.getattr(entry).ok())
                    };
                    let Some(node) = node else {
                        return false; // listed, so known; an entry that is not is left out
                    };
                    let a = attr(&fs, &node);
                    reply.add(INodeNo(node.ino), next, name, &ttl, &a, Generation(0))
                },
            );
            match page.await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        });
    }

    /// No ioctl is supported. Answered ENOTTY ("not a terminal", what `isatty()` and
    /// stdio's buffering check expect of a regular file) without fuser's default warning,
    /// which logged three lines for every buffered `open()` of a file in the mount.
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        tracing::trace!(cmd, "ioctl: not supported");
        reply.error(Errno::ENOTTY);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Object stores have no capacity; report a large, read-only, empty-free file system.
        reply.statfs(0, 0, 0, 0, 0, 1024 * 1024, 255, 1024 * 1024);
    }
}

/// A live mount served by a background session (threads of fuser's own). Dropping it
/// unmounts; [`MountHandle::unmount`] does so and reports why it could not.
pub struct MountHandle {
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
}

impl std::fmt::Debug for MountHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountHandle")
            .field("mountpoint", &self.mountpoint)
            .finish()
    }
}

impl MountHandle {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// False once the session has ended: unmounted behind our back (`umount`), or the
    /// kernel connection was aborted.
    pub fn is_alive(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| !s.guard.is_finished())
    }

    /// Asks the kernel to unmount. A busy mount (a process still has a file open) is an
    /// error and the mount stays served, so the caller can retry; after success,
    /// [`join`](Self::join) waits for the session threads.
    pub fn try_unmount(&self) -> Result<()> {
        match nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => Ok(()),
            Err(e) => Err(Error::Io(std::io::Error::new(
                std::io::Error::from(e).kind(),
                format!("unmounting {}: {e}", self.mountpoint.display()),
            ))),
        }
    }

    /// Waits for the session to end (after an unmount by anyone).
    pub fn join(mut self) -> Result<()> {
        let session = self.session.take().expect("session present until consumed");
        session.join().map_err(Error::Io)?;
        tracing::info!(mountpoint = %self.mountpoint.display(), "unmounted");
        Ok(())
    }
}

impl Drop for MountHandle {
    /// Never blocks: a mount still served is detached lazily (it disappears from the
    /// namespace now and ends when its last open file is closed).
    fn drop(&mut self) {
        if let Some(session) = self.session.take()
            && !session.guard.is_finished()
        {
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Mounts `fs` at `mountpoint` and serves it from background threads until the returned
/// handle is unmounted or dropped. Replies are computed on `rt`.
pub fn spawn(fs: Arc<Fs>, rt: Handle, mountpoint: &Path, cfg: &MountConfig) -> Result<MountHandle> {
    match std::fs::metadata(mountpoint) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::InvalidOption(format!(
                "mountpoint {} is not a directory",
                mountpoint.display()
            )));
        }
        Err(e) => {
            return Err(Error::InvalidOption(format!(
                "mountpoint {}: {e}",
                mountpoint.display()
            )));
        }
    }
    let mut options = fuser::Config::default();
    options.mount_options = vec![
        MountOption::FSName(cfg.fs_name.clone()),
        MountOption::Subtype("fillfs".into()),
        MountOption::RO,
        MountOption::NoAtime,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::DefaultPermissions,
    ];
    if cfg.allow_other {
        options.acl = SessionACL::All;
    }
    options.n_threads = Some(cfg.threads.max(1));
    options.clone_fd = cfg.threads > 1;

    let ttl = fs.config().metadata_ttl;
    let adapter = Adapter {
        fs: fs.clone(),
        rt,
        ttl,
    };
    let session = fuser::Session::new(adapter, mountpoint, &options).map_err(|e| {
        Error::Io(std::io::Error::new(
            e.kind(),
            format!("mounting at {}: {e}", mountpoint.display()),
        ))
    })?;
    forget_replaced_names(&fs, session.notifier())?;
    if cfg.kernel_read_ahead > 0 {
        tune_bdi_readahead(mountpoint, cfg.kernel_read_ahead);
    }
    let session = session.spawn().map_err(Error::Io)?;
    tracing::info!(mountpoint = %mountpoint.display(), "mounted");
    Ok(MountHandle {
        session: Some(session),
        mountpoint: mountpoint.to_path_buf(),
    })
}

/// `fillfs mount`: mounts, calls `on_mounted`, and serves until unmounted — by
/// SIGINT/SIGTERM, or by `umount`.
pub fn mount(
    fs: Arc<Fs>,
    rt: &tokio::runtime::Runtime,
    mountpoint: &Path,
    cfg: &MountConfig,
    on_mounted: impl FnOnce(),
) -> Result<()> {
    let handle = spawn(fs, rt.handle().clone(), mountpoint, cfg)?;
    on_mounted();
    let mp = mountpoint.to_path_buf();
    rt.spawn(async move {
        wait_for_shutdown_signal().await;
        tracing::info!(mountpoint = %mp.display(), "signal received, unmounting");
        if let Err(e) = nix::mount::umount2(&mp, nix::mount::MntFlags::empty()) {
            // Not root: let fusermount3 do it.
            let status = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg(&mp)
                .status();
            if !matches!(status, Ok(s) if s.success()) {
                tracing::error!(mountpoint = %mp.display(), error = %e, "unmount failed (is the mount busy?)");
            }
        }
    });
    handle.join()
}

/// Makes the kernel drop its cached entry of every name whose listing shows a new version
/// (FUSE_NOTIFY_INVAL_ENTRY), so the next lookup returns the new inode instead of the old
/// one for up to another TTL. The notifications go out from a thread of their own: the
/// kernel handles one under the directory's lock, which a lookup waiting for the very
/// listing that found the change may hold. The thread ends with the file system.
fn forget_replaced_names(fs: &Fs, notifier: fuser::Notifier) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel::<(u64, String)>();
    std::thread::Builder::new()
        .name("fillfs-inval".into())
        .spawn(move || {
            for (parent, name) in rx {
                // ENOENT: the kernel had no entry cached; nothing to drop.
                if let Err(e) = notifier.inval_entry(INodeNo(parent), OsStr::new(&name)) {
                    tracing::debug!(parent, name, error = %e, "inval_entry");
                }
            }
        })?;
    fs.on_replaced(move |parent, name| {
        let _ = tx.send((parent, name.to_string()));
    });
    Ok(())
}

/// The kernel offers FUSE only 128 KiB of read-ahead at INIT; as root we can raise the
/// mount's backing-device read-ahead, which lets sequential readers send fewer, larger
/// requests (measured: 584 → 944 MB/s for `dd bs=1M` from a file:// mount). Best effort.
fn tune_bdi_readahead(mountpoint: &Path, bytes: u64) {
    // Not stat(): the session does not serve requests yet, a GETATTR would deadlock.
    let target = mountpoint
        .canonicalize()
        .unwrap_or_else(|_| mountpoint.to_path_buf());
    let Some((major, minor)) = crate::mountinfo::mounted_at(&target).map(|m| m.device) else {
        return;
    };
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match std::fs::write(&path, (bytes / 1024).to_string()) {
        Ok(()) => tracing::debug!(%path, kib = bytes / 1024, "set kernel read-ahead"),
        Err(e) => tracing::debug!(%path, error = %e, "could not raise kernel read-ahead"),
    }
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn wait_for_shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
