//! Listing a source: the files of a Hugging Face revision (Hub API), of an HTTP mirror
//! (`sha256sums.txt`), or of a mounted directory, each with the sha256 when known.

use std::path::{Path, PathBuf};

use sd35_contract::ExitReason;

use super::error::ExitError;

/// Name of the manifest of HTTP mirrors (and, optionally, of import directories).
pub const SHA256SUMS: &str = "sha256sums.txt";

/// A file to fetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteFile {
    /// Path in the tree, `/`-separated.
    pub path: String,
    /// Size in bytes, when the source says.
    pub size: Option<u64>,
    /// Expected sha256, when the source says.
    pub sha256: Option<String>,
}

/// Parses `<sha256>  <path>` lines (`sha256sum` output; a `*` before the path marks binary
/// mode and is ignored).
pub fn parse_sha256sums(text: &str) -> Result<Vec<RemoteFile>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (sum, path) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("line {}: expected `<sha256>  <path>`", i + 1))?;
        let path = path.trim_start().trim_start_matches('*');
        let path = path.strip_prefix("./").unwrap_or(path);
        if sum.len() != 64 || !sum.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("line {}: `{sum}` is not a sha256", i + 1));
        }
        if path.is_empty() || path.starts_with('/') || path.split('/').any(|c| c == "..") {
            return Err(format!("line {}: unsafe path `{path}`", i + 1));
        }
        out.push(RemoteFile {
            path: path.to_owned(),
            size: None,
            sha256: Some(sum.to_ascii_lowercase()),
        });
    }
    Ok(out)
}

/// Maps an HTTP status of `url` to the failure a person must act on.
pub fn status_error(status: u16, url: &str) -> ExitError {
    match status {
        401 | 403 => ExitError::new(
            ExitReason::Unauthorized,
            format!(
                "{url}: HTTP {status}: the source refused access (missing or wrong token, or a \
                 gated model whose licence the token's account has not accepted)"
            ),
        ),
        404 => ExitError::new(
            ExitReason::NotFound,
            format!("{url}: HTTP 404: no such repository, revision or file"),
        ),
        _ => ExitError::new(ExitReason::Network, format!("{url}: HTTP {status}")),
    }
}

/// The Hub's answer to `GET /api/models/{repo}/revision/{revision}?blobs=true`.
#[derive(Debug, serde::Deserialize)]
struct HubModelInfo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<HubSibling>,
}

#[derive(Debug, serde::Deserialize)]
struct HubSibling {
    rfilename: String,
    size: Option<u64>,
    lfs: Option<HubLfs>,
}

#[derive(Debug, serde::Deserialize)]
struct HubLfs {
    sha256: Option<String>,
    size: Option<u64>,
}

/// Parses the Hub's model info into the resolved commit and the file list.
pub fn parse_hub_info(body: &[u8]) -> Result<(Option<String>, Vec<RemoteFile>), String> {
    let info: HubModelInfo =
        serde_json::from_slice(body).map_err(|e| format!("unexpected Hub API answer: {e}"))?;
    let files = info
        .siblings
        .into_iter()
        .map(|s| {
            let (sha256, lfs_size) = match s.lfs {
                Some(l) => (l.sha256, l.size),
                None => (None, None),
            };
            RemoteFile {
                path: s.rfilename,
                size: lfs_size.or(s.size),
                sha256,
            }
        })
        .collect();
    Ok((info.sha, files))
}

/// An entry of `GET /api/models/{repo}/tree/{revision}?recursive=true`.
#[derive(Debug, serde::Deserialize)]
struct HubTreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    size: Option<u64>,
    lfs: Option<HubTreeLfs>,
}

#[derive(Debug, serde::Deserialize)]
struct HubTreeLfs {
    oid: Option<String>,
    size: Option<u64>,
}

/// Parses the Hub's tree listing (files only; the LFS oid is the content's sha256).
pub fn parse_hub_tree(body: &[u8]) -> Result<Vec<RemoteFile>, String> {
    let entries: Vec<HubTreeEntry> =
        serde_json::from_slice(body).map_err(|e| format!("unexpected Hub tree answer: {e}"))?;
    Ok(entries
        .into_iter()
        .filter(|e| e.kind == "file")
        .map(|e| {
            let (sha256, lfs_size) = match e.lfs {
                Some(l) => (l.oid, l.size),
                None => (None, None),
            };
            RemoteFile {
                path: e.path,
                size: lfs_size.or(e.size),
                sha256,
            }
        })
        .collect())
}

/// Every file under `dir`, relative and sorted (hidden files skipped).
pub fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>, ExitError> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<(), ExitError> {
        let entries = std::fs::read_dir(dir).map_err(|e| not_found_or_io(dir, &e))?;
        for e in entries {
            let e = e.map_err(|e| ExitError::io(dir, &e))?;
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out)?;
            } else if p.is_file() {
                let rel: Vec<String> = p
                    .strip_prefix(root)
                    .unwrap_or(&p)
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push((rel.join("/"), p));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// A missing import path is a `NotFound`; other errors are classified as filesystem errors.
pub fn not_found_or_io(path: &Path, e: &std::io::Error) -> ExitError {
    if e.kind() == std::io::ErrorKind::NotFound {
        ExitError::new(
            ExitReason::NotFound,
            format!("{} does not exist", path.display()),
        )
    } else {
        ExitError::io(path, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256sums_parse_and_refuse_unsafe_paths() {
        let sum = "a".repeat(64);
        let text = format!("{sum}  model_index.json\n{sum} *./vae/x.safetensors\n\n");
        let files = parse_sha256sums(&text).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[1].path, "vae/x.safetensors");
        assert!(parse_sha256sums(&format!("{sum}  ../etc/passwd")).is_err());
        assert!(
            parse_sha256sums("xyz  a")
                .unwrap_err()
                .contains("not a sha256")
        );
    }

    #[test]
    fn hub_info_takes_lfs_sha256_and_size() {
        let body = br#"{"sha":"abc","siblings":[
            {"rfilename":"model_index.json","size":10},
            {"rfilename":"vae/w.safetensors","size":5,"lfs":{"sha256":"ff","size":99}}]}"#;
        let (sha, files) = parse_hub_info(body).unwrap();
        assert_eq!(sha.as_deref(), Some("abc"));
        assert_eq!(files[0].size, Some(10));
        assert_eq!(files[0].sha256, None);
        assert_eq!(files[1].size, Some(99));
        assert_eq!(files[1].sha256.as_deref(), Some("ff"));
    }

    #[test]
    fn hub_tree_takes_lfs_oids_and_skips_directories() {
        let body = br#"[{"type":"directory","path":"vae","oid":"1"},
            {"type":"file","path":"vae/w.safetensors","size":134,"oid":"2",
             "lfs":{"oid":"abcd","size":5000,"pointerSize":134}}]"#;
        let files = parse_hub_tree(body).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].size, Some(5000));
        assert_eq!(files[0].sha256.as_deref(), Some("abcd"));
    }

    #[test]
    fn statuses_map_to_reasons() {
        assert_eq!(status_error(401, "u").reason, ExitReason::Unauthorized);
        assert_eq!(status_error(403, "u").reason, ExitReason::Unauthorized);
        assert_eq!(status_error(404, "u").reason, ExitReason::NotFound);
        assert_eq!(status_error(503, "u").reason, ExitReason::Network);
    }
}
