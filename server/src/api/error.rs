//! The API's error body `{code, message, details}` and the one place errors become HTTP statuses.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::AuthError;
use crate::model::{FieldProblem, Kind};
use crate::store::StoreError;

/// Machine-readable error codes (see docs/api.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub enum ErrorCode {
    /// 400: the body is not JSON/YAML, or a bad query parameter.
    BadRequest,
    /// 401: no token, an unknown/expired/revoked token, or a join token.
    Unauthorized,
    /// 403: the token may not do this (e.g. writing a `Host`).
    Forbidden,
    /// 404: no such object, or a referenced tenant/project does not exist.
    NotFound,
    /// 405: the path exists but not with this method.
    MethodNotAllowed,
    /// 409: `POST` of an existing name.
    AlreadyExists,
    /// 409: stale `resourceVersion`, or delete of an object that still has children.
    Conflict,
    /// 408: the request body did not arrive in time (it stalled, or came too slowly).
    RequestTimeout,
    /// 413: a body or an object over its size limit.
    PayloadTooLarge,
    /// 415: a body that is neither JSON nor YAML.
    UnsupportedMediaType,
    /// 422: a manifest breaks a rule; `details` lists every problem.
    Invalid,
    /// 500: a bug or a storage failure (logged with details).
    Internal,
    /// 503: the server is shutting down.
    Unavailable,
    /// 429: over a rate limit; retry after the `Retry-After` seconds.
    RateLimited,
    /// 410: a watch from a resourceVersion older than the server can replay; list again.
    Gone,
}

impl ErrorCode {
    /// The HTTP status of each code: the only mapping from errors to statuses.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::AlreadyExists | ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Gone => StatusCode::GONE,
        }
    }
}

/// Body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    /// What went wrong and what to do about it.
    pub message: String,
    /// One entry per field with a problem; may be empty.
    pub details: Vec<FieldProblem>,
}

/// An error answered to an API caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub details: Vec<FieldProblem>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }

    pub fn with_details(mut self, details: Vec<FieldProblem>) -> Self {
        self.details = details;
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::BadRequest, message)
    }

    /// 422 listing every problem.
    pub fn invalid(details: Vec<FieldProblem>) -> Self {
        let n = details.len();
        let message = match details.as_slice() {
            [one] => format!("the request is invalid: {one}"),
            _ => format!("the request is invalid: {n} problems, listed in details"),
        };
        ApiError {
            code: ErrorCode::Invalid,
            message,
            details,
        }
    }

    /// 500; the cause is logged, the caller is pointed at the log.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error while serving a request");
        ApiError::new(
            ErrorCode::Internal,
            format!("internal error: {cause}; details are in the server log"),
        )
    }

    /// The same error, about item `index` of an `/apply` batch.
    pub fn in_item(mut self, index: usize) -> Self {
        let prefix = format!("items[{index}]");
        if self.details.is_empty() {
            self.details
                .push(FieldProblem::new(prefix.clone(), self.message.clone()));
        } else {
            self.details = self.details.into_iter().map(|d| d.under(&prefix)).collect();
        }
        self.message = format!("{prefix}: {}", self.message);
        self
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code,
            message: self.message.clone(),
            details: self.details.clone(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.code.status();
        let unauthorized = self.code == ErrorCode::Unauthorized;
        let summary = ErrorSummary(self.message.chars().take(300).collect());
        let body = ErrorBody {
            code: self.code,
            message: self.message,
            details: self.details,
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| {
            b"{\"code\":\"Internal\",\"message\":\"\",\"details\":[]}".to_vec()
        });
        let mut resp = (status, bytes).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if unauthorized {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp.extensions_mut().insert(summary);
        resp
    }
}

/// The start of an error's message, kept on the response for the audit log.
#[derive(Clone, Debug)]
pub struct ErrorSummary(pub String);

/// The field of a child's manifest that names a missing parent.
fn parent_field(kind: Kind) -> &'static str {
    match kind {
        Kind::Tenant => "metadata.tenant",
        Kind::Project => "metadata.project",
        Kind::OpenClawInstance
        | Kind::Host
        | Kind::ConfigTemplate
        | Kind::Secret
        | Kind::Rollout => "metadata",
    }
}

impl From<StoreError> for ApiError {
    /// Every store error, decided one by one.
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(key) => {
                ApiError::new(ErrorCode::NotFound, format!("{key} not found"))
            }
            StoreError::AlreadyExists(key) => ApiError::new(
                ErrorCode::AlreadyExists,
                format!("{key} already exists; change it with PUT or /api/v1/apply instead"),
            ),
            e @ (StoreError::Conflict { .. } | StoreError::Gone { .. }) => {
                let message = e.to_string();
                ApiError::new(ErrorCode::Conflict, message.clone())
                    .with_details(vec![FieldProblem::new("metadata.resourceVersion", message)])
            }
            StoreError::ParentMissing { key, parent } => {
                let message = format!("{parent} does not exist; create it before {key}");
                let field = parent_field(parent.kind);
                ApiError::new(ErrorCode::NotFound, message.clone())
                    .with_details(vec![FieldProblem::new(field, message)])
            }
            e @ StoreError::HasChildren { .. } => ApiError::new(ErrorCode::Conflict, e.to_string()),
            StoreError::InUse { message, .. } => ApiError::new(ErrorCode::Conflict, message),
            e @ StoreError::QuotaExceeded { .. } => {
                let message = e.to_string();
                ApiError::new(ErrorCode::Forbidden, message.clone())
                    .with_details(vec![FieldProblem::new("spec", message)])
            }
            StoreError::QuotaAboveParent(message) => {
                ApiError::invalid(vec![FieldProblem::new("spec.quota", message)])
            }
            StoreError::InBatch { index, source } => ApiError::from(*source).in_item(index),
            StoreError::Invalid(problems) => ApiError::invalid(problems),
            e @ StoreError::JoinRefused(_) => ApiError::new(ErrorCode::Unauthorized, e.to_string()),
            e @ (StoreError::SchemaTooNew { .. }
            | StoreError::Corrupt(_)
            | StoreError::Backend(_)
            | StoreError::Fenced { .. }) => ApiError::internal(e),
        }
    }
}

impl ApiError {
    /// An authentication failure, with a message saying what to do (and no path of the
    /// server's host).
    pub fn from_auth(e: AuthError) -> Self {
        match e {
            AuthError::MissingHeader
            | AuthError::Malformed(_)
            | AuthError::Unknown
            | AuthError::Expired { .. }
            | AuthError::Revoked { .. }
            | AuthError::JoinToken => ApiError::new(ErrorCode::Unauthorized, e.user_message()),
            AuthError::Store(e) => ApiError::from(*e),
            AuthError::OidcNotConfigured => {
                ApiError::new(ErrorCode::Unauthorized, e.user_message())
            }
            AuthError::Oidc(ref o) => {
                let code = match o {
                    crate::auth::oidc::OidcError::KeysUnavailable { .. } => ErrorCode::Unavailable,
                    crate::auth::oidc::OidcError::NoRole { .. } => ErrorCode::Forbidden,
                    _ => ErrorCode::Unauthorized,
                };
                ApiError::new(code, e.user_message())
            }
        }
    }
}

/// A store error of a single-object request: the batch position (always 0) is not shown.
pub fn single(e: StoreError) -> StoreError {
    match e {
        StoreError::InBatch { index: 0, source } => *source,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectKey;

    #[test]
    fn batch_errors_are_prefixed_with_the_item() {
        let e = StoreError::InBatch {
            index: 3,
            source: Box::new(StoreError::ParentMissing {
                key: ObjectKey::project("acme", "helpdesk"),
                parent: Box::new(ObjectKey::cluster(Kind::Tenant, "acme")),
            }),
        };
        let a = ApiError::from(e);
        assert_eq!(a.code, ErrorCode::NotFound);
        assert_eq!(a.details[0].field, "items[3].metadata.tenant");
        assert!(
            a.message
                .starts_with("items[3]: tenant/acme does not exist"),
            "{}",
            a.message
        );
        let a = ApiError::from(StoreError::InBatch {
            index: 1,
            source: Box::new(StoreError::Invalid(vec![FieldProblem::new(
                "spec.replicas",
                "bad",
            )])),
        });
        assert_eq!(a.code, ErrorCode::Invalid);
        assert_eq!(a.details[0].field, "items[1].spec.replicas");
    }

    #[test]
    fn statuses() {
        assert_eq!(
            ApiError::from(StoreError::NotFound(ObjectKey::cluster(Kind::Tenant, "x")))
                .code
                .status(),
            404
        );
        assert_eq!(
            ApiError::from(StoreError::Backend("disk".into()))
                .code
                .status(),
            500
        );
        let e = StoreError::HasChildren {
            key: ObjectKey::cluster(Kind::Tenant, "x"),
            count: 2,
            child: "projects",
        };
        assert_eq!(ApiError::from(e).code.status(), 409);
    }
}
