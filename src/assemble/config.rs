//! Instruction arguments that become config values: EXPOSE ports and
//! HEALTHCHECK settings (Go durations).

use crate::dockerfile::{CommandForm, Health};
use crate::image::Healthcheck;

/// Expands one EXPOSE word (`80`, `80/udp`, `8000-8002/tcp`) into port keys.
pub fn expose_ports(p: &str) -> Result<Vec<String>, String> {
    let (ports, proto) = match p.split_once('/') {
        Some((a, b)) => (a, b.to_ascii_lowercase()),
        None => (p, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!("EXPOSE {p}: invalid protocol {proto}"));
    }
    let bad = || format!("EXPOSE {p}: invalid port; expected PORT[-PORT][/tcp|udp|sctp]");
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (
            a.parse::<u16>().map_err(|_| bad())?,
            b.parse::<u16>().map_err(|_| bad())?,
        ),
        None => {
            let n = ports.parse::<u16>().map_err(|_| bad())?;
            (n, n)
        }
    };
    if hi < lo {
        return Err(bad());
    }
    Ok((lo..=hi).map(|n| format!("{n}/{proto}")).collect())
}

/// Parses a Go duration such as `30s`, `1m30s`, `500ms` into nanoseconds.
pub fn duration(s: &str) -> Option<i64> {
    if s == "0" {
        return Some(0);
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += n * mult;
        rest = &rest[unit_end..];
    }
    Some(total as i64)
}

pub fn healthcheck(h: &Health) -> Result<Healthcheck, String> {
    match h {
        Health::None => Ok(Healthcheck {
            test: vec!["NONE".into()],
            ..Default::default()
        }),
        Health::Cmd { flags, command } => {
            let test = match command {
                CommandForm::Exec(v) => std::iter::once("CMD".to_string())
                    .chain(v.iter().cloned())
                    .collect(),
                CommandForm::Shell(s) => vec!["CMD-SHELL".into(), s.clone()],
            };
            let mut hc = Healthcheck {
                test,
                ..Default::default()
            };
            for (name, value) in flags {
                let v = value.as_deref().unwrap_or("");
                let dur = || {
                    duration(v).ok_or_else(|| {
                        format!(
                            "HEALTHCHECK --{name}={v}: expected a duration such as 30s or 1m30s"
                        )
                    })
                };
                match name.as_str() {
                    "interval" => hc.interval = dur()?,
                    "timeout" => hc.timeout = dur()?,
                    "start-period" => hc.start_period = dur()?,
                    "start-interval" => hc.start_interval = dur()?,
                    "retries" => {
                        hc.retries = v.parse().map_err(|_| {
                            format!("HEALTHCHECK --retries={v}: expected a whole number")
                        })?
                    }
                    other => return Err(format!("HEALTHCHECK: unknown flag --{other}")),
                }
            }
            Ok(hc)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expose_expands_ranges_and_protocols() {
        assert_eq!(expose_ports("80").unwrap(), vec!["80/tcp"]);
        assert_eq!(expose_ports("53/UDP").unwrap(), vec!["53/udp"]);
        assert_eq!(
            expose_ports("8000-8002").unwrap(),
            vec!["8000/tcp", "8001/tcp", "8002/tcp"]
        );
        assert!(expose_ports("http").is_err());
    }

    #[test]
    fn go_durations() {
        assert_eq!(duration("30s"), Some(30_000_000_000));
        assert_eq!(duration("1m30s"), Some(90_000_000_000));
        assert_eq!(duration("500ms"), Some(500_000_000));
        assert_eq!(duration("x"), None);
    }
}
