//! The populator's access-key Secret: checked before anything of a fill is created, and
//! copied next to the fill pod (a pod can only reference Secrets of its own namespace).
//! Only `akId`, `akSecret` and `securityToken` are copied; events name missing keys,
//! never values.
//!
//! Owns reading and copying that Secret; it must not decide when a fill starts.

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use kube::ResourceExt;
use kube::api::{Api, PostParams};

use super::crd::OSSVolumePopulator;
use super::events::Kind;
use super::objects::{self, populator_key};
use super::reconcile::Context;

/// The populator's credentials Secret, if it exists and holds an access key. Otherwise an
/// event says what is missing (key names only, never values) and `None`.
pub async fn credentials(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    cr: &OSSVolumePopulator,
    name: &str,
) -> Result<Option<Secret>, kube::Error> {
    let cr_ns = cr.namespace().unwrap_or_default();
    let theirs: Api<Secret> = Api::namespaced(ctx.client.clone(), &cr_ns);
    let Some(src) = theirs.get_opt(name).await? else {
        ctx.event(
            pvc,
            Kind::Warning,
            "SecretNotFound",
            format!(
                "credentials Secret {cr_ns}/{name} (spec.credentialsSecretRef of {}) does not exist; looking again in 30s",
                populator_key(cr)
            ),
        )
        .await;
        return Ok(None);
    };
    let has = |k: &str| {
        src.data
            .as_ref()
            .is_some_and(|d| d.get(k).is_some_and(|v| !v.0.is_empty()))
    };
    let missing: Vec<&str> = ["akId", "akSecret"]
        .into_iter()
        .filter(|k| !has(k))
        .collect();
    if !missing.is_empty() {
        ctx.event(
            pvc,
            Kind::Warning,
            "SecretInvalid",
            format!(
                "credentials Secret {cr_ns}/{name} has no {} (it needs akId and akSecret); looking again in 30s",
                missing.join(" and ")
            ),
        )
        .await;
        return Ok(None);
    }
    Ok(Some(src))
}

/// Copies the populator's credentials Secret next to the fill pod; returns the copy's name.
pub async fn copy_secret(
    ctx: &Context,
    src: &Secret,
    pvc: &PersistentVolumeClaim,
    cr: &OSSVolumePopulator,
) -> Result<String, kube::Error> {
    let copy = objects::copied_secret(src, pvc, cr, &ctx.settings);
    match ctx
        .ours::<Secret>()
        .create(&PostParams::default(), &copy)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e),
    }
    Ok(copy.metadata.name.unwrap_or_default())
}
