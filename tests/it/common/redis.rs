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

/// The certificate, key and CA a TLS-only Redis (or sentinel) serves and
/// trusts: its replication, cluster bus and sentinels speak TLS too.
#[derive(Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl Tls {
    pub fn of(certs: &super::tls::TestCerts) -> Tls {
        Tls {
            cert: certs.cert.clone(),
            key: certs.key.clone(),
            ca: certs.ca_cert.clone(),
        }
    }
}

/// A `redis-server` child process. Stopped (and its files removed) on drop.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    persistent: bool,
    /// Serve TLS only.
    tls: Option<Tls>,
    /// More arguments for `redis-server` (a replica's `--replicaof`).
    extra: Vec<String>,
    /// Die with the thread that started it (see [`shared_sentinel`]).
    orphan_safe: bool,
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

    /// Starts a Redis that speaks only TLS.
    pub fn start_tls(tls: &Tls) -> RedisServer {
        RedisServer::start_with_tls(false, Some(tls.clone()))
    }

    fn start_with(persistent: bool) -> RedisServer {
        RedisServer::start_with_tls(persistent, None)
    }

    fn start_with_tls(persistent: bool, tls: Option<Tls>) -> RedisServer {
        RedisServer::start_full(persistent, tls, Vec::new(), false)
    }

    /// Starts a replica of the Redis on `primary` (port), announcing itself
    /// on 127.0.0.1 so sentinels name it by that address.
    pub fn start_replica_of(primary: u16, orphan_safe: bool) -> RedisServer {
        RedisServer::start_replica_with(primary, orphan_safe, false, None)
    }

    fn start_replica_with(
        primary: u16,
        orphan_safe: bool,
        secured: bool,
        tls: Option<Tls>,
    ) -> RedisServer {
        let mut extra = vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.to_string(),
            "--replica-announce-ip".into(),
            "127.0.0.1".into(),
        ];
        if secured {
            extra.extend(secured_args());
        }
        RedisServer::start_full(false, tls, extra, orphan_safe)
    }

    /// Starts a primary for a Sentinel group.
    fn start_primary(orphan_safe: bool, secured: bool, tls: Option<Tls>) -> RedisServer {
        let extra = if secured { secured_args() } else { Vec::new() };
        RedisServer::start_full(false, tls, extra, orphan_safe)
    }

    fn start_full(
        persistent: bool,
        tls: Option<Tls>,
        extra: Vec<String>,
        orphan_safe: bool,
    ) -> RedisServer {
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
            extra,
            orphan_safe,
        };
        // A port found free may be taken before redis-server binds it: retry.
        // A cluster node also listens on its port + 10000.
        let cluster = server.extra.iter().any(|a| a == "--cluster-enabled");
        for _ in 0..10 {
            server.port = free_port();
            while cluster && server.port > 55535 {
                server.port = free_port();
            }
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
            Some(tls) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(&tls.cert)
                .arg("--tls-key-file")
                .arg(&tls.key)
                .arg("--tls-ca-cert-file")
                .arg(&tls.ca)
                .args(["--tls-auth-clients", "no", "--tls-replication", "yes"])
                .args(["--tls-cluster", "yes"]),
        };
        command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--daemonize", "no", "--protected-mode", "no"])
            .args(["--appendonly", if self.persistent { "yes" } else { "no" }])
            .args(["--appendfsync", "always"])
            // A replica syncs at once, not after the default 5 s wait.
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.orphan_safe {
            die_with_parent_thread(&mut command);
        }
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

    /// Starts it again on the same port, as a replica of the Redis on
    /// `primary` (as Sentinel would reconfigure a returning old primary).
    pub fn restart_as_replica_of(&mut self, primary: u16) {
        let secured = self.is_secured();
        self.extra = vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.to_string(),
            "--replica-announce-ip".into(),
            "127.0.0.1".into(),
        ];
        if secured {
            self.extra.extend(secured_args());
        }
        self.restart();
    }

    /// Whether it requires passwords (see [`secured_args`]).
    pub fn is_secured(&self) -> bool {
        self.extra.iter().any(|a| a == "--requirepass")
    }

    /// Whether the process is running (not stopped by the test).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        assert!(self.launch(), "redis-server restarts on port {}", self.port);
    }

    /// Runs a command through `redis-cli` and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = redis_cli(self.port, self.is_secured(), self.tls.as_ref())
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

/// Has `command`'s process killed when the thread that spawns it ends
/// (`PR_SET_PDEATHSIG`): processes shared by every test of the binary are
/// spawned from a thread that lives as long as the binary, so they stop
/// with it, whatever way it ends.
fn die_with_parent_thread(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(2) is async-signal-safe; nothing else runs after fork.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// A `redis-sentinel` process monitoring one primary as [`MASTER`].
pub struct SentinelProcess {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    secured: bool,
    tls: Option<Tls>,
}

/// The name the sentinels monitor the primary under.
pub const MASTER: &str = "crier-primary";

/// A secured group's passwords: the default user's (what the fixtures and
/// replication use), and an ACL user's, which crier is given in its URLs.
const ADMIN_PASSWORD: &str = "admin-secret";
pub const ACL_USER: &str = "crier";
pub const ACL_PASSWORD: &str = "crier-secret";

/// `redis-server` arguments that require passwords: the default user's,
/// replication's, and an ACL user with every right.
fn secured_args() -> Vec<String> {
    [
        "--requirepass",
        ADMIN_PASSWORD,
        "--masterauth",
        ADMIN_PASSWORD,
        "--user",
        ACL_USER,
        "on",
        &format!(">{ACL_PASSWORD}"),
        "~*",
        "&*",
        "+@all",
    ]
    .map(String::from)
    .to_vec()
}

/// `redis-cli` for a server on `port`, with the admin password when
/// `secured`, over TLS when it speaks it.
fn redis_cli(port: u16, secured: bool, tls: Option<&Tls>) -> Command {
    let mut command = Command::new("redis-cli");
    command.args(["-p", &port.to_string()]);
    if secured {
        command.args(["--no-auth-warning", "-a", ADMIN_PASSWORD]);
    }
    if let Some(tls) = tls {
        command.arg("--tls").arg("--cacert").arg(&tls.ca);
    }
    command
}

/// A URL for `port`, with the ACL user's credentials when `secured`,
/// `rediss://` for TLS.
fn url_for(port: u16, secured: bool, tls: bool) -> String {
    let scheme = if tls { "rediss" } else { "redis" };
    if secured {
        format!("{scheme}://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{port}")
    } else {
        format!("{scheme}://127.0.0.1:{port}")
    }
}

impl SentinelProcess {
    fn start(primary: u16, orphan_safe: bool, secured: bool, tls: Option<Tls>) -> SentinelProcess {
        let dir = std::env::temp_dir().join(format!(
            "crier-test-sentinel-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("create a directory for redis-sentinel");
        for _ in 0..10 {
            let port = free_port();
            let config = dir.join("sentinel.conf");
            // Quick to act, so failover tests stay short: a primary is down
            // after 1 s without answers, and a failover may be retried 2 s on.
            std::fs::write(
                &config,
                format!(
                    "{listen}bind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                     sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds {MASTER} 1000\n\
                     sentinel failover-timeout {MASTER} 2000\n\
                     sentinel parallel-syncs {MASTER} 1\n{auth}",
                    dir = dir.display(),
                    listen = match &tls {
                        None => format!("port {port}\n"),
                        Some(tls) => format!(
                            "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\n\
                             tls-ca-cert-file {}\ntls-auth-clients no\ntls-replication yes\n",
                            tls.cert.display(),
                            tls.key.display(),
                            tls.ca.display()
                        ),
                    },
                    // Secured: the sentinel itself requires the passwords,
                    // and uses the admin's to watch the group.
                    auth = if secured {
                        format!(
                            "requirepass {ADMIN_PASSWORD}\n\
                             user {ACL_USER} on >{ACL_PASSWORD} allchannels +@all\n\
                             sentinel auth-pass {MASTER} {ADMIN_PASSWORD}\n"
                        )
                    } else {
                        String::new()
                    }
                ),
            )
            .expect("write sentinel.conf");
            let mut command = Command::new("redis-sentinel");
            command
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if orphan_safe {
                die_with_parent_thread(&mut command);
            }
            let child = match command.spawn() {
                Ok(child) => child,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                    "redis-sentinel is not installed, and the Sentinel tests need it: install it \
                     (Debian/Ubuntu: `apt-get install -y redis-sentinel`) and run the tests again"
                ),
                Err(e) => panic!("cannot start redis-sentinel: {e}"),
            };
            let mut sentinel = SentinelProcess {
                port,
                dir: dir.clone(),
                child: Some(child),
                secured,
                tls: tls.clone(),
            };
            let deadline = Instant::now() + DEADLINE;
            while Instant::now() < deadline {
                if let Some(child) = sentinel.child.as_mut()
                    && let Ok(Some(_)) = child.try_wait()
                {
                    sentinel.child = None;
                    break;
                }
                let up = match tls {
                    None => ping(port),
                    Some(_) => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
                };
                if up {
                    return sentinel;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            sentinel.dir = PathBuf::new();
        }
        panic!("could not start redis-sentinel on a free port");
    }

    pub fn url(&self) -> String {
        url_for(self.port, self.secured, self.tls.is_some())
    }
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Sentinel group: a primary, one replica, and three sentinels (quorum
/// two) watching them.
pub struct SentinelGroup {
    pub primary: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<SentinelProcess>,
}

impl SentinelGroup {
    /// Starts a group of its own, stopped when dropped.
    pub fn start() -> SentinelGroup {
        SentinelGroup::start_with(false)
    }

    /// Starts a group of its own whose servers and sentinels all speak only
    /// TLS and require passwords: crier is given an ACL user's (see
    /// [`ACL_USER`]).
    pub fn start_secured(tls: &Tls) -> SentinelGroup {
        SentinelGroup::start_full(false, true, Some(tls.clone()))
    }

    fn start_with(orphan_safe: bool) -> SentinelGroup {
        SentinelGroup::start_full(orphan_safe, false, None)
    }

    fn start_full(orphan_safe: bool, secured: bool, tls: Option<Tls>) -> SentinelGroup {
        let primary = RedisServer::start_primary(orphan_safe, secured, tls.clone());
        let replica =
            RedisServer::start_replica_with(primary.port, orphan_safe, secured, tls.clone());
        let sentinels = (0..3)
            .map(|_| SentinelProcess::start(primary.port, orphan_safe, secured, tls.clone()))
            .collect();
        let group = SentinelGroup {
            primary,
            replica,
            sentinels,
        };
        group.wait_until_replicated();
        group
    }

    /// Waits until the replica is in sync and every sentinel knows it (a
    /// failover before that would have no replica to promote).
    pub fn wait_until_replicated(&self) {
        wait_until("the Sentinel group to settle", DEADLINE, || {
            let info = self.replica.cli(&["info", "replication"]);
            let synced = info.contains("master_link_status:up");
            synced
                && self.sentinels.iter().all(|s| {
                    let out = redis_cli(s.port, s.secured, s.tls.as_ref())
                        .args(["sentinel", "replicas", MASTER])
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default();
                    out.contains(&self.replica.port.to_string())
                })
        });
    }

    /// The sentinels' URLs, for `--redis-sentinel`.
    pub fn urls(&self) -> Vec<String> {
        self.sentinels.iter().map(SentinelProcess::url).collect()
    }

    /// The port the sentinels name as primary now.
    pub fn named_primary(&self) -> Option<u16> {
        let sentinel = &self.sentinels[0];
        let out = redis_cli(sentinel.port, sentinel.secured, sentinel.tls.as_ref())
            .args(["sentinel", "get-master-addr-by-name", MASTER])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)?
            .trim()
            .parse()
            .ok()
    }

    /// Kills the primary (SIGKILL) and waits until the sentinels have
    /// promoted the replica and it accepts writes.
    pub fn fail_over(&mut self) {
        self.primary.stop();
        wait_until("the sentinels to promote the replica", FAILOVER, || {
            self.named_primary() == Some(self.replica.port)
                && self
                    .replica
                    .cli(&["info", "replication"])
                    .contains("role:master")
        });
    }
}

/// The Sentinel group every test of the binary shares (each test under its
/// own key prefix): started on first use from a thread that lives as long
/// as the binary, so its processes stop with it.
pub fn shared_sentinel() -> &'static (Vec<String>, u16) {
    static SHARED: std::sync::OnceLock<(Vec<String>, u16)> = std::sync::OnceLock::new();
    SHARED.get_or_init(|| {
        start_for_the_binary(
            || SentinelGroup::start_with(true),
            |group| (group.urls(), group.primary.port),
        )
    })
}

/// A Redis Cluster of three primaries, each with one replica, on loopback
/// ports (`redis-server --cluster-enabled yes`, joined with `redis-cli
/// --cluster create`).
pub struct ClusterGroup {
    pub nodes: Vec<RedisServer>,
}

impl ClusterGroup {
    /// Starts a cluster of its own, stopped when dropped.
    pub fn start() -> ClusterGroup {
        ClusterGroup::start_with(false)
    }

    /// Starts a cluster of its own whose nodes speak only TLS (their bus
    /// too) and require passwords: crier is given an ACL user's (see
    /// [`ACL_USER`]).
    pub fn start_secured(tls: &Tls) -> ClusterGroup {
        ClusterGroup::start_full(false, true, Some(tls.clone()))
    }

    fn start_with(orphan_safe: bool) -> ClusterGroup {
        ClusterGroup::start_full(orphan_safe, false, None)
    }

    fn start_full(orphan_safe: bool, secured: bool, tls: Option<Tls>) -> ClusterGroup {
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                // Quick to fail over, so failover tests stay short; the
                // cluster keeps serving the slots that are up meanwhile.
                let mut extra = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-require-full-coverage",
                    "no",
                    "--cluster-announce-ip",
                    "127.0.0.1",
                ]
                .map(String::from)
                .to_vec();
                if secured {
                    extra.extend(secured_args());
                }
                RedisServer::start_full(false, tls.clone(), extra, orphan_safe)
            })
            .collect();
        let mut create = redis_cli(nodes[0].port, secured, tls.as_ref());
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let output = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        let group = ClusterGroup { nodes };
        group.wait_until_settled();
        group
    }

    /// Waits until every node that is up sees the cluster whole and every
    /// replica is in sync with its primary.
    pub fn wait_until_settled(&self) {
        wait_until("the Redis Cluster to settle", FAILOVER, || {
            self.nodes.iter().filter(|n| n.is_running()).all(|node| {
                let info = node.cli(&["cluster", "info"]);
                let replication = node.cli(&["info", "replication"]);
                info.contains("cluster_state:ok")
                    && (replication.contains("role:master")
                        || replication.contains("master_link_status:up"))
            })
        });
    }

    /// The seed URLs, for `--redis-cluster`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .take(3)
            .map(|node| url_for(node.port, node.is_secured(), node.tls.is_some()))
            .collect()
    }

    /// The node (index) that is the primary holding keys matching
    /// `pattern`.
    pub fn primary_holding(&self, pattern: &str) -> Option<usize> {
        self.nodes.iter().position(|node| {
            node.is_running()
                && node.cli(&["info", "replication"]).contains("role:master")
                && !node.cli(&["--scan", "--pattern", pattern]).is_empty()
        })
    }

    /// Kills node `index` (SIGKILL), a primary, and waits until the cluster
    /// has promoted its replica and is whole again.
    pub fn fail_over(&mut self, index: usize) {
        let id = self.nodes[index].cli(&["cluster", "myid"]);
        self.nodes[index].stop();
        wait_until("the cluster to promote a replica", FAILOVER, || {
            let running = || self.nodes.iter().filter(|n| n.is_running());
            // The killed node is marked failed, and the cluster whole again.
            let failed = running().any(|node| {
                node.cli(&["cluster", "nodes"])
                    .lines()
                    .any(|l| l.contains(&id) && l.contains("fail"))
            });
            failed
                && running().all(|n| n.cli(&["cluster", "info"]).contains("cluster_state:ok"))
                && self.no_primary_without_slots_served()
        });
    }

    /// Whether three running nodes are primaries (the killed one's replica
    /// took over).
    fn no_primary_without_slots_served(&self) -> bool {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .filter(|n| n.cli(&["info", "replication"]).contains("role:master"))
            .count()
            == 3
    }

    /// Starts node `index` again: it rejoins as a replica of the node that
    /// took its place.
    pub fn rejoin(&mut self, index: usize) {
        self.nodes[index].restart();
        self.wait_until_settled();
    }
}

/// The Redis Cluster every test of the binary shares (each test under its
/// own key prefix), started on first use like [`shared_sentinel`].
pub fn shared_cluster() -> &'static Vec<String> {
    static SHARED: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    SHARED
        .get_or_init(|| start_for_the_binary(|| ClusterGroup::start_with(true), ClusterGroup::urls))
}

/// Longest wait for a failover, or for a group or cluster to settle.
const FAILOVER: Duration = Duration::from_secs(30);

/// Waits (blocking) until `ready`, failing the test after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} ({timeout:?})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts processes on a thread that lives as long as the test binary, so
/// that they die with it (see [`die_with_parent_thread`]), and returns what
/// `describe` says of them.
fn start_for_the_binary<G: 'static, T: Send + 'static>(
    start: fn() -> G,
    describe: fn(&G) -> T,
) -> T {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let group = start();
        let _ = sender.send(describe(&group));
        // Kept, and this thread with it, until the binary exits.
        loop {
            std::thread::park();
        }
    });
    receiver.recv().expect("shared Redis processes start")
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
    // A server that requires a password answers, NOAUTH: it is up.
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && (&reply == b"+PONG\r\n" || reply.starts_with(b"-NOAUTH"))
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
            // The command's name as a RESP bulk string (`$9\r\nSUBSCRIBE`,
            // `$10\r\nSSUBSCRIBE`), not the word anywhere (a script's text).
            if buf[..n].windows(13).any(|w| {
                w[..4].eq_ignore_ascii_case(b"$9\r\n") && w[4..].eq_ignore_ascii_case(b"SUBSCRIBE")
                    || w[..5].eq_ignore_ascii_case(b"$10\r\n")
                        && w[5..].eq_ignore_ascii_case(b"SSUBSCRIB")
            }) {
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
