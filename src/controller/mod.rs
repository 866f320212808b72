//! `fillfs controller`: the Kubernetes volume populator for `OSSVolumePopulator`.
//!
//! - [`crd`]: the custom resource (ACK's shape plus fillfs's additions) and its checks.
//! - [`placement`]: which way a fill pod reads the bucket (node plugin or direct).
//! - [`objects`]: PVC', the fill pod and the secret copy, built as values.
//! - [`reconcile`]: the state machine for one user PVC, one API call at a time.
//! - [`claim`]: the small steps on a claim (annotations, finalizer, deletes).
//! - [`credentials`]: the populator's access-key Secret, checked and copied.
//! - [`fill_watch`]: a running fill's progress, and why a fill pod does not start.
//! - [`pod_state`]: what a fill pod's status says, in words.
//! - [`status`]: the populator's `Valid` condition and fill counts.
//! - [`events`]: events on the claim, every distinct note.
//! - [`metrics`]: `fillfs_*` Prometheus metrics, liveness and readiness.
//!
//! [`run`] watches PVCs (the trigger; its store also holds our PVC's), the fill pods
//! (selected by the managed-by label, mapped back to their PVC by annotations: a PVC's
//! name may be too long for a label value), the populators (a populator whose *spec*
//! changes, or that appears, wakes the PVCs that name it; status writes do not), and
//! StorageClasses and CSINodes (read only). Reconciles read from these stores.

pub mod claim;
pub mod crd;
pub mod credentials;
pub mod events;
pub mod fill_watch;
pub mod metrics;
pub mod objects;
pub mod placement;
pub mod pod_state;
pub mod reconcile;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSINode, StorageClass};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, Client, CustomResourceExt, Resource};

pub use crd::{OSSVolumePopulator, OSSVolumePopulatorSpec};
pub use objects::Settings;
pub use reconcile::{Context, ReconcileError, Stores, reconcile};

/// The CRD as YAML (what `fillfs crd` prints and `deploy/crd.yaml` holds).
pub fn crd_yaml() -> String {
    let mut crd = OSSVolumePopulator::crd();
    crd.metadata.labels = Some([(PART_OF.0.to_string(), PART_OF.1.to_string())].into());
    serde_yaml_ng::to_string(&crd).expect("the CRD serializes")
}

/// The label `deploy/crd.yaml` carries; a CRD of this name without it was installed by
/// someone else (ACK's storage-operator owns the same CRD).
pub const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "fillfs");

/// Everything `fillfs controller` needs.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    pub settings: Settings,
    pub max_attempts: u32,
    pub retry_base: Duration,
    pub poll: Duration,
    pub metrics_addr: Option<SocketAddr>,
}

/// Why the controller could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "no Kubernetes API to talk to: not running in a cluster, and no kubeconfig ($KUBECONFIG or ~/.kube/config)"
    )]
    NoCluster,
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// A watch of `K` reflected into a store, its failures reported to `metrics` (warn log,
/// readiness) and retried with backoff.
fn reflected<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    metrics: Arc<metrics::Metrics>,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let what = K::plural(&Default::default()).to_string();
    watcher(api, config)
        .default_backoff()
        .reflect(writer)
        .inspect(move |r| match r {
            Ok(_) => metrics.watch_ok(),
            Err(e) => metrics.watch_failed(&what, e),
        })
}

/// Warns when the OSSVolumePopulator CRD was not installed by fillfs: ACK's
/// storage-operator installs the same CRD, and its populator (when enabled) would fill the
/// same claims as this controller.
async fn check_crd_owner(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = "ossvolumepopulators.storage.alibabacloud.com";
    match crds.get_opt(name).await {
        Ok(Some(crd)) => {
            let ours = crd
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(PART_OF.0))
                .is_some_and(|v| v == PART_OF.1);
            if !ours {
                tracing::warn!(
                    crd = name,
                    "the OSSVolumePopulator CRD was not installed by fillfs (no {}={} label): if ACK's storage-operator installed it with enableVolumePopulator: true, its populator fills the same claims as this controller; run one or the other (README: 'fillfs or ACK's populator')",
                    PART_OF.0,
                    PART_OF.1
                );
            }
        }
        Ok(None) => tracing::warn!(
            crd = name,
            "the OSSVolumePopulator CRD is not installed: apply deploy/crd.yaml (fillfs crd | kubectl apply -f -)"
        ),
        Err(e) => tracing::debug!(error = %e, "could not read the CRD"),
    }
}

/// Runs the controller until the process is stopped.
pub async fn run(opts: ControllerOptions) -> Result<(), RunError> {
    let client = match Client::try_default().await {
        Ok(c) => c,
        Err(kube::Error::InferConfig(e)) => {
            tracing::debug!(error = %e, "no cluster configuration");
            return Err(RunError::NoCluster);
        }
        Err(e) => return Err(e.into()),
    };
    let metrics = Arc::new(metrics::Metrics::default());
    if let Some(addr) = opts.metrics_addr {
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, m).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }
    check_crd_owner(&client).await;

    let (claims, claims_w) = reflector::store();
    let (pods, pods_w) = reflector::store();
    let (classes, classes_w) = reflector::store();
    let (csinodes, csinodes_w) = reflector::store();
    let (populators, populators_w) = reflector::store();
    let claim_stream = reflected(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        watcher::Config::default(),
        claims_w,
        metrics.clone(),
    )
    .touched_objects();
    let pod_stream = reflected(
        Api::<Pod>::namespaced(client.clone(), &opts.settings.namespace),
        watcher::Config::default().labels(&format!("{}=fillfs", objects::LABEL_MANAGED_BY)),
        pods_w,
        metrics.clone(),
    )
    .touched_objects();
    // Status writes (counts, conditions) do not move the generation: they wake no claims.
    let populator_stream = reflected(
        Api::<OSSVolumePopulator>::all(client.clone()),
        watcher::Config::default(),
        populators_w,
        metrics.clone(),
    )
    .applied_objects()
    .predicate_filter(predicates::generation, Default::default());
    // Read-only stores: nothing to trigger, only kept up to date.
    for stream in [
        reflected(
            Api::<StorageClass>::all(client.clone()),
            watcher::Config::default(),
            classes_w,
            metrics.clone(),
        )
        .map(|_| ())
        .boxed(),
        reflected(
            Api::<CSINode>::all(client.clone()),
            watcher::Config::default(),
            csinodes_w,
            metrics.clone(),
        )
        .map(|_| ())
        .boxed(),
    ] {
        tokio::spawn(stream.for_each(|_| async {}));
    }

    let ctx = Arc::new(Context {
        events: events::Events::new(
            client.clone(),
            std::env::var("POD_NAME").unwrap_or_else(|_| "fillfs-controller".into()),
        ),
        client: client.clone(),
        settings: opts.settings.clone(),
        metrics: metrics.clone(),
        stores: Stores {
            claims: claims.clone(),
            pods,
            classes,
            csinodes,
            populators,
        },
        memo: Default::default(),
        max_attempts: opts.max_attempts,
        retry_base: opts.retry_base,
        poll: opts.poll,
    });
    tracing::info!(namespace = %opts.settings.namespace, image = %opts.settings.image, "volume populator running");
    let claims_for_map = claims.clone();
    Controller::for_stream(claim_stream, claims)
        .watches_stream(pod_stream, |pod: Pod| {
            objects::owner_of(&pod.metadata)
                .map(|(ns, name)| ObjectRef::<PersistentVolumeClaim>::new(&name).within(&ns))
        })
        .watches_stream(populator_stream, move |cr: OSSVolumePopulator| {
            let ns = cr.metadata.namespace.clone().unwrap_or_default();
            let name = cr.metadata.name.clone().unwrap_or_default();
            claims_for_map
                .state()
                .into_iter()
                .filter(|pvc| reconcile::populator_ref(pvc) == Some((ns.clone(), name.clone())))
                .map(|pvc| ObjectRef::from_obj(&*pvc))
                .collect::<Vec<_>>()
        })
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|res| {
            let metrics = metrics.clone();
            async move {
                match res {
                    Err(kube::runtime::controller::Error::QueueError(e)) => {
                        metrics.watch_failed("a trigger", &e)
                    }
                    Err(e) => tracing::debug!(error = %e, "reconcile error"),
                    Ok(_) => {}
                }
            }
        })
        .await;
    Ok(())
}
