//! `microfed fleet keygen|push|list|status|rollback`: the fleet manager's commands (docs/fleet.md).
//!
//! `keygen` works offline. The others connect to the fleet's broker with the settings of a small TOML
//! file (`--config fleet.toml`: the fleet name, the client id — `fleet-manager`, the CN of the
//! manager's certificate — and `[broker]` as in agent.toml), read what the broker retains, act, and
//! disconnect.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use crate::fleet::manager::{self, Manager};
use crate::fleet::package::{Release, Target};
use crate::fleet::signing::SecretKey;
use crate::wire::link::BrokerSettings;

/// Sign, push and roll back base-model versions across the fleet; show the fleet's state.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: FleetCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum FleetCommand {
    /// Make an Ed25519 signing key (PKCS#8 PEM, mode 600) and KEY.pub (hex): list the public key in
    /// each agent's `[federation.fleet_models] trusted_keys`.
    #[command(after_help = "Example:\n  microfed fleet keygen --out fleet.key")]
    Keygen {
        #[arg(long, value_name = "KEY")]
        out: PathBuf,
    },
    /// Sign a model folder (manifest.toml + its ONNX file) and publish it to the targeted devices.
    #[command(
        after_help = "Example:\n  microfed fleet push models/grains --to all --key fleet.key --config fleet.toml"
    )]
    Push {
        /// The model folder.
        model_dir: PathBuf,
        /// `all`, `group:NAME` or `device:ID`.
        #[arg(long, value_name = "TARGET")]
        to: String,
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        #[command(flatten)]
        conn: Connection,
    },
    /// Show the version retained on the broker, the last command, and which devices run what.
    List {
        #[command(flatten)]
        conn: Connection,
    },
    /// Show every device: online or offline, model, last round, queue depth, last error.
    Status {
        #[command(flatten)]
        conn: Connection,
    },
    /// Send devices back to a version they hold (full hash, unique prefix of 6+ digits, or label).
    #[command(
        after_help = "Example:\n  microfed fleet rollback --to 61c3061ee5a7 --key fleet.key --config fleet.toml"
    )]
    Rollback {
        #[arg(long, value_name = "VERSION")]
        to: String,
        /// Which devices: `all`, `group:NAME` or `device:ID`.
        #[arg(long, value_name = "TARGET", default_value = "all")]
        on: String,
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Debug, clap::Args)]
pub struct Connection {
    /// The fleet manager's settings (fleet, id, [broker]).
    #[arg(long, value_name = "FILE", default_value = "fleet.toml")]
    pub config: PathBuf,
    /// Seconds without a new retained message after which the broker's state counts as read.
    #[arg(long, default_value_t = 1.0, value_name = "S")]
    pub quiet_s: f64,
}

/// `fleet.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManagerConfig {
    fleet: String,
    /// MQTT client id: the CN of the manager's certificate.
    #[serde(default = "default_id")]
    id: String,
    #[serde(default)]
    broker: BrokerSettings,
}

fn default_id() -> String {
    crate::fleet::package::MANAGER.into()
}

fn load_config(path: &Path) -> anyhow::Result<ManagerConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut c: ManagerConfig = toml::from_str(&text)
        .with_context(|| format!("{}: not a fleet manager configuration", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    if let Some(t) = &mut c.broker.tls {
        for p in [&mut t.ca, &mut t.cert, &mut t.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
    Ok(c)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let FleetCommand::Keygen { out } = &args.command {
        let key = SecretKey::generate();
        key.save(out)?;
        let public = key.public().to_hex();
        let pub_path = PathBuf::from(format!("{}.pub", out.display()));
        std::fs::write(&pub_path, format!("{public}\n"))
            .with_context(|| format!("{}", pub_path.display()))?;
        println!("{public}");
        eprintln!(
            "secret key: {} (keep it off the devices); public key: {}",
            out.display(),
            pub_path.display()
        );
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match args.command {
            FleetCommand::Keygen { .. } => Ok(()),
            FleetCommand::Push {
                model_dir,
                to,
                key,
                conn,
            } => {
                let target = Target::parse(&to)?;
                let key = SecretKey::load(&key)?;
                let release = Release::from_model_dir(&model_dir, target)?;
                let (mut m, view) = connect(&conn).await?;
                let version = release.version.clone();
                let target = release.target.clone();
                let chunks = m.push(release, &key, &view).await?;
                m.close().await;
                println!("pushed {version} to {target} ({chunks} chunks, retained)");
                Ok(())
            }
            FleetCommand::Rollback { to, on, key, conn } => {
                let target = Target::parse(&on)?;
                let key = SecretKey::load(&key)?;
                let (mut m, view) = connect(&conn).await?;
                let cmd = m.rollback(&to, target, &key, &view).await?;
                m.close().await;
                println!("rollback to {to} sent to {} (retained)", cmd.target);
                Ok(())
            }
            FleetCommand::List { conn } => {
                let (m, view) = connect(&conn).await?;
                m.close().await;
                print!("{}", manager::list_table(&view));
                Ok(())
            }
            FleetCommand::Status { conn } => {
                let (m, view) = connect(&conn).await?;
                m.close().await;
                if view.devices.is_empty() {
                    println!("no device has reported a status");
                } else {
                    print!("{}", manager::status_table(&view));
                }
                Ok(())
            }
        }
    })
}

async fn connect(conn: &Connection) -> anyhow::Result<(Manager, manager::FleetView)> {
    let c = load_config(&conn.config)?;
    let mut m = Manager::connect(&c.broker, &c.fleet, &c.id, Duration::from_secs(15))
        .await
        .with_context(|| format!("connecting to the broker as {}", c.id))?;
    let quiet = Duration::from_secs_f64(conn.quiet_s.clamp(0.05, 60.0));
    let view = m.observe(quiet, Duration::from_secs(120)).await;
    Ok((m, view))
}
