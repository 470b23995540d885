//! TLS and plaintext gRPC on one port, over real sockets, with the generated Admin client.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, ring},
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};
use tokio_rustls::TlsConnector;
use tonic::{
    Request, Response, Status,
    service::Routes,
    transport::{Channel, Endpoint, Uri},
};
use txmq_broker::net::{ServeOptions, TlsSettings, TlsSettingsError, serve_grpc};
use txmq_proto::v2::{
    ChangeLogLevelRequest, ChangeLogLevelResponse,
    admin_client::AdminClient,
    admin_server::{Admin, AdminServer},
    change_log_level_request::Level,
};

/// Admin service whose answer time depends on the requested level: `Trace` answers at once,
/// `Debug` after [`SLOW_CALL`], `Error` never.
struct TestAdmin;

const SLOW_CALL: Duration = Duration::from_millis(500);

#[tonic::async_trait]
impl Admin for TestAdmin {
    async fn change_log_level(
        &self,
        request: Request<ChangeLogLevelRequest>,
    ) -> Result<Response<ChangeLogLevelResponse>, Status> {
        let level = request.into_inner().level();
        match level {
            Level::Debug => tokio::time::sleep(SLOW_CALL).await,
            Level::Error => std::future::pending::<()>().await,
            _ => {}
        }
        Ok(Response::new(ChangeLogLevelResponse {
            remark: format!("level {}", level.as_str_name()),
        }))
    }
}

struct TestServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    served: JoinHandle<()>,
}

impl TestServer {
    async fn start(tls: Option<TlsSettings>, options: ServeOptions) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        let routes = Routes::new(AdminServer::new(TestAdmin));
        let served = tokio::spawn(serve_grpc(listener, routes, tls, options, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            served,
        }
    }

    fn shut_down(&mut self) {
        self.stop.take().unwrap().send(()).unwrap();
    }

    async fn plaintext_client(&self) -> AdminClient<Channel> {
        let channel = Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        AdminClient::new(channel)
    }

    async fn tls_client(&self, config: ClientConfig, server_name: &str) -> AdminClient<Channel> {
        let offers_h2 = config.alpn_protocols.contains(&b"h2".to_vec());
        let connector = TlsConnector::from(Arc::new(config));
        let server_name = ServerName::try_from(server_name.to_owned()).unwrap();
        let addr = self.addr;
        let connect = tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let tls = connector.connect(server_name, tcp).await?;
                if offers_h2 {
                    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
                }
                Ok::<_, io::Error>(TokioIo::new(tls))
            }
        });
        // The scheme only fills gRPC's `:scheme` header; the connector does the TLS.
        let channel = Endpoint::from_shared(format!("https://localhost:{}", self.addr.port()))
            .unwrap()
            .connect_with_connector(connect)
            .await
            .unwrap();
        AdminClient::new(channel)
    }
}

async fn change_log_level(
    client: &mut AdminClient<Channel>,
    level: Level,
) -> Result<String, Status> {
    let request = ChangeLogLevelRequest {
        level: level.into(),
    };
    Ok(client.change_log_level(request).await?.into_inner().remark)
}

fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// A client that trusts exactly `certificates` and offers ALPN `h2`, like grpc-go with a CA file.
fn trusting_client(certificates: &[CertificateDer<'static>]) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    for certificate in certificates {
        roots.add(certificate.clone()).unwrap();
    }
    let mut config = ClientConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// Accepts any server certificate, as the RocketMQ Java and Go clients do by default.
#[derive(Debug)]
struct TrustAnything(Arc<CryptoProvider>);

impl ServerCertVerifier for TrustAnything {
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
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Reads until the server closes `stream`, failing if it is still open after `within`.
async fn assert_closed_by_server(mut stream: TcpStream, within: Duration) {
    let mut buf = [0_u8; 1024];
    let closed = tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                // A TLS alert or an HTTP/2 GOAWAY may come first.
                Ok(n) if n > 0 => continue,
                // EOF, or a reset because the server closed with our bytes unread.
                Ok(_) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "server kept the connection open");
}

#[tokio::test]
async fn plaintext_and_tls_clients_share_one_port() {
    let tls =
        TlsSettings::self_signed(&["broker.example".to_owned(), "10.1.2.3".to_owned()]).unwrap();
    let certificates = tls.certificate_chain().to_vec();
    let server = TestServer::start(Some(tls), ServeOptions::default()).await;

    let mut plaintext = server.plaintext_client().await;
    assert_eq!(
        change_log_level(&mut plaintext, Level::Info).await.unwrap(),
        "level INFO"
    );

    for name in ["localhost", "127.0.0.1", "broker.example", "10.1.2.3"] {
        let mut client = server
            .tls_client(trusting_client(&certificates), name)
            .await;
        assert_eq!(
            change_log_level(&mut client, Level::Warn).await.unwrap(),
            "level WARN",
            "TLS client verifying {name}"
        );
    }

    // Both kinds again, interleaved on the connections already open.
    let mut tls_client = server
        .tls_client(trusting_client(&certificates), "localhost")
        .await;
    for _ in 0..3 {
        assert!(change_log_level(&mut plaintext, Level::Trace).await.is_ok());
        assert!(
            change_log_level(&mut tls_client, Level::Trace)
                .await
                .is_ok()
        );
    }
}

#[tokio::test]
async fn trust_all_tls12_client_without_alpn_is_served() {
    let tls = TlsSettings::self_signed(&[]).unwrap();
    let server = TestServer::start(Some(tls), ServeOptions::default()).await;

    let provider = ring_provider();
    let config = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TrustAnything(provider)))
        .with_no_client_auth();
    let mut client = server.tls_client(config, "some.other.name").await;

    assert_eq!(
        change_log_level(&mut client, Level::Info).await.unwrap(),
        "level INFO"
    );
}

#[tokio::test]
async fn tls_client_is_dropped_when_tls_is_disabled() {
    let server = TestServer::start(None, ServeOptions::default()).await;
    let tls = TlsSettings::self_signed(&[]).unwrap();
    let connector = TlsConnector::from(Arc::new(trusting_client(tls.certificate_chain())));

    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let handshake = connector.connect(ServerName::try_from("localhost").unwrap(), tcp);
    let refused = tokio::time::timeout(Duration::from_secs(5), handshake).await;
    assert!(matches!(refused, Ok(Err(_))), "TLS handshake did not fail");

    let mut client = server.plaintext_client().await;
    assert!(change_log_level(&mut client, Level::Trace).await.is_ok());
}

#[tokio::test]
async fn tls_client_offering_only_http1_is_refused() {
    let tls = TlsSettings::self_signed(&[]).unwrap();
    let mut config = trusting_client(tls.certificate_chain());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let server = TestServer::start(Some(tls), ServeOptions::default()).await;

    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let handshake = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp);
    let refused = tokio::time::timeout(Duration::from_secs(5), handshake).await;
    assert!(matches!(refused, Ok(Err(_))), "TLS handshake did not fail");
}

#[tokio::test]
async fn keepalive_pings_leave_long_calls_and_idle_connections_open() {
    let options = ServeOptions {
        keepalive_interval: Duration::from_millis(50),
        keepalive_timeout: Duration::from_secs(1),
        ..ServeOptions::default()
    };
    let server = TestServer::start(None, options).await;
    let connects = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&connects);
    let addr = server.addr;
    let connect = tower::service_fn(move |_: Uri| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, io::Error>(TokioIo::new(TcpStream::connect(addr).await?)) }
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(connect)
        .await
        .unwrap();
    let mut client = AdminClient::new(channel);

    // Many PING intervals within one call, then many with no call at all.
    assert!(change_log_level(&mut client, Level::Debug).await.is_ok());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(change_log_level(&mut client, Level::Debug).await.is_ok());
    assert_eq!(
        connects.load(Ordering::SeqCst),
        1,
        "the client had to reconnect"
    );
}

#[tokio::test]
async fn garbage_bytes_close_only_that_connection() {
    // A long handshake timeout, so a close within a second shows the garbage was recognised.
    let options = ServeOptions {
        handshake_timeout: Duration::from_secs(60),
        ..ServeOptions::default()
    };
    let tls = TlsSettings::self_signed(&[]).unwrap();
    let server = TestServer::start(Some(tls), options).await;
    let mut client = server.plaintext_client().await;
    assert!(change_log_level(&mut client, Level::Trace).await.is_ok());

    let garbage: [&[u8]; 6] = [
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        // Starts like the HTTP/2 preface, then differs.
        b"PRI * HTTP/1.1\r\n\r\n",
        // Claims to be a TLS handshake record, but is not a ClientHello.
        b"\x16\x03\x01\x00\x05hello",
        b"\x00\xff\x13\x37\xde\xad\xbe\xef\x01\x02\x03\x04\x05\x06\x07\x08",
        &[0xa5; 4096],
        b"\r\n",
    ];
    for bytes in garbage {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        assert_closed_by_server(stream, Duration::from_secs(1)).await;
    }

    // The connection opened before the garbage still works, and so do new ones.
    assert!(change_log_level(&mut client, Level::Trace).await.is_ok());
    let mut late_client = server.plaintext_client().await;
    assert!(
        change_log_level(&mut late_client, Level::Trace)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn silent_and_stalled_clients_are_dropped_after_handshake_timeout() {
    let handshake_timeout = Duration::from_millis(300);
    let options = ServeOptions {
        handshake_timeout,
        ..ServeOptions::default()
    };
    let tls = TlsSettings::self_signed(&[]).unwrap();
    let server = TestServer::start(Some(tls), options).await;

    let partial_prefaces: [&[u8]; 3] = [b"", b"PRI * HTTP/2.0\r\n", b"\x16\x03\x01"];
    for bytes in partial_prefaces {
        let started = Instant::now();
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        assert_closed_by_server(stream, Duration::from_secs(5)).await;
        assert!(
            started.elapsed() >= handshake_timeout,
            "dropped before the handshake timeout"
        );
    }

    let mut client = server.plaintext_client().await;
    assert!(change_log_level(&mut client, Level::Trace).await.is_ok());
}

#[tokio::test]
async fn shutdown_lets_calls_in_flight_finish() {
    let options = ServeOptions {
        grace: Duration::from_secs(10),
        ..ServeOptions::default()
    };
    let mut server = TestServer::start(None, options).await;
    let mut client = server.plaintext_client().await;
    let in_flight = tokio::spawn(async move { change_log_level(&mut client, Level::Debug).await });
    // Let the call reach the server.
    tokio::time::sleep(SLOW_CALL / 5).await;

    let started = Instant::now();
    server.shut_down();
    assert_eq!(in_flight.await.unwrap().unwrap(), "level DEBUG");
    tokio::time::timeout(Duration::from_secs(5), &mut server.served)
        .await
        .expect("serve_grpc did not return after its connections finished")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));

    assert!(TcpStream::connect(server.addr).await.is_err());
}

#[tokio::test]
async fn shutdown_closes_connections_still_busy_after_grace() {
    let grace = Duration::from_millis(300);
    let options = ServeOptions {
        grace,
        ..ServeOptions::default()
    };
    let tls = TlsSettings::self_signed(&[]).unwrap();
    let certificates = tls.certificate_chain().to_vec();
    let mut server = TestServer::start(Some(tls), options).await;
    let mut plaintext = server.plaintext_client().await;
    let mut tls_client = server
        .tls_client(trusting_client(&certificates), "localhost")
        .await;
    let stuck_plaintext =
        tokio::spawn(async move { change_log_level(&mut plaintext, Level::Error).await });
    let stuck_tls =
        tokio::spawn(async move { change_log_level(&mut tls_client, Level::Error).await });
    // A connection still in its handshake must not hold up shutdown either.
    let _silent = TcpStream::connect(server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let started = Instant::now();
    server.shut_down();
    tokio::time::timeout(Duration::from_secs(5), &mut server.served)
        .await
        .expect("serve_grpc did not return after the grace period")
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= grace,
        "returned after {took:?}, before the grace period"
    );

    assert!(stuck_plaintext.await.unwrap().is_err());
    assert!(stuck_tls.await.unwrap().is_err());
}

#[tokio::test]
async fn pem_files_load_and_a_foreign_key_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let other_key = rcgen::KeyPair::generate().unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    let other_key_path = dir.path().join("other-key.pem");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    std::fs::write(&other_key_path, other_key.serialize_pem()).unwrap();

    let tls = TlsSettings::from_pem_files(&cert_path, &key_path).unwrap();
    assert_eq!(tls.certificate_chain(), [certified.cert.der().clone()]);
    let server = TestServer::start(Some(tls), ServeOptions::default()).await;
    let mut client = server
        .tls_client(
            trusting_client(&[certified.cert.der().clone()]),
            "localhost",
        )
        .await;
    assert!(change_log_level(&mut client, Level::Trace).await.is_ok());

    assert!(matches!(
        TlsSettings::from_pem_files(&cert_path, &other_key_path),
        Err(TlsSettingsError::Rejected(_))
    ));
    assert!(matches!(
        TlsSettings::from_pem_files(&key_path, &key_path),
        Err(TlsSettingsError::NoCertificates(_))
    ));
    assert!(matches!(
        TlsSettings::from_pem_files(&dir.path().join("missing.pem"), &key_path),
        Err(TlsSettingsError::ReadCertificates { .. })
    ));
}
