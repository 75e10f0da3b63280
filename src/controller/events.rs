//! Events keyhaven publishes about its objects. A note must never contain a secret value.

use crate::api::Reason;
use kube::Client;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tracing::warn;

/// An Event to publish: decided by a pure function, published by [`Events::publish_all`].
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    pub type_: EventType,
    pub reason: Reason,
    pub text: String,
}

impl Note {
    pub fn normal(reason: Reason, text: impl Into<String>) -> Self {
        Note {
            type_: EventType::Normal,
            reason,
            text: text.into(),
        }
    }

    pub fn warning(reason: Reason, text: impl Into<String>) -> Self {
        Note {
            type_: EventType::Warning,
            reason,
            text: text.into(),
        }
    }
}

/// Publishes Events as the operator's reporter.
pub struct Events {
    client: Client,
    reporter: Reporter,
    /// Folds a repeated Warning into a series (kube's recorder keeps each for six minutes).
    warnings: Recorder,
}

impl Events {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Events {
            warnings: Recorder::new(client.clone(), reporter.clone()),
            client,
            reporter,
        }
    }

    /// Publishes each of `notes` about `obj`, in order.
    pub async fn publish_all<K: Resource<DynamicType = ()>>(&self, obj: &K, notes: &[Note]) {
        for n in notes {
            self.publish(obj, n.type_, n.reason, &n.text).await;
        }
    }

    /// Publishes an Event about `obj`; a failure to publish is logged, not raised.
    pub async fn publish<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: Reason,
        note: &str,
    ) {
        let ev = event(type_, reason, note);
        // Normal events say something new each time (a version, a Secret): a recorder of
        // their own keeps nothing, where the shared one would hold every event of a sync of
        // thousands of secrets for six minutes.
        let published = match type_ {
            EventType::Warning => self.warnings.publish(&ev, &obj.object_ref(&())).await,
            EventType::Normal => {
                Recorder::new(self.client.clone(), self.reporter.clone())
                    .publish(&ev, &obj.object_ref(&()))
                    .await
            }
        };
        if let Err(e) = published {
            warn!(error = %e, %reason, "could not publish an event");
        }
    }
}

/// The Event for `note`. kube's recorder folds events with the same key into one series
/// and keeps the first note; the key has no note, so "version 2 recorded" would show as a
/// repeat of "version 1 recorded". A digest of the note in the action folds only events
/// that say the same thing.
fn event(type_: EventType, reason: Reason, note: &str) -> Event {
    use sha2::{Digest, Sha256};
    let digest = hex::encode(&Sha256::digest(note.as_bytes())[..4]);
    Event {
        type_,
        reason: reason.as_str().into(),
        note: Some(note.into()),
        action: format!("Reconcile-{digest}"),
        secondary: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_events_that_say_the_same_thing_fold() {
        let one = event(
            EventType::Normal,
            Reason::VersionCreated,
            "version 1 recorded",
        );
        let two = event(
            EventType::Normal,
            Reason::VersionCreated,
            "version 2 recorded",
        );
        let again = event(
            EventType::Normal,
            Reason::VersionCreated,
            "version 1 recorded",
        );
        assert_ne!(one.action, two.action);
        assert_eq!(one.action, again.action);
        assert_eq!(one.reason, "VersionCreated");
    }
}
