//! Exactness tests of the fast encoder against the plain Hugging Face `tokenizers` encoder (the
//! reference): the real-text sample, hand-picked edge cases, long documents, a property test on
//! random strings, and the load-time checks that guard the chunking proof.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;
use rayon::prelude::*;

use super::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn tokenizer_json() -> &'static [u8] {
    static JSON: OnceLock<Vec<u8>> = OnceLock::new();
    JSON.get_or_init(|| std::fs::read(fixtures().join("tokenizer/tokenizer.json")).unwrap())
}

fn fast() -> &'static FastTokenizer {
    static FAST: OnceLock<FastTokenizer> = OnceLock::new();
    FAST.get_or_init(|| FastTokenizer::from_json(tokenizer_json()).unwrap())
}

/// The reference: `tokenizers` with special-token matching off, no BOS/EOS.
fn reference() -> &'static tokenizers::Tokenizer {
    static HF: OnceLock<tokenizers::Tokenizer> = OnceLock::new();
    HF.get_or_init(|| {
        let mut t = tokenizers::Tokenizer::from_bytes(tokenizer_json()).unwrap();
        t.set_encode_special_tokens(true);
        t
    })
}

fn reference_ids(text: &str) -> Vec<u32> {
    reference().encode(text, false).unwrap().get_ids().to_vec()
}

fn fast_ids(text: &str) -> Vec<u32> {
    let mut v = Vec::new();
    fast().encode(text, &mut v);
    v
}

fn uncached_ids(text: &str) -> Vec<u32> {
    let mut v = Vec::new();
    fast().encode_uncached(text, &mut v);
    v
}

/// Fast (cached, twice so the second pass is served from the cache) and uncached must both equal
/// the reference; on failure, report the first differing position, not a 1 MB dump.
fn assert_same(text: &str) {
    let want = reference_ids(text);
    for (what, got) in [
        ("fast", fast_ids(text)),
        ("fast, cached", fast_ids(text)),
        ("uncached", uncached_ids(text)),
    ] {
        if got != want {
            let at = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
            let excerpt: String = text.chars().take(200).collect();
            panic!(
                "{what}: ids differ at {at} (len {} vs reference {}): {:?} vs {:?}; text starts {excerpt:?}",
                got.len(),
                want.len(),
                &got[at..(at + 8).min(got.len())],
                &want[at..(at + 8).min(want.len())],
            );
        }
    }
}

#[test]
fn known_ids_and_empty_text() {
    // From shared/tokenizers/llama2/README.md (SentencePiece): "a</s>b" -> ▁a </ s > b.
    assert_eq!(fast_ids("a</s>b"), [263, 829, 29879, 29958, 29890]);
    assert_eq!(fast_ids(""), Vec::<u32>::new());
    assert_same("");
}

#[test]
fn edge_cases_match_reference() {
    let cases = [
        " ",
        "  ",
        "a",
        " a",
        "a ",
        "a  b   c    d",
        "▁",
        "▁▁a▁b ▁ c",
        "hello world",
        "Hello, World! 123 4567 89.0",
        "\0",
        "a\0b\0\0 c",
        "\t\tindented\n\tcode();\n",
        "line1\nline2\r\nline3\n\n\n  \n",
        "tab\tseparated\tvalues",
        "<s>",
        "</s>",
        "<unk>",
        "<s>hello</s> <unk> x<s>y",
        "😀",
        "👩‍👩‍👧‍👦 family, 👍🏽 thumbs, 🇺🇳 flag",
        "日本語のテキストと English mixed 中文",
        "Ελληνικά Кириллица עברית العربية हिन्दी ไทย 한국어",
        "\u{10FFFF}\u{FFFD}\u{200B}\u{FEFF}",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈",
        "ˈfoʊnɛtɪk",
        "    def f(x):\n        return x  # comment\n",
        "\u{7f}\u{1}\u{1b}[0m",
        "a▁",
        "a ▁b",
        "   ",
        "\n",
        " \n ",
    ];
    for text in cases {
        assert_same(text);
    }
}

/// xorshift64: deterministic "random" text without a dependency.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn long_single_line_documents_match_reference() {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    // 1 MB of letters without any space: one chunk, through the heap loop.
    let letters: String = (0..1 << 20)
        .map(|_| (b'a' + (xorshift(&mut s) % 26) as u8) as char)
        .collect();
    assert_same(&letters);
    // 1 MB of one repeated letter, and of spaces: the worst case for a quadratic merge loop.
    assert_same(&"a".repeat(1 << 20));
    assert_same(&" ".repeat(1 << 20));
    // ~1 MB of words and byte-fallback characters on one line.
    let pieces = [
        "the ", "quick", " brown", "  ", "😀", "日本", "\t", "▁", "123", ".", "<s>",
    ];
    let mixed: String = (0..400_000)
        .map(|_| pieces[(xorshift(&mut s) % pieces.len() as u64) as usize])
        .collect();
    assert!(mixed.len() > 1 << 20);
    assert_same(&mixed);
}

#[test]
fn loads_and_rejects_by_the_proof_conditions() {
    let base: serde_json::Value = serde_json::from_slice(tokenizer_json()).unwrap();
    let reject = |edit: &dyn Fn(&mut serde_json::Value), field: &str| {
        let mut json = base.clone();
        edit(&mut json);
        let err = FastTokenizer::from_json(&serde_json::to_vec(&json).unwrap()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FastError::Unsupported { .. }), "{msg}");
        assert!(msg.contains(field) && msg.contains("hint:"), "{msg}");
    };
    // (C): a merge that produces "a▁" would cross a cut before ▁.
    reject(
        &|j| {
            j["model"]["vocab"]["a▁"] = 32_000.into();
            j["model"]["merges"]
                .as_array_mut()
                .unwrap()
                .push("a ▁".into());
        },
        "before ▁",
    );
    // (B): a merge with a byte-fallback operand would cross a cut around an isolated character.
    reject(
        &|j| {
            j["model"]["vocab"]["<0x0A><0x0A>"] = 32_000.into();
            j["model"]["merges"]
                .as_array_mut()
                .unwrap()
                .push("<0x0A> <0x0A>".into());
        },
        "byte-fallback operand",
    );
    // (A): a missing byte token would bring `<unk>` and fuse_unk back.
    reject(
        &|j| {
            j["model"]["vocab"]
                .as_object_mut()
                .unwrap()
                .remove("<0x41>");
        },
        "<0x41>",
    );
    // (D): an id with two strings would break "a symbol's token string is its text".
    reject(&|j| j["model"]["vocab"]["zz"] = 5.into(), "share an id");
    reject(
        &|j| j["added_tokens"][1]["special"] = false.into(),
        "added_tokens",
    );
    reject(
        &|j| j["pre_tokenizer"] = serde_json::json!({"type": "Metaspace"}),
        "pre_tokenizer",
    );
    reject(&|j| j["normalizer"] = serde_json::Value::Null, "normalizer");
    reject(&|j| j["model"]["dropout"] = 0.1.into(), "dropout");
    reject(
        &|j| j["model"]["byte_fallback"] = false.into(),
        "byte_fallback",
    );
}

#[test]
fn vocabulary_facts_match_tokenizers_so_the_reference_need_not_load() {
    let (fast, hf) = (fast(), reference());
    assert_eq!(fast.vocab_size(), hf.get_vocab_size(true));
    // Control tokens, byte tokens, and tokens whose JSON spelling has escapes (`"`, `\`), which
    // the loader reads into owned strings instead of borrowing them.
    for tok in [
        "<s>",
        "</s>",
        "<unk>",
        "<0x0A>",
        "▁the",
        "\"",
        "\\",
        "▁\"",
        "not a token",
    ] {
        assert_eq!(fast.token_to_id(tok), hf.token_to_id(tok), "{tok:?}");
    }
    // `tokenizers` ignores an added token's "id" and takes the vocabulary's, and so does (E).
    let mut json: serde_json::Value = serde_json::from_slice(tokenizer_json()).unwrap();
    assert_eq!(json["added_tokens"][1]["content"], "<s>");
    json["added_tokens"][1]["id"] = 7.into();
    let bytes = serde_json::to_vec(&json).unwrap();
    let hf = tokenizers::Tokenizer::from_bytes(&bytes).unwrap();
    let fast = FastTokenizer::from_json(&bytes).unwrap();
    assert_eq!(
        (fast.token_to_id("<s>"), hf.token_to_id("<s>")),
        (Some(1), Some(1))
    );
    assert_eq!(fast.vocab_size(), hf.get_vocab_size(true));
    // (E): an added token outside the vocabulary would get an id of its own from `tokenizers`.
    let mut json: serde_json::Value = serde_json::from_slice(tokenizer_json()).unwrap();
    json["added_tokens"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "id": 32000, "content": "<pad>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    let err = FastTokenizer::from_json(&serde_json::to_vec(&json).unwrap()).unwrap_err();
    assert!(
        err.to_string().contains("\"<pad>\" is not in model.vocab"),
        "{err}"
    );
}

#[test]
fn merges_read_in_both_spellings_but_not_mixed() {
    // The fixture spells merges "a b"; newer files spell them ["a", "b"]. Both load the same
    // encoder, and `tokenizers` agrees on the second spelling too.
    let mut json: serde_json::Value = serde_json::from_slice(tokenizer_json()).unwrap();
    let merges = json["model"]["merges"].as_array_mut().unwrap();
    for m in merges.iter_mut() {
        let (a, b) = m.as_str().unwrap().split_once(' ').unwrap();
        *m = serde_json::json!([a, b]);
    }
    let bytes = serde_json::to_vec(&json).unwrap();
    let pairs = FastTokenizer::from_json(&bytes).unwrap();
    let mut hf = tokenizers::Tokenizer::from_bytes(&bytes).unwrap();
    hf.set_encode_special_tokens(true);
    for text in [
        "the tree that talks",
        "Zürich 2024: naïve café ☕",
        "\t\tx  y",
    ] {
        let mut got = Vec::new();
        pairs.encode(text, &mut got);
        assert_eq!(got, reference_ids(text), "{text:?}");
        assert_eq!(got, hf.encode(text, false).unwrap().get_ids(), "{text:?}");
    }
    let merges = json["model"]["merges"].as_array_mut().unwrap();
    merges[7] = "a b".into();
    let err = FastTokenizer::from_json(&serde_json::to_vec(&json).unwrap()).unwrap_err();
    assert!(err.to_string().contains("mixes"), "{err}");
}

#[test]
fn duplicate_merges_keep_the_last_rank_like_tokenizers() {
    // `tokenizers` collects (pair -> rank) into a map, so a repeated merge keeps its LAST rank.
    // Repeat the first merge ("▁ t") at the very end: it then loses to every other merge.
    let mut json: serde_json::Value = serde_json::from_slice(tokenizer_json()).unwrap();
    let merges = json["model"]["merges"].as_array_mut().unwrap();
    let first = merges[0].clone();
    merges.push(first);
    let bytes = serde_json::to_vec(&json).unwrap();
    let fast = FastTokenizer::from_json(&bytes).unwrap();
    let mut hf = tokenizers::Tokenizer::from_bytes(&bytes).unwrap();
    hf.set_encode_special_tokens(true);
    for text in ["the tree that talks", " to the top", "at the theatre"] {
        let mut got = Vec::new();
        fast.encode(text, &mut got);
        let want = hf.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "{text:?}");
        // Same encoder, other instance: the thread's cache must not leak between them.
        assert_eq!(fast_ids(text), reference_ids(text), "{text:?}");
    }
}

#[test]
fn cache_stays_bounded_and_exact_across_clears() {
    let tok = FastTokenizer::from_json(tokenizer_json()).unwrap();
    // Far more distinct short chunks than the cache holds: it is cleared several times.
    let mut s = 7u64;
    let words: Vec<String> = (0..3 * CACHE_ENTRIES)
        .map(|_| format!(" w{}", xorshift(&mut s) % 10_000_000))
        .collect();
    let text = words.concat();
    let mut got = Vec::new();
    tok.encode(&text, &mut got);
    CACHE.with(|c| {
        let c = c.borrow();
        assert!(c.entries > 0 && c.entries <= CACHE_ENTRIES, "{}", c.entries);
        assert_eq!(c.table.len(), CACHE_SLOTS);
        assert!(c.arena.len() <= CACHE_ARENA_BYTES + 2 + 5 * MAX_CACHED_CHUNK_BYTES);
    });
    let mut want = Vec::new();
    tok.encode_uncached(&text, &mut want);
    assert_eq!(got, want);
    assert_eq!(&got[..64], &reference_ids(&words[..10].concat())[..64]);
}

/// Texts of every document of the shipped FineWeb-Edu-shaped sample (2,457 documents, 19 MB).
fn sample_texts() -> Vec<String> {
    let texts = crate::source::read_all_texts(&fixtures().join("fineweb-edu-sample")).unwrap();
    assert_eq!(texts.len(), 2457);
    texts
}

#[test]
fn every_sample_document_matches_reference() {
    let texts = sample_texts();
    assert_eq!(texts.len(), 2457);
    let mismatched: Vec<usize> = texts
        .par_iter()
        .enumerate()
        .filter(|(_, t)| fast_ids(t) != reference_ids(t))
        .map(|(i, _)| i)
        .collect();
    assert!(mismatched.is_empty(), "documents differ: {mismatched:?}");
    // The edge cases the sample is known to hold are really in it: a 0.9 MB single line of JSON
    // and literal control-token strings.
    assert!(texts.iter().any(|t| t.len() > 800_000 && !t.contains('\n')));
    assert!(texts.iter().any(|t| t.contains("</s>")));
}

/// Pieces the property test draws from: spaces, `▁`, digits, punctuation, multi-byte and
/// byte-fallback characters (emoji, rare CJK, controls), control-token strings, common words.
const PIECES: &[&str] = &[
    " ",
    "  ",
    "   ",
    "▁",
    "▁▁",
    "\t",
    "\n",
    "\r\n",
    "\0",
    "\u{7f}",
    "\u{1b}",
    "0",
    "1",
    "7",
    "42",
    "2024",
    ".",
    ",",
    "!",
    "?",
    "'",
    "\"",
    "(",
    ")",
    "-",
    "_",
    "/",
    "\\",
    "#",
    "<",
    ">",
    "<s>",
    "</s>",
    "<unk>",
    "<0x0A>",
    "a",
    "e",
    "t",
    "th",
    "the",
    "ing",
    "tion",
    "The",
    "A",
    "I",
    "é",
    "ü",
    "ß",
    "ñ",
    "ж",
    "я",
    "α",
    "ω",
    "א",
    "ع",
    "क",
    "ก",
    "日",
    "本",
    "語",
    "中",
    "한",
    "ア",
    "ー",
    "😀",
    "👍",
    "🏽",
    "\u{200d}",
    "🇺",
    "️",
    "𝔘",
    "\u{10FFFF}",
    "\u{FFFD}",
    "\u{E000}",
    "\u{300}",
    "\u{2028}",
    "ﬁ",
    "Ⅻ",
    "½",
    "→",
    "…",
    "—",
    "€",
];

fn random_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        8 => proptest::sample::select(PIECES).prop_map(str::to_owned),
        1 => any::<char>().prop_map(String::from),
    ];
    proptest::collection::vec(piece, 0..80).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn random_strings_match_reference(text in random_text()) {
        let want = reference_ids(&text);
        prop_assert_eq!(&fast_ids(&text), &want);
        prop_assert_eq!(&uncached_ids(&text), &want);
    }
}
