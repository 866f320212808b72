//! `fillfs populate` where a fill can go wrong without any byte being corrupted in flight
//! (issue 12, items 3–11): symlinks planted in the target, keys that would alias or land on
//! fill state, names as long as Linux allows, two fills into one target, kill -9 on a tight
//! volume, objects rewritten with the same size and mtime, fills that fail, file systems
//! short of inodes. Each test states what must never happen, against the loopback S3 server
//! and (as root) real ext4 file systems on loop devices.

mod common;
#[path = "common/loopfs.rs"]
mod loopfs;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::*;
use loopfs::LoopFs;

const MIB: u64 = 1024 * 1024;

/// `fillfs populate s3://BUCKET/PREFIX TARGET` (the bucket's root for an empty prefix).
fn populate(emu: &Emulator, prefix: &str, target: &Path, extra: &[&str]) -> Command {
    let mut cmd = fillfs();
    cmd.arg("populate")
        .arg(format!("s3://{BUCKET}/{prefix}"))
        .arg(target)
        .args(["--endpoint", &emu.endpoint(), "--region", "us-east-1"])
        .args(["--progress", "none"])
        .args(extra)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    cmd
}

fn run(mut cmd: Command) -> Output {
    let out = cmd.output().unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn put(emu: &Emulator, key: &str, data: impl Into<Bytes>) {
    emu.put_object(BUCKET, key, data.into());
}

/// Every path under `dir` (not following links), sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.clone());
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                walk(&p, out);
            }
        }
    }
    walk(dir, &mut out);
    out.sort();
    out
}

fn part_files(dir: &Path) -> Vec<PathBuf> {
    tree(dir)
        .into_iter()
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.ends_with(".fillfs-part") || n.starts_with(".fillfs-part-")
        })
        .collect()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The Last-Modified of `key`, as the store reports it (HEAD through fillfs's own store).
fn object_mtime(emu: &Emulator, key: &str) -> SystemTime {
    use fillfs::store::{Credentials, Secret, SourceUrl, Store, StoreConfig};
    let mut cfg = StoreConfig::new(
        SourceUrl::parse(&format!("s3://{BUCKET}/")).unwrap(),
        Some(emu.endpoint()),
        Some("us-east-1".into()),
    );
    cfg.credentials = Credentials {
        access_key_id: Some(Secret::new(ACCESS_KEY)),
        secret_access_key: Some(Secret::new(SECRET_KEY)),
        ..Default::default()
    };
    let store = Store::new(&cfg, vec![]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(store.stat(key)).unwrap().mtime.unwrap()
}

/// Gives `path` the mtime `t` (as a file fillfs wrote for an object of that Last-Modified).
fn set_mtime(path: &Path, t: SystemTime) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_times(std::fs::FileTimes::new().set_modified(t))
        .unwrap();
}

fn wait_for(what: &str, child: &mut std::process::Child, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the fill ended before {what}"
        );
        assert!(Instant::now() < deadline, "no {what} within 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn journal_done_lines(target: &Path) -> Vec<String> {
    std::fs::read_to_string(target.join(".fillfs-populate.journal"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("done"))
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------------
// Item 3: nothing outside TARGET, whatever is planted in it.

#[test]
fn a_symlinked_directory_in_the_target_is_never_followed() {
    let emu = emulator();
    put(&emu, "s/link/sub/x", &b"escaped"[..]);
    put(&emu, "s/ok.txt", &b"ok"[..]);
    let outer = tempfile::tempdir().unwrap();
    let (target, elsewhere) = (outer.path().join("vol"), outer.path().join("elsewhere"));
    std::fs::create_dir(&target).unwrap();
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, target.join("link")).unwrap();

    let out = run(populate(&emu, "s", &target, &[]));
    let err = stderr(&out);
    assert_eq!(
        tree(&elsewhere),
        Vec::<PathBuf>::new(),
        "written outside the target through a planted link"
    );
    assert_eq!(out.status.code(), Some(2), "a human must remove the link");
    assert!(
        err.contains("link") && err.contains("symbolic link"),
        "the error names the link: {err}"
    );
    assert!(
        std::fs::symlink_metadata(target.join("link"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link is left as it was"
    );
}

#[test]
fn links_planted_at_part_journal_and_final_names_are_replaced_not_followed() {
    let emu = emulator();
    put(&emu, "p/good.txt", pattern(1, 0, 100_000));
    put(&emu, "p/big.bin", pattern(2, 0, 20 * MIB as usize));
    put(&emu, "p/final.txt", pattern(3, 0, 5_000));
    let outer = tempfile::tempdir().unwrap();
    let target = outer.path().join("vol");
    std::fs::create_dir(&target).unwrap();
    let victims: Vec<PathBuf> = (0..3)
        .map(|i| outer.path().join(format!("victim{i}")))
        .collect();
    for v in &victims {
        std::fs::write(v, b"precious").unwrap();
        std::fs::set_permissions(v, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let link = |to: &Path, name: &str| std::os::unix::fs::symlink(to, target.join(name)).unwrap();
    link(&victims[0], "good.txt.fillfs-part");
    link(&victims[1], "big.bin.fillfs-part");
    link(&victims[2], "final.txt");
    let journal_victim = outer.path().join("journal-victim");
    link(&journal_victim, ".fillfs-populate.journal");
    link(&outer.path().join("lock-victim"), ".fillfs-populate.lock");

    // As root the fill also chowns what it writes: that must not reach the victims either.
    let owner: &[&str] = if is_root() {
        &["--uid", "4321", "--gid", "4321"]
    } else {
        &[]
    };
    let out = run(populate(&emu, "p", &target, owner));
    assert!(out.status.success(), "{}", stderr(&out));
    for v in &victims {
        let m = std::fs::metadata(v).unwrap();
        assert_eq!(std::fs::read(v).unwrap(), b"precious", "{v:?} overwritten");
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{v:?} chmodded");
        assert_eq!(m.uid(), nix::unistd::geteuid().as_raw(), "{v:?} chowned");
    }
    assert!(!journal_victim.exists(), "the journal followed a link");
    assert!(!outer.path().join("lock-victim").exists());
    for (name, seed, size) in [
        ("good.txt", 1, 100_000),
        ("big.bin", 2, 20 * MIB as usize),
        ("final.txt", 3, 5_000),
    ] {
        let p = target.join(name);
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.file_type().is_file(), "{name} is not a regular file");
        assert!(
            std::fs::read(&p).unwrap() == pattern(seed, 0, size),
            "{name}"
        );
        if is_root() {
            assert_eq!((m.uid(), m.gid()), (4321, 4321), "{name}");
        }
    }
    assert_eq!(
        tree(&target),
        vec![
            target.join("big.bin"),
            target.join("final.txt"),
            target.join("good.txt")
        ],
        "the planted links are gone, nothing else is left"
    );
}

// ---------------------------------------------------------------------------------------
// Item 4: a key beginning with '/' is refused, never aliased to the key without it.

#[test]
fn keys_listed_under_one_name_are_refused_never_aliased() {
    let emu = emulator();
    put(&emu, "/abs/x", &b"slash"[..]);
    put(&emu, "abs/x", &b"plain"[..]);
    put(&emu, "ok", &b"ok"[..]);
    let target = tempfile::tempdir().unwrap();
    // The bucket's root, where the store's listing drops a key's leading '/' (OpenDAL's
    // relative paths): both keys come back as `abs/x`.
    let out = run(populate(&emu, "", target.path(), &[]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot be written safely") && err.contains("abs/x"),
        "{err}"
    );
    assert_eq!(
        tree(target.path()),
        Vec::<PathBuf>::new(),
        "nothing written"
    );

    let out = run(populate(&emu, "", target.path(), &["--skip-invalid-keys"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(target.path().join("ok")).unwrap(), b"ok");
    // Refused as the key it is, `/abs/x` is never written in the place of `abs/x`.
    if let Ok(data) = std::fs::read(target.path().join("abs/x")) {
        assert_eq!(data, b"plain", "/abs/x was written as abs/x");
    }
}

#[test]
fn a_key_beginning_with_a_slash_is_refused_at_a_buckets_root() {
    let emu = emulator();
    put(&emu, "/etc/y", &b"etc"[..]);
    put(&emu, "ok", &b"ok"[..]);
    let target = tempfile::tempdir().unwrap();
    let out = run(populate(&emu, "", target.path(), &[]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot be written safely") && err.contains("\"/etc/y\""),
        "{err}"
    );
    assert_eq!(
        tree(target.path()),
        Vec::<PathBuf>::new(),
        "nothing written"
    );
    let out = run(populate(&emu, "", target.path(), &["--skip-invalid-keys"]));
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("1 unsafe keys skipped"), "{err}");
    assert!(!target.path().join("etc").exists(), "/etc/y became etc/y");
}

// ---------------------------------------------------------------------------------------
// Item 5: no key can overwrite the fill's own state.

#[test]
fn a_key_named_like_the_fill_state_is_refused_by_name() {
    let emu = emulator();
    put(&emu, "j/.fillfs-populate.journal", &b"not a journal"[..]);
    put(&emu, "j/.fillfs-populate.lock", &b"not a lock"[..]);
    put(&emu, "j/a", &b"a"[..]);
    put(
        &emu,
        "j/sub/.fillfs-populate.journal",
        &b"nested is fine"[..],
    );
    let target = tempfile::tempdir().unwrap();
    let out = run(populate(&emu, "j", target.path(), &[]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(".fillfs-populate.journal") && err.contains("reserved"),
        "{err}"
    );
    assert_eq!(
        tree(target.path()),
        Vec::<PathBuf>::new(),
        "nothing written"
    );

    let out = run(populate(&emu, "j", target.path(), &["--skip-invalid-keys"]));
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("populated 2 files") && err.contains("2 unsafe keys skipped"),
        "{err}"
    );
    assert_eq!(std::fs::read(target.path().join("a")).unwrap(), b"a");
    assert_eq!(
        std::fs::read(target.path().join("sub/.fillfs-populate.journal")).unwrap(),
        b"nested is fine"
    );
    assert_eq!(
        tree(target.path()),
        vec![
            target.path().join("a"),
            target.path().join("sub"),
            target.path().join("sub/.fillfs-populate.journal"),
        ]
    );
}

// ---------------------------------------------------------------------------------------
// Item 6: every name Linux accepts can be filled.

#[test]
fn names_of_244_to_255_bytes_are_filled() {
    let emu = emulator();
    let names = [
        "a".repeat(243),
        "b".repeat(244),
        "c".repeat(250),
        "d".repeat(255),
        format!("{}/{}", "e".repeat(255), "f".repeat(255)),
    ];
    let mut want = Vec::new();
    for (i, n) in names.iter().enumerate() {
        put(&emu, &format!("long/{n}"), pattern(i as u64, 0, 1000 + i));
        want.push((n.clone(), i as u64, 1000 + i));
    }
    // A large file (ranged GETs into a preallocated part file) with the longest name.
    let big = format!("{}/{}", "g".repeat(200), "h".repeat(255));
    put(
        &emu,
        &format!("long/{big}"),
        pattern(9, 0, 20 * MIB as usize),
    );
    want.push((big, 9, 20 * MIB as usize));
    let target = tempfile::tempdir().unwrap();
    let out = run(populate(&emu, "long", target.path(), &[]));
    assert!(out.status.success(), "{}", stderr(&out));
    for (name, seed, size) in &want {
        let data = std::fs::read(target.path().join(name)).unwrap();
        assert!(data == pattern(*seed, 0, *size), "{name}");
    }
    assert_eq!(part_files(target.path()), Vec::<PathBuf>::new());
}

// ---------------------------------------------------------------------------------------
// Item 7: one fill at a time per target.

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn a_second_fill_into_a_target_being_filled_is_refused_naming_the_holder() {
    let emu = emulator();
    for i in 0..4 {
        put(&emu, &format!("two/f{i}"), pattern(i, 0, 16 * MIB as usize));
    }
    emu.set_bandwidth(Some(4 * MIB)); // per connection: the first fill takes seconds
    let target = tempfile::tempdir().unwrap();
    let mut first = populate(&emu, "two", target.path(), &["--jobs", "2"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("a part file", &mut first, || {
        !part_files(target.path()).is_empty()
    });

    let started = Instant::now();
    let out = run(populate(&emu, "two", target.path(), &["--jobs", "2"]));
    let err = stderr(&out);
    let still_running = first.try_wait().unwrap().is_none();
    emu.set_bandwidth(None);
    let first_status = first.wait().unwrap();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refused at once, not after a fill"
    );
    assert!(
        err.contains(&format!("pid {}", first.id())) && err.contains(&hostname()),
        "the error names the holder: {err}"
    );
    assert!(err.contains("since"), "{err}");
    assert!(
        still_running,
        "the check ran while the first fill held the lock"
    );
    assert!(first_status.success());
    for i in 0..4 {
        let data = std::fs::read(target.path().join(format!("f{i}"))).unwrap();
        assert!(data == pattern(i, 0, 16 * MIB as usize), "f{i}");
    }
    assert_eq!(
        tree(target.path()).len(),
        4,
        "no lock or state left: {:?}",
        tree(target.path())
    );
}

// ---------------------------------------------------------------------------------------
// Loop-device file systems (root): `tests/common/loopfs.rs`.

fn free_bytes(dir: &Path) -> u64 {
    let v = nix::sys::statvfs::statvfs(dir).unwrap();
    v.blocks_available() as u64 * v.fragment_size() as u64
}

// ---------------------------------------------------------------------------------------
// Item 8: a crash on a tight volume does not make the fill unresumable.

#[test]
fn a_fill_killed_on_a_tight_volume_resumes() {
    let Some(fs) = LoopFs::new(64, &[]) else {
        return;
    };
    let target = fs.mnt.path().join("vol");
    std::fs::create_dir(&target).unwrap();
    // Two files that together take 80 % of the free space.
    let size = (free_bytes(&target) * 2 / 5) / MIB * MIB;
    let emu = emulator();
    for i in 0..2 {
        put(&emu, &format!("tight/f{i}"), pattern(i, 0, size as usize));
    }
    emu.set_bandwidth(Some(MIB));
    let mut child = populate(&emu, "tight", &target, &[])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Both part files exist and are preallocated: the volume is nearly full of them.
    wait_for("two preallocated part files", &mut child, || {
        let parts = part_files(&target);
        parts.len() == 2
            && parts
                .iter()
                .all(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.blocks() * 512 >= size))
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        free_bytes(&target) < 2 * size,
        "the part files hold the space"
    );

    emu.set_bandwidth(None);
    let out = run(populate(&emu, "tight", &target, &[]));
    assert!(out.status.success(), "{}", stderr(&out));
    for i in 0..2 {
        let data = std::fs::read(target.join(format!("f{i}"))).unwrap();
        assert!(data == pattern(i, 0, size as usize), "f{i}");
    }
    assert_eq!(part_files(&target), Vec::<PathBuf>::new());
}

// ---------------------------------------------------------------------------------------
// Item 9: a file is kept only if it is the version the store lists.

#[test]
fn an_object_rewritten_with_the_same_size_and_mtime_is_copied_again() {
    let emu = emulator();
    put(&emu, "v/a", pattern(1, 0, 100_000));
    put(&emu, "v/big", pattern(3, 0, 20 * MIB as usize));
    let target = tempfile::tempdir().unwrap();
    assert!(
        run(populate(&emu, "v", target.path(), &[]))
            .status
            .success()
    );

    // Rewritten with the same size; the file carries the new Last-Modified as its mtime,
    // as it would had the rewrite happened within the same second.
    put(&emu, "v/a", pattern(2, 0, 100_000));
    set_mtime(&target.path().join("a"), object_mtime(&emu, "v/a"));
    emu.reset_stats();
    let out = run(populate(&emu, "v", target.path(), &[]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        std::fs::read(target.path().join("a")).unwrap() == pattern(2, 0, 100_000),
        "a stale file was kept"
    );
    assert_eq!(
        emu.stats().get_bytes,
        100_000,
        "only the rewritten object is fetched again"
    );
}

#[test]
fn after_a_crash_a_journaled_file_of_another_version_is_copied_again() {
    let emu = emulator();
    for i in 0..40u64 {
        put(
            &emu,
            &format!("jv/f{i:02}"),
            pattern(i, 0, (MIB + i) as usize),
        );
    }
    emu.set_bandwidth(Some(4 * MIB));
    let target = tempfile::tempdir().unwrap();
    let mut child = populate(&emu, "jv", target.path(), &["--jobs", "4"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("5 journaled files", &mut child, || {
        journal_done_lines(target.path()).len() >= 5
    });
    child.kill().unwrap();
    child.wait().unwrap();
    emu.set_bandwidth(None);

    // A file the journal records as finished; its object is rewritten (same size) and the
    // file's mtime matches the new Last-Modified.
    let line = journal_done_lines(target.path())[0].clone();
    let rel: String = serde_json::from_str(line.rsplit('\t').next().unwrap()).unwrap();
    let i: u64 = rel.trim_start_matches('f').parse().unwrap();
    put(
        &emu,
        &format!("jv/{rel}"),
        pattern(100 + i, 0, (MIB + i) as usize),
    );
    set_mtime(
        &target.path().join(&rel),
        object_mtime(&emu, &format!("jv/{rel}")),
    );

    let out = run(populate(&emu, "jv", target.path(), &[]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        std::fs::read(target.path().join(&rel)).unwrap() == pattern(100 + i, 0, (MIB + i) as usize),
        "{rel}: the journal's version was not compared"
    );
}

// ---------------------------------------------------------------------------------------
// Item 10: a fill that fails leaves no part files.

#[test]
fn a_fill_that_fails_leaves_no_part_files() {
    let emu = emulator();
    for i in 0..6 {
        put(
            &emu,
            &format!("fail/f{i}"),
            pattern(i, 0, 20 * MIB as usize),
        );
    }
    emu.set_bandwidth(Some(2 * MIB));
    let target = tempfile::tempdir().unwrap();
    let mut child = populate(
        &emu,
        "fail",
        target.path(),
        &["--jobs", "8", "--retries", "1"],
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_for("3 part files", &mut child, || {
        part_files(target.path()).len() >= 3
    });
    // From now on every GET fails: the ranges still to start exhaust their retries.
    emu.fail_next_gets(1_000_000);
    emu.set_bandwidth(None);
    let out = child.wait_with_output().unwrap();
    emu.clear_fail_next_gets();
    let err = stderr(&out);
    eprintln!("{err}");
    assert_eq!(out.status.code(), Some(1), "a transient failure: {err}");
    assert_eq!(
        part_files(target.path()),
        Vec::<PathBuf>::new(),
        "part files left behind"
    );
}

/// A retried request is one line of the log, whatever RUST_BACKTRACE says (OpenDAL's own
/// notice was the error's Debug form: ~2,000 lines for a fill's retries with backtraces).
#[test]
fn each_retry_is_one_line_of_the_log() {
    let emu = emulator();
    put(&emu, "retry/a", pattern(1, 0, 1000));
    emu.fail_next_gets(2);
    let target = tempfile::tempdir().unwrap();
    let mut cmd = populate(&emu, "retry", target.path(), &[]);
    cmd.env("RUST_BACKTRACE", "1");
    let out = run(cmd);
    emu.clear_fail_next_gets();
    assert!(out.status.success());
    let err = stderr(&out);
    let retries: Vec<&str> = err.lines().filter(|l| l.contains("retrying")).collect();
    assert_eq!(retries.len(), 2, "{err}");
    for l in &retries {
        assert!(l.contains("attempt=") && l.contains("503"), "{l}");
    }
    assert!(
        err.lines().count() <= 6,
        "{} lines of log for 2 retries:\n{err}",
        err.lines().count()
    );
    assert_eq!(
        std::fs::read(target.path().join("a")).unwrap(),
        pattern(1, 0, 1000)
    );
}

// ---------------------------------------------------------------------------------------
// Item 11: inodes are checked up front, like bytes.

#[test]
fn a_fill_short_of_inodes_fails_before_writing() {
    let Some(fs) = LoopFs::new(32, &["-N", "64"]) else {
        return;
    };
    let target = fs.mnt.path().join("vol");
    std::fs::create_dir(&target).unwrap();
    let favail = nix::sys::statvfs::statvfs(&target)
        .unwrap()
        .files_available() as u64;
    let emu = emulator();
    for i in 0..favail + 10 {
        put(&emu, &format!("ino/d{}/f{i}", i % 3), &b"x"[..]);
    }
    emu.reset_stats();
    let out = run(populate(&emu, "ino", &target, &[]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("inodes"), "{err}");
    assert_eq!(tree(&target), Vec::<PathBuf>::new(), "nothing written");
    assert_eq!(emu.stats().gets, 0, "nothing fetched");
}

/// What cannot succeed on a retry exits 2 (the controller's "permanent"), with an error that
/// names the problem; no argument makes any command panic, and no number silently means
/// another (a rate that rounds to "unlimited", a block the cache cannot hold).
#[test]
fn bad_input_and_unwritable_targets_exit_2_with_a_clear_error_never_a_panic() {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("a"), b"data").unwrap();
    let dst = tempfile::tempdir().unwrap();
    let s = src.path().to_str().unwrap();
    let d = dst.path().to_str().unwrap();
    let mut cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["populate", "", d], "it is empty"),
        (vec!["populate", "  ", d], "it is empty"),
        (
            vec!["populate", s, d, "--throughput", "1e-7"],
            "out of range",
        ),
        (vec!["populate", s, d, "--throughput=-3"], "out of range"),
        (
            vec!["populate", s, d, "--throughput", "NaN"],
            "out of range",
        ),
        (
            vec!["populate", s, d, "--jobs", "0"],
            "--jobs \"0\" is out of range",
        ),
        (vec!["populate", s, d, "--part-size", "6GiB"], "--part-size"),
        (vec!["populate", s, d, "--retries", "100000"], "--retries"),
        (
            vec!["mount", s, d, "--block-size", "5GiB"],
            "--block-size \"5GiB\"",
        ),
        (vec!["mount", s, d, "--metadata-ttl", "1001y"], "365 days"),
        (vec!["mount", s, d, "--fuse-threads", "0"], "--fuse-threads"),
        (
            vec!["mount", s, d, "--kernel-read-ahead", "2TiB"],
            "out of range",
        ),
        (vec!["csi", "--metadata-ttl", "1001y"], "365 days"),
        (vec!["csi", "--block-size", "16EiB"], "--block-size"),
        (
            vec!["controller", "--retry-delay", "1000y"],
            "--retry-delay",
        ),
        (vec!["controller", "--poll", "0s"], "--poll"),
    ];
    // A read-only target (a read-only tmpfs needs root to mount).
    let ro = tempfile::tempdir().unwrap();
    let ro_mounted = is_root()
        && Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
            .arg(ro.path())
            .status()
            .unwrap()
            .success();
    let r = ro.path().to_str().unwrap();
    if ro_mounted {
        cases.push((vec!["populate", s, r], "Read-only file system"));
    }
    let mut failures = Vec::new();
    for (args, expect) in &cases {
        let out = fillfs()
            .args(args)
            .args(if args[0] == "populate" {
                &["--progress", "none"][..]
            } else {
                &[]
            })
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let err = stderr(&out);
        if out.status.code() != Some(2) || !err.contains(expect) || err.contains("panicked") {
            failures.push(format!("{args:?}: {:?}: {err}", out.status.code()));
        }
    }
    if ro_mounted {
        Command::new("umount").arg(ro.path()).status().unwrap();
    }
    assert!(
        std::fs::read_dir(dst.path()).unwrap().next().is_none(),
        "a refused fill wrote into its target"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A prefix with nothing under it (a typo, an upload that has not happened) fails the fill
/// with exit 2 before TARGET is touched: a fill that copied nothing must not look like one
/// that worked. `--allow-empty` fills an empty volume on purpose. A device given to
/// `--mkfs` keeps what it held.
#[test]
fn an_empty_or_mistyped_prefix_is_refused_before_the_target_is_touched() {
    let emu = emulator();
    emu.put_object(BUCKET, "data/a", Bytes::from_static(b"a"));
    let parent = tempfile::tempdir().unwrap();
    let target = parent.path().join("vol");
    let out = run(populate(&emu, "dta/", &target, &[]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("nothing is stored under s3://{BUCKET}/dta/"))
            && err.contains("--allow-empty"),
        "{err}"
    );
    assert!(!target.exists(), "TARGET not created");
    assert_eq!(emu.stats().gets, 0);

    let out = run(populate(&emu, "dta/", &target, &["--allow-empty"]));
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_dir(&target).unwrap().count(),
        0,
        "empty volume"
    );

    let Some(dev) = loopfs::LoopDev::new(32) else {
        return;
    };
    let mnt = tempfile::tempdir().unwrap();
    let sh = |cmd: &mut Command| assert!(cmd.status().unwrap().success(), "{cmd:?}");
    sh(Command::new("mkfs.ext4").args(["-q", "-F", &dev.dev]));
    sh(Command::new("mount").arg(&dev.dev).arg(mnt.path()));
    std::fs::write(mnt.path().join("kept"), b"what the device held").unwrap();
    sh(Command::new("umount").arg(mnt.path()));
    let out = run(populate(
        &emu,
        "dta/",
        Path::new(&dev.dev),
        &["--mkfs", "ext4"],
    ));
    assert_eq!(out.status.code(), Some(2));
    sh(Command::new("mount").arg(&dev.dev).arg(mnt.path()));
    let kept = std::fs::read(mnt.path().join("kept"));
    sh(Command::new("umount").arg(mnt.path()));
    assert_eq!(kept.unwrap(), b"what the device held", "not formatted");
}

/// Credentials written into a source URL are refused, and the error (which a fill pod's
/// termination message and events show) does not repeat them.
#[test]
fn credentials_in_a_source_url_are_refused_without_repeating_them() {
    let dst = tempfile::tempdir().unwrap();
    for url in [
        "s3://AKIDEXAMPLE:wJalrXUtnFEMIK7MDENG@bucket/data/",
        "oss://wJalrXUtnFEMIK7MDENG@bucket",
    ] {
        let out = run({
            let mut c = fillfs();
            c.args(["populate", url]).arg(dst.path());
            c
        });
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("carries credentials") && err.contains("***@bucket"),
            "{err}"
        );
        assert!(
            !err.contains("wJalrXUtnFEMIK7MDENG") && !err.contains("AKIDEXAMPLE"),
            "{err}"
        );
    }
}
