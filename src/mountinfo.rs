//! The mount table, read from `/proc/self/mountinfo`: the one parser every part of fillfs
//! uses (the CSI plugin's stale-mount rule, the FUSE adapter's read-ahead tuning, tests).
//! It only reads; it must not mount, unmount or touch a mount point (a `stat` of a FUSE
//! mount can block; see [`crate::csi::mounts`] for how that is done safely).

use std::path::{Path, PathBuf};

/// One line of the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    /// e.g. `fuse.fillfs`, `ext4`.
    pub fs_type: String,
    pub source: String,
    /// The device (`major`, `minor`) of the mount: its `/sys/class/bdi/MAJOR:MINOR`; for
    /// FUSE, the connection's name in `/sys/fs/fuse/connections` is the kernel's dev_t,
    /// `MAJOR << 20 | MINOR` (the minor alone for FUSE's anonymous devices).
    pub device: (u32, u32),
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
pub fn table() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| parse(&s))
        .unwrap_or_default()
}

/// The entry mounted last at `path` (the one a lookup of the path sees), if any. `path`
/// is compared as given: pass a canonical path.
pub fn mounted_at(path: &Path) -> Option<MountEntry> {
    table().into_iter().rev().find(|m| m.mount_point == path)
}

/// Parses mountinfo text (see proc(5)): field 3 is `major:minor`, field 5 the mount point,
/// and after the `-` separator come the type and the source. Fields are separated by single
/// spaces; spaces, tabs, newlines and backslashes inside them are octal-escaped (`\040`).
/// Lines that do not have that shape are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let (major, minor) = fields.get(2)?.split_once(':')?;
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                fs_type: unescape(fields.get(sep + 1)?),
                source: unescape(fields.get(sep + 2).unwrap_or(&"")),
                device: (major.parse().ok()?, minor.parse().ok()?),
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
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            out.push(v as u8); // at most \377 is valid; higher wraps, as the kernel never writes it
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_and_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    90 29 0:52 / /var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/src/mount ro,nosuid shared:7 - fuse fillfs:s3://b/p/ ro,user_id=0\n\
                    91 29 0:53 / /tab\\011and\\134back\\012line rw - fuse.fillfs fillfs:file:///a\\040b rw\n\
                    not a mount line\n";
        let m = parse(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!((m[0].fs_type.as_str(), m[0].device), ("ext3", (98, 0)));
        assert!(!m[0].is_fillfs());
        assert!(m[1].is_fillfs());
        assert_eq!(m[1].source, "fillfs:s3://b/p/");
        assert_eq!(m[1].device, (0, 52));
        assert_eq!(m[2].mount_point, PathBuf::from("/tab\tand\\back\nline"));
        assert_eq!(m[2].source, "fillfs:file:///a b");
        assert!(m[2].is_fillfs());
    }

    #[test]
    fn the_live_table_has_the_root() {
        assert!(table().iter().any(|m| m.mount_point == Path::new("/")));
    }
}
