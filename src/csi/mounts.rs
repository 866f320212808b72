//! Telling whether a fillfs mount is still served, without hanging on it, and removing the
//! ones that are not. Owns the rule for what counts as a stale fillfs mount; it must not
//! create mounts (that is [`crate::fuse::spawn`]) nor parse the mount table
//! ([`crate::mountinfo`]).
//!
//! A FUSE mount outlives the process that served it: after the plugin dies, its mounts stay
//! in the table and every access fails with ENOTCONN ("transport endpoint is not
//! connected"). A mount whose server is alive but stuck (stopped, deadlocked) is worse: a
//! look at it waits for ever. So every look at a mount runs on a thread of its own and is
//! given [`PROBE_TIMEOUT`]: a mount that has not answered by then is *frozen*. The look is
//! a `statfs`, which the kernel always sends to the FUSE server (a `stat` may be answered
//! from attributes the kernel cached for the metadata TTL, and kubelet stats volumes
//! often). A
//! frozen fillfs mount is ended: its FUSE connection is aborted through `fusectl` (which
//! also releases every process waiting on it, our probe included) and it is detached.

use std::path::Path;
use std::time::Duration;

pub use crate::mountinfo::MountEntry;

/// How long a mount may take to answer a `stat` before it counts as frozen.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a look at a mount point found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Its server answered.
    Answers,
    /// Its server is gone (ENOTCONN).
    Disconnected,
    /// No answer within the timeout.
    Frozen,
    /// Could not look (no thread to look with): treated as answering, never ended.
    Unknown,
}

/// Looks at `path` (`statfs`) from a thread of its own, waiting at most `timeout`. A
/// frozen mount's thread stays blocked until the mount answers or its connection is
/// aborted.
pub async fn probe(path: &Path, timeout: Duration) -> Probe {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let p = path.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("fillfs-probe".into())
        .spawn(move || {
            let r = nix::sys::statfs::statfs(&p);
            let _ = tx.send(matches!(r, Err(nix::errno::Errno::ENOTCONN)));
        });
    if spawned.is_err() {
        return Probe::Unknown;
    }
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(true)) => Probe::Disconnected,
        Ok(_) => Probe::Answers,
        Err(_) => Probe::Frozen,
    }
}

/// Detaches `path` now (MNT_DETACH): it leaves the namespace at once, and a process that
/// still holds a file in it keeps only that.
pub fn detach(path: &Path) -> std::io::Result<()> {
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Where the kernel's FUSE control file system lives.
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Aborts the FUSE connection behind `m` (its server is frozen): every request waiting on
/// it fails with ENOTCONN at once, and so will later ones. Mounts `fusectl` if it is not
/// (as root). Best effort: says why it could not.
pub fn abort_connection(m: &MountEntry) -> std::io::Result<()> {
    let dir = Path::new(FUSECTL);
    let mounted = crate::mountinfo::table()
        .iter()
        .any(|e| e.fs_type == "fusectl" && e.mount_point == dir);
    if !mounted {
        nix::mount::mount(
            Some("fusectl"),
            dir,
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )?;
    }
    // The connection's name is the kernel's dev_t of the mount: MAJOR << 20 | MINOR.
    let (major, minor) = m.device;
    let conn = (u64::from(major) << 20) | u64::from(minor);
    std::fs::write(dir.join(conn.to_string()).join("abort"), "1")
}

/// Ends a fillfs mount that does not answer: aborts its connection, then detaches it.
pub fn end_frozen(m: &MountEntry) -> std::io::Result<()> {
    if let Err(e) = abort_connection(m) {
        tracing::warn!(mountpoint = %m.mount_point.display(), error = %e, "could not abort the frozen mount's FUSE connection; detaching it anyway");
    }
    detach(&m.mount_point)
}
