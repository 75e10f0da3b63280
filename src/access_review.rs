//! Whether the cluster's RBAC lets a user approve a ManagedSecret: a SubjectAccessReview,
//! asked by the admission webhook (refusing a decision) and by the reconciler (counting it).

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};
use tracing::warn;

/// The verb a decider needs on `managedsecrets` (group `keyhaven.io`).
pub const APPROVE_VERB: &str = "approve";

/// Whether the cluster's RBAC lets `user` (in `groups`) `approve` the ManagedSecret `name`
/// of `namespace`. An API error counts as no.
pub async fn may_approve(
    client: &Client,
    user: &str,
    groups: &[String],
    namespace: &str,
    name: &str,
) -> bool {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_owned()),
            groups: (!groups.is_empty()).then(|| groups.to_vec()),
            resource_attributes: Some(ResourceAttributes {
                group: Some(crate::api::GROUP.into()),
                resource: Some("managedsecrets".into()),
                verb: Some(APPROVE_VERB.into()),
                namespace: Some(namespace.to_owned()),
                name: Some(name.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    match Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
    {
        Ok(r) => r
            .status
            .is_some_and(|s| s.allowed && s.denied != Some(true)),
        Err(e) => {
            warn!(error = %e, "SubjectAccessReview failed: the decision is not counted");
            false
        }
    }
}
