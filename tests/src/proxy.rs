//! A TCP proxy between an agent and the server that a test can cut and heal, to play a host
//! that loses its network.
//!
//! [`TcpProxy::start`] listens on `127.0.0.1:0` and forwards every connection to `target`.
//! [`TcpProxy::cut`] drops every live connection and, until [`TcpProxy::heal`], closes each new
//! one as soon as it is accepted (the agent sees its calls fail, as with a lost network).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

struct Shared {
    cut: AtomicBool,
    live: Mutex<Vec<AbortHandle>>,
}

impl Shared {
    fn live(&self) -> std::sync::MutexGuard<'_, Vec<AbortHandle>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A proxy with its own runtime; stops (dropping every connection) on drop.
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TcpProxy {
    /// Starts forwarding `127.0.0.1:<port>` to `target`.
    pub fn start(target: SocketAddr) -> anyhow::Result<TcpProxy> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-proxy")
            .enable_all()
            .build()?;
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            cut: AtomicBool::new(false),
            live: Mutex::new(Vec::new()),
        });
        let s = Arc::clone(&shared);
        runtime.spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if s.cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(forward(inbound, target));
                let mut live = s.live();
                live.retain(|h| !h.is_finished());
                live.push(task.abort_handle());
            }
        });
        Ok(TcpProxy {
            addr,
            shared,
            runtime: Some(runtime),
        })
    }

    /// The address agents connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Drops every live connection and refuses new ones until [`TcpProxy::heal`].
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        for h in self.shared.live().drain(..) {
            h.abort();
        }
    }

    /// Lets connections through again.
    pub fn heal(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn forward(mut inbound: TcpStream, target: SocketAddr) {
    let Ok(mut outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream as StdStream;
    use std::time::Duration;

    use super::*;

    /// An echo server on a thread.
    fn echo() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut s = s;
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    fn roundtrip(s: &mut StdStream) -> std::io::Result<Vec<u8>> {
        s.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf)?;
        Ok(buf.to_vec())
    }

    #[test]
    fn forwards_cuts_and_heals() {
        let proxy = TcpProxy::start(echo()).unwrap();
        let mut a = StdStream::connect(proxy.addr()).unwrap();
        a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(roundtrip(&mut a).unwrap(), b"ping");
        proxy.cut();
        assert!(roundtrip(&mut a).is_err(), "a live connection is dropped");
        let mut b = StdStream::connect(proxy.addr()).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(roundtrip(&mut b).is_err(), "a new one is closed");
        proxy.heal();
        let mut c = StdStream::connect(proxy.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(roundtrip(&mut c).unwrap(), b"ping");
    }
}
