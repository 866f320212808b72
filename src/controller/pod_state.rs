//! What a fill pod's status says, in words for the claim's events: why it ended, and why
//! it has not started. Read from the pod object alone (no API calls).
//!
//! Owns that reading; it must not decide retries (the state machine does).

use k8s_openapi::api::core::v1::{ContainerState, ContainerStateTerminated, Pod};

use super::objects::CONTAINER;

/// How a failed fill pod ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// The fill container's exit status, when it ran at all.
    pub exit: Option<i32>,
    /// One line: the last line of the termination message, or what the kubelet or the
    /// eviction said.
    pub message: String,
}

/// The fill container's state.
fn state(pod: &Pod) -> Option<&ContainerState> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == CONTAINER)?
        .state
        .as_ref()
}

fn terminated(pod: &Pod) -> Option<&ContainerStateTerminated> {
    state(pod)?.terminated.as_ref()
}

fn last_line(s: &str) -> &str {
    s.trim().lines().last().unwrap_or_default().trim()
}

/// Why a Failed pod failed.
pub fn ending(pod: &Pod) -> Ending {
    let status = pod.status.as_ref();
    let pod_reason = status.and_then(|s| s.reason.as_deref());
    let pod_message = status.and_then(|s| s.message.as_deref()).map(last_line);
    if let Some(t) = terminated(pod) {
        let message = match (t.message.as_deref().map(last_line), t.reason.as_deref()) {
            (Some(m), _) if !m.is_empty() => m.to_string(),
            (_, Some(r)) => format!("{r} (exit {})", t.exit_code),
            _ => format!("exit {} without a message", t.exit_code),
        };
        // An eviction or the deadline kills a running container: say so, not only "exit 137".
        let message = match pod_reason {
            Some(r) if r != "Error" => format!(
                "pod {r}: {}; the fill said: {message}",
                pod_message.unwrap_or_default()
            ),
            _ => message,
        };
        return Ending {
            exit: Some(t.exit_code),
            message,
        };
    }
    let message = match (pod_reason, pod_message) {
        (Some("DeadlineExceeded"), m) => format!(
            "the fill ran past its deadline (activeDeadlineSeconds {}){}",
            pod.spec
                .as_ref()
                .and_then(|s| s.active_deadline_seconds)
                .map_or("?".into(), |s| s.to_string()),
            m.map(|m| format!(": {m}")).unwrap_or_default()
        ),
        (Some(r), Some(m)) => format!("pod {r}: {m}"),
        (Some(r), None) => format!("pod {r}"),
        (None, Some(m)) => m.to_string(),
        (None, None) => "the pod failed without a reason (deleted or its node lost?)".into(),
    };
    Ending {
        exit: None,
        message,
    }
}

/// Container waiting reasons that will not go away by themselves.
const STUCK: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
    "CrashLoopBackOff",
];

/// Why a pod that has not finished is not running, if its status says: `(reason, note)`
/// for an event on the claim.
pub fn not_starting(pod: &Pod) -> Option<(&'static str, String)> {
    let status = pod.status.as_ref()?;
    if let Some(c) = status.conditions.as_ref().and_then(|cs| {
        cs.iter().find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        })
    }) {
        return Some((
            "FillPodUnschedulable",
            format!(
                "the fill pod cannot be scheduled: {}",
                c.message.as_deref().unwrap_or("no reason given")
            ),
        ));
    }
    let waiting = state(pod)?.waiting.as_ref()?;
    let reason = waiting.reason.as_deref()?;
    STUCK.contains(&reason).then(|| {
        (
            "FillPodNotStarting",
            format!(
                "the fill container is waiting: {reason}: {}",
                waiting.message.as_deref().unwrap_or("no message")
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "populate"}], "activeDeadlineSeconds": 3600},
            "status": status
        }))
        .unwrap()
    }

    #[test]
    fn an_eviction_says_so() {
        let p = pod(json!({"phase": "Failed", "reason": "Evicted",
            "message": "The node was low on resource: ephemeral-storage."}));
        let e = ending(&p);
        assert_eq!(e.exit, None);
        assert_eq!(
            e.message,
            "pod Evicted: The node was low on resource: ephemeral-storage."
        );
    }

    #[test]
    fn the_deadline_says_so() {
        let p = pod(json!({"phase": "Failed", "reason": "DeadlineExceeded",
            "message": "Pod was active on the node longer than the specified deadline"}));
        let e = ending(&p).message;
        assert!(e.contains("deadline (activeDeadlineSeconds 3600)"), "{e}");
    }

    #[test]
    fn a_failed_fill_gives_its_last_line_and_an_oom_its_reason() {
        let p = pod(json!({"phase": "Failed", "containerStatuses": [{
            "name": "populate", "ready": false, "restartCount": 0, "image": "x", "imageID": "",
            "state": {"terminated": {"exitCode": 2, "message": "a\nfillfs: error: no such bucket\n"}}}]}));
        assert_eq!(
            ending(&p),
            Ending {
                exit: Some(2),
                message: "fillfs: error: no such bucket".into()
            }
        );
        let p = pod(json!({"phase": "Failed", "containerStatuses": [{
            "name": "populate", "ready": false, "restartCount": 0, "image": "x", "imageID": "",
            "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}));
        assert_eq!(ending(&p).message, "OOMKilled (exit 137)");
    }

    #[test]
    fn image_pulls_and_scheduling_are_reported() {
        let p = pod(json!({"phase": "Pending", "containerStatuses": [{
            "name": "populate", "ready": false, "restartCount": 0, "image": "x", "imageID": "",
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"x\""}}}]}));
        let (reason, note) = not_starting(&p).unwrap();
        assert_eq!(reason, "FillPodNotStarting");
        assert!(
            note.contains("ImagePullBackOff") && note.contains("Back-off"),
            "{note}"
        );
        let p = pod(
            json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
            "status": "False", "reason": "Unschedulable", "message": "0/3 nodes are available"}]}),
        );
        assert_eq!(not_starting(&p).unwrap().0, "FillPodUnschedulable");
        let p = pod(json!({"phase": "Pending", "containerStatuses": [{
            "name": "populate", "ready": false, "restartCount": 0, "image": "x", "imageID": "",
            "state": {"waiting": {"reason": "ContainerCreating"}}}]}));
        assert_eq!(not_starting(&p), None);
    }
}
