//! Label selectors, as `kubectl -l` takes them: `app=web,tier!=db,env in (a,b),env notin (c),
//! gpu,!legacy`. Every requirement must hold.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selector(Vec<Requirement>);

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("label selector {selector:?}: {reason}")]
pub struct SelectorError {
    selector: String,
    reason: String,
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn valid_value(v: &str) -> bool {
    v.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl Selector {
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let bad = |reason: String| SelectorError {
            selector: s.to_string(),
            reason,
        };
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(Selector(reqs));
        }
        for part in split_top_level(s) {
            let part = part.trim();
            let check_key = |k: &str| {
                if valid_key(k) {
                    Ok(k.to_string())
                } else {
                    Err(bad(format!("{k:?} is not a label key")))
                }
            };
            let check_value = |v: &str| {
                let v = v.trim();
                if valid_value(v) {
                    Ok(v.to_string())
                } else {
                    Err(bad(format!("{v:?} is not a label value")))
                }
            };
            let set = |rest: &str| -> Result<Vec<String>, SelectorError> {
                let rest = rest.trim();
                let inner = rest
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| bad(format!("{rest:?} is not a set like (a,b)")))?;
                inner.split(',').map(check_value).collect()
            };
            let req = if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(check_key(k.trim())?, check_value(v)?)
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(check_key(k.trim())?, check_value(v)?)
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                Requirement::NotIn(check_key(k.trim())?, set(rest)?)
            } else if let Some((k, rest)) = part.split_once(" in ") {
                Requirement::In(check_key(k.trim())?, set(rest)?)
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(check_key(k.trim())?)
            } else if valid_key(part) {
                Requirement::Exists(part.to_string())
            } else {
                return Err(bad(format!(
                    "cannot parse {part:?} (expected k=v, k!=v, k in (a,b), k or !k)"
                )));
            };
            reqs.push(req);
        }
        Ok(Selector(reqs))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_requirement_form() {
        let l = labels(&[("app", "web"), ("env", "prod"), ("gpu", "")]);
        let cases = [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app=db", false),
            ("app!=db", true),
            ("app!=web", false),
            ("env in (prod, staging)", true),
            ("env in (dev)", false),
            ("env notin (dev)", true),
            ("env notin (prod)", false),
            ("missing notin (x)", true),
            ("gpu", true),
            ("!gpu", false),
            ("!legacy", true),
            ("app=web,env in (prod),!legacy", true),
            ("app=web,env=dev", false),
        ];
        for (sel, want) in cases {
            let s = Selector::parse(sel).unwrap_or_else(|e| panic!("{sel}: {e}"));
            assert_eq!(s.matches(&l), want, "{sel}");
        }
    }

    #[test]
    fn bad_selectors_say_what_is_wrong() {
        for sel in ["a b c", "=x", "app=we b", "env in prod", "k=v,,"] {
            let e = Selector::parse(sel).expect_err(sel);
            assert!(
                e.to_string()
                    .starts_with(&format!("label selector {sel:?}")),
                "{e}"
            );
        }
    }
}
