//! A seeded mutator for the hostile-bytes tests: turns a valid file into a damaged or hostile
//! one the way disks and users do (bit flips, truncation, extension, swapped fields, huge length
//! fields, invalid UTF-8). Every output differs from its input, and the same seed gives the same
//! sequence of outputs, so a failure is reproduced from the seed and the iteration alone.

use pipeline::rng::SplitMix64;

/// A fixed-width little-endian integer field of a binary format, where the mutator writes huge
/// or off-by-one lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: usize,
    /// 4 or 8 bytes.
    pub width: usize,
}

/// What the mutator knows about the input besides its bytes.
#[derive(Debug, Clone, Default)]
pub struct Shape {
    /// Text (JSON, TOML): mutations also work on digit runs and lines.
    pub text: bool,
    /// Known integer fields (header counts, offsets, lengths).
    pub fields: Vec<Field>,
}

/// The kind of change, for the per-kind counts and failure messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    BitFlips,
    Bytes,
    Truncate,
    Extend,
    Delete,
    Duplicate,
    Swap,
    HugeLength,
    InvalidUtf8,
    Number,
    SwapLines,
}

/// Values a length or count field is set to: zero, off by one, sign bits, and sizes no file has.
const HUGE: [u64; 9] = [
    0,
    1,
    u32::MAX as u64,
    1 << 31,
    1 << 32,
    1 << 40,
    u64::MAX,
    u64::MAX / 2,
    i64::MAX as u64 + 1,
];

/// Numbers written over a digit run of a text file.
const HUGE_TEXT: [&str; 10] = [
    "18446744073709551615",
    "18446744073709551616",
    "4294967296",
    "99999999999999999999999999",
    "-1",
    "-9223372036854775809",
    "0",
    "1e308",
    "1e999",
    "NaN",
];

/// Byte sequences that are not UTF-8: a lone continuation byte, an overlong encoding, a UTF-16
/// surrogate, a code point past U+10FFFF, a cut-off sequence, 0xFF.
const NOT_UTF8: [&[u8]; 6] = [
    &[0x80],
    &[0xc0, 0x80],
    &[0xed, 0xa0, 0x80],
    &[0xf4, 0x90, 0x80, 0x80],
    &[0xe2, 0x82],
    &[0xff],
];

#[derive(Debug, Clone)]
pub struct Mutator {
    rng: SplitMix64,
}

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Mutator {
            rng: SplitMix64::new(seed),
        }
    }

    fn below(&mut self, n: usize) -> usize {
        self.rng.below(n as u64) as usize
    }

    /// A damaged copy of `input` (never equal to it) and the kind of damage.
    pub fn mutate(&mut self, input: &[u8], shape: &Shape) -> (Vec<u8>, Kind) {
        loop {
            let kinds: &[Kind] = if shape.text {
                &[
                    Kind::BitFlips,
                    Kind::Bytes,
                    Kind::Truncate,
                    Kind::Extend,
                    Kind::Delete,
                    Kind::Duplicate,
                    Kind::Swap,
                    Kind::InvalidUtf8,
                    Kind::Number,
                    Kind::Number,
                    Kind::SwapLines,
                ]
            } else {
                &[
                    Kind::BitFlips,
                    Kind::BitFlips,
                    Kind::Bytes,
                    Kind::Truncate,
                    Kind::Extend,
                    Kind::Delete,
                    Kind::Duplicate,
                    Kind::Swap,
                    Kind::HugeLength,
                    Kind::HugeLength,
                    Kind::InvalidUtf8,
                ]
            };
            let kind = kinds[self.below(kinds.len())];
            let out = self.apply(kind, input, shape);
            if out != input {
                return (out, kind);
            }
        }
    }

    fn apply(&mut self, kind: Kind, input: &[u8], shape: &Shape) -> Vec<u8> {
        let mut b = input.to_vec();
        let len = b.len();
        if len == 0 {
            return vec![self.rng.next_u64() as u8];
        }
        match kind {
            Kind::BitFlips => {
                // Mostly one flip (the common disk fault), sometimes a burst.
                let n = if self.below(4) == 0 {
                    1 + self.below(8)
                } else {
                    1
                };
                for _ in 0..n {
                    let i = self.below(len);
                    b[i] ^= 1 << self.below(8);
                }
            }
            Kind::Bytes => {
                let n = 1 + self.below(4);
                for _ in 0..n {
                    let i = self.below(len);
                    b[i] = [0x00, 0xff, 0x7f, 0x80, b' ', b'"', b'\n', b'0'][self.below(8)];
                }
            }
            Kind::Truncate => {
                // Near the end (a short write) as often as anywhere.
                let keep = if self.below(2) == 0 {
                    len.saturating_sub(1 + self.below(64.min(len)))
                } else {
                    self.below(len)
                };
                b.truncate(keep);
            }
            Kind::Extend => {
                let n = 1 + self.below(64);
                match self.below(3) {
                    0 => b.extend(std::iter::repeat_n(0u8, n)),
                    1 => b.extend((0..n).map(|_| self.rng.next_u64() as u8)),
                    _ => {
                        let at = self.below(len);
                        let end = (at + n).min(len);
                        b.extend_from_within(at..end);
                    }
                }
            }
            Kind::Delete => {
                let at = self.below(len);
                let n = (1 + self.below(16)).min(len - at);
                b.drain(at..at + n);
            }
            Kind::Duplicate => {
                let at = self.below(len);
                let n = (1 + self.below(16)).min(len - at);
                let copy = b[at..at + n].to_vec();
                b.splice(at..at, copy);
            }
            Kind::Swap => {
                // Two equal-length ranges trade places: swapped fields, swapped records.
                let n = 1 + self.below(16.min(len / 2).max(1));
                if len >= 2 * n {
                    let x = self.below(len - 2 * n + 1);
                    let y = x + n + self.below(len - x - 2 * n + 1);
                    for k in 0..n {
                        b.swap(x + k, y + k);
                    }
                }
            }
            Kind::HugeLength => {
                let f = if !shape.fields.is_empty() && self.below(4) != 0 {
                    shape.fields[self.below(shape.fields.len())]
                } else {
                    let width = [4, 8][self.below(2)];
                    Field {
                        offset: self.below(len.saturating_sub(width) + 1) / width * width,
                        width,
                    }
                };
                let mut v = HUGE[self.below(HUGE.len())];
                if self.below(3) == 0 {
                    // Off by a little from the true value, or the file size.
                    let old = read_le(&b, f).unwrap_or(len as u64);
                    v = old.wrapping_add([1, u64::MAX, 8, len as u64][self.below(4)]);
                }
                write_le(&mut b, f, v);
            }
            Kind::InvalidUtf8 => {
                let bad = NOT_UTF8[self.below(NOT_UTF8.len())];
                let at = self.below(len);
                if self.below(2) == 0 {
                    b.splice(at..at, bad.iter().copied());
                } else {
                    let end = (at + bad.len()).min(len);
                    b.splice(at..end, bad.iter().copied());
                }
            }
            Kind::Number => {
                let mut runs = digit_runs(&b);
                // Half the time a number in value position (`": 12`, `= 12`): counts and sizes,
                // rather than digits inside hashes and names.
                let values: Vec<(usize, usize)> = runs
                    .iter()
                    .copied()
                    .filter(|&(s, _)| s >= 2 && matches!(&b[s - 2..s], b": " | b"= "))
                    .collect();
                if !values.is_empty() && self.below(2) == 0 {
                    runs = values;
                }
                if runs.is_empty() {
                    return self.apply(Kind::BitFlips, input, shape);
                }
                let (s, e) = runs[self.below(runs.len())];
                let with = HUGE_TEXT[self.below(HUGE_TEXT.len())];
                b.splice(s..e, with.bytes());
            }
            Kind::SwapLines => {
                let lines: Vec<&[u8]> = input.split_inclusive(|&c| c == b'\n').collect();
                if lines.len() < 2 {
                    return self.apply(Kind::Swap, input, shape);
                }
                let (x, y) = (self.below(lines.len()), self.below(lines.len()));
                let mut order: Vec<usize> = (0..lines.len()).collect();
                order.swap(x, y);
                b = order
                    .iter()
                    .flat_map(|&i| lines[i].iter().copied())
                    .collect();
            }
        }
        b
    }
}

fn read_le(b: &[u8], f: Field) -> Option<u64> {
    let s = b.get(f.offset..f.offset + f.width)?;
    let mut w = [0u8; 8];
    w[..f.width].copy_from_slice(s);
    Some(u64::from_le_bytes(w))
}

fn write_le(b: &mut Vec<u8>, f: Field, v: u64) {
    if b.len() < f.offset + f.width {
        b.resize(f.offset + f.width, 0);
    }
    b[f.offset..f.offset + f.width].copy_from_slice(&v.to_le_bytes()[..f.width]);
}

/// `(start, end)` of every run of ASCII digits.
fn digit_runs(b: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let s = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            runs.push((s, i));
        } else {
            i += 1;
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_differ_from_the_input_and_repeat_with_the_seed() {
        let input = br#"{"a": 12, "b": [1, 2, 3]}
x = 5
"#;
        let shape = Shape {
            text: true,
            fields: Vec::new(),
        };
        let (mut m1, mut m2) = (Mutator::new(7), Mutator::new(7));
        let mut kinds = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            let (a, k) = m1.mutate(input, &shape);
            assert_ne!(a, input.as_slice());
            assert_eq!((a, k), m2.mutate(input, &shape));
            kinds.insert(k);
        }
        assert!(!kinds.contains(&Kind::HugeLength), "text has no fields");
        assert_eq!(kinds.len(), 10, "{kinds:?}");
    }

    #[test]
    fn huge_lengths_land_on_the_named_fields() {
        let input = [0u8; 64];
        let shape = Shape {
            text: false,
            fields: vec![Field {
                offset: 16,
                width: 8,
            }],
        };
        let mut m = Mutator::new(1);
        let hits = (0..400)
            .map(|_| m.mutate(&input, &shape))
            .filter(|(b, k)| *k == Kind::HugeLength && b.len() == 64 && b[16..24] != [0; 8])
            .count();
        assert!(hits > 40, "{hits}");
    }
}
