//! The transform: a document's token ids -> its framed record, `<s> ids </s>`, as little-endian
//! u16, the byte layout of the shards. Every document of a dataset goes through [`Frame::write`]
//! once (on a tokenizer thread); everything after it only moves these bytes: into a work file,
//! then, in the seeded document order, back to back into the shards.

/// How documents are framed, as recorded in the manifest's `pipeline.config.documents`.
pub const RULE: &str = "<s> + ids + </s>; empty documents skipped";

/// A token id that does not fit a u16 (only a broken tokenizer gives one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdTooLarge(pub u32);

/// The control ids around every document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// `<s>`.
    pub bos: u16,
    /// `</s>`.
    pub eos: u16,
}

impl Frame {
    /// The frame of a tokenizer whose vocabulary fits u16 tokens (the tokenizer checks that on
    /// load, so its control ids fit too).
    pub fn new(bos_id: u32, eos_id: u32) -> Self {
        let fit = |id: u32| u16::try_from(id).expect("control ids fit u16 (vocab is checked)");
        Frame {
            bos: fit(bos_id),
            eos: fit(eos_id),
        }
    }

    /// Tokens of the framed record of a document of `ids` tokens.
    pub fn len(ids: usize) -> usize {
        ids + 2
    }

    /// Appends the framed record of the document `ids` to `out`: `<s>`, the ids, `</s>`, each
    /// a little-endian u16. Nothing is appended when an id does not fit.
    pub fn write(&self, ids: &[u32], out: &mut Vec<u8>) -> Result<(), IdTooLarge> {
        if let Some(&id) = ids.iter().find(|&&id| id > u32::from(u16::MAX)) {
            return Err(IdTooLarge(id));
        }
        out.extend(self.bos.to_le_bytes());
        let at = out.len();
        out.resize(at + 2 * ids.len(), 0);
        for (bytes, &id) in out[at..].chunks_exact_mut(2).zip(ids) {
            bytes.copy_from_slice(&(id as u16).to_le_bytes());
        }
        out.extend(self.eos.to_le_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_ids_between_bos_and_eos_as_little_endian_u16() {
        let frame = Frame::new(1, 2);
        let mut out = vec![9];
        frame.write(&[500, 65535], &mut out).unwrap();
        assert_eq!(out, [9, 1, 0, 0xf4, 0x01, 0xff, 0xff, 2, 0]);
        assert_eq!(Frame::len(2), 4);
        out.clear();
        frame.write(&[], &mut out).unwrap();
        assert_eq!(out, [1, 0, 2, 0], "an empty id list is still framed");
    }

    #[test]
    fn an_id_past_u16_is_refused_and_nothing_is_written() {
        let mut out = Vec::new();
        assert_eq!(
            Frame::new(1, 2).write(&[3, 65536], &mut out),
            Err(IdTooLarge(65536))
        );
        assert!(out.is_empty());
    }
}
