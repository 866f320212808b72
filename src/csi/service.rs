//! The gRPC face of the node plugin: CSI Identity and Node services over a unix socket.
//! Each RPC checks the request's shape, hands the work to [`NodePlugin`], and maps the
//! outcome to a CSI status code. No mount logic lives here.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::node::{CsiError, NodeOptions, NodePlugin};
use super::proto::identity_server::{Identity, IdentityServer};
use super::proto::node_server::{Node, NodeServer};
use super::proto::*;
use super::volume;
use crate::error::Error;

/// The default driver name kubelet knows us by (CSIDriver object, `csi.driver` in a pod
/// volume); `--driver-name` changes it, to match the controller's `--csi-driver`.
pub const DRIVER_NAME: &str = "csi.fillfs.io";

/// Everything `fillfs csi` needs.
#[derive(Debug, Clone)]
pub struct CsiOptions {
    /// `unix:///csi/csi.sock` or a plain path.
    pub endpoint: String,
    /// The name GetPluginInfo answers (must equal the CSIDriver object's name).
    pub driver_name: String,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub node: NodeOptions,
}

impl From<CsiError> for Status {
    fn from(e: CsiError) -> Status {
        match e {
            CsiError::InvalidArgument(m) => Status::invalid_argument(m),
            CsiError::AlreadyExists(m) => Status::already_exists(m),
            CsiError::FailedPrecondition(m) => Status::failed_precondition(m),
            CsiError::PermissionDenied(m) => Status::permission_denied(m),
            CsiError::Internal(m) => Status::internal(m),
            CsiError::Source(e) => {
                let msg = e.to_string();
                match e {
                    Error::InvalidSource { .. } | Error::InvalidOption(_) => {
                        Status::invalid_argument(msg)
                    }
                    Error::BucketNotFound { .. }
                    | Error::DirectoryNotFound(_)
                    | Error::EmptySource { .. } => Status::not_found(msg),
                    Error::NotAStore { .. } => Status::failed_precondition(msg),
                    Error::AccessDenied { .. } => Status::permission_denied(msg),
                    Error::Unreachable { .. } => Status::unavailable(msg),
                    _ => Status::internal(msg),
                }
            }
        }
    }
}

struct IdentityService {
    driver_name: String,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        // Node service only: no controller, no topology constraints.
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: vec![],
        }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}

struct NodeService {
    plugin: Arc<NodePlugin>,
}

fn absolute_path(what: &str, p: &str) -> Result<PathBuf, Status> {
    if p.is_empty() {
        return Err(Status::invalid_argument(format!("{what} is required")));
    }
    let path = Path::new(p);
    if !path.is_absolute()
        || path
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(Status::invalid_argument(format!(
            "{what} {p:?} must be an absolute path without '..'"
        )));
    }
    Ok(path.to_path_buf())
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        let target = absolute_path("target_path", &r.target_path)?;
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        match &cap.access_type {
            Some(volume_capability::AccessType::Mount(_)) => {}
            Some(volume_capability::AccessType::Block(_)) => {
                return Err(Status::invalid_argument(
                    "fillfs volumes are read-only file systems; volumeMode Block is not supported",
                ));
            }
            None => {
                return Err(Status::invalid_argument(
                    "volume_capability needs an access type (mount)",
                ));
            }
        }
        let spec = volume::parse(&r.volume_context, &r.secrets).map_err(|m| {
            tracing::warn!(volume_id = %r.volume_id, pod = %volume::pod_of(&r.volume_context), error = %m, "publish refused");
            Status::invalid_argument(m)
        })?;
        let pod = spec.pod.clone().unwrap_or_else(|| "-".into());
        // Writers are accepted (inline volumes default to readOnly: false) but the mount
        // is always read-only.
        self.plugin
            .publish(&r.volume_id, &target, spec)
            .await
            .map_err(|e| {
                tracing::warn!(volume_id = %r.volume_id, pod = %pod, target = %target.display(), error = %e, "publish failed");
                Status::from(e)
            })?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        let target = absolute_path("target_path", &r.target_path)?;
        self.plugin.unpublish(&r.volume_id, &target).await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_stage_volume(
        &self,
        _: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "fillfs does not stage volumes (no STAGE_UNSTAGE_VOLUME capability)",
        ))
    }

    async fn node_unstage_volume(
        &self,
        _: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "fillfs does not stage volumes (no STAGE_UNSTAGE_VOLUME capability)",
        ))
    }

    async fn node_get_volume_stats(
        &self,
        _: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        Err(Status::unimplemented(
            "fillfs does not report volume stats (no GET_VOLUME_STATS capability)",
        ))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: vec![],
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.plugin.node_id().to_string(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

/// A CSI driver name: at most 63 characters, lower-case alphanumerics, `-` and `.`, starting
/// and ending with an alphanumeric (CSI spec, GetPluginInfo).
pub fn check_driver_name(name: &str) -> Result<(), Error> {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| alnum(c) || c == '-' || c == '.')
        && name.starts_with(alnum)
        && name.ends_with(alnum);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidOption(format!(
            "--driver-name {name:?}: expected a DNS-style name of at most 63 characters, e.g. csi.fillfs.io"
        )))
    }
}

/// The socket path of `unix:///csi/csi.sock` (or of a plain path).
pub fn socket_path(endpoint: &str) -> Result<PathBuf, Error> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if path.is_empty() || endpoint.contains("://") && !endpoint.starts_with("unix://") {
        return Err(Error::InvalidOption(format!(
            "--endpoint {endpoint:?}: expected unix:///path/to/csi.sock"
        )));
    }
    Ok(PathBuf::from(path))
}

/// Binds the socket, calls `on_ready`, clears stale mounts in the background, and serves
/// until `shutdown` completes. The socket comes first: a mount left behind that does not
/// answer must not keep the node's every volume down (before, the start-up cleanup waited
/// on such a mount for ever and the socket never came up). Mounts are left in place on
/// shutdown: a plugin restart must not pull volumes from running pods that a new process
/// cannot take over anyway.
pub async fn serve(
    opts: CsiOptions,
    on_ready: impl FnOnce(),
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    let socket = socket_path(&opts.endpoint)?;
    check_driver_name(&opts.driver_name)?;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(&socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let listener = tokio::net::UnixListener::bind(&socket).map_err(|e| {
        Error::Io(std::io::Error::new(
            e.kind(),
            format!("binding {}: {e}", socket.display()),
        ))
    })?;
    let plugin = Arc::new(NodePlugin::new(
        opts.node.clone(),
        tokio::runtime::Handle::current(),
    )?);
    tracing::info!(
        socket = %socket.display(),
        node_id = %opts.node.node_id,
        driver = %opts.driver_name,
        node_throughput_mib = opts.node.node_throughput_mib,
        cache_size = %bytesize::ByteSize(opts.node.cache_size).display().iec(),
        "CSI node plugin serving"
    );
    if let Some(addr) = opts.metrics_addr {
        // Before the socket is announced: a taken port is a start-up error.
        crate::metrics::spawn(addr, Arc::new(plugin.metrics().registry())).await?;
    }
    on_ready();
    tokio::spawn({
        let (plugin, dir) = (plugin.clone(), opts.node.kubelet_dir.clone());
        async move {
            let cleared = plugin.clear_stale_under(&dir).await;
            if cleared > 0 {
                tracing::info!(count = cleared, "cleared mounts left by a previous run");
            }
        }
    });
    let result = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService {
            driver_name: opts.driver_name.clone(),
        }))
        .add_service(NodeServer::new(NodeService {
            plugin: plugin.clone(),
        }))
        .serve_with_incoming_shutdown(crate::grpc_uds::incoming(listener), shutdown)
        .await;
    let live = plugin.traffic().len();
    if live > 0 {
        tracing::warn!(
            mounts = live,
            "stopping with volumes published; their pods see ENOTCONN until the volumes are published again"
        );
    }
    // Leave the mounts as they are (see above): skip the handles' destructors.
    std::mem::forget(plugin);
    result.map_err(|e| Error::Io(std::io::Error::other(format!("gRPC server: {e}"))))
}
