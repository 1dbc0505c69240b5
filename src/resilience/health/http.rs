//! [`HttpProbe`]: an HTTP GET health check (feature `http`).

use std::time::Duration;

use crate::base::config::ConfigError;
use crate::resilience::health::{Health, HealthCheck};

/// A health check that sends `GET url`: any 2xx answer is healthy; another
/// status (a 3xx included), a connection error or no answer within the
/// timeout is unhealthy, with the reason.
///
/// Built on reqwest without TLS, so it takes only `http://` URLs and
/// refuses any other scheme when it is built (an `https://` endpoint could
/// never be checked). Probes go straight to the endpoint, never through a
/// proxy from the environment.
///
/// Redirects are not followed by default: a health endpoint that redirects
/// is usually misconfigured, and following one could make the gate depend
/// on another service. A 3xx answer is unhealthy, and its reason names the
/// redirect's target. [`follow_redirects`](HttpProbe::follow_redirects)
/// follows a bounded number of them, to `http://` URLs only.
///
/// # Default
///
/// A 2 s timeout per request. (The [`HealthGate`](crate::HealthGate) also
/// limits each check, 5 s by default; the shorter limit wins.) No
/// redirects followed.
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
/// // Only plain HTTP: the probe is built without TLS.
/// assert!(HttpProbe::new("https://127.0.0.1:8443/health").is_err());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct HttpProbe {
    client: reqwest::Client,
    url: reqwest::Url,
    /// The URL as it may be shown: credentials and query values redacted.
    shown: String,
    timeout: Duration,
    max_redirects: usize,
}

impl std::fmt::Debug for HttpProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpProbe")
            .field("url", &self.shown)
            .field("timeout", &self.timeout)
            .field("max_redirects", &self.max_redirects)
            .finish_non_exhaustive()
    }
}

/// `url` with its user name, password and query values replaced by `***`:
/// what a probe shows of a URL in reasons, logs and `Debug`. The request
/// itself uses the full URL.
fn redact(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    if !shown.username().is_empty() {
        let _ = shown.set_username("***");
    }
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    if shown.query().is_some() {
        let keys: Vec<String> = url.query_pairs().map(|(k, _)| k.into_owned()).collect();
        let mut pairs = shown.query_pairs_mut();
        pairs.clear();
        for k in keys {
            pairs.append_pair(&k, "***");
        }
    }
    shown.to_string()
}

/// Why a URL is refused.
const NOT_HTTP: &str =
    "must be an http:// URL: the probe is built without TLS and speaks only plain HTTP";

/// The client, following at most `max_redirects` redirects, each to an
/// `http://` URL; a redirect it does not follow comes back as the 3xx answer.
fn client(max_redirects: usize) -> Result<reqwest::Client, ConfigError> {
    let policy = if max_redirects == 0 {
        reqwest::redirect::Policy::none()
    } else {
        reqwest::redirect::Policy::custom(move |attempt| {
            // `previous` holds every URL requested so far: one before the
            // first redirect.
            if attempt.url().scheme() == "http" && attempt.previous().len() <= max_redirects {
                attempt.follow()
            } else {
                attempt.stop()
            }
        })
    };
    reqwest::Client::builder()
        .no_proxy()
        .redirect(policy)
        .build()
        .map_err(|_| ConfigError::Invalid {
            field: "client",
            reason: "the HTTP client could not be built",
        })
}

impl HttpProbe {
    /// A probe of `url`, which must be an absolute `http://` URL.
    ///
    /// ```
    /// use streamz::{ConfigError, HttpProbe};
    ///
    /// let probe = HttpProbe::new("http://127.0.0.1:8080/health").unwrap();
    /// assert_eq!(probe.url(), "http://127.0.0.1:8080/health");
    /// assert!(matches!(
    ///     HttpProbe::new("ftp://127.0.0.1/health"),
    ///     Err(ConfigError::Invalid { field: "url", .. })
    /// ));
    /// ```
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] for the field `url` if it does not parse as
    /// an absolute URL or its scheme is not `http` (`https`, `ftp`, ...: this
    /// probe has no TLS and speaks only HTTP); for the field `client` if the
    /// HTTP client cannot be built.
    pub fn new(url: &str) -> Result<Self, ConfigError> {
        let url = reqwest::Url::parse(url).map_err(|_| ConfigError::Invalid {
            field: "url",
            reason: "must be an absolute URL such as http://127.0.0.1:8080/health",
        })?;
        if url.scheme() != "http" {
            return Err(ConfigError::Invalid {
                field: "url",
                reason: NOT_HTTP,
            });
        }
        Ok(HttpProbe {
            shown: redact(&url),
            client: client(0)?,
            url,
            timeout: Duration::from_secs(2),
            max_redirects: 0,
        })
    }

    /// Follows up to `max` redirects, each to an `http://` URL, and judges
    /// the answer at the end (0, the default, follows none). A redirect
    /// beyond `max`, or to another scheme, is not followed: its 3xx answer
    /// is unhealthy, with the reason.
    ///
    /// ```
    /// use streamz::HttpProbe;
    ///
    /// # fn main() -> Result<(), streamz::ConfigError> {
    /// // The endpoint answers 308 to the same path with a trailing slash.
    /// let probe = HttpProbe::new("http://127.0.0.1:8080/health")?.follow_redirects(1)?;
    /// assert_eq!(probe.url(), "http://127.0.0.1:8080/health");
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] for the field `client` if the HTTP client
    /// cannot be built.
    pub fn follow_redirects(mut self, max: usize) -> Result<Self, ConfigError> {
        self.client = client(max)?;
        self.max_redirects = max;
        Ok(self)
    }

    /// How long a request may take (2 s by default); `Duration::MAX` for no
    /// time limit (the gate's own check timeout still applies).
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

    /// The probed URL as the probe shows it: a user name, a password and
    /// query values are replaced by `***` (the request uses them).
    ///
    /// ```
    /// # fn main() -> Result<(), streamz::ConfigError> {
    /// let probe = streamz::HttpProbe::new("http://ops:s3cret@127.0.0.1:8080/health?token=abc")?;
    /// assert_eq!(probe.url(), "http://***:***@127.0.0.1:8080/health?token=***");
    /// assert!(!format!("{probe:?}").contains("s3cret"));
    /// # Ok(()) }
    /// ```
    pub fn url(&self) -> &str {
        &self.shown
    }
}

impl HttpProbe {
    /// Why a 3xx answer is unhealthy: where it pointed and why the probe
    /// did not go there.
    fn redirect_reason(&self, answer: &reqwest::Response) -> String {
        let at = answer.url();
        let mut reason = format!("GET {} answered {}", self.shown, answer.status());
        if *at != self.url {
            reason.push_str(&format!(" at {}", redact(at)));
        }
        let target = answer
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| at.join(l).ok());
        if let Some(to) = target {
            let why = if self.max_redirects == 0 {
                "redirects are not followed".to_owned()
            } else if to.scheme() != "http" {
                "only http:// redirects are followed".to_owned()
            } else {
                let n = self.max_redirects;
                format!("more than {n} redirect{}", if n == 1 { "" } else { "s" })
            };
            reason.push_str(&format!(", a redirect to {} ({why})", redact(&to)));
        }
        reason
    }
}

impl HealthCheck for HttpProbe {
    async fn check(&mut self) -> Health {
        let url = &self.shown;
        match self
            .client
            .get(self.url.clone())
            .timeout(self.timeout)
            .send()
            .await
        {
            Ok(answer) if answer.status().is_success() => Health::Healthy,
            Ok(answer) if answer.status().is_redirection() => {
                Health::unhealthy(self.redirect_reason(&answer))
            }
            Ok(answer) => Health::unhealthy(format!("GET {url} answered {}", answer.status())),
            Err(e) if e.is_timeout() => {
                Health::unhealthy(format!("GET {url} had no answer within {:?}", self.timeout))
            }
            Err(e) => {
                // reqwest's own message is short; the cause says why.
                // Without its URL: the error would show the credentials.
                let e = e.without_url();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(url: &str) -> ConfigError {
        HttpProbe::new(url).expect_err(url)
    }

    #[test]
    fn only_http_urls_are_accepted() {
        for url in [
            "https://127.0.0.1:8443/health",
            "ftp://127.0.0.1/health",
            "ws://127.0.0.1/health",
            "file:///tmp/health",
            "mailto:ops@example.com",
        ] {
            assert_eq!(
                refused(url),
                ConfigError::Invalid {
                    field: "url",
                    reason: NOT_HTTP
                },
                "{url}"
            );
        }
        assert_eq!(
            refused("https://127.0.0.1/").to_string(),
            "`url` must be an http:// URL: the probe is built without TLS and speaks only plain HTTP"
        );
        // The scheme is case-insensitive.
        let probe = HttpProbe::new("HTTP://127.0.0.1:8080/health").unwrap();
        assert_eq!(probe.url(), "http://127.0.0.1:8080/health");
    }

    #[test]
    fn a_url_that_does_not_parse_is_refused_with_its_own_reason() {
        for url in ["not a url", "127.0.0.1:8080/health", ""] {
            let ConfigError::Invalid { field, reason } = refused(url) else {
                panic!("{url}: not Invalid");
            };
            assert_eq!(field, "url");
            assert_ne!(reason, NOT_HTTP, "{url}");
        }
    }

    #[test]
    fn redirects_are_off_by_default_and_bounded_when_on() {
        let probe = HttpProbe::new("http://127.0.0.1:8080/").unwrap();
        assert_eq!(probe.max_redirects, 0);
        let probe = probe.follow_redirects(3).unwrap();
        assert_eq!(probe.max_redirects, 3);
    }
}
