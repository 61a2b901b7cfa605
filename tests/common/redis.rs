//! Throwaway Redis servers for tests: `redis-server` on free ports of 127.0.0.1, each in its own
//! temporary directory, without persistence, killed on drop. [`RedisServer`] is one server (with
//! `kill` and `restart` on the same port for fault tests); [`RedisCluster`] is three masters
//! joined with `redis-cli --cluster create`. Never port 6379, where a shared Redis may run.
//!
//! Use from a test file with `#[path = "common/redis.rs"] mod redis_harness;`.

#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a server may take to answer `PING` after it is spawned.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new cluster may take to reach `cluster_state:ok` on every node.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at starting on a fresh port when another process took the one we picked.
const PORT_ATTEMPTS: usize = 5;

/// One `redis-server` on 127.0.0.1.
pub struct RedisServer {
    port: u16,
    /// The cluster bus port, for cluster nodes.
    bus_port: Option<u16>,
    dir: TempDir,
    child: Option<Child>,
}

/// Three `redis-server --cluster-enabled yes` masters sharing the 16 384 slots.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

// === impl RedisServer ===

impl RedisServer {
    /// Starts a server on a free port and waits until it answers `PING`.
    pub fn start() -> RedisServer {
        Self::start_node(false)
    }

    fn start_node(cluster: bool) -> RedisServer {
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let mut server = RedisServer {
                port: free_port(),
                bus_port: cluster.then(free_port),
                dir: tempfile::Builder::new()
                    .prefix("tollgate-redis-")
                    .tempdir()
                    .expect("temporary directory for redis-server"),
                child: None,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to exit; its data is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL also ends a paused (SIGSTOPped) server.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing answers, as when a host
    /// hangs. [`RedisServer::resume`] thaws it.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("server is running");
        let status = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {} failed", child.id());
    }

    /// Starts it again on the same port (empty: nothing is persisted) and waits for `PING`.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.spawn() {
            panic!("redis-server did not restart on port {}: {e}", self.port);
        }
    }

    /// Sends one command and returns the reply as text (`None` if it failed or was an error).
    pub fn command(&self, args: &[&str]) -> Option<String> {
        command(self.port, args)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port, "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .args(["--protected-mode", "no", "--daemonize", "no"]);
        if let Some(bus_port) = self.bus_port {
            cmd.args(["--cluster-enabled", "yes"])
                .args(["--cluster-port", &bus_port.to_string()])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .args(["--cluster-node-timeout", "5000"]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run redis-server (is it installed?): {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.command(&["PING"]).as_deref() == Some("PONG") {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "redis-server on port {port} exited ({status}): {}",
                        self.log_tail()
                    ));
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "redis-server on port {port} did not answer PING within {START_TIMEOUT:?}: {}",
                    self.log_tail()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("redis-{}.log", self.port))
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

// === impl RedisCluster ===

impl RedisCluster {
    /// Starts three nodes, creates the cluster over them with `redis-cli --cluster create`
    /// (no replicas), and waits until every node reports `cluster_state:ok`.
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start_node(true)).collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("cannot run redis-cli (is it installed?)");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        while !cluster.is_ok() {
            assert!(
                Instant::now() < deadline,
                "cluster not ok within {CLUSTER_TIMEOUT:?}: {:?}",
                cluster
                    .nodes
                    .iter()
                    .map(|n| n.command(&["CLUSTER", "INFO"]))
                    .collect::<Vec<_>>()
            );
            thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    /// `redis+cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3`.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// The nodes, for fault tests.
    pub fn nodes(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }

    /// Every node answers and reports `cluster_state:ok`, and they agree on the slots.
    fn is_ok(&self) -> bool {
        self.nodes.iter().all(|n| {
            n.command(&["CLUSTER", "INFO"]).is_some_and(|info| {
                info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_ok:16384")
                    && info.contains("cluster_known_nodes:3")
            })
        })
    }
}

/// A port that was free a moment ago (never 6379); bind races are handled by retrying.
fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind 127.0.0.1:0");
        // Cluster bus ports must fit too; 6379 is the shared server's.
        if port != 6379 {
            return port;
        }
    }
}

/// One command in RESP over a fresh connection; the reply as text, `None` on any failure.
fn command(port: u16, args: &[&str]) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().ok()?,
        Duration::from_millis(500),
    )
    .ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes()).ok()?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        reply.extend_from_slice(&buf[..n]);
        if let Some(text) = parse_reply(&reply) {
            return text;
        }
    }
}

/// `Some(reply)` once `bytes` hold a whole simple-string, error or bulk reply.
fn parse_reply(bytes: &[u8]) -> Option<Option<String>> {
    let line_end = bytes.windows(2).position(|w| w == b"\r\n")?;
    let line = String::from_utf8_lossy(&bytes[1..line_end]).into_owned();
    match bytes.first()? {
        b'+' | b':' => Some(Some(line)),
        b'-' => Some(None),
        b'$' => {
            let len: i64 = line.parse().ok()?;
            if len < 0 {
                return Some(None);
            }
            let start = line_end + 2;
            let end = start + usize::try_from(len).ok()?;
            (bytes.len() >= end)
                .then(|| Some(String::from_utf8_lossy(&bytes[start..end]).into_owned()))
        }
        _ => Some(None),
    }
}
