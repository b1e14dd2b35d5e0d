//! Which Redis a node writes to: the server `--redis` names, the primary
//! the sentinels of `--redis-sentinel` name, followed across failovers, or
//! the Redis Cluster of `--redis-cluster` (whose client, the redis crate's,
//! follows redirections, failovers and resharding itself).
//!
//! A node under Sentinel asks the sentinels for the primary when it starts,
//! listens on every sentinel for `+switch-master` (the announcement that a
//! replica was promoted), and asks again every second in case an
//! announcement was missed (pub/sub keeps nothing for a disconnected
//! listener). A switch replaces the command connection and tells the live
//! feed to reconnect, to the new primary. Commands in flight on the old
//! primary fail (it is gone, or demoted and read-only) and are answered 503.
//!
//! The switch alone proves nothing about history: the promoted replica may
//! lack the last acknowledged events. The publish script notices that the
//! data belongs to another replication history and renews the epoch (see
//! `publish.lua`).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, TlsCertificates};
use redis::{PushInfo, RedisFuture, Value};
use tokio_util::sync::CancellationToken;

use crate::metrics::RedisMetrics;
use crate::store::StoreError;

/// How a node reaches Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server (`--redis`).
    Single(String),
    /// The primary the sentinels monitor under `master` (`--redis-sentinel`).
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
    /// A Redis Cluster, found from some of its nodes (`--redis-cluster`).
    Cluster(Vec<String>),
}

/// The server commands go to now.
#[derive(Clone)]
struct Current {
    /// The primary's client, for the live feed's connection (none on a
    /// cluster, whose live feed has a cluster connection of its own).
    client: Option<Client>,
    commands: Commands,
}

/// A connection for commands: to one server, or to a cluster (routed by
/// each command's key; a pipeline's commands share one slot).
#[derive(Clone)]
pub(super) enum Commands {
    Server(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Commands {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Commands::Server(c) => c.req_packed_command(cmd),
            Commands::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Commands::Server(c) => c.req_packed_commands(pipeline, offset, count),
            Commands::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Commands::Server(c) => c.get_db(),
            Commands::Cluster(c) => c.get_db(),
        }
    }
}

/// The primary this node writes to, replaced when Sentinel promotes
/// another.
pub(super) struct Primary {
    current: std::sync::RwLock<Option<Current>>,
    config: ConnectionManagerConfig,
    certificates: Option<Vec<u8>>,
    sentinel: Option<SentinelSource>,
    /// The cluster's seed nodes, under `--redis-cluster`.
    cluster: Option<Vec<ConnectionInfo>>,
    timeout: Duration,
    /// Bumped on every switch: the live feed reconnects, to the new primary.
    switched: tokio::sync::watch::Sender<u64>,
    /// How long a command waits for a primary to be named (`--redis-timeout`).
    wait: Duration,
}

/// The sentinels, and how to reach the primary they name.
struct SentinelSource {
    master: String,
    /// The sentinels' own URLs, for the `+switch-master` listeners.
    urls: Vec<ConnectionInfo>,
    /// Asks the sentinels for the primary (the redis crate's lookup).
    lookup: tokio::sync::Mutex<SentinelClient>,
}

fn config_error(error: impl std::fmt::Display) -> StoreError {
    StoreError::Config(format!(
        "bad Redis URL or certificate: {error} (expected redis://[USER:PASSWORD@]HOST:PORT[/DB], \
         or rediss:// for TLS)"
    ))
}

impl Primary {
    /// Prepares the connection to `target`. Nothing connects yet; a
    /// malformed URL is an error now.
    pub(super) fn new(
        target: &RedisTarget,
        ca_cert: Option<&std::path::Path>,
        timeout: Duration,
    ) -> Result<Primary, StoreError> {
        let certificates = ca_cert
            .map(|path| {
                std::fs::read(path)
                    .map_err(|e| StoreError::Config(format!("cannot read {}: {e}", path.display())))
            })
            .transpose()?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let mut primary = Primary {
            current: std::sync::RwLock::new(None),
            config,
            certificates,
            sentinel: None,
            cluster: None,
            timeout,
            switched: tokio::sync::watch::Sender::new(0),
            wait: timeout,
        };
        match target {
            RedisTarget::Single(url) => {
                let info = url.as_str().into_connection_info().map_err(config_error)?;
                let client = primary.client_for(info)?;
                primary.install(client)?;
            }
            RedisTarget::Cluster(seeds) => {
                let seeds = seeds
                    .iter()
                    .map(|url| url.as_str().into_connection_info().map_err(config_error))
                    .collect::<Result<Vec<_>, _>>()?;
                primary.cluster = Some(seeds);
                // Connected in the background (and retried): the cluster
                // may not be up when the hub starts.
                let commands = primary.cluster_connection(None)?;
                *primary.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Current {
                    client: None,
                    commands: Commands::Cluster(commands),
                });
            }
            RedisTarget::Sentinel { sentinels, master } => {
                let urls = sentinels
                    .iter()
                    .map(|url| url.as_str().into_connection_info().map_err(config_error))
                    .collect::<Result<Vec<_>, _>>()?;
                let first = urls.first().cloned().ok_or_else(|| {
                    StoreError::Config("--redis-sentinel names no sentinel".into())
                })?;
                // The sentinels' user, password and TLS serve for the
                // primary too; the crate asks them for it and checks it
                // answers as the primary.
                let tls = match first.addr() {
                    ConnectionAddr::TcpTls { insecure, .. } => Some(if *insecure {
                        redis::TlsMode::Insecure
                    } else {
                        redis::TlsMode::Secure
                    }),
                    _ => None,
                };
                let settings = first.redis_settings();
                let mut builder = SentinelClientBuilder::new(
                    urls.iter().map(|u| u.addr().clone()),
                    master,
                    SentinelServerType::Master,
                )
                .map_err(config_error)?;
                if let Some(user) = settings.username() {
                    builder = builder
                        .set_client_to_redis_username(user)
                        .set_client_to_sentinel_username(user);
                }
                if let Some(password) = settings.password() {
                    builder = builder
                        .set_client_to_redis_password(password)
                        .set_client_to_sentinel_password(password);
                }
                if settings.db() != 0 {
                    builder = builder.set_client_to_redis_db(settings.db());
                }
                if let Some(tls) = tls {
                    builder = builder
                        .set_client_to_redis_tls_mode(tls)
                        .set_client_to_sentinel_tls_mode(tls);
                }
                if let Some(root) = &primary.certificates {
                    let certificates = || TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root.clone()),
                    };
                    builder = builder
                        .set_client_to_redis_certificates(certificates())
                        .set_client_to_sentinel_certificates(certificates());
                }
                let lookup = builder.build().map_err(config_error)?;
                primary.sentinel = Some(SentinelSource {
                    master: master.clone(),
                    urls,
                    lookup: tokio::sync::Mutex::new(lookup),
                });
            }
        }
        Ok(primary)
    }

    /// Whether this is a Redis Cluster.
    pub(super) fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// A connection to the cluster; with `push`, one that speaks RESP3 and
    /// hands what the servers push (sharded pub/sub messages) to it. Its
    /// subscriptions are made again on whichever node owns their slot after
    /// a failover or a resharding.
    pub(super) fn cluster_connection(
        &self,
        push: Option<tokio::sync::mpsc::UnboundedSender<PushInfo>>,
    ) -> Result<ClusterConnection, StoreError> {
        let seeds = self
            .cluster
            .clone()
            .ok_or_else(|| StoreError::Config("not a Redis Cluster".into()))?;
        let redis = seeds
            .first()
            .map(|seed| seed.redis_settings().clone())
            .unwrap_or_default();
        let tls = seeds.first().and_then(|seed| match seed.addr() {
            ConnectionAddr::TcpTls { insecure, .. } => Some(if *insecure {
                redis::TlsMode::Insecure
            } else {
                redis::TlsMode::Secure
            }),
            _ => None,
        });
        let mut builder = ClusterClientBuilder::new(seeds)
            .connection_timeout(self.timeout)
            .response_timeout(self.timeout)
            .retries(2);
        if let Some(user) = &redis.username() {
            builder = builder.username(user);
        }
        if let Some(password) = &redis.password() {
            builder = builder.password(password);
        }
        if let Some(tls) = tls {
            builder = builder.tls(tls);
        }
        if let Some(root) = &self.certificates {
            builder = builder.certs(TlsCertificates {
                client_tls: None,
                root_cert: Some(root.clone()),
            });
        }
        if let Some(push) = push {
            builder = builder
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(push);
        }
        let client = builder.build().map_err(config_error)?;
        Ok(client.get_pending_async_connection_with_config(
            redis::cluster::ClusterConfig::new()
                .set_connection_timeout(self.timeout)
                .set_response_timeout(self.timeout),
        ))
    }

    fn client_for(&self, info: ConnectionInfo) -> Result<Client, StoreError> {
        match &self.certificates {
            None => Client::open(info),
            Some(root) => Client::build_with_tls(
                info,
                TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root.clone()),
                },
            ),
        }
        .map_err(config_error)
    }

    /// Makes `client` the server commands go to.
    fn install(&self, client: Client) -> Result<(), StoreError> {
        let commands = ConnectionManager::new_lazy_with_config(client.clone(), self.config.clone())
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Current {
            client: Some(client),
            commands: Commands::Server(commands),
        });
        Ok(())
    }

    fn current(&self) -> Result<Current, StoreError> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                StoreError::Unavailable("the sentinels have not named a primary yet".into())
            })
    }

    /// The current primary; right after start-up under Sentinel, waits up
    /// to `wait` for the sentinels to name one.
    async fn named(&self, wait: Duration) -> Result<Current, StoreError> {
        let mut switches = self.switched.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Ok(current) = self.current() {
                return Ok(current);
            }
            if tokio::time::timeout_at(deadline, switches.changed())
                .await
                .is_err()
            {
                return self.current();
            }
        }
    }

    /// The connection for commands, to the current primary.
    pub(super) async fn commands(&self) -> Result<Commands, StoreError> {
        self.named(self.wait).await.map(|c| c.commands)
    }

    /// A client of the current primary, for the live feed's connection.
    pub(super) async fn client(&self) -> Result<Client, StoreError> {
        self.named(self.wait)
            .await?
            .client
            .ok_or_else(|| StoreError::Config("a Redis Cluster has no single primary".into()))
    }

    /// The current primary's host and port, for logs.
    pub(super) fn address(&self) -> String {
        match self.current() {
            Ok(Current {
                client: Some(client),
                ..
            }) => client.get_connection_info().addr().to_string(),
            Ok(_) => "(the cluster)".into(),
            Err(_) => "(no primary yet)".into(),
        }
    }

    /// Changes whenever the primary is replaced.
    pub(super) fn switches(&self) -> tokio::sync::watch::Receiver<u64> {
        self.switched.subscribe()
    }

    /// Under Sentinel: follows the primary until `stop`. Otherwise returns
    /// at once.
    pub(super) async fn follow_until(
        self: Arc<Self>,
        metrics: &RedisMetrics,
        stop: CancellationToken,
    ) {
        let Some(sentinel) = &self.sentinel else {
            return;
        };
        let announced = Arc::new(tokio::sync::Notify::new());
        for url in &sentinel.urls {
            tokio::spawn(listen_for_switches(
                url.clone(),
                sentinel.master.clone(),
                announced.clone(),
                stop.clone(),
            ));
        }
        let mut poll = tokio::time::interval(Duration::from_secs(1));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut complained = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = poll.tick() => {}
                _ = announced.notified() => {}
            }
            match self.ask_sentinels(sentinel).await {
                Ok(client) => {
                    complained = false;
                    let now = self
                        .current()
                        .ok()
                        .and_then(|c| c.client)
                        .map(|c| c.get_connection_info().addr().clone());
                    if now.as_ref() == Some(client.get_connection_info().addr()) {
                        continue;
                    }
                    let first = now.is_none();
                    match self.install(client) {
                        Ok(()) => {
                            let address = self.address();
                            if first {
                                tracing::info!(primary = %address, master = %sentinel.master, "the sentinels name the Redis primary");
                            } else {
                                tracing::warn!(primary = %address, master = %sentinel.master, "the sentinels promoted another Redis primary; switching to it");
                                metrics.failed_over();
                            }
                            self.switched.send_modify(|n| *n += 1);
                        }
                        Err(error) => {
                            tracing::warn!(%error, "cannot use the primary the sentinels name")
                        }
                    }
                }
                Err(error) => {
                    if !complained {
                        tracing::warn!(%error, master = %sentinel.master, "no sentinel names a primary; retrying");
                        complained = true;
                    }
                }
            }
        }
    }

    /// A client of the primary the sentinels name now.
    async fn ask_sentinels(&self, sentinel: &SentinelSource) -> Result<Client, StoreError> {
        let mut lookup = sentinel.lookup.lock().await;
        tokio::time::timeout(Duration::from_secs(2), lookup.async_get_client())
            .await
            .map_err(|_| StoreError::Unavailable("the sentinels did not answer in time".into()))?
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }
}

/// Listens on one sentinel for `+switch-master` about `master` until
/// `stop`, waking the follower on each; reconnects when the sentinel drops.
async fn listen_for_switches(
    sentinel: ConnectionInfo,
    master: String,
    announced: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        let listening = async {
            let client = Client::open(sentinel.clone())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe("+switch-master").await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(Duration::from_secs(2), listening).await {
            Ok(Ok(pubsub)) => {
                delay = Duration::from_millis(200);
                let mut messages = pubsub.into_on_message();
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        message = messages.next() => match message {
                            // "NAME OLD-IP OLD-PORT NEW-IP NEW-PORT"
                            Some(message) => {
                                let text = String::from_utf8_lossy(message.get_payload_bytes()).into_owned();
                                if text.split(' ').next() == Some(master.as_str()) {
                                    announced.notify_one();
                                }
                            }
                            None => break,
                        },
                    }
                }
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, sentinel = %sentinel.addr(), "cannot listen to a sentinel")
            }
            Err(_) => {
                tracing::debug!(sentinel = %sentinel.addr(), "a sentinel did not answer in time")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
