//! What travels: a signed model version (a *release*) and signed fleet commands.
//!
//! Map:
//! - [`Target`]: which devices an instruction is for (`all`, `group:NAME`, `device:ID`).
//! - [`Release`]: one base-model version: the ONNX file, its `manifest.toml`, the version (the
//!   SHA-256 of the ONNX file, the same id federated rounds carry as `model_version`), the target and
//!   the time it was issued. [`Release::from_model_dir`] builds one from a model folder.
//! - [`FleetCommand`] / [`Order`]: `rollback` to a version the devices hold.
//! - [`Signed`]: the CBOR bytes of a release or command, the signer's public key and the Ed25519
//!   signature over exactly those bytes (with a purpose tag, see [`super::signing`]). Signing the
//!   encoded bytes rather than a re-encoding means no canonical form is needed: what was signed is what
//!   is decoded. [`Signed::open_release`] / [`Signed::open_command`] verify first and decode after, so
//!   nothing unverified is ever parsed beyond the outer wrapper.
//! - [`encode_release`] / [`encode_command`]: the [`Envelope`] bytes published on `model/<i>` (chunked,
//!   retained) and `command` (retained); [`decode`] is the inverse up to the signature check.
//!
//! The `issued_ms` of releases and commands orders the fleet manager's instructions: an agent acts on
//! an instruction only if it is newer than the last one it acted on, so retained messages delivered
//! again after a reconnect (in any order) are not replayed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::signing::{PublicKey, Purpose, SecretKey, SigningError, TrustedKeys};
use crate::model::manifest::ModelManifest;
use crate::wire::protocol::{self, Envelope, Header, Kind, ProtocolError};

/// Sender id in the envelopes of the fleet manager.
pub const MANAGER: &str = "fleet-manager";

/// Why a release or command was refused or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error(transparent)]
    Signing(#[from] SigningError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("malformed {what}: {message}")]
    Malformed { what: &'static str, message: String },
    #[error("sha256 mismatch: {what} says {expected}, the ONNX file hashes to {found}")]
    Digest {
        what: &'static str,
        expected: String,
        found: String,
    },
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("target `{0}`: expected `all`, `group:NAME` or `device:ID`")]
    Target(String),
    #[error(
        "signed for fleet {signed:?}, this device is in fleet {ours:?}: refused (a {what} of another \
         fleet replayed here, or one signed before releases and commands named their fleet)"
    )]
    OtherFleet {
        what: &'static str,
        signed: String,
        ours: String,
    },
}

/// Which devices an instruction is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Target {
    All,
    Group(String),
    Device(String),
}

impl Target {
    /// `all`, `group:NAME` or `device:ID`.
    pub fn parse(text: &str) -> Result<Self, PackageError> {
        let bad = || PackageError::Target(text.to_owned());
        match text.split_once(':') {
            None if text == "all" => Ok(Self::All),
            Some(("group", n)) if protocol::valid_level(n) => Ok(Self::Group(n.to_owned())),
            Some(("device", n)) if protocol::valid_level(n) => Ok(Self::Device(n.to_owned())),
            _ => Err(bad()),
        }
    }
    /// Whether a device with this id and these groups is targeted.
    pub fn includes(&self, device: &str, groups: &[String]) -> bool {
        match self {
            Self::All => true,
            Self::Group(g) => groups.iter().any(|x| x == g),
            Self::Device(d) => d == device,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::All => f.write_str("all"),
            Self::Group(g) => write!(f, "group:{g}"),
            Self::Device(d) => write!(f, "device:{d}"),
        }
    }
}

impl TryFrom<String> for Target {
    type Error = PackageError;
    fn try_from(s: String) -> Result<Self, PackageError> {
        Self::parse(&s)
    }
}

impl From<Target> for String {
    fn from(t: Target) -> String {
        t.to_string()
    }
}

/// One base-model version, as signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    /// The fleet it is for, inside what is signed: fleets that share a signing key cannot replay
    /// each other's releases. Stamped by the fleet manager when it signs (empty until then; a
    /// release signed before this field existed decodes with it empty and is refused).
    #[serde(default)]
    pub fleet: String,
    /// SHA-256 (hex) of the ONNX file: the version id everywhere.
    pub version: String,
    /// Milliseconds since the Unix epoch at the fleet manager.
    pub issued_ms: u64,
    pub target: Target,
    /// `manifest.toml`, verbatim.
    pub manifest: String,
    #[serde(with = "serde_bytes")]
    pub onnx: Vec<u8>,
}

impl Release {
    /// Reads `DIR/manifest.toml` and the ONNX file it names, and checks that they agree.
    pub fn from_model_dir(dir: &Path, target: Target) -> Result<Self, PackageError> {
        let manifest_path = dir.join("manifest.toml");
        let m = ModelManifest::load(&manifest_path)
            .map_err(|e| PackageError::Manifest(e.to_string()))?;
        let onnx_path = m.model_path(&manifest_path);
        let onnx = std::fs::read(&onnx_path).map_err(|e| PackageError::Io {
            path: onnx_path.clone(),
            message: e.to_string(),
        })?;
        let manifest = std::fs::read_to_string(&manifest_path).map_err(|e| PackageError::Io {
            path: manifest_path.clone(),
            message: e.to_string(),
        })?;
        let release = Self {
            fleet: String::new(),
            version: protocol::sha256_hex(&onnx),
            issued_ms: now_ms(),
            target,
            manifest,
            onnx,
        };
        release.check()?;
        Ok(release)
    }

    /// The manifest, parsed and validated.
    pub fn manifest(&self) -> Result<ModelManifest, PackageError> {
        let m: ModelManifest =
            toml::from_str(&self.manifest).map_err(|e| PackageError::Manifest(e.to_string()))?;
        m.validate().map_err(|(field, problem)| {
            PackageError::Manifest(format!("field `{field}`: {problem}"))
        })?;
        Ok(m)
    }

    /// The ONNX bytes hash to `version`, and the manifest is valid and names the same hash.
    pub fn check(&self) -> Result<ModelManifest, PackageError> {
        let found = protocol::sha256_hex(&self.onnx);
        if found != self.version {
            return Err(PackageError::Digest {
                what: "the release",
                expected: self.version.clone(),
                found,
            });
        }
        let m = self.manifest()?;
        if m.sha256 != found {
            return Err(PackageError::Digest {
                what: "the manifest",
                expected: m.sha256,
                found,
            });
        }
        Ok(m)
    }
}

/// What a command orders.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Go back to this version (a full SHA-256), which the device must hold.
    Rollback { version: String },
}

/// A fleet command, as signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetCommand {
    /// The fleet it is for, inside what is signed (see [`Release::fleet`]).
    #[serde(default)]
    pub fleet: String,
    pub issued_ms: u64,
    pub target: Target,
    pub order: Order,
}

/// Signed bytes: a release or a command, the key and the signature (absent = unsigned).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signed {
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    pub key: Option<ByteBuf>,
    pub signature: Option<ByteBuf>,
}

impl Signed {
    /// Encodes `value` and signs it for `purpose`.
    pub fn sign<T: Serialize>(
        value: &T,
        purpose: Purpose,
        key: &SecretKey,
    ) -> Result<Self, PackageError> {
        let bytes = protocol::to_cbor("signed payload", value)?;
        let signature = key.sign(purpose, &bytes);
        Ok(Self {
            bytes,
            key: Some(ByteBuf::from(key.public().0.to_vec())),
            signature: Some(ByteBuf::from(signature.to_vec())),
        })
    }

    /// Encodes `value` without a signature (what a forger without a key can make; tests use it).
    pub fn unsigned<T: Serialize>(value: &T) -> Result<Self, PackageError> {
        Ok(Self {
            bytes: protocol::to_cbor("signed payload", value)?,
            key: None,
            signature: None,
        })
    }

    fn verify(&self, purpose: Purpose, trusted: &TrustedKeys) -> Result<PublicKey, PackageError> {
        Ok(trusted.verify(
            purpose,
            &self.bytes,
            self.key.as_deref().map(|k| &k[..]),
            self.signature.as_deref().map(|s| &s[..]),
        )?)
    }

    /// Verifies the signature, decodes the release, checks that it was signed for `fleet` and
    /// checks its hashes and manifest.
    pub fn open_release(
        &self,
        fleet: &str,
        trusted: &TrustedKeys,
    ) -> Result<(Release, ModelManifest, PublicKey), PackageError> {
        let key = self.verify(Purpose::Release, trusted)?;
        let r: Release = protocol::from_cbor("release", &self.bytes)?;
        same_fleet("release", &r.fleet, fleet)?;
        let m = r.check()?;
        Ok((r, m, key))
    }

    /// Verifies the signature, decodes the command and checks that it was signed for `fleet`.
    pub fn open_command(
        &self,
        fleet: &str,
        trusted: &TrustedKeys,
    ) -> Result<(FleetCommand, PublicKey), PackageError> {
        let key = self.verify(Purpose::Command, trusted)?;
        let c: FleetCommand = protocol::from_cbor("command", &self.bytes)?;
        same_fleet("command", &c.fleet, fleet)?;
        Ok((c, key))
    }

    /// The release inside without checking the signature: for the fleet manager's own listing only.
    pub fn peek_release(&self) -> Result<Release, PackageError> {
        Ok(protocol::from_cbor("release", &self.bytes)?)
    }

    /// The command inside without checking the signature: for the fleet manager's own listing only.
    pub fn peek_command(&self) -> Result<FleetCommand, PackageError> {
        Ok(protocol::from_cbor("command", &self.bytes)?)
    }
}

fn same_fleet(what: &'static str, signed: &str, ours: &str) -> Result<(), PackageError> {
    if signed == ours {
        Ok(())
    } else {
        Err(PackageError::OtherFleet {
            what,
            signed: signed.to_owned(),
            ours: ours.to_owned(),
        })
    }
}

fn seal(kind: Kind, fleet: &str, version: &str, signed: &Signed) -> Result<Vec<u8>, PackageError> {
    let h = Header {
        fleet,
        round: 0,
        model_version: version,
        sender: MANAGER,
    };
    Ok(Envelope::seal(kind, &h, signed)?.to_bytes()?)
}

/// The envelope of a signed release (to be split into frames for `model/<i>`).
pub fn encode_release(
    fleet: &str,
    version: &str,
    signed: &Signed,
) -> Result<Vec<u8>, PackageError> {
    seal(Kind::ModelVersion, fleet, version, signed)
}

/// The envelope of a signed command (one message on `command`).
pub fn encode_command(fleet: &str, signed: &Signed) -> Result<Vec<u8>, PackageError> {
    seal(Kind::Command, fleet, "", signed)
}

/// Decodes an envelope of this fleet into its kind and the signed bytes (not yet verified).
pub fn decode(bytes: &[u8], fleet: &str) -> Result<(Kind, Signed), PackageError> {
    let env = Envelope::from_bytes(bytes, usize::MAX)?;
    if env.fleet != fleet {
        return Err(PackageError::Malformed {
            what: "envelope",
            message: format!("for fleet {}, this is fleet {fleet}", env.fleet),
        });
    }
    let kind = env.kind;
    if !matches!(kind, Kind::ModelVersion | Kind::Command) {
        return Err(PackageError::Malformed {
            what: "envelope",
            message: format!("a {kind:?} message on a fleet topic"),
        });
    }
    let signed: Signed = protocol::from_cbor("signed payload", &env.body)?;
    Ok((kind, signed))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The grains model's manifest with the sha256 of `onnx` (a valid manifest for any bytes).
    pub(crate) fn manifest_for(onnx: &[u8]) -> String {
        include_str!("../../../models/grains/manifest.toml")
            .lines()
            .map(|l| {
                if l.starts_with("sha256 = ") {
                    format!("sha256 = \"{}\"", protocol::sha256_hex(onnx))
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn release(onnx: &[u8]) -> Release {
        Release {
            fleet: "f".into(),
            version: protocol::sha256_hex(onnx),
            issued_ms: 1000,
            target: Target::All,
            manifest: manifest_for(onnx),
            onnx: onnx.to_vec(),
        }
    }

    #[test]
    fn targets_parse_and_match() {
        let g = vec!["furnace".to_string()];
        assert!(Target::parse("all").unwrap().includes("d1", &[]));
        assert!(Target::parse("group:furnace").unwrap().includes("d1", &g));
        assert!(!Target::parse("group:sem").unwrap().includes("d1", &g));
        assert!(Target::parse("device:d1").unwrap().includes("d1", &[]));
        assert!(!Target::parse("device:d2").unwrap().includes("d1", &g));
        for bad in ["", "everyone", "group:", "device:a/b", "group:+", "all:x"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Target::parse("group:x").unwrap().to_string(), "group:x");
    }

    #[test]
    fn signed_release_round_trips_and_tampering_is_caught() {
        let key = SecretKey::from_seed([1; 32]);
        let trusted = TrustedKeys::parse(&[key.public().to_hex()]).unwrap();
        let r = release(b"pretend onnx");
        r.check().expect("the test manifest is valid");
        let signed = Signed::sign(&r, Purpose::Release, &key).unwrap();
        let bytes = encode_release("f", &r.version, &signed).unwrap();
        let (kind, back) = decode(&bytes, "f").unwrap();
        assert_eq!(kind, Kind::ModelVersion);
        let (opened, m, k) = back.open_release("f", &trusted).unwrap();
        assert_eq!(opened, r);
        assert_eq!(m.name, "grains");
        assert_eq!(k, key.public());
        assert!(matches!(
            decode(&bytes, "other"),
            Err(PackageError::Malformed { .. })
        ));

        // One ONNX byte changed after signing.
        let mut t = back.clone();
        let at = t
            .bytes
            .windows(12)
            .position(|w| w == b"pretend onnx")
            .unwrap();
        t.bytes[at] ^= 1;
        let e = t.open_release("f", &trusted).unwrap_err();
        assert!(e.to_string().contains("bad signature"), "{e}");
        // A release signed as a command does not open as a release.
        let cmd_signed = Signed {
            signature: Some(ByteBuf::from(
                key.sign(Purpose::Command, &back.bytes).to_vec(),
            )),
            ..back.clone()
        };
        assert!(cmd_signed.open_release("f", &trusted).is_err());
        // Unsigned; signed by someone else.
        let e = Signed::unsigned(&r)
            .unwrap()
            .open_release("f", &trusted)
            .unwrap_err();
        assert!(e.to_string().starts_with("unsigned"), "{e}");
        let other = SecretKey::from_seed([2; 32]);
        let e = Signed::sign(&r, Purpose::Release, &other)
            .unwrap()
            .open_release("f", &trusted)
            .unwrap_err();
        assert!(e.to_string().contains("does not trust"), "{e}");
        // Signed, but the version is not the ONNX file's hash (the signer's mistake).
        let mut wrong = r.clone();
        wrong.version = "0".repeat(64);
        let e = Signed::sign(&wrong, Purpose::Release, &key)
            .unwrap()
            .open_release("f", &trusted)
            .unwrap_err();
        assert!(matches!(e, PackageError::Digest { .. }), "{e}");
        // Validly signed by the trusted key, for another fleet (fleets may share a key), or before
        // releases named their fleet: refused, naming both fleets.
        for (fleet, signed_for) in [("other", "other"), ("", "")] {
            let elsewhere = Release {
                fleet: fleet.into(),
                ..r.clone()
            };
            let e = Signed::sign(&elsewhere, Purpose::Release, &key)
                .unwrap()
                .open_release("f", &trusted)
                .unwrap_err();
            assert!(
                matches!(&e, PackageError::OtherFleet { signed, ours, .. } if signed == signed_for && ours == "f"),
                "{e}"
            );
        }
    }

    #[test]
    fn commands_round_trip() {
        let key = SecretKey::from_seed([1; 32]);
        let trusted = TrustedKeys::parse(&[key.public().to_hex()]).unwrap();
        let c = FleetCommand {
            fleet: "f".into(),
            issued_ms: 5,
            target: Target::Group("g".into()),
            order: Order::Rollback {
                version: "ab".repeat(32),
            },
        };
        let bytes =
            encode_command("f", &Signed::sign(&c, Purpose::Command, &key).unwrap()).unwrap();
        let (kind, s) = decode(&bytes, "f").unwrap();
        assert_eq!(kind, Kind::Command);
        assert_eq!(s.open_command("f", &trusted).unwrap().0, c);
        assert!(s.open_release("f", &trusted).is_err());
        // The same signed rollback replayed into another fleet that trusts the same key.
        let e = s.open_command("g", &trusted).unwrap_err();
        assert!(matches!(e, PackageError::OtherFleet { .. }), "{e}");
    }
}
