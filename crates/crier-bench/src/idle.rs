//! `crier bench idle`: what an idle subscriber costs the hub in memory.
//!
//! Reads the hub's resident memory, opens N subscriptions that receive
//! nothing, holds them a while (so lazily allocated state settles), and
//! reads it again. With `--accept-encoding`, each stream costs the hub its
//! compressor too (as much of it as the preamble touched: events fill its
//! window later, which `bench fanout` against a fresh hub shows). Run it against a fresh hub: memory freed by an earlier
//! run stays resident and would be reused, hiding part of the cost.

use std::time::Duration;

use clap::Args;
use serde_json::json;

use super::client::{Crowd, SubscribeArgs, Target, answered, raise_open_files};
use super::procfs;

#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub subscribe: SubscribeArgs,
    /// How long to hold the subscriptions before reading memory again.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
    /// Each subscriber subscribes to this many topics of its own
    /// (`/events?topic=TOPIC-I-0&topic=TOPIC-I-1…`, I its number), so the
    /// hub holds subscribers × K distinct topics; 0: every subscriber on
    /// `--subscribe-path` and `--topic`.
    #[arg(long, default_value_t = 0)]
    pub topics_per_subscription: usize,
}

/// The path of subscriber `i` on `k` topics of its own, named after `topic`.
fn own_topics_path(topic: &str, i: usize, k: usize) -> String {
    let topics: Vec<String> = (0..k).map(|j| format!("topic={topic}-{i}-{j}")).collect();
    format!("/events?{}", topics.join("&"))
}

pub async fn run(mut args: IdleArgs) -> Result<serde_json::Value, String> {
    let target = Target::resolve(&args.subscribe.url).await?;
    if args.subscribe.pids.is_empty() {
        let pid = target
            .local_pid()
            .map_err(|e| format!("bench idle measures the hub's process: {e}"))?;
        args.subscribe.pids.push(pid);
    }
    let sub = &args.subscribe;
    raise_open_files(sub.subscribers + 64)?;
    let k = args.topics_per_subscription;
    eprintln!(
        "bench idle: {} subscribers{} held {:?} against {}",
        sub.subscribers,
        if k > 0 {
            format!(" on {k} topics of their own")
        } else {
            String::new()
        },
        args.hold,
        sub.url
    );
    let rss_before = procfs::total_memory_bytes(&sub.pids, "VmRSS")?;
    let crowd = if k > 0 {
        let path = |i| own_topics_path(&sub.topic, i, k);
        Crowd::spawn_on_paths(sub, &target, |_| (), &path)?
    } else {
        Crowd::spawn(sub, &target, |_| ())?
    };
    let connected = crowd.wait_connected().await?;
    tokio::time::sleep(args.hold).await;
    let rss_after = procfs::total_memory_bytes(&sub.pids, "VmRSS")?;
    let still_connected = connected - crowd.dropped();
    if still_connected < connected {
        eprintln!(
            "{} subscribers dropped while held: {}",
            connected - still_connected,
            crowd.first_problem().unwrap_or_default()
        );
    }
    let (content_encoding, content_encodings, wire) = answered(&crowd.close().await?);
    let growth = rss_after as i64 - rss_before as i64;
    eprintln!(
        "{connected} connections: {:.1} MiB more resident, {} bytes each",
        growth as f64 / (1024.0 * 1024.0),
        growth / connected as i64
    );
    Ok(json!({
        "scenario": "idle",
        "url": sub.url,
        "subscribers": sub.subscribers,
        "calls_per_connection": sub.calls_per_connection,
        "topics_per_subscription": k,
        "accept_encoding": sub.accept_encoding,
        "content_encoding": content_encoding,
        "content_encodings": content_encodings,
        "connected": connected,
        "still_connected": still_connected,
        "hold_s": args.hold.as_secs_f64(),
        "pids": sub.pids,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "bytes_per_connection": growth / connected as i64,
        "wire_bytes_per_subscriber": (wire.opening_bytes + wire.stream_bytes) / connected as u64,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_subscriber_gets_topics_of_its_own() {
        assert_eq!(own_topics_path("m", 7, 1), "/events?topic=m-7-0");
        assert_eq!(
            own_topics_path("m", 0, 3),
            "/events?topic=m-0-0&topic=m-0-1&topic=m-0-2"
        );
        assert_ne!(own_topics_path("m", 1, 2), own_topics_path("m", 2, 2));
    }
}
