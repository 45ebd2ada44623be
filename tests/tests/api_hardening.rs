//! End to end: the real `clusterclaw` server cannot be starved by idle or slow connections (even
//! started with a soft limit of 1,024 open files), and refuses slow bodies, endless bodies, alias
//! bombs and oversized label maps cheaply.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::Context;
use clusterclaw_tests::agent::{TestAgent, join_token, percentile, rss_bytes, wait_host_ready};
use clusterclaw_tests::docker_available;
use clusterclaw_tests::server::TestServer;
use serde_json::{Value, json};

/// Idle sockets held open against the API: twice the soft limit the server starts with.
const IDLE_SOCKETS: usize = 2_000;
/// Sockets that send part of a request's headers, and ones that send 3 bytes of a body.
const PARTIAL_HEADERS: usize = 50;
const SLOW_BODIES: usize = 50;
/// The soft limit on open files the server starts with (a service manager's usual default).
const SOFT_NOFILE: u64 = 1_024;
/// Calls of `GET /api/v1/tenants` measured while the sockets are held.
const CALLS: usize = 100;
/// The server's header-read timeout and body stall timeout (`api::serve::HEADER_READ_TIMEOUT`,
/// `api::body::BODY_STALL_TIMEOUT`).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a test waits for the server to close a connection it should close.
const CLOSE_WAIT: Duration = Duration::from_secs(40);

fn api_addr(server: &TestServer) -> String {
    server
        .api_url()
        .strip_prefix("http://")
        .expect("a plain HTTP API")
        .to_string()
}

/// Soft and hard `Max open files` of a process, from /proc.
fn nofile_limits(pid: u32) -> anyhow::Result<(u64, u64)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no open-files line in /proc/PID/limits")?;
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    anyhow::ensure!(numbers.len() >= 2, "odd limits line: {line}");
    Ok((numbers[0], numbers[1]))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// One request on a new connection; the answer's status, its body, and how long it took.
fn raw_request(addr: &str, request: &str) -> anyhow::Result<(u16, String, Duration)> {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(request.as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .context("the server did not answer within 5 s")?;
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP answer: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body, took))
}

fn get_tenants(addr: &str, token: &str) -> anyhow::Result<(u16, Duration)> {
    let (status, _, took) = raw_request(
        addr,
        &format!(
            "GET /api/v1/tenants HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        ),
    )?;
    Ok((status, took))
}

/// Reads until the server closes; what came before the end.
fn read_to_close(s: &mut TcpStream) -> anyhow::Result<String> {
    s.set_read_timeout(Some(CLOSE_WAIT))?;
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => return Err(e).context("the server did not close the connection"),
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn agent_port(server: &TestServer) -> u16 {
    server
        .endpoints()
        .agent
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("the agent port")
}

fn host_phase(server: &TestServer, host: &str) -> Value {
    server.get_json(&format!("/api/v1/hosts/{host}"))["status"]["phase"].clone()
}

#[test]
fn two_thousand_idle_sockets_do_not_starve_the_api() -> anyhow::Result<()> {
    // This test itself holds more than 2,000 sockets.
    clusterclaw_agent::rlimit::raise_nofile()?;
    let server = TestServer::start_with_soft_nofile(SOFT_NOFILE)?;
    let pid = server.pid().context("the server runs")?;
    let (soft, hard) = nofile_limits(pid)?;
    assert_eq!(
        soft, hard,
        "the server raises its soft limit ({SOFT_NOFILE} at start) to the hard limit"
    );
    assert!(
        server
            .log()
            .contains("raised the open-files limit (RLIMIT_NOFILE) to the hard limit"),
        "{}",
        server.log()
    );
    let addr = api_addr(&server);
    let token = server.admin_token().to_string();

    // An agent enrolled before the flood (its container engine is the machine's Docker; it
    // runs no container here).
    let docker = docker_available()?;
    let mut first = None;
    if docker {
        let join = join_token(&server, 2, "10m");
        let mut agent = TestAgent::enroll(&server, agent_port(&server), &join, &[])?;
        let host = agent.wait_enrolled()?;
        wait_host_ready(&server, &host)?;
        first = Some((agent, host, join));
    }

    let opened = Instant::now();
    let mut idle = Vec::with_capacity(IDLE_SOCKETS);
    for _ in 0..IDLE_SOCKETS {
        idle.push(TcpStream::connect(&addr)?);
    }
    let mut partial = Vec::with_capacity(PARTIAL_HEADERS);
    for _ in 0..PARTIAL_HEADERS {
        let mut s = TcpStream::connect(&addr)?;
        s.write_all(b"GET /api/v1/tenants HTTP/1.1\r\nHost: x\r\nAuthor")?;
        partial.push(s);
    }
    let mut slow = Vec::with_capacity(SLOW_BODIES);
    for _ in 0..SLOW_BODIES {
        let mut s = TcpStream::connect(&addr)?;
        s.write_all(
            format!(
                "POST /api/v1/tenants HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{{\"m"
            )
            .as_bytes(),
        )?;
        slow.push(s);
    }

    // A host enrolls while the sockets are held: the agent port still accepts.
    let mut second = None;
    if let Some((_, _, join)) = &first {
        second = Some(TestAgent::enroll(&server, agent_port(&server), join, &[])?);
    }

    // Every call on a new connection, so that each needs the server to accept one more.
    let mut took = Vec::with_capacity(CALLS);
    for i in 0..CALLS {
        let (status, t) = get_tenants(&addr, &token)
            .with_context(|| format!("call {i} with {IDLE_SOCKETS} idle sockets open"))?;
        assert_eq!(status, 200, "call {i}");
        took.push(t);
    }
    let measured_within = opened.elapsed();
    took.sort();
    let (p50, max) = (percentile(&took, 0.5), took[took.len() - 1]);
    eprintln!(
        "GET /api/v1/tenants with {IDLE_SOCKETS} idle sockets open: p50 {p50:?}, max {max:?} ({CALLS} calls, done {measured_within:?} after opening them)"
    );
    assert!(
        measured_within < HEADER_READ_TIMEOUT,
        "the calls took {measured_within:?}, past the header timeout that frees the sockets; the measure says nothing"
    );
    assert!(p50 < Duration::from_millis(100), "p50 {p50:?}");
    assert!(max < Duration::from_secs(2), "max {max:?}");

    if let (Some((_, first_host, _)), Some(agent)) = (&first, &mut second) {
        let host = agent.wait_enrolled()?;
        let enrolled_within = opened.elapsed();
        assert!(
            enrolled_within < HEADER_READ_TIMEOUT,
            "a host took {enrolled_within:?} to enroll with the sockets held"
        );
        assert_eq!(host_phase(&server, first_host), json!("Ready"));
        wait_host_ready(&server, &host)?;
    }

    // The server closes what sends nothing, or a request's headers too slowly, once the header
    // timeout is over; and answers a stalled body 408.
    for (i, s) in idle.iter_mut().enumerate() {
        let got = read_to_close(s).with_context(|| format!("idle socket {i}"))?;
        assert_eq!(got, "", "idle socket {i}");
        if i == 0 {
            let closed_after = opened.elapsed();
            assert!(
                closed_after >= HEADER_READ_TIMEOUT - Duration::from_secs(1),
                "closed after {closed_after:?}, before the header timeout"
            );
        }
    }
    for (i, s) in partial.iter_mut().enumerate() {
        let got = read_to_close(s).with_context(|| format!("partial-header socket {i}"))?;
        assert!(!got.contains(" 200 "), "partial-header socket {i}: {got}");
    }
    for (i, s) in slow.iter_mut().enumerate() {
        let got = read_to_close(s).with_context(|| format!("slow-body socket {i}"))?;
        assert!(
            got.starts_with("HTTP/1.1 408"),
            "slow-body socket {i}: {got}"
        );
        assert!(got.contains("\"code\":\"RequestTimeout\""), "{got}");
    }
    drop((idle, partial, slow));
    let fds = open_fds(pid);
    assert!(fds < 200, "the server still holds {fds} file descriptors");

    if let Some((_, host, _)) = &first {
        assert_eq!(host_phase(&server, host), json!("Ready"));
    }
    Ok(())
}

#[test]
fn stalled_endless_and_exploding_bodies_are_refused_cheaply() -> anyhow::Result<()> {
    let server = TestServer::start()?;
    let addr = api_addr(&server);
    let token = server.admin_token().to_string();
    let pid = server.pid().context("the server runs")?;

    // A body that stops after 3 of 1,000 announced bytes: 408 once it stalled.
    let started = Instant::now();
    let mut s = TcpStream::connect(&addr)?;
    s.write_all(
        format!(
            "POST /api/v1/tenants HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"m"
        )
        .as_bytes(),
    )?;
    let text = read_to_close(&mut s)?;
    let status: u16 = text.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    assert_eq!(status, 408, "{body}");
    let v: Value = serde_json::from_str(&body)?;
    assert_eq!(v["code"], "RequestTimeout");
    assert_eq!(
        v["message"],
        "the request body came too slowly: 3 bytes of the 1000 announced arrived, then nothing for 10 s; send the body without pausing"
    );
    assert!(started.elapsed() >= BODY_STALL_TIMEOUT);

    // A chunked body without end: refused once past the limit (1 MiB here), without the
    // server reading the rest.
    let mut s = TcpStream::connect(&addr)?;
    s.write_all(
        format!(
            "POST /api/v1/tenants HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .as_bytes(),
    )?;
    let mut reader = s.try_clone()?;
    const CHUNK: usize = 64 << 10;
    const MOST: usize = 256 << 20;
    let writer = std::thread::spawn(move || {
        let mut chunk = format!("{CHUNK:x}\r\n").into_bytes();
        chunk.extend(std::iter::repeat_n(b' ', CHUNK));
        chunk.extend(b"\r\n");
        let mut sent = 0;
        while sent < MOST && s.write_all(&chunk).is_ok() {
            sent += CHUNK;
        }
        sent
    });
    let answer = read_to_close(&mut reader)?;
    let sent = writer.join().expect("the writer thread");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("larger than the limit of 1 MiB"),
        "{answer}"
    );
    assert!(
        sent < MOST,
        "the server read all {sent} bytes of an endless body"
    );

    // A 1.3 KB alias bomb: refused before anything is expanded.
    let mut bomb = String::from(
        "apiVersion: clusterclaw.io/v1\nkind: Tenant\nmetadata: {name: bomb}\nx0: &x0 [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for i in 1..9 {
        let p = i - 1;
        bomb.push_str(&format!(
            "x{i}: &x{i} [*x{p},*x{p},*x{p},*x{p},*x{p},*x{p},*x{p},*x{p},*x{p}]\n"
        ));
    }
    assert!(bomb.len() < 1400, "{}", bomb.len());
    let before = rss_bytes(pid)?;
    let started = Instant::now();
    let r = server.http("POST", "/api/v1/apply", Some(&bomb), Some(&token));
    let took = started.elapsed();
    let grown = rss_bytes(pid)?.saturating_sub(before);
    eprintln!("alias bomb refused in {took:?}; server RSS grew by {grown} bytes");
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(
        r.json()["message"],
        "the YAML body is refused: its aliases (*name) would expand it to more than 4 MiB; write the values out instead"
    );
    assert!(grown < 32 << 20, "the server grew by {grown} bytes");
    let r = server.http("GET", "/api/v1/tenants/bomb", None, Some(&token));
    assert_eq!(r.status, 404, "nothing was applied: {}", r.body);

    // The CLI reads YAML with the same limits.
    let file = server.write_file("bomb.yaml", &bomb);
    let out = server.cli(&["apply", "-f", file.to_str().expect("a UTF-8 path")]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr
            .contains("aliases (*name) would expand it to more than 4 MiB"),
        "{}",
        out.stderr
    );
    Ok(())
}

#[test]
fn label_maps_are_bounded() {
    let server = TestServer::start().expect("a server");
    let labels: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    let tenant = json!({
        "apiVersion": "clusterclaw.io/v1",
        "kind": "Tenant",
        "metadata": {"name": "many-labels", "labels": labels},
    });
    let index = server.index();
    let r = server.http(
        "POST",
        "/api/v1/tenants",
        Some(&tenant.to_string()),
        Some(server.admin_token()),
    );
    assert_eq!(r.status, 422, "{}", r.body);
    let v = r.json();
    assert_eq!(
        v["details"],
        json!([{"field": "metadata.labels", "problem": "has 65 labels; at most 64 are allowed"}])
    );
    assert_eq!(server.index(), index, "nothing was written");
}
