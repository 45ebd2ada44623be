//! JSON5 (and plain JSON) text to a `serde_json` value, with errors that give the line and
//! column: a small recursive-descent parser that keeps key order, refuses duplicate keys and
//! bounds nesting.
//!
//! Accepted beyond JSON, as the JSON5 specification says: `//` and `/* */` comments, trailing
//! commas, unquoted (identifier) keys, single-quoted strings, the escapes `\'`, `\v`, `\0`,
//! `\xHH`, line continuations and any other escaped character standing for itself, hexadecimal
//! numbers, a leading `+`, and a leading or trailing decimal point. `Infinity` and `NaN` are
//! JSON5 but are refused: JSON cannot hold them.

use serde_json::{Map, Number, Value};

/// Deepest nesting of objects and arrays accepted.
pub const MAX_DEPTH: usize = 128;

/// What is wrong with a JSON5 text, and where (1-based line and column, columns counted in
/// characters).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct Json5Error {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong and what would be right.
    pub message: String,
}

/// Parses a JSON5 (or JSON) document holding one value.
pub fn parse(text: &str) -> Result<Value, Json5Error> {
    let mut parser = Parser {
        text,
        bytes: text.as_bytes(),
        pos: 0,
        depth: 0,
    };
    parser.skip_blank()?;
    if parser.peek().is_none() {
        return Err(parser.error(
            parser.pos,
            "the document is empty; expected a value such as {}",
        ));
    }
    let value = parser.value()?;
    parser.skip_blank()?;
    if let Some(c) = parser.peek() {
        return Err(parser.error(
            parser.pos,
            format!(
                "unexpected {} after the end of the value; a document holds one value",
                describe(c)
            ),
        ));
    }
    Ok(value)
}

struct Parser<'t> {
    text: &'t str,
    bytes: &'t [u8],
    /// Byte offset of the next character.
    pos: usize,
    /// Objects and arrays open around `pos`.
    depth: usize,
}

/// `c` as a message names it.
fn describe(c: char) -> String {
    match c {
        '\n' | '\r' => "a line break".to_owned(),
        '\'' => "\"'\"".to_owned(),
        c if c.is_control() || c.is_whitespace() => format!("character U+{:04X}", u32::from(c)),
        c => format!("'{c}'"),
    }
}

/// JSON5 white space: the JSON ones plus vertical tab, form feed, no-break space, byte order
/// mark, line and paragraph separators and the other Unicode space separators.
fn is_blank(c: char) -> bool {
    matches!(
        c,
        ' ' | '\t'
            | '\n'
            | '\r'
            | '\u{0B}'
            | '\u{0C}'
            | '\u{A0}'
            | '\u{FEFF}'
            | '\u{1680}'
            | '\u{2000}'
            ..='\u{200A}' | '\u{2028}' | '\u{2029}' | '\u{202F}' | '\u{205F}' | '\u{3000}'
    )
}

fn is_line_end(c: char) -> bool {
    matches!(c, '\n' | '\r' | '\u{2028}' | '\u{2029}')
}

fn is_ident_start(c: char) -> bool {
    c == '$' || c == '_' || c.is_alphabetic()
}

fn is_ident_part(c: char) -> bool {
    is_ident_start(c) || c.is_alphanumeric() || c == '\u{200C}' || c == '\u{200D}'
}

impl<'t> Parser<'t> {
    fn peek(&self) -> Option<char> {
        self.text
            .get(self.pos..)
            .and_then(|rest| rest.chars().next())
    }

    fn peek_at(&self, offset: usize) -> Option<char> {
        self.text
            .get(self.pos + offset..)
            .and_then(|rest| rest.chars().next())
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    /// The line and column of byte offset `at`.
    fn position(&self, at: usize) -> (usize, usize) {
        let before = self.text.get(..at).unwrap_or(self.text);
        let mut line = 1;
        let mut column = 1;
        let mut chars = before.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\n' => {
                    line += 1;
                    column = 1;
                }
                '\r' if chars.peek() != Some(&'\n') => {
                    line += 1;
                    column = 1;
                }
                '\r' => {}
                _ => column += 1,
            }
        }
        (line, column)
    }

    fn error(&self, at: usize, message: impl Into<String>) -> Json5Error {
        let (line, column) = self.position(at);
        Json5Error {
            line,
            column,
            message: message.into(),
        }
    }

    fn place(&self, at: usize) -> String {
        let (line, column) = self.position(at);
        format!("line {line}, column {column}")
    }

    /// Skips white space and comments.
    fn skip_blank(&mut self) -> Result<(), Json5Error> {
        loop {
            match self.peek() {
                Some(c) if is_blank(c) => {
                    self.bump();
                }
                Some('/') => match self.peek_at(1) {
                    Some('/') => {
                        while let Some(c) = self.peek() {
                            if is_line_end(c) {
                                break;
                            }
                            self.bump();
                        }
                    }
                    Some('*') => {
                        let start = self.pos;
                        match self.text[start + 2..].find("*/") {
                            Some(end) => self.pos = start + 2 + end + 2,
                            None => {
                                return Err(self.error(
                                    start,
                                    "unterminated comment: the /* that starts here has no closing */",
                                ));
                            }
                        }
                    }
                    _ => return Ok(()),
                },
                _ => return Ok(()),
            }
        }
    }

    fn value(&mut self) -> Result<Value, Json5Error> {
        match self.peek() {
            None => Err(self.error(
                self.pos,
                "unexpected end of the document; expected a value",
            )),
            Some('{') => self.object(),
            Some('[') => self.array(),
            Some(q @ ('"' | '\'')) => self.string(q).map(Value::String),
            Some('+' | '-' | '.' | '0'..='9') => self.number(),
            Some(c) if is_ident_start(c) => {
                let start = self.pos;
                let word = self.word();
                match word {
                    "true" => Ok(Value::Bool(true)),
                    "false" => Ok(Value::Bool(false)),
                    "null" => Ok(Value::Null),
                    "Infinity" | "NaN" => Err(self.error(start, non_finite(word))),
                    _ => Err(self.error(
                        start,
                        format!(
                            "unexpected word '{word}'; a value is a string in quotes, a number, true, false, null, an object or an array"
                        ),
                    )),
                }
            }
            Some(c) => Err(self.error(
                self.pos,
                format!(
                    "unexpected {}; expected a value (a string, a number, true, false, null, an object or an array)",
                    describe(c)
                ),
            )),
        }
    }

    /// The run of identifier characters at `pos` (no escapes), consumed.
    fn word(&mut self) -> &'t str {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if !is_ident_part(c) {
                break;
            }
            self.bump();
        }
        let text = self.text;
        &text[start..self.pos]
    }

    fn enter(&mut self, start: usize) -> Result<(), Json5Error> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error(
                start,
                format!("objects and arrays are nested more than {MAX_DEPTH} levels deep"),
            ));
        }
        Ok(())
    }

    fn object(&mut self) -> Result<Value, Json5Error> {
        let start = self.pos;
        self.enter(start)?;
        self.bump();
        let mut map = Map::new();
        // Where each key of `map` starts, in insertion order, to name the first of a duplicate.
        let mut key_starts: Vec<usize> = Vec::new();
        loop {
            self.skip_blank()?;
            let key_start = self.pos;
            let key = match self.peek() {
                Some('}') => {
                    self.bump();
                    break;
                }
                None => return Err(self.unclosed(start, '{', '}')),
                Some(q @ ('"' | '\'')) => self.string(q)?,
                Some(c) if is_ident_start(c) || c == '\\' => self.identifier()?,
                Some(c) => {
                    return Err(self.error(
                        key_start,
                        format!(
                            "expected a key (a name or a quoted string) or '}}', found {}",
                            describe(c)
                        ),
                    ));
                }
            };
            if map.contains_key(&key) {
                let first = map
                    .keys()
                    .position(|k| *k == key)
                    .and_then(|i| key_starts.get(i))
                    .map(|&at| format!(" (first at {})", self.place(at)))
                    .unwrap_or_default();
                return Err(self.error(
                    key_start,
                    format!(
                        "duplicate key {}{first}; a key may appear once in an object",
                        quoted(&key)
                    ),
                ));
            }
            self.skip_blank()?;
            match self.peek() {
                Some(':') => {
                    self.bump();
                }
                Some(c) => {
                    return Err(self.error(
                        self.pos,
                        format!(
                            "expected ':' after the key {}, found {}",
                            quoted(&key),
                            describe(c)
                        ),
                    ));
                }
                None => return Err(self.unclosed(start, '{', '}')),
            }
            self.skip_blank()?;
            let value = self.value()?;
            self.skip_blank()?;
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some('}') => {
                    self.bump();
                    map.insert(key, value);
                    break;
                }
                Some(c) => {
                    return Err(self.error(
                        self.pos,
                        format!(
                            "expected ',' or '}}' after the value of {}, found {}",
                            quoted(&key),
                            describe(c)
                        ),
                    ));
                }
                None => return Err(self.unclosed(start, '{', '}')),
            }
            map.insert(key, value);
            key_starts.push(key_start);
        }
        self.depth -= 1;
        Ok(Value::Object(map))
    }

    fn array(&mut self) -> Result<Value, Json5Error> {
        let start = self.pos;
        self.enter(start)?;
        self.bump();
        let mut items = Vec::new();
        loop {
            self.skip_blank()?;
            match self.peek() {
                Some(']') => {
                    self.bump();
                    break;
                }
                None => return Err(self.unclosed(start, '[', ']')),
                Some(',') => {
                    return Err(self.error(
                        self.pos,
                        "expected a value or ']', found ','; an empty slot is not allowed",
                    ));
                }
                Some(_) => {}
            }
            items.push(self.value()?);
            self.skip_blank()?;
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some(']') => {
                    self.bump();
                    break;
                }
                Some(c) => {
                    return Err(self.error(
                        self.pos,
                        format!(
                            "expected ',' or ']' after item {} of the list, found {}",
                            items.len(),
                            describe(c)
                        ),
                    ));
                }
                None => return Err(self.unclosed(start, '[', ']')),
            }
        }
        self.depth -= 1;
        Ok(Value::Array(items))
    }

    /// The end of the text inside an object or array that opened at `start`.
    fn unclosed(&self, start: usize, open: char, close: char) -> Json5Error {
        self.error(
            self.pos,
            format!(
                "unexpected end of the document: the '{open}' at {} has no closing '{close}'",
                self.place(start)
            ),
        )
    }

    /// A string in `quote`s, consumed; `pos` is at the opening quote.
    fn string(&mut self, quote: char) -> Result<String, Json5Error> {
        let start = self.pos;
        self.bump();
        let mut out = String::new();
        loop {
            // Copy the run up to the next byte that needs a look (all ASCII, so the slice
            // boundaries are character boundaries).
            let run_start = self.pos;
            while let Some(&b) = self.bytes.get(self.pos) {
                if b == quote as u8 || b == b'\\' || b == b'\n' || b == b'\r' {
                    break;
                }
                self.pos += 1;
            }
            out.push_str(&self.text[run_start..self.pos]);
            match self.bytes.get(self.pos) {
                None => {
                    return Err(self.error(
                        start,
                        format!("unterminated string: the string that starts here has no closing {quote}"),
                    ));
                }
                Some(b'\n' | b'\r') => {
                    return Err(self.error(
                        start,
                        format!(
                            "unterminated string: the string that starts here runs into the end of the line; close it with {quote}, or write \\n for a line break"
                        ),
                    ));
                }
                Some(b'\\') => self.escape(start, &mut out)?,
                Some(_) => {
                    self.pos += 1;
                    return Ok(out);
                }
            }
        }
    }

    /// One escape sequence inside the string starting at `string_start`; `pos` is at `\`.
    fn escape(&mut self, string_start: usize, out: &mut String) -> Result<(), Json5Error> {
        let at = self.pos;
        self.bump();
        let Some(c) = self.bump() else {
            return Err(self.error(
                string_start,
                "unterminated string: the string that starts here has no closing quote",
            ));
        };
        match c {
            'b' => out.push('\u{08}'),
            'f' => out.push('\u{0C}'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            'v' => out.push('\u{0B}'),
            '0' if self.peek().is_some_and(|d| d.is_ascii_digit()) => {
                return Err(self.error(
                    at,
                    "bad escape: \\0 followed by a digit (octal escapes are not allowed); write \\x00 or \\u0000",
                ));
            }
            '0' => out.push('\0'),
            '1'..='9' => {
                return Err(self.error(
                    at,
                    format!(
                        "bad escape \\{c}: digits cannot be escaped (octal escapes are not allowed)"
                    ),
                ));
            }
            'x' => {
                let code = self.hex_digits(2).ok_or_else(|| {
                    self.error(
                        at,
                        "bad escape: \\x needs two hexadecimal digits, as in \\x41",
                    )
                })?;
                // Two hex digits are at most 0xFF, always a character.
                out.push(char::from_u32(code).unwrap_or('\u{FFFD}'));
            }
            'u' => out.push(self.unicode_escape(at)?),
            '\r' => {
                if self.peek() == Some('\n') {
                    self.bump();
                }
            }
            '\n' | '\u{2028}' | '\u{2029}' => {}
            // Any other character escaped stands for itself: \" \' \\ \/ and the rest.
            other => out.push(other),
        }
        Ok(())
    }

    /// `n` hexadecimal digits at `pos`, consumed; None (nothing consumed) if they are not there.
    fn hex_digits(&mut self, n: usize) -> Option<u32> {
        let digits = self.text.get(self.pos..self.pos + n)?;
        if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let code = u32::from_str_radix(digits, 16).ok()?;
        self.pos += n;
        Some(code)
    }

    /// The character of a `\uXXXX` escape (or a surrogate pair of two); `pos` is after the `u`,
    /// `at` at the backslash.
    fn unicode_escape(&mut self, at: usize) -> Result<char, Json5Error> {
        let bad = |p: &Self| {
            p.error(
                at,
                "bad escape: \\u needs four hexadecimal digits, as in \\u00e9",
            )
        };
        let high = self.hex_digits(4).ok_or_else(|| bad(self))?;
        if (0xDC00..0xE000).contains(&high) {
            return Err(self.error(
                at,
                format!(
                    "bad escape \\u{high:04X}: a low surrogate without a high surrogate before it"
                ),
            ));
        }
        if !(0xD800..0xDC00).contains(&high) {
            return char::from_u32(high).ok_or_else(|| bad(self));
        }
        if self.peek() == Some('\\') && self.peek_at(1) == Some('u') {
            let save = self.pos;
            self.pos += 2;
            if let Some(low) = self.hex_digits(4)
                && (0xDC00..0xE000).contains(&low)
            {
                let code = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
                return char::from_u32(code).ok_or_else(|| bad(self));
            }
            self.pos = save;
        }
        Err(self.error(
            at,
            format!("bad escape \\u{high:04X}: a high surrogate must be followed by a low surrogate (\\uDC00 to \\uDFFF)"),
        ))
    }

    /// An identifier key (ECMAScript IdentifierName, `\uXXXX` escapes allowed).
    fn identifier(&mut self) -> Result<String, Json5Error> {
        let mut out = String::new();
        loop {
            match self.peek() {
                Some('\\') => {
                    let at = self.pos;
                    if self.peek_at(1) != Some('u') {
                        return Err(self.error(
                            at,
                            "bad escape in a key: only \\uXXXX escapes are allowed in unquoted keys",
                        ));
                    }
                    self.pos += 2;
                    let c = self.unicode_escape(at)?;
                    let ok = if out.is_empty() {
                        is_ident_start(c)
                    } else {
                        is_ident_part(c)
                    };
                    if !ok {
                        return Err(self.error(
                            at,
                            format!("the escape stands for {}, which cannot be part of an unquoted key; quote the key", describe(c)),
                        ));
                    }
                    out.push(c);
                }
                Some(c)
                    if (out.is_empty() && is_ident_start(c))
                        || (!out.is_empty() && is_ident_part(c)) =>
                {
                    self.bump();
                    out.push(c);
                }
                _ => return Ok(out),
            }
        }
    }

    fn number(&mut self) -> Result<Value, Json5Error> {
        let start = self.pos;
        let negative = match self.peek() {
            Some('-') => {
                self.bump();
                true
            }
            Some('+') => {
                self.bump();
                false
            }
            _ => false,
        };
        match self.peek() {
            Some('I' | 'N') => {
                let word = self.word();
                if word == "Infinity" || word == "NaN" {
                    return Err(self.error(start, non_finite(word)));
                }
                return Err(self.error(
                    start,
                    format!("unexpected word '{word}' after the sign; expected digits"),
                ));
            }
            Some('0') if matches!(self.peek_at(1), Some('x' | 'X')) => {
                self.pos += 2;
                return self.hex_number(start, negative);
            }
            _ => {}
        }

        let int_start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.bump();
        }
        let int_part = &self.text[int_start..self.pos];
        if int_part.len() > 1 && int_part.starts_with('0') {
            let trimmed = int_part.trim_start_matches('0');
            return Err(self.error(
                start,
                format!(
                    "the number {} starts with 0; leading zeros are not allowed (write {})",
                    &self.text[start..self.pos],
                    if trimmed.is_empty() { "0" } else { trimmed }
                ),
            ));
        }
        let mut frac_part = None;
        if self.peek() == Some('.') {
            self.bump();
            let frac_start = self.pos;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.bump();
            }
            frac_part = Some(&self.text[frac_start..self.pos]);
        }
        if int_part.is_empty() && frac_part.is_none_or(str::is_empty) {
            let found = self
                .peek()
                .map_or_else(|| "the end of the document".to_owned(), describe);
            return Err(self.error(self.pos, format!("expected digits, found {found}")));
        }
        let mut exponent = None;
        if matches!(self.peek(), Some('e' | 'E')) {
            self.bump();
            let exp_start = self.pos;
            if matches!(self.peek(), Some('+' | '-')) {
                self.bump();
            }
            let digits_start = self.pos;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.bump();
            }
            if self.pos == digits_start {
                return Err(self.error(
                    self.pos,
                    "expected digits after the exponent 'e' of the number, as in 1e3",
                ));
            }
            exponent = Some(&self.text[exp_start..self.pos]);
        }
        self.check_number_end()?;

        // Normalize to JSON and let serde_json decide integer or float, as it does for JSON.
        let mut json = String::with_capacity(self.pos - start + 3);
        if negative {
            json.push('-');
        }
        json.push_str(if int_part.is_empty() { "0" } else { int_part });
        if let Some(frac) = frac_part {
            json.push('.');
            json.push_str(if frac.is_empty() { "0" } else { frac });
        }
        if let Some(exp) = exponent {
            json.push('e');
            json.push_str(exp);
        }
        match serde_json::from_str::<Number>(&json) {
            Ok(n) => Ok(Value::Number(n)),
            Err(_) => Err(self.error(
                start,
                format!(
                    "the number {} is too large for JSON (the largest is about 1.8e308)",
                    &self.text[start..self.pos]
                ),
            )),
        }
    }

    /// The digits of a hexadecimal number; `pos` is after `0x`.
    fn hex_number(&mut self, start: usize, negative: bool) -> Result<Value, Json5Error> {
        let digits_start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_hexdigit()) {
            self.bump();
        }
        let digits = &self.text[digits_start..self.pos];
        if digits.is_empty() {
            return Err(self.error(start, "expected hexadecimal digits after 0x, as in 0x1F"));
        }
        self.check_number_end()?;
        let too_large = || {
            self.error(
                start,
                format!(
                    "the number {} is too large; a hexadecimal number is at most 0xFFFFFFFFFFFFFFFF (or -0x8000000000000000)",
                    &self.text[start..self.pos]
                ),
            )
        };
        let magnitude = u64::from_str_radix(digits, 16).map_err(|_| too_large())?;
        if !negative {
            return Ok(Value::Number(magnitude.into()));
        }
        if magnitude == 0 {
            return Ok(Value::Number(0.into()));
        }
        let value = 0i64.checked_sub_unsigned(magnitude).ok_or_else(too_large)?;
        Ok(Value::Number(value.into()))
    }

    /// A number must not run into a name or another digit (`12abc`, `0x1G`).
    fn check_number_end(&self) -> Result<(), Json5Error> {
        match self.peek() {
            Some(c) if is_ident_part(c) || c == '.' => Err(self.error(
                self.pos,
                format!("unexpected {} right after a number", describe(c)),
            )),
            _ => Ok(()),
        }
    }
}

fn non_finite(word: &str) -> String {
    format!("{word} is not a number JSON can hold; write a finite number instead")
}

fn quoted(key: &str) -> String {
    Value::String(key.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(text: &str) -> (usize, usize, String) {
        let e = parse(text).unwrap_err();
        (e.line, e.column, e.message)
    }

    #[test]
    fn plain_json_parses_like_serde_json() {
        let text = r#"{"a": [1, -2, 3.5, 1e3, -0.25E-2, 18446744073709551615, -9223372036854775808],
            "b": {"c": null, "d": true, "e": false, "s": "x\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00"},
            "z": 12345678901234567890123}"#;
        let ours = parse(text).unwrap();
        let theirs: Value = serde_json::from_str(text).unwrap();
        assert_eq!(ours, theirs);
        assert!(ours["a"][0].is_u64());
        assert!(ours["a"][1].is_i64());
        assert!(ours["a"][2].is_f64());
        assert!(ours["a"][5].is_u64());
        assert!(ours["a"][6].is_i64());
    }

    #[test]
    fn json5_extensions() {
        let text = "\u{FEFF}// the gateway\n{\n  gateway: { port: 18789, bind: 'lan', }, /* block\n comment */\n  $x_1: +1, hex: 0x1F, neg: -0xff, lead: .5, trail: 5., exp: 2e2,\n  'single \"q\"': 'it\\'s', esc: '\\v\\0\\x41\\q\\\n', list: [1, 2, ],\n  true: 'keys may be reserved words', ünïcode: 1, \\u0061b: 2,\n}\n";
        let v = parse(text).unwrap();
        assert_eq!(
            v,
            json!({
                "gateway": {"port": 18789, "bind": "lan"},
                "$x_1": 1, "hex": 31, "neg": -255, "lead": 0.5, "trail": 5.0, "exp": 200.0,
                "single \"q\"": "it's", "esc": "\u{0B}\0Aq", "list": [1, 2],
                "true": "keys may be reserved words", "ünïcode": 1, "ab": 2,
            })
        );
        assert!(v["hex"].is_u64() && v["neg"].is_i64() && v["trail"].is_f64());
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys[..3], ["gateway", "$x_1", "hex"]);
        assert_eq!(parse("-0x8000000000000000").unwrap(), json!(i64::MIN));
        assert_eq!(parse(" 'a' ").unwrap(), json!("a"));
        assert_eq!(parse("[]").unwrap(), json!([]));
        assert_eq!(parse("{}").unwrap(), json!({}));
    }

    #[test]
    fn key_order_is_kept() {
        let v = parse("{z: 1, a: 2, m: {y: 1, b: 2}}").unwrap();
        assert_eq!(v.to_string(), r#"{"z":1,"a":2,"m":{"y":1,"b":2}}"#);
    }

    #[test]
    fn missing_comma() {
        assert_eq!(
            err("{\n  a: 1\n  b: 2\n}"),
            (
                3,
                3,
                "expected ',' or '}' after the value of \"a\", found 'b'".into()
            )
        );
        assert_eq!(
            err("[1 2]"),
            (
                1,
                4,
                "expected ',' or ']' after item 1 of the list, found '2'".into()
            )
        );
    }

    #[test]
    fn unterminated_string() {
        assert_eq!(
            err("{a: \"abc"),
            (
                1,
                5,
                "unterminated string: the string that starts here has no closing \"".into()
            )
        );
        let (line, column, message) = err("{\n  a: 'abc\n}");
        assert_eq!((line, column), (2, 6));
        assert!(
            message.contains("runs into the end of the line"),
            "{message}"
        );
    }

    #[test]
    fn bad_escapes() {
        assert_eq!(
            err(r#"{"a": "x\x4G"}"#),
            (
                1,
                9,
                "bad escape: \\x needs two hexadecimal digits, as in \\x41".into()
            )
        );
        assert_eq!(err(r#"  "\u12""#).0, 1);
        assert_eq!(err(r#"  "\u12""#).1, 4);
        assert!(err(r#""\1""#).2.starts_with("bad escape \\1"));
        assert!(
            err(r#""\01""#)
                .2
                .starts_with("bad escape: \\0 followed by a digit")
        );
        assert!(err(r#""\ud800x""#).2.contains("high surrogate"));
        assert!(err(r#""\udc00""#).2.contains("low surrogate"));
        assert!(err("{\\x41: 1}").2.contains("only \\uXXXX escapes"));
        assert!(
            err("{\\u0031: 1}")
                .2
                .contains("cannot be part of an unquoted key")
        );
    }

    #[test]
    fn duplicate_keys_are_refused_naming_the_key() {
        assert_eq!(
            err("{\n  port: 1,\n  \"port\": 2\n}"),
            (
                3,
                3,
                "duplicate key \"port\" (first at line 2, column 3); a key may appear once in an object"
                    .into()
            )
        );
        // The same key in different objects is fine.
        assert!(parse("{a: {x: 1}, b: {x: 2}}").is_ok());
    }

    #[test]
    fn trailing_garbage() {
        assert_eq!(
            err("{a: 1}\n}"),
            (
                2,
                1,
                "unexpected '}' after the end of the value; a document holds one value".into()
            )
        );
        assert_eq!(err("{} // fine\n x").0, 2);
    }

    #[test]
    fn nesting_is_bounded_not_a_stack_overflow() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse(&ok).is_ok());
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert_eq!(
            err(&deep),
            (
                1,
                129,
                "objects and arrays are nested more than 128 levels deep".into()
            )
        );
        let bomb = "{a:".repeat(1_000_000);
        assert!(err(&bomb).2.contains("nested more than 128"));
    }

    #[test]
    fn non_finite_numbers_are_refused_with_the_reason() {
        assert_eq!(
            err("{x: +Infinity}"),
            (
                1,
                5,
                "Infinity is not a number JSON can hold; write a finite number instead".into()
            )
        );
        assert!(err("-Infinity").2.starts_with("Infinity is not"));
        assert!(err("[NaN]").2.starts_with("NaN is not"));
        assert!(err("1e400").2.contains("too large"));
        assert!(
            err("0x1_0000_0000_0000_0000")
                .2
                .contains("right after a number")
        );
        assert!(err("0x10000000000000000").2.contains("too large"));
        assert!(err("-0x8000000000000001").2.contains("too large"));
    }

    #[test]
    fn other_syntax_errors_say_what_was_expected() {
        assert_eq!(
            err("").2,
            "the document is empty; expected a value such as {}"
        );
        assert_eq!(
            err("  // only a comment\n").2,
            "the document is empty; expected a value such as {}"
        );
        assert_eq!(
            err("{a 1}").2,
            "expected ':' after the key \"a\", found '1'"
        );
        assert!(err("{a: 1,,}").2.starts_with("expected a key"));
        assert!(err("[1,,2]").2.contains("empty slot"));
        assert!(err("[,]").2.contains("empty slot"));
        assert_eq!(
            err("{\n a: [1,\n"),
            (
                3,
                1,
                "unexpected end of the document: the '[' at line 2, column 5 has no closing ']'"
                    .into()
            )
        );
        assert!(
            err("{a: 1")
                .2
                .contains("the '{' at line 1, column 1 has no closing '}'")
        );
        assert!(err("/* open").2.starts_with("unterminated comment"));
        assert!(err("{a: yes}").2.starts_with("unexpected word 'yes'"));
        assert!(err("{a: 01}").2.contains("leading zeros"));
        assert!(err("{a: 1.2.3}").2.contains("right after a number"));
        assert!(err("{a: 12abc}").2.contains("right after a number"));
        assert!(err("{a: 1e}").2.contains("exponent"));
        assert!(err("{a: .}").2.starts_with("expected digits"));
        assert!(err("{a: -}").2.starts_with("expected digits"));
        assert!(err("{a: @}").2.starts_with("unexpected '@'"));
        assert!(err("{1: 2}").2.starts_with("expected a key"));
    }

    #[test]
    fn columns_count_characters_and_lines_count_breaks() {
        assert_eq!(err("{é: 1 x}").1, 7);
        assert_eq!(err("{\r\n  a: 1\r\n  b: 2}").0, 3);
        assert_eq!(err("{\r\n  a: 1\r\n  b: 2}").1, 3);
        assert_eq!(err("{\ra: 1\rb}").0, 3);
    }

    #[test]
    fn display_is_line_column_message() {
        let e = parse("{a: yes}").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("line 1, column 5: unexpected word 'yes'"),
            "{e}"
        );
    }
}
