//! `fillfs csi`: the CSI node plugin. One process serves every fillfs FUSE mount of a node,
//! so the node shares one block cache (N pods reading one prefix fetch each block once) and
//! one bandwidth cap.
//!
//! - [`proto`]: types and services generated from `csi/csi.proto` (CSI v1 Identity + Node).
//! - [`volume`]: the volume attributes and secrets a user writes, parsed and explained.
//! - [`node`]: the mounts of the node, publish / unpublish, node-wide cache and limiter.
//! - [`mounts`]: probing a mount with a timeout, and ending mounts whose server is gone
//!   or frozen (the mount table itself is [`crate::mountinfo`]).
//! - [`service`]: the thin gRPC layer over [`node`], and [`serve`] on a unix socket.
//!
//! On restart, mounts left by the previous process are dead (ENOTCONN): once the socket
//! is up they are cleared in the background, and whenever kubelet publishes or unpublishes
//! their path; a mount that does not answer within 5 s is ended too, so it cannot hold up
//! the node (ARCHITECTURE.md says what a pod sees meanwhile).

pub mod mounts;
pub mod node;
pub mod service;
pub mod volume;

/// Generated from `csi/csi.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("csi.v1");
}

pub use node::{CsiError, NodeOptions, NodePlugin};
pub use service::{CsiOptions, DRIVER_NAME, serve};
