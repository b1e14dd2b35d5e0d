//! Who may publish and who may read: tokens, tickets, origins.
//!
//! With no key configured the hub is open, as it always was. With a key,
//! every publish needs a token that grants its topics, and every
//! subscription needs a token or a single-use ticket for its topics, unless
//! they are all public (`--public-topics`). The HTTP layer extracts the
//! credentials and calls [`Auth`] before any store or subscription work;
//! nothing here sees an HTTP type, and no error here ever quotes a token.

mod grants;
mod origin;
pub mod ticket;
mod token;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use grants::{Grants, Pattern};
pub use origin::{AllowedOrigins, InvalidOrigin, OriginKind};
pub use ticket::TicketRecord;
pub use token::{JwtSettings, KeyError, Secret, TokenError, Verified, mint};

use crate::event::Topic;
use token::Verifier;

/// The access-control settings, checked once at start-up.
pub struct Auth {
    verifier: Option<Verifier>,
    origins: AllowedOrigins,
    public: Vec<Pattern>,
    ticket_ttl: Duration,
}

/// The credentials a request carries, as the HTTP edge found them.
#[derive(Default)]
pub struct Credentials<'a> {
    /// From `Authorization: Bearer …`.
    pub bearer: Option<&'a str>,
    /// From the auth cookie.
    pub cookie: Option<&'a str>,
    /// How the request's `Origin` relates to the allowlist.
    pub origin: Option<OriginKind>,
    /// An `Authorization` header holds a bare token, without the `Bearer `
    /// scheme: refused with a word on why, rather than treated as no
    /// credential at all.
    pub not_bearer: bool,
}

/// Whether an `Authorization` value is a bare token: one word, no scheme.
/// (`Basic …` and other schemes are simply no credential.)
pub fn is_bare_token(value: &[u8]) -> bool {
    let value = value.trim_ascii();
    !value.is_empty() && !value.contains(&b' ') && !value.eq_ignore_ascii_case(b"bearer")
}

/// Who a request is, once its credentials are checked.
#[derive(Debug)]
pub enum Principal {
    /// No key is configured: everyone may do everything.
    Open,
    /// Keys are configured and the request carries no usable credential.
    Anonymous,
    /// A verified token.
    Token(Verified),
}

/// Why a request is refused. Messages name topics, never credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("this needs a token: send `Authorization: Bearer …`, the auth cookie, or a ticket")]
    Missing,
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("the token does not grant {action} on topic `{topic}`")]
    NotGranted { action: &'static str, topic: String },
    #[error("the ticket is unknown, used already, expired, or not for topic `{0}`")]
    Ticket(String),
    #[error("the token that minted this ticket has expired")]
    TicketExpired,
    #[error("requests from origin `{0}` are not allowed")]
    Origin(String),
    #[error("tickets need access control: configure --jwt-secret, --jwt-public-key or --jwks-file")]
    TicketsDisabled,
    #[error("the token does not grant reading metrics (`\"crier\": {{\"metrics\": true}}`)")]
    MetricsNotGranted,
}

/// A setting of access control that cannot work; reported at start-up.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Origin(#[from] InvalidOrigin),
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl Principal {
    /// Whom publish rates are counted against: the token's subject when it
    /// has one, else the client address.
    pub fn rate_key(&self, client: &impl std::fmt::Display) -> String {
        match self {
            Principal::Token(Verified {
                subject: Some(subject),
                ..
            }) => format!("sub:{subject}"),
            _ => format!("ip:{client}"),
        }
    }

    /// Whose idempotency keys these are: the token's subject, so publishers
    /// with their own subjects can neither collide nor probe each other's
    /// keys. Without tokens, and for tokens without a subject, one scope is
    /// shared (not the client address: a retry may come from another one).
    pub fn key_scope(&self) -> String {
        match self {
            Principal::Token(Verified {
                subject: Some(subject),
                ..
            }) => format!("sub:{subject}"),
            _ => String::new(),
        }
    }
}

impl Auth {
    pub fn new(
        jwt: &JwtSettings,
        allowed_origins: &[String],
        public_topics: &[String],
        ticket_ttl: Duration,
    ) -> Result<Auth, AuthConfigError> {
        Ok(Auth {
            verifier: Verifier::from_settings(jwt)?,
            origins: AllowedOrigins::parse(allowed_origins)?,
            public: public_topics
                .iter()
                .map(|p| p.trim())
                .filter(|p| !p.is_empty())
                .map(Pattern::new)
                .collect(),
            ticket_ttl,
        })
    }

    /// Whether tokens are required (a key is configured).
    pub fn enabled(&self) -> bool {
        self.verifier.is_some()
    }

    pub fn origins(&self) -> &AllowedOrigins {
        &self.origins
    }

    pub fn ticket_ttl(&self) -> Duration {
        self.ticket_ttl
    }

    /// Classifies the request's `Origin`; a foreign one is refused.
    pub fn check_origin(
        &self,
        origin: Option<&[u8]>,
        host: Option<&str>,
    ) -> Result<OriginKind, AuthError> {
        self.origins.classify(origin, host).ok_or_else(|| {
            AuthError::Origin(String::from_utf8_lossy(origin.unwrap_or_default()).into_owned())
        })
    }

    /// Verifies the request's token. `cookie_ok` says whether the auth
    /// cookie may stand in for a bearer token on this request.
    pub fn identify(
        &self,
        credentials: &Credentials,
        cookie_ok: bool,
    ) -> Result<Principal, AuthError> {
        let Some(verifier) = &self.verifier else {
            return Ok(Principal::Open);
        };
        let token = credentials
            .bearer
            .or(credentials.cookie.filter(|_| cookie_ok));
        match token {
            Some(token) => Ok(Principal::Token(verifier.verify(token)?)),
            None if credentials.not_bearer => Err(TokenError::NotBearer.into()),
            None => Ok(Principal::Anonymous),
        }
    }

    /// Who a publisher is. A cookie counts only on a request from the hub's
    /// own page or a listed origin: a publish is a state change, and a
    /// cookie alone proves nothing about who asked for it.
    pub fn publisher(&self, credentials: &Credentials) -> Result<Principal, AuthError> {
        let cookie_ok = matches!(
            credentials.origin,
            Some(OriginKind::Own | OriginKind::Listed)
        );
        match self.identify(credentials, cookie_ok)? {
            Principal::Anonymous => Err(AuthError::Missing),
            other => Ok(other),
        }
    }

    /// Checks that `principal` may publish to every topic (the first one
    /// that is not granted is named).
    pub fn may_publish<'t>(
        &self,
        principal: &Principal,
        topics: impl IntoIterator<Item = &'t Topic>,
    ) -> Result<(), AuthError> {
        match principal {
            Principal::Open => Ok(()),
            Principal::Anonymous => Err(AuthError::Missing),
            Principal::Token(verified) => {
                first_not(topics, |t| grants::any_matches(&verified.grants.publish, t)).map_or(
                    Ok(()),
                    |topic| {
                        Err(AuthError::NotGranted {
                            action: "publish",
                            topic,
                        })
                    },
                )
            }
        }
    }

    /// Checks that a scrape of the metrics on the main listener carries a
    /// bearer token granting `metrics` (open hub: anyone may). Only the
    /// `Authorization` header counts: scrapers send it, and a cookie would
    /// let any page the operator visits read the metrics.
    pub fn may_scrape(&self, bearer: Option<&str>) -> Result<(), AuthError> {
        let Some(verifier) = &self.verifier else {
            return Ok(());
        };
        let token = bearer.ok_or(AuthError::Missing)?;
        if verifier.verify(token)?.grants.metrics {
            Ok(())
        } else {
            Err(AuthError::MetricsNotGranted)
        }
    }

    /// Whether every topic is readable without credentials.
    pub fn all_public(&self, topics: &[Topic]) -> bool {
        !self.enabled() || topics.iter().all(|t| grants::any_matches(&self.public, t))
    }

    /// Authorizes a subscription by its token (or cookie). Returns when its
    /// stream must end (`None`: never). Credentials are looked at only when
    /// some topic is not public.
    pub fn subscriber(
        &self,
        credentials: &Credentials,
        topics: &[Topic],
    ) -> Result<Option<u64>, AuthError> {
        if self.all_public(topics) {
            return Ok(None);
        }
        let cookie_ok = credentials.origin.is_none_or(OriginKind::may_use_cookie);
        let principal = self.identify(credentials, cookie_ok)?;
        self.may_subscribe(&principal, topics)
    }

    /// Checks subscribe grants for every non-public topic; returns when the
    /// access ends.
    pub fn may_subscribe(
        &self,
        principal: &Principal,
        topics: &[Topic],
    ) -> Result<Option<u64>, AuthError> {
        match principal {
            Principal::Open => Ok(None),
            Principal::Anonymous if self.all_public(topics) => Ok(None),
            Principal::Anonymous => Err(AuthError::Missing),
            Principal::Token(verified) => {
                let refused = first_not(topics, |t| {
                    grants::any_matches(&self.public, t)
                        || grants::any_matches(&verified.grants.subscribe, t)
                });
                match refused {
                    Some(topic) => Err(AuthError::NotGranted {
                        action: "subscribe",
                        topic,
                    }),
                    None => Ok(Some(verified.expires_at)),
                }
            }
        }
    }

    /// Authorizes a subscription by a ticket the store handed out (once):
    /// every non-public topic must be named by it, and its token must not
    /// have expired.
    pub fn by_ticket(
        &self,
        record: Option<TicketRecord>,
        topics: &[Topic],
    ) -> Result<Option<u64>, AuthError> {
        let first = || topics.first().map(|t| t.to_string()).unwrap_or_default();
        let record = record.ok_or_else(|| AuthError::Ticket(first()))?;
        if let Some(topic) = first_not(topics, |t| {
            grants::any_matches(&self.public, t) || record.names(t)
        }) {
            return Err(AuthError::Ticket(topic));
        }
        if record.expires_at <= now_unix() {
            return Err(AuthError::TicketExpired);
        }
        Ok(Some(record.expires_at))
    }
}

/// The first topic for which `ok` is false.
fn first_not<'t>(
    topics: impl IntoIterator<Item = &'t Topic>,
    ok: impl Fn(&Topic) -> bool,
) -> Option<String> {
    topics.into_iter().find(|t| !ok(t)).map(|t| t.to_string())
}
