//! Which way a fill pod reads the bucket: through the node plugin's FUSE volume (the node
//! path) or straight from the store (the direct path).
//!
//! - **Node path**: the fill pod mounts the bucket as a CSI inline volume served by the
//!   `fillfs csi` DaemonSet and runs `fillfs populate /source /target`. Fills on one node
//!   share the node's block cache (two claims of one prefix fetch it once) and its
//!   node-wide bandwidth cap. It needs the node plugin on the pod's node.
//! - **Direct path**: the fill pod runs `fillfs populate oss://BUCKET/PATH /target` itself,
//!   unprivileged, with the same limiter, retries and CRC-64 checks; credentials come as
//!   `ALIBABA_CLOUD_*` variables (RRSA through a projected service-account token with the
//!   STS audience, or the copied Secret). It gives up the node's shared cache and cap, and
//!   works anywhere a pod runs: serverless (ACS/ECI virtual nodes), where no DaemonSet runs,
//!   which is where the source article places fill pods.
//!
//! The choice is automatic ([`choose`]): direct when the pod is placed on virtual nodes
//! (ACK's ACS/ECI labels, a `type: virtual-kubelet` node selector, a virtual-kubelet
//! toleration) or when no node plugin is registered where the pod will run (CSINode);
//! node otherwise. The annotation `fillfs.io/fill-path: node|direct|auto` on the claim or
//! on the populator overrides it (the claim's wins).
//!
//! Owns that decision; it must not call the API (the caller says what CSINode shows).

use k8s_openapi::api::core::v1::PersistentVolumeClaim;

use super::crd::OSSVolumePopulator;

/// Annotation on a claim or a populator: `node`, `direct` or `auto` (the default).
pub const ANN_FILL_PATH: &str = "fillfs.io/fill-path";

/// How a fill pod reads the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillPath {
    /// Through the fillfs CSI node plugin (shared node cache, node-wide cap).
    Node,
    /// `fillfs populate oss://...` inside the fill pod.
    Direct,
}

impl FillPath {
    pub fn as_str(self) -> &'static str {
        match self {
            FillPath::Node => "node",
            FillPath::Direct => "direct",
        }
    }
}

/// What the cluster's CSINode objects say about the node plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginSeen {
    /// The claim's selected node has (true) or lacks (false) the node plugin.
    OnSelectedNode(bool),
    /// No node is chosen yet: whether any node has the plugin.
    OnAnyNode(bool),
}

/// The path and why, for the claim's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub path: FillPath,
    pub why: String,
}

/// Chooses the fill path; an unreadable override is an error (one sentence).
pub fn choose(
    pvc: &PersistentVolumeClaim,
    cr: &OSSVolumePopulator,
    seen: PluginSeen,
) -> Result<Choice, String> {
    for (what, annotations) in [
        ("the claim", pvc.metadata.annotations.as_ref()),
        ("the populator", cr.metadata.annotations.as_ref()),
    ] {
        let Some(v) = annotations.and_then(|a| a.get(ANN_FILL_PATH)) else {
            continue;
        };
        let path = match v.as_str() {
            "node" => FillPath::Node,
            "direct" => FillPath::Direct,
            "auto" | "" => continue,
            other => {
                return Err(format!(
                    "annotation {ANN_FILL_PATH}: {other:?} on {what} is not node, direct or auto"
                ));
            }
        };
        return Ok(Choice {
            path,
            why: format!("{ANN_FILL_PATH}: {v} on {what}"),
        });
    }
    if let Some(why) = virtual_placement(cr) {
        return Ok(Choice {
            path: FillPath::Direct,
            why: format!("the fill pod runs on virtual nodes ({why}), where no node plugin runs"),
        });
    }
    Ok(match seen {
        PluginSeen::OnSelectedNode(true) | PluginSeen::OnAnyNode(true) => Choice {
            path: FillPath::Node,
            why: "the fillfs node plugin is registered where the pod runs".into(),
        },
        PluginSeen::OnSelectedNode(false) => Choice {
            path: FillPath::Direct,
            why: "the claim's node has no fillfs node plugin (CSINode)".into(),
        },
        PluginSeen::OnAnyNode(false) => Choice {
            path: FillPath::Direct,
            why: "no node has the fillfs node plugin registered (CSINode)".into(),
        },
    })
}

/// The override annotations' problem, if any (checked with the claim, before anything is
/// created, so a bad value is reported once as the claim's problem).
pub fn check_override(pvc: &PersistentVolumeClaim, cr: &OSSVolumePopulator) -> Result<(), String> {
    choose(pvc, cr, PluginSeen::OnAnyNode(true)).map(|_| ())
}

/// Why the populator's placement puts fill pods on virtual (serverless) nodes, if it does.
pub fn virtual_placement(cr: &OSSVolumePopulator) -> Option<String> {
    let g = cr.spec.generic.as_ref()?;
    for key in ["alibabacloud.com/acs", "alibabacloud.com/eci"] {
        if g.labels.get(key).is_some_and(|v| v == "true") {
            return Some(format!("label {key}: \"true\""));
        }
    }
    if let Some(class) = g.labels.get("alibabacloud.com/compute-class") {
        return Some(format!("label alibabacloud.com/compute-class: {class:?}"));
    }
    if g.node_selector
        .get("type")
        .is_some_and(|v| v == "virtual-kubelet")
    {
        return Some("node selector type: virtual-kubelet".into());
    }
    if g.tolerations
        .iter()
        .any(|t| t.key.as_deref() == Some("virtual-kubelet.io/provider"))
    {
        return Some("toleration virtual-kubelet.io/provider".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cr(generic: serde_json::Value, annotations: serde_json::Value) -> OSSVolumePopulator {
        serde_json::from_value(json!({
            "apiVersion": "storage.alibabacloud.com/v1beta1", "kind": "OSSVolumePopulator",
            "metadata": {"name": "p", "namespace": "argo", "annotations": annotations},
            "spec": {"bucket": "bkt", "region": "cn-hangzhou", "generic": generic}
        }))
        .unwrap()
    }

    fn pvc(annotations: serde_json::Value) -> PersistentVolumeClaim {
        serde_json::from_value(json!({"metadata": {"name": "c", "annotations": annotations}}))
            .unwrap()
    }

    #[test]
    fn the_seed_placement_is_direct() {
        let c = cr(
            json!({"labels": {"alibabacloud.com/acs": "true", "alibabacloud.com/compute-class": "general-purpose"}}),
            json!({}),
        );
        let got = choose(&pvc(json!({})), &c, PluginSeen::OnAnyNode(true)).unwrap();
        assert_eq!(got.path, FillPath::Direct, "{}", got.why);
        assert!(got.why.contains("alibabacloud.com/acs"), "{}", got.why);
    }

    #[test]
    fn virtual_kubelet_selectors_and_tolerations_are_direct() {
        let by_selector = cr(
            json!({"nodeSelector": {"type": "virtual-kubelet"}}),
            json!({}),
        );
        let by_toleration = cr(
            json!({"tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists"}]}),
            json!({}),
        );
        for c in [by_selector, by_toleration] {
            let got = choose(&pvc(json!({})), &c, PluginSeen::OnAnyNode(true)).unwrap();
            assert_eq!(got.path, FillPath::Direct, "{}", got.why);
        }
    }

    #[test]
    fn csinode_decides_ordinary_placement() {
        let c = cr(json!({}), json!({}));
        let p = pvc(json!({}));
        let at = |seen| choose(&p, &c, seen).unwrap().path;
        assert_eq!(at(PluginSeen::OnSelectedNode(true)), FillPath::Node);
        assert_eq!(at(PluginSeen::OnSelectedNode(false)), FillPath::Direct);
        assert_eq!(at(PluginSeen::OnAnyNode(true)), FillPath::Node);
        assert_eq!(at(PluginSeen::OnAnyNode(false)), FillPath::Direct);
    }

    #[test]
    fn annotations_override_and_the_claim_wins() {
        let acs = json!({"labels": {"alibabacloud.com/acs": "true"}});
        let c = cr(acs.clone(), json!({ANN_FILL_PATH: "node"}));
        let seen = PluginSeen::OnAnyNode(true);
        assert_eq!(
            choose(&pvc(json!({})), &c, seen).unwrap().path,
            FillPath::Node
        );
        let claim = pvc(json!({ANN_FILL_PATH: "direct"}));
        assert_eq!(choose(&claim, &c, seen).unwrap().path, FillPath::Direct);
        let auto = pvc(json!({ANN_FILL_PATH: "auto"}));
        assert_eq!(choose(&auto, &c, seen).unwrap().path, FillPath::Node);
        let bad = pvc(json!({ANN_FILL_PATH: "fuse"}));
        let err = choose(&bad, &c, seen).unwrap_err();
        assert!(err.contains("\"fuse\"") && err.contains("claim"), "{err}");
    }
}
