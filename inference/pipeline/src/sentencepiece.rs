//! Reads the parts of a sentencepiece `ModelProto` (`spiece.model`) a unigram tokenizer needs:
//! pieces with scores and types, the unknown id and the precompiled normaliser.

/// One vocabulary entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The piece text (`▁` marks a word start).
    pub piece: String,
    /// Log-probability.
    pub score: f32,
    /// 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
    pub kind: u64,
}

/// The decoded model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelProto {
    /// Vocabulary in id order.
    pub pieces: Vec<Piece>,
    /// Id of the unknown piece.
    pub unk_id: u64,
    /// The normaliser's compiled character map (empty for identity).
    pub precompiled_charsmap: Vec<u8>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

enum Field<'a> {
    Varint(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
    Other,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or("truncated field")?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Field::Other
            }
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|e| e.to_string())?;
                Field::Bytes(self.take(n)?)
            }
            5 => {
                let b = self.take(4)?;
                Field::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            w => return Err(format!("unsupported wire type {w}")),
        };
        Ok(Some((key >> 3, field)))
    }
}

impl ModelProto {
    /// Decodes a serialized `ModelProto`.
    pub fn parse(buf: &[u8]) -> Result<Self, String> {
        let mut model = Self::default();
        let mut r = Reader { buf, pos: 0 };
        while let Some((num, field)) = r.next()? {
            match (num, field) {
                (1, Field::Bytes(b)) => model.pieces.push(parse_piece(b)?),
                (2, Field::Bytes(b)) => {
                    let mut t = Reader { buf: b, pos: 0 };
                    while let Some((n, f)) = t.next()? {
                        if let (40, Field::Varint(v)) = (n, f) {
                            model.unk_id = v;
                        }
                    }
                }
                (3, Field::Bytes(b)) => {
                    let mut t = Reader { buf: b, pos: 0 };
                    while let Some((n, f)) = t.next()? {
                        if let (2, Field::Bytes(c)) = (n, f) {
                            model.precompiled_charsmap = c.to_vec();
                        }
                    }
                }
                _ => {}
            }
        }
        if model.pieces.is_empty() {
            return Err("no pieces: not a sentencepiece model".into());
        }
        Ok(model)
    }
}

fn parse_piece(b: &[u8]) -> Result<Piece, String> {
    let mut p = Piece {
        piece: String::new(),
        score: 0.0,
        kind: 1,
    };
    let mut r = Reader { buf: b, pos: 0 };
    while let Some((n, f)) = r.next()? {
        match (n, f) {
            (1, Field::Bytes(s)) => {
                p.piece = String::from_utf8(s.to_vec()).map_err(|e| e.to_string())?
            }
            (2, Field::Fixed32(v)) => p.score = f32::from_bits(v),
            (3, Field::Varint(v)) => p.kind = v,
            _ => {}
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::ModelProto;

    #[test]
    fn rejects_what_is_not_a_model() {
        assert!(ModelProto::parse(b"").is_err());
        assert!(ModelProto::parse(&[0x0a, 0xff]).is_err());
    }

    #[test]
    fn reads_pieces_scores_and_types() {
        // pieces { piece: "<unk>" score: 0 type: UNKNOWN } pieces { piece: "a" score: -1.5 }
        let mut buf = vec![0x0a, 0x0e, 0x0a, 0x05];
        buf.extend_from_slice(b"<unk>");
        buf.extend_from_slice(&[0x15, 0, 0, 0, 0, 0x18, 0x02]);
        buf.extend_from_slice(&[0x0a, 0x08, 0x0a, 0x01, b'a', 0x15]);
        buf.extend_from_slice(&(-1.5f32).to_le_bytes());
        let m = ModelProto::parse(&buf).unwrap();
        assert_eq!(m.pieces.len(), 2);
        assert_eq!((m.pieces[0].piece.as_str(), m.pieces[0].kind), ("<unk>", 2));
        assert_eq!((m.pieces[1].piece.as_str(), m.pieces[1].score), ("a", -1.5));
    }
}
