//! [`HttpProbe`]: an HTTP GET health check (feature `http`).

use std::time::Duration;

use crate::config::ConfigError;
use crate::health::{Health, HealthCheck};

/// A health check that sends `GET url`: any 2xx answer is healthy; another
/// status, a connection error or no answer within the timeout is
/// unhealthy, with the reason.
///
/// Built on reqwest without TLS, so it takes `http://` URLs; enable one of
/// reqwest's TLS features in your own `Cargo.toml` for `https://`. Probes
/// go straight to the endpoint, never through a proxy from the
/// environment.
///
/// # Default
///
/// A 2 s timeout per request. (The [`HealthGate`](crate::HealthGate) also
/// limits each check, 5 s by default; the shorter limit wins.)
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use streamz::{HealthGate, HttpProbe};
///
/// # fn main() -> Result<(), streamz::ConfigError> {
/// let probe = HttpProbe::new("http://127.0.0.1:8080/health")?.with_timeout(Duration::from_millis(500))?;
/// let gate = HealthGate::new(probe).with_interval(Duration::from_secs(2))?;
///
/// assert!(HttpProbe::new("not a url").is_err());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct HttpProbe {
    client: reqwest::Client,
    url: reqwest::Url,
    timeout: Duration,
}

impl HttpProbe {
    /// A probe of `url`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] if `url` does not parse as an absolute URL,
    /// or the HTTP client cannot be built.
    pub fn new(url: &str) -> Result<Self, ConfigError> {
        let url = reqwest::Url::parse(url).map_err(|_| ConfigError::Invalid {
            field: "url",
            reason: "must be an absolute URL such as http://127.0.0.1:8080/health",
        })?;
        let client =
            reqwest::Client::builder()
                .no_proxy()
                .build()
                .map_err(|_| ConfigError::Invalid {
                    field: "client",
                    reason: "the HTTP client could not be built",
                })?;
        Ok(HttpProbe {
            client,
            url,
            timeout: Duration::from_secs(2),
        })
    }

    /// How long a request may take (2 s by default).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] for a zero timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Result<Self, ConfigError> {
        if timeout.is_zero() {
            return Err(ConfigError::Zero { field: "timeout" });
        }
        self.timeout = timeout;
        Ok(self)
    }

    /// The probed URL.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }
}

impl HealthCheck for HttpProbe {
    async fn check(&mut self) -> Health {
        let url = &self.url;
        match self
            .client
            .get(url.clone())
            .timeout(self.timeout)
            .send()
            .await
        {
            Ok(answer) if answer.status().is_success() => Health::Healthy,
            Ok(answer) => Health::unhealthy(format!("GET {url} answered {}", answer.status())),
            Err(e) if e.is_timeout() => {
                Health::unhealthy(format!("GET {url} had no answer within {:?}", self.timeout))
            }
            Err(e) => {
                // reqwest's own message is short; the cause says why.
                let mut reason = format!("GET {url} failed: {e}");
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    reason.push_str(": ");
                    reason.push_str(&cause.to_string());
                    source = cause.source();
                }
                Health::unhealthy(reason)
            }
        }
    }
}
