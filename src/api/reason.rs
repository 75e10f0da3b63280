//! The reasons keyhaven writes into conditions and Events: one enum, so that every reason
//! the code can write is listed here and nowhere is a reason a free-form string.

use super::common::named_enum;

named_enum! {
    /// A condition's or an Event's reason.
    pub enum Reason {
        // A SecretStore's phase is the reason of its Ready condition and of its Events.
        Active,
        Draining,
        Sealed,
        Unreachable,
        Invalid,
        /// A SecretStore whose deletion is held by the profiles or secrets using it.
        DeletionBlocked,
        InUseByProfiles,
        ForceDeleted,
        KekRotationStarted,
        KekRotationComplete,
        InvalidProvider,
        /// A credential or CA ref naming a namespace the operator may not read them from.
        CredentialNamespaceNotAllowed,
        /// A vault store on a plaintext `http://` server (`Insecure=True`).
        PlaintextHTTP,
        // VaultProfile.
        StoresActive,
        StoresNotActive,
        NoConflict,
        MigrationStarted,
        MigrationComplete,
        MigrationFailed,
        // Profile resolution (ManagedSecret) and profile conflicts (VaultProfile).
        ProfileNotFound,
        ProfileNotAllowed,
        DefaultProfileConflict,
        FallbackProfileConflict,
        NoProfile,
        NamespaceNotFound,
        // Secret spaces: a path outside the namespace's space, a write to a shared path,
        // an intermediate CA the profile does not allow; a profile without isolation.
        PathNotInNamespace,
        PathReadOnly,
        PathReserved,
        // Ownership: another ManagedSecret writes the path.
        PathOwnedElsewhere,
        // A kubernetes store over another tenant's namespace.
        StoreNamespaceNotAllowed,
        // The admission webhook: its certificate could not be issued.
        WebhookCertificateFailed,
        IntermediateCANotAllowed,
        IsolationEnforced,
        IsolationDisabled,
        SecretSpaceConflict,
        // ManagedSecret: a sync that worked.
        SecretSynced,
        AllStoresSynced,
        TargetSyncFailed,
        VersionCreated,
        VersionRecorded,
        DriftRepaired,
        RolloutRestarted,
        RolloutTargetNotFound,
        RolloutRestartForbidden,
        // ManagedSecret: the value's expiry.
        NoExpiry,
        NotExpiring,
        ExpiresSoon,
        Expired,
        // ManagedSecret: a sync that failed.
        KubernetesError,
        StoreUnreachable,
        StoreSealed,
        StoreInvalid,
        StoreError,
        StoreNotFound,
        InvalidContent,
        FinalizerError,
        NoContentSource,
        NotFoundInStore,
        SourceSecretNotFound,
        VersionMismatch,
        RollbackVersionNotFound,
        RollbackVersionMismatch,
        IssuerNotFound,
        IssuerNotCertificate,
        IssuerNotReady,
        TargetSecretMissing,
        TargetSecretExists,
        TargetTypeConflict,
        // ManagedSecret: deletion.
        SecretDeleted,
        SecretKeysRemoved,
        SecretRetained,
        // ManagedSecret: migration out of the profile's migrateFrom.
        Moving,
        Moved,
        MigrationDeleteFailed,
        MigrationMismatch,
        MigrationConflict,
        MigrationVersionMissing,
        MigrationVerifyFailed,
        // ManagedSecret: a duration of the spec out of range (the message names the field).
        InvalidSpec,
        // ManagedSecret: approvals (the request's state) and compliance.
        Pending,
        Approved,
        Rejected,
        ApprovalExpired,
        ApprovalNotRequired,
        DecisionIgnored,
        Compliant,
        NonCompliant,
        // The process; a reconcile that panicked (caught: it failed, nothing else did).
        LeaderElectionFailed,
        ReconcilePanicked,
        // Audit, quotas, retention.
        AuditUnavailable,
        QuotaExceeded,
        VersionsPruned,
    }
}

impl From<super::StorePhase> for Reason {
    fn from(phase: super::StorePhase) -> Reason {
        use super::StorePhase as P;
        match phase {
            P::Active => Reason::Active,
            P::Draining => Reason::Draining,
            P::Sealed => Reason::Sealed,
            P::Unreachable => Reason::Unreachable,
            P::Invalid => Reason::Invalid,
        }
    }
}
