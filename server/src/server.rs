//! The `clusterclaw server` process: start-up in a fixed order, serving, background tasks, and
//! a draining shutdown on SIGTERM/SIGINT.

use std::fs::{self, File, TryLockError};
use std::future::Future;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::agent_rpc::{self, AgentRpc, AgentTls};
use crate::api::{self, ApiState};
use crate::auth::{self, ADMIN_TOKEN_FILE};
use crate::config::StoreChoice;
use crate::config::{EX_USAGE, ServerArgs, ServerConfig};
use crate::pki::{self, PkiSetup};
use crate::store::Store;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::telemetry;
use crate::util::blocking;

/// The database inside the data directory.
pub const DB_FILE: &str = "clusterclaw.db";
/// The key file secrets are sealed with, beside the database (mode 0600).
pub const SECRETS_KEY_FILE: &str = "secrets.key";
/// Held locked (flock) by the running server; holds its pid.
pub const LOCK_FILE: &str = "server.lock";
/// Where a running server says how to reach it (removed when it stops).
pub const ENDPOINTS_FILE: &str = "endpoints.json";
/// Threads for store work. API store calls are limited to a few at once already; more threads
/// would only add stacks and allocator caches, not throughput.
const MAX_BLOCKING_THREADS: usize = 16;
/// How long background tasks get to stop after the API has drained.
const TASK_STOP_GRACE: Duration = Duration::from_secs(5);

/// Contents of `<data-dir>/endpoints.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    /// Base URL of the REST API, e.g. `http://127.0.0.1:7080`.
    pub api: String,
    /// Address of the agent port, `HOST:PORT`.
    pub agent: String,
    /// Absolute path of the CA certificate agents and clients trust.
    pub ca_cert: String,
    pub pid: u32,
}

/// The data directory, locked against a second server for as long as this value lives.
struct DataDirLock {
    _file: File,
}

fn lock_data_dir(dir: &Path) -> anyhow::Result<DataDirLock> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    let path = dir.join(LOCK_FILE);
    let mut file = match try_lock(&path)? {
        Ok(file) => file,
        Err(who) => bail!(
            "another clusterclaw server{who} is already using the data directory {}; stop it first, or give this server its own --data-dir",
            dir.display()
        ),
    };
    file.set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(DataDirLock { _file: file })
}

/// Opens (creating) and locks the lock file at `path`; `Ok(Err(who))` when a server holds it
/// (` (pid N)`, or empty when it wrote no pid).
fn try_lock(path: &Path) -> anyhow::Result<Result<File, String>> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Ok(file)),
        Err(TryLockError::WouldBlock) => {
            let pid = fs::read_to_string(path).unwrap_or_default();
            let pid = pid.trim();
            Ok(Err(if pid.is_empty() {
                String::new()
            } else {
                format!(" (pid {pid})")
            }))
        }
        Err(TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Locks the existing data directory `dir` against a server starting on it, for a command
/// that must not run beside one (the lock is held while the file lives). `Ok(Err(who))` when
/// a server runs on it.
pub fn lock_idle_data_dir(dir: &Path) -> anyhow::Result<Result<File, String>> {
    try_lock(&dir.join(LOCK_FILE))
}

/// The machine's host name (Linux), if it is usable in a certificate.
fn hostname() -> Option<String> {
    let name = fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .ok()?;
    let name = name.trim().to_ascii_lowercase();
    pki::check_server_name(&name).ok().map(|()| name)
}

/// Names for the agent-port certificate: the configured ones, `localhost`, `127.0.0.1`, the
/// host name and a specific agent listen address; without duplicates.
fn certificate_names(config: &ServerConfig) -> Vec<String> {
    let mut names: Vec<String> = config.server_names.clone();
    names.push("localhost".into());
    names.push("127.0.0.1".into());
    names.extend(hostname());
    if !config.agent_listen.ip().is_unspecified() {
        names.push(config.agent_listen.ip().to_string());
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.to_ascii_lowercase()));
    names
}

/// The URL a local client uses for an API bound at `addr`.
fn api_url(addr: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    let host = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => "127.0.0.1".to_string(),
        IpAddr::V6(ip) if ip.is_unspecified() => "[::1]".to_string(),
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    format!("{scheme}://{host}:{}", addr.port())
}

/// Runs the server with a validated configuration until `shutdown` completes: locks the data
/// directory, opens the store, ensures the admin token and the PKI, binds the API, writes
/// `endpoints.json`, serves, then drains and stops.
pub async fn run(config: ServerConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let data_dir =
        std::path::absolute(&config.data_dir).unwrap_or_else(|_| config.data_dir.clone());
    let _lock = lock_data_dir(&data_dir)?;

    let db = data_dir.join(DB_FILE);
    let db_path = db.clone();
    let schema_path = config.openclaw_schema.clone();
    let store_choice = config.store.clone();
    let (store, shown): (Arc<dyn Store>, String) = blocking("opening the store", move || {
        let schema = match schema_path {
            Some(path) => Some(Arc::new(
                crate::openclaw::schema::Schema::load(&path)
                    .map_err(|e| anyhow!("the openclaw.json schema: {e}"))?,
            )),
            None => None,
        };
        anyhow::Ok(match store_choice {
            StoreChoice::Sqlite => {
                let store = SqliteStore::open(&db_path)
                    .with_context(|| format!("cannot open the store {}", db_path.display()))?;
                if let Some(schema) = schema {
                    store.set_schema(schema);
                }
                let shown = db_path.display().to_string();
                (Arc::new(store) as Arc<dyn Store>, shown)
            }
            StoreChoice::Postgres(target) => {
                let store = PgStore::open(&target).with_context(|| {
                    format!(
                        "cannot open the store {}",
                        crate::store::postgres::redact(&target.url)
                    )
                })?;
                if let Some(schema) = schema {
                    store.set_schema(schema);
                }
                let shown = store.shown().to_string();
                (Arc::new(store) as Arc<dyn Store>, shown)
            }
        })
    })
    .await??;
    // The key the values of secrets are sealed with, beside the database.
    let keyring_path = data_dir.join(SECRETS_KEY_FILE);
    let keyring: crate::configcenter::SharedKeyring = {
        let (path, store, shown) = (keyring_path.clone(), Arc::clone(&store), shown.clone());
        let k = blocking("loading the secrets key", move || {
            load_secrets_key(store.as_ref(), &path, &shown)
        })
        .await??;
        Arc::new(std::sync::RwLock::new(Some(Arc::new(k))))
    };
    tracing::info!(store = %shown, index = store.index(), "store opened");

    let token_store = Arc::clone(&store);
    let token_dir = data_dir.clone();
    let admin = blocking("creating the admin token", move || {
        auth::ensure_admin_token(token_store.as_ref(), &token_dir)
    })
    .await??;
    let admin_token_path = data_dir.join(ADMIN_TOKEN_FILE);
    if let Some(new) = &admin {
        eprintln!("{}", auth::admin_token_banner(new));
        tracing::info!(id = %new.id, path = %new.path.display(), "created the platform-admin token");
    }

    let names = certificate_names(&config);
    let pki_dir = std::path::absolute(&config.pki_dir).unwrap_or_else(|_| config.pki_dir.clone());
    let (pki_files, setup) = {
        let (dir, names, store) = (pki_dir.clone(), names.clone(), Arc::clone(&store));
        blocking("setting up the PKI", move || {
            ensure_shared_pki(store.as_ref(), &dir, &names)
        })
        .await??
    };
    match setup {
        PkiSetup::Created => {
            tracing::info!(dir = %pki_dir.display(), names = ?names, "created a certificate authority and the agent-port certificate")
        }
        PkiSetup::ServerCertRenewed => {
            tracing::info!(dir = %pki_dir.display(), names = ?names, "issued a new agent-port certificate")
        }
        PkiSetup::Loaded => {
            tracing::info!(dir = %pki_dir.display(), "certificate authority loaded")
        }
    }

    let tls = match &config.api_tls {
        None => None,
        Some(files) => {
            Some(api::tls_server_config(&files.cert, &files.key).map_err(|e| anyhow!(e))?)
        }
    };
    let listener = crate::accept::listen(config.api_listen)
        .with_context(|| format!("cannot listen on {} for the API", config.api_listen))?;
    let api_addr = listener
        .local_addr()
        .context("the API listener has no address")?;
    let agent_listener = crate::accept::listen(config.agent_listen).with_context(|| {
        format!(
            "cannot listen on {} for the agent port",
            config.agent_listen
        )
    })?;
    let agent_addr = agent_listener
        .local_addr()
        .context("the agent listener has no address")?;
    let endpoints = Endpoints {
        api: api_url(api_addr, tls.is_some()),
        agent: agent_addr.to_string(),
        ca_cert: pki_files.ca_cert.display().to_string(),
        pid: std::process::id(),
    };
    let endpoints_path = data_dir.join(ENDPOINTS_FILE);
    let text = serde_json::to_vec_pretty(&endpoints).context("encoding endpoints.json")?;
    auth::write_file_atomic(&endpoints_path, &text, 0o644)
        .with_context(|| format!("cannot write {}", endpoints_path.display()))?;

    let (stop_tasks, tasks_stop) = watch::channel(false);
    let mut tasks: JoinSet<&'static str> = JoinSet::new();

    let agent_tls = {
        let files = pki_files.clone();
        blocking(
            "reading the agent-port certificate",
            move || -> anyhow::Result<AgentTls> {
                let read = |p: &Path| {
                    fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
                };
                Ok(AgentTls {
                    cert_pem: read(&files.server_cert)?,
                    key_pem: read(&files.server_key)?,
                    ca_pem: read(&files.ca_cert)?,
                })
            },
        )
        .await??
    };
    let ca = {
        let dir = pki_dir.clone();
        Arc::new(blocking("loading the CA", move || pki::Ca::load(&dir)).await??)
    };
    let rpc = AgentRpc {
        limiter: config.rate_limits.enabled.then(|| {
            let limiter = Arc::new(crate::ratelimit::AgentRateLimiter::new(&config.rate_limits));
            crate::ratelimit::spawn_cleanup(&limiter, crate::ratelimit::CLEANUP_INTERVAL);
            limiter
        }),
        store: Arc::clone(&store),
        ca,
        book: Arc::new(crate::agent_rpc::AssignmentBook::with_keyring(
            keyring.clone(),
        )),
        reports: Arc::default(),
        metrics: Arc::default(),
        tasks: Arc::default(),
        enrollments: Arc::default(),
        verified: Arc::default(),
    };
    // The expiry of the server's certificates, for `/metrics` (and the alert on it).
    for (name, pem) in [
        ("ca", Some(agent_tls.ca_pem.clone())),
        ("agent-port", Some(agent_tls.cert_pem.clone())),
        (
            "api",
            config
                .api_tls
                .as_ref()
                .and_then(|f| fs::read_to_string(&f.cert).ok()),
        ),
    ] {
        if let Some(at) = pem.as_deref().and_then(pki::pem_not_after) {
            rpc.metrics.set_certificate_expiry(name, at);
        }
    }
    {
        let (rpc, mut stop) = (rpc.clone(), tasks_stop.clone());
        tasks.spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = agent_rpc::serve(agent_listener, agent_tls, rpc, stopped).await {
                tracing::error!(error = %e, "the agent port failed");
            }
            "agent port"
        });
    }
    {
        let (rpc, stop) = (rpc.clone(), tasks_stop.clone());
        tasks.spawn(async move {
            agent_rpc::run_background(rpc, stop).await;
            "assignment book"
        });
    }
    // One server of a database leads (the leader lease, [`crate::store::lease`]); only the
    // leader runs the controllers, each term under its epoch.
    let server_id = crate::store::lease::new_server_id();
    let (leader_tx, leader_rx) =
        watch::channel(crate::store::lease::LeaderStatus::unknown(&server_id));
    {
        let (store, stop, ttl) = (
            Arc::clone(&store),
            tasks_stop.clone(),
            config.lease_duration,
        );
        let id = server_id.clone();
        tasks.spawn(async move {
            crate::store::lease::run_election(store, id, ttl, leader_tx, stop).await;
            "leader election"
        });
    }
    // Every replica registers itself in the store and refreshes its row (`get servers`).
    {
        let me = crate::store::replicas::ReplicaBeat {
            id: server_id.clone(),
            hostname: fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default(),
            api: endpoints.api.clone(),
            agent: endpoints.agent.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            started_at_ms: crate::events::now_ms(),
            beat_every: crate::store::replicas::beat_every(config.lease_duration),
            leading: false,
            epoch: 0,
        };
        let (store, stop, leader, metrics) = (
            Arc::clone(&store),
            tasks_stop.clone(),
            leader_rx.clone(),
            Arc::clone(&rpc.metrics),
        );
        tasks.spawn(async move {
            let publish = move |view| metrics.set_replica(view);
            crate::store::replicas::run_heartbeat(store, me, leader, publish, stop).await;
            "server heartbeat"
        });
    }
    {
        let (metrics, mut leader) = (Arc::clone(&rpc.metrics), leader_rx.clone());
        tasks.spawn(async move {
            loop {
                let status = leader.borrow_and_update().clone();
                metrics.set_leader(status);
                if leader.changed().await.is_err() {
                    break;
                }
            }
            "leader status"
        });
    }
    {
        let (store, stop, retention, leader) = (
            Arc::clone(&store),
            tasks_stop.clone(),
            config.events,
            leader_rx.clone(),
        );
        tasks.spawn(async move {
            let prune_as = move || leader.borrow().leading_epoch();
            crate::events::run_flusher(store, retention, stop, prune_as).await;
            "events"
        });
    }
    crate::model::set_fleet_defaults(config.fleet.clone());
    {
        let starters = controller_starters(&config, &store, &rpc.metrics);
        let (leader, stop) = (leader_rx.clone(), tasks_stop.clone());
        tasks.spawn(async move {
            crate::controllers::while_leading(leader, stop, starters)
                .await
                .unwrap_or("controllers")
        });
    }

    tracing::info!(
        api = %endpoints.api,
        agent = %endpoints.agent,
        ca_cert = %endpoints.ca_cert,
        data_dir = %data_dir.display(),
        "clusterclaw server started"
    );
    crate::notify::ready(&mut tasks, &store, &tasks_stop, &endpoints);

    let mut options = api_options(&config, &store).await?;
    options.keyring = keyring;
    options.keyring_path = Some(keyring_path);
    options.tasks = Arc::clone(&rpc.tasks);
    options.secure_cookies = tls.is_some();
    let audit = options.audit.clone();
    let state = ApiState::with_options(
        Arc::clone(&store),
        admin_token_path,
        Arc::clone(&rpc.reports),
        Arc::clone(&rpc.metrics),
        options,
    );
    let app = api::router(state.clone());
    let (abort_tx, abort_rx) = oneshot::channel::<()>();
    let serve_state = state.clone();
    let stop_serving = async move {
        tokio::select! {
            () = shutdown => {
                tracing::info!("shutting down: draining requests");
                crate::notify::stopping();
            }
            _ = abort_rx => {}
        }
        serve_state.begin_shutdown();
    };
    let serving = api::serve(listener, app, tls, stop_serving, api::SHUTDOWN_GRACE);
    tokio::pin!(serving);

    let mut failure: Option<anyhow::Error> = None;
    let mut abort_tx = Some(abort_tx);
    let served = loop {
        tokio::select! {
            r = &mut serving => break r,
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                let name = joined.unwrap_or("a background task");
                tracing::error!(task = name, "a background task stopped unexpectedly; shutting down");
                failure.get_or_insert_with(|| anyhow!("the {name} stopped unexpectedly"));
                if let Some(tx) = abort_tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    };

    // Every request answered has its audit record on disk before the server stops.
    if let Some(audit) = &audit
        && let Err(e) = tokio::time::timeout(TASK_STOP_GRACE, audit.flush())
            .await
            .map_err(|_| "timed out".to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
    {
        tracing::error!(error = %e, "the audit log could not be flushed at shutdown");
    }
    let _ = stop_tasks.send(true);
    let stopped = tokio::time::timeout(TASK_STOP_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if stopped.is_err() {
        tracing::warn!(
            tasks = tasks.len(),
            "background tasks did not stop in time; abandoning them"
        );
        tasks.abort_all();
    }
    match fs::remove_file(&endpoints_path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %endpoints_path.display(), error = %e, "cannot remove endpoints.json")
        }
    }
    served.context("serving the API failed")?;
    match failure {
        Some(e) => Err(e),
        None => {
            tracing::info!("clusterclaw server stopped");
            Ok(())
        }
    }
}

/// The controllers the leader runs (host liveness, volumes, scheduler, waves, rollouts, drain).
fn controller_starters(
    config: &ServerConfig,
    store: &Arc<dyn Store>,
    metrics: &Arc<crate::metrics::Metrics>,
) -> Vec<(&'static str, crate::controllers::Starter)> {
    use crate::controllers;
    let (resync, ttl, retention) = (
        config.resync_interval,
        config.heartbeat_timeout,
        config.orphan_retention,
    );
    let s = Arc::clone(store);
    let hosts: controllers::Starter =
        Box::new(move |stop| Box::pin(controllers::hosts::run(Arc::clone(&s), stop, resync, ttl)));
    let s = Arc::clone(store);
    let volumes: controllers::Starter = Box::new(move |stop| {
        Box::pin(controllers::volumes::run(
            Arc::clone(&s),
            stop,
            resync,
            retention,
        ))
    });
    let s = Arc::clone(store);
    let scheduler: controllers::Starter =
        Box::new(move |stop| Box::pin(controllers::scheduler::run(Arc::clone(&s), stop, resync)));
    let s = Arc::clone(store);
    let waves: controllers::Starter =
        Box::new(move |stop| Box::pin(controllers::waves::run(Arc::clone(&s), stop)));
    let (s, metrics) = (Arc::clone(store), Arc::clone(metrics));
    let rollout: controllers::Starter = Box::new(move |stop| {
        Box::pin(controllers::rollout::run(
            Arc::clone(&s),
            Arc::clone(&metrics),
            stop,
        ))
    });
    let s = Arc::clone(store);
    let drain: controllers::Starter =
        Box::new(move |stop| Box::pin(controllers::drain::run(Arc::clone(&s), stop)));
    vec![
        ("host liveness controller", hosts),
        ("volume controller", volumes),
        ("scheduler", scheduler),
        ("wave controller", waves),
        ("rollout controller", rollout),
        ("drain controller", drain),
    ]
}

/// The PKI in `dir`, with the certificate authority every server of the store shares: the
/// first server of a shared store offers its CA, every later one takes the stored CA (and
/// issues its agent-port certificate from it), so that hosts enrolled through one server are
/// known to all and trust each.
fn ensure_shared_pki(
    store: &dyn Store,
    dir: &Path,
    names: &[String],
) -> anyhow::Result<(pki::PkiFiles, PkiSetup)> {
    let (files, setup) = pki::ensure(dir, names)?;
    let read =
        |p: &Path| fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()));
    let local = (read(&files.ca_cert)?, read(&files.ca_key)?);
    let Some(shared) = store
        .shared_ca(&local)
        .map_err(|e| anyhow!("cannot read the shared certificate authority: {e}"))?
    else {
        return Ok((files, setup));
    };
    if shared == local {
        return Ok((files, setup));
    }
    tracing::info!(dir = %dir.display(), "taking the certificate authority shared by the servers of this store");
    auth::write_file_atomic(&files.ca_key, shared.1.as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", files.ca_key.display()))?;
    auth::write_file_atomic(&files.ca_cert, shared.0.as_bytes(), 0o644)
        .with_context(|| format!("cannot write {}", files.ca_cert.display()))?;
    Ok(pki::ensure(dir, names)?)
}

/// The secrets key at `path`, which must be the one the store's secret values are sealed with:
/// its identity is recorded in the store by the first server (creating the file if the store
/// records none yet), and a server whose file is missing or another is refused, as one whose
/// file lacks a data key a stored value is sealed with (an older copy, from before a rotation).
fn load_secrets_key(
    store: &dyn Store,
    path: &Path,
    shown: &str,
) -> anyhow::Result<crate::secrets::Keyring> {
    let fix = format!(
        "copy secrets.key from a server of this cluster (or from the data directory the store was migrated from) to {}",
        path.display()
    );
    let loaded =
        crate::secrets::Keyring::load(path).map_err(|e| anyhow!("the secrets key file: {e}"))?;
    let recorded = store
        .secrets_key(None)
        .map_err(|e| anyhow!("cannot read the secrets key identity in {shown}: {e}"))?;
    let mut used: Vec<String> = Vec::new();
    for value in store
        .sealed_values()
        .map_err(|e| anyhow!("cannot read the sealed secret values in {shown}: {e}"))?
    {
        if let Some(id) = crate::secrets::Keyring::sealed_key_id(&value.sealed)
            && !used.iter().any(|u| u == id)
        {
            used.push(id.to_string());
        }
    }
    let keyring = match loaded {
        Some(k) => k,
        None => {
            if let Some(recorded) = &recorded {
                bail!(
                    "the secrets key file {} is missing, but the secret values in the store {shown} are sealed with the key file whose identity is {recorded}; {fix}",
                    path.display()
                );
            }
            if !used.is_empty() {
                bail!(
                    "the secrets key file {} is missing, but the store {shown} holds secret values sealed with data key {}; restore the file from a backup (a new one would open none of them)",
                    path.display(),
                    used.join(", ")
                );
            }
            crate::secrets::Keyring::load_or_create(path)
                .map_err(|e| anyhow!("the secrets key file: {e}"))?
        }
    };
    let identity = keyring.identity();
    let other = |recorded: &str| {
        anyhow!(
            "the secrets key file {} (identity {identity}) is not the one the secret values in the store {shown} are sealed with (identity {recorded}); {fix}",
            path.display()
        )
    };
    if let Some(recorded) = &recorded
        && *recorded != identity
    {
        return Err(other(recorded));
    }
    let held = keyring.key_ids();
    let missing: Vec<&str> = used
        .iter()
        .map(String::as_str)
        .filter(|id| !held.contains(id))
        .collect();
    if !missing.is_empty() {
        bail!(
            "the store {shown} holds secret values sealed with data key {}, which the secrets key file {} does not hold (it holds {}): it is an older copy, from before a key rotation, or another installation's; {fix}",
            missing.join(", "),
            path.display(),
            held.join(", ")
        );
    }
    // Recorded only now, so a file that opens nothing is never recorded.
    let recorded = store
        .secrets_key(Some(&identity))
        .map_err(|e| anyhow!("cannot record the secrets key identity in {shown}: {e}"))?;
    if let Some(recorded) = recorded
        && recorded != identity
    {
        return Err(other(&recorded));
    }
    Ok(keyring)
}

/// Completes on the first SIGTERM or SIGINT.
/// Single sign-on, rate limits and the audit log, from the configuration.
async fn api_options(
    config: &ServerConfig,
    store: &Arc<dyn crate::store::Store>,
) -> anyhow::Result<api::ApiOptions> {
    let oidc = match &config.oidc {
        None => None,
        Some(settings) => {
            let verifier = crate::auth::oidc::OidcVerifier::new(settings, Default::default())
                .map_err(|e| anyhow!("single sign-on: {e}"))?;
            for (issuer, why) in verifier.warm_up().await {
                tracing::warn!(%issuer, reason = %why, "cannot fetch the issuer's signing keys yet; tokens from it are refused until they can be fetched");
            }
            Some(Arc::new(verifier))
        }
    };
    let limiter = config.rate_limits.enabled.then(|| {
        let limiter = Arc::new(crate::ratelimit::RateLimiter::new(&config.rate_limits));
        crate::ratelimit::spawn_cleanup(&limiter, crate::ratelimit::CLEANUP_INTERVAL);
        limiter
    });
    let audit = crate::audit::AuditWriter::start(Arc::clone(store), &config.audit)
        .map_err(|e| anyhow!("the audit log: {e}"))?;
    Ok(api::ApiOptions {
        oidc,
        limiter,
        audit: Some(audit),
        ..Default::default()
    })
}

fn termination_signal() -> io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// `clusterclaw server`: loads and checks the configuration (exit 64 on problems), sets up
/// logging, and runs until SIGTERM/SIGINT (exit 0) or a failure (exit 1).
pub fn main(args: ServerArgs) -> ExitCode {
    let config = match ServerConfig::load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("clusterclaw server: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if let Err(e) = telemetry::init(config.log_format) {
        eprintln!("clusterclaw server: {e}");
        return ExitCode::from(EX_USAGE);
    }
    clusterclaw_agent::rlimit::raise_nofile_and_log();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("clusterclaw")
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let signal = termination_signal().context("cannot install the SIGTERM/SIGINT handlers")?;
        run(config, signal).await
    });
    runtime.shutdown_timeout(TASK_STOP_GRACE);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the `endpoints.json` of a running server.
pub fn read_endpoints(data_dir: &Path) -> io::Result<Endpoints> {
    let text = fs::read(data_dir.join(ENDPOINTS_FILE))?;
    serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Path of the admin token file of a data directory.
pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join(ADMIN_TOKEN_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stores a sealed value whose data key (`deadbeef`) no key file holds.
    fn sealed_with_deadbeef(db: &Path) {
        rusqlite::Connection::open(db)
            .unwrap()
            .execute(
                "INSERT INTO secret_values (tenant, project, name, key, sealed)
                 VALUES ('t', '', 's', 'k', 'ccs1:deadbeef:AAAA')",
                [],
            )
            .unwrap();
    }

    #[test]
    fn the_secrets_key_must_be_the_one_the_store_records_and_hold_every_key_used() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join(DB_FILE);
        let store = SqliteStore::open(&db).unwrap();
        let path = dir.path().join(SECRETS_KEY_FILE);
        let first = load_secrets_key(&store, &path, "the store").unwrap();
        assert_eq!(
            store.secrets_key(None).unwrap(),
            Some(first.identity()),
            "the first use records the identity"
        );
        assert_eq!(
            load_secrets_key(&store, &path, "the store")
                .unwrap()
                .identity(),
            first.identity()
        );
        let other = dir.path().join("other.key");
        crate::secrets::Keyring::load_or_create(&other).unwrap();
        let e = load_secrets_key(&store, &other, "the store")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("other.key")
                && e.contains("is not the one")
                && e.contains("copy secrets.key"),
            "{e}"
        );
        let missing = dir.path().join("missing.key");
        let e = load_secrets_key(&store, &missing, "the store")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.key is missing"), "{e}");
        assert!(!missing.exists(), "a missing key file is not created");
        // A value sealed with a data key the file does not hold (an older copy of the file).
        sealed_with_deadbeef(&db);
        let e = load_secrets_key(&store, &path, "the store")
            .unwrap_err()
            .to_string();
        assert!(e.contains("data key deadbeef"), "{e}");
        // Without a recorded identity, a missing file is not made anew while values are sealed.
        let bare = tempfile::tempdir().unwrap();
        let bare_db = bare.path().join(DB_FILE);
        let bare_store = SqliteStore::open(&bare_db).unwrap();
        sealed_with_deadbeef(&bare_db);
        let fresh = bare.path().join(SECRETS_KEY_FILE);
        let e = load_secrets_key(&bare_store, &fresh, "the store")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is missing") && e.contains("deadbeef"), "{e}");
        assert!(!fresh.exists());
        assert_eq!(bare_store.secrets_key(None).unwrap(), None);
    }

    #[test]
    fn api_urls() {
        assert_eq!(
            api_url("0.0.0.0:7080".parse().unwrap(), false),
            "http://127.0.0.1:7080"
        );
        assert_eq!(
            api_url("[::]:7080".parse().unwrap(), true),
            "https://[::1]:7080"
        );
        assert_eq!(
            api_url("10.0.0.5:1".parse().unwrap(), false),
            "http://10.0.0.5:1"
        );
    }

    #[test]
    fn certificate_names_include_the_defaults_once() {
        let mut c = ServerConfig::with_data_dir("/tmp/x");
        c.server_names = vec!["cp.example.com".into(), "localhost".into()];
        c.agent_listen = "10.1.2.3:7443".parse().unwrap();
        let names = certificate_names(&c);
        assert_eq!(&names[..3], ["cp.example.com", "localhost", "127.0.0.1"]);
        assert!(names.contains(&"10.1.2.3".to_string()));
        assert_eq!(names.iter().filter(|n| *n == "localhost").count(), 1);
    }

    async fn wait_for_endpoints(dir: &Path) -> Endpoints {
        for _ in 0..200 {
            if let Ok(e) = read_endpoints(dir) {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the server did not write endpoints.json");
    }

    async fn http_get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out.split(' ').nth(1).unwrap().parse().unwrap();
        (status, out)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn start_serve_lock_and_stop() {
        let dir = tempfile::tempdir().unwrap();
        let config = ServerConfig::with_data_dir(dir.path());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(run(config.clone(), async move {
            let _ = stopped.await;
        }));
        let endpoints = wait_for_endpoints(dir.path()).await;
        assert_eq!(endpoints.pid, std::process::id());
        assert!(
            endpoints.api.starts_with("http://127.0.0.1:"),
            "{}",
            endpoints.api
        );
        assert!(
            Path::new(&endpoints.ca_cert).is_absolute() && Path::new(&endpoints.ca_cert).exists()
        );
        assert!(
            endpoints.agent.starts_with("127.0.0.1:") && !endpoints.agent.ends_with(":0"),
            "the bound agent port is published: {}",
            endpoints.agent
        );

        let token = fs::read_to_string(dir.path().join(ADMIN_TOKEN_FILE)).unwrap();
        let token = token.trim();
        assert!(token.starts_with("cca_"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(dir.path().join(ADMIN_TOKEN_FILE))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );

        let addr = endpoints.api.trim_start_matches("http://");
        assert_eq!(http_get(addr, "/healthz", None).await.0, 200);
        assert_eq!(http_get(addr, "/api/v1/info", None).await.0, 401);
        let (status, text) = http_get(addr, "/api/v1/info", Some(token)).await;
        assert_eq!(status, 200, "{text}");
        assert!(
            text.to_ascii_lowercase().contains("x-clusterclaw-index:"),
            "{text}"
        );

        // A second server on the same data directory is refused.
        let second = run(config.clone(), async {}).await.unwrap_err();
        assert!(
            format!("{second:#}").contains("already using the data directory"),
            "{second:#}"
        );

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        assert!(
            !dir.path().join(ENDPOINTS_FILE).exists(),
            "endpoints.json is removed at exit"
        );

        // The next start keeps the admin token and the CA.
        let ca_before = fs::read(&endpoints.ca_cert).unwrap();
        run(config, async {}).await.unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join(ADMIN_TOKEN_FILE))
                .unwrap()
                .trim(),
            token
        );
        assert_eq!(fs::read(&endpoints.ca_cert).unwrap(), ca_before);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn in_flight_requests_finish_during_shutdown() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let config = ServerConfig::with_data_dir(dir.path());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(run(config, async move {
            let _ = stopped.await;
        }));
        let endpoints = wait_for_endpoints(dir.path()).await;
        let token = fs::read_to_string(dir.path().join(ADMIN_TOKEN_FILE)).unwrap();
        let addr = endpoints.api.trim_start_matches("http://").to_string();
        // Send the headers of a request whose body is still to come, then ask for shutdown.
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let body = r#"{"metadata":{"name":"acme"}}"#;
        let head = format!(
            "POST /api/v1/tenants HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            token.trim(),
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(body.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 201"), "{out}");
        server.await.unwrap().unwrap();
    }
}
