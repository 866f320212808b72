//! Fidelity: `fillfs mount` against moto, a third-party S3 implementation that follows AWS
//! closely (ETags in listings, 404 for prefixes, pagination at 1,000 keys). Our own emulator
//! is fast but ours; this checks the S3 assumptions against someone else's reading of them.

mod common;

use std::collections::BTreeSet;
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
