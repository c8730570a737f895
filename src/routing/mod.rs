//! The routing decision: one pure function from the topology snapshot and a view of the
//! request to a `Route`.
//!
//! Order (DESIGN.md "Domain model"): the entry address (Host and port) gives the
//! environment; its tenant rule may send the request to the environment owning the
//! tenant's range; if it did not, its canary split may send it to the canary environment;
//! then the application is the longest path prefix of the environment reached, and the
//! candidates are its nodes (its read nodes first, for reads). One hop: the rules of the
//! environment a request was sent to are not applied again (and the validator refuses
//! redirects that form a cycle).
//!
//! A tenant redirect is final: the tenant's environment serves the request or answers
//! 404/503 itself (its requests never fall back into a shared environment). A canary
//! redirect falls back to the environment it came from when the canary environment runs no
//! version of the path's application (none for the path, or another application: a canary
//! of `shop` on `/` does not take `/reports`), or has no node that can take the request.
//!
//! `route` reads the snapshot (and the nodes' health, to decide that fall-back) and
//! allocates nothing. The handler forwards its `Route`; status, explain, metrics and the
//! access log describe requests with the same value.
//!
//! `host` resolves the entry address and checks Host syntax; `path` normalises the path;
//! `tenant` and `canary` hold the two redirect rules.

pub mod canary;
pub mod host;
pub mod path;
pub mod tenant;

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, Method};

use crate::topology::{Application, EnvId, Environment, PoolId, TenantRange, Topology};
use canary::{Arm, Basis};
use host::EntryMatch;
use tenant::TenantDecision;

static X_FORWARDED_FOR_NAME: HeaderName = HeaderName::from_static("x-forwarded-for");

/// A request's header fields as routing reads them, whichever codec parsed the request:
/// hyper's map, or the own HTTP/1.1 codec's raw fields (names in any case, in order).
#[derive(Debug, Clone, Copy)]
pub enum Fields<'a> {
    Map(&'a HeaderMap),
    Raw(&'a [httparse::Header<'a>]),
}

impl<'a> Fields<'a> {
    /// The value of the first field named `name`.
    #[inline]
    pub fn get(&self, name: &HeaderName) -> Option<&'a [u8]> {
        match *self {
            Fields::Map(m) => m.get(name).map(|v| v.as_bytes()),
            Fields::Raw(r) => r
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name.as_str()))
                .map(|h| h.value),
        }
    }

    /// The value of the last field named `name`.
    #[inline]
    pub fn last(&self, name: &HeaderName) -> Option<&'a [u8]> {
        match *self {
            Fields::Map(m) => m.get_all(name).iter().next_back().map(|v| v.as_bytes()),
            Fields::Raw(r) => r
                .iter()
                .rev()
                .find(|h| h.name.eq_ignore_ascii_case(name.as_str()))
                .map(|h| h.value),
        }
    }

    /// Every field named `name`, in order.
    #[inline]
    pub fn get_all<'n>(&self, name: &'n HeaderName) -> impl Iterator<Item = &'a [u8]> + 'n
    where
        'a: 'n,
    {
        let (map, raw) = match *self {
            Fields::Map(m) => (Some(m.get_all(name).iter().map(|v| v.as_bytes())), None),
            Fields::Raw(r) => (
                None,
                Some(
                    r.iter()
                        .filter(move |h| h.name.eq_ignore_ascii_case(name.as_str()))
                        .map(|h| h.value),
                ),
            ),
        };
        map.into_iter().flatten().chain(raw.into_iter().flatten())
    }

    #[inline]
    pub fn contains(&self, name: &HeaderName) -> bool {
        self.get(name).is_some()
    }
}

/// What routing reads of a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// The Host (or the target's authority) as sent; `None` for HTTP/1.0 without one.
    pub host: Option<&'a [u8]>,
    /// The port of the listener the request came in on.
    pub port: u16,
    /// The normalised path.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub method: &'a Method,
    pub headers: Fields<'a>,
    /// The peer's address.
    pub client: IpAddr,
    /// Whether the peer is a trusted proxy (whose `X-Forwarded-For` names the client).
    pub trusted: bool,
    /// A random number, used only for a canary bucket that nothing else decides.
    pub random: u64,
}

/// Why a request cannot be routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    /// No entry address matches, or the environment has no application for the path: 404.
    NoRoute,
    /// The tenant rule is `required` and the request carries no id: 400.
    TenantRequired,
    /// The tenant rule is `required` and the id is not a number: 400.
    BadTenant,
}

/// A redirect taken, with its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirect {
    /// `tenant 1001 in range 1001-1001 -> private-acme`
    Tenant { id: u64, range: TenantRange },
    /// `canary bucket 412 < 500 -> production-canary`, or by the override header.
    Canary {
        target: EnvId,
        threshold: u16,
        basis: Basis,
    },
}

impl Redirect {
    pub fn target(&self) -> EnvId {
        match self {
            Redirect::Tenant { range, .. } => range.environment,
            Redirect::Canary { target, .. } => *target,
        }
    }
}

/// What the canary split of the entry's environment decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CanaryDecision {
    /// The side that serves the request.
    pub arm: Arm,
    pub basis: Basis,
    /// Set when the split chose the canary but the request stayed.
    pub fallback: Option<Fallback>,
    /// The bucket to store in the canary cookie, if one is due.
    pub set_cookie: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The canary environment has no application for the path, or only another one than
    /// the request's (a canary of `shop` on `/` does not take `/reports`).
    NoApplication,
    /// No node of the canary's application can take a request.
    NoUsableNode,
}

/// The pools to pick a node from, in order: for a read of an application with read nodes,
/// those first and then its nodes; otherwise its nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidates {
    pub first: PoolId,
    pub then: Option<PoolId>,
    /// For a request the canary took: the pool it would have used in its own environment
    /// (not picked from; it is where such requests go once the canary has no usable node).
    pub stay: Option<PoolId>,
}

impl Candidates {
    /// The pools a node is picked from, in order.
    pub fn iter(self) -> impl Iterator<Item = PoolId> {
        std::iter::once(self.first).chain(self.then)
    }

    /// Every pool that can serve such a request, fall-backs included: the cap on ejected
    /// nodes (at most half) is counted over them, so a lone read node or canary node
    /// that fails can be ejected (its requests have somewhere else to go) while a lone
    /// node with no fall-back cannot.
    pub fn scope(self) -> impl Iterator<Item = PoolId> {
        self.iter().chain(self.stay)
    }
}

/// The routing decision for one request.
#[derive(Debug, Clone, Copy)]
pub struct Route<'t> {
    /// The entry address matched (its `env` is the entry's environment).
    pub entry: EntryMatch<'t>,
    /// The environment reached (after a redirect, if one was taken).
    pub env: EnvId,
    pub environment: &'t Arc<Environment>,
    pub redirect: Option<Redirect>,
    /// The entry environment's tenant rule's verdict, when it has one.
    pub tenant: Option<TenantDecision>,
    /// The entry environment's canary verdict, when it has a canary and the tenant rule
    /// did not redirect.
    pub canary: Option<CanaryDecision>,
    pub app: &'t Application,
    pub candidates: Candidates,
}

impl Route<'_> {
    /// The environment whose entry the request matched (where its rules came from).
    pub fn origin(&self) -> EnvId {
        self.entry.env
    }
}

/// Whether a request only reads (goes to read nodes when the application has them): GET,
/// HEAD or OPTIONS, and not a protocol upgrade (a WebSocket is a two-way channel).
#[inline]
pub fn is_read(m: &Method, headers: Fields<'_>) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
        && !headers.contains(&http::header::UPGRADE)
}

/// Routes one request.
#[inline]
pub fn route<'t>(topo: &'t Topology, req: &RequestView<'_>) -> Result<Route<'t>, RouteError> {
    let entry = topo
        .entries
        .lookup(req.host, req.port)
        .ok_or(RouteError::NoRoute)?;
    let origin = &topo.environments[entry.env];
    let mut env = entry.env;
    let mut redirect = None;
    let mut tenant = None;
    let mut canary = None;

    if let Some(rule) = &origin.tenants {
        let d = tenant::decide(rule, req);
        match d {
            TenantDecision::Missing if rule.required => return Err(RouteError::TenantRequired),
            TenantDecision::Malformed if rule.required => return Err(RouteError::BadTenant),
            TenantDecision::Routed { id, range } => {
                redirect = Some(Redirect::Tenant { id, range });
                env = range.environment;
            }
            _ => {}
        }
        tenant = Some(d);
    }

    let mut stay = None;
    if redirect.is_none() {
        if let Some(c) = &origin.canary {
            let a = canary::assign(c, req);
            let mut fallback = None;
            if a.arm == Arm::Canary {
                let target = &topo.environments[c.environment];
                let own = origin.app_for(req.path);
                match target.app_for(req.path) {
                    // The canary runs new versions of the same applications: a request
                    // whose application it does not run stays.
                    Some(app) if !same_application(own, app) => {
                        fallback = Some(Fallback::NoApplication)
                    }
                    None => fallback = Some(Fallback::NoApplication),
                    Some(app) if !can_serve(topo, app, req) => {
                        fallback = Some(Fallback::NoUsableNode)
                    }
                    Some(_) => {
                        redirect = Some(Redirect::Canary {
                            target: c.environment,
                            threshold: c.threshold,
                            basis: a.basis,
                        });
                        env = c.environment;
                        stay = own.map(|app| app.pool);
                    }
                }
            }
            canary = Some(CanaryDecision {
                arm: if fallback.is_some() {
                    Arm::Primary
                } else {
                    a.arm
                },
                basis: a.basis,
                fallback,
                set_cookie: a.set_cookie,
            });
        }
    }

    let environment = &topo.environments[env];
    let app = environment.app_for(req.path).ok_or(RouteError::NoRoute)?;
    let candidates = match app.read_pool {
        Some(read) if is_read(req.method, req.headers) => Candidates {
            first: read,
            then: Some(app.pool),
            stay,
        },
        _ => Candidates {
            first: app.pool,
            then: None,
            stay,
        },
    };
    Ok(Route {
        entry,
        env,
        environment,
        redirect,
        tenant,
        canary,
        app,
        candidates,
    })
}

/// Whether the canary's application `canary` is a version of the request's own
/// application: the same name, or either side without named applications (an environment
/// that lists none is one application on every path).
#[inline]
fn same_application(own: Option<&Application>, canary: &Application) -> bool {
    match own {
        None => true,
        Some(own) => own.name.is_empty() || canary.name.is_empty() || own.name == canary.name,
    }
}

/// Whether some node of the application could take the request now (up and not drained).
fn can_serve(topo: &Topology, app: &Application, req: &RequestView<'_>) -> bool {
    let pools = [
        app.read_pool.filter(|_| is_read(req.method, req.headers)),
        Some(app.pool),
    ];
    pools.into_iter().flatten().any(|p| {
        topo.pools[p]
            .members
            .iter()
            .any(|m| topo.nodes[m.node].state.usable())
    })
}

/// A route in words, for logs, `envgate explain` and tests:
/// `entry company.com:80 -> production; canary bucket 412 < 500 -> production-canary;
/// application shop 1.2.0-rc.1`.
pub struct Described<'a> {
    pub route: &'a Route<'a>,
    pub topo: &'a Topology,
}

impl std::fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = |e: EnvId| &*self.topo.environments[e].name;
        let r = self.route;
        write!(f, "entry {} -> {}", r.entry, name(r.entry.env))?;
        match r.tenant {
            Some(TenantDecision::Routed { id, range }) => write!(
                f,
                "; tenant {id} in range {}-{} -> {}",
                range.from,
                range.to,
                name(range.environment)
            )?,
            Some(TenantDecision::Outside { id }) => write!(f, "; tenant {id} in no range")?,
            Some(TenantDecision::Missing) => write!(f, "; no tenant id")?,
            Some(TenantDecision::Malformed) => write!(f, "; malformed tenant id")?,
            None => {}
        }
        if let Some(c) = r.canary {
            let target = self.topo.environments[r.entry.env]
                .canary
                .as_ref()
                .map(|c| (c.threshold, name(c.environment)));
            let (threshold, target) = target.unwrap_or((0, "?"));
            match c.basis {
                Basis::Override => write!(f, "; canary header {}", c.arm.as_str())?,
                Basis::Bucket { bucket, source } => {
                    let op = if bucket < threshold { "<" } else { ">=" };
                    write!(
                        f,
                        "; canary bucket {bucket} ({}) {op} {threshold}",
                        source.as_str()
                    )?
                }
            }
            match (c.arm, c.fallback) {
                (Arm::Canary, _) => write!(f, " -> {target}")?,
                (Arm::Primary, Some(Fallback::NoApplication)) => write!(
                    f,
                    ", but {target} runs no version of the path's application: stays"
                )?,
                (Arm::Primary, Some(Fallback::NoUsableNode)) => {
                    write!(f, ", but {target} has no usable node: stays")?
                }
                (Arm::Primary, None) => write!(f, ": stays")?,
            }
        }
        if r.app.name.is_empty() {
            write!(f, "; application (all paths) in {}", name(r.env))?;
        } else {
            write!(
                f,
                "; application {} {} in {}",
                r.app.name,
                r.app.version,
                name(r.env)
            )?;
        }
        if r.candidates.then.is_some() {
            write!(f, " (read nodes first)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Health;
    use http::HeaderValue;

    const DOC: &str = r#"version: 1
listeners: [ { name: http, bind: "127.0.0.1:8080" } ]
defaults: { health: { trust_unknown: true } }
nodes:
  app-1: { address: "10.0.0.1:80" }
  app-2: { address: "10.0.0.2:80" }
  replica-1: { address: "10.0.0.3:80" }
  canary-1: { address: "10.0.0.4:80" }
  acme-1: { address: "10.0.0.5:80" }
environments:
  production:
    entries: ["company.com:8080", "*.company.com:8080"]
    nodes: [app-1, app-2, replica-1]
    apps:
      - { name: shop, version: "1.1.0", path: /, nodes: [app-1, app-2] }
      - { name: reports, version: "3.0.0", path: /reports, nodes: [app-2], read_nodes: [replica-1] }
    canary: { environment: production-canary, weight: 5, header: X-Canary, cookie: envgate_canary, hash: { header: X-User-Id } }
    tenants:
      key: { header: X-Tenant-Id }
      ranges:
        - { from: 1001, to: 1001, environment: private-acme }
        - { from: 2000, to: 2999, environment: private-acme }
  production-canary:
    nodes: [canary-1]
    apps: [ { name: shop, version: "1.2.0-rc.1", path: /shop } ]
  private-acme:
    nodes: [acme-1]
  strict:
    entries: [":8080"]
    nodes: [app-1]
    tenants: { key: { host_label: 0 }, required: true, ranges: [ { from: 1, to: 9, environment: private-acme } ] }
"#;

    struct Req {
        host: &'static str,
        path: &'static str,
        query: Option<&'static str>,
        method: Method,
        headers: HeaderMap,
        random: u64,
    }

    fn req(host: &'static str, path: &'static str) -> Req {
        Req {
            host,
            path,
            query: None,
            method: Method::GET,
            headers: HeaderMap::new(),
            random: 0,
        }
    }

    impl Req {
        fn header(mut self, name: &'static str, value: &'static str) -> Self {
            self.headers.append(name, HeaderValue::from_static(value));
            self
        }
        fn view(&self) -> RequestView<'_> {
            RequestView {
                host: Some(self.host.as_bytes()),
                port: 8080,
                path: self.path,
                query: self.query,
                method: &self.method,
                headers: Fields::Map(&self.headers),
                client: "192.0.2.1".parse().unwrap(),
                trusted: false,
                random: self.random,
            }
        }
    }

    fn topo() -> Topology {
        crate::config::parse(DOC, std::path::Path::new(".")).unwrap()
    }

    fn env_of(t: &Topology, r: &Req) -> Result<String, RouteError> {
        route(t, &r.view()).map(|r| t.environments[r.env].name.to_string())
    }

    #[test]
    fn tenant_ranges_at_their_edges() {
        let t = topo();
        for (id, env) in [
            ("1000", "production"),
            ("1001", "private-acme"),
            ("1002", "production"),
            ("1999", "production"),
            ("2000", "private-acme"),
            ("2999", "private-acme"),
            ("3000", "production"),
            ("0", "production"),
            ("18446744073709551615", "production"),
        ] {
            let r = req("company.com", "/")
                .header("x-tenant-id", id)
                .header("x-canary", "never");
            assert_eq!(env_of(&t, &r).unwrap(), env, "tenant {id}");
        }
        let r = req("company.com", "/").header("x-tenant-id", "1001");
        let rt = route(&t, &r.view()).unwrap();
        assert_eq!(
            rt.redirect,
            Some(Redirect::Tenant {
                id: 1001,
                range: TenantRange {
                    from: 1001,
                    to: 1001,
                    environment: rt.env
                }
            })
        );
        // One hop: the canary of the entry's environment is not consulted after a tenant
        // redirect.
        assert_eq!(rt.canary, None);
        let text = Described {
            route: &rt,
            topo: &t,
        }
        .to_string();
        assert!(
            text.contains("tenant 1001 in range 1001-1001 -> private-acme"),
            "{text}"
        );
    }

    #[test]
    fn missing_and_malformed_ids() {
        let t = topo();
        // Not required: they stay.
        let r = req("company.com", "/").header("x-canary", "never");
        assert_eq!(env_of(&t, &r).unwrap(), "production");
        let r = req("company.com", "/")
            .header("x-tenant-id", "acme")
            .header("x-canary", "never");
        assert_eq!(env_of(&t, &r).unwrap(), "production");
        let r = req("company.com", "/")
            .header("x-tenant-id", "1001")
            .header("x-tenant-id", "5");
        assert_eq!(
            route(&t, &r.view()).unwrap().tenant,
            Some(TenantDecision::Malformed)
        );
        // Required (host label 0 on the port-wide entry).
        assert_eq!(
            env_of(&t, &req("t5.example.org", "/")).unwrap(),
            "private-acme"
        );
        assert_eq!(env_of(&t, &req("t10.example.org", "/")).unwrap(), "strict");
        assert_eq!(
            env_of(&t, &req("example.org", "/")).unwrap_err(),
            RouteError::BadTenant
        );
        assert_eq!(
            env_of(&t, &req("t99999999999999999999.example.org", "/")).unwrap_err(),
            RouteError::BadTenant
        );
        assert_eq!(
            env_of(&t, &req("10.1.2.3", "/")).unwrap_err(),
            RouteError::TenantRequired
        );
    }

    #[test]
    fn canary_by_bucket_override_and_fallback() {
        let t = topo();
        // Weight 5%: buckets 0..499 go to the canary.
        for (cookie, env) in [
            ("envgate_canary=0", "production-canary"),
            ("envgate_canary=499", "production-canary"),
            ("envgate_canary=500", "production"),
            ("envgate_canary=9999", "production"),
        ] {
            let r = req("company.com", "/shop/cart").header("cookie", cookie);
            let rt = route(&t, &r.view()).unwrap();
            assert_eq!(&*t.environments[rt.env].name, env, "{cookie}");
            let c = rt.canary.unwrap();
            assert_eq!(c.set_cookie, None, "a valid cookie is not set again");
        }
        // A random bucket is set in the cookie.
        let mut r = req("company.com", "/shop");
        r.random = 10_412;
        let rt = route(&t, &r.view()).unwrap();
        let c = rt.canary.unwrap();
        assert_eq!(
            c.basis,
            Basis::Bucket {
                bucket: 412,
                source: canary::BucketSource::Random
            }
        );
        assert_eq!((c.arm, c.set_cookie), (Arm::Canary, Some(412)));
        let text = Described {
            route: &rt,
            topo: &t,
        }
        .to_string();
        assert!(
            text.contains("canary bucket 412 (random) < 500 -> production-canary"),
            "{text}"
        );
        // The override header wins over the cookie.
        let r = req("company.com", "/shop")
            .header("cookie", "envgate_canary=9999")
            .header("x-canary", "ALWAYS");
        assert_eq!(env_of(&t, &r).unwrap(), "production-canary");
        let r = req("company.com", "/shop")
            .header("cookie", "envgate_canary=1")
            .header("x-canary", "never");
        assert_eq!(env_of(&t, &r).unwrap(), "production");
        // No application for the path in the canary: stays.
        let r = req("company.com", "/about").header("x-canary", "always");
        let rt = route(&t, &r.view()).unwrap();
        assert_eq!(&*t.environments[rt.env].name, "production");
        assert_eq!(rt.canary.unwrap().fallback, Some(Fallback::NoApplication));
        // No usable node in the canary: stays.
        let canary_node = t.nodes.iter().find(|n| &*n.name == "canary-1").unwrap();
        canary_node.state.set_health(Health::Down);
        let r = req("company.com", "/shop").header("x-canary", "always");
        let rt = route(&t, &r.view()).unwrap();
        assert_eq!(&*t.environments[rt.env].name, "production");
        assert_eq!(rt.canary.unwrap().fallback, Some(Fallback::NoUsableNode));
    }

    #[test]
    fn hashed_bucket_is_stable() {
        let t = topo();
        let r = req("company.com", "/shop").header("x-user-id", "user-42");
        let c = route(&t, &r.view()).unwrap().canary.unwrap();
        let expected = canary::bucket_of(canary::salt("production"), b"user-42");
        assert_eq!(
            c.basis,
            Basis::Bucket {
                bucket: expected,
                source: canary::BucketSource::Hash
            }
        );
        assert_eq!(c.set_cookie, Some(expected));
    }

    #[test]
    fn reads_go_to_read_nodes_first() {
        let t = topo();
        let r = req("company.com", "/reports/q3").header("x-canary", "never");
        let route_get = route(&t, &r.view()).unwrap();
        let names = |p: PoolId| -> Vec<&str> {
            t.pools[p]
                .members
                .iter()
                .map(|m| &*t.nodes[m.node].name)
                .collect()
        };
        let c = route_get.candidates;
        assert_eq!(names(c.first), ["replica-1"]);
        assert_eq!(c.then.map(names), Some(vec!["app-2"]));
        let mut r = r;
        r.method = Method::POST;
        let c = route(&t, &r.view()).unwrap().candidates;
        assert_eq!((names(c.first), c.then), (vec!["app-2"], None));
    }

    #[test]
    fn no_route() {
        let t = topo();
        let mut r = req("company.com", "/");
        let mut v = r.view();
        v.port = 9999;
        assert_eq!(route(&t, &v).unwrap_err(), RouteError::NoRoute);
        r.host = "other.org";
        // The port-wide entry of `strict` requires a tenant label.
        assert_eq!(env_of(&t, &r).unwrap_err(), RouteError::BadTenant);
    }
}
