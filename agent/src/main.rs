//! The `microfed` binary: parse the command line, start logging, run. Everything else is in the library.

use clap::Parser;
use microfed::cli::{self, Cli};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        cli::Command::Demo(_) => {
            microfed::telemetry::init_with_default(cli.log_format, "warn,rumqttd=off")
        }
        _ => microfed::telemetry::init(cli.log_format),
    }
    match cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole chain of causes on one line: "reading X: decoding Y: …".
            tracing::error!("{err:#}");
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
