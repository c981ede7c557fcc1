//! Which JSON-schema keywords llama.cpp's schema-to-grammar converter
//! enforces, so that a schema it would quietly weaken is refused instead.
//!
//! The converter reads a schema the way `common/json-schema.cpp` does: a
//! `$ref` or an `anyOf` decides the whole node, `const` and `enum` win
//! over everything else, and each type keeps only the keywords it knows.
//! Whatever else a node says is dropped, and the answer would be held to
//! less than the client asked. [`check`] walks a schema with the same
//! rules and names the first keyword that would be dropped. Keywords that
//! only annotate (`title`, `description`, `default`, ...) and keywords the
//! JSON Schema specification itself tells validators to ignore (unknown
//! ones) are accepted.

use rusty_genius_core::GeniusError;
use serde_json::{Map, Value};

/// Keywords that constrain a value but that the converter never
/// enforces, wherever they appear.
const NEVER_ENFORCED: &[&str] = &[
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "patternProperties",
    "propertyNames",
    "minProperties",
    "maxProperties",
    "unevaluatedProperties",
    "unevaluatedItems",
    "contains",
    "minContains",
    "maxContains",
    "multipleOf",
    "additionalItems",
    "$dynamicRef",
    "$recursiveRef",
];

/// Keywords the converter reads in some place (where they are dropped
/// elsewhere, the walk says so).
const ENFORCED_SOMEWHERE: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "pattern",
    "format",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
];

/// The `format`s the converter turns into grammar rules.
const FORMATS: &[&str] = &[
    "date",
    "time",
    "date-time",
    "uuid",
    "uuid1",
    "uuid2",
    "uuid3",
    "uuid4",
    "uuid5",
];

/// A `pattern` of a schema, to be checked against the converter itself
/// (which accepts only part of regular-expression syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pattern {
    /// Where it is, e.g. `response_format.json_schema.schema/properties/code`.
    pub(crate) at: String,
    /// The regular expression.
    pub(crate) pattern: String,
}

/// Checks that the converter enforces every constraint of `schema`
/// (`what` names it in errors); returns its patterns, which the caller
/// checks with the converter.
pub(crate) fn check(what: &str, schema: &Value) -> Result<Vec<Pattern>, GeniusError> {
    let mut walk = Walk {
        what,
        patterns: Vec::new(),
    };
    // Iterative: a schema may nest deeper than a thread's stack allows
    // for recursion (the request's limits bound it, but not for every
    // caller).
    let mut todo = vec![(schema, String::new())];
    while let Some((node, at)) = todo.pop() {
        walk.node(node, &at, &mut todo)?;
    }
    Ok(walk.patterns)
}

struct Walk<'a> {
    what: &'a str,
    patterns: Vec<Pattern>,
}

/// What the converter makes of a node with no `$ref`, `anyOf`, `const`
/// or `enum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Object,
    AllOf,
    Array,
    String,
    Integer,
    Number,
    Boolean,
    Null,
    Any,
}

impl<'a> Walk<'a> {
    fn refuse(&self, at: &str, keyword: &str, why: &str) -> GeniusError {
        let place = if at.is_empty() {
            self.what.to_owned()
        } else {
            format!("{}{at}", self.what)
        };
        GeniusError::invalid_request(
            place,
            format!("`{keyword}` {why}; the answer could not be held to it, so the schema is refused (remove it, or check the answer yourself)"),
        )
    }

    fn node<'v>(
        &mut self,
        node: &'v Value,
        at: &str,
        todo: &mut Vec<(&'v Value, String)>,
    ) -> Result<(), GeniusError> {
        let Value::Object(map) = node else {
            // `true` is any value; anything else the converter refuses
            // with its own message.
            return Ok(());
        };
        for &keyword in NEVER_ENFORCED {
            if map.contains_key(keyword) {
                return Err(self.refuse(at, keyword, "is not supported by the grammar converter"));
            }
        }
        if map.get("uniqueItems") == Some(&Value::Bool(true)) {
            return Err(self.refuse(
                at,
                "uniqueItems",
                "is not supported by the grammar converter",
            ));
        }
        for defs in ["$defs", "definitions"] {
            if let Some(Value::Object(defs_map)) = map.get(defs) {
                for (name, def) in defs_map {
                    todo.push((def, format!("{at}/{defs}/{name}")));
                }
            }
        }
        // The keywords that decide a node alone, in the converter's order.
        if map.contains_key("$ref") {
            return self.only(map, at, "$ref", &[]);
        }
        if let Some(key) = ["oneOf", "anyOf"]
            .into_iter()
            .find(|k| map.contains_key(*k))
        {
            self.only(map, at, key, &[])?;
            return self.each(map.get(key), &format!("{at}/{key}"), todo);
        }
        let types: Vec<&str> = match map.get("type") {
            Some(Value::String(name)) => vec![name.as_str()],
            Some(Value::Array(names)) => names.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        for key in ["const", "enum"] {
            if map.contains_key(key) {
                return self.only(map, at, key, &["type"]);
            }
        }
        if types.is_empty() {
            let kind = untyped_kind(map);
            return self.kind(map, at, kind, todo);
        }
        for name in types {
            let kind = match name {
                "object" if !has_properties(map) && map.contains_key("allOf") => Kind::AllOf,
                "object" => Kind::Object,
                "string" if map.contains_key("allOf") => {
                    return Err(self.refuse(at, "allOf", "is not enforced on strings"));
                }
                "string" => Kind::String,
                "array" => Kind::Array,
                "integer" => Kind::Integer,
                "number" => Kind::Number,
                "boolean" => Kind::Boolean,
                "null" => Kind::Null,
                // The converter refuses an unknown type itself.
                _ => continue,
            };
            self.kind(map, at, kind, todo)?;
        }
        Ok(())
    }

    /// A node decided by `key` alone: any other constraint is dropped.
    fn only(
        &self,
        map: &Map<String, Value>,
        at: &str,
        key: &str,
        also: &[&str],
    ) -> Result<(), GeniusError> {
        for other in map.keys() {
            let other = other.as_str();
            if other != key && !also.contains(&other) && ENFORCED_SOMEWHERE.contains(&other) {
                return Err(self.refuse(
                    at,
                    other,
                    &format!(
                        "beside `{key}` is not enforced (the converter reads only `{key}` here)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Queues every schema of the array at `value`.
    fn each<'v>(
        &self,
        value: Option<&'v Value>,
        at: &str,
        todo: &mut Vec<(&'v Value, String)>,
    ) -> Result<(), GeniusError> {
        if let Some(Value::Array(items)) = value {
            for (i, item) in items.iter().enumerate() {
                todo.push((item, format!("{at}/{i}")));
            }
        }
        Ok(())
    }

    /// Checks the keywords of a node of `kind`: those the converter reads
    /// for it are fine, the others are refused.
    fn kind<'v>(
        &mut self,
        map: &'v Map<String, Value>,
        at: &str,
        kind: Kind,
        todo: &mut Vec<(&'v Value, String)>,
    ) -> Result<(), GeniusError> {
        let read: &[&str] = match kind {
            Kind::Object => &["type", "properties", "required", "additionalProperties"],
            Kind::AllOf => &["type", "allOf"],
            Kind::Array => &["type", "items", "prefixItems", "minItems", "maxItems"],
            Kind::String => &["type", "pattern", "format", "minLength", "maxLength"],
            Kind::Integer => &[
                "type",
                "minimum",
                "maximum",
                "exclusiveMinimum",
                "exclusiveMaximum",
            ],
            Kind::Number | Kind::Boolean | Kind::Null | Kind::Any => &["type"],
        };
        for key in map.keys() {
            let key = key.as_str();
            if ENFORCED_SOMEWHERE.contains(&key) && !read.contains(&key) {
                // A format on a non-string is an annotation, as in the
                // specification.
                if key == "format" && kind != Kind::Any {
                    continue;
                }
                let why = match kind {
                    Kind::Number => "is not enforced on numbers (only on integers)".to_owned(),
                    Kind::Any => "is not enforced on a schema without a `type`".to_owned(),
                    other => format!("is not enforced on {}", kind_name(other)),
                };
                return Err(self.refuse(at, key, &why));
            }
        }
        match kind {
            Kind::Object => {
                if let Some(Value::Object(properties)) = map.get("properties") {
                    for (name, property) in properties {
                        todo.push((property, format!("{at}/properties/{name}")));
                    }
                }
                if let Some(Value::Array(required)) = map.get("required") {
                    let known = |name: &str| {
                        map.get("properties")
                            .and_then(Value::as_object)
                            .is_some_and(|p| p.contains_key(name))
                    };
                    if let Some(missing) = required
                        .iter()
                        .filter_map(Value::as_str)
                        .find(|name| !known(name))
                    {
                        return Err(self.refuse(
                            at,
                            "required",
                            &format!("names `{missing}`, which is not one of the properties, and is not enforced"),
                        ));
                    }
                }
                if let Some(additional @ Value::Object(_)) = map.get("additionalProperties") {
                    todo.push((additional, format!("{at}/additionalProperties")));
                }
            }
            Kind::AllOf => {
                // The converter merges the properties of object parts
                // (and intersects enums); any other kind of part is lost.
                if let Some(Value::Array(parts)) = map.get("allOf") {
                    for (i, part) in parts.iter().enumerate() {
                        let part_at = format!("{at}/allOf/{i}");
                        let mergeable = part.as_object().is_some_and(|p| {
                            p.contains_key("$ref")
                                || p.contains_key("enum")
                                || p.contains_key("anyOf")
                                || p.contains_key("oneOf")
                                || has_properties(p)
                        });
                        if !mergeable {
                            return Err(self.refuse(
                                &part_at,
                                "allOf",
                                "parts other than objects with properties, enums or references are not enforced",
                            ));
                        }
                        todo.push((part, part_at));
                    }
                }
            }
            Kind::Array => {
                let tuple = matches!(map.get("items"), Some(Value::Array(_)))
                    || (!map.contains_key("items") && map.contains_key("prefixItems"));
                if map.contains_key("items") && map.contains_key("prefixItems") {
                    return Err(self.refuse(
                        at,
                        "prefixItems",
                        "beside `items` is not enforced (the converter reads only `items`)",
                    ));
                }
                if tuple {
                    for key in ["minItems", "maxItems"] {
                        if map.contains_key(key) {
                            return Err(self.refuse(at, key, "is not enforced on a tuple"));
                        }
                    }
                }
                for key in ["items", "prefixItems"] {
                    match map.get(key) {
                        Some(Value::Array(_)) => {
                            self.each(map.get(key), &format!("{at}/{key}"), todo)?
                        }
                        Some(items) => todo.push((items, format!("{at}/{key}"))),
                        None => {}
                    }
                }
            }
            Kind::String => {
                let format = map.get("format").and_then(Value::as_str);
                if let Some(format) = format {
                    if !FORMATS.contains(&format) {
                        return Err(self.refuse(
                            at,
                            "format",
                            &format!("`{format}` is not enforced (the converter knows date, time, date-time and uuid)"),
                        ));
                    }
                }
                if let Some(pattern) = map.get("pattern").and_then(Value::as_str) {
                    for key in ["format", "minLength", "maxLength"] {
                        if map.contains_key(key) {
                            return Err(self.refuse(
                                at,
                                key,
                                "beside `pattern` is not enforced (the converter reads only the pattern)",
                            ));
                        }
                    }
                    self.patterns.push(Pattern {
                        at: format!("{}{at}", self.what),
                        pattern: pattern.to_owned(),
                    });
                } else if format.is_some() {
                    for key in ["minLength", "maxLength"] {
                        if map.contains_key(key) {
                            return Err(self.refuse(
                                at,
                                key,
                                "beside `format` is not enforced (the converter reads only the format)",
                            ));
                        }
                    }
                }
            }
            Kind::Integer => {
                for (inclusive, exclusive) in [
                    ("minimum", "exclusiveMinimum"),
                    ("maximum", "exclusiveMaximum"),
                ] {
                    if map.contains_key(inclusive) && map.contains_key(exclusive) {
                        return Err(self.refuse(
                            at,
                            exclusive,
                            &format!("beside `{inclusive}` is not enforced"),
                        ));
                    }
                }
            }
            Kind::Number | Kind::Boolean | Kind::Null | Kind::Any => {}
        }
        Ok(())
    }
}

/// Whether a node describes an object's properties, as the converter
/// decides it.
fn has_properties(map: &Map<String, Value>) -> bool {
    map.contains_key("properties")
        || map
            .get("additionalProperties")
            .is_some_and(|additional| additional != &Value::Bool(true))
}

/// What the converter makes of a node without `type`, from its keywords,
/// in the converter's order.
fn untyped_kind(map: &Map<String, Value>) -> Kind {
    let string_format = map
        .get("format")
        .and_then(Value::as_str)
        .is_some_and(|format| FORMATS.contains(&format));
    if has_properties(map) {
        Kind::Object
    } else if map.contains_key("allOf") {
        Kind::AllOf
    } else if map.contains_key("items") || map.contains_key("prefixItems") {
        Kind::Array
    } else if map.contains_key("pattern")
        || map.contains_key("minLength")
        || map.contains_key("maxLength")
        || string_format
    {
        Kind::String
    } else {
        Kind::Any
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Object => "objects",
        Kind::AllOf => "allOf",
        Kind::Array => "arrays",
        Kind::String => "strings",
        Kind::Integer => "integers",
        Kind::Number => "numbers",
        Kind::Boolean => "booleans",
        Kind::Null => "null",
        Kind::Any => "a schema without a type",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(schema: Value) -> String {
        match check("schema", &schema) {
            Err(err) => err.to_string(),
            Ok(_) => panic!("accepted: {schema}"),
        }
    }

    #[test]
    fn what_the_converter_enforces_is_accepted() {
        let person = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "Person",
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "full name", "minLength": 1},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "email": {"type": ["string", "null"], "default": null},
                "born": {"type": "string", "format": "date"},
                "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
                "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "number"}]},
                "kind": {"enum": ["a", "b"], "type": "string"},
                "pet": {"anyOf": [{"$ref": "#/$defs/Cat"}, {"type": "null"}], "title": "Pet"},
                "score": {"type": "number", "format": "double"},
            },
            "required": ["name", "age"],
            "additionalProperties": false,
            "$defs": {"Cat": {"type": "object", "properties": {"lives": {"const": 9}}}},
        });
        let patterns = check("schema", &person).unwrap();
        assert_eq!(
            patterns,
            vec![Pattern {
                at: "schema/properties/code".into(),
                pattern: "^[A-Z]{3}$".into()
            }]
        );
        let merged = json!({"allOf": [
            {"$ref": "#/$defs/A"},
            {"type": "object", "properties": {"b": {"type": "string"}}}
        ], "$defs": {"A": {"type": "object", "properties": {"a": {"type": "integer"}}}}});
        assert!(check("schema", &merged).is_ok());
        assert!(check("schema", &json!(true)).is_ok());
        assert!(check("schema", &json!({"x-custom": 1, "type": "boolean"})).is_ok());
    }

    #[test]
    fn keywords_the_converter_drops_are_named() {
        let not =
            refused(json!({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}));
        assert!(
            not.contains("`not`") && not.contains("schema/properties/a"),
            "{not}"
        );
        assert!(refused(json!({"type": "number", "minimum": 0})).contains("`minimum`"));
        assert!(refused(json!({"type": "string", "format": "email"})).contains("email"));
        assert!(
            refused(json!({"type": "string", "pattern": "^a$", "maxLength": 3}))
                .contains("`maxLength`")
        );
        assert!(
            refused(json!({"$ref": "#/$defs/A", "type": "object", "$defs": {"A": {}}}))
                .contains("`type`")
        );
        assert!(
            refused(json!({"anyOf": [{"type": "string"}], "minLength": 2})).contains("minLength")
        );
        assert!(refused(json!({"type": "array", "uniqueItems": true})).contains("uniqueItems"));
        assert!(
            refused(json!({"type": "array", "prefixItems": [{}], "maxItems": 1}))
                .contains("maxItems")
        );
        assert!(refused(json!({"minimum": 1})).contains("without a `type`"));
        assert!(
            refused(json!({"type": "object", "properties": {}, "required": ["a"]})).contains("`a`")
        );
        assert!(
            refused(json!({"type": "object", "properties": {"a": {}}, "allOf": [{}]}))
                .contains("allOf")
        );
        assert!(refused(json!({"allOf": [{"type": "string"}]})).contains("allOf/0"));
        assert!(refused(json!({"$defs": {"X": {"if": {}}}, "type": "null"})).contains("$defs/X"));
        assert!(
            refused(json!({"type": "integer", "minimum": 1, "exclusiveMinimum": 0}))
                .contains("exclusiveMinimum")
        );
    }

    #[test]
    fn a_deep_schema_is_walked() {
        let mut deep = json!({"type": "string"});
        for _ in 0..300 {
            deep = json!({"type": "array", "items": deep});
        }
        assert!(check("schema", &deep).is_ok());
    }
}
