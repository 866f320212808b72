//! The `OSSVolumePopulator` custom resource (`storage.alibabacloud.com/v1beta1`), in the
//! shape of ACK's: `bucket`, `region`, `endpoint`, `path`, `mode: generic`,
//! `generic.labels`, `generic.rrsaConfigs`, `throughput` (MB/s). fillfs adds what users of
//! it need: `credentialsSecretRef` (AK/SK) as an alternative to RRSA, placement of the fill
//! pod under `generic`, and `verify`. The CRD's OpenAPI schema is generated from these
//! types (`fillfs crd`), with the doc comments as field descriptions.
//!
//! Owns the types and [`OSSVolumePopulatorSpec::validate`]; it must not talk to the API.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Fill PersistentVolumeClaims from an OSS bucket prefix: a PVC whose `dataSourceRef`
/// names this object is created already holding the prefix's files.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "storage.alibabacloud.com",
    version = "v1beta1",
    kind = "OSSVolumePopulator",
    namespaced,
    shortname = "ossvp",
    doc = "An OSS bucket prefix that PersistentVolumeClaims can be filled from: a PVC whose dataSourceRef names this object is created holding the prefix's files.",
    status = "OSSVolumePopulatorStatus",
    printcolumn = r#"{"name":"Bucket","type":"string","jsonPath":".spec.bucket"}"#,
    printcolumn = r#"{"name":"Path","type":"string","jsonPath":".spec.path"}"#,
    printcolumn = r#"{"name":"In flight","type":"integer","jsonPath":".status.inFlight"}"#,
    printcolumn = r#"{"name":"Succeeded","type":"integer","jsonPath":".status.succeeded"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.failed"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct OSSVolumePopulatorSpec {
    /// The OSS bucket to copy from.
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// Region of the bucket, e.g. cn-hangzhou. The endpoint is derived from it when
    /// `endpoint` is not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// OSS endpoint, e.g. oss-cn-hangzhou-internal.aliyuncs.com (https is assumed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The prefix to copy, e.g. /many-files/ ("/" is the whole bucket). For a PVC with
    /// volumeMode Block: the key of one disk image, written raw onto the device.
    #[serde(default = "default_path")]
    #[schemars(length(min = 1, max = 1024))]
    pub path: String,
    /// How the fill runs. Only `generic` (a fill pod per PVC) exists.
    #[serde(default)]
    pub mode: PopulatorMode,
    /// Settings of the generic mode: the fill pod's labels, RRSA, placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generic: Option<GenericSpec>,
    /// Cap on each fill's read rate from OSS, in MB/s (10^6 bytes per second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub throughput: Option<u32>,
    /// A Secret in this namespace with keys akId and akSecret: an alternative to
    /// generic.rrsaConfigs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
    /// Re-read every written file and compare it with the bucket's (slower; the size and
    /// checksums the store provides are always checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<bool>,
    /// Owner and modes of what the fill writes (Filesystem volumes). Default: owned by
    /// root, directories 0777 (like an emptyDir: any consumer can create files, whatever
    /// its uid or fsGroup), files 0644.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ownership: Option<Ownership>,
}

/// Owner and modes of the filled tree, the volume's root directory included.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ownership {
    /// Owner uid of files and directories (default 0).
    #[serde(default)]
    #[schemars(range(min = 0, max = 2147483647))]
    pub uid: u32,
    /// Owner gid of files and directories (default 0).
    #[serde(default)]
    #[schemars(range(min = 0, max = 2147483647))]
    pub gid: u32,
    /// Mode of directories, the root included, in octal (default "0777").
    #[serde(default = "default_dir_mode")]
    pub dir_mode: String,
    /// Mode of files, in octal (default "0644"; "0666" lets any consumer change them).
    #[serde(default = "default_file_mode")]
    pub file_mode: String,
}

fn default_dir_mode() -> String {
    "0777".into()
}

fn default_file_mode() -> String {
    "0644".into()
}

impl Default for Ownership {
    fn default() -> Self {
        Ownership {
            uid: 0,
            gid: 0,
            dir_mode: default_dir_mode(),
            file_mode: default_file_mode(),
        }
    }
}

/// An octal mode of at most 0777 plus the setgid and sticky bits ("0775", "2775", "1777").
pub fn parse_mode(s: &str) -> Option<u32> {
    let m = u32::from_str_radix(s.trim(), 8).ok()?;
    (m & !0o3777 == 0).then_some(m)
}

fn default_path() -> String {
    "/".to_string()
}

/// How fills run.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PopulatorMode {
    /// One fill pod per PVC, on the PVC's node, mounting the bucket through the fillfs CSI
    /// driver.
    #[default]
    Generic,
}

/// The fill pod.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GenericSpec {
    /// Labels put on the fill pod (e.g. to run it on serverless or spot capacity).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// RRSA: the fill pod's service-account token is exchanged for the role's credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rrsa_configs: Option<RrsaConfigs>,
    /// Node selector of the fill pod (ignored when the PVC waits for its first consumer:
    /// the fill then runs on the consumer's node).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the fill pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Resources of the fill container (default: requests 100m CPU, 128Mi memory; limit 768Mi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Priority class of the fill pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// A fill still running after this many seconds is stopped and counts as a failed
    /// attempt (the pod's activeDeadlineSeconds). Default: the controller's --fill-deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60))]
    pub active_deadline_seconds: Option<i64>,
}

/// RRSA (RAM Roles for Service Accounts).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RrsaConfigs {
    /// The RAM role to assume, e.g. acs:ram::123456789012:role/oss-populator.
    #[schemars(length(min = 1))]
    pub role_arn: String,
    /// The cluster's OIDC provider, e.g. acs:ram::123456789012:oidc-provider/my-provider.
    #[schemars(length(min = 1))]
    pub oidc_provider_arn: String,
}

/// A Secret in the populator's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// What the controller reports.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OSSVolumePopulatorStatus {
    /// `Valid`: whether the spec can be used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Fills running now.
    #[serde(default)]
    pub in_flight: u32,
    /// Fills that completed.
    #[serde(default)]
    pub succeeded: u64,
    /// Fills that failed for good.
    #[serde(default)]
    pub failed: u64,
}

impl OSSVolumePopulatorSpec {
    /// Checks what the schema cannot; the error is one sentence for events and status.
    pub fn validate(&self) -> Result<(), String> {
        let b = &self.bucket;
        if b.len() < 3
            || b.len() > 63
            || !b
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            || b.starts_with('-')
            || b.ends_with('-')
        {
            return Err(format!(
                "spec.bucket {b:?} is not an OSS bucket name (3-63 of a-z, 0-9, -)"
            ));
        }
        if self.endpoint.is_none() && self.region.is_none() {
            return Err("spec needs endpoint or region (e.g. region: cn-hangzhou)".into());
        }
        if self.path.split('/').any(|c| c == "..") || self.path.contains('\0') {
            return Err(format!("spec.path {:?} must not contain '..'", self.path));
        }
        if let Some(o) = &self.ownership {
            for (field, v) in [("dirMode", &o.dir_mode), ("fileMode", &o.file_mode)] {
                if parse_mode(v).is_none() {
                    return Err(format!(
                        "spec.ownership.{field} {v:?} is not an octal mode like \"0775\" (at most 3777)"
                    ));
                }
            }
        }
        if self
            .generic
            .as_ref()
            .and_then(|g| g.active_deadline_seconds)
            .is_some_and(|s| s < 60)
        {
            return Err("spec.generic.activeDeadlineSeconds must be at least 60".into());
        }
        if self.throughput == Some(0) {
            return Err("spec.throughput must be at least 1 MB/s (omit it for no cap)".into());
        }
        let g = self.generic.clone().unwrap_or_default();
        if let Some(r) = &g.rrsa_configs {
            if !r.role_arn.starts_with("acs:ram::") {
                return Err(format!(
                    "spec.generic.rrsaConfigs.roleArn {:?} is not a RAM role ARN (acs:ram::ACCOUNT:role/NAME)",
                    r.role_arn
                ));
            }
            if !r.oidc_provider_arn.starts_with("acs:ram::") {
                return Err(format!(
                    "spec.generic.rrsaConfigs.oidcProviderArn {:?} is not an OIDC provider ARN (acs:ram::ACCOUNT:oidc-provider/NAME)",
                    r.oidc_provider_arn
                ));
            }
            if self.credentials_secret_ref.is_some() {
                return Err(
                    "set either spec.generic.rrsaConfigs or spec.credentialsSecretRef, not both"
                        .into(),
                );
            }
        }
        for (k, v) in &g.labels {
            if k.starts_with("fillfs.io/") || k == "app.kubernetes.io/managed-by" {
                return Err(format!(
                    "spec.generic.labels {k:?} is set by the controller itself"
                ));
            }
            label_problem(k, v).map_or(Ok(()), |p| {
                Err(format!("spec.generic.labels {k:?}: {v:?}: {p}"))
            })?;
        }
        for (k, v) in &g.node_selector {
            label_problem(k, v).map_or(Ok(()), |p| {
                Err(format!("spec.generic.nodeSelector {k:?}: {v:?}: {p}"))
            })?;
        }
        for t in &g.tolerations {
            let key = t.key.as_deref().unwrap_or_default();
            let value = t.value.as_deref().unwrap_or_default();
            let problem = if key.is_empty() {
                label_value_problem(value)
            } else {
                label_problem(key, value)
            };
            problem.map_or(Ok(()), |p| {
                Err(format!("spec.generic.tolerations {key:?}: {value:?}: {p}"))
            })?;
        }
        Ok(())
    }

    /// The rate cap in MiB/s (the fill and the CSI volume count in MiB).
    pub fn throughput_mib(&self) -> Option<f64> {
        self.throughput
            .map(|mb| (mb as f64 * 1_000_000.0 / 1_048_576.0 * 1000.0).round() / 1000.0)
    }
}

/// Why `key: value` is not a Kubernetes label (the API server's rules), if it is not.
pub fn label_problem(key: &str, value: &str) -> Option<String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && !is_dns_subdomain(p)
    {
        return Some(format!(
            "the key's prefix {p:?} is not a DNS subdomain (lowercase, at most 253 characters)"
        ));
    }
    if name.is_empty() || name.len() > 63 || !is_label_word(name) {
        return Some(format!(
            "the key's name {name:?} must be 1-63 characters of a-z, A-Z, 0-9, '-', '_', '.', beginning and ending alphanumeric"
        ));
    }
    label_value_problem(value)
}

/// Why `value` is not a label value, if it is not.
pub fn label_value_problem(value: &str) -> Option<String> {
    if value.len() > 63 || !(value.is_empty() || is_label_word(value)) {
        return Some(format!(
            "a label value is at most 63 characters (this one has {}) of a-z, A-Z, 0-9, '-', '_', '.', beginning and ending alphanumeric",
            value.len()
        ));
    }
    None
}

fn is_label_word(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}
