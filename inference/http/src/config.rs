//! The one configuration struct of `sd35-server serve`: the operator's contract flags
//! ([`ServeArgs`], unchanged) plus the server's own operational flags.

use sd35_contract::ServeArgs;

/// A byte count: digits with an optional K, M, G or T suffix (powers of 1024).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("`{text}`: the suffix must be K, M, G or T")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a byte count (e.g. 40G or 42949672960)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything `sd35-server serve` is configured by, from flags or `SD35_*` variables.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// The flags the operator sets on serving pods.
    #[command(flatten)]
    pub args: ServeArgs,

    /// Log line format.
    #[arg(long, env = "SD35_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log prompts (off by default: prompts may carry personal data).
    #[arg(long, env = "SD35_LOG_PROMPTS")]
    pub log_prompts: bool,

    /// Largest accepted request body in bytes of the routes that take no image.
    #[arg(long, env = "SD35_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// Largest accepted body in bytes of the routes that take images — an image to edit
    /// (`/v1/images/edits`, `/v1/img2img`, `/sdapi/v1/img2img`) or a ControlNet's control
    /// image (`/v1/txt2img`, `/v1/images/generations`) — images included (bytes, or with a K,
    /// M, G or T suffix in powers of 1024).
    #[arg(long, env = "SD35_MAX_UPLOAD_BYTES", default_value = "32M", value_parser = parse_bytes)]
    pub max_upload_bytes: u64,

    /// Longest accepted prompt (and negative prompt) in bytes.
    #[arg(long, env = "SD35_MAX_PROMPT_BYTES", default_value_t = 4096)]
    pub max_prompt_bytes: usize,

    /// Largest width or height a request may ask for, below the model's own limit (unset:
    /// the model's limit), e.g. to bound memory and latency per image.
    #[arg(long, env = "SD35_MAX_SIZE", value_parser = clap::value_parser!(u32).range(16..))]
    pub max_size: Option<u32>,

    /// Device memory this server may use in all, weights included (bytes, or with a K, M, G
    /// or T suffix in powers of 1024, e.g. `40G`), for a GPU shared with other work; unset:
    /// what the device has free once the model is loaded. Requests whose memory plan does not
    /// fit are refused with 422, and the batcher groups only what fits.
    #[arg(long, env = "SD35_MEMORY_LIMIT", value_parser = parse_bytes)]
    pub memory_limit: Option<u64>,

    /// Most sampling steps a request may ask for (unset: 100, or 16 for large-turbo).
    #[arg(long, env = "SD35_MAX_STEPS")]
    pub max_steps: Option<u32>,

    /// Seconds to finish accepted requests after SIGTERM; requests still queued or running
    /// then are answered 503 and the server exits 0.
    #[arg(long, env = "SD35_DRAIN_SECONDS", default_value_t = 60)]
    pub drain_seconds: u64,

    /// Seconds a client has to send a request's head (request line and headers), counted
    /// from the connection's start or the end of its previous response; then the
    /// connection is closed.
    #[arg(long, env = "SD35_HEADER_READ_TIMEOUT_SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_seconds: u64,

    /// Seconds a client has to send a request's body once its head arrived (408 after).
    #[arg(long, env = "SD35_BODY_READ_TIMEOUT_SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub body_read_timeout_seconds: u64,

    /// Most connections being read at once (sending a request head, or idle between
    /// requests); a connection beyond it is answered 503 and closed, and counted in
    /// `sd35_http_connections_refused_total`.
    #[arg(long, env = "SD35_MAX_CONNECTIONS_READING", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_reading: u32,

    /// Accepted bearer tokens, comma separated (adds to --auth-token-file). Avoid the flag:
    /// command lines are visible to every user of the machine (`ps`); use
    /// --auth-token-file or the SD35_AUTH_TOKENS variable.
    #[arg(long, env = "SD35_AUTH_TOKENS", hide_env_values = true)]
    pub auth_tokens: Option<String>,

    /// Skip the warm-up generation before reporting ready (an engine's smoke check still runs).
    #[arg(long, env = "SD35_NO_WARMUP")]
    pub no_warmup: bool,

    /// The least PSNR in dB the engine's smoke image must reach before the server turns ready,
    /// replacing the bound for this device and precision (see the smoke module of the
    /// pipeline: 40 dB on the CPU, 24 dB for bf16 and 20 dB for fp8 on CUDA against a CPU
    /// reference).
    #[arg(long, env = "SD35_ENGINE_CHECK_MIN_PSNR_DB")]
    pub engine_check_min_psnr_db: Option<f64>,

    /// Base URL clients reach this server at (`https://images.example.com`), for the URLs of
    /// images in `--artifacts-dir`; unset: `http://` and the request's Host header.
    #[arg(long, env = "SD35_ARTIFACTS_PUBLIC_URL")]
    pub artifacts_public_url: Option<String>,

    /// File with the key that signs the URLs of images in `--artifacts-dir` (at least 16
    /// bytes; the `SD35_ARTIFACTS_SIGNING_KEY` variable works too). Unset: a key drawn at
    /// start, so URLs stop working when the server restarts and work on this replica only.
    #[arg(long, env = "SD35_ARTIFACTS_SIGNING_KEY_FILE")]
    pub artifacts_signing_key_file: Option<std::path::PathBuf>,

    /// AWS shared credentials file with the S3 credentials (profile `AWS_PROFILE`, else
    /// `default`), read when `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` are not set.
    #[arg(long, env = "SD35_ARTIFACTS_S3_CREDENTIALS_FILE")]
    pub artifacts_s3_credentials_file: Option<std::path::PathBuf>,
}

/// The variable that may carry the local artifact signing key itself.
pub const SIGNING_KEY_ENV: &str = "SD35_ARTIFACTS_SIGNING_KEY";

impl ServeConfig {
    /// The accepted bearer tokens from the token file and the token list; empty turns auth off.
    pub fn load_tokens(&self) -> anyhow::Result<Vec<String>> {
        let usable = |t: &&str| !t.is_empty() && !t.starts_with('#');
        let mut tokens = Vec::new();
        if let Some(path) = &self.args.auth_token_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("cannot read the auth token file {}: {e}", path.display())
            })?;
            tokens.extend(
                text.lines()
                    .map(str::trim)
                    .filter(usable)
                    .map(str::to_owned),
            );
            if tokens.is_empty() {
                // Serving without auth because a mounted secret is empty would be a surprise.
                anyhow::bail!(
                    "the auth token file {} holds no token; put one token per line",
                    path.display()
                );
            }
        }
        if let Some(list) = &self.auth_tokens {
            tokens.extend(
                list.split(',')
                    .map(str::trim)
                    .filter(usable)
                    .map(str::to_owned),
            );
        }
        Ok(tokens)
    }

    /// What the artifact store needs beyond the contract's flags: the signing key (file or
    /// variable) and the S3 credentials file.
    pub fn store_options(&self) -> anyhow::Result<crate::artifacts::StoreOptions> {
        let signing_key = match &self.artifacts_signing_key_file {
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot read the artifact signing key file {}: {e}",
                        path.display()
                    )
                })?;
                let trimmed = String::from_utf8_lossy(&bytes).trim().as_bytes().to_vec();
                Some(trimmed)
            }
            None => std::env::var(SIGNING_KEY_ENV)
                .ok()
                .filter(|k| !k.is_empty())
                .map(String::into_bytes),
        };
        Ok(crate::artifacts::StoreOptions {
            signing_key,
            credentials_file: self.artifacts_s3_credentials_file.clone(),
        })
    }

    /// The step cap for a variant.
    pub fn max_steps_for(&self, variant: sd35_pipeline::Variant) -> u32 {
        self.max_steps.unwrap_or(match variant {
            sd35_pipeline::Variant::LargeTurbo => 16,
            _ => 100,
        })
    }
}

/// `ServeConfig` as a whole command line, for parsing it outside the binary.
#[derive(Debug, clap::Parser)]
struct Standalone {
    #[command(flatten)]
    config: ServeConfig,
}

impl ServeConfig {
    /// Parses `serve`'s flags (the first item is the program name), with env fallbacks.
    pub fn try_parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        <Standalone as clap::Parser>::try_parse_from(args).map(|s| s.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operators_command_line_parses_into_the_server_config() {
        let args = ServeArgs {
            model: "/cache/models/c".into(),
            engine: Some("/cache/engines/e".into()),
            device: sd35_contract::DeviceKind::Cuda,
            variant: Some(sd35_contract::Variant::LargeTurbo),
            precision: Some(sd35_contract::Precision::Fp8),
            served_model_names: vec!["tiny".into(), "sd3.5".into()],
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
            artifacts: sd35_contract::ArtifactArgs {
                artifacts_dir: None,
                artifacts_s3_bucket: Some("images".into()),
                artifacts_s3_endpoint: Some("https://s3.example".into()),
                artifacts_s3_region: "eu-west-1".into(),
                artifacts_s3_prefix: "sd35/".into(),
                artifacts_s3_url_style: sd35_contract::S3UrlStyle::VirtualHost,
                artifacts_url_seconds: 900,
            },
            loras: vec![
                "detail:0.8=/cache/adapters/a1/adapter.safetensors"
                    .parse()
                    .unwrap_or_else(|e| panic!("{e}")),
            ],
            controlnets: vec![
                "canny=/cache/adapters/c1"
                    .parse()
                    .unwrap_or_else(|e| panic!("{e}")),
            ],
        };
        let argv = std::iter::once("serve".to_owned()).chain(args.to_args());
        let config = ServeConfig::try_parse_from(argv).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.args, args);
        // The server's own flags have safe defaults when the operator sets none.
        assert_eq!(config.log_format, LogFormat::Text);
        assert!(!config.log_prompts);
        assert_eq!(config.max_body_bytes, 64 * 1024);
        assert_eq!(config.max_upload_bytes, 32 << 20);
        assert_eq!(config.max_steps_for(sd35_pipeline::Variant::LargeTurbo), 16);
    }

    #[test]
    fn tokens_come_from_the_file_and_the_list() {
        let dir = std::env::temp_dir().join(format!("sd35-http-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let file = dir.join("tokens");
        std::fs::write(&file, "one\n\n# note\n two \n").unwrap_or_else(|e| panic!("{e}"));
        let path = file.display().to_string();
        let argv = [
            "serve",
            "--model",
            "m",
            "--auth-token-file",
            &path,
            "--auth-tokens",
            "x, y",
        ];
        let config = ServeConfig::try_parse_from(argv).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.load_tokens().unwrap_or_default(),
            ["one", "two", "x", "y"]
        );
        std::fs::write(&file, "\n# only a comment\n").unwrap_or_else(|e| panic!("{e}"));
        assert!(
            config.load_tokens().is_err(),
            "an empty token file is an error"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn byte_counts_take_binary_suffixes() {
        assert_eq!(parse_bytes("42"), Ok(42));
        assert_eq!(parse_bytes("40G"), Ok(40 << 30));
        assert_eq!(parse_bytes("512m"), Ok(512 << 20));
        assert!(parse_bytes("12GB").is_err());
        assert!(parse_bytes("x").is_err());
        assert!(parse_bytes("99999999999T").is_err());
    }
}
