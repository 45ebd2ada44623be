//! The API's routes, each mounted with the permission it needs: one table that builds the
//! router, answers `Allow` and authorizes every request before its handler runs.
//!
//! A route can only be mounted through [`Routes::route`], whose method builders ([`get`],
//! [`Ops::post`], ...) each take the resource of the permission table the method acts on (the
//! verb follows from the method: `GET` reads, `DELETE` deletes, `POST` and `PUT` write), or are
//! [`open`]: a route without a declared permission does not compile. At request time the middleware looks the matched route and method up in the
//! [`RouteTable`]; whatever is not in it (a route mounted around this builder, a method the
//! route does not declare) is refused, never let through.

use std::collections::HashMap;

use axum::Router;
use axum::handler::Handler;
use axum::http::{HeaderValue, Method};
use axum::routing::MethodRouter;

use super::ApiState;
use crate::auth::rbac::{Res, Verb};

/// What a caller needs to reach a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Nothing: liveness and readiness probes.
    Open,
    /// A valid token whose role may `verb` `res` (one cell of the permission table).
    Perm(Res, Verb),
    /// A page or form of the web console: a live console session whose token's role may
    /// `verb` `res`, the same cell as the API's; a form (any method but `GET`) also needs the
    /// session's CSRF token.
    Page(Res, Verb),
}

impl Need {
    /// What `method` on `res` needs.
    fn of(method: &Method, res: Res) -> Need {
        Need::Perm(res, Verb::of_method(method))
    }
}

/// The handlers of one path, each method with its [`Need`].
pub struct Ops {
    router: MethodRouter<ApiState>,
    declared: Vec<(Method, Need)>,
}

/// A `GET` route (which also answers `HEAD`) open to everyone, without a token.
pub fn open<H, T>(handler: H) -> Ops
where
    H: Handler<T, ApiState>,
    T: 'static,
{
    Ops {
        router: axum::routing::get(handler),
        declared: vec![(Method::GET, Need::Open)],
    }
}

/// A `GET` route (which also answers `HEAD`) that reads `res`.
pub fn get<H, T>(res: Res, handler: H) -> Ops
where
    H: Handler<T, ApiState>,
    T: 'static,
{
    Ops {
        router: axum::routing::get(handler),
        declared: vec![(Method::GET, Need::of(&Method::GET, res))],
    }
}

/// A `POST` route that writes `res`.
pub fn post<H, T>(res: Res, handler: H) -> Ops
where
    H: Handler<T, ApiState>,
    T: 'static,
{
    Ops {
        router: axum::routing::post(handler),
        declared: vec![(Method::POST, Need::of(&Method::POST, res))],
    }
}

/// A `PUT` route that writes `res`.
pub fn put<H, T>(res: Res, handler: H) -> Ops
where
    H: Handler<T, ApiState>,
    T: 'static,
{
    Ops {
        router: axum::routing::put(handler),
        declared: vec![(Method::PUT, Need::of(&Method::PUT, res))],
    }
}

/// A `DELETE` route that deletes `res`.
pub fn delete<H, T>(res: Res, handler: H) -> Ops
where
    H: Handler<T, ApiState>,
    T: 'static,
{
    Ops {
        router: axum::routing::delete(handler),
        declared: vec![(Method::DELETE, Need::of(&Method::DELETE, res))],
    }
}

/// A console page (`GET`, which also answers `HEAD`) that reads `res`, for a console session.
pub fn page<H, T>(res: Res, handler: H) -> Ops
where
    H: Handler<T, ApiState>,
    T: 'static,
{
    Ops {
        router: axum::routing::get(handler),
        declared: vec![(Method::GET, Need::Page(res, Verb::Read))],
    }
}

/// A console form (`POST`) that does `verb` to `res`, for a console session with its CSRF
/// token.
pub fn form<H, T>(res: Res, verb: Verb, handler: H) -> Ops
where
    H: Handler<T, ApiState>,
    T: 'static,
{
    Ops {
        router: axum::routing::post(handler),
        declared: vec![(Method::POST, Need::Page(res, verb))],
    }
}

impl Ops {
    /// A `POST` open to everyone (the console's login form, which checks its own CSRF token).
    pub fn open_post<H, T>(mut self, handler: H) -> Ops
    where
        H: Handler<T, ApiState>,
        T: 'static,
    {
        self.router = self.router.post(handler);
        self.declared.push((Method::POST, Need::Open));
        self
    }

    pub fn post<H, T>(mut self, res: Res, handler: H) -> Ops
    where
        H: Handler<T, ApiState>,
        T: 'static,
    {
        self.router = self.router.post(handler);
        self.declared
            .push((Method::POST, Need::of(&Method::POST, res)));
        self
    }

    pub fn put<H, T>(mut self, res: Res, handler: H) -> Ops
    where
        H: Handler<T, ApiState>,
        T: 'static,
    {
        self.router = self.router.put(handler);
        self.declared
            .push((Method::PUT, Need::of(&Method::PUT, res)));
        self
    }

    pub fn delete<H, T>(mut self, res: Res, handler: H) -> Ops
    where
        H: Handler<T, ApiState>,
        T: 'static,
    {
        self.router = self.router.delete(handler);
        self.declared
            .push((Method::DELETE, Need::of(&Method::DELETE, res)));
        self
    }
}

/// The routes of one path in the table.
#[derive(Debug)]
struct PathEntry {
    methods: Vec<(Method, Need)>,
    /// The `Allow` header: the methods, in the order they were declared.
    allow: HeaderValue,
}

/// What the table says of one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// The route and method are declared with this need.
    Declared(Need),
    /// The route is declared, the method is not: 405 with these methods.
    MethodNotAllowed(&'a HeaderValue),
    /// The route was mounted without a declaration: refused.
    Undeclared,
}

/// Every route of the API with the methods it answers and what each needs.
#[derive(Debug, Default)]
pub struct RouteTable {
    paths: HashMap<Box<str>, PathEntry>,
}

impl RouteTable {
    /// What `method` on the route template `path` (as axum matched it) needs.
    pub fn lookup(&self, path: &str, method: &Method) -> Lookup<'_> {
        let Some(entry) = self.paths.get(path) else {
            return Lookup::Undeclared;
        };
        // `GET` routes answer `HEAD` too, with the same need.
        let method = if *method == Method::HEAD {
            &Method::GET
        } else {
            method
        };
        match entry.methods.iter().find(|(m, _)| m == method) {
            Some((_, need)) => Lookup::Declared(*need),
            None => Lookup::MethodNotAllowed(&entry.allow),
        }
    }

    /// The methods `path` answers, as for `Allow`.
    pub fn allow(&self, path: &str) -> Option<&HeaderValue> {
        self.paths.get(path).map(|e| &e.allow)
    }

    /// Every declared (route template, method, need), in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Method, Need)> {
        self.paths.iter().flat_map(|(path, e)| {
            e.methods
                .iter()
                .map(move |(m, need)| (path.as_ref(), m, *need))
        })
    }
}

/// Builds the router and its [`RouteTable`] together, so that neither has a route the other
/// lacks.
pub struct Routes {
    router: Router<ApiState>,
    table: RouteTable,
}

impl Default for Routes {
    fn default() -> Self {
        Routes {
            router: Router::new(),
            table: RouteTable::default(),
        }
    }
}

impl Routes {
    /// Mounts `ops` at `path` (a full route template, such as `/api/v1/tenants/{tenant}`).
    pub fn route(mut self, path: &str, ops: Ops) -> Routes {
        let allow = ops
            .declared
            .iter()
            .map(|(m, _)| m.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let allow = HeaderValue::from_str(&allow).unwrap_or(HeaderValue::from_static(""));
        let previous = self.table.paths.insert(
            path.into(),
            PathEntry {
                methods: ops.declared,
                allow,
            },
        );
        assert!(previous.is_none(), "the route {path} is mounted twice");
        self.router = self.router.route(path, ops.router);
        self
    }

    /// Hands the builder to `f` (which mounts more routes).
    pub fn pipe(self, f: impl FnOnce(Routes) -> Routes) -> Routes {
        f(self)
    }

    pub fn into_parts(self) -> (Router<ApiState>, RouteTable) {
        (self.router, self.table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn ok() -> &'static str {
        "ok"
    }

    #[test]
    fn lookups_follow_the_declarations() {
        let (_, table) = Routes::default()
            .route(
                "/api/v1/things/{name}",
                get(Res::Tenants, ok).delete(Res::Tenants, ok),
            )
            .into_parts();
        let path = "/api/v1/things/{name}";
        assert_eq!(
            table.lookup(path, &Method::GET),
            Lookup::Declared(Need::Perm(Res::Tenants, Verb::Read))
        );
        assert_eq!(
            table.lookup(path, &Method::HEAD),
            Lookup::Declared(Need::Perm(Res::Tenants, Verb::Read))
        );
        assert_eq!(
            table.lookup(path, &Method::DELETE),
            Lookup::Declared(Need::Perm(Res::Tenants, Verb::Delete))
        );
        assert_eq!(
            table.lookup(path, &Method::PUT),
            Lookup::MethodNotAllowed(&HeaderValue::from_static("GET, DELETE"))
        );
        assert_eq!(
            table.lookup("/api/v1/other", &Method::GET),
            Lookup::Undeclared
        );
    }
}
