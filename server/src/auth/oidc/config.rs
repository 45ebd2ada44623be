//! The `[oidc]` section of the server configuration: trusted issuers and how their users'
//! groups map to roles, checked whole before the server starts.
//!
//! ```toml
//! [oidc]
//! # external_url = "https://cc.example.com:8443"   # the console's address as browsers see it
//!
//! [[oidc.issuers]]
//! issuer = "https://login.example.com/realms/corp"   # equal to the tokens' `iss`
//! audience = "clusterclaw"                           # or a list; the tokens' `aud` must hold one
//! # jwks_uri = "https://login.example.com/realms/corp/protocol/openid-connect/certs"
//! #   (default: read from <issuer>/.well-known/openid-configuration)
//! # ca_file = "idp-ca.pem"          # PEM CA(s) trusted for the issuer's HTTPS instead of the system's
//! # allowed_algorithms = ["RS256", "ES256"]   # also RS384, RS512, PS256, PS384, PS512, ES384, EdDSA
//! # clock_skew = "60s"
//! # username_claim = "sub"          # e.g. "preferred_username" or "email"
//! # groups_claim = "groups"
//! # Console single sign-on (authorization code flow with PKCE), when client_id is set:
//! # client_id = "clusterclaw-console"          # also accepted as an audience
//! # client_secret_file = "console-secret"     # first line is the secret; none for a public client
//! # redirect_url = "https://cc.example.com/ui/login/oidc/callback"
//! #   (default: <oidc.external_url>/ui/login/oidc/callback, else from the request's Host)
//! # scopes = ["openid", "profile", "email", "groups"]
//! # display_name = "Corp login"                # the button says "Sign in with Corp login"
//!
//! [[oidc.issuers.mappings]]
//! group = "platform-operators"
//! role = "platform-admin"
//!
//! [[oidc.issuers.mappings]]
//! group = "acme-admins"
//! role = "tenant-admin"
//! tenant = "acme"
//!
//! [[oidc.issuers.mappings]]
//! group = "acme-helpdesk"
//! role = "project-editor"
//! tenant = "acme"
//! project = "helpdesk"
//! ```
//!
//! A user gets the role of the most privileged mapping whose group is in the token's groups
//! claim: `platform-admin` > `tenant-admin` > `project-editor` > `viewer`; between mappings of
//! the same role, the first in the file wins. A user matched by no mapping is refused.

use std::fmt;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use jsonwebtoken::{Algorithm, AlgorithmFamily};
use reqwest::Url;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;
use toml::Spanned;

use crate::auth::PLATFORM_ADMIN;
use crate::model::validate_dns_label;

/// Administers one tenant.
pub const TENANT_ADMIN: &str = "tenant-admin";
/// Edits the instances of one project.
pub const PROJECT_EDITOR: &str = "project-editor";
/// Reads, and changes nothing.
pub const VIEWER: &str = "viewer";
/// The roles a mapping may give, most privileged first.
pub const ROLES_BY_PRIVILEGE: &[&str] = &[PLATFORM_ADMIN, TENANT_ADMIN, PROJECT_EDITOR, VIEWER];

/// Algorithms accepted when `allowed_algorithms` is not set.
pub const DEFAULT_ALGORITHMS: &[Algorithm] = &[Algorithm::RS256, Algorithm::ES256];
/// Every algorithm `allowed_algorithms` may name.
pub const SUPPORTED_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(60);
/// The largest `clock_skew` accepted: beyond it, an expired token would stay usable too long.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);
pub const DEFAULT_USERNAME_CLAIM: &str = "sub";
pub const DEFAULT_GROUPS_CLAIM: &str = "groups";

/// The `[oidc]` section as written in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The console's address as browsers reach it (scheme, host, port), for the default
    /// redirect URL of console single sign-on.
    pub external_url: Option<Spanned<String>>,
    #[serde(default)]
    pub issuers: Vec<Spanned<IssuerConfig>>,
}

/// One `[[oidc.issuers]]` table as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    pub issuer: Spanned<String>,
    pub audience: Spanned<OneOrMany>,
    pub jwks_uri: Option<Spanned<String>>,
    pub ca_file: Option<Spanned<String>>,
    pub allowed_algorithms: Option<Spanned<Vec<Spanned<String>>>>,
    pub clock_skew: Option<Spanned<String>>,
    pub username_claim: Option<Spanned<String>>,
    pub groups_claim: Option<Spanned<String>>,
    /// Console single sign-on: the client the console is registered as at the issuer.
    pub client_id: Option<Spanned<String>>,
    /// A file whose first line is the client's secret (a confidential client).
    pub client_secret_file: Option<Spanned<String>>,
    pub redirect_url: Option<Spanned<String>>,
    pub scopes: Option<Spanned<Vec<Spanned<String>>>>,
    pub display_name: Option<Spanned<String>>,
    #[serde(default)]
    pub mappings: Vec<Spanned<MappingConfig>>,
}

/// A string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// One `[[oidc.issuers.mappings]]` table as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    pub group: Spanned<String>,
    pub role: Spanned<String>,
    pub tenant: Option<Spanned<String>>,
    pub project: Option<Spanned<String>>,
}

/// The checked OIDC settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OidcSettings {
    /// `external_url`: where browsers reach the console.
    pub external_url: Option<Url>,
    pub issuers: Vec<IssuerSettings>,
}

/// The path of the console's single sign-on callback.
pub const CALLBACK_PATH: &str = "/ui/login/oidc/callback";
/// Scopes asked for when `scopes` is not set.
pub const DEFAULT_SCOPES: &[&str] = &["openid", "profile", "email", "groups"];
/// The longest `display_name`, in characters.
pub const MAX_DISPLAY_NAME: usize = 64;

/// A client secret, read from its file; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientSecret(pub String);

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How the console signs users in with an issuer (authorization code flow with PKCE).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleLogin {
    pub client_id: String,
    /// `None`: a public client (PKCE alone protects the code).
    pub client_secret: Option<ClientSecret>,
    /// `None`: `<external_url>/ui/login/oidc/callback`, or the request's own address.
    pub redirect_url: Option<Url>,
    pub scopes: Vec<String>,
    /// What the login page's button names.
    pub display_name: String,
}

/// One trusted issuer, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuerSettings {
    /// Exactly as the tokens' `iss` claim spells it.
    pub issuer: String,
    /// A token's `aud` must hold at least one of these.
    pub audiences: Vec<String>,
    /// Where the keys are; discovered from the issuer when `None`.
    pub jwks_uri: Option<Url>,
    /// The CA certificates trusted for the issuer's HTTPS (from `ca_file`); the system's
    /// roots when empty.
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// Never empty, never a shared-secret algorithm.
    pub algorithms: Vec<Algorithm>,
    pub clock_skew: Duration,
    pub username_claim: String,
    pub groups_claim: String,
    /// In file order.
    pub mappings: Vec<RoleMapping>,
    /// Console single sign-on with this issuer, when `client_id` is set.
    pub console: Option<ConsoleLogin>,
}

impl IssuerSettings {
    /// Settings with every default, for embedding and tests.
    pub fn new(
        issuer: impl Into<String>,
        audience: impl Into<String>,
        mappings: Vec<RoleMapping>,
    ) -> Self {
        IssuerSettings {
            issuer: issuer.into(),
            audiences: vec![audience.into()],
            jwks_uri: None,
            ca_certs: Vec::new(),
            algorithms: DEFAULT_ALGORITHMS.to_vec(),
            clock_skew: DEFAULT_CLOCK_SKEW,
            username_claim: DEFAULT_USERNAME_CLAIM.into(),
            groups_claim: DEFAULT_GROUPS_CLAIM.into(),
            mappings,
            console: None,
        }
    }

    /// The issuer without its scheme and trailing slash (`login.example.com/realms/corp`):
    /// the middle part of a principal id `oidc:<issuer>:<sub>`, unique per issuer even when
    /// several share a host.
    pub fn short_name(&self) -> &str {
        let s = self.issuer.as_str();
        let s = s
            .strip_prefix("https://")
            .or_else(|| s.strip_prefix("http://"))
            .unwrap_or(s);
        s.trim_end_matches('/')
    }

    /// The mapping that applies to a user in `groups`: the most privileged match, the first
    /// in file order among equals.
    pub fn mapping_for(&self, groups: &[&str]) -> Option<&RoleMapping> {
        self.mappings
            .iter()
            .filter(|m| groups.contains(&m.group.as_str()))
            .min_by_key(|m| privilege_rank(&m.role))
    }
}

/// Position of a role in [`ROLES_BY_PRIVILEGE`] (0 is the most privileged); unknown roles rank
/// last.
pub fn privilege_rank(role: &str) -> usize {
    ROLES_BY_PRIVILEGE
        .iter()
        .position(|r| *r == role)
        .unwrap_or(ROLES_BY_PRIVILEGE.len())
}

/// What members of a group become.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleMapping {
    pub group: String,
    pub role: String,
    pub tenant: Option<String>,
    pub project: Option<String>,
}

impl RoleMapping {
    pub fn new(group: &str, role: &str, tenant: Option<&str>, project: Option<&str>) -> Self {
        RoleMapping {
            group: group.into(),
            role: role.into(),
            tenant: tenant.map(Into::into),
            project: project.map(Into::into),
        }
    }
}

/// One thing wrong with the `[oidc]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OidcConfigProblem {
    /// The setting, e.g. `oidc.issuers[0].mappings[1].role`.
    pub key: String,
    /// Byte range of the value in the config file, when known.
    pub span: Option<Range<usize>>,
    /// What is wrong and what would be right.
    pub problem: String,
}

impl OidcConfigProblem {
    /// `<file>, line L, column C (<key>)`, the way the rest of the configuration reports
    /// places; `text` is the file's content.
    pub fn location(&self, file: &Path, text: &str) -> String {
        crate::util::file_location(file, text, self.span.as_ref().map(|s| s.start), &self.key)
    }
}

impl fmt::Display for OidcConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.problem)
    }
}

struct Problems(Vec<OidcConfigProblem>);

impl Problems {
    fn push<T>(&mut self, key: &str, at: &Spanned<T>, problem: impl Into<String>) {
        self.0.push(OidcConfigProblem {
            key: key.to_string(),
            span: Some(at.span()),
            problem: problem.into(),
        });
    }
}

impl OidcConfig {
    /// Checks the section and reads the CA files it names (relative to `base_dir`, the
    /// directory of the config file). Every problem is reported at once.
    pub fn validate(&self, base_dir: &Path) -> Result<OidcSettings, Vec<OidcConfigProblem>> {
        let mut p = Problems(Vec::new());
        let external_url = self.external_url.as_ref().and_then(|u| {
            match check_url(u.get_ref(), true) {
                Ok(url) if url.path() == "/" => Some(url),
                Ok(_) => {
                    p.push(
                        "oidc.external_url",
                        u,
                        format!(
                            "{:?} has a path; give only the scheme, host and port browsers use to reach the console (e.g. https://cc.example.com:8443)",
                            u.get_ref()
                        ),
                    );
                    None
                }
                Err(e) => {
                    p.push("oidc.external_url", u, e);
                    None
                }
            }
        });
        let mut issuers = Vec::new();
        for (i, spanned) in self.issuers.iter().enumerate() {
            let key = format!("oidc.issuers[{i}]");
            let issuer = validate_issuer(spanned.get_ref(), &key, base_dir, &mut p);
            if let Some(prev) = issuers
                .iter()
                .position(|s: &IssuerSettings| s.issuer == issuer.issuer)
            {
                p.push(
                    &format!("{key}.issuer"),
                    &spanned.get_ref().issuer,
                    format!(
                        "{:?} is already configured by oidc.issuers[{prev}]; each issuer appears once",
                        issuer.issuer
                    ),
                );
            }
            issuers.push(issuer);
        }
        if p.0.is_empty() {
            Ok(OidcSettings {
                external_url,
                issuers,
            })
        } else {
            Err(p.0)
        }
    }
}

fn validate_issuer(
    c: &IssuerConfig,
    key: &str,
    base_dir: &Path,
    p: &mut Problems,
) -> IssuerSettings {
    let issuer = c.issuer.get_ref().clone();
    if let Err(e) = check_url(&issuer, true) {
        p.push(&format!("{key}.issuer"), &c.issuer, e);
    }

    let audiences = match c.audience.get_ref() {
        OneOrMany::One(a) => vec![a.clone()],
        OneOrMany::Many(list) => list.clone(),
    };
    if audiences.is_empty() || audiences.iter().any(|a| a.trim().is_empty()) {
        p.push(
            &format!("{key}.audience"),
            &c.audience,
            "must name the audience the issuer puts in the tokens' 'aud' for this server (e.g. its client id), and no audience may be empty",
        );
    }

    let jwks_uri = c
        .jwks_uri
        .as_ref()
        .and_then(|u| match check_url(u.get_ref(), false) {
            Ok(url) => Some(url),
            Err(e) => {
                p.push(&format!("{key}.jwks_uri"), u, e);
                None
            }
        });

    let ca_certs = match &c.ca_file {
        None => Vec::new(),
        Some(f) => read_ca_file(base_dir, f.get_ref()).unwrap_or_else(|e| {
            p.push(&format!("{key}.ca_file"), f, e);
            Vec::new()
        }),
    };

    let algorithms = match &c.allowed_algorithms {
        None => DEFAULT_ALGORITHMS.to_vec(),
        Some(list) => {
            if list.get_ref().is_empty() {
                p.push(
                    &format!("{key}.allowed_algorithms"),
                    list,
                    format!(
                        "must name at least one algorithm; allowed: {}",
                        algorithm_names(SUPPORTED_ALGORITHMS)
                    ),
                );
            }
            let mut algorithms = Vec::new();
            for name in list.get_ref() {
                match parse_algorithm(name.get_ref()) {
                    Ok(a) if !algorithms.contains(&a) => algorithms.push(a),
                    Ok(_) => {}
                    Err(e) => p.push(&format!("{key}.allowed_algorithms"), name, e),
                }
            }
            algorithms
        }
    };

    let clock_skew = match &c.clock_skew {
        None => DEFAULT_CLOCK_SKEW,
        Some(s) => match humantime::parse_duration(s.get_ref()) {
            Ok(d) if d <= MAX_CLOCK_SKEW => d,
            Ok(_) => {
                p.push(
                    &format!("{key}.clock_skew"),
                    s,
                    format!(
                        "{:?} is too long; at most {}",
                        s.get_ref(),
                        humantime::format_duration(MAX_CLOCK_SKEW)
                    ),
                );
                DEFAULT_CLOCK_SKEW
            }
            Err(e) => {
                p.push(
                    &format!("{key}.clock_skew"),
                    s,
                    format!(
                        "{:?} is not a duration ({e}); use e.g. 30s, 2m",
                        s.get_ref()
                    ),
                );
                DEFAULT_CLOCK_SKEW
            }
        },
    };

    let mut claim = |value: &Option<Spanned<String>>, name: &str, default: &str| match value {
        None => default.to_string(),
        Some(v) => {
            if v.get_ref().trim().is_empty() {
                p.push(
                    &format!("{key}.{name}"),
                    v,
                    format!("must name a claim of the tokens (default {default:?})"),
                );
            }
            v.get_ref().clone()
        }
    };
    let username_claim = claim(&c.username_claim, "username_claim", DEFAULT_USERNAME_CLAIM);
    let groups_claim = claim(&c.groups_claim, "groups_claim", DEFAULT_GROUPS_CLAIM);

    let mut mappings = Vec::new();
    for (j, m) in c.mappings.iter().enumerate() {
        mappings.push(validate_mapping(
            m.get_ref(),
            &format!("{key}.mappings[{j}]"),
            p,
        ));
    }
    if c.mappings.is_empty() {
        p.push(
            &format!("{key}.mappings"),
            &c.issuer,
            "the issuer has no [[oidc.issuers.mappings]]: nobody it signs in could be given a role; add at least one { group, role, tenant?, project? }",
        );
    }

    // The console's client id is not an API audience unless listed in `audience`: its ID
    // tokens are accepted on the console's sign-in and sessions only.
    let console = validate_console(c, key, base_dir, &issuer, p);

    IssuerSettings {
        issuer,
        audiences,
        jwks_uri,
        ca_certs,
        algorithms,
        clock_skew,
        username_claim,
        groups_claim,
        mappings,
        console,
    }
}

/// The console single sign-on settings of an issuer: `None` without `client_id` (then none of
/// the other console settings may be set).
fn validate_console(
    c: &IssuerConfig,
    key: &str,
    base_dir: &Path,
    issuer: &str,
    p: &mut Problems,
) -> Option<ConsoleLogin> {
    let Some(client_id) = &c.client_id else {
        let without = "is a setting of console single sign-on; set client_id too (the client the console is registered as at the issuer), or remove it";
        if let Some(v) = &c.client_secret_file {
            p.push(&format!("{key}.client_secret_file"), v, without);
        }
        if let Some(v) = &c.redirect_url {
            p.push(&format!("{key}.redirect_url"), v, without);
        }
        if let Some(v) = &c.scopes {
            p.push(&format!("{key}.scopes"), v, without);
        }
        if let Some(v) = &c.display_name {
            p.push(&format!("{key}.display_name"), v, without);
        }
        return None;
    };
    let id = client_id.get_ref();
    if id.trim().is_empty() || id.len() > 256 || id.chars().any(|c| c.is_control()) {
        p.push(
            &format!("{key}.client_id"),
            client_id,
            "must be the console's client id at the issuer: 1 to 256 characters, no control characters",
        );
    }
    let client_secret =
        c.client_secret_file
            .as_ref()
            .and_then(|f| match read_secret_file(base_dir, f.get_ref()) {
                Ok(s) => Some(ClientSecret(s)),
                Err(e) => {
                    p.push(&format!("{key}.client_secret_file"), f, e);
                    None
                }
            });
    let redirect_url = c.redirect_url.as_ref().and_then(|u| {
        match check_url(u.get_ref(), true) {
            Ok(url) if url.path().trim_end_matches('/') == CALLBACK_PATH => Some(url),
            Ok(_) => {
                p.push(
                    &format!("{key}.redirect_url"),
                    u,
                    format!(
                        "{:?} must end in the console's callback path {CALLBACK_PATH} (e.g. https://cc.example.com{CALLBACK_PATH})",
                        u.get_ref()
                    ),
                );
                None
            }
            Err(e) => {
                p.push(&format!("{key}.redirect_url"), u, e);
                None
            }
        }
    });
    let scopes = match &c.scopes {
        None => DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect(),
        Some(list) => {
            let mut scopes: Vec<String> = Vec::new();
            for s in list.get_ref() {
                let v = s.get_ref();
                if v.is_empty()
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
                {
                    p.push(
                        &format!("{key}.scopes"),
                        s,
                        format!(
                            "{v:?} is not a scope: a scope is printable ASCII without spaces, quotes or backslashes"
                        ),
                    );
                } else if !scopes.contains(v) {
                    scopes.push(v.clone());
                }
            }
            if !list.get_ref().iter().any(|s| s.get_ref() == "openid") {
                p.push(
                    &format!("{key}.scopes"),
                    list,
                    format!(
                        "must include \"openid\" (an ID token is what signs the user in); default {DEFAULT_SCOPES:?}"
                    ),
                );
            }
            scopes
        }
    };
    let display_name = match &c.display_name {
        None => Url::parse(issuer)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_else(|| issuer.to_string()),
        Some(n) => {
            let v = n.get_ref().trim();
            if v.is_empty()
                || v.chars().count() > MAX_DISPLAY_NAME
                || v.chars().any(|c| c.is_control())
            {
                p.push(
                    &format!("{key}.display_name"),
                    n,
                    format!(
                        "must be 1 to {MAX_DISPLAY_NAME} characters without control characters (the login button says \"Sign in with <display_name>\")"
                    ),
                );
            }
            v.to_string()
        }
    };
    Some(ConsoleLogin {
        client_id: id.clone(),
        client_secret,
        redirect_url,
        scopes,
        display_name,
    })
}

/// The first line of a secret file, trimmed; the error never holds the file's content.
fn read_secret_file(base_dir: &Path, value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Err("must name a file whose first line is the client secret".into());
    }
    let path: PathBuf = if Path::new(value).is_absolute() {
        PathBuf::from(value)
    } else {
        base_dir.join(value)
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let secret = text.lines().next().unwrap_or_default().trim();
    if secret.is_empty() {
        return Err(format!(
            "{} is empty; its first line must be the client secret",
            path.display()
        ));
    }
    if secret.chars().any(|c| c.is_control()) {
        return Err(format!(
            "the first line of {} holds control characters; a client secret is printable text",
            path.display()
        ));
    }
    Ok(secret.to_string())
}

fn validate_mapping(m: &MappingConfig, key: &str, p: &mut Problems) -> RoleMapping {
    if m.group.get_ref().is_empty() {
        p.push(&format!("{key}.group"), &m.group, "must not be empty");
    }
    let role = m.role.get_ref().as_str();
    if !ROLES_BY_PRIVILEGE.contains(&role) {
        p.push(
            &format!("{key}.role"),
            &m.role,
            format!(
                "{role:?} is not a role; use one of {}",
                ROLES_BY_PRIVILEGE.join(", ")
            ),
        );
    }
    for (name, value) in [("tenant", &m.tenant), ("project", &m.project)] {
        if let Some(v) = value
            && let Err(e) = validate_dns_label(v.get_ref())
        {
            p.push(&format!("{key}.{name}"), v, format!("{name} {e}"));
        }
    }
    if let (Some(project), None) = (&m.project, &m.tenant) {
        p.push(
            &format!("{key}.project"),
            project,
            "a project belongs to a tenant: set tenant too",
        );
    }
    match role {
        r if r == PLATFORM_ADMIN => {
            if let Some(t) = m.tenant.as_ref().or(m.project.as_ref()) {
                p.push(
                    key,
                    t,
                    "a platform-admin mapping applies to every tenant: remove tenant and project, or use tenant-admin",
                );
            }
        }
        TENANT_ADMIN => {
            if m.tenant.is_none() {
                p.push(
                    key,
                    &m.role,
                    "a tenant-admin mapping needs the tenant it administers",
                );
            }
            if let Some(project) = &m.project {
                p.push(
                    &format!("{key}.project"),
                    project,
                    "a tenant-admin administers the whole tenant: remove project, or use project-editor",
                );
            }
        }
        PROJECT_EDITOR if m.tenant.is_none() || m.project.is_none() => {
            p.push(
                key,
                &m.role,
                "a project-editor mapping needs the tenant and the project it edits",
            );
        }
        _ => {}
    }
    RoleMapping {
        group: m.group.get_ref().clone(),
        role: role.to_string(),
        tenant: m.tenant.as_ref().map(|t| t.get_ref().clone()),
        project: m.project.as_ref().map(|t| t.get_ref().clone()),
    }
}

/// An `https` URL, or `http` on a loopback address (a local identity provider). No
/// credentials; an issuer has no query or fragment either.
pub(super) fn check_url(s: &str, is_issuer: bool) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("{s:?} is not a URL ({e})"))?;
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return Err(format!("{s:?} has no host"));
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(format!(
                "{s:?} uses plain http; use https (plain http is accepted only on a loopback address)"
            ));
        }
        other => return Err(format!("{s:?} has scheme {other:?}; use https")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{s:?} holds credentials; remove them"));
    }
    if is_issuer && (url.query().is_some() || url.fragment().is_some()) {
        return Err(format!(
            "{s:?} has a query or fragment; an issuer is a plain https URL"
        ));
    }
    Ok(url)
}

fn read_ca_file(base_dir: &Path, value: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    if value.is_empty() {
        return Err("must name a PEM file of CA certificates".into());
    }
    let path: PathBuf = if Path::new(value).is_absolute() {
        PathBuf::from(value)
    } else {
        base_dir.join(value)
    };
    let pem = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate ('-----BEGIN CERTIFICATE-----')",
            path.display()
        ));
    }
    for (i, der) in certs.iter().enumerate() {
        if let Err(e) = reqwest::Certificate::from_der(der) {
            return Err(format!(
                "certificate {} of {} is not usable: {e}",
                i + 1,
                path.display()
            ));
        }
    }
    Ok(certs)
}

fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    let allowed = algorithm_names(SUPPORTED_ALGORITHMS);
    if name.eq_ignore_ascii_case("none") {
        return Err(format!(
            "\"none\" means unsigned tokens and is never accepted; allowed: {allowed}"
        ));
    }
    match Algorithm::from_str(name) {
        Ok(a) if a.family() == AlgorithmFamily::Hmac => Err(format!(
            "{name:?} is a shared-secret algorithm, which an identity provider's public keys cannot verify; never accepted; allowed: {allowed}"
        )),
        Ok(a) if SUPPORTED_ALGORITHMS.contains(&a) => Ok(a),
        _ => Err(format!(
            "{name:?} is not a supported algorithm; allowed: {allowed}"
        )),
    }
}

/// `RS256, ES256`.
pub fn algorithm_names(algorithms: &[Algorithm]) -> String {
    algorithms
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        oidc: OidcConfig,
    }

    fn parse(text: &str) -> OidcConfig {
        toml::from_str::<File>(text).unwrap().oidc
    }

    fn problems(text: &str) -> Vec<OidcConfigProblem> {
        parse(text)
            .validate(Path::new("/etc/clusterclaw"))
            .unwrap_err()
    }

    const MINIMAL: &str = r#"
[[oidc.issuers]]
issuer = "https://login.example.com/realms/corp"
audience = "clusterclaw"

[[oidc.issuers.mappings]]
group = "ops"
role = "platform-admin"
"#;

    #[test]
    fn minimal_issuer_gets_the_defaults() {
        let s = parse(MINIMAL).validate(Path::new("/")).unwrap();
        let i = &s.issuers[0];
        assert_eq!(i.issuer, "https://login.example.com/realms/corp");
        assert_eq!(i.audiences, ["clusterclaw"]);
        assert_eq!(i.algorithms, [Algorithm::RS256, Algorithm::ES256]);
        assert_eq!(i.clock_skew, Duration::from_secs(60));
        assert_eq!(i.username_claim, "sub");
        assert_eq!(i.groups_claim, "groups");
        assert_eq!(i.jwks_uri, None);
        assert!(i.ca_certs.is_empty());
        assert_eq!(i.short_name(), "login.example.com/realms/corp");
        assert_eq!(
            i.mappings,
            [RoleMapping::new("ops", "platform-admin", None, None)]
        );
    }

    #[test]
    fn every_setting() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["idp.local".into()]).unwrap();
        std::fs::write(dir.path().join("idp-ca.pem"), ca.cert.pem()).unwrap();
        let text = r#"
[[oidc.issuers]]
issuer = "http://127.0.0.1:8080/"
audience = ["clusterclaw", "cc-cli"]
jwks_uri = "http://localhost:8080/keys"
ca_file = "idp-ca.pem"
allowed_algorithms = ["PS256", "EdDSA", "ES384", "PS256"]
clock_skew = "5s"
username_claim = "email"
groups_claim = "https://example.com/groups"

[[oidc.issuers.mappings]]
group = "acme-admins"
role = "tenant-admin"
tenant = "acme"

[[oidc.issuers.mappings]]
group = "helpdesk"
role = "project-editor"
tenant = "acme"
project = "helpdesk"

[[oidc.issuers.mappings]]
group = "auditors"
role = "viewer"

[[oidc.issuers]]
issuer = "https://other.example.com"
audience = "cc"
[[oidc.issuers.mappings]]
group = "acme-readers"
role = "viewer"
tenant = "acme"
"#;
        let s = parse(text).validate(dir.path()).unwrap();
        let i = &s.issuers[0];
        assert_eq!(i.audiences, ["clusterclaw", "cc-cli"]);
        assert_eq!(
            i.jwks_uri.as_ref().unwrap().as_str(),
            "http://localhost:8080/keys"
        );
        assert_eq!(i.ca_certs.len(), 1);
        assert_eq!(
            i.algorithms,
            [Algorithm::PS256, Algorithm::EdDSA, Algorithm::ES384]
        );
        assert_eq!(i.clock_skew, Duration::from_secs(5));
        assert_eq!(i.username_claim, "email");
        assert_eq!(i.groups_claim, "https://example.com/groups");
        assert_eq!(i.short_name(), "127.0.0.1:8080");
        assert_eq!(i.mappings.len(), 3);
        assert_eq!(s.issuers[1].short_name(), "other.example.com");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = MINIMAL.replace("audience =", "audiences =");
        let e = toml::from_str::<File>(&text).unwrap_err();
        assert!(e.message().contains("unknown field"), "{e}");
        let text = format!("{MINIMAL}tenant_claim = \"org\"\n");
        assert!(toml::from_str::<File>(&text).is_err());
    }

    fn one(text: &str) -> OidcConfigProblem {
        let p = problems(text);
        assert_eq!(p.len(), 1, "{p:#?}");
        p.into_iter().next().unwrap()
    }

    #[test]
    fn issuer_must_be_https_unless_loopback() {
        let p = one(&MINIMAL.replace("https://login", "http://login"));
        assert_eq!(p.key, "oidc.issuers[0].issuer");
        assert!(p.problem.contains("plain http"), "{}", p.problem);
        let p = one(&MINIMAL.replace("https://login.example.com/realms/corp", "ftp://x"));
        assert!(p.problem.contains("use https"), "{}", p.problem);
        let p = one(&MINIMAL.replace("https://login.example.com/realms/corp", "login.example.com"));
        assert!(p.problem.contains("not a URL"), "{}", p.problem);
        let p = one(&MINIMAL.replace("/realms/corp", "/realms/corp?x=1"));
        assert!(p.problem.contains("query"), "{}", p.problem);
        for ok in [
            "http://localhost:9000",
            "http://[::1]:9000/x",
            "http://127.0.0.2",
        ] {
            let text = MINIMAL.replace("https://login.example.com/realms/corp", ok);
            parse(&text).validate(Path::new("/")).unwrap();
        }
    }

    #[test]
    fn problems_point_at_the_line() {
        let text = MINIMAL.replace("\"clusterclaw\"", "[]");
        let p = one(&text);
        assert_eq!(p.key, "oidc.issuers[0].audience");
        assert!(
            p.problem.contains("must name the audience"),
            "{}",
            p.problem
        );
        let at = p.location(Path::new("/etc/clusterclaw/server.toml"), &text);
        assert_eq!(
            at,
            "/etc/clusterclaw/server.toml, line 4, column 12 (oidc.issuers[0].audience)"
        );
    }

    #[test]
    fn audience_must_not_be_empty() {
        one(&MINIMAL.replace("\"clusterclaw\"", "\"\""));
        one(&MINIMAL.replace("\"clusterclaw\"", "[\"a\", \" \"]"));
    }

    #[test]
    fn algorithms() {
        for (list, words) in [
            ("[\"HS256\"]", "shared-secret"),
            ("[\"none\"]", "unsigned"),
            ("[\"RS256\", \"XS1\"]", "not a supported algorithm"),
            ("[]", "at least one"),
        ] {
            let text = MINIMAL.replace(
                "audience = \"clusterclaw\"",
                &format!("audience = \"clusterclaw\"\nallowed_algorithms = {list}"),
            );
            let p = one(&text);
            assert_eq!(p.key, "oidc.issuers[0].allowed_algorithms");
            assert!(p.problem.contains(words), "{list}: {}", p.problem);
            assert!(p.problem.contains("allowed: RS256, RS384"), "{}", p.problem);
        }
    }

    #[test]
    fn clock_skew() {
        let with = |v: &str| {
            MINIMAL.replace(
                "audience = \"clusterclaw\"",
                &format!("audience = \"clusterclaw\"\nclock_skew = \"{v}\""),
            )
        };
        assert!(one(&with("10 minutes")).problem.contains("too long"));
        assert!(one(&with("soon")).problem.contains("not a duration"));
        let s = parse(&with("0s")).validate(Path::new("/")).unwrap();
        assert_eq!(s.issuers[0].clock_skew, Duration::ZERO);
    }

    #[test]
    fn ca_file_problems() {
        let dir = tempfile::tempdir().unwrap();
        let with = |v: &str| {
            MINIMAL.replace(
                "audience = \"clusterclaw\"",
                &format!("audience = \"clusterclaw\"\nca_file = \"{v}\""),
            )
        };
        let p = parse(&with("missing.pem"))
            .validate(dir.path())
            .unwrap_err();
        assert!(p[0].problem.contains("cannot read"), "{}", p[0].problem);
        assert!(p[0].problem.contains("missing.pem"), "{}", p[0].problem);
        std::fs::write(dir.path().join("empty.pem"), "not a certificate\n").unwrap();
        let p = parse(&with("empty.pem")).validate(dir.path()).unwrap_err();
        assert!(
            p[0].problem.contains("holds no PEM certificate"),
            "{}",
            p[0].problem
        );
    }

    #[test]
    fn jwks_uri_rules() {
        let text = MINIMAL.replace(
            "audience = \"clusterclaw\"",
            "audience = \"clusterclaw\"\njwks_uri = \"http://idp.example.com/keys\"",
        );
        let p = one(&text);
        assert_eq!(p.key, "oidc.issuers[0].jwks_uri");
        assert!(p.problem.contains("plain http"), "{}", p.problem);
    }

    #[test]
    fn mapping_rules() {
        let with = |m: &str| {
            format!(
                "[[oidc.issuers]]\nissuer = \"https://idp.example.com\"\naudience = \"cc\"\n[[oidc.issuers.mappings]]\n{m}\n"
            )
        };
        for (m, key, words) in [
            (
                "group = \"g\"\nrole = \"admin\"",
                "mappings[0].role",
                "is not a role",
            ),
            (
                "group = \"g\"\nrole = \"viewer\"\nproject = \"p\"",
                "mappings[0].project",
                "belongs to a tenant",
            ),
            (
                "group = \"g\"\nrole = \"tenant-admin\"",
                "mappings[0]",
                "needs the tenant",
            ),
            (
                "group = \"g\"\nrole = \"tenant-admin\"\ntenant = \"t\"\nproject = \"p\"",
                "mappings[0].project",
                "remove project",
            ),
            (
                "group = \"g\"\nrole = \"project-editor\"\ntenant = \"t\"",
                "mappings[0]",
                "needs the tenant and the project",
            ),
            (
                "group = \"g\"\nrole = \"platform-admin\"\ntenant = \"t\"",
                "mappings[0]",
                "every tenant",
            ),
            (
                "group = \"g\"\nrole = \"viewer\"\ntenant = \"Acme\"",
                "mappings[0].tenant",
                "lower case",
            ),
            (
                "group = \"\"\nrole = \"viewer\"",
                "mappings[0].group",
                "must not be empty",
            ),
        ] {
            let p = one(&with(m));
            assert_eq!(p.key, format!("oidc.issuers[0].{key}"), "{m}");
            assert!(p.problem.contains(words), "{m}: {}", p.problem);
        }
        let p = one("[[oidc.issuers]]\nissuer = \"https://idp.example.com\"\naudience = \"cc\"\n");
        assert_eq!(p.key, "oidc.issuers[0].mappings");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
[[oidc.issuers]]
issuer = "http://idp.example.com"
audience = []
clock_skew = "forever"
[[oidc.issuers.mappings]]
group = "g"
role = "root"

[[oidc.issuers]]
issuer = "http://idp.example.com"
audience = "cc"
[[oidc.issuers.mappings]]
group = "g"
role = "viewer"
"#;
        let p = problems(text);
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "oidc.issuers[0].issuer",
                "oidc.issuers[0].audience",
                "oidc.issuers[0].clock_skew",
                "oidc.issuers[0].mappings[0].role",
                "oidc.issuers[1].issuer",
                "oidc.issuers[1].issuer",
            ]
        );
        assert!(p[5].problem.contains("already configured"), "{}", p[5]);
    }

    fn with_console(lines: &str) -> String {
        MINIMAL.replace(
            "audience = \"clusterclaw\"",
            &format!("audience = \"clusterclaw\"\n{lines}"),
        )
    }

    #[test]
    fn console_sign_on_defaults_and_settings() {
        let s = parse(MINIMAL).validate(Path::new("/")).unwrap();
        assert_eq!(s.issuers[0].console, None);
        assert_eq!(s.external_url, None);

        let s = parse(&with_console("client_id = \"cc-console\""))
            .validate(Path::new("/"))
            .unwrap();
        let c = s.issuers[0].console.as_ref().unwrap();
        assert_eq!(c.client_id, "cc-console");
        assert_eq!(c.client_secret, None);
        assert_eq!(c.redirect_url, None);
        assert_eq!(c.scopes, ["openid", "profile", "email", "groups"]);
        assert_eq!(c.display_name, "login.example.com");
        // The console's client id is not an API audience unless listed.
        assert_eq!(s.issuers[0].audiences, ["clusterclaw"]);

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "  hunter2 \nignored\n").unwrap();
        let text = format!(
            "[oidc]\nexternal_url = \"https://cc.example.com:8443\"\n{}",
            with_console(
                "client_id = \"clusterclaw\"\nclient_secret_file = \"secret\"\nredirect_url = \"https://cc.example.com/ui/login/oidc/callback\"\nscopes = [\"openid\", \"groups\", \"openid\"]\ndisplay_name = \"Corp login\""
            )
        );
        let s = parse(&text).validate(dir.path()).unwrap();
        assert_eq!(
            s.external_url.as_ref().unwrap().as_str(),
            "https://cc.example.com:8443/"
        );
        let i = &s.issuers[0];
        assert_eq!(i.audiences, ["clusterclaw"]);
        let c = i.console.as_ref().unwrap();
        assert_eq!(c.client_secret.as_ref().unwrap().0, "hunter2");
        assert_eq!(
            c.redirect_url.as_ref().unwrap().as_str(),
            "https://cc.example.com/ui/login/oidc/callback"
        );
        assert_eq!(c.scopes, ["openid", "groups"]);
        assert_eq!(c.display_name, "Corp login");
        // The secret never prints.
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn console_sign_on_problems_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        for (lines, key, words) in [
            (
                "redirect_url = \"https://cc.example.com/ui/login/oidc/callback\"",
                "redirect_url",
                "set client_id too",
            ),
            ("scopes = [\"openid\"]", "scopes", "set client_id too"),
            (
                "client_secret_file = \"secret\"",
                "client_secret_file",
                "set client_id too",
            ),
            ("client_id = \" \"", "client_id", "1 to 256 characters"),
            (
                "client_id = \"cc\"\nclient_secret_file = \"missing\"",
                "client_secret_file",
                "cannot read",
            ),
            (
                "client_id = \"cc\"\nclient_secret_file = \"empty\"",
                "client_secret_file",
                "is empty",
            ),
            (
                "client_id = \"cc\"\nredirect_url = \"https://cc.example.com/elsewhere\"",
                "redirect_url",
                "/ui/login/oidc/callback",
            ),
            (
                "client_id = \"cc\"\nredirect_url = \"http://cc.example.com/ui/login/oidc/callback\"",
                "redirect_url",
                "plain http",
            ),
            (
                "client_id = \"cc\"\nscopes = [\"profile\", \"groups\"]",
                "scopes",
                "must include \"openid\"",
            ),
            (
                "client_id = \"cc\"\nscopes = [\"openid\", \"two words\"]",
                "scopes",
                "is not a scope",
            ),
            (
                "client_id = \"cc\"\ndisplay_name = \"\"",
                "display_name",
                "1 to 64 characters",
            ),
        ] {
            let p = parse(&with_console(lines))
                .validate(dir.path())
                .unwrap_err();
            assert_eq!(p.len(), 1, "{lines}: {p:#?}");
            assert_eq!(p[0].key, format!("oidc.issuers[0].{key}"), "{lines}");
            assert!(p[0].problem.contains(words), "{lines}: {}", p[0].problem);
        }
        for (url, words) in [
            ("https://cc.example.com/console", "has a path"),
            ("http://cc.example.com", "plain http"),
            ("cc.example.com", "not a URL"),
        ] {
            let p = problems(&format!("[oidc]\nexternal_url = \"{url}\"\n{MINIMAL}"));
            assert_eq!(p.len(), 1, "{p:#?}");
            assert_eq!(p[0].key, "oidc.external_url");
            assert!(p[0].problem.contains(words), "{url}: {}", p[0].problem);
        }
    }

    #[test]
    fn the_most_privileged_mapping_wins_then_file_order() {
        let s = IssuerSettings::new(
            "https://idp.example.com",
            "cc",
            vec![
                RoleMapping::new("all", "viewer", None, None),
                RoleMapping::new("acme-help", "project-editor", Some("acme"), Some("help")),
                RoleMapping::new("acme-admins", "tenant-admin", Some("acme"), None),
                RoleMapping::new("beta-admins", "tenant-admin", Some("beta"), None),
            ],
        );
        let pick = |groups: &[&str]| s.mapping_for(groups).cloned();
        assert_eq!(pick(&["all"]).unwrap().role, "viewer");
        assert_eq!(pick(&["all", "acme-help"]).unwrap().role, "project-editor");
        let m = pick(&["beta-admins", "acme-help", "acme-admins", "all"]).unwrap();
        assert_eq!(
            m.tenant.as_deref(),
            Some("acme"),
            "ties go to the first in the file"
        );
        assert_eq!(pick(&["nobody"]), None);
        assert_eq!(pick(&[]), None);
    }
}
