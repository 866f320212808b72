//! The Argo Workflows artifact driver plugin: Argo's `ArtifactService` (vendored from
//! argo-workflows `pkg/apiclient/artifact/artifact.proto`, see `proto/argo/NOTES.md`) over
//! a unix socket, on fillfs's engine. Argo runs the plugin image with the socket path as
//! its one argument, as an init container or sidecar of workflow pods (Load, Save), in its
//! GC pods (Delete) and next to argo-server (OpenStream, ListObjects, IsDirectory,
//! SaveStream).
//!
//! - `config.rs`: the `configuration` string → store, cap, part size, jobs.
//! - `service.rs`: each RPC → store operations: Load through populate's engine (one object
//!   raw into the path, or a prefix as a directory fill), Save and SaveStream through the
//!   upload engine ([`crate::upload::Uploader`]: parts checked, resumable), Delete
//!   of a key or prefix (batched, idempotent), OpenStream from ranged reads with bounded
//!   read-ahead paced by the client.
//!
//! It must not move bytes itself: every byte goes through [`crate::store::Store`] (and its
//! limiter and retries), the populate engine and the upload engine.

pub mod config;
pub mod service;

/// Types and services generated from Argo's `artifact.proto`.
pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("artifact");
}
