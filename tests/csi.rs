//! The CSI node plugin, driven as kubelet drives it: `fillfs csi` runs as a process, the
//! test talks CSI gRPC to its unix socket, reads the real FUSE mounts it publishes, and
//! counts on the S3 server what was fetched.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use fillfs::csi::proto::identity_client::IdentityClient;
use fillfs::csi::proto::node_client::NodeClient;
use fillfs::csi::proto::*;
use fillfs::csi::volume;
use tonic::Code;
use tonic::transport::Channel;

const MIB: u64 = 1024 * 1024;

/// A running `fillfs csi` with its own kubelet directory, killed (and its mounts cleared)
/// on drop.
struct Plugin {
    dir: tempfile::TempDir,
    child: Option<Child>,
    rt: tokio::runtime::Runtime,
    node: NodeClient<Channel>,
    identity: IdentityClient<Channel>,
}

impl Plugin {
    fn start(extra: &[&str]) -> Plugin {
        Self::start_in(tempfile::tempdir().expect("plugin dir"), extra)
    }

    fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Plugin {
        Self::start_with_env(dir, extra, &[])
    }

    fn start_with_env(dir: tempfile::TempDir, extra: &[&str], env: &[(&str, &str)]) -> Plugin {
        let socket = dir.path().join("csi.sock");
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("plugin.log"))
            .expect("log");
        let mut cmd = fillfs();
        cmd.arg("csi")
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--node-id")
            .arg("node-1");
        if !extra.contains(&"--kubelet-dir") {
            cmd.arg("--kubelet-dir").arg(dir.path().join("kubelet"));
        }
        let child = cmd
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn fillfs csi");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let channel = loop {
            let connected = unix_channel(&rt, &socket);
            match connected {
                Ok(c) => break c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "plugin socket not ready: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        Plugin {
            child: Some(child),
            rt,
            node: NodeClient::new(channel.clone()),
            identity: IdentityClient::new(channel),
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("plugin.log")).unwrap_or_default()
    }

    /// A kubelet-style target path for `pod`'s volume.
    fn target(&self, pod: &str) -> PathBuf {
        self.dir.path().join(format!(
            "kubelet/pods/{pod}/volumes/kubernetes.io~csi/data/mount"
        ))
    }

    fn publish(
        &self,
        volume_id: &str,
        target: &Path,
        ctx: &[(&str, &str)],
    ) -> Result<(), tonic::Status> {
        let req = publish_request(volume_id, target, ctx);
        let mut node = self.node.clone();
        self.rt.block_on(node.node_publish_volume(req)).map(|_| ())
    }

    fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), tonic::Status> {
        let mut node = self.node.clone();
        self.rt
            .block_on(node.node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: volume_id.into(),
                target_path: target.display().to_string(),
            }))
            .map(|_| ())
    }

    /// SIGKILL, as a crash or an OOM kill would: the mounts are left behind.
    fn kill(&mut self) -> tempfile::TempDir {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for m in fillfs::mountinfo::table() {
            if m.mount_point.starts_with(self.dir.path()) {
                let _ = fillfs::csi::mounts::detach(&m.mount_point);
            }
        }
    }
}

fn publish_request(
    volume_id: &str,
    target: &Path,
    ctx: &[(&str, &str)],
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(VolumeCapability {
            access_type: Some(volume_capability::AccessType::Mount(
                volume_capability::MountVolume::default(),
            )),
            access_mode: Some(volume_capability::AccessMode {
                mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }),
        readonly: true,
        secrets: HashMap::from([
            ("akId".to_string(), ACCESS_KEY.to_string()),
            ("akSecret".to_string(), SECRET_KEY.to_string()),
        ]),
        volume_context: ctx
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// Volume attributes of an s3 volume on the emulator, as a Pod's `volumeAttributes`.
fn s3_volume(emu: &Emulator, prefix: &str) -> Vec<(&'static str, String)> {
    vec![
        ("url", format!("s3://{BUCKET}/{prefix}")),
        ("endpoint", emu.endpoint()),
        ("region", "us-east-1".into()),
        ("csi.storage.k8s.io/ephemeral", "true".into()),
        ("csi.storage.k8s.io/pod.namespace", "team-a".into()),
        ("csi.storage.k8s.io/pod.name", "fill-1".into()),
    ]
}

fn ctx<'a>(
    v: &'a [(&'static str, String)],
    extra: &'a [(&'static str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    v.iter()
        .map(|(k, v)| (*k, v.as_str()))
        .chain(extra.iter().copied())
        .collect()
}

fn put_files(emu: &Emulator, prefix: &str, count: u64, size: u64, seed0: u64) {
    for i in 0..count {
        let data = Bytes::from(pattern(seed0 + i, 0, size as usize));
        emu.put_object(BUCKET, &format!("{prefix}f{i}.bin"), data);
    }
}

fn mounts_at(path: &Path) -> usize {
    fillfs::mountinfo::table()
        .iter()
        .filter(|m| m.mount_point == path)
        .count()
}

#[test]
fn identity_and_node_info() {
    if !fuse_available() {
        return;
    }
    let p = Plugin::start(&[]);
    let mut id = p.identity.clone();
    let info =
        p.rt.block_on(id.get_plugin_info(GetPluginInfoRequest {}))
            .unwrap()
            .into_inner();
    assert_eq!(info.name, "csi.fillfs.io");
    assert!(!info.vendor_version.is_empty());
    let probe =
        p.rt.block_on(id.probe(ProbeRequest {}))
            .unwrap()
            .into_inner();
    assert_eq!(probe.ready, Some(true));
    let caps =
        p.rt.block_on(id.get_plugin_capabilities(GetPluginCapabilitiesRequest {}))
            .unwrap()
            .into_inner();
    assert!(caps.capabilities.is_empty(), "node-only plugin: {caps:?}");

    let mut node = p.node.clone();
    let info =
        p.rt.block_on(node.node_get_info(NodeGetInfoRequest {}))
            .unwrap()
            .into_inner();
    assert_eq!(info.node_id, "node-1");
    let caps =
        p.rt.block_on(node.node_get_capabilities(NodeGetCapabilitiesRequest {}))
            .unwrap()
            .into_inner();
    assert!(caps.capabilities.is_empty(), "no staging: {caps:?}");
    let err =
        p.rt.block_on(node.node_stage_volume(NodeStageVolumeRequest::default()))
            .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
}

#[test]
fn two_volumes_of_one_prefix_share_one_fetch() {
    if !fuse_available() {
        return;
    }
    let emu = emulator();
    let (files, size) = (4u64, 24 * MIB);
    put_files(&emu, "shared/", files, size, 100);
    let p = Plugin::start(&["--cache-size", "512MiB"]);
    let vol = s3_volume(&emu, "shared/");
    let (ta, tb) = (p.target("pod-a"), p.target("pod-b"));
    p.publish("vol-a", &ta, &ctx(&vol, &[])).unwrap();
    p.publish("vol-b", &tb, &ctx(&vol, &[])).unwrap();
    emu.reset_stats();

    let readers: Vec<_> = [ta.clone(), tb.clone()]
        .into_iter()
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..files {
                    verify_stream(&t.join(format!("f{i}.bin")), 100 + i, size);
                }
            })
        })
        .collect();
    for r in readers {
        r.join().expect("reader");
    }
    let fetched = emu.stats().get_bytes;
    let data = files * size;
    let ratio = fetched as f64 / data as f64;
    eprintln!(
        "shared fetch: 2 volumes read {} MiB each; server sent {:.1} MiB = {ratio:.3}x the data",
        data / MIB,
        fetched as f64 / MIB as f64
    );
    assert!(
        fetched >= data,
        "every byte comes from the server once: {fetched} < {data}"
    );
    assert!(
        ratio <= 1.10,
        "two volumes of one prefix fetched {ratio:.3}x the data"
    );

    p.unpublish("vol-a", &ta).unwrap();
    p.unpublish("vol-b", &tb).unwrap();
    assert_eq!(mounts_at(&ta) + mounts_at(&tb), 0);
}

/// Reads every file under each target in parallel, one thread per target; returns each
/// thread's elapsed time.
fn read_in_parallel(targets: &[PathBuf], files: u64, size: u64, seeds: &[u64]) -> Vec<Duration> {
    let start = Instant::now();
    let readers: Vec<_> = targets
        .iter()
        .cloned()
        .zip(seeds.iter().copied())
        .map(|(t, seed)| {
            std::thread::spawn(move || {
                for i in 0..files {
                    verify_stream(&t.join(format!("f{i}.bin")), seed + i, size);
                }
                start.elapsed()
            })
        })
        .collect();
    readers
        .into_iter()
        .map(|r| r.join().expect("reader"))
        .collect()
}

#[test]
fn node_cap_holds_across_three_volumes() {
    if !fuse_available() {
        return;
    }
    let emu = emulator();
    let (files, size, cap) = (2u64, 20 * MIB, 40.0);
    for (v, seed) in [("a/", 10), ("b/", 20), ("c/", 30)] {
        put_files(&emu, v, files, size, seed);
    }
    let p = Plugin::start(&["--node-throughput", "40"]);
    let targets: Vec<PathBuf> = ["p1", "p2", "p3"].iter().map(|n| p.target(n)).collect();
    for (i, (t, prefix)) in targets.iter().zip(["a/", "b/", "c/"]).enumerate() {
        p.publish(&format!("vol-{i}"), t, &ctx(&s3_volume(&emu, prefix), &[]))
            .unwrap();
    }
    emu.reset_stats();
    let times = read_in_parallel(&targets, files, size, &[10, 20, 30]);
    let elapsed = times.iter().max().unwrap().as_secs_f64();
    let fetched = emu.stats().get_bytes as f64 / MIB as f64;
    let rate = fetched / elapsed;
    eprintln!(
        "node cap {cap} MiB/s over 3 volumes: {fetched:.1} MiB in {elapsed:.2} s = {rate:.1} MiB/s ({:+.1}%); per volume done at {:?}",
        (rate / cap - 1.0) * 100.0,
        times
    );
    assert!(
        (rate - cap).abs() <= cap * 0.10,
        "node cap {cap} MiB/s, measured {rate:.1} MiB/s"
    );
}

/// Reads `path` in 256 KiB reads from the start until `until` after `start`; returns the
/// reader's rate in MiB/s between its first read after `from` and its last before `until`
/// (bytes arrive a block at a time: counting what fell inside a fixed window would be off
/// by up to a block).
fn rate_between(path: &Path, start: Instant, from: Duration, until: Duration) -> f64 {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let (mut total, mut first, mut last) = (0u64, None, None);
    loop {
        let n = f.read(&mut buf).unwrap();
        let t = start.elapsed();
        total += n as u64;
        if n == 0 || t >= until {
            break;
        }
        if t >= from {
            first.get_or_insert((t, total));
            last = Some((t, total));
        }
    }
    let ((t0, b0), (t1, b1)) = (first.unwrap(), last.unwrap());
    (b1 - b0) as f64 / MIB as f64 / (t1 - t0).as_secs_f64()
}

#[test]
fn the_node_cap_is_shared_per_volume_then_per_reader() {
    if !fuse_available() {
        return;
    }
    let emu = emulator();
    let size = 160 * MIB;
    put_files(&emu, "fair-a/", 2, size, 60);
    put_files(&emu, "fair-b/", 1, size, 70);
    let p = Plugin::start(&["--node-throughput", "20"]);
    let (ta, tb) = (p.target("pa"), p.target("pb"));
    p.publish("vol-a", &ta, &ctx(&s3_volume(&emu, "fair-a/"), &[]))
        .unwrap();
    p.publish("vol-b", &tb, &ctx(&s3_volume(&emu, "fair-b/"), &[]))
        .unwrap();
    // Volume a has two readers, volume b one; counted over 10 s after a 1 s start.
    let (from, until) = (Duration::from_secs(1), Duration::from_secs(11));
    let start = Instant::now();
    let paths = [ta.join("f0.bin"), ta.join("f1.bin"), tb.join("f0.bin")];
    let got: Vec<f64> = std::thread::scope(|s| {
        let readers: Vec<_> = paths
            .iter()
            .map(|p| s.spawn(move || rate_between(p, start, from, until)))
            .collect();
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let (a1, a2, b) = (got[0], got[1], got[2]);
    eprintln!(
        "MEASURED node cap 20 MiB/s over 10 s: volume a {:.2} MiB/s (readers {a1:.2} and {a2:.2}), volume b {b:.2} MiB/s (one reader)",
        a1 + a2
    );
    assert!(
        ((a1 + a2 + b) / 20.0 - 1.0).abs() <= 0.10,
        "node cap 20 MiB/s, measured {:.2}",
        a1 + a2 + b
    );
    // Before: shared per reader, 2/3 and 1/3 (26.7 and 13.3 of 40).
    assert!(
        ((a1 + a2) / b - 1.0).abs() <= 0.05,
        "volume a {:.2} MiB/s, volume b {b:.2} MiB/s",
        a1 + a2
    );
    assert!(
        (a1 / a2 - 1.0).abs() <= 0.05,
        "the readers of volume a: {a1:.2} and {a2:.2} MiB/s"
    );
    p.unpublish("vol-a", &ta).unwrap();
    p.unpublish("vol-b", &tb).unwrap();
}

#[test]
fn volume_throughput_caps_only_that_volume() {
    if !fuse_available() {
        return;
    }
    let emu = emulator();
    let (files, size) = (2u64, 16 * MIB);
    put_files(&emu, "capped/", files, size, 40);
    put_files(&emu, "free/", files, size, 50);
    let p = Plugin::start(&[]);
    let (tc, tf) = (p.target("capped"), p.target("free"));
    p.publish(
        "vol-capped",
        &tc,
        &ctx(&s3_volume(&emu, "capped/"), &[("throughput", "16")]),
    )
    .unwrap();
    p.publish("vol-free", &tf, &ctx(&s3_volume(&emu, "free/"), &[]))
        .unwrap();
    let times = read_in_parallel(&[tc, tf], files, size, &[40, 50]);
    let (capped, free) = (times[0].as_secs_f64(), times[1].as_secs_f64());
    let rate = (files * size) as f64 / MIB as f64 / capped;
    eprintln!(
        "volume cap 16 MiB/s: capped volume {rate:.1} MiB/s ({capped:.2} s), uncapped volume done in {free:.2} s"
    );
    assert!(
        (rate - 16.0).abs() <= 1.6,
        "volume cap 16 MiB/s, measured {rate:.1}"
    );
    assert!(
        free < capped / 2.0,
        "the cap of one volume slowed another: {free:.2} s vs {capped:.2} s"
    );
}

#[test]
fn publish_and_unpublish_are_idempotent() {
    if !fuse_available() {
        return;
    }
    let emu = emulator();
    put_files(&emu, "idem/", 1, MIB, 60);
    let p = Plugin::start(&[]);
    let t = p.target("pod-i");
    let vol = s3_volume(&emu, "idem/");
    p.publish("vol-i", &t, &ctx(&vol, &[])).unwrap();
    p.publish("vol-i", &t, &ctx(&vol, &[])).unwrap();
    assert_eq!(mounts_at(&t), 1, "a repeated publish must not mount twice");
    assert!(
        p.log()
            .lines()
            .any(|l| l.contains("published") && l.contains("team-a/fill-1")),
        "the publish log names the pod:\n{}",
        p.log()
    );
    verify_stream(&t.join("f0.bin"), 60, MIB);

    let err = p.publish("vol-other", &t, &ctx(&vol, &[])).unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let err = p
        .publish("vol-i", &t, &ctx(&vol, &[("throughput", "5")]))
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    p.unpublish("vol-i", &t).unwrap();
    assert_eq!(mounts_at(&t), 0);
    assert!(!t.exists(), "the target directory is removed");
    p.unpublish("vol-i", &t).unwrap();
    p.unpublish("vol-never", &p.target("pod-unknown")).unwrap();
    // The path is free again.
    p.publish("vol-i", &t, &ctx(&vol, &[])).unwrap();
    assert_eq!(mounts_at(&t), 1);
    p.unpublish("vol-i", &t).unwrap();
    // An unpublish that worked says so once, with no warning from fuser's second unmount.
    assert!(!p.log().contains("Unmount failed"), "{}", p.log());
}

#[test]
fn bad_requests_are_refused_with_a_reason() {
    if !fuse_available() {
        return;
    }
    let emu = emulator();
    let p = Plugin::start(&[]);
    let t = p.target("pod-bad");
    let vol = s3_volume(&emu, "x/");
    let mut node = p.node.clone();
    let call = |node: &mut NodeClient<Channel>, req| p.rt.block_on(node.node_publish_volume(req));

    let mut req = publish_request("v", &t, &ctx(&vol, &[]));
    req.target_path = "relative/mount".into();
    let e = call(&mut node, req).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("absolute"), "{e:?}");

    let mut req = publish_request("v", &t, &ctx(&vol, &[]));
    req.volume_capability.as_mut().unwrap().access_type = Some(
        volume_capability::AccessType::Block(volume_capability::BlockVolume {}),
    );
    let e = call(&mut node, req).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("Block"), "{e:?}");

    // Each required field alone: everything else in the request is valid.
    let mut req = publish_request("v", &t, &ctx(&vol, &[]));
    req.volume_capability = None;
    let e = call(&mut node, req).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("volume_capability"), "{e:?}");

    let mut req = publish_request("v", &t, &ctx(&vol, &[]));
    req.volume_capability.as_mut().unwrap().access_type = None;
    let e = call(&mut node, req).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("access type"), "{e:?}");

    let e = call(&mut node, publish_request("", &t, &ctx(&vol, &[]))).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("volume_id"), "{e:?}");

    let mut req = publish_request("v", &t, &ctx(&vol, &[]));
    req.target_path = String::new();
    let e = call(&mut node, req).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("target_path"), "{e:?}");

    let e = p.unpublish("v", Path::new("")).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("target_path"), "{e:?}");
    let e = p.unpublish("", &t).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("volume_id"), "{e:?}");

    let e = p
        .publish("v", &t, &ctx(&vol, &[("troughput", "10")]))
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("troughput") && e.message().contains("throughput"),
        "{e:?}"
    );

    let e = p
        .publish("v", &t, &[("endpoint", "http://127.0.0.1:1")])
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("no source"), "{e:?}");

    // Reaches the server: a missing bucket, then a wrong key.
    let missing = [
        ("url", "s3://no-such-bucket/x/".to_string()),
        ("endpoint", emu.endpoint()),
        ("region", "us-east-1".into()),
    ];
    let e = p.publish("v", &t, &ctx(&missing, &[])).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("no-such-bucket"), "{e:?}");

    let mut req = publish_request("v", &t, &ctx(&vol, &[]));
    req.secrets
        .insert("akSecret".into(), "wrong-secret-value".into());
    let e = call(&mut node, req).unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(!e.message().contains("wrong-secret-value"), "{e:?}");
    assert!(
        !p.log().contains("wrong-secret-value"),
        "a secret reached the log"
    );
    assert!(!p.log().contains(SECRET_KEY), "a secret reached the log");

    // An endpoint that answers 200 with a web page is not an object store.
    let portal = [
        ("url", format!("s3://{BUCKET}/x/")),
        ("endpoint", html_server()),
        ("region", "us-east-1".into()),
    ];
    let e = p.publish("v", &t, &ctx(&portal, &[])).unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("did not answer like an object store")
            && e.message().contains("text/html"),
        "{e:?}"
    );
    // A prefix with nothing under it (a typo) is refused unless allowed.
    let e = p.publish("v", &t, &ctx(&vol, &[])).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(
        e.message()
            .contains("nothing is stored under s3://test-bucket/x/")
            && e.message().contains("allowEmpty"),
        "{e:?}"
    );
    let e = p
        .publish("v", &t, &ctx(&vol, &[("allowEmpty", "yes")]))
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Target paths kubelet never gives: outside its directory, the directory itself, a
    // directory with something in it, a file.
    let kubelet = p.dir.path().join("kubelet");
    let outside = tempfile::tempdir().unwrap();
    let full = p.target("pod-full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("keep.txt"), b"mine").unwrap();
    let file = p.target("pod-file");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, b"").unwrap();
    for (target, why) in [
        (
            outside.path().to_path_buf(),
            "not below the kubelet directory",
        ),
        (kubelet.clone(), "not below the kubelet directory"),
        (PathBuf::from("/etc"), "not below the kubelet directory"),
        (full.clone(), "not empty"),
        (file.clone(), "not a directory"),
    ] {
        let e = p
            .publish("v", &target, &ctx(&vol, &[("allowEmpty", "true")]))
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{target:?}: {e:?}");
        assert!(e.message().contains(why), "{target:?}: {e:?}");
        assert_eq!(mounts_at(&target), 0);
    }
    assert_eq!(std::fs::read(full.join("keep.txt")).unwrap(), b"mine");
    let e = p.unpublish("v", outside.path()).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        outside.path().exists(),
        "unpublish removed a directory outside"
    );

    assert_eq!(mounts_at(&t), 0, "a refused publish mounts nothing");
    p.publish("v", &t, &ctx(&vol, &[("allowEmpty", "true")]))
        .expect("an empty prefix, allowed");
    assert_eq!(mounts_at(&t), 1);
    p.unpublish("v", &t).unwrap();
}

/// A `fillfs mount` process stopped with SIGSTOP: its mount is in the table and never
/// answers. Killed on drop (a stopped process dies of SIGKILL), which ends the mount.
struct FrozenMount(Child);

impl FrozenMount {
    fn at(target: &Path) -> FrozenMount {
        let src = tempfile::tempdir().unwrap().keep();
        std::fs::write(src.join("f"), b"x").unwrap();
        std::fs::create_dir_all(target).unwrap();
        let child = fillfs()
            .arg("mount")
            .arg(format!("file://{}", src.display()))
            .arg(target)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(target) {
            assert!(Instant::now() < deadline, "mount did not appear");
            std::thread::sleep(Duration::from_millis(20));
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .unwrap();
        FrozenMount(child)
    }
}

impl Drop for FrozenMount {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_mount_that_does_not_answer_holds_up_neither_start_up_nor_other_volumes() {
    if !fuse_available() {
        return;
    }
    let emu = emulator();
    put_files(&emu, "ok/", 1, MIB, 90);
    let dir = tempfile::tempdir().unwrap();
    let frozen_target = dir
        .path()
        .join("kubelet/pods/old/volumes/kubernetes.io~csi/data/mount");
    let frozen = FrozenMount::at(&frozen_target);

    // Before: the start-up cleanup stat'ed the frozen mount with no timeout, before
    // binding the socket, and the socket never came up.
    let started = Instant::now();
    let p = Plugin::start_in(dir, &[]);
    let up = started.elapsed();
    assert!(up < Duration::from_secs(4), "socket up after {up:?}");
    // Other volumes are published while the frozen one is still being looked at.
    let t = p.target("pod-new");
    let vol = s3_volume(&emu, "ok/");
    let t0 = Instant::now();
    p.publish("vol-new", &t, &ctx(&vol, &[])).unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "publish took {:?}",
        t0.elapsed()
    );
    verify_stream(&t.join("f0.bin"), 90, MIB);

    // The frozen mount is ended after the probe's timeout: detached, not waited on.
    let deadline = Instant::now() + Duration::from_secs(20);
    while is_mounted(&frozen_target) {
        assert!(
            Instant::now() < deadline,
            "the frozen mount is still there:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(p.log().contains("did not answer"), "{}", p.log());
    // The connection was aborted, not only detached: the requests waiting on the stopped
    // server fail, so the probe's thread is released.
    assert!(
        p.log().contains("cleared a mount left by a previous run")
            && !p.log().contains("could not abort"),
        "{}",
        p.log()
    );
    drop(frozen);
    p.unpublish("vol-new", &t).unwrap();
}

#[test]
fn metrics_show_each_volume_and_the_node_cache() {
    if !fuse_available() {
        return;
    }
    let emu = emulator();
    put_files(&emu, "m/", 2, 2 * MIB, 130);
    let addr = free_local_addr();
    let p = Plugin::start(&["--metrics-addr", &addr, "--node-throughput", "500"]);
    let vol = s3_volume(&emu, "m/");
    let (ta, tb) = (p.target("pod-a"), p.target("pod-b"));
    p.publish("vol-a", &ta, &ctx(&vol, &[])).unwrap();
    p.publish("vol-b", &tb, &ctx(&vol, &[("throughput", "100")]))
        .unwrap();
    verify_stream(&ta.join("f0.bin"), 130, 2 * MIB);
    verify_stream(&tb.join("f1.bin"), 131, 2 * MIB);
    verify_stream(&tb.join("f0.bin"), 130, 2 * MIB); // from the node cache

    let page = http_get(&addr, "/metrics");
    let series = |name: &str, vol: &str, extra: &str| {
        format!("fillfs_{name}{{volume=\"{vol}\",pod=\"team-a/fill-1\"{extra}}}")
    };
    let get = |s: &str| sample(&page, s).unwrap_or_else(|| panic!("{s} missing:\n{page}"));
    assert!(get(&series("store_requests_total", "vol-a", ",op=\"get\"")) >= 1.0);
    assert_eq!(
        get(&series("store_read_bytes_total", "vol-a", "")),
        (2 * MIB) as f64
    );
    assert_eq!(
        get(&series("store_read_bytes_total", "vol-b", "")),
        (2 * MIB) as f64,
        "vol-b's f0 came from the cache"
    );
    assert!(get(&series("read_duration_seconds_count", "vol-b", "")) >= 2.0);
    assert!(get("fillfs_cache_hits_total") >= 1.0);
    assert!(get("fillfs_cache_misses_total") >= 2.0);
    assert!(get("fillfs_cache_bytes") >= (4 * MIB) as f64);
    assert!(
        page.contains("fillfs_limiter_wait_seconds_total{volume=\"vol-b\",pod=\"team-a/fill-1\",limiter=\"volume\"}")
            && page.contains("fillfs_limiter_wait_seconds_total{volume=\"\",pod=\"\",limiter=\"node\"}"),
        "{page}"
    );
    assert!(
        !page.contains("vol-a\",pod=\"team-a/fill-1\",limiter"),
        "vol-a has no cap"
    );
    assert_eq!(http_get(&addr, "/healthz"), "ok\n");

    p.unpublish("vol-a", &ta).unwrap();
    let page = http_get(&addr, "/metrics");
    assert!(
        !page.contains("vol-a"),
        "an unpublished volume is still shown"
    );
    assert!(page.contains("vol-b"));
    p.unpublish("vol-b", &tb).unwrap();
}

/// A volume's `throughput` is the volume's on this node, however many pods mount it: two
/// pods reading one PV at once share its cap (before, each publish made its own limiter,
/// so N pods got N times the cap).
#[test]
fn pods_mounting_one_volume_share_its_cap() {
    if !fuse_available() {
        return;
    }
    let emu = emulator();
    put_files(&emu, "vc/", 2, 8 * MIB, 160);
    let p = Plugin::start(&[]);
    let vol = s3_volume(&emu, "vc/");
    let (ta, tb) = (p.target("pod-a"), p.target("pod-b"));
    for t in [&ta, &tb] {
        p.publish("vol-cap", t, &ctx(&vol, &[("throughput", "8")]))
            .unwrap();
    }
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| verify_stream(&ta.join("f0.bin"), 160, 8 * MIB));
        s.spawn(|| verify_stream(&tb.join("f1.bin"), 161, 8 * MIB));
    });
    let took = started.elapsed();
    println!("two pods, 8 MiB each, one 8 MiB/s volume: {took:?}");
    assert!(
        took >= Duration::from_millis(1700),
        "the cap was not shared: {took:?}"
    );
    assert!(took < Duration::from_secs(4), "{took:?}");
    for t in [&ta, &tb] {
        p.unpublish("vol-cap", t).unwrap();
    }
}

/// Without kubelet's pod info (a CSIDriver without `podInfoOnMount`), two pods' mounts of
/// one volume are told apart by the pod UID in their target paths: before, both were
/// `pod="-"`, one label set shown twice, which Prometheus rejects.
#[test]
fn metrics_without_pod_info_name_the_pod_by_uid_and_never_repeat_a_series() {
    if !fuse_available() {
        return;
    }
    let emu = emulator();
    put_files(&emu, "np/", 1, MIB, 150);
    let addr = free_local_addr();
    let p = Plugin::start(&["--metrics-addr", &addr]);
    let vol: Vec<_> = s3_volume(&emu, "np/")
        .into_iter()
        .filter(|(k, _)| !k.starts_with("csi.storage.k8s.io/pod."))
        .collect();
    let (ta, tb) = (p.target("0d5f-a"), p.target("7e21-b"));
    for t in [&ta, &tb] {
        p.publish("vol-shared", t, &ctx(&vol, &[])).unwrap();
        verify_stream(&t.join("f0.bin"), 150, MIB);
    }
    let page = http_get(&addr, "/metrics");
    for uid in ["0d5f-a", "7e21-b"] {
        let s = format!(
            "fillfs_read_duration_seconds_count{{volume=\"vol-shared\",pod=\"uid:{uid}\"}}"
        );
        assert!(
            sample(&page, &s).is_some_and(|n| n >= 1.0),
            "{s} missing:\n{page}"
        );
    }
    let mut seen = std::collections::HashSet::new();
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let series = line.rsplit_once(' ').map_or(line, |(s, _)| s);
        assert!(
            seen.insert(series.to_string()),
            "{series} shown twice:\n{page}"
        );
    }
    for t in [&ta, &tb] {
        p.unpublish("vol-shared", t).unwrap();
    }
}

#[test]
fn a_rotated_secret_is_used_after_republish() {
    if !fuse_available() {
        return;
    }
    let emu = emulator();
    put_files(&emu, "rot/", 1, MIB, 140);
    let p = Plugin::start(&[]);
    let t = p.target("pod-rot");
    let vol = s3_volume(&emu, "rot/");
    let ttl = [("metadataTTL", "1s")];
    p.publish("vol-rot", &t, &ctx(&vol, &ttl)).unwrap();
    verify_stream(&t.join("f0.bin"), 140, MIB);

    // The key is rotated at the store: the old one is refused from now on.
    emu.rotate_key("fillfs-rotated", "fillfs-rotated-secret");
    put_files(&emu, "rot/new-", 1, MIB, 141);
    let mut node = p.node.clone();
    let mut republish = |id: &str, secret: &str| {
        let mut req = publish_request("vol-rot", &t, &ctx(&vol, &ttl));
        req.secrets = HashMap::from([
            ("akId".to_string(), id.to_string()),
            ("akSecret".to_string(), secret.to_string()),
        ]);
        p.rt.block_on(node.node_publish_volume(req)).map(|_| ())
    };
    // A rotated secret that does not work is refused and changes nothing.
    let e = republish("fillfs-rotated", "wrong-secret").unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // kubelet republishes with the new secret (same volume, same attributes).
    republish("fillfs-rotated", "fillfs-rotated-secret").expect("republish");
    assert_eq!(mounts_at(&t), 1, "republished in place, not mounted twice");
    // Listing and reading use the new key (before: the old one, for the mount's life).
    std::thread::sleep(Duration::from_millis(1100)); // past the volume's 1 s listing TTL
    verify_stream(&t.join("new-f0.bin"), 141, MIB);
    assert!(p.log().contains("credentials rotated"), "{}", p.log());
    assert!(
        !p.log().contains("fillfs-rotated-secret"),
        "a secret reached the log"
    );
    p.unpublish("vol-rot", &t).unwrap();
}

#[test]
fn restart_clears_mounts_left_behind() {
    if !fuse_available() {
        return;
    }
    let emu = emulator();
    put_files(&emu, "r/", 1, 2 * MIB, 70);
    let mut p = Plugin::start(&[]);
    let vol = s3_volume(&emu, "r/");
    let (t1, t2) = (p.target("pod-1"), p.target("pod-2"));
    p.publish("vol-1", &t1, &ctx(&vol, &[])).unwrap();
    p.publish("vol-2", &t2, &ctx(&vol, &[])).unwrap();
    verify_stream(&t1.join("f0.bin"), 70, 2 * MIB);

    let dir = p.kill();
    let err = std::fs::metadata(&t1).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOTCONN),
        "a dead plugin's mount: {err}"
    );

    let p2 = Plugin::start_in(dir, &[]);
    // Cleared in the background once the socket is up (within a second: they answer
    // ENOTCONN at once).
    let deadline = Instant::now() + Duration::from_secs(2);
    while mounts_at(&t1) + mounts_at(&t2) > 0 {
        assert!(
            Instant::now() < deadline,
            "stale mounts not cleared at start:\n{}",
            p2.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        p2.log().contains("cleared a mount left by a previous run"),
        "{}",
        p2.log()
    );
    // kubelet publishes again for a new pod on the same path; unpublishes the other.
    p2.publish("vol-1", &t1, &ctx(&vol, &[])).unwrap();
    verify_stream(&t1.join("f0.bin"), 70, 2 * MIB);
    p2.unpublish("vol-2", &t2).unwrap();
    p2.unpublish("vol-1", &t1).unwrap();
    assert_eq!(mounts_at(&t1), 0);
}

#[test]
fn local_directories_are_not_volume_sources() {
    if !fuse_available() {
        return;
    }
    let emu = emulator();
    let p = Plugin::start(&[]);
    // What a pod author would go for: another pod's files under kubelet's directory.
    let other_pod = p.dir.path().join("kubelet/pods/victim/volumes/secret");
    std::fs::create_dir_all(&other_pod).unwrap();
    std::fs::write(other_pod.join("token"), "victim-secret").unwrap();
    let t = p.target("pod-attacker");
    let mut answers = Vec::new();
    for url in [
        format!("file://{}", other_pod.display()),
        format!("FILE://{}/", other_pod.display()),
        "file:///no/such/fillfs-dir".to_string(),
    ] {
        let e = p.publish("v", &t, &[("url", url.as_str())]).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{url}: {e:?}");
        assert!(
            e.message().contains("file:// sources are not allowed"),
            "{e:?}"
        );
        assert!(
            !e.message().contains("victim") && !e.message().contains("no/such"),
            "the answer names a host path: {e:?}"
        );
        answers.push(e.message().to_string());
    }
    answers.dedup();
    assert_eq!(
        answers.len(),
        1,
        "existing and missing paths answered alike: {answers:?}"
    );
    assert_eq!(mounts_at(&t), 0);
    assert!(!t.exists(), "a refused publish creates no target");
    // The same source as a bucket volume still works on this plugin.
    put_files(&emu, "ok/", 1, MIB, 80);
    p.publish("v", &t, &ctx(&s3_volume(&emu, "ok/"), &[]))
        .unwrap();
    verify_stream(&t.join("f0.bin"), 80, MIB);
    p.unpublish("v", &t).unwrap();
}

#[test]
fn failed_publish_leaves_no_token_and_no_target() {
    if !fuse_available() {
        return;
    }
    let emu = emulator();
    // Everything logged, to see that no level lets the token out.
    let p = Plugin::start_with_env(
        tempfile::tempdir().unwrap(),
        &[],
        &[("RUST_LOG", "debug,fillfs=trace")],
    );
    let t = p.target("pod-rrsa");
    let tokens = r#"{"sts.aliyuncs.com":{"token":"eyJrrsa.pod-token-value","expirationTimestamp":"2026-11-23T10:00:00Z"}}"#;
    let mut req = publish_request(
        "vol-rrsa",
        &t,
        &[
            ("url", "oss://no-such-bucket/p/"),
            // Nothing listens there: the publish fails after the token file is written.
            ("endpoint", "http://127.0.0.1:1"),
            ("roleArn", "acs:ram::1:role/fill"),
            ("oidcProviderArn", "acs:ram::1:oidc-provider/ack"),
            ("csi.storage.k8s.io/serviceAccount.tokens", tokens),
        ],
    );
    req.secrets.clear();
    let mut node = p.node.clone();
    let start = Instant::now();
    let e = p.rt.block_on(node.node_publish_volume(req)).unwrap_err();
    eprintln!(
        "RRSA publish to a dead endpoint: {:?} after {:.1} s: {}",
        e.code(),
        start.elapsed().as_secs_f64(),
        e.message()
    );
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("RRSA") && e.message().contains("acs:ram::1:role/fill"),
        "{e:?}"
    );
    assert!(!e.message().contains("pod-token-value"), "{e:?}");
    let token_dir = p.dir.path().join("state/tokens");
    let left: Vec<_> = std::fs::read_dir(&token_dir)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "token files left behind: {left:?}");
    assert!(!t.exists(), "a failed publish leaves its target directory");
    assert_eq!(mounts_at(&t), 0);
    let log = p.log();
    let leaked: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("pod-token-value"))
        .collect();
    assert!(leaked.is_empty(), "the token reached the log: {leaked:#?}");

    // The path is not stuck: another volume publishes there.
    put_files(&emu, "after/", 1, MIB, 90);
    p.publish("vol-s3", &t, &ctx(&s3_volume(&emu, "after/"), &[]))
        .unwrap();
    verify_stream(&t.join("f0.bin"), 90, MIB);
    p.unpublish("vol-s3", &t).unwrap();
}

#[test]
fn unpublish_leaves_a_live_mount_of_another_process_alone() {
    if !fuse_available() {
        return;
    }
    let emu = emulator();
    put_files(&emu, "live/", 1, 2 * MIB, 110);
    let owner = Plugin::start(&[]);
    let t = owner.target("pod-live");
    owner
        .publish("vol-live", &t, &ctx(&s3_volume(&emu, "live/"), &[]))
        .unwrap();
    // A second plugin (e.g. a new one started before the old one stopped) is asked to
    // unpublish a path it does not serve, whose server is alive.
    let kubelet = owner.dir.path().join("kubelet");
    let other = Plugin::start(&["--kubelet-dir", kubelet.to_str().unwrap()]);
    let e = other.unpublish("vol-live", &t).unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("another process"), "{e:?}");
    assert_eq!(mounts_at(&t), 1, "a live mount was detached");
    verify_stream(&t.join("f0.bin"), 110, 2 * MIB);
    owner.unpublish("vol-live", &t).unwrap();
    assert_eq!(mounts_at(&t), 0);
}

#[test]
fn publish_and_unpublish_of_one_path_at_once() {
    if !fuse_available() {
        return;
    }
    let emu = emulator();
    put_files(&emu, "race/", 1, MIB, 120);
    let p = Plugin::start(&[]);
    let t = p.target("pod-race");
    let vol = s3_volume(&emu, "race/");
    let c = ctx(&vol, &[]);
    let mut remounted = 0;
    for _ in 0..10 {
        if mounts_at(&t) == 0 {
            p.publish("vol-r", &t, &c).unwrap();
        }
        let (mut n1, mut n2) = (p.node.clone(), p.node.clone());
        let un = NodeUnpublishVolumeRequest {
            volume_id: "vol-r".into(),
            target_path: t.display().to_string(),
        };
        let pub_req = publish_request("vol-r", &t, &c);
        let (u, pb) = p.rt.block_on(async {
            tokio::join!(n1.node_unpublish_volume(un), async {
                tokio::time::sleep(Duration::from_millis(1)).await;
                n2.node_publish_volume(pub_req).await
            })
        });
        u.expect("unpublish");
        pb.expect("publish racing an unpublish");
        // Either order is fine; what is mounted must be whole and readable.
        if mounts_at(&t) == 1 {
            remounted += 1;
            verify_stream(&t.join("f0.bin"), 120, MIB);
        } else {
            assert!(!t.exists(), "unpublished last, yet the directory is there");
        }
    }
    eprintln!("publish/unpublish race: 10 rounds, {remounted} ended mounted");
    if mounts_at(&t) == 1 {
        p.unpublish("vol-r", &t).unwrap();
    }
}

#[test]
fn differently_written_endpoints_share_the_cache() {
    if !fuse_available() {
        return;
    }
    let emu = emulator();
    let (files, size) = (2u64, 8 * MIB);
    put_files(&emu, "spell/", files, size, 130);
    let p = Plugin::start(&[]);
    let plain = s3_volume(&emu, "spell/");
    let shouted = format!("{}/", emu.endpoint().replacen("http://", "HTTP://", 1));
    let (ta, tb) = (p.target("pod-plain"), p.target("pod-shouted"));
    p.publish("vol-a", &ta, &ctx(&plain, &[])).unwrap();
    let mut other: Vec<(&str, &str)> = ctx(&plain, &[])
        .into_iter()
        .filter(|(k, _)| *k != "endpoint")
        .collect();
    other.push(("endpoint", &shouted));
    p.publish("vol-b", &tb, &other).unwrap();
    emu.reset_stats();
    for t in [&ta, &tb] {
        for i in 0..files {
            verify_stream(&t.join(format!("f{i}.bin")), 130 + i, size);
        }
    }
    let ratio = emu.stats().get_bytes as f64 / (files * size) as f64;
    eprintln!(
        "endpoint spellings {:?} and {shouted:?}: fetched {ratio:.3}x the data",
        emu.endpoint()
    );
    assert!(
        ratio <= 1.05,
        "one bucket through two spellings of its endpoint was fetched {ratio:.3}x"
    );
    p.unpublish("vol-a", &ta).unwrap();
    p.unpublish("vol-b", &tb).unwrap();
}

#[test]
fn driver_name_is_configurable() {
    if !fuse_available() {
        return;
    }
    let p = Plugin::start(&["--driver-name", "fill.example.com"]);
    let mut id = p.identity.clone();
    let info =
        p.rt.block_on(id.get_plugin_info(GetPluginInfoRequest {}))
            .unwrap()
            .into_inner();
    assert_eq!(info.name, "fill.example.com");

    let dir = tempfile::tempdir().unwrap();
    let out = fillfs()
        .args(["csi", "--node-id", "n", "--driver-name", "Not_A_Name"])
        .arg("--endpoint")
        .arg(format!("unix://{}", dir.path().join("s.sock").display()))
        .arg("--kubelet-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--driver-name"), "{err}");
}

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn local_sources_are_refused_without_saying_what_exists() {
    let existing = std::env::temp_dir().display().to_string();
    let mut messages = Vec::new();
    for url in [
        "file:///var/lib/kubelet/pods/".to_string(),
        format!("file://{existing}"),
        "FILE:///no/such/dir-fillfs".to_string(),
        "file://relative".to_string(),
    ] {
        let err = volume::parse(&map(&[("url", &url)]), &HashMap::new()).unwrap_err();
        assert!(
            err.contains("file:// sources are not allowed"),
            "{url}: {err}"
        );
        assert!(
            !err.contains("kubelet") && !err.contains(&existing) && !err.contains("no/such"),
            "{err}"
        );
        messages.push(err);
    }
    messages.dedup();
    assert_eq!(
        messages.len(),
        1,
        "one answer whatever the path: {messages:?}"
    );
    // Not even with credentials or through bucket + protocol.
    let err = volume::parse(
        &map(&[("url", "file:///etc")]),
        &map(&[("akId", "i"), ("akSecret", "s")]),
    )
    .unwrap_err();
    assert_eq!(err, volume::LOCAL_SOURCE_REFUSED);
    let err = volume::parse(
        &map(&[("bucket", "b"), ("protocol", "file")]),
        &HashMap::new(),
    )
    .unwrap_err();
    assert!(err.contains("not oss or s3"), "{err}");
}

#[test]
fn endpoint_spellings_are_one() {
    let want = "https://oss-cn-hangzhou.aliyuncs.com";
    for e in [
        "oss-cn-hangzhou.aliyuncs.com",
        "OSS-cn-hangzhou.aliyuncs.com/",
        " https://oss-cn-hangzhou.aliyuncs.com// ",
        "HTTPS://oss-cn-hangzhou.aliyuncs.com:443",
    ] {
        assert_eq!(volume::normalize_endpoint(e).unwrap(), want, "{e:?}");
    }
    assert_eq!(
        volume::normalize_endpoint("http://127.0.0.1:9000/").unwrap(),
        "http://127.0.0.1:9000"
    );
    assert_eq!(
        volume::normalize_endpoint("http://Minio.local:80").unwrap(),
        "http://minio.local"
    );
    assert!(volume::normalize_endpoint("ftp://x").is_err());
    assert_eq!(
        volume::normalize_endpoint("http://[::1]:9000/b/").unwrap(),
        "http://[::1]:9000/b"
    );
    // Found by the property test: a fragment or a space in the host is no host, and a
    // doubled default port is no port.
    for bad in [
        "=# /",
        "host name",
        "host:443:443",
        "h:0",
        "h:+443",
        "h:0443",
        "h:99999",
        "-h.com",
        "h?x=1",
        "h/a b",
    ] {
        assert!(volume::normalize_endpoint(bad).is_err(), "{bad:?}");
    }
    let e = volume::normalize_endpoint("https://user:s3cr3t-pw@host").unwrap_err();
    assert!(
        e.contains("carries credentials") && !e.contains("s3cr3t-pw") && !e.contains("user:s3"),
        "{e}"
    );
    // What the cache key is made of: the store's endpoint. An explicit endpoint and the
    // one a region implies are the same store.
    let store_endpoint = |ctx: &[(&str, &str)]| {
        let spec = volume::parse(&map(ctx), &HashMap::new()).unwrap();
        fillfs::store::Store::new(&spec.store, vec![])
            .unwrap()
            .endpoint()
            .to_string()
    };
    let a = store_endpoint(&[
        ("url", "oss://bkt/p/"),
        ("endpoint", "OSS-cn-hangzhou.aliyuncs.com/"),
    ]);
    let b = store_endpoint(&[("url", "oss://bkt/p/"), ("region", "cn-hangzhou")]);
    let c = store_endpoint(&[
        ("bucket", "bkt"),
        ("path", "p"),
        ("endpoint", "https://oss-cn-hangzhou.aliyuncs.com"),
    ]);
    assert_eq!(a, want);
    assert_eq!(a, b);
    assert_eq!(a, c);
}

#[test]
fn pod_info_is_kept_for_logs_only() {
    let spec = volume::parse(
        &map(&[
            ("url", "s3://bkt/"),
            ("csi.storage.k8s.io/pod.namespace", "team-a"),
            ("csi.storage.k8s.io/pod.name", "fill-7"),
        ]),
        &HashMap::new(),
    )
    .unwrap();
    assert_eq!(spec.pod.as_deref(), Some("team-a/fill-7"));
    assert!(
        spec.attributes
            .keys()
            .all(|k| !k.starts_with("csi.storage.k8s.io/"))
    );
}
