//! A `clusterclaw` command that streams (`logs -f`, `get KIND -w`) running in the background
//! against a test server: its stdout is read line by line on a thread into a channel, every
//! line read is kept in `seen`, and the process is killed when the value is dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::server::{TestServer, clusterclaw_bin};

/// How long a wait lasts unless told otherwise.
pub const STREAM_WAIT: Duration = Duration::from_secs(120);

/// A streaming `clusterclaw` child.
pub struct StreamingCli {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line read so far, in order.
    pub seen: Vec<String>,
}

impl StreamingCli {
    /// Runs `clusterclaw ARGS` with the server's admin token.
    pub fn start(server: &TestServer, args: &[&str]) -> anyhow::Result<StreamingCli> {
        Self::start_as(server, server.admin_token(), args)
    }

    /// Runs `clusterclaw ARGS` with `token`, with an environment of its own (a config file in
    /// the server's scratch directory, no setting inherited but `PATH`).
    pub fn start_as(
        server: &TestServer,
        token: &str,
        args: &[&str],
    ) -> anyhow::Result<StreamingCli> {
        let mut child = Command::new(clusterclaw_bin()?)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "CLUSTERCLAW_CONFIG",
                server.scratch_dir().join("stream-cli-config.toml"),
            )
            .env("CLUSTERCLAW_SERVER", server.api_url())
            .env("CLUSTERCLAW_TOKEN", token)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start clusterclaw {args:?}"))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(StreamingCli {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    /// Waits up to [`STREAM_WAIT`] for a line matching `want`; returns it.
    pub fn wait_line(&mut self, what: &str, want: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        self.wait_line_within(what, STREAM_WAIT, want)
    }

    /// Waits up to `limit` for a line matching `want`; returns it.
    pub fn wait_line_within(
        &mut self,
        what: &str,
        limit: Duration,
        want: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if want(&line) {
                        return Ok(line);
                    }
                }
                Err(_) => bail!(
                    "no {what} within {limit:?}; last lines: {:?}",
                    self.seen.iter().rev().take(10).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Waits for a line matching `want` among those seen from index `from` on (earlier waits
    /// may already have passed it), then among those to come; returns it.
    pub fn wait_line_since(
        &mut self,
        from: usize,
        what: &str,
        want: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        if let Some(line) = self.seen.iter().skip(from).find(|l| want(l)) {
            return Ok(line.clone());
        }
        self.wait_line(what, want)
    }

    /// Waits up to [`STREAM_WAIT`] for the command to end, reading its output meanwhile (so it
    /// never blocks on a full pipe).
    pub fn wait_exit(&mut self) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + STREAM_WAIT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                while let Ok(line) = self.lines.try_recv() {
                    self.seen.push(line);
                }
                return Ok(status);
            }
            while let Ok(line) = self.lines.try_recv() {
                self.seen.push(line);
            }
            ensure!(
                Instant::now() < deadline,
                "the command did not end within {STREAM_WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for StreamingCli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
