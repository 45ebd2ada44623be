//! What an idle HTTP/2 connection holds. The agent port keeps one connection per enrolled host,
//! mostly idle between heartbeats; the workspace's h2 (vendor/h2/PATCHES.md) takes its write,
//! read and HPACK buffers only while a frame is written or read. This test opens connections
//! over loopback, each with one open stream in each direction (as a long poll or a heartbeat
//! stream holds them), sends a message each way, lets them go idle after a keepalive ping (both
//! ends of the agent port ping every 30 s), and counts the bytes the heap holds for them, both
//! sides together, with dhat's allocator. With h2's buffers held for the connection's life that
//! is about 73 KB a connection; the limit is well under half of that. Then every connection
//! carries a frame larger than the write buffer each way, to show the buffers come back, and a
//! reader that keeps what it reads while small frames trickle in is checked not to pin a read
//! buffer per frame.
//!
//! One test in this file: the allocator and its counts are the whole process's.

use std::time::Duration;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const CONNECTIONS: usize = 200;
/// What one idle connection may hold, client and server together.
const LIMIT_PER_CONNECTION: usize = 20 * 1024;
/// Larger than the write buffer (16 KiB) and the read buffer (8 KiB).
const LARGE: usize = 100 * 1024;
/// Small frames sent one by one to a reader that keeps them (within one stream's window).
const TRICKLE_FRAMES: usize = 1_000;
/// What one kept 10-byte frame may cost: its chunk and the stream's queue entry, not a block.
const TRICKLE_LIMIT_PER_FRAME: usize = 1024;

/// The server's side of one stream, held open.
struct ServerStream {
    body: RecvStream,
    send: SendStream<Bytes>,
}

/// The client's side of one stream, held open, and its connection's pings.
struct ClientStream {
    send: SendStream<Bytes>,
    body: RecvStream,
    ping: h2::PingPong,
}

#[test]
fn an_idle_http2_connection_holds_no_frame_buffers() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (accepted_tx, mut accepted_rx) = mpsc::unbounded_channel::<ServerStream>();
    tokio::spawn(serve(listener, accepted_tx));

    // Warm up: one connection through every path, so that what the first use of a path
    // allocates once for the process (tracing's callsites, thread-locals) is not counted.
    let mut warm = vec![open(addr).await];
    let mut warm_server = vec![accepted_rx.recv().await.expect("accepted")];
    exchange(&mut warm, &mut warm_server, LARGE).await;
    settle(&mut warm).await;

    let _profiler = dhat::Profiler::builder().testing().build();
    let before = dhat::HeapStats::get().curr_bytes;

    let mut clients = Vec::with_capacity(CONNECTIONS);
    let mut servers = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        clients.push(open(addr).await);
        servers.push(accepted_rx.recv().await.expect("accepted"));
    }
    // A small message each way on every stream, as a heartbeat and its acknowledgement.
    exchange(&mut clients, &mut servers, 200).await;
    settle(&mut clients).await;

    let after = dhat::HeapStats::get().curr_bytes;
    let per_connection = after.saturating_sub(before) / CONNECTIONS;
    eprintln!(
        "{CONNECTIONS} idle connections hold {} bytes: {per_connection} bytes a connection \
         (client and server)",
        after.saturating_sub(before)
    );
    assert!(
        per_connection < LIMIT_PER_CONNECTION,
        "an idle connection holds {per_connection} bytes (limit {LIMIT_PER_CONNECTION}): \
         h2's frame buffers are held while idle again"
    );

    // The buffers come back when there is something to carry.
    exchange(&mut clients, &mut servers, LARGE).await;

    // A reader that keeps what it received while small frames trickle in, one read each: the
    // frames share the read buffer's block, as with the published crate (a block a frame would
    // hold 8 KiB for every 10 bytes sent).
    let before = dhat::HeapStats::get().curr_bytes;
    let held = trickle(&mut clients[0], &mut servers[0]).await;
    let grown = dhat::HeapStats::get().curr_bytes.saturating_sub(before);
    let per_frame = grown / TRICKLE_FRAMES;
    eprintln!("{TRICKLE_FRAMES} trickled frames held: {grown} bytes, {per_frame} a frame");
    assert!(
        per_frame < TRICKLE_LIMIT_PER_FRAME,
        "a held 10-byte frame costs {per_frame} bytes (limit {TRICKLE_LIMIT_PER_FRAME}): each \
         read takes a block of its own again"
    );
    drop(held);
}

/// Sends [`TRICKLE_FRAMES`] frames of 10 bytes from the client, each flushed on its own, and
/// keeps every chunk the server reads.
async fn trickle(client: &mut ClientStream, server: &mut ServerStream) -> Vec<Bytes> {
    let sender = async {
        for _ in 0..TRICKLE_FRAMES {
            send(&mut client.send, Bytes::from_static(b"0123456789")).await;
            tokio::time::sleep(Duration::from_micros(300)).await;
        }
    };
    let receiver = async {
        let mut held = Vec::new();
        let mut got = 0;
        while got < TRICKLE_FRAMES * 10 {
            let chunk = server
                .body
                .data()
                .await
                .expect("stream open")
                .expect("data");
            got += chunk.len();
            held.push(chunk);
        }
        held
    };
    let ((), held) = tokio::join!(sender, receiver);
    held
}

/// Accepts connections and hands over each connection's first stream.
async fn serve(listener: TcpListener, accepted: mpsc::UnboundedSender<ServerStream>) {
    loop {
        let (socket, _) = listener.accept().await.expect("accept");
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let mut connection = h2::server::handshake(socket).await.expect("handshake");
            if let Some(request) = connection.accept().await {
                let (request, mut respond) = request.expect("request");
                let response = http::Response::new(());
                let send = respond.send_response(response, false).expect("respond");
                let body = request.into_body();
                let _ = accepted.send(ServerStream { body, send });
            }
            // Drive the connection until the client goes.
            while let Some(request) = connection.accept().await {
                if request.is_err() {
                    break;
                }
            }
        });
    }
}

/// Opens a connection and a stream on it, held open both ways.
async fn open(addr: std::net::SocketAddr) -> ClientStream {
    let socket = TcpStream::connect(addr).await.expect("connect");
    let (client, mut connection) = h2::client::handshake(socket).await.expect("handshake");
    let ping = connection.ping_pong().expect("the connection's pings");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.expect("ready");
    let request = http::Request::post("http://localhost/stream")
        .body(())
        .expect("request");
    let (response, send) = client.send_request(request, false).expect("send request");
    let response = response.await.expect("response");
    ClientStream {
        send,
        body: response.into_body(),
        ping,
    }
}

/// Sends `len` bytes each way on every stream and reads them on the other side.
async fn exchange(clients: &mut [ClientStream], servers: &mut [ServerStream], len: usize) {
    let payload = Bytes::from(vec![7u8; len]);
    for (client, server) in clients.iter_mut().zip(servers.iter_mut()) {
        // Both at once: a message over the stream's flow-control window is read as it is sent.
        let (_, up, _, down) = tokio::join!(
            send(&mut client.send, payload.clone()),
            receive(&mut server.body, len),
            send(&mut server.send, payload.clone()),
            receive(&mut client.body, len),
        );
        assert_eq!((up, down), (len, len));
    }
}

async fn send(stream: &mut SendStream<Bytes>, payload: Bytes) {
    let len = payload.len();
    stream.reserve_capacity(len);
    let mut sent = 0;
    while sent < len {
        let capacity = std::future::poll_fn(|cx| stream.poll_capacity(cx))
            .await
            .expect("stream open")
            .expect("capacity");
        let take = capacity.min(len - sent);
        stream
            .send_data(payload.slice(sent..sent + take), false)
            .expect("send");
        sent += take;
    }
}

async fn receive(body: &mut RecvStream, len: usize) -> usize {
    let mut got = 0;
    while got < len {
        let chunk = body.data().await.expect("stream open").expect("data");
        got += chunk.len();
        body.flow_control()
            .release_capacity(chunk.len())
            .expect("release");
    }
    got
}

/// Lets every connection flush and acknowledge, pings each (a keepalive: what was read is long
/// consumed by then) and lets it go back to waiting.
async fn settle(clients: &mut [ClientStream]) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    for client in clients.iter_mut() {
        client.ping.ping(h2::Ping::opaque()).await.expect("pong");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
}
