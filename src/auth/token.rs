//! JSON Web Tokens: the keys from configuration, verification, and minting
//! (for `crier token`).
//!
//! The algorithm a token must be signed with comes from the configured key,
//! never from the token: a token whose header names another algorithm is
//! refused, which rules out `alg: none` and RS/HS confusion (an HMAC
//! "signed" with a public key is checked against the secret only, if any).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::grants::Grants;

/// A secret that never shows in `Debug` output, logs or errors.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl std::str::FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Secret, String> {
        Ok(Secret(s.to_owned()))
    }
}

/// Where tokens' keys come from, and what the claims must say. Shared by the
/// hub and `crier token`.
#[derive(Debug, Clone, Args)]
pub struct JwtSettings {
    /// HMAC secret that signs tokens (HS256, HS384, HS512). Turns access
    /// control on. Prefer --jwt-secret-file or the environment variable:
    /// command lines are visible to other users of the machine.
    #[arg(
        long,
        env = "CRIER_JWT_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub jwt_secret: Option<Secret>,

    /// File holding the HMAC secret (surrounding whitespace is ignored).
    #[arg(long, env = "CRIER_JWT_SECRET_FILE", value_name = "FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// PEM public key that verifies tokens (RSA for RS*/PS*, EC P-256/P-384
    /// for ES256/ES384, Ed25519 for EdDSA). Turns access control on.
    #[arg(long, env = "CRIER_JWT_PUBLIC_KEY", value_name = "FILE")]
    pub jwt_public_key: Option<PathBuf>,

    /// JWK set (JSON) whose keys verify tokens, chosen by the token's `kid`;
    /// each key's algorithm is its `alg` member, or follows from its type.
    /// Turns access control on.
    #[arg(long, env = "CRIER_JWKS_FILE", value_name = "FILE")]
    pub jwks_file: Option<PathBuf>,

    /// The algorithm tokens verified by --jwt-secret or --jwt-public-key must
    /// use. Default: HS256 for a secret; RS256, ES256 or EdDSA for a public
    /// key, by its type (set it for RS384/512, PS*, ES384).
    #[arg(long, env = "CRIER_JWT_ALGORITHM", value_name = "ALG", value_parser = parse_algorithm)]
    pub jwt_algorithm: Option<Algorithm>,

    /// When set, a token's `iss` must be this.
    #[arg(long, env = "CRIER_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// When set, a token's `aud` must include this.
    #[arg(long, env = "CRIER_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Clock skew tolerated when checking `exp` and `nbf`.
    #[arg(long, env = "CRIER_JWT_LEEWAY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub jwt_leeway: Duration,
}

fn parse_algorithm(s: &str) -> Result<Algorithm, String> {
    s.parse::<Algorithm>().map_err(|_| {
        format!("`{s}` is not a JWT signature algorithm (HS256, RS256, ES256, EdDSA, …)")
    })
}

impl JwtSettings {
    /// Whether any key is configured, i.e. access control is on.
    pub fn enabled(&self) -> bool {
        self.jwt_secret.is_some()
            || self.jwt_secret_file.is_some()
            || self.jwt_public_key.is_some()
            || self.jwks_file.is_some()
    }

    /// The HMAC secret, from the flag or the file.
    fn secret(&self) -> Result<Option<Secret>, KeyError> {
        match (&self.jwt_secret, &self.jwt_secret_file) {
            (Some(_), Some(_)) => Err(KeyError(
                "give --jwt-secret or --jwt-secret-file, not both".into(),
            )),
            (Some(secret), None) => Ok(Some(secret.clone())),
            (None, Some(path)) => {
                let text = read(path)?;
                Ok(Some(Secret(text.trim().to_owned())))
            }
            (None, None) => Ok(None),
        }
        .and_then(|secret| match secret {
            Some(s) if s.0.len() < 32 => Err(KeyError(
                "the JWT secret must be at least 32 bytes (e.g. `openssl rand -base64 32`)".into(),
            )),
            other => Ok(other),
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(String);

fn read(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path)
        .map_err(|e| KeyError(format!("cannot read {}: {e}", path.display())))
}

/// The claims crier reads. Unknown claims are ignored.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(default)]
    pub crier: Grants,
}

/// A verified token: what it grants and until when.
#[derive(Debug, Clone)]
pub struct Verified {
    pub grants: Grants,
    /// The token's `sub`, when it has one: publish rates are kept per
    /// subject.
    pub subject: Option<String>,
    /// Seconds since the Unix epoch after which the token (leeway included)
    /// no longer counts.
    pub expires_at: u64,
}

/// Why a token was refused. The messages never quote the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's signature or algorithm does not match a configured key")]
    BadSignature,
    #[error("the token has no `exp` claim, or a claim of the wrong type")]
    BadClaims,
    #[error("the token's issuer is not the one expected")]
    WrongIssuer,
    #[error("the token's audience does not include this hub")]
    WrongAudience,
    #[error("the Authorization header must read `Bearer TOKEN`: the `Bearer ` prefix is missing")]
    NotBearer,
}

struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Verifies tokens against the configured keys.
pub struct Verifier {
    keys: Vec<Key>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Duration,
}

impl Verifier {
    /// Loads the configured keys; `Ok(None)` when none is configured.
    pub fn from_settings(settings: &JwtSettings) -> Result<Option<Verifier>, KeyError> {
        if !settings.enabled() {
            return Ok(None);
        }
        let mut keys = Vec::new();
        if let Some(secret) = settings.secret()? {
            let algorithm = settings.jwt_algorithm.unwrap_or(Algorithm::HS256);
            if !matches!(
                algorithm,
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
            ) {
                return Err(KeyError(format!(
                    "--jwt-algorithm {algorithm:?} cannot be used with a secret (HS256, HS384, HS512)"
                )));
            }
            let key = DecodingKey::from_secret(secret.expose())
                .map_err(|e| KeyError(format!("bad JWT secret: {e}")))?;
            keys.push(Key {
                kid: None,
                algorithm,
                key,
            });
        }
        if let Some(path) = &settings.jwt_public_key {
            keys.push(public_key(path, settings.jwt_algorithm)?);
        }
        if let Some(path) = &settings.jwks_file {
            keys.extend(jwks(path)?);
        }
        let mut seen = HashSet::new();
        if keys
            .iter()
            .filter(|k| k.kid.is_none())
            .any(|k| !seen.insert(k.algorithm))
        {
            return Err(KeyError(
                "a secret and a public key may not use the same algorithm".into(),
            ));
        }
        Ok(Some(Verifier {
            keys,
            issuer: settings.jwt_issuer.clone(),
            audience: settings.jwt_audience.clone(),
            leeway: settings.jwt_leeway,
        }))
    }

    /// Verifies `token` and returns its grants.
    pub fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let key = self.key_for(&header).ok_or(TokenError::BadSignature)?;
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        match &self.issuer {
            Some(issuer) => {
                validation.set_issuer(&[issuer]);
                validation.required_spec_claims.insert("iss".into());
            }
            None => validation.iss = None,
        }
        match &self.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
                ErrorKind::InvalidAudience => TokenError::WrongAudience,
                ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => {
                    TokenError::BadClaims
                }
                ErrorKind::InvalidToken
                | ErrorKind::Base64(_)
                | ErrorKind::Json(_)
                | ErrorKind::Utf8(_) => TokenError::Malformed,
                _ => TokenError::BadSignature,
            })?;
        let claims = &data.claims;
        let exp = claims
            .get("exp")
            .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f as u64)))
            .ok_or(TokenError::BadClaims)?;
        let grants = match claims.get("crier") {
            None => Grants::default(),
            Some(value) => {
                serde_json::from_value(value.clone()).map_err(|_| TokenError::BadClaims)?
            }
        };
        // jsonwebtoken still accepts a token during the second its `exp`
        // (plus leeway) names; tickets and streams count it as expired from
        // that second on (RFC 7519: valid only *before* `exp`). Refuse it
        // here too, or a ticket minted then is dead on arrival.
        let expires_at = exp.saturating_add(self.leeway.as_secs());
        if expires_at <= super::now_unix() {
            return Err(TokenError::Expired);
        }
        let subject = claims
            .get("sub")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        Ok(Verified {
            grants,
            subject,
            expires_at,
        })
    }

    fn key_for(&self, header: &Header) -> Option<&Key> {
        match &header.kid {
            Some(kid) if self.keys.iter().any(|k| k.kid.as_deref() == Some(kid)) => {
                self.keys.iter().find(|k| k.kid.as_deref() == Some(kid))
            }
            _ => self
                .keys
                .iter()
                .find(|k| k.kid.is_none() && k.algorithm == header.alg)
                .or_else(|| {
                    // A JWK set of one key needs no `kid` in the token.
                    let with_kid: Vec<&Key> =
                        self.keys.iter().filter(|k| k.kid.is_some()).collect();
                    (header.kid.is_none() && with_kid.len() == 1).then(|| with_kid[0])
                }),
        }
    }
}

fn public_key(path: &Path, algorithm: Option<Algorithm>) -> Result<Key, KeyError> {
    let pem = read(path)?;
    let bytes = pem.as_bytes();
    let bad = |what: &str| KeyError(format!("{}: {what}", path.display()));
    let (key, default) = if let Ok(key) = DecodingKey::from_ed_pem(bytes) {
        (key, Algorithm::EdDSA)
    } else if let Ok(key) = DecodingKey::from_ec_pem(bytes) {
        (key, Algorithm::ES256)
    } else if let Ok(key) = DecodingKey::from_rsa_pem(bytes) {
        (key, Algorithm::RS256)
    } else {
        return Err(bad("not a PEM RSA, EC or Ed25519 public key"));
    };
    let algorithm = algorithm.unwrap_or(default);
    if algorithm.family() != key.family() {
        return Err(bad(&format!(
            "--jwt-algorithm {algorithm:?} does not fit this key"
        )));
    }
    Ok(Key {
        kid: None,
        algorithm,
        key,
    })
}

fn jwks(path: &Path) -> Result<Vec<Key>, KeyError> {
    let text = read(path)?;
    let set: JwkSet = serde_json::from_str(&text)
        .map_err(|e| KeyError(format!("{}: not a JWK set: {e}", path.display())))?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let bad = |what: String| KeyError(format!("{}: key {i}: {what}", path.display()));
        let algorithm = match jwk.common.key_algorithm {
            Some(alg) => alg
                .to_string()
                .parse::<Algorithm>()
                .map_err(|_| bad(format!("algorithm {alg} cannot sign JWTs")))?,
            None => match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                    EllipticCurve::P256 => Algorithm::ES256,
                    EllipticCurve::P384 => Algorithm::ES384,
                    _ => return Err(bad("unsupported curve".into())),
                },
                AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
                _ => return Err(bad("unsupported key type".into())),
            },
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(e.to_string()))?;
        if algorithm.family() != key.family() {
            return Err(bad(format!("algorithm {algorithm:?} does not fit the key")));
        }
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            algorithm,
            key,
        });
    }
    if keys.len() > 1 && keys.iter().any(|k| k.kid.is_none()) {
        return Err(KeyError(format!(
            "{}: every key of a set of several needs a `kid`",
            path.display()
        )));
    }
    Ok(keys)
}

/// Mints a token with the configured HMAC secret (`crier token`).
pub fn mint(
    settings: &JwtSettings,
    grants: Grants,
    ttl: Duration,
    subject: Option<String>,
) -> Result<String, KeyError> {
    let secret = settings.secret()?.ok_or_else(|| {
        KeyError("minting needs the HMAC secret (--jwt-secret or --jwt-secret-file)".into())
    })?;
    let algorithm = settings.jwt_algorithm.unwrap_or(Algorithm::HS256);
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_add(ttl)
        .as_secs();
    let claims = Claims {
        exp,
        sub: subject,
        iss: settings.jwt_issuer.clone(),
        aud: settings.jwt_audience.clone(),
        crier: grants,
    };
    let key = EncodingKey::from_secret(secret.expose())
        .map_err(|e| KeyError(format!("bad JWT secret: {e}")))?;
    jsonwebtoken::encode(&Header::new(algorithm), &claims, &key)
        .map_err(|e| KeyError(format!("cannot sign: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "a test secret of at least thirty-two bytes";

    fn verifier() -> Verifier {
        let settings = JwtSettings {
            jwt_secret: Some(SECRET.parse().unwrap()),
            jwt_secret_file: None,
            jwt_public_key: None,
            jwks_file: None,
            jwt_algorithm: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway: Duration::ZERO,
        };
        Verifier::from_settings(&settings).unwrap().unwrap()
    }

    fn signed(exp: u64) -> String {
        let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
        jsonwebtoken::encode(&Header::default(), &serde_json::json!({ "exp": exp }), &key).unwrap()
    }

    #[test]
    fn a_token_is_expired_from_the_second_its_exp_names() {
        let now = super::super::now_unix();
        assert_eq!(
            verifier().verify(&signed(now)).unwrap_err(),
            TokenError::Expired
        );
        assert_eq!(
            verifier().verify(&signed(now + 60)).unwrap().expires_at,
            now + 60
        );
    }
}
