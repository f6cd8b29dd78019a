//! Strict parsing of a JSON body: exactly one JSON object, no unknown fields, nothing after
//! it; a bad body is a 400 naming the offending field.

use http::StatusCode;

use crate::error::ApiError;

/// Parses a JSON body: exactly one JSON object (surrounding whitespace allowed), no unknown
/// fields. A bad body is a 400 naming the field when one is to blame.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(v) => v,
        Err(e) => return Err(deserialize_error(e)),
    };
    // Text after the object would be silently dropped: a client that concatenated two
    // bodies, or a proxy that mangled one, must hear about it.
    de.end().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the body has more after its JSON object (line {}, column {}); send exactly one JSON object",
                e.line(),
                e.column()
            ),
        )
    })?;
    Ok(value)
}

fn deserialize_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let msg = inner.to_string();
    // serde reports an unknown field at the parent's path; name the field itself.
    let field = match msg.strip_prefix("unknown field `") {
        Some(rest) => rest.split('`').next().map(str::to_owned),
        None if !matches!(path.as_str(), "." | "?" | "") => Some(path),
        None => msg
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
            .map(str::to_owned),
    };
    let what = if inner.is_syntax() || inner.is_eof() {
        "the body is not valid JSON"
    } else {
        "the body does not match the schema"
    };
    ApiError {
        field,
        ..ApiError::new(StatusCode::BAD_REQUEST, format!("{what}: {msg}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Txt2ImgRequest;

    #[test]
    fn exactly_one_json_object_is_accepted() {
        let status = |body: &str| {
            parse_json::<Txt2ImgRequest>(body.as_bytes())
                .map(drop)
                .map_err(|e| (e.status.as_u16(), e.message))
        };
        assert_eq!(status(" {\"prompt\":\"a\"}\r\n "), Ok(()));
        for body in [
            r#"{"prompt":"a"} trailing"#,
            r#"{"prompt":"a"}{"prompt":""}"#,
            r#"{"prompt":"a"}]"#,
            "{\"prompt\":\"a\"}\0",
        ] {
            let err = status(body).expect_err(body);
            assert_eq!(err.0, 400, "{body}");
            assert!(
                err.1.starts_with("the body has more after"),
                "{body}: {}",
                err.1
            );
        }
    }

    #[test]
    fn a_number_with_more_digits_than_f64_holds_reads_as_the_nearest_f64() {
        // Correctly rounded parsing, so that the value written back (shortest form) reads as
        // the same number: the request's echo and a resend give the same image.
        let body = br#"{"prompt":"a","guidance_scale":3.0000018446744073709551615001}"#;
        let g = parse_json::<Txt2ImgRequest>(body)
            .ok()
            .and_then(|r| r.guidance_scale);
        assert_eq!(g, "3.0000018446744073709551615001".parse::<f64>().ok());
        let written = serde_json::to_vec(&Txt2ImgRequest {
            guidance_scale: g,
            ..Default::default()
        })
        .unwrap_or_default();
        let again = parse_json::<Txt2ImgRequest>(&written)
            .ok()
            .and_then(|r| r.guidance_scale);
        assert_eq!(again.map(f64::to_bits), g.map(f64::to_bits));
    }
}
