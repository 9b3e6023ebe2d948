//! Secrets: certificates and validation contexts that TLS contexts name instead of carrying
//! (SDS). Each (source, name) has one slot; static secrets fill theirs at startup, ADS, watched
//! files and SDS streams of their own (`api_config_source`, opened by the xDS client's `sds`)
//! whenever a new version arrives. Handshakes read the slot when they start, so
//! a rotated secret serves the next handshake and open connections are left alone.
//!
//! A secret file (`path_config_source`) holds a `DiscoveryResponse` in YAML or JSON, as
//! Envoy's do. It is read when a context first names it, then checked every second for a new
//! modification time, size or inode (a Kubernetes secret volume swaps a symlink); a version
//! that does not read leaves the last good one in place, with a warning.
//!
//! Static listeners and clusters that name secrets not yet in are part of the server's
//! initialization, as Envoy's SDS init targets: [`Secrets::wait_initial`] waits until each has
//! arrived or its `initial_fetch_timeout` has passed, and says which never came.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use remora_config::tls::{GrpcSecretSource, SdsSecret, Secret, SecretKind, SecretSource};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use super::LoadedValidation;
use crate::config::ConfigResult;
use crate::stats::Registry;

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
    /// The latest generation stored: what [`Secrets::wait_initial`] wakes on.
    changed: watch::Sender<u64>,
    /// The SDS streams of secrets from gRPC sources.
    streams: Mutex<Streams>,
}

/// Opens the SDS stream of one secret from a gRPC source (see [`Secrets::open_streams_with`]).
pub type OpenStream = Box<dyn Fn(GrpcSecretSource, String) + Send + Sync>;

/// The gRPC-sourced secrets named so far, and how their streams open.
#[derive(Default)]
struct Streams {
    named: BTreeSet<(GrpcSecretSource, String)>,
    /// Unset until the clusters the streams reach are in place; named secrets wait.
    open: Option<OpenStream>,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("named", &self.named)
            .finish_non_exhaustive()
    }
}

/// A secret that initialization waits for, and what names it (`listener NAME`,
/// `cluster NAME`), for the logs.
#[derive(Debug, Clone)]
pub struct Awaited {
    pub secret: SdsSecret,
    pub users: Vec<String>,
}

impl Awaited {
    /// The secrets `users` name, one entry per secret. A secret named with different
    /// timeouts waits for the longest (zero, for ever, is the longest).
    pub fn collect<'a>(users: impl IntoIterator<Item = (String, &'a SdsSecret)>) -> Vec<Awaited> {
        let mut awaited: Vec<Awaited> = Vec::new();
        for (user, sds) in users {
            match awaited
                .iter_mut()
                .find(|a| a.secret.source == sds.source && a.secret.name == sds.name)
            {
                Some(entry) => {
                    let (old, new) = (
                        entry.secret.initial_fetch_timeout,
                        sds.initial_fetch_timeout,
                    );
                    if !old.is_zero() && (new.is_zero() || new > old) {
                        entry.secret.initial_fetch_timeout = new;
                    }
                    if !entry.users.contains(&user) {
                        entry.users.push(user);
                    }
                }
                None => awaited.push(Awaited {
                    secret: sds.clone(),
                    users: vec![user],
                }),
            }
        }
        awaited
    }
}

impl Secrets {
    pub fn new(runtime: tokio::runtime::Handle) -> Arc<Secrets> {
        Arc::new(Secrets {
            slots: Mutex::default(),
            generations: Default::default(),
            files: Mutex::default(),
            runtime,
            changed: watch::Sender::new(0),
            streams: Mutex::default(),
        })
    }

    /// Opens, through `open`, the SDS stream of every gRPC-sourced secret named so far and of
    /// each one named later, once per source and name.
    pub fn open_streams_with(&self, open: OpenStream) {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        for (source, name) in &streams.named {
            open(source.clone(), name.clone());
        }
        streams.open = Some(open);
    }

    /// A receiver that wakes whenever a secret gets a new value.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn stream(&self, source: &GrpcSecretSource, name: &str) {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if streams.named.insert((source.clone(), name.to_string()))
            && let Some(open) = &streams.open
        {
            open(source.clone(), name.to_string());
        }
    }

    /// The slot a TLS context's `sds_secret_config` names, made empty if new. A secret file
    /// is read now and watched from now on.
    pub fn slot(self: &Arc<Self>, sds: &SdsSecret) -> Arc<SecretSlot> {
        match &sds.source {
            SecretSource::File(path) => self.watch(path),
            SecretSource::Grpc(grpc) => self.stream(grpc, &sds.name),
            SecretSource::Static | SecretSource::Ads => {}
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
        self.changed.send_replace(generation);
        Ok(())
    }

    /// Waits until every secret of `awaited` has a value or its initial fetch timeout has
    /// passed (counted from now), as Envoy's server initialization waits for the SDS secrets
    /// of static listeners and clusters. Logs each secret waited for and who names it, each
    /// arrival, and each secret that never came (counted in `sds.NAME.init_fetch_timeout`).
    pub async fn wait_initial(self: &Arc<Self>, awaited: Vec<Awaited>, registry: &Registry) {
        let start = tokio::time::Instant::now();
        let mut changed = self.changed.subscribe();
        let mut pending: Vec<Awaited> = awaited
            .into_iter()
            .filter(|a| !self.slot(&a.secret).is_ready())
            .collect();
        for a in &pending {
            tracing::info!(
                secret = %a.secret.name,
                source = %source_name(&a.secret.source),
                named_by = %a.users.join(", "),
                initial_fetch_timeout = ?a.secret.initial_fetch_timeout,
                "initializing: waiting for a secret before starting what names it"
            );
        }
        loop {
            let now = tokio::time::Instant::now();
            pending.retain(|a| {
                let timeout = a.secret.initial_fetch_timeout;
                if self.slot(&a.secret).is_ready() {
                    tracing::info!(secret = %a.secret.name, named_by = %a.users.join(", "), "initializing: secret arrived");
                    false
                } else if !timeout.is_zero() && now >= start + timeout {
                    tracing::warn!(
                        secret = %a.secret.name,
                        source = %source_name(&a.secret.source),
                        named_by = %a.users.join(", "),
                        initial_fetch_timeout = ?timeout,
                        "initializing: secret did not arrive in time; starting without it (its TLS handshakes fail until it arrives)"
                    );
                    registry
                        .counter(format!("sds.{}.init_fetch_timeout", a.secret.name))
                        .inc();
                    false
                } else {
                    true
                }
            });
            if pending.is_empty() {
                return;
            }
            let next = pending
                .iter()
                .map(|a| a.secret.initial_fetch_timeout)
                .filter(|t| !t.is_zero())
                .min()
                .map(|t| start + t);
            let deadline = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                result = changed.changed() => if result.is_err() { return },
                () = deadline => {}
            }
        }
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

/// A secret source, for logs.
fn source_name(source: &SecretSource) -> String {
    match source {
        SecretSource::Static => "static".into(),
        SecretSource::Ads => "ADS".into(),
        SecretSource::File(path) => format!("file {}", path.display()),
        SecretSource::Grpc(grpc) => format!("SDS cluster {}", grpc.cluster),
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use remora_config::common::DataSource;
    use remora_config::tls::Certificate;

    use super::*;

    fn ads(name: &str, timeout: u64) -> SdsSecret {
        SdsSecret {
            name: name.into(),
            source: SecretSource::Ads,
            initial_fetch_timeout: Duration::from_secs(timeout),
            path: "t".into(),
        }
    }

    fn certificate(name: &str) -> Secret {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        Secret {
            name: name.into(),
            kind: SecretKind::Certificate(Certificate {
                chain: DataSource::Inline(cert.pem().into_bytes()),
                key: DataSource::Inline(key.serialize_pem().into_bytes()),
                path: "t".into(),
            }),
        }
    }

    #[test]
    fn a_secret_named_twice_is_awaited_once_for_the_longest_timeout() {
        let (a5, a9, b0, b3) = (ads("a", 5), ads("a", 9), ads("b", 0), ads("b", 3));
        let awaited = Awaited::collect([
            ("listener l".to_string(), &a5),
            ("cluster c".to_string(), &a9),
            ("listener l".to_string(), &a9),
            ("listener l".to_string(), &b0),
            ("cluster c".to_string(), &b3),
        ]);
        let summary: Vec<(&str, Duration, Vec<String>)> = awaited
            .iter()
            .map(|a| {
                (
                    a.secret.name.as_str(),
                    a.secret.initial_fetch_timeout,
                    a.users.clone(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "a",
                    Duration::from_secs(9),
                    vec!["listener l".to_string(), "cluster c".to_string()]
                ),
                (
                    "b",
                    Duration::ZERO,
                    vec!["listener l".to_string(), "cluster c".to_string()]
                ),
            ]
        );
    }

    /// A secret that arrives ends the wait at once; one that does not ends it at its
    /// timeout, counted in `sds.NAME.init_fetch_timeout`.
    #[tokio::test(start_paused = true)]
    async fn initialization_waits_for_secrets_until_each_timeout() {
        let secrets = Secrets::new(tokio::runtime::Handle::current());
        let registry = Registry::default();
        let start = tokio::time::Instant::now();
        let arriving = secrets.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            arriving
                .set(&SecretSource::Ads, &certificate("early"))
                .unwrap();
        });
        let awaited = Awaited::collect([("listener l".to_string(), &ads("early", 10))]);
        secrets.wait_initial(awaited, &registry).await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(registry.counter("sds.early.init_fetch_timeout").get(), 0);

        let start = tokio::time::Instant::now();
        let (never, early) = (ads("never", 5), ads("early", 10));
        let awaited = Awaited::collect([
            ("listener l".to_string(), &never),
            ("cluster c".to_string(), &early),
        ]);
        secrets.wait_initial(awaited, &registry).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(registry.counter("sds.never.init_fetch_timeout").get(), 1);
    }
}
