//! keyhaven-bench: keyhaven at scale on the test bed, beside "the limit" (a bare kube-rs +
//! vaultrs client doing the same work with the same concurrency, no operator) and External
//! Secrets Operator (ESO).
//!
//! ```sh
//! e2e/testbed up
//! cargo build --release -p keyhaven --bin keyhaven -p keyhaven-bench
//! cargo run --release -p keyhaven-bench -- --n 1000
//! ```
//!
//! For N secrets it seeds N objects in OpenBao KV v2 under a unique prefix, starts a scoped
//! `keyhaven run` (release binary), applies N ManagedSecrets (fromStore) across
//! `--namespaces` namespaces, and times until every native Secret holds the right value
//! (read back through a watch, then checked again with one LIST); changes 10 % of the values
//! in OpenBao and times until they are all materialized; lets `--quiet-intervals` refresh
//! intervals pass and counts what the operator wrote to the API server (resourceVersions
//! of its Secrets and ManagedSecrets, Events in the bench namespaces) and the requests and
//! logins it made to OpenBao (the audit log, by token metadata); records its peak and
//! steady RSS and CPU seconds from /proc. Then it runs the limit as a child process
//! (`--limit-worker`), then ESO v0.16.2 out of cluster (the binary `e2e/testbed build-eso`
//! caches; its CRDs from the Go module cache) with N ExternalSecrets measured the same way,
//! and prints one table. Everything it made is deleted at the end (ESO's CRDs stay).

mod args;
mod bed;
mod eso;
mod keyhaven_phase;
mod limit;
mod observe;
mod operator;
mod phase;
mod run;
mod setup;
mod table;

use args::Args;
use clap::Parser;
use eso::{Eso, EsoFiles};
use run::{Figures, Run};
use std::io::Write;
use std::time::Instant;

/// The figures of the three phases; ESO's, or why there are none (`not run: …`,
/// `failed: …`).
type Results = (Figures, Figures, Result<Figures, String>);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    keyhaven::install_crypto_provider();
    let args = Args::parse();
    if let Some(run) = args.limit_worker.clone() {
        return limit::limit_worker(&args, &run).await;
    }
    anyhow::ensure!(
        args.n > 0 && args.namespaces > 0,
        "--n and --namespaces must be > 0"
    );
    let run = Run::new(args.clone()).await?;
    eprintln!(
        "run {}: N={}, {} namespaces, concurrency {}, refresh {}s",
        run.id, args.n, args.namespaces, args.concurrency, args.refresh
    );
    setup::ensure_crds(&run.client).await?;
    let eso_files = if args.no_eso {
        Err("not run (--no-eso)".to_owned())
    } else {
        eso::eso_files(&args, &run.bed)
    };
    if let Err(why) = &eso_files
        && !args.no_eso
    {
        eprintln!("ESO: not run: {why}");
    }
    let t = Instant::now();
    run.seed().await?;
    eprintln!(
        "seeded {} values in OpenBao in {:.1}s",
        args.n,
        t.elapsed().as_secs_f64()
    );
    let result = phases(&run, &eso_files).await;
    if !args.keep {
        cleanup(&run, eso_files.is_ok()).await;
    }
    let (k, l, e) = result?;
    let text = report(&run, &k, &l, &e);
    println!("{text}");
    if let Some(out) = &args.out {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)?;
        file.write_all(text.as_bytes())?;
    }
    if let Err(why) = e
        && why.starts_with("failed")
    {
        anyhow::bail!("the ESO phase {why}");
    }
    Ok(())
}

/// keyhaven, the limit, then ESO, each unless skipped.
async fn phases(run: &Run, eso_files: &Result<EsoFiles, String>) -> anyhow::Result<Results> {
    let args = &run.args;
    let k = if args.no_keyhaven {
        Figures::default()
    } else {
        phase::operator_phase(run, &keyhaven_phase::Keyhaven::new(run), 1).await?
    };
    eprintln!("keyhaven figures: {k:?}");
    let l = if args.no_limit {
        Figures::default()
    } else {
        limit::limit(run).await?
    };
    eprintln!("limit figures: {l:?}");
    // ESO last, in its own namespaces. Its failure does not lose the other figures: the
    // table is printed, then the bench exits with the error.
    let e: Result<Figures, String> = match eso_files {
        Err(why) if args.no_eso => Err(why.clone()),
        Err(why) => Err(format!("not run: {why}")),
        Ok(files) => {
            // The keyhaven phase moved every tenth value to generation 2.
            let base = if args.no_keyhaven { 1 } else { 2 };
            phase::operator_phase(run, &Eso::new(run, files), base)
                .await
                .map_err(|err| {
                    eprintln!("ESO phase failed: {err:#}");
                    format!("failed: {err:#}")
                })
        }
    };
    if let Ok(e) = &e {
        eprintln!("ESO figures: {e:?}");
    }
    Ok((k, l, e))
}

/// Deletes whatever a phase left (a failed one leaves its objects): the OpenBao values, the
/// namespaces, ESO's store.
async fn cleanup(run: &Run, eso: bool) {
    run.cleanup_vault().await;
    let all: Vec<String> = [
        run.namespaces("k"),
        run.namespaces("l"),
        run.namespaces("e"),
    ]
    .concat();
    let ops = vec![format!("{}-op", run.id), format!("{}-eso", run.id)];
    setup::delete_namespaces(&run.client, &[all, ops].concat()).await;
    if eso {
        eso::delete_store(&run.client, &format!("{}-eso", run.id)).await;
    }
}

/// The markdown the bench prints: a heading, the command that reproduces the run, the
/// table, the notes.
fn report(run: &Run, k: &Figures, l: &Figures, e: &Result<Figures, String>) -> String {
    let args = &run.args;
    let skipped: String = [
        (args.no_keyhaven, " --no-keyhaven"),
        (args.no_limit, " --no-limit"),
        (args.no_eso, " --no-eso"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, flag)| *flag)
    .collect();
    let command = format!(
        "cargo run --release -p keyhaven-bench -- --n {} --namespaces {} --concurrency {} --refresh {} --quiet-intervals {}{skipped}",
        args.n, args.namespaces, args.concurrency, args.refresh, args.quiet_intervals
    );
    let (eso_figures, not_run) = match e {
        Ok(f) => (Some(f), ""),
        Err(why) if why.starts_with("failed") => (None, "failed"),
        Err(_) => (None, "not run"),
    };
    let mut notes = vec![];
    if !k.note.is_empty() {
        notes.push(format!("keyhaven: {}.\n", k.note));
    }
    match e {
        Ok(f) if !f.note.is_empty() => notes.push(format!("ESO: {}.\n", f.note)),
        Ok(_) => {}
        Err(why) => notes.push(format!("ESO: {why}.\n")),
    }
    let notes = notes.join("\n");
    format!(
        "### N = {} (run {}, {})\n\n`{command}`\n\n{}\n{notes}\n",
        args.n,
        run.id,
        jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M UTC"),
        table::table(args, k, l, eso_figures, not_run),
    )
}
