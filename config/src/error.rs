//! Config errors that name the field they are about, and the two tools every converter uses
//! to read a proto message field by field: path builders and [`unsupported!`].

/// A config that cannot be honoured: the field path and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{reason}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// The same error under a longer path: `outer` goes in front of the path it has.
    pub fn within(mut self, outer: &str) -> Self {
        self.path = match (outer.is_empty(), self.path.is_empty()) {
            (true, _) => self.path,
            (false, true) => outer.to_string(),
            (false, false) if self.path.starts_with('[') => format!("{outer}{}", self.path),
            (false, false) => format!("{outer}.{}", self.path),
        };
        self
    }
}

pub type ConfigResult<T> = Result<T, ConfigError>;

/// `Err` with a path and a reason.
pub fn err<T>(path: impl Into<String>, reason: impl Into<String>) -> ConfigResult<T> {
    Err(ConfigError::new(path, reason))
}

/// `path.name` (or `name` at the root).
pub fn field(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// `path.name[index]`.
pub fn item(path: &str, name: &str, index: usize) -> String {
    format!("{}[{index}]", field(path, name))
}

/// `path.name["key"]`.
pub fn entry(path: &str, name: &str, key: &str) -> String {
    format!("{}[{key:?}]", field(path, name))
}

/// Whether a proto field counts as set, as proto3 defines presence: a message or wrapper when
/// present, a list or map when not empty, a scalar when not its default.
pub trait IsSet {
    fn is_set(&self) -> bool;
}

/// Destructuring a reference binds references: they count as what they point to.
impl<T: IsSet + ?Sized> IsSet for &T {
    fn is_set(&self) -> bool {
        (**self).is_set()
    }
}

impl<T> IsSet for Option<T> {
    fn is_set(&self) -> bool {
        self.is_some()
    }
}

impl<T> IsSet for Vec<T> {
    fn is_set(&self) -> bool {
        !self.is_empty()
    }
}

impl<K, V, S> IsSet for std::collections::HashMap<K, V, S> {
    fn is_set(&self) -> bool {
        !self.is_empty()
    }
}

impl<K, V> IsSet for std::collections::BTreeMap<K, V> {
    fn is_set(&self) -> bool {
        !self.is_empty()
    }
}

impl IsSet for String {
    fn is_set(&self) -> bool {
        !self.is_empty()
    }
}

impl IsSet for bool {
    fn is_set(&self) -> bool {
        *self
    }
}

macro_rules! scalar_is_set {
    ($($ty:ty),*) => {
        $(impl IsSet for $ty {
            fn is_set(&self) -> bool {
                *self != <$ty>::default()
            }
        })*
    };
}
scalar_is_set!(i32, i64, u32, u64, f32, f64);

/// Fails with `PATH.FIELD: field is not supported` for the first of the named fields that is
/// set. Converters destructure every message without `..` and list here each field Remora does
/// not honour, so a field added to `protos/` does not compile until someone decides on it.
#[macro_export]
macro_rules! unsupported {
    ($path:expr, $($field:ident),+ $(,)?) => {
        $(
            if $crate::error::IsSet::is_set(&$field) {
                return Err($crate::ConfigError::new(
                    $crate::error::field($path, stringify!($field)),
                    "field is not supported",
                ));
            }
        )+
    };
}

/// Fails with `PATH.FIELD: REASON` when the field is set: a field Remora reads, but not yet at
/// any value but its default.
#[macro_export]
macro_rules! unsupported_because {
    ($path:expr, $field:ident, $reason:expr) => {
        if $crate::error::IsSet::is_set(&$field) {
            return Err($crate::ConfigError::new(
                $crate::error::field($path, stringify!($field)),
                $reason,
            ));
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_print_their_path_and_can_be_nested() {
        let error = ConfigError::new("a.b", "bad");
        assert_eq!(error.to_string(), "a.b: bad");
        assert_eq!(error.clone().within("x").path, "x.a.b");
        assert_eq!(ConfigError::new("", "bad").within("x").path, "x");
        assert_eq!(ConfigError::new("[2].y", "bad").within("x").path, "x[2].y");
        assert_eq!(ConfigError::new("", "root").to_string(), "root");
    }

    fn read(name: String, count: u32, flag: bool, list: Vec<u8>) -> ConfigResult<()> {
        unsupported!("m", count, flag, list);
        let _ = name;
        Ok(())
    }

    #[test]
    fn unsupported_names_the_first_set_field() {
        assert!(read("x".into(), 0, false, vec![]).is_ok());
        let error = read(String::new(), 0, true, vec![1]).unwrap_err();
        assert_eq!(error.path, "m.flag");
        assert_eq!(error.reason, "field is not supported");
        assert_eq!(
            read(String::new(), 3, false, vec![]).unwrap_err().path,
            "m.count"
        );
    }
}
