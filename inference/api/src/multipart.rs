//! A strict `multipart/form-data` parser (RFC 7578 over RFC 2046) for the bodies of
//! `POST /v1/images/edits`, over a body already read whole (its size is bounded by the
//! server's `--max-upload-bytes`).
//!
//! Guarantees: every answer is either the parts, in order, each borrowing its data from the
//! body, or a 400 (a 415 for a body that is not `multipart/form-data`) saying what is wrong and,
//! when one part is to blame, naming it; at most [`MAX_PARTS`] parts with at most
//! [`MAX_PART_HEAD_BYTES`] of headers each; a part without a `form-data` disposition and a
//! name, a field sent twice, or a body that ends before its closing delimiter is refused. The
//! work is linear in the body's length.

use http::StatusCode;

use crate::error::ApiError;

/// Most parts a body may have.
pub const MAX_PARTS: usize = 64;
/// Most bytes of headers one part may have.
pub const MAX_PART_HEAD_BYTES: usize = 8 * 1024;
/// Longest boundary RFC 2046 allows.
const MAX_BOUNDARY: usize = 70;

/// One part of a `multipart/form-data` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part<'a> {
    /// The form field's name (`Content-Disposition: form-data; name="..."`).
    pub name: String,
    /// The file name, for a file.
    pub filename: Option<String>,
    /// The part's `Content-Type`, when it has one.
    pub content_type: Option<String>,
    /// The part's bytes.
    pub data: &'a [u8],
}

impl Part<'_> {
    /// The part's data as text (a 400 naming the field when it is not UTF-8).
    pub fn text(&self) -> Result<&str, ApiError> {
        std::str::from_utf8(self.data).map_err(|_| {
            ApiError::new(StatusCode::BAD_REQUEST, "is not UTF-8 text").with_field(&self.name)
        })
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

/// The boundary of a `Content-Type: multipart/form-data; boundary=...` header value; anything
/// else is a 415, a missing or malformed boundary a 400.
pub fn boundary(content_type: &str) -> Result<String, ApiError> {
    let mut params = content_type.split(';');
    let mime = params.next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the body as `Content-Type: multipart/form-data` (a form with the image file)",
        ));
    }
    let mut found = None;
    for p in params {
        let Some((k, v)) = p.split_once('=') else {
            continue;
        };
        if k.trim().eq_ignore_ascii_case("boundary") {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            found = Some(v.to_owned());
        }
    }
    let Some(b) = found else {
        return Err(bad(
            "the multipart/form-data Content-Type has no boundary parameter",
        ));
    };
    // RFC 2046: 1 to 70 characters of bchars, not ending in a space.
    let bchar = |c: char| c.is_ascii_alphanumeric() || "'()+_,-./:=? ".contains(c);
    if b.is_empty() || b.len() > MAX_BOUNDARY || !b.chars().all(bchar) || b.ends_with(' ') {
        return Err(bad(format!(
            "the multipart boundary `{}` is not 1 to 70 of the characters RFC 2046 allows",
            b.escape_debug()
        )));
    }
    Ok(b)
}

/// The position of `needle` in `hay` at or after `from`.
fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let first = *needle.first()?;
    let mut at = from;
    while at + needle.len() <= hay.len() {
        let rel = hay[at..=hay.len() - needle.len()]
            .iter()
            .position(|&b| b == first)?;
        let i = at + rel;
        if &hay[i..i + needle.len()] == needle {
            return Some(i);
        }
        at = i + 1;
    }
    None
}

/// Skips the transport padding (spaces and tabs) RFC 2046 allows after a delimiter.
fn skip_padding(body: &[u8], mut at: usize) -> usize {
    while at < body.len() && (body[at] == b' ' || body[at] == b'\t') {
        at += 1;
    }
    at
}

/// Parses a body whose `Content-Type` has the given boundary.
pub fn parse<'a>(boundary: &str, body: &'a [u8]) -> Result<Vec<Part<'a>>, ApiError> {
    let dash: Vec<u8> = [b"--".as_slice(), boundary.as_bytes()].concat();
    let delimiter: Vec<u8> = [b"\r\n".as_slice(), &dash].concat();
    // The first delimiter opens the body or follows a preamble and CRLF.
    let mut at = if body.starts_with(&dash) {
        dash.len()
    } else {
        find(body, &delimiter, 0)
            .map(|i| i + delimiter.len())
            .ok_or_else(|| bad("the body has no multipart boundary line: is it a form?"))?
    };
    let mut parts: Vec<Part<'a>> = Vec::new();
    loop {
        // After a delimiter: `--` closes the body, else padding and CRLF open a part.
        if body[at..].starts_with(b"--") {
            return Ok(parts);
        }
        at = skip_padding(body, at);
        if !body[at..].starts_with(b"\r\n") {
            return Err(bad(
                "a multipart boundary line is not followed by a line break",
            ));
        }
        at += 2;
        if parts.len() == MAX_PARTS {
            return Err(bad(format!("the form has more than {MAX_PARTS} parts")));
        }
        let (head, data_start) = if body[at..].starts_with(b"\r\n") {
            // A part with no headers: refused below for want of a name.
            ("", at + 2)
        } else {
            let window = &body[at..body.len().min(at + MAX_PART_HEAD_BYTES + 4)];
            let end = find(window, b"\r\n\r\n", 0).ok_or_else(|| {
                bad(format!(
                    "part {} has no end of headers within {MAX_PART_HEAD_BYTES} bytes",
                    parts.len() + 1
                ))
            })?;
            let head = std::str::from_utf8(&window[..end])
                .map_err(|_| bad("a part's headers are not UTF-8"))?;
            (head, at + end + 4)
        };
        let (name, filename, content_type) = part_headers(head, parts.len() + 1)?;
        let end = find(body, &delimiter, data_start).ok_or_else(|| {
            bad(format!(
                "the body ends inside the part `{name}`: its closing boundary is missing \
                 (was the upload cut short?)"
            ))
            .with_field(&name)
        })?;
        if parts.iter().any(|p| p.name == name) {
            return Err(bad("is sent more than once").with_field(&name));
        }
        parts.push(Part {
            name,
            filename,
            content_type,
            data: &body[data_start..end],
        });
        at = end + delimiter.len();
    }
}

/// The name, file name and content type from a part's headers.
fn part_headers(
    head: &str,
    index: usize,
) -> Result<(String, Option<String>, Option<String>), ApiError> {
    let (mut disposition, mut content_type) = (None, None);
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        let Some((k, v)) = line.split_once(':') else {
            return Err(bad(format!(
                "part {index} has a header line without a colon: `{}`",
                line.escape_debug()
            )));
        };
        let k = k.trim();
        if k.eq_ignore_ascii_case("content-disposition") {
            disposition = Some(v.trim());
        } else if k.eq_ignore_ascii_case("content-type") {
            content_type = Some(v.trim().to_owned());
        }
    }
    let disposition = disposition.ok_or_else(|| {
        bad(format!(
            "part {index} has no Content-Disposition: form-data header"
        ))
    })?;
    let params = disposition_params(disposition).ok_or_else(|| {
        bad(format!(
            "part {index}'s Content-Disposition is not `form-data; name=\"...\"`: `{}`",
            disposition.escape_debug()
        ))
    })?;
    let mut name = None;
    let mut filename = None;
    for (k, v) in params {
        match k.to_ascii_lowercase().as_str() {
            "name" => name = Some(v),
            "filename" => filename = Some(v),
            // RFC 5987's `filename*`: the file name is informative only; the plain one is
            // what clients send for forms (RFC 7578 §4.2).
            _ => {}
        }
    }
    let name = name
        .filter(|n| !n.is_empty())
        .ok_or_else(|| bad(format!("part {index} has no field name")))?;
    Ok((name, filename, content_type))
}

/// `form-data; k1="v1"; k2=v2` as its parameters (quoted strings unescaped); `None` when the
/// disposition is not `form-data` or a parameter is malformed.
fn disposition_params(text: &str) -> Option<Vec<(String, String)>> {
    let (kind, mut rest) = match text.split_once(';') {
        Some((k, r)) => (k, r),
        None => (text, ""),
    };
    if !kind.trim().eq_ignore_ascii_case("form-data") {
        return None;
    }
    let mut out = Vec::new();
    loop {
        rest = rest.trim_start_matches([' ', '\t', ';']);
        if rest.is_empty() {
            return Some(out);
        }
        let (key, after) = rest.split_once('=')?;
        let key = key.trim();
        if key.is_empty() || key.contains([' ', '"']) {
            return None;
        }
        let after = after.trim_start();
        if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => value.push(chars.next()?.1),
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    _ => value.push(c),
                }
            }
            out.push((key.to_owned(), value));
            rest = &quoted[end?..];
            if !(rest.is_empty() || rest.trim_start().starts_with(';')) {
                return None;
            }
        } else {
            let (value, tail) = after.split_once(';').unwrap_or((after, ""));
            out.push((key.to_owned(), value.trim().to_owned()));
            rest = tail;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut out = b"preamble to ignore\r\n".to_vec();
        for (name, file, data) in parts {
            out.extend_from_slice(b"--XyZ\r\n");
            match file {
                Some(f) => out.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                         Content-Type: image/png\r\n\r\n"
                    )
                    .as_bytes(),
                ),
                None => out.extend_from_slice(
                    format!("content-disposition: form-data; name={name}\r\n\r\n").as_bytes(),
                ),
            }
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"--XyZ--\r\nepilogue");
        out
    }

    #[test]
    fn a_form_parses_into_its_parts() {
        let b = body(&[
            ("prompt", None, b"a cat"),
            ("image", Some("a \\\"b\\\".png"), b"\x89PNG\r\n--XY\r\n-"),
            ("n", None, b""),
        ]);
        let parts = parse("XyZ", &b).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parts.len(), 3);
        assert_eq!(
            (parts[0].name.as_str(), parts[0].text().ok()),
            ("prompt", Some("a cat"))
        );
        assert_eq!(parts[1].filename.as_deref(), Some("a \"b\".png"));
        assert_eq!(parts[1].content_type.as_deref(), Some("image/png"));
        assert_eq!(parts[1].data, b"\x89PNG\r\n--XY\r\n-");
        assert_eq!(parts[2].data, b"");
    }

    #[test]
    fn the_content_type_must_be_a_form_with_a_boundary() {
        assert_eq!(
            boundary("multipart/form-data; boundary=\"a b\"").ok(),
            Some("a b".into())
        );
        assert_eq!(
            boundary("Multipart/Form-Data;charset=utf-8;BOUNDARY=x").ok(),
            Some("x".into())
        );
        let status = |ct: &str| boundary(ct).map_err(|e| e.status.as_u16()).err();
        assert_eq!(status("application/json"), Some(415));
        assert_eq!(status("multipart/form-data"), Some(400));
        assert_eq!(
            status(&format!("multipart/form-data; boundary={}", "x".repeat(71))),
            Some(400)
        );
    }

    #[test]
    fn bad_forms_are_400s_that_say_why() {
        let whole = body(&[("prompt", None, b"a"), ("image", Some("i.png"), b"data")]);
        for (bytes, field) in [
            (&whole[..whole.len() - 20], Some("image")),
            (b"no boundary here".as_slice(), None),
            (
                b"--XyZ\r\nContent-Type: text/plain\r\n\r\nx\r\n--XyZ--".as_slice(),
                None,
            ),
            (
                b"--XyZ\r\nContent-Disposition: attachment; name=a\r\n\r\nx\r\n--XyZ--".as_slice(),
                None,
            ),
            (
                b"--XyZ\r\nContent-Disposition: form-data; name=\"a\r\n\r\nx\r\n--XyZ--".as_slice(),
                None,
            ),
            (
                b"--XyZ\r\nContent-Disposition: form-data\r\n\r\nx\r\n--XyZ--".as_slice(),
                None,
            ),
        ] {
            let e = parse("XyZ", bytes).expect_err(&String::from_utf8_lossy(bytes));
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.field.as_deref(), field, "{}", e.message);
        }
        let twice = body(&[("n", None, b"1"), ("n", None, b"2")]);
        assert_eq!(
            parse("XyZ", &twice).err().and_then(|e| e.field),
            Some("n".into())
        );
        let many: Vec<(String, Option<&str>, &[u8])> = (0..=MAX_PARTS)
            .map(|i| (format!("f{i}"), None, b"x".as_slice()))
            .collect();
        let refs: Vec<(&str, Option<&str>, &[u8])> =
            many.iter().map(|(n, f, d)| (n.as_str(), *f, *d)).collect();
        assert!(parse("XyZ", &body(&refs)).is_err());
    }
}
