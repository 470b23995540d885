//! The HTTP/2 channel (plaintext or TLS) and the headers every request carries.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use std::task::{Context, Poll};

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use txmq_proto::digest::hex_upper;
use txmq_proto::v2 as pb;

use super::BoxFuture;
use crate::config::{ClientConfig, Credentials, Tls};
use crate::error::ConnectError;

/// Where the server is, parsed from [`ClientConfig::endpoint`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// Host name or IP address, without brackets.
    pub host: String,
    pub port: u16,
    /// TLS asked for with an `https://` prefix.
    pub https: bool,
}

impl Target {
    pub(crate) fn parse(endpoint: &str) -> Result<Self, ConnectError> {
        let bad = |reason: &str| ConnectError::BadEndpoint {
            endpoint: endpoint.to_string(),
            reason: reason.to_string(),
        };
        let (rest, https) = match endpoint.split_once("://") {
            None => (endpoint, false),
            Some(("http", rest)) => (rest, false),
            Some(("https", rest)) => (rest, true),
            Some((scheme, _)) => return Err(bad(&format!("unknown scheme {scheme}://"))),
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 = port.parse().map_err(|_| bad("the port is not a number"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains(['/', ' ']) {
            return Err(bad("no host"));
        }
        Ok(Self {
            host: host.to_string(),
            port,
            https,
        })
    }

    /// The address as route `Endpoints`, so that routes point back at it.
    pub(crate) fn endpoints(&self) -> pb::Endpoints {
        let scheme = match self.host.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(_)) => pb::AddressScheme::IPv4,
            Ok(std::net::IpAddr::V6(_)) => pb::AddressScheme::IPv6,
            Err(_) => pb::AddressScheme::DomainName,
        };
        pb::Endpoints {
            scheme: scheme as i32,
            addresses: vec![pb::Address {
                host: self.host.clone(),
                port: i32::from(self.port),
            }],
        }
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The server's address as a URI, the origin of every request.
pub(crate) fn origin(target: &Target) -> tonic::codegen::http::Uri {
    format!("http://{}", target.authority())
        .parse()
        .expect("a parsed host and port form a valid URI")
}

type Body = tonic::body::Body;
type Sender = http2::SendRequest<Body>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One HTTP/2 connection to the server, plaintext or TLS, made on first use and made again
/// by the first call after it is lost (a call in flight when it is lost fails, as gRPC
/// calls do). Clones share the connection.
///
/// Calls go straight to the connection's task: there is no buffering task between a call
/// and the socket, which halves the thread hand-offs per call on a busy client.
#[derive(Clone)]
pub(crate) struct Connection {
    inner: Arc<Inner>,
}

struct Inner {
    /// `host:port`.
    address: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
    http2: http2::Builder<TokioExecutor>,
    current: std::sync::Mutex<Option<Sender>>,
    /// Held while connecting, so that concurrent calls make one connection, not one each.
    connecting: tokio::sync::Mutex<()>,
}

impl Connection {
    /// A connection to `target`, not yet made.
    pub(crate) fn new(config: &ClientConfig, target: &Target) -> Result<Self, ConnectError> {
        let tls = match (&config.tls, target.https) {
            (Tls::Off, false) => None,
            (Tls::Off, true) => Some(tls_config(&Tls::TrustAll)?),
            (tls, _) => Some(tls_config(tls)?),
        };
        let tls = match tls {
            None => None,
            Some(tls) => {
                let name =
                    ServerName::try_from(target.host.clone()).map_err(|e| ConnectError::Tls {
                        reason: format!("{:?} is not a TLS server name: {e}", target.host),
                    })?;
                Some((tokio_rustls::TlsConnector::from(Arc::new(tls)), name))
            }
        };
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        Ok(Self {
            inner: Arc::new(Inner {
                address: target.authority(),
                tls,
                connect_timeout: config.request_timeout,
                http2,
                current: std::sync::Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
            }),
        })
    }
}

impl Inner {
    /// The open connection, if there is one.
    fn open(&self) -> Option<Sender> {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        current.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    /// The open connection, made first if there is none.
    async fn sender(&self) -> Result<Sender, BoxError> {
        if let Some(s) = self.open() {
            return Ok(s);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(s) = self.open() {
            return Ok(s);
        }
        let sender = match tokio::time::timeout(self.connect_timeout, self.connect()).await {
            Ok(Ok(sender)) => sender,
            Ok(Err(e)) => return Err(Box::new(tonic::ConnectError(e))),
            Err(_) => {
                let e = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no connection to {} within {:?}",
                        self.address, self.connect_timeout
                    ),
                );
                return Err(Box::new(tonic::ConnectError(Box::new(e))));
            }
        };
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender.clone());
        Ok(sender)
    }

    /// Connects, shakes hands (TLS, then HTTP/2) and leaves a task driving the connection.
    async fn connect(&self) -> Result<Sender, BoxError> {
        let tcp = TcpStream::connect(&self.address).await?;
        tcp.set_nodelay(true)?;
        let sender = match &self.tls {
            None => {
                let (sender, conn) = self.http2.handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(drive(conn));
                sender
            }
            Some((connector, name)) => {
                // TLS is spoken here rather than by tonic so that "trust any certificate"
                // is possible.
                let tls = connector.connect(name.clone(), tcp).await?;
                let (sender, conn) = self.http2.handshake(TokioIo::new(tls)).await?;
                tokio::spawn(drive(conn));
                sender
            }
        };
        tracing::debug!(address = %self.address, tls = self.tls.is_some(), "connected");
        Ok(sender)
    }
}

/// Runs a connection until it closes.
async fn drive(conn: impl Future<Output = hyper::Result<()>>) {
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "connection to the server closed");
    }
}

impl tower::Service<tonic::codegen::http::Request<Body>> for Connection {
    type Response = tonic::codegen::http::Response<hyper::body::Incoming>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness is settled per call: an HTTP/2 connection takes any number of streams
        // up to the server's limit, and hyper queues the rest.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: tonic::codegen::http::Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut sender = inner.sender().await?;
            sender.ready().await?;
            Ok(sender.send_request(request).await?)
        })
    }
}

fn tls_config(tls: &Tls) -> Result<rustls::ClientConfig, ConnectError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConnectError::Tls {
            reason: e.to_string(),
        })?;
    let mut config = match tls {
        Tls::CaPem(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| ConnectError::Tls {
                    reason: format!("CA PEM: {e}"),
                })?;
                roots.add(cert).map_err(|e| ConnectError::Tls {
                    reason: format!("CA certificate: {e}"),
                })?;
            }
            if roots.is_empty() {
                return Err(ConnectError::Tls {
                    reason: "no certificate in the CA PEM".into(),
                });
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(TrustAll(provider)))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Accepts any certificate, but still checks that the handshake is signed by its key.
#[derive(Debug)]
struct TrustAll(Arc<CryptoProvider>);

impl ServerCertVerifier for TrustAll {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Adds the headers of the official clients to every request, and the signature.
#[derive(Clone)]
pub(crate) struct Headers {
    client_id: AsciiMetadataValue,
    namespace: Option<AsciiMetadataValue>,
    credentials: Option<Credentials>,
}

impl Headers {
    pub(crate) fn new(client_id: &str, config: &ClientConfig) -> Result<Self, ConnectError> {
        let ascii = |what: &'static str, value: &str| {
            AsciiMetadataValue::try_from(value).map_err(|e| ConnectError::BadName {
                what,
                value: value.to_string(),
                reason: e.to_string(),
            })
        };
        if let Some(c) = &config.credentials {
            ascii("access key", c.access_key())?;
        }
        Ok(Self {
            client_id: ascii("client id", client_id)?,
            namespace: if config.namespace.is_empty() {
                None
            } else {
                Some(ascii("namespace", &config.namespace)?)
            },
            credentials: config.credentials.clone(),
        })
    }
}

impl Interceptor for Headers {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let m: &mut MetadataMap = request.metadata_mut();
        let ascii = |s: String| {
            AsciiMetadataValue::try_from(s).map_err(|e| tonic::Status::internal(e.to_string()))
        };
        m.insert("x-mq-client-id", self.client_id.clone());
        m.insert("x-mq-language", AsciiMetadataValue::from_static("RUST"));
        m.insert("x-mq-protocol", AsciiMetadataValue::from_static("v2"));
        m.insert(
            "x-mq-client-version",
            AsciiMetadataValue::from_static(env!("CARGO_PKG_VERSION")),
        );
        m.insert("x-mq-request-id", ascii(uuid::Uuid::now_v7().to_string())?);
        let date_time = utc_date_time(SystemTime::now());
        if let Some(ns) = &self.namespace {
            m.insert("x-mq-namespace", ns.clone());
        }
        if let Some(c) = &self.credentials {
            m.insert("authorization", ascii(authorization(c, &date_time))?);
        }
        m.insert("x-mq-date-time", ascii(date_time)?);
        Ok(request)
    }
}

/// The `authorization` header: HMAC-SHA1 of the `x-mq-date-time` value, upper-case hex, as
/// the Java client sends it.
pub(crate) fn authorization(c: &Credentials, date_time: &str) -> String {
    // HMAC takes keys of any length: `new_from_slice` cannot fail.
    let signature = match Hmac::<sha1::Sha1>::new_from_slice(c.secret().as_bytes()) {
        Ok(mut mac) => {
            mac.update(date_time.as_bytes());
            hex_upper(&mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    };
    format!(
        "MQv2-HMAC-SHA1 Credential={}, SignedHeaders=x-mq-date-time, Signature={signature}",
        c.access_key()
    )
}

/// `yyyyMMddTHHmmssZ` in UTC, the format of the official clients' `x-mq-date-time`.
pub(crate) fn utc_date_time(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_time_header_is_compact_utc() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(utc_date_time(t), "20231114T221320Z");
        let leap_day = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(utc_date_time(leap_day), "20000229T000000Z");
    }

    #[test]
    fn signature_is_upper_case_hmac_sha1_of_the_date_time() {
        // RFC 2202 test case 2: key "Jefe", data "what do ya want for nothing?".
        let c = Credentials::new("AK", "Jefe");
        assert_eq!(
            authorization(&c, "what do ya want for nothing?"),
            "MQv2-HMAC-SHA1 Credential=AK, SignedHeaders=x-mq-date-time, \
             Signature=EFFCDF6AE5EB2FA2D27416D5F184DF9C259A7C79"
        );
    }

    #[test]
    fn endpoint_needs_host_and_port_and_may_carry_a_scheme() {
        let t = Target::parse("127.0.0.1:8081").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.https),
            ("127.0.0.1", 8081, false)
        );
        assert!(Target::parse("https://mq.example.com:443").unwrap().https);
        assert_eq!(Target::parse("[::1]:9").unwrap().host, "::1");
        assert_eq!(Target::parse("[::1]:9").unwrap().authority(), "[::1]:9");
        assert!(Target::parse("localhost").is_err());
        assert!(Target::parse("ftp://h:1").is_err());
        assert!(Target::parse(":1").is_err());
    }
}
