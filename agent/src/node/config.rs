//! The agent's whole configuration file (`agent.toml`): the pipeline's sections
//! ([`PipelineConfig`]), `[federation]` (the participant's settings, with
//! `[federation.fleet_models]` for the fleet task) and `[metrics]` (Prometheus, [`ListenSection`]).
//!
//! Each part is parsed by the module that owns it, with `deny_unknown_fields` at every level; this
//! file only splits the TOML table between them, so the pipeline never depends on the federation and
//! the participant never on the fleet.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error as _, ser::Error as _};

use crate::federated::edge::participant::FederationSection;
use crate::fleet::FleetSection;
use crate::pipeline::config::{ConfigError, PipelineConfig, invalid, read_toml};
use crate::web::ListenSection;

/// The whole `agent.toml`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AgentConfig {
    /// `[folders]`, `[model]`, `[tiling]`, `[capture]`, `[queues]`, `[status]`.
    pub pipeline: PipelineConfig,
    /// Federated rounds (absent: the agent only segments).
    pub federation: Option<FederationConfig>,
    /// `[metrics]`: Prometheus `/metrics` on this address (absent: off).
    pub metrics: Option<ListenSection>,
}

/// `[federation]`: the participant's settings and, optionally, `[federation.fleet_models]`.
#[derive(Debug, Clone, PartialEq)]
pub struct FederationConfig {
    pub participant: FederationSection,
    /// Signed base-model versions from the fleet manager; absent: the model changes only by hand.
    pub fleet_models: Option<FleetSection>,
}

const FEDERATION: &str = "federation";
const METRICS: &str = "metrics";
const FLEET_MODELS: &str = "fleet_models";

/// Splits `key` out of a table and parses it; the rest stays.
fn take<T: serde::de::DeserializeOwned, E: serde::de::Error>(
    table: &mut toml::Table,
    key: &str,
) -> Result<Option<T>, E> {
    table
        .remove(key)
        .map(|v| v.try_into::<T>())
        .transpose()
        .map_err(|e| E::custom(format!("[{key}]: {e}")))
}

impl<'de> Deserialize<'de> for AgentConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut table = toml::Table::deserialize(d)?;
        let federation = take::<FederationConfig, D::Error>(&mut table, FEDERATION)?;
        let metrics = take::<ListenSection, D::Error>(&mut table, METRICS)?;
        let pipeline = toml::Value::Table(table)
            .try_into::<PipelineConfig>()
            .map_err(D::Error::custom)?;
        Ok(Self {
            pipeline,
            federation,
            metrics,
        })
    }
}

impl<'de> Deserialize<'de> for FederationConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut table = toml::Table::deserialize(d)?;
        let fleet_models = take::<FleetSection, D::Error>(&mut table, FLEET_MODELS)?;
        let participant = toml::Value::Table(table)
            .try_into::<FederationSection>()
            .map_err(D::Error::custom)?;
        Ok(Self {
            participant,
            fleet_models,
        })
    }
}

/// Serialises `part` as a TOML table and adds `(key, extra)` when present.
fn table_with<S: Serializer, T: Serialize, X: Serialize>(
    part: &T,
    key: &str,
    extra: Option<&X>,
) -> Result<toml::Table, S::Error> {
    let mut table = toml::Table::try_from(part).map_err(S::Error::custom)?;
    if let Some(x) = extra {
        table.insert(
            key.to_owned(),
            toml::Value::try_from(x).map_err(S::Error::custom)?,
        );
    }
    Ok(table)
}

impl Serialize for AgentConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut table =
            table_with::<S, _, _>(&self.pipeline, FEDERATION, self.federation.as_ref())?;
        if let Some(m) = &self.metrics {
            table.insert(
                METRICS.to_owned(),
                toml::Value::try_from(m).map_err(S::Error::custom)?,
            );
        }
        table.serialize(s)
    }
}

impl Serialize for FederationConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        table_with::<S, _, _>(&self.participant, FLEET_MODELS, self.fleet_models.as_ref())?
            .serialize(s)
    }
}

impl AgentConfig {
    /// Reads, parses and validates a configuration file. Relative paths in it are resolved against
    /// the file's folder, so a config can travel with its folders.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = read_toml(path)?;
        config.resolve_paths(path.parent().unwrap_or(Path::new("")));
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        self.pipeline.resolve_paths(base);
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(m) = &mut self.metrics {
            m.resolve_paths(base);
        }
        if let Some(f) = &mut self.federation {
            let f = &mut f.participant;
            fix(&mut f.labelled);
            fix(&mut f.state);
            if let Some(sa) = f.secure_aggregation.as_mut() {
                fix(&mut sa.device_key);
            }
            if let Some(t) = &mut f.broker.tls {
                fix(&mut t.ca);
                fix(&mut t.cert);
                fix(&mut t.key);
            }
        }
    }

    /// Checks every field that can be checked without touching the disk.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.pipeline.validate()?;
        if let Some(m) = &self.metrics {
            m.validate(METRICS)
                .map_err(|e| invalid("metrics", e.to_string()))?;
        }
        if let Some(f) = &self.federation {
            f.participant
                .validate()
                .map_err(|e| invalid("federation.style", e.to_string()))?;
            f.participant
                .validate_margin()
                .map_err(|e| invalid("federation.holdout_margin", e))?;
            f.participant
                .validate_personalise()
                .map_err(|e| invalid("federation.personalise", e))?;
        }
        Ok(())
    }

    /// The participant's settings, when federated rounds are configured.
    pub fn participant(&self) -> Option<&FederationSection> {
        self.federation.as_ref().map(|f| &f.participant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_and_validates() {
        let text = include_str!("../../agent.example.toml");
        let c: AgentConfig = toml::from_str(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.pipeline.tiling.tile, 512);
    }

    #[test]
    fn typos_are_refused_at_every_level() {
        let err = toml::from_str::<AgentConfig>("[tiling]\ntiles = 256\n").unwrap_err();
        assert!(err.to_string().contains("tiles"), "{err}");
        let fed = "[federation]\nfleet = \"f\"\ndevice = \"d\"\nlabelled = \"l\"\nstate = \"s\"\n";
        let c: AgentConfig = toml::from_str(fed).unwrap();
        assert_eq!(c.participant().unwrap().device, "d");
        let err = toml::from_str::<AgentConfig>(&format!("{fed}colour = 1\n")).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = toml::from_str::<AgentConfig>(&format!(
            "{fed}[federation.fleet_models]\ntrusted_keys = []\nkeep = 2\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("keep"), "{err}");
    }

    #[test]
    fn a_config_round_trips_through_toml() {
        let fed = "[federation]\nfleet = \"f\"\ndevice = \"d\"\nlabelled = \"l\"\nstate = \"s\"\n\
                   [federation.fleet_models]\ntrusted_keys = [\"00\"]\n";
        let c: AgentConfig = toml::from_str(fed).unwrap();
        assert!(c.federation.as_ref().unwrap().fleet_models.is_some());
        let text = toml::to_string(&c).unwrap();
        let back: AgentConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn the_metrics_section_is_parsed_and_checked() {
        let c: AgentConfig = toml::from_str("[metrics]\nlisten = \"127.0.0.1:9464\"\n").unwrap();
        assert_eq!(c.metrics.as_ref().unwrap().listen.port(), 9464);
        c.validate().unwrap();
        let back: AgentConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let open: AgentConfig = toml::from_str("[metrics]\nlisten = \"0.0.0.0:9464\"\n").unwrap();
        let e = open.validate().unwrap_err().to_string();
        assert!(e.contains("token_file"), "{e}");
        let e = toml::from_str::<AgentConfig>("[metrics]\nlisten = \"127.0.0.1:1\"\nport = 2\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn relative_federation_paths_follow_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(
            &p,
            "[federation]\nfleet = \"f\"\ndevice = \"d\"\nlabelled = \"l\"\nstate = \"s\"\n",
        )
        .unwrap();
        let c = AgentConfig::load(&p).unwrap();
        assert_eq!(c.participant().unwrap().labelled, dir.path().join("l"));
    }
}
