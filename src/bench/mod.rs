//! `crier bench`: measures an SSE hub over HTTP, so it can measure a peer as
//! well as crier. Progress goes to stderr, one JSON result to stdout.

mod wire;

use clap::{Args, Subcommand};

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Scenario {
    /// Bytes on the wire per event for each content coding against identity,
    /// for a stream of realistic JSON events.
    Wire(wire::WireArgs),
}

/// Runs a scenario and prints its JSON result on stdout.
pub async fn run(args: BenchArgs) -> Result<(), String> {
    let result = match args.scenario {
        Scenario::Wire(args) => wire::run(args).await?,
    };
    println!("{result}");
    Ok(())
}
