//! Development TLS (`--tls-self-signed`): a self-signed certificate for
//! localhost, made once and kept, so "HTTPS and HTTP/2" works on a laptop
//! without an openssl recipe. Real deployments give `--tls-cert/--tls-key`.

use std::path::{Path, PathBuf};

/// The files of a development certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why no development certificate could be made or found.
#[derive(Debug, thiserror::Error)]
pub enum DevCertError {
    #[error("cannot write the self-signed certificate in {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The names the certificate is valid for: what a browser or curl on the
/// same machine types.
const NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Where the certificate lives: the user's cache directory
/// (`$XDG_CACHE_HOME/crier`, `~/.cache/crier`), else the temp directory.
/// Never the data directory, which holds the store's files only.
pub fn default_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")));
    match cache {
        Some(cache) => cache.join("crier"),
        None => std::env::temp_dir().join("crier"),
    }
}

/// The certificate in `dir`, made there first if it is not there yet. It is
/// kept across starts so that a browser told to trust it once keeps doing
/// so; delete the two files for a new one.
pub fn ensure(dir: &Path) -> Result<DevCert, DevCertError> {
    let files = DevCert {
        cert: dir.join("localhost.pem"),
        key: dir.join("localhost-key.pem"),
    };
    if files.cert.is_file() && files.key.is_file() {
        return Ok(files);
    }
    let io = |source| DevCertError::Io {
        dir: dir.to_owned(),
        source,
    };
    let names: Vec<String> = NAMES.iter().map(|n| (*n).to_owned()).collect();
    let certified = rcgen::generate_simple_self_signed(names)?;
    std::fs::create_dir_all(dir).map_err(io)?;
    write_private(&files.key, certified.signing_key.serialize_pem().as_bytes()).map_err(io)?;
    std::fs::write(&files.cert, certified.cert.pem()).map_err(io)?;
    Ok(files)
}

/// Writes the key readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    options.open(path)?.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_made_once_and_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure(dir.path()).unwrap();
        let pem = std::fs::read_to_string(&first.cert).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let second = ensure(dir.path()).unwrap();
        assert_eq!(first, second);
        assert_eq!(std::fs::read_to_string(&second.cert).unwrap(), pem);
    }
}
