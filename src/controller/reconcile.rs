//! One reconcile of one user PVC: the volume-populator state machine, as
//! lib-volume-populator runs it, driven only by what the cluster shows now (no state in
//! memory, so a restarted controller carries on).
//!
//! ```text
//! not ours ─────────────────────────────────────────────────────────► nothing
//! being deleted ──► delete pod, PVC', secret; recount inFlight ──► drop finalizer
//! bound (volumeName set) ──► ours: delete pod, PVC', secret; "done" + drop finalizer
//!                            (one patch); never a new PVC' or pod
//! dataSourceRef in another namespace ──► event + fillfs.io/invalid on the PVC
//! populator missing ──► event, retry in 30 s (and when it appears)
//! populator invalid ──► event + Valid=False on the populator (else Valid=True)
//! claim unusable (no size, class "", Block from a prefix) ──► event + fillfs.io/invalid
//! StorageClass missing ──► event, look again in 30 s
//! WaitForFirstConsumer without selected node ──► wait
//! no pod: fillfs.io/failed ──► nothing; fillfs.io/retry-after ahead ──► wait for it
//!         Secret or its keys missing ──► event, look again in 30 s (nothing written)
//!         else fill path (placement) ──► finalizer ──► PVC' ──► (secret copy) ──► fill pod
//! pod not finished ──► why it does not start (events), progress annotation
//! pod failed ──► decision on the PVC (retry-after, or failed) ──► delete pod ──► event
//! pod succeeded ──► PV.claimRef := user PVC ──► (PV controller binds it: see "bound")
//! ```
//!
//! Reads come from the controller's reflector stores ([`Stores`]): a reconcile costs API
//! requests only for what it writes, plus the fill pod's log while a fill runs. Writes
//! that race the stores (a create whose object the store does not show yet) treat 409
//! AlreadyExists as done.
//!
//! Owns the order of API calls (tests pin it request by request); the objects themselves
//! come from [`super::objects`], the small steps from [`super::claim`].

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSINode, StorageClass};
use k8s_openapi::jiff;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::claim::*;
use super::crd::OSSVolumePopulator;
use super::credentials::{copy_secret, credentials};
use super::events::{Events, Kind};
use super::fill_watch::{last_progress, watch_fill};
use super::metrics::Metrics;
use super::objects::{self, *};
use super::placement::{self, FillPath, PluginSeen};
use super::pod_state;
use super::status;

pub use super::claim::populator_ref;

/// Errors of one reconcile; the controller retries them with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Invalid(String),
}

/// The reflector stores reconciles read from (the controller's watches fill them).
#[derive(Clone)]
pub struct Stores {
    /// Every PVC: the users' claims and our PVC's.
    pub claims: Store<PersistentVolumeClaim>,
    /// Fill pods (the managed-by label) in the controller's namespace.
    pub pods: Store<Pod>,
    pub classes: Store<StorageClass>,
    pub csinodes: Store<CSINode>,
    pub populators: Store<OSSVolumePopulator>,
}

/// What a reconcile needs.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub events: Events,
    pub metrics: Arc<Metrics>,
    pub stores: Stores,
    /// Locks and caches of this process (status writes, log reads): never the truth.
    pub memo: status::Memo,
    /// Fill attempts before a failure is final.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt.
    pub retry_base: Duration,
    /// How often a running fill's progress is read.
    pub poll: Duration,
}

impl Context {
    pub(super) async fn event(
        &self,
        pvc: &PersistentVolumeClaim,
        kind: Kind,
        reason: &str,
        note: String,
    ) {
        self.events.publish(pvc, kind, reason, &note).await;
    }

    pub(super) fn ours<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.settings.namespace)
    }

    pub(super) fn in_ours<K>(&self, store: &Store<K>, name: &str) -> Option<Arc<K>>
    where
        K: Resource + Clone,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    {
        store.get(&ObjectRef::new(name).within(&self.settings.namespace))
    }
}

/// Reconciles one user PVC.
pub async fn reconcile(
    pvc: Arc<PersistentVolumeClaim>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    ctx.metrics
        .set_in_flight(status::in_flight_total(&ctx.stores.pods));
    let Some((cr_ns, cr_name)) = populator_ref(&pvc) else {
        return Ok(Action::await_change());
    };
    let ns = pvc.namespace().unwrap_or_default();
    if ns == ctx.settings.namespace {
        return Ok(Action::await_change());
    }
    let uid = pvc.uid().unwrap_or_default();
    let ours = pvc.finalizers().iter().any(|f| f == FINALIZER);
    let cr = ctx
        .stores
        .populators
        .get(&ObjectRef::new(&cr_name).within(&cr_ns));
    if pvc.meta().deletion_timestamp.is_some() {
        if ours {
            let secret = cr
                .as_ref()
                .is_none_or(|c| c.spec.credentials_secret_ref.is_some());
            cleanup(&ctx.client, &ctx.settings.namespace, &uid, secret).await?;
            drop_finalizer(&ctx.client, &pvc, None).await?;
            if let Some(cr) = &cr {
                let n = status::in_flight_of(
                    &ctx.stores.pods,
                    &populator_key(cr),
                    Some(&pod_name(&uid)),
                    0,
                );
                status::set_in_flight(&ctx, cr, n).await?;
            }
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
            return finish(&ctx, &pvc, cr.as_deref()).await;
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

    let Some(cr) = cr else {
        ctx.event(
            &pvc,
            Kind::Warning,
            "PopulatorNotFound",
            format!("waiting for OSSVolumePopulator {cr_ns}/{cr_name} to exist"),
        )
        .await;
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    if let Err(reason) = cr.spec.validate() {
        ctx.event(
            &pvc,
            Kind::Warning,
            "InvalidSpec",
            format!("OSSVolumePopulator {cr_ns}/{cr_name}: {reason}"),
        )
        .await;
        status::set_valid(&ctx, &cr, Some(&reason)).await?;
        return Ok(Action::await_change());
    }
    status::set_valid(&ctx, &cr, None).await?;
    if let Err(reason) = check_pvc(&pvc, &cr).and_then(|()| placement::check_override(&pvc, &cr)) {
        return reject_pvc(&ctx, &pvc, &reason).await;
    }
    if annotation(&pvc, ANN_INVALID).is_some() {
        // Fixed. The patch wakes the next reconcile with the claim as it is now; going on
        // here would write with this copy's (now stale) resourceVersion.
        annotate(&ctx.client, &pvc, json!({ ANN_INVALID: null })).await?;
        return Ok(Action::await_change());
    }

    let selected_node = annotation(&pvc, ANN_SELECTED_NODE).map(str::to_string);
    let prime = ctx.in_ours(&ctx.stores.claims, &prime_name(&uid));
    let pod = ctx.in_ours(&ctx.stores.pods, &pod_name(&uid));
    if prime.is_none() && pod.is_none() {
        // Nothing of a fill exists yet: the class must, and may want a node first. (Once
        // PVC' exists its volume no longer needs the class, so a fill under way finishes
        // even if the class is deleted.)
        if let Some(action) = before_first_fill(&ctx, &pvc, selected_node.is_some()).await {
            return Ok(action);
        }
    }
    let Some(pod) = pod else {
        return start_fill(
            &ctx,
            &pvc,
            &cr,
            ours,
            prime.is_some(),
            selected_node.as_deref(),
        )
        .await;
    };
    if !ours {
        add_finalizer(&ctx.client, &pvc).await?;
    }
    let prime = match prime {
        Some(p) => (*p).clone(),
        None => {
            let p = objects::prime_pvc(&pvc, &cr, &ctx.settings, selected_node.as_deref());
            create_prime(&ctx, &pvc, &p).await?;
            p
        }
    };
    match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Succeeded") => rebind(&ctx, &pvc, &cr, &prime).await,
        Some("Failed") => failed(&ctx, &pvc, &cr, &pod).await,
        _ => {
            watch_fill(&ctx, &pvc, &pod, &prime).await;
            // Recounted at every poll too: starts that raced the store are caught here.
            let n = status::in_flight_of(&ctx.stores.pods, &populator_key(&cr), None, 0);
            status::set_in_flight(&ctx, &cr, n).await?;
            Ok(Action::requeue(ctx.poll))
        }
    }
}

/// The claim's StorageClass before a first fill: missing → an event and a look again in
/// 30 s; WaitForFirstConsumer without a chosen node → wait. `None`: go on.
async fn before_first_fill(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    node_chosen: bool,
) -> Option<Action> {
    let name = pvc.spec.as_ref()?.storage_class_name.as_ref()?;
    let Some(class) = ctx.stores.classes.get(&ObjectRef::new(name)) else {
        ctx.event(
            pvc,
            Kind::Warning,
            "StorageClassNotFound",
            format!(
                "StorageClass {name:?} does not exist; the fill starts when it does (looking again every 30s)"
            ),
        )
        .await;
        return Some(Action::requeue(Duration::from_secs(30)));
    };
    if !node_chosen && class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer") {
        tracing::debug!(pvc = %pvc.name_any(), "waiting for the first consumer");
        return Some(Action::await_change());
    }
    None
}

/// Where the node plugin is registered, for the claim's node or any node.
fn plugin_seen(ctx: &Context, selected_node: Option<&str>) -> PluginSeen {
    let has = |n: &CSINode| {
        n.spec
            .drivers
            .iter()
            .any(|d| d.name == ctx.settings.csi_driver)
    };
    match selected_node {
        Some(node) => PluginSeen::OnSelectedNode(
            ctx.stores
                .csinodes
                .get(&ObjectRef::new(node))
                .is_some_and(|n| has(&n)),
        ),
        None => PluginSeen::OnAnyNode(ctx.stores.csinodes.state().iter().any(|n| has(n))),
    }
}

/// No fill pod: start one, unless a failure decided otherwise, or the credentials are
/// missing. Everything is checked before the first write (finalizer, PVC', secret, pod).
async fn start_fill(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    cr: &OSSVolumePopulator,
    ours: bool,
    has_prime: bool,
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
    let choice = match placement::choose(pvc, cr, plugin_seen(ctx, selected_node)) {
        Ok(c) => c,
        Err(reason) => return reject_pvc(ctx, pvc, &reason).await,
    };
    let source = match &cr.spec.credentials_secret_ref {
        Some(r) => match credentials(ctx, pvc, cr, &r.name).await? {
            Some(s) => Some(s),
            // Secrets are not watched (the controller may only get them): look again.
            None => return Ok(Action::requeue(Duration::from_secs(30))),
        },
        None => None,
    };
    if !ours {
        add_finalizer(&ctx.client, pvc).await?;
    }
    if !has_prime {
        let p = objects::prime_pvc(pvc, cr, &ctx.settings, selected_node);
        create_prime(ctx, pvc, &p).await?;
    }
    let secret = match &source {
        Some(src) => Some(copy_secret(ctx, src, pvc, cr).await?),
        None => None,
    };
    let uid = pvc.uid().unwrap_or_default();
    let ours_ns = &ctx.settings.namespace;
    let fill = FillSpec {
        path: choice.path,
        selected_node,
        secret: secret.as_deref(),
    };
    let pod = objects::fill_pod(pvc, cr, &ctx.settings, &fill);
    match ctx.ours::<Pod>().create(&PostParams::default(), &pod).await {
        Ok(_) => {}
        // Created by an earlier reconcile whose pod the store does not show yet.
        Err(kube::Error::Api(a)) if a.code == 409 => return Ok(Action::requeue(ctx.poll)),
        Err(e) => {
            let what = format!("the fill pod {ours_ns}/{}", pod_name(&uid));
            report_refusal(ctx, pvc, &e, "PodRejected", &what).await;
            return Err(e.into());
        }
    }
    let source_url = match choice.path {
        FillPath::Direct => objects::direct_source(cr, is_block(pvc)),
        FillPath::Node => format!("oss://{}{}", cr.spec.bucket, cr.spec.path),
    };
    let attempt = annotation(pvc, ANN_ATTEMPTS)
        .and_then(|a| a.parse::<u32>().ok())
        .unwrap_or(0)
        + 1;
    ctx.event(
        pvc,
        Kind::Normal,
        "FillStarted",
        format!(
            "attempt {attempt} of {}: filling from {source_url} with pod {ours_ns}/{} on the {} path: {}",
            ctx.max_attempts,
            pod_name(&uid),
            choice.path.as_str(),
            choice.why
        ),
    )
    .await;
    let n = status::in_flight_of(
        &ctx.stores.pods,
        &populator_key(cr),
        Some(&pod_name(&uid)),
        1,
    );
    status::set_in_flight(ctx, cr, n).await?;
    Ok(Action::requeue(ctx.poll))
}

/// Creates PVC'; one created already (the store lagging) is fine, a refusal is reported.
async fn create_prime(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    prime: &PersistentVolumeClaim,
) -> Result<(), kube::Error> {
    match ctx
        .ours::<PersistentVolumeClaim>()
        .create(&PostParams::default(), prime)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(a)) if a.code == 409 => Ok(()),
        Err(e) => {
            let what = format!(
                "the temporary claim {}/{}",
                ctx.settings.namespace,
                prime.name_any()
            );
            report_refusal(ctx, pvc, &e, "PrimeClaimRejected", &what).await;
            Err(e)
        }
    }
}

/// A create the API server refused by validation or admission (quota, policy): the claim
/// says why (only the controller's log would otherwise).
async fn report_refusal(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    e: &kube::Error,
    reason: &str,
    what: &str,
) {
    if let kube::Error::Api(a) = e
        && matches!(a.code, 400 | 403 | 422)
    {
        let note = format!("the API server refused {what}: {}", a.message);
        ctx.event(pvc, Kind::Warning, reason, note).await;
    }
}

/// A problem with this claim (not with the populator, which other claims share): an event
/// and the `fillfs.io/invalid` annotation on the claim, once; nothing is created.
async fn reject_pvc(
    ctx: &Context,
    pvc: &PersistentVolumeClaim,
    reason: &str,
) -> Result<Action, ReconcileError> {
    if annotation(pvc, ANN_INVALID) != Some(reason) {
        ctx.event(pvc, Kind::Warning, "InvalidClaim", reason.to_string())
            .await;
        annotate(&ctx.client, pvc, json!({ ANN_INVALID: reason })).await?;
    }
    Ok(Action::await_change())
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
    let pods = ctx.ours::<Pod>();
    let pod_uid = pod.uid().unwrap_or_default();
    if annotation(pvc, ANN_FAILED_POD) == Some(pod_uid.as_str()) {
        // Decided already; only the deletion did not happen (or not yet show).
        delete_quietly(&pods, &pod_name(&uid)).await?;
        if annotation(pvc, ANN_FAILED).is_some() {
            return Ok(Action::await_change());
        }
        return Ok(Action::requeue(retry_wait(pvc).unwrap_or(ctx.poll)));
    }
    let ending = pod_state::ending(pod);
    let message = ending.message;
    let exit = ending
        .exit
        .map_or("the fill did not run to an exit".to_string(), |c| {
            format!("exit {c}")
        });
    let attempts = annotation(pvc, ANN_ATTEMPTS)
        .and_then(|a| a.parse::<u32>().ok())
        .unwrap_or(0)
        .saturating_add(1);
    let cannot_succeed = ending.exit == Some(EXIT_PERMANENT);
    let permanent = cannot_succeed || attempts >= ctx.max_attempts;
    // Doubling, capped at a day: an edited attempts annotation must not overflow it.
    let delay = ctx
        .retry_base
        .saturating_mul(2u32.saturating_pow(attempts - 1))
        .min(Duration::from_secs(24 * 3600));
    let decision = if permanent {
        json!({
            ANN_PROGRESS: format!("failed: {message}"),
            ANN_FAILED: message,
            ANN_ATTEMPTS: attempts.to_string(),
            ANN_FAILED_POD: pod_uid,
        })
    } else {
        let at = jiff::SignedDuration::try_from(delay)
            .ok()
            .and_then(|d| jiff::Timestamp::now().checked_add(d).ok())
            .unwrap_or_else(|| jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24));
        json!({
            ANN_RETRY_AFTER: rfc3339_secs(at),
            ANN_ATTEMPTS: attempts.to_string(),
            ANN_FAILED_POD: pod_uid,
        })
    };
    annotate(&ctx.client, pvc, decision).await?;
    delete_quietly(&pods, &pod_name(&uid)).await?;
    let in_flight = status::in_flight_of(
        &ctx.stores.pods,
        &populator_key(cr),
        Some(&pod_name(&uid)),
        0,
    );
    if permanent {
        let why = if cannot_succeed {
            "cannot succeed".to_string()
        } else {
            format!("failed {attempts} times")
        };
        ctx.event(
            pvc,
            Kind::Warning,
            "FillFailed",
            format!(
                "attempt {attempts} of {}: {exit}: {message}; the fill {why}, giving up (remove the annotation {ANN_FAILED} to try again)",
                ctx.max_attempts
            ),
        )
        .await;
        ctx.metrics.finished("failed", None, None);
        status::count_finished(ctx, cr, false, in_flight).await?;
        return Ok(Action::await_change());
    }
    ctx.event(
        pvc,
        Kind::Warning,
        "FillFailed",
        format!(
            "attempt {attempts} of {} failed ({exit}): {message}; retrying in {}",
            ctx.max_attempts,
            humantime::format_duration(delay)
        ),
    )
    .await;
    ctx.metrics.retries.inc();
    status::set_in_flight(ctx, cr, in_flight).await?;
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
    cr: Option<&OSSVolumePopulator>,
) -> Result<Action, ReconcileError> {
    let uid = pvc.uid().unwrap_or_default();
    let pod = ctx.in_ours(&ctx.stores.pods, &pod_name(&uid));
    let line = match &pod {
        Some(p) => last_progress(ctx, &p.name_any()).await,
        None => None,
    };
    let secret = cr.is_none_or(|c| c.spec.credentials_secret_ref.is_some());
    cleanup(&ctx.client, &ctx.settings.namespace, &uid, secret).await?;
    drop_finalizer(&ctx.client, pvc, Some(&[(ANN_PROGRESS, "done")])).await?;
    let bytes = line.as_ref().map(|l| l.bytes_done);
    ctx.metrics
        .finished("succeeded", bytes, line.as_ref().map(|l| l.elapsed_s));
    let source = cr.map_or(String::new(), |cr| {
        format!(" from oss://{}{}", cr.spec.bucket, cr.spec.path)
    });
    ctx.event(
        pvc,
        Kind::Normal,
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
        let n = status::in_flight_of(
            &ctx.stores.pods,
            &populator_key(cr),
            Some(&pod_name(&uid)),
            0,
        );
        status::count_finished(ctx, cr, true, n).await?;
    }
    Ok(Action::await_change())
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
