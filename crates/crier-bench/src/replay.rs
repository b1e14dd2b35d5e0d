//! `crier bench replay`: whether a hub resumes one subscriber exactly.
//!
//! One subscriber receives `--warmup` events, drops its connection; `--missed`
//! events are published; it reconnects with `Last-Event-ID` (the id of the
//! last complete event it read, as EventSource does), and `--live` more
//! events are published once its new stream is open. It must receive the
//! missed events, then the live ones, in order and none twice: compared by
//! the number each event carries, not by the hub's ids.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Args;
use serde_json::json;

use super::client::{
    Crowd, Listener, SubscribeArgs, Target, coding_name, raise_open_files, unix_micros,
};
use super::decode::{Line, Stamp};
use super::publish::{Publisher, connect, event, post_in_time};
use super::report::ms;
use super::storm::wait_for;

#[derive(Debug, Clone, Args)]
#[command(mut_arg("subscribers", |arg| arg.default_value("1").hide(true)))]
#[command(mut_arg("sources", |arg| arg.hide(true)))]
#[command(mut_arg("pids", |arg| arg.hide(true)))]
pub struct ReplayArgs {
    #[command(flatten)]
    pub subscribe: SubscribeArgs,
    /// Path to publish to (POST, the event as the body); `{topic}` is
    /// replaced (Nchan: `/pub?id={topic}`).
    #[arg(long, default_value = "/topics/{topic}")]
    pub publish_path: String,
    /// Events received before the subscriber drops.
    #[arg(long, default_value_t = 5)]
    pub warmup: u64,
    /// Events published while it is away.
    #[arg(long, default_value_t = 100)]
    pub missed: u64,
    /// Events published once it is back.
    #[arg(long, default_value_t = 10)]
    pub live: u64,
    /// Size of each event's payload, in bytes.
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// Longest wait for the subscriber at each step.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// How long to keep listening once every event has arrived, so that one
/// sent twice shows.
const GRACE: Duration = Duration::from_millis(200);

/// Everything the subscriber received, in order.
struct Record {
    /// Complete events so far, for the scenario to wait on.
    received: Arc<AtomicU64>,
    /// Each event's number and when it arrived (µs since the Unix epoch).
    events: Vec<(u64, u64)>,
    /// The number of the event being read, recorded once it is complete.
    pending: Option<u64>,
    /// Events of other data (not bench events).
    foreign: u64,
    resets: u64,
    /// How many events it had when it left.
    left_after: Option<usize>,
    /// When its new stream was open.
    rejoined_us: Option<u64>,
}

impl Listener for Record {
    fn on_data(&mut self, data: &[u8], _: u64) {
        if self.pending.is_none() {
            match Stamp::parse(data) {
                Some(stamp) => self.pending = Some(stamp.seq),
                None => self.foreign += 1,
            }
        }
    }

    fn on_line(&mut self, line: Line<'_>, arrived_us: u64) {
        match line {
            Line::Data(data) => self.on_data(data, arrived_us),
            Line::Event(b"reset") => self.resets += 1,
            Line::End => {
                if let Some(seq) = self.pending.take() {
                    self.events.push((seq, arrived_us));
                    self.received.fetch_add(1, Ordering::SeqCst);
                }
            }
            Line::Event(_) | Line::Id(_) | Line::LongId => {}
        }
    }

    fn on_leave(&mut self) {
        self.pending = None;
        self.left_after = Some(self.events.len());
    }

    fn on_rejoin(&mut self, _sent_us: u64, opened_us: u64) {
        self.rejoined_us = Some(opened_us);
    }
}

/// Publishes events `seqs` one after the other, each once the previous one
/// is answered.
async fn publish(
    target: &Arc<Target>,
    path: &str,
    publisher: &mut Option<Publisher>,
    seqs: std::ops::Range<u64>,
    size: usize,
) -> Result<(), String> {
    for seq in seqs {
        post_in_time(target, path, publisher, event(seq, size))
            .await
            .map_err(|e| format!("publishing event {seq}: {e}"))?;
    }
    Ok(())
}

/// How a received sequence compares with the one expected.
#[derive(Debug, Default, PartialEq, Eq)]
struct Comparison {
    /// Expected events that never arrived.
    lost: u64,
    /// Arrivals of an event already received.
    duplicated: u64,
    /// Events that arrived after one with a higher number.
    out_of_order: u64,
    /// Events outside the expected range.
    unexpected: u64,
}

fn compare(seqs: &[u64], expected: std::ops::Range<u64>) -> Comparison {
    let mut seen = std::collections::HashSet::new();
    let mut comparison = Comparison::default();
    let mut highest = None;
    for &seq in seqs {
        if !expected.contains(&seq) {
            comparison.unexpected += 1;
        } else if !seen.insert(seq) {
            comparison.duplicated += 1;
            continue;
        }
        if highest.is_some_and(|highest| seq < highest) {
            comparison.out_of_order += 1;
        }
        highest = highest.max(Some(seq));
    }
    comparison.lost = expected.filter(|seq| !seen.contains(seq)).count() as u64;
    comparison
}

pub async fn run(args: ReplayArgs) -> Result<serde_json::Value, String> {
    let mut sub = args.subscribe.clone();
    if sub.subscribers != 1 {
        return Err("bench replay has one subscriber".into());
    }
    sub.sources = Some(1);
    let target = Arc::new(Target::resolve(&sub.url).await?);
    raise_open_files(64)?;
    let (warmup, missed, live) = (args.warmup, args.missed, args.live);
    eprintln!(
        "bench replay: {warmup} events, drop, {missed} missed, reconnect, {live} live, against {}",
        sub.url
    );
    let path = target.path(&args.publish_path, &sub.topic);
    let received = Arc::new(AtomicU64::new(0));
    let crowd = Crowd::spawn_rejoining(
        &sub,
        &target,
        |_| Record {
            received: received.clone(),
            events: Vec::new(),
            pending: None,
            foreign: 0,
            resets: 0,
            left_after: None,
            rejoined_us: None,
        },
        0,
    )?;
    crowd.wait_connected().await?;
    let mut publisher = Some(connect(&target).await?);
    let count = || received.load(Ordering::SeqCst);
    let progress = |phase: &str| eprintln!("{phase}: {} events received", count());

    publish(&target, &path, &mut publisher, 0..warmup, args.size).await?;
    if !wait_for(args.timeout, || count() >= warmup, || progress("warm-up")).await {
        return Err(format!(
            "the subscriber did not receive the {warmup} first events"
        ));
    }
    crowd.leave();
    if !wait_for(args.timeout, || crowd.left() >= 1, || progress("leaving")).await {
        return Err("the subscriber did not leave".into());
    }
    publish(
        &target,
        &path,
        &mut publisher,
        warmup..warmup + missed,
        args.size,
    )
    .await?;
    let back_us = unix_micros();
    crowd.come_back();
    let back = || crowd.rejoined() + crowd.rejoin_failed() >= 1;
    if !wait_for(args.timeout, back, || progress("reconnecting")).await || crowd.rejoined() == 0 {
        return Err(format!(
            "the subscriber did not reconnect: {}",
            crowd.first_problem().unwrap_or_default()
        ));
    }
    let total = warmup + missed + live;
    publish(
        &target,
        &path,
        &mut publisher,
        warmup + missed..total,
        args.size,
    )
    .await?;
    wait_for(args.timeout, || count() >= total, || progress("receiving")).await;
    tokio::time::sleep(GRACE).await;
    let dropped = crowd.dropped();
    let problem = crowd.first_problem();
    let outcome = crowd.close().await?.pop().ok_or("no subscriber")?;
    let content_encoding = coding_name(outcome.wire.coding);
    let record = outcome.listener;

    let left_after = record.left_after.unwrap_or(record.events.len());
    let seqs: Vec<u64> = record.events.iter().map(|&(seq, _)| seq).collect();
    let (before, after) = seqs.split_at(left_after);
    let before_drop = compare(before, 0..warmup);
    let after_drop = compare(after, warmup..total);
    let arrival = |seq: u64| {
        record.events[left_after..]
            .iter()
            .find(|&&(s, _)| s == seq)
            .map(|&(_, at)| ms(at.saturating_sub(back_us)))
    };
    let in_range = |range: std::ops::Range<u64>| after.iter().filter(|s| range.contains(s)).count();
    let exact_sequence = seqs == (0..total).collect::<Vec<_>>();
    let passed = exact_sequence
        && before_drop == Comparison::default()
        && after_drop == Comparison::default()
        && record.resets == 0
        && dropped == 0;
    if let Some(problem) = problem.filter(|_| !passed) {
        eprintln!("first subscriber problem: {problem}");
    }
    Ok(json!({
        "scenario": "replay",
        "url": sub.url,
        "accept_encoding": sub.accept_encoding,
        "content_encoding": content_encoding,
        "warmup": warmup,
        "missed": missed,
        "live": live,
        "passed": passed,
        "exact_sequence": exact_sequence,
        "received_before_drop": before.len(),
        "replayed": in_range(warmup..warmup + missed),
        "live_received": in_range(warmup + missed..total),
        "lost": before_drop.lost + after_drop.lost,
        "duplicated": before_drop.duplicated + after_drop.duplicated,
        "out_of_order": before_drop.out_of_order + after_drop.out_of_order,
        "unexpected": before_drop.unexpected + after_drop.unexpected,
        "resets": record.resets,
        "foreign_events": record.foreign,
        "dropped": dropped,
        "reconnect_ms": record.rejoined_us.map(|at| ms(at.saturating_sub(back_us))),
        "first_replayed_ms": missed.checked_sub(1).and(arrival(warmup)),
        "last_replayed_ms": missed.checked_sub(1).and_then(|_| arrival(warmup + missed - 1)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison_names_each_kind_of_fault() {
        assert_eq!(compare(&[3, 4, 5], 3..6), Comparison::default());
        assert_eq!(
            compare(&[3, 5, 4, 4, 9], 3..7),
            Comparison {
                lost: 1,
                duplicated: 1,
                out_of_order: 1,
                unexpected: 1,
            }
        );
    }
}
