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
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap();
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
        serde_yaml::from_str(&std::fs::read_to_string(root.join("kustomization.yaml")).unwrap())
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
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .map(|v| (file.display().to_string(), v))
        .collect()
}
