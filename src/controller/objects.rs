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

use std::time::Duration;

use k8s_openapi::api::core::v1::{
    CSIVolumeSource, Capabilities, Container, EnvVar, EnvVarSource, LocalObjectReference,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, Pod,
    PodSecurityContext, PodSpec, ProjectedVolumeSource, ResourceRequirements, SeccompProfile,
    Secret, SecretKeySelector, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeDevice, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::crd::OSSVolumePopulator;
use super::placement::{ANN_FILL_PATH, FillPath};

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
    /// The CSI driver that mounts the bucket in the fill pod (node path).
    pub csi_driver: String,
    /// A fill pod's activeDeadlineSeconds unless the populator sets its own.
    pub fill_deadline: Duration,
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

/// The source URL of a direct fill: the prefix (with its trailing `/`), or one image.
pub fn direct_source(cr: &OSSVolumePopulator, block: bool) -> String {
    let path = cr.spec.path.trim_matches('/');
    match (block, path.is_empty()) {
        (true, _) => format!("oss://{}/{path}", cr.spec.bucket),
        (false, true) => format!("oss://{}/", cr.spec.bucket),
        (false, false) => format!("oss://{}/{path}/", cr.spec.bucket),
    }
}

/// Where the direct path's projected RRSA token is mounted (ACK's own location).
pub const RRSA_TOKEN_DIR: &str = "/var/run/secrets/ack.alibabacloud.com/rrsa-tokens";
/// The audience Alibaba Cloud STS accepts for RRSA.
pub const RRSA_AUDIENCE: &str = "sts.aliyuncs.com";

/// How one fill pod is made: its path, its node, the copied credentials Secret.
#[derive(Debug, Clone, Copy)]
pub struct FillSpec<'a> {
    pub path: FillPath,
    pub selected_node: Option<&'a str>,
    pub secret: Option<&'a str>,
}

/// The fill pod. Node path: mounts the bucket read-only through the fillfs CSI driver at
/// /source; direct path: reads `oss://` itself. Either way PVC' is at /target (or
/// /dev/target), `fillfs populate` runs once, and the pod exits.
///
/// It runs as uid 0 *without privileges*: no capability but CHOWN (only when the
/// populator asks for another owner), no privilege escalation, a read-only root. Root is
/// what lets the fill give the volume's root directory the populator's mode (a fresh file
/// system's root belongs to uid 0, and only its owner may chmod it), so consumers of any
/// uid can write there without a recursive chown by kubelet at every mount.
pub fn fill_pod(
    pvc: &PersistentVolumeClaim,
    cr: &OSSVolumePopulator,
    settings: &Settings,
    fill: &FillSpec,
) -> Pod {
    let uid = uid(pvc);
    let block = is_block(pvc);
    let spec = &cr.spec;
    let generic = spec.generic.clone().unwrap_or_default();
    let ownership = spec.ownership.clone().unwrap_or_default();
    let direct = fill.path == FillPath::Direct;

    let mut env = vec![env_value("RUST_LOG", "info")];
    let mut volumes = vec![Volume {
        name: "target".into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: prime_name(uid),
            read_only: Some(false),
        }),
        ..Default::default()
    }];
    let mut volume_mounts = Vec::new();
    let mut args = vec!["populate".to_string()];
    if direct {
        args.push(direct_source(cr, block));
        if let Some(e) = &spec.endpoint {
            args.extend(["--endpoint".into(), e.clone()]);
        }
        if let Some(r) = &spec.region {
            args.extend(["--region".into(), r.clone()]);
        }
        if let Some(t) = spec.throughput_mib() {
            args.extend(["--throughput".into(), format!("{t}")]);
        }
        match (&generic.rrsa_configs, fill.secret) {
            (Some(r), _) => {
                env.extend([
                    env_value("ALIBABA_CLOUD_ROLE_ARN", &r.role_arn),
                    env_value("ALIBABA_CLOUD_OIDC_PROVIDER_ARN", &r.oidc_provider_arn),
                    env_value(
                        "ALIBABA_CLOUD_OIDC_TOKEN_FILE",
                        &format!("{RRSA_TOKEN_DIR}/token"),
                    ),
                ]);
                volumes.push(rrsa_token_volume());
                volume_mounts.push(VolumeMount {
                    name: "rrsa-token".into(),
                    mount_path: RRSA_TOKEN_DIR.into(),
                    read_only: Some(true),
                    ..Default::default()
                });
            }
            (None, Some(secret)) => env.extend([
                env_secret("ALIBABA_CLOUD_ACCESS_KEY_ID", secret, "akId", false),
                env_secret("ALIBABA_CLOUD_ACCESS_KEY_SECRET", secret, "akSecret", false),
                env_secret(
                    "ALIBABA_CLOUD_SECURITY_TOKEN",
                    secret,
                    "securityToken",
                    true,
                ),
            ]),
            // Like a CSI volume without credentials: anonymous, never an ambient identity.
            (None, None) => args.push("--no-sign-request".into()),
        }
    } else {
        let (mount_path, source_arg) = source_layout(cr, block);
        args.push(source_arg);
        volumes.push(csi_source_volume(cr, settings, &mount_path, fill.secret));
        volume_mounts.push(VolumeMount {
            name: "source".into(),
            mount_path: "/source".into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    let volume_devices = if block {
        args.extend(["/dev/target".to_string(), "--block".to_string()]);
        Some(vec![VolumeDevice {
            name: "target".into(),
            device_path: "/dev/target".into(),
        }])
    } else {
        args.push("/target".to_string());
        volume_mounts.push(VolumeMount {
            name: "target".into(),
            mount_path: "/target".into(),
            ..Default::default()
        });
        args.extend([
            "--dir-mode".into(),
            ownership.dir_mode.clone(),
            "--file-mode".into(),
            ownership.file_mode.clone(),
        ]);
        if ownership.uid != 0 || ownership.gid != 0 {
            args.extend([
                "--uid".into(),
                ownership.uid.to_string(),
                "--gid".into(),
                ownership.gid.to_string(),
            ]);
        }
        None
    };
    args.extend(["--progress".to_string(), "json".to_string()]);
    if spec.verify == Some(true) {
        args.push("--verify".to_string());
    }
    // Giving files to another owner is the one capability a fill may need.
    let add = (!block && (ownership.uid != 0 || ownership.gid != 0)).then(|| vec!["CHOWN".into()]);

    let mut labels = generic.labels.clone();
    labels.extend(owner_labels(pvc));
    let mut annotations = owner_annotations(pvc, cr);
    annotations.insert(ANN_FILL_PATH.to_string(), fill.path.as_str().to_string());

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
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            active_deadline_seconds: Some(
                generic
                    .active_deadline_seconds
                    .unwrap_or(settings.fill_deadline.as_secs() as i64),
            ),
            service_account_name: Some(settings.service_account.clone()),
            automount_service_account_token: Some(false),
            node_name: fill.selected_node.map(str::to_string),
            node_selector: (fill.selected_node.is_none() && !generic.node_selector.is_empty())
                .then(|| generic.node_selector.clone()),
            tolerations: (!generic.tolerations.is_empty()).then(|| generic.tolerations.clone()),
            priority_class_name: generic.priority_class_name.clone(),
            security_context: Some(PodSecurityContext {
                run_as_user: Some(0),
                run_as_group: Some(0),
                run_as_non_root: Some(false),
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
                env: Some(env),
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
                        add,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            volumes: Some(volumes),
            ..Default::default()
        }),
        status: None,
    }
}

fn env_value(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn env_secret(name: &str, secret: &str, key: &str, optional: bool) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: optional.then_some(true),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pod's service-account token for STS, refreshed by kubelet (the account's token is
/// not mounted otherwise).
fn rrsa_token_volume() -> Volume {
    Volume {
        name: "rrsa-token".into(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o444),
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(RRSA_AUDIENCE.into()),
                    expiration_seconds: Some(3600),
                    path: "token".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The node path's source: the bucket through the fillfs CSI driver, read-only.
fn csi_source_volume(
    cr: &OSSVolumePopulator,
    settings: &Settings,
    mount_path: &str,
    secret: Option<&str>,
) -> Volume {
    let spec = &cr.spec;
    let mut attributes = BTreeMap::from([
        ("bucket".to_string(), spec.bucket.clone()),
        ("path".to_string(), mount_path.to_string()),
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
    if let Some(r) = spec.generic.as_ref().and_then(|g| g.rrsa_configs.as_ref()) {
        attributes.insert("roleArn".into(), r.role_arn.clone());
        attributes.insert("oidcProviderArn".into(), r.oidc_provider_arn.clone());
    }
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
