//! Reading the mount table (`/proc/self/mountinfo`) and clearing mounts whose FUSE server
//! is gone. Owns the rule for what counts as a stale fillfs mount; it must not create
//! mounts (that is [`crate::fuse::spawn`]).
//!
//! A FUSE mount outlives the process that served it: after the plugin dies, its mounts stay
//! in the table and every access fails with ENOTCONN ("transport endpoint is not
//! connected"). Those are what [`clear_stale_under`] removes at start-up.

use std::path::{Path, PathBuf};

/// One line of the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    /// e.g. `fuse.fillfs`, `ext4`.
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    /// A fillfs FUSE mount: type `fuse` (or `fuse.fillfs` where the subtype is kept) and a
    /// source named `fillfs:URL` (see `fuse::MountConfig::fs_name`).
    pub fn is_fillfs(&self) -> bool {
        (self.fs_type == "fuse" || self.fs_type.starts_with("fuse."))
            && self.source.starts_with("fillfs:")
    }
}

/// The current mount table; empty if it cannot be read.
pub fn mount_table() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| parse_mountinfo(&s))
        .unwrap_or_default()
}

/// Parses mountinfo text (see proc(5)): field 5 is the mount point, and after the `-`
/// separator come the type and the source. Spaces and the like are octal-escaped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                fs_type: fields.get(sep + 1)?.to_string(),
                source: unescape(fields.get(sep + 2).unwrap_or(&"")),
            })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The entry mounted last at `path` (the one a lookup of the path sees), if any.
pub fn mounted_at(path: &Path) -> Option<MountEntry> {
    mount_table()
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
}

/// Whether the FUSE server behind `path` is gone. Blocks on a live FUSE mount until it
/// answers, so never call it for a mount this process serves from a thread it needs.
pub fn is_disconnected(path: &Path) -> bool {
    matches!(std::fs::metadata(path), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN))
}

/// Detaches `path` now (MNT_DETACH): it leaves the namespace at once, and a process that
/// still holds a file in it keeps only that.
pub fn detach(path: &Path) -> std::io::Result<()> {
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Start-up cleanup: every fillfs mount under `root` whose server is gone is detached.
/// Live ones (another process serves them) are left alone. Returns what was cleared.
pub fn clear_stale_under(root: &Path) -> Vec<PathBuf> {
    let mut cleared = Vec::new();
    for m in mount_table() {
        if !m.is_fillfs() || !m.mount_point.starts_with(root) {
            continue;
        }
        if !is_disconnected(&m.mount_point) {
            tracing::warn!(mountpoint = %m.mount_point.display(), "a fillfs mount served by another process; left alone");
            continue;
        }
        match detach(&m.mount_point) {
            Ok(()) => {
                tracing::info!(mountpoint = %m.mount_point.display(), source = %m.source, "cleared a mount left by a previous run");
                cleared.push(m.mount_point);
            }
            Err(e) => {
                tracing::error!(mountpoint = %m.mount_point.display(), error = %e, "could not clear a stale mount")
            }
        }
    }
    cleared
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_and_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    90 29 0:52 / /var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/src/mount ro,nosuid shared:7 - fuse fillfs:s3://b/p/ ro,user_id=0\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].fs_type, "ext3");
        assert!(!m[0].is_fillfs());
        assert!(m[1].is_fillfs());
        assert_eq!(m[1].source, "fillfs:s3://b/p/");
    }
}
