//! Fidelity: `fillfs mount` against moto, a third-party S3 implementation that follows AWS
//! closely (ETags in listings, 404 for prefixes, pagination at 1,000 keys). Our own emulator
//! is fast but ours; this checks the S3 assumptions against someone else's reading of them.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Moto {
    child: Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto() -> Option<Moto> {
    if Command::new("moto_server")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true but moto_server is not installed (scripts/setup.sh installs it)");
        }
        eprintln!("SKIPPED: moto_server not installed (pip install 'moto[server]')");
        return None;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(Moto {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
    })
}

#[test]
fn mount_lists_and_reads_a_moto_bucket_faithfully() {
    if !fuse_available() {
        return;
    }
    let Some(moto) = moto() else { return };
    let objects: Vec<(String, Vec<u8>)> = [
        ("data/marker-only/", Vec::new()),
        ("data/marked/", Vec::new()),
        ("data/marked/in.txt", b"in".to_vec()),
        ("data/no-marker/deep/leaf.bin", pattern(1, 0, 3_000_001)),
        ("data/ünïcødé 文件.txt", "ü".as_bytes().to_vec()),
        ("data/sp ace/f i le", b"space".to_vec()),
        ("data/both", b"shadowed".to_vec()),
        ("data/both/child", b"child".to_vec()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .chain((0..1100).map(|i| (format!("data/many/f{i:04}"), format!("{i}").into_bytes())))
    .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let op = opendal::Operator::new(
            opendal::services::S3::default()
                .bucket("fidelity")
                .endpoint(&moto.endpoint)
                .region("us-east-1")
                .access_key_id("moto")
                .secret_access_key("moto"),
        )
        .unwrap();
        // Create the bucket with a raw request: OpenDAL has no bucket creation.
        let status = raw_put(&format!("{}/fidelity", moto.endpoint), b"").await;
        assert!(status < 300, "create bucket: HTTP {status}");
        // OpenDAL normalizes `a//b` to `a/b`; the raw request keeps the key as it is.
        let status = raw_put(&format!("{}/fidelity/data/a//b", moto.endpoint), b"double").await;
        assert!(status < 300, "put a//b: HTTP {status}");
        for (k, v) in &objects {
            if k.ends_with('/') {
                op.create_dir(k).await.unwrap();
            } else {
                op.write(k, v.clone()).await.unwrap();
            }
        }
    });
    let mut cmd = fillfs();
    cmd.args([
        "mount",
        "s3://fidelity/data",
        "--endpoint",
        &moto.endpoint,
        "--region",
        "us-east-1",
    ])
    .env("AWS_ACCESS_KEY_ID", "moto")
    .env("AWS_SECRET_ACCESS_KEY", "moto");
    let m = spawn_mount(cmd);
    let root = m.path();
    let names = |p: &std::path::Path| -> BTreeSet<String> {
        std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    };
    let want: BTreeSet<String> = [
        "a",
        "both",
        "many",
        "marked",
        "marker-only",
        "no-marker",
        "sp ace",
        "ünïcødé 文件.txt",
    ]
    .map(String::from)
    .into();
    assert_eq!(names(root), want);
    assert!(names(&root.join("marker-only")).is_empty());
    assert!(
        names(&root.join("a")).is_empty(),
        "the '//' component stays hidden"
    );
    assert_eq!(
        names(&root.join("many")).len(),
        1100,
        "listing must follow pagination past 1,000 keys"
    );
    assert_eq!(std::fs::read(root.join("many/f1099")).unwrap(), b"1099");
    assert_eq!(std::fs::read(root.join("marked/in.txt")).unwrap(), b"in");
    assert_eq!(std::fs::read(root.join("both/child")).unwrap(), b"child");
    assert_eq!(std::fs::read(root.join("sp ace/f i le")).unwrap(), b"space");
    assert_eq!(
        std::fs::read(root.join("ünïcødé 文件.txt")).unwrap(),
        "ü".as_bytes()
    );
    verify_stream(&root.join("no-marker/deep/leaf.bin"), 1, 3_000_001);
    assert!(m.stop().success());
}

/// An unsigned PUT (moto accepts unsigned requests).
async fn raw_put(url: &str, body: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    let req = format!(
        "PUT /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Issue 12, item 1 on moto: a handle open across an overwrite reads the version it opened
/// (what was fetched before) and then fails with EIO, because every GET carries the listed
/// ETag as `If-Match` and moto answers 412; a fresh open after the TTL reads the new
/// version whole, and so does a file read in full before the overwrite.
#[test]
fn overwrites_on_moto_give_each_open_one_version() {
    if !fuse_available() {
        return;
    }
    let Some(moto) = moto() else { return };
    const MIB: usize = 1 << 20;
    const SIZE: usize = 32 * MIB;
    let (a, b) = (pattern(1, 0, SIZE), pattern(2, 0, SIZE));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let op = moto_bucket(&rt, &moto, "versions");
    rt.block_on(op.write("ow/obj", a.clone())).unwrap();
    rt.block_on(op.write("ow/small", a[..3 * MIB].to_vec()))
        .unwrap();

    let mut cmd = fillfs_under_test();
    cmd.args([
        "mount",
        "s3://versions/ow",
        "--endpoint",
        &moto.endpoint,
        "--region",
        "us-east-1",
        "--metadata-ttl",
        "2s",
        // Slow, so the handle's read-ahead cannot have fetched all of A.
        "--throughput",
        "5",
    ])
    .env("AWS_ACCESS_KEY_ID", "moto")
    .env("AWS_SECRET_ACCESS_KEY", "moto");
    let m = spawn_mount(cmd);
    let path = m.path().join("obj");
    let small = m.path().join("small");
    assert_eq!(std::fs::read(&small).unwrap(), a[..3 * MIB]);
    let mut f = std::fs::File::open(&path).unwrap();
    let mut buf = vec![0u8; MIB];
    let mut offset = 0;
    while offset < 4 * MIB {
        f.read_exact(&mut buf).unwrap();
        assert!(buf == a[offset..offset + MIB], "A at {offset}");
        offset += MIB;
    }
    rt.block_on(op.write("ow/obj", b.clone())).unwrap();
    rt.block_on(op.write("ow/small", b[..3 * MIB].to_vec()))
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let mut failed = false;
    while offset < SIZE {
        match f.read_exact(&mut buf) {
            Ok(()) => assert!(
                buf == a[offset..offset + MIB],
                "the open handle: A at {offset}"
            ),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "at {offset}: {e}");
                failed = true;
                break;
            }
        }
        offset += MIB;
    }
    assert!(
        failed,
        "the handle read all of A at 5 MiB/s: nothing was tested"
    );
    drop(f);
    assert_eq!(
        std::fs::read(&small).unwrap(),
        b[..3 * MIB],
        "read in full, then B"
    );
    assert!(
        std::fs::read(&path).unwrap() == b,
        "a fresh open reads all of B"
    );
    assert!(m.stop().success());
}

/// Issue 12, item 2 on moto: an object overwritten while `populate --jobs 2` copies it
/// (at 4 MiB/s, so that moto's PUT of B lands mid-copy) is fetched again in its new
/// version; the file is never a mix.
#[test]
fn a_fill_from_moto_overwritten_mid_copy_writes_one_version() {
    let Some(moto) = moto() else { return };
    const SIZE: usize = 32 << 20;
    let (a, b) = (pattern(1, 0, SIZE), pattern(2, 0, SIZE));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let op = moto_bucket(&rt, &moto, "fill");
    rt.block_on(op.write("src/big.bin", a.clone())).unwrap();
    let target = tempfile::tempdir().unwrap();
    let child = fillfs_under_test()
        .args(["populate", "s3://fill/src"])
        .arg(target.path())
        .args(["--endpoint", &moto.endpoint, "--region", "us-east-1"])
        .args(["--jobs", "2", "--throughput", "4", "--progress", "none"])
        .env("AWS_ACCESS_KEY_ID", "moto")
        .env("AWS_SECRET_ACCESS_KEY", "moto")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let put = Instant::now();
    rt.block_on(op.write("src/big.bin", b.clone())).unwrap();
    eprintln!("MEASURED: moto took {:?} to store B", put.elapsed());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "{stderr}");
    let got = std::fs::read(target.path().join("big.bin")).unwrap();
    assert!(got == a || got == b, "the filled file mixes A and B");
    assert!(
        got == b,
        "the changed file is fetched again in its new version"
    );
    assert!(stderr.contains("object changed while being copied"));
}

/// A bucket on moto and an operator on it.
fn moto_bucket(rt: &tokio::runtime::Runtime, moto: &Moto, bucket: &str) -> opendal::Operator {
    let status = rt.block_on(raw_put(&format!("{}/{bucket}", moto.endpoint), b""));
    assert!(status < 300, "create bucket: HTTP {status}");
    opendal::Operator::new(
        opendal::services::S3::default()
            .bucket(bucket)
            .endpoint(&moto.endpoint)
            .region("us-east-1")
            .access_key_id("moto")
            .secret_access_key("moto"),
    )
    .unwrap()
}
