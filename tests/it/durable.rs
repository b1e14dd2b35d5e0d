//! The durable embedded store (`--data-dir`) across restarts, kills and
//! bad days, with the real binary: what docs/OPERATIONS.md ("The data
//! directory") promises.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::Process;
use common::*;
use serde_json::Value;

fn start(dir: &Path, extra: &[&str]) -> Process {
    let mut args = vec!["--data-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    Process::start(&args)
}

/// SIGTERM, and the exit waited for.
async fn stop(mut crier: Process) {
    crier.terminate();
    let status = tokio::task::spawn_blocking(move || crier.wait_exit(DEADLINE))
        .await
        .unwrap();
    assert!(status.success(), "crier exits cleanly on SIGTERM: {status}");
}

async fn publish(client: &reqwest::Client, crier: &Process, topic: &str, data: &str) -> String {
    let response = client
        .post(crier.url(&format!("/topics/{topic}")))
        .body(data.to_owned())
        .send()
        .await
        .expect("publish");
    assert_eq!(response.status(), 201);
    let answer: Value = response.json().await.unwrap();
    answer["id"].as_str().unwrap().to_owned()
}

/// Publishes `count` events `prefix-N` to `topic` in batches of 1,000.
async fn publish_many(client: &reqwest::Client, base: &str, topic: &str, count: usize, data: &str) {
    let mut sent = 0;
    while sent < count {
        let n = (count - sent).min(1000);
        let items: Vec<Value> = (0..n)
            .map(
                |i| serde_json::json!({"topic": topic, "data": format!("{data}-{}", sent + i + 1)}),
            )
            .collect();
        let response = client
            .post(format!("{base}/events"))
            .json(&items)
            .send()
            .await
            .expect("batch");
        let status = response.status();
        assert_eq!(status, 201, "{}", response.text().await.unwrap());
        sent += n;
    }
}

/// Starts crier expecting it to refuse: returns its log, failing the test
/// if it serves instead.
fn refused(args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start crier");
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("crier started where it should have refused to");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    assert!(!status.success(), "crier exits with failure: {log}");
    assert!(!log.contains("crier listening on"), "{log}");
    log
}

/// Bytes of disk `dir` takes: blocks allocated, since fjall's journal is a
/// sparse file of 64 MiB.
fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|entry| {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                dir_bytes(&entry.path())
            } else {
                meta.blocks() * 512
            }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigterm_restart_clients_resume_exactly_with_no_reset() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let client = common::client();
    let crier = start(&dir, &[]);
    let mut ids = Vec::new();
    for i in 1..=5 {
        ids.push(publish(&client, &crier, "news", &format!("n{i}")).await);
    }
    let other = publish(&client, &crier, "sport", "s1").await;
    stop(crier).await;

    let crier = start(&dir, &[]);
    // Resumed from the second event: the third to the fifth, then live.
    let mut sub = SseClient::connect(&client, &crier.url("/topics/news"), Some(&ids[1])).await;
    assert_eq!(
        sub.take(3).await,
        vec![msg(&ids[2], "n3"), msg(&ids[3], "n4"), msg(&ids[4], "n5")]
    );
    let next = publish(&client, &crier, "news", "n6").await;
    assert_eq!(
        next,
        format!("6.{}", epoch_of(&ids[0])),
        "numbering continues"
    );
    assert_eq!(sub.next().await, msg(&next, "n6"));
    // The other topic kept its own numbering and epoch.
    let mut sub = SseClient::connect(
        &client,
        &crier.url("/topics/sport"),
        Some(&format!("0.{}", epoch_of(&other))),
    )
    .await;
    assert_eq!(sub.next().await, msg(&other, "s1"));
    stop(crier).await;
}

async fn kill_in_the_middle_of_publishing(fsync: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let client = common::client();
    let mut crier = start(&dir, &["--fsync", fsync]);
    let base = crier.base.clone();
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let mut publishers = Vec::new();
    for p in 0..8 {
        let (client, base, acked) = (client.clone(), base.clone(), acked.clone());
        publishers.push(tokio::spawn(async move {
            for i in 0.. {
                let data = format!("p{p}-{i}");
                let Ok(response) = client
                    .post(format!("{base}/topics/k"))
                    .body(data.clone())
                    .send()
                    .await
                else {
                    return;
                };
                let Ok(answer) = response.json::<Value>().await else {
                    return;
                };
                let id = answer["id"].as_str().expect("an id").to_owned();
                acked.lock().unwrap().push((id, data));
            }
        }));
    }
    wait_for("300 acknowledged publishes", || {
        acked.lock().unwrap().len() >= 300
    })
    .await;
    crier.kill();
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    let crier = start(&dir, &["--fsync", fsync]);
    let epoch = epoch_of(&acked[0].0);
    let after = publish(&client, &crier, "k", "after").await;
    assert_eq!(epoch_of(&after), epoch, "the epoch is kept");
    let head = seq_of(&after);
    assert!(
        head as usize > acked.len(),
        "every acknowledged event is numbered before {after}"
    );
    let mut sub = SseClient::connect(
        &client,
        &crier.url("/topics/k"),
        Some(&format!("0.{epoch}")),
    )
    .await;
    let events = sub.take(head as usize).await;
    // Dense numbering, one epoch, no reset, and "after" last.
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.id, format!("{}.{epoch}", i + 1), "{event:?}");
        assert_eq!(event.event, "message");
    }
    assert_eq!(events.last().unwrap().data, "after");
    for (id, data) in &acked {
        assert_eq!(
            &events[seq_of(id) as usize - 1],
            &msg(id, data),
            "acknowledged {id} kept"
        );
    }
    stop(crier).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_in_the_middle_of_publishing_loses_no_acknowledged_event_with_fsync_always() {
    kill_in_the_middle_of_publishing("always").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_in_the_middle_of_publishing_loses_no_acknowledged_event_with_fsync_interval() {
    kill_in_the_middle_of_publishing("interval").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_outlives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let client = common::client();
    let keyed = async |crier: &Process, data: &str| {
        let response = client
            .post(crier.url("/topics/orders"))
            .header("idempotency-key", "order-17")
            .body(data.to_owned())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let replayed = response.headers().contains_key("idempotent-replayed");
        (status, replayed, response.json::<Value>().await.unwrap())
    };
    let crier = start(&dir, &[]);
    let (status, replayed, first) = keyed(&crier, "paid").await;
    assert_eq!((status, replayed), (201, false));
    stop(crier).await;

    let crier = start(&dir, &[]);
    let (status, replayed, again) = keyed(&crier, "paid").await;
    assert_eq!((status, replayed), (201, true));
    assert_eq!(again, first);
    let (status, _, problem) = keyed(&crier, "refunded").await;
    assert_eq!(status, 422, "{problem}");
    let next = publish(&client, &crier, "orders", "next").await;
    assert_eq!(seq_of(&next), 2, "the replay stored nothing");
    stop(crier).await;
}

/// Room for 30,000 events published as fast as the test can.
const LARGE_TOPIC: &[&str] = &[
    "--retention-events",
    "100000",
    "--publish-rate",
    "1000000",
    "--publish-burst",
    "1000000",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_ten_behind_on_a_large_topic_after_a_restart_sends_exactly_those_ten() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let client = common::client();
    let crier = start(&dir, LARGE_TOPIC);
    publish_many(&client, &crier.base, "big", 30_000, "e").await;
    let last = publish(&client, &crier, "big", "e-30001").await;
    stop(crier).await;

    let crier = start(&dir, LARGE_TOPIC);
    let epoch = epoch_of(&last);
    let mut sub = SseClient::connect(
        &client,
        &crier.url("/topics/big"),
        Some(&format!("29991.{epoch}")),
    )
    .await;
    let expected: Vec<Ev> = (29992..=30001)
        .map(|seq| msg(&format!("{seq}.{epoch}"), &format!("e-{seq}")))
        .collect();
    assert_eq!(sub.take(10).await, expected);
    sub.expect_quiet(Duration::from_millis(200)).await;
    stop(crier).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_crier_on_the_same_directory_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let client = common::client();
    let crier = start(&dir, &[]);
    let log = refused(&["--data-dir", dir.to_str().unwrap()]);
    assert!(log.contains(&format!("{}/LOCK", dir.display())), "{log}");
    assert!(log.contains("another crier"), "{log}");
    // The first one goes on serving.
    publish(&client, &crier, "t", "still here").await;
    stop(crier).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_format_or_directory_refuses_start_naming_the_file_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("FORMAT"), "bolt 2\n").unwrap();
    let log = refused(&["--data-dir", dir.to_str().unwrap()]);
    assert!(log.contains(&format!("{}/FORMAT", dir.display())), "{log}");
    assert_eq!(
        std::fs::read_to_string(dir.join("FORMAT")).unwrap(),
        "bolt 2\n"
    );
    assert!(!dir.join("LOCK").exists(), "nothing is written into it");

    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("mercure.db"), "not ours").unwrap();
    let log = refused(&["--data-dir", other.to_str().unwrap()]);
    assert!(
        log.contains(&format!("{}/FORMAT", other.display())),
        "{log}"
    );
    assert!(log.contains("not a crier data directory"), "{log}");
    assert_eq!(
        std::fs::read_to_string(other.join("mercure.db")).unwrap(),
        "not ours"
    );
    assert!(!other.join("FORMAT").exists());
    assert!(!other.join("LOCK").exists(), "nothing is written into it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_and_redis_together_refuse_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let log = refused(&[
        "--data-dir",
        tmp.path().to_str().unwrap(),
        "--redis",
        "redis://127.0.0.1:1",
    ]);
    assert!(log.contains("--data-dir and --redis"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_many_events_to_a_topic_keeping_few_leaves_the_directory_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let server = Server::start_with(|config| {
        config.storage.data_dir = Some(dir.clone());
        config.storage.retention_events = 100;
        config.limits.publish_rate = 1_000_000;
        config.limits.publish_burst = 1_000_000;
    })
    .await;
    let pad = "x".repeat(900);
    publish_many(&server.client, &server.url(""), "few", 80_000, &pad).await;
    let last = server.publish_id("few", "last").await;
    assert_eq!(seq_of(&last), 80_001);
    let bytes = dir_bytes(&dir);
    // 72 MB published, 90 KB retained: past the journal's 64 MiB, which
    // is then recycled. The bound (docs/OPERATIONS.md): the journal's
    // 64 MiB, plus a few MiB of tables, plus what is retained. (The
    // padding compresses in the tables, not in the journal.)
    assert!(bytes < 72 * 1024 * 1024, "{bytes} bytes on disk");
    eprintln!("{bytes} bytes on disk after 72 MB published, 90 KB retained");
    server.stop().await;
}

/// The journal file of a stopped crier's data directory.
fn journal(dir: &Path) -> std::path::PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("events"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jnl"))
        .collect();
    files.sort();
    files.pop().expect("a journal file")
}

/// Publishes `n` events `event number I` and kills crier: returns their ids.
async fn publish_then_kill(dir: &Path, n: usize) -> Vec<String> {
    let client = common::client();
    let mut crier = start(dir, &[]);
    let mut ids = Vec::new();
    for i in 1..=n {
        ids.push(publish(&client, &crier, "a", &format!("event number {i}")).await);
    }
    crier.kill();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_record_after_a_kill_is_recovered_to_the_last_complete_event() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let ids = publish_then_kill(&dir, 5).await;
    // What a kill in the middle of a write leaves: the start of one more
    // record after the last complete one.
    let path = journal(&dir);
    let bytes = std::fs::read(&path).unwrap();
    let end = bytes.iter().rposition(|&b| b != 0).unwrap() + 1;
    let last = bytes[..end]
        .windows(14)
        .rposition(|w| w == b"event number 4")
        .unwrap()
        + 14;
    let record = &bytes[last..end];
    let mut torn = bytes[..end].to_vec();
    torn.extend_from_slice(&record[..record.len() * 6 / 10]);
    std::fs::write(&path, &torn).unwrap();

    let client = common::client();
    let crier = start(&dir, &[]);
    let epoch = epoch_of(&ids[0]);
    let mut sub = SseClient::connect(
        &client,
        &crier.url("/topics/a"),
        Some(&format!("0.{epoch}")),
    )
    .await;
    let expected: Vec<Ev> = (1..=5)
        .map(|i| msg(&ids[i - 1], &format!("event number {i}")))
        .collect();
    assert_eq!(sub.take(5).await, expected);
    assert_eq!(
        publish(&client, &crier, "a", "six").await,
        format!("6.{epoch}")
    );
    stop(crier).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_journal_refuses_start_naming_the_file_and_leaves_it_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    publish_then_kill(&dir, 5).await;
    let path = journal(&dir);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(14)
        .position(|w| w == b"event number 3")
        .unwrap();
    bytes[at..at + 5].copy_from_slice(b"EVENT");
    std::fs::write(&path, &bytes).unwrap();

    let before = snapshot(&dir);
    let log = refused(&["--data-dir", dir.to_str().unwrap()]);
    assert!(log.contains(&path.display().to_string()), "{log}");
    assert!(log.contains("crier repair"), "{log}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "the file is left as it was"
    );
    assert!(snapshot(&dir) == before, "the directory is left as it was");
}

/// Every file under `dir` with its bytes, sorted: to show that something
/// left a directory exactly as it was.
fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(snapshot(&path));
        } else {
            let bytes = std::fs::read(&path).unwrap();
            files.push((path, bytes));
        }
    }
    files.sort();
    files
}

/// What one topic was acknowledged: (id, data), in order.
type Acked = Vec<(String, String)>;

/// Publishes 30 events to each of `a`, `b` and `c` one by one (a journal
/// batch each), `b-007` for the seventh of `b`, and stops crier cleanly.
async fn three_topics_then_stop(dir: &Path) -> Vec<(&'static str, Acked)> {
    let client = common::client();
    let crier = start(dir, &[]);
    let mut topics: Vec<(&'static str, Acked)> = vec![("a", vec![]), ("b", vec![]), ("c", vec![])];
    for i in 1..=30 {
        for (topic, acked) in &mut topics {
            let data = format!("{topic}-{i:03}");
            acked.push((publish(&client, &crier, topic, &data).await, data));
        }
    }
    stop(crier).await;
    topics
}

/// Flips the 8 bytes of the value's length fields of the event `data` (of
/// a one-letter topic) in the journal: what fjall 3 took for the end of the
/// journal, cutting it there and losing everything after. Returns the file.
fn damage_the_lengths_of(dir: &Path, data: &str) -> std::path::PathBuf {
    let path = journal(dir);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(data.len())
        .position(|w| w == data.as_bytes())
        .expect("the event is in the journal");
    // Before the data: stored-at (8) and the name flag (1); before that the
    // key (topic, 0, seq: 10 bytes), and before the key the value's length
    // and stored length (u32 each, little-endian).
    let lengths = at - 9 - 10 - 8;
    let value_len = (9 + data.len()) as u32;
    assert_eq!(
        bytes[lengths..lengths + 8],
        [value_len.to_le_bytes(), value_len.to_le_bytes()].concat(),
        "fjall's journal layout as this test knows it"
    );
    for byte in &mut bytes[lengths..lengths + 8] {
        *byte ^= 0xff;
    }
    std::fs::write(&path, &bytes).unwrap();
    path
}

/// `crier repair --data-dir DIR`: whether it succeeded, and what it said.
fn repair(dir: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["repair", "--data-dir"])
        .arg(dir)
        .output()
        .expect("run crier repair");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_damaged_in_the_middle_refuses_start_naming_it_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    three_topics_then_stop(&dir).await;
    let path = damage_the_lengths_of(&dir, "b-015");
    let before = snapshot(&dir);

    let log = refused(&["--data-dir", dir.to_str().unwrap()]);
    assert!(log.contains(&path.display().to_string()), "{log}");
    assert!(log.contains("not as a torn tail"), "{log}");
    assert!(
        log.contains(&format!("crier repair --data-dir {}", dir.display())),
        "{log}"
    );
    assert!(snapshot(&dir) == before, "the directory is left as it was");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_keeps_every_intact_event_in_a_new_epoch_and_no_id_is_handed_out_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let topics = three_topics_then_stop(&dir).await;
    let path = damage_the_lengths_of(&dir, "b-015");

    let (ok, said) = repair(&dir);
    assert!(ok, "{said}");
    assert!(said.contains(&path.display().to_string()), "{said}");
    assert!(said.contains("3 topics start a new epoch"), "{said}");
    // Again: nothing left to do, and nothing done.
    let repaired = snapshot(&dir);
    let (ok, said) = repair(&dir);
    assert!(ok && said.contains("nothing was changed"), "{said}");
    assert!(
        snapshot(&dir) == repaired,
        "a second repair changes nothing"
    );

    let client = common::client();
    let crier = start(&dir, &[]);
    let acked: std::collections::HashSet<&str> = topics
        .iter()
        .flat_map(|(_, acked)| acked.iter().map(|(id, _)| id.as_str()))
        .collect();
    let old = epoch_of(&topics[0].1[0].0);
    for (topic, sent) in &topics {
        // Resuming from the last id acknowledged (past the damage): reset,
        // then every intact event in the new epoch, numbered densely up to
        // the head. `b-015` is lost; b's older events move up to close the
        // hole.
        let last = &sent.last().unwrap().0;
        let mut sub =
            SseClient::connect(&client, &crier.url(&format!("/topics/{topic}")), Some(last)).await;
        let reset = sub.next().await;
        assert_eq!(reset.event, "reset", "{reset:?}");
        let reason: Value = serde_json::from_str(&reset.data).unwrap();
        assert_eq!(reason["reason"], "epoch", "{reset:?}");
        let kept: Vec<&str> = sent
            .iter()
            .map(|(_, data)| data.as_str())
            .filter(|data| *data != "b-015")
            .collect();
        let got = sub.take(kept.len()).await;
        let new = epoch_of(&got[0].id);
        assert_ne!(new, old, "{topic} starts a new epoch");
        let first = 31 - kept.len();
        let expected: Vec<Ev> = kept
            .iter()
            .enumerate()
            .map(|(i, data)| msg(&format!("{}.{new}", first + i), data))
            .collect();
        assert_eq!(got, expected, "{topic}");
        sub.expect_quiet(Duration::from_millis(100)).await;
        // New events: numbered on after the head, in the new epoch.
        let next = publish(&client, &crier, topic, "after repair").await;
        assert_eq!(next, format!("31.{new}"));
        assert!(
            !acked.contains(next.as_str()),
            "{next} was acknowledged before"
        );
        assert_eq!(sub.next().await, msg(&next, "after repair"));
    }
    // A client that saw the damaged event itself hears reset too.
    let lost = &topics[1].1[14].0;
    let mut sub = SseClient::connect(&client, &crier.url("/topics/b"), Some(lost)).await;
    assert_eq!(sub.next().await.event, "reset");
    stop(crier).await;

    // The new epochs are kept by a restart: the repair is done.
    let crier = start(&dir, &[]);
    let next = publish(&client, &crier, "b", "later").await;
    assert_eq!(seq_of(&next), 32);
    assert!(!acked.contains(next.as_str()));
    stop(crier).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_bytes_flipped_mid_journal_refuse_start_and_after_repair_no_id_is_reissued() {
    // The report: publishers at once, a clean stop, 8 bytes flipped in the
    // middle of the used part of the journal, a restart.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let client = common::client();
    let crier = start(&dir, &[]);
    let until = Instant::now() + Duration::from_millis(1500);
    let mut publishers = Vec::new();
    for p in 0..4 {
        let (client, base) = (client.clone(), crier.base.clone());
        publishers.push(tokio::spawn(async move {
            let mut acked: Acked = Vec::new();
            // Under the retention (1,000): no batch of the journal is a
            // trim, each holds events.
            while Instant::now() < until && acked.len() < 500 {
                let data = format!("p{p}-{}", acked.len() + 1);
                let response = client
                    .post(format!("{base}/topics/p{p}"))
                    .body(data.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 201);
                let answer: Value = response.json().await.unwrap();
                acked.push((answer["id"].as_str().unwrap().to_owned(), data));
            }
            acked
        }));
    }
    let mut topics = Vec::new();
    for publisher in publishers {
        topics.push(publisher.await.unwrap());
    }
    stop(crier).await;
    let path = journal(&dir);
    let mut bytes = std::fs::read(&path).unwrap();
    let used = bytes.iter().rposition(|&b| b != 0).unwrap() + 1;
    let mut at = used / 2;
    // Not exactly a batch's seqno, the one field no checksum covers.
    while bytes[at - 5] == 1 {
        at += 1;
    }
    for byte in &mut bytes[at..at + 8] {
        *byte ^= 0xff;
    }
    std::fs::write(&path, &bytes).unwrap();
    let log = refused(&["--data-dir", dir.to_str().unwrap()]);
    assert!(log.contains(&path.display().to_string()), "{log}");

    let (ok, said) = repair(&dir);
    assert!(ok, "{said}");
    let crier = start(&dir, &[]);
    let acked: std::collections::HashSet<String> = topics
        .iter()
        .flat_map(|acked| acked.iter().map(|(id, _)| id.clone()))
        .collect();
    let mut lost = 0;
    for (p, sent) in topics.iter().enumerate() {
        let head = sent.len();
        let last = &sent.last().unwrap().0;
        let mut sub =
            SseClient::connect(&client, &crier.url(&format!("/topics/p{p}")), Some(last)).await;
        assert_eq!(sub.next().await.event, "reset", "p{p}");
        let next = publish(&client, &crier, &format!("p{p}"), "after").await;
        assert!(!acked.contains(&next), "{next} was acknowledged before");
        // Up to "after": the kept events, in order, numbered densely in
        // the new epoch up to the head, then "after" right past it.
        let mut got = Vec::new();
        loop {
            let event = sub.next().await;
            if event.data == "after" {
                assert_eq!(event.id, next);
                break;
            }
            got.push(event);
        }
        let new = epoch_of(&next);
        assert_eq!(seq_of(&next) as usize, head + 1, "p{p}");
        let first = head + 1 - got.len();
        for (i, event) in got.iter().enumerate() {
            assert_eq!(event.id, format!("{}.{new}", first + i), "p{p}");
        }
        let mut remaining = sent.iter().map(|(_, data)| data);
        for event in &got {
            assert!(
                remaining.any(|data| *data == event.data),
                "p{p}: {event:?} is an acknowledged event, in order"
            );
        }
        lost += head - got.len();
    }
    // One batch or two (the 8 bytes may straddle two) of four requests at
    // most, out of every event acknowledged.
    assert!(
        (1..=8).contains(&lost),
        "{lost} events lost of {}",
        acked.len()
    );
    stop(crier).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_interrupted_before_the_new_epochs_is_finished_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let client = common::client();
    let crier = start(&dir, &[]);
    let mut ids = Vec::new();
    for i in 1..=3 {
        ids.push(publish(&client, &crier, "r", &format!("r{i}")).await);
    }
    stop(crier).await;
    // What `crier repair` leaves if it stops after mending the journals.
    std::fs::write(dir.join("RENEW"), "").unwrap();

    let crier = start(&dir, &[]);
    assert!(!dir.join("RENEW").exists(), "the repair is finished");
    let mut sub = SseClient::connect(&client, &crier.url("/topics/r"), Some(&ids[2])).await;
    assert_eq!(sub.next().await.event, "reset");
    let kept = sub.take(3).await;
    let new = epoch_of(&kept[0].id);
    assert_ne!(new, epoch_of(&ids[0]));
    let expected: Vec<Ev> = (1..=3)
        .map(|i| msg(&format!("{i}.{new}"), &format!("r{i}")))
        .collect();
    assert_eq!(kept, expected);
    assert_eq!(
        publish(&client, &crier, "r", "r4").await,
        format!("4.{new}")
    );
    stop(crier).await;
}

/// Unmounts a test's tmpfs.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_507_stores_nothing_half_and_recovers_when_space_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("mount");
    assert!(
        mounted.success(),
        "this test mounts a small tmpfs (it runs as root)"
    );
    let _mounted = Mounted(mnt.clone());
    // 3 MiB to give back later; publishes fill the rest (the journal, and
    // fjall's flushes of its memtables, which then fail in the background).
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![1u8; 3 * 1024 * 1024]).unwrap();
    let dir = mnt.join("data");
    let server = Server::start_with(|config| {
        config.storage.data_dir = Some(dir.clone());
        config.limits.publish_rate = 1_000_000;
        config.limits.publish_burst = 1_000_000;
        // Every acknowledged event stays readable, to be checked.
        config.storage.retention_events = 100_000;
    })
    .await;
    let mut acked = Vec::new();
    for i in 1..=10 {
        acked.push((
            server.publish_id("d", &format!("before-{i}")).await,
            format!("before-{i}"),
        ));
    }
    // Publish on into the full disk: every refusal is the same clean 507,
    // whatever fjall makes of the failed writes (it poisons the database
    // after the first; a write that finds a little room may succeed).
    let pad = "f".repeat(4000);
    let mut refused = Vec::new();
    for i in 0..4000 {
        let data = format!("full-{i}-{pad}");
        let response = server
            .client
            .post(server.url("/topics/d"))
            .body(data.clone())
            .send()
            .await
            .unwrap();
        if response.status() == 201 {
            let answer: Value = response.json().await.unwrap();
            acked.push((answer["id"].as_str().unwrap().to_owned(), data));
            continue;
        }
        let (status, kind) = (
            response.status(),
            response.headers().get("content-type").cloned(),
        );
        let problem: Value = response.json().await.unwrap();
        let which = format!(
            "refusal {} after {} acknowledged: {problem}",
            refused.len() + 1,
            acked.len()
        );
        assert_eq!(status, 507, "{which}");
        assert_eq!(kind.unwrap(), "application/problem+json", "{which}");
        assert_eq!(problem["type"], "urn:crier:problem:storage-full", "{which}");
        assert_eq!(
            problem["detail"], "the store is full: the disk of the data directory is full",
            "{which}"
        );
        refused.push(data);
        if refused.len() == 40 {
            break;
        }
    }
    assert_eq!(
        refused.len(),
        40,
        "publishes are refused once the disk is full"
    );
    // Space comes back: the next publish is stored, without a restart.
    std::fs::remove_file(&filler).unwrap();
    let after = server.publish_id("d", "after").await;
    // Nothing half-stored: the refused event is nowhere, numbering is dense.
    assert_eq!(seq_of(&after) as usize, acked.len() + 1);
    let epoch = epoch_of(&after);
    let mut sub = server.resume("/topics/d", &format!("0.{epoch}")).await;
    let mut expected: Vec<Ev> = acked.iter().map(|(id, data)| msg(id, data)).collect();
    expected.push(msg(&after, "after"));
    let got = sub.take(expected.len()).await;
    assert_eq!(got, expected);
    sub.expect_quiet(Duration::from_millis(200)).await;
    assert!(got.iter().all(|e| !refused.contains(&e.data)));
    server.stop().await;
    // Nor on disk: a restart reads back exactly the same.
    let server = Server::start_with(|config| {
        config.storage.data_dir = Some(dir.clone());
        config.storage.retention_events = 100_000;
    })
    .await;
    let mut sub = server.resume("/topics/d", &format!("0.{epoch}")).await;
    assert_eq!(sub.take(expected.len()).await, expected);
    sub.expect_quiet(Duration::from_millis(200)).await;
    server.stop().await;
}

/// What a machine restart looks like to the data directory of a crier that
/// was killed: another boot id recorded than the running one.
fn pretend_the_machine_restarted(dir: &Path) {
    let db = fjall::Database::builder(dir.join("events")).open().unwrap();
    let state = db
        .keyspace("state", fjall::KeyspaceCreateOptions::default)
        .unwrap();
    state.insert("boot", "a boot before this one").unwrap();
    db.persist(fjall::PersistMode::SyncAll).unwrap();
}

async fn killed_then_rebooted(fsync: &str) -> (Vec<String>, Ev, String) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let client = common::client();
    let mut crier = start(&dir, &["--fsync", fsync]);
    let mut ids = Vec::new();
    for i in 1..=3 {
        ids.push(publish(&client, &crier, "r", &format!("r{i}")).await);
    }
    crier.kill();
    pretend_the_machine_restarted(&dir);
    let crier = start(&dir, &["--fsync", fsync]);
    let mut sub = SseClient::connect(&client, &crier.url("/topics/r"), Some(&ids[1])).await;
    let first = sub.next().await;
    let next = publish(&client, &crier, "r", "after").await;
    stop(crier).await;
    (ids, first, next)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fsync_interval_a_kill_then_a_machine_restart_renews_every_epoch() {
    let (ids, first, next) = killed_then_rebooted("interval").await;
    // The last moments may be lost: no number is handed out again in the
    // old epoch, and a returning client hears reset.
    assert_eq!(first.event, "reset", "{first:?}");
    assert_ne!(epoch_of(&next), epoch_of(&ids[0]));
    assert_eq!(seq_of(&next), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fsync_always_a_kill_then_a_machine_restart_keeps_every_epoch() {
    let (ids, first, next) = killed_then_rebooted("always").await;
    assert_eq!(first, msg(&ids[2], "r3"));
    assert_eq!(next, format!("4.{}", epoch_of(&ids[0])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_that_expires_is_removed_from_disk_too() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let client = common::client();
    let args = [
        "--data-dir",
        dir.to_str().unwrap(),
        "--retention-age",
        "300ms",
    ];
    let debug = [("RUST_LOG", "info,crier::store::durable=debug")];
    let crier = Process::start_with_env(&args, &debug);
    let old = publish(&client, &crier, "brief", "gone soon").await;
    // Once its only event expired and nobody watches it, the topic is
    // forgotten (the writer looks every second) and deleted from disk.
    wait_for("the expired topic removed from disk", || {
        crier
            .log()
            .iter()
            .any(|l| l.contains("removed expired topics from disk"))
    })
    .await;
    stop(crier).await;
    let db = fjall::Database::builder(dir.join("events")).open().unwrap();
    let topics = db
        .keyspace("topics", fjall::KeyspaceCreateOptions::default)
        .unwrap();
    let stored = db
        .keyspace("events", fjall::KeyspaceCreateOptions::default)
        .unwrap();
    assert!(
        topics.get("brief").unwrap().is_none(),
        "the topic's record is deleted"
    );
    assert_eq!(
        stored.prefix(b"brief\0").count(),
        0,
        "its events are deleted"
    );
    drop((topics, stored, db));

    let crier = Process::start_with_env(&args, &debug);
    let again = publish(&client, &crier, "brief", "new").await;
    assert_eq!(seq_of(&again), 1, "numbering starts again");
    assert_ne!(epoch_of(&again), epoch_of(&old), "in a new epoch");
    stop(crier).await;
}

/// Past its budgets the durable store makes room as the memory store does,
/// and disk follows: a topic forgotten for a new one (published to longest
/// ago, watched by no one) is deleted from disk and comes back in a new
/// epoch after a restart; the topic that took its place keeps its
/// numbering, dropping its oldest events for bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_made_past_the_budgets_holds_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let client = common::client();
    let args = ["--max-topics", "2", "--max-retained-bytes", "204800"];
    let crier = start(&dir, &args);
    let a1 = publish(&client, &crier, "a", "a1").await;
    publish(&client, &crier, "b", "b1").await;
    // c takes a's place.
    let c1 = publish(&client, &crier, "c", "c1").await;
    // Four events of 60 KiB into 200 KiB: the oldest make room.
    let big: Vec<String> = (2..=5)
        .map(|i| format!("{i}{}", "c".repeat(60 * 1024)))
        .collect();
    let mut ids = vec![c1.clone()];
    for data in &big {
        ids.push(publish(&client, &crier, "c", data).await);
    }
    let mut resumer = SseClient::connect(&client, &crier.url("/topics/c"), Some(&c1)).await;
    let reset = resumer.next().await;
    assert_eq!(reset.event, "reset");
    let reset: Value = serde_json::from_str(&reset.data).unwrap();
    assert_eq!(
        (reset["reason"].as_str(), reset["oldest"].as_str()),
        (Some("trimmed"), Some(ids[2].as_str())),
        "{reset}"
    );
    assert_eq!(
        resumer.take(3).await,
        vec![
            msg(&ids[2], &big[1]),
            msg(&ids[3], &big[2]),
            msg(&ids[4], &big[3])
        ]
    );
    drop(resumer);
    stop(crier).await;

    let crier = start(&dir, &args);
    let mut resumer = SseClient::connect(&client, &crier.url("/topics/a"), Some(&a1)).await;
    let reset = resumer.next().await;
    assert_eq!(reset.event, "reset");
    let reset: Value = serde_json::from_str(&reset.data).unwrap();
    assert_eq!(reset["reason"], "epoch", "{reset}");
    drop(resumer);
    // c goes on where it was: resuming from c4 gives c5, then c6 numbered 6.
    let mut resumer = SseClient::connect(&client, &crier.url("/topics/c"), Some(&ids[3])).await;
    assert_eq!(resumer.next().await, msg(&ids[4], &big[3]));
    let c6 = publish(&client, &crier, "c", "c6").await;
    assert_eq!(c6, format!("6.{}", epoch_of(&c1)));
    assert_eq!(resumer.next().await, msg(&c6, "c6"));
    // a comes back in a new epoch, numbered from 1 (b or c made room).
    let again = publish(&client, &crier, "a", "a again").await;
    assert_eq!(seq_of(&again), 1);
    assert_ne!(epoch_of(&again), epoch_of(&a1));
    stop(crier).await;
}
