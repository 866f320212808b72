//! The populator's status: the `Valid` condition and the fill counts (`inFlight`,
//! `succeeded`, `failed`). Fills in flight are always *recounted* from the fill pods in the
//! controller's pod store, never incremented, so a claim deleted mid-fill or a restarted
//! controller cannot leave them off.
//!
//! Status writes of one populator are serialized in this process ([`Memo`]): fills of
//! hundreds of claims end at once, and with every writer racing on one resourceVersion a
//! count needed as many retries as there were writers (a burst of 200 finishes kept 30).
//!
//! Owns those writes; it must not decide what a fill did.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff;

use super::claim::rfc3339_secs;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::crd::OSSVolumePopulator;
use super::objects::{ANN_POPULATOR, populator_key};
use super::reconcile::Context;

/// In-process help, never the truth (a restarted controller starts without it and only
/// makes a few more requests): a lock per populator for its status writes with what was
/// last written through it, and when each fill pod's log was last read.
#[derive(Default)]
pub struct Memo {
    populators: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Written>>>>,
    log_reads: Mutex<HashMap<String, Instant>>,
}

/// What this process last wrote to one populator's status (keyed by the populator's uid:
/// a populator deleted and created again under its name starts afresh).
#[derive(Default)]
struct Written {
    /// Trusted over the store for [`TRUST_WRITTEN`] only: the store catches up within it,
    /// and after it an outside change (a manual edit, another controller) is corrected.
    in_flight: Option<(u32, Instant)>,
    valid: Option<(Option<i64>, String, String)>,
}

/// How long what this process wrote is preferred to what the store shows.
const TRUST_WRITTEN: Duration = Duration::from_secs(30);

impl Memo {
    fn populator(&self, cr: &OSSVolumePopulator) -> Arc<tokio::sync::Mutex<Written>> {
        let key = cr.metadata.uid.clone().unwrap_or_else(|| populator_key(cr));
        self.populators
            .lock()
            .expect("memo lock")
            .entry(key)
            .or_default()
            .clone()
    }

    /// Whether a fill pod's log is worth reading now: not if it was read less than `gap`
    /// ago (a progress patch wakes the claim at once, and the log has not moved since).
    /// Tokio's clock, so tests that pause time see it move with theirs.
    pub fn log_read_due(&self, pod_uid: &str, gap: Duration) -> bool {
        let mut reads = self.log_reads.lock().expect("memo lock");
        let now = Instant::now();
        if reads
            .get(pod_uid)
            .is_some_and(|t| now.duration_since(*t) < gap)
        {
            return false;
        }
        if reads.len() > 10_000 {
            reads.retain(|_, t| now.duration_since(*t) < gap);
        }
        reads.insert(pod_uid.to_string(), now);
        true
    }
}

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
    let lock = ctx.memo.populator(cr);
    let mut written = lock.lock().await;
    let shown = written
        .in_flight
        .filter(|(_, at)| at.elapsed() < TRUST_WRITTEN)
        .map(|(n, _)| n)
        .or(cr.status.as_ref().map(|s| s.in_flight));
    if shown == Some(n) {
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
        Err(e) => Err(e),
        Ok(_) => {
            written.in_flight = Some((n, Instant::now()));
            Ok(())
        }
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
    let lock = ctx.memo.populator(cr);
    let mut written = lock.lock().await;
    let crs: Api<OSSVolumePopulator> =
        Api::namespaced(ctx.client.clone(), &cr.namespace().unwrap_or_default());
    let mut cr = cr.clone();
    // Serialized: only writers from elsewhere (or a store behind our own last write) can
    // conflict, each costing one re-read.
    for _ in 0..10 {
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
            Err(e) => return Err(e),
            Ok(_) => {
                written.in_flight = Some((in_flight, Instant::now()));
                return Ok(());
            }
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
    let lock = ctx.memo.populator(cr);
    let mut written = lock.lock().await;
    let this = (generation, status.to_string(), message.clone());
    if written.valid.as_ref() == Some(&this) {
        // Written already; the store has not caught up.
        return Ok(());
    }
    let crs: Api<OSSVolumePopulator> =
        Api::namespaced(ctx.client.clone(), &cr.namespace().unwrap_or_default());
    // The transition time moves only when the status does.
    let since = rfc3339_secs(match current {
        Some(c) if c.status == status => c.last_transition_time.0,
        _ => jiff::Timestamp::now(),
    });
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
    written.valid = Some(this);
    Ok(())
}
