//! The README's first command works: `remora-quickstart` brings up the control plane, a proxy
//! bootstrapped over ADS and a sample upstream, a request goes through, and Ctrl-C stops it all.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use remora_tests::{free_port, workspace_binary};

#[test]
fn quickstart_serves_a_request_and_stops_cleanly_on_ctrl_c() {
    assert!(
        remora_tests::on_path("kill"),
        "kill(1) is needed to send Ctrl-C"
    );
    let proxy_port = free_port();
    let mut child = Command::new(workspace_binary("remora-quickstart"))
        .args(["--proxy-port", &proxy_port.to_string()])
        .args(["--admin-port", &free_port().to_string()])
        .args(["--xds-port", &free_port().to_string()])
        .args(["--api-port", &free_port().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start remora-quickstart");
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !printed
        .iter()
        .any(|line: &String| line.contains("Press Ctrl-C"))
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) => printed.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "quickstart did not come up in 60 s; it printed:\n{}",
                    printed.join("\n")
                );
            }
        }
    }
    let curl = printed
        .iter()
        .find(|line| line.contains("curl"))
        .expect("a curl line");
    assert!(curl.contains(&format!("127.0.0.1:{proxy_port}")), "{curl}");

    let proxy = ([127, 0, 0, 1], proxy_port).into();
    let (status, _, body) = remora_tests::http_get(proxy, "/from-the-test").unwrap();
    assert_eq!(status, 200, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["upstream"], "echo-1");
    assert_eq!(seen["path"], "/from-the-test");

    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = remora_tests::wait_for("quickstart to exit", Duration::from_secs(30), || {
        child.try_wait().ok().flatten()
    });
    assert!(status.success(), "quickstart exited with {status}");
    assert!(
        std::net::TcpStream::connect_timeout(&proxy, Duration::from_millis(300)).is_err(),
        "the proxy still listens after Ctrl-C"
    );
}
