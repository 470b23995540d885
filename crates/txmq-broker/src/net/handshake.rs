//! From an accepted TCP connection to one ready for HTTP/2: telling TLS from plaintext by the
//! first byte, the TLS handshake, and the client's HTTP/2 connection preface.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::TlsAcceptor;

/// Content type of a TLS record carrying a handshake message; a ClientHello starts with it.
/// No HTTP/2 connection can: its preface starts with `P`.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The client connection preface that opens every HTTP/2 connection (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Why a connection was dropped before HTTP/2 was served on it.
#[derive(Debug, thiserror::Error)]
pub(super) enum HandshakeError {
    #[error("client closed the connection during the handshake")]
    Closed,
    #[error("client started a TLS handshake, but TLS is not enabled")]
    TlsDisabled,
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("client is not speaking HTTP/2 (no connection preface)")]
    NotHttp2,
    #[error("reading the handshake: {0}")]
    Io(io::Error),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// Anything a connection can run over: a TCP stream or a TLS stream on one.
trait Transport: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Transport for T {}

/// A connection whose client has sent the full HTTP/2 preface.
///
/// The preface was consumed to check it; reads hand it out again first, so the HTTP/2 server
/// sees the connection from its first byte.
pub(super) struct Established {
    transport: Box<dyn Transport>,
    unread_preface: &'static [u8],
    tls: bool,
}

impl Established {
    /// Whether the connection runs over TLS.
    pub(super) fn is_tls(&self) -> bool {
        self.tls
    }
}

/// Takes `stream` through TLS (if its first byte says so and `tls` is set) and the HTTP/2
/// preface.
///
/// Returns as soon as the client is seen to be neither TLS nor HTTP/2, so garbage is dropped
/// without waiting. It waits on the client, so callers bound it with a timeout; cancelling it
/// drops the connection.
pub(super) async fn establish(
    stream: TcpStream,
    tls: Option<&TlsAcceptor>,
) -> Result<Established, HandshakeError> {
    let mut first = [0_u8; 1];
    if stream.peek(&mut first).await? == 0 {
        return Err(HandshakeError::Closed);
    }
    let is_tls = first[0] == TLS_HANDSHAKE_RECORD;
    let mut transport: Box<dyn Transport> = if is_tls {
        let acceptor = tls.ok_or(HandshakeError::TlsDisabled)?;
        Box::new(acceptor.accept(stream).await.map_err(HandshakeError::Tls)?)
    } else {
        Box::new(stream)
    };
    read_preface(&mut transport).await?;
    Ok(Established {
        transport,
        unread_preface: PREFACE,
        tls: is_tls,
    })
}

/// Reads the HTTP/2 preface, failing at the first byte that differs from it.
async fn read_preface(transport: &mut (impl AsyncRead + Unpin)) -> Result<(), HandshakeError> {
    let mut received = [0_u8; PREFACE.len()];
    let mut len = 0;
    while len < PREFACE.len() {
        let n = transport.read(&mut received[len..]).await?;
        if n == 0 {
            return Err(HandshakeError::Closed);
        }
        len += n;
        if received[..len] != PREFACE[..len] {
            return Err(HandshakeError::NotHttp2);
        }
    }
    Ok(())
}

impl AsyncRead for Established {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.unread_preface.is_empty() {
            let n = self.unread_preface.len().min(buf.remaining());
            buf.put_slice(&self.unread_preface[..n]);
            self.unread_preface = &self.unread_preface[n..];
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.transport).poll_read(cx, buf)
    }
}

impl AsyncWrite for Established {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.transport).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.transport).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.transport.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.transport).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.transport).poll_shutdown(cx)
    }
}
