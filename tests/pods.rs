//! The pods the cluster would run, executed on this machine the way kubelet and the
//! container runtime would run them — the closest thing to a cluster a test can have.
//!
//! A "node" is a private mount namespace (nothing leaks into the host's mount table) whose
//! kubelet directory is a shared mount, like a real node's `/var/lib/kubelet`. Each
//! container gets its own mount namespace under it and its own root: a tmpfs with the
//! host's `/usr` and `/etc` read-only, `/dev`, `/proc`, `/sys`, the `fillfs` binary at the
//! image's entrypoint, and its volumeMounts bound where the pod spec says (Bidirectional
//! ones joining the kubelet directory's peer group, so the node plugin's FUSE mounts reach
//! the node). It then runs the container's args and env under the pod's effective uid, gid,
//! groups and capabilities (`setpriv`), with a read-only root when the spec asks for one.
//!
//! What runs:
//! - the node-plugin container of `deploy/csi-node.yaml`, with its args, as the uid the
//!   manifest and the image give it: its socket must come up in a root-owned 0755 host
//!   directory (and, as uid 65532, it must not: the test can tell);
//! - the controller's fill pod for each path, generated from the source article's
//!   populator: the node path's CSI inline volume published through that running plugin
//!   with the pod's `volumeAttributes` over the plugin's socket, as kubelet does; the direct
//!   path reading `oss://` itself; PVC' a real ext4 file system on a loop device;
//! - then the workflow's consumers on the filled volume: the article's unmodified task
//!   (root) and a non-root one with an fsGroup, without any recursive chown.

mod common;
#[path = "common/podspec.rs"]
mod podspec;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fillfs::controller::OSSVolumePopulator;
use fillfs::controller::objects::{self, FillSpec, Settings};
use fillfs::controller::placement::{self, FillPath, PluginSeen};
use fillfs::csi::proto::identity_client::IdentityClient;
use fillfs::csi::proto::node_client::NodeClient;
use fillfs::csi::proto::*;
use fillfs::populate::ProgressLine;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PersistentVolumeClaim, Pod, PodSpec};
use serde::Deserialize;
use tonic::transport::Channel;

const NODE: &str = "node-1";

/// Root, FUSE, loop devices and util-linux's namespace tools, or a skip (a failure in CI).
fn can_run_pods() -> bool {
    if !fuse_available() {
        return false;
    }
    let tools = [
        "unshare",
        "nsenter",
        "setpriv",
        "chroot",
        "losetup",
        "mkfs.ext4",
    ];
    let missing: Vec<_> = tools
        .iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    let loops = Path::new("/dev/loop-control").exists();
    if missing.is_empty() && loops {
        return true;
    }
    let why = format!("pod tests need {missing:?} and /dev/loop-control (present: {loops})");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but {why}");
    }
    eprintln!("SKIPPED: {why}");
    false
}

fn sh(script: &str) -> Output {
    Command::new("sh").args(["-c", script]).output().unwrap()
}

fn must(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A node: a private mount namespace held open by a sleeping process, with a host
/// directory tree under `root` (its `/var/lib/kubelet` is `kubelet()`, a shared mount).
struct Node {
    root: tempfile::TempDir,
    holder: Child,
    loops: Vec<String>,
}

impl Node {
    fn new() -> Node {
        let root = tempfile::Builder::new()
            .prefix("node")
            .tempdir_in("/tmp")
            .unwrap();
        let holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sleep", "3600"])
            .spawn()
            .unwrap();
        // Wait until the namespace differs from ours.
        let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{}/ns/mnt", holder.id())).ok() == Some(ours.clone())
        {
            assert!(
                Instant::now() < deadline,
                "unshare did not make a namespace"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let node = Node {
            root,
            holder,
            loops: Vec::new(),
        };
        let k = node.kubelet();
        std::fs::create_dir_all(&k).unwrap();
        must(
            node.in_ns(&format!(
                "mount --bind {k} {k} && mount --make-shared {k}",
                k = k.display()
            ))
            .output()
            .unwrap(),
            "shared kubelet dir",
        );
        node
    }

    /// A host path of this node (`/var/lib/kubelet` → under the node's root).
    fn host(&self, path: &str) -> PathBuf {
        self.root.path().join(path.trim_start_matches('/'))
    }

    fn kubelet(&self) -> PathBuf {
        self.host("/var/lib/kubelet")
    }

    /// A shell command run in the node's mount namespace.
    fn in_ns(&self, script: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount=/proc/{}/ns/mnt", self.holder.id()))
            .args(["--", "sh", "-c", script]);
        c
    }

    /// A path as the node's mount namespace sees it, readable from here.
    fn seen(&self, path: &Path) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{}", self.holder.id(), path.display()))
    }

    /// A fresh ext4 file system on a loop device, mounted at `at` in the node's namespace.
    fn ext4(&mut self, at: &Path, size_mib: u64) {
        let image = self
            .root
            .path()
            .join(format!("disk{}.img", self.loops.len()));
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size_mib << 20)
            .unwrap();
        let dev = must(
            sh(&format!("losetup --find --show {}", image.display())),
            "losetup",
        )
        .trim()
        .to_string();
        self.loops.push(dev.clone());
        must(sh(&format!("mkfs.ext4 -q {dev}")), "mkfs.ext4");
        std::fs::create_dir_all(at).unwrap();
        must(
            self.in_ns(&format!("mount {dev} {}", at.display()))
                .output()
                .unwrap(),
            "mount ext4",
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        // The namespace (and its mounts) goes with its last process; then the loops.
        std::thread::sleep(Duration::from_millis(200));
        for l in &self.loops {
            for _ in 0..20 {
                if sh(&format!("losetup -d {l}")).status.success() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// A volume of a container: where it comes from on the node, and how it is mounted.
struct Mount {
    source: PathBuf,
    path: String,
    read_only: bool,
}

/// Starts one container of `pod` on `node`, as the runtime would: its own root, its
/// mounts, its env, its args, its effective user and capabilities.
fn start_container(
    node: &Node,
    name: &str,
    pod: &PodSpec,
    c: &Container,
    mounts: &[Mount],
    env: &[(String, String)],
) -> Child {
    let (uid, gid) = podspec::effective_user(pod, c);
    let sc = c.security_context.clone().unwrap_or_default();
    let root = node.host(&format!("/containers/{name}"));
    std::fs::create_dir_all(&root).unwrap();
    let r = root.display();
    let mut s = vec![
        "set -e".to_string(),
        format!("mount -t tmpfs -o mode=755 rootfs {r}"),
        format!("mkdir -p {r}/usr {r}/etc {r}/dev {r}/proc {r}/sys {r}/tmp {r}/run"),
        format!(
            "ln -s usr/bin {r}/bin; ln -s usr/lib {r}/lib; ln -s usr/lib64 {r}/lib64; ln -s usr/sbin {r}/sbin"
        ),
        format!("mount --rbind /usr {r}/usr && mount -o remount,bind,ro {r}/usr"),
        format!("mount --rbind /etc {r}/etc && mount -o remount,bind,ro {r}/etc"),
        format!(
            "mount --rbind /dev {r}/dev && mount --rbind /proc {r}/proc && mount --rbind /sys {r}/sys"
        ),
        // The image: our binary at its entrypoint.
        format!(
            "mount -t tmpfs tmpfs {r}/usr/local && mkdir -p {r}/usr/local/bin && touch {r}/usr/local/bin/fillfs"
        ),
        format!(
            "mount --bind {} {r}/usr/local/bin/fillfs",
            env!("CARGO_BIN_EXE_fillfs")
        ),
    ];
    for m in mounts {
        let dest = format!("{r}{}", m.path);
        let kind = if m.source.is_dir() {
            "mkdir -p"
        } else {
            "touch"
        };
        s.push(format!("{kind} {dest}"));
        s.push(format!("mount --bind {} {dest}", m.source.display()));
        if m.read_only {
            s.push(format!("mount -o remount,bind,ro {dest}"));
        }
    }
    if sc.read_only_root_filesystem == Some(true) {
        s.push(format!("mount -o remount,ro {r}"));
    }
    let mut setpriv = format!("setpriv --reuid {uid} --regid {gid}");
    let groups: Vec<String> = pod
        .security_context
        .as_ref()
        .and_then(|p| p.fs_group)
        .into_iter()
        .chain(
            pod.security_context
                .as_ref()
                .and_then(|p| p.supplemental_groups.clone())
                .into_iter()
                .flatten(),
        )
        .map(|g| g.to_string())
        .collect();
    if groups.is_empty() {
        setpriv.push_str(" --clear-groups");
    } else {
        setpriv.push_str(&format!(" --groups {}", groups.join(",")));
    }
    if sc.privileged != Some(true) {
        let caps = sc.capabilities.clone().unwrap_or_default();
        let dropped_all = caps.drop.iter().flatten().any(|d| d == "ALL");
        // The runtime's default set, unless the spec drops all; then only what it adds.
        let mut set: Vec<String> = if dropped_all {
            Vec::new()
        } else {
            [
                "chown",
                "dac_override",
                "fowner",
                "fsetid",
                "kill",
                "setgid",
                "setuid",
                "setpcap",
                "net_bind_service",
                "net_raw",
                "sys_chroot",
                "mknod",
                "audit_write",
                "setfcap",
            ]
            .iter()
            .map(|c| c.to_string())
            .collect()
        };
        set.extend(caps.add.iter().flatten().map(|a| a.to_lowercase()));
        let spec: String = std::iter::once("-all".to_string())
            .chain(set.iter().map(|c| format!("+{c}")))
            .collect::<Vec<_>>()
            .join(",");
        setpriv.push_str(&format!(" --bounding-set {spec} --inh-caps -all"));
    }
    if sc.allow_privilege_escalation == Some(false) {
        setpriv.push_str(" --no-new-privs");
    }
    let mut argv: Vec<String> = c
        .command
        .clone()
        .unwrap_or_else(|| vec!["/usr/local/bin/fillfs".to_string()]);
    argv.extend(c.args.clone().unwrap_or_default());
    let mut env_args = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        "HOME=/".to_string(),
    ];
    env_args.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    s.push(format!(
        "exec chroot {r} {setpriv} -- env -i {} {}",
        env_args
            .iter()
            .map(|a| quote(a))
            .collect::<Vec<_>>()
            .join(" "),
        argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
    ));
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--mount=/proc/{}/ns/mnt", node.holder.id()))
        .args([
            "--",
            "unshare",
            "--mount",
            "--propagation",
            "unchanged",
            "--",
            "sh",
            "-c",
        ])
        .arg(s.join("\n"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().unwrap()
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The container's env as the pod gives it: values, the downward API's node name, and
/// keys of `secrets` (name → key → value).
fn pod_env(
    c: &Container,
    secrets: &HashMap<String, BTreeMap<String, String>>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in c.env.iter().flatten() {
        if let Some(v) = &e.value {
            out.push((e.name.clone(), v.clone()));
            continue;
        }
        let from = e.value_from.as_ref().expect("value or valueFrom");
        if let Some(f) = &from.field_ref {
            assert_eq!(f.field_path, "spec.nodeName", "{}", e.name);
            out.push((e.name.clone(), NODE.to_string()));
        } else if let Some(s) = &from.secret_key_ref {
            match secrets.get(&s.name).and_then(|d| d.get(&s.key)) {
                Some(v) => out.push((e.name.clone(), v.clone())),
                None => assert_eq!(
                    s.optional,
                    Some(true),
                    "secret {}/{} missing",
                    s.name,
                    s.key
                ),
            }
        } else {
            panic!("env {}: unsupported source", e.name);
        }
    }
    out
}

fn yaml_docs(file: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde_json::to_value(serde_yaml_ng::Value::deserialize(d).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// The node plugin as `deploy/csi-node.yaml` runs it. Returns the child and its socket (a
/// host path).
fn start_node_plugin(node: &Node, force_uid: Option<i64>) -> (Child, PathBuf) {
    let ds: DaemonSet = yaml_docs("deploy/csi-node.yaml")
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .map(|d| serde_json::from_value(d).unwrap())
        .unwrap();
    let mut spec = ds.spec.template.spec.unwrap();
    let mut c = spec
        .containers
        .iter()
        .find(|c| c.args.iter().flatten().any(|a| a == "csi"))
        .cloned()
        .unwrap();
    if let Some(uid) = force_uid {
        let sc = c.security_context.get_or_insert_with(Default::default);
        sc.run_as_user = Some(uid);
        sc.run_as_group = Some(uid);
        spec.security_context = None;
    }
    let mut mounts = Vec::new();
    let mut socket_dir = None;
    for m in c.volume_mounts.iter().flatten() {
        let v = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .unwrap();
        let source = if let Some(h) = &v.host_path {
            if h.type_.as_deref() == Some("CharDevice") {
                PathBuf::from(&h.path)
            } else {
                let p = node.host(&h.path);
                // kubelet: DirectoryOrCreate makes it root-owned 0755; Directory must exist.
                std::fs::create_dir_all(&p).unwrap();
                p
            }
        } else if v.empty_dir.is_some() {
            // kubelet makes emptyDirs 0777.
            let p = node.host(&format!("/emptydirs/{}", v.name));
            std::fs::create_dir_all(&p).unwrap();
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o777))
                .unwrap();
            p
        } else {
            panic!("volume {}: unsupported", v.name);
        };
        if m.mount_path == "/csi" {
            socket_dir = Some(source.clone());
        }
        mounts.push(Mount {
            source,
            path: m.mount_path.clone(),
            read_only: m.read_only == Some(true),
        });
    }
    c.image = Some(format!(
        "{}{}",
        podspec::OUR_IMAGE,
        env!("CARGO_PKG_VERSION")
    ));
    let env = pod_env(&c, &HashMap::new());
    let child = start_container(node, "csi-node", &spec, &c, &mounts, &env);
    let endpoint = c
        .args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix("--endpoint=unix:///csi/"))
        .expect("--endpoint=unix:///csi/...")
        .to_string();
    (child, socket_dir.expect("a /csi mount").join(endpoint))
}

fn connect(rt: &tokio::runtime::Runtime, socket: &Path, child: &mut Child) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let connected = unix_channel(rt, socket);
        match connected {
            Ok(c) => return c,
            Err(e) => {
                if let Ok(Some(status)) = child.try_wait() {
                    let mut err = String::new();
                    use std::io::Read;
                    child
                        .stderr
                        .take()
                        .unwrap()
                        .read_to_string(&mut err)
                        .unwrap();
                    panic!("the node plugin exited ({status}) before its socket came up: {err}");
                }
                assert!(Instant::now() < deadline, "plugin socket not ready: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn settings() -> Settings {
    Settings {
        namespace: "fillfs-system".into(),
        image: format!("{}{}", podspec::OUR_IMAGE, env!("CARGO_PKG_VERSION")),
        service_account: "fillfs-populate".into(),
        csi_driver: "csi.fillfs.io".into(),
        fill_deadline: Duration::from_secs(3600),
    }
}

/// The article's populator, pointed at the emulator (its bucket, endpoint; no RRSA: there
/// is no STS here, so the bucket is public-read and reads are anonymous).
fn seed_cr(emu: &Emulator) -> OSSVolumePopulator {
    let mut v = yaml_docs("deploy/examples/seed-ossvolumepopulator.yaml").remove(0);
    v["spec"]["bucket"] = BUCKET.into();
    v["spec"]["endpoint"] = emu.endpoint().into();
    v["spec"]["generic"]
        .as_object_mut()
        .unwrap()
        .remove("rrsaConfigs");
    serde_json::from_value(v).unwrap()
}

/// The claim the article's workflow makes.
fn workflow_claim(uid: &str) -> PersistentVolumeClaim {
    let wf = &yaml_docs("deploy/examples/seed-argo-workflow.yaml")[0];
    let tpl = &wf["spec"]["volumes"][0]["ephemeral"]["volumeClaimTemplate"];
    let mut v = serde_json::json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "parallel-data-process-with-ossvp-x7k2p-echo-template-3180521436-scratch-volume",
                     "namespace": "argo", "uid": uid},
        "spec": tpl["spec"].clone(),
    });
    v["metadata"]["labels"] = tpl["metadata"]["labels"].clone();
    serde_json::from_value(v).unwrap()
}

fn put_dataset(emu: &Emulator) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for (i, (name, size)) in [
        ("a.txt", 10_000u64),
        ("sub/b.bin", 9 << 20),
        ("sub/deeper/c.bin", 300_000),
        ("empty", 0),
    ]
    .iter()
    .enumerate()
    {
        let data = pattern(i as u64 + 40, 0, *size as usize);
        emu.put_object(
            BUCKET,
            &format!("many-files/{name}"),
            bytes::Bytes::from(data.clone()),
        );
        files.push((name.to_string(), data));
    }
    files
}

/// The controller's fill pod for the workflow's claim, after checking that placement
/// chooses `want` for it (a plugin registered somewhere, as on a node-path cluster).
fn chosen_fill_pod(
    cr: &OSSVolumePopulator,
    claim_uid: &str,
    want: FillPath,
    selected_node: Option<&str>,
) -> Pod {
    let pvc = workflow_claim(claim_uid);
    let choice = placement::choose(&pvc, cr, PluginSeen::OnAnyNode(true)).unwrap();
    assert_eq!(choice.path, want, "{}", choice.why);
    let fill = FillSpec {
        path: choice.path,
        selected_node,
        secret: None,
    };
    objects::fill_pod(&pvc, cr, &settings(), &fill)
}

/// A kubelet-style publish of the pod's CSI inline volume through the plugin's socket.
fn publish_inline(
    rt: &tokio::runtime::Runtime,
    channel: Channel,
    pod: &Pod,
    pod_uid: &str,
    target: &str,
) {
    let spec = pod.spec.as_ref().unwrap();
    let v = spec
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.csi.clone())
        .expect("a CSI volume");
    let meta = &pod.metadata;
    let mut context: HashMap<String, String> = v
        .volume_attributes
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    // podInfoOnMount: true in deploy/csi-driver.yaml.
    for (k, val) in [
        ("csi.storage.k8s.io/ephemeral", "true".to_string()),
        ("csi.storage.k8s.io/pod.name", meta.name.clone().unwrap()),
        (
            "csi.storage.k8s.io/pod.namespace",
            meta.namespace.clone().unwrap(),
        ),
        ("csi.storage.k8s.io/pod.uid", pod_uid.to_string()),
        (
            "csi.storage.k8s.io/serviceAccount.name",
            spec.service_account_name.clone().unwrap(),
        ),
    ] {
        context.insert(k.to_string(), val);
    }
    assert!(
        v.node_publish_secret_ref.is_none(),
        "anonymous in this test"
    );
    let req = NodePublishVolumeRequest {
        volume_id: format!("csi-{pod_uid}"),
        target_path: target.to_string(),
        volume_capability: Some(VolumeCapability {
            access_type: Some(volume_capability::AccessType::Mount(
                volume_capability::MountVolume::default(),
            )),
            access_mode: Some(volume_capability::AccessMode {
                mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }),
        readonly: v.read_only == Some(true),
        volume_context: context,
        ..Default::default()
    };
    let mut client = NodeClient::new(channel);
    rt.block_on(client.node_publish_volume(req))
        .expect("NodePublishVolume");
}

/// Runs the fill pod's container on `node`: `source` (node path only) and PVC' at
/// `prime`. Returns its last progress line after checking it exited 0.
fn run_fill(node: &Node, pod: &Pod, source: Option<&Path>, prime: &Path) -> ProgressLine {
    let spec = pod.spec.clone().unwrap();
    let c = &spec.containers[0];
    // kubelet's fsGroup handling of PVC' (a volume with ownership management).
    if let Some(g) = spec.security_context.as_ref().and_then(|s| s.fs_group) {
        must(
            node.in_ns(&format!(
                "chgrp -R {g} {p} && chmod -R g+rwX {p} && find {p} -type d -exec chmod g+s {{}} +",
                p = prime.display()
            ))
            .output()
            .unwrap(),
            "fsGroup",
        );
    }
    let mut mounts = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let v = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .unwrap();
        let src = if v.csi.is_some() {
            source.expect("node path source").to_path_buf()
        } else if v.persistent_volume_claim.is_some() {
            prime.to_path_buf()
        } else {
            panic!("volume {}: not expected in this test", v.name);
        };
        mounts.push(Mount {
            source: src,
            path: m.mount_path.clone(),
            read_only: m.read_only == Some(true),
        });
    }
    let env = pod_env(c, &HashMap::new());
    let child = start_container(
        node,
        &format!("fill-{}", mounts.len()),
        &spec,
        c,
        &mounts,
        &env,
    );
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "fill pod failed: {}\n{stderr}",
        out.status
    );
    ProgressLine::last_in(&stdout).unwrap_or_else(|| panic!("no progress line in: {stdout}"))
}

fn assert_filled(node: &Node, prime: &Path, files: &[(String, Vec<u8>)]) {
    let seen = node.seen(prime);
    for (name, data) in files {
        let got = std::fs::read(seen.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(got == *data, "{name}: content differs");
    }
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&seen).unwrap().permissions());
    assert_eq!(mode & 0o7777, 0o777, "volume root mode {mode:o}");
}

/// The workflow's consumers on the filled volume: the article's task as is (root, the
/// runtime's default capabilities), and a non-root task with an fsGroup (no recursive
/// chown applied).
fn run_consumers(node: &Node, volume: &Path) {
    let wf = &yaml_docs("deploy/examples/seed-argo-workflow.yaml")[0];
    let tpl = wf["spec"]["templates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "echo-template")
        .unwrap();
    let mut c: Container = serde_json::from_value(tpl["container"].clone()).unwrap();
    c.args = Some(
        c.args
            .unwrap()
            .into_iter()
            .map(|a| a.replace("{{inputs.parameters.index}}", "0"))
            .collect(),
    );
    c.resources = None;
    let mount = |c: &Container| {
        vec![Mount {
            source: volume.to_path_buf(),
            path: c.volume_mounts.as_ref().unwrap()[0].mount_path.clone(),
            read_only: false,
        }]
    };
    // busybox runs as root; the image is not ours, so say so.
    let root_task = PodSpec {
        containers: vec![c.clone()],
        security_context: Some(k8s_openapi::api::core::v1::PodSecurityContext {
            run_as_user: Some(0),
            ..Default::default()
        }),
        ..Default::default()
    };
    let out = start_container(node, "task-0", &root_task, &c, &mount(&c), &[])
        .wait_with_output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "article's task: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("0-logs") && stdout.contains("a.txt"),
        "{stdout}"
    );

    let mut c2 = c.clone();
    c2.args = Some(vec![
        "touch /scratch-volume/by-1000 && ls -ln /scratch-volume".into(),
    ]);
    let non_root = PodSpec {
        containers: vec![c2.clone()],
        security_context: Some(k8s_openapi::api::core::v1::PodSecurityContext {
            run_as_user: Some(1000),
            run_as_group: Some(1000),
            fs_group: Some(2000),
            ..Default::default()
        }),
        ..Default::default()
    };
    let out = start_container(node, "task-1", &non_root, &c2, &mount(&c2), &[])
        .wait_with_output()
        .unwrap();
    assert!(
        out.status.success(),
        "non-root task: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let meta = std::fs::metadata(node.seen(volume).join("by-1000")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 1000);
}

#[test]
fn the_node_plugin_as_the_manifest_runs_it_serves_its_socket_and_not_as_65532() {
    if !can_run_pods() {
        return;
    }
    let node = Node::new();
    let (mut child, socket) = start_node_plugin(&node, None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let channel = connect(&rt, &socket, &mut child);
    let info = rt
        .block_on(IdentityClient::new(channel).get_plugin_info(GetPluginInfoRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.fillfs.io");
    let _ = child.kill();
    let _ = child.wait();
    drop(node);

    // The image's default user in the same place: the emulation enforces what kubelet's
    // root-owned directory does, so the test above means something.
    let node = Node::new();
    let (child, _) = start_node_plugin(&node, Some(podspec::dockerfile_user().0));
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
}

#[test]
fn the_seed_fill_pods_run_on_both_paths_and_leave_a_volume_consumers_can_write() {
    if !can_run_pods() {
        return;
    }
    let emu = emulator();
    emu.set_public_read(true);
    let files = put_dataset(&emu);
    let total: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();

    // Direct: the article's placement (ACS labels) chooses it by itself.
    let mut node = Node::new();
    let cr = seed_cr(&emu);
    let pod = chosen_fill_pod(
        &cr,
        "11111111-0000-4000-8000-00000000000d",
        FillPath::Direct,
        None,
    );
    let prime = node
        .kubelet()
        .join("pods/direct/volumes/kubernetes.io~csi/pv-d/mount");
    node.ext4(&prime, 128);
    let line = run_fill(&node, &pod, None, &prime);
    assert!(line.done && line.bytes_done == total, "{line:?}");
    assert_filled(&node, &prime, &files);
    run_consumers(&node, &prime);
    drop(node);

    // Node path: a populator without the serverless labels, the plugin on the node.
    let mut node = Node::new();
    let mut cr = seed_cr(&emu);
    cr.spec.generic.as_mut().unwrap().labels.clear();
    let pod = chosen_fill_pod(
        &cr,
        "11111111-0000-4000-8000-00000000000e",
        FillPath::Node,
        Some(NODE),
    );
    let (mut plugin, socket) = start_node_plugin(&node, None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let channel = connect(&rt, &socket, &mut plugin);
    let pod_uid = "22222222-0000-4000-8000-000000000001";
    let volumes = format!("/var/lib/kubelet/pods/{pod_uid}/volumes/kubernetes.io~csi");
    // kubelet makes the volume's parent directory; the plugin makes `mount`.
    std::fs::create_dir_all(node.host(&format!("{volumes}/source"))).unwrap();
    publish_inline(
        &rt,
        channel,
        &pod,
        pod_uid,
        &format!("{volumes}/source/mount"),
    );
    let source = node.host(&format!("{volumes}/source/mount"));
    let prime = node.host(&format!("{volumes}/pv-n/mount"));
    node.ext4(&prime, 128);
    let line = run_fill(&node, &pod, Some(&source), &prime);
    assert!(line.done && line.bytes_done == total, "{line:?}");
    assert_filled(&node, &prime, &files);
    run_consumers(&node, &prime);
    let _ = plugin.kill();
    let _ = plugin.wait();
}
