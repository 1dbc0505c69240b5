//! [`BreakerRegistry`]: named breakers built from a configuration file.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use crate::base::config::ConfigError;
use crate::resilience::breaker::{Breaker, BreakerConfig, BreakerMetrics};

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
}

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
}
