//! fillfs: getting object-storage data onto Kubernetes volumes, fast and within a budget.
//!
//! The data path, in the order bytes flow (see ARCHITECTURE.md):
//! [`store`] (OpenDAL operator + retries, the only reader of objects) → [`limit`] (byte-rate
//! limiter paid per chunk inside the store) → [`cache`] (byte-bounded block cache) and
//! [`prefetch`] (per-handle read-ahead) → [`fs`] (file system logic) → [`fuse`] (kernel
//! adapter). [`mount`] wires them together for `fillfs mount`; [`populate`] copies a prefix
//! onto a volume through the same store and limiter.

pub mod artifact;
pub mod buffers;
pub mod cache;
pub mod controller;
pub mod csi;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod grpc_uds;
pub mod limit;
pub mod metrics;
pub mod mount;
pub mod mountinfo;
pub mod options;
pub mod populate;
pub mod prefetch;
pub mod store;
pub mod upload;

pub use error::{Error, Result};
