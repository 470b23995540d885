//! The server certificate and key, and the rustls configuration built from them.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    ServerConfig,
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject},
};

/// ALPN protocol id of HTTP/2 over TLS, the only protocol gRPC speaks.
const ALPN_H2: &[u8] = b"h2";

/// Names every self-signed certificate is valid for, before the caller's extra names.
const SELF_SIGNED_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// What went wrong while preparing TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsSettingsError {
    /// The certificate file could not be read or is not valid PEM.
    #[error("reading certificates from {path}: {cause}")]
    ReadCertificates {
        /// The certificate file.
        path: PathBuf,
        /// What failed.
        cause: rustls::pki_types::pem::Error,
    },
    /// The certificate file holds no `CERTIFICATE` section.
    #[error("no certificate found in {0}")]
    NoCertificates(PathBuf),
    /// The key file could not be read, is not valid PEM, or holds no private key.
    #[error("reading private key from {path}: {cause}")]
    ReadKey {
        /// The key file.
        path: PathBuf,
        /// What failed.
        cause: rustls::pki_types::pem::Error,
    },
    /// rustls refused the certificate chain or key, e.g. because they do not match.
    #[error("unusable certificate or key: {0}")]
    Rejected(rustls::Error),
    /// The self-signed certificate could not be made, e.g. because a name is not a valid DNS name.
    #[error("making a self-signed certificate: {0}")]
    SelfSigned(rcgen::Error),
}

impl From<rustls::Error> for TlsSettingsError {
    fn from(e: rustls::Error) -> Self {
        Self::Rejected(e)
    }
}

impl From<rcgen::Error> for TlsSettingsError {
    fn from(e: rcgen::Error) -> Self {
        Self::SelfSigned(e)
    }
}

/// A server certificate chain with its private key, ready to accept TLS connections.
///
/// Cloning is cheap: clones share one rustls configuration.
#[derive(Clone)]
pub struct TlsSettings {
    config: Arc<ServerConfig>,
    certificate_chain: Arc<[CertificateDer<'static>]>,
}

impl TlsSettings {
    /// Uses `certificate_chain` (leaf first) and its private `key`; offers ALPN `h2`.
    ///
    /// # Errors
    ///
    /// [`TlsSettingsError::Rejected`] if the chain is empty, the key cannot be parsed, or the
    /// key does not belong to the leaf certificate.
    pub fn new(
        certificate_chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsSettingsError> {
        // An explicit provider, so nothing depends on a process-wide default being installed.
        let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certificate_chain.clone(), key)?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Self {
            config: Arc::new(config),
            certificate_chain: certificate_chain.into(),
        })
    }

    /// Loads a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or SEC1).
    ///
    /// # Errors
    ///
    /// A [`TlsSettingsError`] naming the file that could not be read or used.
    pub fn from_pem_files(certificate: &Path, key: &Path) -> Result<Self, TlsSettingsError> {
        let read_certificates = |cause| TlsSettingsError::ReadCertificates {
            path: certificate.to_owned(),
            cause,
        };
        let chain = CertificateDer::pem_file_iter(certificate)
            .map_err(read_certificates)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_certificates)?;
        if chain.is_empty() {
            return Err(TlsSettingsError::NoCertificates(certificate.to_owned()));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|cause| TlsSettingsError::ReadKey {
            path: key.to_owned(),
            cause,
        })?;
        Self::new(chain, key)
    }

    /// Makes a fresh self-signed certificate (ECDSA P-256) for `localhost`, `127.0.0.1`, `::1`
    /// and `extra_names`; each extra name that parses as an IP address becomes an IP SAN, any
    /// other a DNS SAN.
    ///
    /// Meant for clients that trust any certificate, as the RocketMQ Java and Go clients do by
    /// default. The key lives only in memory, so each start-up presents a new certificate.
    ///
    /// # Errors
    ///
    /// [`TlsSettingsError::SelfSigned`] if an extra name is neither an IP address nor a valid
    /// DNS name.
    pub fn self_signed(extra_names: &[String]) -> Result<Self, TlsSettingsError> {
        let mut names: Vec<String> = SELF_SIGNED_NAMES.iter().map(|&n| n.to_owned()).collect();
        for name in extra_names {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        let certified = rcgen::generate_simple_self_signed(names)?;
        let key = PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
        Self::new(vec![certified.cert.der().clone()], key.into())
    }

    /// The certificate chain presented to clients, leaf first.
    pub fn certificate_chain(&self) -> &[CertificateDer<'static>] {
        &self.certificate_chain
    }

    /// The rustls server configuration (ALPN `h2`, TLS 1.2 and 1.3, no client certificates).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.config)
    }
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of logs; the chain length is enough to tell settings apart.
        f.debug_struct("TlsSettings")
            .field("certificates", &self.certificate_chain.len())
            .finish_non_exhaustive()
    }
}
