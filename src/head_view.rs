//! Read access to a message's header fields, whatever holds them: the HTTP/1 engine's parsed
//! head (the browser's own bytes), or hyper's `HeaderMap`. The session guard, the cookie
//! self-test and the response phases read fields through this trait, so they never copy a
//! head and never depend on the proxy's types.

use http::header::{self, HeaderMap, HeaderValue};

/// The fields of one message head. `name` is lower-case.
pub trait HeadView: Sync {
    type Values<'a>: Iterator<Item = &'a [u8]>
    where
        Self: 'a;
    /// Every value sent under `name`, in order.
    fn values<'a>(&'a self, name: &'a str) -> Self::Values<'a>;
    fn first<'a>(&'a self, name: &'a str) -> Option<&'a [u8]> {
        self.values(name).next()
    }
}

impl HeadView for HeaderMap {
    type Values<'a> =
        std::iter::Map<header::ValueIter<'a, HeaderValue>, fn(&'a HeaderValue) -> &'a [u8]>;
    fn values<'a>(&'a self, name: &'a str) -> Self::Values<'a> {
        self.get_all(name)
            .iter()
            .map(HeaderValue::as_bytes as fn(&'a HeaderValue) -> &'a [u8])
    }
}

/// A field value as text, if it is UTF-8. Field values are nearly always ASCII, and an ASCII
/// check (a word at a time) costs a fraction of `str::from_utf8` on short values, which the
/// hot path reads a few of per request.
pub fn text(bytes: &[u8]) -> Option<&str> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(bytes) })
    } else {
        std::str::from_utf8(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::text;

    #[test]
    fn text_is_from_utf8() {
        for b in [
            &b""[..],
            b"abc=1; d",
            "caf\u{e9}".as_bytes(),
            b"\xff\xfe",
            b"a\xc3",
            b"\x7f\x00",
        ] {
            assert_eq!(text(b), std::str::from_utf8(b).ok(), "{b:?}");
        }
    }
}
