//! `sd35-server fetch-adapter`: fills `<cache-root>/adapters/<adapter-key>/` with one LoRA or
//! ControlNet from a Hugging Face repository, one file over HTTP(S), or a mounted volume.
//!
//! Guarantees, as for the model's `fetch`: every file is verified (sha256 from `--sha256`, the
//! Hub's LFS metadata, sizes where known) before it is moved into place; an interrupted
//! transfer resumes from its partial file; the completion marker is written last, atomically,
//! so a second run on a complete directory returns at once. And before the marker: every
//! `.safetensors` file's header is parsed and checked against the file
//! ([`sd35_contract::read_safetensors_header`]), so a file that is not one (an HTML error
//! page, a pickle, a truncated upload) fails the fetch with its name and the reason, and is
//! never served. A single file is stored as [`ADAPTER_FILE`] whatever its source calls it; a
//! ControlNet folder (diffusers' layout) keeps its root files' names.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sd35_contract::{
    ADAPTER_FILE, AdapterKind, ExitReason, FetchAdapterArgs, adapter_dir, names_one_file,
    read_safetensors_header,
};

use super::download::{Progress, TransferPolicy};
use super::error::{ExitError, exit_on_error};
use super::manifest::{CacheManifest, FileRecord, SourceRecord, write_marker};
use super::source::{RemoteFile, list_dir, not_found_or_io};
use super::{
    Origin, TransferOptions, fetch_file, hub_listing, prepare_dir, report_progress, runtime,
    transfers, unix_now,
};

/// `sd35-server fetch-adapter`: the contract's flags plus the transfer knobs of `fetch`.
#[derive(Debug, clap::Args)]
pub struct FetchAdapterCommand {
    #[command(flatten)]
    pub args: FetchAdapterArgs,

    #[command(flatten)]
    pub transfer: TransferOptions,
}

/// Runs `fetch-adapter` and exits with its documented exit code.
pub fn main(cmd: &FetchAdapterCommand) -> ! {
    let result = runtime().and_then(|rt| rt.block_on(run(cmd)));
    exit_on_error(
        "fetch-adapter",
        result,
        cmd.args.termination_message_path.as_deref(),
    )
}

/// One file to fetch: from where, and its name in the adapter's directory.
struct Planned {
    file: RemoteFile,
    from: Origin,
    stored_as: String,
}

/// Where an adapter's files come from.
struct AdapterPlan {
    source: SourceRecord,
    resolved_revision: Option<String>,
    files: Vec<Planned>,
}

/// `kind name`, as messages name the adapter: `lora detail`, `controlnet canny`.
fn what(args: &FetchAdapterArgs) -> String {
    format!("{} {}", args.kind, args.name)
}

fn invalid(args: &FetchAdapterArgs, message: impl std::fmt::Display) -> ExitError {
    ExitError::new(
        ExitReason::InvalidModel,
        format!("{}: {message}", what(args)),
    )
}

/// The `--sha256` given, checked to be one.
fn expected_sha256(args: &FetchAdapterArgs) -> Result<Option<String>, ExitError> {
    match &args.sha256 {
        None => Ok(None),
        Some(s) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(Some(s.to_ascii_lowercase()))
        }
        Some(s) => Err(ExitError::new(
            ExitReason::Usage,
            format!("--sha256 {s:?} is not 64 hexadecimal digits"),
        )),
    }
}

/// Whether a file belongs to a ControlNet folder: its config, its weights and their index,
/// at the folder's root.
fn folder_file(path: &str) -> bool {
    !path.contains('/')
        && (path == "config.json"
            || path.ends_with(".safetensors")
            || path.ends_with(".safetensors.index.json"))
}

/// Picks what to fetch from a folder's `files` (repository root or mounted directory): a
/// LoRA's one `.safetensors` file, or a ControlNet's diffusers folder.
fn pick_from_folder(
    args: &FetchAdapterArgs,
    files: Vec<RemoteFile>,
    folder: &str,
    name_it: &str,
) -> Result<Vec<(RemoteFile, String)>, ExitError> {
    match args.kind {
        AdapterKind::Lora => {
            let mut weights: Vec<RemoteFile> = files
                .into_iter()
                .filter(|f| !f.path.contains('/') && f.path.ends_with(".safetensors"))
                .collect();
            match weights.len() {
                1 => Ok(vec![(weights.remove(0), ADAPTER_FILE.to_owned())]),
                0 => Err(invalid(
                    args,
                    format!("{folder} has no .safetensors file at its root; {name_it}"),
                )),
                _ => Err(invalid(
                    args,
                    format!(
                        "{folder} has several .safetensors files at its root ({}): {name_it}",
                        weights
                            .iter()
                            .map(|f| f.path.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )),
            }
        }
        AdapterKind::Controlnet => {
            let picked: Vec<(RemoteFile, String)> = files
                .into_iter()
                .filter(|f| folder_file(&f.path))
                .map(|f| {
                    let name = f.path.clone();
                    (f, name)
                })
                .collect();
            let has = |p: &dyn Fn(&str) -> bool| picked.iter().any(|(f, _)| p(&f.path));
            if !has(&|p| p == "config.json") || !has(&|p| p.ends_with(".safetensors")) {
                return Err(invalid(
                    args,
                    format!(
                        "{folder} is not a ControlNet in diffusers' layout (config.json and \
                         .safetensors weights at its root); {name_it}"
                    ),
                ));
            }
            Ok(picked)
        }
    }
}

async fn plan(
    args: &FetchAdapterArgs,
    client: &reqwest::Client,
    policy: &TransferPolicy,
) -> Result<AdapterPlan, ExitError> {
    let sha256 = expected_sha256(args)?;
    let single = |mut file: RemoteFile, from: Origin| {
        if sha256.is_some() {
            file.sha256.clone_from(&sha256);
        }
        vec![Planned {
            file,
            from,
            stored_as: ADAPTER_FILE.to_owned(),
        }]
    };
    if let Some(repo) = &args.source.hf_repo {
        let listing = hub_listing(client, policy, &args.hf_endpoint, repo, &args.revision).await?;
        let at = format!("{repo}@{}", args.revision);
        let url =
            |path: &str| Origin::Url(format!("{}/{}", listing.base, super::encode(path, true)));
        let files = match &args.hf_file {
            Some(wanted) => {
                let file = listing
                    .files
                    .iter()
                    .find(|f| f.path == wanted.trim_start_matches('/'))
                    .cloned()
                    .ok_or_else(|| {
                        ExitError::new(
                            ExitReason::NotFound,
                            format!("{}: {at} has no file {wanted}", what(args)),
                        )
                    })?;
                let from = url(&file.path);
                single(file, from)
            }
            None => pick_from_folder(
                args,
                listing.files.clone(),
                &at,
                "name the file with huggingFace.file",
            )?
            .into_iter()
            .map(|(file, stored_as)| Planned {
                from: url(&file.path),
                file,
                stored_as,
            })
            .collect(),
        };
        Ok(AdapterPlan {
            source: SourceRecord::HuggingFace {
                endpoint: listing.endpoint.clone(),
                repo: repo.clone(),
            },
            resolved_revision: listing.commit.clone(),
            files,
        })
    } else if let Some(url) = &args.source.http_url {
        let name = url
            .split(['?', '#'])
            .next()
            .and_then(|u| u.rsplit('/').find(|s| !s.is_empty()))
            .unwrap_or(url)
            .to_owned();
        let file = RemoteFile {
            path: name,
            size: None,
            sha256: None,
        };
        Ok(AdapterPlan {
            source: SourceRecord::Http { url: url.clone() },
            resolved_revision: None,
            files: single(file, Origin::Url(url.clone())),
        })
    } else if let Some(path) = &args.source.import_path {
        let files = import_plan(args, path, single)?;
        Ok(AdapterPlan {
            source: SourceRecord::Import {
                dir: path.display().to_string(),
            },
            resolved_revision: None,
            files,
        })
    } else {
        Err(ExitError::new(
            ExitReason::Usage,
            "one of --hf-repo, --http-url or --import-path is required",
        ))
    }
}

/// What to copy from a mounted `path`: the file it names (it ends in `.safetensors`), or the
/// ControlNet folder it is. A path whose kind disagrees with its name is refused, since the
/// operator serves by the name ([`names_one_file`]).
fn import_plan(
    args: &FetchAdapterArgs,
    path: &Path,
    single: impl FnOnce(RemoteFile, Origin) -> Vec<Planned>,
) -> Result<Vec<Planned>, ExitError> {
    let meta = std::fs::metadata(path).map_err(|e| not_found_or_io(path, &e))?;
    if names_one_file(&path.to_string_lossy()) {
        if !meta.is_file() {
            return Err(invalid(
                args,
                format!("{} ends in .safetensors but is not a file", path.display()),
            ));
        }
        let file = RemoteFile {
            path: path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            size: Some(meta.len()),
            sha256: None,
        };
        return Ok(single(file, Origin::File(path.to_path_buf())));
    }
    if args.kind == AdapterKind::Lora {
        return Err(invalid(
            args,
            format!(
                "{} is not a .safetensors file: a LoRA is one file; name it with a path ending \
                 in .safetensors",
                path.display()
            ),
        ));
    }
    if !meta.is_dir() {
        return Err(invalid(
            args,
            format!(
                "{} is neither a .safetensors file nor a ControlNet folder",
                path.display()
            ),
        ));
    }
    let listed: Vec<RemoteFile> = list_dir(path)?
        .into_iter()
        .map(|(rel, full)| RemoteFile {
            size: std::fs::metadata(&full).ok().map(|m| m.len()),
            path: rel,
            sha256: None,
        })
        .collect();
    let name_it = "give the path of its single .safetensors file instead";
    Ok(
        pick_from_folder(args, listed, &path.display().to_string(), name_it)?
            .into_iter()
            .map(|(file, stored_as)| Planned {
                from: Origin::File(path.join(&file.path)),
                file,
                stored_as,
            })
            .collect(),
    )
}

/// Fetches (or confirms) the adapter.
pub async fn run(cmd: &FetchAdapterCommand) -> Result<(), ExitError> {
    let args = &cmd.args;
    let dir = adapter_dir(&args.cache_root, &args.adapter_key);
    if prepare_dir(&dir)? {
        return Ok(());
    }
    let (policy, client) = transfers(&cmd.transfer)?;
    let plan = plan(args, &client, &policy).await?;
    let progress = Arc::new(Progress::default());
    let total: u64 = plan.files.iter().filter_map(|p| p.file.size).sum();
    progress.total.store(total, Ordering::Relaxed);
    tracing::info!(
        adapter = %what(args),
        source = ?plan.source,
        files = plan.files.len(),
        bytes = total,
        dir = %dir.display(),
        "fetching"
    );
    let ticker = tokio::spawn(report_progress(
        progress.clone(),
        Duration::from_secs(cmd.transfer.progress_seconds.max(1)),
    ));
    let mut cached = Vec::with_capacity(plan.files.len());
    let mut fetched = Vec::new();
    for planned in &plan.files {
        let dest = dir.join(&planned.stored_as);
        let result = fetch_file(
            &client,
            &planned.from,
            &planned.file,
            &dest,
            &policy,
            &progress,
        )
        .await
        .map_err(|e| ExitError::new(e.reason, format!("{}: {}", what(args), e.message)));
        let (size, sha256) = match result {
            Ok(done) => done,
            Err(e) => {
                ticker.abort();
                return Err(e);
            }
        };
        fetched.push((planned, dest));
        cached.push(FileRecord {
            path: planned.stored_as.clone(),
            size,
            sha256,
        });
    }
    ticker.abort();
    // Refuse what is not a safetensors file before anything can serve it.
    for (planned, dest) in &fetched {
        check_file(args, &planned.file.path, &planned.stored_as, dest)?;
    }
    cached.sort_by(|x, y| x.path.cmp(&y.path));
    let manifest = CacheManifest {
        source: plan.source,
        revision: args.revision.clone(),
        resolved_revision: plan.resolved_revision,
        variant: args.variant,
        files: cached,
        completed_at: unix_now(),
    };
    write_marker(&manifest, &dir)?;
    tracing::info!(
        adapter = %what(args),
        files = manifest.files.len(),
        served = %args.served_path().display(),
        "adapter cached"
    );
    Ok(())
}

/// Checks one fetched file: a `.safetensors` file's header, a ControlNet's `config.json` as a
/// JSON object. The message names the file as its source calls it.
fn check_file(
    args: &FetchAdapterArgs,
    source_name: &str,
    stored_as: &str,
    dest: &Path,
) -> Result<(), ExitError> {
    if stored_as.ends_with(".safetensors") {
        read_safetensors_header(dest).map_err(|why| {
            invalid(
                args,
                format!("{source_name} is not a valid safetensors file: {why}"),
            )
        })?;
    } else if stored_as == "config.json" {
        let text = std::fs::read(dest).map_err(|e| ExitError::io(dest, &e))?;
        serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&text)
            .map_err(|e| invalid(args, format!("{source_name} is not a JSON object: {e}")))?;
    }
    Ok(())
}
