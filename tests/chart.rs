//! The chart ships the generated CRDs unchanged (`helm/keyhaven/crds/` is a copy of `crds/`).
//! Rendering and installing the chart needs helm: see `tests/e2e_deploy.rs`.

use std::collections::BTreeMap;
use std::path::Path;

fn yaml_files(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

#[test]
fn chart_crds_are_the_generated_crds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let generated = yaml_files(&root.join("crds"));
    let chart = yaml_files(&root.join("helm/keyhaven/crds"));
    assert_eq!(
        generated.keys().collect::<Vec<_>>(),
        chart.keys().collect::<Vec<_>>(),
        "helm/keyhaven/crds/ must hold the files of crds/: cp crds/*.yaml helm/keyhaven/crds/"
    );
    for (name, text) in &generated {
        assert!(
            chart[name] == *text,
            "helm/keyhaven/crds/{name} differs from crds/{name}: cp crds/*.yaml helm/keyhaven/crds/"
        );
    }
}

#[test]
fn chart_version_follows_the_crate() {
    let chart = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/keyhaven/Chart.yaml"),
    )
    .unwrap();
    let app_version = format!("appVersion: \"{}\"", env!("CARGO_PKG_VERSION"));
    assert!(
        chart.lines().any(|l| l == app_version),
        "helm/keyhaven/Chart.yaml: expected `{app_version}`, the crate's version"
    );
}
