//! The objects the controller creates for one user PVC, built as plain values: the
//! temporary claim PVC' (`prime-<uid>`), the fill pod (`populate-<uid>`) and, when the
//! populator uses an access key, a copy of its Secret next to the pod. Golden tests pin them.
//!
//! Owns names, labels, annotations and the pod's command line; it must not call the API.
//!
//! Label values are at most 63 characters, and the names of user PVCs are not: Argo names
//! an ephemeral claim `<workflow>-<template>-<hash>-<volume>` (about 78 characters for the
//! source article's workflow). So the only label tying our objects to a user PVC is its uid
//! (36 characters, for selectors); its namespace and name, and the populator's, are
//! annotations (what the pod watch maps back through).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    CSIVolumeSource, Capabilities, Container, EnvVar, LocalObjectReference, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec,
    ResourceRequirements, SeccompProfile, Secret, SecurityContext, Volume, VolumeDevice,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::crd::OSSVolumePopulator;

pub const API_GROUP: &str = "storage.alibabacloud.com";
pub const KIND: &str = "OSSVolumePopulator";
/// On the user's PVC while we own its fill.
pub const FINALIZER: &str = "fillfs.io/populate";
/// On the user's PVC: fill progress ("42.0%", "done", "failed: ...").
pub const ANN_PROGRESS: &str = "fillfs.io/progress";
/// On the user's PVC: failed fill attempts so far.
pub const ANN_ATTEMPTS: &str = "fillfs.io/attempts";
/// On the user's PVC: a fill failed for good (the reason). Nothing more is tried until the
/// annotation is removed.
pub const ANN_FAILED: &str = "fillfs.io/failed";
/// On the user's PVC: no new fill pod before this time (RFC 3339), the backoff of a
/// transient failure.
pub const ANN_RETRY_AFTER: &str = "fillfs.io/retry-after";
/// On the user's PVC: the uid of the fill pod whose failure the annotations above record
/// (so a pod whose deletion did not go through is not counted twice).
pub const ANN_FAILED_POD: &str = "fillfs.io/failed-pod";
/// On the user's PVC: why the PVC cannot be filled as it is (its own spec, not the
/// populator's); checked again at every reconcile.
pub const ANN_INVALID: &str = "fillfs.io/invalid";
/// Set by the scheduler on a WaitForFirstConsumer PVC.
pub const ANN_SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// On the PV after the fill: `namespace/name` of the populator.
pub const ANN_POPULATED_FROM: &str = "fillfs.io/populated-from";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The user PVC's uid: the one label tying our objects to it (always 36 characters).
pub const LABEL_PVC_UID: &str = "fillfs.io/pvc-uid";
/// On our objects: the user PVC's namespace and name (too long for label values).
pub const ANN_PVC_NAMESPACE: &str = "fillfs.io/pvc-namespace";
pub const ANN_PVC_NAME: &str = "fillfs.io/pvc-name";
/// On our objects: `namespace/name` of the populator.
pub const ANN_POPULATOR: &str = "fillfs.io/populator";
/// The fill container's name (its logs carry the progress lines).
pub const CONTAINER: &str = "populate";
/// Exit status of `fillfs populate` for a failure that a retry cannot fix.
pub const EXIT_PERMANENT: i32 = 2;

/// Cluster-wide settings of the controller.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Where PVC's, fill pods and copied secrets live.
    pub namespace: String,
    /// The fillfs image the fill pod runs.
    pub image: String,
    /// Service account of fill pods (its token is what RRSA exchanges).
    pub service_account: String,
    /// The CSI driver that mounts the bucket in the fill pod.
    pub csi_driver: String,
}

pub fn prime_name(uid: &str) -> String {
    format!("prime-{uid}")
}

pub fn pod_name(uid: &str) -> String {
    format!("populate-{uid}")
}

pub fn secret_name(uid: &str) -> String {
    format!("populate-{uid}")
}

fn uid(pvc: &PersistentVolumeClaim) -> &str {
    pvc.metadata.uid.as_deref().unwrap_or_default()
}

/// Labels of our objects: short, fixed-length values only (see the module's doc).
pub fn owner_labels(pvc: &PersistentVolumeClaim) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), "fillfs".to_string()),
        (LABEL_PVC_UID.to_string(), uid(pvc).to_string()),
    ])
}

/// Annotations naming the user's PVC and the populator an object works for.
pub fn owner_annotations(
    pvc: &PersistentVolumeClaim,
    cr: &OSSVolumePopulator,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            ANN_PVC_NAMESPACE.to_string(),
            pvc.metadata.namespace.clone().unwrap_or_default(),
        ),
        (
            ANN_PVC_NAME.to_string(),
            pvc.metadata.name.clone().unwrap_or_default(),
        ),
        (ANN_POPULATOR.to_string(), populator_key(cr)),
    ])
}

/// `namespace/name` of a populator.
pub fn populator_key(cr: &OSSVolumePopulator) -> String {
    format!(
        "{}/{}",
        cr.metadata.namespace.as_deref().unwrap_or_default(),
        cr.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The user PVC (namespace, name) one of our objects works for, from its annotations.
pub fn owner_of(meta: &ObjectMeta) -> Option<(String, String)> {
    let a = meta.annotations.as_ref()?;
    Some((
        a.get(ANN_PVC_NAMESPACE)?.clone(),
        a.get(ANN_PVC_NAME)?.clone(),
    ))
}

/// Whether the user's PVC is a block volume.
pub fn is_block(pvc: &PersistentVolumeClaim) -> bool {
    pvc.spec.as_ref().and_then(|s| s.volume_mode.as_deref()) == Some("Block")
}

/// PVC': same class, size, access modes and volume mode as the user's claim, in our
/// namespace; pinned to the selected node when the class waits for the first consumer.
pub fn prime_pvc(
    pvc: &PersistentVolumeClaim,
    cr: &OSSVolumePopulator,
    settings: &Settings,
    selected_node: Option<&str>,
) -> PersistentVolumeClaim {
    let spec = pvc.spec.clone().unwrap_or_default();
    let mut annotations = owner_annotations(pvc, cr);
    if let Some(n) = selected_node {
        annotations.insert(ANN_SELECTED_NODE.to_string(), n.to_string());
    }
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(prime_name(uid(pvc))),
            namespace: Some(settings.namespace.clone()),
            labels: Some(owner_labels(pvc)),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: spec.access_modes,
            resources: spec.resources,
            storage_class_name: spec.storage_class_name,
            volume_mode: spec.volume_mode,
            ..Default::default()
        }),
        status: None,
    }
}

/// The source as the fill pod's CSI volume sees it, and the path `fillfs populate` reads:
/// a prefix is mounted whole; for a block volume, the image's directory is mounted and the
/// image file is the source.
fn source_layout(cr: &OSSVolumePopulator, block: bool) -> (String, String) {
    let path = cr.spec.path.trim_matches('/');
    if block {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        (format!("/{dir}"), format!("/source/{name}"))
    } else {
        (format!("/{path}"), "/source".to_string())
    }
}

/// The fill pod: mounts the bucket read-only through the fillfs CSI driver at /source and
/// PVC' at /target (or as /dev/target), runs `fillfs populate`, and exits.
pub fn fill_pod(
    pvc: &PersistentVolumeClaim,
    cr: &OSSVolumePopulator,
    settings: &Settings,
    selected_node: Option<&str>,
    secret: Option<&str>,
) -> Pod {
    let uid = uid(pvc);
    let block = is_block(pvc);
    let spec = &cr.spec;
    let generic = spec.generic.clone().unwrap_or_default();
    let (mount_path, source_arg) = source_layout(cr, block);

    let mut attributes = BTreeMap::from([
        ("bucket".to_string(), spec.bucket.clone()),
        ("path".to_string(), mount_path),
        ("protocol".to_string(), "oss".to_string()),
    ]);
    if let Some(e) = &spec.endpoint {
        attributes.insert("endpoint".into(), e.clone());
    }
    if let Some(r) = &spec.region {
        attributes.insert("region".into(), r.clone());
    }
    if let Some(t) = spec.throughput_mib() {
        attributes.insert("throughput".into(), format!("{t}"));
    }
    if let Some(r) = &generic.rrsa_configs {
        attributes.insert("roleArn".into(), r.role_arn.clone());
        attributes.insert("oidcProviderArn".into(), r.oidc_provider_arn.clone());
    }

    let mut args = vec!["populate".to_string(), source_arg];
    if block {
        args.extend(["/dev/target".to_string(), "--block".to_string()]);
    } else {
        args.push("/target".to_string());
    }
    args.extend(["--progress".to_string(), "json".to_string()]);
    if spec.verify == Some(true) {
        args.push("--verify".to_string());
    }

    let mut labels = generic.labels.clone();
    labels.extend(owner_labels(pvc));

    let (volume_mounts, volume_devices) = if block {
        (
            vec![source_mount()],
            Some(vec![VolumeDevice {
                name: "target".into(),
                device_path: "/dev/target".into(),
            }]),
        )
    } else {
        (
            vec![
                source_mount(),
                VolumeMount {
                    name: "target".into(),
                    mount_path: "/target".into(),
                    ..Default::default()
                },
            ],
            None,
        )
    };

    // Unprivileged: FUSE lives in the CSI node plugin. A file system volume is written as
    // an ordinary user (fsGroup makes the volume root writable); a raw device needs the
    // device owner's uid, still without privileges or capabilities.
    let (run_as, fs_group) = if block {
        (0, None)
    } else {
        (65532, Some(65532))
    };
    let resources = generic
        .resources
        .clone()
        .unwrap_or_else(|| ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("100m".into())),
                ("memory".to_string(), Quantity("128Mi".into())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity("768Mi".into()),
            )])),
            ..Default::default()
        });

    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(uid)),
            namespace: Some(settings.namespace.clone()),
            labels: Some(labels),
            annotations: Some(owner_annotations(pvc, cr)),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            service_account_name: Some(settings.service_account.clone()),
            node_name: selected_node.map(str::to_string),
            node_selector: (selected_node.is_none() && !generic.node_selector.is_empty())
                .then(|| generic.node_selector.clone()),
            tolerations: (!generic.tolerations.is_empty()).then(|| generic.tolerations.clone()),
            priority_class_name: generic.priority_class_name.clone(),
            security_context: Some(PodSecurityContext {
                run_as_user: Some(run_as),
                run_as_group: Some(run_as),
                run_as_non_root: Some(run_as != 0),
                fs_group,
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            containers: vec![Container {
                name: CONTAINER.into(),
                image: Some(settings.image.clone()),
                args: Some(args),
                env: Some(vec![EnvVar {
                    name: "RUST_LOG".into(),
                    value: Some("info".into()),
                    ..Default::default()
                }]),
                resources: Some(resources),
                volume_mounts: Some(volume_mounts),
                volume_devices,
                termination_message_policy: Some("FallbackToLogsOnError".into()),
                security_context: Some(SecurityContext {
                    allow_privilege_escalation: Some(false),
                    privileged: Some(false),
                    read_only_root_filesystem: Some(true),
                    capabilities: Some(Capabilities {
                        drop: Some(vec!["ALL".into()]),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            volumes: Some(vec![
                Volume {
                    name: "source".into(),
                    csi: Some(CSIVolumeSource {
                        driver: settings.csi_driver.clone(),
                        read_only: Some(true),
                        volume_attributes: Some(attributes),
                        node_publish_secret_ref: secret.map(|s| LocalObjectReference {
                            name: s.to_string(),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "target".into(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: prime_name(uid),
                        read_only: Some(false),
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: None,
    }
}

fn source_mount() -> VolumeMount {
    VolumeMount {
        name: "source".into(),
        mount_path: "/source".into(),
        read_only: Some(true),
        ..Default::default()
    }
}

/// The populator's credentials Secret copied next to the fill pod (a CSI volume's
/// nodePublishSecretRef must be in the pod's namespace). Only the access-key entries.
pub fn copied_secret(
    src: &Secret,
    pvc: &PersistentVolumeClaim,
    cr: &OSSVolumePopulator,
    settings: &Settings,
) -> Secret {
    let keep = ["akId", "akSecret", "securityToken"];
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(uid(pvc))),
            namespace: Some(settings.namespace.clone()),
            labels: Some(owner_labels(pvc)),
            annotations: Some(owner_annotations(pvc, cr)),
            ..Default::default()
        },
        data: src.data.as_ref().map(|d| {
            d.iter()
                .filter(|(k, _)| keep.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}
