//! The model card, `README.md` of an export: what the model is, how to load and evaluate it, its
//! config, how it was trained (from the checkpoint's `state.json` and the run's `meta/`), the
//! dataset fingerprint and the last frozen eval at or before the exported step (from
//! `eval/eval_results.jsonl`). What the run folder does not hold is said to be missing, never
//! guessed.

use std::fmt::Write as _;

use crate::checkpoint::TrainState;
use crate::config::Knot;
use crate::instrument::eval::EvalRecord;
use crate::instrument::provenance::{DatasetFingerprint, Provenance};
use crate::model::{group_thousands, parameter_count};

/// Everything the card reports.
#[derive(Debug, Clone)]
pub struct CardInputs<'a> {
    pub state: &'a TrainState,
    pub run_id: Option<String>,
    pub fingerprint: Option<DatasetFingerprint>,
    pub provenance: Option<Provenance>,
    /// The last eval at or before the exported step.
    pub eval: Option<EvalRecord>,
    /// Where the card's numbers came from (the checkpoint folder, as given).
    pub checkpoint: String,
}

fn knots(k: &[Knot]) -> String {
    k.iter()
        .map(|k| format!("{} at step {}", k.value, k.step))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `README.md` of the export folder.
pub fn model_card(c: &CardInputs) -> String {
    let s = c.state;
    let m = &s.config.model;
    let t = &s.config.training;
    let params = parameter_count(m) as u64;
    // The hub id the run was configured for (the manifest may name a local copy instead).
    let dataset = s.config.data.dataset.as_str();
    let trust = if m.sub_norm {
        ""
    } else {
        ", trust_remote_code=True"
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\nlanguage:\n- en\ndatasets:\n- {dataset}\ntags:\n- bitnet\n- bitnet-b1.58\n- ternary\n---\n"
    );
    let title = c.run_id.as_deref().unwrap_or("BitNet b1.58");
    let _ = writeln!(o, "# {title}, step {}\n", s.step);
    let _ = writeln!(
        o,
        "A {}-parameter BitNet b1.58 decoder (ternary weights, 8-bit activations) trained from scratch on `{dataset}` \
         by the `trainer` of bitnet-fineweb: step {} of {}, {} tokens seen. Exported with `trainer export` from `{}`.\n",
        group_thousands(params),
        s.step,
        t.total_steps,
        group_thousands(s.tokens_seen),
        c.checkpoint
    );

    let _ = writeln!(o, "## Use\n");
    if m.sub_norm {
        let _ = writeln!(
            o,
            "The native `BitNetForCausalLM` of transformers (`model_type: bitnet`), no remote code. Its BitNet \
             quantizer needs `accelerate` installed.\n"
        );
    } else {
        let _ = writeln!(
            o,
            "No class of transformers has these blocks (BitLinear without the sub-norms of `BitNetForCausalLM`): \
             the folder ships `configuration_bitnet_b158.py` and `modeling_bitnet_b158.py`, named in `auto_map`, \
             so load it with `trust_remote_code=True` (the tokenizer too: `AutoTokenizer` reads `config.json` first, \
             whose config class is the shipped code).\n"
        );
    }
    let _ = writeln!(
        o,
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n\
         tokenizer = AutoTokenizer.from_pretrained(\"PATH\"{trust})\n\
         model = AutoModelForCausalLM.from_pretrained(\"PATH\"{trust})\n\
         ids = tokenizer(\"The water cycle\", return_tensors=\"pt\").input_ids  # starts with <s>\n\
         print(tokenizer.decode(model.generate(ids, max_new_tokens=50)[0]))  # greedy\n```\n"
    );
    let _ = writeln!(
        o,
        "Evaluate with lm-evaluation-harness:\n\n```bash\nlm_eval --model hf --model_args pretrained=PATH{},dtype=float32 --tasks hellaswag --device cpu --batch_size 8\n```\n",
        if m.sub_norm {
            ""
        } else {
            ",trust_remote_code=True"
        }
    );
    let _ = writeln!(
        o,
        "The context is {} tokens (`max_position_embeddings`): the model was never trained on later positions, \
         and the shipped modeling code refuses them.\n",
        m.max_seq_length
    );

    let _ = writeln!(o, "## Model\n");
    let _ = writeln!(o, "| | |\n|---|---|");
    for (k, v) in [
        ("parameters", group_thousands(params)),
        ("vocabulary", m.vocab_size.to_string()),
        ("hidden size", m.hidden_size.to_string()),
        ("layers", m.num_layers.to_string()),
        (
            "attention heads (query : key/value)",
            format!(
                "{} : {} (head dim {})",
                m.num_heads,
                m.num_kv_heads,
                m.head_dim()
            ),
        ),
        (
            "feed-forward",
            format!("SwiGLU, {} per gate/up", m.ffn_hidden_size),
        ),
        (
            "sub-norms before o_proj / down_proj",
            if m.sub_norm { "yes" } else { "no" }.into(),
        ),
        ("RMSNorm eps", m.norm_eps.to_string()),
        ("RoPE theta", m.rope_theta.to_string()),
        ("context", m.max_seq_length.to_string()),
        (
            "LM head",
            "tied to the token embedding (`tie_word_embeddings`)".into(),
        ),
    ] {
        let _ = writeln!(o, "| {k} | {v} |");
    }
    let _ = writeln!(
        o,
        "\n`model.safetensors` holds the latent float32 weights under the Hugging Face Llama names (q/k/v and \
         gate/up as separate projections). Every projection is BitLinear: weights `W_q = clamp(round(W / g), -1, 1) * g` \
         with `g = max(mean|W|, 1e-5)` per projection, activations per token `x_q = clamp(round(x * s), -128, 127) / s` \
         with `s = 127 / max(max|x|, 1e-5)`, quantized when the model runs, as in training. The trainer (Rust) rounds \
         halves away from zero; torch rounds them to even. The shipped modeling code rounds as the trainer does; the \
         native BitNet class of transformers rounds to even, which differs only at exact ties.\n"
    );

    let _ = writeln!(o, "## Training\n");
    let _ = writeln!(o, "| | |\n|---|---|");
    let mut rows: Vec<(&str, String)> = vec![
        ("steps", format!("{} of {}", s.step, t.total_steps)),
        ("tokens seen", group_thousands(s.tokens_seen)),
        (
            "batch",
            format!(
                "{} sequences x {} tokens, gradient accumulation over {}",
                t.batch_size, t.seq_len, t.grad_accumulation_steps
            ),
        ),
        (
            "optimizer",
            format!(
                "AdamW (beta1 {}, beta2 {}, eps {}), gradient clipping at norm {}",
                t.adam_beta1, t.adam_beta2, t.adam_eps, t.grad_clip_norm
            ),
        ),
        ("learning rate (linear between knots)", knots(&t.lr_knots)),
        ("weight decay (constant from each knot)", knots(&t.wd_knots)),
        ("seed", t.seed.to_string()),
        (
            "last training loss",
            s.loss
                .map_or("- (initial weights)".into(), |l| format!("{l:.4}")),
        ),
    ];
    if let Some(p) = &c.provenance {
        rows.push((
            "code",
            format!(
                "trainer {} at git {}{}",
                p.trainer_version,
                p.git_commit,
                if p.git_dirty { " (dirty)" } else { "" }
            ),
        ));
        rows.push((
            "hardware",
            format!(
                "{} ({}), candle {}",
                p.device,
                p.gpu_model.as_deref().unwrap_or(&p.cpu_model),
                p.candle_version
            ),
        ));
        rows.push(("started", p.timestamp_utc.clone()));
    }
    for (k, v) in rows {
        let _ = writeln!(o, "| {k} | {v} |");
    }
    let _ = writeln!(
        o,
        "\nStraight-through estimator for both quantizers, float32 master weights, no dropout; each batch is a \
         seeded permutation of the training sequences, no sequence seen twice.\n"
    );

    let _ = writeln!(o, "## Data\n");
    match &c.fingerprint {
        Some(f) => {
            let _ = writeln!(o, "| | |\n|---|---|");
            for (k, v) in [
                (
                    "dataset",
                    format!("`{}` at revision `{}`", f.dataset_name, f.hf_revision),
                ),
                ("size", f.dataset_size_tokens.clone()),
                ("dataset_sha256", format!("`{}`", f.dataset_sha256)),
                (
                    "first 1,000 token ids sha256",
                    format!("`{}`", f.first_1000_token_ids_sha256),
                ),
                (
                    "tokenizer",
                    format!("`{}`, sha256 `{}`", f.tokenizer_source, f.tokenizer_sha256),
                ),
                ("sequence length", f.seq_len.to_string()),
                ("sampling", f.sampling_strategy.clone()),
            ] {
                let _ = writeln!(o, "| {k} | {v} |");
            }
        }
        None => {
            let _ = writeln!(
                o,
                "The run's `meta/dataset_fingerprint.json` was not found; the checkpoint records dataset_sha256 \
                 `{}`, {} train sequences, tokenizer sha256 `{}`.",
                s.shards.dataset_sha256, s.shards.train_sequences, s.shards.tokenizer_sha256
            );
        }
    }

    let _ = writeln!(o, "\n## Evaluation\n");
    match &c.eval {
        Some(e) => {
            let _ = writeln!(
                o,
                "Frozen eval at step {} ({} held-out sequences of the shards' eval split, {} predicted tokens): \
                 loss {:.4} nats/token, perplexity {:.2}, bits per byte {}.",
                e.step,
                e.eval_sequences,
                group_thousands(e.eval_predicted_tokens),
                e.eval_loss,
                e.eval_ppl,
                e.bits_per_byte.map_or("-".into(), |b| format!("{b:.4}"))
            );
            if e.step != s.step {
                let _ = writeln!(
                    o,
                    "\nThat is the last eval at or before the exported step {}; `trainer eval --checkpoint` measures \
                     this step itself.",
                    s.step
                );
            }
        }
        None => {
            let _ = writeln!(
                o,
                "No eval at or before step {} in the run's `eval/eval_results.jsonl`; `trainer eval --checkpoint` \
                 measures one.",
                s.step
            );
        }
    }
    if !o.ends_with('\n') {
        o.push('\n');
    }
    o
}
