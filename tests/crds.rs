//! `crds/` must be exactly what `keyhaven crds` generates from the Rust types.

use keyhaven::api::{crd_file_name, crd_yaml, crds};
use std::collections::BTreeSet;
use std::path::Path;

#[test]
fn crds_directory_matches_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut expected = BTreeSet::new();
    for crd in crds() {
        let name = crd_file_name(&crd);
        let on_disk = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
        assert!(
            on_disk == crd_yaml(&crd),
            "crds/{name} drifted from src/api: regenerate with `cargo run -- crds --out-dir crds`"
        );
        expected.insert(name);
    }
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("crds/ exists")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(present, expected, "crds/ holds files no CRD generates");
}
