//! Every knob of the hub, with its default and its environment variable.
//! `crier --help` prints this list; docs/API.md explains the limits.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::coding::Codec;
use crate::limits::{LimitSettings, TrustedProxies};
use crate::store::{
    Budget, CanarySettings, DurableSettings, Fsync, RedisSettings, RedisTarget, Retention,
};

#[derive(Debug, Parser)]
#[command(
    name = "crier",
    version,
    about = "A Server-Sent Events broadcast hub: publish over HTTP, subscribe with EventSource or curl, resume exactly with Last-Event-ID."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Options for `serve`, also accepted without the subcommand.
    #[command(flatten)]
    pub serve: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the hub (the default).
    Serve(Box<Config>),
    /// Measure a running hub (crier or another SSE hub) over HTTP
    /// (`crier bench --help` lists the scenarios).
    Bench(BenchCommand),
    /// Print a signed token (JWT) made with the configured HMAC secret.
    Token(Box<TokenArgs>),
    /// Repair a data directory crier refuses for a damaged journal: keep
    /// every intact event, start every topic in a new epoch (run it with
    /// crier stopped; docs/OPERATIONS.md, "The data directory").
    Repair(RepairArgs),
}

/// `crier bench …`: the load tool's own arguments, which it parses itself
/// (the `crier-bench` crate; this library does not depend on it).
#[derive(Debug, Args)]
#[command(disable_help_flag = true)]
pub struct BenchCommand {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<std::ffi::OsString>,
}

/// `crier repair`: the data directory to repair.
#[derive(Debug, Args)]
pub struct RepairArgs {
    /// The data directory (`--data-dir` of `serve`).
    #[arg(long, env = "CRIER_DATA_DIR", value_name = "DIR")]
    pub data_dir: std::path::PathBuf,
}

/// `crier token`: what the token grants and for how long.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Topic patterns the token may publish to (`news`, `scores.*`, `*`);
    /// repeat or separate with commas.
    #[arg(long, value_delimiter = ',')]
    pub publish: Vec<String>,

    /// Topic patterns the token may subscribe to.
    #[arg(long, value_delimiter = ',')]
    pub subscribe: Vec<String>,

    /// The token may read GET /metrics on the main listener.
    #[arg(long)]
    pub metrics: bool,

    /// How long the token is valid (e.g. 15m, 1h, 30days).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,

    /// The token's subject (`sub`), e.g. the service or user it is for.
    #[arg(long)]
    pub subject: Option<String>,

    #[command(flatten)]
    pub jwt: crate::auth::JwtSettings,
}

/// Every setting of `crier serve`, by area. Each area goes to the code that
/// uses it (docs/ARCHITECTURE.md, "config.rs"); the flags, their variables
/// and defaults are the areas' own.
#[derive(Debug, Clone, Args)]
pub struct Config {
    #[command(flatten)]
    pub listen: ListenConfig,

    #[command(flatten)]
    pub storage: StorageConfig,

    #[command(flatten)]
    pub limits: LimitsConfig,

    #[command(flatten)]
    pub transports: TransportsConfig,

    #[command(flatten)]
    pub shutdown: ShutdownConfig,

    #[command(flatten)]
    pub redis: RedisConfig,

    #[command(flatten)]
    pub observability: ObservabilityConfig,

    #[command(flatten)]
    pub access: AccessConfig,
}

/// Where and how the hub listens: the address, its accept queue, TLS, HTTP/2.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Listening and TLS")]
pub struct ListenConfig {
    /// Address to listen on (use 0.0.0.0:8080 to accept remote clients).
    #[arg(id = "listen", value_name = "LISTEN", long = "listen", env = "CRIER_LISTEN", default_value = "127.0.0.1:8080", value_parser = parse_listen)]
    pub addr: SocketAddr,

    /// Connections the kernel may queue before crier accepts them; a burst of
    /// reconnecting clients (a node or proxy restart) needs room here. The
    /// kernel caps it at net.core.somaxconn.
    #[arg(
        id = "listen_backlog",
        value_name = "LISTEN_BACKLOG",
        long = "listen-backlog",
        env = "CRIER_LISTEN_BACKLOG",
        default_value_t = 4096
    )]
    pub backlog: u32,

    /// PEM certificate chain: serve HTTPS, offering HTTP/2 and HTTP/1.1.
    #[arg(
        long,
        env = "CRIER_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "CRIER_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<std::path::PathBuf>,

    /// Development HTTPS: serve with a self-signed certificate for
    /// localhost and 127.0.0.1, made on first use in the user's cache
    /// directory (`~/.cache/crier/localhost.pem`) and kept; the log names
    /// the file. Browsers and curl must be told to trust it. Not with
    /// --tls-cert.
    #[arg(long, env = "CRIER_TLS_SELF_SIGNED", conflicts_with = "tls_cert")]
    pub tls_self_signed: bool,

    /// Most concurrent streams (subscriptions) on one HTTP/2 connection.
    #[arg(long, env = "CRIER_HTTP2_MAX_STREAMS", default_value_t = 1000)]
    pub http2_max_streams: u32,

    /// Interval of HTTP/2 keep-alive pings, and how long to wait for the
    /// answer before closing the connection.
    #[arg(long, env = "CRIER_HTTP2_KEEPALIVE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub http2_keepalive: Duration,
}

/// What the stores keep and for how long; where the embedded store keeps it
/// (memory, or a data directory).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Storage and retention")]
pub struct StorageConfig {
    /// Events retained per topic for replay.
    #[arg(long, env = "CRIER_RETENTION_EVENTS", default_value_t = 1000)]
    pub retention_events: usize,

    /// How long events are retained for replay (e.g. 90s, 1h, 2days).
    #[arg(long, env = "CRIER_RETENTION_AGE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub retention_age: Duration,

    /// Most bytes of events the embedded store retains, all topics together
    /// (counted as encoded, with the compressed units cached on them); past
    /// it the oldest retained events make room, and resumers from before
    /// them get a reset. (With Redis, size Redis's own maxmemory instead.)
    #[arg(long, env = "CRIER_MAX_RETAINED_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_retained_bytes: usize,

    /// Most topics the embedded store keeps history for; past it a new topic
    /// takes the place of the one published to longest ago that no one
    /// watches (507 only when every topic is watched).
    #[arg(long, env = "CRIER_MAX_TOPICS", default_value_t = 100_000)]
    pub max_topics: usize,

    /// How long an `Idempotency-Key` is remembered: a publish repeating a
    /// key within it stores nothing and is answered like the first (0:
    /// keys are checked but not remembered).
    #[arg(long, env = "CRIER_IDEMPOTENCY_WINDOW", default_value = "5m", value_parser = humantime::parse_duration)]
    pub idempotency_window: Duration,

    /// Most idempotency keys the embedded store remembers at once (about
    /// 300 bytes each); a publish with a new key past it gets 507. (With
    /// Redis, keys live in Redis, each expiring after the window.)
    #[arg(long, env = "CRIER_IDEMPOTENCY_MAX_KEYS", default_value_t = 100_000)]
    pub idempotency_max_keys: usize,

    /// Keep events on disk in DIR (created if missing), so a restart keeps
    /// every topic's numbering, epoch and retained events; without it the
    /// embedded store lives in memory. Not with `--redis`.
    #[arg(long, env = "CRIER_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<std::path::PathBuf>,

    /// With `--data-dir`, when a publish is answered: `always`, once the
    /// event is synced to disk (concurrent publishes share one sync); or
    /// `interval`, once the OS holds it, syncing every `--fsync-interval`
    /// (a power loss may lose the last moments).
    #[arg(long, env = "CRIER_FSYNC", value_enum, default_value_t = Fsync::Always)]
    pub fsync: Fsync,

    /// With `--fsync interval`, how often the data directory is synced.
    #[arg(long, env = "CRIER_FSYNC_INTERVAL", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub fsync_interval: Duration,
}

/// How much one request, client or connection may take, and how long it may
/// take it.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Limits")]
pub struct LimitsConfig {
    /// Largest event payload accepted, in bytes, counted as encoded: each
    /// line break adds a `data: ` line of 7 bytes (larger ones get 413).
    #[arg(long, env = "CRIER_MAX_EVENT_BYTES", default_value_t = 64 * 1024)]
    pub max_event_bytes: usize,

    /// Largest batch body accepted by POST /events, in bytes.
    #[arg(long, env = "CRIER_MAX_BATCH_BYTES", default_value_t = 1024 * 1024)]
    pub max_batch_bytes: usize,

    /// Most events accepted in one batch.
    #[arg(long, env = "CRIER_MAX_BATCH_EVENTS", default_value_t = 1000)]
    pub max_batch_events: usize,

    /// Longest topic name accepted, in bytes.
    #[arg(long, env = "CRIER_MAX_TOPIC_LEN", default_value_t = 128)]
    pub max_topic_len: usize,

    /// Most topics in one subscription (GET /events?topic=..).
    #[arg(long, env = "CRIER_MAX_TOPICS_PER_SUBSCRIPTION", default_value_t = 32)]
    pub max_topics_per_subscription: usize,

    /// Most open connections; at the cap new ones are refused at once (a
    /// plain HTTP/1.1 client gets 503). Default: the open-file limit less a
    /// reserve (256 + 1/64 of it) for Redis, listeners and files.
    #[arg(long, env = "CRIER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Most open connections from one client address (IPv6: one /64).
    #[arg(long, env = "CRIER_MAX_CONNECTIONS_PER_IP", default_value_t = 2048)]
    pub max_connections_per_ip: u32,

    /// Most concurrent requests, event streams included, from one client
    /// address: HTTP/1.1 requests and HTTP/2 streams both count; over it,
    /// 429.
    #[arg(long, env = "CRIER_MAX_STREAMS_PER_IP", default_value_t = 4096)]
    pub max_streams_per_ip: u32,

    /// New connections per second from one client address (0: no limit);
    /// over it, connections are closed before any TLS handshake.
    #[arg(long, env = "CRIER_CONNECTION_RATE", default_value_t = 200)]
    pub connection_rate: u32,

    /// New connections one client address may open at once, above its rate.
    #[arg(long, env = "CRIER_CONNECTION_BURST", default_value_t = 2048)]
    pub connection_burst: u32,

    /// Events per second one publisher may publish (per token subject when
    /// tokens are on, else per client address; a batch counts its events;
    /// 0: no limit). Over it, 429 and nothing of the request is stored.
    #[arg(long, env = "CRIER_PUBLISH_RATE", default_value_t = 1000)]
    pub publish_rate: u32,

    /// Events one publisher may publish at once, above its rate.
    #[arg(long, env = "CRIER_PUBLISH_BURST", default_value_t = 2000)]
    pub publish_burst: u32,

    /// Proxies (addresses or CIDRs, comma separated) whose
    /// `--client-ip-header` names the client for limits; from other peers
    /// it is ignored.
    #[arg(long, env = "CRIER_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,

    /// The one header a trusted proxy names the client in:
    /// `x-forwarded-for`, `forwarded` or `x-real-ip`. The others are
    /// ignored (a proxy passes them on as the client wrote them); the
    /// right-most address in it that is not a trusted proxy is the client.
    #[arg(
        long,
        env = "CRIER_CLIENT_IP_HEADER",
        value_enum,
        ignore_case = true,
        default_value_t = crate::limits::ClientIpHeader::XForwardedFor
    )]
    pub client_ip_header: crate::limits::ClientIpHeader,

    /// Longest a client may take to finish its TLS handshake.
    #[arg(long, env = "CRIER_TLS_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// Longest a client may take to send a request's headers, and longest an
    /// HTTP/1.1 connection may sit idle between requests.
    #[arg(long, env = "CRIER_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,

    /// Longest a client may take to send a request's body; a client that
    /// stops or dribbles is cut off and nothing is stored.
    #[arg(long, env = "CRIER_BODY_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub body_timeout: Duration,

    /// A connection whose client accepts none of what is sent to it for this
    /// long is closed (a subscriber that stopped reading), so it holds
    /// memory for a bounded time; it resumes exactly when it reconnects.
    #[arg(long, env = "CRIER_WRITE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub write_timeout: Duration,

    /// An HTTP/2 connection with no open stream for this long is closed.
    #[arg(long, env = "CRIER_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Largest request head (request line and headers) accepted; larger
    /// ones get 431.
    #[arg(long, env = "CRIER_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,
}

/// How streams are paced and coded: backlog, heartbeat, retry hint, long-poll
/// wait, compression.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Transports")]
pub struct TransportsConfig {
    /// Events a subscriber may fall behind the live feed before it is
    /// disconnected (it then resumes from its Last-Event-ID).
    #[arg(long, env = "CRIER_SUBSCRIBER_BACKLOG", default_value_t = 1024)]
    pub subscriber_backlog: usize,

    /// Send a heartbeat comment after a stream has been quiet this long.
    #[arg(long, env = "CRIER_HEARTBEAT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,

    /// Accept permessage-deflate from WebSocket clients that offer it (every
    /// browser does): each event's message is compressed once and shared by
    /// every such socket. `false` sends every socket plain frames.
    #[arg(long, env = "CRIER_WS_DEFLATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub ws_deflate: bool,

    /// Longest a long-poll request (`?poll=1`, `Accept: application/json`)
    /// waits for an event before answering with none; under common proxy
    /// timeouts (30s and up).
    #[arg(long, env = "CRIER_POLL_TIMEOUT", default_value = "25s", value_parser = humantime::parse_duration)]
    pub poll_timeout: Duration,

    /// Reconnection delay suggested to EventSource clients (`retry:`).
    #[arg(long, env = "CRIER_RETRY", default_value = "1s", value_parser = humantime::parse_duration)]
    pub retry: Duration,

    /// Codecs offered for event streams and JSON answers, in order of
    /// preference when the client values several equally; `none` disables
    /// compression.
    #[arg(long, env = "CRIER_COMPRESSION", default_value = "zstd,br,gzip", value_delimiter = ',', value_parser = parse_codec)]
    pub compression: Vec<Option<Codec>>,

    /// Most chained compressors the topics hold at once: one per topic and
    /// coding with a compressed single-topic stream on this node, 0.3–0.7
    /// MiB each. Past it, a topic's compressed streams write each event
    /// compressed alone (larger on the wire).
    #[arg(long, env = "CRIER_MAX_COMPRESSION_CHAINS", default_value_t = 256)]
    pub max_compression_chains: usize,
}

/// How the node stops: the drain before closing streams, and the wait after.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Shutdown")]
pub struct ShutdownConfig {
    /// Longest wait, once every stream has been closed (after the drain, or
    /// at once on Ctrl-C or a second SIGTERM), for in-flight requests and
    /// connections to finish before exiting anyway.
    #[arg(long, env = "CRIER_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// On SIGTERM, how long the node keeps serving new streams while
    /// `/readyz` already answers 503, so load balancers stop sending it
    /// clients before it starts closing streams.
    #[arg(long, env = "CRIER_DRAIN_DELAY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_delay: Duration,

    /// After the drain delay, the time over which open streams are closed,
    /// spread evenly, each with a short `retry:` hint, so their clients
    /// reconnect elsewhere as a trickle rather than a storm (0: all at once).
    #[arg(long, env = "CRIER_DRAIN_WINDOW", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_window: Duration,
}

/// How to reach Redis, when events live there, and how its live feed is
/// watched.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Redis")]
pub struct RedisConfig {
    /// With Redis: how often the node sends itself a canary through the
    /// pub/sub path that carries live events.
    #[arg(long, env = "CRIER_CANARY_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub canary_interval: Duration,

    /// With Redis: a canary not back after this long means the live feed
    /// has stalled, and `/readyz` answers 503 until canaries come back.
    #[arg(long, env = "CRIER_CANARY_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub canary_timeout: Duration,

    /// Keep events in Redis instead of in memory, so several nodes serve one
    /// feed: redis://[USER:PASSWORD@]HOST:PORT[/DB], or rediss:// for TLS.
    #[arg(
        id = "redis_url",
        long = "redis",
        env = "CRIER_REDIS_URL",
        value_name = "URL"
    )]
    pub url: Option<String>,

    /// Reach Redis through Sentinel instead: the sentinels' URLs
    /// (redis://[USER:PASSWORD@]HOST:PORT, or rediss://), comma-separated.
    /// crier follows the primary they name for `--redis-master`, and
    /// switches when they announce a failover. The URLs' user, password and
    /// TLS apply to the sentinels and to the primary alike.
    #[arg(
        id = "redis_sentinel",
        long = "redis-sentinel",
        env = "CRIER_REDIS_SENTINEL",
        value_name = "URL[,URL...]",
        value_delimiter = ','
    )]
    pub sentinel: Vec<String>,

    /// With `--redis-sentinel`, the name the sentinels monitor the primary
    /// under.
    #[arg(
        id = "redis_master",
        long = "redis-master",
        env = "CRIER_REDIS_MASTER",
        value_name = "NAME"
    )]
    pub master: Option<String>,

    /// Reach a Redis Cluster instead: some of its nodes' URLs (seeds),
    /// comma-separated; crier finds the rest and follows the cluster's
    /// redirections, failovers and resharding.
    #[arg(
        id = "redis_cluster",
        long = "redis-cluster",
        env = "CRIER_REDIS_CLUSTER",
        value_name = "URL[,URL...]",
        value_delimiter = ','
    )]
    pub cluster: Vec<String>,

    /// Answer a publish only once this many replicas of the primary hold
    /// it (Redis `WAIT`), so a failover to one of them loses no
    /// acknowledged event; when they do not confirm within
    /// `--redis-timeout` the publish is answered 503 (retry it with its
    /// idempotency key). 0: answer once the primary holds it.
    #[arg(
        id = "redis_wait_replicas",
        long = "redis-wait-replicas",
        env = "CRIER_REDIS_WAIT_REPLICAS",
        value_name = "N",
        default_value_t = 0
    )]
    pub wait_replicas: u32,

    /// PEM file of the certificate authority that signed the Redis server's
    /// certificate (for `rediss://` with a private CA; otherwise the system's
    /// roots are used).
    #[arg(
        id = "redis_ca_cert",
        long = "redis-ca-cert",
        env = "CRIER_REDIS_CA_CERT",
        value_name = "FILE"
    )]
    pub ca_cert: Option<std::path::PathBuf>,

    /// Prefix of every Redis key and channel, so several hubs can share one
    /// Redis.
    #[arg(
        id = "redis_prefix",
        value_name = "REDIS_PREFIX",
        long = "redis-prefix",
        env = "CRIER_REDIS_PREFIX",
        default_value = "crier:"
    )]
    pub prefix: String,

    /// Longest wait for Redis to connect or answer before a request fails
    /// with 503.
    #[arg(id = "redis_timeout", value_name = "REDIS_TIMEOUT", long = "redis-timeout", env = "CRIER_REDIS_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// How the node reports on itself: the log format, where metrics are served.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Observability")]
pub struct ObservabilityConfig {
    /// Log lines as `text`, or as `json` (one object per line: timestamp,
    /// level, target, message and fields). `RUST_LOG` sets the level.
    #[arg(long, env = "CRIER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Serve GET /metrics (Prometheus) on this address instead of the main
    /// listener, without a token and without TLS: keep it private
    /// (firewall it). Unset: /metrics is on the main listener, behind a
    /// token granting `metrics` when tokens are configured.
    #[arg(long, env = "CRIER_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

/// Who may do what: origins, tokens, the token cookie, public topics,
/// tickets.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Access control")]
pub struct AccessConfig {
    /// Web origins allowed to use the hub from a browser, comma separated:
    /// `https://app.example.com`, `https://*.example.com` (subdomains), or
    /// `*` (any origin may read public answers; no cookies). A request whose
    /// `Origin` is neither listed nor the hub's own gets 403; listed origins
    /// get CORS answers with credentials. `--cors-origins` is an alias.
    #[arg(
        long,
        visible_alias = "cors-origins",
        env = "CRIER_ALLOWED_ORIGINS",
        default_value = "*",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,

    /// Former name of CRIER_ALLOWED_ORIGINS, still read when that is unset.
    #[arg(
        long = "cors-origins-env",
        hide = true,
        env = "CRIER_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins_env: Option<Vec<String>>,

    #[command(flatten, next_help_heading = "Access control")]
    pub jwt: crate::auth::JwtSettings,

    /// Cookie that may carry a token for subscriptions and tickets (set it
    /// HttpOnly from the application's own backend).
    #[arg(long, env = "CRIER_AUTH_COOKIE", default_value = "crier_token")]
    pub auth_cookie: String,

    /// Topics anyone may read without a token when access control is on,
    /// comma separated patterns: `news`, `scores.*`, `*`.
    #[arg(long, env = "CRIER_PUBLIC_TOPICS", value_delimiter = ',')]
    pub public_topics: Vec<String>,

    /// How long a ticket from POST /tickets stays usable (once).
    #[arg(long, env = "CRIER_TICKET_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ticket_ttl: Duration,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A listen address: `IP:PORT`, or `localhost:PORT` for the loopback
/// address (other host names are not resolved: which of their addresses
/// to bind would be a guess).
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    if let Some(port) = s.strip_prefix("localhost:")
        && let Ok(port) = port.parse::<u16>()
    {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    Err(
        "expected IP:PORT, such as 127.0.0.1:8080 (this machine only), 0.0.0.0:8080 \
         (every IPv4 interface) or [::]:8080; a host name other than localhost is not resolved"
            .to_owned(),
    )
}

fn parse_codec(s: &str) -> Result<Option<Codec>, String> {
    match s.trim() {
        "none" | "" => Ok(None),
        other => other.parse().map(Some),
    }
}

impl Config {
    /// Settles what depends on the environment, once, at start-up (see
    /// [`AccessConfig::settle`]). Nothing reads the environment after this.
    pub fn settle(mut self) -> Config {
        self.access = self.access.settle();
        self
    }

    /// Checks every setting that can be checked before anything starts,
    /// in one place: each area's own, and those that span areas (events
    /// live on disk or in Redis, not both). The start-up of each part may
    /// still refuse what only it can tell (a key file, a data directory).
    pub fn validate(&self) -> Result<(), String> {
        let redis = self.redis.target()?;
        if self.storage.data_dir.is_some() && redis.is_some() {
            return Err(
                "--data-dir and --redis (or --redis-sentinel, --redis-cluster) cannot be used \
                 together: events live either on this node's disk or in Redis"
                    .into(),
            );
        }
        self.limits.validate()
    }
}

impl StorageConfig {
    /// What every store keeps for replay, Redis included.
    pub fn retention(&self) -> Retention {
        Retention {
            max_events: self.retention_events,
            max_age: self.retention_age,
        }
    }

    /// The embedded store's bounds on memory, topics and keys.
    pub fn budget(&self) -> Budget {
        Budget {
            max_bytes: self.max_retained_bytes,
            max_topics: self.max_topics,
            max_keys: self.idempotency_max_keys,
        }
    }

    /// The durable store's settings, when `--data-dir` is set.
    pub fn durable(&self) -> Option<DurableSettings> {
        self.data_dir.as_ref().map(|dir| DurableSettings {
            dir: dir.clone(),
            fsync: self.fsync,
            fsync_interval: self.fsync_interval,
        })
    }
}

impl LimitsConfig {
    /// What [`LimitsConfig::settings`] refuses: a trusted proxy that is
    /// neither an address nor a network.
    pub fn validate(&self) -> Result<(), String> {
        self.settings().map(|_| ())
    }

    /// The limits, with `--max-connections` derived from the open-file
    /// limit when not set.
    pub fn settings(&self) -> Result<LimitSettings, String> {
        let max_connections = self.max_connections.unwrap_or_else(|| {
            let (soft, _) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
            crate::limits::default_max_connections(soft)
        });
        Ok(LimitSettings {
            max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            max_streams_per_ip: self.max_streams_per_ip,
            connection_rate: self.connection_rate,
            connection_burst: self.connection_burst,
            publish_rate: self.publish_rate,
            publish_burst: self.publish_burst,
            trusted_proxies: TrustedProxies::parse(&self.trusted_proxies)?,
            client_ip_header: self.client_ip_header,
        })
    }
}

impl TransportsConfig {
    /// The codecs enabled, in order of preference.
    pub fn codecs(&self) -> Vec<Codec> {
        self.compression.iter().flatten().copied().collect()
    }
}

impl RedisConfig {
    /// The Redis to keep events in, if any: at most one of `--redis`,
    /// `--redis-sentinel` (with `--redis-master`) and `--redis-cluster`.
    pub fn target(&self) -> Result<Option<RedisTarget>, String> {
        let given = [
            self.url.is_some(),
            !self.sentinel.is_empty(),
            !self.cluster.is_empty(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(
                "use one of --redis, --redis-sentinel and --redis-cluster: they are three ways \
                 to reach one Redis"
                    .into(),
            );
        }
        if self.master.is_some() && self.sentinel.is_empty() {
            return Err(
                "--redis-master names the primary for --redis-sentinel, which is not set".into(),
            );
        }
        let target = if let Some(url) = &self.url {
            Some(RedisTarget::Single(url.clone()))
        } else if !self.sentinel.is_empty() {
            let master = self.master.clone().ok_or(
                "--redis-sentinel needs --redis-master NAME: the name the sentinels monitor \
                 the primary under",
            )?;
            Some(RedisTarget::Sentinel {
                sentinels: self.sentinel.clone(),
                master,
            })
        } else if !self.cluster.is_empty() {
            Some(RedisTarget::Cluster(self.cluster.clone()))
        } else {
            None
        };
        if target.is_none() && self.wait_replicas > 0 {
            return Err(
                "--redis-wait-replicas needs Redis (--redis, --redis-sentinel or --redis-cluster)"
                    .into(),
            );
        }
        Ok(target)
    }

    /// The Redis store's settings for `target`, keeping events as long as
    /// `retention` says.
    pub fn settings(&self, target: RedisTarget, retention: Retention) -> RedisSettings {
        RedisSettings {
            target,
            ca_cert: self.ca_cert.clone(),
            prefix: self.prefix.clone(),
            retention,
            timeout: self.timeout,
            canary: CanarySettings {
                interval: self.canary_interval,
                timeout: self.canary_timeout,
            },
            wait_replicas: self.wait_replicas,
        }
    }
}

impl AccessConfig {
    /// The origin allowlist: `--allowed-origins` (the former
    /// CRIER_CORS_ORIGINS already folded in by [`AccessConfig::settle`]).
    pub fn origins(&self) -> &[String] {
        &self.allowed_origins
    }

    /// The former CRIER_CORS_ORIGINS stands for `--allowed-origins` when
    /// that is left at its default and CRIER_ALLOWED_ORIGINS is unset.
    fn settle(mut self) -> AccessConfig {
        let set_by_env = std::env::var_os("CRIER_ALLOWED_ORIGINS").is_some();
        if let Some(old) = self.cors_origins_env.take()
            && !set_by_env
            && self.allowed_origins == ["*"]
        {
            self.allowed_origins = old;
        }
        self
    }
}

impl Default for Config {
    /// The documented defaults, as `crier serve` with no flags.
    fn default() -> Config {
        Cli::parse_from(["crier"]).serve.clone().settle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(args: &[&str]) -> Config {
        Cli::parse_from(std::iter::once("crier").chain(args.iter().copied()))
            .serve
            .settle()
    }

    #[test]
    fn validate_accepts_the_defaults_and_each_way_to_reach_redis() {
        assert_eq!(parsed(&[]).validate(), Ok(()));
        for args in [
            &["--redis", "redis://127.0.0.1:6379"][..],
            &[
                "--redis-sentinel",
                "redis://a:26379,redis://b:26379",
                "--redis-master",
                "m",
            ],
            &[
                "--redis-cluster",
                "redis://a:7000,redis://b:7000",
                "--redis-wait-replicas",
                "1",
            ],
            &["--data-dir", "/tmp/x"],
        ] {
            assert_eq!(parsed(args).validate(), Ok(()), "{args:?}");
        }
        let sentinel = parsed(&[
            "--redis-sentinel",
            "redis://a:1,redis://b:2",
            "--redis-master",
            "m",
        ]);
        assert_eq!(
            sentinel.redis.target(),
            Ok(Some(RedisTarget::Sentinel {
                sentinels: vec!["redis://a:1".into(), "redis://b:2".into()],
                master: "m".into()
            }))
        );
    }

    #[test]
    fn validate_refuses_settings_that_contradict_each_other_and_says_why() {
        for (args, why) in [
            (
                &["--redis", "redis://x:1", "--redis-cluster", "redis://y:2"][..],
                "use one of --redis, --redis-sentinel and --redis-cluster",
            ),
            (&["--redis-sentinel", "redis://x:1"], "needs --redis-master"),
            (
                &["--redis-master", "m"],
                "--redis-sentinel, which is not set",
            ),
            (
                &["--redis-wait-replicas", "1"],
                "--redis-wait-replicas needs Redis",
            ),
            (
                &["--data-dir", "/tmp/x", "--redis", "redis://x:1"],
                "cannot be used together",
            ),
            (&["--trusted-proxies", "not-a-network"], "not-a-network"),
        ] {
            let refusal = parsed(args).validate().unwrap_err();
            assert!(refusal.contains(why), "{args:?}: {refusal}");
        }
    }

    #[test]
    fn listen_takes_an_ip_or_localhost_and_explains_anything_else() {
        assert_eq!(
            parse_listen("0.0.0.0:8080"),
            Ok(SocketAddr::from(([0, 0, 0, 0], 8080)))
        );
        assert_eq!(
            parse_listen("localhost:8080"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 8080)))
        );
        let refusal = parse_listen("example.com:8080").unwrap_err();
        assert!(refusal.contains("expected IP:PORT"), "{refusal}");
    }

    #[test]
    fn every_setting_of_the_hub_is_under_a_heading() {
        use clap::CommandFactory;
        let command = Cli::command();
        for arg in command.get_arguments() {
            if arg.is_hide_set() || ["help", "version"].contains(&arg.get_id().as_str()) {
                continue;
            }
            assert!(
                arg.get_help_heading().is_some(),
                "--{} has no heading in crier --help",
                arg.get_id()
            );
        }
    }

    /// The flags under one area's heading in `crier --help`, in order.
    fn flags_of<A: Args>(heading: &str) -> Vec<String> {
        let command = A::augment_args(clap::Command::new("area"));
        command
            .get_arguments()
            .filter(|arg| !arg.is_hide_set())
            .map(|arg| {
                assert_eq!(arg.get_help_heading(), Some(heading), "{arg:?}");
                arg.get_long().unwrap_or_default().to_owned()
            })
            .collect()
    }

    #[test]
    fn each_area_holds_the_flags_of_its_heading_and_no_others() {
        assert_eq!(
            flags_of::<ListenConfig>("Listening and TLS"),
            [
                "listen",
                "listen-backlog",
                "tls-cert",
                "tls-key",
                "tls-self-signed",
                "http2-max-streams",
                "http2-keepalive"
            ]
        );
        assert_eq!(
            flags_of::<ShutdownConfig>("Shutdown"),
            ["shutdown-timeout", "drain-delay", "drain-window"]
        );
        assert_eq!(
            flags_of::<ObservabilityConfig>("Observability"),
            ["log-format", "metrics-listen"]
        );
        let redis = flags_of::<RedisConfig>("Redis");
        assert_eq!(redis.len(), 10, "{redis:?}");
        assert!(
            redis
                .iter()
                .all(|flag| flag.starts_with("redis") || flag.starts_with("canary"))
        );
        for (flags, count) in [
            (flags_of::<StorageConfig>("Storage and retention"), 9),
            (flags_of::<LimitsConfig>("Limits"), 20),
            (flags_of::<TransportsConfig>("Transports"), 7),
            (flags_of::<AccessConfig>("Access control"), 12),
        ] {
            assert_eq!(flags.len(), count, "{flags:?}");
        }
    }

    #[test]
    fn a_field_without_its_area_prefix_keeps_its_flag() {
        let config = parsed(&[
            "--listen",
            "0.0.0.0:9",
            "--listen-backlog",
            "7",
            "--redis",
            "redis://x:1",
            "--redis-prefix",
            "p:",
            "--redis-timeout",
            "3s",
            "--redis-ca-cert",
            "/ca.pem",
            "--redis-wait-replicas",
            "2",
        ]);
        assert_eq!(config.listen.addr, SocketAddr::from(([0, 0, 0, 0], 9)));
        assert_eq!(config.listen.backlog, 7);
        assert_eq!(config.redis.url.as_deref(), Some("redis://x:1"));
        assert_eq!(config.redis.prefix, "p:");
        assert_eq!(config.redis.timeout, Duration::from_secs(3));
        assert_eq!(
            config.redis.ca_cert.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        assert_eq!(config.redis.wait_replicas, 2);
    }
}
