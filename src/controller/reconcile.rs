//! One reconcile of one user PVC: the volume-populator state machine, as
//! lib-volume-populator runs it, driven only by what the API says now (no state in memory,
//! so a restarted controller carries on).
//!
//! ```text
//! not ours ─────────────────────────────────────────────────────────► nothing
//! being deleted ──► delete pod, PVC', secret ──► drop finalizer
//! bound (volumeName set) ──► ours: delete pod, PVC', secret; "done" + drop finalizer
//!                            (one patch); never a new PVC' or pod
//! dataSourceRef in another namespace ──► event + fillfs.io/invalid on the PVC
//! populator missing ──► event, retry in 30 s (and when it appears)
//! populator invalid ──► event + Valid=False on the populator (else Valid=True)
//! claim unusable (no size, Block from a prefix) ──► event + fillfs.io/invalid on the PVC
//! WaitForFirstConsumer without selected node ──► wait
//! no pod: fillfs.io/failed ──► nothing; fillfs.io/retry-after ahead ──► wait for it
//!         Secret or its keys missing ──► event, look again in 30 s (nothing written)
//!         else finalizer ──► PVC' ──► (secret copy) ──► fill pod
//! pod running ──► progress annotation
//! pod failed ──► decision on the PVC (retry-after, or failed) ──► delete pod ──► event
//! pod succeeded ──► PV.claimRef := user PVC ──► (PV controller binds it: see "bound")
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
use k8s_openapi::chrono;
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
            drop_finalizer(&ctx, &pvc, None).await?;
            tracing::info!(pvc = %format!("{ns}/{}", pvc.name_any()), "PVC deleted; fill cleaned up");
        }
        return Ok(Action::await_change());
    }
    let bound = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .is_some_and(|v| !v.is_empty());
    if bound {
        // As in lib-volume-populator: a bound claim has its volume, so the fill is over
        // (or was never ours). Only clean up; never create PVC' or a pod for it again.
        if ours {
            return finish(&ctx, &pvc, &cr_ns, &cr_name).await;
        }
        return Ok(Action::await_change());
    }
    if cr_ns != ns {
        // Needs ReferenceGrant support (CrossNamespaceVolumeDataSource), which we lack;
        // and reading another namespace's populator for this claim would bypass it.
        let reason = format!(
            "dataSourceRef.namespace {cr_ns:?} is not supported: the OSSVolumePopulator must be in the claim's namespace {ns:?}"
        );
        return reject_pvc(&ctx, &pvc, &reason).await;
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
    if let Err(reason) = cr.spec.validate() {
        event(
            &ctx,
            &pvc,
            EventType::Warning,
            "InvalidSpec",
            format!("OSSVolumePopulator {cr_ns}/{cr_name}: {reason}"),
        )
        .await;
        set_valid(&ctx, &cr, Some(&reason)).await?;
        return Ok(Action::await_change());
    }
    set_valid(&ctx, &cr, None).await?;
    if let Err(reason) = check_pvc(&pvc, &cr) {
        return reject_pvc(&ctx, &pvc, &reason).await;
    }
    if annotation(&pvc, ANN_INVALID).is_some() {
        // Fixed. The patch wakes the next reconcile with the claim as it is now; going on
        // here would write with this copy's (now stale) resourceVersion.
        annotate(&ctx, &pvc, json!({ ANN_INVALID: null })).await?;
        return Ok(Action::await_change());
    }

    let selected_node = annotation(&pvc, ANN_SELECTED_NODE).map(str::to_string);
    if selected_node.is_none() && waits_for_consumer(&ctx, &pvc).await? {
        tracing::debug!(pvc = %pvc.name_any(), "waiting for the first consumer");
        return Ok(Action::await_change());
    }

    let ours_ns = &ctx.settings.namespace;
    let primes: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ours_ns);
    let prime = get_opt(&primes, &prime_name(&uid)).await?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ours_ns);
    let Some(pod) = get_opt(&pods, &pod_name(&uid)).await? else {
        return start_fill(&ctx, &pvc, &cr, ours, prime, selected_node.as_deref()).await;
    };
    if !ours {
        add_finalizer(&ctx, &pvc).await?;
    }
    let prime = match prime {
        Some(p) => p,
        None => {
            let p = objects::prime_pvc(&pvc, &cr, &ctx.settings, selected_node.as_deref());
            primes.create(&PostParams::default(), &p).await?
        }
    };
    match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Succeeded") => rebind(&ctx, &pvc, &cr, &prime).await,
        Some("Failed") => failed(&ctx, &pvc, &cr, &pod).await,
        _ => {
            report_progress(&ctx, &pvc, &pods, &pod_name(&uid)).await;
            Ok(Action::requeue(ctx.poll))
        }
    }
}

/// No fill pod: start one, unless a failure decided otherwise, or the credentials are
/// missing. Everything is checked before the first write (finalizer, PVC', secret, pod).
async fn start_fill(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    cr: &OSSVolumePopulator,
    ours: bool,
    prime: Option<PersistentVolumeClaim>,
    selected_node: Option<&str>,
) -> Result<Action, ReconcileError> {
    // The decisions `failed` persisted before it deleted the last pod (whose deletion
    // wakes this reconcile at once).
    if annotation(pvc, ANN_FAILED).is_some() {
        tracing::debug!(pvc = %pvc.name_any(), "failed for good; waiting for {ANN_FAILED} to be removed");
        return Ok(Action::await_change());
    }
    if let Some(wait) = retry_wait(pvc) {
        return Ok(Action::requeue(wait));
    }
    let source = match &cr.spec.credentials_secret_ref {
        Some(r) => match credentials(ctx, pvc, cr, &r.name).await? {
            Some(s) => Some(s),
            // Secrets are not watched (the controller may only get them): look again.
            None => return Ok(Action::requeue(Duration::from_secs(30))),
        },
        None => None,
    };
    if !ours {
        add_finalizer(ctx, pvc).await?;
    }
    let ours_ns = &ctx.settings.namespace;
    if prime.is_none() {
        let primes: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ours_ns);
        let p = objects::prime_pvc(pvc, cr, &ctx.settings, selected_node);
        primes.create(&PostParams::default(), &p).await?;
    }
    let secret = match &source {
        Some(src) => Some(copy_secret(ctx, src, pvc, cr).await?),
        None => None,
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ours_ns);
    let uid = pvc.uid().unwrap_or_default();
    let pod = objects::fill_pod(pvc, cr, &ctx.settings, selected_node, secret.as_deref());
    if let Err(e) = pods.create(&PostParams::default(), &pod).await {
        // Refused by validation or admission (quota, policy): only the logs would say why,
        // and the error policy retries it; the claim's events should say it too.
        if let kube::Error::Api(a) = &e
            && matches!(a.code, 400 | 403 | 422)
        {
            event(
                ctx,
                pvc,
                EventType::Warning,
                "PodRejected",
                format!(
                    "the API server refused the fill pod {ours_ns}/{}: {}",
                    pod_name(&uid),
                    a.message
                ),
            )
            .await;
        }
        return Err(e.into());
    }
    ctx.metrics.in_flight.inc();
    event(
        ctx,
        pvc,
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
    Ok(Action::requeue(ctx.poll))
}

/// How long the backoff of the last transient failure still runs, if it does.
fn retry_wait(pvc: &PersistentVolumeClaim) -> Option<Duration> {
    let at = annotation(pvc, ANN_RETRY_AFTER)?;
    let Ok(at) = chrono::DateTime::parse_from_rfc3339(at) else {
        tracing::debug!(pvc = %pvc.name_any(), value = at, "unreadable {ANN_RETRY_AFTER}; ignored");
        return None;
    };
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .ok()
        .filter(|d| !d.is_zero())
        // Whole seconds, rounded up: not woken a moment early.
        .map(|d| Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0)))
}

/// A problem with this claim (not with the populator, which other claims share): an event
/// and the `fillfs.io/invalid` annotation on the claim, once; nothing is created.
async fn reject_pvc(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    reason: &str,
) -> Result<Action, ReconcileError> {
    if annotation(pvc, ANN_INVALID) != Some(reason) {
        event(
            ctx,
            pvc,
            EventType::Warning,
            "InvalidClaim",
            reason.to_string(),
        )
        .await;
        annotate(ctx, pvc, json!({ ANN_INVALID: reason })).await?;
    }
    Ok(Action::await_change())
}

/// What the user's PVC must look like for a fill from this populator.
fn check_pvc(pvc: &PersistentVolumeClaim, cr: &OSSVolumePopulator) -> Result<(), String> {
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

/// Removes our finalizer, setting `annotations` in the same request: a JSON patch that
/// tests the finalizer is where this copy of the PVC has it, so it needs no
/// resourceVersion (which the annotations, or kubelet, may have moved on since).
async fn drop_finalizer(
    ctx: &Context,
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
        Api::namespaced(ctx.client.clone(), &pvc.namespace().unwrap_or_default());
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

/// The populator's credentials Secret, if it exists and holds an access key. Otherwise an
/// event says what is missing (key names only, never values) and `None`.
async fn credentials(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    cr: &OSSVolumePopulator,
    name: &str,
) -> Result<Option<Secret>, kube::Error> {
    let cr_ns = cr.namespace().unwrap_or_default();
    let theirs: Api<Secret> = Api::namespaced(ctx.client.clone(), &cr_ns);
    let Some(src) = get_opt(&theirs, name).await? else {
        event(
            ctx,
            pvc,
            EventType::Warning,
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
        event(
            ctx,
            pvc,
            EventType::Warning,
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
async fn copy_secret(
    ctx: &Context,
    src: &Secret,
    pvc: &PersistentVolumeClaim,
    cr: &OSSVolumePopulator,
) -> Result<String, kube::Error> {
    let copy = objects::copied_secret(src, pvc, cr, &ctx.settings);
    let ours: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    match ours.create(&PostParams::default(), &copy).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e),
    }
    Ok(copy.metadata.name.unwrap_or_default())
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

/// The fill pod failed: retry with backoff, or give up. The decision goes onto the PVC
/// before the pod is deleted: the deletion (and the patch) wake a new reconcile at once,
/// which must find the decision there instead of starting the next pod right away.
async fn failed(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    cr: &OSSVolumePopulator,
    pod: &Pod,
) -> Result<Action, ReconcileError> {
    let uid = pvc.uid().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let pod_uid = pod.uid().unwrap_or_default();
    if annotation(pvc, ANN_FAILED_POD) == Some(pod_uid.as_str()) {
        // Decided already; only the deletion did not happen (or not yet show).
        delete_quietly(&pods, &pod_name(&uid)).await?;
        if annotation(pvc, ANN_FAILED).is_some() {
            return Ok(Action::await_change());
        }
        return Ok(Action::requeue(retry_wait(pvc).unwrap_or(ctx.poll)));
    }
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
    let permanent = exit == EXIT_PERMANENT || attempts >= ctx.max_attempts;
    let delay = ctx.retry_base * 2u32.saturating_pow(attempts - 1);
    let decision = if permanent {
        json!({
            ANN_PROGRESS: format!("failed: {message}"),
            ANN_FAILED: message,
            ANN_ATTEMPTS: attempts.to_string(),
            ANN_FAILED_POD: pod_uid,
        })
    } else {
        let at = chrono::Utc::now()
            + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::days(1));
        json!({
            ANN_RETRY_AFTER: at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            ANN_ATTEMPTS: attempts.to_string(),
            ANN_FAILED_POD: pod_uid,
        })
    };
    annotate(ctx, pvc, decision).await?;
    delete_quietly(&pods, &pod_name(&uid)).await?;
    ctx.metrics.fill_ended();
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
            format!(
                "fill {why}, giving up (remove the annotation {ANN_FAILED} to try again): {message}"
            ),
        )
        .await;
        ctx.metrics.finished("failed", None, None);
        bump_status(ctx, cr, false).await?;
        return Ok(Action::await_change());
    }
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
    ctx.metrics.retries.inc();
    Ok(Action::requeue(delay))
}

/// The fill succeeded: hand PVC's volume to the user's PVC. The PV controller then binds
/// the user's PVC (and PVC' goes Lost); [`finish`] cleans up once the claim is bound.
async fn rebind(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    cr: &OSSVolumePopulator,
    prime: &PersistentVolumeClaim,
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
        pvs.patch(
            &pv_name,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"annotations": { ANN_POPULATED_FROM: populator_key(cr) }},
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
    }
    // The claim's binding is a PVC event; the requeue is a safety net.
    Ok(Action::requeue(Duration::from_secs(2)))
}

/// The user's PVC is bound: clean up PVC', the pod and the secret copy, then mark it done
/// and drop the finalizer in one request. Counted once: the count follows that request,
/// after which the claim is no longer ours.
async fn finish(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    cr_ns: &str,
    cr_name: &str,
) -> Result<Action, ReconcileError> {
    let uid = pvc.uid().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let pod = get_opt(&pods, &pod_name(&uid)).await?;
    let (bytes, seconds) = match &pod {
        Some(p) => fill_summary(ctx, p).await,
        None => (None, None),
    };
    cleanup(ctx, &uid).await?;
    drop_finalizer(ctx, pvc, Some(&[(ANN_PROGRESS, "done")])).await?;
    ctx.metrics.fill_ended();
    ctx.metrics.finished("succeeded", bytes, seconds);
    let crs: Api<OSSVolumePopulator> = Api::namespaced(ctx.client.clone(), cr_ns);
    let cr = get_opt(&crs, cr_name).await?;
    let source = cr.as_ref().map_or(String::new(), |cr| {
        format!(" from oss://{}{}", cr.spec.bucket, cr.spec.path)
    });
    event(
        ctx,
        pvc,
        EventType::Normal,
        "Populated",
        format!(
            "filled{source}{}",
            bytes.map_or(String::new(), |b| format!(
                " ({})",
                bytesize::ByteSize(b).display().iec()
            ))
        ),
    )
    .await;
    if let Some(cr) = cr {
        bump_status(ctx, &cr, true).await?;
    }
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

/// Counts a finished fill on the populator's status and recounts fills in flight (fill
/// pods annotated with this populator). Fills of many claims end concurrently, so the
/// count is written with the resourceVersion it was read at, and read again on a conflict.
async fn bump_status(ctx: &Context, cr: &OSSVolumePopulator, ok: bool) -> Result<(), kube::Error> {
    let key = populator_key(cr);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let in_flight = pods
        .list(&ListParams::default().labels(&format!("{LABEL_MANAGED_BY}=fillfs")))
        .await?
        .items
        .iter()
        .filter(|p| {
            p.annotations().get(ANN_POPULATOR) == Some(&key)
                && !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
        })
        .count();
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

/// The error policy: log, and retry after a pause.
pub fn error_policy(
    pvc: Arc<PersistentVolumeClaim>,
    err: &ReconcileError,
    _ctx: Arc<Context>,
) -> Action {
    tracing::warn!(pvc = %pvc.name_any(), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(15))
}
