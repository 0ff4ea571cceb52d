//! Who a request or a session belongs to: Qlik's (UserDirectory, UserId), compared without
//! regard to case as Qlik does, and the header-authentication value that carries it.

use std::fmt;
use std::sync::Arc;

/// A Qlik user. `key` is the lower-cased `dir\id` used for counting; `dir` and `id` keep the
/// spelling first seen, for display.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct User {
    pub key: Arc<str>,
    pub dir: Arc<str>,
    pub id: Arc<str>,
}

impl User {
    pub fn new(dir: &str, id: &str) -> User {
        User {
            key: format!("{}\\{}", dir.to_lowercase(), id.to_lowercase()).into(),
            dir: dir.into(),
            id: id.into(),
        }
    }

    /// Parses `DIRECTORY\userid` as header authentication (dynamic mode) expects it: US-ASCII,
    /// exactly one backslash, both parts non-empty, no control characters.
    pub fn parse(value: &[u8]) -> Result<User, &'static str> {
        if !value.is_ascii() {
            return Err("the identity header must be US-ASCII");
        }
        if value.iter().any(|&b| b.is_ascii_control()) {
            return Err("the identity header has a control character");
        }
        let text =
            std::str::from_utf8(value).map_err(|_| "the identity header must be US-ASCII")?;
        let text = text.trim();
        let mut parts = text.split('\\');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(dir), Some(id), None) if !dir.trim().is_empty() && !id.trim().is_empty() => {
                Ok(User::new(dir.trim(), id.trim()))
            }
            _ => Err("the identity header must be DIRECTORY\\userid"),
        }
    }
}

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\\{}", self.dir, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_compares_without_case() {
        let a = User::parse(b"CORP\\Jane").unwrap();
        let b = User::parse(b" corp\\JANE ").unwrap();
        assert_eq!(a.key, b.key);
        assert_eq!(a.to_string(), "CORP\\Jane");
    }

    #[test]
    fn rejects_what_qlik_would_not_take() {
        for bad in [
            &b"jane"[..],
            b"CORP\\",
            b"\\jane",
            b"A\\B\\C",
            "CORP\\j\u{e4}ne".as_bytes(),
            b"CORP\\ja\tne",
            b"",
        ] {
            assert!(
                User::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
