"""Model shape presets shared by the benchmark scripts; imports nothing, so hosts without mlx or torch can use it."""

SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "mistral-7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False, rope_theta=1000000.0),
}


def train_flops_per_token(shape: dict, seq: int) -> int:
    """Useful FLOPs per trained token of a LoRA step over a frozen base: forward (2 x weights) and the input
    gradients (2 x weights) of every linear and the lm_head, plus causal-free attention scores and values
    (forward 4 x seq x hidden per layer, backward twice that). LoRA's own matmuls (<1% at rank 8) are left out;
    recomputation (checkpointing, dequantizing again) counts as overhead, not as useful work."""
    h, layers, inter = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    weights = layers * per_layer + h * shape["vocab_size"]
    return 4 * weights + 12 * layers * seq * h
