//! One Vault login per store, shared by every operation: logged in on first use, renewed
//! when a third of its lease is left, replaced when it can no longer be renewed, when
//! `tokenRotate` says so, or when Vault stops accepting it; revoked on shutdown.

use super::transport::{self, CaBundle};
use super::{classify, error_chain};
use crate::api::{
    CaProvider, CaProviderType, SecretKeyRef, VaultAuth, VaultKubernetesAuth, VaultProvider,
    parse_duration,
};
use crate::backend::BackendError;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use kube::Api;
use kube::api::PostParams;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, OnceCell};
use tracing::{info, warn};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime asked for the ServiceAccount tokens presented to the kubernetes auth method:
/// they are used once, at login.
const SA_TOKEN_SECONDS: i64 = 600;
/// The audience of those tokens unless the store's `audiences` names others: a token meant
/// for Vault, which the API server itself and other services refuse.
pub(super) const DEFAULT_AUDIENCE: &str = "vault";

/// The audiences a kubernetes-auth login asks its ServiceAccount token for.
pub(super) fn token_audiences(k: &VaultKubernetesAuth) -> Vec<String> {
    if k.audiences.is_empty() {
        vec![DEFAULT_AUDIENCE.to_owned()]
    } else {
        k.audiences.clone()
    }
}

/// What a session needs from the operator: its Kubernetes client and identity.
#[derive(Clone)]
pub struct SessionSource {
    pub kube: kube::Client,
    pub operator_namespace: String,
    pub service_account: String,
}

pub(super) struct Session {
    store: String,
    server: String,
    namespace: Option<String>,
    ca: Option<CaProvider>,
    timeout: Duration,
    auth: VaultAuth,
    token_rotate: Option<Duration>,
    source: SessionSource,
    /// A client without a token: health checks and logins.
    anonymous: OnceCell<Arc<VaultClient>>,
    live: Mutex<Option<Live>>,
    logins: AtomicU64,
}

struct Live {
    client: Arc<VaultClient>,
    logged_in_at: Instant,
    /// `None`: the token does not expire (a root token).
    expires_at: Option<Instant>,
    /// The lease granted at login.
    lease: Duration,
    renewable: bool,
    /// keyhaven made this token by logging in, so it revokes it; a token given in a Secret
    /// belongs to the user and is never revoked.
    owned: bool,
}

impl Live {
    fn needs_renewal(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| now + self.lease / 3 >= at)
    }
}

impl Session {
    pub(super) fn new(
        store: &str,
        spec: &VaultProvider,
        source: SessionSource,
    ) -> Result<Self, BackendError> {
        let invalid = |message: String| BackendError::Invalid {
            store: store.to_owned(),
            message,
        };
        transport::check_scheme(spec).map_err(invalid)?;
        if spec.is_plaintext() {
            warn!(store, server = %spec.server, "insecureHTTP: talking to Vault in plaintext, token and values unencrypted");
        }
        let duration = |field: &str, value: &Option<String>| {
            value
                .as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(|e| invalid(format!("{field}: {e}")))
        };
        Ok(Session {
            store: store.to_owned(),
            server: spec.server.trim_end_matches('/').to_owned(),
            namespace: spec.namespace.clone(),
            ca: spec.ca_provider.clone(),
            timeout: duration("requestTimeout", &spec.request_timeout)?.unwrap_or(DEFAULT_TIMEOUT),
            auth: spec.auth.clone(),
            token_rotate: duration("tokenRotate", &spec.token_rotate)?,
            source,
            anonymous: OnceCell::new(),
            live: Mutex::new(None),
            logins: AtomicU64::new(0),
        })
    }

    pub(super) fn logins(&self) -> u64 {
        self.logins.load(Ordering::Relaxed)
    }

    /// The auth method, for status messages.
    pub(super) fn method(&self) -> String {
        match &self.auth {
            VaultAuth {
                token_secret_ref: Some(_),
                ..
            } => "a token".into(),
            VaultAuth {
                kubernetes: Some(k),
                ..
            } => format!("kubernetes auth as role {}", k.role),
            VaultAuth {
                app_role: Some(_), ..
            } => "AppRole".into(),
            _ => "no method".into(),
        }
    }

    fn invalid(&self, message: String) -> BackendError {
        BackendError::Invalid {
            store: self.store.clone(),
            message,
        }
    }

    /// The logged-in client, logging in or renewing first when needed.
    pub(super) async fn client(&self) -> Result<Arc<VaultClient>, BackendError> {
        let mut live = self.live.lock().await;
        let now = Instant::now();
        if let Some(current) = live.as_mut() {
            let rotate = self
                .token_rotate
                .is_some_and(|every| now >= current.logged_in_at + every);
            if !rotate && !current.needs_renewal(now) {
                return Ok(current.client.clone());
            }
            if !rotate && current.renewable && current.expires_at.is_some_and(|at| at > now) {
                match vaultrs::token::renew_self(current.client.as_ref(), None).await {
                    // A renewal capped by the token's max TTL is not worth keeping.
                    Ok(auth) if Duration::from_secs(auth.lease_duration) * 3 > current.lease => {
                        current.expires_at = Some(now + Duration::from_secs(auth.lease_duration));
                        return Ok(current.client.clone());
                    }
                    Ok(_) => {
                        info!(store = %self.store, "Vault token reached its max TTL: logging in again")
                    }
                    Err(e) => {
                        warn!(store = %self.store, error = %error_chain(&e), "renewing the Vault token failed: logging in again")
                    }
                }
            }
            if let Some(old) = live.take() {
                self.revoke_live(old);
            }
        }
        let fresh = self.login().await?;
        let client = fresh.client.clone();
        *live = Some(fresh);
        Ok(client)
    }

    /// After Vault refused a request with 401/403: if the session's token itself is no
    /// longer valid (revoked, expired early), drops it so the next call logs in again, and
    /// says so. A token that is valid but lacks a policy keeps its session: logging in
    /// again would not help.
    pub(super) async fn token_was_revoked(&self, used: &Arc<VaultClient>) -> bool {
        let mut live = self.live.lock().await;
        let Some(current) = live.as_ref() else {
            return true;
        };
        if !Arc::ptr_eq(&current.client, used) {
            return true; // someone already logged in again
        }
        match vaultrs::token::lookup_self(used.as_ref()).await {
            Err(ClientError::APIError {
                code: 401 | 403, ..
            }) => {
                warn!(store = %self.store, "Vault no longer accepts the token: logging in again");
                *live = None;
                true
            }
            _ => false,
        }
    }

    /// Revokes the token keyhaven logged in with, if any.
    pub(super) async fn revoke(&self) {
        if let Some(old) = self.live.lock().await.take()
            && old.owned
        {
            match vaultrs::token::revoke_self(old.client.as_ref()).await {
                Ok(()) => info!(store = %self.store, "Vault token revoked"),
                Err(e) => {
                    warn!(store = %self.store, error = %error_chain(&e), "revoking the Vault token failed")
                }
            }
        }
    }

    fn revoke_live(&self, old: Live) {
        if old.owned {
            tokio::spawn(async move {
                let _ = vaultrs::token::revoke_self(old.client.as_ref()).await;
            });
        }
    }

    async fn login(&self) -> Result<Live, BackendError> {
        let anonymous = self.anonymous().await?;
        let err = |e| classify(&self.store, "login", e);
        let now = Instant::now();
        let (token, lease, renewable, owned) = match &self.auth {
            VaultAuth {
                token_secret_ref: Some(r),
                ..
            } => {
                let token = self.secret_value(r).await?;
                let client = self.client_with_token(&token).await?;
                let me = vaultrs::token::lookup_self(&client).await.map_err(err)?;
                (token, me.ttl, me.renewable.unwrap_or(false), false)
            }
            VaultAuth {
                kubernetes: Some(k),
                ..
            } => {
                let jwt = self.service_account_token(k).await?;
                let mount = k.mount_path.as_deref().unwrap_or("kubernetes");
                let auth =
                    vaultrs::auth::kubernetes::login(anonymous.as_ref(), mount, &k.role, &jwt)
                        .await
                        .map_err(err)?;
                (auth.client_token, auth.lease_duration, auth.renewable, true)
            }
            VaultAuth {
                app_role: Some(a), ..
            } => {
                let role_id = match (&a.role_id, &a.role_ref) {
                    (Some(id), _) => id.clone(),
                    (None, Some(r)) => self.secret_value(r).await?,
                    (None, None) => {
                        return Err(self.invalid("appRole sets neither roleId nor roleRef".into()));
                    }
                };
                let secret_id = self.secret_value(&a.secret_ref).await?;
                let mount = a.path.as_deref().unwrap_or("approle");
                let auth =
                    vaultrs::auth::approle::login(anonymous.as_ref(), mount, &role_id, &secret_id)
                        .await
                        .map_err(err)?;
                (auth.client_token, auth.lease_duration, auth.renewable, true)
            }
            _ => return Err(self.invalid("auth sets no method".into())),
        };
        let n = self.logins.fetch_add(1, Ordering::Relaxed) + 1;
        info!(store = %self.store, method = %self.method(), lease_seconds = lease, logins = n, "logged in to Vault");
        Ok(Live {
            client: Arc::new(self.client_with_token(&token).await?),
            logged_in_at: now,
            expires_at: (lease > 0).then(|| now + Duration::from_secs(lease)),
            lease: Duration::from_secs(lease),
            renewable,
            owned,
        })
    }

    /// Asks `sys/health` whether the server is up, initialized and unsealed; describes it.
    pub(super) async fn server_health(&self) -> Result<String, BackendError> {
        let anonymous = self.anonymous().await?;
        let url = format!(
            "{}/v1/sys/health?standbyok=true&perfstandbyok=true&sealedcode=200&uninitcode=200",
            self.server
        );
        let unreachable = |message: String| BackendError::Unreachable {
            store: self.store.clone(),
            message,
        };
        let response = anonymous
            .http
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| unreachable(format!("{}: {}", self.server, error_chain(&e))))?;
        let code = response.status();
        let bytes = response.bytes().await.map_err(|e| {
            unreachable(format!("{}: sys/health: {}", self.server, error_chain(&e)))
        })?;
        let body: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            unreachable(format!(
                "{}: sys/health answered HTTP {code} without JSON: {e}",
                self.server
            ))
        })?;
        let version = body["version"].as_str().unwrap_or("unknown");
        if body["initialized"] == false {
            return Err(BackendError::Sealed {
                store: self.store.clone(),
                message: format!("server {version} at {} is not initialized", self.server),
            });
        }
        if body["sealed"] == true {
            return Err(BackendError::Sealed {
                store: self.store.clone(),
                message: format!("server {version} at {} is sealed", self.server),
            });
        }
        if !code.is_success() {
            return Err(unreachable(format!(
                "{}: sys/health answered HTTP {code}",
                self.server
            )));
        }
        Ok(format!("server {version} at {}", self.server))
    }

    async fn anonymous(&self) -> Result<Arc<VaultClient>, BackendError> {
        self.anonymous
            .get_or_try_init(|| async { self.client_with_token("").await.map(Arc::new) })
            .await
            .cloned()
    }

    /// A client for the server holding `token`. Its HTTP client is keyhaven's own
    /// ([`transport::http_client`]): vaultrs would read a CA bundle from a file only, and a
    /// CA bundle is kept in memory, never written anywhere.
    async fn client_with_token(&self, token: &str) -> Result<VaultClient, BackendError> {
        let ca = match &self.ca {
            Some(ca) => Some(self.ca_bundle(ca).await?),
            None => None,
        };
        let http = transport::http_client(&self.server, self.timeout, ca.as_ref())
            .map_err(|e| self.invalid(e))?;
        let mut settings = VaultClientSettingsBuilder::default();
        settings
            .address(&self.server)
            .token(token)
            .timeout(Some(self.timeout))
            .verify(true)
            .identity(None)
            .ca_certs(Vec::new());
        if let Some(ns) = &self.namespace {
            settings.set_namespace(ns.clone());
        }
        let settings = settings
            .build()
            .map_err(|e| self.invalid(format!("client settings: {e}")))?;
        let mut client = VaultClient::new(settings)
            .map_err(|e| self.invalid(format!("client: {}", error_chain(&e))))?;
        client.http.http = http;
        Ok(client)
    }

    /// The CA bundle `ca` names, read from its Secret or ConfigMap.
    async fn ca_bundle(&self, ca: &CaProvider) -> Result<CaBundle, BackendError> {
        let ns = ca
            .namespace
            .as_deref()
            .unwrap_or(&self.source.operator_namespace);
        let what = format!("CA bundle {:?} {ns}/{} key {}", ca.type_, ca.name, ca.key);
        let pem: Vec<u8> = match ca.type_ {
            CaProviderType::Secret => {
                let secret = Api::<Secret>::namespaced(self.source.kube.clone(), ns)
                    .get(&ca.name)
                    .await
                    .map_err(|e| self.invalid(format!("{what}: {e}")))?;
                secret
                    .data
                    .and_then(|d| d.get(&ca.key).map(|b| b.0.clone()))
                    .ok_or_else(|| self.invalid(format!("{what}: no such key")))?
            }
            CaProviderType::ConfigMap => {
                let map = Api::<ConfigMap>::namespaced(self.source.kube.clone(), ns)
                    .get(&ca.name)
                    .await
                    .map_err(|e| self.invalid(format!("{what}: {e}")))?;
                map.data
                    .and_then(|d| d.get(&ca.key).map(|s| s.clone().into_bytes()))
                    .ok_or_else(|| self.invalid(format!("{what}: no such key")))?
            }
        };
        Ok(CaBundle { what, pem })
    }

    /// A key of a Secret, as text. Errors name the Secret and key, never the value.
    async fn secret_value(&self, r: &SecretKeyRef) -> Result<String, BackendError> {
        let ns = r
            .namespace
            .as_deref()
            .unwrap_or(&self.source.operator_namespace);
        let what = format!("Secret {ns}/{} key {}", r.name, r.key);
        let secret = Api::<Secret>::namespaced(self.source.kube.clone(), ns)
            .get(&r.name)
            .await
            .map_err(|e| self.invalid(format!("{what}: {e}")))?;
        let bytes = secret
            .data
            .and_then(|mut d| d.remove(&r.key))
            .ok_or_else(|| self.invalid(format!("{what}: no such key")))?;
        String::from_utf8(bytes.0)
            .map(|s| s.trim().to_owned())
            .map_err(|_| self.invalid(format!("{what}: not UTF-8 text")))
    }

    /// A short-lived token of the ServiceAccount, from the TokenRequest API.
    async fn service_account_token(&self, k: &VaultKubernetesAuth) -> Result<String, BackendError> {
        let (name, ns) = match &k.service_account_ref {
            Some(r) => (
                r.name.as_str(),
                r.namespace
                    .as_deref()
                    .unwrap_or(&self.source.operator_namespace),
            ),
            None => (
                self.source.service_account.as_str(),
                self.source.operator_namespace.as_str(),
            ),
        };
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: token_audiences(k),
                expiration_seconds: Some(SA_TOKEN_SECONDS),
                bound_object_ref: None,
            },
            ..Default::default()
        };
        let answer = Api::<ServiceAccount>::namespaced(self.source.kube.clone(), ns)
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .map_err(|e| {
                self.invalid(format!("TokenRequest for ServiceAccount {ns}/{name}: {e}"))
            })?;
        answer.status.map(|s| s.token).ok_or_else(|| {
            self.invalid(format!(
                "TokenRequest for ServiceAccount {ns}/{name} returned no token"
            ))
        })
    }
}
