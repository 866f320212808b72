//! Objects overwritten while they are read (issue 12, items 1 and 2), against the loopback
//! S3 server: a reader of the mount or a fill gets one version of an object, whole, or an
//! error; never bytes of two versions. `tests/moto.rs` runs the same against moto.
//!
//! A is `pattern(1, ..)`, B is `pattern(2, ..)`, both 64 MiB: any mix shows as a buffer
//! that is neither.
//!
//! `FILLFS_BIN=/path/to/an/older/fillfs` runs them against another build (each failed on
//! the build before these fixes).

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 64 * MIB;
const A: u64 = 1;
const B: u64 = 2;

/// `fillfs mount s3://BUCKET/prefix` against the emulator (as `common::mount_s3`).
fn mount(emu: &Emulator, prefix: &str, extra: &[&str]) -> Mount {
    let mut cmd = fillfs_under_test();
    cmd.arg("mount")
        .arg(format!("s3://{BUCKET}/{prefix}"))
        .args(["--endpoint", &emu.endpoint(), "--region", "us-east-1"])
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .args(extra);
    spawn_mount(cmd)
}

fn put(emu: &Emulator, key: &str, seed: u64) {
    emu.put_object(BUCKET, key, Bytes::from(pattern(seed, 0, SIZE as usize)));
}

/// Which version `buf`, read at `offset`, is all of: A or B. Panics, saying where, on a mix.
fn version_of(what: &str, buf: &[u8], offset: u64) -> u64 {
    for seed in [A, B] {
        if buf == pattern(seed, offset, buf.len()) {
            return seed;
        }
    }
    let first_diff = |seed| {
        let want = pattern(seed, offset, buf.len());
        offset + buf.iter().zip(&want).take_while(|(a, b)| a == b).count() as u64
    };
    panic!(
        "{what}: {} bytes at {offset} are neither all A nor all B (A up to {}, B up to {})",
        buf.len(),
        first_diff(A),
        first_diff(B)
    );
}

fn read_exact_at(f: &mut std::fs::File, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

/// Item 1, first scenario: 2 MiB read, overwrite, wait past the TTL. A fresh open's first
/// read (5 MiB) returned 3 MiB of A and 2 MiB of B: the kernel kept A's pages.
#[test]
fn a_fresh_open_after_the_ttl_reads_only_the_new_version() {
    if !fuse_available() {
        return;
    }
    let emu = emulator();
    put(&emu, "fresh/obj", A);
    let m = mount(&emu, "fresh", &["--metadata-ttl", "5s"]);
    let path = m.path().join("obj");
    let mut f = std::fs::File::open(&path).unwrap();
    assert_eq!(
        version_of("first read", &read_exact_at(&mut f, 0, 2 * MIB).unwrap(), 0),
        A
    );
    drop(f);
    put(&emu, "fresh/obj", B);
    std::thread::sleep(Duration::from_secs(7));

    let mut f = std::fs::File::open(&path).unwrap();
    let first = read_exact_at(&mut f, 0, 5 * MIB).unwrap();
    assert_eq!(version_of("fresh open, first 5 MiB", &first, 0), B);
    drop(f);
    verify_stream(&path, B, SIZE);
    assert!(m.stop().success());
}

/// Item 1, second scenario: a handle open across the overwrite read 12 MiB of A, then B,
/// with no error. Now it reads A (what was fetched before) and then fails with EIO; a new
/// open after the TTL reads B.
#[test]
fn an_open_handle_reads_its_version_or_fails_never_the_next_one() {
    if !fuse_available() {
        return;
    }
    let emu = emulator();
    put(&emu, "handle/obj", A);
    // Read-ahead of at most 8 MiB (half of half the cache) at 20 MiB/s: the handle cannot
    // have fetched the whole file before the overwrite.
    let m = mount(
        &emu,
        "handle",
        &[
            "--metadata-ttl",
            "1s",
            "--throughput",
            "20",
            "--cache-size",
            "32MiB",
        ],
    );
    let path = m.path().join("obj");
    let mut f = std::fs::File::open(&path).unwrap();
    let mut offset = 0;
    while offset < 12 * MIB {
        let buf = read_exact_at(&mut f, offset, MIB).unwrap();
        assert_eq!(version_of("before the overwrite", &buf, offset), A);
        offset += MIB;
    }
    put(&emu, "handle/obj", B);
    std::thread::sleep(Duration::from_secs(2));
    // Past the TTL: a lookup lists the directory again and finds B.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE);

    let mut failed = None;
    while offset < SIZE {
        match read_exact_at(&mut f, offset, MIB) {
            Ok(buf) => assert_eq!(version_of("the open handle", &buf, offset), A),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "at {offset}: {e}");
                failed = Some(offset);
                break;
            }
        }
        offset += MIB;
    }
    eprintln!("MEASURED: the open handle read A up to {offset} of {SIZE}, then {failed:?}");
    assert!(
        failed.is_some(),
        "the handle read all of A: its read-ahead cannot reach that far"
    );
    drop(f);
    verify_stream(&path, B, SIZE);
    assert!(
        m.log().contains("changed since it was listed"),
        "the EIO is logged with its cause"
    );
    assert!(m.stop().success());
}

/// Item 1, third scenario: a file read in full stayed all-A indefinitely after B was put.
#[test]
fn a_file_read_in_full_is_read_in_its_new_version_after_the_ttl() {
    if !fuse_available() {
        return;
    }
    let emu = emulator();
    put(&emu, "full/obj", A);
    let m = mount(&emu, "full", &["--metadata-ttl", "2s"]);
    let path = m.path().join("obj");
    verify_stream(&path, A, SIZE);
    put(&emu, "full/obj", B);
    std::thread::sleep(Duration::from_secs(3));
    verify_stream(&path, B, SIZE);
    // And it stays B: the kernel's pages of the new inode are B's.
    verify_stream(&path, B, SIZE);
    assert!(m.stop().success());
}

fn populate_cmd(source: &str, target: &Path, extra: &[&str]) -> Command {
    let mut cmd = fillfs_under_test();
    cmd.arg("populate")
        .arg(source)
        .arg(target)
        .args(["--progress", "none"])
        .args(extra)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Waits until a running fill has read 16 MiB, then puts B over `key`.
fn overwrite_after_16_mib(emu: &Emulator, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while emu.stats().get_bytes < 16 * MIB {
        assert!(Instant::now() < deadline, "the fill did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    put(emu, key, B);
}

/// Checks a fill that ran across an overwrite of `file`: success with all of A or all of
/// B, or a failure that names the file and says it changed. Returns the version written.
fn check_fill(out: std::process::Output, file: &Path) -> Option<u64> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{stderr}");
    if out.status.success() {
        let data = std::fs::read(file).unwrap();
        assert_eq!(data.len() as u64, SIZE);
        let mut seen = None;
        for (i, chunk) in data.chunks(MIB as usize).enumerate() {
            let v = version_of("the filled file", chunk, i as u64 * MIB);
            assert!(seen.is_none_or(|s| s == v), "the filled file mixes A and B");
            seen = Some(v);
        }
        seen
    } else {
        assert!(
            stderr.contains("changed since it was listed") && stderr.contains("big.bin"),
            "a failed fill says which file changed: {stderr}"
        );
        assert!(!file.exists(), "no file that looks complete");
        None
    }
}

/// Item 2: a 64 MiB object overwritten while `--jobs 2 --throughput 10` copies it from S3
/// (no CRC-64 declared, so only the size was checked): rc 0, content A/B/A/B.
#[test]
fn a_fill_overwritten_mid_copy_writes_one_version_or_fails() {
    let emu = emulator();
    emu.set_declare_crc64(false);
    put(&emu, "fill/big.bin", A);
    let target = tempfile::tempdir().unwrap();
    let child = populate_cmd(
        &format!("s3://{BUCKET}/fill"),
        target.path(),
        &["--endpoint", &emu.endpoint(), "--region", "us-east-1"],
    )
    .args(["--jobs", "2", "--throughput", "10"])
    .spawn()
    .unwrap();
    overwrite_after_16_mib(&emu, "fill/big.bin");
    let written = check_fill(
        child.wait_with_output().unwrap(),
        &target.path().join("big.bin"),
    );
    eprintln!("MEASURED: fill across an overwrite wrote {written:?} (1 = A, 2 = B)");
    assert_eq!(written, Some(B), "the changed file is fetched again, once");
}

/// The same from a local directory (the node path reads through a mount, i.e. file://):
/// no ETag there, so size and mtime pin the version.
#[test]
fn a_fill_from_a_directory_overwritten_mid_copy_writes_one_version_or_fails() {
    let source = tempfile::tempdir().unwrap();
    let file = source.path().join("big.bin");
    std::fs::write(&file, pattern(A, 0, SIZE as usize)).unwrap();
    let target = tempfile::tempdir().unwrap();
    let child = populate_cmd(
        &format!("file://{}", source.path().display()),
        target.path(),
        &["--jobs", "2", "--throughput", "10"],
    )
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // In place, as a writer that is not careful does: no truncation, no rename.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all(&pattern(B, 0, SIZE as usize)).unwrap();
    }
    let written = check_fill(
        child.wait_with_output().unwrap(),
        &target.path().join("big.bin"),
    );
    eprintln!("MEASURED: fill from a directory across an overwrite wrote {written:?}");
    assert_eq!(written, Some(B), "the changed file is fetched again, once");
}

/// `--block`: a disk image overwritten while it is written raw (no CRC-64 declared): one
/// image whole, or a failure that says the object changed; never a device of two images.
#[test]
fn a_raw_image_overwritten_mid_write_is_one_image_or_fails() {
    let emu = emulator();
    emu.set_declare_crc64(false);
    put(&emu, "img/disk.img", A);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let child = populate_cmd(
        &format!("s3://{BUCKET}/img/disk.img"),
        &image,
        &[
            "--endpoint",
            &emu.endpoint(),
            "--region",
            "us-east-1",
            "--block",
        ],
    )
    .args(["--jobs", "2", "--throughput", "10"])
    .spawn()
    .unwrap();
    overwrite_after_16_mib(&emu, "img/disk.img");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        let data = std::fs::read(&image).unwrap();
        let first = version_of("the image", &data[..MIB as usize], 0);
        for (i, chunk) in data.chunks(MIB as usize).enumerate() {
            let v = version_of("the image", chunk, i as u64 * MIB);
            assert_eq!(v, first, "the image mixes A and B at MiB {i}");
        }
    } else {
        assert!(
            stderr.contains("changed since it was listed"),
            "a failed image fill says the object changed: {stderr}"
        );
    }
    eprintln!("MEASURED: raw image across an overwrite: {}", out.status);
}
