//! [`Patch`]: a PATCH body read as a JSON merge patch (RFC 7396). Fields left out keep their
//! value, `null` removes one (back to its default: no limit, full access, none), objects such as
//! `rate_limit`, `plan`, `network_policy` and `metadata` merge field by field, and arrays are
//! replaced whole.
//!
//! The patch is applied to the record's current fields as JSON and the result deserialized into
//! the same type that create reads, so that a patched record passes exactly the checks a new one
//! does, and a failure names its field (`rate_limit.per_minute: invalid type…`). A PATCH that
//! changes nothing answers the record as it is and writes nothing, not even an audit entry.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use super::error::ApiError;

/// A checked PATCH body: an object whose top-level fields are all known.
pub(crate) struct Patch {
    fields: Map<String, Value>,
}

// === impl Patch ===

impl Patch {
    /// Accepts `body` when each of its fields is in `allowed` and none in `required` is `null`.
    pub(crate) fn new(
        body: Map<String, Value>,
        allowed: &[&str],
        required: &[&str],
    ) -> Result<Patch, ApiError> {
        for (name, value) in &body {
            if !allowed.contains(&name.as_str()) {
                return Err(ApiError::field(
                    name.as_str(),
                    format!("unknown field, expected one of: {}", allowed.join(", ")),
                ));
            }
            if value.is_null() && required.contains(&name.as_str()) {
                return Err(ApiError::field(name.as_str(), "must not be null"));
            }
        }
        Ok(Patch { fields: body })
    }

    /// Whether the body names `field` (with `null` too).
    pub(crate) fn touches(&self, field: &str) -> bool {
        self.fields.contains_key(field)
    }

    /// `current` with the patch applied, read back as `T`.
    pub(crate) fn apply<T: Serialize + DeserializeOwned>(
        &self,
        current: &T,
    ) -> Result<T, ApiError> {
        let mut merged = serde_json::to_value(current)
            .map_err(|e| ApiError::InvalidBody(format!("the record cannot be patched: {e}")))?;
        merge(&mut merged, &Value::Object(self.fields.clone()));
        serde_path_to_error::deserialize(merged).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." {
                ApiError::InvalidBody(inner.to_string())
            } else {
                ApiError::InvalidBody(format!("{path}: {inner}"))
            }
        })
    }
}

// === functions ===

/// RFC 7396 section 2: `patch` merged into `target`.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(changes) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(fields) = target {
        for (name, value) in changes {
            if value.is_null() {
                fields.remove(name);
            } else {
                merge(fields.entry(name.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::merge;

    #[test]
    fn merge_follows_rfc_7396() {
        let mut target = json!({ "a": 1, "o": { "x": 1, "y": 2 }, "list": [1, 2], "gone": true });
        merge(
            &mut target,
            &json!({ "o": { "y": null, "z": 3 }, "list": [3], "gone": null, "new": { "n": 1 } }),
        );
        assert_eq!(
            target,
            json!({ "a": 1, "o": { "x": 1, "z": 3 }, "list": [3], "new": { "n": 1 } })
        );
        let mut scalar = json!(5);
        merge(&mut scalar, &json!({ "k": null, "v": 1 }));
        assert_eq!(scalar, json!({ "v": 1 }));
    }
}
