"""Configuration of the BitNet b1.58 decoder exported by `trainer export` (bitnet-fineweb).

The keys are those of Hugging Face Llama configs where the meaning is the same; `model_type`
`bitnet_b158` is this export's own (the native `bitnet` type of transformers has no variant without
the sub-norms, see README.md of the export).
"""

try:  # transformers >= 5
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig


class BitNetB158Config(_BaseConfig):
    model_type = "bitnet_b158"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=6,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.02,
        use_cache=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # Set again after the base class, which may normalise RoPE keys of its own.
        self.rope_theta = rope_theta
