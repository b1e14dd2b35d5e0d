//! `crier bench attack`: one flood against a hub for a while, so that the
//! hub's defences can be measured while something else (`crier bench
//! fanout`, usually) measures what honest clients get.
//!
//! `--connections` attackers run at once, spread over `--sources` loopback
//! addresses; each holds at most one connection at a time and, when the hub
//! ends it (a refusal, a timeout), connects again after `--retry`, until the
//! duration is over. Everything the hub answers is counted by status and
//! problem type, with how long after the connection (for `publish-flood`,
//! the request) it came. The hub's resident memory and open descriptors are
//! read before, during (the highest) and after the attack, once it has had
//! `--settle` to let go of what the attack cost.
//!
//! Like the rest of the tool it speaks raw TCP and HTTP/1.1 only (the
//! `tls-half` attack sends the first bytes of a ClientHello, never a
//! handshake), and only to 127.0.0.0/8, bounded in count and time.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::raise_open_files;
use super::decode::number_after;
use super::procfs;
use super::report::{percentiles_ms, round};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// Each connection opens an event stream on `--path` and holds it.
    Conns,
    /// TCP connections that never send a byte.
    Silent,
    /// TLS connections that send half a ClientHello and nothing more (the
    /// hub's TLS listener).
    TlsHalf,
    /// A request head sent one byte per `--interval` (1s), never finished.
    Slowloris,
    /// A POST to `--path` of `Content-Length: 65536` whose body comes one
    /// byte per `--interval` (10ms).
    Dribble,
    /// Publishes to `--path` as fast as the hub answers, on keep-alive
    /// connections.
    PublishFlood,
}

#[derive(Debug, Clone, Args)]
pub struct AttackArgs {
    /// The attack.
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// The hub, on 127.0.0.0/8 (http:// or, for tls-half, https://; the
    /// tool never speaks TLS).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Attackers at once, each holding at most one connection.
    #[arg(long, default_value_t = 100)]
    pub connections: usize,
    /// Source addresses in 127.0.0.0/8: one (`127.0.1.1`) or a range
    /// (`127.0.1.1-127.0.1.8`), used in turn.
    #[arg(long, default_value = "127.0.1.1", value_parser = Sources::parse)]
    pub sources: Sources,
    /// How long the attack lasts.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Path of the stream (conns), of the request (slowloris) or of the
    /// publishes (dribble, publish-flood).
    #[arg(long, default_value = "/topics/flood")]
    pub path: String,
    /// Pause before an attacker whose connection ended connects again.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub retry: Duration,
    /// Time between two bytes of a slowloris head (default 1s) or of a
    /// dribbled body (default 10ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub interval: Option<Duration>,
    /// After the attack's last connection closed, how long the hub is left
    /// before its memory and descriptors are read again.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// The hub's process, for its memory, descriptors and CPU [default:
    /// the process listening on --url's port].
    #[arg(long)]
    pub pid: Option<u32>,
}

/// Most attackers one run may have (the tool holds a socket for each).
const MAX_CONNECTIONS: usize = 50_000;
/// Longest attack.
const MAX_DURATION: Duration = Duration::from_secs(600);
/// Connections being set up at once.
const CONNECTING_AT_ONCE: usize = 256;
/// Longest wait for a connection to be set up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the rest of an answer once its first bytes came.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest answer read (canned refusals and problems are a few hundred
/// bytes).
const MAX_ANSWER: usize = 64 * 1024;
/// How often the hub is measured during the attack.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// Half a TLS ClientHello: a handshake record header announcing 512 bytes,
/// and the first two of them.
const HALF_CLIENT_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00];

/// Loopback source addresses, used in turn.
#[derive(Debug, Clone)]
pub struct Sources(Vec<Ipv4Addr>);

impl Sources {
    /// `A` or `A-B` (inclusive), all in 127.0.0.0/8, at most 4,096.
    pub fn parse(s: &str) -> Result<Sources, String> {
        let ip = |a: &str| -> Result<Ipv4Addr, String> {
            let ip: Ipv4Addr = a
                .trim()
                .parse()
                .map_err(|_| format!("`{a}` is not an IPv4 address"))?;
            if !ip.is_loopback() {
                return Err(format!("{ip} is not in 127.0.0.0/8"));
            }
            Ok(ip)
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (ip(a)?, ip(b)?),
            None => (ip(s)?, ip(s)?),
        };
        let (first, last) = (u32::from(first), u32::from(last));
        if last < first {
            return Err(format!("`{s}`: the range ends before it starts"));
        }
        if last - first >= 4096 {
            return Err(format!("`{s}`: more than 4,096 addresses"));
        }
        Ok(Sources((first..=last).map(Ipv4Addr::from).collect()))
    }

    fn describe(&self) -> String {
        match (self.0.first(), self.0.last()) {
            (Some(a), Some(b)) if a != b => format!("{a}-{b}"),
            (Some(a), _) => a.to_string(),
            _ => String::new(),
        }
    }
}

/// What the hub answered, read from the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// The problem type's last part (`urn:crier:problem:KIND`), if any.
    pub problem: Option<String>,
    /// The `seq` of a publish answer.
    pub seq: Option<u64>,
    /// Whether the hub closes the connection after it.
    pub close: bool,
}

impl Answer {
    /// How the answer is counted: its status and problem type.
    fn label(&self) -> String {
        match &self.problem {
            Some(problem) => format!("{} {problem}", self.status),
            None => self.status.to_string(),
        }
    }

    /// Reads a whole answer at the start of `buf`: its head and, when it
    /// gives a `Content-Length`, its body (an answer without one, such as an
    /// event stream, is complete with its head). `Ok(None)`: not complete
    /// yet; the `usize` is the answer's length.
    pub fn parse(buf: &[u8]) -> Result<Option<(Answer, usize)>, String> {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if buf.len() > MAX_ANSWER {
                return Err(format!("an answer head longer than {MAX_ANSWER} bytes"));
            }
            return Ok(None);
        };
        let head = String::from_utf8_lossy(&buf[..end]);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.split(' ').nth(1))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("not an HTTP/1.x answer: `{status_line}`"))?;
        let (mut length, mut close) = (None, false);
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => {
                    length = Some(
                        value
                            .parse::<usize>()
                            .map_err(|_| format!("bad content-length `{value}`"))?,
                    );
                }
                "connection" => close |= value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let body_start = end + 4;
        let body_end = body_start + length.unwrap_or(0);
        if body_end > MAX_ANSWER {
            return Err(format!("an answer longer than {MAX_ANSWER} bytes"));
        }
        let Some(body) = buf.get(body_start..body_end) else {
            return Ok(None);
        };
        let problem = body
            .windows(PROBLEM.len())
            .position(|w| w == PROBLEM)
            .map(|at| &body[at + PROBLEM.len()..])
            .and_then(|rest| rest.split(|&b| b == b'"').next())
            .map(|kind| String::from_utf8_lossy(kind).into_owned());
        let seq = number_after(body, b"\"seq\":");
        Ok(Some((
            Answer {
                status,
                problem,
                seq,
                close,
            },
            body_end,
        )))
    }
}

const PROBLEM: &[u8] = b"\"type\":\"urn:crier:problem:";

/// Whether `seqs` (in any order) are consecutive numbers, none twice.
pub fn dense(seqs: &mut [u64]) -> bool {
    seqs.sort_unstable();
    seqs.windows(2).all(|w| w[1] == w[0] + 1)
}

/// What the attackers saw, shared by them.
#[derive(Default)]
struct Tally {
    attempts: AtomicU64,
    open: AtomicUsize,
    open_max: AtomicUsize,
    /// Per outcome, how long after the connection (or request) it came, µs.
    outcomes: Mutex<BTreeMap<String, Vec<u64>>>,
    /// `seq` of every publish the hub stored.
    seqs: Mutex<Vec<u64>>,
    first_error: Mutex<Option<String>>,
}

impl Tally {
    fn record(&self, outcome: &str, since: Instant) {
        let us = since.elapsed().as_micros() as u64;
        let mut outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        match outcomes.get_mut(outcome) {
            Some(times) => times.push(us),
            None => {
                outcomes.insert(outcome.to_owned(), vec![us]);
            }
        }
    }

    fn answered(&self, answer: &Answer, since: Instant) {
        self.record(&answer.label(), since);
        if let (true, Some(seq)) = ((200..300).contains(&answer.status), answer.seq) {
            self.seqs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(seq);
        }
    }

    fn error(&self, outcome: &str, since: Instant, error: String) {
        self.record(outcome, since);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(error);
    }

    /// Counts a connection as open until the guard is dropped.
    fn opened(&self) -> OpenConnection<'_> {
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.open_max.fetch_max(open, Ordering::Relaxed);
        OpenConnection(self)
    }
}

struct OpenConnection<'a>(&'a Tally);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Everything the attackers share.
struct Attack {
    kind: Kind,
    addr: SocketAddr,
    /// What an attacker sends first, and the byte it then trickles, if any.
    head: Vec<u8>,
    trickle: Option<(u8, Duration)>,
    retry: Duration,
    gate: Semaphore,
    stop: CancellationToken,
    tally: Tally,
}

/// How an attacker's connection ended.
enum Heard {
    Answer(Answer),
    /// The hub closed it without a byte.
    Closed,
    /// Broken: reset, or something that is not an answer.
    Broken(String),
    /// The attack is over.
    Stopped,
}

impl Attack {
    /// One attacker: connects, attacks, and again after `--retry` whenever
    /// the hub ended its connection, until the attack is over.
    async fn attacker(self: Arc<Self>, source: Ipv4Addr) {
        let mut first = true;
        while !self.stop.is_cancelled() {
            if !std::mem::take(&mut first) {
                tokio::select! {
                    () = self.stop.cancelled() => break,
                    () = tokio::time::sleep(self.retry) => {}
                }
            }
            self.tally.attempts.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let connected = tokio::select! {
                () = self.stop.cancelled() => break,
                connected = self.connect(source) => connected,
            };
            let tcp = match connected {
                Ok(tcp) => tcp,
                Err(error) => {
                    self.tally.error("connect failed", started, error);
                    continue;
                }
            };
            let _open = self.tally.opened();
            match self.kind {
                Kind::Conns => self.hold_stream(tcp).await,
                Kind::PublishFlood => self.publish(tcp).await,
                Kind::Silent | Kind::TlsHalf | Kind::Slowloris | Kind::Dribble => {
                    self.provoke(tcp).await;
                }
            }
        }
    }

    async fn connect(&self, source: Ipv4Addr) -> Result<TcpStream, String> {
        let _permit = self.gate.acquire().await.map_err(|e| e.to_string())?;
        let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        #[cfg(target_os = "linux")]
        super::subscriber::bind_address_no_port(&socket)
            .map_err(|e| format!("IP_BIND_ADDRESS_NO_PORT: {e}"))?;
        socket
            .bind(SocketAddr::new(IpAddr::V4(source), 0))
            .map_err(|e| format!("bind {source}: {e}"))?;
        tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(self.addr))
            .await
            .map_err(|_| format!("no connection within {CONNECT_TIMEOUT:?}"))?
            .map_err(|e| format!("connect from {source}: {e}"))
    }

    /// Sends the head, then trickles a byte per interval (if this attack
    /// does), until the hub says something or closes.
    async fn provoke(&self, mut tcp: TcpStream) {
        let since = Instant::now();
        let mut buf = Vec::new();
        let sent = async {
            if !self.head.is_empty() {
                tcp.write_all(&self.head).await?;
            }
            match self.trickle {
                Some((byte, every)) => loop {
                    tokio::select! {
                        ready = tcp.readable() => return ready,
                        () = tokio::time::sleep(every) => tcp.write_all(&[byte]).await?,
                    }
                },
                None => tcp.readable().await,
            }
        };
        // A write refused by a closed connection ends it too: whatever the
        // hub said before closing is still to be read.
        let spoke = tokio::select! {
            () = self.stop.cancelled() => false,
            _ = sent => true,
        };
        if spoke {
            let heard = self.hear(&mut tcp, &mut buf).await;
            self.note(heard, since, "closed without an answer");
        }
    }

    /// Opens an event stream and holds it until the attack ends (or the
    /// hub ends it).
    async fn hold_stream(&self, mut tcp: TcpStream) {
        let since = Instant::now();
        let mut buf = Vec::new();
        // Should the write fail, the hub's answer is still to be read.
        let _ = tcp.write_all(&self.head).await;
        let heard = self.hear(&mut tcp, &mut buf).await;
        let streaming = matches!(&heard, Heard::Answer(a) if a.status == 200);
        self.note(heard, since, "closed without an answer");
        if !streaming {
            return;
        }
        // Reads (and drops) what the stream brings, heartbeats mostly, so
        // that the hub's writes never back up.
        let ended = async {
            loop {
                if tcp.readable().await.is_err() {
                    return;
                }
                let mut sink = [0u8; 4096];
                match tcp.try_read(&mut sink) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        };
        tokio::select! {
            () = self.stop.cancelled() => {}
            () = ended => self.tally.record("200, then closed by the hub", since),
        }
    }

    /// Publishes one request after the other on a keep-alive connection,
    /// until the hub closes it.
    async fn publish(&self, mut tcp: TcpStream) {
        let mut buf = Vec::new();
        while !self.stop.is_cancelled() {
            let since = Instant::now();
            if tcp.write_all(&self.head).await.is_err() {
                // The hub closed it; its answer, if any, was counted.
                self.note(Heard::Closed, since, "closed before a request");
                return;
            }
            let heard = self.hear_in_flight(&mut tcp, &mut buf).await;
            let again = matches!(&heard, Heard::Answer(a) if !a.close);
            self.note(heard, since, "closed without an answer");
            if !again {
                return;
            }
        }
    }

    /// Reads one answer (or the close) from the hub, unless the attack
    /// ends first.
    async fn hear(&self, tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Heard {
        tokio::select! {
            () = self.stop.cancelled() => Heard::Stopped,
            heard = Self::read_answer(tcp, buf) => heard,
        }
    }

    /// Reads the answer to a request already sent, past the attack's end
    /// too (for at most [`ANSWER_TIMEOUT`] after it): a publish the hub
    /// stored is counted, so the stored numbers are checked whole.
    async fn hear_in_flight(&self, tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Heard {
        let read = Self::read_answer(tcp, buf);
        tokio::pin!(read);
        tokio::select! {
            heard = &mut read => return heard,
            () = self.stop.cancelled() => {}
        }
        tokio::time::timeout(ANSWER_TIMEOUT, read)
            .await
            .unwrap_or(Heard::Stopped)
    }

    /// Reads one answer (or the close). What follows it in `buf` is kept
    /// for the next.
    async fn read_answer(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Heard {
        let read = async {
            loop {
                if let Some((answer, len)) = Answer::parse(buf).map_err(Heard::Broken)? {
                    buf.drain(..len);
                    return Ok(answer);
                }
                // The first bytes may take the hub's time; the rest not.
                let waiting = buf.is_empty();
                let read = tcp.read_buf(buf);
                let n = if waiting {
                    read.await
                } else {
                    tokio::time::timeout(ANSWER_TIMEOUT, read)
                        .await
                        .map_err(|_| Heard::Broken("an answer cut short".into()))?
                };
                match n {
                    Ok(0) if buf.is_empty() => return Err(Heard::Closed),
                    Ok(0) => return Err(Heard::Broken("an answer cut short".into())),
                    Ok(_) => {}
                    Err(e) if buf.is_empty() => return Err(Heard::Broken(e.to_string())),
                    Err(_) => return Err(Heard::Broken("an answer cut short".into())),
                }
            }
        };
        match read.await {
            Ok(answer) => Heard::Answer(answer),
            Err(heard) => heard,
        }
    }

    fn note(&self, heard: Heard, since: Instant, closed: &str) {
        match heard {
            Heard::Answer(answer) => self.tally.answered(&answer, since),
            Heard::Closed => self.tally.record(closed, since),
            Heard::Broken(error) => {
                let outcome = if error.contains("reset") {
                    "reset".to_owned()
                } else {
                    "broken".to_owned()
                };
                self.tally.error(&outcome, since, error);
            }
            Heard::Stopped => {}
        }
    }
}

/// The hub's address from `--url`, which must be on 127.0.0.0/8, and the
/// `Host` to send.
async fn target(url: &str) -> Result<(SocketAddr, String), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad --url {url}: {e}"))?;
    let default_port = match uri.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        _ => return Err(format!("--url {url}: http:// or https://")),
    };
    let authority = uri.authority().ok_or("--url needs a host")?;
    let port = authority.port_u16().unwrap_or(default_port);
    let addr = tokio::net::lookup_host((authority.host(), port))
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", authority.host()))?
        .find(|a| a.is_ipv4())
        .ok_or_else(|| format!("{} has no IPv4 address", authority.host()))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "--url {url}: the attack goes to 127.0.0.0/8 only, not {}",
            addr.ip()
        ));
    }
    Ok((addr, authority.to_string()))
}

/// The first bytes each attacker sends.
fn head(kind: Kind, path: &str, host: &str) -> Vec<u8> {
    match kind {
        Kind::Conns => {
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n")
                .into_bytes()
        }
        Kind::Silent => Vec::new(),
        Kind::TlsHalf => HALF_CLIENT_HELLO.to_vec(),
        Kind::Slowloris => format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nX-Slow: ").into_bytes(),
        Kind::Dribble => {
            format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 65536\r\n\r\n")
                .into_bytes()
        }
        Kind::PublishFlood => {
            let body = "flood";
            format!(
                "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        }
    }
}

/// The hub's memory and descriptors now.
fn measure(pid: u32) -> Result<(u64, usize), String> {
    Ok((
        procfs::memory_bytes(pid, "VmRSS")?,
        procfs::open_descriptors(pid)?,
    ))
}

pub async fn run(mut args: AttackArgs) -> Result<Value, String> {
    if args.connections == 0 || args.connections > MAX_CONNECTIONS {
        return Err(format!("--connections: 1 to {MAX_CONNECTIONS}"));
    }
    if args.duration.is_zero() || args.duration > MAX_DURATION {
        return Err(format!("--duration: up to {MAX_DURATION:?}"));
    }
    let (addr, host) = target(&args.url).await?;
    if args.pid.is_none() {
        // The target is on this machine (127.0.0.0/8): its hub is found by
        // its port; without it the run still counts the answers.
        match procfs::listening_pid(addr.port()) {
            Ok(pid) => args.pid = Some(pid),
            Err(e) => eprintln!("bench attack: no server figures ({e})"),
        }
    }
    raise_open_files(args.connections + 64)?;
    let trickle = match args.kind {
        Kind::Slowloris => Some((b'a', args.interval.unwrap_or(Duration::from_secs(1)))),
        Kind::Dribble => Some((b'x', args.interval.unwrap_or(Duration::from_millis(10)))),
        _ => None,
    };
    if trickle.is_some_and(|(_, every)| every < Duration::from_millis(1)) {
        return Err("--interval: at least 1ms".into());
    }
    let kind_name = args
        .kind
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default();
    eprintln!(
        "bench attack {kind_name}: {} connections from {} for {:?} against {}",
        args.connections,
        args.sources.describe(),
        args.duration,
        args.url
    );
    let before = args.pid.map(measure).transpose()?;
    let hub_cpu_before = args.pid.map(procfs::cpu_seconds).transpose()?;
    let tool_cpu_before = procfs::cpu_seconds(std::process::id())?;

    let attack = Arc::new(Attack {
        kind: args.kind,
        addr,
        head: head(args.kind, &args.path, &host),
        trickle,
        retry: args.retry,
        gate: Semaphore::new(CONNECTING_AT_ONCE),
        stop: CancellationToken::new(),
        tally: Tally::default(),
    });
    let started = Instant::now();
    let attackers: Vec<_> = (0..args.connections)
        .map(|i| {
            let source = args.sources.0[i % args.sources.0.len()];
            tokio::spawn(attack.clone().attacker(source))
        })
        .collect();

    // Measures the hub until the attack is over, reporting each second.
    let (mut rss_max, mut fds_max) = before.unwrap_or_default();
    let mut ticks = tokio::time::interval(SAMPLE_EVERY);
    let mut reported = started;
    while started.elapsed() < args.duration {
        ticks.tick().await;
        let now = args.pid.map(measure).transpose()?;
        if let Some((rss, fds)) = now {
            rss_max = rss_max.max(rss);
            fds_max = fds_max.max(fds);
        }
        if reported.elapsed() >= Duration::from_secs(1) {
            reported = Instant::now();
            let hub = now.map_or(String::new(), |(rss, fds)| {
                format!(
                    "; hub: {fds} descriptors, {:.1} MiB",
                    rss as f64 / 1048576.0
                )
            });
            eprintln!(
                "{:5.1} s: {} open, {} connections tried{hub}",
                started.elapsed().as_secs_f64(),
                attack.tally.open.load(Ordering::Relaxed),
                attack.tally.attempts.load(Ordering::Relaxed),
            );
        }
    }
    let open_at_end = attack.tally.open.load(Ordering::Relaxed);
    attack.stop.cancel();
    for attacker in attackers {
        attacker
            .await
            .map_err(|e| format!("an attacker failed: {e}"))?;
    }
    let window = started.elapsed().as_secs_f64();
    let hub_cpu = match (args.pid, hub_cpu_before) {
        (Some(pid), Some(before)) => Some(procfs::cpu_seconds(pid)? - before),
        _ => None,
    };
    let tool_cpu = procfs::cpu_seconds(std::process::id())? - tool_cpu_before;
    tokio::time::sleep(args.settle).await;
    let after = args.pid.map(measure).transpose()?;

    let tally = &attack.tally;
    let outcomes: serde_json::Map<String, Value> =
        std::mem::take(&mut *tally.outcomes.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .map(|(outcome, times)| {
                let count = times.len();
                (
                    outcome,
                    json!({ "count": count, "after_ms": percentiles_ms(times) }),
                )
            })
            .collect();
    let mut result = json!({
        "scenario": "attack",
        "kind": kind_name,
        "url": args.url,
        "connections": args.connections,
        "sources": args.sources.describe(),
        "duration_s": args.duration.as_secs_f64(),
        "retry_s": args.retry.as_secs_f64(),
        "window_s": round(window, 3),
        "attempts": tally.attempts.load(Ordering::Relaxed),
        "open_max": tally.open_max.load(Ordering::Relaxed),
        "open_at_end": open_at_end,
        "outcomes": outcomes,
        "first_error": *tally.first_error.lock().unwrap_or_else(|e| e.into_inner()),
        "tool": { "cpu_s": round(tool_cpu, 2) },
    });
    if let Some((_, every)) = trickle {
        result["interval_ms"] = json!(every.as_secs_f64() * 1000.0);
    }
    if args.kind == Kind::PublishFlood {
        let mut seqs = std::mem::take(&mut *tally.seqs.lock().unwrap_or_else(|e| e.into_inner()));
        let stored = seqs.len();
        let dense = dense(&mut seqs);
        result["stored"] = json!({
            "count": stored,
            "first_seq": seqs.first(),
            "last_seq": seqs.last(),
            "dense": dense,
        });
    }
    if let (Some(pid), Some((rss_before, fds_before)), Some((rss_after, fds_after))) =
        (args.pid, before, after)
    {
        result["hub"] = json!({
            "pid": pid,
            "rss_bytes": { "before": rss_before, "during_max": rss_max, "after": rss_after },
            "fds": { "before": fds_before, "during_max": fds_max, "after": fds_after },
            "cpu_s": hub_cpu.map(|s| round(s, 2)),
            "settle_s": args.settle.as_secs_f64(),
        });
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_one_loopback_address_or_a_range() {
        let one = Sources::parse("127.0.1.1").unwrap();
        assert_eq!(one.0, vec![Ipv4Addr::new(127, 0, 1, 1)]);
        assert_eq!(one.describe(), "127.0.1.1");
        let range = Sources::parse("127.0.1.254-127.0.2.1").unwrap();
        assert_eq!(range.0.len(), 4);
        assert_eq!(range.0[2], Ipv4Addr::new(127, 0, 2, 0));
        assert_eq!(range.describe(), "127.0.1.254-127.0.2.1");
        assert!(Sources::parse("10.0.0.1").is_err());
        assert!(Sources::parse("127.0.0.1-10.0.0.1").is_err());
        assert!(Sources::parse("127.0.1.2-127.0.1.1").is_err());
        assert!(Sources::parse("127.0.0.1-127.0.255.255").is_err());
        assert!(Sources::parse("localhost").is_err());
    }

    #[test]
    fn an_answer_is_complete_with_its_body_and_counted_by_status_and_problem() {
        let body = r#"{"type":"urn:crier:problem:too-many-connections","title":"Too Many Requests","status":429}"#;
        let canned = format!(
            "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/problem+json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let bytes = canned.as_bytes();
        for cut in [10, bytes.len() - body.len(), bytes.len() - 1] {
            assert_eq!(Answer::parse(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        let (answer, len) = Answer::parse(bytes).unwrap().unwrap();
        assert_eq!(len, bytes.len());
        assert_eq!(answer.label(), "429 too-many-connections");
        assert!(answer.close);
        assert_eq!(answer.seq, None);

        let published = b"HTTP/1.1 201 Created\r\nContent-Length: 40\r\n\r\n{\"topic\":\"t\",\"id\":\"17.1x4rup0\",\"seq\":17}HTTP/1.1";
        let (answer, len) = Answer::parse(published).unwrap().unwrap();
        assert_eq!(
            (answer.status, answer.seq, answer.close),
            (201, Some(17), false)
        );
        assert_eq!(answer.label(), "201");
        assert_eq!(&published[len..], b"HTTP/1.1");

        // An event stream is complete with its head.
        let stream = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        let (answer, len) = Answer::parse(stream).unwrap().unwrap();
        assert_eq!((answer.label(), len), ("200".to_owned(), stream.len()));

        assert!(Answer::parse(b"\x15\x03\x03\x00\x02\x02\x28\r\n\r\n").is_err());
        assert!(Answer::parse(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
    }

    #[test]
    fn stored_numbers_are_dense_when_none_is_missing_or_repeated() {
        assert!(dense(&mut [3, 1, 2, 4]));
        assert!(dense(&mut []));
        assert!(!dense(&mut [1, 2, 4]));
        assert!(!dense(&mut [1, 2, 2, 3]));
    }
}
