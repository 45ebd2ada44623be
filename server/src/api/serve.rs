//! Serving the router over a bound listener, as HTTP or HTTPS, with a draining shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// How long in-flight requests may take to finish once shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a new connection may take to deliver the headers of its first request, counted
/// from the accept (a TLS handshake included). Over HTTP/1.1 the same bound applies to the
/// headers of every later request, counted from the previous response, so an idle keep-alive
/// connection is closed after this long too.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TLS handshake may take (it counts toward [`HEADER_READ_TIMEOUT`] as well).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = HEADER_READ_TIMEOUT;
/// How long a connection may stay open with no request in progress after its first one (the
/// keep-alive timeout of HTTP/2 connections; HTTP/1.1 ones hit [`HEADER_READ_TIMEOUT`] first).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection being closed for idleness gets to say goodbye (an HTTP/2 GOAWAY).
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A rustls server configuration (ring, TLS 1.2 and 1.3, HTTP/2 and HTTP/1.1) from PEM files.
pub fn tls_server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read the certificate {}: {e}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM certificate chain: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no certificate (expected PEM 'BEGIN CERTIFICATE' blocks)",
            cert.display()
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read a PEM private key from {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| {
            format!(
                "{} and {} do not make a usable pair: {e}",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `app` on `listener` until `shutdown` completes; then stops accepting, lets requests
/// in flight finish for up to `grace`, and closes what is left.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> io::Result<()> {
    let acceptor = tls.map(TlsAcceptor::from);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    // Failed accepts (out of file descriptors) pause and back off, logged once per run.
    let mut backoff = crate::accept::AcceptBackoff::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            (stream, peer) = crate::accept::accept(&listener, &mut backoff, "rest") => {
                let _ = stream.set_nodelay(true);
                let activity = Activity::new();
                conns.spawn(connection(stream, peer, app.clone(), acceptor.clone(), activity, stop_rx.clone()));
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let open = conns.len();
    if open > 0 {
        tracing::info!(connections = open, grace = ?grace, "draining open connections");
    }
    let drained =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            connections = conns.len(),
            "closing connections still busy after the grace period"
        );
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
    Ok(())
}

/// Completes once shutdown has been signalled (or the signal is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    tls: Option<TlsAcceptor>,
    activity: Activity,
    mut stop: watch::Receiver<bool>,
) {
    match tls {
        None => drive(TokioIo::new(stream), peer, app, activity, stop).await,
        Some(acceptor) => {
            let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
            let stream = tokio::select! {
                r = handshake => match r {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
                () = stopped(&mut stop) => return,
            };
            drive(TokioIo::new(stream), peer, app, activity, stop).await
        }
    }
}

/// What a connection's watchdog knows: how many requests are in progress (until their
/// response bodies are sent), whether one has been seen, and when the count last changed.
#[derive(Clone)]
struct Activity(Arc<std::sync::Mutex<ActivityState>>);

struct ActivityState {
    in_flight: usize,
    seen_request: bool,
    since: tokio::time::Instant,
}

/// Counts a request as in progress for as long as it lives (it travels with the response body).
struct InFlight(Activity);

impl Activity {
    fn new() -> Activity {
        Activity(Arc::new(std::sync::Mutex::new(ActivityState {
            in_flight: 0,
            seen_request: false,
            since: tokio::time::Instant::now(),
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn begin(&self) -> InFlight {
        let mut s = self.lock();
        s.in_flight += 1;
        s.seen_request = true;
        s.since = tokio::time::Instant::now();
        InFlight(self.clone())
    }

    /// When the connection is due to be closed if nothing happens meanwhile; `None` while a
    /// request is in progress (its body has a timeout of its own).
    fn idle_deadline(&self) -> Option<tokio::time::Instant> {
        let s = self.lock();
        if s.in_flight > 0 {
            return None;
        }
        let limit = if s.seen_request {
            IDLE_TIMEOUT
        } else {
            HEADER_READ_TIMEOUT
        };
        Some(s.since + limit)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        s.since = tokio::time::Instant::now();
    }
}

/// A response body that keeps its request counted as in progress until it has been sent.
struct TrackedBody {
    inner: axum::body::Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for TrackedBody {
    type Data = hyper::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Completes when the connection has had no request in progress for longer than allowed:
/// [`HEADER_READ_TIMEOUT`] before its first request (a client that connects and sends nothing,
/// or sends its headers slowly), [`IDLE_TIMEOUT`] after one.
async fn idle_expired(activity: &Activity) {
    loop {
        match activity.idle_deadline() {
            Some(deadline) if deadline <= tokio::time::Instant::now() => return,
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            // Look again later: the request may end at any time.
            None => tokio::time::sleep(HEADER_READ_TIMEOUT).await,
        }
    }
}

async fn drive<I>(
    io: TokioIo<I>,
    peer: SocketAddr,
    app: Router,
    activity: Activity,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    // Handlers and the audit log see the client's address; every request counts as in
    // progress until its response body has been sent.
    let tracked = activity.clone();
    let app = tower::service_fn(move |mut req: axum::http::Request<hyper::body::Incoming>| {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let in_flight = tracked.begin();
        let app = app.clone();
        async move {
            let resp = tower::ServiceExt::oneshot(app, req).await?;
            Ok::<_, std::convert::Infallible>(resp.map(|inner| {
                axum::body::Body::new(TrackedBody {
                    inner,
                    _in_flight: in_flight,
                })
            }))
        }
    });
    let conn = builder.serve_connection(io, TowerToHyperService::new(app));
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        () = idle_expired(&activity) => {
            tracing::debug!(%peer, "closing an idle connection");
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(IDLE_CLOSE_GRACE, conn).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn https_round_trip_and_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let files = crate::pki::init_dir(dir.path(), &["localhost".into()]).unwrap();
        let tls = tls_server_config(&files.server_cert, &files.server_key).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/hello", get(|| async { "hi" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            app,
            Some(tls),
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(1),
        ));

        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&files.ca_cert).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls_stream = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        tls_stream
            .write_all(b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = tls_stream.read_to_end(&mut out).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("hi"), "{out}");

        // Plain HTTP on the TLS port gets nowhere.
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = plain.read_to_end(&mut buf).await;
        assert!(!String::from_utf8_lossy(&buf).contains("hi"));

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    /// Serves `app` over plain HTTP on 127.0.0.1; returns the address and the stop switch.
    async fn plain_server(app: Router) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(
            listener,
            app,
            None,
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(1),
        ));
        (addr, stop)
    }

    /// Reads until the server closes the connection; returns what came and when it closed.
    async fn read_until_closed(s: &mut TcpStream) -> (String, tokio::time::Instant) {
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        (
            String::from_utf8_lossy(&out).into_owned(),
            tokio::time::Instant::now(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
        let (addr, _stop) = plain_server(Router::new().route("/", get(|| async { "hi" }))).await;
        let start = tokio::time::Instant::now();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let (out, closed) = read_until_closed(&mut silent).await;
        assert_eq!(out, "");
        let after = closed - start;
        assert!(
            after >= HEADER_READ_TIMEOUT && after < HEADER_READ_TIMEOUT + Duration::from_secs(2),
            "closed after {after:?}"
        );

        // Headers sent a byte at a time, slower than the timeout allows, meet the same end.
        let start = tokio::time::Instant::now();
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let mut closed_early = false;
        for b in b"GET / HTTP/1.1\r\nHost: x\r\n".iter() {
            if slow.write_all(&[*b]).await.is_err() {
                closed_early = true;
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let (out, closed) = read_until_closed(&mut slow).await;
        assert!(!out.contains("200"), "{out}");
        assert!(
            closed - start <= HEADER_READ_TIMEOUT + Duration::from_secs(3),
            "closed after {:?} (noticed while writing: {closed_early})",
            closed - start
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keep_alive_connections_are_closed_but_slow_requests_are_not() {
        let app = Router::new().route("/", get(|| async { "hi" })).route(
            "/slow",
            get(|| async {
                tokio::time::sleep(IDLE_TIMEOUT * 3).await;
                "done"
            }),
        );
        let (addr, _stop) = plain_server(app).await;

        // One request, then nothing: the connection closes once the next request's headers
        // are overdue.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answered = tokio::time::Instant::now();
        let (out, closed) = read_until_closed(&mut s).await;
        assert!(
            out.starts_with("HTTP/1.1 200") && out.ends_with("hi"),
            "{out}"
        );
        assert!(
            closed - answered <= IDLE_TIMEOUT + Duration::from_secs(1),
            "closed after {:?}",
            closed - answered
        );

        // A request that takes longer than every timeout is answered all the same.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let (out, _) = read_until_closed(&mut s).await;
        assert!(
            out.starts_with("HTTP/1.1 200") && out.ends_with("done"),
            "{out}"
        );
    }

    #[test]
    fn bad_tls_files_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        std::fs::write(&cert, "not a cert").unwrap();
        let e = tls_server_config(&cert, &dir.path().join("k.pem")).unwrap_err();
        assert!(e.contains("holds no certificate"), "{e}");
        let files = crate::pki::init_dir(&dir.path().join("pki"), &["localhost".into()]).unwrap();
        let e = tls_server_config(&files.server_cert, &files.ca_key).unwrap_err();
        assert!(e.contains("do not make a usable pair"), "{e}");
    }
}
