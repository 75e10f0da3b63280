//! The observe stage: everything one sync of a ManagedSecret decides on, read once — the
//! status as stored, the resolved profile, what each store holds at the path, the content
//! (pushed, rolled back to, or freshly generated when the plan's own rule says so), and the
//! native Secret. A read that fails is the observation's failure; the plan reports it.

use super::decide::GenerateDecision;
use super::plan;
use crate::api::{ManagedSecret, ManagedSecretStatus, Reason, SecretType, VaultProfile};
use crate::backend::{Owner, StoredVersion, VersionStamp};
use crate::controller::context::Context;
use crate::controller::migration;
use crate::crypto::ContentFingerprint;
use crate::error::{Error, Result, Verb};
use crate::profiles::{self, NamespaceInfo, Via};
use crate::secret_data::SecretData;
use crate::tenancy;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use std::sync::Arc;

/// A value read from a store, with its fingerprints (in the ManagedSecret's namespace).
#[derive(Debug, Clone)]
pub struct Read {
    pub data: SecretData,
    pub stamp: Option<VersionStamp>,
    pub store_version: Option<u64>,
    pub fingerprint: ContentFingerprint,
}

/// What one sync decides on.
#[derive(Debug)]
pub struct Observation {
    /// The moment of the observation: every time-based decision uses it.
    pub now: jiff::Timestamp,
    /// The factor (0.9–1.1) the refresh interval is multiplied by.
    pub jitter: f64,
    /// The status decided on.
    pub status: ManagedSecretStatus,
    /// It is the cached status, and the cache may predate this process's last status write:
    /// a plan that records a version, restarts workloads, migrates or reports a failure is
    /// made again on the stored status.
    pub stale: bool,
    /// What the sync reads; the first failure.
    pub gathered: Result<Gathered>,
}

/// What the sync reads of the profile, the stores and the native Secret.
#[derive(Debug)]
pub struct Gathered {
    pub profile: Arc<VaultProfile>,
    pub via: Via,
    /// The sync writes to the stores: false at a shared path, and for a reader
    /// (`content.fromStore`) of a path another live ManagedSecret owns.
    pub writes: bool,
    /// The owner the stamps it writes record: this ManagedSecret for a writer, none for a
    /// reader (readers take no ownership).
    pub owner: Option<Owner>,
    /// The requester annotation was written by this operator's admission webhook.
    pub identity_verified: bool,
    /// The decisions on its approval requests, and the previous profile's policy.
    pub approvals: super::gates::ApprovalFacts,
    /// The profile's `migrateFrom`, while it has versions of this secret to move.
    pub migration: Option<Result<migration::Observed>>,
    /// The source's current value at the path.
    pub source: Option<Read>,
    /// The stamps of the versions the source holds above the newest one the status
    /// records, up to its current one (read only when the current one is ahead of the
    /// status): what a restart may have left unrecorded.
    pub held: Vec<VersionStamp>,
    /// After a switch, the current version as kept in the store it was recorded in (None
    /// when not needed: the source holds it or something newer).
    pub carried: Option<Option<Read>>,
    pub content: Content,
    /// Each sync target's current value at the path.
    pub targets: Vec<(String, Result<Option<Read>>)>,
    /// The native Secret.
    pub native: Option<Secret>,
}

/// The content the spec asks for, beyond what the stores hold.
#[derive(Debug)]
pub enum Content {
    /// `rollbackTo: n`: version n as read from the store it was recorded in.
    Rollback {
        version: u64,
        store: String,
        found: Option<Read>,
    },
    /// `content.fromStore`: the current value is the content.
    FromStore,
    /// `content.fromSecret`: the Secret's data, and the Secret's name.
    Pushed { from: String, value: Read },
    /// `content.generate`: a fresh value when the plan's generation rule asks for one.
    Generate { fresh: Option<Read> },
    /// No content source is set.
    Unset,
}

/// Observes `ms`. `written` is the status this reconcile just wrote (a migration step), to
/// be used as is; `migrate` observes the profile's migration (the first pass only).
pub async fn observe(
    ms: &ManagedSecret,
    ctx: &Context,
    status: StatusSeen,
    migrate: bool,
) -> Observation {
    let now = jiff::Timestamp::now();
    let jitter = 0.9 + rand::random::<f64>() * 0.2;
    let (status, stale) = match status {
        StatusSeen::Cached => (
            ms.status.clone().unwrap_or_default(),
            !ctx.status_writes.holds_last(ms),
        ),
        StatusSeen::Stored(status) => (*status, false),
    };
    let gathered = gather(ms, ctx, &status, migrate, now).await;
    Observation {
        now,
        jitter,
        status,
        stale,
        gathered,
    }
}

/// Which status an observation decides on.
#[derive(Debug)]
pub enum StatusSeen {
    /// The cached object's: it may predate this process's last status write (a watch event
    /// of the native Secret can arrive before the one of our status), which `stale` says.
    Cached,
    /// As the API server holds it (read, or just written by this reconcile).
    Stored(Box<ManagedSecretStatus>),
}

async fn gather(
    ms: &ManagedSecret,
    ctx: &Context,
    status: &ManagedSecretStatus,
    migrate: bool,
    now: jiff::Timestamp,
) -> Result<Gathered> {
    let (profile, via, ns) = resolve_profile(ms, ctx).await?;
    let path = ms.store_path();
    // The secret space first: a path outside it is refused before anything is read, and so
    // is every path of a profile whose space may overlap another's in a shared store.
    no_space_conflict(ctx, &profile)?;
    let stores = ctx.caches.stores.state();
    let access = tenancy::access(&profile, &ns, &path).map_err(refused)?;
    let reads_only = ms.spec.rollback_to.is_none() && ms.spec.content.from_store.is_some();
    if !access.may_write() && !reads_only {
        return Err(refused(tenancy::read_only(&profile, &ns.name, &path)));
    }
    if let Some(generate) = &ms.spec.content.generate {
        tenancy::issuance(&profile, generate).map_err(refused)?;
    }
    // A kubernetes store keeps versions as Secrets of its namespace: only this namespace's
    // own, or one set aside for stores.
    for store in profile
        .spec
        .stores()
        .chain(profile.spec.migrate_from.as_deref())
    {
        let kube_ns = stores
            .iter()
            .find(|s| s.name_any() == store)
            .and_then(|s| s.spec.provider.kubernetes.as_ref())
            .map(|k| k.namespace.clone());
        // (A store over the operator's namespace is Invalid: its own refusal says so.)
        if let Some(kube_ns) = kube_ns
            && kube_ns != ns.name
            && kube_ns != ctx.config.operator_namespace
        {
            // A namespace that is gone holds nothing to protect: the store's own failure
            // (Invalid) is reported when it is used.
            let labels = match ctx.caches.namespace_info(&ctx.client, &kube_ns).await {
                Ok(info) => Some(info.labels),
                Err(e) if e.reason() == Reason::NamespaceNotFound => None,
                Err(e) => return Err(e),
            };
            if let Some(labels) = labels {
                tenancy::store_namespace(store, &kube_ns, &ns.name, &labels).map_err(refused)?;
            }
        }
    }
    let me = owner_of(ms);
    // A writer of a path another live ManagedSecret owns is refused, in every store it
    // would write.
    let owns = async |store: &str, r: Option<&StoredVersion>| match reads_only {
        true => Ok(()),
        false => ownership(ctx, store, &path, &me, r).await,
    };
    let namespace = ms.namespace().unwrap_or_default();
    let fingerprint = |data: &SecretData| {
        ctx.keys
            .fingerprinter
            .content(&namespace, ms.spec.type_.as_str(), data)
    };
    let read = |v: StoredVersion| Read {
        fingerprint: fingerprint(&v.data),
        data: v.data,
        stamp: v.stamp,
        store_version: v.store_version,
    };
    let migration = match profile.spec.migrate_from.as_deref() {
        Some(from) if migrate && access.may_write() && migration::pending(Some(status), from) => {
            // Moving deletes from the old store, which only the path's owner may (a
            // reader's migration is checked too).
            let old = ctx.backend(from).await?;
            let held = old.read(&path, None).await?;
            ownership(ctx, from, &path, &me, held.as_ref()).await?;
            let observed =
                observe_migration(ctx, &path, status, from, &profile.spec.source, &fingerprint)
                    .await
                    .map(|mut o| {
                        o.owner = Some(me.clone());
                        o
                    });
            Some(observed)
        }
        _ => None,
    };
    let source_name = profile.spec.source.as_str();
    let source = ctx.backend(source_name).await?;
    let current = source.read(&path, None).await?;
    owns(source_name, current.as_ref()).await?;
    // A reader of a path with a live owner writes nothing: the owner keeps the stores.
    let writes = access.may_write()
        && !(reads_only
            && ownership(ctx, source_name, &path, &me, current.as_ref())
                .await
                .is_err());
    let held = held_above(source.as_ref(), &path, status, current.as_ref()).await?;
    let current = current.map(read);
    let carried = match status.versions.last() {
        Some(last) if plan::reads_carried(source_name, current.as_ref(), last) => {
            let kept = ctx.backend(&last.store).await?;
            Some(kept.read(&path, Some(last.version)).await?.map(read))
        }
        _ => None,
    };
    let fresh_base = carried.as_ref().map_or(current.as_ref(), Option::as_ref);
    let approvals = super::decisions::facts(ctx, ms, status, &profile).await;
    let content = observe_content(
        ms,
        ctx,
        (&profile, &ns, &approvals),
        status,
        fresh_base,
        now,
        &fingerprint,
    )
    .await?;
    // A shared path is never written: its copies are the owner's to make.
    let sync_targets = match writes {
        true => profile.spec.sync_targets.as_slice(),
        false => &[],
    };
    let mut targets = Vec::with_capacity(sync_targets.len());
    for target in sync_targets {
        let seen = match ctx.backend(target).await {
            Ok(backend) => backend.read(&path, None).await.map_err(Error::from),
            Err(e) => Err(e),
        };
        if let Ok(seen) = &seen {
            owns(target, seen.as_ref()).await?;
        }
        targets.push((target.clone(), seen.map(|v| v.map(read))));
    }
    let native = get_in(ctx, &ms.namespace().unwrap_or_default(), &ms.secret_name()).await?;
    Ok(Gathered {
        profile,
        via,
        writes,
        owner: (!reads_only).then_some(me),
        identity_verified: ctx.config.verified_identity,
        approvals,
        migration,
        source: current,
        held,
        carried,
        content,
        targets,
        native,
    })
}

/// Versions the source holds between the status's newest and `current` (which included):
/// none, without a read, unless `current` is ahead of the status. At most
/// [`MAX_HELD_READS`] reads.
async fn held_above(
    source: &dyn crate::backend::Backend,
    path: &str,
    status: &ManagedSecretStatus,
    current: Option<&StoredVersion>,
) -> Result<Vec<VersionStamp>> {
    let latest = status.versions.last().map_or(0, |v| v.version);
    let Some(stamp) = current.and_then(|c| c.stamp.clone()) else {
        return Ok(vec![]);
    };
    if stamp.version <= latest {
        return Ok(vec![]);
    }
    let from = (latest + 1).max(stamp.version.saturating_sub(MAX_HELD_READS));
    let mut held = vec![];
    for v in from..stamp.version {
        if let Some(s) = source.read(path, Some(v)).await?.and_then(|r| r.stamp) {
            held.push(s);
        }
    }
    held.push(stamp);
    Ok(held)
}

/// The most versions read to find what a restart left unrecorded.
const MAX_HELD_READS: u64 = 20;

/// The content the spec asks for beyond the stores' current values: the version rolled
/// back to, the pushed Secret, or a fresh value when the plan's rule says to generate.
async fn observe_content(
    ms: &ManagedSecret,
    ctx: &Context,
    (profile, ns, approvals): (&VaultProfile, &NamespaceInfo, &super::gates::ApprovalFacts),
    status: &ManagedSecretStatus,
    current: Option<&Read>,
    now: jiff::Timestamp,
    fingerprint: &impl Fn(&SecretData) -> ContentFingerprint,
) -> Result<Content> {
    let path = ms.store_path();
    let read = |v: StoredVersion| Read {
        fingerprint: fingerprint(&v.data),
        data: v.data,
        stamp: v.stamp,
        store_version: v.store_version,
    };
    let source_name = profile.spec.source.as_str();
    Ok(
        match (
            ms.spec.rollback_to,
            &ms.spec.content.from_store,
            &ms.spec.content.from_secret,
            &ms.spec.content.generate,
        ) {
            (Some(n), ..) => {
                let (store, _) = super::decide::rollback_source(&status.versions, n, source_name);
                let backend = ctx.backend(store).await?;
                Content::Rollback {
                    version: n,
                    store: store.to_owned(),
                    found: backend.read(&path, Some(n)).await?.map(read),
                }
            }
            (None, None, None, Some(spec)) => {
                let decision = generate_decision(ms, profile, status, current, now).await;
                // Nothing is generated while the generation waits for approval.
                let held = (profile.spec.approval.is_some() || approvals.previous.is_some())
                    && matches!(
                        super::gates::generate_gate(
                            ms,
                            (profile, approvals, ctx.config.verified_identity),
                            status,
                            current,
                            now
                        ),
                        Some(super::approval::Gate::Hold(_))
                    );
                let fresh = match decision {
                    GenerateDecision::UseStored => None,
                    GenerateDecision::Generate { .. } if held => None,
                    GenerateDecision::Generate { .. } => {
                        let issuer = match &spec.issuer_ref {
                            Some(r) if ms.spec.type_ == SecretType::Certificate => {
                                Some(issuer_value(ctx, ns, &r.name).await?)
                            }
                            _ => None,
                        };
                        let data = crate::content::cpu::generate(
                            ms.spec.type_,
                            spec,
                            &ms.name_any(),
                            issuer,
                        )
                        .await?;
                        Some(value(data, fingerprint))
                    }
                };
                Content::Generate { fresh }
            }
            (None, Some(_), ..) => Content::FromStore,
            (None, None, Some(from), _) => {
                let data =
                    read_secret(ctx, &ms.namespace().unwrap_or_default(), &from.name).await?;
                Content::Pushed {
                    from: from.name.clone(),
                    value: value(data, fingerprint),
                }
            }
            (None, None, None, None) => Content::Unset,
        },
    )
}

/// [`plan::generate_decision`]; on a blocking thread when validating the stored value
/// parses keys or certificates.
async fn generate_decision(
    ms: &ManagedSecret,
    profile: &VaultProfile,
    status: &ManagedSecretStatus,
    current: Option<&Read>,
    now: jiff::Timestamp,
) -> GenerateDecision {
    if current.is_none() || !crate::content::cpu::is_heavy(ms.spec.type_) {
        return plan::generate_decision(ms, profile, status, current, now);
    }
    let (ms, profile, status) = (ms.clone(), profile.clone(), status.clone());
    let current = current.cloned();
    crate::content::cpu::blocking(move || {
        plan::generate_decision(&ms, &profile, &status, current.as_ref(), now)
    })
    .await
}

/// `ms` as the owner its stores record.
pub fn owner_of(ms: &ManagedSecret) -> Owner {
    Owner {
        namespace: ms.namespace().unwrap_or_default(),
        name: ms.name_any(),
        uid: ms.uid().unwrap_or_default(),
    }
}

/// Whether `me` may write `path` in `store`, given what the store read `r` records as the
/// path's owner ([`tenancy::ownership`]).
async fn ownership(
    ctx: &Context,
    store: &str,
    path: &str,
    me: &Owner,
    r: Option<&StoredVersion>,
) -> Result<()> {
    let recorded = r
        .and_then(|r| r.stamp.as_ref())
        .and_then(|s| s.owner.as_ref());
    let live = match recorded {
        Some(o) if o.uid != me.uid => alive(ctx, o).await,
        _ => false,
    };
    tenancy::ownership(store, path, me, recorded, |_| live).map_err(refused)
}

/// Whether the ManagedSecret `owner` names still exists with its uid: the cache says so, or
/// (not cached: another operator's namespace or selector) the API server does. When neither
/// can tell, it counts as alive: the path stays refused.
async fn alive(ctx: &Context, owner: &Owner) -> bool {
    let key = kube::runtime::reflector::ObjectRef::new(&owner.name).within(&owner.namespace);
    if let Some(cached) = ctx.caches.managed.get(&key) {
        return cached.uid().as_deref() == Some(owner.uid.as_str());
    }
    match Api::<ManagedSecret>::namespaced(ctx.client.clone(), &owner.namespace)
        .get_opt(&owner.name)
        .await
    {
        Ok(found) => found.is_some_and(|m| m.uid().as_deref() == Some(owner.uid.as_str())),
        Err(_) => true,
    }
}

/// [`tenancy::space_conflicts`] of `profile` against the cached profiles and stores: the
/// first one, as the sync's error.
fn no_space_conflict(ctx: &Context, profile: &VaultProfile) -> Result<()> {
    let all = ctx.caches.profiles.state();
    let stores = ctx.caches.stores.state();
    let backend = |name: &str| {
        let store = stores.iter().find(|s| s.name_any() == name)?;
        store.spec.backend_identity()
    };
    match tenancy::space_conflicts(profile, all.iter().map(|p| p.as_ref()), backend)
        .into_iter()
        .next()
    {
        Some(conflict) => Err(refused(conflict)),
        None => Ok(()),
    }
}

/// A secret-space refusal as the sync's error.
fn refused(r: tenancy::Refusal) -> Error {
    Error::config(r.reason, r.message)
}

/// A value that no store holds yet (pushed or generated), fingerprinted.
fn value(data: SecretData, fingerprint: &impl Fn(&SecretData) -> ContentFingerprint) -> Read {
    Read {
        fingerprint: fingerprint(&data),
        data,
        stamp: None,
        store_version: None,
    }
}

async fn observe_migration(
    ctx: &Context,
    path: &str,
    status: &ManagedSecretStatus,
    from: &str,
    to: &str,
    fingerprint: &impl Fn(&SecretData) -> ContentFingerprint,
) -> Result<migration::Observed> {
    let old = ctx.backend(from).await?;
    let new = ctx.backend(to).await?;
    migration::observe(old.as_ref(), new.as_ref(), path, status, fingerprint).await
}

/// The VaultProfile `ms` uses: [`profiles::resolve`] of its `spec.profile`, its namespace's
/// labels and annotations, and the profiles this operator manages. A refusal is confirmed
/// on a fresh list of the profiles (the cache may not hold one created a moment ago).
pub(super) async fn resolve_profile(
    ms: &ManagedSecret,
    ctx: &Context,
) -> Result<(Arc<VaultProfile>, Via, NamespaceInfo)> {
    let caches = &ctx.caches;
    let ns = caches
        .namespace_info(&ctx.client, &ms.namespace().unwrap_or_default())
        .await?;
    let requested = ms.spec.profile.as_deref();
    let cached = caches.profiles.state();
    if let Ok(resolved) = profiles::resolve(requested, &ns, cached.iter().map(|p| p.as_ref()))
        && let Some(p) = cached.iter().find(|p| p.name_any() == resolved.profile)
    {
        return Ok((p.clone(), resolved.via, ns));
    }
    let fresh = caches.list_profiles(&ctx.client).await?;
    let resolved = profiles::resolve(requested, &ns, &fresh)
        .map_err(|r| Error::config(r.reason, r.message))?;
    let profile = fresh
        .into_iter()
        .find(|p| p.name_any() == resolved.profile)
        .ok_or_else(|| {
            Error::config(
                Reason::ProfileNotFound,
                format!("VaultProfile {} does not exist", resolved.profile),
            )
        })?;
    Ok((Arc::new(profile), resolved.via, ns))
}

/// The object `name` of kind `K` in `namespace`, if it exists.
async fn get_in<K>(ctx: &Context, namespace: &str, name: &str) -> Result<Option<K>>
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(ctx.client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(Error::kube(
            Verb::Read,
            format!("{} {namespace}/{name}", K::kind(&())),
        ))
}

/// `content.fromSecret`: the data of Secret `name` of the ManagedSecret's namespace.
async fn read_secret(ctx: &Context, namespace: &str, name: &str) -> Result<SecretData> {
    let secret: Secret = get_in(ctx, namespace, name).await?.ok_or_else(|| {
        Error::config(
            Reason::SourceSecretNotFound,
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

/// The current value of the CA ManagedSecret `name` (type certificate), read from its
/// profile's source store and validated.
async fn issuer_value(ctx: &Context, ns: &NamespaceInfo, name: &str) -> Result<SecretData> {
    let issuer: ManagedSecret = get_in(ctx, &ns.name, name).await?.ok_or_else(|| {
        Error::config(
            Reason::IssuerNotFound,
            format!("issuerRef: ManagedSecret {name} does not exist"),
        )
    })?;
    if issuer.spec.type_ != SecretType::Certificate {
        return Err(Error::config(
            Reason::IssuerNotCertificate,
            format!("issuerRef: ManagedSecret {name} is not of type certificate"),
        ));
    }
    let issuer_profile = issuer
        .spec
        .profile
        .clone()
        .or_else(|| issuer.status.as_ref().and_then(|s| s.profile.clone()))
        .unwrap_or_default();
    let not_ready = |message: String| Error::config(Reason::IssuerNotReady, message);
    let profile = ctx
        .caches
        .get::<VaultProfile>(&ctx.client, &issuer_profile)
        .await?
        .ok_or_else(|| {
            not_ready(format!(
                "issuerRef: the VaultProfile of ManagedSecret {name} does not exist"
            ))
        })?;
    // The issuer's value is read under the same rules as the issuer itself: its profile
    // must admit this namespace, its path must lie in this namespace's space (or be shared).
    if profiles::selects(profile.spec.namespace_selector.as_ref(), &ns.labels) != Ok(true) {
        return Err(Error::config(
            Reason::ProfileNotAllowed,
            format!(
                "issuerRef: ManagedSecret {name}'s VaultProfile {issuer_profile} does not admit namespace {}",
                ns.name
            ),
        ));
    }
    tenancy::access(&profile, ns, &issuer.store_path()).map_err(refused)?;
    // Nor may its profile's space overlap another's in a shared store (the issuer's own
    // sync is refused then; issuing from it must be too).
    no_space_conflict(ctx, &profile)?;
    let store = ctx.backend(&profile.spec.source).await?;
    let value = store
        .read(&issuer.store_path(), None)
        .await?
        .ok_or_else(|| not_ready(format!("issuerRef: ManagedSecret {name} has no value yet")))?;
    crate::content::validate(SecretType::Certificate, &value.data)
        .map_err(|e| not_ready(format!("issuerRef: ManagedSecret {name}: {e}")))?;
    Ok(value.data)
}
