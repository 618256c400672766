//! What a valid name or sampling parameter is, in one place for every door that takes one: the
//! native API and the OpenAI front door, the config's tenants, `chatpool token`, and the chats
//! an import reads. Each check is a pure function; a refusal is an [`Invalid`] carrying the
//! message that says what to change, which the API answers as a 400 `invalid_request`.

use serde_json::Value;
use std::fmt;

/// Why a value was refused, in words for whoever sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Invalid {}

/// The characters a chat id and a tenant name are made of.
const NAME_CHARACTERS: &str = "A-Z a-z 0-9 . _ -";

/// The longest chat id.
const MAX_CHAT_ID: usize = 128;

/// The longest tenant name.
const MAX_TENANT: usize = 64;

/// Whether `text` is 1 to `max` characters of [`NAME_CHARACTERS`]: safe in a path, a log line
/// and an HAProxy routing key as it stands.
fn is_name(text: &str, max: usize) -> bool {
    (1..=max).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// What a name of up to `max` characters must be, after `what`.
fn name_rule(what: &str, max: usize) -> Invalid {
    Invalid(format!(
        "{what} must be 1 to {max} characters of {NAME_CHARACTERS}"
    ))
}

/// A chat id, from the place named `field` (`chat_id` in a path, `X-Chat-Id`, a record).
pub fn chat_id(id: &str, field: &str) -> Result<(), Invalid> {
    if is_name(id, MAX_CHAT_ID) {
        Ok(())
    } else {
        Err(name_rule(field, MAX_CHAT_ID))
    }
}

/// A tenant name, from the place named `field`.
pub fn tenant(name: &str, field: &str) -> Result<(), Invalid> {
    if is_name(name, MAX_TENANT) {
        Ok(())
    } else {
        Err(name_rule(field, MAX_TENANT))
    }
}

/// An id of OpenAI's APIs as chatpool hands them out, from the place named `field`: `prefix`
/// (`resp_`, `conv_`, `msg_`) and 1 to 120 characters of `A-Z a-z 0-9 _ -`, so it is also a
/// valid chat id as it stands.
pub fn openai_id(id: &str, prefix: &str, field: &str) -> Result<(), Invalid> {
    let fits = id.strip_prefix(prefix).is_some_and(|rest| {
        (1..=120).contains(&rest.len())
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    });
    if fits {
        Ok(())
    } else {
        Err(Invalid(format!(
            "{field} must be `{prefix}` and 1 to 120 characters of A-Z a-z 0-9 _ -"
        )))
    }
}

/// A `temperature`: absent (null) or 0 to 2.
pub fn temperature(value: &Value) -> Result<Option<f64>, Invalid> {
    match value {
        Value::Null => Ok(None),
        v => v
            .as_f64()
            .filter(|t| (0.0..=2.0).contains(t))
            .map(Some)
            .ok_or_else(|| Invalid("temperature must be a number from 0 to 2".into())),
    }
}

/// A `max_tokens`: absent (null) or a whole number from 1 to 1000000.
pub fn max_tokens(value: &Value) -> Result<Option<u64>, Invalid> {
    match value {
        Value::Null => Ok(None),
        v => v
            .as_u64()
            .filter(|n| (1..=1_000_000).contains(n))
            .map(Some)
            .ok_or_else(|| Invalid("max_tokens must be a whole number from 1 to 1000000".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_differ_only_in_length() {
        assert!(chat_id(&"a".repeat(128), "chat_id").is_ok());
        assert!(tenant(&"a".repeat(64), "tenant").is_ok());
        let long = tenant(&"a".repeat(65), "tenant").unwrap_err();
        assert_eq!(
            long.0,
            "tenant must be 1 to 64 characters of A-Z a-z 0-9 . _ -"
        );
        for bad in ["", "a b", "a/b", "é", "a\n"] {
            assert!(chat_id(bad, "X-Chat-Id").is_err(), "{bad:?}");
            assert!(tenant(bad, "tenant").is_err(), "{bad:?}");
        }
        let err = chat_id(&"a".repeat(129), "X-Chat-Id").unwrap_err();
        assert!(err.0.starts_with("X-Chat-Id must be 1 to 128"), "{err}");
    }

    #[test]
    fn sampling_parameters_have_one_range() {
        assert_eq!(temperature(&json!(null)), Ok(None));
        assert_eq!(temperature(&json!(2)), Ok(Some(2.0)));
        assert!(temperature(&json!(2.01)).is_err());
        assert!(temperature(&json!("1")).is_err());
        assert_eq!(max_tokens(&json!(1_000_000)), Ok(Some(1_000_000)));
        for bad in [json!(0), json!(1_000_001), json!(1.5), json!(-1)] {
            assert!(max_tokens(&bad).is_err(), "{bad}");
        }
    }
}
