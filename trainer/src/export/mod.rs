//! `trainer export`: a checkpoint -> a folder that Hugging Face `transformers` loads
//! (`AutoModelForCausalLM.from_pretrained(DIR)`, `AutoTokenizer.from_pretrained(DIR)`), and
//! `trainer logits`: our own logits for shard sequences, to compare an export against.
//!
//! ```text
//! DIR/
//!   config.json, generation_config.json      the architecture (hf_config.rs)
//!   model.safetensors                        latent f32 weights, Hugging Face names (names.rs)
//!   tokenizer.json                           the shards' tokenizer, sha256-checked against the run
//!   tokenizer_config.json, special_tokens_map.json
//!   configuration_bitnet_b158.py, modeling_bitnet_b158.py    sub_norm = false only
//!   README.md                                the model card (card.rs)
//! ```
//!
//! The folder is written as `.<name>.export.tmp/` next to DIR, each file through a temporary
//! name, fsynced and renamed, and the folder is renamed to DIR last: a folder named DIR is always
//! complete, and an interrupted export leaves only the temporary folder (removed by the next one).

pub mod card;
pub mod hf_config;
pub mod names;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device, Tensor};
use pipeline::format::{Manifest, Split, TOKENIZER_FILE};
use sha2::{Digest, Sha256};

use crate::checkpoint::{self, TrainState};
use crate::data::SplitData;
use crate::instrument::eval::EvalRecord;
use crate::instrument::provenance::{DatasetFingerprint, Provenance};
use crate::instrument::run_log::{eval_path, meta_dir};
use crate::model::Params;
use crate::run_dir::RunDir;
use card::CardInputs;
use hf_config::SpecialTokens;

/// The weights file of an export.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// What `trainer export` needs.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// `runs/<id>/checkpoints/step_NNNNNN`.
    pub checkpoint: PathBuf,
    /// A dataset folder holding the run's `tokenizer.json` (normally the one it trained on).
    pub shards: PathBuf,
    pub out: PathBuf,
    /// Replace an existing non-empty `out`.
    pub force: bool,
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    pub out: PathBuf,
    pub step: u64,
    /// `BitNetForCausalLM` or `BitNetB158ForCausalLM`.
    pub architecture: &'static str,
    /// Files in the folder, sorted.
    pub files: Vec<String>,
}

/// `trainer export`.
pub fn export(o: &ExportOptions) -> Result<ExportSummary> {
    let state = checkpoint::load_state(&o.checkpoint)?;
    let weights = o.checkpoint.join(checkpoint::MODEL_FILE);
    let params = Params::load(&weights, &state.config.model, &Device::Cpu)
        .with_context(|| format!("loading {}", weights.display()))?;
    let (tokenizer_bytes, tokens) = run_tokenizer(&o.shards, &state)?;
    let m = &state.config.model;

    let mut files: Vec<(String, Vec<u8>)> = vec![
        (WEIGHTS_FILE.into(), safetensors_bytes(&params, m)?),
        (
            "config.json".into(),
            json_bytes(&hf_config::config_json(m, &tokens)),
        ),
        (
            "generation_config.json".into(),
            json_bytes(&hf_config::generation_config_json(&tokens)),
        ),
        (TOKENIZER_FILE.into(), tokenizer_bytes),
        (
            "tokenizer_config.json".into(),
            json_bytes(&hf_config::tokenizer_config_json(m, &tokens)),
        ),
        (
            "special_tokens_map.json".into(),
            json_bytes(&hf_config::special_tokens_map_json(&tokens)),
        ),
        (
            "README.md".into(),
            card_inputs_and_card(o, &state).into_bytes(),
        ),
    ];
    if !m.sub_norm {
        for (name, text) in hf_config::REMOTE_CODE {
            files.push((name.into(), text.as_bytes().to_vec()));
        }
    }
    write_folder_atomically(&o.out, &files, o.force)?;
    let mut names: Vec<String> = files.into_iter().map(|(n, _)| n).collect();
    names.sort();
    Ok(ExportSummary {
        out: o.out.clone(),
        step: state.step,
        architecture: if m.sub_norm {
            "BitNetForCausalLM"
        } else {
            "BitNetB158ForCausalLM"
        },
        files: names,
    })
}

/// The run's `tokenizer.json` from the dataset folder, checked against the sha256 the checkpoint
/// recorded, and its special tokens (ids from the shard manifest).
fn run_tokenizer(shards: &Path, state: &TrainState) -> Result<(Vec<u8>, SpecialTokens)> {
    let path = shards.join(TOKENIZER_FILE);
    let bytes = fs::read(&path).with_context(|| {
        format!(
            "reading {}; hint: pass --shards with the dataset folder the run trained on (it holds tokenizer.json)",
            path.display()
        )
    })?;
    let sha = format!("{:x}", Sha256::digest(&bytes));
    let want = &state.shards.tokenizer_sha256;
    ensure!(
        sha.eq_ignore_ascii_case(want),
        "{}: sha256 {sha}, the run was trained with tokenizer sha256 {want}; hint: pass --shards with the dataset folder the run trained on",
        path.display()
    );
    let manifest = Manifest::load(shards)?;
    let tokenizer = tokenizers::Tokenizer::from_bytes(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let name = |id: u32| {
        tokenizer.id_to_token(id).with_context(|| {
            format!(
                "{}: no token with id {id} (the manifest's bos/eos id)",
                path.display()
            )
        })
    };
    let tokens = SpecialTokens {
        bos: (name(manifest.bos_id)?, manifest.bos_id),
        eos: (name(manifest.eos_id)?, manifest.eos_id),
        unk: tokenizer
            .get_added_tokens_decoder()
            .values()
            .find(|t| t.special && t.content == "<unk>")
            .map(|t| t.content.clone()),
    };
    Ok((bytes, tokens))
}

/// The model card from the checkpoint and whatever its run folder holds.
fn card_inputs_and_card(o: &ExportOptions, state: &TrainState) -> String {
    let run = RunDir::of_checkpoint(&o.checkpoint).ok();
    let read_json = |path: PathBuf| -> Option<String> { fs::read_to_string(path).ok() };
    let fingerprint = run.as_ref().and_then(|r| {
        read_json(meta_dir(r.path()).join("dataset_fingerprint.json"))
            .and_then(|s| serde_json::from_str::<DatasetFingerprint>(&s).ok())
    });
    let provenance = run.as_ref().and_then(|r| {
        read_json(meta_dir(r.path()).join("provenance.json"))
            .and_then(|s| serde_json::from_str::<Provenance>(&s).ok())
    });
    let eval = run.as_ref().and_then(|r| {
        read_json(eval_path(r.path())).and_then(|s| last_eval_at_or_before(&s, state.step))
    });
    card::model_card(&CardInputs {
        state,
        run_id: run.as_ref().map(RunDir::id),
        fingerprint,
        provenance,
        eval,
        checkpoint: o.checkpoint.display().to_string(),
    })
}

/// The eval record with the highest step <= `step` in `eval_results.jsonl` text (a resumed run
/// may repeat a step: the later line wins).
pub fn last_eval_at_or_before(jsonl: &str, step: u64) -> Option<EvalRecord> {
    jsonl
        .lines()
        .filter_map(|l| serde_json::from_str::<EvalRecord>(l).ok())
        .filter(|r| r.step <= step)
        .fold(None, |best: Option<EvalRecord>, r| match &best {
            Some(b) if b.step > r.step => best,
            _ => Some(r),
        })
}

fn json_bytes(v: &serde_json::Value) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(v).expect("a JSON value serializes");
    s.push('\n');
    s.into_bytes()
}

/// The weights under their Hugging Face names, f32, with the `format: pt` metadata transformers
/// expects of a PyTorch safetensors file.
fn safetensors_bytes(params: &Params, m: &crate::config::ModelConfig) -> Result<Vec<u8>> {
    let tensors = names::hf_tensors(params, m)?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(safetensors::tensor::serialize(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
    )?)
}

/// Writes `file` into `dir` through a temporary name: write, fsync, rename.
fn write_file_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("renaming {}", tmp.display()))
}

/// Writes `files` into a temporary sibling of `out`, then renames it to `out` (see the module
/// docs). An existing non-empty `out` is replaced only with `force`.
fn write_folder_atomically(out: &Path, files: &[(String, Vec<u8>)], force: bool) -> Result<()> {
    let name = out
        .file_name()
        .with_context(|| {
            format!(
                "--out {}: not a folder name; hint: pass e.g. exports/my-model",
                out.display()
            )
        })?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let occupied = match fs::read_dir(out) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "--out {}: exists and is not a readable folder",
                    out.display()
                )
            });
        }
    };
    if occupied && !force {
        bail!(
            "--out {}: folder exists and is not empty; hint: choose another folder or pass --force to replace it",
            out.display()
        );
    }
    fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".{name}.export.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    for (file, bytes) in files {
        write_file_atomically(&tmp, file, bytes)?;
    }
    File::open(&tmp)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync {}", tmp.display()))?;
    if out.exists() {
        let old = parent.join(format!(".{name}.export.old"));
        let _ = fs::remove_dir_all(&old);
        fs::rename(out, &old).with_context(|| format!("moving {} aside", out.display()))?;
        fs::rename(&tmp, out).with_context(|| format!("renaming {}", tmp.display()))?;
        fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    } else {
        fs::rename(&tmp, out).with_context(|| format!("renaming {}", tmp.display()))?;
    }
    File::open(&parent)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync {}", parent.display()))?;
    Ok(())
}

/// What `trainer logits` needs.
#[derive(Debug, Clone)]
pub struct LogitsOptions {
    pub checkpoint: PathBuf,
    pub shards: PathBuf,
    pub split: Split,
    /// Sequence indices of the split.
    pub sequences: std::ops::Range<u64>,
    /// A safetensors file: `tokens` [n, seq_len] (u32) and `logits` [n, seq_len, vocab] (f32).
    pub out: PathBuf,
}

/// `trainer logits`: the model's logits (inference form, as generation uses it) for shard
/// sequences, on the CPU in f32; returns the mean next-token loss over them.
pub fn dump_logits(o: &LogitsOptions) -> Result<f64> {
    let device = Device::Cpu;
    let state = checkpoint::load_state(&o.checkpoint)?;
    let weights = o.checkpoint.join(checkpoint::MODEL_FILE);
    let params = Params::load(&weights, &state.config.model, &device)
        .with_context(|| format!("loading {}", weights.display()))?;
    let manifest = Manifest::load(&o.shards)?;
    crate::data::check_manifest(&manifest, &o.shards, &state.config)?;
    let total = manifest.split(o.split).sequences;
    ensure!(
        !o.sequences.is_empty() && o.sequences.end <= total,
        "--sequences {}..{}: the {:?} split holds sequences 0..{total}; hint: pass A..B with A < B <= {total}",
        o.sequences.start,
        o.sequences.end,
        o.split
    );
    let data = SplitData::open(&manifest, &o.shards, o.split)?;
    let model = params.model(&state.config.model)?.freeze()?;
    let seq_len = manifest.seq_len as usize;
    let indices: Vec<u64> = o.sequences.clone().collect();
    let tokens = Tensor::from_vec(data.load(&indices), (indices.len(), seq_len), &device)?;
    let mut logits = Vec::with_capacity(indices.len());
    for i in 0..indices.len() {
        logits.push(model.forward(&tokens.narrow(0, i, 1)?, 0, None)?);
    }
    let logits = Tensor::cat(&logits, 0)?.to_dtype(DType::F32)?;
    let loss = crate::model::next_token_loss(&logits, &tokens)?.to_scalar::<f32>()? as f64;
    let bytes = safetensors::tensor::serialize(
        [("logits", &logits), ("tokens", &tokens)],
        Some(HashMap::from([(
            "checkpoint".to_string(),
            o.checkpoint.display().to_string(),
        )])),
    )?;
    let name = o
        .out
        .file_name()
        .with_context(|| format!("--out {}: not a file name", o.out.display()))?
        .to_string_lossy()
        .into_owned();
    let dir = match o.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write_file_atomically(&dir, &name, &bytes)?;
    Ok(loss)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{RngState, ScheduleState, ShardFingerprint};
    use crate::config::Config;
    use crate::model::parameter_shapes;
    use crate::optim::AdamW;
    use crate::synthetic::{Pattern, SyntheticSpec, write_dataset};

    fn fixture_tokenizer() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer/tokenizer.json")
    }

    /// A dataset folder with `tokenizer` as its tokenizer.json (its sha256 in the manifest).
    fn shards(dir: &Path, tokenizer: &[u8]) -> PathBuf {
        let sha = format!("{:x}", Sha256::digest(tokenizer));
        let spec = SyntheticSpec {
            seq_len: 16,
            vocab_size: 97,
            train_sequences: 8,
            eval_sequences: 2,
            sequences_per_shard: 8,
            tokenizer_sha256: sha,
            pattern: Pattern::Position,
        };
        write_dataset(dir, &spec).unwrap();
        fs::write(dir.join(TOKENIZER_FILE), tokenizer).unwrap();
        dir.to_path_buf()
    }

    /// `runs/<id>/checkpoints/step_000003` of the tiny model, with two evals (steps 2 and 5) and
    /// the dataset fingerprint in the run folder.
    fn checkpoint(root: &Path, sub_norm: bool, tokenizer_sha256: &str) -> (PathBuf, Params) {
        let mut cfg =
            Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny.toml"))
                .unwrap();
        cfg.model = crate::model::tests::tiny(sub_norm);
        cfg.training.seq_len = 16;
        let params = Params::init(&cfg.model, 5, &Device::Cpu).unwrap();
        let opt = AdamW::new(&params, &cfg.training).unwrap();
        let state = TrainState {
            step: 3,
            tokens_seen: 3 * cfg.tokens_per_step(),
            schedule: ScheduleState {
                current_step: 3,
                lr: 1e-3,
                wd: 0.1,
                lr_knots: cfg.training.lr_knots.clone(),
                wd_knots: cfg.training.wd_knots.clone(),
            },
            rng: RngState::new(cfg.training.seed),
            loss: Some(4.25),
            config: cfg,
            shards: ShardFingerprint {
                dataset_sha256: "d".repeat(64),
                train_sequences: 8,
                first_1000_token_ids_sha256: "f".repeat(64),
                tokenizer_sha256: tokenizer_sha256.into(),
            },
        };
        let run = root.join("run_x");
        let ckpt = checkpoint::save(&run.join("checkpoints"), &params, &opt, &state).unwrap();
        fs::create_dir_all(run.join("eval")).unwrap();
        let eval = |step: u64, loss: f64| {
            format!(
                r#"{{"step":{step},"eval_loss":{loss},"train_loss":null,"train_eval_gap":null,"eval_ppl":{},"bits_per_byte":1.2345,"eval_sequences":2,"eval_predicted_tokens":30,"eval_seconds":0.1,"tokens_seen":0}}"#,
                loss.exp()
            )
        };
        fs::write(
            eval_path(&run),
            format!("{}\n{}\n", eval(2, 6.5432), eval(5, 5.0)),
        )
        .unwrap();
        (ckpt, params)
    }

    fn config(dir: &Path) -> serde_json::Value {
        serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
    }

    #[test]
    fn export_writes_the_transformers_folder_with_split_tensors() {
        let tokenizer = fs::read(fixture_tokenizer()).unwrap();
        let sha = format!("{:x}", Sha256::digest(&tokenizer));
        for sub_norm in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let shards = shards(&tmp.path().join("shards"), &tokenizer);
            let (ckpt, params) = checkpoint(tmp.path(), sub_norm, &sha);
            let out = tmp.path().join("exports").join("tiny");
            let o = ExportOptions {
                checkpoint: ckpt.clone(),
                shards: shards.clone(),
                out: out.clone(),
                force: false,
            };
            let summary = export(&o).unwrap();
            assert_eq!(summary.step, 3);

            // The files, and nothing temporary left next to them.
            let mut listed: Vec<String> = fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            listed.sort();
            let mut want = vec![
                "README.md",
                "config.json",
                "generation_config.json",
                "model.safetensors",
                "special_tokens_map.json",
                "tokenizer.json",
                "tokenizer_config.json",
            ];
            if !sub_norm {
                want.extend(["configuration_bitnet_b158.py", "modeling_bitnet_b158.py"]);
            }
            want.sort();
            assert_eq!(listed, want, "sub_norm {sub_norm}");
            assert_eq!(summary.files, want);
            let siblings: Vec<String> = fs::read_dir(out.parent().unwrap())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(siblings, ["tiny"]);
            assert_eq!(fs::read(out.join(TOKENIZER_FILE)).unwrap(), tokenizer);

            // config.json: the architecture of each variant and our shapes.
            let c = config(&out);
            let m = crate::model::tests::tiny(sub_norm);
            assert_eq!(c["hidden_size"], m.hidden_size);
            assert_eq!(c["intermediate_size"], m.ffn_hidden_size);
            assert_eq!(c["num_key_value_heads"], m.num_kv_heads);
            assert_eq!(c["max_position_embeddings"], m.max_seq_length);
            assert_eq!(c["rope_parameters"]["rope_theta"], m.rope_theta);
            assert_eq!(c["tie_word_embeddings"], true);
            assert_eq!(
                (c["bos_token_id"].clone(), c["eos_token_id"].clone()),
                (1.into(), 2.into())
            );
            if sub_norm {
                assert_eq!(c["model_type"], "bitnet");
                assert_eq!(c["quantization_config"]["quantization_mode"], "online");
                assert_eq!(c["quantization_config"]["linear_class"], "autobitlinear");
                assert!(c.get("auto_map").is_none());
            } else {
                assert_eq!(c["model_type"], "bitnet_b158");
                let module = c["auto_map"]["AutoModelForCausalLM"].as_str().unwrap();
                assert!(
                    out.join(format!("{}.py", module.split('.').next().unwrap()))
                        .is_file()
                );
                assert!(c.get("quantization_config").is_none());
            }
            let tc: serde_json::Value = serde_json::from_str(
                &fs::read_to_string(out.join("tokenizer_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(
                (tc["bos_token"].as_str(), tc["eos_token"].as_str()),
                (Some("<s>"), Some("</s>"))
            );

            // The weights: Hugging Face names, PyTorch metadata, every tensor ours, the fused ones
            // concatenating back to our tensors, no separate LM head.
            let bytes = fs::read(out.join(WEIGHTS_FILE)).unwrap();
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
            let hf = candle_core::safetensors::load(out.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
            let (hd, nh, nkv, f) = (m.head_dim(), m.num_heads, m.num_kv_heads, m.ffn_hidden_size);
            assert_eq!(
                hf["model.layers.1.self_attn.q_proj.weight"].dims(),
                &[nh * hd, m.hidden_size]
            );
            assert_eq!(
                hf["model.layers.1.self_attn.k_proj.weight"].dims(),
                &[nkv * hd, m.hidden_size]
            );
            assert_eq!(
                hf["model.layers.0.mlp.up_proj.weight"].dims(),
                &[f, m.hidden_size]
            );
            assert_eq!(
                hf["model.embed_tokens.weight"].dims(),
                &[m.vocab_size, m.hidden_size]
            );
            assert!(!hf.contains_key("lm_head.weight"));
            let mut used = 0;
            for (name, _) in parameter_shapes(&m) {
                let pieces = hf_names_of(&name);
                let parts: Vec<&Tensor> = pieces.iter().map(|p| &hf[p]).collect();
                used += parts.len();
                let joined = Tensor::cat(&parts, 0).unwrap();
                let ours = params.get(&name).unwrap().as_tensor();
                assert_eq!(joined.dims(), ours.dims(), "{name}");
                let d = (joined - ours).unwrap().abs().unwrap().max_all().unwrap();
                assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{name}");
            }
            assert_eq!(used, hf.len(), "tensors that are none of ours");
            let expected_blocks = if sub_norm { 11 } else { 9 };
            assert_eq!(hf.len(), 2 + m.num_layers * expected_blocks);

            // The model card: the eval at or before step 3 (step 2's), tokens seen, the data.
            let card = fs::read_to_string(out.join("README.md")).unwrap();
            for s in [
                "run_x, step 3",
                "loss 6.5432",
                "bits per byte 1.2345",
                "Frozen eval at step 2",
                &format!("{} tokens seen", group(3 * 8 * 16)),
                &"d".repeat(64),
                "4.2500",
            ] {
                assert!(
                    card.contains(s),
                    "sub_norm {sub_norm}: `{s}` missing from\n{card}"
                );
            }
            assert_eq!(card.contains("trust_remote_code=True"), !sub_norm);

            // A second export to the same folder needs --force, then replaces it.
            let err = export(&o).unwrap_err().to_string();
            assert!(err.contains("--force") && err.contains("tiny"), "{err}");
            fs::write(out.join("stale.txt"), "old").unwrap();
            export(&ExportOptions {
                force: true,
                ..o.clone()
            })
            .unwrap();
            assert!(!out.join("stale.txt").exists());
        }
    }

    fn hf_names_of(name: &str) -> Vec<String> {
        names::hf_names(name).unwrap()
    }

    fn group(x: u64) -> String {
        crate::model::group_thousands(x)
    }

    #[test]
    fn export_refuses_a_tokenizer_other_than_the_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let tokenizer = fs::read(fixture_tokenizer()).unwrap();
        let mut other = tokenizer.clone();
        other.extend_from_slice(b"\n");
        let shards = shards(&tmp.path().join("shards"), &other);
        let sha = format!("{:x}", Sha256::digest(&tokenizer));
        let (ckpt, _) = checkpoint(tmp.path(), false, &sha);
        let out = tmp.path().join("out");
        let err = export(&ExportOptions {
            checkpoint: ckpt,
            shards: shards.clone(),
            out: out.clone(),
            force: false,
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(&sha)
                && err.contains("tokenizer.json")
                && err.contains("hint: pass --shards"),
            "{err}"
        );
        assert!(!out.exists(), "nothing is written on an error");
        // No checkpoint there: one line naming the file.
        let err = export(&ExportOptions {
            checkpoint: tmp.path().join("nope"),
            shards,
            out,
            force: false,
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("state.json"), "{err:#}");
    }

    #[test]
    fn last_eval_is_the_latest_at_or_before_the_step() {
        let line = |s: u64| {
            format!(
                r#"{{"step":{s},"eval_loss":1.0,"train_loss":null,"train_eval_gap":null,"eval_ppl":2.7,"bits_per_byte":null,"eval_sequences":1,"eval_predicted_tokens":1,"eval_seconds":0.0,"tokens_seen":0}}"#
            )
        };
        let text = [line(0), line(250), "not json".into(), line(500), line(250)].join("\n");
        assert_eq!(last_eval_at_or_before(&text, 499).unwrap().step, 250);
        assert_eq!(last_eval_at_or_before(&text, 500).unwrap().step, 500);
        assert!(last_eval_at_or_before("", 10).is_none());
    }
}
