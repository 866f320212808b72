//! Wire-level fidelity checks: hand-signed (SigV4) HTTP requests against the
//! emulator, asserting exact status codes, headers and XML fields.

use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use md5::{Digest as _, Md5};
use reqwest::{Method, StatusCode};
use s3emu::{Config, Emulator};
use sha2::{Digest as _, Sha256};

const BUCKET: &str = "raw-bucket";

struct Client {
    http: reqwest::Client,
    endpoint: String,
    host: String,
    access_key: String,
    secret_key: String,
    region: String,
}

struct Resp {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Text of every `<name>…</name>` element, in document order.
    fn all(&self, name: &str) -> Vec<String> {
        let (open, close) = (format!("<{name}>"), format!("</{name}>"));
        let mut out = Vec::new();
        let mut rest = self.body.as_str();
        while let Some(i) = rest.find(&open) {
            rest = &rest[i + open.len()..];
            let j = rest.find(&close).expect("unclosed element");
            out.push(rest[..j].to_owned());
            rest = &rest[j + close.len()..];
        }
        out
    }

    fn one(&self, name: &str) -> Option<String> {
        self.all(name).into_iter().next()
    }

    fn code(&self) -> Option<String> {
        self.one("Code")
    }
}

fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap();
    m.update(data.as_bytes());
    m.finalize().into_bytes().to_vec()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

impl Client {
    fn new(emu: &Emulator) -> Self {
        Self {
            http: reqwest::Client::new(),
            endpoint: emu.endpoint(),
            host: emu.addr().to_string(),
            access_key: emu.access_key().to_owned(),
            secret_key: emu.secret_key().to_owned(),
            region: emu.region().to_owned(),
        }
    }

    /// Send a SigV4-signed request and read the whole answer.
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Resp {
        let resp = self.send_raw(method, path, query, headers, body).await;
        Resp {
            status: resp.status(),
            headers: resp.headers().clone(),
            body: resp.text().await.unwrap(),
        }
    }

    /// Send a SigV4-signed request. `path` is unencoded (`/bucket/key`).
    async fn send_raw(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> reqwest::Response {
        let now = time::OffsetDateTime::now_utc();
        let date = format!(
            "{:04}{:02}{:02}",
            now.year(),
            u8::from(now.month()),
            now.day()
        );
        let amz_date = format!(
            "{date}T{:02}{:02}{:02}Z",
            now.hour(),
            now.minute(),
            now.second()
        );
        let payload = sha256_hex(&body);
        let path = uri_encode(path, true);

        let mut q: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
            .collect();
        q.sort();
        let canonical_query = q
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");

        let mut hs: Vec<(String, String)> = vec![
            ("host".into(), self.host.clone()),
            ("x-amz-content-sha256".into(), payload.clone()),
            ("x-amz-date".into(), amz_date.clone()),
        ];
        for (k, v) in headers {
            hs.push((k.to_ascii_lowercase(), v.trim().to_owned()));
        }
        hs.sort();
        let canonical_headers: String = hs.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
        let signed_headers = hs
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(";");
        let canonical_request = format!(
            "{method}\n{path}\n{canonical_query}\n{canonical_headers}\n{signed_headers}\n{payload}"
        );
        let scope = format!("{date}/{}/s3/aws4_request", self.region);
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            sha256_hex(canonical_request.as_bytes())
        );
        let mut key = hmac(format!("AWS4{}", self.secret_key).as_bytes(), &date);
        for part in [self.region.as_str(), "s3", "aws4_request"] {
            key = hmac(&key, part);
        }
        let signature = hex::encode(hmac(&key, &string_to_sign));
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            self.access_key
        );

        let url = if canonical_query.is_empty() {
            format!("{}{path}", self.endpoint)
        } else {
            format!("{}{path}?{canonical_query}", self.endpoint)
        };
        let mut req = self.http.request(method, url).header("authorization", auth);
        for (k, v) in &hs {
            if k != "host" {
                req = req.header(k.as_str(), v.as_str());
            }
        }
        req.body(body).send().await.unwrap()
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Resp {
        self.send(Method::GET, path, query, &[], Bytes::new()).await
    }
}

fn run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn start() -> (Emulator, Client) {
    let emu = Emulator::start(Config::default()).unwrap();
    emu.create_bucket(BUCKET);
    let c = Client::new(&emu);
    (emu, c)
}

fn md5_b64(data: &[u8]) -> String {
    base64_simd::STANDARD.encode_to_string(Md5::digest(data))
}

#[test]
fn bucket_lifecycle() {
    let (_emu, c) = start();
    run(async {
        let r = c.send(Method::PUT, "/fresh", &[], &[], Bytes::new()).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let r = c.send(Method::HEAD, "/fresh", &[], &[], Bytes::new()).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-amz-bucket-region"), Some("us-east-1"));
        let r = c
            .send(Method::HEAD, "/missing", &[], &[], Bytes::new())
            .await;
        assert_eq!(r.status, 404);

        let r = c.get("/", &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.all("Name"), vec!["fresh".to_owned(), BUCKET.to_owned()]);
        assert!(r.one("CreationDate").is_some());

        let r = c.get("/missing", &[("list-type", "2")]).await;
        assert_eq!(r.status, 404);
        assert_eq!(r.code().as_deref(), Some("NoSuchBucket"));
        let r = c
            .send(
                Method::PUT,
                "/missing/k",
                &[],
                &[],
                Bytes::from_static(b"x"),
            )
            .await;
        assert_eq!(r.code().as_deref(), Some("NoSuchBucket"));

        let r = c
            .send(Method::PUT, "/fresh/k", &[], &[], Bytes::from_static(b"x"))
            .await;
        assert_eq!(r.status, 200);
        let r = c
            .send(Method::DELETE, "/fresh", &[], &[], Bytes::new())
            .await;
        assert_eq!(r.status, 409);
        assert_eq!(r.code().as_deref(), Some("BucketNotEmpty"));
        let r = c
            .send(Method::DELETE, "/fresh/k", &[], &[], Bytes::new())
            .await;
        assert_eq!(r.status, 204);
        // deleting a missing key is still 204
        let r = c
            .send(Method::DELETE, "/fresh/k", &[], &[], Bytes::new())
            .await;
        assert_eq!(r.status, 204);
        let r = c
            .send(Method::DELETE, "/fresh", &[], &[], Bytes::new())
            .await;
        assert_eq!(r.status, 204);
        let r = c.send(Method::HEAD, "/fresh", &[], &[], Bytes::new()).await;
        assert_eq!(r.status, 404);
        let r = c
            .send(Method::DELETE, "/fresh", &[], &[], Bytes::new())
            .await;
        assert_eq!(r.code().as_deref(), Some("NoSuchBucket"));
    });
}

#[test]
fn list_v2_xml_fields() {
    let (emu, c) = start();
    for k in ["a/1", "a/2", "b", "c/1", "d"] {
        emu.put_object(BUCKET, k, Bytes::from(k.as_bytes().to_vec()));
    }
    let path = format!("/{BUCKET}");
    run(async {
        let r = c
            .get(
                &path,
                &[("list-type", "2"), ("delimiter", "/"), ("max-keys", "2")],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.one("Name").as_deref(), Some(BUCKET));
        assert_eq!(r.one("KeyCount").as_deref(), Some("2"));
        assert_eq!(r.one("MaxKeys").as_deref(), Some("2"));
        assert_eq!(r.one("IsTruncated").as_deref(), Some("true"));
        assert_eq!(r.one("Delimiter").as_deref(), Some("/"));
        assert_eq!(r.all("Prefix"), vec!["".to_owned(), "a/".to_owned()]);
        assert_eq!(r.all("Key"), vec!["b".to_owned()]);
        assert_eq!(
            r.one("ETag"),
            Some(format!("\"{}\"", hex::encode(Md5::digest(b"b"))))
        );
        assert_eq!(r.one("Size").as_deref(), Some("1"));
        assert_eq!(r.one("StorageClass").as_deref(), Some("STANDARD"));
        let lm = r.one("LastModified").unwrap();
        assert!(lm.ends_with('Z') && lm.contains('T'), "{lm}");
        let token = r.one("NextContinuationToken").unwrap();

        let r = c
            .get(
                &path,
                &[
                    ("list-type", "2"),
                    ("delimiter", "/"),
                    ("max-keys", "2"),
                    ("continuation-token", &token),
                ],
            )
            .await;
        assert_eq!(r.one("ContinuationToken"), Some(token.clone()));
        assert_eq!(r.one("KeyCount").as_deref(), Some("2"));
        assert_eq!(r.one("IsTruncated").as_deref(), Some("false"));
        assert!(r.one("NextContinuationToken").is_none());
        assert_eq!(r.all("Key"), vec!["d".to_owned()]);
        assert_eq!(r.all("Prefix"), vec!["".to_owned(), "c/".to_owned()]);

        let r = c
            .get(&path, &[("list-type", "2"), ("start-after", "b")])
            .await;
        assert_eq!(r.all("Key"), vec!["c/1".to_owned(), "d".to_owned()]);
        assert_eq!(r.one("StartAfter").as_deref(), Some("b"));

        let r = c.get(&path, &[("list-type", "2"), ("prefix", "a/")]).await;
        assert_eq!(r.all("Key"), vec!["a/1".to_owned(), "a/2".to_owned()]);

        let r = c
            .get(&path, &[("list-type", "2"), ("max-keys", "5000")])
            .await;
        assert_eq!(r.one("MaxKeys").as_deref(), Some("1000"));
        assert_eq!(r.one("KeyCount").as_deref(), Some("5"));

        let r = c
            .get(
                &path,
                &[("list-type", "2"), ("continuation-token", "garbage")],
            )
            .await;
        assert_eq!(r.status, 400);
        assert_eq!(r.code().as_deref(), Some("InvalidArgument"));

        let r = c
            .get(
                &path,
                &[
                    ("list-type", "2"),
                    ("prefix", "a b+"),
                    ("encoding-type", "url"),
                ],
            )
            .await;
        assert_eq!(r.one("Prefix").as_deref(), Some("a+b%2B"));
    });
}

#[test]
fn list_v2_paginates_past_1000() {
    let (emu, c) = start();
    for i in 0..2500 {
        emu.put_object(BUCKET, &format!("k{i:05}"), Bytes::from_static(b"v"));
    }
    let path = format!("/{BUCKET}");
    run(async {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0;
        loop {
            let mut q = vec![("list-type", "2")];
            if let Some(t) = &token {
                q.push(("continuation-token", t.as_str()));
            }
            let r = c.get(&path, &q).await;
            pages += 1;
            let page_keys = r.all("Key");
            assert_eq!(r.one("KeyCount"), Some(page_keys.len().to_string()));
            keys.extend(page_keys);
            match r.one("NextContinuationToken") {
                Some(t) => {
                    assert_eq!(r.one("IsTruncated").as_deref(), Some("true"));
                    token = Some(t);
                }
                None => break,
            }
        }
        assert_eq!(pages, 3);
        let expected: Vec<String> = (0..2500).map(|i| format!("k{i:05}")).collect();
        assert_eq!(keys, expected);
    });
}

#[test]
fn list_v1_marker() {
    let (emu, c) = start();
    for k in ["a/1", "a/2", "b", "c/1", "d"] {
        emu.put_object(BUCKET, k, Bytes::from_static(b"v"));
    }
    let path = format!("/{BUCKET}");
    run(async {
        let r = c.get(&path, &[("max-keys", "2")]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.all("Key"), vec!["a/1".to_owned(), "a/2".to_owned()]);
        assert_eq!(r.one("IsTruncated").as_deref(), Some("true"));
        // without a delimiter S3 returns no NextMarker
        assert!(r.one("NextMarker").is_none());
        let r = c.get(&path, &[("marker", "a/2")]).await;
        assert_eq!(
            r.all("Key"),
            vec!["b".to_owned(), "c/1".to_owned(), "d".to_owned()]
        );
        assert_eq!(r.one("Marker").as_deref(), Some("a/2"));

        let r = c.get(&path, &[("delimiter", "/"), ("max-keys", "1")]).await;
        assert_eq!(r.one("NextMarker").as_deref(), Some("a/"));
        let r = c.get(&path, &[("delimiter", "/"), ("marker", "a/")]).await;
        assert_eq!(r.all("Key"), vec!["b".to_owned(), "d".to_owned()]);
        assert_eq!(r.all("Prefix"), vec!["".to_owned(), "c/".to_owned()]);
        assert!(r.one("Owner").is_some());
    });
}

#[test]
fn put_content_md5_and_conditions() {
    let (emu, c) = start();
    let path = format!("/{BUCKET}/obj");
    run(async {
        let body = Bytes::from_static(b"some body");
        let good = md5_b64(&body);
        let r = c
            .send(
                Method::PUT,
                &path,
                &[],
                &[("content-md5", &good)],
                body.clone(),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.header("etag"),
            Some(format!("\"{}\"", hex::encode(Md5::digest(&body))).as_str())
        );

        let bad = md5_b64(b"other");
        let r = c
            .send(
                Method::PUT,
                "/raw-bucket/obj2",
                &[],
                &[("content-md5", &bad)],
                body.clone(),
            )
            .await;
        assert_eq!(r.status, 400);
        assert_eq!(r.code().as_deref(), Some("BadDigest"));
        let r = c
            .send(
                Method::PUT,
                "/raw-bucket/obj2",
                &[],
                &[("content-md5", "nope")],
                body.clone(),
            )
            .await;
        assert_eq!(r.code().as_deref(), Some("InvalidDigest"));
        assert!(emu.object(BUCKET, "obj2").is_none());

        // If-None-Match: * refuses to overwrite
        let r = c
            .send(
                Method::PUT,
                &path,
                &[],
                &[("if-none-match", "*")],
                Bytes::from_static(b"x"),
            )
            .await;
        assert_eq!(r.status, 412);

        let etag = format!("\"{}\"", hex::encode(Md5::digest(&body)));
        let r = c
            .send(
                Method::GET,
                &path,
                &[],
                &[("if-none-match", &etag)],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, 304);
        let r = c
            .send(
                Method::GET,
                &path,
                &[],
                &[("if-match", "\"0000\"")],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, 412);
        let r = c
            .send(
                Method::GET,
                &path,
                &[],
                &[("if-match", &etag)],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "some body");
        assert_eq!(r.header("content-type"), Some("binary/octet-stream"));

        // user metadata and content type round-trip
        let r = c
            .send(
                Method::PUT,
                "/raw-bucket/meta",
                &[],
                &[("content-type", "text/plain"), ("x-amz-meta-color", "blue")],
                Bytes::from_static(b"m"),
            )
            .await;
        assert_eq!(r.status, 200);
        let r = c
            .send(Method::HEAD, "/raw-bucket/meta", &[], &[], Bytes::new())
            .await;
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert_eq!(r.header("x-amz-meta-color"), Some("blue"));
        assert_eq!(r.header("content-length"), Some("1"));
    });
}

#[test]
fn head_object_semantics() {
    let (emu, c) = start();
    emu.put_object(BUCKET, "h", Bytes::from(vec![9u8; 1000]));
    run(async {
        let r = c
            .send(
                Method::HEAD,
                "/raw-bucket/h",
                &[],
                &[("range", "bytes=10-19")],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, 206);
        assert_eq!(r.header("content-range"), Some("bytes 10-19/1000"));
        assert_eq!(r.header("content-length"), Some("10"));
        let r = c
            .send(Method::HEAD, "/raw-bucket/h", &[], &[], Bytes::new())
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-length"), Some("1000"));
        assert_eq!(r.header("accept-ranges"), Some("bytes"));
        assert!(r.header("last-modified").is_some());
        assert!(r.header("x-amz-request-id").is_some());
        let r = c
            .send(Method::HEAD, "/raw-bucket/nope", &[], &[], Bytes::new())
            .await;
        assert_eq!(r.status, 404);
        let r = c
            .send(
                Method::HEAD,
                "/raw-bucket/h",
                &[],
                &[("range", "bytes=1000-")],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, 416);
    });
}

#[test]
fn multipart_raw_rules() {
    let (emu, c) = start();
    let path = "/raw-bucket/mp";
    run(async {
        let r = c
            .send(Method::POST, path, &[("uploads", "")], &[], Bytes::new())
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let id = r.one("UploadId").unwrap();
        let mut etags = Vec::new();
        for (n, body) in [("1", &b"first"[..]), ("2", &b"second"[..])] {
            let r = c
                .send(
                    Method::PUT,
                    path,
                    &[("partNumber", n), ("uploadId", &id)],
                    &[],
                    Bytes::copy_from_slice(body),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(
                r.header("etag"),
                Some(format!("\"{}\"", hex::encode(Md5::digest(body))).as_str())
            );
            etags.push(r.header("etag").unwrap().to_owned());
        }
        let r = c
            .send(
                Method::PUT,
                path,
                &[("partNumber", "1"), ("uploadId", "bogus")],
                &[],
                Bytes::from_static(b"x"),
            )
            .await;
        assert_eq!(r.status, 404);
        assert_eq!(r.code().as_deref(), Some("NoSuchUpload"));

        let r = c.get(path, &[("uploadId", &id)]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.all("PartNumber"), vec!["1".to_owned(), "2".to_owned()]);
        assert_eq!(r.all("Size"), vec!["5".to_owned(), "6".to_owned()]);

        let complete = |parts: &[(&str, &str)]| {
            let mut xml = String::from("<CompleteMultipartUpload>");
            for (n, e) in parts {
                xml.push_str(&format!(
                    "<Part><PartNumber>{n}</PartNumber><ETag>{e}</ETag></Part>"
                ));
            }
            xml.push_str("</CompleteMultipartUpload>");
            Bytes::from(xml)
        };
        // part 1 is below 5 MiB and not the last one
        let body = complete(&[("1", &etags[0]), ("2", &etags[1])]);
        let r = c
            .send(Method::POST, path, &[("uploadId", &id)], &[], body)
            .await;
        assert_eq!(r.status, 400);
        assert_eq!(r.code().as_deref(), Some("EntityTooSmall"));
        let body = complete(&[("1", &etags[1])]);
        let r = c
            .send(Method::POST, path, &[("uploadId", &id)], &[], body)
            .await;
        assert_eq!(r.code().as_deref(), Some("InvalidPart"));
        let body = complete(&[("3", &etags[1])]);
        let r = c
            .send(Method::POST, path, &[("uploadId", &id)], &[], body)
            .await;
        assert_eq!(r.code().as_deref(), Some("InvalidPart"));

        // a single (last) part may be small
        let body = complete(&[("2", &etags[1])]);
        let r = c
            .send(Method::POST, path, &[("uploadId", &id)], &[], body)
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let expected = format!("\"{}-1\"", hex::encode(Md5::digest(Md5::digest(b"second"))));
        assert_eq!(r.one("ETag"), Some(expected.clone()));
        assert_eq!(
            emu.object(BUCKET, "mp"),
            Some(Bytes::from_static(b"second"))
        );
        assert_eq!(emu.object_etag(BUCKET, "mp"), Some(expected));
        // the upload is gone once completed
        let r = c.get(path, &[("uploadId", &id)]).await;
        assert_eq!(r.code().as_deref(), Some("NoSuchUpload"));

        // abort
        let r = c
            .send(Method::POST, path, &[("uploads", "")], &[], Bytes::new())
            .await;
        let id = r.one("UploadId").unwrap();
        let r = c
            .send(
                Method::DELETE,
                path,
                &[("uploadId", &id)],
                &[],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, 204);
        let r = c
            .send(
                Method::DELETE,
                path,
                &[("uploadId", &id)],
                &[],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, 404);
    });
}

#[test]
fn multipart_part_number_reads() {
    let (emu, c) = start();
    let path = "/raw-bucket/parts";
    let p1 = Bytes::from(vec![1u8; s3emu::MIN_PART_SIZE]);
    let p2 = Bytes::from_static(b"tail");
    run(async {
        let r = c
            .send(Method::POST, path, &[("uploads", "")], &[], Bytes::new())
            .await;
        let id = r.one("UploadId").unwrap();
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (n, body) in [("1", p1.clone()), ("2", p2.clone())] {
            let r = c
                .send(
                    Method::PUT,
                    path,
                    &[("partNumber", n), ("uploadId", &id)],
                    &[],
                    body,
                )
                .await;
            xml.push_str(&format!(
                "<Part><PartNumber>{n}</PartNumber><ETag>{}</ETag></Part>",
                r.header("etag").unwrap()
            ));
        }
        xml.push_str("</CompleteMultipartUpload>");
        let r = c
            .send(
                Method::POST,
                path,
                &[("uploadId", &id)],
                &[],
                Bytes::from(xml),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);

        let r = c.get(path, &[("partNumber", "2")]).await;
        assert_eq!(r.status, 206);
        assert_eq!(r.body, "tail");
        assert_eq!(r.header("x-amz-mp-parts-count"), Some("2"));
        let n = p1.len();
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {n}-{}/{}", n + 3, n + 4).as_str())
        );
        let r = c.get(path, &[("partNumber", "3")]).await;
        assert_eq!(r.status, 416);
    });
    assert_eq!(
        emu.object(BUCKET, "parts").map(|b| b.len()),
        Some(p1.len() + 4)
    );
}

#[test]
fn delete_objects_batch() {
    let (emu, c) = start();
    for k in ["x1", "x2", "x3"] {
        emu.put_object(BUCKET, k, Bytes::from_static(b"v"));
    }
    run(async {
        let xml = Bytes::from_static(
            b"<Delete><Object><Key>x1</Key></Object><Object><Key>x3</Key></Object><Object><Key>missing</Key></Object></Delete>",
        );
        let md5 = md5_b64(&xml);
        let r = c
            .send(
                Method::POST,
                "/raw-bucket",
                &[("delete", "")],
                &[("content-md5", &md5)],
                xml,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.all("Key"),
            vec!["x1".to_owned(), "x3".to_owned(), "missing".to_owned()]
        );
    });
    assert_eq!(emu.keys(BUCKET), vec!["x2".to_owned()]);
}

#[test]
fn reset_truncates_body() {
    let (emu, c) = start();
    emu.put_object(BUCKET, "r", Bytes::from(vec![3u8; 2 * 1024 * 1024]));
    emu.set_faults(s3emu::Faults {
        reset_rate: 1.0,
        ..Default::default()
    });
    run(async {
        // the status line and headers arrive, then the body stops short
        let resp = c
            .send_raw(Method::GET, "/raw-bucket/r", &[], &[], Bytes::new())
            .await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.content_length(), Some(2 * 1024 * 1024));
        let body = tokio::time::timeout(Duration::from_secs(10), resp.bytes())
            .await
            .unwrap();
        assert!(body.is_err(), "reading a reset body must fail");
    });
    let s = emu.stats();
    assert_eq!(s.injected_resets, 1);
    assert!(s.get_bytes < 2 * 1024 * 1024);
}

#[test]
fn crc64_header_on_get_ranged_get_and_head_as_oss_sends_it() {
    let (emu, c) = start();
    // The CRC-64/XZ check value: OSS's x-oss-hash-crc64ecma of "123456789".
    let want = 0x995d_c9bb_df19_39fa_u64.to_string();
    emu.put_object(BUCKET, "c", Bytes::from_static(b"123456789"));
    run(async {
        let r = c.get("/raw-bucket/c", &[]).await;
        assert_eq!(r.header("x-oss-hash-crc64ecma"), Some(want.as_str()));
        let r = c
            .send(
                Method::GET,
                "/raw-bucket/c",
                &[],
                &[("range", "bytes=2-4")],
                Bytes::new(),
            )
            .await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (206, "345"));
        assert_eq!(
            r.header("x-oss-hash-crc64ecma"),
            Some(want.as_str()),
            "a ranged GET declares the whole object's CRC"
        );
        let r = c
            .send(Method::HEAD, "/raw-bucket/c", &[], &[], Bytes::new())
            .await;
        assert_eq!(r.header("x-oss-hash-crc64ecma"), Some(want.as_str()));
        emu.set_declare_crc64(false);
        let r = c.get("/raw-bucket/c", &[]).await;
        assert_eq!(r.header("x-oss-hash-crc64ecma"), None, "as S3: no header");
    });
}

#[test]
fn public_read_serves_unsigned_reads_only() {
    let (emu, _c) = start();
    emu.put_object(BUCKET, "p", Bytes::from_static(b"public"));
    let url = format!("{}/{BUCKET}/p", emu.endpoint());
    run(async {
        let http = reqwest::Client::new();
        let get = |u: String| {
            let http = http.clone();
            async move { http.get(u).send().await.unwrap().status().as_u16() }
        };
        assert_eq!(get(url.clone()).await, 403, "private by default");
        emu.set_public_read(true);
        assert_eq!(get(url.clone()).await, 200);
        let list = format!("{}/{BUCKET}?list-type=2", emu.endpoint());
        assert_eq!(get(list).await, 200);
        let put = http.put(&url).body("x").send().await.unwrap();
        assert_eq!(put.status().as_u16(), 403, "writes still need a signature");
        assert_eq!(
            emu.object(BUCKET, "p").unwrap(),
            Bytes::from_static(b"public")
        );
    });
}
