//! Accepting connections when the process runs out of file descriptors: back off, say so once.

use std::io;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// The first pause after a failed accept; doubles on each further failure in a row.
pub const ACCEPT_BACKOFF_INITIAL: Duration = Duration::from_millis(5);
/// Upper bound of the pause.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Failed accepts in a row on one port: how long to pause, and whether it was said.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    failures: u32,
    skipped: u64,
}

impl AcceptBackoff {
    /// A failed accept on `port` (`rest`, `agent`): logged on the first failure of a run only
    /// (with what to do when it is the file limit); returns how long to pause before the next
    /// accept.
    pub fn failed(&mut self, port: &'static str, e: &io::Error) -> Duration {
        if self.failures == 0 {
            let hint = if is_out_of_descriptors(e) {
                "the process is out of file descriptors (raise LimitNOFILE or `ulimit -n`); \
                 accepting is paused and retried, backing off up to 1 s"
            } else {
                "accepting is paused and retried, backing off up to 1 s"
            };
            tracing::warn!(port, error = %e, "accepting a connection failed: {hint}");
        } else {
            self.skipped += 1;
        }
        self.failures = self.failures.saturating_add(1);
        let factor = 1u32
            .checked_shl(self.failures.saturating_sub(1))
            .unwrap_or(u32::MAX);
        ACCEPT_BACKOFF_INITIAL
            .saturating_mul(factor)
            .min(ACCEPT_BACKOFF_MAX)
    }

    /// An accept succeeded: a run of failures ends (and is summed up once).
    pub fn accepted(&mut self, port: &'static str) {
        if self.failures > 0 {
            tracing::info!(port, failed = self.failures, "accepting connections again");
        }
        self.failures = 0;
        self.skipped = 0;
    }
}

/// Linux error numbers of a process (`EMFILE`) or system (`ENFILE`) out of file descriptors,
/// and of a system out of socket memory (`ENOBUFS`, `ENOMEM`).
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;
const ENOBUFS: i32 = 105;
const ENOMEM: i32 = 12;

/// Whether `e` says the process or system has no file descriptor (or socket memory) left.
pub fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM))
}

/// How many connections the kernel may complete before they are accepted (capped by
/// `net.core.somaxconn`). A burst larger than the queue has its handshakes dropped and retried
/// by the clients a second or more later.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `addr` with a queue of [`LISTEN_BACKLOG`] (binding as `TcpListener::bind`
/// does, with `SO_REUSEADDR`).
pub fn listen(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts the next connection on `listener`, pausing with `backoff` after failures instead of
/// retrying at once; never returns an error.
pub async fn accept(
    listener: &TcpListener,
    backoff: &mut AcceptBackoff,
    port: &'static str,
) -> (TcpStream, std::net::SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => {
                backoff.accepted(port);
                return accepted;
            }
            Err(e) => {
                let pause = backoff.failed(port, &e);
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// The connections of `listener` as a stream (for the agent port's gRPC server), with Nagle's
/// algorithm off and failed accepts backed off.
pub fn incoming(
    listener: TcpListener,
    port: &'static str,
) -> impl futures::Stream<Item = io::Result<TcpStream>> + Send + 'static {
    futures::stream::unfold(
        (listener, AcceptBackoff::default()),
        move |(listener, mut backoff)| async move {
            let (stream, _) = accept(&listener, &mut backoff, port).await;
            let _ = stream.set_nodelay(true);
            Some((Ok(stream), (listener, backoff)))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_and_a_success_resets() {
        let mut b = AcceptBackoff::default();
        let emfile = io::Error::from_raw_os_error(EMFILE);
        assert!(is_out_of_descriptors(&emfile));
        let pauses: Vec<Duration> = (0..12).map(|_| b.failed("agent", &emfile)).collect();
        assert_eq!(pauses[0], ACCEPT_BACKOFF_INITIAL);
        assert_eq!(pauses[1], ACCEPT_BACKOFF_INITIAL * 2);
        assert!(pauses.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*pauses.last().unwrap(), ACCEPT_BACKOFF_MAX);
        b.accepted("agent");
        assert_eq!(b.failed("agent", &emfile), ACCEPT_BACKOFF_INITIAL);
        assert!(!is_out_of_descriptors(&io::Error::from(
            io::ErrorKind::ConnectionAborted
        )));
    }
}
