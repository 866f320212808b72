//! `fillfs controller`: the Kubernetes volume populator for `OSSVolumePopulator`.
//!
//! - [`crd`]: the custom resource (ACK's shape plus fillfs's additions) and its checks.
//! - [`objects`]: PVC', the fill pod and the secret copy, built as values.
//! - [`reconcile`]: the state machine for one user PVC, one API call at a time.
//! - [`metrics`]: `fillfs_*` Prometheus metrics and their HTTP endpoint.
//!
//! [`run`] watches PVCs (the trigger), the fill pods (selected by the managed-by label,
//! mapped back to their PVC by annotations: a PVC's name may be too long for a label value)
//! and the populators (a populator that appears wakes the PVCs waiting for it).

pub mod crd;
pub mod metrics;
pub mod objects;
pub mod reconcile;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, CustomResourceExt};

pub use crd::{OSSVolumePopulator, OSSVolumePopulatorSpec};
pub use objects::Settings;
pub use reconcile::{Context, ReconcileError, reconcile};

/// The CRD as YAML (what `fillfs crd` prints and `deploy/crd.yaml` holds).
pub fn crd_yaml() -> String {
    serde_yaml::to_string(&OSSVolumePopulator::crd()).expect("the CRD serializes")
}

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
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), Reporter::from("fillfs-populator")),
        client: client.clone(),
        settings: opts.settings.clone(),
        metrics,
        max_attempts: opts.max_attempts,
        retry_base: opts.retry_base,
        poll: opts.poll,
    });
    let pvcs: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &opts.settings.namespace);
    let populators: Api<OSSVolumePopulator> = Api::all(client.clone());

    let controller = Controller::new(pvcs, watcher::Config::default());
    let store = controller.store();
    tracing::info!(namespace = %opts.settings.namespace, image = %opts.settings.image, "volume populator running");
    controller
        .watches(
            pods,
            watcher::Config::default().labels(&format!("{}=fillfs", objects::LABEL_MANAGED_BY)),
            |pod: Pod| {
                objects::owner_of(&pod.metadata)
                    .map(|(ns, name)| ObjectRef::<PersistentVolumeClaim>::new(&name).within(&ns))
            },
        )
        .watches(
            populators,
            watcher::Config::default(),
            move |cr: OSSVolumePopulator| {
                let ns = cr.metadata.namespace.clone().unwrap_or_default();
                let name = cr.metadata.name.clone().unwrap_or_default();
                store
                    .state()
                    .into_iter()
                    .filter(|pvc| reconcile::populator_ref(pvc) == Some((ns.clone(), name.clone())))
                    .map(|pvc| ObjectRef::from_obj(&*pvc))
                    .collect::<Vec<_>>()
            },
        )
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile error");
            }
        })
        .await;
    Ok(())
}
