//! Command lines of `sd35-server fetch`, `build-engine` and `serve` as the operator sets them.
//!
//! The server flattens these structs into its own commands; the operator renders them with
//! `to_args`. Every flag also reads an `SD35_*` environment variable, for people running the
//! server by hand.

use std::path::PathBuf;

use clap::Args;

use crate::layout::CACHE_MOUNT;
use crate::model::{DeviceKind, Precision, Variant};

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
    pub precision: Precision,

    /// The variant the engine serves, recorded in `engine.json` (unset: the variant the
    /// cache was fetched as).
    #[arg(long, env = "SD35_VARIANT")]
    pub variant: Option<Variant>,
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
}

fn push(args: &mut Vec<String>, flag: &str, value: impl std::fmt::Display) {
    args.push(format!("--{flag}={value}"));
}

fn push_opt<T: std::fmt::Display>(args: &mut Vec<String>, flag: &str, value: Option<T>) {
    if let Some(v) = value {
        push(args, flag, v);
    }
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

    #[test]
    fn build_engine_command_line_parses_back() {
        for (precision, variant) in [
            (Precision::Bf16, Some(Variant::Medium)),
            (Precision::Fp8, None),
        ] {
            let args = BuildEngineArgs {
                cache_root: "/cache".into(),
                cache_key: "c".into(),
                engine_key: "e".into(),
                precision,
                variant,
            };
            match parse("build-engine", args.to_args()) {
                Command::BuildEngine(parsed) => assert_eq!(parsed, args),
                other => panic!("parsed as {other:?}"),
            }
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
            ..full.clone()
        };
        for args in [full, bare] {
            match parse("serve", args.to_args()) {
                Command::Serve(parsed) => assert_eq!(parsed, args),
                other => panic!("parsed as {other:?}"),
            }
        }
    }
}
