//! The audit table's row as a record, whichever engine read it: one decoder over the columns
//! both engines store in the same order.

use super::{AuditEntry, AuditObject, AuditOutcome, AuditPrincipal, AuditRecord, AuditResult};

/// Typed reads of one audit row's columns; each error names the column.
pub trait AuditColumns {
    fn int(&self, i: usize, name: &str) -> Result<i64, String>;
    fn opt_int(&self, i: usize, name: &str) -> Result<Option<i64>, String>;
    fn text(&self, i: usize, name: &str) -> Result<String, String>;
    fn opt_text(&self, i: usize, name: &str) -> Result<Option<String>, String>;
}

/// A row of the audit table (`seq, chain_version, time, principal_id, principal_name, tenant,
/// action, object_kind, object_tenant, object_project, object_name, outcome, status, reason,
/// request_id, source, generation_before, generation_after, prev_hash, hash`) as a record, or why
/// it cannot be one.
pub fn decode(r: &impl AuditColumns) -> Result<AuditRecord, String> {
    let seq = r.int(0, "seq")?;
    let version = r.int(1, "chain_version")?;
    let kind = r.opt_text(7, "object_kind")?;
    let name = r.opt_text(10, "object_name")?;
    let object = match (kind, name) {
        (Some(kind), Some(name)) => Some(AuditObject {
            kind,
            tenant: r.opt_text(8, "object_tenant")?,
            project: r.opt_text(9, "object_project")?,
            name,
        }),
        (None, None) => None,
        _ => return Err("object_kind and object_name must be both set or both empty".into()),
    };
    let outcome = r.text(11, "outcome")?;
    let status = r.int(12, "status")?;
    Ok(AuditRecord {
        seq: u64::try_from(seq).map_err(|_| format!("seq {seq} is negative"))?,
        entry: AuditEntry {
            time: r.text(2, "time")?,
            principal: AuditPrincipal {
                id: r.text(3, "principal_id")?,
                name: r.text(4, "principal_name")?,
            },
            tenant: r.opt_text(5, "tenant")?,
            action: r.text(6, "action")?,
            object,
            result: AuditResult {
                outcome: AuditOutcome::parse(&outcome)
                    .ok_or_else(|| format!("outcome {outcome:?} is not ok, denied or error"))?,
                status: u16::try_from(status)
                    .map_err(|_| format!("status {status} is not an HTTP status"))?,
                reason: r.opt_text(13, "reason")?,
            },
            request_id: r.text(14, "request_id")?,
            source: r.text(15, "source")?,
            generation_before: r.opt_int(16, "generation_before")?,
            generation_after: r.opt_int(17, "generation_after")?,
        },
        chain_version: u32::try_from(version)
            .map_err(|_| format!("chain version {version} is out of range"))?,
        prev_hash: r.text(18, "prev_hash")?,
        hash: r.text(19, "hash")?,
    })
}
