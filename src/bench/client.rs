//! A crowd of SSE subscribers over plain HTTP/1.1, shared by the scenarios
//! that need many connections (`fanout`, `idle`).
//!
//! Each subscriber is one task over a raw `TcpStream`: it writes its `GET`,
//! parses the answer with [`decode`](super::decode) and hands each `data:`
//! line to its [`Listener`]. Between reads it holds only its socket and a few
//! bytes of parser state; the read buffer lives on the worker's stack for
//! the duration of one read, so tens of thousands of subscribers cost little
//! more than their sockets. Sockets are bound to several loopback source
//! addresses so that the ephemeral ports of one address never run out.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::decode::{Body, DataLines, response_head};

/// What every many-subscriber scenario is told about its subscribers.
#[derive(Debug, Clone, Args)]
pub struct SubscribeArgs {
    /// Base URL of the hub (plain http://).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Path to subscribe to; `{topic}` is replaced (Nchan: `/sub/{topic}`).
    #[arg(long, default_value = "/topics/{topic}")]
    pub subscribe_path: String,
    /// Topic every subscriber subscribes to.
    #[arg(long, default_value = "bench")]
    pub topic: String,
    /// Number of subscribers.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Loopback source addresses (127.0.0.2 upwards) to spread subscribers
    /// over, so ephemeral ports never run out [default: one per 20,000
    /// subscribers, plus one spare].
    #[arg(long)]
    pub sources: Option<usize>,
    /// Longest wait for one subscriber's answer and first bytes.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// A server process to measure (repeat for a hub of several processes).
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
}

/// Subscribers per source address: well under the ~28,000 ephemeral ports
/// Linux offers per address by default.
const PER_SOURCE: usize = 20_000;

/// Subscribers connecting at once: a burst the hub's accept backlog absorbs.
const CONNECTING_AT_ONCE: usize = 256;

/// The hub under test.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port` as written in the URL, for the `Host` header.
    pub authority: String,
    /// The URL's own path, put before every path template.
    base_path: String,
}

impl Target {
    pub async fn resolve(url: &str) -> Result<Target, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("bad --url {url}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("--url {url}: the bench speaks plain http://"));
        }
        let authority = uri.authority().ok_or("--url needs a host")?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(80);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .collect();
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| format!("{host} has no address"))?;
        Ok(Target {
            addr,
            authority: authority.to_string(),
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The request path for a `{topic}` template.
    pub fn path(&self, template: &str, topic: &str) -> String {
        format!("{}{}", self.base_path, template.replace("{topic}", topic))
    }
}

/// Raises this process's open-file limit as far as allowed and checks that
/// `needed` descriptors fit.
pub fn raise_open_files(needed: usize) -> Result<(), String> {
    let limit = rlimit::increase_nofile_limit(u64::MAX)
        .map_err(|e| format!("cannot raise the open-file limit: {e}"))?;
    if (limit as usize) < needed {
        return Err(format!(
            "{needed} open files are needed and the limit is {limit} (see ulimit -Hn)"
        ));
    }
    Ok(())
}

/// Now, in microseconds since the Unix epoch: the clock events are stamped
/// with, comparable across processes on one machine.
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Receives a subscriber's events: the start of each `data:` line's value,
/// and when the read that brought it arrived (µs since the Unix epoch).
pub trait Listener: Send + 'static {
    fn on_data(&mut self, data: &[u8], arrived_us: u64);
}

/// A subscriber that only holds its connection.
impl Listener for () {
    fn on_data(&mut self, _: &[u8], _: u64) {}
}

/// Why a subscriber's stream ended.
enum Ending {
    /// The bench stopped it.
    Stopped,
    /// The hub ended or broke it (or it never opened): the reason.
    Dropped(String),
}

/// What one subscriber task gives back.
pub struct Outcome<L> {
    pub listener: L,
    /// Whether it got its answer and first bytes.
    pub connected: bool,
}

/// An open subscription, past its response head and preamble.
struct Stream {
    tcp: TcpStream,
    body: Body,
    lines: DataLines,
}

impl Stream {
    /// Connects from `source`, subscribes, and waits for the answer's head
    /// and the first bytes of its body (the hub's preamble), which is when
    /// a hub has the subscription in place.
    async fn open(
        addr: SocketAddr,
        source: Option<IpAddr>,
        request: &[u8],
    ) -> Result<Self, String> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| format!("socket: {e}"))?;
        if let Some(ip) = source {
            #[cfg(target_os = "linux")]
            bind_address_no_port(&socket).map_err(|e| format!("IP_BIND_ADDRESS_NO_PORT: {e}"))?;
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| format!("bind {ip}: {e}"))?;
        }
        let mut tcp = socket
            .connect(addr)
            .await
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        tcp.write_all(request)
            .await
            .map_err(|e| format!("send the request: {e}"))?;

        let mut head = Vec::with_capacity(1024);
        let (framing, len) = loop {
            if tcp.read_buf(&mut head).await.map_err(|e| e.to_string())? == 0 {
                return Err("the hub closed the connection before answering".into());
            }
            if let Some(found) = response_head(&head)? {
                break found;
            }
        };
        let mut stream = Stream {
            tcp,
            body: Body::new(framing),
            lines: DataLines::default(),
        };
        // Nothing is published before every subscriber is connected, so the
        // preamble holds no event to count.
        let mut seen = stream.feed(&head[len..], &mut ())?;
        while !seen {
            head.clear();
            if stream
                .tcp
                .read_buf(&mut head)
                .await
                .map_err(|e| e.to_string())?
                == 0
            {
                return Err("the stream ended before its first bytes".into());
            }
            seen = stream.feed(&head, &mut ())?;
        }
        Ok(stream)
    }

    /// Decodes bytes read from the socket; whether they held body data.
    fn feed(&mut self, bytes: &[u8], listener: &mut impl Listener) -> Result<bool, String> {
        let arrived_us = unix_micros();
        let mut any = false;
        let lines = &mut self.lines;
        self.body.feed(bytes, |data| {
            any |= !data.is_empty();
            lines.feed(data, |line| listener.on_data(line, arrived_us));
        })?;
        Ok(any)
    }

    /// Reads events into `listener` until `stop` or the end of the stream.
    async fn follow(&mut self, stop: &CancellationToken, listener: &mut impl Listener) -> Ending {
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        loop {
            if self.body.is_done() {
                return Ending::Dropped("the hub ended the stream".into());
            }
            tokio::select! {
                biased;
                () = &mut stopped => return Ending::Stopped,
                ready = self.tcp.readable() => {
                    if let Err(e) = ready {
                        return Ending::Dropped(e.to_string());
                    }
                }
            }
            // Declared after the await, so it lives on the worker's stack
            // during this read only, not in every subscriber's task.
            let mut buf = [0u8; 16 * 1024];
            match self.tcp.try_read(&mut buf) {
                Ok(0) => return Ending::Dropped("the hub closed the connection".into()),
                Ok(n) => {
                    if let Err(e) = self.feed(&buf[..n], listener) {
                        return Ending::Dropped(e);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Ending::Dropped(e.to_string()),
            }
        }
    }
}

/// Leaves the choice of a bound socket's port to `connect`, which needs it
/// free only for this 4-tuple and may reuse one in TIME_WAIT
/// (`net.ipv4.tcp_tw_reuse`, on for loopback by default). Otherwise `bind`
/// must find a port free for any destination: a previous run's TIME_WAITs
/// (a minute) exhaust the range, and the search slows connecting to a crawl
/// long before that.
#[cfg(target_os = "linux")]
fn bind_address_no_port(socket: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a live socket descriptor, and an option value of the size
    // given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Counters the subscriber tasks share with the scenario.
#[derive(Default)]
struct Counts {
    connected: AtomicUsize,
    failed: AtomicUsize,
    dropped: AtomicUsize,
    first_problem: Mutex<Option<String>>,
}

impl Counts {
    fn note(&self, counter: &AtomicUsize, problem: &str) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_problem.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert_with(|| problem.to_owned());
    }
}

/// Many subscribers to one path, each its own task.
pub struct Crowd<L> {
    tasks: Vec<JoinHandle<Outcome<L>>>,
    counts: Arc<Counts>,
    stop: CancellationToken,
}

impl<L: Listener> Crowd<L> {
    /// Starts `args.subscribers` subscribers, a few hundred connecting at a
    /// time; `listener(i)` makes the i-th one's listener.
    pub fn spawn(
        args: &SubscribeArgs,
        target: &Target,
        mut listener: impl FnMut(usize) -> L,
    ) -> Result<Crowd<L>, String> {
        let sources = sources(target, args)?;
        let request: Arc<[u8]> = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n",
            target.path(&args.subscribe_path, &args.topic),
            target.authority
        )
        .into_bytes()
        .into();
        let gate = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
        let counts = Arc::new(Counts::default());
        let stop = CancellationToken::new();
        let tasks = (0..args.subscribers)
            .map(|i| {
                let (gate, counts, stop) = (gate.clone(), counts.clone(), stop.clone());
                let request = request.clone();
                let (addr, source, timeout) = (
                    target.addr,
                    sources[i % sources.len()],
                    args.connect_timeout,
                );
                let mut listener = listener(i);
                tokio::spawn(async move {
                    let opening = async {
                        let _permit = gate.acquire().await;
                        tokio::time::timeout(timeout, Stream::open(addr, source, &request))
                            .await
                            .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
                    };
                    let opened = tokio::select! {
                        () = stop.cancelled() => Err("stopped while connecting".to_owned()),
                        opened = opening => opened,
                    };
                    let mut stream = match opened {
                        Ok(stream) => stream,
                        Err(problem) => {
                            counts.note(&counts.failed, &problem);
                            return Outcome {
                                listener,
                                connected: false,
                            };
                        }
                    };
                    counts.connected.fetch_add(1, Ordering::Relaxed);
                    if let Ending::Dropped(problem) = stream.follow(&stop, &mut listener).await {
                        counts.note(&counts.dropped, &problem);
                    }
                    Outcome {
                        listener,
                        connected: true,
                    }
                })
            })
            .collect();
        Ok(Crowd {
            tasks,
            counts,
            stop,
        })
    }

    /// Subscribers connected so far.
    pub fn connected(&self) -> usize {
        self.counts.connected.load(Ordering::Relaxed)
    }

    /// Subscribers whose stream ended or broke after connecting.
    pub fn dropped(&self) -> usize {
        self.counts.dropped.load(Ordering::Relaxed)
    }

    /// The first thing that went wrong with any subscriber.
    pub fn first_problem(&self) -> Option<String> {
        self.counts
            .first_problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until every subscriber has connected or failed to, printing
    /// progress each second; returns how many connected, if any did.
    pub async fn wait_connected(&self) -> Result<usize, String> {
        let started = tokio::time::Instant::now();
        let mut reported = started;
        loop {
            let connected = self.connected();
            let failed = self.counts.failed.load(Ordering::Relaxed);
            let done = connected + failed >= self.tasks.len();
            if done || reported.elapsed() >= Duration::from_secs(1) {
                reported = tokio::time::Instant::now();
                eprintln!(
                    "connecting: {connected}/{} connected, {failed} failed ({:.1} s)",
                    self.tasks.len(),
                    started.elapsed().as_secs_f64()
                );
            }
            if done {
                let problem = self.first_problem().filter(|_| failed > 0);
                return match (connected, problem) {
                    (0, problem) => Err(format!(
                        "no subscriber connected: {}",
                        problem.unwrap_or_default()
                    )),
                    (_, Some(problem)) => {
                        eprintln!("first failure: {problem}");
                        Ok(connected)
                    }
                    (_, None) => Ok(connected),
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every subscriber and collects what each recorded.
    pub async fn close(mut self) -> Result<Vec<Outcome<L>>, String> {
        self.stop.cancel();
        let mut outcomes = Vec::with_capacity(self.tasks.len());
        for task in std::mem::take(&mut self.tasks) {
            outcomes.push(
                task.await
                    .map_err(|e| format!("a subscriber task failed: {e}"))?,
            );
        }
        Ok(outcomes)
    }
}

/// A crowd given up on (the scenario failed) stops its subscribers.
impl<L> Drop for Crowd<L> {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The source address of each subscriber socket: 127.0.0.2 upwards for a
/// loopback IPv4 hub; the system's choice otherwise.
fn sources(target: &Target, args: &SubscribeArgs) -> Result<Vec<Option<IpAddr>>, String> {
    let count = args
        .sources
        .unwrap_or(args.subscribers.div_ceil(PER_SOURCE) + 1)
        .max(1);
    match target.addr.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => {
            if count > 1 << 23 {
                return Err(format!("--sources {count}: 127.0.0.0/8 is not that large"));
            }
            let first = u32::from(Ipv4Addr::new(127, 0, 0, 2));
            Ok((0..count as u32)
                .map(|i| Some(IpAddr::V4(Ipv4Addr::from(first + i))))
                .collect())
        }
        _ => {
            if args.sources.is_some() {
                eprintln!("--sources ignored: the hub is not on 127.0.0.0/8");
            }
            Ok(vec![None])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_following_subscriber_does_not_carry_its_read_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let mut stream = Stream {
            tcp,
            body: Body::new(super::super::decode::Framing::Chunked),
            lines: DataLines::default(),
        };
        let (stop, mut listener) = (CancellationToken::new(), ());
        let following = stream.follow(&stop, &mut listener);
        let size = std::mem::size_of_val(&following);
        assert!(size < 1024, "{size} bytes");
    }
}
