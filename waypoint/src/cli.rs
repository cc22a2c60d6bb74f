//! The `waypoint` command line: `run --config FILE` and `check FILE`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "waypoint",
    version,
    about = "Envoy-free L7 waypoint proxy for Istio ambient mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the waypoint with a local config file (watched for changes).
    Run {
        #[arg(long, short = 'c', env = "WAYPOINT_CONFIG")]
        config: PathBuf,
        /// Log filter (tracing EnvFilter syntax), e.g. `info` or `info,access=debug`.
        #[arg(long, env = "WAYPOINT_LOG", default_value = "info")]
        log: String,
        /// Log as JSON lines.
        #[arg(long, env = "WAYPOINT_LOG_JSON")]
        log_json: bool,
        /// Worker threads (default: the CPUs available to the process).
        #[arg(long, env = "WAYPOINT_WORKERS")]
        workers: Option<usize>,
        /// One work-stealing runtime instead of thread-per-core workers: the streams of one HBONE connection
        /// can then use every core (for a few very busy connections), at more CPU per request.
        #[arg(long, env = "WAYPOINT_WORK_STEALING")]
        work_stealing: bool,
    },
    /// Validate a config file: prints every error and exits non-zero if there is any.
    Check { file: PathBuf },
}

fn init_logging(filter: &str, json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Entry point shared by the `waypoint` binary and the conformance tool's embedded copy.
pub fn cli_main(args: Vec<OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Check { file } => check(&file),
        Command::Run {
            config,
            log,
            log_json,
            workers,
            work_stealing,
        } => {
            init_logging(&log, log_json);
            let started = if work_stealing {
                let mut rt = tokio::runtime::Builder::new_multi_thread();
                rt.enable_all();
                if let Some(w) = workers {
                    rt.worker_threads(w.max(1));
                }
                rt.build().map(|rt| (rt, None))
            } else {
                // The main runtime only accepts, watches config and certificates, and serves the admin port.
                let n = workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .and_then(|rt| Ok((rt, Some(crate::workers::Workers::start(n)?))))
            };
            let (rt, workers) = match started {
                Ok(started) => started,
                Err(e) => {
                    eprintln!("waypoint: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(run(config, workers)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("waypoint: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check(file: &std::path::Path) -> ExitCode {
    match crate::config::load_file(file, 1) {
        Ok(s) => {
            println!("{}: ok ({} service addresses)", file.display(), s.services.len());
            for skipped in &s.skipped {
                println!("{}: skipped unsupported kind {skipped}", file.display());
            }
            if let Err(e) = crate::tls::Material::load(&s.settings.tls) {
                println!("{}: warning: {e}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("{}: {} error(s)", file.display(), errors.0.len());
            ExitCode::FAILURE
        }
    }
}

async fn run(config: PathBuf, workers: Option<crate::workers::Workers>) -> anyhow::Result<()> {
    if let Some(w) = &workers {
        tracing::info!(workers = w.len(), "thread-per-core workers");
    }
    let app = crate::App::start_with(config, workers).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
    }
    app.drain();
    app.wait().await;
    Ok(())
}
