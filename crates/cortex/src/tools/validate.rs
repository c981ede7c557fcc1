//! Whether a JSON value satisfies a tool's parameter schema: the check
//! that decides if a bare JSON answer is really a call.
//!
//! It knows the keywords tool schemas use (`type`, `properties`,
//! `required`, `additionalProperties`, `items`, `enum`, `const`, `anyOf`,
//! `oneOf`, `allOf`, the numeric and length bounds) and ignores the rest,
//! as the JSON Schema specification tells validators to. A `$ref` is not
//! followed: it accepts anything, which only makes the check more lenient
//! where a schema is too elaborate to judge.

use serde_json::{Map, Value};

/// Whether `value` satisfies `schema`.
pub(super) fn satisfies(value: &Value, schema: &Value) -> bool {
    match schema {
        Value::Bool(accepts) => *accepts,
        Value::Object(schema) => satisfies_object(value, schema),
        // Not a schema: nothing to hold the value to.
        _ => true,
    }
}

fn satisfies_object(value: &Value, schema: &Map<String, Value>) -> bool {
    if let Some(expected) = schema.get("const") {
        if !same(value, expected) {
            return false;
        }
    }
    if let Some(Value::Array(allowed)) = schema.get("enum") {
        if !allowed.iter().any(|allowed| same(value, allowed)) {
            return false;
        }
    }
    if let Some(types) = schema.get("type") {
        let fits = match types {
            Value::String(name) => has_type(value, name),
            Value::Array(names) => names
                .iter()
                .filter_map(Value::as_str)
                .any(|name| has_type(value, name)),
            _ => true,
        };
        if !fits {
            return false;
        }
    }
    if let Some(Value::Array(schemas)) = schema.get("anyOf").or_else(|| schema.get("oneOf")) {
        if !schemas.iter().any(|schema| satisfies(value, schema)) {
            return false;
        }
    }
    if let Some(Value::Array(schemas)) = schema.get("allOf") {
        if !schemas.iter().all(|schema| satisfies(value, schema)) {
            return false;
        }
    }
    match value {
        Value::Object(object) => object_fits(object, schema),
        Value::Array(items) => array_fits(items, schema),
        Value::String(text) => {
            let chars = text.chars().count() as u64;
            bound(schema, "minLength").is_none_or(|min| chars >= min as u64)
                && bound(schema, "maxLength").is_none_or(|max| chars <= max as u64)
        }
        Value::Number(number) => {
            let Some(x) = number.as_f64() else {
                return true;
            };
            bound(schema, "minimum").is_none_or(|min| x >= min)
                && bound(schema, "maximum").is_none_or(|max| x <= max)
                && bound(schema, "exclusiveMinimum").is_none_or(|min| x > min)
                && bound(schema, "exclusiveMaximum").is_none_or(|max| x < max)
        }
        _ => true,
    }
}

fn object_fits(object: &Map<String, Value>, schema: &Map<String, Value>) -> bool {
    if let Some(Value::Array(required)) = schema.get("required") {
        if !required
            .iter()
            .filter_map(Value::as_str)
            .all(|key| object.contains_key(key))
        {
            return false;
        }
    }
    let properties = schema.get("properties").and_then(Value::as_object);
    let extra = schema.get("additionalProperties");
    for (key, value) in object {
        match properties.and_then(|properties| properties.get(key)) {
            Some(property) => {
                if !satisfies(value, property) {
                    return false;
                }
            }
            None => {
                if let Some(extra) = extra {
                    if !satisfies(value, extra) {
                        return false;
                    }
                }
            }
        }
    }
    let count = object.len() as f64;
    bound(schema, "minProperties").is_none_or(|min| count >= min)
        && bound(schema, "maxProperties").is_none_or(|max| count <= max)
}

fn array_fits(items: &[Value], schema: &Map<String, Value>) -> bool {
    if let Some(item) = schema
        .get("items")
        .filter(|i| i.is_object() || i.is_boolean())
    {
        if !items.iter().all(|value| satisfies(value, item)) {
            return false;
        }
    }
    let count = items.len() as f64;
    bound(schema, "minItems").is_none_or(|min| count >= min)
        && bound(schema, "maxItems").is_none_or(|max| count <= max)
}

fn has_type(value: &Value, name: &str) -> bool {
    match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "number" => value.is_number(),
        "integer" => match value {
            Value::Number(n) => {
                n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|x| x.fract() == 0.0)
            }
            _ => false,
        },
        // An unknown type name: not ours to refuse.
        _ => true,
    }
}

/// Equality where `1` and `1.0` are the same number.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn bound(schema: &Map<String, Value>, keyword: &str) -> Option<f64> {
    schema.get(keyword).and_then(Value::as_f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn weather() -> Value {
        json!({
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city"],
            "additionalProperties": false,
        })
    }

    #[test]
    fn arguments_that_fit_the_schema_pass() {
        assert!(satisfies(&json!({"city": "Paris"}), &weather()));
        assert!(satisfies(
            &json!({"city": "Paris", "unit": "celsius", "days": 3}),
            &weather()
        ));
        assert!(satisfies(&json!({"days": 2.0, "city": "x"}), &weather()));
        assert!(satisfies(&json!({}), &json!({"type": "object"})));
        assert!(satisfies(&json!("anything"), &json!(true)));
    }

    #[test]
    fn arguments_that_do_not_fit_fail() {
        for bad in [
            json!({}),
            json!({"city": ""}),
            json!({"city": 3}),
            json!({"city": "Paris", "unit": "kelvin"}),
            json!({"city": "Paris", "days": 9}),
            json!({"city": "Paris", "days": 1.5}),
            json!({"city": "Paris", "country": "FR"}),
            json!(["Paris"]),
        ] {
            assert!(!satisfies(&bad, &weather()), "{bad}");
        }
        assert!(!satisfies(&json!(1), &json!(false)));
        let list = json!({"type": "array", "items": {"type": "string"}, "maxItems": 2});
        assert!(satisfies(&json!(["a", "b"]), &list));
        assert!(!satisfies(&json!(["a", 1]), &list));
        assert!(!satisfies(&json!(["a", "b", "c"]), &list));
        let either = json!({"anyOf": [{"type": "string"}, {"type": "null"}]});
        assert!(satisfies(&json!(null), &either));
        assert!(!satisfies(&json!(2), &either));
    }
}
