//! The Helm chart as the e2e tests install it, and people under its roles: helm runs, a
//! release uninstalled when dropped, kubeconfigs and clients impersonating a ServiceAccount
//! or a user (what `kubectl --as` does), RoleBindings.

use super::fixture::{Fixture, wait_until};
use super::{Testbed, cleanup_blocking};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::DeleteParams;
use kube::{Api, Client};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The helm binary the test bed built (`e2e/testbed up` names it in its env file).
pub fn helm() -> PathBuf {
    let bed = Testbed::load();
    match bed.vars.get("KEYHAVEN_HELM_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => panic!(
            "{}/env names no helm: run e2e/testbed up (it builds helm)",
            bed.dir.display()
        ),
    }
}

pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/keyhaven")
}

/// Runs helm with `args`, its state kept in a temporary directory; panics on failure.
pub fn run_helm(args: &[&str]) -> String {
    let home = std::env::temp_dir().join("keyhaven-e2e-helm");
    let out = Command::new(helm())
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Uninstalls a Helm release when dropped.
pub struct Release {
    pub name: String,
    pub namespace: String,
    pub kubeconfig: PathBuf,
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = Command::new(helm())
            .args(["uninstall", &self.name, "--namespace", &self.namespace])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .output();
    }
}

/// A copy of the bed's admin kubeconfig that impersonates the ServiceAccount `ns/name`.
pub fn impersonating_kubeconfig(admin: &Path, ns: &str, name: &str) -> PathBuf {
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(admin).unwrap()).unwrap();
    let user = &mut config["users"][0]["user"];
    user["as"] = format!("system:serviceaccount:{ns}:{name}").into();
    user["as-groups"] = serde_yaml::to_value([
        "system:serviceaccounts".to_owned(),
        format!("system:serviceaccounts:{ns}"),
        "system:authenticated".to_owned(),
    ])
    .unwrap();
    let path = std::env::temp_dir().join(format!("keyhaven-e2e-{ns}-{name}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

pub fn forbidden<T>(r: Result<T, kube::Error>) -> bool {
    matches!(r, Err(kube::Error::Api(s)) if s.code == 403)
}

/// A client of the bed's admin impersonating `user` (authenticated, in no other group).
pub async fn client_as(user: &str) -> Client {
    let mut config = Testbed::load().kube_config().await;
    config.auth_info.impersonate = Some(user.to_owned());
    config.auth_info.impersonate_groups = Some(vec!["system:authenticated".to_owned()]);
    Client::try_from(config).unwrap()
}

/// Deletes a ClusterRoleBinding when dropped.
pub struct ClusterBinding(pub String);

impl Drop for ClusterBinding {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.0);
        cleanup_blocking(&Testbed::load().kubeconfig, move |client| async move {
            Api::<ClusterRoleBinding>::all(client)
                .delete(&name, &DeleteParams::default())
                .await
                .map(drop)
                .map_err(|e| format!("delete ClusterRoleBinding {name}: {e}"))
        });
    }
}

/// A RoleBinding in `namespace` (a ClusterRoleBinding without) of ClusterRole `role` to `user`.
pub fn binding(name: &str, namespace: Option<&str>, role: &str, user: &str) -> serde_json::Value {
    let mut b = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    });
    if let Some(ns) = namespace {
        b["kind"] = "RoleBinding".into();
        b["metadata"]["namespace"] = ns.into();
    }
    b
}

/// The bed's kubectl (the env file's PATH names the directory it was built into).
pub fn kubectl() -> PathBuf {
    let bed = Testbed::load();
    bed.vars
        .get("PATH")
        .into_iter()
        .flat_map(|p| p.split(':'))
        .map(|dir| Path::new(dir).join("kubectl"))
        .find(|k| k.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{}/env names no kubectl: run e2e/testbed up",
                bed.dir.display()
            )
        })
}

/// What a person does with `kubectl --as USER` (authenticated, in no other group): runs
/// `args` with `stdin`; whether it succeeded, and its output.
pub fn kubectl_as(user: &str, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let bed = Testbed::load();
    let mut child = Command::new(kubectl())
        .arg("--kubeconfig")
        .arg(&bed.kubeconfig)
        .arg(format!("--as={user}"))
        .arg("--as-group=system:authenticated")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kubectl");
    let mut input = child.stdin.take().expect("kubectl stdin");
    if let Some(text) = stdin {
        input
            .write_all(text.as_bytes())
            .expect("write kubectl stdin");
    }
    drop(input);
    let out = child.wait_with_output().expect("kubectl output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `kubectl --as USER apply -f -` of `object`; panics unless it is accepted.
pub fn apply_as(user: &str, object: &serde_json::Value) {
    let (ok, out) = kubectl_as(user, &["apply", "-f", "-"], Some(&object.to_string()));
    assert!(ok, "kubectl --as {user} apply: {out}");
}

/// Installs the chart as release `release` in `namespace` with `sets` (`--set` values).
pub fn install(release: &str, namespace: &str, sets: &[String]) -> Release {
    let bed = Testbed::load();
    let chart = chart_dir();
    let mut args = vec![
        "install".to_owned(),
        release.to_owned(),
        chart.display().to_string(),
        "--namespace".to_owned(),
        namespace.to_owned(),
        "--create-namespace".to_owned(),
        "--kubeconfig".to_owned(),
        bed.kubeconfig.display().to_string(),
    ];
    for set in sets {
        args.extend(["--set".to_owned(), set.clone()]);
    }
    run_helm(&args.iter().map(String::as_str).collect::<Vec<_>>());
    Release {
        name: release.to_owned(),
        namespace: namespace.to_owned(),
        kubeconfig: bed.kubeconfig.clone(),
    }
}

/// Whether ClusterRole `role` has a keyhaven.io rule on managedsecrets with `verb`.
pub async fn grants(roles: &Api<ClusterRole>, role: &str, verb: &str) -> bool {
    let rules = roles.get(role).await.ok().and_then(|r| r.rules);
    rules.unwrap_or_default().iter().any(|r| {
        let has = |list: &Option<Vec<String>>, x: &str| list.iter().flatten().any(|v| v == x);
        has(&r.api_groups, "keyhaven.io")
            && r.resources.iter().flatten().any(|v| v == "managedsecrets")
            && r.verbs.iter().any(|v| v == verb)
    })
}

/// The ClusterRoles a namespace's viewer and developer are bound to: the built-in view and
/// edit, once the chart's roles are aggregated into them (and into admin, with approve). A
/// bed whose kube-controller-manager aggregates nothing (started before e2e/testbed ran the
/// clusterrole-aggregation controller: its view has no rules) gets the chart's roles bound
/// directly.
pub async fn viewer_and_developer_roles(fx: &Fixture, release: &str) -> [String; 2] {
    let roles: Api<ClusterRole> = fx.cluster_api();
    let view = roles.get("view").await.unwrap();
    if view.rules.is_none_or(|r| r.is_empty()) {
        eprintln!(
            "this bed aggregates no ClusterRoles (restart it for the aggregation check): \
             binding {release}-view and {release}-edit directly"
        );
        return [format!("{release}-view"), format!("{release}-edit")];
    }
    for (role, verb) in [("view", "list"), ("edit", "create"), ("admin", "approve")] {
        let aggregated = wait_until(Duration::from_secs(30), || async {
            grants(&roles, role, verb).await.then_some(())
        })
        .await;
        assert!(
            aggregated.is_some(),
            "{verb} on managedsecrets never reached {role}"
        );
    }
    assert!(!grants(&roles, "view", "create").await);
    ["view".to_owned(), "edit".to_owned()]
}
