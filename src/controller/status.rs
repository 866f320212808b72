//! The populator's status: the `Valid` condition and the fill counts (`inFlight`,
//! `succeeded`, `failed`). Fills in flight are always *recounted* from the fill pods in the
//! controller's pod store, never incremented, so a claim deleted mid-fill or a restarted
//! controller cannot leave them off.
//!
//! Owns those writes; it must not decide what a fill did.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::chrono;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::crd::OSSVolumePopulator;
use super::objects::{ANN_POPULATOR, populator_key};
use super::reconcile::Context;

fn running(p: &Pod) -> bool {
    !matches!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) && p.metadata.deletion_timestamp.is_none()
}

/// Fill pods that exist and have not finished, all populators.
pub fn in_flight_total(pods: &Store<Pod>) -> usize {
    pods.state().iter().filter(|p| running(p)).count()
}

/// Fill pods of one populator that exist and have not finished, leaving out `except`
/// (a pod being deleted) and adding `plus` (a pod just created, not yet in the store).
pub fn in_flight_of(pods: &Store<Pod>, key: &str, except: Option<&str>, plus: usize) -> u32 {
    let n = pods
        .state()
        .iter()
        .filter(|p| p.annotations().get(ANN_POPULATOR).map(String::as_str) == Some(key))
        .filter(|p| running(p))
        .filter(|p| except.is_none_or(|e| p.metadata.name.as_deref() != Some(e)))
        .count();
    (n + plus) as u32
}

/// Writes `inFlight` when it differs from what the populator shows (a count, so the last
/// writer is right: no resourceVersion).
pub async fn set_in_flight(
    ctx: &Context,
    cr: &OSSVolumePopulator,
    n: u32,
) -> Result<(), kube::Error> {
    if cr.status.as_ref().map(|s| s.in_flight) == Some(n) {
        return Ok(());
    }
    let crs: Api<OSSVolumePopulator> =
        Api::namespaced(ctx.client.clone(), &cr.namespace().unwrap_or_default());
    match crs
        .patch_status(
            &cr.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"inFlight": n}})),
        )
        .await
    {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Counts a finished fill (`ok`: succeeded, else failed) with `in_flight` recounted.
/// Fills of many claims end at once, so the count is written with the resourceVersion it
/// was read at, and read again on a conflict.
pub async fn count_finished(
    ctx: &Context,
    cr: &OSSVolumePopulator,
    ok: bool,
    in_flight: u32,
) -> Result<(), kube::Error> {
    let key = populator_key(cr);
    let crs: Api<OSSVolumePopulator> =
        Api::namespaced(ctx.client.clone(), &cr.namespace().unwrap_or_default());
    let mut cr = cr.clone();
    for _ in 0..5 {
        let status = cr.status.clone().unwrap_or_default();
        let counts = if ok {
            json!({"succeeded": status.succeeded + 1, "inFlight": in_flight})
        } else {
            json!({"failed": status.failed + 1, "inFlight": in_flight})
        };
        let patch = json!({
            "metadata": {"resourceVersion": cr.resource_version()},
            "status": counts,
        });
        match crs
            .patch_status(
                &cr.name_any(),
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await
        {
            Err(kube::Error::Api(e)) if e.code == 409 => cr = crs.get(&cr.name_any()).await?,
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            other => return other.map(|_| ()),
        }
    }
    tracing::warn!(populator = %key, "status count lost to conflicting updates");
    Ok(())
}

/// Sets the populator's `Valid` condition (false with the reason, or true), when it is not
/// already so.
pub async fn set_valid(
    ctx: &Context,
    cr: &OSSVolumePopulator,
    problem: Option<&str>,
) -> Result<(), kube::Error> {
    let (status, reason, message) = match problem {
        Some(m) => ("False", "InvalidSpec", m.to_string()),
        None => ("True", "Valid", String::new()),
    };
    let current = cr
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Valid"));
    let generation = cr.meta().generation;
    if current.is_some_and(|c| {
        c.status == status && c.message == message && c.observed_generation == generation
    }) {
        return Ok(());
    }
    let crs: Api<OSSVolumePopulator> =
        Api::namespaced(ctx.client.clone(), &cr.namespace().unwrap_or_default());
    // The transition time moves only when the status does.
    let since = match current {
        Some(c) if c.status == status => c.last_transition_time.0,
        _ => chrono::Utc::now(),
    }
    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    crs.patch_status(
        &cr.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": [{
            "type": "Valid",
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": since,
            "observedGeneration": generation,
        }]}})),
    )
    .await?;
    Ok(())
}
