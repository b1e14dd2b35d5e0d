//! Compressed streams write units the hub compressed once per event: every
//! subscriber, whenever it joined and whatever it wrote of its own
//! (preamble, heartbeats, `reset`, replayed events), decodes exactly its
//! events the moment they arrive, with independent decoders (brotli's is
//! Node's zlib; curl's `--compressed` for all three); and a stream that ends
//! cleanly is a complete gzip member (CRC-32 and length checked), one
//! complete zstd frame (which decoders reading only a response's first
//! frame, such as Python's httpx, need) or a complete brotli stream.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::coding::{OnArrival, SHARED};
use common::*;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// A compressed subscription: each chunk decoded on arrival by the suite's
/// `Decompressor` and by an independent decoder, which must agree
/// ([`OnArrival`]); the events parsed from that text, and every byte of the
/// wire.
struct Compressed {
    events: std::pin::Pin<Box<dyn futures_util::Stream<Item = Ev> + Send>>,
    wire: Arc<Mutex<Vec<u8>>>,
    text: Arc<Mutex<Vec<u8>>>,
    ended: Arc<std::sync::atomic::AtomicBool>,
}

impl Compressed {
    async fn open(server: &Server, path: &str, coding: &str, last_event_id: Option<&str>) -> Self {
        let mut request = server
            .client
            .get(server.url(path))
            .header("accept-encoding", coding);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = tokio::time::timeout(DEADLINE, request.send())
            .await
            .expect("an answer in time")
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-encoding"], coding);
        let wire: Arc<Mutex<Vec<u8>>> = Arc::default();
        let text: Arc<Mutex<Vec<u8>>> = Arc::default();
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = mpsc::unbounded_channel::<Result<Bytes, std::io::Error>>();
        let mut body = response.bytes_stream();
        let mut decoder = OnArrival::new(coding);
        let (wire_in, text_in, ended_in) = (Arc::clone(&wire), Arc::clone(&text), ended.clone());
        tokio::spawn(async move {
            while let Some(chunk) = body.next().await {
                let Ok(chunk) = chunk else {
                    return; // a broken body: `ended` stays false
                };
                wire_in.lock().unwrap().extend_from_slice(&chunk);
                let decoded = decoder.decode(&chunk);
                text_in.lock().unwrap().extend_from_slice(&decoded);
                if tx.send(Ok(Bytes::from(decoded))).is_err() {
                    return;
                }
            }
            ended_in.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let events = UnboundedReceiverStream::new(rx).eventsource().map(|e| {
            let e = e.expect("well-formed stream");
            Ev::new(&e.id, &e.event, &e.data)
        });
        Compressed {
            events: Box::pin(events),
            wire,
            text,
            ended,
        }
    }

    async fn next(&mut self) -> Ev {
        tokio::time::timeout(DEADLINE, self.events.next())
            .await
            .expect("an event in time")
            .expect("stream open")
    }

    async fn take(&mut self, n: usize) -> Vec<Ev> {
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            events.push(self.next().await);
        }
        events
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.text.lock().unwrap()).into_owned()
    }
}

/// Decodes a whole body strictly: one complete gzip member (CRC-32 and
/// length checked), one complete zstd frame, or one complete brotli stream
/// (its last meta-block read, nothing after it).
fn strict(coding: &str, wire: &[u8]) -> Vec<u8> {
    use std::io::Read;
    match coding {
        "br" => {
            let mut plain = Vec::new();
            let mut input = wire;
            brotli::BrotliDecompress(&mut input, &mut plain).expect("a complete brotli stream");
            assert!(input.is_empty(), "bytes after the brotli stream's end");
            plain
        }
        "gzip" => {
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(wire)
                .read_to_end(&mut plain)
                .expect("a complete gzip member");
            plain
        }
        _ => {
            // One frame: after it, the decoder would have to start another.
            let mut decoder = zstd::stream::raw::Decoder::new().unwrap();
            let mut plain = vec![0u8; 1 << 20];
            let mut input = zstd::stream::raw::InBuffer::around(wire);
            let mut written = 0;
            loop {
                let mut output = zstd::stream::raw::OutBuffer::around_pos(&mut plain, written);
                let hint = zstd::stream::raw::Operation::run(&mut decoder, &mut input, &mut output)
                    .expect("a valid zstd frame");
                written = output.pos();
                if hint == 0 {
                    break;
                }
                assert!(input.pos() < wire.len(), "the zstd frame is incomplete");
            }
            assert_eq!(input.pos(), wire.len(), "bytes after the first zstd frame");
            plain.truncate(written);
            plain
        }
    }
}

/// A dashboard metric: repetitive JSON, like most event streams.
fn metric(n: usize) -> String {
    format!(
        r#"{{"metric":"cpu.utilisation","host":"web-{:02}.eu-west","value":{}.{},"unit":"percent","tags":{{"env":"production","team":"platform"}},"seq":{n}}}"#,
        n % 17,
        20 + n % 60,
        n % 10
    )
}

async fn publish_all(server: &Server, topic: &str, range: std::ops::Range<usize>) -> Vec<Ev> {
    let mut published = Vec::new();
    for n in range {
        let data = metric(n);
        let id = server.publish_id(topic, &data).await;
        published.push(Ev::new(&id, "message", &data));
    }
    published
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_joining_at_any_moment_decode_the_same_events_on_arrival() {
    let server = Server::start().await;
    for coding in SHARED {
        let topic = format!("join-{coding}");
        let path = format!("/topics/{topic}");
        let mut first = Compressed::open(&server, &path, coding, None).await;
        let mut reference = server.subscribe(&path).await;
        // One at a time: each decodes on its own arrival.
        let mut published = Vec::new();
        for n in 0..5 {
            let event = publish_all(&server, &topic, n..n + 1).await.remove(0);
            assert_eq!(first.next().await, event, "{coding}");
            published.push(event);
        }
        // A stream that joins mid-segment, then a burst across segments,
        // with more streams joining halfway, resuming after event 3 and
        // asking for the last 20.
        let mut joined = Compressed::open(&server, &path, coding, None).await;
        published.extend(publish_all(&server, &topic, 5..150).await);
        let mut halfway = Compressed::open(&server, &path, coding, None).await;
        let mut resumed = Compressed::open(&server, &path, coding, Some(&published[2].id)).await;
        let mut last = Compressed::open(&server, &format!("{path}?last=20"), coding, None).await;
        published.extend(publish_all(&server, &topic, 150..300).await);
        // And one more, which every stream decodes on arrival.
        published.extend(publish_all(&server, &topic, 300..301).await);

        assert_eq!(reference.take(301).await, published, "identity");
        assert_eq!(first.take(296).await, published[5..], "{coding} first");
        assert_eq!(joined.take(296).await, published[5..], "{coding} joined");
        assert_eq!(
            halfway.take(151).await,
            published[150..],
            "{coding} halfway"
        );
        assert_eq!(resumed.take(298).await, published[3..], "{coding} resumed");
        assert_eq!(last.take(171).await, published[130..], "{coding} last=20");
        // The stream in step with the topic's chain paid far less than one
        // that compressed every event alone would (~150 bytes each here).
        let bytes = first.wire.lock().unwrap().len();
        assert!(bytes < 301 * 90, "{coding}: {bytes} bytes for 301 events");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_between_events_keep_every_stream_decodable() {
    let server = Server::start_with(|c| c.transports.heartbeat = Duration::from_millis(50)).await;
    for coding in SHARED {
        let topic = format!("hb-{coding}");
        let path = format!("/topics/{topic}");
        let mut a = Compressed::open(&server, &path, coding, None).await;
        let mut b = Compressed::open(&server, &path, coding, None).await;
        for round in 0..4 {
            // A few events close together, then quiet until both streams
            // have sent two more heartbeats.
            let published = publish_all(&server, &topic, round * 10..round * 10 + 3).await;
            assert_eq!(a.take(3).await, published, "{coding} round {round}");
            assert_eq!(b.take(3).await, published, "{coding} round {round}");
            let beats = |s: &Compressed| s.text().matches(": heartbeat\n\n").count();
            let (at_a, at_b) = (beats(&a), beats(&b));
            wait_for("two heartbeats on each stream", || {
                beats(&a) >= at_a + 2 && beats(&b) >= at_b + 2
            })
            .await;
        }
        assert!(a.text().ends_with(": heartbeat\n\n"), "{coding}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_then_live_events_decode_on_a_compressed_stream() {
    let server = Server::start().await;
    for coding in SHARED {
        let topic = format!("reset-{coding}");
        let path = format!("/topics/{topic}");
        let mut published = publish_all(&server, &topic, 0..3).await;
        let epoch = published[0].id.split('.').nth(1).unwrap().to_owned();
        // A position from another epoch: `reset`, then everything retained.
        let mut stream = Compressed::open(&server, &path, coding, Some("2.zzzzzz")).await;
        let reset = stream.next().await;
        assert_eq!(reset.event, "reset", "{coding}");
        assert_eq!(reset.id, format!("0.{epoch}"), "{coding}");
        assert_eq!(stream.take(3).await, published, "{coding}");
        for n in 3..40 {
            let event = publish_all(&server, &topic, n..n + 1).await.remove(0);
            assert_eq!(stream.next().await, event, "{coding} live {n}");
            published.push(event);
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_topic_streams_write_their_own_ids_and_decode_on_arrival() {
    let server = Server::start().await;
    let path = "/events?topic=ma&topic=mb";
    let mut reference = server.subscribe(path).await;
    let mut streams = Vec::new();
    for coding in SHARED {
        streams.push((coding, Compressed::open(&server, path, coding, None).await));
    }
    for n in 0..60 {
        let topic = if n % 3 == 0 { "mb" } else { "ma" };
        server.publish_id(topic, &metric(n)).await;
        let want = reference.next().await;
        assert!(want.id.starts_with(&format!("{topic}/")), "{want:?}");
        assert_eq!(want.data, metric(n));
        for (coding, stream) in &mut streams {
            assert_eq!(stream.next().await, want, "{coding} event {n}");
        }
    }
    server.stop().await;
}

/// A stream the server ends (here: shutdown) is a complete body: a gzip
/// member whose trailer holds the right CRC-32 and length, one complete
/// zstd frame, a brotli stream ending in its last meta-block; single-topic and multi-topic, with heartbeats in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_ends_cleanly_is_a_complete_gzip_member_zstd_frames_or_brotli_stream() {
    let server = Server::start_with(|c| c.transports.heartbeat = Duration::from_millis(100)).await;
    let mut streams = Vec::new();
    for coding in SHARED {
        for path in ["/topics/end", "/events?topic=end&topic=other"] {
            streams.push((coding, Compressed::open(&server, path, coding, None).await));
        }
    }
    let published = publish_all(&server, "end", 0..40).await;
    for (coding, stream) in &mut streams {
        let got: Vec<String> = stream.take(40).await.into_iter().map(|e| e.data).collect();
        let want: Vec<String> = published.iter().map(|e| e.data.clone()).collect();
        assert_eq!(got, want, "{coding}");
    }
    wait_for("a heartbeat on every stream", || {
        streams
            .iter()
            .all(|(_, s)| s.text().contains(": heartbeat\n\n"))
    })
    .await;
    publish_all(&server, "end", 40..41).await;
    for (_, stream) in &mut streams {
        stream.next().await;
    }
    server.stop().await;
    for (coding, stream) in &streams {
        wait_for("the body to end", || {
            stream.ended.load(std::sync::atomic::Ordering::SeqCst)
        })
        .await;
        let wire = stream.wire.lock().unwrap().clone();
        let text = stream.text.lock().unwrap().clone();
        assert_eq!(strict(coding, &wire), text, "{coding}");
    }
}

/// Text that compresses little (about 6 bits a byte): letters, digits and
/// `-_` from a linear congruential sequence.
fn noise(seed: usize, len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut x = (seed as u64).wrapping_mul(2_862_933_555_777_941_757) ^ 3_037_000_493;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ALPHABET[(x >> 58) as usize] as char
        })
        .collect()
}

/// Publishes `n` 8 KiB events to `u`, each read by `reference` (identity)
/// and by every stream of `streams` before the next is published, so the
/// units they need are made by then. The events, as `reference` saw them.
async fn fill(
    server: &Server,
    reference: &mut SseClient,
    streams: &mut [Compressed],
    n: usize,
) -> Vec<Ev> {
    let mut stored = Vec::new();
    for n in 0..n {
        let response = server
            .client
            .post(server.url("/topics/u"))
            .body(noise(n, 8 * 1024))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let event = reference.next().await;
        for stream in streams.iter_mut() {
            assert_eq!(stream.next().await, event);
        }
        stored.push(event);
    }
    stored
}

/// How many of `stored` (all of `u`'s events) the hub still retains: a
/// resumer from the first hears `reset` naming the oldest retained.
async fn retained(server: &Server, stored: &[Ev]) -> usize {
    let mut resumer = server
        .resume("/events?topic=u&topic=v", &stored[0].id)
        .await;
    let reset = resumer.next().await;
    assert_eq!(reset.event, "reset", "{reset:?}");
    let reset: serde_json::Value = serde_json::from_str(&reset.data).unwrap();
    assert_eq!(reset["reason"], "trimmed", "{reset}");
    let oldest = common::seq_of(reset["oldest"].as_str().unwrap()) as usize;
    stored.len() + 1 - oldest
}

/// The units the hub caches on events count against `--max-retained-bytes`
/// with the events themselves: with a multi-topic stream per coding (each
/// caching a unit of every event's body), the same budget retains far fewer
/// events than with identity streams only (the oldest make room). A stream
/// that replays those retained gets units made for it alone, and decodes
/// them exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_compressed_units_count_against_the_retained_bytes_budget() {
    const BUDGET: usize = 512 * 1024;
    let path = "/events?topic=u&topic=v";
    let configure = |c: &mut Config| {
        c.storage.max_retained_bytes = BUDGET;
        c.storage.retention_age = Duration::from_secs(600);
    };
    let plain_hub = Server::start_with(configure).await;
    let mut reference = plain_hub.subscribe(path).await;
    let all = fill(&plain_hub, &mut reference, &mut [], 100).await;
    let plain = retained(&plain_hub, &all).await;
    plain_hub.stop().await;

    let server = Server::start_with(configure).await;
    let mut reference = server.subscribe(path).await;
    let mut streams = Vec::new();
    for coding in SHARED {
        streams.push(Compressed::open(&server, path, coding, None).await);
    }
    let all = fill(&server, &mut reference, &mut streams, 40).await;
    let stored = &all[all.len() - retained(&server, &all).await..];
    eprintln!(
        "{plain} events fit the budget alone, {} with units",
        stored.len()
    );
    // An event's frame is about 8 KiB, and each coding's unit of it about
    // 6 KiB: some 64 events alone, some 20 with three units each.
    assert!((60..=64).contains(&plain), "{plain} events alone");
    assert!(
        (14..=26).contains(&stored.len()),
        "{} events with three units each",
        stored.len()
    );

    for coding in SHARED {
        let mut late = Compressed::open(
            &server,
            &format!("/topics/u?last={}", stored.len()),
            coding,
            None,
        )
        .await;
        let replayed = late.take(stored.len()).await;
        let data: Vec<&str> = replayed.iter().map(|e| e.data.as_str()).collect();
        let want: Vec<&str> = stored.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, want, "{coding}");
    }
    server.stop().await;
}

/// Publishes the next `n` metrics to each of `topics` in turn, each read by
/// its stream before the next is published.
async fn publish_to_each(
    server: &Server,
    topics: &[&str],
    streams: &mut [&mut Compressed],
    range: std::ops::Range<usize>,
) {
    for n in range {
        for (topic, stream) in topics.iter().zip(streams.iter_mut()) {
            let event = publish_all(server, topic, n..n + 1).await.remove(0);
            assert_eq!(stream.next().await, event, "{topic} {n}");
        }
    }
}

/// `--max-compression-chains` bounds the topics' chained compressors: past
/// it a topic's streams write events compressed alone (decoding as well,
/// larger), and a compressor given back is taken by the next topic that
/// wants one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chained_compressors_past_their_limit_leave_streams_on_units_compressed_alone() {
    for coding in SHARED {
        let server = Server::start_with(|c| c.transports.max_compression_chains = 1).await;
        let (a, b) = (format!("chain-a-{coding}"), format!("chain-b-{coding}"));
        let mut on_a = Compressed::open(&server, &format!("/topics/{a}"), coding, None).await;
        let mut on_b = Compressed::open(&server, &format!("/topics/{b}"), coding, None).await;
        let topics = [a.as_str(), b.as_str()];
        // `a` publishes first, so it holds the one compressor.
        let start = (
            on_a.wire.lock().unwrap().len(),
            on_b.wire.lock().unwrap().len(),
        );
        publish_to_each(&server, &topics, &mut [&mut on_a, &mut on_b], 0..60).await;
        let chained = on_a.wire.lock().unwrap().len() - start.0;
        let alone = on_b.wire.lock().unwrap().len() - start.1;
        eprintln!("{coding}: 60 events chained {chained} bytes, alone {alone}");
        assert!(
            chained * 2 < alone,
            "{coding}: chained {chained}, alone {alone}"
        );
        // `a`'s stream leaves (its reader drops the body at the next chunk,
        // and the hub notices at a write after that): its compressor goes
        // to `b`.
        drop(on_a);
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let mut n = 60;
        loop {
            publish_all(&server, &a, n..n + 1).await;
            let before = on_b.wire.lock().unwrap().len();
            publish_to_each(&server, &topics[1..], &mut [&mut on_b], n..n + 20).await;
            n += 20;
            let batch = on_b.wire.lock().unwrap().len() - before;
            if batch * 2 * 3 < alone {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{coding}: b never got a compressor ({batch} bytes for 20 events)"
            );
        }
        server.stop().await;
    }
}

/// curl's own decoders (`--compressed`) read each coding's stream, single-
/// and multi-topic, as the events arrive, and the end the server writes
/// when it stops is a clean end to curl (exit status 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_decodes_every_coding_as_events_arrive_and_ends_cleanly() {
    use std::process::{Command, Stdio};
    let server = Server::start().await;
    let mut curls = Vec::new();
    for coding in SHARED {
        for path in ["/topics/curl", "/events?topic=curl&topic=other"] {
            let out = std::env::temp_dir().join(format!(
                "crier-curl-{}-{coding}-{}.out",
                std::process::id(),
                curls.len()
            ));
            let child = Command::new("curl")
                .args(["-s", "-S", "-N", "--compressed", "-H"])
                .arg(format!("accept-encoding: {coding}"))
                .arg("-o")
                .arg(&out)
                .arg(server.url(path))
                .stdin(Stdio::null())
                .spawn()
                .expect("curl");
            curls.push((coding, path, child, out));
        }
    }
    let read = |out: &std::path::Path| std::fs::read_to_string(out).unwrap_or_default();
    wait_for("every curl's stream open", || {
        curls
            .iter()
            .all(|(_, _, _, out)| read(out).contains(": crier stream open"))
    })
    .await;
    let published = publish_all(&server, "curl", 0..30).await;
    let last = format!("data: {}\n\n", published[29].data);
    wait_for("every event decoded by every curl", || {
        curls
            .iter()
            .all(|(_, _, _, out)| read(out).ends_with(&last))
    })
    .await;
    server.stop().await;
    for (coding, path, mut child, out) in curls {
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{coding} {path}: curl exited {status:?}");
        let text = read(&out);
        let _ = std::fs::remove_file(&out);
        let data: Vec<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .collect();
        let want: Vec<&str> = published.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, want, "{coding} {path}");
    }
}

/// The subscriber `httpx_sse_receives_a_zstd_stream` runs: Python's httpx
/// with `zstandard` (it offers zstd itself) and httpx-sse, printing
/// `open CODING` once the answer's head is in, then each event as JSON.
const HTTPX_SSE: &str = r#"
import json, sys
import httpx
from httpx_sse import connect_sse
url, count = sys.argv[1], int(sys.argv[2])
with httpx.Client(timeout=httpx.Timeout(10.0)) as client:
    with connect_sse(client, "GET", url) as source:
        print("open", source.response.headers.get("content-encoding"), flush=True)
        # httpx-sse also yields an empty event at every blank line after an
        # `id:` or `retry:` (the preamble, heartbeats), where EventSource
        # dispatches nothing: not events of the stream.
        events = (sse for sse in source.iter_sse() if sse.data)
        for n, sse in enumerate(events, 1):
            print(json.dumps({"id": sse.id, "event": sse.event, "data": sse.data}), flush=True)
            if n == count:
                break
"#;

/// httpx (whose zstd decoder reads only the first frame of a response)
/// with httpx-sse receives every event of a zstd stream, single-topic
/// (replayed events, then live ones on the topic's chain) and multi-topic
/// (its own ids before each body), with heartbeats in between: exactly
/// what a plain stream of the same subscription gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httpx_sse_receives_a_zstd_stream() {
    use tokio::io::AsyncBufReadExt;
    let probe = std::process::Command::new("python3")
        .args(["-c", "import httpx, httpx_sse, zstandard"])
        .output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "this test needs python3 with httpx-sse and httpx[zstd]: \
         `pip install httpx-sse 'httpx[zstd]'` (.ci/run installs them): {probe:?}"
    );
    let server = Server::start_with(|c| c.transports.heartbeat = Duration::from_millis(150)).await;
    let mut published = publish_all(&server, "py", 0..2).await;
    let paths = ["/topics/py?last=2", "/events?topic=py&topic=other"];
    let mut subscribers = Vec::new();
    for (path, count) in paths.into_iter().zip([5, 3]) {
        let mut child = tokio::process::Command::new("python3")
            .args(["-c", HTTPX_SSE, &server.url(path), &count.to_string()])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let open = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("httpx opens its stream in time")
            .unwrap();
        assert_eq!(open.as_deref(), Some("open zstd"), "{path}");
        // A plain subscriber of the same URL: what every event must be.
        let reference = server.subscribe(path).await;
        subscribers.push((path, count, child, lines, reference));
    }
    // What the plain subscribers get, read as it comes.
    let mut plain: Vec<Vec<Ev>> = vec![Vec::new(); subscribers.len()];
    for n in 2..5 {
        published.extend(publish_all(&server, "py", n..n + 1).await);
        for (sub, got) in subscribers.iter_mut().zip(&mut plain) {
            while got.last().is_none_or(|e| e.data != metric(n)) {
                got.push(sub.4.next().await);
            }
        }
        // Quiet for a heartbeat between two of them.
        if n == 3 {
            let deadline = tokio::time::Instant::now() + DEADLINE;
            while !subscribers[0].4.raw_text().contains(": heartbeat") {
                assert!(tokio::time::Instant::now() < deadline, "no heartbeat");
                subscribers[0]
                    .4
                    .expect_quiet(Duration::from_millis(50))
                    .await;
            }
        }
    }
    for ((path, count, mut child, mut lines, _), plain) in subscribers.into_iter().zip(plain) {
        let mut got = Vec::new();
        for _ in 0..count {
            let line = tokio::time::timeout(DEADLINE, lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("{path}: httpx-sse got {got:?} and then nothing"))
                .unwrap()
                .unwrap_or_else(|| panic!("{path}: httpx-sse ended after {got:?}"));
            let event: serde_json::Value = serde_json::from_str(&line).unwrap();
            got.push(Ev::new(
                event["id"].as_str().unwrap(),
                event["event"].as_str().unwrap(),
                event["data"].as_str().unwrap(),
            ));
        }
        assert_eq!(got, plain, "{path}");
        let want = &published[published.len() - count..];
        let data: Vec<&str> = got.iter().map(|e| e.data.as_str()).collect();
        let want_data: Vec<&str> = want.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, want_data, "{path}");
        let status = tokio::time::timeout(DEADLINE, child.wait())
            .await
            .expect("httpx-sse exits")
            .unwrap();
        assert!(status.success(), "{path}: {status:?}");
    }
    server.stop().await;
}
