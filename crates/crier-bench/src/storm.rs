//! `crier bench storm`: a reconnection storm, as when a node or a proxy in
//! front of the hub restarts.
//!
//! N subscribers connect to one topic; events are published at a steady
//! rate from then on. Once every subscriber has received `--warmup` events,
//! all close their sockets at once, `--behind` events are published as fast
//! as the publisher pool goes, and all reconnect at once with
//! `Last-Event-ID` (the id of the last complete event each one read), while
//! the steady publishing goes on. Each subscriber has caught up when it has
//! every event published before the reconnection; the result gives how long
//! that took, and whether every subscriber ends with every event exactly
//! once and in order.
//!
//! Order is judged as the hub must keep it: each event carries `after`, the
//! number of events whose publication had been answered before it was sent;
//! those must all reach a subscriber before it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use super::client::{
    Crowd, Listener, SubscribeArgs, Target, answered, raise_open_files, unix_micros,
};
use super::decode::{Line, Stamp, number_after};
use super::publish::{PUBLISH_TIMEOUT, Publisher, connect, padded, post_in_time};
use super::report::{cpu, ms, percentiles_ms, round};

#[derive(Debug, Clone, Args)]
#[command(mut_arg("subscribers", |arg| arg.default_value("1000")))]
pub struct StormArgs {
    #[command(flatten)]
    pub subscribe: SubscribeArgs,
    /// Path to publish to (POST, the event as the body); `{topic}` is
    /// replaced (Nchan: `/pub?id={topic}`).
    #[arg(long, default_value = "/topics/{topic}")]
    pub publish_path: String,
    /// Events published per second, all along.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Events every subscriber receives before they all drop.
    #[arg(long, default_value_t = 5)]
    pub warmup: u64,
    /// Events published, as fast as the publishers go, while the
    /// subscribers are away.
    #[arg(long, default_value_t = 100)]
    pub behind: u64,
    /// Size of each event's payload, in bytes.
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// Keep-alive connections publishing.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Subscribers reconnecting at a time (0: all at once, a true storm).
    #[arg(long, default_value_t = 0)]
    pub reconnecting_at_once: usize,
    /// Longest wait for every subscriber to catch up.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub catch_up_timeout: Duration,
}

/// Longest wait for deliveries after the last publish.
const DRAIN: Duration = Duration::from_secs(5);

/// Longest wait for every subscriber to close its connection.
const LEAVING: Duration = Duration::from_secs(10);

/// What all subscribers share with the scenario.
struct Shared {
    warmup: u64,
    /// Subscribers that have received `warmup` events.
    warmed: AtomicUsize,
    /// Events handed to publishers so far: a stamp at or above is not ours.
    claimed: AtomicU64,
    /// Events published before the reconnection (`u64::MAX` until then): a
    /// subscriber has caught up once it has every one of them.
    goal: AtomicU64,
    caught_up: AtomicUsize,
    /// Distinct deliveries so far, over all subscribers.
    delivered: AtomicU64,
    resets: AtomicU64,
}

/// One subscriber's account of what it received.
struct Tally {
    shared: Arc<Shared>,
    /// One bit per event number, set once it arrived; grows as needed.
    seen: Vec<u64>,
    /// Every event below this has arrived.
    prefix: u64,
    distinct: u64,
    duplicated: u64,
    out_of_order: u64,
    /// The highest `after` of the events received: every event below it
    /// should already have arrived.
    after: u64,
    /// The stamp of the event being read, counted once it is complete.
    pending: Option<(u64, u64)>,
    resets: u64,
    /// `prefix` when it left.
    prefix_at_leave: Option<u64>,
    /// When its new stream was open (µs since the Unix epoch).
    rejoined_us: Option<u64>,
    /// When it had every event published before the reconnection.
    caught_up_us: Option<u64>,
}

impl Tally {
    fn new(shared: Arc<Shared>) -> Tally {
        Tally {
            shared,
            seen: Vec::new(),
            prefix: 0,
            distinct: 0,
            duplicated: 0,
            out_of_order: 0,
            after: 0,
            pending: None,
            resets: 0,
            prefix_at_leave: None,
            rejoined_us: None,
            caught_up_us: None,
        }
    }

    fn has(&self, seq: u64) -> bool {
        self.seen
            .get((seq / 64) as usize)
            .is_some_and(|word| word & (1 << (seq % 64)) != 0)
    }

    /// Counts a complete event.
    fn record(&mut self, seq: u64, after: u64, arrived_us: u64) {
        if seq >= self.shared.claimed.load(Ordering::SeqCst) {
            return;
        }
        if self.has(seq) {
            self.duplicated += 1;
            return;
        }
        let word = (seq / 64) as usize;
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        self.seen[word] |= 1 << (seq % 64);
        self.distinct += 1;
        self.shared.delivered.fetch_add(1, Ordering::Relaxed);
        if seq < self.after {
            self.out_of_order += 1;
        }
        self.after = self.after.max(after);
        while self.has(self.prefix) {
            self.prefix += 1;
        }
        if self.distinct == self.shared.warmup {
            self.shared.warmed.fetch_add(1, Ordering::Relaxed);
        }
        self.check_caught_up(arrived_us);
    }

    fn check_caught_up(&mut self, now_us: u64) {
        if self.caught_up_us.is_none() && self.prefix >= self.shared.goal.load(Ordering::SeqCst) {
            self.caught_up_us = Some(now_us);
            self.shared.caught_up.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Listener for Tally {
    fn on_data(&mut self, data: &[u8], _: u64) {
        if self.pending.is_none()
            && let Some(stamp) = Stamp::parse(data)
        {
            let after = number_after(data, b"\"after\":").unwrap_or(0);
            self.pending = Some((stamp.seq, after));
        }
    }

    fn on_line(&mut self, line: Line<'_>, arrived_us: u64) {
        match line {
            Line::Data(data) => self.on_data(data, arrived_us),
            Line::Event(b"reset") => {
                self.resets += 1;
                self.shared.resets.fetch_add(1, Ordering::Relaxed);
            }
            Line::End => {
                if let Some((seq, after)) = self.pending.take() {
                    self.record(seq, after, arrived_us);
                }
            }
            Line::Event(_) | Line::Id(_) | Line::LongId => {}
        }
    }

    fn on_leave(&mut self) {
        self.pending = None;
        self.prefix_at_leave = Some(self.prefix);
    }

    fn on_rejoin(&mut self, _sent_us: u64, opened_us: u64) {
        self.rejoined_us = Some(opened_us);
        self.check_caught_up(opened_us);
    }
}

/// When the events to publish are due.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Event `seq` (from `from` on) is due at `start + (seq - from) / rate`.
    Steady { from: u64, start: Instant },
    /// Events below `until` are due now; none after them until told.
    Burst { until: u64 },
    /// Nothing more.
    Finished,
}

struct Plan {
    /// The next event to publish.
    next: u64,
    mode: Mode,
}

/// What a publisher does next.
enum Claim {
    Publish(u64),
    WaitUntil(Instant),
    WaitForChange,
    Over,
}

/// Which events have been answered (or failed): all of them below `low`.
#[derive(Default)]
struct Acks {
    low: u64,
    above: std::collections::BTreeSet<u64>,
}

impl Acks {
    fn resolve(&mut self, seq: u64) {
        self.above.insert(seq);
        while self.above.remove(&self.low) {
            self.low += 1;
        }
    }
}

/// A pool of publishers taking events from one schedule, which the scenario
/// changes as it goes.
struct Pacer {
    target: Arc<Target>,
    path: String,
    size: usize,
    rate: f64,
    shared: Arc<Shared>,
    plan: Mutex<Plan>,
    changed: watch::Sender<()>,
    acks: Mutex<Acks>,
    published: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Pacer {
    /// Changes the schedule, given the next event to publish, and wakes
    /// the publishers.
    fn set(&self, mode: impl FnOnce(u64) -> Mode) {
        let mut plan = self.plan.lock().unwrap_or_else(|e| e.into_inner());
        plan.mode = mode(plan.next);
        drop(plan);
        self.changed.send_replace(());
    }

    /// Publishes at the steady rate from now on.
    fn steady(&self) {
        let start = Instant::now();
        self.set(|from| Mode::Steady { from, start });
    }

    /// Publishes `n` events at once, then nothing until told; returns the
    /// number of events once they are published.
    fn burst(&self, n: u64) -> u64 {
        let mut until = 0;
        self.set(|next| {
            until = next + n;
            Mode::Burst { until }
        });
        until
    }

    /// Stops publishing.
    fn finish(&self) {
        self.set(|_| Mode::Finished);
    }

    /// Every event below this has been answered (or has failed).
    fn resolved(&self) -> u64 {
        self.acks.lock().unwrap_or_else(|e| e.into_inner()).low
    }

    fn claim(&self) -> Claim {
        let mut plan = self.plan.lock().unwrap_or_else(|e| e.into_inner());
        let due = match plan.mode {
            Mode::Finished => return Claim::Over,
            Mode::Burst { until } if plan.next >= until => return Claim::WaitForChange,
            Mode::Burst { .. } => Instant::now(),
            Mode::Steady { from, start } => {
                start + Duration::from_secs_f64((plan.next - from) as f64 / self.rate)
            }
        };
        if due > Instant::now() {
            return Claim::WaitUntil(due);
        }
        let seq = plan.next;
        plan.next += 1;
        self.shared.claimed.store(plan.next, Ordering::SeqCst);
        Claim::Publish(seq)
    }

    /// One publisher of the pool, until publishing is finished.
    async fn work(self: Arc<Self>, mut publisher: Option<Publisher>) {
        let mut changed = self.changed.subscribe();
        loop {
            changed.borrow_and_update();
            match self.claim() {
                Claim::Publish(seq) => self.publish(&mut publisher, seq).await,
                Claim::WaitUntil(due) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(due) => {}
                        _ = changed.changed() => {}
                    }
                }
                Claim::WaitForChange => {
                    let _ = changed.changed().await;
                }
                Claim::Over => return,
            }
        }
    }

    async fn publish(&self, publisher: &mut Option<Publisher>, seq: u64) {
        let after = self.resolved();
        let stamp = Stamp {
            seq,
            sent_us: unix_micros(),
        };
        let event = padded(
            format!("{},\"after\":{after}", stamp.json_prefix()),
            self.size,
        );
        match post_in_time(&self.target, &self.path, publisher, event).await {
            Ok(()) => {
                self.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
                first.get_or_insert(error);
            }
        }
        self.acks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .resolve(seq);
    }
}

/// Waits until `done()`, or `timeout` has passed; prints `progress()` each
/// second and at the end. Whether it is done.
pub(super) async fn wait_for(
    timeout: Duration,
    mut done: impl FnMut() -> bool,
    mut progress: impl FnMut(),
) -> bool {
    let start = Instant::now();
    let mut report = start + Duration::from_secs(1);
    loop {
        if done() {
            progress();
            return true;
        }
        let now = Instant::now();
        if now >= start + timeout {
            progress();
            return false;
        }
        if now >= report {
            progress();
            report += Duration::from_secs(1);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub async fn run(args: StormArgs) -> Result<serde_json::Value, String> {
    let sub = &args.subscribe;
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        return Err("--rate must be a positive number".into());
    }
    if args.publishers == 0 {
        return Err("--publishers must be at least 1".into());
    }
    let target = Arc::new(Target::resolve(&sub.url).await?);
    raise_open_files(sub.subscribers + args.publishers + 64)?;
    eprintln!(
        "bench storm: {} subscribers, {} events of {} bytes at {}/s, then {} while they are away, against {}",
        sub.subscribers, args.warmup, args.size, args.rate, args.behind, sub.url
    );
    cpu(&sub.pids)?;

    let shared = Arc::new(Shared {
        warmup: args.warmup,
        warmed: AtomicUsize::new(0),
        claimed: AtomicU64::new(0),
        goal: AtomicU64::new(u64::MAX),
        caught_up: AtomicUsize::new(0),
        delivered: AtomicU64::new(0),
        resets: AtomicU64::new(0),
    });
    let crowd = Crowd::spawn_rejoining(
        sub,
        &target,
        |_| Tally::new(shared.clone()),
        args.reconnecting_at_once,
    )?;
    let connected = crowd.wait_connected().await?;
    let mut pool = Vec::with_capacity(args.publishers);
    for _ in 0..args.publishers {
        pool.push(connect(&target).await?);
    }
    let pacer = Arc::new(Pacer {
        target: target.clone(),
        path: target.path(&args.publish_path, &sub.topic),
        size: args.size,
        rate: args.rate,
        shared: shared.clone(),
        plan: Mutex::new(Plan {
            next: 0,
            mode: Mode::Burst { until: 0 },
        }),
        changed: watch::Sender::new(()),
        acks: Mutex::new(Acks::default()),
        published: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
    });
    let start = Instant::now();
    let progress = |phase: &str| {
        eprintln!(
            "{:5.1} s {phase}: {} published, {} errors; {} delivered; {} warmed, {} left, {} back, {} caught up, {} dropped, {} resets",
            start.elapsed().as_secs_f64(),
            pacer.published.load(Ordering::Relaxed),
            pacer.errors.load(Ordering::Relaxed),
            shared.delivered.load(Ordering::Relaxed),
            shared.warmed.load(Ordering::Relaxed),
            crowd.left(),
            crowd.rejoined(),
            shared.caught_up.load(Ordering::Relaxed),
            crowd.dropped(),
            shared.resets.load(Ordering::Relaxed),
        );
    };
    pacer.steady();
    let workers: Vec<_> = pool
        .into_iter()
        .map(|publisher| tokio::spawn(pacer.clone().work(Some(publisher))))
        .collect();

    // Warm up: every subscriber receives a few events.
    let warmup_time = Duration::from_secs_f64(args.warmup as f64 / args.rate);
    let warmed = wait_for(
        warmup_time + Duration::from_secs(10),
        || args.warmup == 0 || shared.warmed.load(Ordering::Relaxed) >= connected,
        || progress("warming up"),
    )
    .await;
    if !warmed {
        eprintln!("not every subscriber warmed up; dropping them anyway");
    }

    // The storm: all drop, events go on, all come back at once.
    let (server_cpu_before, tool_cpu_before) = cpu(&sub.pids)?;
    let storm = Instant::now();
    crowd.leave();
    wait_for(
        LEAVING,
        || crowd.left() >= connected,
        || progress("leaving"),
    )
    .await;
    let left = crowd.left();
    let goal = pacer.burst(args.behind);
    let published_behind = wait_for(
        PUBLISH_TIMEOUT * 2,
        || pacer.resolved() >= goal,
        || progress("publishing while away"),
    )
    .await;
    if !published_behind {
        return Err(format!(
            "the {} events published while away were not all answered",
            args.behind
        ));
    }
    shared.goal.store(goal, Ordering::SeqCst);
    let back_us = unix_micros();
    pacer.steady();
    crowd.come_back();
    let all_caught_up = wait_for(
        args.catch_up_timeout,
        || shared.caught_up.load(Ordering::Relaxed) + crowd.rejoin_failed() >= left,
        || progress("reconnecting"),
    )
    .await;
    let storm_window = storm.elapsed().as_secs_f64();
    let (server_cpu_after, tool_cpu_after) = cpu(&sub.pids)?;
    if !all_caught_up {
        eprintln!(
            "not every subscriber caught up within {:?}",
            args.catch_up_timeout
        );
    }

    // Stop publishing, and let every subscriber get every event.
    pacer.finish();
    for worker in workers {
        worker
            .await
            .map_err(|e| format!("a publisher failed: {e}"))?;
    }
    let published = pacer.published.load(Ordering::Relaxed);
    let following = (connected - crowd.rejoin_failed()) as u64;
    wait_for(
        DRAIN,
        || shared.delivered.load(Ordering::Relaxed) >= published * following,
        || progress("draining"),
    )
    .await;
    let dropped = crowd.dropped();
    if let Some(problem) = crowd.first_problem() {
        eprintln!("first subscriber problem: {problem}");
    }
    if let Some(error) = pacer
        .first_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        eprintln!("first publish error: {error}");
    }
    let (reconnected, reconnect_failed) = (crowd.rejoined(), crowd.rejoin_failed());

    let (mut lost, mut duplicated, mut out_of_order, mut resets) = (0, 0, 0, 0);
    let (mut catch_up, mut reconnect, mut missed) = (Vec::new(), Vec::new(), Vec::new());
    let outcomes = crowd.close().await?;
    let (content_encoding, _, _) = answered(&outcomes);
    for outcome in outcomes.into_iter().filter(|o| o.connected) {
        let tally = outcome.listener;
        lost += published.saturating_sub(tally.distinct);
        duplicated += tally.duplicated;
        out_of_order += tally.out_of_order;
        resets += tally.resets;
        if let Some(at) = tally.caught_up_us {
            catch_up.push(at.saturating_sub(back_us));
        }
        if let Some(at) = tally.rejoined_us {
            reconnect.push(at.saturating_sub(back_us));
        }
        if let Some(prefix) = tally.prefix_at_leave {
            missed.push(goal.saturating_sub(prefix));
        }
    }
    let caught_up = catch_up.len();
    let every_one = caught_up == connected && reconnected == connected;
    let all_ms = catch_up
        .iter()
        .max()
        .filter(|_| every_one)
        .map(|&us| ms(us));
    let exact = every_one && lost == 0 && duplicated == 0 && out_of_order == 0 && resets == 0;
    let tool_cpu = tool_cpu_after - tool_cpu_before;
    let mut result = json!({
        "scenario": "storm",
        "url": sub.url,
        "accept_encoding": sub.accept_encoding,
        "content_encoding": content_encoding,
        "subscribers": sub.subscribers,
        "connected": connected,
        "warmed": shared.warmed.load(Ordering::Relaxed),
        "left": left,
        "reconnected": reconnected,
        "reconnect_failed": reconnect_failed,
        "dropped": dropped,
        "rate": args.rate,
        "warmup": args.warmup,
        "behind": args.behind,
        "size": args.size,
        "publishers": args.publishers,
        "reconnecting_at_once": args.reconnecting_at_once,
        "published": published,
        "publish_errors": pacer.errors.load(Ordering::Relaxed),
        "published_before_reconnect": goal,
        "missed_per_subscriber": {
            "min": missed.iter().min(),
            "max": missed.iter().max(),
        },
        "reconnect_ms": percentiles_ms(reconnect),
        "caught_up": caught_up,
        "all_caught_up_ms": all_ms,
        "catch_up_ms": percentiles_ms(catch_up),
        "lost": lost,
        "duplicated": duplicated,
        "out_of_order": out_of_order,
        "resets": resets,
        "exact": exact,
        "storm_window_s": round(storm_window, 3),
        "tool": { "cpu_s": round(tool_cpu, 2) },
    });
    if !sub.pids.is_empty() {
        result["server"] = json!({
            "pids": sub.pids,
            "cpu_s": round(server_cpu_after - server_cpu_before, 2),
        });
    }
    Ok(result)
}
