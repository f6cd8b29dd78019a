//! Prints the SD35Deployment CRD, or with `--write` updates the committed copies
//! (`crds/` and the Helm chart's `crds/`).

use std::path::Path;

fn main() -> std::io::Result<()> {
    let yaml = sd35_crds::crd_yaml();
    if std::env::args().any(|a| a == "--write") {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for dir in ["crds", "charts/sd35-operator/crds"] {
            let path = root.join(dir).join(sd35_crds::CRD_FILE_NAME);
            std::fs::write(&path, &yaml)?;
            eprintln!("wrote {}", path.display());
        }
    } else {
        print!("{yaml}");
    }
    Ok(())
}
