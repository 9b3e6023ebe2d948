//! `remora-echo`: a standalone echo upstream (HTTP/1.1 and h2c) for the quick start and benchmarks.

use clap::Parser;

#[derive(Parser)]
#[command(about = "Echo upstream: answers every request with a JSON description of it")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// Name reported in the `upstream` field and the `x-upstream` header.
    #[arg(long, default_value = "echo")]
    name: String,
    /// Milliseconds every answer waits before it is sent (a slow upstream).
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!(
        "remora-echo {} listening on {}",
        args.name,
        listener.local_addr()?
    );
    let delay = std::time::Duration::from_millis(args.delay_ms);
    remora_tests::echo::serve_delayed(args.name, listener, delay).await;
    Ok(())
}
