//! Credentials for the access-control tests: tokens signed here with real
//! keys (HMAC secrets, EC P-256 and Ed25519 key pairs from rcgen), key files
//! in a directory removed on drop, and the requests that carry them.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519};
use serde_json::{Value, json};

use super::Config;

/// The HMAC secret of the test hubs (at least 32 bytes).
pub const SECRET: &str = "crier test secret: 32 bytes or more, for tests only";

/// The name of the auth cookie by default.
pub const COOKIE: &str = "crier_token";

/// Seconds since the Unix epoch, as token claims count them.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Turns access control on with [`SECRET`].
pub fn with_secret(config: &mut Config) {
    config.access.jwt.jwt_secret = Some(SECRET.parse().unwrap());
}

/// Claims granting `publish` and `subscribe`, expiring at `exp`.
pub fn claims(publish: &[&str], subscribe: &[&str], exp: u64) -> Value {
    json!({
        "sub": "test",
        "exp": exp,
        "crier": { "publish": publish, "subscribe": subscribe },
    })
}

/// A token signed with `secret` by the HMAC algorithm `algorithm`.
pub fn sign_hmac(claims: &Value, secret: &[u8], algorithm: Algorithm) -> String {
    jsonwebtoken::encode(
        &Header::new(algorithm),
        claims,
        &EncodingKey::from_secret(secret).expect("an HMAC key"),
    )
    .expect("sign a test token")
}

/// A token signed with [`SECRET`] (HS256).
pub fn signed(claims: &Value) -> String {
    sign_hmac(claims, SECRET.as_bytes(), Algorithm::HS256)
}

/// A token valid for an hour with these grants, signed with [`SECRET`].
pub fn token(publish: &[&str], subscribe: &[&str]) -> String {
    signed(&claims(publish, subscribe, now() + 3600))
}

/// An unsigned token (`alg: none`, empty signature), crafted by hand since
/// no JWT library makes one.
pub fn unsigned(claims: &Value) -> String {
    let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = base64url(claims.to_string().as_bytes());
    format!("{header}.{payload}.")
}

/// Unpadded base64url (RFC 4648 §5), as JWTs and JWKs use it.
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// A signing key pair whose public half a hub is configured with.
pub struct TestKey {
    pair: KeyPair,
    pub algorithm: Algorithm,
}

impl TestKey {
    /// An ECDSA P-256 key (ES256).
    pub fn ec() -> TestKey {
        TestKey {
            pair: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
            algorithm: Algorithm::ES256,
        }
    }

    /// An Ed25519 key (EdDSA).
    pub fn ed25519() -> TestKey {
        TestKey {
            pair: KeyPair::generate_for(&PKCS_ED25519).unwrap(),
            algorithm: Algorithm::EdDSA,
        }
    }

    /// The public key as PEM (SubjectPublicKeyInfo), for `--jwt-public-key`.
    pub fn public_pem(&self) -> String {
        self.pair.public_key_pem()
    }

    /// A token signed with the private key, naming `kid` when given.
    pub fn sign(&self, claims: &Value, kid: Option<&str>) -> String {
        let private = self.pair.serialize_pem();
        let key = match self.algorithm {
            Algorithm::ES256 => EncodingKey::from_ec_pem(private.as_bytes()),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(private.as_bytes()),
            other => panic!("no test keys for {other:?}"),
        }
        .expect("rcgen's PKCS#8 key loads");
        let mut header = Header::new(self.algorithm);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &key).expect("sign a test token")
    }

    /// The public key as a JWK (RFC 7517) with this `kid`.
    pub fn jwk(&self, kid: &str) -> Value {
        let raw = self.pair.public_key_raw();
        match self.algorithm {
            // An uncompressed point: 0x04, then x and y.
            Algorithm::ES256 => json!({
                "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
                "x": base64url(&raw[1..33]), "y": base64url(&raw[33..65]),
            }),
            Algorithm::EdDSA => json!({
                "kty": "OKP", "crv": "Ed25519", "kid": kid, "use": "sig",
                "x": base64url(raw),
            }),
            other => panic!("no test keys for {other:?}"),
        }
    }
}

/// A directory of key files, removed on drop.
pub struct KeyDir {
    pub dir: PathBuf,
}

impl KeyDir {
    pub fn new() -> KeyDir {
        let dir = std::env::temp_dir().join(format!(
            "crier-test-keys-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        KeyDir { dir }
    }

    /// Writes `contents` to the file `name` and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for KeyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
