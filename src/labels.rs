//! Every label, annotation and finalizer key keyhaven writes or reads, in one place.

// Native Secrets keyhaven materializes.
/// The label selecting native Secrets keyhaven manages (the controller watches through it).
pub const MANAGED_LABEL: &str = "keyhaven.io/managed";
pub const MANAGED_LABEL_VALUE: &str = "true";
/// The label naming the ManagedSecret behind a native Secret.
pub const MANAGED_SECRET_LABEL: &str = "keyhaven.io/managed-secret";
/// The version a native Secret holds (also the version label of a store's records).
pub const VERSION_ANNOTATION: &str = "keyhaven.io/version";
/// The fingerprint of the version a native Secret (or a store's record) holds.
pub const FINGERPRINT_ANNOTATION: &str = "keyhaven.io/fingerprint";
/// The ManagedSecret (`namespace/name/uid`) that writes a path, on the objects a store keeps
/// for it.
pub const OWNER_ANNOTATION: &str = "keyhaven.io/owner";
/// On a Namespace: a platform admin set it aside for kubernetes stores' Secrets (no tenant
/// works there), so the ManagedSecrets of other namespaces may keep versions in it.
pub const STORE_NAMESPACE_LABEL: &str = "keyhaven.io/store-namespace";

// ManagedSecrets and the workloads that consume them.
/// Any new value of this annotation on a generated ManagedSecret rotates it now.
pub const ROTATE_ANNOTATION: &str = "keyhaven.io/rotate";
/// Who asked for a ManagedSecret's current spec (or rotate request): the username the
/// admission webhook saw, written by the webhook on every create and change (whatever the
/// user wrote there); versions record it as `createdBy`.
pub const REQUESTED_BY_ANNOTATION: &str = "keyhaven.io/requested-by";
/// The groups of the user in [`REQUESTED_BY_ANNOTATION`], comma-separated.
pub const REQUESTED_GROUPS_ANNOTATION: &str = "keyhaven.io/requested-groups";
/// Set on the pod template of each rolloutRestartTarget when the native Secret changes.
pub const RESTARTED_AT_ANNOTATION: &str = "keyhaven.io/restartedAt";
/// The finalizer that lets keyhaven apply a ManagedSecret's target deletionPolicy.
pub const CLEANUP_FINALIZER: &str = "keyhaven.io/cleanup";

// Namespaces, profiles and stores.
/// A namespace's preferred VaultProfile.
pub const PROFILE_ANNOTATION: &str = "keyhaven.io/profile";
/// Holds a SecretStore's deletion while profiles or secrets use it.
pub const STORE_FINALIZER: &str = "keyhaven.io/store-in-use";
/// `true` releases a held SecretStore deletion anyway.
pub const FORCE_DELETE_ANNOTATION: &str = "keyhaven.io/force-delete";

// Objects keyhaven's stores and keys keep in Kubernetes.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "keyhaven";
/// The store a record belongs to.
pub const STORE_LABEL: &str = "keyhaven.io/store";
/// The object id ([`crate::backend::object_id`]) of the path a record belongs to.
pub const OBJECT_LABEL: &str = "keyhaven.io/object";
/// The version a record holds.
pub const VERSION_LABEL: &str = "keyhaven.io/version";
/// What a record is (a sealed version, bookkeeping).
pub const ROLE_LABEL: &str = "keyhaven.io/role";
/// The path a record belongs to, in full.
pub const PATH_ANNOTATION: &str = "keyhaven.io/path";
/// The key-encryption key that wraps a sealed record's data key.
pub const KEK_ID_ANNOTATION: &str = "keyhaven.io/kek-id";
/// What an operator-held key Secret is for.
pub const DESCRIPTION_ANNOTATION: &str = "keyhaven.io/description";

// Approvals.
/// On a SecretApproval: who made the decision, written by the admission webhook on create
/// (whatever the user wrote there) and immutable after.
pub const DECIDED_BY_ANNOTATION: &str = "keyhaven.io/decided-by";
/// The groups of the user in [`DECIDED_BY_ANNOTATION`], comma-separated.
pub const DECIDED_GROUPS_ANNOTATION: &str = "keyhaven.io/decided-groups";
/// On a ManagedSecret being deleted: who deleted it, written by the admission webhook when
/// it admits the deletion (a deletion cannot be mutated); nobody else may set it.
pub const DELETION_REQUESTED_BY_ANNOTATION: &str = "keyhaven.io/deletion-requested-by";
