//! `remoractl`: command-line client of the remora-cp config API.
//!
//! `apply -f FILE`, `get KIND [NAME]`, `delete KIND NAME`, `status` (the proxies table, NACKs
//! highlighted), `ca-bundle` (the mesh CA's root), `xds-token issue|list|revoke` (bootstrap
//! tokens for authenticated xDS). Exits non-zero with the server's explanation when a request
//! fails.

use std::io::{IsTerminal, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::Value;

/// Manage Remora control-plane config.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Base URL of the config API.
    #[arg(long, env = "REMORA_CP_URL", default_value = "http://127.0.0.1:19000")]
    server: String,
    /// Bearer token for the API.
    #[arg(long, env = "REMORA_CP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply every resource in a YAML (multi-document) or JSON (array) file, as one version.
    Apply {
        /// File to apply; `-` reads standard input.
        #[arg(short = 'f', long = "filename")]
        file: String,
        #[arg(long)]
        group: Option<String>,
        /// Validate only, store nothing: what would be refused, held back, or refused by
        /// Remora proxies (exit status 1 if anything would be refused).
        #[arg(long)]
        dry_run: bool,
    },
    /// Show resources of a kind (listeners, routes, clusters, endpoints, secrets), or one.
    Get {
        kind: String,
        name: Option<String>,
        #[arg(long)]
        group: Option<String>,
        #[arg(short, long, value_enum, default_value = "yaml")]
        output: Output,
    },
    /// Delete one resource.
    Delete {
        kind: String,
        name: String,
        #[arg(long)]
        group: Option<String>,
    },
    /// Connected proxies, their ACKed versions and NACKs.
    Status {
        #[arg(short, long)]
        json: bool,
    },
    /// Print the mesh CA's trust bundle (PEM).
    CaBundle,
    /// Bootstrap tokens for authenticated xDS (`remora-cp --xds-auth token`).
    XdsToken {
        #[command(subcommand)]
        action: TokenAction,
    },
}

#[derive(Subcommand, Debug)]
enum TokenAction {
    /// Issue a token for a group (and, for mesh sidecars, a workload identity); the token is
    /// printed once.
    Issue {
        #[arg(long)]
        group: String,
        #[arg(long, requires = "service_account")]
        namespace: Option<String>,
        #[arg(long, requires = "namespace")]
        service_account: Option<String>,
    },
    /// The grants, by id (never the tokens).
    List,
    /// Revoke a token by id: its open streams end, new ones are refused.
    Revoke { id: String },
}

/// A failed command: what to tell the user.
struct Failure(String);

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message)) => {
            eprintln!("remoractl: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), Failure> {
    match &args.command {
        Command::Apply {
            file,
            group,
            dry_run,
        } => {
            let mut body = String::new();
            let read = if file == "-" {
                std::io::stdin().read_to_string(&mut body)
            } else {
                std::fs::File::open(file).and_then(|mut f| f.read_to_string(&mut body))
            };
            read.map_err(|error| Failure(format!("cannot read {file}: {error}")))?;
            let content_type = if file.ends_with(".json") {
                "application/json"
            } else {
                "application/yaml"
            };
            let mut path = with_group("/v1/apply", group);
            if *dry_run {
                path.push_str(if group.is_some() { "&" } else { "?" });
                path.push_str("dry_run=true");
            }
            let answer = request(args, "POST", &path, content_type, &body)?;
            report_write(&answer);
        }
        Command::Get {
            kind,
            name,
            group,
            output,
        } => {
            let path = match name {
                Some(name) => format!("/v1/{kind}/{name}"),
                None => format!("/v1/{kind}"),
            };
            let answer = request(args, "GET", &with_group(&path, group), "", "")?;
            let shown = match name {
                Some(_) => answer,
                None => Value::Array(
                    answer["items"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|item| item["resource"].clone())
                        .collect(),
                ),
            };
            let text = match output {
                Output::Json => serde_json::to_string_pretty(&shown).unwrap_or_default(),
                Output::Yaml => serde_yaml::to_string(&shown).unwrap_or_default(),
            };
            println!("{}", text.trim_end());
        }
        Command::Delete { kind, name, group } => {
            let answer = request(
                args,
                "DELETE",
                &with_group(&format!("/v1/{kind}/{name}"), group),
                "",
                "",
            )?;
            report_write(&answer);
        }
        Command::CaBundle => {
            let answer = request(args, "GET", "/v1/ca/bundle", "", "")?;
            print!("{}", answer.as_str().unwrap_or_default());
        }
        Command::XdsToken { action } => token_command(args, action)?,
        Command::Status { json } => {
            let answer = request(args, "GET", "/v1/proxies", "", "")?;
            if *json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&answer).unwrap_or_default()
                );
            } else {
                print_status(&answer);
            }
        }
    }
    Ok(())
}

fn token_command(args: &Args, action: &TokenAction) -> Result<(), Failure> {
    match action {
        TokenAction::Issue {
            group,
            namespace,
            service_account,
        } => {
            let mut grant = serde_json::json!({"group": group});
            if let (Some(namespace), Some(account)) = (namespace, service_account) {
                grant["namespace"] = Value::from(namespace.as_str());
                grant["serviceAccount"] = Value::from(account.as_str());
            }
            let answer = request(
                args,
                "POST",
                "/v1/xds-tokens",
                "application/json",
                &grant.to_string(),
            )?;
            println!("{}", answer["token"].as_str().unwrap_or_default());
            eprintln!(
                "id {} (shown by `remoractl xds-token list`; the token is not shown again)",
                answer["id"].as_str().unwrap_or("?")
            );
        }
        TokenAction::List => {
            let answer = request(args, "GET", "/v1/xds-tokens", "", "")?;
            println!(
                "{:<18} {:<20} {:<16} SERVICE ACCOUNT",
                "ID", "GROUP", "NAMESPACE"
            );
            for grant in answer["tokens"].as_array().into_iter().flatten() {
                println!(
                    "{:<18} {:<20} {:<16} {}",
                    grant["id"].as_str().unwrap_or("?"),
                    grant["group"].as_str().unwrap_or(""),
                    grant["namespace"].as_str().unwrap_or("-"),
                    grant["serviceAccount"].as_str().unwrap_or("-")
                );
            }
        }
        TokenAction::Revoke { id } => {
            let answer = request(args, "DELETE", &format!("/v1/xds-tokens/{id}"), "", "")?;
            println!("version {}: revoked {id}", answer["version"]);
        }
    }
    Ok(())
}

fn with_group(path: &str, group: &Option<String>) -> String {
    match group {
        Some(group) => format!("{path}?group={group}"),
        None => path.to_string(),
    }
}

fn report_write(answer: &Value) {
    let names = |field: &str| -> Vec<&str> {
        answer[field]
            .as_array()
            .map(|items| items.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    };
    if answer["dry_run"] == true {
        println!(
            "dry run (nothing stored; current version {}): would apply {}",
            answer["version"],
            names("would_apply").join(", ")
        );
    } else {
        println!(
            "version {}: {}",
            answer["version"],
            names("applied").join(", ")
        );
    }
    for rejected in answer["remora_rejects"].as_array().into_iter().flatten() {
        let field = rejected["field"].as_str().unwrap_or("");
        println!(
            "warning: Remora proxies would reject {}{}{}: {} (Envoy proxies may accept it)",
            rejected["resource"].as_str().unwrap_or("?"),
            if field.is_empty() { "" } else { " at " },
            field,
            rejected["reason"].as_str().unwrap_or("")
        );
    }
    for waiting in answer["waiting"].as_array().into_iter().flatten() {
        println!(
            "waiting: {}: {}",
            waiting["resource"].as_str().unwrap_or("?"),
            waiting["reason"].as_str().unwrap_or("")
        );
    }
}

fn print_status(answer: &Value) {
    let proxies = answer["proxies"].as_array().cloned().unwrap_or_default();
    if proxies.is_empty() {
        println!("no proxies connected");
        return;
    }
    let color = std::io::stdout().is_terminal();
    let types = ["CDS", "EDS", "LDS", "RDS", "SDS"];
    println!(
        "{:<24} {:<12} {:<22} {:<6} {:<21} {}",
        "NODE",
        "GROUP",
        "PEER",
        "PROTO",
        "CONNECTED",
        types.map(|t| format!("{t:<6}")).join("")
    );
    let mut nacks = Vec::new();
    for proxy in &proxies {
        let node = proxy["node_id"].as_str().unwrap_or("");
        let mut cells = String::new();
        for xds in types {
            let status = &proxy["types"][xds];
            let mut cell = status["acked_version"].as_str().unwrap_or("-").to_string();
            if status["pending_nonce"].is_string() {
                cell.push('*');
            }
            if let Some(nack) = status["last_nack"].as_object() {
                cell.push('!');
                nacks.push(format!(
                    "NACK {node} {xds} version {} at {}: {}",
                    nack.get("version").and_then(Value::as_str).unwrap_or("?"),
                    nack.get("time").and_then(Value::as_str).unwrap_or("?"),
                    nack.get("message").and_then(Value::as_str).unwrap_or("")
                ));
            }
            cells.push_str(&format!("{cell:<6}"));
        }
        println!(
            "{:<24} {:<12} {:<22} {:<6} {:<21} {}",
            node,
            proxy["group"].as_str().unwrap_or(""),
            proxy["peer"].as_str().unwrap_or("-"),
            proxy["protocol"].as_str().unwrap_or(""),
            proxy["connected_since"].as_str().unwrap_or(""),
            cells
        );
    }
    if !nacks.is_empty() {
        println!();
        for line in nacks {
            if color {
                println!("\x1b[1;31m{line}\x1b[0m");
            } else {
                println!("{line}");
            }
        }
    }
    println!("\n(version = last ACKed; * = push awaiting ACK; ! = last push NACKed)");
}

/// One HTTP/1.1 request; returns the JSON answer or a failure explaining the server's reply.
fn request(
    args: &Args,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> Result<Value, Failure> {
    let authority = args
        .server
        .strip_prefix("http://")
        .ok_or_else(|| {
            Failure(format!(
                "--server must be an http:// URL, got {:?}",
                args.server
            ))
        })?
        .trim_end_matches('/');
    let address = authority
        .to_socket_addrs()
        .ok()
        .and_then(|mut addresses| addresses.next())
        .ok_or_else(|| Failure(format!("cannot resolve {authority}")))?;
    let unreachable = |error: std::io::Error| {
        Failure(format!(
            "cannot reach remora-cp at {}: {error}",
            args.server
        ))
    };
    let mut stream =
        TcpStream::connect_timeout(&address, Duration::from_secs(5)).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(unreachable)?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !content_type.is_empty() {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    if let Some(token) = &args.token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .and_then(|_| stream.write_all(body.as_bytes()))
        .map_err(unreachable)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(unreachable)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let payload = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    let value: Value = serde_json::from_str(&payload).unwrap_or(Value::String(payload.clone()));
    if (200..300).contains(&status) {
        return Ok(value);
    }
    let mut message = format!(
        "{method} {path} failed ({status}): {}",
        value["error"].as_str().unwrap_or(payload.trim())
    );
    for problem in value["problems"].as_array().into_iter().flatten() {
        let field = problem["field"].as_str().unwrap_or("");
        let group = problem["group"]
            .as_str()
            .map(|g| format!(" (group {g})"))
            .unwrap_or_default();
        message.push_str(&format!(
            "\n  {}{group}{}{}: {}",
            problem["resource"].as_str().unwrap_or("?"),
            if field.is_empty() { "" } else { " at " },
            field,
            problem["reason"].as_str().unwrap_or("")
        ));
    }
    Err(Failure(message))
}

fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || after.len() < size {
            break;
        }
        body.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    body
}
