#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

//! The container images. Their Dockerfiles, without building: every path a Dockerfile copies
//! from the build context exists (or, for the `BUILD=host` stages, is a binary cargo builds
//! into `target/<profile>/`) and survives `.dockerignore`; every path copied from a build
//! stage is what that stage's `cargo build` produces, for a package, binary and features the
//! workspace has; nothing cargo needs to build is ignored; every image stage runs as an
//! unprivileged user an executable that it contains; `make images` builds both. And the
//! images `make images` built (the archives the real node imports): non-root, their binary as
//! entrypoint. The CUDA flavour, whose NVIDIA base no registry here serves, as far as this
//! machine allows: its host stage copies what `make cuda` writes, and `make cuda`'s binary,
//! with the loader configured the way the image configures it, loads a node's driver where
//! one is mounted and otherwise the driver stub, and then exits 17 for `--device cuda`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use sd35_e2e::repo_root;
use serde_json::Value;

const DOCKERFILES: [&str; 2] = ["operator/Dockerfile", "inference/server/Dockerfile"];

/// One instruction of a Dockerfile: its keyword (upper case) and the rest of the line.
#[derive(Debug, Clone)]
struct Instruction {
    keyword: String,
    rest: String,
}

/// A build stage: its `FROM` line, its name, and its instructions.
#[derive(Debug, Default)]
struct Stage {
    base: String,
    name: Option<String>,
    instructions: Vec<Instruction>,
}

/// Splits a Dockerfile into stages (line continuations joined, comments dropped).
fn parse(text: &str) -> Vec<Stage> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical.into_iter().filter(|l| !l.trim().is_empty()) {
        let (keyword, rest) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let keyword = keyword.to_uppercase();
        let rest = rest.trim().to_owned();
        if keyword == "FROM" {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let words: Vec<&str> = words.into_iter().filter(|w| !w.starts_with("--")).collect();
            stages.push(Stage {
                base: words[0].to_owned(),
                name: (words.len() == 3 && words[1].eq_ignore_ascii_case("as"))
                    .then(|| words[2].to_owned()),
                instructions: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.instructions.push(Instruction { keyword, rest });
        }
    }
    stages
}

/// The flags (`--from=x`) and the words of a COPY instruction.
fn copy_parts(rest: &str) -> (BTreeMap<String, String>, Vec<String>) {
    let mut flags = BTreeMap::new();
    let mut words = Vec::new();
    for word in rest.split_whitespace() {
        match word.strip_prefix("--") {
            Some(flag) => {
                let (k, v) = flag.split_once('=').unwrap_or((flag, ""));
                flags.insert(k.to_owned(), v.to_owned());
            }
            None => words.push(word.to_owned()),
        }
    }
    (flags, words)
}

/// `.dockerignore` as Docker reads it: patterns in order, the last one matching a path (or
/// one of its parent directories) decides, `!` re-includes.
struct DockerIgnore {
    patterns: Vec<(bool, Vec<String>)>,
}

impl DockerIgnore {
    fn load(root: &Path) -> Self {
        let text = std::fs::read_to_string(root.join(".dockerignore")).unwrap_or_default();
        let patterns = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (negated, pattern) = match l.strip_prefix('!') {
                    Some(p) => (true, p.trim()),
                    None => (false, l),
                };
                let segments = pattern
                    .trim_start_matches('/')
                    .trim_end_matches('/')
                    .split('/')
                    .filter(|s| !s.is_empty() && *s != ".")
                    .map(str::to_owned)
                    .collect();
                (negated, segments)
            })
            .collect();
        Self { patterns }
    }

    fn is_ignored(&self, relative: &str) -> bool {
        let path: Vec<&str> = relative.split('/').filter(|s| !s.is_empty()).collect();
        let mut ignored = false;
        for (negated, pattern) in &self.patterns {
            let hit = (1..=path.len()).any(|n| glob(pattern, &path[..n]));
            if hit {
                ignored = !negated;
            }
        }
        ignored
    }
}

/// Whether path segments match pattern segments (`**` spans any number of segments).
fn glob(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => (0..=path.len()).any(|n| glob(rest, &path[n..])),
        Some((first, rest)) => match path.split_first() {
            Some((segment, tail)) => {
                wildcard(first.as_bytes(), segment.as_bytes()) && glob(rest, tail)
            }
            None => false,
        },
    }
}

/// `*` and `?` within one segment.
fn wildcard(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|n| wildcard(rest, &text[n..])),
        Some((b'?', rest)) => !text.is_empty() && wildcard(rest, &text[1..]),
        Some((c, rest)) => text.first() == Some(c) && wildcard(rest, &text[1..]),
    }
}

fn cargo_metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn relative(path: &str) -> String {
    let root = repo_root().canonicalize().unwrap();
    let path = PathBuf::from(path);
    let path = path.canonicalize().unwrap_or(path);
    path.strip_prefix(&root)
        .unwrap_or_else(|_| panic!("{} is outside the repository", path.display()))
        .to_string_lossy()
        .into_owned()
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn nothing_cargo_needs_is_ignored_by_dockerignore() {
    let ignore = DockerIgnore::load(&repo_root());
    let metadata = cargo_metadata();
    let mut needed = vec!["Cargo.toml".to_owned(), "Cargo.lock".to_owned()];
    for package in metadata["packages"].as_array().unwrap() {
        let manifest = package["manifest_path"].as_str().unwrap();
        needed.push(relative(manifest));
        // Every source file of the package's library, binaries and build script, plus
        // anything they include.
        let package_dir = Path::new(manifest).parent().unwrap();
        for target in package["targets"].as_array().unwrap() {
            let kinds: Vec<&str> = target["kind"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap())
                .collect();
            if kinds
                .iter()
                .all(|k| matches!(*k, "test" | "bench" | "example"))
            {
                continue;
            }
            needed.push(relative(target["src_path"].as_str().unwrap()));
        }
        let mut sources = Vec::new();
        files_under(&package_dir.join("src"), &mut sources);
        for source in sources {
            let text = std::fs::read_to_string(&source).unwrap_or_default();
            needed.push(relative(source.to_str().unwrap()));
            for macro_name in ["include_str!(\"", "include_bytes!(\""] {
                for (at, _) in text.match_indices(macro_name) {
                    let tail = &text[at + macro_name.len()..];
                    let included = tail.split('"').next().unwrap();
                    let path = source.parent().unwrap().join(included);
                    needed.push(relative(path.to_str().unwrap()));
                }
            }
        }
    }
    let ignored: Vec<&String> = needed.iter().filter(|p| ignore.is_ignored(p)).collect();
    assert!(
        ignored.is_empty(),
        ".dockerignore leaves out what the image build needs: {ignored:?}"
    );
    // And it does keep the big things out, all but the binaries the host stages copy.
    for heavy in [
        "target/debug/deps/libsd35_operator.rlib",
        "target/release/build/x",
        "target/debug/sd35-operator.d",
        ".git/HEAD",
        "inference/testdata/golden",
    ] {
        assert!(ignore.is_ignored(heavy), ".dockerignore sends {heavy}");
    }
    for binary in ["target/release/sd35-operator", "target/debug/sd35-server"] {
        assert!(
            !ignore.is_ignored(binary),
            ".dockerignore leaves out {binary}"
        );
    }
}

/// The default of `ARG name=value` in the Dockerfile's stages or before the first.
fn arg_default(text: &str, name: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("ARG "))
        .find_map(|arg| arg.strip_prefix(&format!("{name}=")).map(str::to_owned))
}

#[test]
fn every_copied_path_exists_or_is_built() {
    let root = repo_root();
    let ignore = DockerIgnore::load(&root);
    let metadata = cargo_metadata();
    let packages: BTreeMap<&str, &Value> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p))
        .collect();
    for dockerfile in DOCKERFILES {
        let text = std::fs::read_to_string(root.join(dockerfile))
            .unwrap_or_else(|e| panic!("{dockerfile}: {e}"));
        let stages = parse(&text);
        assert!(
            stages.len() >= 2,
            "{dockerfile}: expected a build stage and a runtime stage"
        );
        for (index, stage) in stages.iter().enumerate() {
            for copy in stage
                .instructions
                .iter()
                .filter(|i| i.keyword == "COPY" || i.keyword == "ADD")
            {
                assert_eq!(copy.keyword, "COPY", "{dockerfile}: use COPY, not ADD");
                let (flags, words) = copy_parts(&copy.rest);
                let (sources, _dest) = words.split_at(words.len() - 1);
                match flags.get("from") {
                    None if stage.name.as_deref() == Some("cuda-build-host") => {
                        // What tools/cuda/build.sh (`make cuda`) writes into target/cuda/.
                        let outputs = cuda_build_outputs();
                        for source in sources {
                            assert!(
                                outputs.contains(source),
                                "{dockerfile}: the CUDA host stage copies {source}, which `make cuda` does not write ({outputs:?})"
                            );
                            assert!(
                                !ignore.is_ignored(source),
                                "{dockerfile}: {source} is in .dockerignore"
                            );
                        }
                    }
                    None if stage.name.as_deref() == Some("build-host") => {
                        // target/${PROFILE}/<binary>: what `cargo build` writes.
                        for source in sources {
                            let binary = source
                                .strip_prefix("target/${PROFILE}/")
                                .unwrap_or_else(|| {
                                    panic!("{dockerfile}: the host stage copies {source}, not a target/${{PROFILE}}/ binary")
                                });
                            assert!(
                                packages.values().any(|p| p["targets"]
                                    .as_array()
                                    .unwrap()
                                    .iter()
                                    .any(|t| t["name"] == binary)),
                                "{dockerfile}: no workspace binary {binary}"
                            );
                            for profile in ["debug", "release"] {
                                let path = format!("target/{profile}/{binary}");
                                assert!(
                                    !ignore.is_ignored(&path),
                                    "{dockerfile}: {path} is in .dockerignore"
                                );
                            }
                        }
                    }
                    None => {
                        for source in sources {
                            let path = source.trim_start_matches("./");
                            assert!(
                                root.join(path).exists(),
                                "{dockerfile}: COPY {source}: no such path in the repository"
                            );
                            if !path.is_empty() && path != "." {
                                assert!(
                                    !ignore.is_ignored(path),
                                    "{dockerfile}: COPY {source} is in .dockerignore"
                                );
                            }
                        }
                    }
                    Some(from) => {
                        let producer = stages[..index]
                            .iter()
                            .find(|s| s.name.as_deref() == Some(from.as_str()))
                            .unwrap_or_else(|| {
                                panic!("{dockerfile}: COPY --from={from}: no earlier stage {from}")
                            });
                        // `FROM build-${BUILD} AS build` picks one of the stages it names.
                        let prefix = producer.base.strip_suffix("${BUILD}");
                        let producers: Vec<&Stage> = match prefix {
                            Some(prefix) => stages[..index]
                                .iter()
                                .filter(|s| {
                                    s.name
                                        .as_deref()
                                        .is_some_and(|n| n.starts_with(prefix) && n != from)
                                })
                                .collect(),
                            None => vec![producer],
                        };
                        assert!(
                            producers.len() >= 2 || producer.base == producers[0].base,
                            "{dockerfile}: {from} picks from no stages"
                        );
                        let default_build = arg_default(&text, "BUILD").unwrap_or_default();
                        if let Some(prefix) = prefix {
                            assert!(
                                producers.iter().any(|p| p.name.as_deref()
                                    == Some(&format!("{prefix}{default_build}"))),
                                "{dockerfile}: the default BUILD={default_build} names no {prefix} stage"
                            );
                        }
                        for producer in producers {
                            let host_copy = !producer
                                .instructions
                                .iter()
                                .any(|i| i.keyword == "RUN" && i.rest.contains("cargo build"));
                            for source in sources {
                                if host_copy {
                                    let copies = producer.instructions.iter().any(|i| {
                                        i.keyword == "COPY"
                                            && copy_parts(&i.rest).1.last() == Some(source)
                                    });
                                    assert!(
                                        copies,
                                        "{dockerfile}: stage {:?} does not provide {source}",
                                        producer.name
                                    );
                                } else if source.ends_with("/libcuda.so.1") {
                                    assert_driver_stub_installed(dockerfile, producer, source);
                                } else {
                                    assert_built(dockerfile, producer, source, &packages);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The files tools/cuda/build.sh leaves in its default output directory, relative to the
/// repository: the `"$out_dir/..."` paths it writes.
fn cuda_build_outputs() -> Vec<String> {
    let script = std::fs::read_to_string(repo_root().join("tools/cuda/build.sh")).unwrap();
    assert!(
        script.contains("out_dir=${SD35_CUDA_OUT:-$repo/target/cuda}"),
        "tools/cuda/build.sh no longer writes into target/cuda by default"
    );
    let mut outputs: Vec<String> = script
        .match_indices("\"$out_dir/")
        .map(|(at, quote)| {
            let tail = &script[at + quote.len()..];
            format!("target/cuda/{}", tail.split('"').next().unwrap())
        })
        .collect();
    // `bin="$out_dir/sd35-server"`: the binary, stripped into place.
    assert!(outputs.iter().any(|o| o == "target/cuda/sd35-server"));
    outputs.sort();
    outputs.dedup();
    outputs
}

/// `source`, the driver stub, is installed in the CUDA build `stage` from the CUDA toolkit's
/// stub directory, under the stub's soname.
fn assert_driver_stub_installed(dockerfile: &str, stage: &Stage, source: &str) {
    let run = stage
        .instructions
        .iter()
        .find(|i| i.keyword == "RUN" && i.rest.contains(source))
        .unwrap_or_else(|| panic!("{dockerfile}: nothing in the build stage writes {source}"));
    assert!(
        run.rest
            .contains(&format!("/usr/local/cuda/lib64/stubs/libcuda.so {source}")),
        "{dockerfile}: {source} is not the CUDA toolkit's stubs/libcuda.so"
    );
}

/// `source` is installed in `stage` from the output of a `cargo build` of a binary the
/// workspace has, with features that package has.
fn assert_built(dockerfile: &str, stage: &Stage, source: &str, packages: &BTreeMap<&str, &Value>) {
    let run = stage
        .instructions
        .iter()
        .find(|i| i.keyword == "RUN" && i.rest.contains(source))
        .unwrap_or_else(|| panic!("{dockerfile}: nothing in the build stage writes {source}"));
    let words: Vec<&str> = run.rest.split_whitespace().collect();
    let value_of = |flag: &str| -> Option<&str> {
        words
            .iter()
            .position(|w| *w == flag)
            .and_then(|i| words.get(i + 1).copied())
    };
    assert!(
        run.rest.contains("cargo build"),
        "{dockerfile}: {source} is not built by cargo"
    );
    assert!(
        words.contains(&"--locked"),
        "{dockerfile}: cargo build without --locked"
    );
    let package = value_of("-p").unwrap_or_else(|| panic!("{dockerfile}: cargo build without -p"));
    let binary =
        value_of("--bin").unwrap_or_else(|| panic!("{dockerfile}: cargo build without --bin"));
    let meta = packages
        .get(package)
        .unwrap_or_else(|| panic!("{dockerfile}: the workspace has no package {package}"));
    let has_bin =
        meta["targets"].as_array().unwrap().iter().any(|t| {
            t["name"] == binary && t["kind"].as_array().unwrap().iter().any(|k| k == "bin")
        });
    assert!(
        has_bin,
        "{dockerfile}: package {package} has no binary {binary}"
    );
    if let Some(features) = value_of("--features") {
        for feature in features.split(',') {
            assert!(
                meta["features"].get(feature).is_some(),
                "{dockerfile}: package {package} has no feature {feature}"
            );
        }
    }
    let profile = if words.contains(&"--release") {
        "release"
    } else {
        "debug"
    };
    let built = format!("target/{profile}/{binary}");
    assert!(
        run.rest.contains(&format!("{built} {source}")),
        "{dockerfile}: {source} is not installed from {built}"
    );
}

#[test]
fn images_run_their_binary_as_an_unprivileged_user() {
    let root = repo_root();
    for dockerfile in DOCKERFILES {
        let text = std::fs::read_to_string(root.join(dockerfile)).unwrap();
        let stages = parse(&text);
        // Every stage with an entrypoint is an image a target builds: the CPU and CUDA
        // flavours of the server, the operator.
        let images: Vec<&Stage> = stages
            .iter()
            .filter(|s| s.instructions.iter().any(|i| i.keyword == "ENTRYPOINT"))
            .collect();
        assert!(!images.is_empty(), "{dockerfile}: no image stage");
        assert!(
            std::ptr::eq(*images.last().unwrap(), stages.last().unwrap()),
            "{dockerfile}: the default target (the last stage) is not an image"
        );
        for image in images {
            let user = image
                .instructions
                .iter()
                .rfind(|i| i.keyword == "USER")
                .unwrap_or_else(|| panic!("{dockerfile}: {:?} runs as root (no USER)", image.name));
            let uid = user.rest.split(':').next().unwrap();
            assert!(
                uid.parse::<u32>().is_ok_and(|u| u != 0),
                "{dockerfile}: USER {} must be a numeric non-root uid (runAsNonRoot checks it)",
                user.rest
            );
            let entrypoint = image
                .instructions
                .iter()
                .rfind(|i| i.keyword == "ENTRYPOINT")
                .unwrap();
            let exec: Vec<String> = serde_json::from_str(&entrypoint.rest)
                .unwrap_or_else(|_| panic!("{dockerfile}: ENTRYPOINT must be in exec (JSON) form"));
            let copied = image
                .instructions
                .iter()
                .any(|i| i.keyword == "COPY" && copy_parts(&i.rest).1.last() == Some(&exec[0]));
            assert!(
                copied,
                "{dockerfile}: ENTRYPOINT {} is not copied into the image",
                exec[0]
            );
        }
    }
    // The operator's pods run `sd35-server` by name: it must be on the PATH of the server
    // image.
    let server = std::fs::read_to_string(root.join("inference/server/Dockerfile")).unwrap();
    assert!(server.contains("/usr/local/bin/sd35-server"));
    let stages = parse(&server);
    let cpu = stages
        .iter()
        .find(|s| s.name.as_deref() == Some("cpu"))
        .expect("a cpu target");
    assert_eq!(cpu.base, "${RUNTIME_IMAGE}");
    assert!(stages.last().unwrap().base.contains("CUDA_RUNTIME_IMAGE"));
    assert!(
        arg_default(&server, "CUDA_RUNTIME_IMAGE")
            .unwrap()
            .contains("-runtime-")
    );
    // Without a registry's image, the runtime base is distroless: glibc, no shell, nonroot.
    for dockerfile in DOCKERFILES {
        let text = std::fs::read_to_string(root.join(dockerfile)).unwrap();
        let runtime = arg_default(&text, "RUNTIME_IMAGE").unwrap();
        assert!(
            runtime.contains("distroless/cc") && runtime.ends_with(":nonroot"),
            "{dockerfile}: {runtime}"
        );
    }
}

#[test]
fn make_images_builds_both_dockerfiles_with_buildah() {
    let makefile = std::fs::read_to_string(repo_root().join("Makefile")).unwrap();
    let target = makefile
        .split("\nimages:")
        .nth(1)
        .expect("a Makefile target `images`");
    let recipe: String = target
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with('\t') || l.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        recipe.contains("images/build.sh"),
        "make images does not run images/build.sh"
    );
    let script = std::fs::read_to_string(repo_root().join("images/build.sh")).unwrap();
    assert!(script.contains("buildah bud"));
    for dockerfile in DOCKERFILES {
        assert!(
            script.contains(&format!("-f \"$root/{dockerfile}\"")),
            "images/build.sh does not build {dockerfile}"
        );
    }
    assert!(
        script.contains("--target cpu"),
        "images/build.sh builds no CPU server image"
    );
}

/// The CUDA image stage's driver-stub setup: the directory the stub is copied into and the
/// `ld.so.conf.d` file that lists it.
struct DriverStubSetup {
    dir: String,
    conf: String,
}

fn driver_stub_setup(dockerfile: &str, stage: &Stage) -> DriverStubSetup {
    let copy = stage
        .instructions
        .iter()
        .find(|i| {
            i.keyword == "COPY"
                && copy_parts(&i.rest).1.first().map(String::as_str)
                    == Some("/out/driver-stub/libcuda.so.1")
        })
        .unwrap_or_else(|| panic!("{dockerfile}: the cuda stage does not install the driver stub"));
    let dest = copy_parts(&copy.rest).1.last().unwrap().clone();
    let dir = dest
        .strip_suffix("/libcuda.so.1")
        .unwrap_or_else(|| {
            panic!("{dockerfile}: the stub is installed as {dest}, not libcuda.so.1")
        })
        .to_owned();
    let run = stage
        .instructions
        .iter()
        .find(|i| i.keyword == "RUN" && i.rest.contains("/etc/ld.so.conf.d/"))
        .unwrap_or_else(|| {
            panic!("{dockerfile}: the cuda stage lists the stub in no ld.so.conf.d file")
        });
    let conf = run.rest.split("/etc/ld.so.conf.d/").nth(1).unwrap();
    let conf = conf.split_whitespace().next().unwrap().to_owned();
    assert!(
        run.rest
            .contains(&format!("echo {dir} > /etc/ld.so.conf.d/{conf}")),
        "{dockerfile}: /etc/ld.so.conf.d/{conf} does not list {dir}"
    );
    let after = run
        .rest
        .split(&format!("/etc/ld.so.conf.d/{conf}"))
        .nth(1)
        .unwrap();
    assert!(
        after.contains("ldconfig"),
        "{dockerfile}: no ldconfig after listing the stub: the loader cache would not have it"
    );
    DriverStubSetup { dir, conf }
}

#[test]
fn the_cuda_image_is_the_cuda_build_with_its_driver_stub_searched_last() {
    let root = repo_root();
    let text = std::fs::read_to_string(root.join("inference/server/Dockerfile")).unwrap();
    let stages = parse(&text);
    let cuda = stages
        .iter()
        .find(|s| s.name.as_deref() == Some("cuda"))
        .expect("a cuda target");
    // The CUDA release and compute capability tools/cuda/build.sh builds with.
    let toolkit = std::fs::read_to_string(root.join("tools/cuda/toolkit.sh")).unwrap();
    let release = toolkit
        .lines()
        .find_map(|l| l.strip_prefix("cuda_release="))
        .expect("toolkit.sh names its CUDA release");
    let version = arg_default(&text, "CUDA_VERSION").unwrap();
    assert!(
        version.starts_with(&format!("{release}.")),
        "the CUDA image is CUDA {version}, the CUDA build {release}"
    );
    let build = std::fs::read_to_string(root.join("tools/cuda/build.sh")).unwrap();
    let cap = arg_default(&text, "CUDA_COMPUTE_CAP").unwrap();
    assert_eq!(cap, "80", "the image's default compute capability");
    assert!(build.contains(&format!("cap=${{CUDA_COMPUTE_CAP:-{cap}}}")));
    let makefile = std::fs::read_to_string(root.join("Makefile")).unwrap();
    assert!(makefile.contains(&format!("CUDA_COMPUTE_CAP ?= {cap}")));

    let stub = driver_stub_setup("inference/server/Dockerfile", cuda);
    // Sorted after every ld.so.conf.d entry NVIDIA's CUDA images, Ubuntu and the NVIDIA
    // container toolkit (which lists the directories it mounted the driver into) write.
    for earlier in [
        "000_cuda.conf",
        "00-nvcr-1234567890.conf",
        "988_cuda-13.conf",
        "libc.conf",
        "nvidia.conf",
        "x86_64-linux-gnu.conf",
        "zz_i386-biarch-compat.conf",
    ] {
        assert!(
            stub.conf.as_str() > earlier,
            "{} sorts before {earlier}: the stub could outrank a mounted driver",
            stub.conf
        );
    }
    // A directory of its own, on no default search path and not on LD_LIBRARY_PATH (which
    // outranks the cache, and so the driver).
    for default in [
        "/lib",
        "/usr/lib",
        "/lib64",
        "/usr/lib64",
        "/usr/local/lib",
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/local/cuda/lib64",
        "/usr/local/nvidia/lib64",
    ] {
        assert_ne!(stub.dir, default, "the stub shares a library directory");
    }
    for env in cuda.instructions.iter().filter(|i| i.keyword == "ENV") {
        assert!(
            !env.rest.contains(&stub.dir),
            "ENV {} names the stub's directory",
            env.rest
        );
    }
}

/// Runs `command` in a mount namespace of its own whose loader cache is the one `ldconfig`
/// builds from `conf` (the host's cache and ldconfig's own cache stay as they are).
fn with_loader_config(conf: &Path, cache: &Path, command: &mut Command) -> std::process::Output {
    let script = r#"set -e
mount -t tmpfs sd35-ldconfig /var/cache
ldconfig -X -f "$1" -C "$2"
mount --bind "$2" /etc/ld.so.cache
shift 2
exec "$@""#;
    let mut namespaced = Command::new("unshare");
    namespaced
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(conf)
        .arg(cache)
        .arg(command.get_program())
        .args(command.get_args())
        .env("RUST_BACKTRACE", "0");
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => namespaced.env(key, value),
            None => namespaced.env_remove(key),
        };
    }
    namespaced.output().unwrap()
}

/// Where `ldd`, under a loader configuration, finds `library` for `binary` (`None`: not found).
fn resolved(conf: &Path, cache: &Path, binary: &Path, library: &str) -> Option<PathBuf> {
    let out = with_loader_config(conf, cache, Command::new("ldd").arg(binary));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let (name, target) = line.trim().split_once(" => ")?;
            (name == library && !target.starts_with("not found"))
                .then(|| PathBuf::from(target.split(" (").next().unwrap()))
        })
}

#[test]
fn the_cuda_build_loads_a_mounted_driver_else_the_stub_and_then_exits_17() {
    let root = repo_root();
    let binary = root.join("target/cuda/sd35-server");
    let skip = if let Some(reason) = sd35_e2e::node::unsupported_reason() {
        Some(format!(
            "{reason}; a mount namespace gives the loader its own cache"
        ))
    } else if !binary.exists() {
        Some(format!(
            "{} is missing: `make cuda` builds it",
            binary.display()
        ))
    } else {
        None
    };
    if let Some(reason) = skip {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: {reason}"
        );
        eprintln!("skipping: {reason}");
        return;
    }
    let text = std::fs::read_to_string(root.join("inference/server/Dockerfile")).unwrap();
    let stages = parse(&text);
    let cuda = stages
        .iter()
        .find(|s| s.name.as_deref() == Some("cuda"))
        .unwrap();
    let setup = driver_stub_setup("inference/server/Dockerfile", cuda);

    // The image's loader configuration, in a scratch tree: NVIDIA's image lists its CUDA
    // libraries (here, the pinned toolkit's, which `make cuda` linked against), Ubuntu the
    // system directories where the container toolkit mounts the driver, and the image the
    // stub's directory under the Dockerfile's file name.
    let toolkit = Command::new("bash")
        .arg(root.join("tools/cuda/toolkit.sh"))
        .output()
        .unwrap();
    assert!(
        toolkit.status.success(),
        "{}",
        String::from_utf8_lossy(&toolkit.stderr)
    );
    let toolkit = PathBuf::from(String::from_utf8(toolkit.stdout).unwrap().trim());
    let scratch = tempfile::tempdir().unwrap();
    let tree = scratch.path();
    let conf_d = tree.join("etc/ld.so.conf.d");
    let driver_dir = tree.join("usr/lib/x86_64-linux-gnu");
    let stub_dir = tree.join(setup.dir.trim_start_matches('/'));
    for dir in [&conf_d, &driver_dir, &stub_dir] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let conf = tree.join("etc/ld.so.conf");
    std::fs::write(&conf, format!("include {}/*.conf\n", conf_d.display())).unwrap();
    std::fs::write(
        conf_d.join("000_cuda.conf"),
        format!("{}\n", toolkit.join("lib").display()),
    )
    .unwrap();
    std::fs::write(
        conf_d.join("x86_64-linux-gnu.conf"),
        format!(
            "/lib/x86_64-linux-gnu\n/usr/lib/x86_64-linux-gnu\n{}\n",
            driver_dir.display()
        ),
    )
    .unwrap();
    std::fs::write(
        conf_d.join(&setup.conf),
        format!("{}\n", stub_dir.display()),
    )
    .unwrap();
    let cache = tree.join("etc/ld.so.cache");
    let stub = root.join("target/cuda/driver-stub/libcuda.so.1");

    // Without the stub the binary does not even start.
    let out = with_loader_config(&conf, &cache, Command::new(&binary).arg("--help"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("libcuda.so.1"),
        "without any libcuda.so.1: {:?} {stderr}",
        out.status
    );

    std::fs::copy(&stub, stub_dir.join("libcuda.so.1")).unwrap();
    // A driver mounted into the system directory wins over the stub (only its place on the
    // search path matters here, so a copy of the stub plays the driver).
    let driver = driver_dir.join("libcuda.so.1");
    std::fs::copy(&stub, &driver).unwrap();
    assert_eq!(
        resolved(&conf, &cache, &binary, "libcuda.so.1"),
        Some(driver.clone()),
        "a mounted driver must outrank the stub"
    );

    // No driver: the stub loads, `--device cuda` exits 17 saying why, `--device auto` runs on
    // the CPU.
    std::fs::remove_file(&driver).unwrap();
    assert_eq!(
        resolved(&conf, &cache, &binary, "libcuda.so.1"),
        Some(stub_dir.join("libcuda.so.1"))
    );
    let model = root.join("inference/testdata/sd35-tiny-large");
    let message = tree.join("termination-log");
    let out = with_loader_config(
        &conf,
        &cache,
        Command::new(&binary)
            .args([
                "serve",
                "--device",
                "cuda",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ])
            .arg("--model")
            .arg(&model)
            .arg("--no-warmup")
            .arg(format!("--termination-message-path={}", message.display())),
    );
    let text = std::fs::read_to_string(&message).unwrap_or_default();
    assert_eq!(
        out.status.code(),
        Some(17),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with("GPUUnavailable: ") && text.contains("--device cuda"),
        "{text}"
    );
    let png = tree.join("auto.png");
    let out = with_loader_config(
        &conf,
        &cache,
        Command::new(&binary)
            .args(["generate", "--device", "auto", "--prompt", "a lighthouse"])
            .args(["--steps", "1", "--width", "64", "--height", "64"])
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&png),
    );
    assert!(
        out.status.success(),
        "generate --device auto: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
}

/// The config of the image in a `docker-archive` tarball (its manifest names the config).
fn archive_config(archive: &Path) -> Value {
    let read = |member: &str| {
        let out = Command::new("tar")
            .arg("-xOf")
            .arg(archive)
            .arg(member)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tar {}: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let manifest: Value = serde_json::from_slice(&read("manifest.json")).unwrap();
    let config = manifest[0]["Config"].as_str().unwrap().to_owned();
    serde_json::from_slice(&read(&config)).unwrap()
}

#[test]
fn the_built_images_run_as_nonroot_their_own_binary() {
    let images = match sd35_e2e::Images::locate() {
        Ok(images) => images,
        Err(error) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipping: {error:#}");
            return;
        }
        Err(error) => panic!("{error:#}"),
    };
    for (archive, binary) in [
        ("sd35-operator", "/usr/local/bin/sd35-operator"),
        ("sd35-server-cpu", "/usr/local/bin/sd35-server"),
        ("pause", "/pause"),
    ] {
        let config = archive_config(&images.dir.join(format!("{archive}.tar")));
        let user = config["config"]["User"].as_str().unwrap_or_default();
        let uid: u32 = user.split(':').next().unwrap().parse().unwrap_or(0);
        assert!(uid != 0, "{archive} runs as {user:?}");
        assert_eq!(config["config"]["Entrypoint"][0], binary, "{archive}");
        assert_eq!(config["os"], "linux");
    }
}

#[test]
fn dockerignore_matching_follows_docker() {
    let ignore = DockerIgnore {
        patterns: vec![
            (false, vec!["**".into(), "target".into()]),
            (false, vec!["docs".into()]),
            (false, vec!["*.md".into()]),
            (true, vec!["README.md".into()]),
        ],
    };
    assert!(ignore.is_ignored("target/debug/x"));
    assert!(ignore.is_ignored("crds/target/x"));
    assert!(ignore.is_ignored("docs/api.md"));
    assert!(ignore.is_ignored("CHANGELOG.md"));
    assert!(!ignore.is_ignored("README.md"));
    assert!(!ignore.is_ignored("operator/src/main.rs"));
    assert!(
        !ignore.is_ignored("crds/README.md"),
        "*.md matches the root only"
    );
}
