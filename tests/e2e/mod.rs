//! Shared harness for the end-to-end tests: they run against the test bed that
//! `e2e/testbed up` starts (etcd, kube-apiserver, kube-controller-manager, OpenBao dev and a
//! SoftHSM2 token, all on loopback) and describes in `e2e/.testbed/env`.
//!
//! Use it from a `tests/e2e_*.rs` file with `mod e2e;`. There is no fallback and no skip:
//! without a bed every e2e test panics and says how to start one.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

pub mod chart;
pub mod faults;
pub mod fixture;
pub mod hsm;
pub mod leaks;
pub mod operator;
pub mod people;
pub mod webhook;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as Pkcs11Error, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};

/// Label on every namespace an e2e test creates, so leftovers of a killed run are easy to
/// find: `kubectl delete ns -l keyhaven.io/e2e=true`.
pub const E2E_LABEL: &str = "keyhaven.io/e2e";

/// The running test bed, as described by its env file.
#[derive(Clone, Debug)]
pub struct Testbed {
    /// The bed's state directory (`e2e/.testbed` unless `KEYHAVEN_TESTBED_DIR` says otherwise).
    pub dir: PathBuf,
    /// Admin kubeconfig (client certificate in `system:masters`).
    pub kubeconfig: PathBuf,
    /// OpenBao's address, e.g. `http://127.0.0.1:PORT`.
    pub vault_addr: String,
    /// OpenBao's root token.
    pub vault_token: String,
    /// The SoftHSM2 configuration naming the bed's token directory.
    pub softhsm2_conf: PathBuf,
    /// The PKCS#11 module (SoftHSM2's shared library).
    pub pkcs11_module: PathBuf,
    /// Label of the bed's token.
    pub pkcs11_token: String,
    /// User PIN of the bed's token.
    pub pkcs11_pin: String,
    /// Every variable the env file exports, unexpanded.
    pub vars: BTreeMap<String, String>,
}

impl Testbed {
    /// The bed's description, read once per test process.
    ///
    /// Panics with "run e2e/testbed up" when the env file is missing. Also exports
    /// `SOFTHSM2_CONF` into this process (see [`Testbed::export_softhsm2_conf`]), so that
    /// every PKCS#11 module this process loads, and every child it spawns, finds the token.
    pub fn load() -> Testbed {
        static BED: OnceLock<Testbed> = OnceLock::new();
        BED.get_or_init(|| {
            let dir = Testbed::state_dir();
            // The demo's operator watches every namespace and store: it would race the
            // scoped operators the tests start.
            if let Ok(pid) = std::fs::read_to_string(dir.join("pids/keyhaven.pid"))
                && Path::new(&format!("/proc/{}", pid.trim())).exists()
            {
                panic!("the demo's operator (pid {}) runs on this test bed: stop it first (kill it, or `e2e/testbed down`)", pid.trim());
            }
            let bed = Testbed::read(&dir);
            bed.export_softhsm2_conf();
            bed
        })
        .clone()
    }

    /// Where `e2e/testbed` keeps its state: `$KEYHAVEN_TESTBED_DIR` (the script honours
    /// it too), else `e2e/.testbed` in this crate.
    pub fn state_dir() -> PathBuf {
        match std::env::var_os("KEYHAVEN_TESTBED_DIR") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/.testbed"),
        }
    }

    /// Parses `<dir>/env`, the file of `export KEY=VALUE` lines that `e2e/testbed up` writes.
    pub fn read(dir: &Path) -> Testbed {
        let file = dir.join("env");
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) => panic!(
                "the e2e test bed is not running ({}: {e}): run `e2e/testbed up` first (or `make test`)",
                file.display()
            ),
        };
        let vars: BTreeMap<String, String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| {
                let (key, value) = l.strip_prefix("export ").unwrap_or(l).split_once('=')?;
                let value = value.trim();
                let value = value
                    .strip_prefix('\'')
                    .and_then(|v| v.strip_suffix('\''))
                    .or_else(|| value.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
                    .unwrap_or(value);
                Some((key.trim().to_owned(), value.to_owned()))
            })
            .collect();
        let get = |key: &str| -> String {
            vars.get(key).cloned().unwrap_or_else(|| {
                panic!(
                    "{} does not export {key}: run e2e/testbed down && e2e/testbed up",
                    file.display()
                )
            })
        };
        Testbed {
            dir: dir.to_owned(),
            kubeconfig: get("KUBECONFIG").into(),
            vault_addr: get("VAULT_ADDR"),
            vault_token: get("VAULT_TOKEN"),
            softhsm2_conf: get("SOFTHSM2_CONF").into(),
            pkcs11_module: get("KEYHAVEN_PKCS11_MODULE").into(),
            pkcs11_token: get("KEYHAVEN_PKCS11_TOKEN"),
            pkcs11_pin: get("KEYHAVEN_PKCS11_PIN"),
            vars,
        }
    }

    /// Sets `SOFTHSM2_CONF` in this process's environment. SoftHSM2 reads no other
    /// setting to find its tokens, and reads it when a module is initialised, so this must
    /// happen before any PKCS#11 module is loaded; [`Testbed::load`] does it first thing.
    pub fn export_softhsm2_conf(&self) {
        if std::env::var_os("SOFTHSM2_CONF").as_deref() == Some(self.softhsm2_conf.as_os_str()) {
            return; // the caller sourced the env file
        }
        // SAFETY: set_var races with C code reading the environment on other threads.
        // This runs once per process (behind the OnceLock in `load`), at the start of the
        // first e2e test, before any test loads a PKCS#11 module or spawns a process; the
        // other test threads are at most starting up and block on the same OnceLock.
        unsafe { std::env::set_var("SOFTHSM2_CONF", &self.softhsm2_conf) };
    }

    /// The rustls provider for every TLS client a test builds (kube, vaultrs).
    fn tls() {
        keyhaven::install_crypto_provider();
    }

    /// A kube configuration for the bed's admin kubeconfig.
    pub async fn kube_config(&self) -> Config {
        Self::tls();
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)
            .unwrap_or_else(|e| panic!("read kubeconfig {}: {e}", self.kubeconfig.display()));
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap_or_else(|e| panic!("kubeconfig {}: {e}", self.kubeconfig.display()))
    }

    /// An admin client for the bed's kube-apiserver. Checks that the apiserver answers, so a
    /// stale env file fails here with a hint instead of later with a connection error.
    pub async fn client(&self) -> Client {
        let config = self.kube_config().await;
        let url = config.cluster_url.clone();
        let client = Client::try_from(config).expect("build kube client");
        if let Err(e) = client.apiserver_version().await {
            panic!("kube-apiserver {url} does not answer ({e}): check e2e/testbed status");
        }
        client
    }

    /// An OpenBao client holding `token` (the root token: [`Testbed::vault_root`]).
    pub fn vault(&self, token: &str) -> VaultClient {
        Self::tls();
        let settings = VaultClientSettingsBuilder::default()
            .address(&self.vault_addr)
            .token(token)
            .build()
            .expect("vault client settings");
        VaultClient::new(settings).expect("build vault client")
    }

    /// An OpenBao client with the root token.
    pub fn vault_root(&self) -> VaultClient {
        self.vault(&self.vault_token)
    }

    /// The PKCS#11 module, initialised, and the slot holding the bed's token.
    ///
    /// One `Pkcs11` per process, shared: a module is initialised once per process
    /// (C_Initialize), and dropping a `Pkcs11` finalises it, which would close every other
    /// test's sessions. The shared one is never dropped.
    pub fn pkcs11(&self) -> (Pkcs11, Slot) {
        static MODULE: OnceLock<Pkcs11> = OnceLock::new();
        let pkcs11 = MODULE
            .get_or_init(|| {
                self.export_softhsm2_conf();
                let pkcs11 = Pkcs11::new(&self.pkcs11_module).unwrap_or_else(|e| {
                    panic!("load PKCS#11 module {}: {e}", self.pkcs11_module.display())
                });
                match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
                    Ok(())
                    | Err(Pkcs11Error::Pkcs11(
                        RvError::CryptokiAlreadyInitialized,
                        Function::Initialize,
                    )) => {}
                    Err(e) => panic!("C_Initialize: {e}"),
                }
                pkcs11
            })
            .clone();
        let slots = pkcs11.get_slots_with_token().expect("C_GetSlotList");
        let slot = slots
            .into_iter()
            .find(|&slot| {
                pkcs11
                    .get_token_info(slot)
                    .is_ok_and(|info| info.label().trim_end() == self.pkcs11_token)
            })
            .unwrap_or_else(|| {
                panic!(
                    "no PKCS#11 token labelled {:?} (SOFTHSM2_CONF={}): run e2e/testbed up",
                    self.pkcs11_token,
                    self.softhsm2_conf.display()
                )
            });
        (pkcs11, slot)
    }

    /// A read-write session on the bed's token, logged in as the user.
    pub fn pkcs11_session(&self) -> Session {
        let (pkcs11, slot) = self.pkcs11();
        let session = pkcs11.open_rw_session(slot).expect("C_OpenSession");
        let pin = AuthPin::new(self.pkcs11_pin.clone().into());
        // Login is per application and token, not per session: a session of a test running
        // in parallel may have logged this process in already.
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(Pkcs11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => session,
            Err(e) => panic!("C_Login on token {:?}: {e}", self.pkcs11_token),
        }
    }

    /// Creates a uniquely named namespace `<prefix>-<suffix>`, labelled
    /// `keyhaven.io/e2e=true`, deleted when the returned guard drops, even if the test
    /// panics.
    pub async fn namespace(&self, prefix: &str) -> TestNamespace {
        TestNamespace::create(self, &self.client().await, prefix).await
    }
}

/// A short suffix for names that must not collide with other tests, in this process or in
/// another test binary running at the same time: 8 hex digits, DNS-label safe.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    // RandomState is seeded randomly per process; the counter separates calls within one.
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let hash = RandomState::new().hash_one((n, std::process::id()));
    format!("{:08x}", hash as u32)
}

/// A namespace owned by one test. Dropping it deletes the namespace.
pub struct TestNamespace {
    pub name: String,
    kubeconfig: PathBuf,
}

impl TestNamespace {
    /// Creates the namespace `<prefix>-<unique suffix>` with `client`.
    pub async fn create(bed: &Testbed, client: &Client, prefix: &str) -> TestNamespace {
        let name = format!("{prefix}-{}", unique_suffix());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {E2E_LABEL: "true"}},
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        TestNamespace {
            name,
            kubeconfig: bed.kubeconfig.clone(),
        }
    }
}

impl std::ops::Deref for TestNamespace {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for TestNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl Drop for TestNamespace {
    /// Requests the deletion (the namespace controller finishes it in the background).
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.name);
        cleanup_blocking(&self.kubeconfig, move |client| async move {
            match Api::<Namespace>::all(client)
                .delete(&name, &DeleteParams::background())
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                Err(e) => Err(format!("delete namespace {name}: {e}")),
            }
        });
    }
}

/// Runs `cleanup` to completion from synchronous code (a `Drop`), with a fresh client for
/// `kubeconfig`, on a thread and runtime of its own; reports an error on stderr, never
/// panics (a panic in a Drop that runs while a failed test unwinds aborts the process).
///
/// Why not the test's client and runtime: Drop cannot await, and runs on the test's
/// runtime thread (`#[tokio::test]` is a current-thread runtime by default), which it
/// blocks. A `kube::Client` is driven by tasks spawned on the runtime that built it (its
/// request buffer, its connections), so a request through the test's client from another
/// thread would wait forever for that blocked runtime: a deadlock.
pub fn cleanup_blocking<F, Fut>(kubeconfig: &Path, cleanup: F)
where
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    if let Err(e) = blocking(kubeconfig, cleanup) {
        eprintln!("e2e cleanup: {e}");
    }
}

/// Runs `work` to completion from synchronous code, like [`cleanup_blocking`] (a fresh
/// client for `kubeconfig`, on a thread and runtime of its own, at most 30 s), and returns
/// what it returned; an error when it failed, timed out or panicked.
pub fn blocking<T, F, Fut>(kubeconfig: &Path, work: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let kubeconfig = kubeconfig.to_owned();
    let outcome = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        rt.block_on(async move {
            Testbed::tls();
            let kc = Kubeconfig::read_from(&kubeconfig).map_err(|e| e.to_string())?;
            let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| e.to_string())?;
            let client = Client::try_from(config).map_err(|e| e.to_string())?;
            // Bounded: a cleanup must not hang the test run if the bed went away.
            tokio::time::timeout(std::time::Duration::from_secs(30), work(client))
                .await
                .map_err(|_| "timed out after 30 s".to_owned())?
        })
    })
    .join();
    match outcome {
        Ok(result) => result,
        Err(_) => Err("the thread panicked".to_owned()),
    }
}

/// Polls `probe` every 250 ms until it returns `Some`, or `timeout` passes (then `None`).
pub async fn eventually<T, F, Fut>(timeout: std::time::Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Runs `kubectl-keyhaven` against the bed; its exit code and stdout.
pub fn plugin(args: &[&str]) -> (i32, String) {
    let bed = Testbed::load();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kubectl-keyhaven"))
        .args(args)
        .env("KUBECONFIG", &bed.kubeconfig)
        .output()
        .expect("run kubectl-keyhaven");
    let stderr = String::from_utf8_lossy(&out.stderr);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &stderr,
    )
}
