//! `crier bench publish`: how fast a hub stores events, and how long each
//! publish waits for its answer, with N concurrent publishers.
//!
//! Each publisher is one keep-alive HTTP/1.1 connection that POSTs an event
//! as soon as the previous one is answered, for the duration, spreading its
//! events over the topics. What a durable store costs shows here: with
//! `--fsync always` each answer waits for a disk sync, shared by the
//! publishes that arrived meanwhile. With `--batch N` each request is a
//! `POST /events` of N events to one topic, to measure what a batch costs
//! per event.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde_json::json;
use tokio::time::Instant;

use super::client::Target;
use super::publish::{Publisher, padded, post_in_time};
use super::report::{cpu, percentiles_ms, round};

#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    /// The hub's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Path to publish to (POST, the event as the body); `{topic}` is
    /// replaced.
    #[arg(long, default_value = "/topics/{topic}")]
    pub publish_path: String,
    /// Concurrent publishers (one connection each).
    #[arg(long, default_value_t = 16)]
    pub publishers: usize,
    /// Topics the events are spread over (`TOPIC-0` …), round robin.
    #[arg(long, default_value_t = 1)]
    pub topics: usize,
    /// The topic name (prefix, with `--topics` above 1).
    #[arg(long, default_value = "bench-publish")]
    pub topic: String,
    /// How long to publish.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Size of each event's payload, in bytes.
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// Events per request: above 1, each request is a JSON array of that
    /// many events to one topic, POSTed to `--batch-path`.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Path batches are POSTed to (with `--batch` above 1).
    #[arg(long, default_value = "/events")]
    pub batch_path: String,
    /// A server process to measure (repeat for a hub of several processes):
    /// its CPU per published event is reported.
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
}

struct Tally {
    ok: u64,
    failed: u64,
    first_error: Option<String>,
    latencies_us: Vec<u64>,
}

pub async fn run(args: PublishArgs) -> Result<serde_json::Value, String> {
    if args.publishers == 0 || args.topics == 0 || args.batch == 0 {
        return Err("--publishers, --topics and --batch must be at least 1".into());
    }
    let target = Arc::new(Target::resolve(&args.url).await?);
    let topics: Vec<String> = match args.topics {
        1 => vec![args.topic.clone()],
        n => (0..n).map(|i| format!("{}-{i}", args.topic)).collect(),
    };
    let paths: Arc<Vec<String>> = Arc::new(
        topics
            .iter()
            .map(|t| target.path(&args.publish_path, t))
            .collect(),
    );
    let batch_path = Arc::new(target.path(&args.batch_path, ""));
    let topics = Arc::new(topics);
    eprintln!(
        "publishing with {} publishers to {} topic(s) for {:?}, {} event(s) per request",
        args.publishers, args.topics, args.duration, args.batch
    );
    let cpu_before = cpu(&args.pids)?;
    let started = Instant::now();
    let until = started + args.duration;
    let mut tasks = Vec::with_capacity(args.publishers);
    for p in 0..args.publishers {
        let (target, paths, size, batch) = (target.clone(), paths.clone(), args.size, args.batch);
        let (topics, batch_path) = (topics.clone(), batch_path.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally {
                ok: 0,
                failed: 0,
                first_error: None,
                latencies_us: Vec::new(),
            };
            let mut publisher: Option<Publisher> = None;
            let mut n = p;
            while Instant::now() < until {
                let (path, body) = match batch {
                    1 => (
                        &paths[n % paths.len()],
                        padded(format!("{{\"publisher\":{p},\"n\":{n}"), size),
                    ),
                    _ => (
                        &*batch_path,
                        batch_body(&topics[n % topics.len()], p, n, batch, size),
                    ),
                };
                let sent = Instant::now();
                match post_in_time(&target, path, &mut publisher, body).await {
                    Ok(()) => {
                        tally.ok += batch as u64;
                        tally.latencies_us.push(sent.elapsed().as_micros() as u64);
                    }
                    Err(error) => {
                        tally.failed += batch as u64;
                        tally.first_error.get_or_insert(error);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                n += 1;
            }
            tally
        }));
    }
    let mut ok = 0;
    let mut failed = 0;
    let mut first_error = None;
    let mut latencies = Vec::new();
    for task in tasks {
        let tally = task.await.map_err(|e| e.to_string())?;
        ok += tally.ok;
        failed += tally.failed;
        first_error = first_error.or(tally.first_error);
        latencies.extend(tally.latencies_us);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = cpu(&args.pids)?;
    let server_cpu = cpu_after.0 - cpu_before.0;
    Ok(json!({
        "scenario": "publish",
        "publishers": args.publishers,
        "topics": args.topics,
        "size": args.size,
        "batch": args.batch,
        "seconds": round(elapsed, 3),
        "published": ok,
        "failed": failed,
        "first_error": first_error,
        "events_per_second": round(ok as f64 / elapsed.max(1e-9), 1),
        "requests_per_second": round((ok / args.batch as u64) as f64 / elapsed.max(1e-9), 1),
        // Per request: a batch's events are answered together.
        "latency_ms": percentiles_ms(latencies),
        "server": {
            "cpu_s": (!args.pids.is_empty()).then(|| round(server_cpu, 3)),
            "cpu_us_per_event": (!args.pids.is_empty() && ok > 0)
                .then(|| round(server_cpu * 1e6 / ok as f64, 1)),
        },
        "tool": { "cpu_s": round(cpu_after.1 - cpu_before.1, 3) },
    }))
}

/// A `POST /events` body: `batch` events of about `size` bytes of data
/// each, all to `topic`.
fn batch_body(topic: &str, publisher: usize, n: usize, batch: usize, size: usize) -> String {
    let items: Vec<serde_json::Value> = (0..batch)
        .map(|i| {
            json!({
                "topic": topic,
                "data": padded(format!("{{\"publisher\":{publisher},\"n\":{n},\"i\":{i}"), size),
            })
        })
        .collect();
    serde_json::Value::Array(items).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_body_is_a_json_array_of_events_to_one_topic() {
        let body: serde_json::Value =
            serde_json::from_str(&batch_body("t-3", 1, 7, 3, 100)).unwrap();
        let items = body.as_array().unwrap();
        assert_eq!(items.len(), 3);
        for (i, item) in items.iter().enumerate() {
            assert_eq!(item["topic"], "t-3");
            let data = item["data"].as_str().unwrap();
            assert_eq!(data.len(), 100);
            let data: serde_json::Value = serde_json::from_str(data).unwrap();
            assert_eq!(
                (data["n"].as_u64(), data["i"].as_u64()),
                (Some(7), Some(i as u64))
            );
        }
    }
}
