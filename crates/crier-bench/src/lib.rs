//! `crier bench`: measures an SSE hub over HTTP, so it can measure a peer as
//! well as crier. Progress goes to stderr, one JSON result to stdout.
//!
//! A crate of its own (the `crier` binary calls [`main`]): the hub's library
//! does not compile it and the hub's tests do not link it. It knows a hub
//! only by what goes over the wire.

mod attack;
mod bare;
mod client;
mod coding;
mod decode;
mod fanout;
mod grpc;
mod idle;
mod procfs;
mod publish;
mod replay;
mod report;
mod storm;
mod subscriber;
mod throughput;
mod wire;

/// The gRPC contract's messages (`proto/crier/v1/crier.proto`).
pub mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/crier.v1.rs"));
}

use clap::{Parser, Subcommand};

#[derive(Debug, Clone, Parser)]
#[command(name = "crier bench")]
pub struct BenchArgs {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Scenario {
    /// Bytes on the wire per event for each content coding against identity,
    /// for a stream of realistic JSON events.
    Wire(wire::WireArgs),
    /// Delivery latency, exactness and CPU per delivery: N subscribers to
    /// one topic, events published at a fixed rate.
    Fanout(fanout::FanoutArgs),
    /// Memory per idle subscriber: the hub's resident memory before and
    /// after opening N subscriptions.
    Idle(idle::IdleArgs),
    /// A reconnection storm: N subscribers drop at once, events go on, and
    /// all come back at once with Last-Event-ID; how fast every one catches
    /// up, and whether each gets every event exactly once.
    Storm(Box<storm::StormArgs>),
    /// Exact resumption: one subscriber drops, M events are published, it
    /// comes back with Last-Event-ID, L more are published; it must get the
    /// M then the L, in order, none twice.
    Replay(Box<replay::ReplayArgs>),
    /// One flood (connections held, silent connections, half TLS
    /// handshakes, slowloris, dribbled bodies, publishes over the rate)
    /// for a while: what the hub answered, and its memory and descriptors
    /// before, during and after.
    Attack(Box<attack::AttackArgs>),
    /// Publish rate and latency: N concurrent publishers, each posting its
    /// next event as soon as the last is answered, for a while.
    Publish(throughput::PublishArgs),
    /// Not a measurement but a hub to measure: the floor, a bare tokio
    /// broadcast-to-socket loop (one task per subscriber, `recv` then
    /// `write_all` of bytes encoded once per event) that `fanout` and
    /// `idle` can measure like crier. Loopback only; runs until SIGTERM.
    BareHub(bare::BareHubArgs),
}

/// Runs a scenario and prints its JSON result on stdout.
pub async fn run(args: BenchArgs) -> Result<(), String> {
    let result = match args.scenario {
        Scenario::Wire(args) => wire::run(args).await?,
        Scenario::Fanout(args) => fanout::run(args).await?,
        Scenario::Idle(args) => idle::run(args).await?,
        Scenario::Storm(args) => storm::run(*args).await?,
        Scenario::Replay(args) => replay::run(*args).await?,
        Scenario::Attack(args) => attack::run(*args).await?,
        Scenario::Publish(args) => throughput::run(args).await?,
        Scenario::BareHub(args) => bare::run(args).await?,
    };
    println!("{result}");
    Ok(())
}

/// `crier bench ARGS…`: parses `args` (what follows `bench`), runs the
/// scenario and prints its result; clap's own answer (`--help`, a bad
/// argument) is printed as clap prints it.
pub async fn main(args: Vec<std::ffi::OsString>) -> std::process::ExitCode {
    let args = match BenchArgs::try_parse_from(std::iter::once("crier bench".into()).chain(args)) {
        Ok(args) => args,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                std::process::ExitCode::from(2)
            } else {
                std::process::ExitCode::SUCCESS
            };
        }
    };
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("crier bench: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
