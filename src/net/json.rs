//! A reader for the small JSON answers of the agent's peers: Firecracker's
//! MMDS document (docs/snapshots.md#mmds-identity-per-clone) and an OTLP
//! receiver's partial success (docs/backends.md#opentelemetry).
//!
//! The agent otherwise only writes JSON, and serde_json's parser would be
//! the only JSON deserializer in the binary: it cost 24 KB of the static
//! binary's 1 MiB budget when the OTLP answer was read with it
//! (docs/design.md#budgets). This reader is the JSON grammar (RFC 8259)
//! for a flat object: keys and scalar values, nested values checked and
//! handed over as text, so that a nested object is read by a second call.
//! It is tested against malformed input below and fuzzed.

/// A value of the object read.
#[derive(Debug, PartialEq)]
pub enum Scalar {
    /// A string, or a number or boolean as written.
    Text(String),
    /// `null`.
    Null,
    /// An object or array, checked, as its text in the document (an
    /// object can be read with [`flat_object`] again).
    Nested(String),
}

/// Deepest nesting skipped inside a value.
const MAX_DEPTH: usize = 32;

/// Reads a JSON object, keys and values in document order; a nested
/// value is checked and handed over as its text.
pub fn flat_object(b: &[u8]) -> std::result::Result<Vec<(String, Scalar)>, String> {
    let mut r = Reader { b, i: 0 };
    let mut out = Vec::new();
    r.expect(b'{')?;
    if !r.eat(b'}') {
        loop {
            r.expect(b'"')?;
            let key = r.string()?;
            r.expect(b':')?;
            r.ws();
            let value = match r.peek() {
                Some(b'{' | b'[') => {
                    let start = r.i;
                    r.skip(0)?;
                    Scalar::Nested(String::from_utf8_lossy(&b[start..r.i]).into_owned())
                }
                _ => r.scalar()?,
            };
            out.push((key, value));
            if r.eat(b'}') {
                break;
            }
            r.expect(b',')?;
        }
    }
    r.ws();
    if r.i != b.len() {
        return Err(r.error("end of the document"));
    }
    Ok(out)
}

/// JSON's number grammar, narrower than Rust's float syntax:
/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
fn is_json_number(w: &str) -> bool {
    let b = w.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl Reader<'_> {
    fn error(&self, expected: &str) -> String {
        format!(
            "not a JSON object of settings: expected {expected} at byte {}",
            self.i
        )
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// Skips white space, then takes `c` if it is next.
    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        let found = self.peek() == Some(c);
        self.i += usize::from(found);
        found
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.error(&format!("{:?}", c as char)))
        }
    }

    /// The rest of a string whose opening quote was taken.
    fn string(&mut self) -> std::result::Result<String, String> {
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.error("the end of a string"));
            };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let unit = |r: &mut Self| -> std::result::Result<u16, String> {
                        // from_str_radix alone takes a sign: `\u+00e` is no escape.
                        let hex =
                            r.b.get(r.i..r.i + 4)
                                .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
                        let unit = hex
                            .and_then(|h| std::str::from_utf8(h).ok())
                            .and_then(|h| u16::from_str_radix(h, 16).ok());
                        r.i += 4;
                        unit.ok_or_else(|| r.error("four hex digits"))
                    };
                    let e = self.peek().ok_or_else(|| self.error("an escape"))?;
                    self.i += 1;
                    let ch = match e {
                        b'"' | b'\\' | b'/' => e as char,
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let mut units = vec![unit(self)?];
                            if (0xd800..0xdc00).contains(&units[0])
                                && self.b[self.i..].starts_with(b"\\u")
                            {
                                self.i += 2;
                                units.push(unit(self)?);
                            }
                            char::decode_utf16(units)
                                .next()
                                .and_then(|c| c.ok())
                                .ok_or_else(|| self.error("a valid \\u escape"))?
                        }
                        _ => return Err(self.error("a valid escape")),
                    };
                    out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
                }
                0..0x20 => return Err(self.error("no control character in a string")),
                _ => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| self.error("UTF-8 text"))
    }

    /// A string, number, boolean or null.
    fn scalar(&mut self) -> std::result::Result<Scalar, String> {
        self.ws();
        if self.eat(b'"') {
            return self.string().map(Scalar::Text);
        }
        let start = self.i;
        while matches!(
            self.peek(),
            Some(b'a'..=b'z' | b'0'..=b'9' | b'-' | b'+' | b'.' | b'E')
        ) {
            self.i += 1;
        }
        let word = std::str::from_utf8(&self.b[start..self.i]).unwrap_or_default();
        match word {
            "null" => Ok(Scalar::Null),
            "true" | "false" => Ok(Scalar::Text(word.to_string())),
            w if is_json_number(w) => Ok(Scalar::Text(w.to_string())),
            _ => {
                self.i = start;
                Err(self.error("a string, number, true, false or null"))
            }
        }
    }

    /// Checks and skips any value, objects and arrays up to [`MAX_DEPTH`].
    fn skip(&mut self, depth: usize) -> std::result::Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(self.error(&format!("at most {MAX_DEPTH} levels of nesting")));
        }
        let (open, close) = if self.eat(b'{') {
            (true, b'}')
        } else if self.eat(b'[') {
            (false, b']')
        } else {
            return self.scalar().map(|_| ());
        };
        if self.eat(close) {
            return Ok(());
        }
        loop {
            if open {
                self.expect(b'"')?;
                self.string()?;
                self.expect(b':')?;
            }
            self.skip(depth + 1)?;
            if self.eat(close) {
                return Ok(());
            }
            self.expect(b',')?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_reader_follows_json() {
        let text = |s: &str| Scalar::Text(s.to_string());
        assert_eq!(
            flat_object(
                br#" { "a" : "x\"y\\z\/\n\u00e9\ud83d\ude00" , "b":-1.5e+3,"c":0,"d":true,
                   "e":null, "f": {"g": [1, {"h": "}"}, []]}, "i": [] } "#
            )
            .unwrap(),
            vec![
                ("a".to_string(), text("x\"y\\z/\n\u{e9}\u{1f600}")),
                ("b".to_string(), text("-1.5e+3")),
                ("c".to_string(), text("0")),
                ("d".to_string(), text("true")),
                ("e".to_string(), Scalar::Null),
                (
                    "f".to_string(),
                    Scalar::Nested(r#"{"g": [1, {"h": "}"}, []]}"#.to_string())
                ),
                ("i".to_string(), Scalar::Nested("[]".to_string())),
            ]
        );
        assert_eq!(flat_object(b"{}").unwrap(), vec![]);
        assert_eq!(
            flat_object("{\"v\": \"ü\"}".as_bytes()).unwrap(),
            vec![("v".to_string(), text("ü"))]
        );
        for bad in [
            &b""[..],
            b"[]",
            b"\"x\"",
            b"{",
            b"{\"a\"}",
            b"{\"a\": }",
            b"{\"a\": 1,}",
            b"{\"a\": 1} x",
            b"{\"a\": 01}",
            b"{\"a\": +1}",
            b"{\"a\": .5}",
            b"{\"a\": 1.}",
            b"{\"a\": nan}",
            b"{\"a\": True}",
            b"{\"a\": \"\\x\"}",
            b"{\"a\": \"\\u12\"}",
            // Found by the fuzz target `mmds` (docs/testing.md#fuzzing).
            b"{\"a\": \"\\u+00e9\"}",
            b"{\"a\": \"\\ud83d\\u+e00\"}",
            b"{\"a\": \"\\udc00\"}",
            b"{\"a\": \"tab\there\"}",
            b"{\"a\": \"\xff\"}",
            b"{\"a\": [1 2]}",
            b"{\"a\": {1: 2}}",
            b"{\"a\": \"unterminated}",
        ] {
            assert!(
                flat_object(bad).is_err(),
                "{:?} must be refused",
                String::from_utf8_lossy(bad)
            );
        }
        let deep = format!("{{\"a\": {}{}}}", "[".repeat(40), "]".repeat(40));
        assert!(flat_object(deep.as_bytes()).is_err(), "nesting is bounded");
    }
}
