//! The operator phase the keyhaven run and the ESO run share: set up a store with a tagged
//! OpenBao token, start the operator, apply N objects and time until every native Secret
//! is right, change 10 % of the values and time again, watch the quiet refresh intervals,
//! clean up. What differs between the two operators is a [`Contender`].

use crate::observe::{SecretWatch, Values, apiserver_requests, proc_stats, verify_by_list};
use crate::operator::Operator;
use crate::run::{Figures, Run};
use crate::setup::{
    concurrently, create_namespaces, create_token_secret, delete_namespaces, tagged_token,
};
use std::time::{Duration, Instant};

/// The names of a [`Contender`] and of what it makes.
pub struct Names {
    /// Its value of the `who` label on the native Secrets it makes (`keyhaven`, `eso`).
    pub who: &'static str,
    /// How the progress lines name it.
    pub name: &'static str,
    /// The letter in its namespaces' names (`<run>-<letter>-<k>`).
    pub letter: &'static str,
    /// The suffix of its own namespace and OpenBao token tag (`<run>-<suffix>`).
    pub suffix: &'static str,
    /// The kind of the N objects, plural.
    pub kind: &'static str,
}

impl Names {
    pub const fn new(
        who: &'static str,
        name: &'static str,
        letter: &'static str,
        suffix: &'static str,
        kind: &'static str,
    ) -> Names {
        Names {
            who,
            name,
            letter,
            suffix,
            kind,
        }
    }
}

/// An operator under test, and the objects it reads.
pub trait Contender {
    /// How it and its objects are named.
    const NAMES: Names;

    /// Installs what its objects read (a store, a profile); the store's token is the
    /// Secret `bench-vault-token` in `op_ns`.
    async fn install(&self, run: &Run, op_ns: &str) -> anyhow::Result<()>;

    /// Starts the operator and waits until it is ready; it and its /metrics address.
    async fn start(&self, run: &Run) -> anyhow::Result<(Operator, String)>;

    /// Applies object `i` (in namespace `namespace(run, letter, i, …)`).
    async fn apply(&self, run: &Run, i: usize) -> anyhow::Result<()>;

    /// Waits until every object reports itself in sync; `updated` (the secrets whose value
    /// changed once) is empty while converging.
    async fn wait_synced(
        &self,
        run: &Run,
        updated: &[usize],
        timeout: Duration,
    ) -> anyhow::Result<()>;

    /// After the quiet intervals (`f.logins` holds the audit log's count, if any): the
    /// note from the operator's /metrics at `metrics`.
    async fn finish(&self, f: &mut Figures, op: &Operator, metrics: &str);

    /// Clean-up while the operator still runs (`namespaces`: its N objects').
    async fn release(&self, run: &Run, namespaces: &[String]);

    /// Clean-up once it stopped.
    async fn remove(&self, run: &Run, namespaces: &[String]);
}

/// Where the phase is: the operator, its Secrets' watch, what they should hold.
struct Measure<'a, C> {
    run: &'a Run,
    contender: &'a C,
    op: &'a Operator,
    tag: &'a str,
    watch: SecretWatch,
    selector: String,
    timeout: Duration,
}

/// One operator's phase. `base` is the generation every tenth value has in OpenBao when it
/// starts; its own 10 % change moves them to `base + 1`.
pub async fn operator_phase<C: Contender>(
    run: &Run,
    contender: &C,
    base: u32,
) -> anyhow::Result<Figures> {
    let (client, args) = (&run.client, &run.args);
    let op_ns = format!("{}-{}", run.id, C::NAMES.suffix);
    let namespaces = run.namespaces(C::NAMES.letter);
    create_namespaces(
        client,
        &[vec![op_ns.clone()], namespaces.clone()].concat(),
        &run.id,
    )
    .await?;
    // The token's tag is the operator's namespace: `<run>-op`, `<run>-eso`.
    let token = tagged_token(&run.root, &op_ns).await?;
    create_token_secret(client, &op_ns, &token).await?;
    contender.install(run, &op_ns).await?;

    let run_mark = run.audit.mark();
    let (mut op, metrics) = contender.start(run).await?;
    eprintln!(
        "{}: operator pid {} ready (log {}), {} {} across {} namespaces",
        C::NAMES.name,
        op.pid(),
        op.log().display(),
        args.n,
        C::NAMES.kind,
        namespaces.len()
    );
    let selector = run.selector(C::NAMES.who);
    let m = Measure {
        run,
        contender,
        op: &op,
        tag: &op_ns,
        watch: SecretWatch::start(client, &selector).await,
        selector,
        timeout: Duration::from_secs(args.timeout),
    };
    let mut f = Figures::default();
    m.converge(&mut f, base).await?;
    m.update(&mut f, base + 1).await?;
    drop(m);

    run.quiet(&mut f, C::NAMES.who, &op_ns, &namespaces, op.pid())
        .await?;
    // Logins over the whole run: token lookups and auth/*/login calls of its token.
    f.logins = run.audit.count(run_mark, &op_ns).map(|c| c.logins);
    contender.finish(&mut f, &op, &metrics).await;

    if !args.keep {
        contender.release(run, &namespaces).await;
    }
    op.stop();
    if !args.keep {
        contender.remove(run, &namespaces).await;
        delete_namespaces(client, &[op_ns]).await;
        let _ = vaultrs::token::revoke(&run.root, &token).await;
    }
    Ok(f)
}

impl<C: Contender> Measure<'_, C> {
    /// Applies the N objects and times until every Secret holds the values OpenBao holds
    /// now (every tenth at `base`).
    async fn converge(&self, f: &mut Figures, base: u32) -> anyhow::Result<()> {
        let (run, c) = (self.run, self.contender);
        let expected = run.expected_at(C::NAMES.letter, &run.updated(), base);
        let api_before = apiserver_requests(&run.bed);
        let mark = run.audit.mark();
        let cpu0 = proc_stats(self.op.pid()).cpu_secs;
        let servers0 = run.bed.servers_cpu();
        let start = Instant::now();
        concurrently((0..run.args.n).collect(), run.args.concurrency, |i| {
            c.apply(run, i)
        })
        .await?;
        let applied = start.elapsed();
        let converge = self.wait(&expected, start, "converge").await?;
        f.converge = Some(converge);
        f.converge_cpu = Some(proc_stats(self.op.pid()).cpu_secs - cpu0);
        f.servers_cpu = run.bed.servers_cpu().since(servers0);
        verify_by_list(&run.client, &self.selector, &expected).await?;
        eprintln!(
            "{}: {} Secrets right after {:.2}s ({} applied in {:.2}s)",
            C::NAMES.name,
            run.args.n,
            converge.as_secs_f64(),
            C::NAMES.kind,
            applied.as_secs_f64()
        );
        // Every object in sync (keyhaven: its version recorded) before anything changes.
        c.wait_synced(run, &[], self.timeout).await?;
        f.api_requests_per_secret = run.api_requests_per_secret(api_before);
        f.converge_vault_requests = run.audit.count(mark, self.tag).map(|c| c.requests);
        Ok(())
    }

    /// Moves every tenth value to `generation` in OpenBao and times until the Secrets hold it.
    async fn update(&self, f: &mut Figures, generation: u32) -> anyhow::Result<()> {
        let run = self.run;
        let updated = run.updated();
        let expected = run.expected_at(C::NAMES.letter, &updated, generation);
        let start = Instant::now();
        run.write_values(updated.clone(), generation).await?;
        let update = self.wait(&expected, start, "update").await?;
        f.update = Some(update);
        verify_by_list(&run.client, &self.selector, &expected).await?;
        self.contender
            .wait_synced(run, &updated, self.timeout)
            .await?;
        eprintln!(
            "{}: {} changed values materialized after {:.2}s",
            C::NAMES.name,
            updated.len(),
            update.as_secs_f64()
        );
        Ok(())
    }

    /// The time since `start` until every Secret holds `expected`, through the watch.
    async fn wait(
        &self,
        expected: &Values,
        start: Instant,
        what: &str,
    ) -> anyhow::Result<Duration> {
        let what = format!("{} {what}", C::NAMES.name);
        self.watch
            .wait_all(expected, start, self.timeout, &what)
            .await
    }
}
