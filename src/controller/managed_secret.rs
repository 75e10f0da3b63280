//! The ManagedSecret reconciler: read the value (source store or a Secret), decide its
//! version, bring the source and every sync target to that version, materialize the native
//! Secret, record status. A failure changes no native Secret: it makes a condition, an Event
//! and a retry.

use super::Context;
use super::plan::{
    NativeAction, NativeObservation, StoreAction, StoreObservation, VersionDecision,
    decide_version, native_action, record_version, store_action,
};
use crate::api::{
    CreationPolicy, DeletionPolicy, ManagedSecret, ManagedSecretStatus, TargetStatus,
    VersionRecord, condition, now, parse_duration, set_condition,
};
use crate::backend::VersionStamp;
use crate::content::{self, MANAGED_SECRET_LABEL, native_secret_labels};
use crate::crypto::Fingerprint;
use crate::error::{Error, Result};
use crate::secret_data::SecretData;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::{Api, Resource, ResourceExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{Instrument, info, warn};

/// The finalizer that lets keyhaven apply the target's deletionPolicy.
pub const FINALIZER: &str = "keyhaven.io/cleanup";
const DEFAULT_REFRESH: Duration = Duration::from_secs(3600);
const VERSION_ANNOTATION: &str = "keyhaven.io/version";
const FINGERPRINT_ANNOTATION: &str = "keyhaven.io/fingerprint";

/// Reconciles one ManagedSecret, in a span naming it.
pub async fn reconcile(ms: Arc<ManagedSecret>, ctx: Arc<Context>) -> Result<Action> {
    let span = tracing::info_span!("reconcile", kind = "ManagedSecret", namespace = %ms.namespace().unwrap_or_default(), name = %ms.name_any());
    async move {
        let api: Api<ManagedSecret> =
            Api::namespaced(ctx.client.clone(), &ms.namespace().unwrap_or_default());
        finalizer(&api, FINALIZER, ms, |event| async {
            match event {
                FinalizerEvent::Apply(ms) => apply(&ms, &ctx).await,
                FinalizerEvent::Cleanup(ms) => cleanup(&ms, &ctx).await,
            }
        })
        .await
        .map_err(|e| match e {
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
            other => Error::Finalizer(other.to_string()),
        })
    }
    .instrument(span)
    .await
}

/// What a successful sync found and did.
struct Synced {
    decision: VersionDecision,
    record: Option<VersionRecord>,
    history_keep: usize,
    targets: Vec<TargetStatus>,
    native_written: bool,
    secret_name: String,
    /// The status the decision was made on (re-read from the API when a version was recorded).
    status: ManagedSecretStatus,
}

async fn apply(ms: &ManagedSecret, ctx: &Context) -> Result<Action> {
    match sync(ms, ctx).await {
        Ok(synced) => {
            let status = synced_status(ms, &synced);
            let failed: Vec<&TargetStatus> = synced
                .targets
                .iter()
                .filter(|t| t.state != "Synced")
                .collect();
            let version = synced.decision.version();
            match synced.decision {
                VersionDecision::New(v) => {
                    ctx.event(
                        ms,
                        EventType::Normal,
                        "VersionCreated",
                        &format!("version {v} recorded ({})", short(&synced.record)),
                    )
                    .await
                }
                VersionDecision::Adopt(v) => {
                    ctx.event(
                        ms,
                        EventType::Normal,
                        "VersionRecorded",
                        &format!("version {v}, written before a restart, recorded"),
                    )
                    .await
                }
                VersionDecision::Unchanged(_) => {}
            }
            if synced.native_written {
                ctx.event(
                    ms,
                    EventType::Normal,
                    "SecretSynced",
                    &format!("Secret {} holds version {version}", synced.secret_name),
                )
                .await;
            }
            if !failed.is_empty() {
                ctx.recheck_stores();
            }
            for t in &failed {
                let message = format!(
                    "store {}: {}",
                    t.store,
                    t.message.as_deref().unwrap_or("not synced")
                );
                ctx.event(ms, EventType::Warning, "TargetSyncFailed", &message)
                    .await;
            }
            patch_status(ms, ctx, status).await?;
            // A failed target is retried soon; the others are not held back by it.
            Ok(if failed.is_empty() {
                Action::requeue(jittered(refresh_interval(ms)))
            } else {
                Action::requeue(Duration::from_secs(15))
            })
        }
        Err(e) => {
            warn!(error = %e, "sync failed");
            ctx.store_failed(&e);
            let mut status = ms.status.clone().unwrap_or_default();
            status.phase = Some("Error".into());
            status.observed_generation = ms.metadata.generation;
            set_condition(
                &mut status.conditions,
                condition(
                    "Ready",
                    false,
                    e.reason(),
                    e.to_string(),
                    ms.metadata.generation,
                ),
            );
            ctx.event(ms, EventType::Warning, e.reason(), &e.to_string())
                .await;
            patch_status(ms, ctx, status).await?;
            Err(e)
        }
    }
}

fn short(record: &Option<VersionRecord>) -> String {
    record.as_ref().map_or_else(String::new, |r| {
        let fp = r.fingerprint.trim_start_matches("hmac-sha256:");
        format!(
            "fingerprint {}…, store {}",
            &fp[..fp.len().min(12)],
            r.store
        )
    })
}

async fn sync(ms: &ManagedSecret, ctx: &Context) -> Result<Synced> {
    let namespace = ms.namespace().unwrap_or_default();
    let profile = ctx.vault_profile(&ms.spec.profile).await?.ok_or_else(|| {
        Error::config(
            "ProfileNotFound",
            format!("VaultProfile {} does not exist", ms.spec.profile),
        )
    })?;
    let source_name = profile.spec.source.clone();
    let source = ctx.backend(&source_name).await?;
    let path = ms.store_path();
    let secret_type = ms.spec.type_;
    let fingerprint = |data: &SecretData| {
        ctx.keys
            .fingerprinter
            .fingerprint(secret_type.as_str(), data)
    };

    // Observe: the value, and what the source holds.
    let source_current = source.read(&path, None).await?;
    let (data, origin) = match (&ms.spec.content.from_store, &ms.spec.content.from_secret) {
        (Some(_), _) => match &source_current {
            Some(current) => (
                current.data.clone(),
                format!("read from store {source_name}"),
            ),
            None => {
                return Err(Error::config(
                    "NotFoundInStore",
                    format!("path {path} does not exist in store {source_name}"),
                ));
            }
        },
        (None, Some(from)) => (
            read_secret(ctx, &namespace, &from.name).await?,
            format!("pushed from Secret {}", from.name),
        ),
        (None, None) => {
            return Err(Error::config(
                "NoContentSource",
                "spec.content sets no source",
            ));
        }
    };
    content::validate(secret_type, &data)?;
    let fp = fingerprint(&data);
    let mut status = ms.status.clone().unwrap_or_default();
    let source_stamp = source_current.as_ref().and_then(|c| c.stamp.clone());
    let mut decision = decide_version(status.versions.last(), source_stamp.as_ref(), &fp);
    if decision != VersionDecision::Unchanged(decision.version()) {
        // The cached object may predate our own last status write (a watch event on the
        // native Secret can arrive first): decide again on the stored status before
        // recording a version.
        let api: Api<ManagedSecret> = Api::namespaced(ctx.client.clone(), &namespace);
        status = api
            .get_status(&ms.name_any())
            .await?
            .status
            .unwrap_or_default();
        decision = decide_version(status.versions.last(), source_stamp.as_ref(), &fp);
    }
    let version = decision.version();
    let stamp = VersionStamp {
        version,
        fingerprint: fp.clone(),
    };

    // The source first: a version exists once the source holds it.
    let source_obs = source_current.as_ref().map(|c| StoreObservation {
        stamp: c.stamp.clone(),
        content: fingerprint(&c.data),
    });
    let source_action = store_action(source_obs.as_ref(), version, &fp);
    let source_version = if source_action != StoreAction::InSync {
        source.write(&path, &stamp, &data).await?
    } else {
        source_current.as_ref().and_then(|c| c.store_version)
    };
    let mut targets = vec![TargetStatus {
        store: source_name.clone(),
        role: "Source".into(),
        version: Some(version),
        state: "Synced".into(),
        synced_at: synced_at(&status, &source_name, source_action != StoreAction::InSync),
        message: None,
    }];
    for target in &profile.spec.sync_targets {
        targets.push(sync_target(ms, ctx, &status, target, &path, &stamp, &data).await);
    }

    // The native Secret.
    let secret_name = ms.secret_name();
    let rendered = content::render(secret_type, &data);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let existing = secrets.get_opt(&secret_name).await?;
    let observed = observe_native(ms, existing.as_ref(), &rendered.data);
    let policy = ms.spec.target.creation_policy;
    let native_written = match native_action(
        &observed,
        policy,
        &secret_name,
        rendered.type_,
        version,
        &fp,
    ) {
        NativeAction::Unchanged => false,
        NativeAction::Refuse { reason, message } => return Err(Error::config(reason, message)),
        NativeAction::Apply => {
            let desired = desired_secret(
                ms,
                &secret_name,
                rendered.type_,
                &rendered.data,
                version,
                &fp,
            );
            secrets
                .patch(
                    &secret_name,
                    &PatchParams::apply(&ctx.config.field_manager).force(),
                    &Patch::Apply(&desired),
                )
                .await?;
            info!(secret = %secret_name, version, "native Secret applied");
            true
        }
    };

    let record = matches!(
        decision,
        VersionDecision::New(_) | VersionDecision::Adopt(_)
    )
    .then(|| VersionRecord {
        version,
        fingerprint: fp.to_string(),
        store: source_name.clone(),
        created_at: now(),
        created_by: author(ms),
        reason: Some(ms.spec.reason.clone().unwrap_or(origin)),
        store_version: source_version,
    });
    Ok(Synced {
        decision,
        record,
        history_keep: profile.spec.history_keep(),
        targets,
        native_written,
        secret_name,
        status,
    })
}

/// Brings one sync target to `stamp`; a failure is reported in its status, not raised,
/// so one store that is down does not hold back the others.
async fn sync_target(
    ms: &ManagedSecret,
    ctx: &Context,
    status: &ManagedSecretStatus,
    target: &str,
    path: &str,
    stamp: &VersionStamp,
    data: &SecretData,
) -> TargetStatus {
    let fingerprint = |data: &SecretData| {
        ctx.keys
            .fingerprinter
            .fingerprint(ms.spec.type_.as_str(), data)
    };
    let previous = status.targets.iter().find(|t| t.store == target);
    let result: Result<StoreAction> = async {
        let backend = ctx.backend(target).await?;
        let current = backend.read(path, None).await?;
        let obs = current.as_ref().map(|c| StoreObservation {
            stamp: c.stamp.clone(),
            content: fingerprint(&c.data),
        });
        let action = store_action(obs.as_ref(), stamp.version, &stamp.fingerprint);
        if action != StoreAction::InSync {
            backend.write(path, stamp, data).await?;
        }
        Ok(action)
    }
    .await;
    match result {
        Ok(action) => {
            if action == StoreAction::RepairDrift {
                let message = format!(
                    "store {target} held content other than version {} at {path}: rewritten",
                    stamp.version
                );
                ctx.event(ms, EventType::Warning, "DriftRepaired", &message)
                    .await;
            }
            TargetStatus {
                store: target.to_owned(),
                role: "SyncTarget".into(),
                version: Some(stamp.version),
                state: "Synced".into(),
                synced_at: synced_at(status, target, action != StoreAction::InSync),
                message: None,
            }
        }
        Err(e) => TargetStatus {
            store: target.to_owned(),
            role: "SyncTarget".into(),
            version: previous.and_then(|t| t.version),
            state: "Error".into(),
            synced_at: previous.and_then(|t| t.synced_at.clone()),
            message: Some(e.to_string()),
        },
    }
}

/// `syncedAt` moves only when a store was written, so an idle resync changes no status.
fn synced_at(
    status: &ManagedSecretStatus,
    store: &str,
    written: bool,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time> {
    let previous = status
        .targets
        .iter()
        .find(|t| t.store == store)
        .and_then(|t| t.synced_at.clone());
    if written || previous.is_none() {
        Some(now())
    } else {
        previous
    }
}

async fn read_secret(ctx: &Context, namespace: &str, name: &str) -> Result<SecretData> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret = api.get_opt(name).await?.ok_or_else(|| {
        Error::config(
            "SourceSecretNotFound",
            format!("Secret {namespace}/{name} (content.fromSecret) does not exist"),
        )
    })?;
    let mut data: SecretData = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in secret.string_data.iter().flatten() {
        data.insert(k.clone(), v.as_bytes().to_vec());
    }
    Ok(data)
}

fn observe_native(
    ms: &ManagedSecret,
    secret: Option<&Secret>,
    rendered: &SecretData,
) -> NativeObservation {
    let Some(secret) = secret else {
        return NativeObservation::default();
    };
    let annotations = secret.annotations();
    let data = secret.data.clone().unwrap_or_default();
    NativeObservation {
        exists: true,
        managed_by_us: secret.labels().get(MANAGED_SECRET_LABEL) == Some(&ms.name_any()),
        type_: secret.type_.clone(),
        fingerprint: annotations.get(FINGERPRINT_ANNOTATION).cloned(),
        version: annotations
            .get(VERSION_ANNOTATION)
            .and_then(|v| v.parse().ok()),
        data_matches: rendered
            .iter()
            .all(|(k, v)| data.get(k).is_some_and(|b| b.0 == v)),
        owned_by_us: secret
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == ms.metadata.uid.as_ref() && o.controller == Some(true)),
    }
}

/// The native Secret as keyhaven applies it. Under Merge, only keyhaven's keys, labels and
/// annotations (the Secret and its type belong to someone else).
fn desired_secret(
    ms: &ManagedSecret,
    name: &str,
    type_: &str,
    data: &SecretData,
    version: u64,
    fp: &Fingerprint,
) -> Secret {
    let spec = &ms.spec.target;
    let mut labels = spec.labels.clone();
    labels.extend(native_secret_labels(&ms.name_any()));
    let mut annotations = spec.annotations.clone();
    annotations.insert(VERSION_ANNOTATION.into(), version.to_string());
    annotations.insert(FINGERPRINT_ANNOTATION.into(), fp.to_string());
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: ms.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: (spec.creation_policy == CreationPolicy::Owner).then(|| {
                vec![
                    ms.controller_owner_ref(&())
                        .expect("a stored object has a uid"),
                ]
            }),
            ..Default::default()
        },
        type_: (spec.creation_policy != CreationPolicy::Merge).then(|| type_.to_owned()),
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_owned(), ByteString(v.to_vec())))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..Default::default()
    }
}

fn synced_status(ms: &ManagedSecret, synced: &Synced) -> ManagedSecretStatus {
    let mut status = synced.status.clone();
    if let Some(record) = &synced.record {
        record_version(&mut status.versions, record.clone(), synced.history_keep);
    }
    let version = synced.decision.version();
    let failed: Vec<&str> = synced
        .targets
        .iter()
        .filter(|t| t.state != "Synced")
        .map(|t| t.store.as_str())
        .collect();
    status.current_version = Some(version);
    status.targets = synced.targets.clone();
    status.secret_name = Some(synced.secret_name.clone());
    status.observed_generation = ms.metadata.generation;
    status.phase = Some(
        if failed.is_empty() {
            "Synced"
        } else {
            "Degraded"
        }
        .into(),
    );
    let generation = ms.metadata.generation;
    set_condition(
        &mut status.conditions,
        condition(
            "Ready",
            true,
            "SecretSynced",
            format!("Secret {} holds version {version}", synced.secret_name),
            generation,
        ),
    );
    let synced_condition = if failed.is_empty() {
        condition(
            "Synced",
            true,
            "AllStoresSynced",
            format!("every store holds version {version}"),
            generation,
        )
    } else {
        condition(
            "Synced",
            false,
            "TargetSyncFailed",
            format!("stores not at version {version}: {}", failed.join(", ")),
            generation,
        )
    };
    set_condition(&mut status.conditions, synced_condition);
    status
}

/// Writes status with server-side apply, only when it changed: an idle reconcile writes nothing.
async fn patch_status(
    ms: &ManagedSecret,
    ctx: &Context,
    status: ManagedSecretStatus,
) -> Result<()> {
    if ms.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<ManagedSecret> =
        Api::namespaced(ctx.client.clone(), &ms.namespace().unwrap_or_default());
    let body = serde_json::json!({
        "apiVersion": ManagedSecret::api_version(&()),
        "kind": ManagedSecret::kind(&()),
        "status": status,
    });
    api.patch_status(
        &ms.name_any(),
        &PatchParams::apply(&ctx.config.field_manager).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// Who changed the ManagedSecret's spec last: the field manager of its newest non-status update.
fn author(ms: &ManagedSecret) -> String {
    ms.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|f| f.subresource.is_none() && f.manager.as_deref() != Some("keyhaven"))
        .max_by_key(|f| f.time.as_ref().map(|t| t.0))
        .and_then(|f| f.manager.clone())
        .unwrap_or_else(|| "keyhaven".into())
}

fn refresh_interval(ms: &ManagedSecret) -> Duration {
    ms.spec
        .refresh_interval
        .as_deref()
        .and_then(|d| parse_duration(d).ok())
        .unwrap_or(DEFAULT_REFRESH)
}

/// ±10 % jitter, so secrets created together do not refresh together.
fn jittered(d: Duration) -> Duration {
    let factor = 0.9 + rand::random::<f64>() * 0.2;
    d.mul_f64(factor)
}

/// Applies the deletionPolicy to the native Secret. The stores keep every version.
async fn cleanup(ms: &ManagedSecret, ctx: &Context) -> Result<Action> {
    let namespace = ms.namespace().unwrap_or_default();
    let name = ms.secret_name();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(secret) = secrets.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    if secret.labels().get(MANAGED_SECRET_LABEL) != Some(&ms.name_any()) {
        return Ok(Action::await_change()); // not ours (any more)
    }
    let target = &ms.spec.target;
    match (target.deletion_policy, target.creation_policy) {
        // Owner + Delete: kube-controller-manager's garbage collector removes it.
        (DeletionPolicy::Delete, CreationPolicy::Owner) => {}
        (DeletionPolicy::Delete, CreationPolicy::Orphan) => {
            secrets.delete(&name, &DeleteParams::default()).await?;
            ctx.event(
                ms,
                EventType::Normal,
                "SecretDeleted",
                &format!("Secret {name} deleted (deletionPolicy Delete)"),
            )
            .await;
        }
        (DeletionPolicy::Delete, CreationPolicy::Merge) => {
            // Applying an empty intent drops every field keyhaven owns: its keys, labels, annotations.
            let empty = serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}});
            secrets
                .patch(
                    &name,
                    &PatchParams::apply(&ctx.config.field_manager).force(),
                    &Patch::Apply(&empty),
                )
                .await?;
            ctx.event(
                ms,
                EventType::Normal,
                "SecretKeysRemoved",
                &format!("keyhaven's keys removed from Secret {name}"),
            )
            .await;
        }
        (DeletionPolicy::Retain, CreationPolicy::Owner) => {
            // Drop our owner reference so the garbage collector leaves the Secret alone.
            let uid = ms.metadata.uid.clone().unwrap_or_default();
            let remaining: Vec<_> = secret
                .owner_references()
                .iter()
                .filter(|o| o.uid != uid)
                .cloned()
                .collect();
            let patch = serde_json::json!({"metadata": {"ownerReferences": remaining, "resourceVersion": secret.resource_version()}});
            secrets
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            ctx.event(
                ms,
                EventType::Normal,
                "SecretRetained",
                &format!("Secret {name} retained (deletionPolicy Retain)"),
            )
            .await;
        }
        (DeletionPolicy::Retain, _) => {}
    }
    Ok(Action::await_change())
}

/// How long to wait before retrying after `error`.
pub fn error_policy(_ms: Arc<ManagedSecret>, error: &Error, _ctx: Arc<Context>) -> Action {
    Action::requeue(if error.is_transient() {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(30)
    })
}
