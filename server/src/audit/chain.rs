//! The hash chain of the audit log: the canonical encoding of a record (version 1, defined in
//! the module documentation of `audit`), and its verification.

use std::fmt;

use sha2::{Digest, Sha256};

use super::{AuditEntry, AuditRecord};
use crate::util::hex;

/// The encoding this build writes.
pub const CHAIN_VERSION: u32 = 1;
/// `prevHash` of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const V1_PREFIX: &[u8] = b"clusterclaw-audit-v1\n";

/// The netstring encoder of the canonical form.
struct Canonical(Sha256);

impl Canonical {
    fn text(&mut self, s: &str) {
        self.0.update(s.len().to_string().as_bytes());
        self.0.update(b":");
        self.0.update(s.as_bytes());
        self.0.update(b",");
    }

    fn opt(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.text(s),
            None => self.0.update(b"~"),
        }
    }

    fn int(&mut self, n: impl fmt::Display) {
        self.text(&n.to_string());
    }

    fn opt_int(&mut self, n: Option<i64>) {
        match n {
            Some(n) => self.int(n),
            None => self.0.update(b"~"),
        }
    }
}

/// The hash of a record in encoding `version`; `None` for a version this build does not know.
pub fn record_hash(version: u32, prev_hash: &str, seq: u64, e: &AuditEntry) -> Option<String> {
    if version != 1 {
        return None;
    }
    let mut c = Canonical(Sha256::new());
    c.0.update(V1_PREFIX);
    c.text(prev_hash);
    c.int(seq);
    c.text(&e.time);
    c.text(&e.principal.id);
    c.text(&e.principal.name);
    c.opt(e.tenant.as_deref());
    c.text(&e.action);
    match &e.object {
        Some(o) => {
            c.text(&o.kind);
            c.opt(o.tenant.as_deref());
            c.opt(o.project.as_deref());
            c.text(&o.name);
        }
        None => (0..4).for_each(|_| c.opt(None)),
    }
    c.text(e.result.outcome.as_str());
    c.int(e.result.status);
    c.opt(e.result.reason.as_deref());
    c.text(&e.request_id);
    c.text(&e.source);
    c.opt_int(e.generation_before);
    c.opt_int(e.generation_after);
    Some(hex(&c.0.finalize()))
}

/// What is wrong at a place in the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainProblem {
    /// The record does not hash to its stored hash: it was changed after it was written.
    Changed { stored: String, computed: String },
    /// The record does not name the hash of the record before it.
    Unlinked { prev_hash: String, expected: String },
    /// The numbering skips or goes back.
    Sequence { expected: u64 },
    /// Records at the end are gone: the log had written `written` records.
    Truncated { written: u64 },
    /// The record's encoding version is not known to this build.
    UnknownVersion(i64),
    /// The stored row cannot be read as a record.
    Unreadable(String),
}

/// The first place where the chain does not hold.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("audit record {seq}: {what}")]
pub struct ChainBreak {
    /// The record where the problem shows (for [`ChainProblem::Truncated`], the first missing
    /// one).
    pub seq: u64,
    pub what: ChainProblem,
}

fn short(h: &str) -> &str {
    h.get(..16).unwrap_or(h)
}

impl fmt::Display for ChainProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainProblem::Changed { stored, computed } => write!(
                f,
                "its content does not match its hash (stored {}..., content hashes to {}...): the record was changed after it was written",
                short(stored),
                short(computed)
            ),
            ChainProblem::Unlinked {
                prev_hash,
                expected,
            } => write!(
                f,
                "it does not follow the record before it (its prevHash is {}..., the previous hash is {}...): a record was removed, inserted or moved before it",
                short(prev_hash),
                short(expected)
            ),
            ChainProblem::Sequence { expected } => write!(
                f,
                "expected record {expected} here: records are missing, inserted or out of order"
            ),
            ChainProblem::Truncated { written } => write!(
                f,
                "missing: {written} records were written, the log ends before this one"
            ),
            ChainProblem::UnknownVersion(v) => write!(
                f,
                "chain version {v} is not known to this clusterclaw (it knows {CHAIN_VERSION}); verify with a newer clusterclaw"
            ),
            ChainProblem::Unreadable(why) => write!(f, "the stored row cannot be read: {why}"),
        }
    }
}

/// Checks records one at a time, from the first (`seq` 1) on.
#[derive(Clone, Debug)]
pub struct ChainVerifier {
    next_seq: u64,
    head: String,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        ChainVerifier::new()
    }
}

impl ChainVerifier {
    pub fn new() -> Self {
        ChainVerifier {
            next_seq: 1,
            head: GENESIS_HASH.to_string(),
        }
    }

    /// Checks the next record: its hash, its number, and its link to the one before.
    pub fn push(&mut self, r: &AuditRecord) -> Result<(), ChainBreak> {
        let broken = |what| ChainBreak { seq: r.seq, what };
        let computed = record_hash(r.chain_version, &r.prev_hash, r.seq, &r.entry)
            .ok_or_else(|| broken(ChainProblem::UnknownVersion(i64::from(r.chain_version))))?;
        if computed != r.hash {
            return Err(broken(ChainProblem::Changed {
                stored: r.hash.clone(),
                computed,
            }));
        }
        if r.seq != self.next_seq {
            return Err(broken(ChainProblem::Sequence {
                expected: self.next_seq,
            }));
        }
        if r.prev_hash != self.head {
            return Err(broken(ChainProblem::Unlinked {
                prev_hash: r.prev_hash.clone(),
                expected: self.head.clone(),
            }));
        }
        self.next_seq += 1;
        self.head = computed;
        Ok(())
    }

    /// Records checked so far.
    pub fn records(&self) -> u64 {
        self.next_seq - 1
    }

    /// Hash of the last record checked.
    pub fn head(&self) -> &str {
        &self.head
    }

    /// Checks that the log holds every record of the `written` it wrote.
    pub fn finish(&self, written: u64) -> Result<(), ChainBreak> {
        if written > self.records() {
            return Err(ChainBreak {
                seq: self.next_seq,
                what: ChainProblem::Truncated { written },
            });
        }
        Ok(())
    }
}

/// Checks a whole chain, from its first record.
pub fn verify_chain(records: &[AuditRecord]) -> Result<(), ChainBreak> {
    let mut v = ChainVerifier::new();
    records.iter().try_for_each(|r| v.push(r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::fixtures::entry;
    use crate::audit::{AuditOutcome, AuditResult};

    fn chain(n: u32) -> Vec<AuditRecord> {
        let mut prev = GENESIS_HASH.to_string();
        (1..=n)
            .map(|i| {
                let e = entry(i);
                let hash = record_hash(CHAIN_VERSION, &prev, u64::from(i), &e).unwrap();
                AuditRecord {
                    seq: u64::from(i),
                    entry: e,
                    chain_version: CHAIN_VERSION,
                    prev_hash: std::mem::replace(&mut prev, hash.clone()),
                    hash,
                }
            })
            .collect()
    }

    /// Recomputes every hash from `from` on, as someone who can write the table could.
    fn rehash(records: &mut [AuditRecord], from: usize) {
        for i in from..records.len() {
            let prev = if i == 0 {
                GENESIS_HASH.to_string()
            } else {
                records[i - 1].hash.clone()
            };
            let r = &mut records[i];
            r.prev_hash = prev;
            r.hash = record_hash(CHAIN_VERSION, &r.prev_hash, r.seq, &r.entry).unwrap();
        }
    }

    #[test]
    fn the_encoding_is_stable() {
        // The documented encoding, written out by hand. Changing the result breaks every
        // stored chain: add a new version instead.
        let preimage = format!(
            "clusterclaw-audit-v1\n64:{GENESIS_HASH},1:1,24:2026-07-10T12:00:01.001Z,9:tok_admin,5:admin,\
             4:acme,5:apply,16:OpenClawInstance,4:acme,8:helpdesk,5:bot-1,2:ok,3:200,~5:req-1,\
             15:127.0.0.1:50000,1:1,1:2,"
        );
        let by_hand = hex(&Sha256::digest(preimage.as_bytes()));
        let h = record_hash(CHAIN_VERSION, GENESIS_HASH, 1, &entry(1)).unwrap();
        assert_eq!(h, by_hand);
        assert_eq!(
            h,
            "4caaf2c7fe1478221436c7136e23e24cc7f97962a5109730e2667c53ff955edf"
        );
        assert_eq!(record_hash(2, GENESIS_HASH, 1, &entry(1)), None);
    }

    #[test]
    fn absent_and_empty_values_hash_differently() {
        let mut a = entry(1);
        a.result = AuditResult {
            outcome: AuditOutcome::Ok,
            status: 200,
            reason: None,
        };
        let mut b = a.clone();
        b.result.reason = Some(String::new());
        let mut c = a.clone();
        c.tenant = None;
        let mut d = a.clone();
        // The same characters moved between neighbouring fields.
        d.principal.id = "tok_admi".into();
        d.principal.name = "nadmin".into();
        let hashes: Vec<String> = [&a, &b, &c, &d]
            .iter()
            .map(|e| record_hash(1, GENESIS_HASH, 1, e).unwrap())
            .collect();
        for i in 0..hashes.len() {
            for j in i + 1..hashes.len() {
                assert_ne!(hashes[i], hashes[j], "{i} and {j}");
            }
        }
    }

    #[test]
    fn an_intact_chain_verifies() {
        let records = chain(5);
        assert_eq!(verify_chain(&records), Ok(()));
        assert_eq!(verify_chain(&[]), Ok(()));
        let mut v = ChainVerifier::new();
        records.iter().for_each(|r| v.push(r).unwrap());
        assert_eq!((v.records(), v.head()), (5, records[4].hash.as_str()));
        assert!(v.finish(5).is_ok());
    }

    #[test]
    fn a_changed_row_is_found() {
        let mut records = chain(5);
        records[2].entry.result = AuditResult::ok(201);
        let b = verify_chain(&records).unwrap_err();
        assert_eq!(b.seq, 3);
        assert!(matches!(b.what, ChainProblem::Changed { .. }), "{b}");
        assert!(
            b.to_string().contains("changed after it was written"),
            "{b}"
        );

        // Rehashing the changed row shows at the next one.
        rehash(&mut records[..3], 2);
        let b = verify_chain(&records).unwrap_err();
        assert_eq!(b.seq, 4);
        assert!(matches!(b.what, ChainProblem::Unlinked { .. }), "{b}");
    }

    #[test]
    fn a_deleted_row_is_found() {
        let mut records = chain(5);
        records.remove(1);
        let b = verify_chain(&records).unwrap_err();
        assert_eq!((b.seq, b.what), (3, ChainProblem::Sequence { expected: 2 }));

        // Renumbering the rest without rehashing changes their content.
        for (i, r) in records.iter_mut().enumerate() {
            r.seq = i as u64 + 1;
        }
        let b = verify_chain(&records).unwrap_err();
        assert_eq!(b.seq, 2);
        assert!(matches!(b.what, ChainProblem::Changed { .. }), "{b}");

        // Rows cut off the end are found against the number written.
        let records = chain(5);
        let mut v = ChainVerifier::new();
        records[..3].iter().for_each(|r| v.push(r).unwrap());
        let b = v.finish(5).unwrap_err();
        assert_eq!((b.seq, b.what), (4, ChainProblem::Truncated { written: 5 }));
    }

    #[test]
    fn an_inserted_row_is_found() {
        let mut records = chain(4);
        // A forged record that links correctly to the one before it...
        let mut forged = records[1].clone();
        forged.entry.action = "delete".into();
        forged.seq = 3;
        forged.prev_hash = records[1].hash.clone();
        forged.hash = record_hash(1, &forged.prev_hash, 3, &forged.entry).unwrap();
        // ... and the rest renumbered around it.
        for r in &mut records[2..] {
            r.seq += 1;
        }
        records.insert(2, forged);
        let b = verify_chain(&records).unwrap_err();
        assert_eq!(b.seq, 4, "{b}");
        assert!(matches!(b.what, ChainProblem::Changed { .. }), "{b}");

        // Even with the later records rehashed, their old hashes no longer fit their
        // numbers; a copy of the head kept elsewhere (the SIEM) shows the rewrite.
        let original_head = chain(4)[3].hash.clone();
        rehash(&mut records, 3);
        assert_eq!(verify_chain(&records), Ok(()));
        assert_ne!(records.last().unwrap().hash, original_head);
    }

    #[test]
    fn reordered_rows_are_found() {
        let mut records = chain(5);
        records.swap(1, 2);
        let b = verify_chain(&records).unwrap_err();
        assert_eq!((b.seq, b.what), (3, ChainProblem::Sequence { expected: 2 }));

        // Swapping the contents but keeping the numbers changes both rows.
        let mut records = chain(5);
        let (a, b) = (records[1].entry.clone(), records[2].entry.clone());
        records[1].entry = b;
        records[2].entry = a;
        let b = verify_chain(&records).unwrap_err();
        assert_eq!(b.seq, 2);
        assert!(matches!(b.what, ChainProblem::Changed { .. }), "{b}");
    }

    #[test]
    fn unknown_versions_are_named() {
        let mut records = chain(2);
        records[1].chain_version = 9;
        let b = verify_chain(&records).unwrap_err();
        assert_eq!(
            (b.seq, b.what.clone()),
            (2, ChainProblem::UnknownVersion(9))
        );
        assert!(b.to_string().contains("newer clusterclaw"), "{b}");
    }
}
