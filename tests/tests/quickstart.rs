//! The README's first command works: `remora-quickstart` brings up the control plane, a proxy
//! bootstrapped over ADS and a sample upstream, a request goes through, and Ctrl-C stops it all.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use remora_tests::{free_port, workspace_binary};

/// Starts the quick start with `extra` arguments and returns it with what it printed up to
/// "Press Ctrl-C".
fn start(proxy_port: u16, extra: &[&str]) -> (std::process::Child, Vec<String>) {
    let mut child = Command::new(workspace_binary("remora-quickstart"))
        .args(["--proxy-port", &proxy_port.to_string()])
        .args(["--admin-port", &free_port().to_string()])
        .args(["--xds-port", &free_port().to_string()])
        .args(["--api-port", &free_port().to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start remora-quickstart");
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Read to the end even when nobody listens any more: a closed pipe would make the
        // quick start's last lines fail.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
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
    (child, printed)
}

#[test]
fn quickstart_serves_a_request_and_stops_cleanly_on_ctrl_c() {
    assert!(
        remora_tests::on_path("kill"),
        "kill(1) is needed to send Ctrl-C"
    );
    let proxy_port = free_port();
    let (mut child, printed) = start(proxy_port, &["--no-jaeger"]);
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

#[test]
fn quickstart_with_jaeger_sends_every_request_span_there() {
    let Some(jaeger) = remora_tests::jaeger::binary() else {
        remora_tests::skip(
            "quickstart_with_jaeger_sends_every_request_span_there",
            "no jaeger binary (run .ci/build-jaeger)",
        );
        return;
    };
    let proxy_port = free_port();
    let ui_port = free_port();
    let (mut child, printed) = start(
        proxy_port,
        &[
            "--jaeger",
            jaeger.to_str().unwrap(),
            "--jaeger-ui-port",
            &ui_port.to_string(),
            "--jaeger-otlp-port",
            &free_port().to_string(),
        ],
    );
    let traces_line = printed
        .iter()
        .find(|line| line.contains("traces:"))
        .expect("a traces line");
    assert!(
        traces_line.contains(&format!("http://127.0.0.1:{ui_port}/")),
        "{traces_line}"
    );
    let proxy = ([127, 0, 0, 1], proxy_port).into();
    let (status, _, body) = remora_tests::http_get(proxy, "/traced").unwrap();
    assert_eq!(status, 200, "{body}");
    let ui = ([127, 0, 0, 1], ui_port).into();
    remora_tests::wait_for(
        "the request's trace in Jaeger",
        Duration::from_secs(60),
        || {
            let (_, _, body) =
                remora_tests::http_get(ui, "/api/traces?service=quickstart-proxy").ok()?;
            body.contains("/traced").then_some(())
        },
    );
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    remora_tests::wait_for("quickstart to exit", Duration::from_secs(30), || {
        child.try_wait().ok().flatten()
    });
}
