//! Configuration errors: a field of an object (`FieldError`, while the object is being read)
//! and an object's field (`ConfigError`, what the status, the log and `palisade stats` show).
//! Under both the object model and the selectors, which report through them.
use std::fmt;

use serde::{Deserialize, Serialize};

/// A problem with one field of an object, before the object is known (see `ConfigError`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn on(self, object: impl Into<String>) -> ConfigError {
        ConfigError {
            object: object.into(),
            field: self.field,
            message: self.message,
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A configuration error: which object (`NetworkPolicy ns/name`, `Pod ns/name`,
/// `file x.yaml`, ...), which field (may be empty) and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub struct ConfigError {
    pub object: String,
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(
        object: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError {
            object: object.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.object, self.message)
        } else {
            write!(f, "{}: {}: {}", self.object, self.field, self.message)
        }
    }
}
