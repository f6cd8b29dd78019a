//! `sd35-server`: the Stable Diffusion 3.5 inference binary.

use clap::{Parser, Subcommand};

mod engine;
mod fetch;
mod generate;
mod plan;

/// Stable Diffusion 3.5 inference server and tools.
#[derive(Debug, Parser)]
#[command(name = "sd35-server", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate one image from the command line.
    Generate(generate::GenerateArgs),
    /// Download or import a model into the cache, verified and resumable.
    Fetch(fetch::FetchCommand),
    /// Download or import one LoRA or ControlNet into the cache beside the models, verified
    /// and resumable.
    FetchAdapter(fetch::adapter::FetchAdapterCommand),
    /// Convert a cached model into the serving engine of one precision.
    BuildEngine(engine::BuildEngineCommand),
    /// Peak device memory of a request for a published variant, computed from its shapes.
    Plan(plan::PlanArgs),
    /// Serve the model over HTTP (text-to-image API, health, metrics, playground).
    Serve(Box<sd35_http::ServeConfig>),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // `serve` installs its own logging (JSON lines when asked, request ids).
    if let Command::Serve(config) = cli.command {
        sd35_http::server::run_and_exit(*config);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Plain text when not on a terminal, so `kubectl logs` of the Jobs stays readable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Generate(args) => generate::run(&args),
        Command::Fetch(args) => fetch::main(&args),
        Command::FetchAdapter(args) => fetch::adapter::main(&args),
        Command::BuildEngine(args) => engine::main(&args),
        Command::Plan(args) => plan::run(&args),
        Command::Serve(_) => unreachable!("handled above"),
    }
}
