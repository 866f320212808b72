//! End-to-end checks of the emulator through real S3 clients over HTTP:
//! opendal's S3 service, and presigned raw requests (reqwest) where exact
//! status codes and headers matter.

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use md5::{Digest, Md5};
use opendal::{ErrorKind, Operator, services::S3};
use s3emu::{Config, Emulator, Faults};

const BUCKET: &str = "test-bucket";

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn start() -> Emulator {
    let emu = Emulator::start(Config::default()).unwrap();
    emu.create_bucket(BUCKET);
    emu
}

fn op_with(emu: &Emulator, bucket: &str, access_key: &str, secret_key: &str) -> Operator {
    let b = S3::default()
        .endpoint(&emu.endpoint())
        .bucket(bucket)
        .region(emu.region())
        .access_key_id(access_key)
        .secret_access_key(secret_key)
        .disable_config_load()
        .disable_ec2_metadata();
    Operator::new(b).unwrap()
}

fn op(emu: &Emulator) -> Operator {
    op_with(emu, BUCKET, emu.access_key(), emu.secret_key())
}

fn md5_hex(data: &[u8]) -> String {
    hex::encode(Md5::digest(data))
}

fn pattern(len: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_shr(13) as u8 ^ seed)
            .collect::<Vec<_>>(),
    )
}

/// Presigned GET for raw requests with arbitrary headers.
async fn raw_get(op: &Operator, path: &str, range: Option<&str>) -> reqwest::Response {
    let pre = op
        .presign_read(path, Duration::from_secs(300))
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let mut req = client.get(pre.uri().to_string());
    for (k, v) in pre.header() {
        req = req.header(k.as_str(), v.as_bytes());
    }
    if let Some(r) = range {
        req = req.header("range", r);
    }
    req.send().await.unwrap()
}

#[test]
fn put_get_roundtrip_etag_is_md5() {
    let emu = start();
    let op = op(&emu);
    let data = pattern(300_000, 1);
    block_on(async {
        op.write("dir/a.bin", data.clone()).await.unwrap();
        let got = op.read("dir/a.bin").await.unwrap().to_bytes();
        assert_eq!(got, data);
        let meta = op.stat("dir/a.bin").await.unwrap();
        assert_eq!(meta.content_length(), data.len() as u64);
        assert_eq!(
            meta.etag(),
            Some(format!("\"{}\"", md5_hex(&data)).as_str())
        );
        assert!(meta.last_modified().is_some());
        // empty object
        op.write("empty", Bytes::new()).await.unwrap();
        assert!(op.read("empty").await.unwrap().is_empty());
        assert_eq!(
            op.stat("empty").await.unwrap().etag(),
            Some("\"d41d8cd98f00b204e9800998ecf8427e\"")
        );
    });
    assert_eq!(emu.object(BUCKET, "dir/a.bin"), Some(data.clone()));
    assert_eq!(
        emu.object_etag(BUCKET, "dir/a.bin"),
        Some(format!("\"{}\"", md5_hex(&data)))
    );
    // direct inserts follow the same ETag rule and are visible over HTTP
    emu.put_object(BUCKET, "seeded", Bytes::from_static(b"hello"));
    block_on(async {
        let meta = op.stat("seeded").await.unwrap();
        assert_eq!(meta.etag(), Some("\"5d41402abc4b2a76b9719d911017c592\""));
        assert_eq!(
            op.read("seeded").await.unwrap().to_bytes(),
            Bytes::from_static(b"hello")
        );
        op.delete("seeded").await.unwrap();
        assert_eq!(
            op.stat("seeded").await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
    });
    assert_eq!(emu.object(BUCKET, "seeded"), None);
}

#[test]
fn ranged_reads() {
    let emu = start();
    let op = op(&emu);
    let data = pattern(1 << 20, 2);
    let n = data.len();
    emu.put_object(BUCKET, "r", data.clone());
    emu.put_object(BUCKET, "empty", Bytes::new());
    block_on(async {
        let got = op
            .read_with("r")
            .range(1000..1100)
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(got, data.slice(1000..1100));
        let got = op
            .read_with("r")
            .range(n as u64 - 10..)
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(got, data.slice(n - 10..));

        let resp = raw_get(&op, "r", Some("bytes=5-9")).await;
        assert_eq!(resp.status(), 206);
        assert_eq!(
            resp.headers()["content-range"],
            format!("bytes 5-9/{n}").as_str()
        );
        assert_eq!(resp.headers()["content-length"], "5");
        assert_eq!(
            resp.headers()["etag"],
            format!("\"{}\"", md5_hex(&data)).as_str()
        );
        assert!(resp.headers().contains_key("last-modified"));
        assert_eq!(resp.bytes().await.unwrap(), data.slice(5..10));

        let resp = raw_get(&op, "r", Some("bytes=-16")).await;
        assert_eq!(resp.status(), 206);
        assert_eq!(
            resp.headers()["content-range"],
            format!("bytes {}-{}/{n}", n - 16, n - 1).as_str()
        );
        assert_eq!(resp.bytes().await.unwrap(), data.slice(n - 16..));

        let resp = raw_get(&op, "r", Some(&format!("bytes={}-", n - 3))).await;
        assert_eq!(resp.status(), 206);
        assert_eq!(resp.bytes().await.unwrap(), data.slice(n - 3..));

        // end past the size is clamped
        let resp = raw_get(&op, "r", Some(&format!("bytes={}-{}", n - 2, n + 100))).await;
        assert_eq!(resp.status(), 206);
        assert_eq!(resp.bytes().await.unwrap(), data.slice(n - 2..));

        let resp = raw_get(&op, "r", Some(&format!("bytes={n}-"))).await;
        assert_eq!(resp.status(), 416);
        assert!(
            resp.text()
                .await
                .unwrap()
                .contains("<Code>InvalidRange</Code>")
        );

        let resp = raw_get(&op, "r", None).await;
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("content-range").is_none());
        assert_eq!(resp.headers()["content-length"], n.to_string().as_str());
        assert_eq!(resp.bytes().await.unwrap(), data);

        // a Range on an empty object is ignored
        let resp = raw_get(&op, "empty", Some("bytes=0-")).await;
        assert_eq!(resp.status(), 200);
        assert!(resp.bytes().await.unwrap().is_empty());
    });
}

#[test]
fn listing_with_delimiter_and_pagination() {
    let emu = start();
    let op = op(&emu);
    let mut expected = Vec::new();
    for i in 0..1500 {
        let key = format!("big/f{i:05}");
        let data = Bytes::from(key.clone().into_bytes());
        expected.push((key.clone(), md5_hex(&data)));
        emu.put_object(BUCKET, &key, data);
    }
    emu.put_object(BUCKET, "big/sub1/x", Bytes::from_static(b"x"));
    emu.put_object(BUCKET, "big/sub1/deeper/y", Bytes::from_static(b"y"));
    emu.put_object(BUCKET, "big/sub2/z", Bytes::from_static(b"z"));
    emu.put_object(BUCKET, "other", Bytes::from_static(b"o"));
    emu.reset_stats();

    block_on(async {
        let entries = op.list("big/").await.unwrap();
        let files: Vec<_> = entries.iter().filter(|e| e.metadata().is_file()).collect();
        let mut dirs: Vec<_> = entries
            .iter()
            .filter(|e| e.metadata().is_dir() && e.path() != "big/")
            .map(|e| e.path().to_owned())
            .collect();
        dirs.sort();
        assert_eq!(dirs, vec!["big/sub1/".to_owned(), "big/sub2/".to_owned()]);
        assert_eq!(files.len(), 1500);
        for (e, (key, md5)) in files.iter().zip(&expected) {
            assert_eq!(e.path(), key);
            assert_eq!(
                e.metadata().etag().map(|t| t.trim_matches('"')),
                Some(md5.as_str())
            );
            assert_eq!(e.metadata().content_length(), key.len() as u64);
        }
    });
    let lists = emu.stats().lists;
    assert!(
        lists >= 2,
        "1500 keys need at least two pages, saw {lists} LISTs"
    );

    block_on(async {
        let all = op.list_with("big/").recursive(true).await.unwrap();
        let files = all.iter().filter(|e| e.metadata().is_file()).count();
        assert_eq!(files, 1503);
        let root = op.list("").await.unwrap();
        let mut names: Vec<_> = root
            .iter()
            .map(|e| e.path().to_owned())
            .filter(|p| !p.is_empty() && p != "/")
            .collect();
        names.sort();
        assert_eq!(names, vec!["big/".to_owned(), "other".to_owned()]);
    });
}

#[test]
fn opendal_lists_page_by_page() {
    let emu = start();
    let op = op(&emu);
    for k in ["a/1", "a/2", "b", "c/1", "d"] {
        emu.put_object(BUCKET, k, Bytes::from_static(b"data"));
    }
    block_on(async {
        // opendal's lister pages with max-keys through list_with().limit()
        let entries = op.list_with("").limit(1).await.unwrap();
        let mut names: Vec<_> = entries
            .iter()
            .map(|e| e.path().to_owned())
            .filter(|p| !p.is_empty() && p != "/")
            .collect();
        names.sort();
        assert_eq!(names, vec!["a/", "b", "c/", "d"]);
    });
    // every page of size 1 is one LIST: 4 entries -> at least 4 requests
    assert!(emu.stats().lists >= 4);
}

#[test]
fn missing_keys_are_404() {
    let emu = start();
    let op = op(&emu);
    emu.put_object(BUCKET, "dir/file", Bytes::from_static(b"content"));
    block_on(async {
        let e = op.read("nope").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains("NoSuchKey"), "{e}");
        assert_eq!(
            op.stat("nope").await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        // "dir" is only a prefix of "dir/file", not an object
        let e = op.read("dir").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        assert_eq!(
            op.stat("dir").await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            op.stat("dir/fil").await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        let resp = raw_get(&op, "dir", None).await;
        assert_eq!(resp.status(), 404);
        assert!(
            resp.text()
                .await
                .unwrap()
                .contains("<Code>NoSuchKey</Code>")
        );
    });
}

#[test]
fn missing_bucket_errors() {
    let emu = start();
    let op = op_with(&emu, "no-such-bucket", emu.access_key(), emu.secret_key());
    block_on(async {
        let e = op.read("k").await.unwrap_err();
        assert!(e.to_string().contains("NoSuchBucket"), "{e}");
        let e = op.write("k", Bytes::from_static(b"x")).await.unwrap_err();
        assert!(e.to_string().contains("NoSuchBucket"), "{e}");
        let e = op.list("").await.unwrap_err();
        assert!(e.to_string().contains("NoSuchBucket"), "{e}");
        let resp = raw_get(&op, "k", None).await;
        assert_eq!(resp.status(), 404);
    });
}

#[test]
fn wrong_credentials_are_403() {
    let emu = start();
    emu.put_object(BUCKET, "k", Bytes::from_static(b"secret data"));
    block_on(async {
        let bad_secret = op_with(&emu, BUCKET, emu.access_key(), "not-the-secret");
        let e = bad_secret.read("k").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("SignatureDoesNotMatch"), "{e}");
        let e = bad_secret
            .write("k2", Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");

        let bad_key = op_with(&emu, BUCKET, "nobody", emu.secret_key());
        let e = bad_key.read("k").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("InvalidAccessKeyId"), "{e}");

        // unsigned requests are refused too
        let resp = reqwest::get(format!("{}/{BUCKET}/k", emu.endpoint()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 403);
    });
    assert!(emu.object(BUCKET, "k2").is_none());
}

#[test]
fn multipart_upload_through_writer() {
    let emu = start();
    let op = op(&emu);
    let part = 5 * 1024 * 1024;
    let data = pattern(12 * 1024 * 1024, 3);
    block_on(async {
        let mut w = op.writer_with("mp/object").chunk(part).await.unwrap();
        // feed it in odd-sized pieces; the writer buffers into 5 MiB parts
        for piece in data.chunks(1_000_003) {
            w.write(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        w.close().await.unwrap();
        let meta = op.stat("mp/object").await.unwrap();
        let mut md5s = Vec::new();
        for p in data.chunks(part) {
            md5s.extend_from_slice(&Md5::digest(p));
        }
        let expected = format!("\"{}-3\"", md5_hex(&md5s));
        assert_eq!(meta.etag(), Some(expected.as_str()));
        assert_eq!(meta.content_length(), data.len() as u64);
        let got = op.read("mp/object").await.unwrap().to_bytes();
        assert!(got == data, "multipart object content differs");
    });
    assert_eq!(
        emu.object(BUCKET, "mp/object").map(|b| b.len()),
        Some(data.len())
    );
}

#[test]
fn counters_count_requests_and_get_bytes() {
    let emu = start();
    let op = op(&emu);
    let data = pattern(3 * 1024 * 1024 + 17, 4);
    emu.put_object(BUCKET, "c", data.clone());
    emu.reset_stats();
    block_on(async {
        assert_eq!(op.read("c").await.unwrap().len(), data.len());
        op.stat("c").await.unwrap();
        assert_eq!(op.read_with("c").range(0..100).await.unwrap().len(), 100);
        op.write("w", Bytes::from_static(b"abc")).await.unwrap();
        op.list("").await.unwrap();
    });
    let s = emu.stats();
    assert_eq!(s.gets, 2);
    assert_eq!(s.heads, 1);
    assert_eq!(s.puts, 1);
    assert!(s.lists >= 1);
    assert_eq!(s.get_bytes, data.len() as u64 + 100);
    assert!(s.requests >= 5);
    emu.reset_stats();
    assert_eq!(emu.stats(), s3emu::Stats::default());
}

#[test]
fn fail_next_gets_fails_exactly_n() {
    let emu = start();
    let op = op(&emu);
    emu.put_object(BUCKET, "f", Bytes::from_static(b"payload"));
    emu.fail_next_gets(2);
    block_on(async {
        for _ in 0..2 {
            let e = op.read("f").await.unwrap_err();
            assert!(e.is_temporary(), "{e}");
            assert!(e.to_string().contains("SlowDown"), "{e}");
        }
        // HEAD is not affected by fail_next_gets
        op.stat("f").await.unwrap();
        assert_eq!(
            op.read("f").await.unwrap().to_bytes(),
            Bytes::from_static(b"payload")
        );
    });
    let s = emu.stats();
    assert_eq!(s.injected_errors, 2);
    assert_eq!(s.gets, 3);
    assert_eq!(s.get_bytes, 7);
}

#[test]
fn corrupt_key_flips_one_byte() {
    let emu = start();
    let op = op(&emu);
    let data = pattern(200_000, 5);
    emu.put_object(BUCKET, "bad", data.clone());
    emu.put_object(BUCKET, "good", data.clone());
    emu.corrupt_key(BUCKET, "bad");
    block_on(async {
        let got = op.read("bad").await.unwrap().to_bytes();
        assert_eq!(got.len(), data.len());
        let diffs: Vec<usize> = (0..data.len()).filter(|&i| got[i] != data[i]).collect();
        assert_eq!(diffs.len(), 1, "exactly one byte differs");
        // ranged reads of the key are corrupted too
        let got = op
            .read_with("bad")
            .range(1000..2000)
            .await
            .unwrap()
            .to_bytes();
        assert_ne!(got, data.slice(1000..2000));
        // metadata is untouched, other keys are fine
        let meta = op.stat("bad").await.unwrap();
        assert_eq!(
            meta.etag(),
            Some(format!("\"{}\"", md5_hex(&data)).as_str())
        );
        assert_eq!(op.read("good").await.unwrap().to_bytes(), data);
    });
    emu.clear_corrupt_keys();
    block_on(async {
        assert_eq!(op.read("bad").await.unwrap().to_bytes(), data);
    });
    assert_eq!(emu.object(BUCKET, "bad"), Some(data));
}

#[test]
fn latency_delays_first_byte() {
    let emu = start();
    let op = op(&emu);
    emu.put_object(BUCKET, "l", Bytes::from_static(b"x"));
    block_on(async {
        op.stat("l").await.unwrap(); // warm up the connection
        emu.set_latency(Duration::from_millis(150));
        let t = Instant::now();
        op.stat("l").await.unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(140),
            "{:?}",
            t.elapsed()
        );
        let t = Instant::now();
        op.read("l").await.unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(140),
            "{:?}",
            t.elapsed()
        );
        emu.set_latency(Duration::ZERO);
    });
    assert_eq!(emu.latency(), Duration::ZERO);
}

#[test]
fn bandwidth_cap_paces_body() {
    let emu = start();
    let op = op(&emu);
    let data = pattern(1024 * 1024, 6);
    emu.put_object(BUCKET, "slow", data.clone());
    emu.set_bandwidth(Some(4 * 1024 * 1024));
    block_on(async {
        let t = Instant::now();
        let got = op.read("slow").await.unwrap().to_bytes();
        // 1 MiB at 4 MiB/s is 250 ms; allow for the unpaced first chunk
        assert!(
            t.elapsed() >= Duration::from_millis(180),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(got, data);
    });
}

#[test]
fn probabilistic_faults() {
    let emu = Emulator::start(Config {
        seed: 42,
        ..Config::default()
    })
    .unwrap();
    emu.create_bucket(BUCKET);
    let op = op(&emu);
    let data = pattern(2 * 1024 * 1024, 7);
    emu.put_object(BUCKET, "p", data.clone());
    block_on(async {
        emu.set_faults(Faults {
            error_rate: 1.0,
            ..Faults::default()
        });
        let e = op.read("p").await.unwrap_err();
        assert!(e.is_temporary(), "{e}");
        assert!(op.stat("p").await.is_err());

        emu.set_faults(Faults {
            reset_rate: 1.0,
            ..Faults::default()
        });
        let r = op.read("p").await;
        assert!(
            r.is_err(),
            "a reset body must not read back as a complete object"
        );

        emu.set_faults(Faults {
            corrupt_rate: 1.0,
            ..Faults::default()
        });
        let got = op.read("p").await.unwrap().to_bytes();
        assert_eq!(got.len(), data.len());
        assert_eq!((0..data.len()).filter(|&i| got[i] != data[i]).count(), 1);

        emu.set_faults(Faults::default());
        assert_eq!(op.read("p").await.unwrap().to_bytes(), data);
    });
    let s = emu.stats();
    assert_eq!(s.injected_errors, 2);
    assert!(s.injected_resets >= 1);
    assert_eq!(s.injected_corruptions, 1);
}

#[test]
fn many_concurrent_connections() {
    let emu = start();
    let op = op(&emu);
    let data = pattern(4 * 1024 * 1024, 8);
    emu.put_object(BUCKET, "big", data.clone());
    block_on(async {
        let mut tasks = Vec::new();
        for i in 0..96u64 {
            let op = op.clone();
            let data = data.clone();
            tasks.push(tokio::spawn(async move {
                let start = (i * 40_000) % (data.len() as u64 - 100_000);
                let got = op
                    .read_with("big")
                    .range(start..start + 100_000)
                    .await
                    .unwrap()
                    .to_bytes();
                assert_eq!(got, data.slice(start as usize..start as usize + 100_000));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    assert_eq!(emu.stats().gets, 96);
    assert_eq!(emu.stats().get_bytes, 96 * 100_000);
}

#[test]
fn keys_with_special_characters() {
    let emu = start();
    let op = op(&emu);
    let keys = [
        "dir/with space/ü+x.bin",
        "a%2Fb",
        "q?uery&x=1",
        "tilde~/(paren)",
    ];
    block_on(async {
        for (i, k) in keys.iter().enumerate() {
            op.write(k, Bytes::from(vec![i as u8; 10])).await.unwrap();
        }
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(
                op.read(k).await.unwrap().to_bytes(),
                Bytes::from(vec![i as u8; 10]),
                "{k}"
            );
        }
        let all = op.list_with("").recursive(true).await.unwrap();
        let mut listed: Vec<_> = all
            .iter()
            .filter(|e| e.metadata().is_file())
            .map(|e| e.path().to_owned())
            .collect();
        listed.sort();
        let mut expected: Vec<_> = keys.iter().map(|k| k.to_string()).collect();
        expected.sort();
        assert_eq!(listed, expected);
    });
    assert_eq!(emu.keys(BUCKET).len(), keys.len());
    assert!(emu.object(BUCKET, "dir/with space/ü+x.bin").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usable_from_async_context() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Emulator>();
    let emu = start();
    emu.put_object(BUCKET, "k", Bytes::from_static(b"v"));
    let op = op(&emu);
    assert_eq!(
        op.read("k").await.unwrap().to_bytes(),
        Bytes::from_static(b"v")
    );
    drop(emu);
}

#[test]
fn shutdown_stops_serving() {
    let emu = start();
    let endpoint = emu.endpoint();
    let addr = emu.addr();
    emu.shutdown();
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err(),
        "{endpoint} still accepts"
    );
}
