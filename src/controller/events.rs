//! Events on the user's claim: what `kubectl describe pvc` shows of a fill.
//!
//! kube-runtime's `Recorder` groups events by reason and keeps the first note, so a second
//! attempt's failure, or the final "giving up", would show as the first attempt's note
//! with a higher count. Here every distinct (claim, reason, note) is its own
//! `events.k8s.io/v1` Event; the same note again within [`REPEAT_AFTER`] is not sent twice
//! (a poll every 10 s must not write an event every 10 s), after that it is sent again (the
//! API server forgets events after an hour). Notes are cut to the API's 1 KiB limit, which
//! would otherwise reject them.
//!
//! Owns event writing and its de-duplication; it must not decide what happened.

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff;
use kube::api::{Api, PostParams};
use kube::{Client, Resource};

/// The API server refuses notes longer than this many bytes.
pub const MAX_NOTE: usize = 1024;
/// A note already published for a claim is published again only after this long.
pub const REPEAT_AFTER: Duration = Duration::from_secs(30 * 60);
/// `reportingController` of our events.
pub const REPORTER: &str = "fillfs.io/populator";

/// Normal or Warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Normal,
    Warning,
}

/// Publishes events on objects (claims), each distinct note once per [`REPEAT_AFTER`].
#[derive(Clone)]
pub struct Events {
    client: Client,
    instance: String,
    seen: moka::future::Cache<(String, String, String), ()>,
}

impl Events {
    pub fn new(client: Client, instance: impl Into<String>) -> Self {
        Events {
            client,
            instance: instance.into(),
            seen: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(REPEAT_AFTER)
                .build(),
        }
    }

    /// Publishes one event on `obj`; a failure is logged, never returned (an event is
    /// never worth failing a reconcile for).
    pub async fn publish<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        kind: Kind,
        reason: &str,
        note: &str,
    ) {
        let regarding = obj.object_ref(&());
        let note = cut_note(note);
        let key = (
            regarding.uid.clone().unwrap_or_default(),
            reason.to_string(),
            note.clone(),
        );
        if self.seen.contains_key(&key) {
            return;
        }
        let ns = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let ev = event(&regarding, kind, reason, &note, &self.instance);
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        match api.create(&PostParams::default(), &ev).await {
            Ok(_) => self.seen.insert(key, ()).await,
            Err(e) => {
                tracing::warn!(object = ?regarding.name, reason, error = %e, "could not publish event")
            }
        }
    }
}

/// The Event object (a generated name: the API picks the suffix).
pub fn event(
    regarding: &ObjectReference,
    kind: Kind,
    reason: &str,
    note: &str,
    instance: &str,
) -> Event {
    let base: String = regarding
        .name
        .clone()
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{base}.")),
            namespace: regarding.namespace.clone(),
            ..Default::default()
        },
        event_time: Some(MicroTime(jiff::Timestamp::now())),
        action: Some("Populate".into()),
        reason: Some(reason.into()),
        note: Some(note.into()),
        type_: Some(
            match kind {
                Kind::Normal => "Normal",
                Kind::Warning => "Warning",
            }
            .into(),
        ),
        regarding: Some(regarding.clone()),
        reporting_controller: Some(REPORTER.into()),
        reporting_instance: Some(instance.into()),
        ..Default::default()
    }
}

/// `note` within the API's limit, cut at a character boundary with "..." when too long.
pub fn cut_note(note: &str) -> String {
    if note.len() <= MAX_NOTE {
        return note.to_string();
    }
    let mut end = MAX_NOTE - 3;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &note[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_notes_are_cut_to_the_limit_on_a_character_boundary() {
        assert_eq!(cut_note("short"), "short");
        let long = "é".repeat(2000);
        let cut = cut_note(&long);
        assert!(
            cut.len() <= MAX_NOTE && cut.ends_with("..."),
            "{}",
            cut.len()
        );
        assert!(cut.len() >= MAX_NOTE - 4);
    }
}
