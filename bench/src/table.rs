//! The results table (markdown): keyhaven, the limit, ESO, and keyhaven's ratios to both.

use crate::args::Args;
use crate::eso::ESO_VERSION;
use crate::run::Figures;

fn secs(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.2} s"))
}

fn mib(kib: Option<f64>) -> String {
    kib.map_or("–".into(), |k| format!("{:.1} MiB", k / 1024.0))
}

/// A count (a whole number).
fn num(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v}"))
}

fn cpu(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.2}"))
}

fn per(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.1}"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

/// One row: what keyhaven, the limit and ESO show, the numbers behind (for the ratios).
struct Row {
    what: String,
    shown: [String; 3],
    values: [Option<f64>; 3],
    /// Whether the keyhaven / limit and keyhaven / ESO ratios are shown.
    ratios: [bool; 2],
    target: String,
}

impl Row {
    /// A figure of the three runs, shown by `show`, both ratios, no target.
    fn of(
        what: impl Into<String>,
        figures: [&Figures; 3],
        get: impl Fn(&Figures) -> Option<f64>,
        show: fn(Option<f64>) -> String,
    ) -> Row {
        let values = figures.map(get);
        Row {
            what: what.into(),
            shown: values.map(show),
            values,
            ratios: [true, true],
            target: String::new(),
        }
    }

    fn target(self, target: impl Into<String>) -> Row {
        Row {
            target: target.into(),
            ..self
        }
    }

    fn ratios(self, limit: bool, eso: bool) -> Row {
        Row {
            ratios: [limit, eso],
            ..self
        }
    }

    /// `| what | keyhaven | limit | k/l | ESO | k/ESO | target |`; `not_run` in ESO's
    /// columns when it gives a reason ESO has no figures.
    fn render(&self, not_run: Option<&str>) -> String {
        let [k, l, e] = self.values;
        let shown = |on: bool, s: String| if on { s } else { "–".to_owned() };
        let kl = shown(self.ratios[0], ratio(k, l));
        let (ev, ke) = match not_run {
            Some(why) => (why.to_owned(), "–".to_owned()),
            None => (self.shown[2].clone(), shown(self.ratios[1], ratio(k, e))),
        };
        let [kv, lv, _] = &self.shown;
        let (what, target) = (&self.what, &self.target);
        format!("| {what} | {kv} | {lv} | {kl} | {ev} | {ke} | {target} |\n")
    }
}

/// The rows: times, then requests, then memory and CPU.
fn rows(args: &Args, figures: [&Figures; 3]) -> Vec<Row> {
    let d = |d: Option<std::time::Duration>| d.map(|d| d.as_secs_f64());
    let u = |v: Option<u64>| v.map(|v| v as f64);
    let quiet = args.quiet_intervals;
    vec![
        Row::of(
            format!("time to converge {} Secrets", args.n),
            figures,
            |f| d(f.converge),
            secs,
        )
        .target("≤ 1.3× the limit; ≤ 0.2× ESO (≥ 5× faster)"),
        Row::of(
            format!("time to materialize {} changed values", args.n / 10),
            figures,
            |f| d(f.update),
            secs,
        )
        .target(format!("(refreshInterval {}s ±10 %)", args.refresh)),
        Row::of(
            "API requests per Secret (converge)",
            figures,
            |f| f.api_requests_per_secret,
            per,
        ),
        Row::of(
            "OpenBao requests (converge)",
            figures,
            |f| u(f.converge_vault_requests),
            num,
        ),
        Row::of(
            format!("API writes in {quiet} unchanged refresh intervals"),
            figures,
            |f| f.quiet_api_writes.map(|v| v as f64),
            num,
        )
        .target("0"),
        Row::of(
            format!("OpenBao requests in {quiet} unchanged refresh intervals"),
            figures,
            |f| u(f.quiet_vault_requests),
            num,
        ),
        Row::of("OpenBao logins", figures, |f| u(f.logins), num)
            .ratios(false, false)
            .target("1 per store"),
        Row::of("peak RSS (VmHWM)", figures, |f| u(f.peak_rss_kib), mib).target("≤ 0.25× ESO"),
        Row::of(
            "steady RSS (VmRSS, after the quiet intervals)",
            figures,
            |f| u(f.steady_rss_kib),
            mib,
        )
        .target("≤ 48 MiB at 10,000; ≤ 0.25× ESO"),
        Row::of("CPU seconds (converge)", figures, |f| f.converge_cpu, cpu),
        Row {
            shown: figures.map(|f| f.servers_cpu.show()),
            ..Row::of(
                "server CPU s (converge): apiserver / etcd / OpenBao",
                figures,
                |_| None,
                cpu,
            )
        },
        Row::of("CPU seconds (whole run)", figures, |f| f.total_cpu, cpu).ratios(false, true),
    ]
}

/// One markdown table: keyhaven, the limit, ESO, and keyhaven's ratios to both. `e` is
/// None when ESO did not run (`not_run` says why in one or two words).
pub fn table(args: &Args, k: &Figures, l: &Figures, e: Option<&Figures>, not_run: &str) -> String {
    let none = Figures::default();
    let figures = [k, l, e.unwrap_or(&none)];
    let mut out = format!(
        "| N = {}, concurrency {} | keyhaven | limit | keyhaven / limit | ESO {ESO_VERSION} | keyhaven / ESO | target |\n|---|---|---|---|---|---|---|\n",
        args.n, args.concurrency
    );
    let not_run = e.is_none().then_some(not_run);
    for row in rows(args, figures) {
        out.push_str(&row.render(not_run));
    }
    out
}
