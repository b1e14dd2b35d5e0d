//! Real `redis-server` processes for tests, on free loopback ports, and a TCP
//! proxy that can cut one node's connection to Redis.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::DEADLINE;

/// A `redis-server` child process. Stopped (and its files removed) on drop.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    persistent: bool,
    /// Certificate and key files: serve TLS only.
    tls: Option<(PathBuf, PathBuf)>,
}

impl RedisServer {
    /// Starts a Redis that keeps its data across `restart` (append-only file).
    pub fn start() -> RedisServer {
        RedisServer::start_with(true)
    }

    /// Starts a Redis that forgets everything when it stops.
    pub fn start_volatile() -> RedisServer {
        RedisServer::start_with(false)
    }

    /// Starts a Redis that speaks only TLS, with this certificate and key.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> RedisServer {
        RedisServer::start_with_tls(false, Some((cert.to_owned(), key.to_owned())))
    }

    fn start_with(persistent: bool) -> RedisServer {
        RedisServer::start_with_tls(persistent, None)
    }

    fn start_with_tls(persistent: bool, tls: Option<(PathBuf, PathBuf)>) -> RedisServer {
        let dir = std::env::temp_dir().join(format!(
            "crier-test-redis-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("create a directory for redis-server");
        let mut server = RedisServer {
            port: 0,
            dir,
            child: None,
            persistent,
            tls,
        };
        // A port found free may be taken before redis-server binds it: retry.
        for _ in 0..10 {
            server.port = free_port();
            if server.launch() {
                return server;
            }
        }
        panic!("could not start redis-server on a free port");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Starts the process on `self.port`; false if it did not come up.
    fn launch(&mut self) -> bool {
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some((cert, key)) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .args(["--tls-auth-clients", "no"]),
        };
        command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--daemonize", "no", "--protected-mode", "no"])
            .args(["--appendonly", if self.persistent { "yes" } else { "no" }])
            .args(["--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = match command.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed, and the Redis tests need it: \
                 install it (Debian/Ubuntu: `apt-get install -y redis-server`) and run the tests again"
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return false; // exited: most likely the port was taken
            }
            let up = match self.tls {
                None => ping(self.port),
                Some(_) => std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
            };
            if up {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not answer PING within {DEADLINE:?}");
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is
    /// answered or delivered, as with a hung Redis. It goes on when the
    /// guard is dropped, even if the test fails first.
    pub fn pause(&self) -> Paused<'_> {
        self.send(libc::SIGSTOP);
        Paused(self)
    }

    fn send(&self, signal: libc::c_int) {
        if let Some(child) = &self.child {
            let pid = libc::pid_t::try_from(child.id()).expect("a pid");
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Stops the server (SIGKILL: no chance to save anything beyond what the
    /// append-only file already has).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A paused server is let go on first, so nothing lingers.
            // SAFETY: kill(2) on our own child's pid.
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                unsafe { libc::kill(pid, libc::SIGCONT) };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        assert!(self.launch(), "redis-server restarts on port {}", self.port);
    }

    /// Runs a command through `redis-cli` and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A frozen [`RedisServer`]; dropping it lets the server go on (SIGCONT).
pub struct Paused<'a>(&'a RedisServer);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.send(libc::SIGCONT);
    }
}

static NEXT_DIR: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port")
}

fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// A TCP proxy in front of Redis whose connections can be cut and restored,
/// as a network fault between one node and Redis would.
pub struct Proxy {
    pub addr: SocketAddr,
    up: watch::Sender<bool>,
    /// While true, nothing reaches a client that subscribed to a channel
    /// (its connection stays open): a stalled live feed.
    frozen: watch::Sender<bool>,
    _alive: Arc<AtomicBool>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let (up, _) = watch::channel(true);
        let (frozen, _) = watch::channel(false);
        let freezes = frozen.clone();
        let alive = Arc::new(AtomicBool::new(true));
        let states = up.clone();
        let running = alive.clone();
        tokio::spawn(async move {
            while running.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let mut state = states.subscribe();
                if !*state.borrow() {
                    drop(client); // refused while cut
                    continue;
                }
                let frozen = freezes.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        () = relay(client, server, frozen) => {}
                        _ = state.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            up,
            frozen,
            _alive: alive,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }

    /// Holds back everything Redis sends to connections that subscribed to
    /// a channel, keeping them open; commands on other connections go on.
    pub fn freeze_subscribers(&self) {
        self.frozen.send_replace(true);
    }

    pub fn thaw_subscribers(&self) {
        self.frozen.send_replace(false);
    }
}

/// Copies both ways until either side closes; what the server sends is
/// held back while `frozen`, once the client has sent a SUBSCRIBE.
async fn relay(client: TcpStream, server: TcpStream, mut frozen: watch::Receiver<bool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let subscribed = AtomicBool::new(false);
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let upstream = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if buf[..n]
                .windows(9)
                .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
            {
                subscribed.store(true, Ordering::SeqCst);
            }
            if server_tx.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let downstream = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match server_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if subscribed.load(Ordering::SeqCst) && frozen.wait_for(|f| !*f).await.is_err() {
                return;
            }
            if client_tx.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self._alive.store(false, Ordering::SeqCst);
        self.up.send_replace(false);
    }
}
