//! [`HttpProbe`]: an HTTP GET health check (feature `http`).

use std::time::Duration;

use crate::base::config::{ConfigError, nonzero};
use crate::resilience::health::{Health, HealthCheck};

/// A health check that sends `GET url`: any 2xx answer is healthy; another
/// status (a 3xx included), a connection error or no answer within the
/// timeout is unhealthy, with the reason.
///
/// Built on reqwest without TLS, so it takes only `http://` URLs: any
/// other scheme (an `https://` endpoint could never be checked) is refused
/// when the [`HealthGate`](crate::HealthGate) using the probe is piped.
/// Probes go straight to the endpoint, never through a proxy from the
/// environment.
///
/// Redirects are not followed by default: a health endpoint that redirects
/// is usually misconfigured, and following one could make the gate depend
/// on another service. A 3xx answer is unhealthy, and its reason names the
/// redirect's target. [`with_max_redirects`](HttpProbe::with_max_redirects)
/// follows a bounded number of them, to `http://` URLs only.
///
/// # Default
///
/// A 2 s timeout per request. (The [`HealthGate`](crate::HealthGate) also
/// limits each check, 5 s by default; the shorter limit wins.) No
/// redirects followed.
///
/// # Validation
///
/// The constructor and setters never fail. The settings are checked
/// ([`validate`](HttpProbe::validate)) when the gate using the probe is
/// piped, which refuses to start with a [`ConfigError`] naming
/// `HealthGate`, its stage and the field: `probe.url` for a URL that does
/// not parse or is not `http://`, `probe.timeout` for a zero timeout,
/// `probe.client` if the HTTP client could not be built. A probe used by
/// hand without that check answers unhealthy with the reason.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use streamz::{HealthGate, HttpProbe};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let probe = HttpProbe::new("http://127.0.0.1:8080/health").with_timeout(Duration::from_millis(500));
/// let gate = HealthGate::new(probe).with_interval(Duration::from_secs(2));
///
/// // Only plain HTTP: the probe is built without TLS.
/// let probe = HttpProbe::new("https://127.0.0.1:8443/health");
/// let err = streamz::iter([1u32]).try_pipe(HealthGate::new(probe).named("ingress")).unwrap_err();
/// assert_eq!((err.operator(), err.stage(), err.field()), (Some("HealthGate"), Some("ingress"), "probe.url"));
/// # }
/// ```
#[derive(Clone)]
pub struct HttpProbe {
    /// The client, or why it could not be built.
    client: Result<reqwest::Client, ConfigError>,
    /// The URL, or why it is refused.
    url: Result<reqwest::Url, ConfigError>,
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

/// `url` with its user name, password, query values (and keys without a
/// value, which may be a token themselves) and fragment replaced by `***`:
/// what a probe shows of a URL in reasons, logs and `Debug`. The request
/// itself uses the full URL. The host and path are shown.
fn redact(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    if !shown.username().is_empty() {
        let _ = shown.set_username("***");
    }
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    if shown.query().is_some() {
        let keys: Vec<String> = url
            .query_pairs()
            .map(|(k, v)| {
                if v.is_empty() {
                    "***".to_owned()
                } else {
                    k.into_owned()
                }
            })
            .collect();
        let mut pairs = shown.query_pairs_mut();
        pairs.clear();
        for k in keys {
            pairs.append_pair(&k, "***");
        }
    }
    if shown.fragment().is_some() {
        shown.set_fragment(Some("***"));
    }
    shown.to_string()
}

/// Why a URL is refused.
const NOT_HTTP: &str =
    "must be an http:// URL: the probe is built without TLS and speaks only plain HTTP";

/// Why a URL that does not parse is refused.
const NOT_A_URL: &str = "must be an absolute URL such as http://127.0.0.1:8080/health";

/// What a probe shows of a URL that does not parse (it may hold
/// credentials that cannot be told apart to redact them).
const UNPARSED: &str = "(not a URL)";

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
        .map_err(|_| ConfigError::new("probe.client", "could not be built"))
}

impl HttpProbe {
    /// A probe of `url`, which must be an absolute `http://` URL. A URL
    /// that does not parse, or whose scheme is not `http` (`https`, `ftp`,
    /// ...: this probe has no TLS and speaks only HTTP), is refused when
    /// the gate using the probe is piped ([`ConfigError`], field
    /// `probe.url`; see [`validate`](HttpProbe::validate)).
    ///
    /// ```
    /// use streamz::HttpProbe;
    ///
    /// let probe = HttpProbe::new("http://127.0.0.1:8080/health");
    /// assert_eq!(probe.url(), "http://127.0.0.1:8080/health");
    /// assert!(probe.validate().is_ok());
    /// let err = HttpProbe::new("ftp://127.0.0.1/health").validate().unwrap_err();
    /// assert_eq!(err.field(), "probe.url");
    /// ```
    pub fn new(url: &str) -> Self {
        let (url, shown) = match reqwest::Url::parse(url) {
            Ok(url) => {
                let shown = redact(&url);
                let url = if url.scheme() == "http" {
                    Ok(url)
                } else {
                    Err(ConfigError::new("probe.url", NOT_HTTP))
                };
                (url, shown)
            }
            Err(_) => (
                Err(ConfigError::new("probe.url", NOT_A_URL)),
                UNPARSED.to_owned(),
            ),
        };
        HttpProbe {
            shown,
            client: client(0),
            url,
            timeout: Duration::from_secs(2),
            max_redirects: 0,
        }
    }

    /// Follows up to `max` redirects, each to an `http://` URL, and judges
    /// the answer at the end (0, the default, follows none). A redirect
    /// beyond `max`, or to another scheme, is not followed: its 3xx answer
    /// is unhealthy, with the reason.
    ///
    /// ```
    /// use streamz::HttpProbe;
    ///
    /// // The endpoint answers 308 to the same path with a trailing slash.
    /// let probe = HttpProbe::new("http://127.0.0.1:8080/health").with_max_redirects(1);
    /// assert_eq!(probe.url(), "http://127.0.0.1:8080/health");
    /// ```
    ///
    /// The HTTP client is built here; if it cannot be, the gate using the
    /// probe is refused when piped ([`ConfigError`], field `probe.client`).
    pub fn with_max_redirects(mut self, max: usize) -> Self {
        self.client = client(max);
        self.max_redirects = max;
        self
    }

    /// How long a request may take (2 s by default); `Duration::MAX` for no
    /// time limit (the gate's own check timeout still applies). Zero is
    /// refused when the gate using the probe is piped ([`ConfigError`],
    /// field `probe.timeout`).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The probed URL as the probe shows it: a user name, a password and
    /// query values are replaced by `***` (the request uses them). A URL
    /// that does not parse shows as `(not a URL)`.
    ///
    /// ```
    /// let probe = streamz::HttpProbe::new("http://ops:s3cret@127.0.0.1:8080/health?token=abc");
    /// assert_eq!(probe.url(), "http://***:***@127.0.0.1:8080/health?token=***");
    /// assert!(!format!("{probe:?}").contains("s3cret"));
    /// ```
    pub fn url(&self) -> &str {
        &self.shown
    }

    /// Checks the settings; the [`HealthGate`](crate::HealthGate) using
    /// the probe calls it when it is piped.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] for the field `probe.url` if the URL does not
    /// parse as an absolute URL or its scheme is not `http`,
    /// `probe.timeout` if the timeout is zero, `probe.client` if the HTTP
    /// client could not be built.
    ///
    /// ```
    /// let err = streamz::HttpProbe::new("https://127.0.0.1:8443/health").validate().unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "`probe.url` must be an http:// URL: the probe is built without TLS and speaks only plain HTTP"
    /// );
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Err(e) = &self.url {
            return Err(e.clone());
        }
        nonzero(self.timeout, "probe.timeout")?;
        self.client.as_ref().map(drop).map_err(Clone::clone)
    }
}

impl HttpProbe {
    /// Why a 3xx answer is unhealthy: where it pointed and why the probe
    /// did not go there.
    fn redirect_reason(&self, answer: &reqwest::Response) -> String {
        let at = answer.url();
        let mut reason = format!("GET {} answered {}", self.shown, answer.status());
        // The answer's URL has no fragment: compare without it.
        let asked = self.url.as_ref().ok().map(|u| {
            let mut u = u.clone();
            u.set_fragment(None);
            u
        });
        if asked.as_ref() != Some(at) {
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
    /// [`HttpProbe::validate`].
    fn validate(&self) -> Result<(), ConfigError> {
        HttpProbe::validate(self)
    }

    async fn check(&mut self) -> Health {
        let url = &self.shown;
        // Only without the gate's check: an invalid setting says why.
        let (client, target) = match (&self.client, &self.url) {
            (Ok(client), Ok(target)) => (client, target),
            (Err(e), _) | (_, Err(e)) => {
                return Health::unhealthy(format!("cannot probe {url}: {e}"));
            }
        };
        match client
            .get(target.clone())
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
        HttpProbe::new(url).validate().expect_err(url)
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
                ConfigError::new("probe.url", NOT_HTTP),
                "{url}"
            );
        }
        assert_eq!(
            refused("https://127.0.0.1/").to_string(),
            "`probe.url` must be an http:// URL: the probe is built without TLS and speaks only plain HTTP"
        );
        // The scheme is case-insensitive.
        let probe = HttpProbe::new("HTTP://127.0.0.1:8080/health");
        assert_eq!(probe.validate(), Ok(()));
        assert_eq!(probe.url(), "http://127.0.0.1:8080/health");
    }

    #[test]
    fn a_url_that_does_not_parse_is_refused_with_its_own_reason() {
        for url in ["not a url", "127.0.0.1:8080/health", ""] {
            let err = refused(url);
            assert_eq!(err.field(), "probe.url");
            assert_eq!(err.reason(), NOT_A_URL, "{url}");
            assert_eq!(HttpProbe::new(url).url(), UNPARSED);
        }
        // Credentials in a URL that does not parse are never shown.
        let probe = HttpProbe::new("http://ops:s3cret@127.0.0.1:port/health");
        assert!(!format!("{probe:?}").contains("s3cret"));
    }

    #[test]
    fn a_zero_timeout_is_refused() {
        let err = HttpProbe::new("http://127.0.0.1:8080/")
            .with_timeout(Duration::ZERO)
            .validate()
            .unwrap_err();
        assert_eq!(err, ConfigError::zero("probe.timeout"));
    }

    #[test]
    fn the_gate_refuses_a_bad_probe_as_its_own_setting() {
        use crate::flow::processor::Processor;
        let gate = crate::HealthGate::new(HttpProbe::new("https://127.0.0.1/")).named("ingress");
        let err = Processor::<u8, u8>::validate(&gate).unwrap_err();
        assert_eq!(
            (err.operator(), err.stage(), err.field()),
            (Some("HealthGate"), Some("ingress"), "probe.url")
        );
    }

    #[tokio::test]
    async fn an_unchecked_bad_probe_answers_unhealthy_with_the_reason() {
        let mut probe = HttpProbe::new("ftp://127.0.0.1/health");
        let Health::Unhealthy(reason) = probe.check().await else {
            panic!("healthy");
        };
        assert!(
            reason.contains("`probe.url` must be an http:// URL"),
            "{reason}"
        );
    }

    #[test]
    fn redirects_are_off_by_default_and_bounded_when_on() {
        let probe = HttpProbe::new("http://127.0.0.1:8080/");
        assert_eq!(probe.max_redirects, 0);
        let probe = probe.with_max_redirects(3);
        assert_eq!(probe.max_redirects, 3);
        assert_eq!(probe.validate(), Ok(()));
    }
}
