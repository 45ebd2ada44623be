//! `clusterclaw server` speaks the service manager's notification protocol: READY=1 only once
//! both ports accept connections, watchdog pings while it runs, STOPPING=1 on SIGTERM.

use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn receive(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("no notification from the server in time");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_after_binding_watchdog_pings_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&socket_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();

    let mut server = Command::new(env!("CARGO_BIN_EXE_clusterclaw"))
        .args(["server", "--api-listen", "127.0.0.1:0"])
        .args(["--agent-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("NOTIFY_SOCKET", &socket_path)
        // A 600 ms watchdog: a ping every 200 ms.
        .env("WATCHDOG_USEC", "600000")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let ready = receive(&sock);
    let lines: Vec<&str> = ready.lines().collect();
    assert!(lines.contains(&"READY=1"), "{ready:?}");
    let status = lines
        .iter()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS in {ready:?}"));
    // STATUS=API http://127.0.0.1:PORT, agent port 127.0.0.1:PORT
    let api = status
        .strip_prefix("API http://")
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("unexpected status {status:?}"));
    let agent = status
        .rsplit("agent port ")
        .next()
        .unwrap_or_else(|| panic!("unexpected status {status:?}"));
    TcpStream::connect(api).expect("the API accepts connections once READY=1 is sent");
    TcpStream::connect(agent).expect("the agent port accepts connections once READY=1 is sent");

    let start = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        let msg = receive(&sock);
        if msg.lines().any(|l| l == "WATCHDOG=1") {
            pings += 1;
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "three pings took {:?}",
        start.elapsed()
    );

    let killed = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", server.id())])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut stopping = false;
    for _ in 0..50 {
        if receive(&sock).lines().any(|l| l == "STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
    let status = server.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
