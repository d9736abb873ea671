//! Ed25519 keys and signatures of the fleet: who may change the models the microscopes run.
//!
//! Map:
//! - [`SecretKey`]: the fleet manager's signing key, stored as PKCS#8 PEM (the format of
//!   `openssl genpkey -algorithm ed25519`, so operators can make and keep keys with their usual
//!   tools); [`SecretKey::generate`], [`SecretKey::load`], [`SecretKey::save`].
//! - [`PublicKey`]: 32 bytes, written as 64 hex digits (the form agents list in their configuration).
//! - [`TrustedKeys`]: the keys one agent accepts; [`TrustedKeys::verify`] says why a signature is not
//!   accepted (none, unknown key, wrong signature).
//! - [`Purpose`]: every signature covers a purpose tag before the bytes, so a signed rollback command can
//!   never be replayed as a model release or the other way round.

use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

/// Why a key could not be read or a signature was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not an Ed25519 private key in PKCS#8 PEM: {message}")]
    BadSecretKey { path: PathBuf, message: String },
    #[error("{path}: refusing to overwrite an existing key")]
    Exists { path: PathBuf },
    #[error("public key `{text}`: {problem}")]
    BadPublicKey { text: String, problem: String },
    #[error("unsigned: the {what} carries no signature")]
    Unsigned { what: &'static str },
    #[error("signed with key {key}, which this agent does not trust")]
    UntrustedKey { key: String },
    #[error("bad signature: the {what} was changed after it was signed by {key}")]
    BadSignature { what: &'static str, key: String },
}

/// What a signature is for; the tag is signed with the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A model version (manifest + ONNX + target).
    Release,
    /// A fleet command (rollback).
    Command,
    /// An aggregator's message to the devices: a global decoder or a round announcement (the
    /// envelope's header and body digest, [`crate::wire::protocol::Envelope::sign`]).
    Aggregator,
    /// A device's public keys for one secure-aggregation round ([`crate::federated::secagg`]),
    /// signed with the device key enrolled with the fleet.
    SecAggKeys,
}

impl Purpose {
    fn tag(self) -> &'static [u8] {
        match self {
            Self::Release => b"microfed fleet release v1\0",
            Self::Command => b"microfed fleet command v1\0",
            Self::Aggregator => b"microfed aggregator message v1\0",
            Self::SecAggKeys => b"microfed secagg round keys v1\0",
        }
    }
    fn what(self) -> &'static str {
        match self {
            Self::Release => "model version",
            Self::Command => "command",
            Self::Aggregator => "aggregator message",
            Self::SecAggKeys => "secure-aggregation round keys",
        }
    }
    fn message(self, bytes: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(self.tag().len() + bytes.len());
        m.extend_from_slice(self.tag());
        m.extend_from_slice(bytes);
        m
    }
}

/// An Ed25519 public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// From 64 hex digits (surrounding white space ignored).
    pub fn parse(text: &str) -> Result<Self, SigningError> {
        let bad = |problem: &str| SigningError::BadPublicKey {
            text: text.to_owned(),
            problem: problem.to_owned(),
        };
        let bytes = hex::decode(text.trim()).map_err(|_| bad("not hexadecimal"))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| bad("an Ed25519 public key is 32 bytes (64 hex digits)"))?;
        VerifyingKey::from_bytes(&arr).map_err(|_| bad("not a point on Ed25519's curve"))?;
        Ok(Self(arr))
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Checks that `signature` is this key's signature of `bytes` for `purpose`.
    pub fn verify(
        &self,
        purpose: Purpose,
        bytes: &[u8],
        signature: Option<&[u8]>,
    ) -> Result<(), SigningError> {
        TrustedKeys(vec![*self])
            .verify(purpose, bytes, Some(&self.0), signature)
            .map(|_| ())
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The fleet manager's signing key.
pub struct SecretKey(SigningKey);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "SecretKey(public {})", self.public())
    }
}

impl SecretKey {
    /// A new key from the operating system's randomness (through rand's reseeded CSPRNG).
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut seed = [0u8; 32];
        rand::rng().fill_bytes(&mut seed);
        Self(SigningKey::from_bytes(&seed))
    }

    /// From a 32-byte seed (tests, and keys kept elsewhere).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// Reads a PKCS#8 PEM file.
    pub fn load(path: &Path) -> Result<Self, SigningError> {
        let text = std::fs::read_to_string(path).map_err(|source| SigningError::Io {
            path: path.to_owned(),
            source,
        })?;
        SigningKey::from_pkcs8_pem(&text)
            .map(Self)
            .map_err(|e| SigningError::BadSecretKey {
                path: path.to_owned(),
                message: e.to_string(),
            })
    }

    /// Writes the key as PKCS#8 PEM, readable by its owner only; never overwrites a file.
    pub fn save(&self, path: &Path) -> Result<(), SigningError> {
        let io = |source| SigningError::Io {
            path: path.to_owned(),
            source,
        };
        let pem =
            self.0
                .to_pkcs8_pem(Default::default())
                .map_err(|e| SigningError::BadSecretKey {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                SigningError::Exists {
                    path: path.to_owned(),
                }
            } else {
                io(e)
            }
        })?;
        use std::io::Write;
        file.write_all(pem.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io)
    }

    /// Signs `bytes` for `purpose`.
    pub fn sign(&self, purpose: Purpose, bytes: &[u8]) -> [u8; 64] {
        self.0.sign(&purpose.message(bytes)).to_bytes()
    }
}

/// The public keys an agent accepts signatures from.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(Vec<PublicKey>);

impl TrustedKeys {
    /// From the hex keys of the configuration; an empty list is refused (the agent would accept no
    /// model at all, which is surely a mistake in the file).
    pub fn parse(keys: &[String]) -> Result<Self, SigningError> {
        if keys.is_empty() {
            return Err(SigningError::BadPublicKey {
                text: String::new(),
                problem: "`trusted_keys` is empty: list the fleet manager's public key".into(),
            });
        }
        keys.iter()
            .map(|k| PublicKey::parse(k))
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.0
    }

    /// Checks that `signature` is a signature of `bytes` for `purpose` by one of the trusted keys.
    pub fn verify(
        &self,
        purpose: Purpose,
        bytes: &[u8],
        key: Option<&[u8]>,
        signature: Option<&[u8]>,
    ) -> Result<PublicKey, SigningError> {
        let what = purpose.what();
        let (Some(key), Some(signature)) = (key, signature) else {
            return Err(SigningError::Unsigned { what });
        };
        let Ok(key) = <[u8; 32]>::try_from(key) else {
            return Err(SigningError::UntrustedKey {
                key: hex::encode(key),
            });
        };
        let key = PublicKey(key);
        if !self.0.contains(&key) {
            return Err(SigningError::UntrustedKey { key: key.to_hex() });
        }
        let bad = || SigningError::BadSignature {
            what,
            key: key.to_hex(),
        };
        let signature = Signature::from_slice(signature).map_err(|_| bad())?;
        let verifying = VerifyingKey::from_bytes(&key.0).map_err(|_| bad())?;
        // verify_strict: no malleable or small-order-key signatures.
        verifying
            .verify_strict(&purpose.message(bytes), &signature)
            .map_err(|_| bad())?;
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_every_refusal() {
        let k = SecretKey::from_seed([7; 32]);
        let other = SecretKey::from_seed([8; 32]);
        let trusted = TrustedKeys::parse(&[k.public().to_hex()]).unwrap();
        let msg = b"model bytes";
        let sig = k.sign(Purpose::Release, msg);
        let pk = k.public().0;
        assert_eq!(
            trusted
                .verify(Purpose::Release, msg, Some(&pk), Some(&sig))
                .unwrap(),
            k.public()
        );
        // Changed bytes, another purpose, another key, no signature.
        let e = trusted
            .verify(Purpose::Release, b"model bytez", Some(&pk), Some(&sig))
            .unwrap_err();
        assert!(matches!(e, SigningError::BadSignature { .. }), "{e}");
        let e = trusted
            .verify(Purpose::Command, msg, Some(&pk), Some(&sig))
            .unwrap_err();
        assert!(matches!(e, SigningError::BadSignature { .. }), "{e}");
        let osig = other.sign(Purpose::Release, msg);
        let e = trusted
            .verify(Purpose::Release, msg, Some(&other.public().0), Some(&osig))
            .unwrap_err();
        assert!(e.to_string().contains(&other.public().to_hex()), "{e}");
        // A trusted key with another key's signature.
        assert!(matches!(
            trusted.verify(Purpose::Release, msg, Some(&pk), Some(&osig)),
            Err(SigningError::BadSignature { .. })
        ));
        assert!(matches!(
            trusted.verify(Purpose::Release, msg, None, None),
            Err(SigningError::Unsigned { .. })
        ));
        assert!(matches!(
            trusted.verify(Purpose::Release, msg, Some(&pk), Some(&sig[..63])),
            Err(SigningError::BadSignature { .. })
        ));
    }

    #[test]
    fn public_key_of_rfc8032_test_vector_1() {
        let seed: [u8; 32] =
            hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
                .unwrap()
                .try_into()
                .unwrap();
        assert_eq!(
            SecretKey::from_seed(seed).public().to_hex(),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
    }

    #[test]
    fn keys_round_trip_through_pem_and_hex() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.key");
        let k = SecretKey::generate();
        k.save(&path).unwrap();
        assert!(matches!(k.save(&path), Err(SigningError::Exists { .. })));
        let back = SecretKey::load(&path).unwrap();
        assert_eq!(back.public(), k.public());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{text}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(PublicKey::parse(&k.public().to_hex()).unwrap(), k.public());
        assert!(PublicKey::parse("abcd").is_err());
        assert!(PublicKey::parse(&"zz".repeat(32)).is_err());
        assert!(TrustedKeys::parse(&[]).is_err());
        std::fs::write(dir.path().join("bad.key"), "not a key").unwrap();
        assert!(matches!(
            SecretKey::load(&dir.path().join("bad.key")),
            Err(SigningError::BadSecretKey { .. })
        ));
    }
}
