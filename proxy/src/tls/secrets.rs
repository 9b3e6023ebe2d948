//! Secrets: certificates and validation contexts that TLS contexts name instead of carrying
//! (SDS). Each (source, name) has one slot; static secrets fill theirs at startup, ADS and
//! watched files whenever a new version arrives. Handshakes read the slot when they start, so
//! a rotated secret serves the next handshake and open connections are left alone.
//!
//! A secret file (`path_config_source`) holds a `DiscoveryResponse` in YAML or JSON, as
//! Envoy's do. It is read when a context first names it, then checked every second for a new
//! modification time, size or inode (a Kubernetes secret volume swaps a symlink); a version
//! that does not read leaves the last good one in place, with a warning.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use remora_config::tls::{SdsSecret, Secret, SecretKind, SecretSource};
use rustls::sign::CertifiedKey;

use super::LoadedValidation;
use crate::config::ConfigResult;

/// A secret's content, read and checked (PEM parsed, key matched to certificate, CAs loaded).
#[derive(Debug)]
pub enum LoadedSecret {
    Certificate {
        key: Arc<CertifiedKey>,
        /// Where the chain was read from (a file, or `<inline>`), for `/certs`.
        source: String,
    },
    Validation(Arc<LoadedValidation>),
}

/// One secret as it is now, with what `/certs` and `/config_dump` show.
#[derive(Debug)]
pub struct SecretValue {
    pub loaded: LoadedSecret,
    /// Counts up with every new value, so derived state (a combined validation) can tell.
    pub generation: u64,
    pub updated: SystemTime,
}

/// The current value of one secret; empty until it first arrives.
#[derive(Debug)]
pub struct SecretSlot {
    pub name: String,
    pub source: SecretSource,
    value: ArcSwapOption<SecretValue>,
}

impl SecretSlot {
    pub fn current(&self) -> Option<Arc<SecretValue>> {
        self.value.load_full()
    }

    pub fn is_ready(&self) -> bool {
        self.value.load().is_some()
    }
}

/// Every secret slot of the proxy, shared by listeners, clusters, the xDS client and admin.
#[derive(Debug)]
pub struct Secrets {
    slots: Mutex<BTreeMap<(SecretSource, String), Arc<SecretSlot>>>,
    generations: std::sync::atomic::AtomicU64,
    /// Secret files being watched.
    files: Mutex<BTreeSet<PathBuf>>,
    /// Where file watchers run (the main runtime).
    runtime: tokio::runtime::Handle,
}

impl Secrets {
    pub fn new(runtime: tokio::runtime::Handle) -> Arc<Secrets> {
        Arc::new(Secrets {
            slots: Mutex::default(),
            generations: Default::default(),
            files: Mutex::default(),
            runtime,
        })
    }

    /// The slot a TLS context's `sds_secret_config` names, made empty if new. A secret file
    /// is read now and watched from now on.
    pub fn slot(self: &Arc<Self>, sds: &SdsSecret) -> Arc<SecretSlot> {
        if let SecretSource::File(path) = &sds.source {
            self.watch(path);
        }
        self.slot_for(&sds.source, &sds.name)
    }

    fn watch(self: &Arc<Self>, path: &Path) {
        if !self
            .files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_path_buf())
        {
            return;
        }
        let mut seen = file_stamp(path);
        self.load_file(path);
        let secrets = Arc::downgrade(self);
        let path = path.to_path_buf();
        self.runtime.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(secrets) = secrets.upgrade() else {
                    return;
                };
                let stamp = file_stamp(&path);
                if stamp != seen {
                    seen = stamp;
                    secrets.load_file(&path);
                }
            }
        });
    }

    /// Reads every secret of a secret file into its slot.
    fn load_file(&self, path: &Path) {
        match read_secret_file(path) {
            Ok(secrets) => {
                let source = SecretSource::File(path.to_path_buf());
                for secret in secrets {
                    if let Err(error) = self.set(&source, &secret) {
                        tracing::warn!(file = %path.display(), secret = %secret.name, %error, "secret file: keeping the last good version");
                    }
                }
            }
            Err(error) => {
                tracing::warn!(file = %path.display(), %error, "secret file: keeping the last good version");
            }
        }
    }

    fn slot_for(&self, source: &SecretSource, name: &str) -> Arc<SecretSlot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .entry((source.clone(), name.to_string()))
            .or_insert_with(|| {
                Arc::new(SecretSlot {
                    name: name.to_string(),
                    source: source.clone(),
                    value: ArcSwapOption::empty(),
                })
            })
            .clone()
    }

    /// Reads `secret` and makes it the current value of its slot. An error (unreadable PEM,
    /// a key that is not the certificate's) names the field and leaves the last good value.
    pub fn set(&self, source: &SecretSource, secret: &Secret) -> ConfigResult<()> {
        let loaded = match &secret.kind {
            SecretKind::Certificate(certificate) => LoadedSecret::Certificate {
                key: super::load_certificate(certificate)?,
                source: super::source_name(&certificate.chain),
            },
            SecretKind::Validation(validation) => {
                LoadedSecret::Validation(Arc::new(LoadedValidation::load(validation)?))
            }
        };
        let generation = 1 + self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.slot_for(source, &secret.name)
            .value
            .store(Some(Arc::new(SecretValue {
                loaded,
                generation,
                updated: SystemTime::now(),
            })));
        Ok(())
    }

    /// The current value of a secret, if it has one (no slot is made, no file watched).
    pub fn peek(&self, sds: &SdsSecret) -> Option<Arc<SecretValue>> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .get(&(sds.source.clone(), sds.name.clone()))
            .and_then(|slot| slot.current())
    }

    /// Whether the secrets `named` have all arrived.
    pub fn all_ready<'a>(&self, mut named: impl Iterator<Item = &'a SdsSecret>) -> bool {
        named.all(|sds| self.slot_for(&sds.source, &sds.name).is_ready())
    }

    /// Every slot with a value, for `/certs`.
    pub fn filled(&self) -> Vec<Arc<SecretSlot>> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.values().filter(|s| s.is_ready()).cloned().collect()
    }
}

/// What tells a new version of a file: modification time, size and inode.
fn file_stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len(), metadata.ino()))
}

/// The secrets of a `DiscoveryResponse` file (YAML or JSON).
fn read_secret_file(path: &Path) -> Result<Vec<Secret>, String> {
    use xds_api::envoy::service::discovery::v3::DiscoveryResponse;
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let response: DiscoveryResponse =
        xds_api::json::from_yaml_str(&text).map_err(|e| format!("not a DiscoveryResponse: {e}"))?;
    response
        .resources
        .iter()
        .enumerate()
        .map(|(index, any)| {
            if any.type_url != xds_api::type_urls::SECRET {
                return Err(format!(
                    "resources[{index}]: a {} where a Secret was expected",
                    any.type_url
                ));
            }
            remora_config::resource::secret(&any.value)
                .map_err(|e| format!("resources[{index}]: {e}"))
        })
        .collect()
}
