//! Kubernetes resource quantities: "500m", "1.5", "2Gi", "1G", "1e3".
//!
//! Every quantity is parsed into an exact decimal (at most 20 significant digits, enough for any
//! `u64`) and scaled with integer arithmetic, so "1.5Gi" is exactly 1610612736 and nothing ever
//! goes through `f64` on the way. Like Kubernetes, values that do not land on a whole unit are
//! rounded *up*: CPU to the next millicore, bytes to the next byte.
//!
//! Grammar (Kubernetes' `resource.Quantity`):
//! ```text
//! quantity ::= [sign] number [suffix]
//! number   ::= digits | digits "." [digits] | "." digits
//! suffix   ::= "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"          (powers of 1024)
//!            | "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P" | "E"  (powers of 1000)
//!            | ("e" | "E") [sign] digits                        (powers of 10)
//! ```

/// Largest CPU quantity accepted, in cores; beyond it a value is a typo, not a machine.
pub const MAX_CPU_CORES: u64 = 1_000_000_000;

/// Significant digits kept exactly; 20 is enough for every `u64` and keeps `digits << 60` in u128.
const MAX_DIGITS: usize = 20;

/// Inputs are quoted in messages; a tenant-controlled megabyte string must not become a log line.
const MAX_SHOWN_INPUT: usize = 64;

/// A string that is not a valid quantity for what it was meant to measure.
///
/// The field it came from is not known here; [`crate::SpecError`] adds it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} {kind}")]
pub struct QuantityError {
    /// The rejected input (shortened if it is very long).
    pub input: String,
    /// Why it was rejected.
    pub kind: QuantityErrorKind,
}

/// Why a quantity was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuantityErrorKind {
    #[error("is empty (expected e.g. {expected})")]
    Empty { expected: &'static str },
    #[error("must not contain whitespace")]
    Whitespace,
    #[error("is not a quantity (expected e.g. {expected})")]
    Syntax { expected: &'static str },
    #[error("must not be negative")]
    Negative,
    #[error("is too large (max {max})")]
    TooLarge { max: &'static str },
    #[error("must be a whole number")]
    NotWhole,
    #[error(
        "uses the fractional suffix {suffix:?}, which is not allowed for {unit}{}",
        hint(suffix)
    )]
    FractionalSuffix {
        suffix: &'static str,
        unit: &'static str,
    },
    #[error("has more than {MAX_DIGITS} significant digits")]
    TooPrecise,
}

fn hint(suffix: &str) -> &'static str {
    if suffix == "m" {
        " (did you mean \"M\"?)"
    } else {
        ""
    }
}

/// What a quantity measures; decides limits, rounding and the wording of errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// Cores, parsed to whole millicores.
    Cpu,
    Bytes,
    BitsPerSecond,
    /// A plain count such as a PID limit: must come out whole.
    Count,
}

impl Unit {
    fn expected(self) -> &'static str {
        match self {
            Unit::Cpu => r#""500m", "2""#,
            Unit::Bytes => r#""512Mi", "2G""#,
            Unit::BitsPerSecond => r#""100M", "1G""#,
            Unit::Count => r#""100", "1k""#,
        }
    }

    fn max(self) -> &'static str {
        match self {
            Unit::Cpu => "1000000000 cores",
            Unit::Bytes => "18446744073709551615 bytes",
            Unit::BitsPerSecond => "18446744073709551615 bits/s",
            Unit::Count => "18446744073709551615",
        }
    }

    /// Power of ten the value is counted in: CPU is counted in millicores.
    fn scale(self) -> i64 {
        match self {
            Unit::Cpu => 3,
            _ => 0,
        }
    }
}

/// Parses a CPU quantity into cores: "100m" → 0.1, "1.5" → 1.5, "2" → 2.0, "1k" → 1000.0.
///
/// The result is always a whole number of millicores; finer values round up ("0.0001" → 0.001).
pub fn parse_cpu(s: &str) -> Result<f64, QuantityError> {
    parse_cpu_millis(s).map(|m| m as f64 / 1000.0)
}

/// Parses a CPU quantity into whole millicores (rounded up): "1.5" → 1500.
pub fn parse_cpu_millis(s: &str) -> Result<u64, QuantityError> {
    let millis = parse(s, Unit::Cpu)?.ceil;
    if millis > MAX_CPU_CORES * 1000 {
        return Err(error(
            s,
            QuantityErrorKind::TooLarge {
                max: Unit::Cpu.max(),
            },
        ));
    }
    Ok(millis)
}

/// Parses a memory or storage quantity into bytes: "512Mi", "1G", "1.5Gi", "1e3", "1000".
///
/// Fractional bytes round up. The milli-style suffixes ("m", "u", "n") are rejected: "1500m"
/// bytes is almost always a typo for "1500M".
pub fn parse_bytes(s: &str) -> Result<u64, QuantityError> {
    parse(s, Unit::Bytes).map(|v| v.ceil)
}

/// Parses a network bandwidth in bits per second: "100M" → 100000000. Same rules as bytes.
pub fn parse_bandwidth(s: &str) -> Result<u64, QuantityError> {
    parse(s, Unit::BitsPerSecond).map(|v| v.ceil)
}

/// Parses a count such as a PID limit: "100", "1k", "1e3". Must be a whole number.
pub fn parse_count(s: &str) -> Result<u64, QuantityError> {
    let v = parse(s, Unit::Count)?;
    if !v.exact {
        return Err(error(s, QuantityErrorKind::NotWhole));
    }
    Ok(v.ceil)
}

/// Formats cores canonically: whole cores as "2", anything else in millicores as "1500m".
///
/// Values are rounded to the nearest millicore. Values [`parse_cpu`] cannot produce (negative,
/// NaN, infinite) are formatted as-is so they stay visible in messages.
pub fn format_cpu(cores: f64) -> String {
    if !cores.is_finite() {
        return cores.to_string();
    }
    let millis = (cores * 1000.0).round();
    // i128 holds every finite millicore value that matters; `as` saturates beyond that.
    let millis = millis as i128;
    if millis % 1000 == 0 {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

/// Formats bytes with the largest binary suffix that divides them exactly ("1536Mi", "1Gi"),
/// else as a plain number ("1000").
pub fn format_bytes(bytes: u64) -> String {
    const SUFFIXES: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    if bytes == 0 {
        return "0".to_string();
    }
    for (i, suffix) in SUFFIXES.iter().enumerate().rev() {
        let shift = 10 * (i as u32 + 1);
        if bytes.trailing_zeros() >= shift {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// A parsed value in its unit, rounded up, and whether the rounding was a no-op.
struct Scaled {
    ceil: u64,
    exact: bool,
}

fn error(input: &str, kind: QuantityErrorKind) -> QuantityError {
    let input = if input.len() > MAX_SHOWN_INPUT {
        let mut end = MAX_SHOWN_INPUT;
        while !input.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &input[..end])
    } else {
        input.to_string()
    };
    QuantityError { input, kind }
}

enum Suffix {
    /// Multiply by 10^n.
    Decimal(i64),
    /// Multiply by 2^n.
    Binary(u32),
}

fn parse(s: &str, unit: Unit) -> Result<Scaled, QuantityError> {
    let syntax = || {
        error(
            s,
            QuantityErrorKind::Syntax {
                expected: unit.expected(),
            },
        )
    };
    if s.is_empty() {
        return Err(error(
            s,
            QuantityErrorKind::Empty {
                expected: unit.expected(),
            },
        ));
    }
    if s.chars().any(char::is_whitespace) {
        return Err(error(s, QuantityErrorKind::Whitespace));
    }

    let (negative, rest) = match (s.strip_prefix('-'), s.strip_prefix('+')) {
        (Some(rest), _) => (true, rest),
        (None, Some(rest)) => (false, rest),
        (None, None) => (false, s),
    };
    let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
    let (int_digits, rest) = rest.split_at(int_len);
    let (frac_digits, suffix) = match rest.strip_prefix('.') {
        Some(after) => {
            let n = after.bytes().take_while(u8::is_ascii_digit).count();
            after.split_at(n)
        }
        None => ("", rest),
    };
    if int_digits.is_empty() && frac_digits.is_empty() {
        return Err(syntax());
    }
    let suffix = match suffix {
        "" => Suffix::Decimal(0),
        "Ki" => Suffix::Binary(10),
        "Mi" => Suffix::Binary(20),
        "Gi" => Suffix::Binary(30),
        "Ti" => Suffix::Binary(40),
        "Pi" => Suffix::Binary(50),
        "Ei" => Suffix::Binary(60),
        "n" | "u" | "m" if unit != Unit::Cpu => {
            let suffix = match suffix {
                "n" => "n",
                "u" => "u",
                _ => "m",
            };
            let unit = match unit {
                Unit::Bytes => "bytes",
                Unit::BitsPerSecond => "bits/s",
                _ => "counts",
            };
            return Err(error(
                s,
                QuantityErrorKind::FractionalSuffix { suffix, unit },
            ));
        }
        "n" => Suffix::Decimal(-9),
        "u" => Suffix::Decimal(-6),
        "m" => Suffix::Decimal(-3),
        "k" => Suffix::Decimal(3),
        "M" => Suffix::Decimal(6),
        "G" => Suffix::Decimal(9),
        "T" => Suffix::Decimal(12),
        "P" => Suffix::Decimal(15),
        "E" => Suffix::Decimal(18),
        other => match other.strip_prefix(['e', 'E']) {
            Some(exp) => Suffix::Decimal(parse_exponent(exp).ok_or_else(syntax)?),
            None => return Err(syntax()),
        },
    };

    // The mantissa as significant digits times 10^exp10.
    let mut exp10: i64 = -(frac_digits.len() as i64);
    let all = int_digits.bytes().chain(frac_digits.bytes());
    let mut digits: Vec<u8> = all.skip_while(|&d| d == b'0').collect();
    while digits.last() == Some(&b'0') {
        digits.pop();
        exp10 += 1;
    }
    if digits.is_empty() {
        // Zero, whatever its sign or suffix.
        return Ok(Scaled {
            ceil: 0,
            exact: true,
        });
    }
    if negative {
        return Err(error(s, QuantityErrorKind::Negative));
    }
    // Dropped digits are never all zero (trailing zeros are gone), so the kept prefix is a
    // strict lower bound of the value.
    let truncated = digits.len() > MAX_DIGITS;
    if truncated {
        exp10 += (digits.len() - MAX_DIGITS) as i64;
        digits.truncate(MAX_DIGITS);
    }
    let mantissa = digits
        .iter()
        .fold(0u128, |acc, d| acc * 10 + u128::from(d - b'0'));

    let (exp10, exp2) = match suffix {
        Suffix::Decimal(e) => (exp10.saturating_add(e), 0),
        Suffix::Binary(b) => (exp10, b),
    };
    let exp10 = exp10.saturating_add(unit.scale());
    match scale(mantissa, truncated, exp2, exp10) {
        Rounded::Value(ceil, exact) => match u64::try_from(ceil) {
            Ok(ceil) => Ok(Scaled { ceil, exact }),
            Err(_) => Err(error(s, QuantityErrorKind::TooLarge { max: unit.max() })),
        },
        Rounded::TooLarge => Err(error(s, QuantityErrorKind::TooLarge { max: unit.max() })),
        Rounded::TooPrecise => Err(error(s, QuantityErrorKind::TooPrecise)),
    }
}

/// Parses the digits after "e"; saturates far beyond any useful exponent instead of failing.
fn parse_exponent(s: &str) -> Option<i64> {
    let (negative, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|d| d.is_ascii_digit()) {
        return None;
    }
    let magnitude = digits.bytes().fold(0i64, |acc, d| {
        acc.saturating_mul(10)
            .saturating_add(i64::from(d - b'0'))
            .min(1_000_000)
    });
    Some(if negative { -magnitude } else { magnitude })
}

enum Rounded {
    Value(u128, bool),
    TooLarge,
    TooPrecise,
}

/// Rounds `(mantissa + δ) * 2^exp2 * 10^exp10` up to an integer, where δ is 0, or in (0, 1) when
/// `truncated`. `mantissa < 10^20` and `exp2 <= 60`, so `(mantissa + 1) << exp2` fits in u128.
fn scale(mantissa: u128, truncated: bool, exp2: u32, exp10: i64) -> Rounded {
    let low = mantissa << exp2;
    let high = (mantissa + 1) << exp2;
    // Returns (floor, ceil) of n * 10^exp10, or None when it is beyond u128.
    let bounds = |n: u128| -> Option<(u128, u128)> {
        if exp10 >= 0 {
            let p = u32::try_from(exp10)
                .ok()
                .and_then(|e| 10u128.checked_pow(e))?;
            let v = n.checked_mul(p)?;
            Some((v, v))
        } else {
            // n < 2^127 < 10^39, so beyond 10^38 the quotient is 0.
            match u32::try_from(-exp10)
                .ok()
                .and_then(|e| 10u128.checked_pow(e))
            {
                Some(p) => Some((n / p, n / p + u128::from(!n.is_multiple_of(p)))),
                None => Some((0, u128::from(n != 0))),
            }
        }
    };
    let Some((floor, ceil)) = bounds(low) else {
        return Rounded::TooLarge;
    };
    if !truncated {
        return Rounded::Value(ceil, floor == ceil);
    }
    // The true value lies strictly between low and high scaled: its ceiling is at least
    // floor + 1 and at most high's ceiling. Only when those agree is the answer exact.
    let Some((_, high_ceil)) = bounds(high) else {
        return Rounded::TooLarge;
    };
    if floor + 1 == high_ceil {
        Rounded::Value(high_ceil, false)
    } else if floor >= u128::from(u64::MAX) {
        Rounded::TooLarge
    } else {
        Rounded::TooPrecise
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
#[path = "quantity_tests.rs"]
mod tests;
