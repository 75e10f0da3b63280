//! `kubectl keyhaven`: a kubectl plugin for keyhaven. It only reads and patches resources
//! (and creates SecretApprovals);
//! the controller does the work, so RBAC on keyhaven's kinds governs what it may do.
//!
//! Put the binary on PATH as `kubectl-keyhaven` and run `kubectl keyhaven <command>`.

use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::Namespace;
use keyhaven::api::{
    ComplianceState, Decision, ManagedSecret, RequestState, SecretApproval, SecretStore,
    VaultProfile,
};
use keyhaven::controller::ROTATE_ANNOTATION;
use keyhaven::profiles::{self, NamespaceInfo};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::process::ExitCode;

/// The field manager of the plugin's patches.
const FIELD_MANAGER: &str = "kubectl-keyhaven";

#[derive(Parser)]
#[command(
    name = "kubectl-keyhaven",
    version,
    about = "Inspect and steer keyhaven: stores, version history, rollback, rotation, profiles"
)]
struct Cli {
    /// Namespace of the ManagedSecret (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Only SecretStores and VaultProfiles with these labels (as the operator's
    /// --store-selector): `stores`, `profile-for`.
    #[arg(short = 'l', long, global = true)]
    selector: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand)]
enum Command {
    /// The SecretStores: NAME TYPE SECRETS STATUS MESSAGE.
    Stores,
    /// The version history of a ManagedSecret (its status.versions, newest last).
    Versions { secret: String },
    /// Make a NEW version holding version N's content (sets spec.rollbackTo and spec.reason).
    Rollback {
        secret: String,
        version: u64,
        /// Recorded with the new version.
        #[arg(long)]
        reason: String,
    },
    /// Rotate a generated ManagedSecret now (sets the annotation keyhaven.io/rotate).
    Rotate { secret: String },
    /// The VaultProfile a ManagedSecret without spec.profile in NAMESPACE uses, and why.
    ProfileFor { namespace: String },
    /// Move every version of PROFILE's secrets to STORE: makes STORE the profile's source
    /// and its current source the migrateFrom (the controller moves, verifies by
    /// fingerprint, then deletes). Run again to see the progress.
    Migrate {
        profile: String,
        #[arg(long)]
        to: String,
    },
    /// ManagedSecrets whose change waits for approval (this namespace, or -A every one).
    Pending {
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Approve (or --reject) SECRET's open request: creates a SecretApproval for it. The
    /// admission webhook refuses it from the requester or a user without `approve`.
    Approve {
        secret: String,
        #[arg(long)]
        reject: bool,
        #[arg(long)]
        comment: Option<String>,
    },
    /// PROFILE's ManagedSecrets (every namespace) and the compliance rules they break.
    Compliance { profile: String },
    /// The audit log: `audit verify FILE`.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check every record of FILE (its MAC and its place in the chain); report the first
    /// one changed, dropped or reordered (exit 1). The key: --key-file, else the Secret
    /// keyhaven-audit-key in --operator-namespace.
    Verify {
        file: std::path::PathBuf,
        /// The audit key: 32 bytes, raw, hex or base64.
        #[arg(long)]
        key_file: Option<std::path::PathBuf>,
        /// FILE continues an earlier one (rotated away): it need not start at record 1.
        #[arg(long)]
        continues: bool,
        #[arg(long, default_value = "keyhaven-system")]
        operator_namespace: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    keyhaven::install_crypto_provider();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Audit {
        command:
            AuditCommand::Verify {
                file,
                key_file,
                continues,
                operator_namespace,
            },
    } = &cli.command
    {
        let key = match key_file {
            Some(path) => keyhaven::audit::key_from_file(path).map_err(anyhow::Error::msg)?,
            None => {
                let client = Client::try_default().await?;
                keyhaven::audit::read_key(client, operator_namespace).await?
            }
        };
        let (report, ok) =
            keyhaven::audit::verify_file(file, &key, *continues).map_err(anyhow::Error::msg)?;
        println!("{report}");
        return Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let client = Client::try_default().await?;
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let mut lp = ListParams::default();
    if let Some(selector) = &cli.selector {
        lp = lp.labels(selector);
    }
    let managed: Api<ManagedSecret> = Api::namespaced(client.clone(), &namespace);
    let output = cli.output;
    match cli.command {
        Command::Stores => stores(client, &lp, output).await?,
        Command::Versions { secret } => versions(&managed, &secret, output).await?,
        Command::Rollback {
            secret,
            version,
            reason,
        } => rollback(&managed, &secret, version, &reason, output).await?,
        Command::Rotate { secret } => rotate(&managed, &secret, output).await?,
        Command::ProfileFor { namespace } => {
            if !profile_for(client, &lp, &namespace, output).await? {
                return Ok(ExitCode::from(2));
            }
        }
        Command::Migrate { profile, to } => {
            let (p, message) = migrate(&Api::all(client), &profile, &to).await?;
            print_done(output, &p, &message)?;
        }
        Command::Pending { all_namespaces } => {
            let api = match all_namespaces {
                true => Api::all(client),
                false => managed,
            };
            let items = api.list(&ListParams::default()).await?.items;
            let waiting: Vec<&ManagedSecret> = items.iter().filter(|m| is_pending(m)).collect();
            print(
                output,
                &waiting,
                &[
                    "NAMESPACE",
                    "NAME",
                    "OPERATION",
                    "REQUEST",
                    "APPROVALS",
                    "REQUESTED-BY",
                    "EXPIRES",
                ],
                pending_rows(&waiting),
            )?;
        }
        Command::Approve {
            secret,
            reject,
            comment,
        } => {
            let ms = managed.get(&secret).await?;
            let made = approve(client, &namespace, &ms, reject, comment).await?;
            let verb = if reject { "rejected" } else { "approved" };
            print_done(
                output,
                &made,
                &format!(
                    "secretapproval/{}: {verb} request {} of managedsecret/{secret}",
                    made.name_any(),
                    made.spec.request
                ),
            )?;
        }
        Command::Audit { .. } => unreachable!("handled before a client is made"),
        Command::Compliance { profile } => {
            let p = Api::<VaultProfile>::all(client.clone())
                .get(&profile)
                .await?;
            let all = Api::<ManagedSecret>::all(client)
                .list(&ListParams::default())
                .await?
                .items;
            let mine: Vec<&ManagedSecret> = all
                .iter()
                .filter(|m| m.status.as_ref().and_then(|s| s.profile.as_deref()) == Some(&profile))
                .collect();
            print(
                output,
                &mine,
                &["NAMESPACE", "NAME", "TYPE", "STATE", "FAILING"],
                compliance_rows(&mine),
            )?;
            if output == Output::Table {
                match p.status.and_then(|s| s.compliance) {
                    Some(c) => println!(
                        "\n{} checked, {} compliant, {} non-compliant",
                        c.checked, c.compliant, c.non_compliant
                    ),
                    None => println!("\nVaultProfile {profile} has no compliance rules"),
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn is_pending(ms: &ManagedSecret) -> bool {
    ms.status
        .as_ref()
        .and_then(|s| s.approval.as_ref())
        .is_some_and(|a| a.state == RequestState::Pending)
}

/// The rows of `pending`.
fn pending_rows(items: &[&ManagedSecret]) -> Vec<Vec<String>> {
    items
        .iter()
        .filter_map(|m| {
            let a = m.status.as_ref()?.approval.as_ref()?;
            let approvals = a
                .decisions
                .iter()
                .filter(|d| d.decision == Decision::Approve)
                .count();
            Some(vec![
                m.namespace().unwrap_or_default(),
                m.name_any(),
                a.operation.as_str().to_owned(),
                a.id.clone(),
                format!("{approvals}/{}", a.required),
                a.requested_by.clone(),
                a.expires_at.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
            ])
        })
        .collect()
}

/// The rows of `compliance`.
fn compliance_rows(items: &[&ManagedSecret]) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|m| {
            let c = m.status.as_ref().and_then(|s| s.compliance.as_ref());
            vec![
                m.namespace().unwrap_or_default(),
                m.name_any(),
                m.spec.type_.as_str().to_owned(),
                match c.map(|c| c.state) {
                    Some(ComplianceState::Compliant) => "Compliant".into(),
                    Some(ComplianceState::NonCompliant) => "NonCompliant".into(),
                    None => "Unchecked".into(),
                },
                c.map(|c| c.failing.join(",")).unwrap_or_default(),
            ]
        })
        .collect()
}

/// `approve`: a SecretApproval answering `ms`'s open request.
async fn approve(
    client: Client,
    namespace: &str,
    ms: &ManagedSecret,
    reject: bool,
    comment: Option<String>,
) -> anyhow::Result<SecretApproval> {
    let name = ms.name_any();
    let request = ms
        .status
        .as_ref()
        .and_then(|s| s.approval.as_ref())
        .filter(|a| a.state == RequestState::Pending)
        .ok_or_else(|| {
            anyhow::anyhow!("managedsecret/{name} has no request waiting for approval")
        })?;
    let approval: SecretApproval = serde_json::from_value(json!({
        "apiVersion": "keyhaven.io/v1alpha1", "kind": "SecretApproval",
        "metadata": {"generateName": format!("{name}-"), "namespace": namespace},
        "spec": {"secretRef": {"name": name}, "request": request.id,
            "decision": if reject { "Reject" } else { "Approve" }, "comment": comment},
    }))?;
    Ok(Api::<SecretApproval>::namespaced(client, namespace)
        .create(&PostParams::default(), &approval)
        .await?)
}

/// `stores`: the SecretStores the selector matches.
async fn stores(client: Client, lp: &ListParams, output: Output) -> anyhow::Result<()> {
    let stores = Api::<SecretStore>::all(client).list(lp).await?.items;
    let rows = stores
        .iter()
        .map(|s| {
            let st = s.status.clone().unwrap_or_default();
            vec![
                s.name_any(),
                st.type_
                    .unwrap_or_else(|| s.spec.provider_type().to_owned()),
                st.secrets.map_or_else(|| "-".into(), |n| n.to_string()),
                st.phase
                    .map_or_else(|| "-".into(), |p| p.as_str().to_owned()),
                st.message.unwrap_or_default(),
            ]
        })
        .collect();
    print(
        output,
        &stores,
        &["NAME", "TYPE", "SECRETS", "STATUS", "MESSAGE"],
        rows,
    )
}

/// `versions`: a ManagedSecret's version history, the current one starred.
async fn versions(api: &Api<ManagedSecret>, secret: &str, output: Output) -> anyhow::Result<()> {
    let ms = api.get(secret).await?;
    let status = ms.status.clone().unwrap_or_default();
    let rows = status
        .versions
        .iter()
        .map(|v| {
            let current = status.current_version == Some(v.version);
            let fp = keyhaven::crypto::Fingerprint::digest(&v.fingerprint);
            vec![
                format!("{}{}", v.version, if current { "*" } else { "" }),
                fp[..fp.len().min(16)].to_owned(),
                v.store.clone(),
                v.created_at.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
                v.created_by.clone(),
                v.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print(
        output,
        &status.versions,
        &["VERSION", "FINGERPRINT", "STORE", "CREATED", "BY", "REASON"],
        rows,
    )
}

/// `rollback`: asks for a new version with version `version`'s content.
async fn rollback(
    api: &Api<ManagedSecret>,
    secret: &str,
    version: u64,
    reason: &str,
    output: Output,
) -> anyhow::Result<()> {
    let patch = json!({"spec": {"rollbackTo": version, "reason": reason}});
    let ms = merge_patch(api, secret, &patch).await?;
    print_done(
        output,
        &ms,
        &format!(
            "managedsecret/{secret}: rollback to version {version} requested (the operator records it as a new version)"
        ),
    )
}

/// `rotate`: asks for a new generated value now.
async fn rotate(api: &Api<ManagedSecret>, secret: &str, output: Output) -> anyhow::Result<()> {
    let at = jiff::Timestamp::now().to_string();
    let patch = json!({"metadata": {"annotations": {ROTATE_ANNOTATION: at}}});
    let ms = merge_patch(api, secret, &patch).await?;
    print_done(
        output,
        &ms,
        &format!("managedsecret/{secret}: rotation requested ({ROTATE_ANNOTATION}={at})"),
    )
}

/// `profile-for`: the VaultProfile `namespace` resolves to, and why. False when none does.
async fn profile_for(
    client: Client,
    lp: &ListParams,
    namespace: &str,
    output: Output,
) -> anyhow::Result<bool> {
    let ns = Api::<Namespace>::all(client.clone())
        .get_metadata(namespace)
        .await?;
    let info = NamespaceInfo::from_meta(&ns.metadata);
    let all = Api::<VaultProfile>::all(client).list(lp).await?.items;
    let result = profiles::resolve(None, &info, &all);
    let annotation = info.annotations.get(profiles::PROFILE_ANNOTATION).cloned();
    let defaults = profiles::defaults_for(&info, &all);
    let fallbacks = profiles::fallbacks(&all);
    let (doc, row) = match &result {
        Ok(r) => (
            json!({"namespace": namespace, "profile": r.profile, "via": r.via.as_str(),
                   "annotation": annotation, "defaults": defaults, "fallbacks": fallbacks}),
            vec![
                namespace.to_owned(),
                r.profile.clone(),
                r.via.as_str().to_owned(),
                String::new(),
            ],
        ),
        Err(e) => (
            json!({"namespace": namespace, "profile": null, "reason": e.reason, "message": e.message,
                   "annotation": annotation, "defaults": defaults, "fallbacks": fallbacks}),
            vec![
                namespace.to_owned(),
                "<none>".into(),
                e.reason.to_string(),
                e.message.clone(),
            ],
        ),
    };
    print(
        output,
        &doc,
        &["NAMESPACE", "PROFILE", "VIA", "MESSAGE"],
        vec![row],
    )?;
    Ok(result.is_ok())
}

/// Starts (or reports) the migration of `name`'s secrets to the store `to`.
async fn migrate(
    api: &Api<VaultProfile>,
    name: &str,
    to: &str,
) -> anyhow::Result<(VaultProfile, String)> {
    let profile = api.get(name).await?;
    let progress = |p: &VaultProfile| {
        p.status
            .as_ref()
            .and_then(|s| s.migration.as_ref())
            .map_or_else(
                || "not started yet".to_owned(),
                |m| {
                    format!(
                        "{}: {}/{} secrets moved, {} failed, {} versions",
                        m.phase, m.moved, m.total, m.failed, m.versions_moved
                    )
                },
            )
    };
    if profile.spec.source == to {
        let from = profile.spec.migrate_from.as_deref().unwrap_or("-");
        let message = format!(
            "vaultprofile/{name}: source is {to}, migrating from {from}: {}",
            progress(&profile)
        );
        return Ok((profile, message));
    }
    if let Some(m) = profile.status.as_ref().and_then(|s| s.migration.as_ref())
        && profile.spec.migrate_from.is_some()
        && m.phase != keyhaven::api::MigrationPhase::Complete
    {
        anyhow::bail!(
            "vaultprofile/{name} is still migrating from {} to {} ({}); wait for Complete",
            m.from,
            m.to,
            progress(&profile)
        );
    }
    let from = profile.spec.source.clone();
    // Guarded by the resourceVersion read: a concurrent change of the profile is refused.
    let patch = json!({
        "metadata": {"resourceVersion": profile.resource_version()},
        "spec": {"source": to, "migrateFrom": from},
    });
    let patched = merge_patch(api, name, &patch).await?;
    let message = format!(
        "vaultprofile/{name}: migrating from store {from} to store {to} (progress: kubectl keyhaven migrate {name} --to {to})"
    );
    Ok((patched, message))
}

/// Applies `patch` to `name` as a JSON merge patch, as the plugin's field manager.
async fn merge_patch<K>(api: &Api<K>, name: &str, patch: &Value) -> anyhow::Result<K>
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    Ok(api.patch(name, &pp, &Patch::Merge(patch)).await?)
}

/// Prints `doc` as JSON or YAML, or `rows` as a table under `header`.
fn print<T: Serialize>(
    output: Output,
    doc: &T,
    header: &[&str],
    rows: Vec<Vec<String>>,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(doc)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(doc)?),
        Output::Table => print!("{}", table(header, &rows)),
    }
    Ok(())
}

fn print_done<T: Serialize>(output: Output, object: &T, message: &str) -> anyhow::Result<()> {
    match output {
        Output::Table => println!("{message}"),
        _ => print(output, object, &[], vec![])?,
    }
    Ok(())
}

/// Columns padded to their widest cell, three spaces apart, as kubectl prints them.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}   "));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns_like_kubectl() {
        let rows = vec![
            vec![
                "internal".into(),
                "internal".into(),
                "3".into(),
                "Active".into(),
                "ok".into(),
            ],
            vec![
                "vault-prod".into(),
                "vault".into(),
                "-".into(),
                "Sealed".into(),
                String::new(),
            ],
        ];
        let out = table(&["NAME", "TYPE", "SECRETS", "STATUS", "MESSAGE"], &rows);
        assert_eq!(
            out,
            "NAME         TYPE       SECRETS   STATUS   MESSAGE\n\
             internal     internal   3         Active   ok\n\
             vault-prod   vault      -         Sealed\n"
        );
    }

    #[test]
    fn the_command_line_parses() {
        let cli = Cli::try_parse_from([
            "kubectl-keyhaven",
            "rollback",
            "db",
            "3",
            "--reason",
            "incident",
            "-n",
            "apps",
            "-o",
            "yaml",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Rollback { version: 3, .. }));
        assert_eq!(cli.namespace.as_deref(), Some("apps"));
        assert!(cli.output == Output::Yaml);
        // rollback needs --reason.
        assert!(Cli::try_parse_from(["kubectl-keyhaven", "rollback", "db", "3"]).is_err());
        assert!(Cli::try_parse_from(["kubectl-keyhaven", "stores", "-o", "xml"]).is_err());
    }
}

#[cfg(test)]
mod approval_tests {
    use super::*;

    fn ms(status: Value) -> ManagedSecret {
        serde_json::from_value(
            json!({"apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
            "metadata": {"name": "db", "namespace": "team-a"},
            "spec": {"type": "password", "content": {"fromStore": {}}}, "status": status}),
        )
        .unwrap()
    }

    #[test]
    fn pending_lists_open_requests_with_their_count() {
        let open = ms(
            json!({"approval": {"id": "r1", "operation": "update", "binding": "b",
            "summary": "s", "requestedBy": "alice", "requestedAt": "2026-12-01T00:00:00Z",
            "expiresAt": "2026-12-04T00:00:00Z", "required": 2, "state": "Pending",
            "decisions": [{"name": "a", "decision": "Approve", "by": "bob",
                "at": "2026-12-01T01:00:00Z"}]}}),
        );
        let none = ms(json!({}));
        assert!(is_pending(&open) && !is_pending(&none));
        let rows = pending_rows(&[&open]);
        assert_eq!(
            rows[0],
            [
                "team-a",
                "db",
                "update",
                "r1",
                "1/2",
                "alice",
                "2026-12-04T00:00:00Z"
            ]
        );
    }

    #[test]
    fn compliance_rows_name_rules_only() {
        let bad = ms(json!({"compliance": {"state": "NonCompliant",
            "failing": ["password-min-length", "password-min-entropy"], "enforcement": "Warn",
            "checkedAt": "2026-12-01T00:00:00Z"}}));
        let rows = compliance_rows(&[&bad, &ms(json!({}))]);
        assert_eq!(rows[0][3], "NonCompliant");
        assert_eq!(rows[0][4], "password-min-length,password-min-entropy");
        assert_eq!(rows[1][3], "Unchecked");
    }
}
