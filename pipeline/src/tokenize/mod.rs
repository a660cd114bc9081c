//! The LLaMA-2 tokenizer as the pipeline uses it: load and check a `tokenizer.json`, encode one
//! document's text to ids (no BOS/EOS; the caller frames documents), decode for `inspect`.
//!
//! Exactness: SentencePiece treats the literal strings `<s>`, `</s>` and `<unk>` inside a text as
//! plain text; `tokenizers` turns them into control ids unless special-token matching is switched
//! off, so [`Tokenizer::load`] calls `set_encode_special_tokens(true)` and encodes with
//! `add_special_tokens = false` (see `tests/fixtures/PROVENANCE.md` and the llama2 tokenizer README).
//!
//! Backends: [`Backend::Plain`] is the Hugging Face `tokenizers` encoder and the reference. A
//! faster, id-identical encoder (issue 7) lives in `tokenize/fast.rs` and is added as another
//! [`Backend`] variant, chosen by a `prepare` flag; nothing else in the pipeline changes.

pub mod fast;

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};

/// Largest vocabulary whose ids fit the shards' u16 tokens.
pub const MAX_VOCAB: usize = 65_536;

/// Which encoder turns text into ids. All backends must give identical ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Backend {
    /// Hugging Face `tokenizers` with special-token matching off: the reference.
    #[value(name = "reference")]
    Plain,
    /// [`fast::FastTokenizer`]: the same ids, many times faster (issue 7). Falls back to the
    /// reference when the tokenizer.json fails the fast encoder's load-time checks.
    #[default]
    Fast,
}

/// A checked LLaMA-2-style tokenizer: vocabulary fits u16, `<s>` and `</s>` exist.
pub struct Tokenizer {
    hf: tokenizers::Tokenizer,
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

    /// Parses and checks tokenizer.json bytes.
    pub fn from_bytes(json: Vec<u8>) -> Result<Self> {
        // The two parses are independent and each takes tens of milliseconds at every start.
        let (hf, fast) = std::thread::scope(|s| {
            let fast = s.spawn(|| fast::FastTokenizer::from_json(&json));
            let hf = tokenizers::Tokenizer::from_bytes(&json);
            (hf, fast.join().expect("fast tokenizer load panicked"))
        });
        let mut hf = hf.map_err(|e| {
            anyhow!("not a valid tokenizer.json ({e}); hint: pass the Hugging Face tokenizer.json of meta-llama/Llama-2-7b-hf")
        })?;
        let vocab = hf.get_vocab_size(true);
        if vocab > MAX_VOCAB {
            bail!(
                "vocabulary of {vocab} tokens exceeds {MAX_VOCAB}, ids would not fit the shards' u16 tokens; hint: use the LLaMA-2 tokenizer (32,000 tokens)"
            );
        }
        let id = |tok: &str| {
            hf.token_to_id(tok).ok_or_else(|| {
                anyhow!("the vocabulary has no `{tok}` token (documents are framed as <s> ... </s>); hint: use the LLaMA-2 tokenizer.json")
            })
        };
        let (bos_id, eos_id) = (id("<s>")?, id("</s>")?);
        hf.set_encode_special_tokens(true);
        let fast = fast
            .inspect_err(|e| tracing::warn!("the fast tokenizer is off, using the reference: {e}"))
            .ok();
        let sha256 = hex::encode(Sha256::digest(&json));
        Ok(Tokenizer {
            hf,
            backend: Backend::default(),
            fast,
            json,
            sha256,
            vocab_size: vocab as u32,
            bos_id,
            eos_id,
        })
    }

    /// Selects the encoder; all backends give identical ids.
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Appends the ids of `text` to `out`, without BOS/EOS. Literal `<s>`/`</s>`/`<unk>` in the
    /// text are encoded as text, exactly as SentencePiece does.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        match (self.backend, &self.fast) {
            (Backend::Fast, Some(fast)) => fast.encode(text, out),
            (Backend::Plain, _) | (Backend::Fast, None) => {
                let enc = self
                    .hf
                    .encode_fast(text, false)
                    .map_err(|e| anyhow!("tokenizer failed: {e}"))?;
                out.extend_from_slice(enc.get_ids());
            }
        }
        Ok(())
    }

    /// Text of `ids` (for `inspect --decode`); control ids are shown as `<s>`/`</s>`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.hf
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
