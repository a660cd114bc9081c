//! The LLaMA-2 tokenizer as the pipeline uses it: load and check a `tokenizer.json`, encode one
//! document's text to ids (no BOS/EOS; the caller frames documents), decode for `inspect`.
//!
//! Exactness: SentencePiece treats the literal strings `<s>`, `</s>` and `<unk>` inside a text as
//! plain text; `tokenizers` turns them into control ids unless special-token matching is switched
//! off, so [`Tokenizer::load`] calls `set_encode_special_tokens(true)` and encodes with
//! `add_special_tokens = false` (see `tests/fixtures/PROVENANCE.md` and the llama2 tokenizer README).
//!
//! Backends: [`Backend::Plain`] is the Hugging Face `tokenizers` encoder and the reference. A
//! faster, id-identical encoder lives in `tokenize/fast.rs` and is added as another
//! [`Backend`] variant, chosen by a `prepare` flag; nothing else in the pipeline changes.

pub mod fast;

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};

use crate::format::shard::MAX_VOCAB;

/// Which encoder turns text into ids. All backends must give identical ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Backend {
    /// Hugging Face `tokenizers` with special-token matching off: the reference.
    #[value(name = "reference")]
    Plain,
    /// The same ids as the reference, many times faster. Falls back to the reference when the
    /// tokenizer.json fails the fast encoder's load-time checks.
    // (clap shows these doc comments as help; the encoder is `fast::FastTokenizer`.)
    #[default]
    Fast,
}

/// A checked LLaMA-2-style tokenizer: vocabulary fits u16, `<s>` and `</s>` exist.
pub struct Tokenizer {
    /// The reference, parsed on first use when the fast encoder carries the work: `prepare`
    /// with the fast backend never needs it, and parsing it is most of a start-up (about 50 ms).
    /// A parse error is kept as its message, so every use reports it.
    hf: OnceLock<Result<tokenizers::Tokenizer, String>>,
    backend: Backend,
    /// `None` when the tokenizer.json is outside what the fast encoder proves exact.
    fast: Option<fast::FastTokenizer>,
    /// The exact bytes of tokenizer.json (copied into the dataset folder).
    json: Vec<u8>,
    sha256: String,
    vocab_size: u32,
    bos_id: u32,
    eos_id: u32,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("backend", &self.backend)
            .field("sha256", &self.sha256)
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads `path` (a `tokenizer.json`) and checks it; errors name the file and give a hint.
    pub fn load(path: &Path) -> Result<Self> {
        let json = std::fs::read(path).with_context(|| {
            format!(
                "--tokenizer {}: cannot read the file; hint: pass a tokenizer.json path such as tests/fixtures/tokenizer/tokenizer.json",
                path.display()
            )
        })?;
        Self::from_bytes(json).with_context(|| format!("--tokenizer {}", path.display()))
    }

    /// Parses and checks tokenizer.json bytes. When the fast encoder accepts them, the
    /// vocabulary facts come from it (its load-time check (E) makes them the reference's) and
    /// the reference is parsed only when something asks for it; otherwise the reference is
    /// parsed now and used for everything.
    pub fn from_bytes(json: Vec<u8>) -> Result<Self> {
        let hf = OnceLock::new();
        let fast = fast::FastTokenizer::from_json(&json);
        let (vocab, bos, eos) = match &fast {
            Ok(f) => (f.vocab_size(), f.token_to_id("<s>"), f.token_to_id("</s>")),
            Err(e) => {
                let t = hf.get_or_init(|| parse_reference(&json));
                // A file neither parses is just invalid; say so without the fast one's warning.
                let t = t.as_ref().map_err(|e| anyhow!("{e}"))?;
                tracing::warn!("the fast tokenizer is off, using the reference: {e}");
                (
                    t.get_vocab_size(true),
                    t.token_to_id("<s>"),
                    t.token_to_id("</s>"),
                )
            }
        };
        if vocab > MAX_VOCAB as usize {
            bail!(
                "vocabulary of {vocab} tokens exceeds {MAX_VOCAB}, ids would not fit the shards' u16 tokens; hint: use the LLaMA-2 tokenizer (32,000 tokens)"
            );
        }
        let id = |id: Option<u32>, tok: &str| {
            id.ok_or_else(|| {
                anyhow!("the vocabulary has no `{tok}` token (documents are framed as <s> ... </s>); hint: use the LLaMA-2 tokenizer.json")
            })
        };
        let (bos_id, eos_id) = (id(bos, "<s>")?, id(eos, "</s>")?);
        let sha256 = hex::encode(Sha256::digest(&json));
        Ok(Tokenizer {
            hf,
            backend: Backend::default(),
            fast: fast.ok(),
            json,
            sha256,
            vocab_size: vocab as u32,
            bos_id,
            eos_id,
        })
    }

    /// Selects the encoder; all backends give identical ids. The reference is parsed here when
    /// it will encode, so a file it rejects fails now, not at the first document.
    pub fn with_backend(mut self, backend: Backend) -> Result<Self> {
        self.backend = backend;
        if self.fast.is_none() || backend == Backend::Plain {
            self.reference()?;
        }
        Ok(self)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The reference `tokenizers` encoder, parsed on first use.
    fn reference(&self) -> Result<&tokenizers::Tokenizer> {
        self.hf
            .get_or_init(|| parse_reference(&self.json))
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }

    /// Appends the ids of `text` to `out`, without BOS/EOS. Literal `<s>`/`</s>`/`<unk>` in the
    /// text are encoded as text, exactly as SentencePiece does.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        match (self.backend, &self.fast) {
            (Backend::Fast, Some(fast)) => fast.encode(text, out),
            (Backend::Plain, _) | (Backend::Fast, None) => {
                let enc = self
                    .reference()?
                    .encode_fast(text, false)
                    .map_err(|e| anyhow!("tokenizer failed: {e}"))?;
                out.extend_from_slice(enc.get_ids());
            }
        }
        Ok(())
    }

    /// Text of `ids` (for `inspect --decode`); control ids are shown as `<s>`/`</s>`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.reference()?
            .decode(ids, false)
            .map_err(|e| anyhow!("tokenizer cannot decode: {e}"))
    }

    pub fn json(&self) -> &[u8] {
        &self.json
    }

    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
}

/// The reference encoder with special-token matching off (see the module doc).
fn parse_reference(json: &[u8]) -> Result<tokenizers::Tokenizer, String> {
    let mut t = tokenizers::Tokenizer::from_bytes(json).map_err(|e| {
        format!("not a valid tokenizer.json ({e}); hint: pass the Hugging Face tokenizer.json of meta-llama/Llama-2-7b-hf")
    })?;
    t.set_encode_special_tokens(true);
    Ok(t)
}

/// What `--tokenizer` names: a local `tokenizer.json` or a hub model repo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSpec {
    File(std::path::PathBuf),
    Hub(String),
}

impl TokenizerSpec {
    /// A value that exists on disk or ends in `.json` is a file; anything else a hub repo id.
    pub fn parse(value: &str) -> Self {
        let path = Path::new(value);
        if path.exists() || value.ends_with(".json") {
            TokenizerSpec::File(path.to_owned())
        } else {
            TokenizerSpec::Hub(value.to_owned())
        }
    }

    /// The `tokenizer.source` string recorded in the manifest.
    pub fn describe(&self) -> String {
        match self {
            TokenizerSpec::File(p) => p.display().to_string(),
            TokenizerSpec::Hub(repo) => repo.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Tokenizer {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tokenizer/tokenizer.json");
        Tokenizer::load(&path).unwrap()
    }

    fn ids(t: &Tokenizer, text: &str) -> Vec<u32> {
        let mut v = Vec::new();
        t.encode(text, &mut v).unwrap();
        v
    }

    #[test]
    fn literal_control_strings_are_text_as_in_sentencepiece() {
        let t = fixture();
        assert_eq!((t.bos_id(), t.eos_id(), t.vocab_size()), (1, 2, 32000));
        // SentencePiece: "a</s>b" -> ▁a </ s > b (shared/tokenizers/llama2/README.md).
        assert_eq!(ids(&t, "a</s>b"), [263, 829, 29879, 29958, 29890]);
        for text in ["<s>", "</s>", "<unk>", "x <s> y </s> <unk>"] {
            let v = ids(&t, text);
            assert!(v.iter().all(|&i| i > 2), "{text:?} -> {v:?}");
        }
    }

    #[test]
    fn rejects_vocab_over_u16_and_missing_control_tokens() {
        let t = fixture();
        let mut json: serde_json::Value = serde_json::from_slice(t.json()).unwrap();
        let vocab = json["model"]["vocab"].as_object_mut().unwrap();
        for i in 0..40_000 {
            vocab.insert(format!("extra{i}"), (32_000 + i).into());
        }
        let err = Tokenizer::from_bytes(serde_json::to_vec(&json).unwrap()).unwrap_err();
        assert!(err.to_string().contains("exceeds 65536"), "{err}");

        let mut json: serde_json::Value = serde_json::from_slice(t.json()).unwrap();
        json["added_tokens"]
            .as_array_mut()
            .unwrap()
            .retain(|t| t["content"] != "</s>");
        let vocab = json["model"]["vocab"].as_object_mut().unwrap();
        vocab.remove("</s>");
        let err = Tokenizer::from_bytes(serde_json::to_vec(&json).unwrap());
        let err = format!("{:#}", err.unwrap_err());
        assert!(err.contains("`</s>`") && err.contains("hint:"), "{err}");
    }

    #[test]
    fn the_reference_is_parsed_only_when_used() {
        let t = fixture();
        assert!(t.fast.is_some() && t.hf.get().is_none());
        assert_eq!(ids(&t, "hello world"), [22172, 3186]);
        assert!(
            t.hf.get().is_none(),
            "encoding with the fast backend parsed the reference"
        );
        assert_eq!(
            t.decode(&[1, 22172, 3186, 2]).unwrap(),
            "<s> hello world</s>"
        );
        assert!(t.hf.get().is_some());
        let plain = fixture().with_backend(Backend::Plain).unwrap();
        assert!(plain.hf.get().is_some());
        assert_eq!(ids(&plain, "hello world"), [22172, 3186]);

        // A file the fast encoder accepts but `tokenizers` rejects (a decoder it does not
        // know): loading for the fast backend works, anything that needs the reference fails
        // with its message.
        let mut json: serde_json::Value = serde_json::from_slice(t.json()).unwrap();
        json["decoder"] = serde_json::json!({"type": "NoSuchDecoder"});
        let bytes = serde_json::to_vec(&json).unwrap();
        let t = Tokenizer::from_bytes(bytes.clone()).unwrap();
        assert_eq!(ids(&t, "hello world"), [22172, 3186]);
        let err = t.decode(&[22172]).unwrap_err().to_string();
        assert!(
            err.contains("not a valid tokenizer.json") && err.contains("hint:"),
            "{err}"
        );
        let err = Tokenizer::from_bytes(bytes)
            .unwrap()
            .with_backend(Backend::Plain);
        assert!(
            err.unwrap_err()
                .to_string()
                .contains("not a valid tokenizer.json")
        );
    }

    #[test]
    fn spec_distinguishes_files_from_repo_ids() {
        assert_eq!(
            TokenizerSpec::parse("meta-llama/Llama-2-7b-hf"),
            TokenizerSpec::Hub("meta-llama/Llama-2-7b-hf".into())
        );
        assert!(matches!(
            TokenizerSpec::parse("x/tokenizer.json"),
            TokenizerSpec::File(_)
        ));
    }
}
