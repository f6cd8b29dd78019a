//! `sd35-server`: the Stable Diffusion 3.5 inference binary.

use clap::{Parser, Subcommand};

mod generate;

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
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(args) => generate::run(&args),
    }
}
