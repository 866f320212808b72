//! One reconcile of one user PVC: the volume-populator state machine, as
//! lib-volume-populator runs it, driven only by what the API says now (no state in memory,
//! so a restarted controller carries on).
//!
//! ```text
//! not ours / already bound ─────────────────────────────────────────► nothing
//! being deleted ──► delete pod, PVC', secret ──► drop finalizer
//! populator missing ──► event, retry in 30 s (and when it appears)
//! spec invalid ──► event + Valid=False on the populator, no pod, wait for a change
//! WaitForFirstConsumer without selected node ──► wait
//! finalizer ──► PVC' ──► (secret copy) ──► fill pod ──► progress annotation while it runs
//! pod failed ──► event; retry with backoff, or permanent failure (exit 2, or attempts used)
//! pod succeeded ──► PV.claimRef := user PVC ──► PVC' Lost ──► clean up, drop finalizer
//! ```
//!
//! Owns the order of API calls (tests pin it request by request); the objects themselves
//! come from [`super::objects`].

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    ObjectReference, PersistentVolume, PersistentVolumeClaim, Pod, Secret,
};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::crd::OSSVolumePopulator;
use super::metrics::Metrics;
use super::objects::{self, *};

/// Errors of one reconcile; the controller retries them with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Invalid(String),
}

/// What a reconcile needs.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Fill attempts before a failure is final.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt.
    pub retry_base: Duration,
    /// How often a running fill's progress is read.
    pub poll: Duration,
}

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

fn reference(pvc: &PersistentVolumeClaim) -> ObjectReference {
    pvc.object_ref(&())
}

async fn event(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Populate".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &reference(pvc)).await {
        tracing::warn!(pvc = %pvc.name_any(), error = %e, "could not publish event");
    }
}

fn annotation<'a>(pvc: &'a PersistentVolumeClaim, key: &str) -> Option<&'a str> {
    pvc.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

async fn annotate(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    pairs: serde_json::Value,
) -> Result<(), kube::Error> {
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &pvc.namespace().unwrap_or_default());
    api.patch(
        &pvc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": pairs}})),
    )
    .await?;
    Ok(())
}

/// Deletes, treating "already gone" as done.
async fn delete_quietly<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

async fn get_opt<K>(api: &Api<K>, name: &str) -> Result<Option<K>, kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name).await
}

/// Reconciles one user PVC.
pub async fn reconcile(
    pvc: Arc<PersistentVolumeClaim>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let Some((cr_ns, cr_name)) = populator_ref(&pvc) else {
        return Ok(Action::await_change());
    };
    let ns = pvc.namespace().unwrap_or_default();
    if ns == ctx.settings.namespace {
        return Ok(Action::await_change());
    }
    let uid = pvc.uid().unwrap_or_default();
    let ours = pvc.finalizers().iter().any(|f| f == FINALIZER);
    if pvc.meta().deletion_timestamp.is_some() {
        if ours {
            cleanup(&ctx, &uid).await?;
            remove_finalizer(&ctx, &pvc).await?;
            tracing::info!(pvc = %format!("{ns}/{}", pvc.name_any()), "PVC deleted; fill cleaned up");
        }
        return Ok(Action::await_change());
    }
    let bound = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .is_some_and(|v| !v.is_empty());
    if bound && !ours {
        return Ok(Action::await_change());
    }

    let crs: Api<OSSVolumePopulator> = Api::namespaced(ctx.client.clone(), &cr_ns);
    let Some(cr) = get_opt(&crs, &cr_name).await? else {
        event(
            &ctx,
            &pvc,
            EventType::Warning,
            "PopulatorNotFound",
            format!("waiting for OSSVolumePopulator {cr_ns}/{cr_name} to exist"),
        )
        .await;
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    if let Err(reason) = cr.spec.validate().and_then(|()| check_pvc(&pvc)) {
        event(
            &ctx,
            &pvc,
            EventType::Warning,
            "InvalidSpec",
            reason.clone(),
        )
        .await;
        set_valid(&ctx, &cr, Some(&reason)).await?;
        return Ok(Action::await_change());
    }

    let selected_node = annotation(&pvc, ANN_SELECTED_NODE).map(str::to_string);
    if !bound && selected_node.is_none() && waits_for_consumer(&ctx, &pvc).await? {
        tracing::debug!(pvc = %pvc.name_any(), "waiting for the first consumer");
        return Ok(Action::await_change());
    }

    if !ours {
        add_finalizer(&ctx, &pvc).await?;
    }

    let ours_ns = &ctx.settings.namespace;
    let primes: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ours_ns);
    let prime = match get_opt(&primes, &prime_name(&uid)).await? {
        Some(p) => p,
        None => {
            let p = objects::prime_pvc(&pvc, &cr, &ctx.settings, selected_node.as_deref());
            primes.create(&PostParams::default(), &p).await?
        }
    };

    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ours_ns);
    let Some(pod) = get_opt(&pods, &pod_name(&uid)).await? else {
        let secret = match &cr.spec.credentials_secret_ref {
            Some(r) => Some(copy_secret(&ctx, &pvc, &cr, &cr_ns, &r.name).await?),
            None => None,
        };
        let Some(secret) = secret.map_or(Some(None), |s| s.map(Some)) else {
            return Ok(Action::await_change());
        };
        let pod = objects::fill_pod(
            &pvc,
            &cr,
            &ctx.settings,
            selected_node.as_deref(),
            secret.as_deref(),
        );
        pods.create(&PostParams::default(), &pod).await?;
        ctx.metrics.in_flight.inc();
        event(
            &ctx,
            &pvc,
            EventType::Normal,
            "FillStarted",
            format!(
                "filling from oss://{}{} with pod {ours_ns}/{}",
                cr.spec.bucket,
                cr.spec.path,
                pod_name(&uid)
            ),
        )
        .await;
        return Ok(Action::requeue(ctx.poll));
    };

    match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Succeeded") => rebind(&ctx, &pvc, &cr, &prime, &pod).await,
        Some("Failed") => failed(&ctx, &pvc, &cr, &pod).await,
        _ => {
            report_progress(&ctx, &pvc, &pods, &pod_name(&uid)).await;
            Ok(Action::requeue(ctx.poll))
        }
    }
}

/// What the user's PVC must look like for a fill.
fn check_pvc(pvc: &PersistentVolumeClaim) -> Result<(), String> {
    let spec = pvc.spec.as_ref().ok_or("the PVC has no spec")?;
    let size = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"));
    if size.is_none() {
        return Err("the PVC requests no storage size (spec.resources.requests.storage)".into());
    }
    match spec.volume_mode.as_deref() {
        None | Some("Filesystem") | Some("Block") => Ok(()),
        Some(other) => Err(format!("volumeMode {other:?} is not supported")),
    }
}

async fn waits_for_consumer(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
) -> Result<bool, kube::Error> {
    let Some(class) = pvc.spec.as_ref().and_then(|s| s.storage_class_name.clone()) else {
        return Ok(false);
    };
    let classes: Api<StorageClass> = Api::all(ctx.client.clone());
    Ok(get_opt(&classes, &class)
        .await?
        .and_then(|c| c.volume_binding_mode)
        .as_deref()
        == Some("WaitForFirstConsumer"))
}

async fn add_finalizer(ctx: &Context, pvc: &PersistentVolumeClaim) -> Result<(), kube::Error> {
    let mut finalizers = pvc.finalizers().to_vec();
    finalizers.push(FINALIZER.to_string());
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &pvc.namespace().unwrap_or_default());
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

async fn remove_finalizer(ctx: &Context, pvc: &PersistentVolumeClaim) -> Result<(), kube::Error> {
    let finalizers: Vec<&String> = pvc
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .collect();
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &pvc.namespace().unwrap_or_default());
    match api
        .patch(
            &pvc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {
                "finalizers": finalizers,
                "resourceVersion": pvc.resource_version(),
            }})),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Copies the populator's credentials Secret next to the fill pod. `None` if it is
/// missing (an event says so; no pod is created).
async fn copy_secret(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    cr: &OSSVolumePopulator,
    cr_ns: &str,
    name: &str,
) -> Result<Option<String>, kube::Error> {
    let theirs: Api<Secret> = Api::namespaced(ctx.client.clone(), cr_ns);
    let Some(src) = get_opt(&theirs, name).await? else {
        event(
            ctx,
            pvc,
            EventType::Warning,
            "SecretNotFound",
            format!("credentials Secret {cr_ns}/{name} does not exist"),
        )
        .await;
        return Ok(None);
    };
    let copy = objects::copied_secret(&src, pvc, cr, &ctx.settings);
    let ours: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    match ours.create(&PostParams::default(), &copy).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e),
    }
    Ok(copy.metadata.name)
}

/// The last `--progress json` line the fill printed.
async fn last_progress(pods: &Api<Pod>, name: &str) -> Option<serde_json::Value> {
    let params = LogParams {
        container: Some(CONTAINER.into()),
        tail_lines: Some(5),
        ..Default::default()
    };
    let log = pods.logs(name, &params).await.ok()?;
    log.lines().rev().find_map(|l| {
        serde_json::from_str::<serde_json::Value>(l)
            .ok()
            .filter(|v| v.get("percent").is_some())
    })
}

/// Puts the fill's percentage on the PVC.
async fn report_progress(ctx: &Context, pvc: &PersistentVolumeClaim, pods: &Api<Pod>, name: &str) {
    let Some(percent) = last_progress(pods, name)
        .await
        .and_then(|v| v["percent"].as_f64())
    else {
        return;
    };
    let shown = format!("{percent:.1}%");
    if annotation(pvc, ANN_PROGRESS) != Some(shown.as_str())
        && let Err(e) = annotate(ctx, pvc, json!({ ANN_PROGRESS: shown })).await
    {
        tracing::debug!(error = %e, "could not annotate progress");
    }
}

/// The fill pod failed: retry with backoff, or give up.
async fn failed(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    cr: &OSSVolumePopulator,
    pod: &Pod,
) -> Result<Action, ReconcileError> {
    let uid = pvc.uid().unwrap_or_default();
    let terminated = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.iter().find(|c| c.name == CONTAINER))
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    let exit = terminated.map_or(-1, |t| t.exit_code);
    let message = terminated
        .and_then(|t| t.message.clone())
        .unwrap_or_else(|| "no termination message".into());
    let message = message
        .trim()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let attempts = annotation(pvc, ANN_ATTEMPTS)
        .and_then(|a| a.parse::<u32>().ok())
        .unwrap_or(0)
        + 1;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    delete_quietly(&pods, &pod_name(&uid)).await?;
    ctx.metrics.fill_ended();
    let permanent = exit == EXIT_PERMANENT || attempts >= ctx.max_attempts;
    if permanent {
        let why = if exit == EXIT_PERMANENT {
            "cannot succeed".to_string()
        } else {
            format!("failed {attempts} times")
        };
        event(
            ctx,
            pvc,
            EventType::Warning,
            "FillFailed",
            format!("fill {why}, giving up: {message}"),
        )
        .await;
        annotate(
            ctx,
            pvc,
            json!({ ANN_PROGRESS: format!("failed: {message}"), ANN_ATTEMPTS: attempts.to_string() }),
        )
        .await?;
        ctx.metrics.finished("failed", None, None);
        bump_status(ctx, cr, false).await?;
        return Ok(Action::await_change());
    }
    let delay = ctx.retry_base * 2u32.saturating_pow(attempts - 1);
    event(
        ctx,
        pvc,
        EventType::Warning,
        "FillFailed",
        format!(
            "attempt {attempts} of {} failed (exit {exit}): {message}; retrying in {}",
            ctx.max_attempts,
            humantime::format_duration(delay)
        ),
    )
    .await;
    annotate(ctx, pvc, json!({ ANN_ATTEMPTS: attempts.to_string() })).await?;
    ctx.metrics.retries.inc();
    Ok(Action::requeue(delay))
}

/// The fill succeeded: hand PVC's volume to the user's PVC, then clean up.
async fn rebind(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    cr: &OSSVolumePopulator,
    prime: &PersistentVolumeClaim,
    pod: &Pod,
) -> Result<Action, ReconcileError> {
    let uid = pvc.uid().unwrap_or_default();
    let Some(pv_name) = prime
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|v| !v.is_empty())
    else {
        return Ok(Action::requeue(Duration::from_secs(5)));
    };
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let pv = pvs.get(&pv_name).await?;
    let claim_uid = pv
        .spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .and_then(|c| c.uid.clone());
    if claim_uid.as_deref() != Some(uid.as_str()) {
        let from = format!("{}/{}", cr.namespace().unwrap_or_default(), cr.name_any());
        pvs.patch(
            &pv_name,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"annotations": { ANN_POPULATED_FROM: from }},
                "spec": {"claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": pvc.namespace(),
                    "name": pvc.name_any(),
                    "uid": uid,
                    "resourceVersion": pvc.resource_version(),
                }},
            })),
        )
        .await?;
        tracing::info!(pv = %pv_name, pvc = %pvc.name_any(), "volume handed to the user's claim");
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    let lost = prime.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Lost");
    if !lost {
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    let (bytes, seconds) = fill_summary(ctx, pod).await;
    cleanup(ctx, &uid).await?;
    ctx.metrics.fill_ended();
    ctx.metrics.finished("succeeded", bytes, seconds);
    annotate(ctx, pvc, json!({ ANN_PROGRESS: "100.0%" })).await?;
    remove_finalizer(ctx, pvc).await?;
    event(
        ctx,
        pvc,
        EventType::Normal,
        "Populated",
        format!(
            "filled from oss://{}{}{}",
            cr.spec.bucket,
            cr.spec.path,
            bytes.map_or(String::new(), |b| format!(
                " ({})",
                bytesize::ByteSize(b).display().iec()
            ))
        ),
    )
    .await;
    bump_status(ctx, cr, true).await?;
    Ok(Action::await_change())
}

/// Bytes and seconds of a finished fill, from its last progress line.
async fn fill_summary(ctx: &Context, pod: &Pod) -> (Option<u64>, Option<f64>) {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    match last_progress(&pods, &pod.name_any()).await {
        Some(v) => (v["bytes_done"].as_u64(), v["elapsed_s"].as_f64()),
        None => (None, None),
    }
}

/// Deletes the pod, PVC' and the secret copy of one fill.
async fn cleanup(ctx: &Context, uid: &str) -> Result<(), kube::Error> {
    let ns = &ctx.settings.namespace;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    delete_quietly(&pods, &pod_name(uid)).await?;
    let primes: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    delete_quietly(&primes, &prime_name(uid)).await?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    delete_quietly(&secrets, &secret_name(uid)).await?;
    Ok(())
}

/// Counts a finished fill on the populator's status and recounts fills in flight.
async fn bump_status(ctx: &Context, cr: &OSSVolumePopulator, ok: bool) -> Result<(), kube::Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let in_flight = pods
        .list(&ListParams::default().labels(&format!("{LABEL_POPULATOR}={}", cr.name_any())))
        .await?
        .items
        .iter()
        .filter(|p| {
            p.labels().get(LABEL_PVC_NAMESPACE).map(String::as_str) == cr.namespace().as_deref()
        })
        .count();
    let status = cr.status.clone().unwrap_or_default();
    let patch = if ok {
        json!({"status": {"succeeded": status.succeeded + 1, "inFlight": in_flight}})
    } else {
        json!({"status": {"failed": status.failed + 1, "inFlight": in_flight}})
    };
    let crs: Api<OSSVolumePopulator> =
        Api::namespaced(ctx.client.clone(), &cr.namespace().unwrap_or_default());
    crs.patch_status(
        &cr.name_any(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await?;
    Ok(())
}

/// Sets the populator's `Valid` condition (false with the reason, or true).
async fn set_valid(
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
    if current.is_some_and(|c| c.status == status && c.message == message) {
        return Ok(());
    }
    let crs: Api<OSSVolumePopulator> =
        Api::namespaced(ctx.client.clone(), &cr.namespace().unwrap_or_default());
    let now = k8s_openapi::chrono::Utc::now()
        .to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true);
    crs.patch_status(
        &cr.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": [{
            "type": "Valid",
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now,
            "observedGeneration": cr.meta().generation,
        }]}})),
    )
    .await?;
    Ok(())
}

/// The error policy: log, and retry after a pause.
pub fn error_policy(
    pvc: Arc<PersistentVolumeClaim>,
    err: &ReconcileError,
    _ctx: Arc<Context>,
) -> Action {
    tracing::warn!(pvc = %pvc.name_any(), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(15))
}
