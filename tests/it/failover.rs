//! Failovers of the Redis primary under load, checked against histories:
//! what the publishers were acknowledged, what every subscriber (SSE and
//! WebSocket, on two nodes) received. A sequence number never names two
//! events in one epoch, no subscriber skips an event without a `reset`, and
//! with `--redis-wait-replicas 1` no acknowledged event is lost at all and
//! nobody hears `reset` (an event goes live only once a replica has it, so
//! no subscriber holds one the failover lost).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common;
use common::redis::{ClusterGroup, SentinelGroup};
use common::transport::{Feed, Transport};
use common::{Ev, RedisSetup, Server};

const TOPIC: &str = "orders";

/// One publish: its data, and its id when it was acknowledged.
#[derive(Debug, Clone)]
struct Attempt {
    data: String,
    id: Option<String>,
    /// Acknowledged after the new primary was in place.
    after: bool,
}

/// Publishes to both nodes in turn until `stop`, recording every attempt.
async fn publish_until(
    nodes: [Arc<Server>; 2],
    stop: Arc<AtomicBool>,
    failed_over: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
) -> Vec<Attempt> {
    let mut attempts = Vec::new();
    let mut i = 0usize;
    while !stop.load(Ordering::SeqCst) && i < 5_000 {
        let attempt = publish(&nodes[i % 2], format!("e{i}"), &failed_over).await;
        if attempt.id.is_some() {
            acked.fetch_add(1, Ordering::SeqCst);
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        attempts.push(attempt);
        i += 1;
    }
    attempts
}

/// One publish of `data` through `node`.
async fn publish(node: &Server, data: String, failed_over: &AtomicBool) -> Attempt {
    let answer = common::client()
        .post(node.url(&format!("/topics/{TOPIC}")))
        .body(data.clone())
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    let after = failed_over.load(Ordering::SeqCst);
    let id = match answer {
        Ok(response) if response.status() == 201 => {
            let body: serde_json::Value = response.json().await.expect("a JSON answer");
            Some(body["id"].as_str().expect("an id").to_owned())
        }
        // Refused or cut: in flight, it may or may not be stored.
        _ => None,
    };
    Attempt { data, id, after }
}

fn parse_id(id: &str) -> (u64, String) {
    let (seq, epoch) = id.split_once('.').expect("SEQ.EPOCH");
    (seq.parse().expect("a number"), epoch.to_owned())
}

/// Checks one subscriber's events against the publishers' history, and
/// returns how many resets it heard.
fn check_subscriber(
    name: &str,
    received: &[Ev],
    attempts: &[Attempt],
    names: &mut HashMap<String, String>,
) -> usize {
    let attempted: HashSet<&str> = attempts.iter().map(|a| a.data.as_str()).collect();
    let mut resets = 0;
    // Since the last reset: the last position, and the data seen.
    let mut last: Option<(u64, String)> = None;
    let mut seen: HashSet<&str> = HashSet::new();
    for ev in received {
        if ev.event == "reset" {
            resets += 1;
            last = None;
            seen.clear();
            continue;
        }
        assert!(
            attempted.contains(ev.data.as_str()),
            "{name} received {ev:?}, which nobody published"
        );
        assert!(
            seen.insert(ev.data.as_str()),
            "{name} received {:?} twice without a reset in between",
            ev.data
        );
        let (seq, epoch) = parse_id(&ev.id);
        if let Some((last_seq, last_epoch)) = &last {
            assert!(
                *last_epoch == epoch && seq == last_seq + 1,
                "{name} went from {last_seq}.{last_epoch} to {} without a reset: a skip",
                ev.id
            );
        }
        last = Some((seq, epoch));
        // One id, one event: across every subscriber and every answer.
        if let Some(other) = names.insert(ev.id.clone(), ev.data.clone()) {
            assert_eq!(
                other, ev.data,
                "id {} named two different events ({name})",
                ev.id
            );
        }
    }
    resets
}

/// Receives until `feed` has delivered `last` (data), or fails at the
/// deadline.
async fn receive_through(feed: &mut Feed, last: &str) -> Vec<Ev> {
    let mut received = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let ev = feed.next().await;
        let done = ev.data == last && ev.event != "reset";
        received.push(ev);
        if done {
            return received;
        }
    }
    panic!("the subscriber did not receive {last} within 30 s");
}

/// Redis with replicas whose primary a test can kill.
enum Topology {
    Sentinel(Box<SentinelGroup>),
    Cluster(ClusterGroup),
}

impl Topology {
    fn setup(&self) -> RedisSetup {
        let prefix = Some("failover:".to_owned());
        match self {
            Topology::Sentinel(group) => RedisSetup {
                sentinels: group.urls(),
                prefix,
                ..RedisSetup::default()
            },
            Topology::Cluster(group) => RedisSetup {
                cluster: group.urls(),
                prefix,
                ..RedisSetup::default()
            },
        }
    }

    /// Kills the primary holding the topic (SIGKILL) and waits until a
    /// replica took its place; with `rejoin`, starts it again as a replica
    /// of the new primary, so writes can be confirmed again.
    fn fail_over(&mut self, rejoin: bool) {
        match self {
            Topology::Sentinel(group) => {
                group.fail_over();
                if rejoin {
                    let port = group.replica.port;
                    group.primary.restart_as_replica_of(port);
                }
            }
            Topology::Cluster(group) => {
                let index = group
                    .primary_holding(&format!("failover:*{{{TOPIC}}}:meta"))
                    .expect("a primary holds the topic");
                group.fail_over(index);
                if rejoin {
                    group.rejoin(index);
                }
            }
        }
    }
}

/// Two nodes, one subscriber on each transport on each node, publishers on
/// both; the primary is killed and a replica promoted.
async fn fail_over_under_load(start: fn() -> Topology, wait_replicas: u32) {
    let group = tokio::task::spawn_blocking(start)
        .await
        .expect("a Redis with replicas");
    let setup = group.setup();
    let start = |setup: RedisSetup| {
        Server::start_with(move |config| {
            setup.apply(config);
            config.redis.wait_replicas = wait_replicas;
            config.redis.timeout = Duration::from_secs(1);
            // Canaries often enough to have come back by the end.
            config.redis.canary_interval = Duration::from_millis(200);
        })
    };
    let a = Arc::new(start(setup.clone()).await);
    let b = Arc::new(start(setup.clone()).await);
    // The first publish through each node proves it reached the primary.
    let first = a.publish_id(TOPIC, "first").await;
    let second = b.publish_id(TOPIC, "second").await;
    let path = format!("/topics/{TOPIC}");
    let mut feeds = Vec::new();
    for (node, name) in [(&a, "a"), (&b, "b")] {
        for transport in [Transport::Sse, Transport::WebSocket] {
            let feed = Feed::open_on(transport, node, &path, Some(&first)).await;
            feeds.push((format!("{transport:?} on {name}"), feed));
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let failed_over = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let publisher = tokio::spawn(publish_until(
        [a.clone(), b.clone()],
        stop.clone(),
        failed_over.clone(),
        acked.clone(),
    ));
    // Some load first, then the kill.
    common::wait_for("40 publishes before the failover", || {
        acked.load(Ordering::SeqCst) >= 40
    })
    .await;
    let mut group = group;
    let group = tokio::task::spawn_blocking(move || {
        group.fail_over(wait_replicas > 0);
        group
    })
    .await
    .expect("the failover");
    failed_over.store(true, Ordering::SeqCst);
    // Load on the new primary until both nodes have been acknowledged.
    let mut attempts = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    for (n, node) in [&a, &b].into_iter().enumerate() {
        loop {
            let attempt =
                publish(node, format!("probe-{n}-{}", attempts.len()), &failed_over).await;
            let ok = attempt.id.is_some();
            attempts.push(attempt);
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "publishing did not resume within 30 s of the failover"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    stop.store(true, Ordering::SeqCst);
    attempts.extend(publisher.await.expect("the publisher"));
    attempts.push(publish(&a, "last".into(), &failed_over).await);
    assert!(
        attempts.last().is_some_and(|a| a.id.is_some()),
        "the last publish is acknowledged"
    );
    // `first` is where the subscribers start (they never receive it).
    for (data, id) in [("first", None), ("second", Some(second))] {
        attempts.push(Attempt {
            data: data.into(),
            id,
            after: false,
        });
    }

    let mut names: HashMap<String, String> = HashMap::new();
    for attempt in &attempts {
        if let Some(id) = &attempt.id
            && let Some(other) = names.insert(id.clone(), attempt.data.clone())
        {
            panic!(
                "id {id} was acknowledged for {other} and for {}",
                attempt.data
            );
        }
    }
    let acked_after: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.after && a.id.is_some())
        .collect();
    assert!(
        !acked_after.is_empty(),
        "nothing was acknowledged after the failover"
    );
    for (name, feed) in &mut feeds {
        let received = receive_through(feed, "last").await;
        let resets = check_subscriber(name, &received, &attempts, &mut names);
        let got: HashSet<&str> = received.iter().map(|e| e.data.as_str()).collect();
        // Nothing acknowledged on the new primary is missed.
        for attempt in &acked_after {
            assert!(
                got.contains(attempt.data.as_str()),
                "{name} never received {} (acknowledged as {:?} after the failover)",
                attempt.data,
                attempt.id
            );
        }
        if wait_replicas == 0 {
            // The promoted replica's history cannot be proven complete:
            // the topic was given a new epoch, which every subscriber heard.
            assert!(
                resets >= 1,
                "{name} heard no reset after an unconfirmed failover"
            );
        } else {
            // Every event a subscriber got survived (it went live only once
            // a replica had it), so no reset is owed.
            assert_eq!(
                resets, 0,
                "{name} heard a reset though nothing it had was lost"
            );
            for attempt in attempts.iter().filter(|a| a.id.is_some()) {
                assert!(
                    got.contains(attempt.data.as_str()),
                    "{name} never received {} (acknowledged as {:?})",
                    attempt.data,
                    attempt.id
                );
            }
        }
    }
    let mut renewals = 0.0;
    for node in [&a, &b] {
        // Canaries went through the live path, and came back: per shard,
        // named by its slot range on a cluster.
        let scrape = node.scrape().await;
        let shards: Vec<&str> = scrape
            .lines()
            .filter_map(|l| l.strip_prefix("crier_redis_canary_seconds_count{shard=\""))
            .filter_map(|l| l.split_once("\"} "))
            .filter(|(_, count)| count.parse::<f64>().is_ok_and(|c| c >= 1.0))
            .map(|(shard, _)| shard)
            .collect();
        if setup.sentinels.is_empty() {
            assert!(!shards.is_empty(), "canaries per shard: {scrape}");
            for shard in &shards {
                let (first, last) = shard.split_once('-').expect("a slot range");
                let (first, last): (u16, u16) = (first.parse().unwrap(), last.parse().unwrap());
                assert!(first <= last && last < 16384, "{shard}");
            }
        } else {
            assert_eq!(shards, ["single"], "{scrape}");
        }
        if !setup.sentinels.is_empty() {
            assert_eq!(node.metric("crier_redis_failovers_total").await, 1.0);
        }
        for cause in ["replication", "went_back"] {
            renewals += node
                .metric(&format!(
                    r#"crier_redis_epoch_renewals_total{{cause="{cause}"}}"#
                ))
                .await;
        }
    }
    // The first write after the failover renewed the topic's epoch, once,
    // on whichever node made it: for another replication history, or, if
    // that node had seen an event the failover lost, because the topic went
    // back (checked first); unless every write was confirmed.
    let expected = if wait_replicas == 0 { 1.0 } else { 0.0 };
    assert_eq!(renewals, expected, "epoch renewals after the failover");
    if wait_replicas > 0 {
        for node in [&a, &b] {
            let went_back = node
                .metric(r#"crier_redis_epoch_renewals_total{cause="went_back"}"#)
                .await;
            assert_eq!(went_back, 0.0, "no node saw the history go back");
        }
    }
    for node in [a, b] {
        Arc::into_inner(node).expect("one owner").stop().await;
    }
    tokio::task::spawn_blocking(move || drop(group))
        .await
        .expect("stop the Sentinel group");
}

fn sentinel() -> Topology {
    Topology::Sentinel(Box::new(SentinelGroup::start()))
}

fn cluster() -> Topology {
    Topology::Cluster(ClusterGroup::start())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_never_lets_an_id_name_two_events_nor_a_subscriber_skip_silently() {
    fail_over_under_load(sentinel, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_replicas_a_sentinel_failover_loses_nothing_acknowledged() {
    fail_over_under_load(sentinel, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_never_lets_an_id_name_two_events_nor_a_subscriber_skip_silently() {
    fail_over_under_load(cluster, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_wait_replicas_a_cluster_failover_loses_nothing_acknowledged() {
    fail_over_under_load(cluster, 1).await;
}
