//! The plan stage: a pure function from what [`super::observe`] gathered to what the sync
//! does — move versions out of `migrateFrom`, fail with a reason, or sync: the version
//! decision, the write to the source and to each sync target, the native Secret, the
//! restarts, and the version record. No I/O; every decision is a unit test.

use super::approval::{self, Gate};
use super::choose::{Chosen, choose_content};
use super::decide::{
    GenerateDecision, NativeAction, RestartDecision, RotationInput, StoreAction, StoreObservation,
    Stored, VersionDecision, decide_generate, decide_version, native_action, next_rotation,
    restart_decision, store_action,
};
use super::gates::{self, Hold, Stop, generate_gate};
use super::native::{desired_secret, observe_native};
use super::observe::{Content, Gathered, Observation, Read};
use super::retention;
pub use super::who::author;
use crate::api::{
    ApprovalRequest, ComplianceStatus, ConditionType, ManagedSecret, ManagedSecretPhase,
    ManagedSecretStatus, Reason, VaultProfile, VersionRecord, condition, set_condition,
};
use crate::backend::VersionStamp;
use crate::content;
use crate::controller::events::Note;
use crate::controller::migration;
use crate::error::Error;
use crate::labels::ROTATE_ANNOTATION;
use crate::profiles::Via;
use crate::secret_data::SecretData;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

/// What one sync does.
#[derive(Debug)]
pub enum Plan {
    /// Move versions out of the profile's `migrateFrom` first, then observe again.
    Migrate {
        moves: migration::Moves,
        /// The status the moves were decided on.
        status: ManagedSecretStatus,
    },
    /// Nothing can be written: record the failure.
    Fail(Failure),
    /// Bring every store and the native Secret to a version.
    Sync(Box<SyncPlan>),
    /// Write nothing: the change waits for approval, was rejected, or breaks the profile's
    /// compliance rules.
    Hold(Box<Hold>),
}

impl Plan {
    /// Whether the plan acts on the status's history: it records a version, restarts
    /// workloads, migrates, or records a failure (which must not drop what the last status
    /// write recorded). Such a plan is made on the stored status, never on a cache that may
    /// predate this process's last write.
    pub fn decides_on_history(&self) -> bool {
        match self {
            Plan::Migrate { .. } | Plan::Fail(_) | Plan::Hold(_) => true,
            Plan::Sync(p) => {
                p.record.is_some()
                    || !p.unrecorded.is_empty()
                    || p.restart == RestartDecision::Restart
                    || p.prune.is_some()
            }
        }
    }
}

/// A sync that fails: the status to record, and why.
#[derive(Debug)]
pub struct Failure {
    pub status: ManagedSecretStatus,
    pub error: Error,
}

/// A sync to carry out, in order: source, sync targets, native Secret, restarts.
#[derive(Debug)]
pub struct SyncPlan {
    pub now: jiff::Timestamp,
    pub jitter: f64,
    pub profile: String,
    pub via: Via,
    /// The secret object's path in the stores.
    pub path: String,
    pub decision: VersionDecision,
    pub stamp: VersionStamp,
    pub data: SecretData,
    pub source: SourceStep,
    pub targets: Vec<TargetStep>,
    pub native: NativeStep,
    pub restart: RestartDecision,
    /// The version to record (New, Adopt); its `storeVersion` comes from the source write.
    pub record: Option<VersionRecord>,
    /// Versions the source holds that this ManagedSecret wrote before a restart and never
    /// recorded, recorded before `record` ([`super::decide::unrecorded`]).
    pub unrecorded: Vec<VersionRecord>,
    pub history_keep: usize,
    pub expires_at: Option<jiff::Timestamp>,
    /// The rotate annotation value acted on (None: leave status as it is).
    pub rotate_request: Option<String>,
    /// When a scheduled rotation is next due.
    pub next_rotation: Option<jiff::Timestamp>,
    /// The status the sync starts from: as observed, with the migration's condition set or
    /// cleared.
    pub base: ManagedSecretStatus,
    /// A migration step failed (retried soon; the sync goes on from the old store).
    pub migration_failed: bool,
    /// `status.approval` after the sync (None: no request to record), and the Events of
    /// the decisions counted.
    pub approval: Option<ApprovalRequest>,
    pub approval_notes: Vec<Note>,
    /// The compliance check of the value (None: the profile has no rules).
    pub compliance: Option<ComplianceStatus>,
    /// When the compliance rule `max-version-age` is next due.
    pub next_compliance_check: Option<jiff::Timestamp>,
    /// `status.source` after the sync.
    pub source_descriptor: String,
    /// The store the content was read from (None: generated now, or pushed from a Secret).
    pub read_from: Option<String>,
    /// `status.retention` once `prune` (if any) is done in every store.
    pub retention: crate::api::RetentionStatus,
    /// Versions the profile's retention removes from the stores now.
    pub prune: Option<super::retention::Prune>,
    /// `status.versionRate` after the sync.
    pub version_rate: Option<crate::api::VersionRate>,
}

impl SyncPlan {
    /// Whether carrying it out writes a value anywhere (a store, the native Secret), removes
    /// versions, or restarts workloads: what may not happen unrecorded.
    pub fn acts(&self) -> bool {
        self.source.write
            || self
                .targets
                .iter()
                .any(|t| matches!(t, TargetStep::Write { .. }))
            || self.native.apply.is_some()
            || self.prune.is_some()
            || self.restart == RestartDecision::Restart
    }
}

/// The source store's part.
#[derive(Debug)]
pub struct SourceStep {
    pub store: String,
    /// Write the version there.
    pub write: bool,
    /// The current version stays in this other store (written before the source changed).
    pub kept_in: Option<String>,
    /// The store's own version number of the current value, when it is not written now.
    pub store_version: Option<u64>,
}

/// A sync target's part.
#[derive(Debug)]
pub enum TargetStep {
    InSync {
        store: String,
    },
    Write {
        store: String,
        action: StoreAction,
    },
    /// Its value could not be read: reported, not raised.
    Unreadable {
        store: String,
        error: Error,
    },
}

impl TargetStep {
    pub fn store(&self) -> &str {
        match self {
            TargetStep::InSync { store }
            | TargetStep::Write { store, .. }
            | TargetStep::Unreadable { store, .. } => store,
        }
    }
}

/// The native Secret's part.
#[derive(Debug)]
pub struct NativeStep {
    pub name: String,
    /// The Secret to apply; None when it is up to date.
    pub apply: Option<Secret>,
}

/// Whether a periodic refresh of `ms` (nothing in the object asks for work) steps aside
/// while `backlog()` new or changed ManagedSecrets wait.
pub fn defers(ms: &ManagedSecret, backlog: impl FnOnce() -> usize) -> bool {
    let settled = ms.status.as_ref().and_then(|s| s.observed_generation) == ms.metadata.generation
        && ms.status.as_ref().is_some_and(|s| {
            s.phase == Some(ManagedSecretPhase::Synced) && ms.rotate_request() == s.rotate_request
        });
    settled && backlog() > 0
}

/// Whether, after a switch, the current version must be read from the store `last` was
/// recorded in: the source holds nothing newer than it — nothing, or an older version
/// keyhaven wrote (a store switched back to). A value without a stamp (written by hand) is
/// new content, not older.
pub fn reads_carried(source: &str, current: Option<&Read>, last: &VersionRecord) -> bool {
    last.store != source
        && match current {
            None => true,
            Some(c) => c.stamp.as_ref().is_some_and(|s| s.version < last.version),
        }
}

/// The rules a value must meet, from the spec and the profile.
fn rules(ms: &ManagedSecret, profile: &VaultProfile) -> content::Rules {
    content::Rules {
        secret_key_bytes: ms
            .spec
            .content
            .generate
            .as_ref()
            .and_then(|g| g.bytes)
            .map(|b| b as usize),
        password: profile.spec.password_policy,
    }
}

fn rotation_input<'a>(ms: &'a ManagedSecret, status: &'a ManagedSecretStatus) -> RotationInput<'a> {
    let requested = ms.annotations().get(ROTATE_ANNOTATION).map(String::as_str);
    RotationInput {
        interval: super::durations::rotation_interval(ms),
        latest_created: status.versions.last().map(|r| r.created_at.0),
        requested,
        // A long request is recorded by its digest: the record still says it was handled.
        handled: match ms.rotate_request() == status.rotate_request {
            true => requested,
            false => status.rotate_request.as_deref(),
        },
    }
}

/// Whether a generated secret keeps `current` or gets a new value now.
pub fn generate_decision(
    ms: &ManagedSecret,
    profile: &VaultProfile,
    status: &ManagedSecretStatus,
    current: Option<&Read>,
    now: jiff::Timestamp,
) -> GenerateDecision {
    let stored = match current {
        None => Stored::Absent,
        Some(c) if content::validate_with(ms.spec.type_, &c.data, rules(ms, profile)).is_ok() => {
            Stored::Valid
        }
        Some(_) => Stored::Invalid,
    };
    decide_generate(stored, &rotation_input(ms, status), now)
}

/// Whether `reason` says the ManagedSecret's profile cannot be resolved.
fn is_resolution(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::ProfileNotFound
            | Reason::ProfileNotAllowed
            | Reason::DefaultProfileConflict
            | Reason::FallbackProfileConflict
            | Reason::NoProfile
            | Reason::NamespaceNotFound
    )
}

/// The status of a sync that failed with `error`, from the status it started from.
pub fn failure(ms: &ManagedSecret, mut status: ManagedSecretStatus, error: Error) -> Failure {
    if is_resolution(error.reason()) {
        status.profile = None;
    }
    status.phase = Some(ManagedSecretPhase::Error);
    status.observed_generation = ms.metadata.generation;
    set_condition(
        &mut status.conditions,
        condition(
            ConditionType::Ready,
            false,
            error.reason(),
            error.to_string(),
            ms.metadata.generation,
        ),
    );
    Failure { status, error }
}

/// Decides the sync of `ms` from `obs`.
pub fn plan(ms: &ManagedSecret, obs: Observation) -> Plan {
    let Observation {
        now,
        jitter,
        status,
        gathered,
        ..
    } = obs;
    if let Err(e) = super::durations::check(ms) {
        return Plan::Fail(failure(ms, status, e));
    }
    let mut gathered = match gathered {
        Ok(g) => g,
        Err(e) => return Plan::Fail(failure(ms, status, e)),
    };
    let mut base = status;
    let mut migration_failed = false;
    match (
        &gathered.profile.spec.migrate_from,
        gathered.migration.take(),
    ) {
        (None, _) => migration::clear(&mut base),
        (Some(_), Some(observed)) => match observed.and_then(migration::plan) {
            Ok(moves) => {
                return Plan::Migrate {
                    moves,
                    status: base,
                };
            }
            Err(e) => {
                migration::failed(&mut base, &e, ms.metadata.generation);
                migration_failed = true;
            }
        },
        (Some(_), None) => {}
    }
    match sync(ms, gathered, &base, now) {
        Ok(mut plan) => {
            plan.jitter = jitter;
            plan.base = base;
            plan.migration_failed = migration_failed;
            Plan::Sync(plan)
        }
        Err(Stop::Fail(e)) => Plan::Fail(failure(ms, base, e)),
        Err(Stop::Held(held)) => Plan::Hold(Box::new(gates::held_status(ms, base, &held))),
        Err(Stop::Refused(checked, message)) => Plan::Hold(Box::new(gates::refused_status(
            ms, base, &checked, &message,
        ))),
        Err(Stop::Quota(message)) => Plan::Hold(Box::new(gates::quota_status(ms, base, &message))),
    }
}

/// The native Secret's step (refused when it cannot be written), and whether it exists.
fn native_step(
    ms: &ManagedSecret,
    existing: Option<&Secret>,
    rendered: &content::Rendered,
    stamp: &VersionStamp,
) -> Result<(NativeStep, bool), Error> {
    let name = ms.secret_name();
    let seen = observe_native(ms, existing, &rendered.data);
    let (version, fp) = (stamp.version, &stamp.fingerprint);
    let policy = ms.spec.target.creation_policy;
    let apply = match native_action(&seen, policy, &name, rendered.type_, version, fp) {
        NativeAction::Unchanged => None,
        NativeAction::Refuse { reason, message } => return Err(Error::config(reason, message)),
        NativeAction::Apply => Some(desired_secret(
            ms,
            &name,
            rendered.type_,
            &rendered.data,
            version,
            fp,
        )),
    };
    Ok((NativeStep { name, apply }, seen.exists))
}

/// The reason recorded for a version found in the source that a restart left unrecorded.
pub const UNRECORDED_REASON: &str =
    "written before a restart, recorded after it (its time is when it was found)";

/// The record of a version made or adopted now.
fn version_record(
    ms: &ManagedSecret,
    (status, verified): (&ManagedSecretStatus, bool),
    stamp: &VersionStamp,
    store: &str,
    chosen: &Chosen,
    now: jiff::Timestamp,
) -> VersionRecord {
    let reason = chosen
        .forced_reason
        .clone()
        .unwrap_or_else(|| ms.spec.reason.clone().unwrap_or(chosen.origin.clone()));
    VersionRecord {
        version: stamp.version,
        fingerprint: stamp.fingerprint.to_string(),
        store: store.to_owned(),
        created_at: Time(now),
        created_by: author(ms, status, verified),
        reason: Some(reason),
        store_version: None,
        moved_from: None,
    }
}

/// When a generated (not rolled back) secret's scheduled rotation is next due.
fn next_rotation_of(
    ms: &ManagedSecret,
    status: &ManagedSecretStatus,
    record: Option<&VersionRecord>,
    now: jiff::Timestamp,
) -> Option<jiff::Timestamp> {
    match (&ms.spec.content.generate, ms.spec.rollback_to) {
        (Some(_), None) => next_rotation(&RotationInput {
            latest_created: Some(
                record
                    .map(|r| r.created_at.0)
                    .or_else(|| status.versions.last().map(|r| r.created_at.0))
                    .unwrap_or(now),
            ),
            ..rotation_input(ms, status)
        }),
        _ => None,
    }
}

fn sync(
    ms: &ManagedSecret,
    mut g: Gathered,
    status: &ManagedSecretStatus,
    now: jiff::Timestamp,
) -> Result<Box<SyncPlan>, Stop> {
    let verified = g.identity_verified;
    let kept_in = matches!(g.carried, Some(Some(_)))
        .then(|| status.versions.last().map(|r| r.store.clone()))
        .flatten();
    // A generation waiting for approval generates nothing (the observation did not either).
    let generated = match matches!(g.content, Content::Generate { .. }) {
        true => {
            let current = match &g.carried {
                Some(kept) => kept.as_ref(),
                None => g.source.as_ref(),
            };
            let facts = (g.profile.as_ref(), &g.approvals, verified);
            generate_gate(ms, facts, status, current, now)
        }
        false => None,
    };
    if let Some(Gate::Hold(held)) = generated {
        return Err(Stop::Held(held));
    }
    let chosen = choose_content(ms, &mut g, status, now)?;
    let secret_type = ms.spec.type_;
    let inspected = content::validate_with(secret_type, &chosen.value.data, rules(ms, &g.profile))?;
    // Rendered before anything is written: a template that does not fit stores nothing.
    let mut rendered = content::render(secret_type, &chosen.value.data);
    if let Some(template) = &ms.spec.target.template {
        content::apply_template(&mut rendered, template, &chosen.value.data)?;
    }
    let (decision, fp) = decide_version(
        status.versions.last(),
        chosen.current_stamp.as_ref(),
        &chosen.value.fingerprint,
    );
    let version = decision.version();
    let new_version = matches!(decision, VersionDecision::New(_));
    // Compliance first: a value the rules refuse is not even asked to be approved.
    let checked = gates::compliance(
        ms,
        &g.profile,
        &chosen.value.data,
        new_version,
        status.versions.last().map(|v| v.created_at.0),
        now,
    );
    if let Some(message) = checked.refused.clone() {
        return Err(Stop::Refused(Box::new(checked), message));
    }
    let keep = g.profile.spec.retention_versions();
    let kept = retention::kept(status.retention.as_ref());
    let newest = version.max(status.versions.last().map_or(0, |v| v.version));
    let pins: Vec<u64> = std::iter::once(version)
        .chain(ms.spec.rollback_to)
        .collect();
    if new_version
        && let Some(message) = retention::over_quota(
            g.profile.spec.quota.as_ref(),
            (keep, &pins, &kept),
            version,
            status.version_rate.as_ref(),
            now,
        )
    {
        return Err(Stop::Quota(message));
    }
    let gate = match generated {
        Some(gate) => gate,
        None => {
            let changes = approval::changes(
                ms,
                status,
                &g.profile.name_any(),
                new_version,
                false,
                &gates::content_binding(&chosen.value),
                &chosen.origin,
            );
            let requester = author(ms, status, verified);
            gates::approval(
                ms,
                &g.profile,
                &g.approvals,
                status,
                &changes,
                (&requester, verified, now),
            )
        }
    };
    let (approval_record, approval_notes) = match gate {
        Gate::Hold(held) => return Err(Stop::Held(held)),
        Gate::Proceed { record, notes } => (record, notes),
    };
    if version == u64::MAX {
        return Err(Stop::Fail(Error::config(
            Reason::VersionMismatch,
            format!(
                "store {} stamps the value at {} with version {}: no version can follow it",
                g.profile.spec.source,
                ms.store_path(),
                u64::MAX
            ),
        )));
    }
    let stamp = VersionStamp {
        version,
        fingerprint: fp.clone(),
        owner: g.owner.clone(),
    };
    // A version kept in the previous store stays there: the new source waits for the next.
    let kept_in = kept_in.filter(|_| matches!(decision, VersionDecision::Unchanged(_)));
    let observed = |r: &Read| StoreObservation {
        stamp: r.stamp.clone(),
        content: r.fingerprint.clone(),
    };
    let source_action = match kept_in {
        // Kept elsewhere, or a shared path (read only: never stamped or written).
        _ if !g.writes => StoreAction::InSync,
        Some(_) => StoreAction::InSync,
        None => store_action(
            g.source.as_ref().map(observed).as_ref(),
            version,
            &fp,
            g.owner.as_ref(),
        ),
    };
    let source = SourceStep {
        store: g.profile.spec.source.clone(),
        write: source_action != StoreAction::InSync,
        kept_in,
        store_version: chosen.current_store_version,
    };
    let targets = g
        .targets
        .into_iter()
        .map(|(store, seen)| match seen {
            Err(error) => TargetStep::Unreadable { store, error },
            Ok(seen) => match store_action(
                seen.as_ref().map(observed).as_ref(),
                version,
                &fp,
                g.owner.as_ref(),
            ) {
                StoreAction::InSync => TargetStep::InSync { store },
                action => TargetStep::Write { store, action },
            },
        })
        .collect();
    let (native, existed) = native_step(ms, g.native.as_ref(), &rendered, &stamp)?;
    let restart = restart_decision(
        !ms.spec.rollout_restart_targets.is_empty(),
        existed,
        status.restarted_version,
        version,
    );
    let record = matches!(
        decision,
        VersionDecision::New(_) | VersionDecision::Adopt(_)
    )
    .then(|| version_record(ms, (status, verified), &stamp, &source.store, &chosen, now));
    let unrecorded = match g.writes && source.kept_in.is_none() {
        true => super::decide::unrecorded(&status.versions, &g.held, g.owner.as_ref(), version)
            .into_iter()
            .map(|s| VersionRecord {
                version: s.version,
                fingerprint: s.fingerprint.to_string(),
                store: source.store.clone(),
                created_at: Time(now),
                created_by: super::who::SYSTEM_AUTHOR.to_owned(),
                reason: Some(UNRECORDED_REASON.to_owned()),
                store_version: None,
                moved_from: None,
            })
            .collect(),
        false => vec![],
    };
    let next_rotation = next_rotation_of(ms, status, record.as_ref(), now);
    let (removed, after) = retention::decide(keep, newest, &pins, &kept);
    let migrating = g.profile.spec.migrate_from.is_some()
        && status.migrated_from != g.profile.spec.migrate_from;
    let prune = (!removed.is_empty() && !migrating && g.writes).then(|| {
        let mut stores: Vec<String> = g.profile.spec.stores().map(str::to_owned).collect();
        for v in &status.versions {
            if !stores.contains(&v.store) {
                stores.push(v.store.clone());
            }
        }
        retention::Prune {
            versions: removed,
            stores,
            after: after.clone(),
        }
    });
    let retention = match &prune {
        Some(_) => status.retention.clone().unwrap_or_else(|| {
            let mut k = kept.clone();
            k.kept = retention::describe(&k, newest);
            k
        }),
        None if migrating => {
            let mut k = kept.clone();
            k.kept = retention::describe(&k, newest);
            k
        }
        None => after,
    };
    let version_rate = match new_version {
        true => Some(retention::counted(status.version_rate.as_ref(), now)),
        false => status.version_rate.clone(),
    };
    Ok(Box::new(SyncPlan {
        now,
        jitter: 1.0,
        profile: g.profile.name_any(),
        via: g.via,
        path: ms.store_path(),
        decision,
        stamp,
        data: chosen.value.data,
        source,
        targets,
        native,
        restart,
        record,
        unrecorded,
        history_keep: g.profile.spec.history_keep(),
        expires_at: inspected.expires_at,
        rotate_request: chosen.rotate_request,
        next_rotation,
        base: ManagedSecretStatus::default(),
        migration_failed: false,
        approval: approval_record,
        approval_notes,
        compliance: checked.status,
        next_compliance_check: checked.next_check,
        source_descriptor: approval::source_descriptor(ms),
        read_from: chosen.read_from.clone(),
        retention,
        prune,
        version_rate,
    }))
}
