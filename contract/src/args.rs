//! Command lines of `sd35-server fetch`, `fetch-adapter`, `build-engine` and `serve` as the
//! operator sets them.
//!
//! The server flattens these structs into its own commands; the operator renders them with
//! `to_args`. Every flag but the repeatable adapter flags of `serve` (`--lora`,
//! `--controlnet`) also reads an `SD35_*` environment variable, for people running the server
//! by hand.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::Args;

use crate::EnginePrecision;
use crate::layout::{CACHE_MOUNT, adapter_path, names_one_file};
use crate::model::{AdapterKind, ControlMode, DeviceKind, Precision, S3UrlStyle, Variant};

/// Where `fetch` gets the model from: exactly one of the three.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
#[group(required = true, multiple = false)]
pub struct SourceArgs {
    /// Hugging Face repository id, `owner/name`.
    #[arg(long, env = "SD35_HF_REPO", group = "source")]
    pub hf_repo: Option<String>,

    /// Plain HTTP(S) mirror of a repository's file tree with a `sha256sums.txt`.
    #[arg(long, env = "SD35_HTTP_URL", group = "source")]
    pub http_url: Option<String>,

    /// Directory holding a model already (a mounted volume), imported by copying.
    #[arg(long, env = "SD35_IMPORT_DIR", group = "source")]
    pub import_dir: Option<PathBuf>,
}

/// `sd35-server fetch`: download or import a model into the cache, verified and resumable.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct FetchArgs {
    #[command(flatten)]
    pub source: SourceArgs,

    /// Branch, tag or commit of a Hugging Face repository.
    #[arg(long, env = "SD35_REVISION", default_value = "main")]
    pub revision: String,

    /// Hugging Face endpoint, for mirrors and proxies.
    #[arg(
        long,
        env = "SD35_HF_ENDPOINT",
        default_value = "https://huggingface.co"
    )]
    pub hf_endpoint: String,

    /// The variant, which decides the files a repository must provide.
    #[arg(long, env = "SD35_VARIANT")]
    pub variant: Variant,

    /// Root of the cache volume.
    #[arg(long, env = "SD35_CACHE_ROOT", default_value = CACHE_MOUNT)]
    pub cache_root: PathBuf,

    /// Cache key; the model goes to `<cache-root>/models/<cache-key>`.
    #[arg(long, env = "SD35_CACHE_KEY")]
    pub cache_key: String,

    /// File that receives the one-line cause when the fetch fails (a container's termination
    /// message: `/dev/termination-log` in Kubernetes).
    #[arg(long, env = "SD35_TERMINATION_MESSAGE_PATH")]
    pub termination_message_path: Option<PathBuf>,
}

/// Where `fetch-adapter` gets an adapter from: exactly one of the three.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
#[group(required = true, multiple = false)]
pub struct AdapterSourceArgs {
    /// Hugging Face repository id, `owner/name`.
    #[arg(long, env = "SD35_HF_REPO")]
    pub hf_repo: Option<String>,

    /// One file over HTTP(S), checked against `--sha256`.
    #[arg(long, env = "SD35_HTTP_URL", requires = "sha256")]
    pub http_url: Option<String>,

    /// A file (ending in `.safetensors`) or a ControlNet's diffusers folder on a mounted
    /// volume, imported by copying.
    #[arg(long, env = "SD35_IMPORT_PATH")]
    pub import_path: Option<PathBuf>,
}

/// `sd35-server fetch-adapter`: download or import one LoRA or ControlNet into
/// `<cache-root>/adapters/<adapter-key>`, verified and resumable, beside the models.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct FetchAdapterArgs {
    /// What it is: `lora` or `controlnet`.
    #[arg(long, env = "SD35_ADAPTER_KIND")]
    pub kind: AdapterKind,

    /// The name it is served under (a ControlNet's mode), for messages and its manifest.
    #[arg(long, env = "SD35_ADAPTER_NAME")]
    pub name: String,

    #[command(flatten)]
    pub source: AdapterSourceArgs,

    /// The file's path in the Hugging Face repository. Unset: a LoRA is the repository's one
    /// `.safetensors` file at its root, a ControlNet its root folder in diffusers' layout
    /// (`config.json` and the weights).
    #[arg(long, env = "SD35_HF_FILE", conflicts_with_all = ["http_url", "import_path"])]
    pub hf_file: Option<String>,

    /// Branch, tag or commit of a Hugging Face repository.
    #[arg(long, env = "SD35_REVISION", default_value = "main")]
    pub revision: String,

    /// Hugging Face endpoint, for mirrors and proxies.
    #[arg(
        long,
        env = "SD35_HF_ENDPOINT",
        default_value = "https://huggingface.co"
    )]
    pub hf_endpoint: String,

    /// Lower-case hex sha256 the file must have (required with `--http-url`; checked for any
    /// single-file source when given).
    #[arg(long, env = "SD35_SHA256")]
    pub sha256: Option<String>,

    /// The variant the adapter serves with, recorded in its manifest.
    #[arg(long, env = "SD35_VARIANT")]
    pub variant: Variant,

    /// Root of the cache volume.
    #[arg(long, env = "SD35_CACHE_ROOT", default_value = CACHE_MOUNT)]
    pub cache_root: PathBuf,

    /// Adapter key; the adapter goes to `<cache-root>/adapters/<adapter-key>`.
    #[arg(long, env = "SD35_ADAPTER_KEY")]
    pub adapter_key: String,

    /// File that receives the one-line cause when the fetch fails (a container's termination
    /// message: `/dev/termination-log` in Kubernetes).
    #[arg(long, env = "SD35_TERMINATION_MESSAGE_PATH")]
    pub termination_message_path: Option<PathBuf>,
}

impl FetchAdapterArgs {
    /// Whether the adapter is cached as one file ([`crate::ADAPTER_FILE`]) rather than a
    /// folder: every LoRA, and a ControlNet its source names as one file (an `--hf-file`, an
    /// `--http-url`, an `--import-path` ending in `.safetensors`).
    pub fn single_file(&self) -> bool {
        self.kind == AdapterKind::Lora
            || self.hf_file.is_some()
            || self.source.http_url.is_some()
            || self
                .source
                .import_path
                .as_deref()
                .is_some_and(|p| names_one_file(&p.to_string_lossy()))
    }

    /// What a server loads once it is cached: the `PATH` of its `--lora` or `--controlnet`.
    pub fn served_path(&self) -> PathBuf {
        adapter_path(&self.cache_root, &self.adapter_key, self.single_file())
    }
}

/// `sd35-server build-engine`: convert a cached model into the serving layout of a precision.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct BuildEngineArgs {
    /// Root of the cache volume.
    #[arg(long, env = "SD35_CACHE_ROOT", default_value = CACHE_MOUNT)]
    pub cache_root: PathBuf,

    /// Cache key of the model to convert.
    #[arg(long, env = "SD35_CACHE_KEY")]
    pub cache_key: String,

    /// Engine key; the engine goes to `<cache-root>/engines/<engine-key>`.
    #[arg(long, env = "SD35_ENGINE_KEY")]
    pub engine_key: String,

    /// Precision of the engine: bf16 or fp8.
    #[arg(long, env = "SD35_PRECISION")]
    pub precision: EnginePrecision,

    /// The variant the engine serves, recorded in `engine.json` (unset: the variant the
    /// cache was fetched as).
    #[arg(long, env = "SD35_VARIANT")]
    pub variant: Option<Variant>,

    /// File that receives the one-line cause when the build fails (a container's termination
    /// message: `/dev/termination-log` in Kubernetes).
    #[arg(long, env = "SD35_TERMINATION_MESSAGE_PATH")]
    pub termination_message_path: Option<PathBuf>,
}

/// The longest lifetime of an artifact URL: S3 presigned URLs live at most 7 days.
pub const MAX_ARTIFACT_URL_SECONDS: u32 = 7 * 24 * 3600;

/// Where `serve` stores the images it is asked to store (`response_format: "url"`, or
/// `store` on `/v1/txt2img`). Neither a directory nor a bucket: images are only returned
/// inline. The S3 credentials never go on the command line: `AWS_ACCESS_KEY_ID` and
/// `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`) come from the environment.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct ArtifactArgs {
    /// Store images in this directory; the server serves them back itself on signed URLs
    /// that expire (`GET /v1/artifacts/<name>`).
    #[arg(
        long,
        env = "SD35_ARTIFACTS_DIR",
        conflicts_with = "artifacts_s3_bucket"
    )]
    pub artifacts_dir: Option<PathBuf>,

    /// Store images in this bucket of an S3-compatible object store and hand out presigned
    /// GET URLs.
    #[arg(long, env = "SD35_ARTIFACTS_S3_BUCKET")]
    pub artifacts_s3_bucket: Option<String>,

    /// The S3 endpoint, `http(s)://host[:port]` (unset: AWS's endpoint of the region).
    #[arg(
        long,
        env = "SD35_ARTIFACTS_S3_ENDPOINT",
        requires = "artifacts_s3_bucket"
    )]
    pub artifacts_s3_endpoint: Option<String>,

    /// The bucket's region (part of every signature).
    #[arg(long, env = "SD35_ARTIFACTS_S3_REGION", default_value = "us-east-1")]
    pub artifacts_s3_region: String,

    /// Prepended to every object key, for example `sd35/`.
    #[arg(long, env = "SD35_ARTIFACTS_S3_PREFIX", default_value = "")]
    pub artifacts_s3_prefix: String,

    /// How the endpoint addresses the bucket: `path` (`<endpoint>/<bucket>/<key>`) or
    /// `virtual-host` (`<bucket>.<endpoint host>/<key>`).
    #[arg(long, env = "SD35_ARTIFACTS_S3_URL_STYLE", value_enum, default_value_t = S3UrlStyle::Path)]
    pub artifacts_s3_url_style: S3UrlStyle,

    /// Seconds an artifact URL stays valid (at most 7 days, S3's limit for presigned URLs).
    #[arg(long, env = "SD35_ARTIFACTS_URL_SECONDS", default_value_t = 3600,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_ARTIFACT_URL_SECONDS)))]
    pub artifacts_url_seconds: u32,
}

/// What the command line gives when no artifact flag is set: no storage.
impl Default for ArtifactArgs {
    fn default() -> Self {
        Self {
            artifacts_dir: None,
            artifacts_s3_bucket: None,
            artifacts_s3_endpoint: None,
            artifacts_s3_region: "us-east-1".to_owned(),
            artifacts_s3_prefix: String::new(),
            artifacts_s3_url_style: S3UrlStyle::Path,
            artifacts_url_seconds: 3600,
        }
    }
}

impl ArtifactArgs {
    /// Whether any storage is configured.
    pub fn enabled(&self) -> bool {
        self.artifacts_dir.is_some() || self.artifacts_s3_bucket.is_some()
    }

    fn push_args(&self, a: &mut Vec<String>) {
        let defaults = Self::default();
        push_opt(
            a,
            "artifacts-dir",
            self.artifacts_dir.as_ref().map(|p| p.display()),
        );
        push_opt(a, "artifacts-s3-bucket", self.artifacts_s3_bucket.as_ref());
        push_opt(
            a,
            "artifacts-s3-endpoint",
            self.artifacts_s3_endpoint.as_ref(),
        );
        if self.artifacts_s3_region != defaults.artifacts_s3_region {
            push(a, "artifacts-s3-region", &self.artifacts_s3_region);
        }
        if self.artifacts_s3_prefix != defaults.artifacts_s3_prefix {
            push(a, "artifacts-s3-prefix", &self.artifacts_s3_prefix);
        }
        if self.artifacts_s3_url_style != defaults.artifacts_s3_url_style {
            push(a, "artifacts-s3-url-style", self.artifacts_s3_url_style);
        }
        if self.artifacts_url_seconds != defaults.artifacts_url_seconds {
            push(a, "artifacts-url-seconds", self.artifacts_url_seconds);
        }
    }
}

/// Whether `name` may name an adapter: 1 to 63 lower-case letters, digits, `-`, `_` and `.`,
/// starting and ending with a letter or digit (the SD35Deployment's rule, so no name holds the
/// `:` and `=` of `--lora`, nor anything a prompt's `<lora:name:0.8>` cannot spell).
pub fn is_adapter_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let edge = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    (1..=63).contains(&bytes.len())
        && bytes.first().is_some_and(edge)
        && bytes.last().is_some_and(edge)
        && bytes.iter().all(|b| edge(b) || b"-_.".contains(b))
}

/// A LoRA `serve` loads: `--lora NAME[:SCALE]=PATH`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraArg {
    /// The name requests ask for it by ([`is_adapter_name`]).
    pub name: String,
    /// The scale a request that names it without one gets; unset: 1.0.
    pub scale: Option<f64>,
    /// Its safetensors file.
    pub path: PathBuf,
}

impl FromStr for LoraArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (head, path) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}`: expected NAME[:SCALE]=PATH"))?;
        let (name, scale) = match head.split_once(':') {
            Some((name, scale)) => {
                let scale: f64 = scale
                    .parse()
                    .ok()
                    .filter(|v: &f64| v.is_finite())
                    .ok_or_else(|| format!("`{s}`: the scale `{scale}` is not a number"))?;
                (name, Some(scale))
            }
            None => (head, None),
        };
        if !is_adapter_name(name) {
            return Err(format!(
                "`{s}`: `{name}` is not an adapter name (1 to 63 of a-z 0-9 - _ ., starting and \
                 ending with a letter or digit)"
            ));
        }
        if path.is_empty() {
            return Err(format!("`{s}`: the path is empty"));
        }
        Ok(Self {
            name: name.to_owned(),
            scale,
            path: path.into(),
        })
    }
}

impl fmt::Display for LoraArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if let Some(scale) = self.scale {
            write!(f, ":{scale}")?;
        }
        write!(f, "={}", self.path.display())
    }
}

/// A ControlNet `serve` loads: `--controlnet MODE=PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlNetArg {
    /// The mode requests ask for (`control.mode`).
    pub mode: ControlMode,
    /// A diffusers folder (`config.json` and its weights) or one safetensors file.
    pub path: PathBuf,
}

impl FromStr for ControlNetArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mode, path) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}`: expected MODE=PATH"))?;
        let mode = mode.parse().map_err(|e| format!("`{s}`: {e}"))?;
        if path.is_empty() {
            return Err(format!("`{s}`: the path is empty"));
        }
        Ok(Self {
            mode,
            path: path.into(),
        })
    }
}

impl fmt::Display for ControlNetArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.mode, self.path.display())
    }
}

/// `sd35-server serve`: the flags the operator sets on serving pods.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct ServeArgs {
    /// Model directory (diffusers layout, single-file layout, or a cache model directory).
    #[arg(long, env = "SD35_MODEL")]
    pub model: PathBuf,

    /// Prebuilt engine directory; without it the model's weights are served as they are.
    #[arg(long, env = "SD35_ENGINE")]
    pub engine: Option<PathBuf>,

    /// Where the model runs: `auto` (CUDA when this binary has it and a GPU is usable, else
    /// the CPU with a warning), `cuda` (no usable GPU is a start-up error) or `cpu`.
    #[arg(long, env = "SD35_DEVICE", value_enum, default_value_t = DeviceKind::Auto)]
    pub device: DeviceKind,

    /// The variant served (decides the sampling defaults). With `--engine` it must match the
    /// engine's; unset, it comes from the engine, the cache marker or the model's structure.
    #[arg(long, env = "SD35_VARIANT")]
    pub variant: Option<Variant>,

    /// Weight precision: f32, bf16 or fp8. With `--engine` it must match the engine's; unset,
    /// the engine's, else bf16 on CUDA and f32 on the CPU.
    #[arg(long, env = "SD35_PRECISION")]
    pub precision: Option<Precision>,

    /// A model name clients may send as OpenAI's `model` (repeatable); `/v1/models` lists
    /// them, the first as the primary id. Unset: the variant's default names.
    #[arg(
        long = "served-model-name",
        env = "SD35_SERVED_MODEL_NAMES",
        value_delimiter = ','
    )]
    pub served_model_names: Vec<String>,

    /// File that receives a one-line reason when start-up fails (a container's termination
    /// message: `/dev/termination-log` in Kubernetes).
    #[arg(long, env = "SD35_TERMINATION_MESSAGE_PATH")]
    pub termination_message_path: Option<PathBuf>,

    /// Address to listen on.
    #[arg(long, env = "SD35_HOST", default_value = "0.0.0.0")]
    pub host: String,

    /// Port to listen on.
    #[arg(long, env = "SD35_PORT", default_value_t = 8080)]
    pub port: u16,

    /// Do not load the T5-XXL text encoder.
    #[arg(long, env = "SD35_NO_T5")]
    pub no_t5: bool,

    /// Maximum T5 prompt length in tokens.
    #[arg(long, env = "SD35_T5_MAX_TOKENS", default_value_t = 256)]
    pub t5_max_tokens: u32,

    /// Default sampling steps (unset: the variant's model card).
    #[arg(long, env = "SD35_DEFAULT_STEPS")]
    pub default_steps: Option<u32>,

    /// Default guidance scale (unset: the variant's model card).
    #[arg(long, env = "SD35_DEFAULT_GUIDANCE")]
    pub default_guidance: Option<f64>,

    /// Default image width.
    #[arg(long, env = "SD35_DEFAULT_WIDTH")]
    pub default_width: Option<u32>,

    /// Default image height.
    #[arg(long, env = "SD35_DEFAULT_HEIGHT")]
    pub default_height: Option<u32>,

    /// Requests that may wait for the model before new ones get 429.
    #[arg(long, env = "SD35_QUEUE_SIZE", default_value_t = 16)]
    pub queue_size: u32,

    /// Requests of the same shape generated together.
    #[arg(long, env = "SD35_MAX_BATCH_SIZE", default_value_t = 1)]
    pub max_batch_size: u32,

    /// Seconds a request may wait and run in all.
    #[arg(long, env = "SD35_REQUEST_TIMEOUT_SECONDS", default_value_t = 300)]
    pub request_timeout_seconds: u32,

    /// File with accepted bearer tokens, one per line; unset turns auth off.
    #[arg(long, env = "SD35_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// Where generated images are stored when a client asks for URLs.
    #[command(flatten)]
    pub artifacts: ArtifactArgs,

    /// A LoRA served beside the model, `NAME[:SCALE]=PATH` (repeatable): requests ask for it
    /// by NAME, SCALE (default 1.0) is the scale a request that gives none gets, PATH its
    /// safetensors file.
    #[arg(long = "lora", value_name = "NAME[:SCALE]=PATH")]
    pub loras: Vec<LoraArg>,

    /// An SD3.5 ControlNet served beside the model, `MODE=PATH` (repeatable, one per mode):
    /// MODE is canny, depth or blur, PATH a diffusers folder or one safetensors file.
    #[arg(long = "controlnet", value_name = "MODE=PATH")]
    pub controlnets: Vec<ControlNetArg>,
}

fn push(args: &mut Vec<String>, flag: &str, value: impl std::fmt::Display) {
    args.push(format!("--{flag}={value}"));
}

fn push_opt<T: std::fmt::Display>(args: &mut Vec<String>, flag: &str, value: Option<T>) {
    if let Some(v) = value {
        push(args, flag, v);
    }
}

fn push_termination_message_path(args: &mut Vec<String>, path: Option<&std::path::Path>) {
    push_opt(
        args,
        "termination-message-path",
        path.map(std::path::Path::display),
    );
}

impl FetchArgs {
    /// The command line after `sd35-server fetch`.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        push_opt(&mut a, "hf-repo", self.source.hf_repo.as_ref());
        push_opt(&mut a, "http-url", self.source.http_url.as_ref());
        push_opt(
            &mut a,
            "import-dir",
            self.source.import_dir.as_ref().map(|p| p.display()),
        );
        push(&mut a, "revision", &self.revision);
        push(&mut a, "hf-endpoint", &self.hf_endpoint);
        push(&mut a, "variant", self.variant.as_str());
        push(&mut a, "cache-root", self.cache_root.display());
        push(&mut a, "cache-key", &self.cache_key);
        push_termination_message_path(&mut a, self.termination_message_path.as_deref());
        a
    }
}

impl FetchAdapterArgs {
    /// The command line after `sd35-server fetch-adapter`.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        push(&mut a, "kind", self.kind);
        push(&mut a, "name", &self.name);
        push_opt(&mut a, "hf-repo", self.source.hf_repo.as_ref());
        push_opt(&mut a, "http-url", self.source.http_url.as_ref());
        push_opt(
            &mut a,
            "import-path",
            self.source.import_path.as_deref().map(Path::display),
        );
        push_opt(&mut a, "hf-file", self.hf_file.as_ref());
        push(&mut a, "revision", &self.revision);
        push(&mut a, "hf-endpoint", &self.hf_endpoint);
        push_opt(&mut a, "sha256", self.sha256.as_ref());
        push(&mut a, "variant", self.variant);
        push(&mut a, "cache-root", self.cache_root.display());
        push(&mut a, "adapter-key", &self.adapter_key);
        push_termination_message_path(&mut a, self.termination_message_path.as_deref());
        a
    }
}

impl BuildEngineArgs {
    /// The command line after `sd35-server build-engine`.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        push(&mut a, "cache-root", self.cache_root.display());
        push(&mut a, "cache-key", &self.cache_key);
        push(&mut a, "engine-key", &self.engine_key);
        push(&mut a, "precision", self.precision.as_str());
        push_opt(&mut a, "variant", self.variant.map(Variant::as_str));
        push_termination_message_path(&mut a, self.termination_message_path.as_deref());
        a
    }
}

impl ServeArgs {
    /// The command line after `sd35-server serve`.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        push(&mut a, "model", self.model.display());
        push_opt(&mut a, "engine", self.engine.as_ref().map(|p| p.display()));
        push(&mut a, "device", self.device.as_str());
        push_opt(&mut a, "variant", self.variant.map(Variant::as_str));
        push_opt(&mut a, "precision", self.precision.map(Precision::as_str));
        for name in &self.served_model_names {
            push(&mut a, "served-model-name", name);
        }
        push_opt(
            &mut a,
            "termination-message-path",
            self.termination_message_path.as_ref().map(|p| p.display()),
        );
        push(&mut a, "host", &self.host);
        push(&mut a, "port", self.port);
        if self.no_t5 {
            a.push("--no-t5".to_owned());
        }
        push(&mut a, "t5-max-tokens", self.t5_max_tokens);
        push_opt(&mut a, "default-steps", self.default_steps);
        push_opt(&mut a, "default-guidance", self.default_guidance);
        push_opt(&mut a, "default-width", self.default_width);
        push_opt(&mut a, "default-height", self.default_height);
        push(&mut a, "queue-size", self.queue_size);
        push(&mut a, "max-batch-size", self.max_batch_size);
        push(
            &mut a,
            "request-timeout-seconds",
            self.request_timeout_seconds,
        );
        push_opt(
            &mut a,
            "auth-token-file",
            self.auth_token_file.as_ref().map(|p| p.display()),
        );
        self.artifacts.push_args(&mut a);
        for lora in &self.loras {
            push(&mut a, "lora", lora);
        }
        for controlnet in &self.controlnets {
            push(&mut a, "controlnet", controlnet);
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use clap::{Parser, Subcommand};

    use super::*;

    /// The shape of `sd35-server`'s command line, for the round trip.
    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Subcommand, Debug)]
    enum Command {
        Fetch(FetchArgs),
        FetchAdapter(FetchAdapterArgs),
        BuildEngine(BuildEngineArgs),
        Serve(ServeArgs),
    }

    fn parse(sub: &str, args: Vec<String>) -> Command {
        let argv = ["sd35-server".to_owned(), sub.to_owned()]
            .into_iter()
            .chain(args);
        Cli::try_parse_from(argv)
            .unwrap_or_else(|e| panic!("{e}"))
            .command
    }

    fn fetch(source: SourceArgs) -> FetchArgs {
        FetchArgs {
            source,
            revision: "0123abcd".into(),
            hf_endpoint: "https://hub.example:8443/mirror".into(),
            variant: Variant::LargeTurbo,
            cache_root: "/cache".into(),
            cache_key: "k1".into(),
            termination_message_path: Some("/dev/termination-log".into()),
        }
    }

    #[test]
    fn fetch_command_lines_parse_back_for_every_source() {
        let sources = [
            SourceArgs {
                hf_repo: Some("stabilityai/stable-diffusion-3.5-large".into()),
                http_url: None,
                import_dir: None,
            },
            SourceArgs {
                hf_repo: None,
                http_url: Some("https://m.example/a b/?x=1".into()),
                import_dir: None,
            },
            SourceArgs {
                hf_repo: None,
                http_url: None,
                import_dir: Some("/import/some dir".into()),
            },
        ];
        for source in sources {
            let args = fetch(source);
            match parse("fetch", args.to_args()) {
                Command::Fetch(parsed) => assert_eq!(parsed, args),
                other => panic!("parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn fetch_refuses_two_sources() {
        let mut args = fetch(SourceArgs {
            hf_repo: Some("a/b".into()),
            http_url: None,
            import_dir: None,
        })
        .to_args();
        args.push("--http-url=https://x.example/".into());
        let argv = ["sd35-server".to_owned(), "fetch".to_owned()]
            .into_iter()
            .chain(args);
        let err = Cli::try_parse_from(argv).expect_err("two sources must be refused");
        assert!(err.to_string().contains("cannot be used with"), "{err}");
    }

    fn adapter(kind: AdapterKind, source: AdapterSourceArgs) -> FetchAdapterArgs {
        FetchAdapterArgs {
            kind,
            name: "detail-v1.2".into(),
            source,
            hf_file: None,
            revision: "main".into(),
            hf_endpoint: "https://huggingface.co".into(),
            sha256: None,
            variant: Variant::Large,
            cache_root: "/cache".into(),
            adapter_key: "a1".into(),
            termination_message_path: Some("/dev/termination-log".into()),
        }
    }

    fn no_adapter_source() -> AdapterSourceArgs {
        AdapterSourceArgs {
            hf_repo: None,
            http_url: None,
            import_path: None,
        }
    }

    #[test]
    fn fetch_adapter_command_lines_parse_back_for_every_source() {
        let hub = FetchAdapterArgs {
            hf_file: Some("loras/detail v1.safetensors".into()),
            revision: "0123abcd".into(),
            hf_endpoint: "https://hub.example:8443/mirror".into(),
            ..adapter(
                AdapterKind::Lora,
                AdapterSourceArgs {
                    hf_repo: Some("someone/sd35-loras".into()),
                    ..no_adapter_source()
                },
            )
        };
        let http = FetchAdapterArgs {
            sha256: Some("ab".repeat(32)),
            ..adapter(
                AdapterKind::Controlnet,
                AdapterSourceArgs {
                    http_url: Some("https://m.example/canny.safetensors?x=1".into()),
                    ..no_adapter_source()
                },
            )
        };
        let folder = adapter(
            AdapterKind::Controlnet,
            AdapterSourceArgs {
                import_path: Some("/import/controlnets/depth".into()),
                ..no_adapter_source()
            },
        );
        for args in [&hub, &http, &folder] {
            match parse("fetch-adapter", args.to_args()) {
                Command::FetchAdapter(parsed) => assert_eq!(&parsed, args),
                other => panic!("parsed as {other:?}"),
            }
        }
        // Where each is served from: a LoRA and a ControlNet named as one file are the
        // adapter file; a ControlNet folder is the directory.
        assert_eq!(
            hub.served_path(),
            Path::new("/cache/adapters/a1/adapter.safetensors")
        );
        assert!(http.single_file());
        assert_eq!(folder.served_path(), Path::new("/cache/adapters/a1"));
        let hub_folder = FetchAdapterArgs {
            hf_file: None,
            kind: AdapterKind::Controlnet,
            ..hub.clone()
        };
        assert!(!hub_folder.single_file());
        assert!(
            FetchAdapterArgs {
                hf_file: None,
                ..hub
            }
            .single_file(),
            "a LoRA is always one file"
        );
    }

    #[test]
    fn fetch_adapter_refuses_a_url_without_its_sha256_and_a_file_without_a_repository() {
        let base = [
            "sd35-server",
            "fetch-adapter",
            "--kind=lora",
            "--name=a",
            "--variant=large",
            "--adapter-key=k",
        ];
        for (extra, why) in [
            (
                &["--http-url=https://m.example/a.safetensors"][..],
                "sha256",
            ),
            (
                &["--import-path=/i/a.safetensors", "--hf-file=a.safetensors"][..],
                "cannot be used with",
            ),
            (&["--hf-file=a.safetensors"][..], "--hf-repo"),
            (
                &["--hf-repo=a/b", "--import-path=/i/a.safetensors"][..],
                "cannot be used with",
            ),
        ] {
            let argv = base.iter().chain(extra).copied();
            let err = Cli::try_parse_from(argv).expect_err("refused");
            assert!(err.to_string().contains(why), "{extra:?}: {err}");
        }
    }

    #[test]
    fn adapter_flags_parse_and_refuse_what_a_server_cannot_serve() {
        let lora: LoraArg = "detail:0.75=/cache/adapters/a1/adapter.safetensors"
            .parse()
            .unwrap();
        assert_eq!(
            lora,
            LoraArg {
                name: "detail".into(),
                scale: Some(0.75),
                path: "/cache/adapters/a1/adapter.safetensors".into()
            }
        );
        // The first `=` ends the name: a path may hold `=` and `:`.
        let odd: LoraArg = "x=/m/a=b:c.safetensors".parse().unwrap();
        assert_eq!(
            (odd.scale, odd.path.as_path()),
            (None, Path::new("/m/a=b:c.safetensors"))
        );
        assert_eq!(odd.to_string().parse::<LoraArg>(), Ok(odd));
        for bad in [
            "detail",
            "Detail=/a",
            "-x=/a",
            "x:much=/a",
            "x:inf=/a",
            "x=",
            &format!("{}=/a", "a".repeat(64)),
        ] {
            assert!(bad.parse::<LoraArg>().is_err(), "{bad} was accepted");
        }
        let canny: ControlNetArg = "canny=/cache/adapters/c1".parse().unwrap();
        assert_eq!(canny.mode, ControlMode::Canny);
        let err = "pose=/a".parse::<ControlNetArg>().unwrap_err();
        assert!(err.contains("canny, depth, blur"), "{err}");
        assert!(is_adapter_name("my_style.v2") && !is_adapter_name("a:b"));
    }

    #[test]
    fn build_engine_command_line_parses_back() {
        for (precision, variant, termination_message_path) in [
            (
                EnginePrecision::Bf16,
                Some(Variant::Medium),
                Some("/dev/termination-log".into()),
            ),
            (EnginePrecision::Fp8, None, None),
        ] {
            let args = BuildEngineArgs {
                cache_root: "/cache".into(),
                cache_key: "c".into(),
                engine_key: "e".into(),
                precision,
                variant,
                termination_message_path,
            };
            match parse("build-engine", args.to_args()) {
                Command::BuildEngine(parsed) => assert_eq!(parsed, args),
                other => panic!("parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn serve_refuses_two_artifact_stores_and_an_endpoint_without_a_bucket() {
        let base = ["sd35-server", "serve", "--model=/m"];
        for extra in [
            &["--artifacts-dir=/a", "--artifacts-s3-bucket=b"][..],
            &["--artifacts-s3-endpoint=http://s3.example"][..],
            &["--artifacts-dir=/a", "--artifacts-url-seconds=604801"][..],
        ] {
            let argv = base.iter().chain(extra).copied();
            assert!(Cli::try_parse_from(argv).is_err(), "{extra:?} was accepted");
        }
    }

    #[test]
    fn serve_command_lines_parse_back_with_and_without_options() {
        let full = ServeArgs {
            model: "/cache/models/c".into(),
            engine: Some("/cache/engines/e".into()),
            device: DeviceKind::Cuda,
            variant: Some(Variant::LargeTurbo),
            precision: Some(Precision::Fp8),
            served_model_names: vec![
                "tiny".into(),
                "stabilityai/stable-diffusion-3.5-large-turbo".into(),
                "sd3.5".into(),
            ],
            termination_message_path: Some("/dev/termination-log".into()),
            host: "0.0.0.0".into(),
            port: 9000,
            no_t5: true,
            t5_max_tokens: 512,
            default_steps: Some(4),
            default_guidance: Some(0.5),
            default_width: Some(768),
            default_height: Some(1344),
            queue_size: 64,
            max_batch_size: 4,
            request_timeout_seconds: 30,
            auth_token_file: Some("/etc/sd35/auth/tokens".into()),
            artifacts: ArtifactArgs {
                artifacts_dir: None,
                artifacts_s3_bucket: Some("images".into()),
                artifacts_s3_endpoint: Some("http://s3.example:9000".into()),
                artifacts_s3_region: "eu-west-1".into(),
                artifacts_s3_prefix: "sd35/".into(),
                artifacts_s3_url_style: S3UrlStyle::VirtualHost,
                artifacts_url_seconds: 600,
            },
            loras: vec![
                LoraArg {
                    name: "detail".into(),
                    scale: None,
                    path: "/cache/adapters/a1/adapter.safetensors".into(),
                },
                LoraArg {
                    name: "style.v2".into(),
                    scale: Some(-0.5),
                    path: "/cache/adapters/a2/adapter.safetensors".into(),
                },
            ],
            controlnets: vec![
                ControlNetArg {
                    mode: ControlMode::Canny,
                    path: "/cache/adapters/c1/adapter.safetensors".into(),
                },
                ControlNetArg {
                    mode: ControlMode::Depth,
                    path: "/cache/adapters/c2".into(),
                },
            ],
        };
        let local = ServeArgs {
            artifacts: ArtifactArgs {
                artifacts_dir: Some("/tmp/artifacts".into()),
                ..ArtifactArgs::default()
            },
            ..full.clone()
        };
        let bare = ServeArgs {
            engine: None,
            device: DeviceKind::Auto,
            variant: None,
            precision: None,
            served_model_names: Vec::new(),
            termination_message_path: None,
            no_t5: false,
            default_steps: None,
            default_guidance: None,
            default_width: None,
            default_height: None,
            auth_token_file: None,
            artifacts: ArtifactArgs::default(),
            loras: Vec::new(),
            controlnets: Vec::new(),
            ..full.clone()
        };
        assert!(!bare.artifacts.enabled() && local.artifacts.enabled());
        // The default is what the command line gives without artifact flags.
        assert_eq!(
            bare.to_args()
                .iter()
                .filter(|a| a.contains("artifacts"))
                .count(),
            0
        );
        for args in [full, local, bare] {
            match parse("serve", args.to_args()) {
                Command::Serve(parsed) => assert_eq!(parsed, args),
                other => panic!("parsed as {other:?}"),
            }
        }
    }
}
