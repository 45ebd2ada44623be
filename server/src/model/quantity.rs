//! Kubernetes quantity syntax for CPU (`2`, `0.5`, `500m`) and memory (`512Mi`, `4Gi`, `1G`).

/// Parses a CPU quantity into thousandths of a core.
pub fn parse_cpu(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let err = || {
        format!(
            "{s:?} is not a CPU quantity; use cores such as 2 or 0.5, or millicores such as 500m"
        )
    };
    let (num, scale) = match s.strip_suffix('m') {
        Some(n) => (n, 1.0),
        None => (s, 1000.0),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(err());
    }
    let v: f64 = num.parse().map_err(|_| err())?;
    let millis = (v * scale).round();
    if !(millis.is_finite() && (0.0..=1e12).contains(&millis)) {
        return Err(err());
    }
    if v > 0.0 && millis < 1.0 {
        return Err(format!("{s:?} is less than one millicore (1m)"));
    }
    Ok(millis as u64)
}

const BINARY: [(&str, u64); 6] = [
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("Pi", 1 << 50),
    ("Ei", 1 << 60),
];
const DECIMAL: [(&str, u64); 6] = [
    ("k", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
    ("P", 1_000_000_000_000_000),
    ("E", 1_000_000_000_000_000_000),
];

/// Parses a memory quantity into bytes. Suffixes are Kubernetes': `Ki Mi Gi Ti Pi Ei` (powers of
/// 1024) and `k M G T P E` (powers of 1000); a plain number is bytes.
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let factor = if suffix.is_empty() {
        Some(1)
    } else {
        BINARY
            .iter()
            .chain(DECIMAL.iter())
            .find(|(u, _)| *u == suffix)
            .map(|(_, f)| *f)
    };
    let parsed: Option<f64> = if num.is_empty() {
        None
    } else {
        num.parse().ok()
    };
    match (parsed, factor) {
        (Some(v), Some(f)) => {
            let bytes = (v * f as f64).round();
            if bytes.is_finite() && (0.0..1.8e19).contains(&bytes) {
                Ok(bytes as u64)
            } else {
                Err(format!("{t:?} is out of range"))
            }
        }
        _ => Err(memory_error(t, num, suffix)),
    }
}

fn memory_error(t: &str, num: &str, suffix: &str) -> String {
    let base = format!(
        "{t:?} is not a memory quantity; use a number with a suffix Ki, Mi, Gi, Ti (powers of 1024) or k, M, G, T (powers of 1000), e.g. 512Mi or 4Gi"
    );
    let upper = suffix.trim().to_ascii_uppercase();
    let binary = match upper.as_str() {
        "KB" | "KIB" | "K" => Some("Ki"),
        "MB" | "MIB" | "M" => Some("Mi"),
        "GB" | "GIB" | "G" => Some("Gi"),
        "TB" | "TIB" | "T" => Some("Ti"),
        _ => None,
    };
    match binary {
        Some(unit) if !num.is_empty() => format!("{base}; did you mean \"{num}{unit}\"?"),
        _ => base,
    }
}

/// Formats millicores the way a person writes them: `2`, `0.5` becomes `500m`.
pub fn format_cpu(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        format!("{}", millis / 1000)
    } else {
        format!("{millis}m")
    }
}

/// Formats bytes with the largest binary suffix that divides them, else in `Mi` with a fraction.
pub fn format_memory(bytes: u64) -> String {
    for (unit, f) in BINARY.iter().rev() {
        if bytes >= *f && bytes.is_multiple_of(*f) {
            return format!("{}{unit}", bytes / f);
        }
    }
    if bytes >= 1 << 20 {
        format!("{:.1}Mi", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{bytes}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu() {
        assert_eq!(parse_cpu("2"), Ok(2000));
        assert_eq!(parse_cpu("0.5"), Ok(500));
        assert_eq!(parse_cpu("500m"), Ok(500));
        assert_eq!(parse_cpu("1.25"), Ok(1250));
        for bad in ["", "m", "two", "-1", "2 cores", "1e3", "0.0001"] {
            assert!(parse_cpu(bad).is_err(), "{bad}");
        }
        assert_eq!(format_cpu(2000), "2");
        assert_eq!(format_cpu(250), "250m");
    }

    #[test]
    fn memory() {
        assert_eq!(parse_memory("512Mi"), Ok(512 << 20));
        assert_eq!(parse_memory("4Gi"), Ok(4 << 30));
        assert_eq!(parse_memory("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_memory("1G"), Ok(1_000_000_000));
        assert_eq!(parse_memory("1024"), Ok(1024));
        for bad in ["", "Gi", "4 GB", "-1Gi", "4gi", "lots"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
        let e = parse_memory("4GB").unwrap_err();
        assert!(e.contains("did you mean \"4Gi\""), "{e}");
        assert!(parse_memory("512mb").unwrap_err().contains("\"512Mi\""));
        assert_eq!(format_memory(4 << 30), "4Gi");
        assert_eq!(format_memory(512 << 20), "512Mi");
    }
}
