//! The manifests in deploy/ are what an admin applies: every document must be a valid
//! object of its kind with no field the API would drop (each one is deserialized into the
//! Kubernetes types and must serialize back to the same document), images must match this
//! version, and the kustomization must list every file.

use std::path::Path;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    Namespace, PersistentVolume, PersistentVolumeClaim, Pod, Secret, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::api::storage::v1::CSIDriver;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> Value {
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{e}: {doc}"));
    serde_json::to_value(typed).unwrap()
}

/// Every YAML document under `dir` (not recursive), with its file name.
fn documents(dir: &Path) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = serde_json::to_value(serde_yaml_ng::Value::deserialize(doc).unwrap()).unwrap();
            if !v.is_null() {
                out.push((f.file_name().unwrap().to_string_lossy().into_owned(), v));
            }
        }
    }
    out
}

use serde::Deserialize;

#[test]
fn every_manifest_is_a_valid_object_without_unknown_fields() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut docs = documents(&root);
    docs.extend(documents(&root.join("examples")));
    docs.extend(documents(&root.join("optional")));
    let mut checked = 0;
    for (file, doc) in &docs {
        let kind = doc["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("{file}: no kind"));
        let back = match kind {
            "Namespace" => round_trip::<Namespace>(doc),
            "ServiceAccount" => round_trip::<ServiceAccount>(doc),
            "ClusterRole" => round_trip::<ClusterRole>(doc),
            "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(doc),
            "Role" => round_trip::<Role>(doc),
            "RoleBinding" => round_trip::<RoleBinding>(doc),
            "Deployment" => round_trip::<Deployment>(doc),
            "DaemonSet" => round_trip::<DaemonSet>(doc),
            "CSIDriver" => round_trip::<CSIDriver>(doc),
            "CustomResourceDefinition" => round_trip::<CustomResourceDefinition>(doc),
            "Secret" => round_trip::<Secret>(doc),
            "ConfigMap" => round_trip::<k8s_openapi::api::core::v1::ConfigMap>(doc),
            "Pod" => round_trip::<Pod>(doc),
            "PersistentVolume" => round_trip::<PersistentVolume>(doc),
            "PersistentVolumeClaim" => round_trip::<PersistentVolumeClaim>(doc),
            "OSSVolumePopulator" => round_trip::<fillfs::controller::OSSVolumePopulator>(doc),
            // Not Kubernetes core types: Argo's Workflow, the populator registration, kustomize.
            "Workflow" | "VolumePopulator" | "Kustomization" => continue,
            other => panic!("{file}: unexpected kind {other}"),
        };
        assert_eq!(
            &back, doc,
            "{file}: a {kind} field was dropped or changed (typo?)"
        );
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} documents checked");
}

#[test]
fn images_match_this_version_and_kustomization_lists_every_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let want = format!("ghcr.io/fillfs/fillfs:{}", env!("CARGO_PKG_VERSION"));
    for (file, doc) in documents(&root) {
        let text = doc.to_string();
        for (i, _) in text.match_indices("ghcr.io/fillfs/fillfs:") {
            let image: String = text[i..].chars().take_while(|c| *c != '"').collect();
            assert_eq!(image, want, "{file}");
        }
    }
    let kustomization: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(root.join("kustomization.yaml")).unwrap())
            .unwrap();
    let listed: Vec<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for entry in std::fs::read_dir(&root).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            assert!(
                listed.contains(&name.as_str()),
                "{name} missing from kustomization.yaml"
            );
        }
    }
    // Only kinds that exist on every cluster (core, or defined by crd.yaml) go into the
    // kustomization: one unknown kind fails the whole `kubectl apply -k`.
    for file in &listed {
        for (_, doc) in documents_of(&root.join(file)) {
            let api = doc["apiVersion"].as_str().unwrap();
            assert!(
                !api.starts_with("populator.storage.k8s.io/"),
                "{file}: {api} needs the volume-data-source-validator's CRD; keep it in optional/"
            );
        }
    }
}

#[test]
fn the_optional_volume_populator_registration_names_our_crd() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let docs = documents(&root.join("optional"));
    let reg = docs
        .iter()
        .find(|(_, d)| d["kind"] == "VolumePopulator")
        .map(|(_, d)| d)
        .expect("deploy/optional/volume-populator.yaml");
    assert_eq!(reg["apiVersion"], "populator.storage.k8s.io/v1beta1");
    let crd = <fillfs::controller::OSSVolumePopulator as kube::CustomResourceExt>::crd();
    assert_eq!(reg["sourceKind"]["group"], crd.spec.group.as_str());
    assert_eq!(reg["sourceKind"]["kind"], crd.spec.names.kind.as_str());
    // The README tells admins to apply it separately, after the validator's CRD.
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    assert!(readme.contains("kubectl apply -f deploy/optional/volume-populator.yaml"));
}

/// The YAML documents of one file.
fn documents_of(file: &Path) -> Vec<(String, Value)> {
    let text = std::fs::read_to_string(file).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde_json::to_value(serde_yaml_ng::Value::deserialize(doc).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .map(|v| (file.display().to_string(), v))
        .collect()
}

#[path = "common/podspec.rs"]
mod podspec;

use k8s_openapi::api::core::v1::PodSpec;

/// Every pod template in deploy/ with the file it comes from.
fn pod_specs() -> Vec<(String, String, PodSpec)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut docs = documents(&root);
    docs.extend(documents(&root.join("examples")));
    let mut out = Vec::new();
    for (file, doc) in docs {
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        let spec = match kind.as_str() {
            "DaemonSet" | "Deployment" => doc["spec"]["template"]["spec"].clone(),
            "Pod" => doc["spec"].clone(),
            _ => continue,
        };
        let name = format!("{file}: {kind} {}", doc["metadata"]["name"]);
        out.push((name, kind, serde_json::from_value(spec).unwrap()));
    }
    out
}

/// What each container does decides the uid it needs, and the manifests must give it:
/// - privileged (mounting FUSE into kubelet's directories) → uid 0: a privileged
///   container of uid 65532 cannot bind a socket in a root-owned 0755 host directory;
/// - writing into a hostPath directory (kubelet creates them root-owned, 0755) → uid 0;
/// - `runAsNonRoot: true` with an effective uid 0 → kubelet refuses to start it;
/// - everything not privileged drops all capabilities and cannot escalate.
#[test]
fn every_container_runs_as_the_uid_its_job_needs() {
    let specs = pod_specs();
    assert!(specs.len() >= 4, "{specs:?}");
    let mut node_plugin_seen = false;
    for (name, _, spec) in &specs {
        let host_dirs: Vec<&str> = spec
            .volumes
            .iter()
            .flatten()
            .filter(|v| {
                v.host_path
                    .as_ref()
                    .is_some_and(|h| h.type_.as_deref() != Some("CharDevice"))
            })
            .map(|v| v.name.as_str())
            .collect();
        for c in &spec.containers {
            let (uid, _) = podspec::effective_user(spec, c);
            let what = format!("{name}, container {}: effective uid {uid}", c.name);
            if podspec::privileged(c) {
                assert_eq!(uid, 0, "{what}: privileged mounters must run as root");
            }
            let writes_host = c
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| host_dirs.contains(&m.name.as_str()) && m.read_only != Some(true));
            if writes_host {
                assert_eq!(
                    uid, 0,
                    "{what}: writes into a root-owned hostPath directory"
                );
            }
            if podspec::run_as_non_root(spec, c) {
                assert_ne!(uid, 0, "{what}: runAsNonRoot with uid 0 never starts");
            }
            if !podspec::privileged(c) {
                let sc = c.security_context.clone().unwrap_or_default();
                if name.contains("controller.yaml") {
                    assert_eq!(sc.allow_privilege_escalation, Some(false), "{what}");
                    let caps = sc.capabilities.unwrap_or_default();
                    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]), "{what}");
                }
            }
            if c.args.iter().flatten().any(|a| a == "csi") {
                node_plugin_seen = true;
                assert!(
                    podspec::privileged(c),
                    "{what}: the node plugin mounts FUSE"
                );
                assert_eq!(uid, 0, "{what}");
            }
        }
    }
    assert!(node_plugin_seen, "no node plugin container in deploy/");
    // The image's default user is not root (fill pods and the controller rely on it
    // being overridden only where the manifests say so).
    assert_ne!(podspec::dockerfile_user().0, 0);
}

/// The controller's fill pods, on both paths: root without privileges (so the fill can give
/// the volume's root its mode), every capability dropped but CHOWN when asked for.
#[test]
fn fill_pods_are_unprivileged_on_both_paths() {
    use fillfs::controller::objects::{self, FillSpec, Settings};
    use fillfs::controller::placement::FillPath;
    let cr: fillfs::controller::OSSVolumePopulator = serde_yaml_ng::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("deploy/examples/seed-ossvolumepopulator.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    let pvc: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "c", "namespace": "argo", "uid": "u-1"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    }))
    .unwrap();
    let settings = Settings {
        namespace: "fillfs-system".into(),
        image: format!("ghcr.io/fillfs/fillfs:{}", env!("CARGO_PKG_VERSION")),
        service_account: "fillfs-populate".into(),
        csi_driver: "csi.fillfs.io".into(),
        fill_deadline: std::time::Duration::from_secs(3600),
    };
    for path in [FillPath::Node, FillPath::Direct] {
        let pod = objects::fill_pod(
            &pvc,
            &cr,
            &settings,
            &FillSpec {
                path,
                selected_node: None,
                secret: None,
            },
        );
        let spec = pod.spec.unwrap();
        let c = &spec.containers[0];
        let what = format!("{path:?} fill pod");
        assert_eq!(podspec::effective_user(&spec, c), (0, 0), "{what}");
        assert!(!podspec::privileged(c), "{what}");
        assert!(!podspec::run_as_non_root(&spec, c), "{what}");
        let sc = c.security_context.clone().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{what}");
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{what}");
        let caps = sc.capabilities.unwrap();
        assert_eq!(caps.drop, Some(vec!["ALL".to_string()]), "{what}");
        assert!(
            caps.add.unwrap_or_default().iter().all(|a| a == "CHOWN"),
            "{what}"
        );
        assert!(
            spec.volumes.iter().flatten().all(|v| v.host_path.is_none()),
            "{what}"
        );
        assert_eq!(spec.active_deadline_seconds, Some(3600), "{what}");
    }
}
