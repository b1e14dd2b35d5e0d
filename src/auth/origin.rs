//! Which web origins may talk to the hub (`--allowed-origins`).
//!
//! A browser names the page that makes a cross-site request in `Origin`; a
//! page on a foreign site must not be able to ride on a visitor's cookie
//! (cross-site hijacking). Requests without `Origin` (curl, services) and
//! same-origin requests (the hub's own page) are judged by their
//! credentials alone.

/// How a request's `Origin` relates to the allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginKind {
    /// No `Origin` header: not a cross-site browser request.
    Absent,
    /// The hub's own origin (same host as the request's `Host`).
    Own,
    /// Named on the allowlist: may send cookies.
    Listed,
    /// Allowed only because the list is `*`: may not send cookies.
    Anyone,
}

impl OriginKind {
    /// Whether a cookie may count as a credential on this request.
    pub fn may_use_cookie(self) -> bool {
        matches!(
            self,
            OriginKind::Absent | OriginKind::Own | OriginKind::Listed
        )
    }
}

/// One entry of the allowlist.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Allowed {
    /// `https://app.example.com` (scheme, host and port as browsers send).
    Exact(String),
    /// `https://*.example.com`: any subdomain, not the domain itself.
    Subdomains { scheme: String, suffix: String },
}

/// The parsed `--allowed-origins` list.
#[derive(Debug, Clone, Default)]
pub struct AllowedOrigins {
    any: bool,
    entries: Vec<Allowed>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "invalid entry `{0}` in --allowed-origins: expected `*`, `https://host[:port]` or `https://*.domain`"
)]
pub struct InvalidOrigin(String);

impl AllowedOrigins {
    pub fn parse(list: &[String]) -> Result<AllowedOrigins, InvalidOrigin> {
        let mut origins = AllowedOrigins::default();
        for entry in list.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            if entry == "*" {
                origins.any = true;
                continue;
            }
            let entry = entry.trim_end_matches('/').to_ascii_lowercase();
            let (scheme, rest) = entry
                .split_once("://")
                .ok_or_else(|| InvalidOrigin(entry.clone()))?;
            if scheme.is_empty() || rest.is_empty() || rest.contains('/') {
                return Err(InvalidOrigin(entry.clone()));
            }
            match rest.strip_prefix("*.") {
                Some(suffix) if !suffix.is_empty() && !suffix.contains('*') => {
                    origins.entries.push(Allowed::Subdomains {
                        scheme: scheme.to_owned(),
                        suffix: format!(".{suffix}"),
                    })
                }
                Some(_) => return Err(InvalidOrigin(entry.clone())),
                None if rest.contains('*') => return Err(InvalidOrigin(entry.clone())),
                None => origins.entries.push(Allowed::Exact(entry.clone())),
            }
        }
        Ok(origins)
    }

    /// Whether every origin may read answers (`*`): CORS without
    /// credentials, and no origin is refused.
    pub fn is_any(&self) -> bool {
        self.any
    }

    /// Whether the list names this origin explicitly.
    pub fn lists(&self, origin: &str) -> bool {
        let origin = origin.to_ascii_lowercase();
        self.entries.iter().any(|entry| match entry {
            Allowed::Exact(exact) => *exact == origin,
            Allowed::Subdomains { scheme, suffix } => {
                origin.split_once("://").is_some_and(|(s, host)| {
                    s == scheme && host.ends_with(suffix.as_str()) && host.len() > suffix.len()
                })
            }
        })
    }

    /// Classifies a request's `Origin`, or `None` when it must be refused.
    /// `host` is the authority the request was sent to (`Host` or
    /// `:authority`).
    pub fn classify(&self, origin: Option<&[u8]>, host: Option<&str>) -> Option<OriginKind> {
        let Some(origin) = origin else {
            return Some(OriginKind::Absent);
        };
        // A sandboxed page or a privacy-redirected request says `null`:
        // never the hub's own page, never listed.
        let origin = std::str::from_utf8(origin).ok()?;
        if is_own(origin, host) {
            return Some(OriginKind::Own);
        }
        if self.lists(origin) {
            return Some(OriginKind::Listed);
        }
        self.any.then_some(OriginKind::Anyone)
    }
}

/// Whether `origin` is the hub itself: its authority is the one the request
/// was addressed to. The scheme is not compared, so the hub's page works
/// behind a TLS-terminating proxy.
fn is_own(origin: &str, host: Option<&str>) -> bool {
    let (Some((_, authority)), Some(host)) = (origin.split_once("://"), host) else {
        return false;
    };
    let strip = |a: &str| {
        a.strip_suffix(":80")
            .or_else(|| a.strip_suffix(":443"))
            .unwrap_or(a)
            .to_ascii_lowercase()
    };
    !authority.is_empty() && strip(authority) == strip(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowedOrigins {
        AllowedOrigins::parse(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn exact_and_subdomain_entries() {
        let l = list(&["https://app.example.com", "https://*.example.org"]);
        assert!(l.lists("https://app.example.com"));
        assert!(l.lists("HTTPS://APP.example.com"));
        assert!(!l.lists("http://app.example.com"));
        assert!(!l.lists("https://app.example.com:8443"));
        assert!(l.lists("https://a.example.org"));
        assert!(l.lists("https://a.b.example.org"));
        assert!(!l.lists("https://example.org"));
        assert!(!l.lists("https://evilexample.org"));
        assert!(!l.lists("http://a.example.org"));
    }

    #[test]
    fn classification() {
        let l = list(&["https://app.example.com"]);
        assert_eq!(l.classify(None, Some("hub:8080")), Some(OriginKind::Absent));
        assert_eq!(
            l.classify(Some(b"http://hub:8080"), Some("hub:8080")),
            Some(OriginKind::Own)
        );
        assert_eq!(
            l.classify(Some(b"https://hub"), Some("hub:443")),
            Some(OriginKind::Own)
        );
        assert_eq!(
            l.classify(Some(b"https://app.example.com"), Some("hub")),
            Some(OriginKind::Listed)
        );
        assert_eq!(l.classify(Some(b"https://evil.com"), Some("hub")), None);
        assert_eq!(l.classify(Some(b"null"), Some("hub")), None);
        let any = list(&["*"]);
        assert_eq!(
            any.classify(Some(b"https://evil.com"), Some("hub")),
            Some(OriginKind::Anyone)
        );
        assert!(!OriginKind::Anyone.may_use_cookie());
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in [
            "example.com",
            "https://",
            "https://a/b",
            "https://*",
            "https://a.*.com",
        ] {
            assert!(AllowedOrigins::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }
}
