//! `tollgate demo` (contract §1) as a newcomer runs it: the binary is started, the curl lines it
//! prints are run as printed (with `sh`), each does what its comment says, and Ctrl-C (SIGINT)
//! stops it with exit 0 and removes its temporary directory.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs one printed line with `sh`: its stdout and stderr together.
fn run(line: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(line)
        .output()
        .expect("sh runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_printed_curl_lines_work_and_ctrl_c_cleans_up() {
    let mut child = common::tollgate_command()
        .arg("demo")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tollgate demo starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut printed = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("a line");
        let done = line.starts_with("Ctrl-C to stop");
        printed.push(line);
        if done {
            break;
        }
    }
    let text = printed.join("\n");
    let dir = text
        .split("the store is in ")
        .nth(1)
        .and_then(|rest| rest.split(".\n").next())
        .map(std::path::PathBuf::from)
        .expect("the store's directory is printed");
    assert!(dir.is_dir(), "{}", dir.display());
    let commands: Vec<&str> = printed
        .iter()
        .map(String::as_str)
        .filter(|l| l.starts_with("curl ") || l.starts_with("for "))
        .collect();
    assert_eq!(commands.len(), 5, "{text}");

    let passed = run(commands[0]);
    assert!(passed.contains("HTTP/1.1 200"), "{passed}");
    assert!(passed.contains("x-tollgate-key-id"), "{passed}");
    assert!(passed.contains("ratelimit-remaining: 4"), "{passed}");
    let no_key = run(commands[1]);
    assert!(
        no_key.contains("HTTP/1.1 401") && no_key.contains("missing_credential"),
        "{no_key}"
    );
    let wrong_key = run(commands[2]);
    assert!(
        wrong_key.contains("HTTP/1.1 401") && wrong_key.contains("invalid_credential"),
        "{wrong_key}"
    );
    let burst = run(commands[3]);
    let codes: Vec<&str> = burst.lines().collect();
    assert_eq!(codes, ["200", "200", "200", "200", "429", "429"], "{burst}");

    // 1 + 6 requests were made with the key; counts are written every second.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let usage = run(commands[4]);
        let counted: serde_json::Value = serde_json::from_str(&usage).unwrap_or_default();
        let total: u64 = counted["buckets"]
            .as_array()
            .map(|b| b.iter().filter_map(|x| x["request_count"].as_u64()).sum())
            .unwrap_or(0);
        if total == 7 {
            break;
        }
        assert!(Instant::now() < deadline, "usage read back: {usage}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The shell's own kill: no procps needed.
    let interrupted = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -INT {}", child.id()))
        .status()
        .expect("sh runs");
    assert!(interrupted.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the demo did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(!dir.exists(), "{} is left behind", dir.display());
}
