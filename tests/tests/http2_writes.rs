//! How many writes a small HTTP/2 response takes. A gRPC answer is a HEADERS frame, a DATA frame
//! of a few hundred bytes and a trailing HEADERS frame, all handed to h2 at once; the
//! workspace's h2 (vendor/h2/PATCHES.md) copies DATA payloads smaller than 4 KiB into its write
//! buffer, so the three leave in one write. As published, h2 chains any payload of 256 bytes or
//! more (1 KiB without vectored writes) and must write it before buffering the trailers: two
//! writes (three without vectored writes), and under TLS two records, for every long poll the
//! control plane answers.
//!
//! The connection runs over an in-memory pipe that counts the writes of the server's side, on a
//! single-threaded runtime, so nothing polls the connection between the three frames.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

/// One end of the pipe, counting the writes made through it.
struct Counted {
    inner: DuplexStream,
    writes: Arc<AtomicUsize>,
    vectored: bool,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.writes.fetch_add(1, Ordering::SeqCst);
        }
        r
    }

    /// One write for all the slices, as `writev` is one system call.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let joined: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        self.poll_write(cx, &joined)
    }

    fn is_write_vectored(&self) -> bool {
        self.vectored
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The server's writes for one response of `payload` bytes with trailers, sent in one go.
async fn writes_for_one_response(payload: usize, vectored: bool) -> usize {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let writes = Arc::new(AtomicUsize::new(0));
    let server_io = Counted {
        inner: server_io,
        writes: writes.clone(),
        vectored,
    };
    let (measured_tx, measured_rx) = tokio::sync::oneshot::channel::<usize>();
    let server = {
        let writes = writes.clone();
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io)
                .await
                .expect("server handshake");
            let mut measured_tx = Some(measured_tx);
            let mut served = 0;
            while let Some(accepted) = conn.accept().await {
                let (_request, mut respond) = accepted.expect("request");
                served += 1;
                // The second request is measured; the first settles the connection.
                let before = writes.load(Ordering::SeqCst);
                let response = http::Response::builder()
                    .status(200)
                    .header("content-type", "application/grpc")
                    .body(())
                    .expect("response");
                let mut send = respond.send_response(response, false).expect("headers");
                send.reserve_capacity(payload);
                send.send_data(Bytes::from(vec![7u8; payload]), false)
                    .expect("data");
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                send.send_trailers(trailers).expect("trailers");
                if served == 2
                    && let Some(tx) = measured_tx.take()
                {
                    let _ = tx.send(before);
                }
            }
        })
    };
    let (mut client, conn) = h2::client::handshake(client_io)
        .await
        .expect("client handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut after = 0;
    for round in 0..2 {
        let request = http::Request::builder()
            .method("POST")
            .uri("http://localhost/clusterclaw.agent.v1.AgentService/WatchAssignments")
            .body(())
            .expect("request");
        let (response, _) = client.send_request(request, true).expect("send request");
        let mut body = response.await.expect("response").into_body();
        let mut got = 0;
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("data");
            got += chunk.len();
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        assert_eq!(got, payload, "payload received");
        let trailers = body.trailers().await.expect("trailers");
        assert!(trailers.is_some(), "trailers received");
        if round == 1 {
            // Whatever the server still had to write for this response is written by now.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            after = writes.load(Ordering::SeqCst);
        }
    }
    let before = measured_rx.await.expect("measured");
    drop(client);
    server.abort();
    after - before
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn a_small_response_and_its_trailers_leave_in_one_write() {
    let rt = runtime();
    // 300 bytes: over the published crate's 256-byte threshold with vectored writes (as the
    // server's TLS stream), 1,500 over its 1 KiB one without; 4,095 the largest copied.
    for (payload, vectored) in [
        (300, true),
        (300, false),
        (1_500, true),
        (1_500, false),
        (4_095, true),
    ] {
        let writes = rt.block_on(writes_for_one_response(payload, vectored));
        assert_eq!(
            writes, 1,
            "a response of {payload} bytes (vectored writes: {vectored}) took {writes} writes"
        );
    }
}

#[test]
fn a_response_of_4_kib_or_more_is_chained_and_its_trailers_wait() {
    let rt = runtime();
    // From 4 KiB on the payload is chained as before: the buffer (the headers, the frame's head
    // and the payload's first bytes) and the rest of the payload in one vectored write, then the
    // trailers. Checked so that the threshold stays where it is said to be.
    let writes = rt.block_on(writes_for_one_response(8 * 1024, true));
    assert!(
        writes >= 2,
        "a response of 8 KiB took {writes} writes: it was copied whole"
    );
}
