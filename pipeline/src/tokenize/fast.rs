//! The fast LLaMA-2 encoder: the same ids as Hugging Face `tokenizers` with
//! special-token matching off, at many times its speed, by cutting each document into chunks that
//! no merge can cross and caching the ids of repeated chunks.
//!
//! # What the reference does
//! The LLaMA-2 `tokenizer.json` normalizes with `Prepend("▁")` (only when the text is non-empty)
//! then `Replace(" " -> "▁")`, has no pre-tokenizer, and runs BPE on the whole normalized document
//! as ONE word (`models/bpe/model.rs`, `BPE::merge_word`): each character is a symbol when it is
//! in the vocabulary, otherwise its UTF-8 bytes become `<0xXX>` symbols (byte fallback; `<unk>`
//! only if a byte token were missing, and `fuse_unk` only joins such `<unk>`s); then merges
//! apply lowest rank first, leftmost on ties (`bpe`). Since the document is one word, the
//! reference's word cache never hits and the merge heap spans the whole document.
//!
//! # Why chunking is exact
//! Call a symbol's *span* the normalized text it covers. [`FastTokenizer::from_json`] checks:
//! - (A) every byte `0x00..=0xFF` has its `<0xXX>` token, so no `<unk>` ever appears;
//! - (B) no merge has a byte token as an operand, so byte-fallback symbols never merge;
//! - (C) no merge result contains a character other than `▁` followed by `▁`;
//! - (D) no two vocabulary strings share an id, so an id names one token string;
//! - (E) (not needed for exactness) every added token is in the vocabulary, so `tokenizers`
//!   gives it its vocabulary id, and the vocabulary alone answers [`FastTokenizer::token_to_id`]
//!   and [`FastTokenizer::vocab_size`] as `tokenizers` would: the reference need not be loaded.
//!
//! By (B), every symbol that is not a byte-fallback byte is either one vocabulary character or a
//! merge of two such symbols, so by induction (and (D)) its token string equals its span. Now take a cut
//! of the normalized text just before a `▁` whose preceding character is not `▁`. A pair
//! straddling the cut has a left span ending in that character x and a right span starting with
//! `▁`. If either side is a fallback byte, (B) says the pair never merges. Otherwise the merge
//! would produce a token containing `x▁`, which (C) says no merge produces: the pair is not in
//! the merge table, so it never enters the heap. Likewise a cut on either side of a character
//! that is not in the vocabulary (here: ASCII control characters such as `\n` and `\t`, which
//! become `<0xXX>` tokens) is never crossed, by (B).
//!
//! A pair that never merges separates the document into parts whose merges do not interact: a
//! merge only reads and changes its two adjacent symbols, and the reference always merges the
//! globally minimal `(rank, position)` pair, so restricted to one part it merges that part's
//! minimal pair, which is exactly what encoding the part alone does. Symbol creation is per
//! character and (A) rules out `<unk>` fusion across characters. Hence the ids of the document
//! are the concatenation of the ids of its chunks, and a chunk's ids depend only on its text,
//! which makes caching them exact. The checks run on every load; a `tokenizer.json` that fails
//! one is refused ([`FastError::Unsupported`]) and the caller keeps the plain encoder.
//!
//! # Cache
//! Per thread (`ChunkCache`), keyed by the chunk's original text (a space and a literal `▁`
//! normalize alike, so keying by the original is finer than needed, never wrong). Only chunks of
//! at most [`MAX_CACHED_CHUNK_BYTES`] bytes are cached; the whole cache is dropped when it holds
//! [`CACHE_ENTRIES`] chunks or [`CACHE_ARENA_BYTES`] bytes of records, which bounds it at 5 MiB
//! per thread (a 1 MiB table of 2^17 slots plus the 4 MiB arena), whatever the input.

mod bpe;

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;

/// Chunks longer than this (in bytes, including the leading spaces) are encoded without cache.
pub const MAX_CACHED_CHUNK_BYTES: usize = 32;
/// The per-thread cache is cleared when it holds this many chunks...
pub const CACHE_ENTRIES: usize = 1 << 16;
/// ... or its records (chunk text and ids) reach this many bytes.
pub const CACHE_ARENA_BYTES: usize = 4 << 20;

/// Why a `tokenizer.json` cannot use the fast encoder.
#[derive(Debug, thiserror::Error)]
pub enum FastError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("tokenizer.json does not parse: {0}")]
    Json(#[from] serde_json::Error),
    /// The file is valid but outside what the fast encoder proves exact.
    #[error(
        "tokenizer.json {field}: {why}; hint: the fast encoder only handles LLaMA-2-style BPE, use the plain `tokenizers` encoder (--tokenizer-impl reference)"
    )]
    Unsupported { field: &'static str, why: String },
}

fn unsupported(field: &'static str, why: impl Into<String>) -> FastError {
    FastError::Unsupported {
        field,
        why: why.into(),
    }
}

/// One merge: its rank (index in the merge list) and the id of the merged token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Merge {
    rank: u32,
    new_id: u32,
}

/// `(left id, right id) -> merge`, as `tokenizers`' `MergeMap`, packed for speed: cache misses
/// on this table are most of the cost of a BPE merge loop, so each entry is one u64
/// (`left | right | rank | new id`, bit widths from the vocabulary: 15 + 15 + 16 + 15 = 61 bits
/// for LLaMA-2) in an open-addressing table at most half full (1 MiB for LLaMA-2's merges,
/// against 2 MiB plus control bytes for a general hash map).
struct MergeMap {
    table: Vec<u64>,
    /// `64 - log2(table.len())`: the hash keeps the multiply's top bits.
    shift: u32,
    id_bits: u32,
    rank_bits: u32,
    len: usize,
}

/// Never a valid entry: valid ones use at most 63 bits.
const EMPTY: u64 = u64::MAX;

impl MergeMap {
    /// Packs `merges`; `None` when ids and ranks do not fit 63 bits (then the caller refuses).
    fn new(merges: &FoldMap<(u32, u32), Merge>) -> Option<Self> {
        let bits = |max: u32| 32 - max.leading_zeros();
        let max_id = merges
            .iter()
            .map(|(&(a, b), m)| a.max(b).max(m.new_id))
            .max()
            .unwrap_or(0);
        let max_rank = merges.values().map(|m| m.rank).max().unwrap_or(0);
        let (id_bits, rank_bits) = (bits(max_id).max(1), bits(max_rank).max(1));
        if 3 * id_bits + rank_bits > 63 {
            return None;
        }
        let size = (2 * merges.len()).next_power_of_two().max(16);
        let mut map = MergeMap {
            table: vec![EMPTY; size],
            shift: 64 - size.trailing_zeros(),
            id_bits,
            rank_bits,
            len: merges.len(),
        };
        for (&(a, b), m) in merges {
            let key = map.key(a, b);
            let mut i = map.slot(key);
            while map.table[i] != EMPTY {
                i = (i + 1) & (size - 1);
            }
            map.table[i] = (key << (rank_bits + id_bits))
                | (u64::from(m.rank) << id_bits)
                | u64::from(m.new_id);
        }
        Some(map)
    }

    #[inline]
    fn key(&self, a: u32, b: u32) -> u64 {
        (u64::from(a) << self.id_bits) | u64::from(b)
    }

    #[inline]
    fn slot(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    #[inline]
    fn get(&self, a: u32, b: u32) -> Option<Merge> {
        if (a | b) >> self.id_bits != 0 {
            return None;
        }
        let key = self.key(a, b);
        let mask = self.table.len() - 1;
        let mut i = self.slot(key);
        loop {
            let e = self.table[i];
            if e == EMPTY {
                return None;
            }
            if e >> (self.rank_bits + self.id_bits) == key {
                let low = |bits: u32, x: u64| (x & ((1u64 << bits) - 1)) as u32;
                return Some(Merge {
                    rank: low(self.rank_bits, e >> self.id_bits),
                    new_id: low(self.id_bits, e),
                });
            }
            i = (i + 1) & mask;
        }
    }
}

/// How the chunker treats a byte of the original text.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ByteClass {
    Plain,
    /// `' '`: becomes `▁`.
    Space,
    /// `0xE2`: may start a literal `▁` (E2 96 81).
    MaybeMeta,
    /// An ASCII character missing from the vocabulary: always its own chunk (proof above).
    Isolated,
}

/// The fast encoder. Cheap to share between threads; each thread keeps its own chunk cache.
pub struct FastTokenizer {
    /// Ids of the ASCII characters (`u32::MAX`: not in the vocabulary).
    ascii_ids: [u32; 128],
    /// Ids of the other single characters in the vocabulary.
    char_ids: FoldMap<char, u32>,
    /// `<0xXX>` ids.
    byte_ids: [u32; 256],
    merges: MergeMap,
    classes: [ByteClass; 256],
    vocab: FoldMap<Box<str>, u32>,
    /// Distinguishes this tokenizer's entries in the thread-local caches from another's.
    instance: u64,
}

impl std::fmt::Debug for FastTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastTokenizer")
            .field("merges", &self.merges.len)
            .finish_non_exhaustive()
    }
}

/// The parts of tokenizer.json the checks read. Token strings borrow from the file's bytes
/// where they have no escapes (`Tok`), so a load allocates for the tables it builds, not for
/// each of the 32,000 tokens and 61,000 merges it reads.
#[derive(Deserialize)]
struct TokenizerJson<'a> {
    #[serde(default)]
    truncation: serde_json::Value,
    #[serde(default)]
    padding: serde_json::Value,
    #[serde(default, borrow)]
    added_tokens: Vec<AddedToken<'a>>,
    #[serde(default)]
    normalizer: serde_json::Value,
    #[serde(default)]
    pre_tokenizer: serde_json::Value,
    #[serde(borrow)]
    model: ModelJson<'a>,
}

#[derive(Deserialize)]
struct AddedToken<'a> {
    #[serde(borrow)]
    content: Tok<'a>,
    special: bool,
}

#[derive(Deserialize)]
struct ModelJson<'a> {
    #[serde(rename = "type")]
    kind: Option<String>,
    dropout: Option<f64>,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    byte_fallback: Option<bool>,
    ignore_merges: Option<bool>,
    #[serde(borrow)]
    vocab: FoldMap<Tok<'a>, u32>,
    #[serde(borrow)]
    merges: Vec<MergeJson<'a>>,
}

type FoldMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FoldSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// A JSON string, borrowed unless it had escapes.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Tok<'a>(Cow<'a, str>);

impl std::borrow::Borrow<str> for Tok<'_> {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Tok<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Tok<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Tok(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Tok(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// One merge in either spelling `tokenizers` reads: `"a b"` or `["a", "b"]`. (Read without
/// `#[serde(untagged)]`, which would buffer each merge as a generic value first.)
enum MergeJson<'a> {
    Pair(Tok<'a>, Tok<'a>),
    Legacy(Tok<'a>),
}

impl<'de: 'a, 'a> Deserialize<'de> for MergeJson<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = MergeJson<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(r#"a merge, "a b" or ["a", "b"]"#)
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(MergeJson::Legacy(Tok(Cow::Borrowed(v))))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(MergeJson::Legacy(Tok(Cow::Owned(v.to_owned()))))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                use serde::de::Error;
                let a = seq
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(0, &self))?;
                let b = seq
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(1, &self))?;
                if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    return Err(A::Error::invalid_length(3, &self));
                }
                Ok(MergeJson::Pair(a, b))
            }
        }
        d.deserialize_any(V)
    }
}

const META: char = '▁';

impl FastTokenizer {
    /// Loads `path` (a `tokenizer.json`) and checks that the fast encoder is exact for it.
    pub fn from_file(path: &Path) -> Result<Self, FastError> {
        let bytes = std::fs::read(path).map_err(|source| FastError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&bytes)
    }

    /// Parses tokenizer.json bytes and runs the checks (A), (B), (C) of the module doc, plus
    /// that the pipeline around the model is the LLaMA-2 one (normalizer, no pre-tokenizer, no
    /// truncation, only special added tokens, which `set_encode_special_tokens(true)` ignores).
    pub fn from_json(bytes: &[u8]) -> Result<Self, FastError> {
        let json: TokenizerJson = serde_json::from_slice(bytes)?;
        if !json.truncation.is_null() || !json.padding.is_null() {
            return Err(unsupported("truncation/padding", "must be null"));
        }
        let expected_normalizer = serde_json::json!({
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
            ]
        });
        if json.normalizer != expected_normalizer {
            return Err(unsupported(
                "normalizer",
                "must be Sequence[Prepend(\"▁\"), Replace(\" \" -> \"▁\")]",
            ));
        }
        if !json.pre_tokenizer.is_null() {
            return Err(unsupported("pre_tokenizer", "must be null"));
        }
        if let Some(t) = json.added_tokens.iter().find(|t| !t.special) {
            return Err(unsupported(
                "added_tokens",
                format!(
                    "{:?} is not special, so it would be matched in text",
                    t.content.0
                ),
            ));
        }
        let model = json.model;
        if model.kind.as_deref().is_some_and(|k| k != "BPE") {
            return Err(unsupported("model.type", "must be BPE"));
        }
        if model.dropout.is_some() {
            return Err(unsupported("model.dropout", "must be null"));
        }
        if model.continuing_subword_prefix.is_some() || model.end_of_word_suffix.is_some() {
            return Err(unsupported(
                "model.continuing_subword_prefix/end_of_word_suffix",
                "must be null",
            ));
        }
        if model.ignore_merges == Some(true) {
            return Err(unsupported("model.ignore_merges", "must be false"));
        }
        if model.byte_fallback != Some(true) {
            return Err(unsupported("model.byte_fallback", "must be true"));
        }
        let vocab = &model.vocab;
        // (D)
        let distinct_ids: FoldSet<u32> = vocab.values().copied().collect();
        if distinct_ids.len() != vocab.len() {
            return Err(unsupported("model.vocab", "two tokens share an id"));
        }
        // (E): `tokenizers` gives an added token that is in the vocabulary the vocabulary's id,
        // so then the vocabulary alone answers `token_to_id` and the vocabulary size.
        if let Some(t) = json
            .added_tokens
            .iter()
            .find(|t| !vocab.contains_key(t.content.0.as_ref()))
        {
            return Err(unsupported(
                "added_tokens",
                format!("{:?} is not in model.vocab", t.content.0),
            ));
        }

        // (A): every byte has its token, spelled as `tokenizers` spells it.
        let mut byte_ids = [0u32; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            let name = format!("<{b:#04X}>");
            *slot = *vocab
                .get(name.as_str())
                .ok_or_else(|| unsupported("model.vocab", format!("has no byte token {name}")))?;
        }
        let is_byte_id: FoldSet<u32> = byte_ids.into_iter().collect();

        let legacy = matches!(model.merges.first(), Some(MergeJson::Legacy(_)));
        let mut pairs = Vec::with_capacity(model.merges.len());
        for m in &model.merges {
            match (m, legacy) {
                (MergeJson::Pair(a, b), false) => pairs.push((a.0.as_ref(), b.0.as_ref())),
                (MergeJson::Legacy(line), true) if line.0.starts_with("#version") => {}
                (MergeJson::Legacy(line), true) => {
                    match line.0.split(' ').collect::<Vec<_>>()[..] {
                        [a, b] => pairs.push((a, b)),
                        _ => {
                            return Err(unsupported(
                                "model.merges",
                                format!("{:?} is not two tokens", line.0),
                            ));
                        }
                    }
                }
                // `tokenizers` reads one spelling or the other, never a mix.
                _ => {
                    return Err(unsupported(
                        "model.merges",
                        "mixes \"a b\" strings and [a, b] pairs",
                    ));
                }
            }
        }
        let mut merges = FoldMap::default();
        merges.reserve(pairs.len());
        let mut merged = String::new();
        for (rank, &(a, b)) in pairs.iter().enumerate() {
            let id = |s: &str| {
                vocab.get(s).copied().ok_or_else(|| {
                    unsupported(
                        "model.merges",
                        format!("merge token {s:?} is not in the vocab"),
                    )
                })
            };
            merged.clear();
            merged.push_str(a);
            merged.push_str(b);
            let (a_id, b_id, new_id) = (id(a)?, id(b)?, id(&merged)?);
            // (B)
            if is_byte_id.contains(&a_id) || is_byte_id.contains(&b_id) {
                return Err(unsupported(
                    "model.merges",
                    format!("merge {a:?} {b:?} has a byte-fallback operand"),
                ));
            }
            // (C)
            let mut prev: Option<char> = None;
            for c in merged.chars() {
                if c == META && prev.is_some_and(|p| p != META) {
                    return Err(unsupported(
                        "model.merges",
                        format!(
                            "merge result {merged:?} has a character before ▁, so cuts before ▁ are unsafe"
                        ),
                    ));
                }
                prev = Some(c);
            }
            let rank = u32::try_from(rank)
                .map_err(|_| unsupported("model.merges", "more than 2^32 merges"))?;
            // Later duplicates replace earlier ones, as `tokenizers` collecting into its map does.
            merges.insert((a_id, b_id), Merge { rank, new_id });
        }
        let merges = MergeMap::new(&merges)
            .ok_or_else(|| unsupported("model.merges", "ids and ranks need more than 63 bits"))?;

        let mut ascii_ids = [u32::MAX; 128];
        let mut char_ids = FoldMap::default();
        for (tok, &id) in vocab {
            let mut chars = tok.0.chars();
            if let (Some(c), None) = (chars.next(), chars.next()) {
                if c.is_ascii() {
                    ascii_ids[c as usize] = id;
                } else {
                    char_ids.insert(c, id);
                }
            }
        }
        let mut classes = [ByteClass::Plain; 256];
        for (b, class) in classes.iter_mut().enumerate().take(128) {
            if ascii_ids[b] == u32::MAX {
                *class = ByteClass::Isolated;
            }
        }
        classes[usize::from(b' ')] = ByteClass::Space;
        classes[0xE2] = ByteClass::MaybeMeta;

        static INSTANCES: AtomicU64 = AtomicU64::new(0);
        Ok(FastTokenizer {
            ascii_ids,
            char_ids,
            byte_ids,
            merges,
            classes,
            vocab: vocab
                .iter()
                .map(|(t, &id)| (Box::from(t.0.as_ref()), id))
                .collect(),
            instance: INSTANCES.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The id of `token`, as `tokenizers`' `token_to_id` gives it (by (E), added tokens have
    /// their vocabulary ids).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// Tokens in the vocabulary, added tokens included (by (E) they are in it), as
    /// `tokenizers`' `get_vocab_size(true)` counts them.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Appends the ids of `text` to `out` (no BOS/EOS): identical to `tokenizers`' `encode(text,
    /// false)` with `set_encode_special_tokens(true)`.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            if cache.owner != Some(self.instance) {
                cache.clear();
                cache.owner = Some(self.instance);
            }
            self.encode_with(&mut cache, text, out);
        });
    }

    /// Appends the ids of `text` without any cache (the chunked path on its own; for tests and
    /// the benchmark).
    pub fn encode_uncached(&self, text: &str, out: &mut Vec<u32>) {
        let mut scratch = Scratch::default();
        self.for_each_chunk(text, |chunk, first| {
            scratch.key.clear();
            if first {
                scratch.key.push(' ');
            }
            scratch.key.push_str(chunk);
            self.encode_chunk(&scratch.key, &mut scratch.syms, &mut scratch.large, out);
        });
    }

    fn encode_with(&self, cache: &mut ChunkCache, text: &str, out: &mut Vec<u32>) {
        let mut scratch = std::mem::take(&mut cache.scratch);
        self.for_each_chunk(text, |chunk, first| {
            // The normalizer's prepended `▁` belongs to the first chunk: key it as " " + chunk
            // (which normalizes to the same text as the chunk with a leading space would).
            let key: &str = if first {
                scratch.key.clear();
                scratch.key.push(' ');
                scratch.key.push_str(chunk);
                &scratch.key
            } else {
                chunk
            };
            if key.len() > MAX_CACHED_CHUNK_BYTES {
                self.encode_chunk(key, &mut scratch.syms, &mut scratch.large, out);
                return;
            }
            let hash = hash_bytes(key.as_bytes());
            match cache.lookup(hash, key.as_bytes()) {
                Lookup::Hit(ids) => out.extend(
                    ids.chunks_exact(4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                ),
                Lookup::Miss { slot } => {
                    let start = out.len();
                    self.encode_chunk(key, &mut scratch.syms, &mut scratch.large, out);
                    cache.insert(hash, key.as_bytes(), &out[start..], slot);
                }
            }
        });
        cache.scratch = scratch;
    }

    /// Calls `f(chunk, is_first)` for consecutive pieces of `text` whose concatenation is `text`,
    /// cut only where the module doc proves no merge can cross: before a space or `▁` that
    /// follows another character, and around isolated ASCII characters.
    #[inline]
    fn for_each_chunk<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str, bool)) {
        let bytes = text.as_bytes();
        let mut start = 0;
        let mut first = true;
        // Whether the previous character was a space or `▁` (the prepended `▁` counts).
        let mut prev_space = true;
        let mut i = 0;
        let mut emit = |from: usize, to: usize| {
            // Cuts are at ASCII bytes or at the start of `▁`, so they are char boundaries.
            f(&text[from..to], first);
            first = false;
        };
        while i < bytes.len() {
            match self.classes[usize::from(bytes[i])] {
                ByteClass::Plain => {
                    prev_space = false;
                    i += 1;
                }
                ByteClass::Space => {
                    if !prev_space && i > start {
                        emit(start, i);
                        start = i;
                    }
                    prev_space = true;
                    i += 1;
                }
                ByteClass::MaybeMeta => {
                    if bytes.get(i + 1..i + 3) == Some(&[0x96, 0x81]) {
                        if !prev_space && i > start {
                            emit(start, i);
                            start = i;
                        }
                        prev_space = true;
                        i += 3;
                    } else {
                        prev_space = false;
                        i += 1;
                    }
                }
                ByteClass::Isolated => {
                    if i > start {
                        emit(start, i);
                    }
                    emit(i, i + 1);
                    i += 1;
                    start = i;
                    prev_space = false;
                }
            }
        }
        if start < bytes.len() {
            emit(start, bytes.len());
        }
    }

    /// BPE of one chunk (original text; spaces become `▁` here).
    fn encode_chunk(
        &self,
        chunk: &str,
        syms: &mut Vec<u32>,
        large: &mut bpe::LargeBuffers,
        out: &mut Vec<u32>,
    ) {
        syms.clear();
        for c in chunk.chars() {
            let id = match c {
                ' ' => self.char_id(META),
                c if c.is_ascii() => {
                    let id = self.ascii_ids[c as usize];
                    (id != u32::MAX).then_some(id)
                }
                c => self.char_id(c),
            };
            match id {
                Some(id) => syms.push(id),
                None => {
                    let mut buf = [0u8; 4];
                    for &b in c.encode_utf8(&mut buf).as_bytes() {
                        syms.push(self.byte_ids[usize::from(b)]);
                    }
                }
            }
        }
        bpe::merge(&self.merges, syms, large);
        out.extend_from_slice(syms);
    }

    fn char_id(&self, c: char) -> Option<u32> {
        if c.is_ascii() {
            let id = self.ascii_ids[c as usize];
            (id != u32::MAX).then_some(id)
        } else {
            self.char_ids.get(&c).copied()
        }
    }
}

/// 64-bit hash of a short byte string: 8 bytes at a time, folded multiplies.
#[inline]
fn hash_bytes(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let x = u64::from_le_bytes(w.try_into().expect("chunks_exact(8) gives 8 bytes"));
        let p = u128::from(h ^ x).wrapping_mul(u128::from(K));
        h = (p as u64) ^ ((p >> 64) as u64);
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut buf = [0u8; 8];
        buf[..rest.len()].copy_from_slice(rest);
        let p = u128::from(h ^ u64::from_le_bytes(buf) ^ 0xff).wrapping_mul(u128::from(K));
        h = (p as u64) ^ ((p >> 64) as u64);
    }
    h
}

/// Reused buffers.
#[derive(Default)]
struct Scratch {
    key: String,
    syms: Vec<u32>,
    large: bpe::LargeBuffers,
}

/// What [`ChunkCache::lookup`] found.
enum Lookup<'a> {
    /// The chunk's ids, as little-endian u32 bytes.
    Hit(&'a [u8]),
    /// Not cached; `slot` is where [`ChunkCache::insert`] puts it.
    Miss { slot: usize },
}

/// Slots of the cache table: a power of two, twice [`CACHE_ENTRIES`] (at most half full).
const CACHE_SLOTS: usize = 2 * CACHE_ENTRIES;

/// A bounded map from chunk text to ids (see the module doc for the bound). Open addressing:
/// each slot is one u64, the upper half of the key's hash over the record's offset in `arena`;
/// a record is `[key len: u8][ids len: u8][key bytes][ids, u32 LE]`, so a hit reads one slot
/// and one record (two cache misses at most).
#[derive(Default)]
struct ChunkCache {
    owner: Option<u64>,
    /// `EMPTY` or `tag << 32 | offset`; allocated on first insert.
    table: Vec<u64>,
    arena: Vec<u8>,
    entries: usize,
    scratch: Scratch,
}

impl ChunkCache {
    fn clear(&mut self) {
        self.table.fill(EMPTY);
        self.arena.clear();
        self.entries = 0;
    }

    #[inline]
    fn lookup(&self, hash: u64, key: &[u8]) -> Lookup<'_> {
        if self.table.is_empty() {
            return Lookup::Miss { slot: 0 };
        }
        let tag = hash >> 32;
        let mut i = hash as usize & (CACHE_SLOTS - 1);
        loop {
            let e = self.table[i];
            if e == EMPTY {
                return Lookup::Miss { slot: i };
            }
            if e >> 32 == tag {
                let at = (e & 0xffff_ffff) as usize;
                let (key_len, ids_len) = (self.arena[at] as usize, self.arena[at + 1] as usize);
                let key_at = at + 2;
                if &self.arena[key_at..key_at + key_len] == key {
                    let ids_at = key_at + key_len;
                    return Lookup::Hit(&self.arena[ids_at..ids_at + 4 * ids_len]);
                }
            }
            i = (i + 1) & (CACHE_SLOTS - 1);
        }
    }

    /// Stores `ids` for `key` at `slot` (from the `Miss` of the same key just before).
    fn insert(&mut self, hash: u64, key: &[u8], ids: &[u32], mut slot: usize) {
        if self.table.is_empty()
            || self.entries >= CACHE_ENTRIES
            || self.arena.len() >= CACHE_ARENA_BYTES
        {
            if self.table.is_empty() {
                self.table = vec![EMPTY; CACHE_SLOTS];
            } else {
                self.clear();
            }
            slot = hash as usize & (CACHE_SLOTS - 1);
        }
        // Keys are at most MAX_CACHED_CHUNK_BYTES, and every id covers at least one byte, so both
        // lengths fit a u8; the arena stays under CACHE_ARENA_BYTES plus one record, so offsets
        // fit the slot's 32 bits.
        let offset = self.arena.len() as u64;
        self.arena.push(key.len() as u8);
        self.arena.push(ids.len() as u8);
        self.arena.extend_from_slice(key);
        for id in ids {
            self.arena.extend_from_slice(&id.to_le_bytes());
        }
        self.table[slot] = ((hash >> 32) << 32) | offset;
        self.entries += 1;
    }
}

thread_local! {
    static CACHE: RefCell<ChunkCache> = RefCell::new(ChunkCache::default());
}

#[cfg(test)]
mod tests;
