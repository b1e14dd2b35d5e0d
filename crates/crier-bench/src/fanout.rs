//! `crier bench fanout`: delivery latency, exactness and cost when one
//! topic's events reach many subscribers.
//!
//! N subscribers connect first; only once every one has its preamble (so is
//! surely subscribed) does publishing start, at a fixed rate, on a schedule.
//! Each event carries its number and the time it was sent; each subscriber
//! counts what arrives (lost, duplicated, out of order) and how late. CPU is
//! measured over the publishing and draining window only, for the hub's
//! processes and for the tool itself, so each can be put per delivery.
//!
//! With `--accept-encoding`, the subscribers ask for a compressed stream and
//! decode what they receive read by read, as a browser does; every event is
//! still checked. The result names the coding the hub answered with, the
//! bytes that came over the wire per event and per subscriber, and the hub's
//! resident memory before the crowd connected and after the last event, so
//! that against a fresh hub its growth per subscriber includes what each
//! stream's compressor came to hold.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::time::Instant;

use super::client::{Crowd, Listener, SubscribeArgs, Target, answered, raise_open_files};
use super::decode::Stamp;
use super::procfs;
use super::publish::{PUBLISH_TIMEOUT, Payload, Publisher, connect, post};
use super::report::{cpu, percentiles_ms, round};

#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub subscribe: SubscribeArgs,
    /// Path to publish to (POST, the event as the body); `{topic}` is
    /// replaced (Nchan: `/pub?id={topic}`).
    #[arg(long, default_value = "/topics/{topic}")]
    pub publish_path: String,
    /// Events published per second.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// How long to publish.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Size of each event's payload, in bytes.
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// What each event holds after its stamp: padding, or a metric update
    /// that changes from event to event (what compression is measured on).
    #[arg(long, value_enum, default_value = "padded")]
    pub payload: Payload,
    /// Keep-alive connections publishing in turn.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
}

/// How long before the first slot the publishers start connecting.
const CONNECT_LEAD: Duration = Duration::from_millis(250);

/// An event sent later than this after its slot counts as late: above timer
/// granularity, below anything that would bend the rate.
const LATE: Duration = Duration::from_millis(5);

/// Longest wait for deliveries after the last publish.
const DRAIN: Duration = Duration::from_secs(5);

/// Latency histograms shared by subscribers, each subscriber always using
/// the same one. One per subscriber would cost about 140 KiB each (7 GB at
/// 50,000 subscribers); with a few shards the bench's worker threads rarely
/// meet on a lock.
const SHARDS: usize = 16;

/// Latencies are recorded in µs, up to a minute.
fn histogram() -> Result<Histogram<u64>, String> {
    Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())
}

/// What all subscribers share.
struct Shared {
    /// Events this run will publish: stamps outside `0..events` are not ours.
    events: u64,
    publishers: u64,
    latency_us: Vec<Mutex<Histogram<u64>>>,
    /// Distinct deliveries so far, over all subscribers.
    delivered: AtomicU64,
    /// The highest latency since the last progress line, µs: shows when
    /// in a run deliveries were late (under a flood, say).
    latest_max_us: AtomicU64,
}

/// One subscriber's account of what it received.
struct Tally {
    shared: Arc<Shared>,
    shard: usize,
    /// One bit per event number, set once it arrived.
    seen: Vec<u64>,
    /// Per publisher connection, the highest event number seen plus one.
    /// Events sent on one connection are sent one after the other, each
    /// after the previous one's answer, so any hub must deliver them in
    /// order; events on different connections overlap and may be ordered
    /// either way, so they are not compared.
    highest: Vec<u64>,
    distinct: u64,
    duplicated: u64,
    out_of_order: u64,
}

impl Tally {
    fn new(shared: Arc<Shared>, i: usize) -> Tally {
        let words = shared.events.div_ceil(64) as usize;
        let publishers = shared.publishers as usize;
        Tally {
            shared,
            shard: i % SHARDS,
            seen: vec![0; words],
            highest: vec![0; publishers],
            distinct: 0,
            duplicated: 0,
            out_of_order: 0,
        }
    }
}

impl Listener for Tally {
    fn on_data(&mut self, data: &[u8], arrived_us: u64) {
        let Some(stamp) = Stamp::parse(data) else {
            return;
        };
        if stamp.seq >= self.shared.events {
            return;
        }
        let (word, bit) = ((stamp.seq / 64) as usize, 1u64 << (stamp.seq % 64));
        if self.seen[word] & bit != 0 {
            self.duplicated += 1;
            return;
        }
        self.seen[word] |= bit;
        self.distinct += 1;
        let highest = &mut self.highest[(stamp.seq % self.shared.publishers) as usize];
        if stamp.seq < *highest {
            self.out_of_order += 1;
        } else {
            *highest = stamp.seq + 1;
        }
        self.shared.delivered.fetch_add(1, Ordering::Relaxed);
        let latency_us = arrived_us.saturating_sub(stamp.sent_us);
        // A read first: a locked write on every delivery would have the
        // worker threads fight over the line.
        if latency_us > self.shared.latest_max_us.load(Ordering::Relaxed) {
            self.shared
                .latest_max_us
                .fetch_max(latency_us, Ordering::Relaxed);
        }
        self.shared.latency_us[self.shard]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(latency_us);
    }
}

/// Everything the publisher connections share.
struct Publishing {
    target: Arc<Target>,
    path: String,
    size: usize,
    payload: Payload,
    /// When event 0 is due; event `seq` is due at `start + seq / rate`.
    start: Instant,
    rate: f64,
    events: u64,
    publishers: u64,
    published: AtomicU64,
    errors: AtomicU64,
    late: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// How long each answered publish took, from sending to its answer, µs.
    answered_us: Mutex<Vec<u64>>,
}

/// Connects the publishers, then has each send its share on schedule.
async fn publish_all(publishing: Arc<Publishing>) -> Result<(), String> {
    let mut pool = Vec::with_capacity(publishing.publishers as usize);
    for _ in 0..publishing.publishers {
        pool.push(connect(&publishing.target).await?);
    }
    let shares = pool.into_iter().enumerate().map(|(i, publisher)| {
        let publishing = publishing.clone();
        async move { publishing.share(i as u64, Some(publisher)).await }
    });
    futures_util::future::join_all(shares).await;
    Ok(())
}

impl Publishing {
    /// Publisher `index` sends events `index`, `index + publishers`, … each
    /// at its slot.
    async fn share(&self, index: u64, mut publisher: Option<Publisher>) {
        for seq in (index..self.events).step_by(self.publishers as usize) {
            let slot = self.start + Duration::from_secs_f64(seq as f64 / self.rate);
            tokio::time::sleep_until(slot).await;
            if slot.elapsed() > LATE {
                self.late.fetch_add(1, Ordering::Relaxed);
            }
            let sending = Instant::now();
            let sent = tokio::time::timeout(PUBLISH_TIMEOUT, self.publish(&mut publisher, seq))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {PUBLISH_TIMEOUT:?}")));
            match sent {
                Ok(()) => {
                    let took = sending.elapsed().as_micros() as u64;
                    let mut answered = self.answered_us.lock().unwrap_or_else(|e| e.into_inner());
                    answered.push(took);
                    self.published.fetch_add(1, Ordering::Relaxed)
                }
                Err(error) => {
                    publisher = None;
                    let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
                    first.get_or_insert(error);
                    self.errors.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
    }

    /// Publishes one event on `publisher`, reconnecting it first if it broke.
    async fn publish(&self, publisher: &mut Option<Publisher>, seq: u64) -> Result<(), String> {
        let event = self.payload.event(seq, self.size);
        post(&self.target, &self.path, publisher, event).await
    }
}

pub async fn run(mut args: FanoutArgs) -> Result<serde_json::Value, String> {
    if args.subscribe.pids.is_empty() {
        // Without the hub's process the run still measures delivery.
        match Target::resolve(&args.subscribe.url).await?.local_pid() {
            Ok(pid) => args.subscribe.pids.push(pid),
            Err(e) => eprintln!("bench fanout: no server figures ({e})"),
        }
    }
    let sub = &args.subscribe;
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        return Err("--rate must be a positive number".into());
    }
    if args.publishers == 0 {
        return Err("--publishers must be at least 1".into());
    }
    let target = Arc::new(Target::resolve(&sub.url).await?);
    raise_open_files(sub.subscribers + args.publishers + 64)?;
    let events = (args.rate * args.duration.as_secs_f64()).round() as u64;
    eprintln!(
        "bench fanout: {} subscribers, {events} events of {} bytes at {}/s against {}",
        sub.subscribers, args.size, args.rate, sub.url
    );
    cpu(&sub.pids)?;

    let shared = Arc::new(Shared {
        events,
        publishers: args.publishers as u64,
        latency_us: (0..SHARDS)
            .map(|_| histogram().map(Mutex::new))
            .collect::<Result<_, _>>()?,
        delivered: AtomicU64::new(0),
        latest_max_us: AtomicU64::new(0),
    });
    let rss_before = procfs::total_memory_bytes(&sub.pids, "VmRSS")?;
    let crowd = Crowd::spawn(sub, &target, |i| Tally::new(shared.clone(), i))?;
    let connected = crowd.wait_connected().await?;

    let (server_cpu_before, tool_cpu_before) = cpu(&sub.pids)?;
    let server_user_before = procfs::total_user_seconds(&sub.pids)?;
    let publishing = Arc::new(Publishing {
        target: target.clone(),
        path: target.path(&args.publish_path, &sub.topic),
        size: args.size,
        payload: args.payload,
        // Room for the publishers to connect before the first slot.
        start: Instant::now() + CONNECT_LEAD,
        rate: args.rate,
        events,
        publishers: args.publishers as u64,
        published: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        late: AtomicU64::new(0),
        first_error: Mutex::new(None),
        answered_us: Mutex::new(Vec::new()),
    });
    publish_and_drain(&publishing, &shared, &crowd, connected).await?;
    let window = publishing.start.elapsed().as_secs_f64();
    let (server_cpu_after, tool_cpu_after) = cpu(&sub.pids)?;
    let server_user = procfs::total_user_seconds(&sub.pids)? - server_user_before;
    let peak_rss = procfs::total_memory_bytes(&sub.pids, "VmHWM")?;
    // Every subscriber still connected, every stream past its last event.
    let rss_after = procfs::total_memory_bytes(&sub.pids, "VmRSS")?;

    let disconnected = crowd.dropped();
    let published = publishing.published.load(Ordering::Relaxed);
    let (mut deliveries, mut lost, mut duplicated, mut out_of_order) = (0, 0, 0, 0);
    let outcomes = crowd.close().await?;
    let tool_peak_rss = procfs::memory_bytes(std::process::id(), "VmHWM")?;
    let (content_encoding, content_encodings, wire) = answered(&outcomes);
    for outcome in outcomes.into_iter().filter(|o| o.connected) {
        let tally = outcome.listener;
        deliveries += tally.distinct;
        lost += published.saturating_sub(tally.distinct);
        duplicated += tally.duplicated;
        out_of_order += tally.out_of_order;
    }
    let mut latency = histogram()?;
    for shard in &shared.latency_us {
        let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        latency.add(&*shard).map_err(|e| e.to_string())?;
    }

    let ms = |us: u64| us as f64 / 1000.0;
    let per_delivery = |cpu_s: f64| round(cpu_s * 1e6 / deliveries.max(1) as f64, 2);
    let tool_cpu = tool_cpu_after - tool_cpu_before;
    let per_subscriber = |bytes: u64| round(bytes as f64 / connected.max(1) as f64, 1);
    let mut result = json!({
        "scenario": "fanout",
        "url": sub.url,
        "subscribers": sub.subscribers,
        "calls_per_connection": sub.calls_per_connection,
        "accept_encoding": sub.accept_encoding,
        "content_encoding": content_encoding,
        "content_encodings": content_encodings,
        "connected": connected,
        "disconnected": disconnected,
        "rate": args.rate,
        "duration_s": args.duration.as_secs_f64(),
        "size": args.size,
        "payload": args.payload.to_possible_value().map(|v| v.get_name().to_owned()),
        "publishers": args.publishers,
        "published": published,
        "publish_errors": publishing.errors.load(Ordering::Relaxed),
        "published_late": publishing.late.load(Ordering::Relaxed),
        "publish_answer_ms": percentiles_ms(std::mem::take(
            &mut *publishing.answered_us.lock().unwrap_or_else(|e| e.into_inner()),
        )),
        "expected_deliveries": published * connected as u64,
        "deliveries": deliveries,
        "lost": lost,
        "duplicated": duplicated,
        "out_of_order": out_of_order,
        "latency_ms": {
            "p50": ms(latency.value_at_quantile(0.5)),
            "p90": ms(latency.value_at_quantile(0.9)),
            "p99": ms(latency.value_at_quantile(0.99)),
            "max": ms(latency.max()),
        },
        "window_s": round(window, 3),
        "deliveries_per_s": round(deliveries as f64 / window, 1),
        "wire": {
            "bytes_per_subscriber": per_subscriber(wire.opening_bytes + wire.stream_bytes),
            "opening_bytes_per_subscriber": per_subscriber(wire.opening_bytes),
            "stream_bytes_per_subscriber": per_subscriber(wire.stream_bytes),
            "bytes_per_event": round(wire.stream_bytes as f64 / deliveries.max(1) as f64, 1),
        },
        "tool": {
            "cpu_s": round(tool_cpu, 2),
            "cpu_us_per_delivery": per_delivery(tool_cpu),
            "peak_rss_bytes": tool_peak_rss,
        },
    });
    if !sub.pids.is_empty() {
        let server_cpu = server_cpu_after - server_cpu_before;
        result["server"] = json!({
            "pids": sub.pids,
            "cpu_s": round(server_cpu, 2),
            "cpu_us_per_delivery": per_delivery(server_cpu),
            // The hub's own code (and its libraries'), without the kernel's
            // share (the socket writes).
            "user_us_per_delivery": per_delivery(server_user),
            "peak_rss_bytes": peak_rss,
            "rss_before_bytes": rss_before,
            "rss_after_bytes": rss_after,
            "rss_growth_per_subscriber": (rss_after as i64 - rss_before as i64) / connected.max(1) as i64,
        });
    }
    Ok(result)
}

/// Publishes on schedule from a thread of its own, then waits until every
/// connected subscriber has every published event, or [`DRAIN`] has passed;
/// prints progress each second.
///
/// The publishers run on their own single-threaded runtime: on the tool's
/// main runtime their timers would wait behind thousands of subscriber
/// sockets turning readable at once after each event, and the schedule
/// would measure the tool rather than the hub.
async fn publish_and_drain(
    publishing: &Arc<Publishing>,
    shared: &Shared,
    crowd: &Crowd<Tally>,
    connected: usize,
) -> Result<(), String> {
    let (done, mut all_sent) = tokio::sync::oneshot::channel();
    let on_its_own = publishing.clone();
    std::thread::Builder::new()
        .name("bench-publish".into())
        .spawn(move || {
            let sent = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
                .and_then(|runtime| runtime.block_on(publish_all(on_its_own)));
            let _ = done.send(sent);
        })
        .map_err(|e| format!("cannot start the publishing thread: {e}"))?;
    let start = publishing.start;
    let mut ticks =
        tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    let mut last = 0;
    let mut progress = || {
        let delivered = shared.delivered.load(Ordering::Relaxed);
        eprintln!(
            "{:5.1} s: {} published, {} late, {} errors; {delivered} delivered ({}/s, slowest {:.0} ms); {} subscribers dropped",
            start.elapsed().as_secs_f64(),
            publishing.published.load(Ordering::Relaxed),
            publishing.late.load(Ordering::Relaxed),
            publishing.errors.load(Ordering::Relaxed),
            delivered - last,
            shared.latest_max_us.swap(0, Ordering::Relaxed) as f64 / 1000.0,
            crowd.dropped(),
        );
        last = delivered;
    };
    loop {
        tokio::select! {
            sent = &mut all_sent => {
                sent.map_err(|_| "the publishing thread failed".to_owned())??;
                break;
            }
            _ = ticks.tick() => progress(),
        }
    }
    let expected = publishing.published.load(Ordering::Relaxed) * connected as u64;
    let drain_until = Instant::now() + DRAIN;
    while shared.delivered.load(Ordering::Relaxed) < expected && Instant::now() < drain_until {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
            _ = ticks.tick() => progress(),
        }
    }
    progress();
    let dropped = crowd.dropped();
    if let Some(problem) = crowd.first_problem().filter(|_| dropped > 0) {
        eprintln!("{dropped} subscribers dropped, the first: {problem}");
    }
    let first_error = publishing
        .first_error
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(error) = first_error.as_ref() {
        eprintln!("first publish error: {error}");
    }
    Ok(())
}
