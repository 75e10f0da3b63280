//! End-to-end tests of the vault provider on the test bed: the bed's OpenBao dev server
//! (KV v2 at `secret/`, KV v1 at `kv/`, the kubernetes auth method checked by the real
//! kube-apiserver's TokenReview), private OpenBao servers where a test must seal one, the
//! operator as a real process. No mocks.
//!
//! Every test keeps its values under `e2e/<its namespace>/` of the mount it uses, and makes
//! its own policies, roles and auth mounts (removed at the end), so the tests run in
//! parallel on the one shared OpenBao. OpenBao's file audit log
//! (`KEYHAVEN_OPENBAO_AUDIT_LOG`) tells who logged in and who wrote what.

mod e2e;

use e2e::Testbed;
use e2e::fixture::{Fixture, versions, wait_until};
use e2e::operator::Work;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use keyhaven::api::{ManagedSecret, SecretStore, SecretStoreStatus, StorePhase, VaultProfile};
use keyhaven::backend::{Backend, KubernetesStore};
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vaultrs::api::auth::approle::requests::SetAppRoleRequest;
use vaultrs::api::auth::kubernetes::requests::CreateKubernetesRoleRequest;
use vaultrs::api::token::requests::CreateTokenRequest;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::{kv1, kv2};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn store_versions(ms: &ManagedSecret) -> Vec<Option<u64>> {
    ms.status
        .as_ref()
        .map(|s| s.versions.iter().map(|v| v.store_version).collect())
        .unwrap_or_default()
}

/// An OpenBao client for `addr` holding `token`.
fn vault_at(addr: &str, token: &str) -> VaultClient {
    keyhaven::install_crypto_provider();
    let settings = VaultClientSettingsBuilder::default()
        .address(addr)
        .token(token)
        .build()
        .expect("vault client settings");
    VaultClient::new(settings).expect("build vault client")
}

/// A `vault` provider for `server` with `auth`, on `mount` (KV `version`); an `http://`
/// server (the bed's OpenBao) with `insecureHTTP`, which it needs.
fn vault_provider(server: &str, mount: &str, version: &str, auth: Value) -> Value {
    let mut p = json!({"vault": {"server": server, "mount": mount, "version": version,
        "requestTimeout": "5s", "auth": auth}});
    if server.starts_with("http://") {
        p["vault"]["insecureHTTP"] = json!(true);
    }
    p
}

/// The store's condition of `type_`.
fn store_condition<'a>(
    s: &'a SecretStoreStatus,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    s.conditions.iter().find(|c| c.type_ == type_)
}

/// The KV paths a test may touch: its own prefix and keyhaven's bookkeeping, on `mount`.
/// For KV v2 the `+` segment covers data/, metadata/, delete/, destroy/ and undelete/.
fn kv_policy(mount: &str, v2: bool, prefix: &str) -> String {
    let all = r#"capabilities = ["create", "read", "update", "patch", "delete", "list"]"#;
    let seg = if v2 { "+/" } else { "" };
    format!(
        "path \"{mount}/{seg}{prefix}/*\" {{ {all} }}\n\
         path \"{mount}/{seg}keyhaven/*\" {{ {all} }}\n"
    )
}

/// Waits until the SecretStore's status satisfies `ok`, or panics with its last status.
/// With `poke`, triggers a health check every 3 s; without, relies on the periodic one.
async fn wait_store(
    fx: &Fixture,
    name: &str,
    what: &str,
    timeout: Duration,
    poke: bool,
    ok: impl Fn(&SecretStoreStatus) -> bool,
) -> SecretStoreStatus {
    let api: Api<SecretStore> = fx.cluster_api();
    let deadline = Instant::now() + timeout;
    let mut poked = Instant::now();
    loop {
        let last = api
            .get_opt(name)
            .await
            .ok()
            .flatten()
            .and_then(|s| s.status);
        if let Some(s) = last.as_ref().filter(|s| ok(s)) {
            return s.clone();
        }
        if Instant::now() > deadline {
            panic!(
                "SecretStore {name}: {what}: not reached in {timeout:?}; status: {last:#?}; operator log: {}",
                fx.op.log.display()
            );
        }
        if poke && poked.elapsed() > Duration::from_secs(3) {
            fx.poke_store(name).await;
            poked = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn phase_is(phase: StorePhase) -> impl Fn(&SecretStoreStatus) -> bool {
    move |s| s.phase == Some(phase)
}

/// Waits until the ManagedSecret is Synced at `version` with `Ready=True` (after a failure
/// the phase alone could be stale).
async fn wait_synced_ready(fx: &Fixture, name: &str, version: u64) -> ManagedSecret {
    fx.wait_managed(
        name,
        &format!("Synced and Ready at version {version}"),
        |ms| {
            ms.status.as_ref().is_some_and(|s| {
                s.phase.is_some_and(|p| p == "Synced")
                    && s.current_version == Some(version)
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                    && s.targets.iter().all(|t| t.state == "Synced")
            })
        },
    )
    .await
}

/// No value appears in the status of any of this test's ManagedSecrets or SecretStores.
async fn assert_statuses_clean(fx: &Fixture, values: &[&str]) {
    let managed = fx
        .ns_api::<ManagedSecret>(&fx.ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    let stores = fx
        .cluster_api::<SecretStore>()
        .list(&ListParams::default().labels(&format!("keyhaven.io/e2e-scope={}", fx.ns)))
        .await
        .unwrap();
    let text = format!(
        "{}\n{}",
        serde_json::to_string(&managed.items.iter().map(|m| &m.status).collect::<Vec<_>>())
            .unwrap(),
        serde_json::to_string(&stores.items.iter().map(|s| &s.status).collect::<Vec<_>>()).unwrap()
    );
    for v in values {
        assert!(
            !text.contains(v),
            "a secret value or credential appears in a status"
        );
    }
}

/// A child token of root with `policy` (and `default`), 1h, renewable, its metadata
/// `e2e=<tag>` so the audit log can tell its requests apart.
async fn limited_token(root: &VaultClient, policy: &str, tag: &str) -> String {
    let auth = vaultrs::token::new(
        root,
        Some(
            CreateTokenRequest::builder()
                .policies(vec![policy.to_owned()])
                .ttl("1h")
                .renewable(true)
                .display_name(format!("e2e-{tag}"))
                .meta(HashMap::from([("e2e".to_owned(), tag.to_owned())])),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("create a limited token: {e}"));
    auth.client_token
}

/// OpenBao's file audit log: one JSON object per request and per response. Secret fields
/// are HMAC'd (tokens, request and response data); `auth.metadata`, `auth.display_name`,
/// `request.path`, `request.operation`, `type` and `error` are plain.
struct AuditLog {
    path: PathBuf,
}

impl AuditLog {
    fn of(bed: &Testbed) -> AuditLog {
        let path = bed
            .vars
            .get("KEYHAVEN_OPENBAO_AUDIT_LOG")
            .unwrap_or_else(|| {
                panic!("the bed's env file does not export KEYHAVEN_OPENBAO_AUDIT_LOG: run e2e/testbed down && e2e/testbed up")
            })
            .into();
        AuditLog { path }
    }

    /// The current end of the log: entries after it are `since(mark)`.
    fn mark(&self) -> u64 {
        std::fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("audit log {}: {e}", self.path.display()))
            .len()
    }

    /// Every complete entry written after `mark`.
    fn since(&self, mark: u64) -> Vec<Value> {
        let mut file = std::fs::File::open(&self.path)
            .unwrap_or_else(|e| panic!("audit log {}: {e}", self.path.display()));
        file.seek(SeekFrom::Start(mark)).unwrap();
        let mut bytes = vec![];
        file.read_to_end(&mut bytes).unwrap();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    }
}

fn is_response(e: &Value) -> bool {
    e["type"] == "response"
}

fn is_request(e: &Value) -> bool {
    e["type"] == "request"
}

fn request_path(e: &Value) -> &str {
    e["request"]["path"].as_str().unwrap_or_default()
}

fn metadata<'a>(e: &'a Value, key: &str) -> Option<&'a str> {
    e["auth"]["metadata"][key].as_str()
}

fn is_write(e: &Value) -> bool {
    matches!(
        e["request"]["operation"].as_str(),
        Some("create" | "update" | "patch" | "delete")
    )
}

/// Successful logins at `auth/<mount>/login` with `auth.metadata[key] == value`.
fn logins(entries: &[Value], mount: &str, key: &str, value: &str) -> usize {
    let login = format!("auth/{mount}/login");
    entries
        .iter()
        .filter(|e| is_response(e) && request_path(e) == login && e.get("error").is_none())
        .filter(|e| metadata(e, key) == Some(value))
        .count()
}

/// What a test made in the shared OpenBao, removed at the end (even when it fails).
struct VaultCleanup {
    addr: String,
    token: String,
    policies: Mutex<Vec<String>>,
    kubernetes_roles: Mutex<Vec<String>>,
    auth_mounts: Mutex<Vec<String>>,
}

impl VaultCleanup {
    fn new(bed: &Testbed) -> VaultCleanup {
        VaultCleanup {
            addr: bed.vault_addr.clone(),
            token: bed.vault_token.clone(),
            policies: Mutex::default(),
            kubernetes_roles: Mutex::default(),
            auth_mounts: Mutex::default(),
        }
    }

    async fn policy(&self, root: &VaultClient, name: &str, text: &str) {
        vaultrs::sys::policy::set(root, name, text)
            .await
            .unwrap_or_else(|e| panic!("write policy {name}: {e}"));
        self.policies.lock().unwrap().push(name.to_owned());
    }
}

impl Drop for VaultCleanup {
    fn drop(&mut self) {
        let (addr, token) = (self.addr.clone(), self.token.clone());
        let policies = std::mem::take(&mut *self.policies.lock().unwrap());
        let roles = std::mem::take(&mut *self.kubernetes_roles.lock().unwrap());
        let mounts = std::mem::take(&mut *self.auth_mounts.lock().unwrap());
        // Its own thread and runtime: Drop runs on the test's (blocked) runtime thread.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let root = vault_at(&addr, &token);
                let work = async {
                    for r in roles {
                        let _ =
                            vaultrs::auth::kubernetes::role::delete(&root, "kubernetes", &r).await;
                    }
                    for m in mounts {
                        let _ = vaultrs::sys::auth::disable(&root, &m).await;
                    }
                    for p in policies {
                        let _ = vaultrs::sys::policy::delete(&root, &p).await;
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(30), work).await;
            })
        })
        .join();
        if done.is_err() {
            eprintln!("e2e cleanup: the vault cleanup thread panicked");
        }
    }
}

/// A private OpenBao dev server, for a test that must seal one or serve TLS. Killed when
/// dropped.
struct PrivateOpenBao {
    child: Option<Child>,
    addr: String,
    unseal_key: String,
    log: PathBuf,
    /// With TLS: the directory of the generated CA, certificate and key, and the CA's PEM.
    tls_dir: Option<PathBuf>,
}

impl PrivateOpenBao {
    /// A plain-HTTP dev server.
    async fn start(bed: &Testbed, name: &str) -> PrivateOpenBao {
        Self::start_with(bed, name, false).await
    }

    /// A dev server on HTTPS, its certificate signed by a CA it generates.
    async fn start_tls(bed: &Testbed, name: &str) -> PrivateOpenBao {
        Self::start_with(bed, name, true).await
    }

    /// The generated CA (PEM) of a TLS server.
    fn ca_pem(&self) -> String {
        let dir = self.tls_dir.as_ref().expect("a TLS server");
        std::fs::read_to_string(dir.join("vault-ca.pem"))
            .unwrap_or_else(|e| panic!("read the dev server's CA in {}: {e}", dir.display()))
    }

    async fn start_with(bed: &Testbed, name: &str, tls: bool) -> PrivateOpenBao {
        let bin = bed.vars.get("KEYHAVEN_OPENBAO_BIN").unwrap_or_else(|| {
            panic!("the bed's env file does not export KEYHAVEN_OPENBAO_BIN: run e2e/testbed down && e2e/testbed up")
        });
        // The server binds port 0: the kernel picks a free port, which is then read back
        // from the process's listening socket (no port chosen here that another process
        // could take before the server binds it). Clustering off: the dev server would
        // otherwise listen on port+1 too, a port nobody reserved.
        let log = std::env::temp_dir().join(format!("keyhaven-e2e-{name}-openbao.log"));
        let out = std::fs::File::create(&log).expect("openbao log file");
        let config = std::env::temp_dir().join(format!("keyhaven-e2e-{name}-openbao.hcl"));
        std::fs::write(&config, "disable_clustering = true\n").expect("openbao config file");
        let tls_dir = tls.then(|| {
            let dir = std::env::temp_dir().join(format!("keyhaven-e2e-{name}-openbao-tls"));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("TLS directory");
            dir
        });
        let mut args = vec![
            "server".to_owned(),
            "-dev".to_owned(),
            "-dev-root-token-id=root".to_owned(),
            "-dev-listen-address=127.0.0.1:0".to_owned(),
            "-dev-no-store-token".to_owned(),
            format!("-config={}", config.display()),
        ];
        if let Some(dir) = &tls_dir {
            args.push("-dev-tls".to_owned());
            args.push(format!("-dev-tls-cert-dir={}", dir.display()));
        }
        let child = Command::new(bin)
            .args(&args)
            .env_remove("BAO_ADDR")
            .env_remove("BAO_TOKEN")
            .env_remove("VAULT_ADDR")
            .env_remove("VAULT_TOKEN")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {bin}: {e}"));
        let mut bao = PrivateOpenBao {
            child: Some(child),
            addr: String::new(),
            unseal_key: String::new(),
            log,
            tls_dir,
        };
        let key = wait_until(Duration::from_secs(30), || async {
            let text = std::fs::read_to_string(&bao.log).ok()?;
            text.lines()
                .find_map(|l| l.trim().strip_prefix("Unseal Key: "))
                .map(|k| k.trim().to_owned())
        })
        .await;
        bao.unseal_key = key.unwrap_or_else(|| {
            panic!(
                "private OpenBao printed no unseal key in 30 s; log {}",
                bao.log.display()
            )
        });
        // Listening by now: the listener is bound before the dev server initialises.
        let pid = bao.child.as_ref().unwrap().id();
        let ports = listening_ports(pid);
        let [port] = ports[..] else {
            panic!(
                "private OpenBao (pid {pid}) listens on {ports:?}, not on one port; log {}",
                bao.log.display()
            )
        };
        let scheme = if tls { "https" } else { "http" };
        bao.addr = format!("{scheme}://127.0.0.1:{port}");
        let root = bao.root();
        let up = wait_until(Duration::from_secs(30), || async {
            let h = vaultrs::sys::health(&root).await.ok()?;
            (!h.sealed).then_some(())
        })
        .await;
        assert!(
            up.is_some(),
            "private OpenBao not healthy; log {}",
            bao.log.display()
        );
        bao
    }

    fn root(&self) -> VaultClient {
        keyhaven::install_crypto_provider();
        let mut settings = VaultClientSettingsBuilder::default();
        settings.address(&self.addr).token("root");
        if let Some(dir) = &self.tls_dir {
            settings.ca_certs(vec![dir.join("vault-ca.pem").display().to_string()]);
        }
        VaultClient::new(settings.build().expect("vault client settings")).expect("vault client")
    }
}

/// The TCP ports the process `pid` listens on (IPv4): its sockets' inodes, looked up in
/// /proc/net/tcp.
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let mut ports: Vec<u16> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            let listening = f.get(3) == Some(&"0A");
            let ours = f.get(9).is_some_and(|i| inodes.iter().any(|o| o == i));
            let (_, port) = f.get(1)?.split_once(':')?;
            (listening && ours).then(|| u16::from_str_radix(port, 16).ok())?
        })
        .collect();
    ports.sort();
    ports.dedup();
    ports
}

impl Drop for PrivateOpenBao {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = &self.tls_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn token_auth_kv_v2_versions_follow_the_source() {
    let bed = Testbed::load();
    let fx = Fixture::new("vault-v2").await;
    let root = bed.vault_root();
    let audit = AuditLog::of(&bed);
    let cleanup = VaultCleanup::new(&bed);
    let prefix = format!("{}/e2e", fx.ns);
    let policy = format!("e2e-{}", fx.ns);
    cleanup
        .policy(&root, &policy, &kv_policy("secret", true, &prefix))
        .await;
    let token = limited_token(&root, &policy, &fx.ns).await;

    // The token Secret in the operator's namespace: tokenSecretRef's default namespace.
    let op_ns = fx.namespace("op").await;
    assert_eq!(op_ns, fx.op.namespace);
    fx.secret(&op_ns, "vault-token", &[("token", &token)]).await;
    let vault = fx
        .store(
            "vault",
            vault_provider(
                &bed.vault_addr,
                "secret",
                "v2",
                json!({"tokenSecretRef": {"name": "vault-token", "key": "token"}}),
            ),
        )
        .await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let mirror_ns = fx.store_namespace("mirror").await;
    let mirror = fx
        .store("mirror", json!({"kubernetes": {"namespace": mirror_ns}}))
        .await;
    let profile = fx.profile("p", &vault, &[&internal, &mirror]).await;

    let path = format!("{prefix}/app/db");
    let (user, pass1, pass2) = (
        "app-user",
        "first-Pa55word-e2e-vault-v2",
        "second-Pa55word-e2e-vault-v2",
    );
    let seeded = kv2::set(
        &root,
        "secret",
        &path,
        &json!({"username": user, "password": pass1}),
    )
    .await
    .unwrap();
    assert_eq!(seeded.version, 1);

    let st = wait_store(
        &fx,
        &vault,
        "Active",
        Duration::from_secs(60),
        true,
        phase_is(StorePhase::Active),
    )
    .await;
    assert_eq!(st.type_.as_deref(), Some("vault"));
    // The bed's OpenBao is plaintext http:// (insecureHTTP): the store says so.
    let insecure = store_condition(&st, "Insecure").expect("an Insecure condition");
    assert_eq!(
        (insecure.status.as_str(), insecure.reason.as_str()),
        ("True", "PlaintextHTTP"),
        "{insecure:?}"
    );
    assert!(insecure.message.contains(&bed.vault_addr), "{insecure:?}");

    let adopt_mark = audit.mark();
    fx.managed_secret(
        "db",
        json!({"profile": profile, "type": "key-value", "path": path,
        "content": {"fromStore": {}}, "refreshInterval": "2s"}),
    )
    .await;
    let ms = fx.wait_synced("db", 1).await;
    let status = ms.status.clone().unwrap();
    assert_eq!(versions(&ms), vec![1]);
    // Adopting the value costs three OpenBao requests: the value and the bookkeeping read
    // (at once), the bookkeeping written; the value is never written back.
    let adopt: Vec<String> = audit
        .since(adopt_mark)
        .into_iter()
        .filter(|e| is_request(e) && metadata(e, "e2e") == Some(fx.ns.as_str()))
        .filter(|e| e["request"]["operation"] != "list")
        .map(|e| {
            let operation = e["request"]["operation"].as_str().unwrap_or_default();
            format!("{operation} {}", request_path(&e))
        })
        .filter(|r| r.contains(&path) || r.contains("keyhaven/objects/"))
        .collect();
    let first_write = adopt
        .iter()
        .position(|r| r.starts_with("update") || r.starts_with("create"))
        .unwrap_or_else(|| panic!("no bookkeeping write: {adopt:#?}"));
    // Sorted: the two reads go out at once.
    let mut until_recorded = adopt[..=first_write].to_vec();
    until_recorded.sort();
    let book = until_recorded
        .iter()
        .find(|r| r.contains("keyhaven/objects/"))
        .map(|r| r.rsplit_once(' ').unwrap().1.to_owned())
        .unwrap_or_default();
    let mut expected = vec![
        format!("create {book}"),
        format!("read secret/data/{path}"),
        format!("read {book}"),
    ];
    expected.sort();
    assert_eq!(
        until_recorded, expected,
        "OpenBao requests to adopt a value"
    );
    assert_eq!(status.versions[0].store, vault);
    assert_eq!(
        status.versions[0].store_version,
        Some(1),
        "keyhaven version 1 is KV v2 version 1 (the value seeded by hand, adopted as is)"
    );
    assert_eq!(status.targets.len(), 3, "{:?}", status.targets);
    assert!(
        status
            .targets
            .iter()
            .all(|t| t.state == "Synced" && t.version == Some(1)),
        "{:?}",
        status.targets
    );
    let native = fx.secret_data(&fx.ns, "db").await.expect("native Secret");
    assert_eq!(native.get("username").map(String::as_str), Some(user));
    assert_eq!(native.get("password").map(String::as_str), Some(pass1));
    // Reading the value and recording keyhaven's stamp did not add a KV version.
    let meta = kv2::read_metadata(&root, "secret", &path).await.unwrap();
    assert_eq!(meta.current_version, 1, "the source value was rewritten");
    // keyhaven's bookkeeping lives beside, under keyhaven/objects/ of the same mount.
    let objects = kv2::list(&root, "secret", "keyhaven/objects").await;
    assert!(
        objects.as_ref().is_ok_and(|o| !o.is_empty()),
        "no bookkeeping object under secret/keyhaven/objects/: {objects:?}"
    );

    // Both sync targets hold version 1.
    let internal_backend = fx.internal_store(&internal).await;
    let mirror_backend = KubernetesStore::new(&mirror, fx.client.clone(), &mirror_ns);
    let v1 = internal_backend.read(&path, None).await.unwrap().unwrap();
    assert_eq!(v1.stamp.as_ref().map(|s| s.version), Some(1));
    assert_eq!(v1.data.get("password"), Some(pass1.as_bytes()));
    assert_eq!(mirror_backend.list_versions(&path).await.unwrap(), vec![1]);

    // A new KV v2 version written by hand becomes keyhaven version 2 everywhere.
    let updated = kv2::set(
        &root,
        "secret",
        &path,
        &json!({"username": user, "password": pass2}),
    )
    .await
    .unwrap();
    assert_eq!(updated.version, 2);
    let ms = fx.wait_synced("db", 2).await;
    assert_eq!(versions(&ms), vec![1, 2]);
    assert_eq!(store_versions(&ms), vec![Some(1), Some(2)]);
    let status = ms.status.clone().unwrap();
    assert_ne!(
        status.versions[0].fingerprint,
        status.versions[1].fingerprint
    );
    assert!(
        status
            .targets
            .iter()
            .all(|t| t.state == "Synced" && t.version == Some(2)),
        "{:?}",
        status.targets
    );
    assert_eq!(
        fx.secret_data(&fx.ns, "db").await.unwrap()["password"],
        pass2
    );
    assert_eq!(
        internal_backend.list_versions(&path).await.unwrap(),
        vec![1, 2]
    );
    assert_eq!(
        mirror_backend.list_versions(&path).await.unwrap(),
        vec![1, 2]
    );
    assert_eq!(
        internal_backend
            .read(&path, None)
            .await
            .unwrap()
            .unwrap()
            .data
            .get("password"),
        Some(pass2.as_bytes())
    );
    let current: BTreeMap<String, String> = kv2::read(&root, "secret", &path).await.unwrap();
    assert_eq!(
        current,
        BTreeMap::from([
            ("password".to_owned(), pass2.to_owned()),
            ("username".to_owned(), user.to_owned())
        ])
    );

    // No change, no write: several refreshes read the source and write nothing to OpenBao.
    let mark = audit.mark();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let entries: Vec<Value> = audit
        .since(mark)
        .into_iter()
        .filter(|e| is_request(e) && metadata(e, "e2e") == Some(fx.ns.as_str()))
        .collect();
    let reads = entries
        .iter()
        .filter(|e| request_path(e).starts_with("secret/") && !is_write(e))
        .count();
    let writes: Vec<String> = entries
        .iter()
        .filter(|e| request_path(e).starts_with("secret/") && is_write(e))
        .map(|e| format!("{} {}", e["request"]["operation"], request_path(e)))
        .collect();
    assert!(
        reads >= 2,
        "the store was not re-read during 8 s of refreshes every 2 s ({reads} reads)"
    );
    assert!(
        writes.is_empty(),
        "unchanged refreshes wrote to OpenBao: {writes:#?}"
    );
    assert_eq!(
        kv2::read_metadata(&root, "secret", &path)
            .await
            .unwrap()
            .current_version,
        2
    );
    assert_eq!(versions(&fx.wait_synced("db", 2).await), vec![1, 2]);

    // The store reports what it holds.
    let st = wait_store(
        &fx,
        &vault,
        "Active and counting",
        Duration::from_secs(60),
        true,
        |s| s.phase == Some(StorePhase::Active) && s.secrets.is_some_and(|n| n >= 1),
    )
    .await;
    assert!(st.message.is_some());

    fx.assert_values_never_leaked(&[pass1, pass2, &token]).await;
    assert_statuses_clean(&fx, &[pass1, pass2, &token]).await;
}

#[tokio::test]
async fn kubernetes_auth_logs_in_once_across_many_reconciles() {
    let bed = Testbed::load();
    let fx = Fixture::new("vault-k8s").await;
    let root = bed.vault_root();
    let audit = AuditLog::of(&bed);
    let start = audit.mark();
    let cleanup = VaultCleanup::new(&bed);
    let prefix = format!("{}/e2e", fx.ns);
    let policy = format!("e2e-{}", fx.ns);
    cleanup
        .policy(&root, &policy, &kv_policy("secret", true, &prefix))
        .await;

    // The operator's ServiceAccount (`keyhaven` in its namespace), and a role bound to it.
    let op_ns = fx.namespace("op").await;
    let sas: Api<ServiceAccount> = fx.ns_api(&op_ns);
    for sa in ["keyhaven", "intruder"] {
        sas.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": sa}})).unwrap(),
        )
        .await
        .unwrap();
    }
    let role = fx.ns.clone();
    vaultrs::auth::kubernetes::role::create(
        &root,
        "kubernetes",
        &role,
        Some(
            CreateKubernetesRoleRequest::builder()
                .bound_service_account_names(vec!["keyhaven".to_owned()])
                .bound_service_account_namespaces(vec![op_ns.clone()])
                // keyhaven asks for tokens of audience `vault` when `audiences` is unset.
                .audience("vault")
                .token_policies(vec![policy.clone()])
                .token_ttl("1h"),
        ),
    )
    .await
    .unwrap();
    cleanup.kubernetes_roles.lock().unwrap().push(role.clone());

    let vault = fx
        .store(
            "vault",
            vault_provider(
                &bed.vault_addr,
                "secret",
                "v2",
                json!({"kubernetes": {"role": role}}),
            ),
        )
        .await;
    let profile = fx.profile("p", &vault, &[]).await;
    const N: usize = 24;
    for i in 0..N {
        kv2::set(
            &root,
            "secret",
            &format!("{prefix}/s-{i}"),
            &json!({"value": format!("value-{i}-e2e-vault-k8s")}),
        )
        .await
        .unwrap();
    }
    for i in 0..N {
        fx.managed_secret(
            &format!("s-{i}"),
            json!({"profile": profile, "type": "generic", "path": format!("{prefix}/s-{i}"),
            "content": {"fromStore": {}}, "refreshInterval": "1s"}),
        )
        .await;
    }
    for i in 0..N {
        let ms = fx.wait_synced(&format!("s-{i}"), 1).await;
        assert_eq!(store_versions(&ms), vec![Some(1)], "s-{i}");
        assert_eq!(
            fx.secret_data(&fx.ns, &format!("s-{i}")).await.unwrap()["value"],
            format!("value-{i}-e2e-vault-k8s")
        );
    }
    wait_store(
        &fx,
        &vault,
        "Active",
        Duration::from_secs(60),
        true,
        phase_is(StorePhase::Active),
    )
    .await;

    // Many reconciles later, still one login.
    let window = audit.mark();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let identity_requests = audit
        .since(window)
        .into_iter()
        .filter(|e| {
            is_request(e)
                && metadata(e, "service_account_namespace") == Some(op_ns.as_str())
                && request_path(e).starts_with("secret/")
        })
        .count();
    assert!(
        identity_requests >= 100,
        "expected ≥100 KV requests from {N} ManagedSecrets refreshed every second for 20 s, saw {identity_requests}"
    );
    let entries = audit.since(start);
    let count = logins(&entries, "kubernetes", "service_account_namespace", &op_ns);
    assert_eq!(
        count,
        1,
        "logins to auth/kubernetes as {op_ns}/keyhaven (audit log {})",
        audit.path.display()
    );
    for i in 0..N {
        assert_eq!(
            versions(&fx.wait_synced(&format!("s-{i}"), 1).await),
            vec![1]
        );
    }

    // OpenBao checks the presented tokens for real (TokenReview on the bed's apiserver).
    let token_for = |sa: &'static str, ns: String, audiences: Vec<String>| {
        let client = fx.client.clone();
        async move {
            let req = TokenRequest {
                spec: TokenRequestSpec {
                    audiences,
                    expiration_seconds: Some(600),
                    ..Default::default()
                },
                ..Default::default()
            };
            Api::<ServiceAccount>::namespaced(client, &ns)
                .create_token_request(sa, &PostParams::default(), &req)
                .await
                .unwrap_or_else(|e| panic!("TokenRequest {ns}/{sa}: {e}"))
                .status
                .expect("TokenRequest status")
                .token
        }
    };
    let token_of = |sa: &'static str, ns: String| token_for(sa, ns, vec!["vault".into()]);
    // The bound ServiceAccount's token for the API server's own audience: refused.
    let apiserver_audience = token_for("keyhaven", op_ns.clone(), vec![]).await;
    assert!(
        vaultrs::auth::kubernetes::login(&root, "kubernetes", &role, &apiserver_audience)
            .await
            .is_err(),
        "a token not meant for Vault logged in to a role wanting audience vault"
    );
    let intruder = token_of("intruder", op_ns.clone()).await;
    let refused = vaultrs::auth::kubernetes::login(&root, "kubernetes", &role, &intruder).await;
    assert!(
        refused.is_err(),
        "a token of another ServiceAccount logged in"
    );
    // Same name in another namespace.
    Api::<ServiceAccount>::namespaced(fx.client.clone(), &fx.ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "keyhaven"}})).unwrap(),
        )
        .await
        .unwrap();
    let elsewhere = token_of("keyhaven", fx.ns.clone()).await;
    assert!(
        vaultrs::auth::kubernetes::login(&root, "kubernetes", &role, &elsewhere)
            .await
            .is_err(),
        "a token of keyhaven in another namespace logged in"
    );
    // The bound ServiceAccount's claims under another token's signature: only the
    // apiserver's TokenReview can tell, and it says no.
    let genuine = token_of("keyhaven", op_ns.clone()).await;
    let (claims, _) = genuine.rsplit_once('.').unwrap();
    let (_, other_signature) = intruder.rsplit_once('.').unwrap();
    let forged = format!("{claims}.{other_signature}");
    assert!(
        vaultrs::auth::kubernetes::login(&root, "kubernetes", &role, &forged)
            .await
            .is_err(),
        "a forged token of the bound ServiceAccount logged in: no TokenReview?"
    );
    // The genuine token logs in: the refusals above were about the tokens.
    vaultrs::auth::kubernetes::login(&root, "kubernetes", &role, &genuine)
        .await
        .expect("the bound ServiceAccount's genuine token logs in");

    let values: Vec<String> = (0..N).map(|i| format!("value-{i}-e2e-vault-k8s")).collect();
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    fx.assert_values_never_leaked(&values).await;
}

/// Renewal keeps the one login alive; tokenRotate logs in afresh on its schedule only.
#[tokio::test]
async fn kubernetes_auth_token_is_renewed_and_rotated_on_schedule() {
    let bed = Testbed::load();
    let fx = Fixture::new("vault-renew").await;
    let root = bed.vault_root();
    let audit = AuditLog::of(&bed);
    let start = audit.mark();
    let cleanup = VaultCleanup::new(&bed);
    let prefix = format!("{}/e2e", fx.ns);
    let policy = format!("e2e-{}", fx.ns);
    cleanup
        .policy(&root, &policy, &kv_policy("secret", true, &prefix))
        .await;
    let op_ns = fx.namespace("op").await;
    fx.ns_api::<ServiceAccount>(&op_ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "keyhaven"}})).unwrap(),
        )
        .await
        .unwrap();
    // `renew`: tokens live 10 s and must be renewed (up to 1h); `rotate`: 1h tokens, but
    // the store logs in afresh every 5 s.
    let renew_role = format!("{}-renew", fx.ns);
    let rotate_role = format!("{}-rotate", fx.ns);
    for (role, ttl) in [(&renew_role, "10s"), (&rotate_role, "1h")] {
        vaultrs::auth::kubernetes::role::create(
            &root,
            "kubernetes",
            role,
            Some(
                CreateKubernetesRoleRequest::builder()
                    .bound_service_account_names(vec!["keyhaven".to_owned()])
                    .bound_service_account_namespaces(vec![op_ns.clone()])
                    .token_policies(vec![policy.clone()])
                    .token_ttl(ttl)
                    .token_max_ttl("1h"),
            ),
        )
        .await
        .unwrap();
        cleanup.kubernetes_roles.lock().unwrap().push(role.clone());
    }
    let renew_store = fx
        .store(
            "renew",
            vault_provider(
                &bed.vault_addr,
                "secret",
                "v2",
                json!({"kubernetes": {"role": renew_role}}),
            ),
        )
        .await;
    let mut rotate_provider = vault_provider(
        &bed.vault_addr,
        "secret",
        "v2",
        json!({"kubernetes": {"role": rotate_role}}),
    );
    rotate_provider["vault"]["tokenRotate"] = json!("5s");
    let rotate_store = fx.store("rotate", rotate_provider).await;
    let began = Instant::now();
    for (store, name) in [(&renew_store, "renew"), (&rotate_store, "rotate")] {
        let profile = fx.profile(name, store, &[]).await;
        for i in 0..3 {
            let path = format!("{prefix}/{name}-{i}");
            kv2::set(
                &root,
                "secret",
                &path,
                &json!({"value": format!("{name}-{i}-e2e-vault-renew")}),
            )
            .await
            .unwrap();
            fx.managed_secret(
                &format!("{name}-{i}"),
                json!({"profile": profile, "type": "generic", "path": path,
                "content": {"fromStore": {}}, "refreshInterval": "1s"}),
            )
            .await;
        }
    }
    for name in ["renew", "rotate"] {
        for i in 0..3 {
            fx.wait_synced(&format!("{name}-{i}"), 1).await;
        }
    }
    // Past three lifetimes of a `renew` token.
    tokio::time::sleep(Duration::from_secs(35)).await;
    let elapsed = began.elapsed().as_secs() as usize;
    let entries = audit.since(start);
    let renew_logins = logins(&entries, "kubernetes", "role", &renew_role);
    assert_eq!(
        renew_logins, 1,
        "a renewable token was replaced instead of renewed"
    );
    let renewals = entries
        .iter()
        .filter(|e| {
            is_response(e)
                && metadata(e, "role") == Some(renew_role.as_str())
                && request_path(e).starts_with("auth/token/renew")
                && e.get("error").is_none()
        })
        .count();
    assert!(
        renewals >= 1,
        "a 10 s token was used for {elapsed} s without a renewal"
    );
    // The renewed token was used: KV requests with it after the first renewal.
    let first_renewal = entries
        .iter()
        .position(|e| {
            is_response(e)
                && metadata(e, "role") == Some(renew_role.as_str())
                && request_path(e).starts_with("auth/token/renew")
                && e.get("error").is_none()
        })
        .unwrap_or(entries.len());
    let used_after = entries[first_renewal..]
        .iter()
        .filter(|e| {
            is_request(e)
                && metadata(e, "role") == Some(renew_role.as_str())
                && request_path(e).starts_with("secret/")
        })
        .count();
    assert!(
        used_after >= 10,
        "3 ManagedSecrets refreshed every second made {used_after} KV requests after the first renewal"
    );
    let denied: Vec<String> = entries
        .iter()
        .filter(|e| {
            is_response(e)
                && metadata(e, "role") == Some(renew_role.as_str())
                && e.get("error").is_some()
        })
        .map(|e| format!("{}: {}", request_path(e), e["error"]))
        .collect();
    assert!(
        denied.is_empty(),
        "requests failed with the renewed token: {denied:#?}"
    );
    let rotations = logins(&entries, "kubernetes", "role", &rotate_role);
    assert!(
        rotations >= 3 && rotations <= elapsed / 5 + 2,
        "tokenRotate 5s over {elapsed} s: {rotations} logins"
    );
    for name in ["renew", "rotate"] {
        for i in 0..3 {
            assert_eq!(
                versions(&wait_synced_ready(&fx, &format!("{name}-{i}"), 1).await),
                vec![1]
            );
        }
    }
}

#[tokio::test]
async fn approle_auth_and_kv_v1() {
    let bed = Testbed::load();
    let fx = Fixture::new("vault-approle").await;
    let root = bed.vault_root();
    let audit = AuditLog::of(&bed);
    let start = audit.mark();
    let cleanup = VaultCleanup::new(&bed);
    let prefix = format!("{}/e2e", fx.ns);
    let policy = format!("e2e-{}", fx.ns);
    cleanup
        .policy(&root, &policy, &kv_policy("kv", false, &prefix))
        .await;
    let mount = format!("approle-{}", fx.ns);
    vaultrs::sys::auth::enable(&root, &mount, "approle", None)
        .await
        .unwrap_or_else(|e| panic!("enable approle at {mount}: {e}"));
    cleanup.auth_mounts.lock().unwrap().push(mount.clone());
    vaultrs::auth::approle::role::set(
        &root,
        &mount,
        "keyhaven",
        Some(
            SetAppRoleRequest::builder()
                .token_policies(vec![policy.clone()])
                .token_ttl("1h"),
        ),
    )
    .await
    .unwrap();
    let role_id = vaultrs::auth::approle::role::read_id(&root, &mount, "keyhaven")
        .await
        .unwrap()
        .role_id;
    let secret_id = vaultrs::auth::approle::role::secret::generate(&root, &mount, "keyhaven", None)
        .await
        .unwrap()
        .secret_id;
    fx.secret(&fx.ns, "approle", &[("secret-id", &secret_id)])
        .await;
    let vault = fx
        .store(
            "vault",
            vault_provider(
                &bed.vault_addr,
                "kv",
                "v1",
                json!({"appRole": {"path": mount, "roleId": role_id,
                    "secretRef": {"name": "approle", "namespace": fx.ns, "key": "secret-id"}}}),
            ),
        )
        .await;
    let profile = fx.profile("p", &vault, &[]).await;
    let (v1, v2) = ("ak_first_e2e_vault_approle", "ak_second_e2e_vault_approle");
    fx.secret(&fx.ns, "src", &[("api-key", v1)]).await;
    let path = format!("{prefix}/api");
    fx.managed_secret(
        "api",
        json!({"profile": profile, "type": "api-key", "path": path,
        "content": {"fromSecret": {"name": "src"}}, "refreshInterval": "1s"}),
    )
    .await;
    let ms = fx.wait_synced("api", 1).await;
    assert_eq!(versions(&ms), vec![1]);
    assert_eq!(
        store_versions(&ms),
        vec![None],
        "KV v1 has no version numbers of its own"
    );
    let held: BTreeMap<String, String> = kv1::get(&root, "kv", &path).await.unwrap();
    assert_eq!(
        held,
        BTreeMap::from([("api-key".to_owned(), v1.to_owned())]),
        "kv/{path} holds exactly the pushed key/values, as JSON strings"
    );
    assert_eq!(fx.secret_data(&fx.ns, "api").await.unwrap()["api-key"], v1);

    // A second change is version 2; KV v1 holds the newest, keyhaven the history beside it.
    fx.secret(&fx.ns, "src", &[("api-key", v2)]).await;
    let ms = fx.wait_synced("api", 2).await;
    assert_eq!(versions(&ms), vec![1, 2]);
    assert_eq!(store_versions(&ms), vec![None, None]);
    let held: BTreeMap<String, String> = kv1::get(&root, "kv", &path).await.unwrap();
    assert_eq!(
        held,
        BTreeMap::from([("api-key".to_owned(), v2.to_owned())])
    );
    assert_eq!(fx.secret_data(&fx.ns, "api").await.unwrap()["api-key"], v2);
    let history = kv1::list(&root, "kv", "keyhaven/history").await;
    assert!(
        history.as_ref().is_ok_and(|h| !h.data.keys.is_empty()),
        "no history under kv/keyhaven/history/: {history:?}"
    );
    wait_store(
        &fx,
        &vault,
        "Active",
        Duration::from_secs(60),
        true,
        phase_is(StorePhase::Active),
    )
    .await;

    // One AppRole login served the store's health checks and every reconcile.
    let login = format!("auth/{mount}/login");
    let count = audit
        .since(start)
        .iter()
        .filter(|e| is_response(e) && request_path(e) == login && e.get("error").is_none())
        .count();
    assert_eq!(count, 1, "logins at {login}");

    fx.assert_values_never_leaked(&[v1, v2, &secret_id]).await;
    assert_statuses_clean(&fx, &[v1, v2, &secret_id]).await;
}

#[tokio::test]
async fn sealing_openbao_turns_the_store_sealed_and_keeps_native_secrets() {
    let bed = Testbed::load();
    let fx = Fixture::new("vault-seal").await;
    let (api_path, db_path) = (format!("{}/app/api", fx.ns), format!("{}/app/db", fx.ns));
    let bao = PrivateOpenBao::start(&bed, &fx.ns).await;
    let root = bao.root();
    fx.secret(&fx.ns, "bao-token", &[("token", "root")]).await;
    let vault = fx
        .store(
            "vault",
            vault_provider(
                &bao.addr,
                "secret",
                "v2",
                json!({"tokenSecretRef": {"name": "bao-token", "namespace": fx.ns, "key": "token"}}),
            ),
        )
        .await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    // `api`: the private OpenBao is its source; `mirrored`: it is a sync target.
    let source_profile = fx.profile("src", &vault, &[]).await;
    let target_profile = fx.profile("tgt", &internal, &[&vault]).await;
    let (api_key, db_pass) = ("ak_precious_e2e_vault_seal", "precious-Pa55-e2e-vault-seal");
    fx.secret(&fx.ns, "api-src", &[("api-key", api_key)]).await;
    fx.secret(&fx.ns, "db-src", &[("password", db_pass)]).await;
    fx.managed_secret(
        "api",
        json!({"profile": source_profile, "type": "api-key", "path": api_path,
        "content": {"fromSecret": {"name": "api-src"}}, "refreshInterval": "1s"}),
    )
    .await;
    fx.managed_secret(
        "mirrored",
        json!({"profile": target_profile, "type": "password", "path": db_path,
        "content": {"fromSecret": {"name": "db-src"}}, "refreshInterval": "1s"}),
    )
    .await;
    let ms = fx.wait_synced("api", 1).await;
    assert_eq!(store_versions(&ms), vec![Some(1)]);
    fx.wait_synced("mirrored", 1).await;
    let held: BTreeMap<String, String> = kv2::read(&root, "secret", &api_path).await.unwrap();
    assert_eq!(
        held,
        BTreeMap::from([("api-key".to_owned(), api_key.to_owned())])
    );
    let held: BTreeMap<String, String> = kv2::read(&root, "secret", &db_path).await.unwrap();
    assert_eq!(
        held,
        BTreeMap::from([("password".to_owned(), db_pass.to_owned())])
    );
    // This OpenBao is the test's alone: the store holds exactly its two objects.
    wait_store(
        &fx,
        &vault,
        "Active holding 2 secrets",
        Duration::from_secs(60),
        true,
        |s| s.phase == Some(StorePhase::Active) && s.secrets == Some(2),
    )
    .await;
    let native = |name: &'static str| {
        let fx = &fx;
        async move { fx.secret_data(&fx.ns, name).await }
    };
    let api_before = native("api").await.expect("native Secret api");
    let db_before = native("mirrored").await.expect("native Secret mirrored");
    assert_eq!(api_before["api-key"], api_key);
    assert_eq!(db_before["password"], db_pass);

    // Seal it.
    vaultrs::sys::seal(&root)
        .await
        .expect("seal the private OpenBao");
    let sealed = wait_store(
        &fx,
        &vault,
        "Sealed",
        Duration::from_secs(90),
        true,
        phase_is(StorePhase::Sealed),
    )
    .await;
    let message = sealed.message.unwrap_or_default();
    assert!(
        message.to_lowercase().contains("seal"),
        "status.message does not say it is sealed: {message:?}"
    );
    fx.wait_not_ready("api", "StoreSealed").await;
    fx.wait_event("StoreSealed", "").await;
    fx.wait_managed("mirrored", "Degraded: its sync target is sealed", |ms| {
        ms.status.as_ref().is_some_and(|s| {
            s.phase.is_some_and(|p| p == "Degraded")
                && s.targets
                    .iter()
                    .any(|t| t.store == vault && t.state == "Error")
        })
    })
    .await;
    // Several failing refreshes later, both native Secrets are intact. Made now, each
    // refused by the sealed OpenBao: api backs off 30 s after a failure, mirrored 15 s.
    tokio::time::sleep(Duration::from_secs(5)).await;
    fx.reconcile_managed(
        "api",
        2,
        &[
            Work::failed("ManagedSecret", "StoreSealed"),
            Work::store_reads(&vault).outcome("sealed"),
        ],
    )
    .await;
    fx.reconcile_managed(
        "mirrored",
        2,
        &[
            Work::store_reads(&internal),
            Work::store_reads(&vault).outcome("sealed"),
        ],
    )
    .await;
    assert_eq!(
        native("api").await.as_ref(),
        Some(&api_before),
        "the source is sealed and the native Secret changed"
    );
    assert_eq!(
        native("mirrored").await.as_ref(),
        Some(&db_before),
        "a sync target is sealed and the native Secret changed"
    );
    let ms = fx.ns_api::<ManagedSecret>(&fx.ns).get("api").await.unwrap();
    assert_eq!(
        ms.status.unwrap().current_version,
        Some(1),
        "history kept through the seal"
    );

    // Unseal: the periodic health check (no poke) finds it Active again; both heal.
    let unsealed = vaultrs::sys::unseal(&root, Some(bao.unseal_key.clone()), None, None)
        .await
        .expect("unseal the private OpenBao");
    assert!(!unsealed.sealed);
    wait_store(
        &fx,
        &vault,
        "Active again",
        Duration::from_secs(45),
        false,
        phase_is(StorePhase::Active),
    )
    .await;
    assert_eq!(versions(&wait_synced_ready(&fx, "api", 1).await), vec![1]);
    assert_eq!(
        versions(&wait_synced_ready(&fx, "mirrored", 1).await),
        vec![1]
    );
    assert_eq!(native("api").await.as_ref(), Some(&api_before));
    assert_eq!(native("mirrored").await.as_ref(), Some(&db_before));
    assert_eq!(
        kv2::read_metadata(&root, "secret", &api_path)
            .await
            .unwrap()
            .current_version,
        1,
        "the seal made keyhaven write the value again"
    );

    fx.assert_values_never_leaked(&[api_key, db_pass]).await;
    assert_statuses_clean(&fx, &[api_key, db_pass]).await;
}

#[tokio::test]
async fn unreachable_and_bad_credentials_are_reported() {
    let bed = Testbed::load();
    let fx = Fixture::new("vault-bad").await;
    // A port bound and never listened on: connections to it are refused, and no other
    // process can take it while the test holds it (a port merely found free could be).
    let closed_socket = tokio::net::TcpSocket::new_v4().unwrap();
    closed_socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed_port = closed_socket.local_addr().unwrap().port();
    let wrong_token = "hvs.wrong-token-e2e-vault-bad-0123456789";
    fx.secret(&fx.ns, "tokens", &[("token", wrong_token)]).await;
    let token_auth =
        json!({"tokenSecretRef": {"name": "tokens", "namespace": fx.ns, "key": "token"}});
    let closed = fx
        .store(
            "closed",
            vault_provider(
                &format!("http://127.0.0.1:{closed_port}"),
                "secret",
                "v2",
                token_auth.clone(),
            ),
        )
        .await;
    // Refused before anything is read or sent: a plaintext server without insecureHTTP;
    // a token Secret in a namespace not on the operator's --credential-namespaces.
    let mut plaintext = vault_provider(&bed.vault_addr, "secret", "v2", token_auth.clone());
    plaintext["vault"]
        .as_object_mut()
        .unwrap()
        .remove("insecureHTTP");
    let plaintext = fx.store("plaintext", plaintext).await;
    let elsewhere = fx
        .store(
            "elsewhere",
            vault_provider(
                &bed.vault_addr,
                "secret",
                "v2",
                json!({"tokenSecretRef": {"name": "tokens", "namespace": "kube-system", "key": "token"}}),
            ),
        )
        .await;
    let bad_token = fx
        .store(
            "badtoken",
            vault_provider(&bed.vault_addr, "secret", "v2", token_auth),
        )
        .await;
    // The kubernetes method with a role OpenBao does not have (the ServiceAccount exists).
    let op_ns = fx.namespace("op").await;
    fx.ns_api::<ServiceAccount>(&op_ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "keyhaven"}})).unwrap(),
        )
        .await
        .unwrap();
    let no_role = fx
        .store(
            "norole",
            vault_provider(
                &bed.vault_addr,
                "secret",
                "v2",
                json!({"kubernetes": {"role": format!("{}-no-such-role", fx.ns)}}),
            ),
        )
        .await;

    // A server that accepts connections and never answers: requestTimeout bounds each call.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut hung_provider = vault_provider(
        &format!("http://127.0.0.1:{}", hung.local_addr().unwrap().port()),
        "secret",
        "v2",
        json!({"tokenSecretRef": {"name": "tokens", "namespace": fx.ns, "key": "token"}}),
    );
    hung_provider["vault"]["requestTimeout"] = json!("2s");
    let hung_store = fx.store("hung", hung_provider).await;

    let unreachable = wait_store(
        &fx,
        &closed,
        "Unreachable",
        Duration::from_secs(60),
        true,
        phase_is(StorePhase::Unreachable),
    )
    .await;
    assert!(
        unreachable.message.as_ref().is_some_and(|m| !m.is_empty()),
        "{unreachable:?}"
    );
    let timed_out = wait_store(
        &fx,
        &hung_store,
        "Unreachable (timed out)",
        Duration::from_secs(60),
        true,
        phase_is(StorePhase::Unreachable),
    )
    .await;
    assert!(
        timed_out.message.as_ref().is_some_and(|m| !m.is_empty()),
        "{timed_out:?}"
    );
    for store in [&bad_token, &no_role] {
        let invalid = wait_store(
            &fx,
            store,
            "Invalid",
            Duration::from_secs(60),
            true,
            phase_is(StorePhase::Invalid),
        )
        .await;
        assert!(
            invalid.message.as_ref().is_some_and(|m| !m.is_empty()),
            "{store}: {invalid:?}"
        );
        assert!(
            invalid
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "False"),
            "{store}: {invalid:?}"
        );
    }
    for (store, says) in [
        (
            &plaintext,
            vec![
                format!("server {} is plaintext http://", bed.vault_addr),
                "use https://".to_owned(),
                "provider.vault.insecureHTTP: true".to_owned(),
            ],
        ),
        (
            &elsewhere,
            vec![
                "provider.vault.auth.tokenSecretRef names namespace kube-system".to_owned(),
                format!("operator's namespace {}", fx.op.namespace),
                format!(
                    "--credential-namespaces list (KEYHAVEN_CREDENTIAL_NAMESPACES, chart value credentialNamespaces; now: {})",
                    fx.ns
                ),
            ],
        ),
    ] {
        let refused = wait_store(
            &fx,
            store,
            "Invalid (refused)",
            Duration::from_secs(30),
            true,
            phase_is(StorePhase::Invalid),
        )
        .await;
        let message = refused.message.clone().unwrap_or_default();
        for part in says {
            assert!(
                message.contains(&part),
                "{store}: {part:?} not in {message:?}"
            );
        }
        // Insecure follows the spec: the plaintext store is refused, not marked.
        assert_eq!(
            store_condition(&refused, "Insecure").is_some(),
            store == &elsewhere,
            "{store}: {refused:?}"
        );
    }
    for (store, phase) in [(&closed, "Unreachable"), (&bad_token, "Invalid")] {
        // The note is the health message; the reason is the phase.
        let _ = store;
        fx.wait_event(phase, "").await;
    }

    // ManagedSecrets on them fail clearly and create nothing.
    let value = "never-stored-e2e-vault-bad";
    fx.secret(&fx.ns, "src", &[("password", value)]).await;
    for (name, store, reason) in [
        ("on-closed", &closed, "StoreUnreachable"),
        ("on-badtoken", &bad_token, "StoreInvalid"),
        ("on-norole", &no_role, "StoreInvalid"),
        ("on-hung", &hung_store, "StoreUnreachable"),
    ] {
        let profile = fx.profile(name, store, &[]).await;
        fx.managed_secret(
            name,
            json!({"profile": profile, "type": "password",
            "content": {"fromSecret": {"name": "src"}}, "refreshInterval": "1s"}),
        )
        .await;
        fx.wait_not_ready(name, reason).await;
        assert!(
            fx.secret_data(&fx.ns, name).await.is_none(),
            "{name}: a native Secret was created from a failing store"
        );
        let profile_status = wait_until(Duration::from_secs(30), || async {
            let p = fx
                .cluster_api::<VaultProfile>()
                .get(&profile)
                .await
                .ok()?
                .status?;
            (p.phase.is_some_and(|p| p == "NotReady")).then_some(p)
        })
        .await;
        assert!(profile_status.is_some(), "profile {profile} never NotReady");
    }
    let root = bed.vault_root();
    let leaked = kv2::read::<Value>(&root, "secret", &format!("{}/on-badtoken", fx.ns)).await;
    assert!(
        leaked.is_err(),
        "a value reached OpenBao with a wrong token"
    );

    fx.assert_values_never_leaked(&[value, wrong_token]).await;
    assert_statuses_clean(&fx, &[value, wrong_token]).await;
    drop(hung);
    drop(closed_socket);
}

/// A token revoked in OpenBao while keyhaven holds it: the store turns Invalid, whether or
/// not a ManagedSecret uses it; the native Secret stays; a new token in the Secret heals it.
#[tokio::test]
async fn a_revoked_token_turns_the_store_invalid_and_a_new_one_heals_it() {
    let bed = Testbed::load();
    let fx = Fixture::new("vault-revoked").await;
    let root = bed.vault_root();
    let cleanup = VaultCleanup::new(&bed);
    let prefix = format!("{}/e2e", fx.ns);
    let policy = format!("e2e-{}", fx.ns);
    cleanup
        .policy(&root, &policy, &kv_policy("secret", true, &prefix))
        .await;
    let used_token = limited_token(&root, &policy, &fx.ns).await;
    let idle_token = limited_token(&root, &policy, &fx.ns).await;
    fx.secret(&fx.ns, "used-token", &[("token", &used_token)])
        .await;
    fx.secret(&fx.ns, "idle-token", &[("token", &idle_token)])
        .await;
    let store_on = |secret: &str| {
        vault_provider(
            &bed.vault_addr,
            "secret",
            "v2",
            json!({"tokenSecretRef": {"name": secret, "namespace": fx.ns, "key": "token"}}),
        )
    };
    // `used` is the source of a ManagedSecret; `idle` only has its health checked.
    let used = fx.store("used", store_on("used-token")).await;
    let idle = fx.store("idle", store_on("idle-token")).await;
    let profile = fx.profile("p", &used, &[]).await;
    let value = "revoked-but-kept-e2e-vault-revoked";
    fx.secret(&fx.ns, "src", &[("password", value)]).await;
    let path = format!("{prefix}/db");
    fx.managed_secret(
        "db",
        json!({"profile": profile, "type": "password", "path": path,
        "content": {"fromSecret": {"name": "src"}}, "refreshInterval": "1s"}),
    )
    .await;
    fx.wait_synced("db", 1).await;
    for store in [&used, &idle] {
        wait_store(
            &fx,
            store,
            "Active",
            Duration::from_secs(60),
            true,
            phase_is(StorePhase::Active),
        )
        .await;
    }
    let native_before = fx.secret_data(&fx.ns, "db").await.expect("native Secret");

    for token in [&used_token, &idle_token] {
        vaultrs::token::revoke(&root, token)
            .await
            .expect("revoke a limited token");
    }
    fx.wait_not_ready("db", "StoreInvalid").await;
    let invalid = wait_store(
        &fx,
        &used,
        "Invalid after its token was revoked",
        Duration::from_secs(60),
        true,
        phase_is(StorePhase::Invalid),
    )
    .await;
    assert!(
        invalid.message.as_ref().is_some_and(|m| !m.is_empty()),
        "{invalid:?}"
    );
    // Two reconciles made now (failing, db retries only every 30 s), each refused by
    // OpenBao, then the native Secret is as it was.
    tokio::time::sleep(Duration::from_secs(3)).await;
    fx.reconcile_managed(
        "db",
        2,
        &[
            Work::failed("ManagedSecret", "StoreInvalid"),
            Work::store_reads(&used).outcome("invalid"),
        ],
    )
    .await;
    assert_eq!(
        fx.secret_data(&fx.ns, "db").await.as_ref(),
        Some(&native_before),
        "a store with a revoked token changed the native Secret"
    );

    // A new token in the same Secret: the store logs in with it, nothing is rewritten.
    let new_token = limited_token(&root, &policy, &fx.ns).await;
    fx.secret(&fx.ns, "used-token", &[("token", &new_token)])
        .await;
    wait_store(
        &fx,
        &used,
        "Active with the new token",
        Duration::from_secs(60),
        true,
        phase_is(StorePhase::Active),
    )
    .await;
    assert_eq!(versions(&wait_synced_ready(&fx, "db", 1).await), vec![1]);
    assert_eq!(
        kv2::read_metadata(&root, "secret", &path)
            .await
            .unwrap()
            .current_version,
        1,
        "the value was written again after the new login"
    );
    assert_eq!(
        fx.secret_data(&fx.ns, "db").await.as_ref(),
        Some(&native_before)
    );

    // The idle store's token was revoked as long ago: its health check must say so too.
    let idle_status = wait_store(
        &fx,
        &idle,
        "Invalid after its token was revoked (no ManagedSecret uses it)",
        Duration::from_secs(60),
        true,
        phase_is(StorePhase::Invalid),
    )
    .await;
    assert!(idle_status.message.is_some());

    fx.assert_values_never_leaked(&[value, &used_token, &idle_token, &new_token])
        .await;
    assert_statuses_clean(&fx, &[value, &used_token, &idle_token, &new_token]).await;
}

/// An HTTPS server whose certificate a private CA signs: trusted through caProvider (a
/// ConfigMap or a Secret), refused without it.
#[tokio::test]
async fn tls_server_is_verified_with_the_ca_provider() {
    let bed = Testbed::load();
    let fx = Fixture::new("vault-tls").await;
    let db_path = format!("{}/app/db", fx.ns);
    let bao = PrivateOpenBao::start_tls(&bed, &fx.ns).await;
    let root = bao.root();
    let ca = bao.ca_pem();
    assert!(ca.contains("BEGIN CERTIFICATE"));
    fx.apply::<k8s_openapi::api::core::v1::ConfigMap>(
        fx.ns_api(&fx.ns),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "bao-ca", "namespace": fx.ns}, "data": {"ca.crt": ca}}),
    )
    .await;
    fx.secret(&fx.ns, "bao-ca", &[("ca.crt", &ca)]).await;
    fx.secret(&fx.ns, "bao-token", &[("token", "root")]).await;
    let provider = |ca_provider: Option<Value>| {
        let mut p = vault_provider(
            &bao.addr,
            "secret",
            "v2",
            json!({"tokenSecretRef": {"name": "bao-token", "namespace": fx.ns, "key": "token"}}),
        );
        if let Some(ca) = ca_provider {
            p["vault"]["caProvider"] = ca;
        }
        p
    };
    let via_configmap = fx
        .store(
            "ca-configmap",
            provider(Some(
                json!({"type": "ConfigMap", "name": "bao-ca", "namespace": fx.ns, "key": "ca.crt"}),
            )),
        )
        .await;
    let via_secret = fx
        .store(
            "ca-secret",
            provider(Some(
                json!({"type": "Secret", "name": "bao-ca", "namespace": fx.ns, "key": "ca.crt"}),
            )),
        )
        .await;
    let untrusted = fx.store("no-ca", provider(None)).await;
    for store in [&via_configmap, &via_secret] {
        wait_store(
            &fx,
            store,
            "Active over verified TLS",
            Duration::from_secs(60),
            true,
            phase_is(StorePhase::Active),
        )
        .await;
    }
    // The CA bundle stays in the operator's memory: no file of the temp directory holds it.
    let copies: Vec<PathBuf> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.metadata()
                .is_ok_and(|m| m.is_file() && m.len() == ca.len() as u64)
        })
        .filter(|e| std::fs::read(e.path()).is_ok_and(|b| b == ca.as_bytes()))
        .map(|e| e.path())
        .collect();
    assert!(copies.is_empty(), "the CA bundle was written to {copies:?}");
    let refused = wait_store(
        &fx,
        &untrusted,
        "refused: its certificate is signed by an unknown CA",
        Duration::from_secs(60),
        true,
        |s| matches!(s.phase, Some(StorePhase::Unreachable | StorePhase::Invalid)),
    )
    .await;
    let message = refused.message.unwrap_or_default();
    assert!(
        message.to_lowercase().contains("certificate"),
        "the message does not say the certificate is the problem: {message:?}"
    );

    let profile = fx.profile("p", &via_configmap, &[]).await;
    let value = "over-tls-e2e-vault-tls";
    fx.secret(&fx.ns, "src", &[("password", value)]).await;
    fx.managed_secret(
        "db",
        json!({"profile": profile, "type": "password", "path": db_path,
        "content": {"fromSecret": {"name": "src"}}, "refreshInterval": "1s"}),
    )
    .await;
    let ms = fx.wait_synced("db", 1).await;
    assert_eq!(store_versions(&ms), vec![Some(1)]);
    let held: BTreeMap<String, String> = kv2::read(&root, "secret", &db_path).await.unwrap();
    assert_eq!(
        held,
        BTreeMap::from([("password".to_owned(), value.to_owned())])
    );
    fx.assert_values_never_leaked(&[value]).await;
}

#[tokio::test]
async fn drift_in_a_vault_target_is_repaired() {
    let bed = Testbed::load();
    let fx = Fixture::new("vault-drift").await;
    let root = bed.vault_root();
    let audit = AuditLog::of(&bed);
    let cleanup = VaultCleanup::new(&bed);
    let prefix = format!("{}/e2e", fx.ns);
    let policy = format!("e2e-{}", fx.ns);
    cleanup
        .policy(&root, &policy, &kv_policy("secret", true, &prefix))
        .await;
    let token = limited_token(&root, &policy, &fx.ns).await;
    fx.secret(&fx.ns, "vault-token", &[("token", &token)]).await;
    let vault = fx
        .store(
            "vault",
            vault_provider(
                &bed.vault_addr,
                "secret",
                "v2",
                json!({"tokenSecretRef": {"name": "vault-token", "namespace": fx.ns, "key": "token"}}),
            ),
        )
        .await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let profile = fx.profile("p", &internal, &[&vault]).await;
    let value = "kept-Pa55word-e2e-vault-drift";
    fx.secret(&fx.ns, "src", &[("password", value)]).await;
    let path = format!("{prefix}/db");
    fx.managed_secret(
        "db",
        json!({"profile": profile, "type": "password", "path": path,
        "content": {"fromSecret": {"name": "src"}}, "refreshInterval": "2s"}),
    )
    .await;
    let ms = fx.wait_synced("db", 1).await;
    let status = ms.status.clone().unwrap();
    assert!(
        status
            .targets
            .iter()
            .any(|t| t.store == vault && t.state == "Synced" && t.version == Some(1)),
        "{:?}",
        status.targets
    );
    let expected = BTreeMap::from([("password".to_owned(), value.to_owned())]);
    let held: BTreeMap<String, String> = kv2::read(&root, "secret", &path).await.unwrap();
    assert_eq!(held, expected);
    assert_eq!(
        kv2::read_metadata(&root, "secret", &path)
            .await
            .unwrap()
            .current_version,
        1
    );

    // Someone edits the target by hand.
    let tampered = "tampered-by-hand-e2e-vault-drift";
    let edit = kv2::set(&root, "secret", &path, &json!({"password": tampered}))
        .await
        .unwrap();
    assert_eq!(edit.version, 2);
    let repaired = wait_until(Duration::from_secs(30), || async {
        let held: BTreeMap<String, String> = kv2::read(&root, "secret", &path).await.ok()?;
        (held == expected).then_some(())
    })
    .await;
    assert!(
        repaired.is_some(),
        "the drifted vault target was not repaired"
    );
    fx.wait_event("DriftRepaired", &vault).await;
    let ms = fx.wait_synced("db", 1).await;
    assert_eq!(versions(&ms), vec![1], "a repair makes no new version");
    assert_eq!(
        fx.secret_data(&fx.ns, "db").await.unwrap()["password"],
        value
    );

    // Repaired once: later refreshes leave it alone.
    let after_repair = kv2::read_metadata(&root, "secret", &path)
        .await
        .unwrap()
        .current_version;
    assert_eq!(after_repair, 3, "the repair is one new KV version");
    let mark = audit.mark();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        kv2::read_metadata(&root, "secret", &path)
            .await
            .unwrap()
            .current_version,
        after_repair,
        "the target is rewritten on every refresh"
    );
    let entries: Vec<Value> = audit
        .since(mark)
        .into_iter()
        .filter(|e| {
            is_request(e)
                && metadata(e, "e2e") == Some(fx.ns.as_str())
                && request_path(e).starts_with("secret/")
        })
        .collect();
    let reads = entries
        .iter()
        .filter(|e| !is_write(e) && request_path(e).ends_with(&path))
        .count();
    assert!(
        reads >= 2,
        "the target was not re-read during 6 s of refreshes every 2 s ({reads} reads)"
    );
    let writes = entries.iter().filter(|e| is_write(e)).count();
    assert_eq!(writes, 0, "writes to OpenBao after the repair");

    fx.assert_values_never_leaked(&[value, tampered, &token])
        .await;
    assert_statuses_clean(&fx, &[value, tampered, &token]).await;
}
