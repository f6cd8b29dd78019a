//! The fuzz target's committed corpus (`fuzz/corpus/request`) replayed on the stable
//! toolchain: every input satisfies `sd35_api::properties`, so what the fuzzer once found
//! stays fixed even where no nightly toolchain is at hand.

#[test]
fn the_fuzz_corpus_satisfies_the_request_properties() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/request");
    let mut inputs = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        let body = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        sd35_api::properties::request(&body);
        inputs += 1;
    }
    assert!(inputs >= 30, "only {inputs} inputs in {}", dir.display());
}
