//! crier's integration tests, one crate: every suite below talks to a
//! real hub (in-process on an ephemeral loopback port, or the built binary)
//! through the shared harness in `common`.

#[macro_use]
mod common;

mod auth;
mod bad_input;
mod bench;
mod browser;
mod compression;
mod documents;
mod durable;
mod exactly_once;
mod failover;
mod fanout;
mod floods;
mod grpc;
mod lifecycle;
mod long_poll;
mod memory;
mod metrics;
mod operations;
mod properties;
mod publish_subscribe;
mod redis_nodes;
mod replay;
mod router;
mod transports;
mod websocket;
mod wire;
