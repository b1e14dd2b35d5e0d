//! Floods and misbehaving clients: while each attack runs from some
//! 127.0.0.x addresses, an honest client on another address subscribes,
//! publishes and receives every event exactly once. Every attack is bounded
//! in count and time, sends only to loopback, and every process started is
//! stopped by its PID.

use crate::common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::process::Process;
use common::tls::TestCerts;
use common::{DEADLINE, Ev, Server, SseClient, assert_problem, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// An honest client on its own loopback address.
struct Honest {
    client: reqwest::Client,
}

impl Honest {
    fn new(source: &str) -> Honest {
        Honest::with(source, None)
    }

    fn with(source: &str, ca: Option<&std::path::Path>) -> Honest {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .local_address(source.parse::<IpAddr>().unwrap())
            // Not a total timeout: that would also cut the subscriber's
            // stream once it has lived that long. Each wait has its own.
            .connect_timeout(DEADLINE);
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).unwrap();
            builder = builder.tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()]);
        }
        Honest {
            client: builder.build().unwrap(),
        }
    }

    async fn subscribe(&self, url: &str) -> SseClient {
        SseClient::connect(&self.client, url, None).await
    }

    async fn publish(&self, url: &str, data: &str) -> String {
        let response = self
            .client
            .post(url)
            .timeout(DEADLINE)
            .body(data.to_owned())
            .send()
            .await
            .expect("publish");
        assert_eq!(response.status(), 201, "the honest publish is stored");
        let answer: serde_json::Value = response.json().await.unwrap();
        answer["id"].as_str().unwrap().to_owned()
    }

    /// Publishes `n` events to `topic` and checks the subscriber gets
    /// exactly them, in order.
    async fn round_trip(
        &self,
        hub_url: &dyn Fn(&str) -> String,
        sub: &mut SseClient,
        tag: &str,
        n: usize,
    ) {
        let mut expected = Vec::new();
        for i in 1..=n {
            let data = format!("{tag}-{i}");
            let id = self.publish(&hub_url("/topics/honest"), &data).await;
            expected.push(Ev::new(&id, "message", &data));
        }
        assert_eq!(
            sub.take(n).await,
            expected,
            "the honest subscriber gets every event once"
        );
    }
}

/// A TCP connection from `source` (a 127.0.0.x address).
async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    tokio::time::timeout(DEADLINE, socket.connect(to))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// Sends a request and returns the answer's status (0 if the connection
/// closed without one).
async fn status_of(stream: &mut TcpStream, request: &str) -> u16 {
    let _ = stream.write_all(request.as_bytes()).await;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n") {
        match tokio::time::timeout(DEADLINE, stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => return 0,
        }
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Waits until the peer closes `stream` (reads to the end), within the
/// deadline; returns what it sent.
async fn closed_by_peer(stream: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut all))
        .await
        .expect("the hub closes the connection in time")
        .ok();
    all
}

const HEALTH: &str = "GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_past_its_connection_cap_is_refused_while_others_are_served() {
    let hub = Process::start(&["--max-connections-per-ip", "100"]);
    let url = |p: &str| hub.url(p);
    let honest = Honest::new("127.0.0.3");
    let mut sub = honest.subscribe(&hub.url("/topics/honest")).await;
    honest.round_trip(&url, &mut sub, "before", 3).await;
    let fds_before = hub.fds();

    // 300 connections from one address, each asking for /healthz and kept.
    let mut attack = Vec::new();
    let mut statuses = Vec::new();
    for _ in 0..300 {
        let mut s = connect_from("127.0.0.2", hub.addr()).await;
        statuses.push(status_of(&mut s, HEALTH).await);
        attack.push(s);
    }
    let served = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((served, refused), (100, 200), "{statuses:?}");
    honest.round_trip(&url, &mut sub, "during", 3).await;

    // A refused connection got a problem+json answer.
    let mut one_more = connect_from("127.0.0.2", hub.addr()).await;
    let answer = String::from_utf8_lossy(&{
        one_more.write_all(HEALTH.as_bytes()).await.unwrap();
        closed_by_peer(&mut one_more).await
    })
    .into_owned();
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    assert!(
        answer.contains(r#""type":"urn:crier:problem:too-many-connections""#),
        "{answer}"
    );

    drop(attack);
    drop(one_more);
    wait_for("the hub's descriptors to return to their level", || {
        hub.fds() <= fds_before
    })
    .await;
    // Once they are gone, the address is served again.
    let mut again = connect_from("127.0.0.2", hub.addr()).await;
    assert_eq!(status_of(&mut again, HEALTH).await, 200);
    honest.round_trip(&url, &mut sub, "after", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_open_file_limit_leave_room_for_an_honest_client() {
    // An open-file limit of 1,024: the default global cap is 752, and four
    // attacking addresses may hold at most 150 connections each.
    let hub = Process::start_limited(&["--max-connections-per-ip", "150"], 1024);
    let url = |p: &str| hub.url(p);
    let honest = Honest::new("127.0.0.3");
    let mut sub = honest.subscribe(&hub.url("/topics/honest")).await;

    // 1,600 connections, more than the process may open files.
    let mut attack = Vec::new();
    let mut statuses = Vec::new();
    for i in 0..1600 {
        let source = format!("127.0.1.{}", 1 + i % 4);
        let mut s = connect_from(&source, hub.addr()).await;
        statuses.push(status_of(&mut s, HEALTH).await);
        attack.push(s);
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 600);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 1000);
    honest.round_trip(&url, &mut sub, "during", 5).await;
    drop(attack);
    honest.round_trip(&url, &mut sub, "after", 2).await;
    // Served requests are logged one line each (1,600 connections would
    // otherwise be 1,600 warnings, or, out of descriptors, 20 a second).
    let lines: Vec<String> = hub
        .log()
        .into_iter()
        .filter(|l| !l.contains("finished processing request"))
        .collect();
    assert!(lines.len() < 10, "a flood writes a bounded log: {lines:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_global_cap_new_clients_get_503_and_open_streams_continue() {
    let hub = Process::start(&["--max-connections", "12"]);
    // The publisher keeps one HTTP/2 connection for all its publishes.
    let publisher = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let publish = |data: &'static str| {
        let publisher = publisher.clone();
        let url = hub.url("/topics/full");
        async move {
            let response = publisher.post(url).body(data).send().await.unwrap();
            assert_eq!(response.status(), 201);
            let answer: serde_json::Value = response.json().await.unwrap();
            answer["id"].as_str().unwrap().to_owned()
        }
    };
    let first = publish("first").await;
    let subscribers = common::client();
    let mut streams = Vec::new();
    for _ in 0..11 {
        streams.push(SseClient::connect(&subscribers, &hub.url("/topics/full"), None).await);
    }
    let mut late = TcpStream::connect(hub.addr()).await.unwrap();
    late.write_all(HEALTH.as_bytes()).await.unwrap();
    let answer = String::from_utf8_lossy(&closed_by_peer(&mut late).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 5"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(
        answer.contains(r#""type":"urn:crier:problem:over-capacity""#),
        "{answer}"
    );
    let second = publish("second").await;
    for stream in &mut streams {
        assert_eq!(stream.next().await, Ev::new(&second, "message", "second"));
    }
    assert_ne!(first, second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_and_unfinished_tls_handshakes_are_closed_while_others_are_served() {
    let certs = TestCerts::new();
    let cert = certs.cert.to_str().unwrap().to_owned();
    let key = certs.key.to_str().unwrap().to_owned();
    let tls_hub = Process::start(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-handshake-timeout",
        "1s",
    ]);
    let plain_hub = Process::start(&["--header-timeout", "1s"]);
    let tls_url = |p: &str| tls_hub.url(p);
    let plain_url = |p: &str| plain_hub.url(p);
    let honest_tls = Honest::with("127.0.0.3", Some(&certs.ca_cert));
    let honest = Honest::new("127.0.0.3");
    let mut tls_sub = honest_tls.subscribe(&tls_hub.url("/topics/honest")).await;
    let mut plain_sub = honest.subscribe(&plain_hub.url("/topics/honest")).await;
    let (tls_fds, plain_fds) = (tls_hub.fds(), plain_hub.fds());

    // 200 TLS connections that send half a ClientHello, 200 plain ones that
    // send nothing at all.
    let mut half_hellos = Vec::new();
    let mut silent = Vec::new();
    for _ in 0..200 {
        let mut s = connect_from("127.0.0.2", tls_hub.addr()).await;
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .unwrap();
        half_hellos.push(s);
        silent.push(connect_from("127.0.0.2", plain_hub.addr()).await);
    }
    honest_tls
        .round_trip(&tls_url, &mut tls_sub, "during", 3)
        .await;
    honest
        .round_trip(&plain_url, &mut plain_sub, "during", 3)
        .await;
    for s in half_hellos.iter_mut().chain(silent.iter_mut()) {
        closed_by_peer(s).await;
    }
    wait_for("the descriptors to return", || {
        tls_hub.fds() <= tls_fds && plain_hub.fds() <= plain_fds
    })
    .await;
    honest_tls
        .round_trip(&tls_url, &mut tls_sub, "after", 2)
        .await;
    honest
        .round_trip(&plain_url, &mut plain_sub, "after", 2)
        .await;
}

/// Slow and silent connections that arrive together do not all time out,
/// and come back, in the same instant: each gets between 80 and 100 % of the
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_arrive_together_time_out_spread_over_a_fifth_of_the_timeout() {
    let hub = Process::start(&["--header-timeout", "2s"]);
    let mut connections = Vec::new();
    for i in 0..100 {
        let mut s = connect_from("127.0.0.2", hub.addr()).await;
        if i % 2 == 0 {
            // Half a request head: hyper's header timeout.
            s.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
                .await
                .unwrap();
        }
        // The other half send nothing: the protocol sniffing's timeout.
        connections.push(s);
    }
    let opened = std::time::Instant::now();
    let closes = connections.into_iter().map(|mut s| async move {
        closed_by_peer(&mut s).await;
        opened.elapsed()
    });
    let mut closed: Vec<Duration> = futures_util::future::join_all(closes).await;
    closed.sort();
    let (first, last) = (closed[0], closed[closed.len() - 1]);
    assert!(
        first >= Duration::from_millis(1500) && last <= Duration::from_millis(2600),
        "closed between {first:?} and {last:?}, not within 80-100 % of 2 s"
    );
    assert!(
        last - first >= Duration::from_millis(250),
        "closed within {:?} of each other: not spread",
        last - first
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_headers_and_dribbled_bodies_are_cut_with_bounded_memory_and_nothing_stored() {
    let hub = Process::start(&["--header-timeout", "2s", "--body-timeout", "5s"]);
    let url = |p: &str| hub.url(p);
    let honest = Honest::new("127.0.0.3");
    let mut sub = honest.subscribe(&hub.url("/topics/honest")).await;
    let rss_before = hub.rss_kib();

    // 10 slowloris connections, 20 dribbling a body.
    let attackers = (0..30).map(|i| {
        let addr = hub.addr();
        tokio::spawn(async move {
            let mut s = connect_from("127.0.0.2", addr).await;
            if i < 10 {
                // Slowloris: a header that never ends.
                s.write_all(b"GET /topics/x HTTP/1.1\r\nHost: hub\r\nX-Slow: ")
                    .await
                    .unwrap();
                loop {
                    if s.write_all(b"a").await.is_err() {
                        return Vec::new();
                    }
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = s.readable() => return closed_by_peer(&mut s).await,
                    }
                }
            } else {
                // A body of 65,536 bytes sent one byte per 10 ms.
                s.write_all(
                    b"POST /topics/dribble HTTP/1.1\r\nHost: hub\r\nContent-Length: 65536\r\n\r\n",
                )
                .await
                .unwrap();
                loop {
                    if s.write_all(b"x").await.is_err() {
                        return Vec::new();
                    }
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(10)) => {}
                        _ = s.readable() => return closed_by_peer(&mut s).await,
                    }
                }
            }
        })
    });
    let attackers: Vec<_> = attackers.collect();
    let mut peak = rss_before;
    let mut done = Vec::new();
    for attacker in attackers {
        // Sample memory while the attack lasts.
        let mut attacker = attacker;
        loop {
            tokio::select! {
                answer = &mut attacker => { done.push(answer.unwrap()); break; }
                () = tokio::time::sleep(Duration::from_millis(50)) => peak = peak.max(hub.rss_kib()),
            }
        }
    }
    honest.round_trip(&url, &mut sub, "during", 3).await;
    let rise = peak.saturating_sub(rss_before);
    assert!(
        rise < 20 * 1024,
        "resident memory rose by {rise} KiB during the attack"
    );
    let cut_bodies: Vec<String> = done
        .iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .filter(|a| a.contains("body-timeout"))
        .collect();
    assert_eq!(
        cut_bodies.len(),
        20,
        "every dribbled body is answered 408: {done:?}"
    );
    assert!(cut_bodies.iter().all(|a| a.starts_with("HTTP/1.1 408")));
    // Nothing of the dribbled bodies was stored: the topic starts at 1.
    let id = honest.publish(&hub.url("/topics/dribble"), "first").await;
    assert!(id.starts_with("1."), "{id}");
}

#[tokio::test]
async fn a_publisher_over_its_rate_gets_429_and_nothing_refused_is_stored() {
    let server = Server::start_with(|c| {
        c.limits.publish_rate = 2;
        c.limits.publish_burst = 5;
    })
    .await;
    let mut sub = server.subscribe("/topics/rated?last=100").await;
    let mut ids = Vec::new();
    for i in 1..=5 {
        ids.push(server.publish_id("rated", &format!("e{i}")).await);
    }
    let refused = server
        .client
        .post(server.url("/topics/rated"))
        .body("over")
        .send()
        .await
        .unwrap();
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_problem(refused, 429, "publish-rate").await;
    let batch = server
        .client
        .post(server.url("/events"))
        .body(r#"[{"topic":"rated","data":"b1"},{"topic":"rated","data":"b2"}]"#)
        .send()
        .await
        .unwrap();
    assert_problem(batch, 429, "publish-rate").await;
    let too_big = server
        .client
        .post(server.url("/events"))
        .body(
            serde_json::to_string(&vec![serde_json::json!({"topic":"rated","data":"x"}); 6])
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_problem(too_big, 400, "batch-over-burst").await;
    // Once the budget refills, numbering goes on densely at 6.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let sixth = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the budget never refills"
        );
        let response = server
            .client
            .post(server.url("/topics/rated"))
            .body("e6")
            .send()
            .await
            .unwrap();
        if response.status() == 201 {
            let answer: serde_json::Value = response.json().await.unwrap();
            break answer["id"].as_str().unwrap().to_owned();
        }
        assert_eq!(response.status(), 429);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(common::seq_of(&sixth), 6);
    ids.push(sixth);
    let got: Vec<String> = sub.take(6).await.into_iter().map(|e| e.id).collect();
    assert_eq!(got, ids);
}

#[tokio::test]
async fn streams_per_client_are_capped_and_released_when_a_stream_ends() {
    let server = Server::start_with(|c| {
        c.limits.max_streams_per_ip = 3;
        c.transports.heartbeat = Duration::from_millis(200);
    })
    .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(server.subscribe("/topics/capped").await);
    }
    let refused = server
        .client
        .get(server.url("/topics/capped"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_problem(refused, 429, "too-many-streams").await;
    drop(open.pop());
    // The count is released when the hub notices the stream is gone.
    let fresh = common::client();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let reopened = loop {
        let response = fresh
            .get(server.url("/topics/capped"))
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            break response;
        }
        assert_eq!(response.status(), 429);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot is never released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop(reopened);
    let id = server.publish_id("capped", "still here").await;
    for sub in &mut open {
        assert_eq!(sub.next().await, Ev::new(&id, "message", "still here"));
    }
}

#[tokio::test]
async fn behind_a_trusted_proxy_limits_apply_per_forwarded_address_and_not_otherwise() {
    let trusted = Server::start_with(|c| {
        c.limits.max_streams_per_ip = 2;
        c.limits.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    let untrusted = Server::start_with(|c| c.limits.max_streams_per_ip = 2).await;
    for (server, forwarded_counts) in [(&trusted, true), (&untrusted, false)] {
        let open = |xff: &'static str| {
            server
                .client
                .get(server.url("/topics/proxied"))
                .header("x-forwarded-for", xff)
                .send()
        };
        let a1 = open("10.0.0.1").await.unwrap();
        let a2 = open("10.0.0.1").await.unwrap();
        assert_eq!((a1.status().as_u16(), a2.status().as_u16()), (200, 200));
        let a3 = open("10.0.0.1").await.unwrap();
        assert_eq!(a3.status(), 429, "a third stream of one client");
        let b1 = open("10.0.0.2").await.unwrap();
        let expected = if forwarded_counts { 200 } else { 429 };
        assert_eq!(
            b1.status(),
            expected,
            "another forwarded client (trusted proxy: {forwarded_counts})"
        );
    }
}

/// Which of the hub's HTTP paths a forwarded request takes: crier's own
/// HTTP/1.1 (a subscribe GET), hyper's HTTP/1 (an HTTP/1.0 GET goes there)
/// or HTTP/2.
#[derive(Debug, Clone, Copy)]
enum Via {
    Own,
    Hyper,
    Http2,
}

const EVERY_PATH: [Via; 3] = [Via::Own, Via::Hyper, Via::Http2];

/// Opens one stream of `/topics/proxied` per header set, one after
/// another, each held open: their statuses, and what holds them.
async fn open_streams(
    server: &Server,
    via: Via,
    requests: &[Vec<(&str, String)>],
) -> (Vec<u16>, Vec<Box<dyn std::any::Any + Send>>) {
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let mut statuses = Vec::new();
    let mut held = Vec::new();
    for headers in requests {
        let (status, open) = match via {
            Via::Own | Via::Http2 => {
                let client = if matches!(via, Via::Own) {
                    &server.client
                } else {
                    &h2
                };
                let mut request = client.get(server.url("/topics/proxied"));
                for (name, value) in headers {
                    request = request.header(*name, value);
                }
                let response = request.send().await.unwrap();
                let status = response.status().as_u16();
                (status, Box::new(response) as Box<dyn std::any::Any + Send>)
            }
            Via::Hyper => {
                let mut socket = TcpStream::connect(server.addr).await.unwrap();
                let mut request = "GET /topics/proxied HTTP/1.0\r\nHost: hub\r\n".to_owned();
                for (name, value) in headers {
                    request += &format!("{name}: {value}\r\n");
                }
                request += "\r\n";
                let status = status_of(&mut socket, &request).await;
                (status, Box::new(socket) as Box<dyn std::any::Any + Send>)
            }
        };
        statuses.push(status);
        held.push(open);
    }
    (statuses, held)
}

/// The issue's report: behind a proxy that appends to `X-Forwarded-For`
/// and passes `Forwarded` through, one client forging a new `Forwarded`
/// per stream still gets exactly its cap, on every HTTP path.
#[tokio::test]
async fn forged_forwarded_headers_do_not_escape_the_per_client_cap() {
    for via in EVERY_PATH {
        let server = Server::start_with(|c| {
            c.limits.max_streams_per_ip = 4;
            c.limits.trusted_proxies = vec!["127.0.0.1".into()];
        })
        .await;
        let requests: Vec<_> = (1..=8)
            .map(|i| {
                vec![
                    ("x-forwarded-for", "203.0.113.7".to_owned()),
                    ("forwarded", format!("for=198.51.100.{i}")),
                ]
            })
            .collect();
        let (statuses, held) = open_streams(&server, via, &requests).await;
        assert_eq!(
            statuses,
            [200, 200, 200, 200, 429, 429, 429, 429],
            "{via:?}"
        );
        drop(held);
        server.stop().await;
    }
}

/// Each `--client-ip-header` names the client (its right-most address
/// that is not a trusted proxy), and the two other headers are ignored, on
/// every HTTP path.
#[tokio::test]
async fn each_client_ip_header_names_the_client_and_the_others_are_ignored() {
    use crier::limits::ClientIpHeader;
    // (header, how it names a client after a forged hop, how it names one
    // alone)
    type Naming = fn(&str) -> String;
    let kinds: [(ClientIpHeader, &str, Naming, Naming); 3] = [
        (
            ClientIpHeader::XForwardedFor,
            "x-forwarded-for",
            |ip| format!("6.6.6.6, {ip}, 127.0.0.1"),
            |ip| ip.to_owned(),
        ),
        (
            ClientIpHeader::Forwarded,
            "forwarded",
            |ip| format!("for=6.6.6.6, for={ip};proto=http"),
            |ip| format!("for={ip}"),
        ),
        (
            ClientIpHeader::XRealIp,
            "x-real-ip",
            |ip| ip.to_owned(),
            |ip| ip.to_owned(),
        ),
    ];
    let all = ["x-forwarded-for", "forwarded", "x-real-ip"];
    for (kind, name, chained, alone) in kinds {
        for via in EVERY_PATH {
            let server = Server::start_with(|c| {
                c.limits.max_streams_per_ip = 2;
                c.limits.trusted_proxies = vec!["127.0.0.1".into()];
                c.limits.client_ip_header = kind;
            })
            .await;
            // Client A, named by the header, with the other two headers
            // naming someone new each time.
            let as_a = |i: u8| {
                let mut headers = vec![(name, chained("198.51.100.1"))];
                for other in all.into_iter().filter(|other| *other != name) {
                    let value = match other {
                        "forwarded" => format!("for=192.0.2.{i}"),
                        _ => format!("192.0.2.{i}"),
                    };
                    headers.push((other, value));
                }
                headers
            };
            let requests = vec![
                as_a(1),
                as_a(2),
                as_a(3),
                // Client B, by the header alone.
                vec![(name, alone("198.51.100.2"))],
                // Malformed: counted as the proxy itself.
                vec![(name, "not an address".to_owned())],
            ];
            let (statuses, held) = open_streams(&server, via, &requests).await;
            assert_eq!(statuses, [200, 200, 429, 200, 200], "{name} {via:?}");
            drop(held);
            server.stop().await;
        }
    }
}

/// `--client-ip-header` takes only the three header names (in any case):
/// anything else stops the hub at start-up, saying which values it takes.
#[test]
fn an_unknown_client_ip_header_is_refused_at_start_up() {
    // Header names are case-insensitive: this one starts and listens.
    drop(Process::start(&["--client-ip-header", "X-Real-IP"]));
    for (args, env) in [
        (&["--client-ip-header", "x-client-ip"][..], None),
        (&[][..], Some("true-client-ip")),
    ] {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_crier"));
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args);
        if let Some(value) = env {
            command.env("CRIER_CLIENT_IP_HEADER", value);
        }
        let output = command.output().unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--client-ip-header"), "{stderr}");
        assert!(
            stderr.contains("x-forwarded-for")
                && stderr.contains("forwarded")
                && stderr.contains("x-real-ip"),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn a_request_head_over_the_limit_gets_431() {
    let server = Server::start_with(|c| c.limits.max_header_bytes = 16 * 1024).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let big = "a".repeat(20 * 1024);
    let request = format!("GET /topics/x HTTP/1.1\r\nHost: hub\r\nX-Big: {big}\r\n\r\n");
    assert_eq!(status_of(&mut stream, &request).await, 431);
    let mut small = TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: hub\r\nX-Big: {}\r\n\r\n",
        "a".repeat(8 * 1024)
    );
    assert_eq!(status_of(&mut small, &request).await, 200);
}

#[tokio::test]
async fn an_http2_connection_without_streams_is_closed_after_the_idle_timeout() {
    let server = Server::start_with(|c| c.limits.idle_timeout = Duration::from_millis(500)).await;
    let connect = || async {
        let io = hyper_util::rt::TokioIo::new(TcpStream::connect(server.addr).await.unwrap());
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap()
    };
    // One connection carries a stream; the other only answered a request.
    let (mut busy, busy_conn) = connect().await;
    let busy_conn = tokio::spawn(busy_conn);
    let request = hyper::Request::get(server.url("/topics/idle"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = busy.send_request(request).await.unwrap();
    let mut events = common::sse_events(response.into_body());
    let (mut idle, idle_conn) = connect().await;
    let idle_conn = tokio::spawn(idle_conn);
    let request = hyper::Request::get(server.url("/healthz"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(idle.send_request(request).await.unwrap().status(), 200);
    tokio::time::timeout(DEADLINE, idle_conn)
        .await
        .expect("the idle connection is closed in time")
        .unwrap()
        .unwrap();
    // The busy one is kept: its stream still gets events.
    let id = server.publish_id("idle", "kept").await;
    let event = tokio::time::timeout(DEADLINE, futures_util::StreamExt::next(&mut events))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event, Ev::new(&id, "message", "kept"));
    assert!(!busy_conn.is_finished());
}

/// Issue 21's flood in small: with no publish rate, one publisher fills
/// the retained budget (2 MiB here) many times over for 3 s, with 64 KiB
/// events and 512-byte ones to fill what they leave, while another
/// publishes 1 KiB every 100 ms. The budget makes
/// room by dropping the oldest retained events, so at least 99 % of the
/// honest publishes succeed (here: all), its subscriber gets each exactly
/// once, and a resumer from history the flood pushed out gets `reset`
/// (`trimmed`), then exactly what is retained after it.
async fn a_publisher_filling_the_retained_budget_cannot_stop_another() {
    const BUDGET: usize = 2 * 1024 * 1024;
    let server = Server::start_with(|c| {
        c.storage.max_retained_bytes = BUDGET;
        c.limits.publish_rate = 0;
    })
    .await;
    let url = |path: &str| server.url(path);
    let honest = Honest::new("127.0.0.2");
    // Older history, watched throughout so it is only ever trimmed.
    let mut watcher = honest.subscribe(&url("/topics/history")).await;
    let mut history = Vec::new();
    for data in ["h1", "h2", "h3"] {
        let id = honest.publish(&url("/topics/history"), data).await;
        history.push(Ev::new(&id, "message", data));
    }
    let mut sub = honest.subscribe(&url("/topics/honest")).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooders: Vec<_> = (0..2)
        .map(|f| {
            let (stop, url) = (stop.clone(), server.url("/topics/flood"));
            let flooder = Honest::new("127.0.0.3").client;
            tokio::spawn(async move {
                let data = "f".repeat(if f == 0 { 64 * 1024 - 64 } else { 512 });
                let (mut stored, mut n) = (0usize, 0usize);
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    n += 1;
                    let response = flooder
                        .post(format!("{url}-{f}-{}", n % 32))
                        .body(data.clone())
                        .timeout(DEADLINE)
                        .send()
                        .await
                        .expect("a flood publish is answered");
                    if response.status() == 201 {
                        stored += data.len();
                    }
                }
                stored
            })
        })
        .collect();

    let data = "h".repeat(1024);
    let (mut tried, mut acknowledged) = (0, Vec::new());
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for i in 0..30 {
        tick.tick().await;
        tried += 1;
        let response = honest
            .client
            .post(url("/topics/honest"))
            .timeout(DEADLINE)
            .body(format!("{i} {data}"))
            .send()
            .await
            .expect("the honest publish is answered");
        if response.status() == 201 {
            let answer: serde_json::Value = response.json().await.unwrap();
            let id = answer["id"].as_str().unwrap();
            acknowledged.push(Ev::new(id, "message", &format!("{i} {data}")));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut flooded = 0;
    for flooder in flooders {
        flooded += flooder.await.unwrap();
    }
    eprintln!(
        "honest: {} of {tried} stored; flood: {} KiB stored",
        acknowledged.len(),
        flooded / 1024
    );
    assert!(
        flooded > 3 * BUDGET,
        "the flood stored only {flooded} bytes"
    );
    assert!(
        acknowledged.len() * 100 >= tried * 99,
        "{} of {tried} honest publishes stored",
        acknowledged.len()
    );
    assert_eq!(sub.take(acknowledged.len()).await, acknowledged);

    // After the flood, two more; a resumer from h1 hears its history was
    // trimmed, then exactly h4 and h5.
    for data in ["h4", "h5"] {
        let id = honest.publish(&url("/topics/history"), data).await;
        history.push(Ev::new(&id, "message", data));
    }
    assert_eq!(watcher.take(5).await, history);
    let mut resumer = SseClient::connect(
        &honest.client,
        &url("/topics/history"),
        Some(&history[0].id),
    )
    .await;
    let reset = resumer.next().await;
    assert_eq!(reset.event, "reset", "{reset:?}");
    let reset: serde_json::Value = serde_json::from_str(&reset.data).unwrap();
    assert_eq!(
        reset,
        serde_json::json!({
            "topic": "history",
            "reason": "trimmed",
            "requested": history[0].id,
            "oldest": history[3].id,
        })
    );
    assert_eq!(resumer.take(2).await, history[3..]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_filling_the_retained_budget_cannot_stop_another_on_memory() {
    a_publisher_filling_the_retained_budget_cannot_stop_another().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_filling_the_retained_budget_cannot_stop_another_on_durable() {
    common::on_durable(a_publisher_filling_the_retained_budget_cannot_stop_another()).await;
}

/// The topic flood of issue 21 in small: with no publish rate, one
/// publisher makes new topics in batches of 50, many times the topic budget
/// (200 here), while another publishes 1 KiB to a new topic every 100 ms.
/// Each new topic takes the place of one published to longer ago that no
/// one watches, so at least 99 % of the honest publishes succeed (here:
/// all), and a watched topic keeps its history throughout.
async fn a_publisher_making_topics_past_the_budget_cannot_stop_another() {
    let server = Server::start_with(|c| {
        c.storage.max_topics = 200;
        c.limits.publish_rate = 0;
    })
    .await;
    let url = |path: &str| server.url(path);
    let honest = Honest::new("127.0.0.2");
    let mut watcher = honest.subscribe(&url("/topics/kept")).await;
    let k1 = honest.publish(&url("/topics/kept"), "k1").await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooder = {
        let (stop, url) = (stop.clone(), server.url("/events"));
        let client = Honest::new("127.0.0.3").client;
        tokio::spawn(async move {
            let (mut made, mut n) = (0usize, 0usize);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                let batch: Vec<serde_json::Value> = (0..50)
                    .map(|i| serde_json::json!({"topic": format!("x-{n}-{i}"), "data": "e"}))
                    .collect();
                let response = client
                    .post(&url)
                    .body(serde_json::Value::Array(batch).to_string())
                    .timeout(DEADLINE)
                    .send()
                    .await
                    .expect("a flood batch is answered");
                if response.status() == 201 {
                    made += 50;
                }
            }
            made
        })
    };

    let data = "h".repeat(1024);
    let (mut tried, mut stored) = (0, 0);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for i in 0..30 {
        tick.tick().await;
        tried += 1;
        let response = honest
            .client
            .post(url(&format!("/topics/honest-{i}")))
            .timeout(DEADLINE)
            .body(data.clone())
            .send()
            .await
            .expect("the honest publish is answered");
        if response.status() == 201 {
            stored += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let made = flooder.await.unwrap();
    eprintln!("honest: {stored} of {tried} stored; flood: {made} topics made");
    assert!(made > 3 * 200, "the flood made only {made} topics");
    assert!(
        stored * 100 >= tried * 99,
        "{stored} of {tried} honest publishes stored"
    );
    // The watched topic kept its history: a resumer from k1 gets k2 exactly.
    let k2 = honest.publish(&url("/topics/kept"), "k2").await;
    assert_eq!(
        watcher.take(2).await,
        [Ev::new(&k1, "message", "k1"), Ev::new(&k2, "message", "k2")]
    );
    let mut resumer = SseClient::connect(&honest.client, &url("/topics/kept"), Some(&k1)).await;
    assert_eq!(resumer.next().await, Ev::new(&k2, "message", "k2"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_making_topics_past_the_budget_cannot_stop_another_on_memory() {
    a_publisher_making_topics_past_the_budget_cannot_stop_another().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_making_topics_past_the_budget_cannot_stop_another_on_durable() {
    common::on_durable(a_publisher_making_topics_past_the_budget_cannot_stop_another()).await;
}
