//! Caps and rates, keyed by client, so that no single client can stop the
//! hub from serving everyone else.
//!
//! Connection-level limits are checked as a connection is accepted, before a
//! TLS handshake or a byte of HTTP costs anything: a global cap on open
//! connections (so the process never runs out of descriptors), a cap per
//! client, and a rate of new connections per client. Request-level limits
//! are checked by the HTTP layer: concurrent requests (streams) per client,
//! and publishes per second per token subject or client.
//!
//! Every count is held by a guard ([`Slot`], [`ConnectionPermit`]) that
//! releases it when dropped, i.e. when the connection or the stream really
//! ends, so a count can never leak.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::ConnectionRefusal;

/// Who a client is, for limits: its IP address, with IPv6 grouped by /64
/// (one host usually owns a whole /64) and IPv4-mapped IPv6 as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(_) => ClientKey(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    ClientKey(IpAddr::V6(Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
        }
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(ip) => write!(f, "{ip}"),
            IpAddr::V6(ip) => write!(f, "{ip}/64"),
        }
    }
}

/// The one header that names the client behind a trusted proxy
/// (`--client-ip-header`). Only this one is read: a proxy passes the
/// others through as the client wrote them (nginx leaves `Forwarded`
/// untouched while it appends to `X-Forwarded-For`), so reading any header
/// the operator did not name would let a client choose its own address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ClientIpHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2`.
    #[default]
    XForwardedFor,
    /// RFC 7239: `Forwarded: for=client, for=proxy1`.
    Forwarded,
    /// `X-Real-IP: client`: one address.
    XRealIp,
}

impl ClientIpHeader {
    /// The header's name, as the HTTP layer looks it up.
    pub fn name(self) -> &'static str {
        match self {
            ClientIpHeader::XForwardedFor => "x-forwarded-for",
            ClientIpHeader::Forwarded => "forwarded",
            ClientIpHeader::XRealIp => "x-real-ip",
        }
    }

    /// The addresses the header lists, nearest hop last; `None` for
    /// anything malformed (an element that does not parse, a `Forwarded`
    /// element without `for=`, or several `X-Real-IP` addresses).
    fn chain(self, value: &str) -> Option<Vec<IpAddr>> {
        let elements = value.split(',');
        match self {
            ClientIpHeader::XForwardedFor => elements.map(parse_node).collect(),
            ClientIpHeader::Forwarded => elements
                .map(|element| {
                    element.split(';').find_map(|pair| {
                        let (name, value) = pair.trim().split_once('=')?;
                        name.trim()
                            .eq_ignore_ascii_case("for")
                            .then(|| parse_node(value))?
                    })
                })
                .collect(),
            ClientIpHeader::XRealIp => {
                let mut elements = elements;
                let one = parse_node(elements.next()?)?;
                elements.next().is_none().then(|| vec![one])
            }
        }
    }
}

/// The proxies whose forwarding header (`--client-ip-header`) is believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn parse(list: &[String]) -> Result<TrustedProxies, String> {
        list.iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("`{s}` in --trusted-proxies is not an address or CIDR"))
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: the peer, or, when the peer is a trusted
    /// proxy, the right-most address of `header`'s `value` (all its lines,
    /// joined) that is not a trusted proxy: each proxy appends the address
    /// it saw, so anything left of the nearest untrusted hop may have been
    /// written by the client. When every hop is trusted, the left-most.
    /// No value, or one malformed at or right of the hop taken, counts as
    /// the peer itself: a client cannot pick an address by garbling it.
    pub fn client_ip(&self, peer: IpAddr, header: ClientIpHeader, value: Option<&str>) -> IpAddr {
        if !self.contains(peer) {
            return peer;
        }
        let Some(value) = value else {
            return peer;
        };
        // Parsed whole: a malformed element anywhere means the proxy did
        // not write what it should have, and nothing in it is believed.
        let Some(chain) = header.chain(value) else {
            return peer;
        };
        chain
            .iter()
            .rev()
            .copied()
            .find(|ip| !self.contains(*ip))
            .or(chain.first().copied())
            .unwrap_or(peer)
    }
}

/// An address as a forwarding header writes it: `1.2.3.4`, `1.2.3.4:5678`,
/// `"[2001:db8::1]:443"`, `2001:db8::1`. `unknown` and obfuscated names
/// (`_hidden`) are not addresses.
fn parse_node(value: &str) -> Option<IpAddr> {
    let v = value.trim().trim_matches('"');
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = v.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    v.strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(ip, _)| ip.parse().ok())
}

/// Concurrent uses per client, each held by a [`Slot`].
#[derive(Default)]
struct Counter(Mutex<HashMap<ClientKey, u32>>);

impl Counter {
    fn try_acquire(self: &Arc<Self>, key: ClientKey, max: u32) -> Option<Slot> {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(key).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Slot {
            counter: self.clone(),
            key,
        })
    }

    fn count(&self, key: ClientKey) -> u32 {
        let counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(&key).copied().unwrap_or(0)
    }
}

/// One counted use by one client; released when dropped.
pub struct Slot {
    counter: Arc<Counter>,
    key: ClientKey,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counter.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// An open connection's share of the caps; released when dropped.
pub struct ConnectionPermit {
    _global: OwnedSemaphorePermit,
    _client: Option<Slot>,
}

/// A request-level limit was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("this client has {limit} requests or streams open already (--max-streams-per-ip)")]
    Streams { limit: u32 },
    #[error("publishing faster than {per_second} events per second (--publish-rate)")]
    PublishRate {
        per_second: u32,
        retry_after: Duration,
    },
    #[error(
        "a batch of {events} events is larger than the publish burst of {burst} (--publish-burst)"
    )]
    BatchOverBurst { events: u32, burst: u32 },
}

impl LimitError {
    /// When the client may try again.
    pub fn retry_after(&self) -> Duration {
        match self {
            LimitError::Streams { .. } => Duration::from_secs(1),
            LimitError::PublishRate { retry_after, .. } => *retry_after,
            LimitError::BatchOverBurst { .. } => Duration::from_secs(1),
        }
    }
}

/// The limits' settings (see `LimitsConfig` for what each means).
#[derive(Debug, Clone)]
pub struct LimitSettings {
    pub max_connections: usize,
    pub max_connections_per_ip: u32,
    pub max_streams_per_ip: u32,
    /// New connections per second per client, and the burst; 0 turns it off.
    pub connection_rate: u32,
    pub connection_burst: u32,
    /// Events per second per publisher, and the burst; 0 turns it off.
    pub publish_rate: u32,
    pub publish_burst: u32,
    pub trusted_proxies: TrustedProxies,
    /// The header a trusted proxy names the client in.
    pub client_ip_header: ClientIpHeader,
}

/// The hub's limits: shared by the accept loop and the HTTP layer.
pub struct Limits {
    settings: LimitSettings,
    connections: Arc<Semaphore>,
    client_connections: Arc<Counter>,
    streams: Arc<Counter>,
    connection_rate: Option<DefaultKeyedRateLimiter<ClientKey>>,
    publish_rate: Option<DefaultKeyedRateLimiter<String>>,
}

fn limiter<K: std::hash::Hash + Eq + Clone>(
    per_second: u32,
    burst: u32,
) -> Option<DefaultKeyedRateLimiter<K>> {
    let rate = NonZeroU32::new(per_second)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    Some(RateLimiter::keyed(
        Quota::per_second(rate).allow_burst(burst),
    ))
}

impl Limits {
    pub fn new(settings: LimitSettings) -> Limits {
        Limits {
            connections: Arc::new(Semaphore::new(settings.max_connections)),
            client_connections: Arc::default(),
            streams: Arc::default(),
            connection_rate: limiter(settings.connection_rate, settings.connection_burst),
            publish_rate: limiter(settings.publish_rate, settings.publish_burst),
            settings,
        }
    }

    pub fn settings(&self) -> &LimitSettings {
        &self.settings
    }

    /// Admits a new connection from `peer`, or says why not. Trusted
    /// proxies carry many clients: they are held only to the global cap.
    pub fn admit(&self, peer: IpAddr) -> Result<ConnectionPermit, ConnectionRefusal> {
        let global = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| ConnectionRefusal::Capacity)?;
        if self.settings.trusted_proxies.contains(peer) {
            return Ok(ConnectionPermit {
                _global: global,
                _client: None,
            });
        }
        let key = ClientKey::of(peer);
        if let Some(rate) = &self.connection_rate
            && rate.check_key(&key).is_err()
        {
            return Err(ConnectionRefusal::ConnectionRate);
        }
        let client = self
            .client_connections
            .try_acquire(key, self.settings.max_connections_per_ip)
            .ok_or(ConnectionRefusal::ClientConnections)?;
        Ok(ConnectionPermit {
            _global: global,
            _client: Some(client),
        })
    }

    /// Counts one more open request (a stream, while it lasts) for `client`.
    pub fn open_stream(&self, client: ClientKey) -> Result<Slot, LimitError> {
        let limit = self.settings.max_streams_per_ip;
        self.streams
            .try_acquire(client, limit)
            .ok_or(LimitError::Streams { limit })
    }

    /// Open requests of `client` (for tests and diagnostics).
    pub fn streams_of(&self, client: ClientKey) -> u32 {
        self.streams.count(client)
    }

    /// Takes `events` from the publisher's budget, all or none.
    pub fn publish(&self, publisher: &str, events: usize) -> Result<(), LimitError> {
        let Some(rate) = &self.publish_rate else {
            return Ok(());
        };
        let Some(n) = u32::try_from(events).ok().and_then(NonZeroU32::new) else {
            return Ok(());
        };
        let key = publisher.to_owned();
        match rate.check_key_n(&key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(LimitError::PublishRate {
                per_second: self.settings.publish_rate,
                retry_after: not_until
                    .wait_time_from(DefaultClock::default().now())
                    .max(Duration::from_millis(1)),
            }),
            Err(_) => Err(LimitError::BatchOverBurst {
                events: n.get(),
                burst: self.settings.publish_burst.max(self.settings.publish_rate),
            }),
        }
    }

    /// Forgets rate-limit state that no longer limits anyone, so keys of
    /// departed clients do not accumulate.
    pub fn sweep(&self) {
        if let Some(rate) = &self.connection_rate {
            rate.retain_recent();
        }
        if let Some(rate) = &self.publish_rate {
            rate.retain_recent();
        }
    }

    /// The client a request comes from, given its peer and the value of
    /// its `--client-ip-header` (all its lines, comma-joined).
    pub fn client_of(&self, peer: IpAddr, forwarded_by: Option<&str>) -> ClientKey {
        ClientKey::of(self.settings.trusted_proxies.client_ip(
            peer,
            self.settings.client_ip_header,
            forwarded_by,
        ))
    }
}

/// The default `--max-connections`: the open-file limit less a reserve for
/// the listener, Redis connections, log and data files, and connections
/// accepted only to be refused.
pub fn default_max_connections(open_files: u64) -> usize {
    let reserve = 256 + open_files / 64;
    usize::try_from(open_files.saturating_sub(reserve).max(64)).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_clients_are_grouped_by_64() {
        assert_eq!(
            ClientKey::of(ip("2001:db8:1:2:aaaa::1")),
            ClientKey::of(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            ClientKey::of(ip("2001:db8:1:2::1")),
            ClientKey::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            ClientKey::of(ip("::ffff:10.0.0.1")),
            ClientKey::of(ip("10.0.0.1"))
        );
    }

    #[test]
    fn forwarded_addresses_count_only_from_trusted_proxies() {
        use ClientIpHeader::{Forwarded, XForwardedFor, XRealIp};
        let trusted = TrustedProxies::parse(&["10.0.0.0/8".into(), "127.0.0.1".into()]).unwrap();
        let peer = ip("10.1.1.1");
        let xff = |value| trusted.client_ip(peer, XForwardedFor, Some(value));
        assert_eq!(
            trusted.client_ip(ip("8.8.8.8"), XForwardedFor, Some("1.2.3.4")),
            ip("8.8.8.8")
        );
        assert_eq!(xff("1.2.3.4"), ip("1.2.3.4"));
        assert_eq!(xff(" 1.2.3.4:5678 "), ip("1.2.3.4"));
        // The client may forge the left part; the nearest untrusted hop wins.
        assert_eq!(xff("6.6.6.6, 1.2.3.4, 10.2.2.2"), ip("1.2.3.4"));
        // Every hop trusted: the left-most.
        assert_eq!(xff("10.3.3.3, 10.2.2.2"), ip("10.3.3.3"));
        // Malformed anywhere: the peer.
        assert_eq!(xff("garbage"), peer);
        assert_eq!(xff("6.6.6.6, garbage, 1.2.3.4"), peer);
        assert_eq!(xff(""), peer);
        assert_eq!(trusted.client_ip(peer, XForwardedFor, None), peer);

        let fwd = |value| trusted.client_ip(peer, Forwarded, Some(value));
        assert_eq!(
            fwd(r#"for="[2001:db8::1]:443";proto=https"#),
            ip("2001:db8::1")
        );
        assert_eq!(
            fwd("for=6.6.6.6, for=1.2.3.4;by=10.0.0.1, For=10.2.2.2"),
            ip("1.2.3.4")
        );
        assert_eq!(fwd("for=unknown"), peer);
        assert_eq!(fwd("proto=https"), peer);
        assert_eq!(fwd("for=6.6.6.6, proto=https"), peer);

        let real = |value| trusted.client_ip(peer, XRealIp, Some(value));
        assert_eq!(real("1.2.3.4"), ip("1.2.3.4"));
        assert_eq!(real("[2001:db8::1]:80"), ip("2001:db8::1"));
        assert_eq!(real("1.2.3.4, 5.6.7.8"), peer);
        assert_eq!(real("nope"), peer);
    }

    #[test]
    fn slots_are_released_when_dropped() {
        let limits = Limits::new(LimitSettings {
            max_connections: 2,
            max_connections_per_ip: 1,
            max_streams_per_ip: 2,
            connection_rate: 0,
            connection_burst: 0,
            publish_rate: 2,
            publish_burst: 3,
            trusted_proxies: TrustedProxies::default(),
            client_ip_header: ClientIpHeader::default(),
        });
        let a = ip("127.0.0.2");
        let first = limits.admit(a).unwrap();
        assert_eq!(
            limits.admit(a).err(),
            Some(ConnectionRefusal::ClientConnections)
        );
        let other = limits.admit(ip("127.0.0.3")).unwrap();
        assert_eq!(
            limits.admit(ip("127.0.0.4")).err(),
            Some(ConnectionRefusal::Capacity)
        );
        drop(first);
        drop(other);
        assert!(limits.admit(a).is_ok());

        let key = ClientKey::of(a);
        let s1 = limits.open_stream(key).unwrap();
        let _s2 = limits.open_stream(key).unwrap();
        assert!(limits.open_stream(key).is_err());
        drop(s1);
        assert_eq!(limits.streams_of(key), 1);
        assert!(limits.open_stream(key).is_ok());

        assert!(limits.publish("ip:a", 3).is_ok());
        assert!(matches!(
            limits.publish("ip:a", 1),
            Err(LimitError::PublishRate { .. })
        ));
        assert!(matches!(
            limits.publish("ip:b", 4),
            Err(LimitError::BatchOverBurst { .. })
        ));
    }
}
