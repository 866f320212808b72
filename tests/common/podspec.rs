//! Reading pod specs the way kubelet and the container runtime do: which uid and gid a
//! container really runs as (container securityContext, else the pod's, else the image's
//! `USER`), and the image's default user from our Dockerfile.
#![allow(dead_code)]

use std::path::Path;

use k8s_openapi::api::core::v1::{Container, PodSpec};

/// Our image, whatever its tag.
pub const OUR_IMAGE: &str = "ghcr.io/fillfs/fillfs:";

/// The `USER uid:gid` of the Dockerfile's final stage (the image's default user).
pub fn dockerfile_user() -> (i64, i64) {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    let last_stage = text.rsplit("\nFROM ").next().unwrap();
    let user = last_stage
        .lines()
        .filter_map(|l| l.trim().strip_prefix("USER "))
        .next_back()
        .unwrap_or("0");
    let mut parts = user.trim().split(':');
    let uid: i64 = parts.next().unwrap().parse().expect("numeric USER");
    let gid: i64 = parts
        .next()
        .map_or(uid, |g| g.parse().expect("numeric group"));
    (uid, gid)
}

/// The uid and gid a container of `pod` runs as. Images other than ours must be given a
/// user explicitly: their default is not ours to know.
pub fn effective_user(pod: &PodSpec, c: &Container) -> (i64, i64) {
    let csc = c.security_context.as_ref();
    let psc = pod.security_context.as_ref();
    let image = c.image.as_deref().unwrap_or_default();
    // busybox images set no USER: root.
    let busybox = image
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .starts_with("busybox:");
    let default = if image.starts_with(OUR_IMAGE) {
        Some(dockerfile_user())
    } else if busybox {
        Some((0, 0))
    } else {
        None
    };
    let uid = csc
        .and_then(|s| s.run_as_user)
        .or(psc.and_then(|s| s.run_as_user))
        .or(default.map(|d| d.0))
        .unwrap_or_else(|| panic!("container {}: image {image} with no runAsUser", c.name));
    let gid = csc
        .and_then(|s| s.run_as_group)
        .or(psc.and_then(|s| s.run_as_group))
        .or(default.map(|d| d.1))
        .unwrap_or(uid);
    (uid, gid)
}

pub fn privileged(c: &Container) -> bool {
    c.security_context
        .as_ref()
        .and_then(|s| s.privileged)
        .unwrap_or(false)
}

pub fn run_as_non_root(pod: &PodSpec, c: &Container) -> bool {
    c.security_context
        .as_ref()
        .and_then(|s| s.run_as_non_root)
        .or(pod
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_non_root))
        .unwrap_or(false)
}
