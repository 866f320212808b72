//! `fillfs argo-artifact SOCKET`, the Argo artifact driver plugin, run as Argo runs it (the
//! socket path its one argument) and driven over its unix socket by clients generated from
//! Argo's own `artifact.proto`: tonic's (which, like Argo's Go client, sends `localhost` as
//! `:authority`) and gRPC C-core's Python client (which sends the socket's path), with
//! their default settings (4 MiB messages). The store is the loopback S3 server.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fillfs::artifact::proto::artifact_service_client::ArtifactServiceClient;
use fillfs::artifact::proto::*;
use tonic::transport::Channel;

const MIB: usize = 1024 * 1024;

struct Plugin {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl Plugin {
    fn start() -> Plugin {
        let mut cmd = fillfs();
        cmd.arg("argo-artifact");
        Plugin::start_with(cmd, None)
    }

    /// `cmd` with the socket path appended, as Argo appends it to the image's entrypoint;
    /// in a socket directory of its own (an emptyDir: mode 0777) when `dir_mode` is given.
    fn start_with(mut cmd: Command, dir_mode: Option<u32>) -> Plugin {
        let dir = tempfile::tempdir().unwrap();
        // Where Argo puts it: /tmp/artifact-plugins/<name>/socket.
        let socket = dir.path().join("artifact-plugins/fillfs/socket");
        if let Some(mode) = dir_mode {
            use std::os::unix::fs::PermissionsExt;
            std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
            for d in [dir.path(), socket.parent().unwrap()] {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode)).unwrap();
            }
        }
        let log = dir.path().join("plugin.log");
        let child = cmd
            .arg(&socket)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "no socket; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Plugin {
            child,
            socket,
            _dir: dir,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as Argo stops its sidecars; returns the exit code.
    fn stop(mut self) -> Option<i32> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = self.child.wait().unwrap();
        status.code()
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(emu: &Emulator) -> String {
    format!(
        "bucket: {BUCKET}\nprotocol: s3\nendpoint: {}\nregion: us-east-1\npartSize: 5MiB\njobs: 4\n",
        emu.endpoint()
    )
}

fn artifact(config: &str, key: &str) -> Option<Artifact> {
    Some(Artifact {
        name: "out".into(),
        plugin: Some(PluginArtifact {
            name: "fillfs".into(),
            configuration: config.into(),
            key: key.into(),
            connection_timeout_seconds: 5,
        }),
        ..Default::default()
    })
}

/// Save of `path` to `key`, as Argo's wait container asks.
fn save(
    rt: &tokio::runtime::Runtime,
    c: &mut ArtifactServiceClient<Channel>,
    config: &str,
    key: &str,
    path: String,
) -> SaveArtifactResponse {
    let req = SaveArtifactRequest {
        path,
        output_artifact: artifact(config, key),
    };
    rt.block_on(c.save(req)).unwrap().into_inner()
}

/// Load of `key` into `path`, as Argo's init container asks.
fn load(
    rt: &tokio::runtime::Runtime,
    c: &mut ArtifactServiceClient<Channel>,
    config: &str,
    key: &str,
    path: String,
) -> LoadArtifactResponse {
    let req = LoadArtifactRequest {
        input_artifact: artifact(config, key),
        path,
    };
    rt.block_on(c.load(req)).unwrap().into_inner()
}

/// A client as Argo's Go client dials (`:authority` is `localhost`).
fn client(rt: &tokio::runtime::Runtime, socket: &Path) -> ArtifactServiceClient<Channel> {
    ArtifactServiceClient::new(unix_channel(rt, socket).unwrap())
}

#[test]
fn every_rpc_round_trips_bytes_exactly() {
    let emu = emulator();
    let plugin = Plugin::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = client(&rt, &plugin.socket);
    let cfg = config(&emu);
    let work = tempfile::tempdir().unwrap();

    // Save of a 23 MiB file: a multipart upload of 5 MiB parts.
    let data = pattern(1, 0, 23 * MIB + 17);
    let src = work.path().join("big.bin");
    std::fs::write(&src, &data).unwrap();
    let r = save(
        &rt,
        &mut c,
        &cfg,
        "wf/pod/big.bin",
        src.to_string_lossy().into(),
    );
    assert!(r.success, "{}\n{}", r.error, plugin.log());
    assert!(
        emu.object(BUCKET, "wf/pod/big.bin").unwrap() == data,
        "stored bytes differ"
    );

    // Load it back to where Argo asks (a .tmp path).
    let dst = work.path().join("in/big.bin.tmp");
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    let r = load(
        &rt,
        &mut c,
        &cfg,
        "wf/pod/big.bin",
        dst.to_string_lossy().into(),
    );
    assert!(r.success, "{}", r.error);
    assert!(std::fs::read(&dst).unwrap() == data, "loaded bytes differ");

    // OpenStream: frames under the client's 4 MiB limit, concatenated = the object.
    let mut stream = rt
        .block_on(c.open_stream(OpenStreamRequest {
            artifact: artifact(&cfg, "wf/pod/big.bin"),
        }))
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let mut ended = false;
    while let Some(frame) = rt.block_on(stream.message()).unwrap() {
        assert!(frame.error.is_empty(), "{}", frame.error);
        got.extend_from_slice(&frame.data);
        ended |= frame.is_end;
    }
    assert!(
        ended && got == data,
        "streamed {} bytes, ended {ended}",
        got.len()
    );

    // SaveStream, framed as argo-server frames it: the artifact, then 2 MiB chunks.
    let caps = rt
        .block_on(c.get_capabilities(GetCapabilitiesRequest {}))
        .unwrap()
        .into_inner();
    assert!(caps.supports_save_stream);
    let streamed = pattern(2, 0, 11 * MIB + 3);
    let mut frames = vec![SaveStreamArtifactRequest {
        output_artifact: artifact(&cfg, "uploads/ns/u1/s.bin"),
        chunk: Vec::new(),
    }];
    frames.extend(streamed.chunks(2 * MIB).map(|c| SaveStreamArtifactRequest {
        output_artifact: None,
        chunk: c.to_vec(),
    }));
    let r = rt
        .block_on(c.save_stream(futures::stream::iter(frames)))
        .unwrap()
        .into_inner();
    assert!(r.success, "{}", r.error);
    assert!(emu.object(BUCKET, "uploads/ns/u1/s.bin").unwrap() == streamed);

    // A directory (`archive: none`): every file under key/, listed with full keys.
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::fs::write(tree.join("top.txt"), b"top").unwrap();
    std::fs::write(tree.join("a/b/deep.bin"), pattern(3, 0, 6 * MIB)).unwrap();
    std::fs::write(tree.join("a/empty"), b"").unwrap();
    let r = save(
        &rt,
        &mut c,
        &cfg,
        "wf/pod/tree",
        tree.to_string_lossy().into(),
    );
    assert!(r.success, "{}", r.error);
    let mut listed = rt
        .block_on(c.list_objects(ListObjectsRequest {
            artifact: artifact(&cfg, "wf/pod/tree"),
        }))
        .unwrap()
        .into_inner();
    assert!(listed.error.is_empty(), "{}", listed.error);
    listed.objects.sort();
    assert_eq!(
        listed.objects,
        [
            "wf/pod/tree/a/b/deep.bin",
            "wf/pod/tree/a/empty",
            "wf/pod/tree/top.txt"
        ]
    );
    let is_dir = |c: &mut ArtifactServiceClient<Channel>, key: &str| {
        let r = rt
            .block_on(c.is_directory(IsDirectoryRequest {
                artifact: artifact(&cfg, key),
            }))
            .unwrap()
            .into_inner();
        assert!(r.error.is_empty(), "{key}: {}", r.error);
        r.is_directory
    };
    assert!(is_dir(&mut c, "wf/pod/tree"));
    assert!(is_dir(&mut c, "wf/pod/tree/"));
    assert!(
        !is_dir(&mut c, "wf/pod/big.bin"),
        "a file is not a directory"
    );
    assert!(
        !is_dir(&mut c, "wf/pod/missing"),
        "missing: false, not an error"
    );
    let loaded = work.path().join("tree.tmp");
    let r = load(
        &rt,
        &mut c,
        &cfg,
        "wf/pod/tree",
        loaded.to_string_lossy().into(),
    );
    assert!(r.success, "{}", r.error);
    assert_eq!(std::fs::read(loaded.join("top.txt")).unwrap(), b"top");
    assert!(std::fs::read(loaded.join("a/b/deep.bin")).unwrap() == pattern(3, 0, 6 * MIB));
    assert_eq!(std::fs::read(loaded.join("a/empty")).unwrap(), b"");
    let extra: Vec<_> = std::fs::read_dir(&loaded)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".fillfs"))
        .collect();
    assert!(
        extra.is_empty(),
        "fill state left in the loaded directory: {extra:?}"
    );

    // Delete (Argo's GC): a file, a directory, and again (already gone: success).
    for key in [
        "wf/pod/big.bin",
        "wf/pod/tree",
        "wf/pod/tree",
        "wf/pod/never-was",
    ] {
        let r = rt
            .block_on(c.delete(DeleteArtifactRequest {
                artifact: artifact(&cfg, key),
            }))
            .unwrap()
            .into_inner();
        assert!(r.success, "{key}: {}", r.error);
    }
    let left: Vec<_> = emu
        .keys(BUCKET)
        .into_iter()
        .filter(|k| k.starts_with("wf/"))
        .collect();
    assert!(left.is_empty(), "left after GC: {left:?}");

    // What cannot work says why, and the server keeps serving.
    let r = load(
        &rt,
        &mut c,
        &cfg,
        "wf/pod/big.bin",
        dst.to_string_lossy().into(),
    );
    assert!(
        !r.success && r.error.contains("no such object"),
        "{}",
        r.error
    );
    for (bad, says) in [
        ("bucket: [", "not valid"),
        ("bucket: b\nprotocl: s3", "protocl"),
        ("", "empty"),
    ] {
        let r = save(&rt, &mut c, bad, "k", src.to_string_lossy().into());
        assert!(!r.success && r.error.contains(says), "{bad:?}: {}", r.error);
    }
    let r = save(&rt, &mut c, &cfg, "../escape", src.to_string_lossy().into());
    assert!(!r.success && r.error.contains(".."), "{}", r.error);
    let r = rt
        .block_on(c.open_stream(OpenStreamRequest {
            artifact: artifact(&cfg, "wf/pod/missing"),
        }))
        .unwrap()
        .into_inner();
    let first = rt.block_on(async move {
        let mut r = r;
        r.message().await
    });
    assert!(first.unwrap().unwrap().error.contains("no such object"));

    let log = plugin.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains(SECRET_KEY), "the secret key was logged");
    assert_eq!(plugin.stop(), Some(0), "SIGTERM must exit 0");
}

/// gRPC C-core (Python's grpcio) with stubs generated by grpc_tools from the same proto:
/// it sends the socket's path as `:authority`, which the server must accept.
#[test]
fn a_grpc_c_core_client_generated_from_the_proto_works() {
    if Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .map_or(true, |s| !s.success())
    {
        assert!(
            std::env::var("CI").is_err(),
            "CI needs grpcio (scripts/setup.sh)"
        );
        eprintln!("SKIPPED: python3 grpcio/grpcio-tools missing; run scripts/setup.sh");
        return;
    }
    let emu = emulator();
    let plugin = Plugin::start();
    let work = tempfile::tempdir().unwrap();
    let stubs = work.path().join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let proto_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    let gen_out = Command::new("python3")
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto_dir.display()))
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg(proto_dir.join("argo/artifact.proto"))
        .arg(proto_dir.join("google/api/annotations.proto"))
        .arg(proto_dir.join("google/api/http.proto"))
        .output()
        .unwrap();
    assert!(
        gen_out.status.success(),
        "{}",
        String::from_utf8_lossy(&gen_out.stderr)
    );
    let data = pattern(9, 0, 7 * MIB + 5);
    let src = work.path().join("src.bin");
    std::fs::write(&src, &data).unwrap();
    let dst = work.path().join("dst.bin");
    let script = r#"
import sys
sys.path.insert(0, sys.argv[1] + "/argo"); sys.path.insert(0, sys.argv[1])
import grpc
import artifact_pb2 as pb, artifact_pb2_grpc as rpc
sock, cfg, src, dst = sys.argv[2:6]
ch = grpc.insecure_channel("unix:" + sock)
stub = rpc.ArtifactServiceStub(ch)
art = lambda key: pb.Artifact(name="out", plugin=pb.PluginArtifact(name="fillfs", configuration=cfg, key=key))
r = stub.Save(pb.SaveArtifactRequest(path=src, output_artifact=art("py/obj")))
assert r.success, r.error
r = stub.Load(pb.LoadArtifactRequest(input_artifact=art("py/obj"), path=dst))
assert r.success, r.error
n = sum(len(f.data) for f in stub.OpenStream(pb.OpenStreamRequest(artifact=art("py/obj"))))
print("streamed", n)
assert stub.IsDirectory(pb.IsDirectoryRequest(artifact=art("py"))).is_directory
r = stub.Delete(pb.DeleteArtifactRequest(artifact=art("py/obj")))
assert r.success, r.error
print("ok")
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&stubs)
        .arg(&plugin.socket)
        .arg(config(&emu))
        .arg(&src)
        .arg(&dst)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ok"),
        "{stdout}\n{}\nplugin log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        plugin.log()
    );
    assert!(
        stdout.contains(&format!("streamed {}", data.len())),
        "{stdout}"
    );
    assert!(std::fs::read(&dst).unwrap() == data);
    assert!(emu.object(BUCKET, "py/obj").is_none(), "not deleted");
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The ENTRYPOINT of the Dockerfile's `argo-artifact` target: what Argo runs.
fn argo_entrypoint() -> Vec<String> {
    let text = std::fs::read_to_string(manifest_dir().join("Dockerfile")).unwrap();
    let stage = text
        .split("\nFROM ")
        .find(|s| {
            s.lines()
                .next()
                .is_some_and(|l| l.ends_with(" AS argo-artifact"))
        })
        .expect("an argo-artifact stage in the Dockerfile");
    let line = stage
        .lines()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .expect("its ENTRYPOINT");
    serde_json::from_str(line).expect("ENTRYPOINT in exec form")
}

/// Argo's GC pod: the plugin image's entrypoint plus the socket path, as uid 8737 with
/// runAsNonRoot, the socket in an emptyDir. Delete of what a workflow saved, then SIGTERM.
#[test]
fn the_plugin_runs_as_argo_starts_it_in_a_gc_pod() {
    let entrypoint = argo_entrypoint();
    assert_eq!(entrypoint[0], "/usr/local/bin/fillfs");
    let emu = emulator();
    emu.put_object(
        BUCKET,
        "argo/wf/pod/out.tgz",
        bytes::Bytes::from(pattern(4, 0, 1000)),
    );
    let as_root = nix::unistd::geteuid().is_root();
    let mut cmd = if as_root {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid",
            "8737",
            "--regid",
            "8737",
            "--clear-groups",
            "--no-new-privs",
        ]);
        c.arg(env!("CARGO_BIN_EXE_fillfs"));
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_fillfs"))
    };
    cmd.args(&entrypoint[1..])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env("RUST_LOG", "info");
    let plugin = Plugin::start_with(cmd, Some(0o777));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = client(&rt, &plugin.socket);
    let cfg = config(&emu);
    for _ in 0..2 {
        // GC retries: the second Delete finds nothing and still succeeds.
        let r = rt
            .block_on(c.delete(DeleteArtifactRequest {
                artifact: artifact(&cfg, "argo/wf/pod/out.tgz"),
            }))
            .unwrap()
            .into_inner();
        assert!(r.success, "{}\n{}", r.error, plugin.log());
    }
    assert!(emu.object(BUCKET, "argo/wf/pod/out.tgz").is_none());
    let log = plugin.log();
    assert_eq!(plugin.stop(), Some(0), "SIGTERM must exit 0: {log}");
}

/// deploy/examples: the workflow-controller ConfigMap registers the image whose entrypoint
/// is the plugin and makes it the default repository with a configuration the plugin
/// accepts; the article's two workflows are there unchanged and name no location of their
/// own (so the default repository, fillfs, saves and collects their artifacts).
#[test]
fn the_example_configmap_registers_the_plugin_and_the_seed_workflows_apply_unchanged() {
    let ex = manifest_dir().join("deploy/examples");
    let cm: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(ex.join("argo-artifact-driver.yaml")).unwrap(),
    )
    .unwrap();
    let data = &cm["data"];
    let field = |k: &str| -> serde_yaml_ng::Value {
        serde_yaml_ng::from_str(data[k].as_str().unwrap_or_else(|| panic!("data.{k}"))).unwrap()
    };
    let drivers = field("artifactDrivers");
    let driver = &drivers[0];
    let (name, image) = (
        driver["name"].as_str().unwrap(),
        driver["image"].as_str().unwrap(),
    );
    let images = field("images");
    let entry: Vec<String> = serde_yaml_ng::from_value(images[image]["entrypoint"].clone())
        .expect("the image's entrypoint is declared");
    assert_eq!(
        entry,
        argo_entrypoint(),
        "ConfigMap and Dockerfile disagree"
    );
    let repo = field("artifactRepository");
    assert_eq!(repo["plugin"]["name"].as_str(), Some(name));
    let conf = repo["plugin"]["configuration"].as_str().unwrap();
    fillfs::artifact::config::PluginConfig::parse(conf).expect("the example configuration parses");

    let article =
        std::fs::read_to_string(manifest_dir().join("../shared/seeds/000_2d8be2b79abf2d4a.txt"))
            .unwrap_or_default();
    for file in ["seed-artifact-large-file.yaml", "seed-artifact-gc.yaml"] {
        let text = std::fs::read_to_string(ex.join(file)).unwrap();
        if !article.is_empty() {
            for line in text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
            {
                assert!(
                    article.contains(line),
                    "{file}: {line:?} is not the article's"
                );
            }
        }
        let wf: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        for t in wf["spec"]["templates"].as_sequence().unwrap() {
            for a in t["outputs"]["artifacts"]
                .as_sequence()
                .into_iter()
                .flatten()
            {
                for k in a.as_mapping().unwrap().keys() {
                    let k = k.as_str().unwrap();
                    assert!(
                        ["name", "path", "artifactGC"].contains(&k),
                        "{file}: artifact field {k} would bypass the default repository"
                    );
                }
            }
        }
    }
}

/// Artifact GC of a directory of 2,500 objects: batched, at most 1,000 keys a request, so
/// three requests, and nothing left.
#[test]
fn deleting_a_prefix_of_2500_objects_takes_three_requests() {
    let emu = emulator();
    for i in 0..2500 {
        emu.put_object(
            BUCKET,
            &format!("gc/dir/{i:04}"),
            bytes::Bytes::from_static(b"x"),
        );
    }
    emu.put_object(BUCKET, "gc/dirx", bytes::Bytes::from_static(b"keep")); // not under dir/
    let plugin = Plugin::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = client(&rt, &plugin.socket);
    emu.reset_stats();
    let r = rt
        .block_on(c.delete(DeleteArtifactRequest {
            artifact: artifact(&config(&emu), "gc/dir"),
        }))
        .unwrap()
        .into_inner();
    assert!(r.success, "{}", r.error);
    let deletes = emu.stats().deletes;
    eprintln!("MEASURED Delete of a 2,500-object prefix: {deletes} delete requests");
    assert!(deletes <= 3, "{deletes} delete requests");
    assert_eq!(emu.keys(BUCKET), ["gc/dirx"]);
}

/// OpenStream of 2 GiB to a consumer slower than the store: the plugin holds its read-ahead
/// window and a few frames, never the object, and writes nothing to disk.
#[test]
fn open_stream_to_a_slow_consumer_stays_within_its_window() {
    let spill = tempfile::tempdir().unwrap();
    let emu = emulator_spilling(spill.path());
    let size = 2048 * MIB;
    emu.put_object(BUCKET, "big/obj", bytes::Bytes::from(pattern(5, 0, size)));
    let plugin = Plugin::start();
    let pid = plugin.child.id();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = client(&rt, &plugin.socket);
    let baseline = proc_status_kib(pid, "VmHWM:") / 1024;
    let fds_before = open_files(pid);
    let mut stream = rt
        .block_on(c.open_stream(OpenStreamRequest {
            artifact: artifact(&config(&emu), "big/obj"),
        }))
        .unwrap()
        .into_inner();
    let (mut got, mut bad, mut frames) = (0usize, 0usize, 0u64);
    let mut files_during = Vec::new();
    let start = Instant::now();
    while let Some(frame) = rt.block_on(stream.message()).unwrap() {
        assert!(frame.error.is_empty(), "{}", frame.error);
        if frame.data[..] != pattern(5, got as u64, frame.data.len())[..] {
            bad += 1;
        }
        got += frame.data.len();
        frames += 1;
        if frames % 16 == 0 {
            std::thread::sleep(Duration::from_millis(20)); // a slow client
        }
        if frames % 256 == 0 {
            files_during.extend(open_files(pid).difference(&fds_before).cloned());
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let peak = proc_status_kib(pid, "VmHWM:") / 1024;
    eprintln!(
        "MEASURED OpenStream of 2 GiB to a slow consumer: {:.0} MiB/s, plugin peak RSS {peak} MiB (baseline {baseline} MiB)",
        size as f64 / MIB as f64 / secs
    );
    assert_eq!((got, bad), (size, 0));
    assert!(
        files_during.is_empty(),
        "files opened while streaming: {files_during:?}"
    );
    // Read-ahead 12 x 4 MiB + 2 frames + HTTP/2 buffers, over a baseline of the runtime.
    assert!(peak < baseline + 96, "peak RSS {peak} MiB");
}

/// The regular files a process has open (sockets, pipes and anonymous inodes left out).
fn open_files(pid: u32) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|p| p.display().to_string())
                .filter(|p| p.starts_with('/') && !p.starts_with("/dev/"))
                .collect()
        })
        .unwrap_or_default()
}

/// A file of `size` bytes that is mostly holes (cheap to make and to read), with pattern
/// data every `stride` bytes so that every part differs.
fn sparse_file(path: &Path, size: u64, stride: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut at = 0;
    while at < size {
        let n = (MIB as u64).min(size - at) as usize;
        f.write_all_at(&pattern(at, at, n), at).unwrap();
        at += stride;
    }
}

fn crc64_of_file(path: &Path) -> u64 {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut d = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Xz);
    let mut buf = vec![0u8; 8 * MIB];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return d.finalize();
        }
        d.update(&buf[..n]);
    }
}

/// A Save of a file over 5 GiB (which S3 and OSS refuse as one PUT) is a multipart upload
/// whose object has the source's CRC-64; nothing stays open.
#[test]
fn a_save_over_5_gib_is_a_checked_multipart_upload() {
    let spill = tempfile::tempdir().unwrap();
    let emu = emulator_spilling(spill.path());
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.bin");
    let size = (5u64 << 30) + 3 * MIB as u64;
    sparse_file(&src, size, 64 * MIB as u64);
    let want = crc64_of_file(&src);
    let plugin = Plugin::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = client(&rt, &plugin.socket);
    let cfg = format!(
        "bucket: {BUCKET}\nprotocol: s3\nendpoint: {}\npartSize: 64MiB\njobs: 8\nstateDir: {}\n",
        emu.endpoint(),
        dir.path().join("state").display()
    );
    let start = Instant::now();
    let r = save(&rt, &mut c, &cfg, "out/big.bin", src.display().to_string());
    let secs = start.elapsed().as_secs_f64();
    assert!(r.success, "{} {}", r.error, plugin.log());
    let obj = emu.object(BUCKET, "out/big.bin").expect("stored");
    assert_eq!(obj.len() as u64, size);
    let got = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Xz, &obj);
    assert_eq!(got, want, "stored CRC-64");
    assert!(emu.open_uploads(BUCKET).is_empty());
    let st = emu.stats();
    eprintln!(
        "MEASURED Save of a {:.2} GiB file: {secs:.1} s ({:.0} MiB/s), {} UploadParts, {} bytes received",
        size as f64 / (1u64 << 30) as f64,
        size as f64 / MIB as f64 / secs,
        st.puts,
        st.put_bytes
    );
    assert_eq!(st.put_bytes, size, "every byte sent once");
}

/// kill -9 of the plugin in the middle of a Save; the restarted plugin confirms the parts
/// already stored (ListParts) and sends only the rest; the object is the file; no upload
/// is left open.
#[test]
fn a_save_interrupted_by_kill_9_resumes_and_leaves_no_upload_open() {
    let emu = emulator();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("data.bin");
    let size = 160 * MIB;
    std::fs::write(&src, pattern(21, 0, size)).unwrap();
    let cfg = format!(
        "bucket: {BUCKET}\nprotocol: s3\nendpoint: {}\npartSize: 8MiB\njobs: 4\nthroughput: 40\nstateDir: {}\n",
        emu.endpoint(),
        dir.path().join("state").display()
    );
    let mut plugin = Plugin::start();
    let socket = plugin.socket.clone();
    let (cfg2, src2) = (cfg.clone(), src.display().to_string());
    // The Save runs in a thread of its own; it fails when the plugin dies.
    let first = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut c = client(&rt, &socket);
        rt.block_on(c.save(SaveArtifactRequest {
            path: src2,
            output_artifact: artifact(&cfg2, "out/data.bin"),
        }))
        .map(|r| r.into_inner().success)
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while emu.stats().put_bytes < 3 * 8 * MIB as u64 {
        assert!(Instant::now() < deadline, "no parts: {}", plugin.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    plugin.child.kill().unwrap(); // SIGKILL
    plugin.child.wait().unwrap();
    let sent_before = emu.stats().put_bytes;
    assert!(
        !matches!(first.join().unwrap(), Ok(true)),
        "the first Save cannot have succeeded"
    );
    assert!(sent_before < size as u64, "{sent_before}");
    assert_eq!(emu.open_uploads(BUCKET).len(), 1);

    let plugin = Plugin::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = client(&rt, &plugin.socket);
    let r = save(&rt, &mut c, &cfg, "out/data.bin", src.display().to_string());
    assert!(r.success, "{} {}", r.error, plugin.log());
    let sent_after = emu.stats().put_bytes - sent_before;
    eprintln!(
        "MEASURED kill -9 after {:.0} MiB stored; the resumed Save sent {:.0} MiB of {:.0}",
        sent_before as f64 / MIB as f64,
        sent_after as f64 / MIB as f64,
        size as f64 / MIB as f64
    );
    assert!(sent_after < size as u64, "sent {sent_after} of {size}");
    assert!(sent_after + sent_before <= size as u64 + 8 * MIB as u64);
    assert_eq!(
        emu.object(BUCKET, "out/data.bin").unwrap(),
        pattern(21, 0, size)
    );
    assert!(
        emu.open_uploads(BUCKET).is_empty(),
        "{:?}",
        emu.open_uploads(BUCKET)
    );
    assert!(
        plugin.log().contains("resuming an upload"),
        "{}",
        plugin.log()
    );
}

/// Parts damaged on the way (one flipped byte: the store's answer does not match what was
/// sent), parts answered 5xx and parts broken off half-way are all sent again; the
/// object is exact.
#[test]
fn damaged_and_failed_parts_are_sent_again() {
    let emu = emulator();
    // The first part carries Content-MD5 (the store has not yet shown it answers CRC-64s):
    // damaged, it is refused (BadDigest). Later parts are streamed and checked by the
    // CRC-64 the store answers: damaged, they are stored and the answer does not match.
    emu.corrupt_next_parts(1);
    emu.corrupt_part_number(20);
    emu.set_part_faults(s3emu::PartFaults {
        error_rate: 0.05,
        reset_rate: 0.02,
        corrupt_rate: 0.0,
    });
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("data.bin");
    let size = 200 * MIB;
    std::fs::write(&src, pattern(22, 0, size)).unwrap();
    let plugin = Plugin::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = client(&rt, &plugin.socket);
    let r = save(
        &rt,
        &mut c,
        &config(&emu),
        "out/f.bin",
        src.display().to_string(),
    );
    assert!(r.success, "{} {}", r.error, plugin.log());
    let st = emu.stats();
    eprintln!(
        "MEASURED 40 parts, the first and the 20th damaged, 5% 5xx, 2% resets: {} faults injected, {} UploadParts",
        st.injected_part_faults, st.puts
    );
    // The two damaged parts are certain; the 5xx and broken-off bodies are random.
    assert!(st.injected_part_faults >= 2, "{st:?}");
    assert!(st.puts as usize >= 40 + 2);
    assert_eq!(
        emu.object(BUCKET, "out/f.bin").unwrap(),
        pattern(22, 0, size)
    );
    assert!(emu.open_uploads(BUCKET).is_empty());
    let log = plugin.log();
    assert!(log.contains("sending a part again"), "{log}");
    assert!(
        log.contains("BadDigest"),
        "the first part's Content-MD5: {log}"
    );
    assert!(
        log.contains("checksum mismatch (expected CRC-64"),
        "a streamed part's CRC-64: {log}"
    );
}

/// A SaveStream longer than a part is a multipart upload fed as the frames arrive.
#[test]
fn save_stream_of_many_parts_is_exact() {
    let emu = emulator();
    let plugin = Plugin::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = client(&rt, &plugin.socket);
    let size = 37 * MIB + 123;
    let data = pattern(23, 0, size);
    let art = artifact(&config(&emu), "out/stream.bin");
    let frames: Vec<SaveStreamArtifactRequest> = data
        .chunks(MIB)
        .enumerate()
        .map(|(i, c)| SaveStreamArtifactRequest {
            output_artifact: if i == 0 { art.clone() } else { None },
            chunk: c.to_vec(),
        })
        .collect();
    let r = rt
        .block_on(c.save_stream(futures::stream::iter(frames)))
        .unwrap()
        .into_inner();
    assert!(r.success, "{} {}", r.error, plugin.log());
    assert_eq!(emu.object(BUCKET, "out/stream.bin").unwrap(), data);
    assert!(emu.stats().puts >= 8, "{:?}", emu.stats());
    assert!(emu.open_uploads(BUCKET).is_empty());
}

#[test]
fn the_plugin_serves_prometheus_metrics_per_repository() {
    let emu = emulator();
    let addr = free_local_addr();
    // Argo appends only the socket: the address comes from the environment.
    let mut cmd = fillfs();
    cmd.arg("argo-artifact").env("FILLFS_METRICS_ADDR", &addr);
    let plugin = Plugin::start_with(cmd, None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = client(&rt, &plugin.socket);
    let cfg = config(&emu);
    let work = tempfile::tempdir().unwrap();
    let size = 12 * MIB + 5; // three 5 MiB parts
    let src = work.path().join("m.bin");
    std::fs::write(&src, pattern(31, 0, size)).unwrap();
    let r = save(&rt, &mut c, &cfg, "m/m.bin", src.to_string_lossy().into());
    assert!(r.success, "{}", r.error);
    let dst = work.path().join("back.bin");
    let r = load(&rt, &mut c, &cfg, "m/m.bin", dst.to_string_lossy().into());
    assert!(r.success, "{}", r.error);
    let mut stream = rt
        .block_on(c.open_stream(OpenStreamRequest {
            artifact: artifact(&cfg, "m/m.bin"),
        }))
        .unwrap()
        .into_inner();
    let mut streamed = 0;
    while let Some(frame) = rt.block_on(stream.message()).unwrap() {
        streamed += frame.data.len();
    }
    assert_eq!(streamed, size);

    let page = http_get(&addr, "/metrics");
    let repo = format!("{{repository=\"s3://{BUCKET}/\"}}");
    let get = |name: &str| {
        sample(&page, &format!("fillfs_{name}_total{repo}"))
            .unwrap_or_else(|| panic!("{name} missing:\n{page}"))
    };
    assert_eq!(get("upload_bytes"), size as f64, "each byte sent once");
    assert_eq!(get("upload_parts"), 3.0);
    assert_eq!(get("upload_parts_retried"), 0.0);
    assert_eq!(get("upload_aborted"), 0.0);
    assert_eq!(get("load_bytes"), size as f64, "Load counted");
    assert_eq!(get("stream_bytes"), size as f64, "OpenStream counted");
    assert!(
        page.contains("fillfs_upload_parts_resumed_total")
            && page.contains("fillfs_upload_resumed_bytes_total"),
        "{page}"
    );
    assert_eq!(http_get(&addr, "/healthz"), "ok\n");
    assert_eq!(plugin.stop(), Some(0));
}

/// Loads of one repository pay its one cap, as its saves and streams do: two at once take
/// as long as both one after the other (before, each load made its own limiter, so N
/// loads got N times the cap).
#[test]
fn loads_of_one_repository_share_its_cap() {
    let emu = emulator();
    let size = 8 * MIB;
    for k in ["cap/a", "cap/b"] {
        emu.put_object(BUCKET, k, bytes::Bytes::from(pattern(7, 0, size)));
    }
    let plugin = Plugin::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = client(&rt, &plugin.socket);
    let cfg = format!("{}throughput: 8\n", config(&emu));
    let work = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let results = rt.block_on(futures::future::join_all(["cap/a", "cap/b"].map(|k| {
        let mut c = c.clone();
        let req = LoadArtifactRequest {
            input_artifact: artifact(&cfg, k),
            path: work
                .path()
                .join(k.replace('/', "-"))
                .to_string_lossy()
                .into(),
        };
        async move { c.load(req).await.unwrap().into_inner() }
    })));
    let took = started.elapsed();
    for r in &results {
        assert!(r.success, "{}", r.error);
    }
    for k in ["cap-a", "cap-b"] {
        let got = std::fs::read(work.path().join(k)).unwrap();
        assert!(got == pattern(7, 0, size), "{k} differs");
    }
    println!("two loads of 8 MiB at 8 MiB/s: {took:?}");
    // 16 MiB at 8 MiB/s is 2 s (a limiter's first second of burst aside).
    assert!(
        took >= Duration::from_millis(1700),
        "the cap was not shared: {took:?}"
    );
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert_eq!(plugin.stop(), Some(0));
}
