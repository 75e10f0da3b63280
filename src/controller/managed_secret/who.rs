//! Who a version is recorded as made by (pure).

use crate::api::{ManagedSecret, ManagedSecretStatus};
use crate::labels::REQUESTED_BY_ANNOTATION;
use kube::ResourceExt;

/// Who a version is recorded as created by: `system:keyhaven` for what keyhaven does on
/// its own (a scheduled rotation, a refresh that found new content), else who asked for
/// the ManagedSecret's current spec or rotate request — the user the admission webhook
/// recorded when `verified` (this operator serves the webhook that writes it), or else the
/// field manager of the newest spec change (unverified: any client names its own).
pub fn author(ms: &ManagedSecret, status: &ManagedSecretStatus, verified: bool) -> String {
    // A rotate request counts for a generated secret only, and only while it is set and not
    // yet acted on (removing the annotation asks for nothing).
    let rotate_asked = ms.spec.content.generate.is_some()
        && ms.rotate_request().is_some()
        && ms.rotate_request() != status.rotate_request;
    let asked = status.versions.is_empty()
        || status.observed_generation != ms.metadata.generation
        || rotate_asked;
    if !asked {
        return SYSTEM_AUTHOR.into();
    }
    if verified && let Some(user) = ms.annotations().get(REQUESTED_BY_ANNOTATION) {
        return user.clone();
    }
    let touches_spec = |f: &&k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry| {
        f.fields_v1
            .as_ref()
            .is_some_and(|v| v.0.get("f:spec").is_some())
    };
    ms.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|f| f.subresource.is_none() && f.manager.as_deref() != Some("keyhaven"))
        .filter(touches_spec)
        .max_by_key(|f| f.time.as_ref().map(|t| t.0))
        .and_then(|f| f.manager.clone())
        .unwrap_or_else(|| SYSTEM_AUTHOR.into())
}

/// `createdBy` of the versions keyhaven makes on its own.
pub const SYSTEM_AUTHOR: &str = crate::audit::SYSTEM_ACTOR;
