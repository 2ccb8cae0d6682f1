//! Who may publish and subscribe where: JWT bearer tokens checked against topic patterns.
//!
//! With no `--jwt-secret` or `--jwt-public-key` the gateway is open (the local demo default).
//! With one, publishing always needs a token, and subscribing needs one unless the topic
//! matches a `--public-topics` pattern. A token carries
//! `"pushhub": {"publish": [...], "subscribe": [...]}`, each entry an exact topic or a prefix
//! ending in `*`.
//!
//! Tokens arrive as `Authorization: Bearer ...` or, because browsers' `EventSource` and
//! `WebSocket` cannot set headers, as `?token=`. Neither is ever logged. Every check happens
//! before a topic is looked up and answers the same for topics that exist and topics that do
//! not, so a refusal tells nothing about what exists.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::{FromRef, FromRequestParts},
    http::request::Parts,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;

use super::HeaderSource;
pub use crate::message::pattern::TopicPattern;
use crate::{
    error::Error,
    message::{
        TopicName,
        pattern::{Selection, Selector},
    },
};

fn parse_patterns(list: &[String]) -> Vec<TopicPattern> {
    list.iter().map(|p| TopicPattern::parse(p)).collect()
}

fn any_matches(patterns: &[TopicPattern], topic: &str) -> bool {
    patterns.iter().any(|p| p.matches(topic))
}

/// Why the auth settings could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// The public key file could not be read.
    #[error("cannot read the JWT public key {path}: {source}")]
    Read {
        /// The file named by `--jwt-public-key`.
        path: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The file is not an RSA or EC public key in PEM.
    #[error("{0} is not an RSA or EC (P-256) public key in PEM format")]
    Key(String),
    /// Both a secret and a public key were given.
    #[error("give either --jwt-secret or --jwt-public-key, not both")]
    Both,
}

/// The gateway's access policy.
pub struct Auth {
    verifier: Option<Verifier>,
    public: Vec<TopicPattern>,
}

struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("enabled", &self.verifier.is_some())
            .field("public", &self.public)
            .finish()
    }
}

impl Auth {
    /// An open gateway: no token needed anywhere.
    pub fn open() -> Self {
        Self {
            verifier: None,
            public: Vec::new(),
        }
    }

    /// The policy of `--jwt-secret`, `--jwt-public-key` and `--public-topics`.
    pub fn new(
        secret: Option<&str>,
        public_key: Option<&Path>,
        public_topics: &[String],
    ) -> Result<Self, AuthConfigError> {
        let verifier = match (secret, public_key) {
            (Some(_), Some(_)) => return Err(AuthConfigError::Both),
            (Some(secret), None) => Some(Verifier::new(
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            )),
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|source| AuthConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                let (key, algorithm) = if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                    (key, Algorithm::RS256)
                } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                    (key, Algorithm::ES256)
                } else {
                    return Err(AuthConfigError::Key(path.display().to_string()));
                };
                Some(Verifier::new(key, algorithm))
            }
            (None, None) => None,
        };
        Ok(Self {
            verifier,
            public: parse_patterns(public_topics),
        })
    }

    /// Whether tokens are checked at all.
    pub fn enabled(&self) -> bool {
        self.verifier.is_some()
    }

    /// Verifies a token: signature, algorithm and expiry (no leeway: a connection is closed
    /// at `exp`, so it must not be accepted after it either).
    pub fn verify(&self, token: &str) -> Result<Grant, Error> {
        let Some(verifier) = &self.verifier else {
            return Ok(Grant::unrestricted());
        };
        let claims = jsonwebtoken::decode::<Claims>(token, &verifier.key, &verifier.validation)
            .map_err(|error| match error.kind() {
                ErrorKind::ExpiredSignature => Error::TokenExpired,
                _ => Error::InvalidToken,
            })?
            .claims;
        Ok(Grant {
            subject: claims.sub,
            publish: parse_patterns(&claims.pushhub.publish),
            subscribe: parse_patterns(&claims.pushhub.subscribe),
            expires_at: Some(UNIX_EPOCH + Duration::from_secs(claims.exp)),
        })
    }
}

impl Verifier {
    fn new(key: DecodingKey, algorithm: Algorithm) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp"]);
        Self { key, validation }
    }
}

#[derive(Deserialize)]
struct Claims {
    exp: u64,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    pushhub: Permissions,
}

#[derive(Deserialize, Default)]
struct Permissions {
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
}

/// What a verified token allows.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The token's `sub`, used to key per-client limits.
    pub subject: Option<String>,
    publish: Vec<TopicPattern>,
    subscribe: Vec<TopicPattern>,
    expires_at: Option<SystemTime>,
}

impl Grant {
    fn unrestricted() -> Self {
        let all = vec![TopicPattern::Prefix(String::new())];
        Self {
            subject: None,
            publish: all.clone(),
            subscribe: all,
            expires_at: None,
        }
    }
}

/// The caller of one request: the policy plus the token it presented, if any.
///
/// Small (the grant is boxed): every WebSocket session keeps one for its life.
#[derive(Debug, Clone)]
pub struct Access {
    auth: Arc<Auth>,
    grant: Option<Box<Grant>>,
}

impl Access {
    /// Publishing to `topic` is allowed, or the 401/403 to answer.
    pub fn check_publish(&self, topic: &TopicName) -> Result<(), Error> {
        if !self.auth.enabled() {
            return Ok(());
        }
        match &self.grant {
            None => Err(Error::Unauthorized),
            Some(grant) if any_matches(&grant.publish, topic.as_str()) => Ok(()),
            Some(_) => Err(Error::Forbidden),
        }
    }

    /// Subscribing to `topic` (any transport) is allowed, or the 401/403 to answer.
    pub fn check_subscribe(&self, topic: &TopicName) -> Result<(), Error> {
        if !self.auth.enabled() || any_matches(&self.auth.public, topic.as_str()) {
            return Ok(());
        }
        match &self.grant {
            None => Err(Error::Unauthorized),
            Some(grant) if any_matches(&grant.subscribe, topic.as_str()) => Ok(()),
            Some(_) => Err(Error::Forbidden),
        }
    }

    /// Checks every entry of a topic list: each listed name, and each pattern itself (a
    /// grant covers `news.*` only if it is `news.*` or broader). A refusal names the first
    /// entry not covered.
    pub fn check_selection(&self, selection: &Selection) -> Result<(), Error> {
        for entry in selection.entries() {
            let allowed = match entry {
                Selector::Name(name) => self.check_subscribe(name),
                Selector::Prefix(prefix) => self.check_subscribe_prefix(prefix),
            };
            match allowed {
                Err(Error::Forbidden) => return Err(Error::ForbiddenTopic(entry.to_string())),
                other => other?,
            }
        }
        Ok(())
    }

    /// Whether the caller may follow every topic starting with `prefix`.
    fn check_subscribe_prefix(&self, prefix: &str) -> Result<(), Error> {
        let covers = |patterns: &[TopicPattern]| patterns.iter().any(|p| p.covers_prefix(prefix));
        if !self.auth.enabled() || covers(&self.auth.public) {
            return Ok(());
        }
        match &self.grant {
            None => Err(Error::Unauthorized),
            Some(grant) if covers(&grant.subscribe) => Ok(()),
            Some(_) => Err(Error::Forbidden),
        }
    }

    /// When a long-lived connection opened with this token must end.
    pub fn expires_at(&self) -> Option<tokio::time::Instant> {
        let expires_at = self.grant.as_ref()?.expires_at?;
        let left = expires_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        Some(tokio::time::Instant::now() + left)
    }

    /// The key per-client limits count under: the token's subject, else the peer's address.
    pub fn client_key(&self, peer: Option<std::net::IpAddr>) -> String {
        match self.subject() {
            Some(subject) => format!("sub:{subject}"),
            None => peer.map_or_else(|| "unknown".into(), |ip| format!("ip:{ip}")),
        }
    }

    /// The token's subject, if it named one.
    pub fn subject(&self) -> Option<&str> {
        self.grant.as_ref()?.subject.as_deref()
    }
}

impl Access {
    /// Reads the token from `Authorization: Bearer` or `?token=` and verifies it. A request
    /// with no token gets an anonymous `Access`; a bad or expired token is refused (401).
    /// Nothing is parsed when auth is off.
    pub fn for_request(
        auth: &Arc<Auth>,
        headers: &dyn HeaderSource,
        query: &str,
    ) -> Result<Self, Error> {
        let auth = auth.clone();
        if !auth.enabled() {
            return Ok(Self { auth, grant: None });
        }
        let token = bearer_token(headers)?.or_else(|| query_token(query));
        let grant = token
            .map(|token| auth.verify(&token).map(Box::new))
            .transpose()?;
        Ok(Self { auth, grant })
    }
}

/// The same, for axum handlers, whatever the router's state, as long as it holds the policy.
impl<S: Send + Sync> FromRequestParts<S> for Access
where
    Arc<Auth>: FromRef<S>,
{
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        Access::for_request(
            &Arc::<Auth>::from_ref(state),
            &parts.headers,
            parts.uri.query().unwrap_or_default(),
        )
    }
}

fn bearer_token(headers: &dyn HeaderSource) -> Result<Option<String>, Error> {
    let Some(value) = headers.header("authorization") else {
        return Ok(None);
    };
    let value = std::str::from_utf8(value).map_err(|_| Error::InvalidToken)?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
            Ok(Some(token.trim().to_owned()))
        }
        _ => Err(Error::InvalidToken),
    }
}

fn query_token(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "token")
        .map(|(_, value)| value.into_owned())
}

/// Seconds since the Unix epoch, for building tokens in tests and tools.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;

    fn token(secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn topic(name: &str) -> TopicName {
        TopicName::parse(name).unwrap()
    }

    fn access(auth: &Arc<Auth>, token: Option<&str>) -> Result<Access, Error> {
        Ok(Access {
            auth: auth.clone(),
            grant: token.map(|t| auth.verify(t).map(Box::new)).transpose()?,
        })
    }

    #[test]
    fn tokens_grant_what_their_claims_name() {
        let auth = Arc::new(Auth::new(Some("s3cret"), None, &["public.*".into()]).unwrap());
        let good = token(
            "s3cret",
            json!({"exp": unix_now() + 60, "sub": "ana",
                   "pushhub": {"publish": ["news.*"], "subscribe": ["news.*", "chat"]}}),
        );
        let caller = access(&auth, Some(&good)).unwrap();
        assert_eq!(caller.subject(), Some("ana"));
        assert!(caller.check_publish(&topic("news.sport")).is_ok());
        assert!(matches!(
            caller.check_publish(&topic("chat")),
            Err(Error::Forbidden)
        ));
        assert!(caller.check_subscribe(&topic("chat")).is_ok());
        assert!(caller.check_subscribe(&topic("public.lobby")).is_ok());
        let left = caller.expires_at().unwrap() - tokio::time::Instant::now();
        assert!(left > Duration::from_secs(50) && left <= Duration::from_secs(60));

        let anonymous = access(&auth, None).unwrap();
        assert!(matches!(
            anonymous.check_publish(&topic("news.sport")),
            Err(Error::Unauthorized)
        ));
        assert!(matches!(
            anonymous.check_subscribe(&topic("chat")),
            Err(Error::Unauthorized)
        ));
        assert!(anonymous.check_subscribe(&topic("public.lobby")).is_ok());
    }

    #[test]
    fn bad_tokens_are_refused_with_the_reason() {
        let auth = Arc::new(Auth::new(Some("s3cret"), None, &[]).unwrap());
        let expired = token("s3cret", json!({"exp": unix_now() - 1}));
        assert!(matches!(
            access(&auth, Some(&expired)),
            Err(Error::TokenExpired)
        ));
        let forged = token("guess", json!({"exp": unix_now() + 60}));
        assert!(matches!(
            access(&auth, Some(&forged)),
            Err(Error::InvalidToken)
        ));
        let no_exp = token("s3cret", json!({"sub": "x"}));
        assert!(matches!(
            access(&auth, Some(&no_exp)),
            Err(Error::InvalidToken)
        ));
        assert!(matches!(
            access(&auth, Some("not.a.jwt")),
            Err(Error::InvalidToken)
        ));
    }

    #[test]
    fn an_open_gateway_allows_everything() {
        let auth = Arc::new(Auth::open());
        let caller = access(&auth, None).unwrap();
        assert!(caller.check_publish(&topic("x")).is_ok());
        assert!(caller.check_subscribe(&topic("x")).is_ok());
        assert!(caller.expires_at().is_none());
    }
}
