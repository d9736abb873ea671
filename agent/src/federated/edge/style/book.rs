//! The code book: the other labs' latest codes, kept per device and base model, and the sealing of this lab's own code.

use super::*;

/// Why a message on `style/<device>` was dropped (each is counted on the status board).
#[derive(Debug, thiserror::Error)]
pub enum CodeRejected {
    #[error("{topic}: not a style topic of this fleet")]
    Topic { topic: String },
    #[error("{topic}: {source}")]
    Envelope {
        topic: String,
        source: ProtocolError,
    },
    #[error("{topic}: a message of fleet {found:?}, this device is in fleet {expected:?}")]
    Fleet {
        topic: String,
        found: String,
        expected: String,
    },
    #[error("{topic}: sent by {sender:?} for a code of {code_device:?} (forged sender)")]
    Sender {
        topic: String,
        sender: String,
        code_device: String,
    },
    #[error("{topic}: the code was made by base model {code}, the envelope says {envelope}")]
    ModelVersion {
        topic: String,
        code: String,
        envelope: String,
    },
    #[error("{topic}: {source}")]
    Code { topic: String, source: StyleError },
}

/// What a style message did to the [`StyleBook`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// Another device's code, new or replacing its previous one.
    Stored { device: String },
    /// An empty (retained) payload: that device withdrew its code.
    Removed { device: String },
    /// This device's own code, as the broker holds it (`empty`: none is held).
    Own { empty: bool },
}

/// The latest style code of every other device of the fleet, as they arrive on `style/+`.
///
/// Codes of every base model are kept (a device's retained code arrives once, maybe before this
/// device has moved to the same base model); [`StyleBook::codes_for`] hands out only those of one
/// base model, since features of another encoder are not comparable.
#[derive(Debug)]
pub struct StyleBook {
    topics: Topics,
    fleet: String,
    device: String,
    codes: BTreeMap<String, StyleCode>,
    rejected: u64,
    generation: u64,
}

impl StyleBook {
    /// The book of `device` in `fleet`.
    pub fn new(fleet: &str, device: &str) -> Result<Self, String> {
        Ok(Self {
            topics: Topics::new(fleet)?,
            fleet: fleet.to_owned(),
            device: device.to_owned(),
            codes: BTreeMap::new(),
            rejected: 0,
            generation: 0,
        })
    }

    /// Takes one message of `microfed/<fleet>/style/+`. A refused message is counted
    /// ([`StyleBook::rejected`]) and leaves the book as it was.
    pub fn receive(&mut self, topic: &str, payload: &[u8]) -> Result<Received, CodeRejected> {
        let r = self.check(topic, payload);
        match &r {
            Ok(Received::Stored { .. } | Received::Removed { .. }) => self.generation += 1,
            Ok(Received::Own { .. }) => {}
            Err(_) => self.rejected += 1,
        }
        r
    }

    fn check(&mut self, topic: &str, payload: &[u8]) -> Result<Received, CodeRejected> {
        let Some(device) = self.topics.device_of("style", topic) else {
            return Err(CodeRejected::Topic {
                topic: topic.to_owned(),
            });
        };
        if payload.is_empty() {
            if device == self.device {
                return Ok(Received::Own { empty: true });
            }
            self.codes.remove(device);
            return Ok(Received::Removed {
                device: device.to_owned(),
            });
        }
        let bad = |source| CodeRejected::Envelope {
            topic: topic.to_owned(),
            source,
        };
        let env = Envelope::from_bytes(payload, MAX_PACKET_BYTES).map_err(bad)?;
        if env.fleet != self.fleet {
            return Err(CodeRejected::Fleet {
                topic: topic.to_owned(),
                found: env.fleet,
                expected: self.fleet.clone(),
            });
        }
        let code: StyleCode = env.body(Kind::StyleCode).map_err(bad)?;
        // The ACL lets a device write only its own topic; the sender and the code must say the same
        // device, or one lab could pass its code off as another's.
        if env.sender != device || code.device != device {
            return Err(CodeRejected::Sender {
                topic: topic.to_owned(),
                sender: env.sender,
                code_device: code.device,
            });
        }
        if code.model_version != env.model_version {
            return Err(CodeRejected::ModelVersion {
                topic: topic.to_owned(),
                code: code.model_version,
                envelope: env.model_version,
            });
        }
        code.validate().map_err(|source| CodeRejected::Code {
            topic: topic.to_owned(),
            source,
        })?;
        if device == self.device {
            return Ok(Received::Own { empty: false });
        }
        self.codes.insert(device.to_owned(), code);
        Ok(Received::Stored {
            device: device.to_owned(),
        })
    }

    /// The other devices' codes made by base model `model_version`, by device id.
    pub fn codes_for(&self, model_version: &str) -> Vec<StyleCode> {
        self.codes
            .values()
            .filter(|c| c.model_version == model_version)
            .cloned()
            .collect()
    }

    /// The devices whose codes [`StyleBook::codes_for`] returns (sorted).
    pub fn devices_for(&self, model_version: &str) -> Vec<String> {
        self.codes
            .values()
            .filter(|c| c.model_version == model_version)
            .map(|c| c.device.clone())
            .collect()
    }

    /// Messages refused so far.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Changes with every stored or removed code: the trainer needs the codes again.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// A code as it goes on `style/<device>`: an envelope of kind `style_code` from `code.device`.
pub fn seal_code(fleet: &str, round: u64, code: &StyleCode) -> Result<Vec<u8>, ProtocolError> {
    let header = Header {
        fleet,
        round,
        model_version: &code.model_version,
        sender: &code.device,
    };
    Envelope::seal(Kind::StyleCode, &header, code)?.to_bytes()
}
