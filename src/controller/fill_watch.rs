//! A fill that has not finished: why its pod does not start (events on the claim, from
//! the pod's status and, after a minute in Pending, the pod's and PVC''s own warnings), and
//! its progress (the last [`ProgressLine`] of the pod's log, as the claim's
//! `fillfs.io/progress` annotation).
//!
//! Owns those reads; it must not create, delete or decide anything.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event as CoreEvent, PersistentVolumeClaim, Pod};
use k8s_openapi::jiff;
use kube::ResourceExt;
use kube::api::{ListParams, LogParams};
use serde_json::json;

use super::claim::{annotate, annotation};
use super::events::Kind;
use super::objects::{ANN_PROGRESS, CONTAINER};
use super::pod_state;
use super::reconcile::Context;
use crate::populate::ProgressLine;

/// A fill pod pending this long has its own and its PVC''s warning events forwarded to
/// the user's claim (kubelet's FailedMount, the provisioner's ProvisioningFailed, ...).
pub const FORWARD_EVENTS_AFTER: Duration = Duration::from_secs(60);

/// The last progress line the fill printed.
pub async fn last_progress(ctx: &Context, name: &str) -> Option<ProgressLine> {
    let params = LogParams {
        container: Some(CONTAINER.into()),
        tail_lines: Some(5),
        ..Default::default()
    };
    let log = ctx.ours::<Pod>().logs(name, &params).await.ok()?;
    ProgressLine::last_in(&log)
}

fn age(pod: &Pod) -> Duration {
    pod.metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| Duration::try_from(jiff::Timestamp::now().duration_since(t.0)).ok())
        .unwrap_or_default()
}

/// A fill that has not finished: why it does not start, if it does not; its progress on
/// the claim when it runs.
pub async fn watch_fill(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    pod: &Pod,
    prime: &PersistentVolumeClaim,
) {
    if let Some((reason, note)) = pod_state::not_starting(pod) {
        ctx.event(pvc, Kind::Warning, reason, note).await;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if phase != Some("Running") {
        if age(pod) >= FORWARD_EVENTS_AFTER {
            forward_warnings(ctx, pvc, pod, prime).await;
        }
        return;
    }
    if !ctx
        .memo
        .log_read_due(&pod.uid().unwrap_or_default(), ctx.poll / 2)
    {
        return;
    }
    let Some(line) = last_progress(ctx, &pod.name_any()).await else {
        return;
    };
    let shown = format!("{:.1}%", line.percent);
    let current = annotation(pvc, ANN_PROGRESS);
    // "0.0%" says no more than no annotation.
    if current.is_none() && line.percent == 0.0 {
        return;
    }
    if current != Some(shown.as_str())
        && let Err(e) = annotate(&ctx.client, pvc, json!({ ANN_PROGRESS: shown })).await
    {
        tracing::debug!(error = %e, "could not annotate progress");
    }
}

/// The warning events of a pending fill pod and of PVC' (FailedMount, FailedScheduling,
/// ProvisioningFailed, ...), repeated on the user's claim: nobody looks in our namespace.
async fn forward_warnings(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    pod: &Pod,
    prime: &PersistentVolumeClaim,
) {
    let events = ctx.ours::<CoreEvent>();
    for (what, uid) in [
        (format!("fill pod {}", pod.name_any()), pod.uid()),
        (format!("temporary claim {}", prime.name_any()), prime.uid()),
    ] {
        let Some(uid) = uid else { continue };
        let params =
            ListParams::default().fields(&format!("involvedObject.uid={uid},type=Warning"));
        let list = match events.list(&params).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "could not list events of {what}");
                continue;
            }
        };
        for e in list.items {
            let reason = e.reason.unwrap_or_else(|| "Warning".into());
            let note = format!(
                "{what} in {}: {}",
                ctx.settings.namespace,
                e.message.unwrap_or_default()
            );
            ctx.event(pvc, Kind::Warning, &reason, note).await;
        }
    }
}
