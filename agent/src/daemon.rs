//! The agent process as a library: lock the data directory, enroll (or load the saved identity), run the host loops, renew the certificate in time, stop on the shutdown signal.
//!
//! A host the control plane removed (`removed.json` in the data directory, see [`crate::sync`])
//! stays down: its replicas are stopped and nothing is started again. Started with a join
//! token, it sets the old identity aside (`removed-<host>-<time>/`) and enrolls as a new host.
//! A host that is still enrolled does the same when started with `--re-enroll` and a join
//! token, after removing the old identity's containers (their state volumes stay).

use std::fs::{File, TryLockError};
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};
use clusterclaw_proto::agent as pb;
use tokio::sync::watch;

use crate::client;
use crate::config::AgentConfig;
use crate::control::{GrpcControlPlane, describe_status};
use crate::engine::LazyEngine;
use crate::enroll::{self, HostIdentity, IdentityFiles};
use crate::metrics::HostMetrics;
use crate::reconcile::{BackoffPolicy, Reconciler, ReconcilerSettings};
use crate::state;
use crate::sync::{
    HostLoops, LoopsEnd, RECONNECT_MAX_DELAY, RECONNECT_MIN_DELAY, SyncSettings, removed_status,
    stop_replicas, stopped,
};

/// Held locked (flock) by the running agent; holds its pid.
pub const LOCK_FILE: &str = "agent.lock";
/// First delay before trying to enroll again while the server is unreachable.
pub const ENROLL_RETRY_MIN_DELAY: Duration = Duration::from_millis(500);
/// Longest delay between enrollment attempts.
pub const ENROLL_RETRY_MAX_DELAY: Duration = Duration::from_secs(30);
/// How long one `Enroll` call may take.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest the renewal loop sleeps before looking at the certificate again.
const RENEW_CHECK_MAX: Duration = Duration::from_secs(3600);
/// How long the loops get to stop after the shutdown signal.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Why the agent stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    DataDir(String),
    #[error(
        "the control plane refused to enroll this host: {0}\n(the join token is wrong, expired, used up or revoked; create a new one with `clusterclaw token create join`)"
    )]
    EnrollRefused(String),
    #[error("cannot enroll this host: {0}")]
    Enroll(String),
    #[error(
        "cannot enroll: {0}\n(is --ca-cert the CA of this server? `clusterclaw server` prints its path)"
    )]
    Trust(String),
    #[error(transparent)]
    Identity(#[from] enroll::EnrollError),
    #[error(transparent)]
    Client(#[from] client::ClientError),
    #[error("{0}")]
    Config(String),
    #[error("the saved host identity is unusable: {0}")]
    Owner(String),
}

/// The data directory, locked against a second agent for as long as this value lives.
struct DataDirLock {
    _file: File,
}

fn lock_data_dir(dir: &Path) -> Result<DataDirLock, AgentError> {
    state::create_private_dir(dir).map_err(|e| {
        AgentError::DataDir(format!(
            "cannot create the data directory {}: {e}",
            dir.display()
        ))
    })?;
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| AgentError::DataDir(format!("cannot open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            let pid = pid.trim();
            let who = if pid.is_empty() {
                String::new()
            } else {
                format!(" (pid {pid})")
            };
            return Err(AgentError::DataDir(format!(
                "another clusterclaw-agent{who} is already using the data directory {}; stop it first, or give this agent its own --data-dir",
                dir.display()
            )));
        }
        Err(TryLockError::Error(e)) => {
            return Err(AgentError::DataDir(format!(
                "cannot lock {}: {e}",
                path.display()
            )));
        }
    }
    file.set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(|e| AgentError::DataDir(format!("cannot write {}: {e}", path.display())))?;
    Ok(DataDirLock { _file: file })
}

/// The machine's host name, or `host` when it has none.
pub fn machine_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| sysinfo::System::host_name().ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}

/// Runs the agent until `shutdown` completes. Replicas keep running after it returns.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let agent = run_until(config, stop_rx);
    tokio::pin!(agent);
    tokio::select! {
        r = &mut agent => return r,
        () = shutdown => {}
    }
    tracing::info!("stopping; the replicas keep running");
    crate::notify::stopping();
    let _ = stop_tx.send(true);
    match tokio::time::timeout(STOP_GRACE, agent).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!("the agent's loops did not stop in time");
            Ok(())
        }
    }
}

/// [`run`] with a stop flag instead of a future (for embedding).
pub async fn run_until(
    mut config: AgentConfig,
    mut stop: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let data_dir = config.data_dir.clone();
    let _lock = lock_data_dir(&data_dir)?;
    if let Err(e) = crate::gateway::load_host_key(&data_dir) {
        tracing::warn!(error = %e, "cannot keep the Gateway metrics key in the data directory; tokens change when the agent restarts");
    }
    let _watchdog = crate::notify::spawn_watchdog(data_dir.clone(), stop.clone());
    let files = IdentityFiles::in_dir(&data_dir);
    if files.exist()
        && let Some(removed) = state::load_removed(&data_dir)
    {
        let old = enroll::load(&files)?;
        if config.join_token.is_none() {
            return stay_down(&config, &old, &removed.reason, stop).await;
        }
        // The new enrollment goes to the same cluster unless told otherwise.
        config
            .server
            .get_or_insert_with(|| old.record.server.clone());
        config.ca_pem.get_or_insert_with(|| old.ca_pem.clone());
        let aside = state::set_aside_identity(&data_dir, &old.record.host_id).map_err(|e| {
            AgentError::DataDir(format!(
                "cannot set the removed identity aside in {}: {e}",
                data_dir.display()
            ))
        })?;
        tracing::warn!(removed_host = %old.record.host_id, kept_in = %aside.display(), "this host was removed from the cluster; enrolling again with the join token given (the old identity is kept aside, its stopped containers and volumes are left alone)");
    } else if files.exist() && config.re_enroll && config.join_token.is_some() {
        let old = enroll::load(&files)?;
        config
            .server
            .get_or_insert_with(|| old.record.server.clone());
        config.ca_pem.get_or_insert_with(|| old.ca_pem.clone());
        // The old identity's containers run placements of the old host: they go before the
        // new identity exists (its agent would never touch them). Their volumes stay.
        let reconciler = reconciler_for(&config, &old)?;
        let removed = tokio::select! {
            r = retire_replicas(&reconciler) => r,
            () = stopped(&mut stop) => return Ok(()),
        };
        let aside = state::set_aside_identity(&data_dir, &old.record.host_id).map_err(|e| {
            AgentError::DataDir(format!(
                "cannot set the old identity aside in {}: {e}",
                data_dir.display()
            ))
        })?;
        tracing::warn!(old_host = %old.record.host_id, kept_in = %aside.display(), containers_removed = removed, "enrolling again under a new identity (--re-enroll): the old identity's containers are removed, its state volumes kept; the old host stays NotReady until an admin deletes it");
    } else if files.exist() && config.join_token.is_some() {
        tracing::info!(
            "this host is already enrolled; the join token given is not used (it is, once the control plane has removed this host)"
        );
    }
    let identity = if files.exist() {
        let mut id = enroll::load(&files)?;
        if let Some(server) = config.server.as_ref().filter(|s| **s != id.record.server) {
            tracing::info!(enrolled_with = %id.record.server, using = %server, "using the server given on the command line");
            id.record.server = server.clone();
        }
        tracing::info!(host = %id.record.host_id, server = %id.record.server, "loaded the host identity");
        id
    } else {
        crate::notify::ready("enrolling this host");
        let enrolled = tokio::select! {
            r = enroll_host(&config, &files) => r?,
            () = stopped(&mut stop) => return Ok(()),
        };
        tracing::info!(host = %enrolled.record.host_id, server = %enrolled.record.server, "host enrolled");
        if let Some(token_file) = &config.join_token_file {
            enroll::remove_used_token_file(token_file);
        }
        enrolled
    };
    crate::notify::ready(&format!(
        "host {} of {}",
        identity.record.host_id, identity.record.server
    ));

    let host_id = identity.record.host_id.clone();
    let reconciler = Arc::new(reconciler_for(&config, &identity)?);
    if config.servers.len() > 1 {
        tracing::info!(servers = ?config.servers, "several servers given; moving to the next when one is unreachable");
    }
    let control = Arc::new(GrpcControlPlane::new(&identity, &config.servers)?);
    let loops = HostLoops::new(
        SyncSettings {
            host_id: host_id.clone(),
            data_dir: data_dir.clone(),
            poll_wait: config.poll_wait,
            report_interval: config.report_interval,
            resync_interval: config.resync_interval,
            probe: config.probe,
            runtime_name: config.runtime.as_str().to_string(),
        },
        reconciler.clone(),
        control.clone(),
    );
    reconciler.set_state_source(Arc::new(crate::transfer::GrpcStateSource(control.clone())));
    let task_runner = crate::tasks::TaskRunner::new(
        control.clone(),
        reconciler.clone(),
        host_id.clone(),
        loops.desired(),
    );
    let task_loop = tokio::spawn(task_runner.run(stop.clone()));
    let renewal = tokio::spawn(renew_loop(files, identity, control, stop.clone()));
    let end = loops.run(stop.clone()).await;
    renewal.abort();
    task_loop.abort();
    match end {
        LoopsEnd::Stopped => Ok(()),
        LoopsEnd::Removed(_) => {
            tracing::error!("{}", removed_status(&host_id));
            stopped(&mut stop).await;
            Ok(())
        }
    }
}

/// Removes the containers of an identity about to be set aside, retrying while the engine
/// does not answer. The number removed.
async fn retire_replicas(reconciler: &Reconciler) -> usize {
    let mut delay = Duration::from_millis(500);
    loop {
        match reconciler.retire_all().await {
            Ok(n) => return n,
            Err(err) => {
                tracing::error!(error = %err, retry_in = ?delay, "cannot remove the containers of the old identity; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// The reconciler of an identity, with the agent's settings.
fn reconciler_for(config: &AgentConfig, identity: &HostIdentity) -> Result<Reconciler, AgentError> {
    let owner = identity.owner().map_err(AgentError::Owner)?;
    let engine = Arc::new(LazyEngine::new(config.runtime, config.docker_host.clone()));
    tracing::info!(runtime = config.runtime.as_str(), address = %engine.address(), cluster = %owner.cluster_id(), host_uid = %owner.host_uid(), "container engine");
    let mut settings = ReconcilerSettings::new(owner, &config.data_dir);
    settings.backoff = BackoffPolicy {
        initial: config.restart_backoff,
        ..BackoffPolicy::default()
    };
    settings.max_parallel = config.parallel_operations;
    settings.snapshots_keep = config.snapshots_keep;
    settings.predecessors = predecessors(&config.data_dir, &settings.owner);
    Ok(Reconciler::new(engine, settings))
}

/// At most this many earlier identities of a host have their volumes reported.
const MAX_PREDECESSORS: usize = 16;

/// Earlier identities of this host in the same cluster, set aside in `data_dir` by a
/// re-enrollment or after a removal (`removed-*` directories): their state volumes stay on the
/// engine and are reported, so the control plane lists them as orphans and can have them
/// removed. Unreadable ones are skipped with a warning.
pub fn predecessors(
    data_dir: &Path,
    current: &crate::runtime::Owner,
) -> Vec<crate::runtime::Owner> {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return Vec::new();
    };
    let mut out: Vec<crate::runtime::Owner> = Vec::new();
    let mut dirs: Vec<std::path::PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("removed-"))
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for dir in dirs {
        match enroll::load(&IdentityFiles::in_dir(&dir))
            .map_err(|e| e.to_string())
            .and_then(|id| id.owner())
        {
            Ok(o)
                if o.cluster_id() == current.cluster_id()
                    && o.host_uid() != current.host_uid()
                    && !out.iter().any(|x| x.host_uid() == o.host_uid()) =>
            {
                out.push(o);
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(dir = %dir.display(), error = %err, "cannot read an earlier identity set aside in the data directory; its state volumes are not reported")
            }
        }
    }
    if out.len() > MAX_PREDECESSORS {
        out.drain(..out.len() - MAX_PREDECESSORS);
    }
    out
}

/// A removed host without a new join token: stops what still runs, says why, and waits for
/// the shutdown signal without starting anything.
async fn stay_down(
    config: &AgentConfig,
    identity: &HostIdentity,
    reason: &str,
    mut stop: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let status = removed_status(&identity.record.host_id);
    tracing::error!(host = %identity.record.host_id, reason = %reason, "this host was removed from the cluster earlier; staying down: {status}");
    crate::notify::ready(&status);
    let reconciler = reconciler_for(config, identity)?;
    stop_replicas(&reconciler, &mut stop).await;
    stopped(&mut stop).await;
    Ok(())
}

fn hostname_for(config: &AgentConfig) -> String {
    config.name.clone().unwrap_or_else(machine_hostname)
}

/// Makes a key, sends the CSR with the join token, saves the identity. Retries while the server
/// cannot be reached; a refused token ends it.
async fn enroll_host(
    config: &AgentConfig,
    files: &IdentityFiles,
) -> Result<HostIdentity, AgentError> {
    let (Some(server), Some(ca_pem), Some(token)) =
        (&config.server, &config.ca_pem, &config.join_token)
    else {
        return Err(AgentError::Config(format!(
            "this host is not enrolled yet (no identity in {}): pass --server, --ca-cert and --join-token",
            config.data_dir.display()
        )));
    };
    let hostname = hostname_for(config);
    let (key, csr) = enroll::new_key_and_csr(&hostname)?;
    let data_dir = config.data_dir.clone();
    let capacity = tokio::task::spawn_blocking(move || {
        HostMetrics::new(data_dir).map(|mut m| m.sample().capacity)
    })
    .await
    .ok()
    .and_then(Result::ok)
    .unwrap_or_default();
    let request = pb::EnrollRequest {
        join_token: token.expose().to_string(),
        csr_pem: csr,
        hostname: hostname.clone(),
        labels: config.labels.clone().into_iter().collect(),
        capacity: Some(capacity.to_proto()),
        agent_version: crate::sync::AGENT_VERSION.to_string(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
    };
    let client = client::anonymous(server, ca_pem)?;
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(ENROLL_RETRY_MIN_DELAY)
        .with_max_delay(ENROLL_RETRY_MAX_DELAY)
        .with_jitter()
        .without_max_times()
        .build();
    tracing::info!(%server, %hostname, labels = ?config.labels, "enrolling this host");
    let response = loop {
        let mut req = tonic::Request::new(request.clone());
        req.set_timeout(ENROLL_TIMEOUT);
        match client.clone().enroll(req).await {
            Ok(r) => break r.into_inner(),
            Err(status) => {
                let text = describe_status(&status);
                match classify_enroll_error(&status, &text) {
                    EnrollFailure::Refused => return Err(AgentError::EnrollRefused(text)),
                    EnrollFailure::Trust => return Err(AgentError::Trust(text)),
                    EnrollFailure::Invalid => return Err(AgentError::Enroll(text)),
                    EnrollFailure::Transient => {
                        let delay = backoff.next().unwrap_or(ENROLL_RETRY_MAX_DELAY);
                        tracing::warn!(%server, error = %text, retry_in = ?delay, "cannot reach the control plane to enroll; retrying");
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
    };
    let identity = enroll::save(files, &key, &response, server)?;
    Ok(identity)
}

#[derive(Debug, PartialEq, Eq)]
enum EnrollFailure {
    /// The token was refused.
    Refused,
    /// The server's certificate is not signed by the given CA.
    Trust,
    /// The request itself is wrong (labels, CSR).
    Invalid,
    /// Worth another try.
    Transient,
}

fn classify_enroll_error(status: &tonic::Status, text: &str) -> EnrollFailure {
    use tonic::Code;
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => EnrollFailure::Refused,
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::NotFound
        | Code::AlreadyExists
        | Code::OutOfRange
        | Code::Unimplemented => EnrollFailure::Invalid,
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled => {
            let lower = text.to_ascii_lowercase();
            if lower.contains("certificate") || lower.contains("unknownissuer") {
                EnrollFailure::Trust
            } else {
                EnrollFailure::Transient
            }
        }
        Code::Ok | Code::ResourceExhausted | Code::Aborted | Code::Internal | Code::DataLoss => {
            EnrollFailure::Transient
        }
    }
}

/// When a certificate valid over `[not_before, not_after]` enters its renewal window.
fn renewal_time(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let total = not_after.duration_since(not_before).unwrap_or_default();
    not_before + total.mul_f64(2.0 / 3.0)
}

/// Renews the host certificate when it enters its renewal window, then uses the new one.
async fn renew_loop(
    files: IdentityFiles,
    mut identity: HostIdentity,
    control: Arc<GrpcControlPlane>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = None;
    loop {
        let wait = match enroll::validity(&identity.cert_pem) {
            Err(err) => {
                tracing::error!(error = %err, path = %files.cert.display(), "cannot read the host certificate's validity; not renewing it");
                return;
            }
            Ok((from, to)) => {
                let now = SystemTime::now();
                if enroll::needs_renewal(from, to, now) {
                    Duration::ZERO
                } else {
                    renewal_time(from, to)
                        .duration_since(now)
                        .unwrap_or_default()
                        .min(RENEW_CHECK_MAX)
                }
            }
        };
        if !wait.is_zero() {
            tokio::select! {
                () = stopped(&mut stop) => return,
                () = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        match renew_once(&files, &identity, &control).await {
            Ok(renewed) => {
                tracing::info!(host = %renewed.record.host_id, "host certificate renewed");
                identity = renewed;
                backoff = None;
            }
            Err(err) => {
                let b = backoff.get_or_insert_with(|| {
                    ExponentialBuilder::default()
                        .with_min_delay(RECONNECT_MIN_DELAY)
                        .with_max_delay(RECONNECT_MAX_DELAY)
                        .with_jitter()
                        .without_max_times()
                        .build()
                });
                let delay = b.next().unwrap_or(RECONNECT_MAX_DELAY);
                tracing::warn!(error = %err, retry_in = ?delay, "cannot renew the host certificate; retrying");
                tokio::select! {
                    () = stopped(&mut stop) => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

async fn renew_once(
    files: &IdentityFiles,
    identity: &HostIdentity,
    control: &GrpcControlPlane,
) -> Result<HostIdentity, String> {
    let (key, csr) =
        enroll::new_key_and_csr(&identity.record.host_id).map_err(|e| e.to_string())?;
    let cert = control
        .renew_certificate(csr)
        .await
        .map_err(|e| e.to_string())?;
    let files2 = files.clone();
    let key_pem = key.serialize_pem();
    let cert2 = cert.clone();
    tokio::task::spawn_blocking(move || enroll::save_renewal(&files2, &key, &cert2))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let renewed = HostIdentity {
        record: identity.record.clone(),
        key_pem,
        cert_pem: cert,
        ca_pem: identity.ca_pem.clone(),
    };
    control.set_identity(&renewed).map_err(|e| e.to_string())?;
    Ok(renewed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrollment_errors_are_classified() {
        let refused = tonic::Status::unauthenticated("join token has expired");
        assert_eq!(
            classify_enroll_error(&refused, refused.message()),
            EnrollFailure::Refused
        );
        let down = tonic::Status::unavailable("tcp connect error: Connection refused");
        assert_eq!(
            classify_enroll_error(&down, down.message()),
            EnrollFailure::Transient
        );
        let tls = tonic::Status::unavailable("invalid peer certificate: UnknownIssuer");
        assert_eq!(
            classify_enroll_error(&tls, tls.message()),
            EnrollFailure::Trust
        );
        let bad = tonic::Status::invalid_argument("bad host labels");
        assert_eq!(
            classify_enroll_error(&bad, bad.message()),
            EnrollFailure::Invalid
        );
    }

    #[test]
    fn renewal_at_two_thirds() {
        let from = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let to = from + Duration::from_secs(90);
        assert_eq!(renewal_time(from, to), from + Duration::from_secs(60));
    }

    #[test]
    fn a_second_agent_cannot_use_the_same_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let _held = lock_data_dir(dir.path()).unwrap();
        let err = lock_data_dir(dir.path()).err().expect("locked");
        assert!(err.to_string().contains("already using"), "{err}");
    }
}
