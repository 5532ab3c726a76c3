//! Values that need more than a string: secrets and URLs whose `Debug` and
//! `Display` never show a password or a token.

/// A secret from the configuration. Debug is redacted and there is no Display.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A broker URL. Debug and Display hide the password.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl(pub(super) String);

impl AmqpUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let u = url::Url::parse(s).map_err(|e| format!("{} is not a URL: {e}", redact(s)))?;
        if !matches!(u.scheme(), "amqp" | "amqps") {
            return Err(format!("{} must start with amqp:// or amqps://", redact(s)));
        }
        if u.host_str().is_none_or(str::is_empty) {
            return Err(format!("{} has no host", redact(s)));
        }
        Ok(Self(s.to_string()))
    }

    /// The URL with its password, for the AMQP client only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `host:port` of the node, for logs, metrics and the connection name.
    pub fn node(&self) -> String {
        match url::Url::parse(&self.0) {
            Ok(u) => {
                let default = if u.scheme() == "amqps" { 5671 } else { 5672 };
                format!(
                    "{}:{}",
                    u.host_str().unwrap_or(""),
                    u.port().unwrap_or(default)
                )
            }
            Err(_) => String::new(),
        }
    }
}

/// Where a node's management API is, and how to sign in to it: by default the
/// node's host on `amqp.management_port`, over https when the AMQP URL is
/// `amqps://` (the credentials are the broker's: they never go in clear where
/// the AMQP connection itself is encrypted); or `amqp.management_url`.
pub struct Management {
    /// `scheme://host:port/.../api`, without user info.
    pub base: url::Url,
    pub user: String,
    pub password: Secret,
    pub vhost: String,
}

/// The management plugin's ports: plain HTTP and TLS.
const MANAGEMENT_PORT: u16 = 15672;
const MANAGEMENT_TLS_PORT: u16 = 15671;

impl Management {
    /// The management API for `node` (one of `amqp.url`): `explicit`
    /// (`amqp.management_url`) when set, else the node's host on `port`
    /// (`amqp.management_port`; unset, 15672, or 15671 over TLS).
    pub fn of(node: &AmqpUrl, port: Option<u16>, explicit: Option<&TargetUrl>) -> Option<Self> {
        let amqp = url::Url::parse(&node.0).ok()?;
        let vhost = match amqp.path().strip_prefix('/') {
            None | Some("") => "/".to_string(),
            Some(p) => percent_decode(p),
        };
        let (mut base, user, password) = match explicit {
            Some(m) if !m.url().username().is_empty() => {
                let u = m.url();
                (
                    u.clone(),
                    percent_decode(u.username()),
                    percent_decode(u.password().unwrap_or("")),
                )
            }
            Some(m) => (
                m.url().clone(),
                percent_decode(amqp.username()),
                percent_decode(amqp.password().unwrap_or("")),
            ),
            None => {
                let tls = amqp.scheme() == "amqps";
                let (scheme, default) = if tls {
                    ("https", MANAGEMENT_TLS_PORT)
                } else {
                    ("http", MANAGEMENT_PORT)
                };
                let host = amqp.host_str()?;
                // An IPv6 host keeps its brackets in host_str's Display form.
                let host = match amqp.host()? {
                    url::Host::Ipv6(a) => format!("[{a}]"),
                    _ => host.to_string(),
                };
                let base =
                    url::Url::parse(&format!("{scheme}://{host}:{}/", port.unwrap_or(default)))
                        .ok()?;
                (
                    base,
                    percent_decode(amqp.username()),
                    percent_decode(amqp.password().unwrap_or("")),
                )
            }
        };
        let _ = base.set_username("");
        let _ = base.set_password(None);
        base.set_query(None);
        base.set_fragment(None);
        let path = base.path().trim_end_matches('/').to_string();
        if !path.ends_with("/api") {
            base.set_path(&format!("{path}/api"));
        } else {
            base.set_path(&path);
        }
        Some(Self {
            base,
            user,
            password: Secret::new(password),
            vhost,
        })
    }

    /// Whether signing in sends the password over plain HTTP to a host other
    /// than this one: allowed, but said at start.
    pub fn in_clear(&self) -> bool {
        let loopback = match self.base.host() {
            Some(url::Host::Ipv4(a)) => a.is_loopback(),
            Some(url::Host::Ipv6(a)) => a.is_loopback(),
            Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            None => false,
        };
        self.base.scheme() == "http" && !loopback
    }
}

/// `%2f` to `/` and the like (URL user info and vhost are percent-encoded).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// `amqp://user:***@host` for any URL-ish text (the password never shown).
fn redact(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "the value".into(),
    }
}

impl std::fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

impl std::fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AmqpUrl({self})")
    }
}

/// A delivery URL. Debug and Display show scheme, host, port and path only: a
/// query string or user info may hold a token.
#[derive(Clone, PartialEq, Eq)]
pub struct TargetUrl {
    url: url::Url,
    shown: String,
}

impl TargetUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let url = url::Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("scheme {} is not http or https", url.scheme()));
        }
        let host = url.host_str().unwrap_or("");
        let shown = match url.port() {
            Some(p) => format!("{}://{host}:{p}{}", url.scheme(), url.path()),
            None => format!("{}://{host}{}", url.scheme(), url.path()),
        };
        Ok(Self { url, shown })
    }

    pub fn url(&self) -> &url::Url {
        &self.url
    }
}

impl std::fmt::Display for TargetUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl std::fmt::Debug for TargetUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TargetUrl({})", self.shown)
    }
}

// How these values are written in the configuration: a string each, parsed
// (so a bad one is an error naming its key), and written back exposed (the
// sandbox hands child processes a generated file; keep such files private).

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TargetUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TargetUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TargetUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.url.as_str())
    }
}

/// The Standard Webhooks signing key of a `whsec_...` secret (base64 after
/// the prefix; the prefix is optional), or what is wrong with it.
pub fn standard_key(raw: &str) -> Result<Vec<u8>, String> {
    use base64::DecodeError as D;
    use base64::Engine;
    let b64 = raw.strip_prefix("whsec_").unwrap_or(raw);
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| match e {
            D::InvalidByte(at, _) => {
                format!("character {} of the base64 part is not base64", at + 1)
            }
            D::InvalidLength(_) => "the base64 part has an impossible length".to_string(),
            D::InvalidLastSymbol(..) => "the last base64 character is not canonical".to_string(),
            D::InvalidPadding => "the base64 padding is wrong".to_string(),
        })?;
    if key.is_empty() {
        return Err("the key is empty".into());
    }
    Ok(key)
}

/// Where a source's webhooks go (`worker.target`, `sources.NAME.target`): a
/// target's name (`[targets.NAME]`), or a URL, which is a target of its own
/// with the default limits, named by the URL as [`TargetUrl`] shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetRef {
    Named(String),
    Url(TargetUrl),
}

impl TargetRef {
    /// The target's name: its `[targets.NAME]`, or the URL as shown
    /// (scheme, host, port and path: no query or user info).
    pub fn name(&self) -> String {
        match self {
            Self::Named(n) => n.clone(),
            Self::Url(u) => u.to_string(),
        }
    }
}

impl From<TargetUrl> for TargetRef {
    fn from(u: TargetUrl) -> Self {
        Self::Url(u)
    }
}

impl<'de> serde::Deserialize<'de> for TargetRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        if s.contains("://") {
            TargetUrl::parse(&s)
                .map(Self::Url)
                .map_err(serde::de::Error::custom)
        } else {
            Ok(Self::Named(s))
        }
    }
}

impl serde::Serialize for TargetRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Named(n) => s.serialize_str(n),
            Self::Url(u) => u.serialize(s),
        }
    }
}
