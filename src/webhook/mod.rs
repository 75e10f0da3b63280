//! The admission webhook `keyhaven run --webhook-addr` serves over TLS: `/mutate` records
//! who asked for each ManagedSecret change ([`identity`]), `/validate` refuses what the CRD
//! schema and CEL cannot ([`validate`]). Every replica serves it (leader or not), with the
//! certificate [`certs`] keeps in the operator's namespace. It is registered for keyhaven's
//! own kinds only, so a keyhaven outage never blocks Secrets, Namespaces or workloads.

pub mod approvals;
pub mod certs;
pub mod identity;
pub mod validate;

use crate::api::ManagedSecret;
use crate::profiles::NamespaceInfo;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use axum::{Json, Router};
use axum_server::tls_rustls::RustlsConfig;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::ListParams;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::{Api, Client, ResourceExt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// How the webhook is served.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    pub addr: SocketAddr,
    /// The operator's namespace: its certificate Secret lives there.
    pub namespace: String,
    /// The Service the API server calls it through (its DNS names go in the certificate).
    pub service: Option<String>,
    /// Further names or addresses for the certificate (e.g. 127.0.0.1 when called by URL).
    pub hosts: Vec<String>,
    /// The Validating/MutatingWebhookConfiguration whose `caBundle` keyhaven keeps current.
    pub config_name: Option<String>,
    /// Serve the certificate another issuer keeps in this Secret of `namespace`
    /// (cert-manager) instead of issuing one.
    pub cert_secret: Option<String>,
}

impl WebhookConfig {
    /// The certificate in force: issued and renewed by keyhaven, or read from `cert_secret`.
    async fn certificate(&self, client: &Client) -> crate::error::Result<certs::Stored> {
        match &self.cert_secret {
            Some(name) => certs::external(client, &self.namespace, name).await,
            None => {
                let subject =
                    certs::Subject::new(self.service.as_deref(), &self.namespace, &self.hosts);
                certs::ensure(client, &self.namespace, &subject).await
            }
        }
    }
}

/// How often the certificate and the configurations' `caBundle` are checked.
const CHECK_EVERY: Duration = Duration::from_secs(10);
/// The largest AdmissionReview accepted (an object is at most ~1.5 MiB, old and new).
const MAX_REVIEW_BYTES: usize = 8 * 1024 * 1024;

struct Shared {
    client: Client,
    /// Where refusals and admitted deletions are recorded.
    audit: crate::audit::Audit,
    /// The operator's own user name (a SelfSubjectReview at start): the only one, besides
    /// `system:masters`, that may remove keyhaven's finalizer or record a deletion's requester.
    me: Option<String>,
}

/// Who this process is to the API server.
async fn own_user(client: &Client) -> Option<String> {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let review = Api::<SelfSubjectReview>::all(client.clone())
        .create(
            &kube::api::PostParams::default(),
            &SelfSubjectReview::default(),
        )
        .await;
    match review {
        Ok(r) => r.status?.user_info?.username,
        Err(e) => {
            warn!(error = %e, "webhook: SelfSubjectReview failed: only system:masters may remove keyhaven's finalizer");
            None
        }
    }
}

/// Whether `user` is this operator or a cluster admin (`system:masters`).
fn is_operator_or_admin(
    shared: &Shared,
    user: &kube::core::admission::AdmissionRequest<DynamicObject>,
) -> bool {
    let info = &user.user_info;
    info.username.is_some() && info.username == shared.me
        || info.groups.iter().flatten().any(|g| g == "system:masters")
}

/// Starts the webhook: issues or loads its certificate, patches the `caBundle`, serves until
/// `shutdown`, and renews the certificate in place as it nears expiry.
pub async fn serve(
    config: WebhookConfig,
    client: Client,
    audit: crate::audit::Audit,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> crate::error::Result<tokio::task::JoinHandle<()>> {
    let stored = config.certificate(&client).await?;
    let tls = RustlsConfig::from_pem(
        stored.cert.clone().into_bytes(),
        stored.key.as_bytes().to_vec(),
    )
    .await
    .map_err(|e| tls_error(format!("loading the serving certificate: {e}")))?;
    if let Some(name) = &config.config_name
        && let Err(e) = certs::patch_ca_bundles(&client, name, &stored.ca_bundle).await
    {
        warn!(error = %e, "webhook: could not patch caBundle yet; retrying");
    }
    let app = Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES))
        .with_state(Arc::new(Shared {
            client: client.clone(),
            me: own_user(&client).await,
            audit,
        }));
    let handle = axum_server::Handle::new();
    let server = axum_server::bind_rustls(config.addr, tls.clone()).handle(handle.clone());
    let addr = config.addr;
    let serving = tokio::spawn(async move {
        if let Err(e) = server.serve(app.into_make_service()).await {
            warn!(error = %e, %addr, "webhook server stopped");
        }
    });
    let renewing = tokio::spawn(keep_current(config.clone(), client, tls, stored));
    let stop = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        renewing.abort();
        stop.graceful_shutdown(Some(Duration::from_secs(5)));
    });
    // Log the bound address (an ephemeral port in tests).
    if let Some(bound) = handle.listening().await {
        info!(addr = %bound, "admission webhook listening");
    }
    Ok(serving)
}

fn tls_error(message: String) -> crate::error::Error {
    crate::error::Error::config(crate::api::Reason::WebhookCertificateFailed, message)
}

/// Renews the certificate when due (reloaded into the listener in place) and keeps the
/// configurations' `caBundle` current (a re-applied configuration has an empty one).
async fn keep_current(
    config: WebhookConfig,
    client: Client,
    tls: RustlsConfig,
    mut current: certs::Stored,
) {
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        match config.certificate(&client).await {
            Ok(stored) if stored != current => {
                match tls
                    .reload_from_pem(
                        stored.cert.clone().into_bytes(),
                        stored.key.as_bytes().to_vec(),
                    )
                    .await
                {
                    Ok(()) => {
                        info!("webhook: serving certificate reloaded");
                        current = stored;
                    }
                    Err(e) => warn!(error = %e, "webhook: reloading the certificate failed"),
                }
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "webhook: checking the certificate failed"),
        }
        if let Some(name) = &config.config_name
            && let Err(e) = certs::patch_ca_bundles(&client, name, &current.ca_bundle).await
        {
            warn!(error = %e, "webhook: patching caBundle failed");
        }
    }
}

/// The request of a review, or the response refusing an unreadable one.
fn request(
    review: AdmissionReview<DynamicObject>,
) -> Result<AdmissionRequest<DynamicObject>, Box<AdmissionResponse>> {
    review.try_into().map_err(|e| {
        Box::new(AdmissionResponse::invalid(format!(
            "malformed AdmissionReview: {e}"
        )))
    })
}

/// The object of a request as JSON.
fn json_of(object: &Option<DynamicObject>) -> Option<serde_json::Value> {
    object.as_ref().and_then(|o| serde_json::to_value(o).ok())
}

/// `object` as a ManagedSecret, or what is wrong with it (the field path first).
fn managed(object: &serde_json::Value) -> Result<ManagedSecret, String> {
    serde_path_to_error::deserialize(object).map_err(|e| format!("{}: {}", e.path(), e.inner()))
}

fn is_managed_secret(req: &AdmissionRequest<DynamicObject>) -> bool {
    req.kind.group == "keyhaven.io" && req.kind.kind == "ManagedSecret"
}

fn is_approval(req: &AdmissionRequest<DynamicObject>) -> bool {
    req.kind.group == "keyhaven.io" && req.kind.kind == "SecretApproval"
}

async fn mutate(
    State(shared): State<Arc<Shared>>,
    Json(review): Json<AdmissionReview<DynamicObject>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let req = match request(review) {
        Ok(r) => r,
        Err(resp) => return Json(resp.into_review()),
    };
    let resp = AdmissionResponse::from(&req);
    let (Some(new), true) = (
        json_of(&req.object),
        is_managed_secret(&req) || is_approval(&req),
    ) else {
        return Json(resp.into_review());
    };
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return Json(resp.into_review());
    }
    let old = json_of(&req.old_object);
    let stamped = match is_approval(&req) {
        true => approvals::stamp(new.clone(), old.as_ref(), &req.user_info),
        false => {
            let stamped = identity::stamp(new.clone(), old.as_ref(), &req.user_info);
            // Only this operator records who deleted a ManagedSecret.
            match is_operator_or_admin(&shared, &req) {
                true => stamped,
                false => identity::keep_deletion_requester(stamped, old.as_ref()),
            }
        }
    };
    let patch = json_patch::diff(&new, &stamped);
    let resp = match resp.clone().with_patch(patch) {
        Ok(r) => r,
        Err(e) => resp.deny(format!("keyhaven webhook: {e}")),
    };
    Json(resp.into_review())
}

async fn validate(
    State(shared): State<Arc<Shared>>,
    Json(review): Json<AdmissionReview<DynamicObject>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let req = match request(review) {
        Ok(r) => r,
        Err(resp) => return Json(resp.into_review()),
    };
    let resp = AdmissionResponse::from(&req);
    let resp = match (is_managed_secret(&req), json_of(&req.object)) {
        (true, Some(new)) => {
            let old = json_of(&req.old_object);
            if let Some(old) = &old
                && identity::drops_finalizer(&new, old)
                && !is_operator_or_admin(&shared, &req)
            {
                return Json(
                    resp.deny(format!(
                        "metadata.finalizers: {} is removed by keyhaven only (it holds a deletion until its cleanup or approval is done)",
                        crate::labels::CLEANUP_FINALIZER
                    ))
                    .into_review(),
                );
            }
            check_managed(&shared.client, &req, &new, old.as_ref(), resp).await
        }
        (true, None) if req.operation == Operation::Delete && !req.dry_run => {
            record_deleter(&shared.client, &req).await;
            resp
        }
        (false, Some(new)) if is_approval(&req) && req.operation == Operation::Create => {
            check_approval(&shared.client, &req, &new, resp).await
        }
        _ => resp,
    };
    audit_admission(&shared.audit, &req, &resp).await;
    Json(resp.into_review())
}

/// Records a refusal (who was refused what) and an admitted ManagedSecret deletion.
async fn audit_admission(
    audit: &crate::audit::Audit,
    req: &AdmissionRequest<DynamicObject>,
    resp: &AdmissionResponse,
) {
    use crate::audit::{Action, Outcome, Record};
    if req.dry_run || !audit.enabled() {
        return;
    }
    let name = match req.name.is_empty() {
        false => req.name.clone(),
        true => req
            .object
            .as_ref()
            .and_then(|o| o.metadata.name.clone())
            .unwrap_or_default(),
    };
    let user = req.user_info.username.clone().unwrap_or_default();
    let namespace = req.namespace.clone().unwrap_or_default();
    let record = |action| Record::new(action, &user, &namespace, &name).kind(&req.kind.kind);
    let op = format!("{:?}", req.operation).to_lowercase();
    let records = if !resp.allowed {
        vec![
            record(Action::Refused)
                .outcome(Outcome::Denied)
                .reason(format!("admission: {op}: {}", resp.result.message)),
        ]
    } else if req.operation == Operation::Delete && is_managed_secret(req) {
        vec![record(Action::Delete).reason("deletion admitted")]
    } else {
        return;
    };
    if let Err(e) = audit.record(records).await {
        warn!(error = %e, "admission audit record could not be written");
    }
}

/// A ManagedSecret create, or an update that asks for something; other updates (the
/// operator's finalizer, labels) and deletions pass, so a deletion never gets stuck on a
/// profile deleted meanwhile.
async fn check_managed(
    client: &Client,
    req: &AdmissionRequest<DynamicObject>,
    new: &serde_json::Value,
    old: Option<&serde_json::Value>,
    resp: AdmissionResponse,
) -> AdmissionResponse {
    let deleting = new
        .get("metadata")
        .and_then(|m| m.get("deletionTimestamp"))
        .is_some_and(|t| !t.is_null());
    if req.operation != Operation::Create && (deleting || !identity::is_request(new, old)) {
        return resp;
    }
    let ms = match managed(new) {
        Ok(ms) => ms,
        Err(e) => return resp.deny(e),
    };
    let namespace = req
        .namespace
        .clone()
        .or_else(|| ms.namespace())
        .unwrap_or_default();
    let facts = match gather(client, &namespace, &ms).await {
        Ok(f) => f,
        Err(e) => return resp.deny(format!("keyhaven could not check this ManagedSecret: {e}")),
    };
    let (ns, profiles, issuer) = facts;
    let facts = validate::Facts {
        namespace: &ns,
        profiles: &profiles,
        issuer: issuer.as_ref(),
    };
    let (refused, warnings) = validate::managed_secret(&ms, &facts);
    let mut resp = resp;
    if !warnings.is_empty() {
        resp.warnings = Some(warnings);
    }
    match refused.is_empty() {
        true => resp,
        false => resp.deny(
            refused
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        ),
    }
}

/// Records who deletes a ManagedSecret that keyhaven's finalizer holds (a deletion cannot
/// be mutated): the annotation the approval gate names as the deletion's requester.
async fn record_deleter(client: &Client, req: &AdmissionRequest<DynamicObject>) {
    let Some(old) = &req.old_object else { return };
    let held = old
        .metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == crate::labels::CLEANUP_FINALIZER);
    let (Some(user), Some(ns), true) = (&req.user_info.username, &req.namespace, held) else {
        return;
    };
    let patch = serde_json::json!({"metadata": {"annotations": {
        crate::labels::DELETION_REQUESTED_BY_ANNOTATION: user}}});
    if let Err(e) = Api::<ManagedSecret>::namespaced(client.clone(), ns)
        .patch(
            &req.name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
    {
        warn!(error = %e, "webhook: recording who deletes a ManagedSecret failed");
    }
}

/// A new SecretApproval: refused unless its decider may decide the secret's open request.
async fn check_approval(
    client: &Client,
    req: &AdmissionRequest<DynamicObject>,
    new: &serde_json::Value,
    resp: AdmissionResponse,
) -> AdmissionResponse {
    let approval: crate::api::SecretApproval = match serde_path_to_error::deserialize(new) {
        Ok(a) => a,
        Err(e) => return resp.deny(format!("{}: {}", e.path(), e.inner())),
    };
    let namespace = req.namespace.clone().unwrap_or_default();
    let name = approval.spec.secret_ref.name.clone();
    let ms = match Api::<ManagedSecret>::namespaced(client.clone(), &namespace)
        .get_opt(&name)
        .await
    {
        Ok(ms) => ms,
        Err(e) => return resp.deny(format!("keyhaven could not read ManagedSecret {name}: {e}")),
    };
    let user = req.user_info.username.clone().unwrap_or_default();
    let groups = req.user_info.groups.clone().unwrap_or_default();
    let may = crate::access_review::may_approve(client, &user, &groups, &namespace, &name).await;
    match approvals::refusal(&approval, ms.as_ref(), &user, may, jiff::Timestamp::now()) {
        Some(why) => resp.deny(why),
        None => resp,
    }
}

/// The namespace, the profiles, and the issuer a ManagedSecret is checked against.
async fn gather(
    client: &Client,
    namespace: &str,
    ms: &ManagedSecret,
) -> Result<
    (
        NamespaceInfo,
        Vec<crate::api::VaultProfile>,
        Option<ManagedSecret>,
    ),
    kube::Error,
> {
    let found = Api::<Namespace>::all(client.clone()).get(namespace).await?;
    let ns = NamespaceInfo {
        name: namespace.to_owned(),
        labels: found.labels().clone(),
        annotations: found.annotations().clone(),
    };
    let profiles = Api::<crate::api::VaultProfile>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let issuer = match ms
        .spec
        .content
        .generate
        .as_ref()
        .and_then(|g| g.issuer_ref.as_ref())
    {
        Some(r) => {
            Api::<ManagedSecret>::namespaced(client.clone(), namespace)
                .get_opt(&r.name)
                .await?
        }
        None => None,
    };
    Ok((ns, profiles, issuer))
}
