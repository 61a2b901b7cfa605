//! TLS for the listeners, with rustls: a certificate chain and its private key read from PEM
//! files and checked before anything is served, then handed to every new handshake by a
//! resolver whose pair [`Certificates::install`] swaps (a config reload, on `SIGHUP`) without touching the
//! connections already open.
//!
//! What [`load`] refuses, each naming its file: a file that cannot be read, no certificate or no
//! key in it, a key rustls cannot sign with, a certificate that is expired or not yet valid, and
//! a key that is not the certificate's. rustls itself never checks a server's own certificate,
//! so without these a gateway would start and fail every handshake.
//!
//! The server speaks TLS 1.3 and 1.2 only, offers ALPN `h2` and `http/1.1`, and sends no
//! session tickets' secrets anywhere: resumption uses rustls's in-memory cache. Foundations
//! layer: reads files, no sockets.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::RwLock;
use rustls::crypto::ring;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocols offered, most preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Where a listener's certificate chain and key are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the server certificate first, then its intermediates.
    pub cert: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why a certificate and key cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate file holds no PEM certificate (or a damaged one).
    #[error("{path} holds no PEM certificate{why}")]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// What the parser said, if anything.
        why: String,
    },
    /// The key file holds no PEM private key.
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1){why}")]
    NoKey {
        /// The file.
        path: PathBuf,
        /// What the parser said, if anything.
        why: String,
    },
    /// The key is of a kind rustls cannot sign with.
    #[error("the key in {path} cannot be used: {why}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The certificate's dates do not include now.
    #[error("the certificate in {path} is {state} (valid {not_before} to {not_after})")]
    OutOfDate {
        /// The file.
        path: PathBuf,
        /// "expired" or "not yet valid".
        state: &'static str,
        /// Start of validity.
        not_before: String,
        /// End of validity.
        not_after: String,
    },
    /// The certificate cannot be parsed as X.509.
    #[error("the certificate in {path} cannot be parsed: {why}")]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The key is not the one the certificate was issued for.
    #[error("the key in {key} does not match the certificate in {cert}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
}

/// Reads and checks `files` as of `now`: the chain and a signing key that matches it.
pub fn load(files: &TlsFiles, now: SystemTime) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = read_chain(&files.cert)?;
    check_dates(&files.cert, &chain[0], now)?;
    let key = read_key(&files.key)?;
    let signing_key = ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::BadKey {
            path: files.key.clone(),
            why: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(Arc::new(certified)),
        // `Unknown`: rustls cannot tell for this key type; the handshake will.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(_) => Err(TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        }),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let no_certificate = |why: String| TlsError::NoCertificate {
        path: path.to_owned(),
        why,
    };
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| no_certificate(format!(": {e}")))?;
    if chain.is_empty() {
        return Err(no_certificate(String::new()));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::NoKey {
        path: path.to_owned(),
        why: match e {
            rustls_pki_types::pem::Error::NoItemsFound => String::new(),
            other => format!(": {other}"),
        },
    })
}

/// The end-entity certificate is valid at `now`.
fn check_dates(path: &Path, cert: &CertificateDer<'_>, now: SystemTime) -> Result<(), TlsError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| TlsError::BadCertificate {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
    let validity = parsed.validity();
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let state = if now > validity.not_after.timestamp() {
        "expired"
    } else if now < validity.not_before.timestamp() {
        "not yet valid"
    } else {
        return Ok(());
    };
    Err(TlsError::OutOfDate {
        path: path.to_owned(),
        state,
        not_before: validity.not_before.to_string(),
        not_after: validity.not_after.to_string(),
    })
}

/// A listener's certificate and key: served to every new handshake, swapped by a reload
/// ([`Certificates::install`] of a pair that [`load`] read and checked).
#[derive(Debug)]
pub struct Certificates {
    /// The files the pair in force came from, and the pair.
    current: RwLock<(TlsFiles, Arc<CertifiedKey>)>,
}

// === impl Certificates ===

impl Certificates {
    /// Loads `files` (see [`load`]).
    pub fn open(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let current = load(&files, SystemTime::now())?;
        Ok(Arc::new(Certificates {
            current: RwLock::new((files, current)),
        }))
    }

    /// Serves `pair`, loaded (and so checked) from `files`, to new handshakes from now on.
    pub fn install(&self, files: TlsFiles, pair: Arc<CertifiedKey>) {
        *self.current.write() = (files, pair);
    }

    /// The files the pair in force comes from.
    pub fn files(&self) -> TlsFiles {
        self.current.read().0.clone()
    }

    /// A rustls server config over these certificates: TLS 1.3 and 1.2, ALPN `h2` then
    /// `http/1.1`, no client certificates.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(ring::default_provider());
        // The ring provider supports both versions, so this cannot fail.
        let builder = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .unwrap_or_else(|_| unreachable!("ring supports TLS 1.2 and 1.3"));
        let mut config = builder
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read().1))
    }
}

/// How a route talks TLS to its `https://` upstreams.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTlsFiles {
    /// PEM bundle of the CAs to trust instead of the system's roots.
    pub ca: Option<PathBuf>,
    /// A client certificate and key to present (mutual TLS).
    pub client: Option<TlsFiles>,
}

/// Why an upstream TLS client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    /// A file is unreadable, empty or out of date (see [`TlsError`]).
    #[error(transparent)]
    Files(#[from] TlsError),
    /// The system has no trust anchors and no CA file was given.
    #[error("no system root certificates were found ({0}); install ca-certificates or set tls_ca")]
    NoSystemRoots(String),
    /// A CA certificate was refused as a trust anchor.
    #[error("the CA in {path} cannot be used: {why}")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The client certificate and key cannot be used together.
    #[error("the client certificate cannot be used: {0}")]
    BadClientCert(String),
}

/// A rustls client for a route's `https://` upstreams, as of `now`: the CA file's certificates
/// (else the system's roots) as trust anchors, the client certificate when set, TLS 1.3/1.2,
/// ALPN `http/1.1` (upstream connections are HTTP/1.1). The server name sent (SNI) and checked
/// is the upstream's host, given per connection.
pub fn upstream_client_config(
    files: &UpstreamTlsFiles,
    now: SystemTime,
) -> Result<Arc<rustls::ClientConfig>, UpstreamTlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match &files.ca {
        Some(path) => {
            for cert in read_chain(path)? {
                roots.add(cert).map_err(|e| UpstreamTlsError::BadCa {
                    path: path.clone(),
                    why: e.to_string(),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or_else(|| "none installed".to_owned(), ToString::to_string);
                return Err(UpstreamTlsError::NoSystemRoots(why));
            }
        }
    }
    let provider = Arc::new(ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap_or_else(|_| unreachable!("ring supports TLS 1.2 and 1.3"))
        .with_root_certificates(roots);
    let mut config = match &files.client {
        None => builder.with_no_client_auth(),
        Some(client) => {
            let chain = read_chain(&client.cert)?;
            check_dates(&client.cert, &chain[0], now)?;
            let key = read_key(&client.key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| UpstreamTlsError::BadClientCert(e.to_string()))?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
