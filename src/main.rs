use std::process::ExitCode;

use statehouse::config::{Cli, Command, Settings, TokenRequest};
use statehouse::{auth, server, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse_or_exit();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let result = match cli.command {
        None => runtime.block_on(serve(cli.serve)),
        Some(Command::Serve(settings)) => runtime.block_on(serve(*settings)),
        Some(Command::Migrate(database)) => runtime.block_on(async {
            telemetry::init_logging(statehouse::config::LogFormat::Text, "warn").map_err(anyhow::Error::msg)?;
            server::open_database(&database).await?;
            println!("database at {} is migrated", String::from(database.turso_url));
            Ok(())
        }),
        Some(Command::Token(request)) => print_new_token(&request),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a fresh token (stdout, once) and the line that grants it, after
/// checking the line parses exactly as the server will read it.
fn print_new_token(request: &TokenRequest) -> anyhow::Result<()> {
    let token = auth::new_token();
    let line = format!("{} {} {} {}", request.name, auth::hash_token(&token), request.namespaces, request.rights);
    auth::TokenTable::parse(&line, "the token line").map_err(anyhow::Error::msg)?;
    println!("token: {token}");
    println!("line:  {line}");
    eprintln!("Give the token to its client; put the line into STATEHOUSE_AUTH_TOKENS or STATEHOUSE_AUTH_FILE.");
    eprintln!("The token is shown only now: the server keeps only its hash.");
    Ok(())
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    if settings.dump_config {
        println!("{}", serde_json::to_string_pretty(&settings)?);
        return Ok(());
    }
    telemetry::init_logging(settings.log_format, &settings.log_filter).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on STATEHOUSE_LISTEN={}: {e}", settings.listen))?;
    server::run(settings, listener, shutdown_signal()).await
}

/// SIGTERM (orchestrators) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested");
}
