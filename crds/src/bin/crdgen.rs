//! Prints the SD35Deployment CRD, or the API reference with `--markdown`; with `--write`
//! updates every committed copy instead: the CRD in `crds/` and in the Helm chart's
//! `files/crds/`, and `docs/api.md`.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let yaml = sd35_crds::crd_yaml();
    let markdown = sd35_crds::api_reference_markdown();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--write") {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut outputs: Vec<(std::path::PathBuf, &str)> = sd35_crds::CRD_DIRS
            .iter()
            .map(|dir| (root.join(dir).join(sd35_crds::CRD_FILE_NAME), yaml.as_str()))
            .collect();
        outputs.push((root.join(sd35_crds::API_REFERENCE_PATH), markdown.as_str()));
        for (path, text) in outputs {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&path, text)?;
            eprintln!("wrote {}", path.display());
        }
    } else if args.iter().any(|a| a == "--markdown") {
        print!("{markdown}");
    } else {
        print!("{yaml}");
    }
    Ok(())
}
