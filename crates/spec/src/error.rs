//! The one error type of spec validation: every variant names the field and the value.

use crate::quantity::QuantityError;

/// Values longer than this are shortened in messages: specs and annotations come from tenants.
const MAX_SHOWN_VALUE: usize = 128;

/// A rejected spec, annotation or OCI value.
///
/// Each variant renders as one self-contained line (`field: "value" reason`). The underlying
/// [`QuantityError`] is kept as data, not as `#[source]`, so printing the error chain does not
/// repeat it.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum SpecError {
    /// A quantity ("2Gi", "500m") that does not parse.
    #[error("{field}: {error}")]
    Quantity { field: String, error: QuantityError },
    /// Any other invalid value; `reason` completes the sentence "`value` ...".
    #[error("{field}: {value:?} {reason}")]
    Invalid {
        field: String,
        value: String,
        reason: String,
    },
    /// A request larger than its limit once all sources are merged (Kubernetes rejects it too).
    #[error("{field}: request {request} is more than the limit {limit} set by {limit_field}")]
    RequestExceedsLimit {
        field: String,
        request: String,
        limit: String,
        limit_field: String,
    },
}

impl SpecError {
    /// Builds [`SpecError::Invalid`], shortening a very long value.
    pub fn invalid(field: impl Into<String>, value: &str, reason: impl Into<String>) -> Self {
        SpecError::Invalid {
            field: field.into(),
            value: shorten(value),
            reason: reason.into(),
        }
    }

    /// Builds [`SpecError::Quantity`].
    pub fn quantity(field: impl Into<String>, error: QuantityError) -> Self {
        SpecError::Quantity {
            field: field.into(),
            error,
        }
    }

    /// The field the error is about, e.g. `spec.resources.limits.memory`.
    pub fn field(&self) -> &str {
        match self {
            SpecError::Quantity { field, .. }
            | SpecError::Invalid { field, .. }
            | SpecError::RequestExceedsLimit { field, .. } => field,
        }
    }

    /// The same error about another field, e.g. a CLI flag (`--backend`) instead of a spec path.
    pub fn in_field(mut self, new: impl Into<String>) -> Self {
        match &mut self {
            SpecError::Quantity { field, .. }
            | SpecError::Invalid { field, .. }
            | SpecError::RequestExceedsLimit { field, .. } => *field = new.into(),
        }
        self
    }
}

pub(crate) fn shorten(value: &str) -> String {
    if value.len() <= MAX_SHOWN_VALUE {
        return value.to_string();
    }
    let mut end = MAX_SHOWN_VALUE;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &value[..end])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;
    use crate::parse_bytes;

    #[test]
    fn messages_are_one_line_naming_field_and_value() {
        let err = SpecError::quantity(
            "spec.resources.limits.memory",
            parse_bytes("2Gx").unwrap_err(),
        );
        assert_eq!(
            err.to_string(),
            r#"spec.resources.limits.memory: "2Gx" is not a quantity (expected e.g. "512Mi", "2G")"#
        );
        assert_eq!(err.field(), "spec.resources.limits.memory");
        assert!(std::error::Error::source(&err).is_none());

        let err = SpecError::invalid("spec.name", "a b", "must not contain ' '");
        assert_eq!(err.to_string(), r#"spec.name: "a b" must not contain ' '"#);
        assert_eq!(
            err.in_field("--name").to_string(),
            r#"--name: "a b" must not contain ' '"#
        );
    }

    #[test]
    fn long_values_are_shortened() {
        let err = SpecError::invalid("f", &"x".repeat(10_000), "is bad");
        assert!(err.to_string().len() < 200);
    }
}
