//! `fillfs upload SRC URL` as a user runs it, against the loopback S3 server: a tree of
//! many small files and a big one, an upload killed and resumed (with and without its
//! checkpoint), a source changed between runs, and bad input.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1024 * 1024;

fn upload(emu: &Emulator, state: &Path, args: &[&str]) -> Command {
    let mut c = fillfs();
    c.arg("upload")
        .args(args)
        .arg("--endpoint")
        .arg(emu.endpoint())
        .arg("--region")
        .arg("us-east-1")
        .arg("--state-dir")
        .arg(state)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    c
}

fn run(mut c: Command) -> Output {
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn a_tree_uploads_every_file_and_big_ones_in_checked_parts() {
    let emu = emulator();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("tree");
    let mut want = Vec::new();
    for i in 0..300u64 {
        let rel = format!("d{}/s{}/f{i}.txt", i % 7, i % 3);
        let data = pattern(i, 0, 1 + (i as usize * 211) % (64 * 1024));
        std::fs::create_dir_all(src.join(&rel).parent().unwrap()).unwrap();
        std::fs::write(src.join(&rel), &data).unwrap();
        want.push((rel, data));
    }
    let big = pattern(999, 0, 50 * MIB + 7);
    std::fs::write(src.join("big.bin"), &big).unwrap();
    want.push(("big.bin".into(), big));
    let state = dir.path().join("state");
    let src_s = src.display().to_string();
    let url = format!("s3://{BUCKET}/up/");
    let o = run(upload(
        &emu,
        &state,
        &[&src_s, &url, "--part-size", "5MiB", "--progress", "json"],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    for (rel, data) in &want {
        assert_eq!(
            emu.object(BUCKET, &format!("up/{rel}")).as_deref(),
            Some(&data[..]),
            "{rel}"
        );
    }
    assert_eq!(emu.keys(BUCKET).len(), want.len());
    let last = String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let line: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(line["done"], true);
    assert_eq!(line["files_done"], 301);
    let total: usize = want.iter().map(|w| w.1.len()).sum();
    assert_eq!(line["bytes_done"], total as u64);
    assert!(
        stderr(&o).contains("checked: 301 by CRC-64"),
        "{}",
        stderr(&o)
    );
    // The big file went in 11 parts, never as one PUT; nothing is left open.
    assert!(emu.open_uploads(BUCKET).is_empty());
    assert!(!state.exists() || std::fs::read_dir(&state).unwrap().next().is_none());
}

/// Starts an upload of `src` capped at 20 MiB/s, kills it (SIGKILL) once three 5 MiB parts
/// are stored, and returns the bytes the store had received.
fn start_and_kill(emu: &Emulator, state: &Path, src: &Path, url: &str) -> u64 {
    let mut c = upload(
        emu,
        state,
        &[
            &src.display().to_string(),
            url,
            "--part-size",
            "5MiB",
            "--throughput",
            "20",
            "--jobs",
            "4",
            "--progress",
            "none",
        ],
    );
    let mut child = c.stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while emu.stats().put_bytes < 3 * 5 * MIB as u64 {
        assert!(Instant::now() < deadline, "no parts stored");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    emu.stats().put_bytes
}

#[test]
fn a_killed_upload_resumes_even_without_its_checkpoint() {
    let emu = emulator();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("data.bin");
    let size = 100 * MIB;
    std::fs::write(&src, pattern(31, 0, size)).unwrap();
    let state = dir.path().join("state");
    let url = format!("s3://{BUCKET}/k/data.bin");
    let before = start_and_kill(&emu, &state, &src, &url);
    assert_eq!(emu.open_uploads(BUCKET).len(), 1);
    // The checkpoint is gone (a container restarted with a fresh disk): the open upload is
    // found in the store and its parts confirmed from the file's own bytes.
    std::fs::remove_dir_all(&state).unwrap();
    let o = run(upload(
        &emu,
        &state,
        &[&src.display().to_string(), &url, "--part-size", "5MiB"],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let after = emu.stats().put_bytes - before;
    eprintln!(
        "MEASURED upload killed after {:.0} MiB stored; the new run sent {:.0} of {:.0} MiB",
        before as f64 / MIB as f64,
        after as f64 / MIB as f64,
        size as f64 / MIB as f64
    );
    assert!(after < size as u64, "{after}");
    assert!(
        stderr(&o).contains("kept from an earlier run"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        emu.object(BUCKET, "k/data.bin").unwrap(),
        pattern(31, 0, size)
    );
    assert!(emu.open_uploads(BUCKET).is_empty());
}

#[test]
fn a_source_changed_between_runs_starts_over() {
    let emu = emulator();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("data.bin");
    let size = 60 * MIB;
    std::fs::write(&src, pattern(41, 0, size)).unwrap();
    let state = dir.path().join("state");
    let url = format!("s3://{BUCKET}/k/data.bin");
    start_and_kill(&emu, &state, &src, &url);
    let old = emu.open_uploads(BUCKET);
    assert_eq!(old.len(), 1);
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&src, pattern(42, 0, size)).unwrap(); // same size, new bytes and mtime
    let o = run(upload(
        &emu,
        &state,
        &[&src.display().to_string(), &url, "--part-size", "5MiB"],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !stderr(&o).contains("kept from an earlier run"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        emu.object(BUCKET, "k/data.bin").unwrap(),
        pattern(42, 0, size)
    );
    assert!(
        emu.open_uploads(BUCKET).is_empty(),
        "the old upload is aborted"
    );
}

#[test]
fn bad_input_gets_a_clear_error() {
    let emu = emulator();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let f = dir.path().join("f");
    std::fs::write(&f, b"x").unwrap();
    let f = f.display().to_string();
    let cases: [(&[&str], &str); 4] = [
        (
            &["/nonexistent/src", "s3://test-bucket/k"],
            "/nonexistent/src",
        ),
        (&[&f, "http://test-bucket/k"], "unsupported scheme"),
        (
            &[&f, "s3://test-bucket/k", "--part-size", "1MiB"],
            "--part-size",
        ),
        (&[&f, "s3://no-such-bucket/k"], "no-such-bucket"),
    ];
    for (args, says) in cases {
        let o = run(upload(&emu, &state, args));
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
    // The store refuses a PUT over its limit (5 GiB on S3 and OSS; 10 MiB here): the error
    // names the store's reason.
    emu.set_max_single_put(10 * MIB as u64);
    let big = dir.path().join("big");
    std::fs::write(&big, pattern(1, 0, 12 * MIB)).unwrap();
    let o = run(upload(
        &emu,
        &state,
        &[
            &big.display().to_string(),
            "s3://test-bucket/big",
            "--part-size",
            "16MiB",
        ],
    ));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("EntityTooLarge"), "{}", stderr(&o));
    assert_eq!(emu.object(BUCKET, "big"), None);
}

/// A file written to while it is uploaded: every part checks out against what was read,
/// but the object would be a mix of two versions. It is withdrawn and the upload fails.
#[test]
fn a_file_changed_while_it_is_uploaded_is_not_kept() {
    let emu = emulator();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("data.bin");
    let size = 60 * MIB;
    std::fs::write(&src, pattern(51, 0, size)).unwrap();
    let state = dir.path().join("state");
    let mut c = upload(
        &emu,
        &state,
        &[
            &src.display().to_string(),
            &format!("s3://{BUCKET}/k/data.bin"),
            "--part-size",
            "5MiB",
            "--throughput",
            "20",
            "--progress",
            "none",
        ],
    );
    let child = c.stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while emu.stats().put_bytes < 2 * 5 * MIB as u64 {
        assert!(Instant::now() < deadline, "no parts stored");
        std::thread::sleep(Duration::from_millis(5));
    }
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(b"changed", 0).unwrap();
    }
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("changed while it was uploaded"),
        "{}",
        stderr(&o)
    );
    assert_eq!(emu.object(BUCKET, "k/data.bin"), None);
    assert!(emu.open_uploads(BUCKET).is_empty());
}
