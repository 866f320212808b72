//! Small steps on the user's claim and on the objects of its fill: reading and writing our
//! annotations, the finalizer, deleting what a fill made. Each is one API request (or
//! none); the state machine in [`super::reconcile`] decides when to take them.
//!
//! Owns how those requests are shaped (merge patch with a resourceVersion for the
//! finalizer, a JSON patch that `test`s its position when dropping it, deletes that treat
//! 404 as done); it must not decide anything.

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::jiff;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::crd::OSSVolumePopulator;
use super::objects::*;

/// The populator a PVC's `dataSourceRef` names, if it names one of ours.
pub fn populator_ref(pvc: &PersistentVolumeClaim) -> Option<(String, String)> {
    let r = pvc.spec.as_ref()?.data_source_ref.as_ref()?;
    if r.api_group.as_deref() != Some(API_GROUP) || r.kind != KIND {
        return None;
    }
    let ns = r
        .namespace
        .clone()
        .or_else(|| pvc.metadata.namespace.clone())?;
    Some((ns, r.name.clone()))
}

pub fn annotation<'a>(pvc: &'a PersistentVolumeClaim, key: &str) -> Option<&'a str> {
    pvc.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// Merges `pairs` into the claim's annotations (`null` removes one).
pub async fn annotate(
    client: &Client,
    pvc: &PersistentVolumeClaim,
    pairs: serde_json::Value,
) -> Result<(), kube::Error> {
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(client.clone(), &pvc.namespace().unwrap_or_default());
    api.patch(
        &pvc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": pairs}})),
    )
    .await?;
    Ok(())
}

/// Deletes, treating "already gone" as done.
pub async fn delete_quietly<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

pub async fn add_finalizer(
    client: &Client,
    pvc: &PersistentVolumeClaim,
) -> Result<(), kube::Error> {
    let mut finalizers = pvc.finalizers().to_vec();
    finalizers.push(FINALIZER.to_string());
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(client.clone(), &pvc.namespace().unwrap_or_default());
    api.patch(
        &pvc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {
            "finalizers": finalizers,
            "resourceVersion": pvc.resource_version(),
        }})),
    )
    .await?;
    Ok(())
}

/// Removes our finalizer, setting `annotations` in the same request: a JSON patch that
/// tests the finalizer is where this copy of the PVC has it, so it needs no
/// resourceVersion (which the annotations, or kubelet, may have moved on since).
pub async fn drop_finalizer(
    client: &Client,
    pvc: &PersistentVolumeClaim,
    annotations: Option<&[(&str, &str)]>,
) -> Result<(), kube::Error> {
    let Some(i) = pvc.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let mut ops = vec![
        json!({"op": "test", "path": format!("/metadata/finalizers/{i}"), "value": FINALIZER}),
        json!({"op": "remove", "path": format!("/metadata/finalizers/{i}")}),
    ];
    let annotations = annotations.unwrap_or_default();
    if !annotations.is_empty() && pvc.metadata.annotations.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {}}));
    }
    for (k, v) in annotations {
        let key = k.replace('~', "~0").replace('/', "~1");
        ops.push(json!({"op": "add", "path": format!("/metadata/annotations/{key}"), "value": v}));
    }
    let patch = serde_json::from_value(serde_json::Value::Array(ops))
        .expect("a JSON patch made of add, remove and test operations");
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(client.clone(), &pvc.namespace().unwrap_or_default());
    match api
        .patch(
            &pvc.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes the pod, PVC' and (when the populator uses one) the secret copy of one fill.
pub async fn cleanup(
    client: &Client,
    ns: &str,
    uid: &str,
    secret: bool,
) -> Result<(), kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    delete_quietly(&pods, &pod_name(uid)).await?;
    let primes: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    delete_quietly(&primes, &prime_name(uid)).await?;
    if secret {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        delete_quietly(&secrets, &secret_name(uid)).await?;
    }
    Ok(())
}

/// RFC 3339 in whole seconds, UTC (`2026-12-01T15:04:05Z`): how times are written on
/// claims and conditions.
pub fn rfc3339_secs(t: jiff::Timestamp) -> String {
    // Truncated, as the API server writes them.
    jiff::Timestamp::from_second(t.as_second())
        .unwrap_or(t)
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// How long the backoff of the last transient failure still runs, if it does.
pub fn retry_wait(pvc: &PersistentVolumeClaim) -> Option<Duration> {
    let at = annotation(pvc, ANN_RETRY_AFTER)?;
    let Ok(at) = at.parse::<jiff::Timestamp>() else {
        tracing::debug!(pvc = %pvc.name_any(), value = at, "unreadable {ANN_RETRY_AFTER}; ignored");
        return None;
    };
    Duration::try_from(at.duration_since(jiff::Timestamp::now()))
        .ok()
        .filter(|d| !d.is_zero())
        // Whole seconds, rounded up: not woken a moment early.
        .map(|d| Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0)))
}

/// What the user's PVC must look like for a fill from this populator.
pub fn check_pvc(pvc: &PersistentVolumeClaim, cr: &OSSVolumePopulator) -> Result<(), String> {
    let spec = pvc.spec.as_ref().ok_or("the PVC has no spec")?;
    let size = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"));
    if size.is_none() {
        return Err("the PVC requests no storage size (spec.resources.requests.storage)".into());
    }
    if spec.storage_class_name.as_deref() == Some("") {
        return Err(
            "storageClassName \"\" asks for an existing, unclassed PersistentVolume, but a populated claim needs a new volume: name a StorageClass (or omit the field for the default class)"
                .into(),
        );
    }
    match spec.volume_mode.as_deref() {
        None | Some("Filesystem") => Ok(()),
        Some("Block") => {
            let path = &cr.spec.path;
            if path.ends_with('/') || path.trim_matches('/').is_empty() {
                Err(format!(
                    "volumeMode Block takes one disk image written raw, but OSSVolumePopulator {} has the prefix spec.path {path:?}; name an object (e.g. /images/disk.img) or use volumeMode Filesystem",
                    populator_key(cr)
                ))
            } else {
                Ok(())
            }
        }
        Some(other) => Err(format!("volumeMode {other:?} is not supported")),
    }
}
