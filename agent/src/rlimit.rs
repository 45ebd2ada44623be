//! Raising the soft limit on open files to the hard limit at start, for the agent and the server.

use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};

/// The target when the hard limit is unlimited: Linux's default `fs.nr_open`, above which the
/// kernel refuses any open-files limit.
const UNLIMITED_TARGET: u64 = 1 << 20;

/// What [`raise_nofile`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NofileLimit {
    /// The soft limit was raised from `from` to `to` (the hard limit).
    Raised { from: u64, to: u64 },
    /// The soft limit already was the hard limit.
    AtHard { limit: u64 },
}

/// Raises the soft `RLIMIT_NOFILE` of this process to its hard limit, so that many idle
/// connections cannot exhaust a default soft limit of 1,024 while the hard limit allows far
/// more. Errors are returned for the caller to log; the process carries on either way.
pub fn raise_nofile() -> nix::Result<NofileLimit> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let target = if hard == RLIM_INFINITY {
        UNLIMITED_TARGET
    } else {
        hard
    };
    if soft >= target {
        return Ok(NofileLimit::AtHard { limit: soft });
    }
    setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
    Ok(NofileLimit::Raised {
        from: soft,
        to: target,
    })
}

/// [`raise_nofile`], with the outcome logged (info when raised, debug when nothing changed,
/// warn when it failed).
pub fn raise_nofile_and_log() {
    match raise_nofile() {
        Ok(NofileLimit::Raised { from, to }) => {
            tracing::info!(
                from,
                to,
                "raised the open-files limit (RLIMIT_NOFILE) to the hard limit"
            )
        }
        Ok(NofileLimit::AtHard { limit }) => {
            tracing::debug!(
                limit,
                "the open-files limit (RLIMIT_NOFILE) is already at the hard limit"
            )
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-files limit (RLIMIT_NOFILE); set LimitNOFILE in the service unit")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let outcome = raise_nofile().unwrap();
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(soft, hard);
        match outcome {
            NofileLimit::Raised { to, .. } => assert_eq!(to, hard),
            NofileLimit::AtHard { limit } => assert_eq!(limit, hard),
        }
        assert_eq!(raise_nofile().unwrap(), NofileLimit::AtHard { limit: hard });
    }
}
