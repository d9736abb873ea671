//! scratch stub
#[derive(Debug, clap::Subcommand)]
pub enum Command { Check }
pub fn run(_c: Command) -> anyhow::Result<()> { Ok(()) }
