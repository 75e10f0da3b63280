//! The VaultProfile reconciler: Ready when its source and sync targets exist and are Active;
//! condition `Conflict` when it is a default (or the fallback) together with another profile;
//! the counts of its ManagedSecrets (all, and by compliance) and its migration's progress.

use super::context::Context;
use super::events::Note;
use crate::api::{
    ComplianceState, ComplianceSummary, ConditionType, ManagedSecret, MigrationPhase,
    MigrationStatus, ProfilePhase, Reason, StorePhase, VaultProfile, VaultProfileSpec,
    VaultProfileStatus, condition, find_condition, set_condition,
};
use crate::error::{Error, Result};
use crate::profiles::{NamespaceInfo, conflicts};
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

pub async fn reconcile(profile: Arc<VaultProfile>, ctx: Arc<Context>) -> Result<Action> {
    let span = tracing::info_span!("reconcile", kind = "VaultProfile", name = %profile.name_any());
    async move {
        if !ctx.caches.managed_listed() {
            // The counts and the migration's progress come from the ManagedSecret cache.
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        let problems = store_problems(&profile, &ctx).await?;
        let name = profile.name_any();
        let managed = ctx.caches.managed.state();
        let mine: Vec<&ManagedSecret> = managed
            .iter()
            .map(|ms| ms.as_ref())
            .filter(|ms| uses(ms, &name))
            .collect();
        let namespaces: Vec<NamespaceInfo> = ctx
            .caches
            .namespaces
            .state()
            .iter()
            .map(|ns| NamespaceInfo::from_meta(&ns.metadata))
            .collect();
        let all = ctx.caches.profiles.state();
        let mut conflicts = conflicts(&profile, &namespaces, all.iter().map(|p| p.as_ref()));
        let stores = ctx.caches.stores.state();
        let backend = |name: &str| {
            let store = stores.iter().find(|s| s.name_any() == name)?;
            store.spec.backend_identity()
        };
        conflicts.extend(
            crate::tenancy::space_conflicts(&profile, all.iter().map(|p| p.as_ref()), backend)
                .into_iter()
                .map(|r| crate::profiles::Refused {
                    reason: r.reason,
                    message: r.message,
                }),
        );
        let previous = profile.status.clone().unwrap_or_default();
        let compliance = compliance_summary(&profile, managed.iter().map(|ms| ms.as_ref()));
        let status = profile_status(&profile, &problems, &mine, &conflicts, compliance);
        let notes = migration_notes(previous.migration.as_ref(), status.migration.as_ref());
        ctx.events.publish_all(profile.as_ref(), &notes).await;
        let conflict = find_condition(&status.conditions, ConditionType::Conflict);
        if let (Some(c), [one, ..]) = (conflict, conflicts.as_slice())
            && find_condition(&previous.conditions, ConditionType::Conflict)
                .is_none_or(|p| p.status != "True" || p.message != c.message)
        {
            ctx.events
                .publish(profile.as_ref(), EventType::Warning, one.reason, &c.message)
                .await;
        }
        if status != previous {
            ctx.apply_status(profile.as_ref(), &status).await?;
        }
        let migrating = status
            .migration
            .is_some_and(|m| m.phase != MigrationPhase::Complete);
        let ready = problems.is_empty();
        Ok(Action::requeue(Duration::from_secs(
            match (migrating, ready) {
                (true, _) => 3,
                (false, true) => 60,
                (false, false) => 10,
            },
        )))
    }
    .instrument(span)
    .await
}

/// What keeps the profile's stores (source, sync targets, migrateFrom) from being used.
async fn store_problems(profile: &VaultProfile, ctx: &Context) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    for name in profile
        .spec
        .stores()
        .chain(profile.spec.migrate_from.as_deref())
    {
        let problem = match ctx
            .caches
            .get::<crate::api::SecretStore>(&ctx.client, name)
            .await?
        {
            None => Some(format!("SecretStore {name} does not exist")),
            Some(s) => match s.status.as_ref().and_then(|st| st.phase) {
                Some(StorePhase::Active | StorePhase::Draining) => None,
                Some(phase) => Some(format!("SecretStore {name} is {}", phase.as_str())),
                None => Some(format!("SecretStore {name} has not been checked yet")),
            },
        };
        problems.extend(problem);
    }
    Ok(problems)
}

/// The status of `profile`: Ready unless a store has a problem, the secrets using it, the
/// migration's progress, whether it conflicts with another default or fallback, and its
/// `compliance` summary ([`compliance_summary`]).
pub fn profile_status(
    profile: &VaultProfile,
    problems: &[String],
    mine: &[&ManagedSecret],
    conflicts: &[crate::profiles::Refused],
    compliance: Option<ComplianceSummary>,
) -> VaultProfileStatus {
    let ready = problems.is_empty();
    let mut message = if ready {
        "source and sync targets are Active".to_owned()
    } else {
        problems.join("; ")
    };
    for c in conflicts {
        message = format!("{message}; {}", c.message);
    }
    crate::api::clamp_text(&mut message, crate::api::MAX_MESSAGE);
    let generation = profile.metadata.generation;
    let previous = profile.status.clone().unwrap_or_default();
    let mut status = VaultProfileStatus {
        phase: Some(if ready {
            ProfilePhase::Ready
        } else {
            ProfilePhase::NotReady
        }),
        message: Some(message.clone()),
        secrets: Some(mine.len() as u64),
        observed_generation: generation,
        migration: migration_progress(&profile.spec, mine),
        compliance,
        conditions: previous.conditions,
    };
    let reason = if ready {
        Reason::StoresActive
    } else {
        Reason::StoresNotActive
    };
    set_condition(
        &mut status.conditions,
        condition(ConditionType::Ready, ready, reason, message, generation),
    );
    let conflict = match conflicts {
        [] => condition(
            ConditionType::Conflict,
            false,
            Reason::NoConflict,
            "no other default or fallback profile overlaps this one",
            generation,
        ),
        [one, ..] => condition(
            ConditionType::Conflict,
            true,
            one.reason,
            conflicts
                .iter()
                .map(|c| c.message.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            generation,
        ),
    };
    set_condition(&mut status.conditions, conflict);
    let isolated = match crate::tenancy::space(profile, "{namespace}") {
        Some(prefix) => condition(
            ConditionType::Isolated,
            true,
            Reason::IsolationEnforced,
            format!("each namespace's ManagedSecrets use paths under {prefix} only"),
            generation,
        ),
        None => condition(
            ConditionType::Isolated,
            false,
            Reason::IsolationDisabled,
            "secretSpace.isolation is Disabled: every namespace this profile selects may read and write any path of its stores",
            generation,
        ),
    };
    set_condition(&mut status.conditions, isolated);
    status
}

/// How many ManagedSecrets meet the profile's compliance rules, of those last checked under
/// it (`status.profile`) against its current rules (`status.compliance.profileGeneration`
/// is its generation): a secret not yet checked again after the rules changed is not
/// counted. `None` when the profile has no `spec.compliance`.
pub fn compliance_summary<'a>(
    profile: &VaultProfile,
    secrets: impl IntoIterator<Item = &'a ManagedSecret>,
) -> Option<ComplianceSummary> {
    profile.spec.compliance.as_ref()?;
    let name = profile.name_any();
    let generation = profile.metadata.generation;
    let mut summary = ComplianceSummary::default();
    let checked = secrets
        .into_iter()
        .filter_map(|ms| ms.status.as_ref())
        .filter(|s| s.profile.as_deref() == Some(name.as_str()))
        .filter_map(|s| s.compliance.as_ref())
        .filter(|c| generation.is_some() && c.profile_generation == generation);
    for c in checked {
        summary.checked += 1;
        match c.state {
            ComplianceState::Compliant => summary.compliant += 1,
            ComplianceState::NonCompliant => summary.non_compliant += 1,
        }
    }
    Some(summary)
}

/// Where the migration `spec.migrateFrom` asks for stands, from the status of the
/// profile's ManagedSecrets.
pub fn migration_progress(
    spec: &VaultProfileSpec,
    secrets: &[&ManagedSecret],
) -> Option<MigrationStatus> {
    let from = spec.migrate_from.clone()?;
    let (mut moved, mut failed, mut versions_moved) = (0, 0, 0);
    for ms in secrets {
        let Some(status) = ms.status.as_ref() else {
            continue;
        };
        versions_moved += status
            .versions
            .iter()
            .filter(|r| r.moved_from.as_deref() == Some(from.as_str()))
            .count() as u64;
        if !super::migration::pending(Some(status), &from) {
            moved += 1;
        } else if find_condition(&status.conditions, ConditionType::Migrated)
            .is_some_and(|c| c.status == "False" && c.reason != Reason::Moving.as_str())
        {
            failed += 1;
        }
    }
    let total = secrets.len() as u64;
    let phase = if moved == total {
        MigrationPhase::Complete
    } else if moved + failed == total {
        MigrationPhase::Failed
    } else {
        MigrationPhase::Migrating
    };
    Some(MigrationStatus {
        to: spec.source.clone(),
        from,
        phase,
        total,
        moved,
        failed,
        versions_moved,
    })
}

/// The Events of a migration that starts, completes, or has failures left.
fn migration_notes(before: Option<&MigrationStatus>, now: Option<&MigrationStatus>) -> Vec<Note> {
    let Some(now) = now else { return vec![] };
    let mut notes = vec![];
    let same = before.filter(|b| b.from == now.from && b.to == now.to);
    if same.is_none() {
        notes.push(Note::normal(
            Reason::MigrationStarted,
            format!(
                "moving the versions of {} secret(s) from store {} to store {}",
                now.total, now.from, now.to
            ),
        ));
    }
    if same.is_none_or(|b| b.phase != now.phase) {
        match now.phase {
            MigrationPhase::Complete => notes.push(Note::normal(
                Reason::MigrationComplete,
                format!(
                    "{} secret(s), {} version(s) moved from store {} to store {}, each verified by fingerprint; {} holds none of them now",
                    now.moved, now.versions_moved, now.from, now.to, now.from
                ),
            )),
            MigrationPhase::Failed => notes.push(Note::warning(
                Reason::MigrationFailed,
                format!(
                    "{} of {} secret(s) could not be moved from store {} (their condition Migrated says why); retrying",
                    now.failed, now.total, now.from
                ),
            )),
            MigrationPhase::Migrating => {}
        }
    }
    notes
}

/// Whether `ms` uses the profile `name` (named in its spec, or resolved to it).
fn uses(ms: &ManagedSecret, name: &str) -> bool {
    match &ms.spec.profile {
        Some(p) => p == name,
        None => ms.status.as_ref().and_then(|s| s.profile.as_deref()) == Some(name),
    }
}

/// The object's key in [`Context::retries`].
pub fn retry_key(profile: &VaultProfile) -> String {
    format!("VaultProfile {}", profile.name_any())
}

/// Every 10 s; backing off to 5 min when the API server will refuse the same again.
pub fn error_policy(profile: Arc<VaultProfile>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = retry_key(&profile);
    Action::requeue(ctx.retries.after(&key, error, Duration::from_secs(10)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ManagedSecretStatus;

    fn profile() -> VaultProfile {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "keyhaven.io/v1alpha1", "kind": "VaultProfile",
            "metadata": {"name": "p", "generation": 3},
            "spec": {"source": "new", "migrateFrom": "old"},
        }))
        .unwrap()
    }

    fn ms(name: &str, migrated: bool) -> ManagedSecret {
        let mut ms: ManagedSecret = serde_json::from_value(serde_json::json!({
            "apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
            "metadata": {"name": name, "namespace": "n"},
            "spec": {"type": "generic", "content": {"fromStore": {}}, "profile": "p"},
        }))
        .unwrap();
        ms.status = Some(ManagedSecretStatus {
            migrated_from: migrated.then(|| "old".to_owned()),
            ..Default::default()
        });
        ms
    }

    #[test]
    fn ready_counts_and_migration_progress() {
        let (a, b) = (ms("a", true), ms("b", false));
        let status = profile_status(&profile(), &[], &[&a, &b], &[], None);
        assert_eq!(status.phase, Some(ProfilePhase::Ready));
        assert_eq!(status.secrets, Some(2));
        let m = status.migration.unwrap();
        assert_eq!(
            (m.phase, m.moved, m.total),
            (MigrationPhase::Migrating, 1, 2)
        );
        assert!(!crate::api::condition_true(
            &status.conditions,
            ConditionType::Conflict
        ));
        let status = profile_status(&profile(), &[], &[&a], &[], None);
        assert_eq!(status.migration.unwrap().phase, MigrationPhase::Complete);
    }

    #[test]
    fn a_migration_says_when_it_starts_and_ends() {
        let progress = |phase, moved| MigrationStatus {
            from: "old".into(),
            to: "new".into(),
            phase,
            total: 2,
            moved,
            failed: 0,
            versions_moved: moved,
        };
        let started = progress(MigrationPhase::Migrating, 0);
        let reasons = |n: Vec<Note>| n.into_iter().map(|n| n.reason).collect::<Vec<_>>();
        assert_eq!(
            reasons(migration_notes(None, Some(&started))),
            [Reason::MigrationStarted]
        );
        assert!(
            migration_notes(
                Some(&started),
                Some(&progress(MigrationPhase::Migrating, 1))
            )
            .is_empty()
        );
        let done = progress(MigrationPhase::Complete, 2);
        assert_eq!(
            reasons(migration_notes(Some(&started), Some(&done))),
            [Reason::MigrationComplete]
        );
        assert!(
            migration_notes(Some(&done), Some(&done)).is_empty(),
            "said once"
        );
        assert!(migration_notes(Some(&done), None).is_empty());
    }

    #[test]
    fn compliance_counts_the_secrets_checked_against_the_current_rules() {
        use crate::api::{ComplianceStatus, Enforcement};
        let checked = |name: &str, profile: &str, generation: Option<i64>, state| {
            let mut ms = ms(name, false);
            let status = ms.status.as_mut().unwrap();
            status.profile = Some(profile.to_owned());
            status.compliance = Some(ComplianceStatus {
                state,
                failing: match state {
                    ComplianceState::NonCompliant => vec!["rsa-min-bits".into()],
                    ComplianceState::Compliant => vec![],
                },
                enforcement: Enforcement::Warn,
                profile_generation: generation,
                checked_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    jiff::Timestamp::UNIX_EPOCH,
                ),
            });
            ms
        };
        let secrets = [
            checked("a", "p", Some(3), ComplianceState::Compliant),
            checked("b", "p", Some(3), ComplianceState::NonCompliant),
            checked("c", "p", Some(3), ComplianceState::NonCompliant),
            // Checked against the rules before they changed: not counted.
            checked("d", "p", Some(2), ComplianceState::Compliant),
            checked("e", "p", None, ComplianceState::Compliant),
            // Under another profile.
            checked("f", "q", Some(3), ComplianceState::Compliant),
            // Never checked.
            ms("g", false),
        ];
        let mut p = profile();
        assert_eq!(compliance_summary(&p, &secrets), None, "no spec.compliance");
        p.spec.compliance = Some(Default::default());
        let summary = compliance_summary(&p, &secrets).unwrap();
        assert_eq!(
            summary,
            ComplianceSummary {
                checked: 3,
                compliant: 1,
                non_compliant: 2
            }
        );
        assert_eq!(
            compliance_summary(&p, std::iter::empty()),
            Some(ComplianceSummary::default())
        );
        let status = profile_status(&p, &[], &[], &[], Some(summary.clone()));
        assert_eq!(status.compliance, Some(summary));
    }

    #[test]
    fn a_store_problem_or_a_conflict_is_said() {
        let conflict = crate::profiles::Refused {
            reason: Reason::DefaultProfileConflict,
            message: "default conflict with VaultProfile q".into(),
        };
        let status = profile_status(
            &profile(),
            &["SecretStore old is Sealed".into()],
            &[],
            std::slice::from_ref(&conflict),
            None,
        );
        assert_eq!(status.phase, Some(ProfilePhase::NotReady));
        let message = status.message.unwrap();
        assert!(
            message.contains("Sealed") && message.contains("VaultProfile q"),
            "{message}"
        );
        let c = find_condition(&status.conditions, ConditionType::Conflict).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "DefaultProfileConflict")
        );
    }
}
