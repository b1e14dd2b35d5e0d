//! A real headless Chromium against crier over HTTPS: many EventSources on
//! one HTTP/2 connection, the browser's own decompression of the event
//! streams, and EventSource's own reconnection across a restart of the hub;
//! access control as a browser meets it (the auth cookie from a listed and
//! an unlisted origin of one site, crier.js with tickets across token expiry
//! and a restart, the demo page on a locked hub).
//!
//! Needs `/usr/bin/chromium` (Debian: `apt-get install -y chromium`) and, for
//! the restart, `redis-server`.
//!
//! The browser is driven over the DevTools protocol with a small client of
//! its own (below) that keeps every message as a `serde_json::Value`: the
//! CDP crates (chromiumoxide, headless_chrome) decode messages through
//! untagged enums, which cannot decode a float once serde_json's
//! `arbitrary_precision` feature is on, and crier turns it on.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use common::process::Process;
use common::redis::RedisServer;
use common::tls::TestCerts;
use common::{Config, DEADLINE, Server};

/// The browser the tests drive.
const CHROMIUM: &str = "/usr/bin/chromium";

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_multiplexes_twelve_event_sources_over_http2_with_compression() {
    let certs = TestCerts::new();
    let (cert, key) = (certs.cert.clone(), certs.key.clone());
    let server = Server::start_with(move |config: &mut Config| {
        config.listen.tls_cert = Some(cert);
        config.listen.tls_key = Some(key);
    })
    .await;
    let origin = format!("https://{}", server.addr);
    let publisher = https_client(&certs.ca_cert);
    let chromium = Chromium::launch().await;
    let tab = chromium.open(&format!("{origin}/crier.js")).await;

    // Twelve EventSources on one origin: over HTTP/1.1 only six could be
    // open at once, and the other six would never receive anything.
    const TOPICS: usize = 12;
    let topics: Vec<String> = (0..TOPICS).map(|n| format!("b{n}")).collect();
    tab.evaluate::<bool>(&subscribe_script(&topics)).await;
    tab.poll::<usize>("window.opened", "all 12 EventSources open", |&n| {
        n == TOPICS
    })
    .await;

    // Publish to every topic at once, each topic's events in order.
    let expected: BTreeMap<String, Vec<(String, String)>> = join_all(topics.iter().map(|topic| {
        let (publisher, origin) = (&publisher, &origin);
        async move {
            let mut sent = Vec::new();
            for data in payloads(topic) {
                let id = publish(publisher, origin, topic, &data).await;
                sent.push((id, data));
            }
            (topic.clone(), sent)
        }
    }))
    .await
    .into_iter()
    .collect();
    let per_topic = expected["b0"].len();

    let got: BTreeMap<String, Vec<(String, String)>> = tab
        .poll("window.got", "every event on every EventSource", |got| {
            received_all(got, per_topic)
        })
        .await;
    for topic in &topics {
        assert_eq!(
            got[topic], expected[topic],
            "EventSource on /topics/{topic} got exactly what was published, byte for byte"
        );
    }
    let resets: Vec<Value> = tab.evaluate("JSON.stringify(window.resets)").await;
    assert_eq!(resets, Vec::<Value>::new(), "no reset");
    let errors: usize = tab.evaluate("JSON.stringify(window.errors)").await;
    assert_eq!(errors, 0, "no EventSource failed or reconnected");

    // What the browser's network stack saw for each EventSource.
    let responses = tab
        .wait_events(
            "Network.responseReceived",
            "a response per EventSource",
            |events| event_sources(events).len() >= TOPICS,
        )
        .await;
    let mut connections = Vec::new();
    for response in event_sources(&responses).iter().map(|e| &e["response"]) {
        let url = response["url"].as_str().unwrap_or_default();
        assert!(url.starts_with(&format!("{origin}/topics/b")), "{url}");
        assert_eq!(response["status"], 200, "{url}");
        assert_eq!(response["protocol"], "h2", "{url} came over HTTP/2");
        let encoding = header(&response["headers"], "content-encoding");
        assert!(
            matches!(encoding.as_deref(), Some("zstd" | "br" | "gzip")),
            "{url} was compressed, and the browser decoded it: content-encoding {encoding:?}"
        );
        assert_eq!(
            header(&response["headers"], "content-type").as_deref(),
            Some("text/event-stream"),
            "{url}"
        );
        connections.push(response["connectionId"].to_string());
    }
    connections.sort();
    connections.dedup();
    assert_eq!(
        connections.len(),
        1,
        "all twelve streams share one connection: {connections:?}"
    );

    drop(chromium);
    server.stop().await;
}

/// The browser's own decoders take the units the hub compressed once per
/// event, in zstd, gzip and brotli (over HTTP/2, and brotli over HTTP/1.1
/// too): EventSources that joined at different moments (one resuming with
/// `lastEventId`, one on two topics), heartbeats between events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_decodes_shared_compressed_units_whenever_its_event_sources_joined() {
    use crier::coding::Codec;
    for (coding, protocol) in [
        (Codec::Zstd, "h2"),
        (Codec::Gzip, "h2"),
        (Codec::Brotli, "h2"),
        (Codec::Brotli, "http/1.1"),
    ] {
        let certs = TestCerts::new();
        let (cert, key) = (certs.cert.clone(), certs.key.clone());
        let server = Server::start_with(move |config: &mut Config| {
            config.listen.tls_cert = Some(cert);
            config.listen.tls_key = Some(key);
            config.transports.compression = vec![Some(coding)];
            config.transports.heartbeat = Duration::from_millis(100);
        })
        .await;
        let origin = format!("https://{}", server.addr);
        let client = https_client(&certs.ca_cert);
        let chromium = match protocol {
            "h2" => Chromium::launch().await,
            _ => Chromium::launch_with(&["--disable-http2"]).await,
        };
        let tab = chromium.open(&format!("{origin}/")).await;
        let row = |n: usize| {
            format!(
                r#"{{"metric":"cpu","host":"web-{:02}","value":{n},"tags":["alpha","beta"]}}"#,
                n % 7
            )
        };
        let mut sent = Vec::new();
        let mut publish_rows = async |range: std::ops::Range<usize>| {
            for n in range {
                let data = row(n);
                sent.push((publish(&client, &origin, "shared", &data).await, data));
            }
            sent.clone()
        };
        let open = |name: &str, path: &str| {
            format!(
                r#"(() => {{
  window.got = window.got || {{}}; window.opened = window.opened || 0; window.errors = window.errors || 0;
  window.got["{name}"] = [];
  const es = new EventSource("{path}");
  es.onopen = () => {{ window.opened++; }};
  es.onerror = () => {{ window.errors++; }};
  es.onmessage = (e) => {{ window.got["{name}"].push([e.lastEventId, e.data]); }};
  return JSON.stringify(true);
}})()"#
            )
        };
        tab.evaluate::<bool>(&open("first", "/topics/shared")).await;
        tab.poll::<usize>("window.opened", "one EventSource open", |&n| n == 1)
            .await;
        publish_rows(0..5).await;
        tab.evaluate::<bool>(&open("joined", "/topics/shared"))
            .await;
        tab.poll::<usize>("window.opened", "two EventSources open", |&n| n == 2)
            .await;
        let so_far = publish_rows(5..10).await;
        let resume = format!("/topics/shared?lastEventId={}", so_far[2].0);
        tab.evaluate::<bool>(&open("resumed", &resume)).await;
        tab.poll::<usize>("window.opened", "three EventSources open", |&n| n == 3)
            .await;
        // A multi-topic stream: its own id lines, the events' shared bodies.
        tab.evaluate::<bool>(&open("multi", "/events?topic=shared&topic=elsewhere"))
            .await;
        tab.poll::<usize>("window.opened", "four EventSources open", |&n| n == 4)
            .await;
        // Quiet for heartbeats: a stream of our own sees three, so the
        // browser's streams have sent theirs too.
        let mut watcher = client
            .get(format!("{origin}/topics/shared"))
            .send()
            .await
            .unwrap();
        let mut text = String::new();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while text.matches(": heartbeat").count() < 3 {
            let chunk = tokio::time::timeout_at(deadline, watcher.chunk())
                .await
                .expect("heartbeats in time")
                .unwrap()
                .expect("the stream stays open");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        let all = publish_rows(10..20).await;
        let got: BTreeMap<String, Vec<(String, String)>> = tab
            .poll(
                "window.got",
                "every event on every EventSource",
                |got: &BTreeMap<String, Vec<(String, String)>>| {
                    got.get("first").is_some_and(|e| e.len() >= 20)
                        && got.get("joined").is_some_and(|e| e.len() >= 15)
                        && got.get("resumed").is_some_and(|e| e.len() >= 17)
                        && got.get("multi").is_some_and(|e| e.len() >= 10)
                },
            )
            .await;
        // Its ids name both topics' positions, in topic order.
        let multi: Vec<(String, String)> = all[10..]
            .iter()
            .map(|(id, data)| (format!("shared/0,{id}"), data.clone()))
            .collect();
        assert_eq!(got["multi"], multi, "{coding:?} over {protocol} multi");
        assert_eq!(got["first"], all, "{coding:?} over {protocol} first");
        assert_eq!(got["joined"], all[5..], "{coding:?} over {protocol} joined");
        assert_eq!(
            got["resumed"],
            all[3..],
            "{coding:?} over {protocol} resumed"
        );
        let errors: usize = tab.evaluate("JSON.stringify(window.errors)").await;
        assert_eq!(
            errors, 0,
            "{coding:?} over {protocol}: no EventSource failed or reconnected"
        );
        let responses = tab
            .wait_events(
                "Network.responseReceived",
                "a response per EventSource",
                |events| event_sources(events).len() >= 4,
            )
            .await;
        for response in event_sources(&responses).iter().map(|e| &e["response"]) {
            assert_eq!(
                header(&response["headers"], "content-encoding").as_deref(),
                Some(coding.token()),
                "{coding:?} over {protocol}"
            );
            assert_eq!(response["protocol"], protocol, "{coding:?} over {protocol}");
        }
        drop(watcher);
        drop(chromium);
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_resumes_exactly_after_the_hub_restarts() {
    let redis = RedisServer::start();
    let certs = TestCerts::new();
    let (cert, key) = (path_str(&certs.cert), path_str(&certs.key));
    let redis_url = redis.url();
    let args = [
        "--redis",
        redis_url.as_str(),
        "--tls-cert",
        cert.as_str(),
        "--tls-key",
        key.as_str(),
        "--retry",
        "200ms",
    ];
    let mut hub = tokio::task::block_in_place(|| Process::start(&args));
    let origin = hub.base.clone();
    assert!(
        origin.starts_with("https://"),
        "a TLS hub says so: {origin}"
    );
    let addr = origin.trim_start_matches("https://").to_owned();
    let publisher = https_client(&certs.ca_cert);
    let chromium = Chromium::launch().await;
    let tab = chromium.open(&format!("{origin}/crier.js")).await;

    let topic = "restart";
    tab.evaluate::<bool>(&subscribe_script(&[topic.to_owned()]))
        .await;
    tab.poll::<usize>("window.opened", "the EventSource opens", |&n| n == 1)
        .await;
    let mut expected = Vec::new();
    for n in 1..=5 {
        let data = format!("event {n} before the restart");
        expected.push((publish(&publisher, &origin, topic, &data).await, data));
    }
    let got = tab.events_of(topic, 5).await;
    assert_eq!(got, expected, "events 1..5 before the restart");

    // A second node on the same Redis takes the publishes while the first
    // is down.
    let other = tokio::task::block_in_place(|| Process::start(&args));
    let other_origin = other.base.clone();
    hub.terminate();
    let status = tokio::task::block_in_place(|| hub.wait_exit(DEADLINE));
    assert!(
        status.success(),
        "crier exits cleanly on SIGTERM: {status:?}"
    );
    drop(hub);
    for n in 6..=10 {
        let data = format!("event {n} while the hub is down");
        expected.push((publish(&publisher, &other_origin, topic, &data).await, data));
    }

    // EventSource keeps trying while nothing listens on the hub's address.
    tab.wait_events(
        "Network.loadingFailed",
        "a reconnection attempt refused while the hub is down",
        |failures| {
            event_sources(failures)
                .iter()
                .any(|f| f["errorText"] == "net::ERR_CONNECTION_REFUSED")
        },
    )
    .await;

    // The same hub again, on the same address; the page reconnects by itself.
    let _hub = tokio::task::block_in_place(|| FixedPortCrier::start(&addr, &args));
    let got = tab.events_of(topic, 10).await;
    assert_eq!(
        got, expected,
        "after the restart, exactly the events published while the hub was down"
    );
    for n in 11..=12 {
        let data = format!("event {n} after the restart");
        expected.push((publish(&publisher, &origin, topic, &data).await, data));
    }
    let got = tab.events_of(topic, 12).await;
    assert_eq!(got, expected, "events 1..12, no gap, no duplicate");

    // Nothing more may follow (a late duplicate, a reset).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = tab.events_of(topic, 12).await;
    assert_eq!(got, expected, "still exactly events 1..12");
    let resets: Vec<Value> = tab.evaluate("JSON.stringify(window.resets)").await;
    assert_eq!(resets, Vec::<Value>::new(), "no reset");
    let opened: usize = tab.evaluate("JSON.stringify(window.opened)").await;
    let errors: usize = tab.evaluate("JSON.stringify(window.errors)").await;
    assert!(
        opened >= 2 && errors >= 1,
        "EventSource reconnected by itself: {opened} opens, {errors} errors"
    );

    // The first request started from now; every reconnection that reached
    // a hub carried the id of event 5 (as sent on the wire).
    let requests = tab.events("Network.requestWillBeSent");
    let sent = tab.events("Network.requestWillBeSentExtraInfo");
    let last_event_ids: Vec<Option<String>> = event_sources(&requests)
        .iter()
        .filter_map(|request| {
            sent.iter()
                .find(|s| s["requestId"] == request["requestId"])
                .map(|s| header(&s["headers"], "last-event-id"))
        })
        .collect();
    assert!(
        last_event_ids.len() >= 2,
        "the first request and at least one reconnection: {last_event_ids:?}"
    );
    assert_eq!(last_event_ids[0], None, "the first request starts from now");
    for id in &last_event_ids[1..] {
        assert_eq!(
            id.as_deref(),
            Some(expected[4].0.as_str()),
            "every reconnection resumes after event 5: {last_event_ids:?}"
        );
    }

    drop(chromium);
    drop(other);
    drop(redis);
}

/// A page that subscribes with `new WebSocket(...)` and reconnects with the
/// last id it saw (`lastEventId=`) whenever its socket closes: across a
/// restart of the hub (on Redis, a second node taking the publishes while
/// it is down) it receives every event exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_page_resumes_exactly_after_the_hub_restarts() {
    let redis = RedisServer::start();
    let redis_url = redis.url();
    let args = ["--redis", redis_url.as_str()];
    let mut hub = tokio::task::block_in_place(|| Process::start(&args));
    let origin = hub.base.clone();
    let addr = origin.trim_start_matches("http://").to_owned();
    let publisher = common::client();
    let chromium = Chromium::launch().await;
    let tab = chromium.open(&format!("{origin}/")).await;

    let topic = "ws-restart";
    let script = format!(
        r#"
        window.wsGot = []; window.wsOpens = 0; window.wsResets = []; window.wsLast = null;
        function connect() {{
            const from = window.wsLast === null ? '' : '?lastEventId=' + encodeURIComponent(window.wsLast);
            const ws = new WebSocket('ws://' + location.host + '/topics/{topic}' + from);
            ws.onmessage = (m) => {{
                const frame = JSON.parse(m.data);
                if (frame.type === 'open') {{
                    window.wsOpens++;
                    if (frame.id !== undefined) window.wsLast = frame.id;
                }} else if (frame.type === 'event') {{
                    window.wsGot.push([frame.id, frame.data]);
                    window.wsLast = frame.id;
                }} else if (frame.type === 'reset') {{
                    window.wsResets.push(frame);
                    window.wsLast = frame.id;
                }}
            }};
            ws.onclose = () => setTimeout(connect, 200);
        }}
        connect();
        'true'
        "#
    );
    tab.evaluate::<bool>(&script).await;
    tab.poll::<usize>("window.wsOpens", "the WebSocket opens", |&n| n == 1)
        .await;
    let got = |n: usize| {
        let tab = &tab;
        async move {
            let got: Vec<(String, String)> = tab
                .poll(
                    "window.wsGot",
                    "the page's events",
                    |got: &Vec<(String, String)>| got.len() >= n,
                )
                .await;
            got
        }
    };
    let mut expected = Vec::new();
    for n in 1..=5 {
        let data = format!("event {n} before the restart");
        expected.push((publish(&publisher, &origin, topic, &data).await, data));
    }
    assert_eq!(got(5).await, expected, "events 1..5 before the restart");

    let other = tokio::task::block_in_place(|| Process::start(&args));
    let other_origin = other.base.clone();
    hub.terminate();
    let status = tokio::task::block_in_place(|| hub.wait_exit(DEADLINE));
    assert!(
        status.success(),
        "crier exits cleanly on SIGTERM: {status:?}"
    );
    drop(hub);
    for n in 6..=10 {
        let data = format!("event {n} while the hub is down");
        expected.push((publish(&publisher, &other_origin, topic, &data).await, data));
    }
    let _hub = tokio::task::block_in_place(|| FixedPortCrier::start(&addr, &args));
    assert_eq!(
        got(10).await,
        expected,
        "after the restart, exactly the events published while the hub was down"
    );
    for n in 11..=12 {
        let data = format!("event {n} after the restart");
        expected.push((publish(&publisher, &origin, topic, &data).await, data));
    }
    assert_eq!(
        got(12).await,
        expected,
        "events 1..12, no gap, no duplicate"
    );
    // Nothing else came (a late duplicate, a replay): a last event arrives
    // right after event 12.
    let data = "the last event".to_owned();
    expected.push((publish(&publisher, &origin, topic, &data).await, data));
    assert_eq!(got(13).await, expected, "exactly events 1..13");
    let resets: Vec<Value> = tab.evaluate("JSON.stringify(window.wsResets)").await;
    assert_eq!(resets, Vec::<Value>::new(), "no reset");
    let opens: usize = tab.evaluate("JSON.stringify(window.wsOpens)").await;
    assert!(opens >= 2, "the page reconnected: {opens} opens");

    drop(chromium);
    drop(other);
    drop(redis);
}

/// crier.js's `transport` option: the same subscription over SSE, a
/// WebSocket and long-polling in one page gives the same events, ids and
/// data, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crier_js_gives_the_same_events_over_every_transport() {
    let server = Server::start().await;
    let chromium = Chromium::launch().await;
    let tab = chromium.open(&server.url("/")).await;
    let script = r#"(() => {
  window.tri = { sse: [], websocket: [], poll: [] }; window.triErrors = [];
  import("/crier.js").then(({ subscribe }) => {
    for (const transport of ["sse", "websocket", "poll"]) {
      subscribe({
        topics: ["tri"],
        transport,
        lastEventId: "0",
        onEvent: (e) => { window.tri[transport].push([e.topic, e.event, e.id, e.data]); },
        onError: (error) => { window.triErrors.push(transport + ": " + error.message); },
      });
    }
  }, (error) => { window.triErrors.push("import: " + error); });
  return JSON.stringify(true);
})()"#;
    tab.evaluate::<bool>(script).await;
    let mut expected = Vec::new();
    for n in 1..=3 {
        let data = format!("tri {n}");
        let id = server.publish_id("tri", &data).await;
        expected.push(("tri".to_owned(), "message".to_owned(), id, data));
    }
    type Got = std::collections::BTreeMap<String, Vec<(String, String, String, String)>>;
    let got: Got = tab
        .poll(
            "window.tri",
            "three events on every transport",
            |got: &Got| got.values().all(|events| events.len() >= 3),
        )
        .await;
    for (transport, events) in &got {
        assert_eq!(events, &expected, "{transport}");
    }
    // Nothing else came: a last event arrives right after the three.
    let id = server.publish_id("tri", "tri last").await;
    expected.push((
        "tri".to_owned(),
        "message".to_owned(),
        id,
        "tri last".to_owned(),
    ));
    let got: Got = tab
        .poll(
            "window.tri",
            "the last event on every transport",
            |got: &Got| got.values().all(|events| events.len() >= 4),
        )
        .await;
    for (transport, events) in &got {
        assert_eq!(events, &expected, "{transport}: nothing more");
    }
    let errors: Vec<String> = tab.evaluate("JSON.stringify(window.triErrors)").await;
    assert_eq!(errors, Vec::<String>::new());
    drop(chromium);
    server.stop().await;
}

/// Chromium offers permessage-deflate on every WebSocket and compresses
/// what it sends: the socket negotiates it (`ws.extensions`), a publish the
/// browser compressed is inflated, stored and acknowledged, and the
/// compressed events inflate in the browser to exactly the events
/// published, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_websocket_negotiates_permessage_deflate_both_ways() {
    let server = Server::start().await;
    let chromium = Chromium::launch().await;
    let tab = chromium.open(&server.url("/")).await;
    let data = "compressed by the browser ".repeat(80);
    let script = format!(
        r#"(() => {{
  window.pmd = {{ extensions: null, events: [], acks: [] }};
  const ws = new WebSocket('ws://' + location.host + '/topics/pmd');
  ws.onmessage = (m) => {{
    const frame = JSON.parse(m.data);
    if (frame.type === 'open') {{
      window.pmd.extensions = ws.extensions;
      ws.send(JSON.stringify({{ type: 'publish', topic: 'pmd', data: {data:?}, ref: 1 }}));
    }} else if (frame.type === 'event') {{
      window.pmd.events.push([frame.id, frame.data]);
    }} else if (frame.type === 'ack') {{
      window.pmd.acks.push(frame.id);
    }}
  }};
  return JSON.stringify(true);
}})()"#
    );
    tab.evaluate::<bool>(&script).await;
    let acks: Vec<String> = tab
        .poll(
            "window.pmd.acks",
            "the publish acknowledged",
            |acks: &Vec<String>| !acks.is_empty(),
        )
        .await;
    let second = server.publish_id("pmd", "published over HTTP").await;
    let expected = vec![
        (acks[0].clone(), data.clone()),
        (second, "published over HTTP".to_owned()),
    ];
    let got: Vec<(String, String)> = tab
        .poll(
            "window.pmd.events",
            "both events",
            |got: &Vec<(String, String)>| got.len() >= 2,
        )
        .await;
    assert_eq!(got, expected);
    let extensions: String = tab.evaluate("JSON.stringify(window.pmd.extensions)").await;
    assert_eq!(
        extensions,
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    );
    drop(chromium);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// The page
// ---------------------------------------------------------------------------

/// The demo page at `/`, driven through its own form: it shows events with
/// their ids and types, points out events of a type it does not listen for
/// (EventSource hides them) instead of skipping them silently, hears the type
/// it publishes itself, and shows a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_shows_events_and_says_what_it_cannot_hear() {
    let server = Server::start().await;
    let chromium = Chromium::launch().await;
    // The page subscribes on load, here to the topic its URL names.
    let tab = chromium
        .open(&format!("http://{}/?topic=page", server.addr))
        .await;
    let act = |script: &str| format!("(() => {{ {script}; return \"true\"; }})()");
    let rows = "[...document.querySelectorAll('#log .row')].map(r => r.textContent)";
    let has = |rows: &Vec<String>, text: &str| rows.iter().any(|r| r.contains(text));

    tab.poll::<String>(
        "document.getElementById('state').textContent",
        "the page's EventSource open",
        |state| state == "open",
    )
    .await;

    let one = server.publish_id("page", "first").await;
    server
        .publish_to("/topics/page?event=update", "second")
        .await;
    let three = server.publish_id("page", "third").await;
    let shown = tab
        .poll::<Vec<String>>(rows, "the third event shown", |rows| has(rows, "third"))
        .await;
    assert!(
        has(&shown, "first") && has(&shown, &format!("id {one}")),
        "{shown:#?}"
    );
    assert!(has(&shown, &format!("id {three}")), "{shown:#?}");
    assert!(
        !has(&shown, "second"),
        "EventSource hides unlistened types: {shown:#?}"
    );
    assert!(
        has(&shown, "\u{201c}page\u{201d}: 1 event (seq 2) not shown"),
        "the page says an event went unseen: {shown:#?}"
    );

    // Publishing a named event from the page's own form shows it.
    tab.evaluate::<bool>(&act("document.getElementById('pubTopic').value = 'page'; \
         document.getElementById('pubType').value = 'alert'; \
         document.getElementById('pubData').value = 'fourth'; \
         document.getElementById('pub').requestSubmit()"))
        .await;
    let shown = tab
        .poll::<Vec<String>>(rows, "the page's own event shown", |rows| {
            has(rows, "fourth")
        })
        .await;
    let fourth = shown.iter().find(|r| r.contains("fourth")).unwrap();
    assert!(
        fourth.contains("alert") && fourth.contains("id 4."),
        "{fourth}"
    );

    // A position from the future is reset, and the page says so.
    tab.evaluate::<bool>(&act("document.getElementById('sub').requestSubmit(); \
         document.querySelector('input[name=start][value=after]').checked = true; \
         document.getElementById('afterId').value = '99'; \
         document.getElementById('sub').requestSubmit()"))
        .await;
    let shown = tab
        .poll::<Vec<String>>(rows, "a reset shown", |rows| has(rows, "Position reset"))
        .await;
    assert!(has(&shown, "ahead of the newest event"), "{shown:#?}");
    server.stop().await;
}

/// A page on a listed origin of the same site (the hub and the pages are all
/// https://127.0.0.1, on different ports: different origins, one site)
/// subscribes with the auth cookie, which its script cannot read, and
/// receives exactly what is published; a page on an origin the hub does not
/// list is refused with 403 although the browser sends it the same cookie,
/// and hears nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_origin_subscribes_with_the_cookie_and_an_unlisted_one_is_refused() {
    let certs = TestCerts::new();
    let listed = page_server(&certs).await;
    let unlisted = page_server(&certs).await;
    let listed_origin = format!("https://{}", listed.addr);
    let unlisted_origin = format!("https://{}", unlisted.addr);
    let (cert, key) = (path_str(&certs.cert), path_str(&certs.key));
    let args = [
        "--tls-cert",
        cert.as_str(),
        "--tls-key",
        key.as_str(),
        "--allowed-origins",
        listed_origin.as_str(),
    ];
    let hub = tokio::task::block_in_place(|| {
        Process::start_with_env(&args, &[("CRIER_JWT_SECRET", SECRET)])
    });
    let hub_origin = hub.base.clone();
    let publisher = https_client(&certs.ca_cert);
    let chromium = Chromium::launch().await;
    let page = chromium.open(&format!("{listed_origin}/")).await;
    // HttpOnly: no script can read it; SameSite=Strict: sent only on
    // requests from the same site, which both pages are.
    page.call(
        "Network.setCookie",
        json!({
            "name": "crier_token",
            "value": token(&[], &["vault"]),
            "url": format!("{hub_origin}/"),
            "secure": true,
            "httpOnly": true,
            "sameSite": "Strict",
        }),
    )
    .await;
    let foreign = chromium.open(&format!("{unlisted_origin}/")).await;

    let stream = format!("{hub_origin}/topics/vault");
    page.evaluate::<bool>(&credentialed_subscribe_script(&stream))
        .await;
    foreign
        .evaluate::<bool>(&credentialed_subscribe_script(&stream))
        .await;
    page.poll::<usize>(
        "window.opened",
        "the listed page's EventSource open",
        |&n| n == 1,
    )
    .await;
    foreign
        .poll::<usize>(
            "window.errors",
            "the unlisted page's EventSource failed",
            |&n| n >= 1,
        )
        .await;

    let publish_token = token(&["vault"], &[]);
    let mut expected = Vec::new();
    for data in payloads("vault") {
        let id = publish_with(
            &publisher,
            &hub_origin,
            "vault",
            &data,
            Some(&publish_token),
        )
        .await;
        expected.push((id, data));
    }
    let got: Vec<(String, String)> = page
        .poll(
            "window.got",
            "every event on the listed page",
            |got: &Vec<(String, String)>| got.len() >= expected.len(),
        )
        .await;
    assert_eq!(
        got, expected,
        "the listed page got exactly what was published"
    );
    let got: Vec<(String, String)> = foreign.evaluate("JSON.stringify(window.got)").await;
    assert_eq!(got, vec![], "no event reached the unlisted page");
    let opened: usize = foreign.evaluate("JSON.stringify(window.opened)").await;
    assert_eq!(opened, 0, "the unlisted page's EventSource never opened");
    let cookie: String = page.evaluate("JSON.stringify(document.cookie)").await;
    assert_eq!(
        cookie, "",
        "the page's script cannot read the HttpOnly cookie"
    );

    // What the browser sent and got: the cookie went with the listed page's
    // request, and the answer let exactly that origin read with credentials.
    let (request, response) = page.event_source_exchange(&stream).await;
    assert!(
        header(&request, "cookie").is_some_and(|c| c.contains("crier_token=")),
        "the browser sent the auth cookie: {request:#}"
    );
    assert_eq!(
        header(&request, "origin").as_deref(),
        Some(listed_origin.as_str())
    );
    assert_eq!(response["status"], 200, "{response:#}");
    assert_eq!(
        header(&response["headers"], "access-control-allow-origin").as_deref(),
        Some(listed_origin.as_str())
    );
    assert_eq!(
        header(&response["headers"], "access-control-allow-credentials").as_deref(),
        Some("true")
    );
    let (request, response) = foreign.event_source_exchange(&stream).await;
    assert!(
        header(&request, "cookie").is_some_and(|c| c.contains("crier_token=")),
        "the browser sent the same cookie from the unlisted page: {request:#}"
    );
    assert_eq!(
        response["statusCode"], 403,
        "the hub refused the unlisted origin: {response:#}"
    );

    drop(chromium);
    listed.stop().await;
    unlisted.stop().await;
    drop(hub);
}

/// crier.js on a locked hub, subscribed to two topics with single-use
/// tickets that a page callback mints with a short-lived token: when the
/// token expires the hub ends the stream with `reauth`, the page's next
/// ticket is refused until the app hands it a fresh token, and then the hub
/// is restarted. The page receives every event once, in order: each new
/// stream (with a ticket of its own) resumes after the last id it saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crier_js_rides_out_a_token_expiry_and_a_hub_restart_with_every_event_once() {
    let redis = RedisServer::start();
    let certs = TestCerts::new();
    let (cert, key) = (path_str(&certs.cert), path_str(&certs.key));
    let redis_url = redis.url();
    let args = [
        "--redis",
        redis_url.as_str(),
        "--tls-cert",
        cert.as_str(),
        "--tls-key",
        key.as_str(),
        "--jwt-secret",
        SECRET,
        "--jwt-leeway",
        "0s",
    ];
    let mut hub = tokio::task::block_in_place(|| Process::start(&args));
    let origin = hub.base.clone();
    let addr = origin.trim_start_matches("https://").to_owned();
    let publisher = https_client(&certs.ca_cert);
    let publish_token = token(&["ride.*"], &[]);
    let publish = async |origin: &str, n: usize, published: &mut Published| {
        let topic = ["ride.a", "ride.b"][n % 2];
        let data = format!("event {n} on {topic}");
        let id = publish_with(&publisher, origin, topic, &data, Some(&publish_token)).await;
        published.record(topic, &id, &data);
    };
    let chromium = Chromium::launch().await;
    let tab = chromium.open(&format!("{origin}/crier.js")).await;

    // A token that expires in a few seconds (the hub allows no leeway).
    let short = token_until(&[], &["ride.*"], unix_now() + 3);
    let mut published = Published::new(&["ride.a", "ride.b"]);
    tab.evaluate::<bool>(&crier_js_script(&published.topics, &short))
        .await;
    tab.poll::<usize>("window.opened", "crier.js's stream open", |&n| n == 1)
        .await;
    for n in 1..=3 {
        publish(&origin, n, &mut published).await;
    }
    let got = crier_js_got(&tab, published.len()).await;
    published.assert_received(&got, "events 1..3");
    let after_3 = got.last().unwrap().2.clone();

    // The token expires: the hub ends the stream with `reauth`, and the
    // page's next ticket is refused, its token having expired too...
    tab.wait_events(
        "Network.eventSourceMessageReceived",
        "the stream ends with reauth",
        |messages| messages.iter().any(|m| m["eventName"] == "reauth"),
    )
    .await;
    tab.poll::<Vec<String>>(
        "window.errors",
        "a ticket refused for the expired token",
        |errors| errors.iter().any(|e| e.contains("ticket refused: 401")),
    )
    .await;
    // ...so what is published now reaches the page only once the app has
    // handed it a fresh token.
    for n in 4..=6 {
        publish(&origin, n, &mut published).await;
    }
    let fresh = token_until(&[], &["ride.*"], unix_now() + 600);
    tab.evaluate::<bool>(&format!(
        "(() => {{ window.token = {}; return 'true'; }})()",
        json!(fresh)
    ))
    .await;
    let got = crier_js_got(&tab, published.len()).await;
    published.assert_received(&got, "events 4..6, published while the page had no ticket");
    let after_6 = got.last().unwrap().2.clone();

    // A second node on the same Redis takes the publishes while the hub is
    // down.
    let other = tokio::task::block_in_place(|| Process::start(&args));
    let other_origin = other.base.clone();
    let failures = tab.events("Network.loadingFailed").len();
    hub.terminate();
    let status = tokio::task::block_in_place(|| hub.wait_exit(DEADLINE));
    assert!(
        status.success(),
        "crier exits cleanly on SIGTERM: {status:?}"
    );
    drop(hub);
    for n in 7..=9 {
        publish(&other_origin, n, &mut published).await;
    }
    tab.wait_events(
        "Network.loadingFailed",
        "a ticket request refused while the hub is down",
        |failed| {
            failed[failures..]
                .iter()
                .any(|f| f["errorText"] == "net::ERR_CONNECTION_REFUSED")
        },
    )
    .await;
    let _hub = tokio::task::block_in_place(|| FixedPortCrier::start(&addr, &args));
    let got = crier_js_got(&tab, published.len()).await;
    published.assert_received(
        &got,
        "after the restart, the events published while the hub was down",
    );
    for n in 10..=12 {
        publish(&origin, n, &mut published).await;
    }
    let got = crier_js_got(&tab, published.len()).await;
    published.assert_received(&got, "events 1..12");
    let resets: Vec<Value> = tab.evaluate("JSON.stringify(window.resets)").await;
    assert_eq!(resets, Vec::<Value>::new(), "no reset");

    // Every EventSource carried a ticket of its own. The streams that
    // opened started from now, then after event 3 (the reauth), then after
    // event 6 (the restart).
    let requests = tab.events("Network.requestWillBeSent");
    let tickets: Vec<String> = event_sources(&requests)
        .iter()
        .map(|r| {
            let url = r["request"]["url"].as_str().unwrap_or_default();
            query(url)
                .remove("ticket")
                .unwrap_or_else(|| panic!("no ticket in {url}"))
        })
        .collect();
    let mut distinct = tickets.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        tickets.len(),
        "no ticket was sent twice: {tickets:#?}"
    );
    let responses = tab.events("Network.responseReceived");
    let mut resumed_after: Vec<Option<String>> = event_sources(&responses)
        .iter()
        .filter(|r| r["response"]["status"] == 200)
        .map(|r| query(r["response"]["url"].as_str().unwrap_or_default()).remove("lastEventId"))
        .collect();
    resumed_after.dedup();
    assert_eq!(
        resumed_after,
        [None, Some(after_3), Some(after_6)],
        "each stream resumed after the last id the page had seen"
    );
    let got: usize = tab.evaluate("JSON.stringify(window.got.length)").await;
    assert_eq!(got, 12, "nothing more arrived");

    drop(chromium);
    drop(other);
    drop(redis);
}

/// The demo page on a locked hub: without a token, or with one that does not
/// grant the topic, it says it was refused, with the status and the hub's
/// explanation; with a token it publishes (Bearer) and subscribes (tickets
/// minted with it), and the token never appears in a URL or in storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_on_a_locked_hub_says_why_it_is_refused_and_works_with_a_token() {
    let server = Server::start_with(|config: &mut Config| {
        config.access.jwt.jwt_secret = Some(SECRET.parse().unwrap());
    })
    .await;
    let chromium = Chromium::launch().await;
    // The page subscribes on load, here to `locked`, and is refused.
    let tab = chromium
        .open(&format!("http://{}/?topic=locked", server.addr))
        .await;
    let act = |script: &str| format!("(() => {{ {script}; return \"true\"; }})()");
    let text = |id: &str| format!("document.getElementById('{id}').textContent");
    let set_token = |token: &str| {
        act(&format!(
            "document.getElementById('token').value = {}",
            json!(token)
        ))
    };
    let rows = "[...document.querySelectorAll('#log .row')].map(r => r.textContent)";
    let connect = act("document.getElementById('sub').requestSubmit()");

    // No token: the subscription and a publish are refused, and the page
    // says so with the hub's reasons.
    let refused = tab
        .poll::<String>(&text("subMsg"), "the refusal explained", |m| !m.is_empty())
        .await;
    assert!(
        refused.contains("401 Unauthorized")
            && refused.contains("this needs a token")
            && refused.contains("Paste a token under"),
        "{refused}"
    );
    let state: String = tab
        .evaluate(&format!("JSON.stringify({})", text("state")))
        .await;
    assert_eq!(state, "closed", "the page stops trying");
    tab.evaluate::<bool>(&act("document.getElementById('pub').requestSubmit()"))
        .await;
    let refused = tab
        .poll::<String>(&text("pubMsg"), "the publish refused", |m| m.contains("✗"))
        .await;
    assert!(
        refused.contains("401 Unauthorized") && refused.contains("this needs a token"),
        "{refused}"
    );

    // A token that does not grant the topic: its ticket is refused.
    tab.evaluate::<bool>(&set_token(&token(&[], &["elsewhere"])))
        .await;
    tab.evaluate::<bool>(&connect).await;
    let refused = tab
        .poll::<String>(&text("subMsg"), "the ticket refused", |m| m.contains("403"))
        .await;
    assert!(
        refused.contains("403 Forbidden")
            && refused.contains("does not grant subscribe on topic `locked`"),
        "{refused}"
    );

    // A token that grants it: subscribed with a ticket, and the page's own
    // publish arrives.
    let secret_token = token(&["locked"], &["locked"]);
    tab.evaluate::<bool>(&set_token(&secret_token)).await;
    tab.evaluate::<bool>(&connect).await;
    tab.poll::<String>(&text("state"), "the page's stream open", |s| s == "open")
        .await;
    tab.evaluate::<bool>(&act(
        "document.getElementById('pubData').value = 'with a token'; \
         document.getElementById('pub').requestSubmit()",
    ))
    .await;
    let published = tab
        .poll::<String>(&text("pubMsg"), "the publish accepted", |m| m.contains("✓"))
        .await;
    assert!(published.contains("id 1."), "{published}");
    let shown = tab
        .poll::<Vec<String>>(rows, "the page's own event shown", |rows| {
            rows.iter().any(|r| r.contains("with a token"))
        })
        .await;
    assert!(
        shown
            .iter()
            .any(|r| r.contains("with a token") && r.contains("id 1.")),
        "{shown:#?}"
    );

    // The token went only into headers.
    let requests = tab.events("Network.requestWillBeSent");
    let streams = event_sources(&requests);
    assert!(!streams.is_empty());
    for request in &requests {
        let url = request["request"]["url"].as_str().unwrap_or_default();
        assert!(!url.contains(&secret_token), "the token is in {url}");
    }
    let last = streams.last().unwrap()["request"]["url"].as_str().unwrap();
    assert!(query(last).contains_key("ticket"), "{last}");
    let stored: usize = tab
        .evaluate("JSON.stringify(localStorage.length + sessionStorage.length)")
        .await;
    assert_eq!(stored, 0, "nothing in the page's storage");
    let cookie: String = tab.evaluate("JSON.stringify(document.cookie)").await;
    assert_eq!(cookie, "", "no cookie");

    drop(chromium);
    server.stop().await;
}

/// A script that opens one EventSource per topic on the page's origin and
/// records, in globals, what each one receives.
fn subscribe_script(topics: &[String]) -> String {
    let topics = serde_json::to_string(topics).unwrap();
    format!(
        r#"(() => {{
  window.got = {{}}; window.resets = []; window.opened = 0; window.errors = 0;
  for (const topic of {topics}) {{
    window.got[topic] = [];
    const es = new EventSource("/topics/" + topic);
    es.onopen = () => {{ window.opened++; }};
    es.onerror = () => {{ window.errors++; }};
    es.onmessage = (e) => {{ window.got[topic].push([e.lastEventId, e.data]); }};
    es.addEventListener("reset", (e) => {{ window.resets.push([topic, e.lastEventId, e.data]); }});
  }}
  return JSON.stringify(true);
}})()"#
    )
}

/// A script that opens one EventSource with credentials on `url` (another
/// origin) and records, in globals, what it receives.
fn credentialed_subscribe_script(url: &str) -> String {
    let url = serde_json::to_string(url).unwrap();
    format!(
        r#"(() => {{
  window.got = []; window.opened = 0; window.errors = 0;
  const es = new EventSource({url}, {{ withCredentials: true }});
  es.onopen = () => {{ window.opened++; }};
  es.onerror = () => {{ window.errors++; }};
  es.onmessage = (e) => {{ window.got.push([e.lastEventId, e.data]); }};
  return JSON.stringify(true);
}})()"#
    )
}

/// A script that subscribes with crier.js to `topics`, minting each ticket
/// with `window.token` (which the test replaces), and records in globals
/// what the subscription reports.
fn crier_js_script(topics: &[String], token: &str) -> String {
    let topics = serde_json::to_string(topics).unwrap();
    let token = serde_json::to_string(token).unwrap();
    format!(
        r#"(() => {{
  window.token = {token}; window.got = []; window.resets = []; window.errors = []; window.opened = 0;
  import("/crier.js").then(({{ subscribe }}) => {{
    window.subscription = subscribe({{
      topics: {topics},
      maxDelay: 1000,
      ticket: async (topics) => {{
        const res = await fetch("/tickets", {{
          method: "POST",
          headers: {{ Authorization: "Bearer " + window.token, "Content-Type": "application/json" }},
          body: JSON.stringify({{ topics }}),
        }});
        if (res.status !== 201) throw new Error("ticket refused: " + res.status + " " + (await res.text()));
        return (await res.json()).ticket;
      }},
      onOpen: () => {{ window.opened++; }},
      onEvent: (e) => {{ window.got.push([e.topic, e.event, e.id, e.data]); }},
      onReset: (info) => {{ window.resets.push(info); }},
      onError: (error) => {{ window.errors.push(error.message); }},
    }});
  }}, (error) => {{ window.errors.push("import: " + error); }});
  return JSON.stringify(true);
}})()"#
    )
}

/// Waits until the page's crier.js subscription has reported at least `n`
/// events, and returns them all (topic, type, id, data).
async fn crier_js_got(tab: &Tab<'_>, n: usize) -> Vec<(String, String, String, String)> {
    tab.poll(
        "window.got",
        &format!("{n} events from crier.js"),
        |got: &Vec<_>| got.len() >= n,
    )
    .await
}

/// What a page subscribed to several topics must receive: each topic's
/// published events, once and in order. Across topics the order is free (a
/// replay sends each topic's missed events in turn).
struct Published {
    /// The subscription's topics, sorted, as its ids list them.
    topics: Vec<String>,
    /// Per topic, each event's id (as the publish answered) and data.
    events: BTreeMap<String, Vec<(String, String)>>,
}

impl Published {
    fn new(topics: &[&str]) -> Published {
        let mut topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        topics.sort();
        Published {
            events: topics.iter().map(|t| (t.clone(), Vec::new())).collect(),
            topics,
        }
    }

    fn record(&mut self, topic: &str, id: &str, data: &str) {
        let events = self
            .events
            .get_mut(topic)
            .expect("a topic of the subscription");
        events.push((id.to_owned(), data.to_owned()));
    }

    fn len(&self) -> usize {
        self.events.values().map(Vec::len).sum()
    }

    /// Asserts that `got` (topic, type, id, data) holds exactly the
    /// published events, and that each id is `TOPIC/POS,POS,…`: the event's
    /// topic, then where the stream stands in every topic (the position of
    /// the last event it delivered there, `0` before the first).
    fn assert_received(&self, got: &[(String, String, String, String)], what: &str) {
        let mut received: BTreeMap<String, Vec<(String, String)>> = self
            .topics
            .iter()
            .map(|t| (t.clone(), Vec::new()))
            .collect();
        let mut positions = vec!["0".to_owned(); self.topics.len()];
        for (topic, event, id, data) in got {
            assert_eq!(event, "message", "{what}: {got:#?}");
            let i = self.topics.iter().position(|t| t == topic);
            let i = i.unwrap_or_else(|| panic!("{what}: an event of `{topic}`: {got:#?}"));
            let list = id
                .strip_prefix(&format!("{topic}/"))
                .unwrap_or_else(|| panic!("{what}: id `{id}` names its topic: {got:#?}"));
            positions[i] = list.split(',').nth(i).unwrap_or_default().to_owned();
            assert_eq!(
                list,
                positions.join(","),
                "{what}: id `{id}` says where the stream stands: {got:#?}"
            );
            received
                .get_mut(topic)
                .unwrap()
                .push((positions[i].clone(), data.clone()));
        }
        assert_eq!(
            received, self.events,
            "{what}: every event of every topic, once, in order"
        );
    }
}

/// The query parameters of `url`.
fn query(url: &str) -> HashMap<String, String> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

fn received_all(got: &BTreeMap<String, Vec<(String, String)>>, n: usize) -> bool {
    got.values().all(|events| events.len() >= n)
}

/// The events (`Network.*` parameters) about EventSource requests.
fn event_sources(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| e["type"] == "EventSource")
        .collect()
}

/// What the tests publish to `topic`: repetitive JSON (what compression is
/// for), a large event, and text that must survive exactly.
fn payloads(topic: &str) -> Vec<String> {
    let row = |n: usize| {
        format!(r#"{{"topic":"{topic}","n":{n},"status":"ok","tags":["alpha","beta","gamma"]}}"#)
    };
    let big = format!("[{}]", (0..300).map(row).collect::<Vec<_>>().join(","));
    vec![
        row(1),
        format!("héllo wörld — ✓ 𝄞 中文 {topic}"),
        format!("   leading spaces, then lines\nsecond line\n\nafter an empty line {topic}  "),
        big,
        row(2),
    ]
}

/// A header's value from CDP's header object, whatever the case of its name.
fn header(headers: &Value, name: &str) -> Option<String> {
    headers.as_object()?.iter().find_map(|(key, value)| {
        key.eq_ignore_ascii_case(name)
            .then(|| value.as_str().unwrap_or_default().to_owned())
    })
}

// ---------------------------------------------------------------------------
// Access control: tokens, and pages on other origins
// ---------------------------------------------------------------------------

/// The HMAC secret of the locked-down hubs (32 bytes or more).
const SECRET: &str = "crier browser tests: a secret of at least 32 bytes";

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token signed with [`SECRET`] granting these topic patterns, valid
/// until `exp` (seconds since the Unix epoch).
fn token_until(publish: &[&str], subscribe: &[&str], exp: u64) -> String {
    let claims = json!({
        "exp": exp,
        "crier": { "publish": publish, "subscribe": subscribe },
    });
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).expect("an HMAC key");
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("sign a token")
}

/// A token valid for an hour.
fn token(publish: &[&str], subscribe: &[&str]) -> String {
    token_until(publish, subscribe, unix_now() + 3600)
}

/// An open crier over TLS whose `/` is a page on an origin of its own.
async fn page_server(certs: &TestCerts) -> Server {
    let (cert, key) = (certs.cert.clone(), certs.key.clone());
    Server::start_with(move |config: &mut Config| {
        config.listen.tls_cert = Some(cert);
        config.listen.tls_key = Some(key);
    })
    .await
}

// ---------------------------------------------------------------------------
// Publishing over HTTPS
// ---------------------------------------------------------------------------

/// A client that trusts exactly the test CA.
fn https_client(ca: &Path) -> reqwest::Client {
    // reqwest is built without a crypto provider of its own: use ring, the
    // one crier's TLS uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pem = std::fs::read(ca).expect("read the test CA");
    reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).expect("CA certificate")])
        .timeout(DEADLINE)
        .build()
        .expect("HTTPS client")
}

/// Publishes `data` and returns the event's id.
async fn publish(client: &reqwest::Client, origin: &str, topic: &str, data: &str) -> String {
    publish_with(client, origin, topic, data, None).await
}

/// Publishes `data`, with a bearer token if given, and returns the event's
/// id.
async fn publish_with(
    client: &reqwest::Client,
    origin: &str,
    topic: &str,
    data: &str,
    token: Option<&str>,
) -> String {
    let mut request = client.post(format!("{origin}/topics/{topic}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .body(data.to_owned())
        .send()
        .await
        .unwrap_or_else(|e| panic!("publish to {origin}/topics/{topic}: {e}"));
    assert_eq!(
        response.status(),
        201,
        "publishing to {origin}/topics/{topic}"
    );
    let answer: Value = response.json().await.expect("publish answer is JSON");
    answer["id"].as_str().expect("id is a string").to_owned()
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("UTF-8 path").to_owned()
}

// ---------------------------------------------------------------------------
// The hub on a fixed address (for a restart on the same port)
// ---------------------------------------------------------------------------

/// The real binary listening on a given address; killed on drop.
struct FixedPortCrier {
    child: Child,
}

impl FixedPortCrier {
    fn start(listen: &str, args: &[&str]) -> FixedPortCrier {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crier"))
            .args(["serve", "--listen", listen])
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start crier");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut log = Vec::new();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("crier listening on ") => break,
                Some(Ok(line)) => log.push(line),
                _ => panic!("crier did not start on {listen}: {log:#?}"),
            }
        }
        // Keep draining the log so the process never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        FixedPortCrier { child }
    }
}

impl Drop for FixedPortCrier {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// The browser
// ---------------------------------------------------------------------------

/// A headless Chromium in its own process group with a fresh profile,
/// connected over the DevTools protocol. Dropping it (also when a test
/// fails) kills every process of the browser and removes the profile.
struct Chromium {
    cdp: Cdp,
    child: Child,
    dir: PathBuf,
}

impl Chromium {
    async fn launch() -> Chromium {
        Chromium::launch_with(&[]).await
    }

    /// A browser started with `extra` switches besides the usual ones.
    async fn launch_with(extra: &[&str]) -> Chromium {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "crier-test-chromium-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let profile = dir.join("profile");
        std::fs::create_dir_all(&profile).expect("create a profile directory");
        let log = std::fs::File::create(dir.join("chromium.log")).expect("create the browser log");
        let child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            // The server's certificate comes from the test's throwaway CA.
            .arg("--ignore-certificate-errors")
            // The DevTools endpoint, on a free port it names in the profile.
            .arg("--remote-debugging-port=0")
            .args(extra)
            .arg("about:blank")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                if e.kind() == std::io::ErrorKind::NotFound {
                    panic!(
                        "{CHROMIUM} is not installed, and the browser tests need it: install it \
                         (Debian/Ubuntu: `apt-get install -y chromium`) and run the tests again"
                    )
                }
                panic!("cannot start {CHROMIUM}: {e}")
            }
        };
        // Until the browser is connected, this guard owns the process.
        let mut starting = Starting {
            child: Some(child),
            dir: dir.clone(),
        };

        let port_file = profile.join("DevToolsActivePort");
        let started = Instant::now();
        let endpoint = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file)
                && let [port, path, ..] = text.lines().collect::<Vec<_>>()[..]
            {
                break format!("ws://127.0.0.1:{port}{path}");
            }
            if let Ok(Some(status)) = starting.child.as_mut().unwrap().try_wait() {
                panic!("chromium exited at start ({status}):\n{}", starting.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromium did not open its DevTools endpoint within 20s:\n{}",
                starting.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let cdp = Cdp::connect(&endpoint).await;
        Chromium {
            cdp,
            child: starting.child.take().unwrap(),
            dir,
        }
    }

    /// Opens a new tab, watches its network activity, and loads `url`.
    async fn open(&self, url: &str) -> Tab<'_> {
        let target = self
            .cdp
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let session = self
            .cdp
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        let tab = Tab {
            cdp: &self.cdp,
            session: session["sessionId"].as_str().expect("a session").to_owned(),
        };
        tab.call("Network.enable", json!({})).await;
        tab.call("Page.enable", json!({})).await;
        let loads = tab.events("Page.loadEventFired").len();
        let navigation = tab.call("Page.navigate", json!({"url": url})).await;
        assert!(
            navigation.get("errorText").is_none(),
            "loading {url}: {navigation}"
        );
        tab.wait_events("Page.loadEventFired", &format!("{url} loads"), |events| {
            events.len() > loads
        })
        .await;
        let location: String = tab.evaluate("JSON.stringify(location.href)").await;
        assert_eq!(location, url);
        tab
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        self.cdp.reader.abort();
        kill_group(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A browser process not connected yet: killed, and its files removed, if
/// the launch fails.
struct Starting {
    child: Option<Child>,
    dir: PathBuf,
}

impl Starting {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("chromium.log")).unwrap_or_default()
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Kills the browser's whole process group (browser, zygotes, renderers,
/// utility processes) and reaps the browser.
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

/// One tab, as a DevTools session.
struct Tab<'a> {
    cdp: &'a Cdp,
    session: String,
}

impl Tab<'_> {
    async fn call(&self, method: &str, params: Value) -> Value {
        self.cdp.call(Some(&self.session), method, params).await
    }

    /// The parameters of every `method` event of this tab so far.
    fn events(&self, method: &str) -> Vec<Value> {
        self.cdp.events(&self.session, method)
    }

    /// Waits until this tab's `method` events satisfy `done`.
    async fn wait_events(
        &self,
        method: &str,
        what: &str,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let events = self.events(method);
            if done(&events) {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; {method} events: {events:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Evaluates `expression`, which must evaluate to a JSON text, in the
    /// page.
    async fn evaluate<T: DeserializeOwned>(&self, expression: &str) -> T {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("evaluating `{expression}` threw: {exception}");
        }
        let json = result["result"]["value"]
            .as_str()
            .unwrap_or_else(|| panic!("`{expression}` gives a JSON text, not {result}"));
        serde_json::from_str(json).unwrap_or_else(|e| panic!("`{expression}` gave {json}: {e}"))
    }

    /// Reads `expression` from the page until `done` holds, failing the
    /// test after the deadline with the last value seen.
    async fn poll<T: DeserializeOwned + std::fmt::Debug>(
        &self,
        expression: &str,
        what: &str,
        done: impl Fn(&T) -> bool,
    ) -> T {
        let deadline = Instant::now() + DEADLINE;
        let json = format!("JSON.stringify({expression})");
        loop {
            let value: T = self.evaluate(&json).await;
            if done(&value) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the page has {value:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The request headers the browser sent (as on the wire) and the
    /// response, for the first EventSource request to `url`: the response
    /// as `Network.responseReceived` gives it when the stream opened, and
    /// as `Network.responseReceivedExtraInfo` (`statusCode`, raw headers)
    /// when the browser refused to hand it to the page.
    async fn event_source_exchange(&self, url: &str) -> (Value, Value) {
        let requests = self
            .wait_events(
                "Network.requestWillBeSent",
                &format!("a request to {url}"),
                |requests| requests.iter().any(|r| r["request"]["url"] == url),
            )
            .await;
        let id = requests
            .iter()
            .find(|r| r["request"]["url"] == url)
            .map(|r| r["requestId"].clone())
            .unwrap();
        let sent = self
            .wait_events(
                "Network.requestWillBeSentExtraInfo",
                "the headers sent",
                |sent| sent.iter().any(|s| s["requestId"] == id),
            )
            .await;
        let headers = sent.into_iter().find(|s| s["requestId"] == id).unwrap()["headers"].clone();
        let ok = self.events("Network.responseReceived");
        if let Some(response) = ok.into_iter().find(|r| r["requestId"] == id) {
            return (headers, response["response"].clone());
        }
        let raw = self
            .wait_events("Network.responseReceivedExtraInfo", "the response", |raw| {
                raw.iter().any(|r| r["requestId"] == id)
            })
            .await;
        (
            headers,
            raw.into_iter().find(|r| r["requestId"] == id).unwrap(),
        )
    }

    /// Waits until the page's EventSource on `topic` has at least `n`
    /// events, and returns them all.
    async fn events_of(&self, topic: &str, n: usize) -> Vec<(String, String)> {
        let expression = format!("window.got[{}]", serde_json::to_string(topic).unwrap());
        self.poll(&expression, &format!("{n} events on {topic}"), |got| {
            Vec::len(got) >= n
        })
        .await
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A minimal DevTools protocol client: numbered calls answered by id, and
/// every event kept (with its session) for the tests to look at.
struct Cdp {
    sink: tokio::sync::Mutex<SplitSink<Ws, Message>>,
    next_id: AtomicU64,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>,
    events: Arc<Mutex<Vec<Value>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Cdp {
    async fn connect(endpoint: &str) -> Cdp {
        let (ws, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(endpoint))
            .await
            .unwrap_or_else(|_| panic!("connecting to {endpoint} took over {DEADLINE:?}"))
            .unwrap_or_else(|e| panic!("connect to {endpoint}: {e}"));
        let (sink, mut stream) = ws.split();
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>> = Arc::default();
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let reader = tokio::spawn({
            let (pending, events) = (pending.clone(), events.clone());
            async move {
                while let Some(Ok(message)) = stream.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    let Ok(message) = serde_json::from_str::<Value>(text.as_str()) else {
                        continue;
                    };
                    match message["id"].as_u64() {
                        Some(id) => {
                            if let Some(reply) = pending.lock().unwrap().remove(&id) {
                                let _ = reply.send(message);
                            }
                        }
                        None => events.lock().unwrap().push(message),
                    }
                }
                // The browser is gone: fail every call still waiting.
                pending.lock().unwrap().clear();
            }
        });
        Cdp {
            sink: tokio::sync::Mutex::new(sink),
            next_id: AtomicU64::new(1),
            pending,
            events,
            reader,
        }
    }

    /// Sends a command (to a tab's session, or to the browser) and returns
    /// its result; fails the test on an error or after the deadline.
    async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (reply, answer) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, reply);
        let mut command = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            command["sessionId"] = session.into();
        }
        self.sink
            .lock()
            .await
            .send(Message::text(command.to_string()))
            .await
            .unwrap_or_else(|e| panic!("send {method}: {e}"));
        let answer = tokio::time::timeout(DEADLINE, answer)
            .await
            .unwrap_or_else(|_| panic!("{method} got no answer within {DEADLINE:?}"))
            .unwrap_or_else(|_| panic!("the browser closed the connection during {method}"));
        if let Some(error) = answer.get("error") {
            panic!("{method} failed: {error}");
        }
        answer["result"].clone()
    }

    /// The parameters of every `method` event of `session` so far.
    fn events(&self, session: &str, method: &str) -> Vec<Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["sessionId"] == session && e["method"] == method)
            .map(|e| e["params"].clone())
            .collect()
    }
}

/// The demo page subscribes on load: the bare page to `news`, the
/// README's topic, and with `?topic=` to that topic; its forms name it, and
/// an event published then shows at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_subscribes_on_load_to_news_or_the_topic_in_its_url() {
    let server = Server::start().await;
    let chromium = Chromium::launch().await;
    let bare = chromium.open(&format!("http://{}/", server.addr)).await;
    let fields: Vec<String> = bare
        .evaluate(
            "JSON.stringify([document.getElementById('topics').value, \
             document.getElementById('pubTopic').value, \
             document.getElementById('state').textContent])",
        )
        .await;
    assert_eq!(fields[..2], ["news", "news"]);
    bare.poll::<String>(
        "document.getElementById('state').textContent",
        "the bare page's stream open on load",
        |state| state == "open",
    )
    .await;
    let news = server.publish_id("news", "on the bare page").await;
    let rows = "[...document.querySelectorAll('#log .row')].map(r => r.textContent)";
    bare.poll::<Vec<String>>(rows, "the news event shown", |rows| {
        rows.iter()
            .any(|r| r.contains("on the bare page") && r.contains(&format!("id {news}")))
    })
    .await;

    let tab = chromium
        .open(&format!("http://{}/?topic=live", server.addr))
        .await;
    tab.poll::<String>(
        "document.getElementById('state').textContent",
        "the page's stream open on load",
        |state| state == "open",
    )
    .await;
    let id = server.publish_id("live", "shown at once").await;
    let rows = "[...document.querySelectorAll('#log .row')].map(r => r.textContent)";
    let shown = tab
        .poll::<Vec<String>>(rows, "the event shown", |rows| {
            rows.iter().any(|r| r.contains("shown at once"))
        })
        .await;
    assert!(
        shown
            .iter()
            .any(|r| r.contains("shown at once") && r.contains(&format!("id {id}"))),
        "{shown:#?}"
    );
}
