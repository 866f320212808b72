//! Real block devices for tests: a loop device over a sparse image, and an ext4 file system
//! on one, mounted on a temporary directory. Both are undone on drop. Off a machine with
//! root and loop devices they skip with a message; under CI=true that is a failure.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A loop device over a sparse image file, detached on drop.
pub struct LoopDev {
    _img: tempfile::TempDir,
    pub dev: String,
}

impl LoopDev {
    pub fn new(size_mib: u64) -> Option<LoopDev> {
        if !nix::unistd::geteuid().is_root() || !Path::new("/dev/loop-control").exists() {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true but loop devices are unavailable");
            }
            eprintln!("SKIPPED: loop-device tests need root and /dev/loop-control");
            return None;
        }
        let img = tempfile::tempdir().unwrap();
        let file: PathBuf = img.path().join("fs.img");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(size_mib << 20)
            .unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        Some(LoopDev { _img: img, dev })
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// An ext4 file system (made with `mkfs_args`) on a loop device, unmounted on drop.
pub struct LoopFs {
    pub mnt: tempfile::TempDir,
    _dev: LoopDev,
}

impl LoopFs {
    pub fn new(size_mib: u64, mkfs_args: &[&str]) -> Option<LoopFs> {
        let dev = LoopDev::new(size_mib)?;
        assert!(
            Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .args(mkfs_args)
                .arg(&dev.dev)
                .status()
                .unwrap()
                .success()
        );
        let mnt = tempfile::tempdir().unwrap();
        assert!(
            Command::new("mount")
                .arg(&dev.dev)
                .arg(mnt.path())
                .status()
                .unwrap()
                .success()
        );
        Some(LoopFs { mnt, _dev: dev })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.mnt.path()).status();
    }
}
