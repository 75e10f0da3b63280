//! The limit: a bare kube-rs + vaultrs client that reads the same N values from OpenBao and
//! creates the same N Secrets with the same concurrency (no operator, no CRDs, no
//! bookkeeping), as a child process (`--limit-worker`) so its RSS and CPU are its own.

use crate::args::Args;
use crate::bed::Bed;
use crate::observe::{ProcStats, SecretWatch, proc_stats, verify_by_list};
use crate::run::{Figures, Run};
use crate::setup::{
    RUN_LABEL, WHO_LABEL, concurrently, create_namespaces, delete_namespaces, kv_path, namespace,
    tagged_token,
};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The limit phase: the worker's time to converge, its /proc figures and OpenBao requests.
pub async fn limit(run: &Run) -> anyhow::Result<Figures> {
    let mut f = Figures::default();
    let (id, client, args) = (&run.id, &run.client, &run.args);
    let namespaces = run.namespaces("l");
    create_namespaces(client, &namespaces, id).await?;
    let tag = format!("{id}-limit");
    let token = tagged_token(&run.root, &tag).await?;
    let selector = run.selector("limit");
    let watch = SecretWatch::start(client, &selector).await;
    // The keyhaven run changed every tenth value in OpenBao.
    let updated = if args.no_keyhaven {
        vec![]
    } else {
        run.updated()
    };
    let expected = run.expected_at("l", &updated, 2);
    let mark = run.audit.mark();
    let servers0 = run.bed.servers_cpu();
    let start = Instant::now();
    let child = Command::new(std::env::current_exe()?)
        .args(["--limit-worker", id])
        .args(["--n", &args.n.to_string()])
        .args(["--namespaces", &args.namespaces.to_string()])
        .args(["--concurrency", &args.concurrency.to_string()])
        .env("KUBECONFIG", &run.bed.kubeconfig)
        .env("VAULT_ADDR", &run.bed.vault_addr)
        .env("VAULT_TOKEN", &token)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .stdout(Stdio::piped())
        .spawn()?;
    let timeout = Duration::from_secs(args.timeout);
    let converge = watch
        .wait_all(&expected, start, timeout, "limit converge")
        .await?;
    f.converge = Some(converge);
    f.servers_cpu = run.bed.servers_cpu().since(servers0);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    anyhow::ensure!(out.status.success(), "the limit worker failed");
    verify_by_list(client, &selector, &expected).await?;
    let stats: ProcStats = serde_json::from_slice(&out.stdout)?;
    f.peak_rss_kib = Some(stats.hwm_kib);
    f.steady_rss_kib = None;
    f.converge_cpu = Some(stats.cpu_secs);
    f.total_cpu = Some(stats.cpu_secs);
    f.api_requests_per_secret = Some(1.0);
    f.converge_vault_requests = run.audit.count(mark, &tag).map(|c| c.requests);
    f.logins = Some(0);
    eprintln!(
        "limit: {} Secrets right after {:.2}s",
        args.n,
        converge.as_secs_f64()
    );
    if !args.keep {
        delete_namespaces(client, &namespaces).await;
        let _ = vaultrs::token::revoke(&run.root, &token).await;
    }
    Ok(f)
}

/// The limit's worker: read N values from OpenBao and create N Secrets, `--concurrency` at
/// a time. Prints its own /proc figures as JSON on stdout.
pub async fn limit_worker(args: &Args, run: &str) -> anyhow::Result<()> {
    let bed = Bed::load()?;
    let client = bed.client().await?;
    let vault = bed.vault(&bed.vault_token)?;
    let (client, vault) = (&client, &vault);
    concurrently((0..args.n).collect(), args.concurrency, |i| async move {
        let data: HashMap<String, String> =
            vaultrs::kv2::read(vault, "secret", &kv_path(run, i)).await?;
        let ns = namespace(run, "l", i, args.namespaces);
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": format!("s-{i}"), "namespace": ns,
                "labels": {RUN_LABEL: run, WHO_LABEL: "limit"}},
            "stringData": data,
        }))?;
        Api::<Secret>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &secret)
            .await?;
        Ok(())
    })
    .await?;
    let stats = proc_stats(std::process::id());
    println!("{}", serde_json::to_string(&stats)?);
    Ok(())
}
