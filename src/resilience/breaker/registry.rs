//! [`BreakerRegistry`]: named breakers built from a configuration file.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use crate::base::config::ConfigError;
use std::path::{Path, PathBuf};

use crate::base::atomic_file;
use crate::resilience::breaker::{Breaker, BreakerConfig, BreakerMetrics, BreakerSnapshot};

/// Why a registry could not be built or could not give a breaker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The configuration is not valid TOML of the expected shape.
    #[error("the circuit breaker configuration does not parse: {0}")]
    Parse(#[from] toml::de::Error),
    /// A breaker's settings are out of range.
    #[error("circuit breaker `{breaker}`: {source}")]
    Invalid {
        /// The breaker (`defaults` for the defaults).
        breaker: String,
        /// What is wrong.
        source: ConfigError,
    },
    /// The registry already holds its maximum number of breakers.
    #[error("the registry holds its limit of {max} circuit breakers; `{breaker}` was not created")]
    LimitReached {
        /// The limit.
        max: usize,
        /// The breaker asked for.
        breaker: String,
    },
    /// The state file could not be read or written.
    #[error("circuit breaker state file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The state file does not hold what [`BreakerRegistry::save`] writes.
    #[error("circuit breaker state file {} does not parse: {source}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: serde_json::Error,
    },
}

/// What [`BreakerRegistry::save`] writes: a versioned list of snapshots.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    breakers: Vec<BreakerSnapshot>,
}

const STATE_VERSION: u32 = 1;

/// Named breakers built on demand from defaults and per-component
/// overrides, with a limit on how many exist.
///
/// # Configuration
///
/// ```toml
/// max_breakers = 50            # optional; 100 by default
///
/// [defaults]                   # any BreakerConfig field; the rest default
/// failure_rate = 0.5
/// open_for = "30s"
///
/// [breakers.pgmq]              # overrides for the breaker named "pgmq"
/// consecutive_failures = 3
/// open_for = "15s"
/// successes_to_close = 2
/// ```
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use streamz::breaker::BreakerRegistry;
///
/// let registry = BreakerRegistry::from_toml(r#"
///     max_breakers = 2
///     [defaults]
///     open_for = "30s"
///     [breakers.pgmq]
///     open_for = "15s"
/// "#)?;
/// let pgmq = registry.get("pgmq")?;
/// assert_eq!(pgmq.config().open_for, Duration::from_secs(15));
/// assert_eq!(registry.get("search")?.config().open_for, Duration::from_secs(30));
/// assert!(registry.get("pgmq")?.name() == "pgmq"); // the same breaker again
/// assert!(registry.get("third").is_err());          // over the limit
/// # Ok::<(), streamz::breaker::RegistryError>(())
/// ```
pub struct BreakerRegistry {
    defaults: toml::Table,
    overrides: HashMap<String, toml::Table>,
    max: usize,
    breakers: Mutex<Vec<Breaker>>,
}

impl fmt::Debug for BreakerRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerRegistry")
            .field("max", &self.max)
            .field("configured", &self.overrides.keys().collect::<Vec<_>>())
            .field("created", &self.lock().len())
            .finish()
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    max_breakers: Option<usize>,
    #[serde(default)]
    defaults: toml::Table,
    #[serde(default)]
    breakers: HashMap<String, toml::Table>,
}

impl BreakerRegistry {
    /// A registry from a TOML document (see above). Every configured
    /// breaker's settings are checked now, so a bad file fails at start.
    ///
    /// # Errors
    ///
    /// [`RegistryError::Parse`] for bad TOML or an unknown field,
    /// [`RegistryError::Invalid`] for a value out of range.
    pub fn from_toml(text: &str) -> Result<Self, RegistryError> {
        let file: File = toml::from_str(text)?;
        let registry = BreakerRegistry {
            defaults: file.defaults,
            overrides: file.breakers,
            max: file.max_breakers.unwrap_or(100),
            breakers: Mutex::new(Vec::new()),
        };
        registry.config_for("defaults", None)?;
        for name in registry.overrides.keys() {
            registry.config_for(name, registry.overrides.get(name))?;
        }
        Ok(registry)
    }

    /// A registry without a file: every breaker gets `defaults`.
    ///
    /// `defaults` is checked ([`BreakerConfig::validate`]) each time
    /// [`get`](BreakerRegistry::get) would create a breaker with it: an
    /// invalid configuration makes `get` fail with
    /// [`RegistryError::Invalid`] naming the breaker asked for, and no
    /// breaker is created.
    ///
    /// ```
    /// use streamz::breaker::{BreakerConfig, BreakerRegistry, RegistryError};
    ///
    /// let mut defaults = BreakerConfig::default();
    /// defaults.failure_rate = 0.0;
    /// let registry = BreakerRegistry::new(defaults, 10);
    /// let err = registry.get("pgmq").unwrap_err();
    /// assert!(matches!(&err, RegistryError::Invalid { breaker, source } if breaker == "pgmq" && source.field() == "failure_rate"));
    /// assert!(registry.breakers().is_empty());
    /// ```
    pub fn new(defaults: BreakerConfig, max_breakers: usize) -> Self {
        let defaults = toml::Table::try_from(defaults).expect("a config serialises to a table");
        BreakerRegistry {
            defaults,
            overrides: HashMap::new(),
            max: max_breakers,
            breakers: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Breaker>> {
        self.breakers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The defaults with `overrides` on top.
    fn config_for(
        &self,
        name: &str,
        overrides: Option<&toml::Table>,
    ) -> Result<BreakerConfig, RegistryError> {
        let mut table = self.defaults.clone();
        if let Some(o) = overrides {
            table.extend(o.clone());
        }
        let config: BreakerConfig = toml::Value::Table(table).try_into()?;
        config.validate().map_err(|source| RegistryError::Invalid {
            breaker: name.to_owned(),
            source,
        })?;
        Ok(config)
    }

    /// The breaker named `name`, created on first use with its configured
    /// settings (or the defaults). Every call with the same name returns
    /// the same shared breaker.
    ///
    /// # Errors
    ///
    /// [`RegistryError::LimitReached`] when creating it would pass the
    /// limit; [`RegistryError::Invalid`] when its configuration (the
    /// defaults given to [`new`](BreakerRegistry::new)) is out of range.
    pub fn get(&self, name: &str) -> Result<Breaker, RegistryError> {
        let mut breakers = self.lock();
        if let Some(b) = breakers.iter().find(|b| b.name() == name) {
            return Ok(b.clone());
        }
        if breakers.len() >= self.max {
            return Err(RegistryError::LimitReached {
                max: self.max,
                breaker: name.to_owned(),
            });
        }
        let config = self.config_for(name, self.overrides.get(name))?;
        let breaker = Breaker::new(name, config);
        breakers.push(breaker.clone());
        Ok(breaker)
    }

    /// The breakers created so far.
    pub fn breakers(&self) -> Vec<Breaker> {
        self.lock().clone()
    }

    /// A snapshot of every breaker created so far.
    pub fn metrics(&self) -> Vec<BreakerMetrics> {
        self.lock().iter().map(Breaker::metrics).collect()
    }

    /// What a restart needs of every breaker created so far
    /// ([`Breaker::snapshot`]), for storage of your own.
    pub fn snapshots(&self) -> Vec<BreakerSnapshot> {
        self.lock().iter().map(Breaker::snapshot).collect()
    }

    /// Restores each snapshot into the breaker of its name, creating the
    /// breaker from the configuration if it does not exist yet
    /// ([`get`](BreakerRegistry::get)). Returns how many were restored.
    ///
    /// # Errors
    ///
    /// What [`get`](BreakerRegistry::get) finds for a breaker it must
    /// create (the limit); the snapshots before it are restored.
    pub fn restore(&self, snapshots: &[BreakerSnapshot]) -> Result<usize, RegistryError> {
        for snapshot in snapshots {
            self.get(&snapshot.name)?.restore(snapshot);
        }
        Ok(snapshots.len())
    }

    /// Writes every breaker's state to `path` (JSON), so that
    /// [`load`](BreakerRegistry::load) after a restart carries each on
    /// where it was: an open breaker stays open for the rest of its open
    /// time. The file is replaced atomically (a temporary file beside it,
    /// synced, renamed over it, the directory synced), so a crash while
    /// saving leaves the previous state, never a torn one. Runs on
    /// tokio's blocking pool.
    ///
    /// Save when it matters: on shutdown, and from a transition listener
    /// ([`Breaker::on_transition`]) or a timer so that a crash keeps a
    /// recent state.
    ///
    /// # Errors
    ///
    /// [`RegistryError::Io`] if the file cannot be written (its directory
    /// must exist).
    ///
    /// ```
    /// use streamz::breaker::{BreakerConfig, BreakerRegistry, BreakerState};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("breakers.json");
    ///
    /// let registry = BreakerRegistry::new(BreakerConfig::default(), 10);
    /// registry.get("payments")?.force_open();
    /// registry.save(&path).await?;
    ///
    /// // After a restart: a new registry from the same configuration.
    /// let registry = BreakerRegistry::new(BreakerConfig::default(), 10);
    /// assert_eq!(registry.load(&path).await?, 1);
    /// assert_eq!(registry.get("payments")?.state(), BreakerState::ForcedOpen);
    /// # Ok(()) }
    /// ```
    pub async fn save(&self, path: impl AsRef<Path>) -> Result<(), RegistryError> {
        let path = path.as_ref().to_path_buf();
        let file = StateFile {
            version: STATE_VERSION,
            breakers: self.snapshots(),
        };
        let bytes = serde_json::to_vec_pretty(&file).expect("snapshots serialise to JSON");
        let target = path.clone();
        let written =
            crate::base::blocking::spawn_blocking(move || atomic_file::replace(&target, &bytes))
                .await;
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(RegistryError::Io { path, source }),
            Err(join) => Err(RegistryError::Io {
                path,
                source: std::io::Error::other(join.to_string()),
            }),
        }
    }

    /// Reads the state [`save`](BreakerRegistry::save) wrote and restores
    /// it ([`restore`](BreakerRegistry::restore)); returns how many
    /// breakers it restored. A missing file restores nothing and is not an
    /// error: the first start has no state. Runs on tokio's blocking pool.
    ///
    /// # Errors
    ///
    /// [`RegistryError::Io`] if the file exists but cannot be read,
    /// [`RegistryError::State`] if it is not a state file (nothing is
    /// restored then), and what [`restore`](BreakerRegistry::restore)
    /// finds.
    pub async fn load(&self, path: impl AsRef<Path>) -> Result<usize, RegistryError> {
        let path = path.as_ref().to_path_buf();
        let target = path.clone();
        let read = crate::base::blocking::spawn_blocking(move || std::fs::read(target)).await;
        let bytes = match read {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Ok(Err(source)) => return Err(RegistryError::Io { path, source }),
            Err(join) => {
                return Err(RegistryError::Io {
                    path,
                    source: std::io::Error::other(join.to_string()),
                });
            }
        };
        let file: StateFile = match serde_json::from_slice(&bytes) {
            Ok(file) => file,
            Err(source) => return Err(RegistryError::State { path, source }),
        };
        if file.version != STATE_VERSION {
            let source = serde::de::Error::custom(format!(
                "version {} is not {STATE_VERSION}, the one this streamz writes",
                file.version
            ));
            return Err(RegistryError::State { path, source });
        }
        self.restore(&file.breakers)
    }
}
