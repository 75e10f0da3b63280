//! The ManagedSecret reconciler: read the value (source store or a Secret), decide its
//! version, bring the source and every sync target to that version, materialize the native
//! Secret, record status. A failure changes no native Secret: it makes a condition, an Event
//! and a retry.

use super::Context;
use super::plan::{
    Expiry, GenerateDecision, NativeAction, NativeObservation, RestartDecision, RotationInput,
    StoreAction, StoreObservation, Stored, VersionDecision, decide_generate, decide_version,
    expiry, native_action, next_rotation, record_version, restart_decision, rollback_source,
    store_action,
};
use crate::api::{
    CreationPolicy, DeletionPolicy, ManagedSecret, ManagedSecretStatus, RolloutRestartTarget,
    SecretType, TargetStatus, VaultProfile, VersionRecord, WorkloadKind, condition, now,
    parse_duration, set_condition,
};
use crate::backend::VersionStamp;
use crate::content::{self, MANAGED_SECRET_LABEL, native_secret_labels};
use crate::crypto::Fingerprint;
use crate::error::{Error, Result};
use crate::profiles;
use crate::secret_data::SecretData;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
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
/// Any new value of this annotation on a generated ManagedSecret rotates it now.
pub const ROTATE_ANNOTATION: &str = "keyhaven.io/rotate";
/// Set on the pod template of each rolloutRestartTarget when the native Secret changes.
pub const RESTARTED_AT_ANNOTATION: &str = "keyhaven.io/restartedAt";
const DEFAULT_EXPIRY_WARNING: Duration = Duration::from_secs(720 * 3600);

/// Reconciles one ManagedSecret, in a span naming it.
pub async fn reconcile(ms: Arc<ManagedSecret>, ctx: Arc<Context>) -> Result<Action> {
    let span = tracing::info_span!("reconcile", kind = "ManagedSecret", namespace = %ms.namespace().unwrap_or_default(), name = %ms.name_any());
    async move {
        // Without a cleanup to do (the default: the garbage collector deletes the Secret
        // the ManagedSecret owns), no finalizer: it would cost a write and a reconcile on
        // every creation and deletion. One already there is honoured.
        if !needs_cleanup(&ms) && !ms.finalizers().iter().any(|f| f == FINALIZER) {
            if ms.metadata.deletion_timestamp.is_some() {
                ctx.status_forget(&ms);
                return Ok(Action::await_change());
            }
            return apply(&ms, &ctx).await;
        }
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
    /// The VaultProfile used (`spec.profile` or the namespace's).
    profile: String,
    /// How it was chosen.
    via: profiles::Via,
    decision: VersionDecision,
    record: Option<VersionRecord>,
    history_keep: usize,
    targets: Vec<TargetStatus>,
    native_written: bool,
    secret_name: String,
    /// The status the decision was made on (re-read from the API when a version was recorded).
    status: ManagedSecretStatus,
    /// When the value expires, for the types that can.
    expires_at: Option<jiff::Timestamp>,
    /// The rotate annotation value acted on (None: leave status as it is).
    rotate_request: Option<String>,
    /// Workloads restarted (`Kind/name`), and those that do not exist.
    restarted: Vec<String>,
    missing_workloads: Vec<String>,
    /// The version the workloads now run with (None: leave status as it is).
    restarted_version: Option<u64>,
    /// When a scheduled rotation is next due.
    next_rotation: Option<jiff::Timestamp>,
}

/// Whether `ms` has not been synced at its current generation yet (new, or its spec
/// changed within [`BACKLOG_WINDOW`]): such objects go before periodic refreshes. The
/// window bounds the deferral: one that never manages to record a status (a bug, an API
/// server refusing it) stops holding refreshes back after it.
pub(super) fn awaits_sync(ms: &ManagedSecret, now: jiff::Timestamp) -> bool {
    let changed = ms
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|f| f.subresource.is_none())
        .filter_map(|f| f.time.as_ref().map(|t| t.0))
        .chain(ms.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .max();
    ms.metadata.deletion_timestamp.is_none()
        && ms.status.as_ref().and_then(|s| s.observed_generation) != ms.metadata.generation
        && changed.is_some_and(|t| now.duration_since(t).unsigned_abs() < BACKLOG_WINDOW)
}

/// How long a new or changed ManagedSecret counts as waiting for its first sync.
const BACKLOG_WINDOW: Duration = Duration::from_secs(600);

/// How long a refresh steps aside while new or changed ManagedSecrets wait.
const YIELD: Duration = Duration::from_secs(5);

/// Whether this reconcile is only a periodic refresh (nothing in the object asks for work)
/// that should wait: new and changed ManagedSecrets go first, so that thousands of
/// refreshes falling due at once never starve them.
fn yields(ms: &ManagedSecret, ctx: &Context) -> bool {
    let settled = ms.status.as_ref().and_then(|s| s.observed_generation) == ms.metadata.generation
        && ms.status.as_ref().is_some_and(|s| {
            s.phase.as_deref() == Some("Synced")
                && ms.annotations().get(ROTATE_ANNOTATION) == s.rotate_request.as_ref()
        });
    settled && ctx.backlog() > 0
}

async fn apply(ms: &ManagedSecret, ctx: &Context) -> Result<Action> {
    if yields(ms, ctx) {
        ctx.metrics.refresh_deferred();
        return Ok(Action::requeue(jittered(YIELD)));
    }
    // A migration of the profile moves this secret's versions first (its status is then
    // the one stored); a failed one is retried soon, while the sync goes on.
    // The profile is resolved once; a failure to resolve is the sync's to report.
    let resolved = resolve_profile(ms, ctx).await;
    let migrated = match &resolved {
        Ok((profile, _)) => super::migration::step(ms, ctx, profile).await?,
        Err(_) => None,
    };
    let migration_failed = migrated.as_ref().is_some_and(|(_, failed)| *failed);
    let ms = migrated.as_ref().map_or(ms, |(ms, _)| ms);
    match sync(ms, ctx, resolved).await {
        Ok(synced) => {
            let status = synced_status(ms, &synced);
            let failed: Vec<&TargetStatus> =
                synced.targets.iter().filter(|t| failed_target(t)).collect();
            let version = synced.decision.version();
            // One event says what this sync did: the version recorded and, when it was
            // written too, the Secret that holds it.
            let holds = if synced.native_written {
                format!("; Secret {} holds it", synced.secret_name)
            } else {
                String::new()
            };
            match synced.decision {
                VersionDecision::New(v) => {
                    ctx.metrics.version_written(&synced.profile);
                    ctx.event(
                        ms,
                        EventType::Normal,
                        "VersionCreated",
                        &format!("version {v} recorded ({}){holds}", short(&synced.record)),
                    )
                    .await
                }
                VersionDecision::Adopt(v) => {
                    ctx.event(
                        ms,
                        EventType::Normal,
                        "VersionRecorded",
                        &format!("version {v}, written before a restart, recorded{holds}"),
                    )
                    .await
                }
                VersionDecision::Unchanged(_) if synced.native_written => {
                    ctx.event(
                        ms,
                        EventType::Normal,
                        "SecretSynced",
                        &format!("Secret {} holds version {version}", synced.secret_name),
                    )
                    .await;
                }
                VersionDecision::Unchanged(_) => {}
            }
            if !synced.restarted.is_empty() {
                ctx.event(
                    ms,
                    EventType::Normal,
                    "RolloutRestarted",
                    &format!(
                        "restarted {} for version {version}",
                        synced.restarted.join(", ")
                    ),
                )
                .await;
            }
            for w in &synced.missing_workloads {
                ctx.event(
                    ms,
                    EventType::Warning,
                    "RolloutTargetNotFound",
                    &format!("rolloutRestartTargets: {w} does not exist"),
                )
                .await;
            }
            if let Some(c) = status.conditions.iter().find(|c| c.type_ == "Expiring")
                && c.status == "True"
            {
                let before = ms
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.iter().find(|o| o.type_ == "Expiring"));
                if before.is_none_or(|b| b.status != "True" || b.reason != c.reason) {
                    ctx.event(ms, EventType::Warning, &c.reason, &c.message)
                        .await;
                }
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
            let wake = wake_after(ms, &synced);
            patch_status(ms, ctx, status).await?;
            // A failed target is retried soon; the others are not held back by it.
            Ok(if failed.is_empty() && !migration_failed {
                Action::requeue(wake)
            } else {
                Action::requeue(Duration::from_secs(15))
            })
        }
        Err(e) => {
            warn!(error = %e, "sync failed");
            ctx.store_failed(&e);
            // From the API server, not the cache: the cache may not hold our last status
            // write yet, and writing it back would drop the version that write recorded.
            let mut status = match stored_status(ms, ctx).await {
                Ok(stored) => stored,
                Err(_) => ms.status.clone().unwrap_or_default(),
            };
            if RESOLUTION_REASONS.contains(&e.reason()) {
                status.profile = None;
            }
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

/// The state of a source that holds no version yet after a switch.
const PENDING: &str = "Pending";

/// Whether a store failed to take the current version.
fn failed_target(t: &TargetStatus) -> bool {
    t.state != "Synced" && t.state != PENDING
}

/// Whether a source holds nothing newer than the version `last` recorded elsewhere: nothing,
/// or an older version keyhaven wrote (a store switched back to). A value without a stamp
/// (written by hand) is new content, not older.
fn holds_older(source: Option<&crate::backend::StoredVersion>, last: &VersionRecord) -> bool {
    match source {
        None => true,
        Some(c) => c.stamp.as_ref().is_some_and(|s| s.version < last.version),
    }
}

/// The current version as kept in the store `last` was recorded in, checked against its
/// fingerprint; None when that store no longer holds it.
async fn carried_version(
    ctx: &Context,
    path: &str,
    last: &VersionRecord,
    fingerprint: &impl Fn(&SecretData) -> Fingerprint,
) -> Result<Option<crate::backend::StoredVersion>> {
    let backend = ctx.backend(&last.store).await?;
    let Some(stored) = backend.read(path, Some(last.version)).await? else {
        return Ok(None);
    };
    if fingerprint(&stored.data).as_str() != last.fingerprint {
        return Err(Error::config(
            "VersionMismatch",
            format!(
                "store {} holds content for version {} other than its recorded fingerprint",
                last.store, last.version
            ),
        ));
    }
    Ok(Some(stored))
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

/// Condition reasons of a ManagedSecret whose profile cannot be resolved.
const RESOLUTION_REASONS: &[&str] = &[
    "ProfileNotFound",
    "ProfileNotAllowed",
    "DefaultProfileConflict",
    "FallbackProfileConflict",
    "NoProfile",
    "NamespaceNotFound",
];

/// The VaultProfile `ms` uses: [`profiles::resolve`] of its `spec.profile`, its namespace's
/// labels and annotations, and the profiles this operator manages. A refusal is confirmed
/// on a fresh list of the profiles (the cache may not hold one created a moment ago).
async fn resolve_profile(
    ms: &ManagedSecret,
    ctx: &Context,
) -> Result<(Arc<VaultProfile>, profiles::Via)> {
    let ns = ctx
        .namespace_info(&ms.namespace().unwrap_or_default())
        .await?;
    let requested = ms.spec.profile.as_deref();
    let cached = ctx.profiles.state();
    if let Ok(resolved) = profiles::resolve(requested, &ns, cached.iter().map(|p| p.as_ref()))
        && let Some(p) = cached.iter().find(|p| p.name_any() == resolved.profile)
    {
        return Ok((p.clone(), resolved.via));
    }
    let fresh = ctx.list_profiles().await?;
    let resolved = profiles::resolve(requested, &ns, &fresh)
        .map_err(|r| Error::config(r.reason, r.message))?;
    let profile = fresh
        .into_iter()
        .find(|p| p.name_any() == resolved.profile)
        .expect("resolve returns a listed profile");
    Ok((Arc::new(profile), resolved.via))
}

async fn sync(
    ms: &ManagedSecret,
    ctx: &Context,
    resolved: Result<(Arc<VaultProfile>, profiles::Via)>,
) -> Result<Synced> {
    let namespace = ms.namespace().unwrap_or_default();
    let (profile, via) = resolved?;
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
    let mut status = ms.status.clone().unwrap_or_default();
    // After a switch (a new source, or a new profile), the current version stays readable
    // from the store it was written to; the new source gets the next version. Nothing
    // moves until the profile's migrateFrom asks.
    let carried = match status.versions.last() {
        Some(last) if last.store != source_name && holds_older(source_current.as_ref(), last) => {
            carried_version(ctx, &path, last, &fingerprint).await?
        }
        _ => None,
    };
    let current = match &carried {
        Some(_) => carried.as_ref(),
        None => source_current.as_ref(),
    };
    let current_origin = match (&carried, status.versions.last()) {
        (Some(_), Some(last)) => format!(
            "read from store {} (version {}, kept there after the source changed)",
            last.store, last.version
        ),
        _ => format!("read from store {source_name}"),
    };
    let rotate_annotation = ms.annotations().get(ROTATE_ANNOTATION).cloned();
    let rotation_interval = ms
        .spec
        .rotation
        .as_ref()
        .and_then(|r| r.interval.as_deref())
        .and_then(|d| parse_duration(d).ok());
    fn rotation_input<'a>(
        interval: Option<Duration>,
        requested: Option<&'a str>,
        status: &'a ManagedSecretStatus,
    ) -> RotationInput<'a> {
        RotationInput {
            interval,
            latest_created: status.versions.last().map(|r| r.created_at.0),
            requested,
            handled: status.rotate_request.as_deref(),
        }
    }

    let rules = content::Rules {
        secret_key_bytes: ms
            .spec
            .content
            .generate
            .as_ref()
            .and_then(|g| g.bytes)
            .map(|b| b as usize),
        password: profile.spec.password_policy,
    };
    // The reason recorded for a rotation or rollback, whatever spec.reason says.
    let mut forced_reason: Option<String> = None;
    let mut rotate_request = None;
    let (data, origin) = match (
        ms.spec.rollback_to,
        &ms.spec.content.from_store,
        &ms.spec.content.from_secret,
        &ms.spec.content.generate,
    ) {
        (Some(n), ..) => {
            let (store, recorded) = rollback_source(&status.versions, n, &source_name);
            let backend = ctx.backend(store).await?;
            let stored = backend.read(&path, Some(n)).await?.ok_or_else(|| {
                Error::config(
                    "RollbackVersionNotFound",
                    format!("rollbackTo: version {n} does not exist in store {store} at {path}"),
                )
            })?;
            if let Some(recorded) = recorded
                && fingerprint(&stored.data).as_str() != recorded
            {
                return Err(Error::config(
                    "RollbackVersionMismatch",
                    format!(
                        "rollbackTo: store {store} holds content for version {n} other than its recorded fingerprint"
                    ),
                ));
            }
            forced_reason = Some(
                ms.spec
                    .reason
                    .clone()
                    .unwrap_or_else(|| format!("rollback to version {n}")),
            );
            (stored.data.clone(), format!("rollback to version {n}"))
        }
        (None, None, None, Some(spec)) => {
            let stored = match current {
                None => Stored::Absent,
                Some(c) if content::validate_with(secret_type, &c.data, rules).is_ok() => {
                    Stored::Valid
                }
                Some(_) => Stored::Invalid,
            };
            let mut decision = decide_generate(
                stored,
                &rotation_input(rotation_interval, rotate_annotation.as_deref(), &status),
                jiff::Timestamp::now(),
            );
            if decision != GenerateDecision::UseStored && current.is_some() {
                // A rotation: decide again on the stored status, so that a cache older than
                // our last status write does not rotate twice.
                status = stored_status(ms, ctx).await?;
                decision = decide_generate(
                    stored,
                    &rotation_input(rotation_interval, rotate_annotation.as_deref(), &status),
                    jiff::Timestamp::now(),
                );
            }
            rotate_request = rotate_annotation.clone();
            match (decision, current) {
                (GenerateDecision::UseStored, Some(current)) => {
                    (current.data.clone(), current_origin.clone())
                }
                (GenerateDecision::Generate { reason }, current) => {
                    if current.is_some() {
                        forced_reason = Some(reason.clone());
                    }
                    let issuer = match &spec.issuer_ref {
                        Some(r) if secret_type == SecretType::Certificate => {
                            Some(issuer_value(ctx, &namespace, &r.name).await?)
                        }
                        _ => None,
                    };
                    (
                        content::generate_with(secret_type, spec, &ms.name_any(), issuer.as_ref())?,
                        reason,
                    )
                }
                (GenerateDecision::UseStored, None) => {
                    unreachable!("nothing stored means generate")
                }
            }
        }
        (None, Some(_), ..) => match current {
            Some(current) => (current.data.clone(), current_origin.clone()),
            None => {
                return Err(Error::config(
                    "NotFoundInStore",
                    format!("path {path} does not exist in store {source_name}"),
                ));
            }
        },
        (None, None, Some(from), _) => (
            read_secret(ctx, &namespace, &from.name).await?,
            format!("pushed from Secret {}", from.name),
        ),
        (None, None, None, None) => {
            return Err(Error::config(
                "NoContentSource",
                "spec.content sets no source",
            ));
        }
    };
    let inspected = content::validate_with(secret_type, &data, rules)?;
    // Rendered before anything is written: a template that does not fit stores nothing.
    let mut rendered = content::render(secret_type, &data);
    if let Some(template) = &ms.spec.target.template {
        content::apply_template(&mut rendered, template, &data)?;
    }
    let fp = fingerprint(&data);
    let source_stamp = current.and_then(|c| c.stamp.clone());
    let mut decision = decide_version(status.versions.last(), source_stamp.as_ref(), &fp);
    if decision != VersionDecision::Unchanged(decision.version()) {
        // The cached object may predate our own last status write (a watch event on the
        // native Secret can arrive first): decide again on the stored status before
        // recording a version.
        status = stored_status(ms, ctx).await?;
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
    // A version kept in the previous store stays there: the new source waits for the next.
    let kept_elsewhere = carried
        .is_some()
        .then(|| status.versions.last().map(|r| r.store.clone()))
        .flatten()
        .filter(|_| matches!(decision, VersionDecision::Unchanged(_)));
    let source_action = match kept_elsewhere {
        Some(_) => StoreAction::InSync,
        None => store_action(source_obs.as_ref(), version, &fp),
    };
    let source_version = if source_action != StoreAction::InSync {
        source.write(&path, &stamp, &data).await?
    } else {
        current.and_then(|c| c.store_version)
    };
    let mut targets = vec![match &kept_elsewhere {
        None => TargetStatus {
            store: source_name.clone(),
            role: "Source".into(),
            version: Some(version),
            state: "Synced".into(),
            synced_at: synced_at(&status, &source_name, source_action != StoreAction::InSync),
            message: None,
        },
        Some(previous) => TargetStatus {
            store: source_name.clone(),
            role: "Source".into(),
            version: None,
            state: PENDING.into(),
            synced_at: None,
            message: Some(format!(
                "version {version} stays in store {previous} (written before the source changed); the next version is written here, or migrateFrom: {previous} moves them"
            )),
        },
    }];
    for target in &profile.spec.sync_targets {
        targets.push(sync_target(ms, ctx, &status, target, &path, &stamp, &data).await);
    }

    // The native Secret.
    let secret_name = ms.secret_name();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let existing = secrets.get_opt(&secret_name).await?;
    let native_existed = existing.is_some();
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
            let written = secrets
                .patch(
                    &secret_name,
                    &PatchParams::apply(&ctx.config.field_manager).force(),
                    &Patch::Apply(&desired),
                )
                .await?;
            ctx.wrote_secret(&written);
            info!(secret = %secret_name, version, "native Secret applied");
            true
        }
    };

    // Workloads that consume the Secret follow its content.
    let targets_spec = &ms.spec.rollout_restart_targets;
    let mut restart = restart_decision(
        !targets_spec.is_empty(),
        native_existed,
        status.restarted_version,
        version,
    );
    if restart == RestartDecision::Restart {
        // Decide on the stored status: a stale cache must not restart twice.
        status = stored_status(ms, ctx).await?;
        restart = restart_decision(true, native_existed, status.restarted_version, version);
    }
    let (mut restarted, mut missing_workloads) = (vec![], vec![]);
    if restart == RestartDecision::Restart {
        let at = jiff::Timestamp::now().to_string();
        for target in targets_spec {
            let name = format!("{:?}/{}", target.kind, target.name);
            if restart_workload(ctx, &namespace, target, &at).await? {
                info!(workload = %name, version, "rollout restarted");
                restarted.push(name);
            } else {
                missing_workloads.push(name);
            }
        }
    }
    let restarted_version = (restart != RestartDecision::Nothing).then_some(version);

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
        reason: Some(
            forced_reason
                .clone()
                .unwrap_or_else(|| ms.spec.reason.clone().unwrap_or(origin)),
        ),
        store_version: source_version,
        moved_from: None,
    });
    let next_rotation = match (&ms.spec.content.generate, ms.spec.rollback_to) {
        (Some(_), None) => next_rotation(&RotationInput {
            latest_created: Some(
                record
                    .as_ref()
                    .map(|r| r.created_at.0)
                    .or_else(|| status.versions.last().map(|r| r.created_at.0))
                    .unwrap_or_else(jiff::Timestamp::now),
            ),
            ..rotation_input(rotation_interval, rotate_annotation.as_deref(), &status)
        }),
        _ => None,
    };
    Ok(Synced {
        profile: profile.name_any(),
        via,
        decision,
        record,
        history_keep: profile.spec.history_keep(),
        targets,
        native_written,
        secret_name,
        status,
        expires_at: inspected.expires_at,
        rotate_request,
        restarted,
        missing_workloads,
        restarted_version,
        next_rotation,
    })
}

/// The current value of the CA ManagedSecret `name` (type certificate), read from its
/// profile's source store and validated.
async fn issuer_value(ctx: &Context, namespace: &str, name: &str) -> Result<SecretData> {
    let api: Api<ManagedSecret> = Api::namespaced(ctx.client.clone(), namespace);
    let issuer = api.get_opt(name).await?.ok_or_else(|| {
        Error::config(
            "IssuerNotFound",
            format!("issuerRef: ManagedSecret {name} does not exist"),
        )
    })?;
    if issuer.spec.type_ != SecretType::Certificate {
        return Err(Error::config(
            "IssuerNotCertificate",
            format!("issuerRef: ManagedSecret {name} is not of type certificate"),
        ));
    }
    let issuer_profile = issuer
        .spec
        .profile
        .clone()
        .or_else(|| issuer.status.as_ref().and_then(|s| s.profile.clone()))
        .unwrap_or_default();
    let profile = ctx.vault_profile(&issuer_profile).await?.ok_or_else(|| {
        Error::config(
            "IssuerNotReady",
            format!("issuerRef: the VaultProfile of ManagedSecret {name} does not exist"),
        )
    })?;
    let store = ctx.backend(&profile.spec.source).await?;
    let value = store
        .read(&issuer.store_path(), None)
        .await?
        .ok_or_else(|| {
            Error::config(
                "IssuerNotReady",
                format!("issuerRef: ManagedSecret {name} has no value yet"),
            )
        })?;
    content::validate(SecretType::Certificate, &value.data).map_err(|e| {
        Error::config(
            "IssuerNotReady",
            format!("issuerRef: ManagedSecret {name}: {e}"),
        )
    })?;
    Ok(value.data)
}

/// The status as stored, not as cached: the cached one when it holds this process's last
/// status write, else read from the API server.
pub(super) async fn stored_status(
    ms: &ManagedSecret,
    ctx: &Context,
) -> Result<ManagedSecretStatus> {
    if ctx.holds_status_written(ms) {
        return Ok(ms.status.clone().unwrap_or_default());
    }
    let api: Api<ManagedSecret> =
        Api::namespaced(ctx.client.clone(), &ms.namespace().unwrap_or_default());
    Ok(api
        .get_status(&ms.name_any())
        .await?
        .status
        .unwrap_or_default())
}

/// Sets the restart annotation on a workload's pod template (as `kubectl rollout restart`
/// does). False when the workload does not exist.
async fn restart_workload(
    ctx: &Context,
    namespace: &str,
    target: &RolloutRestartTarget,
    at: &str,
) -> Result<bool> {
    let patch = Patch::Merge(serde_json::json!({
        "spec": {"template": {"metadata": {"annotations": {RESTARTED_AT_ANNOTATION: at}}}}
    }));
    let pp = PatchParams {
        field_manager: Some(ctx.config.field_manager.clone()),
        ..Default::default()
    };
    let client = ctx.client.clone();
    let result = match target.kind {
        WorkloadKind::Deployment => Api::<Deployment>::namespaced(client, namespace)
            .patch(&target.name, &pp, &patch)
            .await
            .map(drop),
        WorkloadKind::StatefulSet => Api::<StatefulSet>::namespaced(client, namespace)
            .patch(&target.name, &pp, &patch)
            .await
            .map(drop),
        WorkloadKind::DaemonSet => Api::<DaemonSet>::namespaced(client, namespace)
            .patch(&target.name, &pp, &patch)
            .await
            .map(drop),
    };
    match result {
        Ok(()) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// When to reconcile again: the refresh interval, or sooner when a rotation is due or the
/// value enters its expiry warning window.
fn wake_after(ms: &ManagedSecret, synced: &Synced) -> Duration {
    let mut wake = jittered(refresh_interval(ms));
    let now = jiff::Timestamp::now();
    let until = |t: jiff::Timestamp| {
        Duration::try_from(t.duration_since(now)).unwrap_or(Duration::ZERO) + Duration::from_secs(1)
    };
    if let Some(due) = synced.next_rotation {
        wake = wake.min(until(due));
    }
    if let Some(expires) = synced.expires_at {
        let window = jiff::SignedDuration::try_from(expiry_warning(ms)).unwrap_or_default();
        for t in [expires.checked_sub(window).ok(), Some(expires)]
            .into_iter()
            .flatten()
        {
            if t > now {
                wake = wake.min(until(t));
            }
        }
    }
    wake
}

fn expiry_warning(ms: &ManagedSecret) -> Duration {
    ms.spec
        .expiry_warning
        .as_deref()
        .and_then(|d| parse_duration(d).ok())
        .unwrap_or(DEFAULT_EXPIRY_WARNING)
}

/// The `Expiring` condition of a value of `secret_type` expiring at `expires_at`.
fn expiring_condition(
    ms: &ManagedSecret,
    secret_type: SecretType,
    expires_at: Option<jiff::Timestamp>,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    if !matches!(
        secret_type,
        SecretType::ApiKey | SecretType::Certificate | SecretType::Jwt
    ) {
        return None;
    }
    let generation = ms.metadata.generation;
    let Some(at) = expires_at else {
        return Some(condition(
            "Expiring",
            false,
            "NoExpiry",
            "the value has no expiry",
            generation,
        ));
    };
    let window = expiry_warning(ms);
    let at_text = at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    Some(match expiry(at, jiff::Timestamp::now(), window) {
        Expiry::Expired => condition(
            "Expiring",
            true,
            "Expired",
            format!("the value expired at {at_text}"),
            generation,
        ),
        Expiry::Expiring => condition(
            "Expiring",
            true,
            "ExpiresSoon",
            format!(
                "the value expires at {at_text}, within the {} warning window",
                ms.spec.expiry_warning.as_deref().unwrap_or("720h")
            ),
            generation,
        ),
        Expiry::Valid => condition(
            "Expiring",
            false,
            "NotExpiring",
            format!("the value expires at {at_text}"),
            generation,
        ),
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
        .filter(|t| failed_target(t))
        .map(|t| t.store.as_str())
        .collect();
    status.current_version = Some(version);
    status.expires_at = synced.expires_at.map(Time);
    if synced.rotate_request.is_some() {
        status.rotate_request = synced.rotate_request.clone();
    }
    if synced.restarted_version.is_some() {
        status.restarted_version = synced.restarted_version;
    }
    match expiring_condition(ms, ms.spec.type_, synced.expires_at) {
        Some(c) => set_condition(&mut status.conditions, c),
        None => status.conditions.retain(|c| c.type_ != "Expiring"),
    }
    status.targets = synced.targets.clone();
    status.secret_name = Some(synced.secret_name.clone());
    status.profile = Some(synced.profile.clone());
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
            format!(
                "Secret {} holds version {version} (VaultProfile {}, by {})",
                synced.secret_name,
                synced.profile,
                synced.via.as_str()
            ),
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
pub(super) async fn patch_status(
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
    let stored = api
        .patch_status(
            &ms.name_any(),
            &PatchParams::apply(&ctx.config.field_manager).force(),
            &Patch::Apply(&body),
        )
        .await?;
    ctx.status_written(&stored);
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

/// Whether deleting `ms` asks keyhaven to do something to its native Secret (see
/// [`cleanup`]): everything but Owner + Delete, which the garbage collector carries out,
/// and Retain of a Secret keyhaven does not own.
fn needs_cleanup(ms: &ManagedSecret) -> bool {
    let target = &ms.spec.target;
    matches!(
        (target.deletion_policy, target.creation_policy),
        (
            DeletionPolicy::Delete,
            CreationPolicy::Orphan | CreationPolicy::Merge
        ) | (DeletionPolicy::Retain, CreationPolicy::Owner)
    )
}

/// Applies the deletionPolicy to the native Secret. The stores keep every version.
async fn cleanup(ms: &ManagedSecret, ctx: &Context) -> Result<Action> {
    ctx.status_forget(ms);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(generation: i64, observed: Option<i64>, deleting: bool) -> ManagedSecret {
        let mut ms: ManagedSecret = serde_json::from_value(serde_json::json!({
            "apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
            "metadata": {"name": "a", "namespace": "n", "generation": generation,
                         "creationTimestamp": "2026-11-25T10:00:00Z"},
            "spec": {"type": "generic", "content": {"fromStore": {}}},
        }))
        .unwrap();
        if deleting {
            ms.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
        }
        ms.status = observed.map(|g| ManagedSecretStatus {
            observed_generation: Some(g),
            ..Default::default()
        });
        ms
    }

    #[test]
    fn new_and_changed_objects_await_their_sync() {
        let soon: jiff::Timestamp = "2026-11-25T10:01:00Z".parse().unwrap();
        let later: jiff::Timestamp = "2026-11-25T11:00:00Z".parse().unwrap();
        assert!(awaits_sync(&ms(1, None, false), soon), "never synced");
        assert!(awaits_sync(&ms(2, Some(1), false), soon), "spec changed");
        assert!(
            !awaits_sync(&ms(2, Some(2), false), soon),
            "synced: a refresh"
        );
        assert!(!awaits_sync(&ms(1, None, true), soon), "being deleted");
        assert!(
            !awaits_sync(&ms(1, None, false), later),
            "never synced for an hour: it no longer holds refreshes back"
        );
    }
}
