"""The axis alphabet and the logical axis names.

One letter per axis, used in einsum strings, shape comments and weight names
(``w_q_dnh`` is a ``[D, N, H]`` weight). Extend the alphabet here only.
"""

ALPHABET = {
    "B": "batch",
    "T": "query positions",
    "S": "key positions",
    "D": "model width",
    "F": "FFN hidden",
    "N": "query heads",
    "K": "key/value heads",
    "G": "query heads per KV head (N = K*G)",
    "H": "head dim",
    "V": "vocabulary",
    "L": "layers",
    "E": "experts",
    "C": "expert capacity",
    "R": "RoPE dim (MLA)",
    "A": "latent (KV LoRA) rank",
    "Q": "query LoRA rank",
    "M": "memory slots",
    "P": "product keys per side",
    # memory layers (llmarch.layers.memory); N and H there are memory heads and key width
    "U": "memory value-row width",
    "I": "memory row candidates / top-m slots per head",
    "J": "memory column candidates; heads x top-m picks per token in ops.memory_lookup",
    "Z": "TDQKR rank r (row side of a Tucker core)",
    "Y": "TDQKR rank r (column side of a Tucker core)",
    "X": "UltraMem Tucker cores h (multi-core scoring)",
    "W": "UltraMem IVE virtual blocks",
    # MoE dispatch (llmarch.layers.moe_dispatch); its flat token axis is written "..."
    "k": "MoE top-k: the routed choices of one token",
    # low-rank factorization (llmarch.lowrank): W [K, N] ~ A [K, r] · B [r, N]; the papers' r
    "r": "rank of a factorized linear weight",
    # vision towers (llmarch.vision): a patch flattened as (channel, row, column); T counts patches
    "O": "pixels of one image patch: channels x patch rows x patch columns",
    # vision-language models (llmarch.vision.llava): the tower's width where it meets the decoder's D
    "d": "vision tower width, the input of a multimodal projector",
    # multi-token prediction (llmarch.layers.mtp): a module's input [RMSNorm(Emb(t)); RMSNorm(h)]
    "c": "MTP projection input: an embedding and a hidden state concatenated, 2·D wide",
}

# Logical names of parameter axes. The rules in llmarch.sharding map them to mesh axes;
# model code names only these, never a mesh axis.
LAYERS = "layers"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
VOCAB = "vocab"
NORM = "norm"
EXPERT = "expert"
MEMORY_ROWS = "memory_rows"
LATENT = "latent"  # A: MLA's KV latent
Q_LATENT = "q_latent"  # Q: MLA's query latent

# Logical names of activation axes (kept apart from parameter axes so that, e.g., FSDP can
# shard the embed axis of weights without sharding the embed axis of activations).
BATCH = "batch"
SEQ = "seq"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_VOCAB = "act_vocab"

PARAM_AXES = (
    LAYERS,
    EMBED,
    MLP,
    HEADS,
    KV_HEADS,
    HEAD_DIM,
    VOCAB,
    NORM,
    EXPERT,
    MEMORY_ROWS,
    LATENT,
    Q_LATENT,
)
ACTIVATION_AXES = (BATCH, SEQ, ACT_EMBED, ACT_HEADS, ACT_VOCAB)
