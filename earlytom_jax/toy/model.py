"""The toy model's shape, its word-level tokenizer and its checkpoint files.

The architecture is LLaVA-OneVision's (SigLIP blocks, 2-layer GELU projector, 2x2 bilinear
pooling, Qwen2 with GQA and RoPE), only small: 48 px frames cut into 8 px patches (6x6 = 36
per frame, pooled to 3x3 = 9 LLM tokens per frame), a 4-block 64-wide encoder and a 4-layer
128-wide LLM, about 0.95 M parameters.
"""

from __future__ import annotations

import json
import os

from earlytom_jax.config import LlavaOVConfig, Qwen2Config, SiglipConfig
from earlytom_jax.synthetic import SPECIALS
from earlytom_jax.toy.data import vocabulary

TOY_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "toy")  # the shipped model

VOCAB_SIZE = 80
IMAGE_TOKEN_ID = VOCAB_SIZE - 2
VIDEO_TOKEN_ID = VOCAB_SIZE - 1
IMAGE_SIZE = 48
NUM_FRAMES = 16

TOY_CONFIG = LlavaOVConfig(
    vision=SiglipConfig(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                        image_size=IMAGE_SIZE, patch_size=8),
    text=Qwen2Config(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                     num_kv_heads=2, head_dim=32, vocab_size=VOCAB_SIZE, tie_word_embeddings=True,
                     max_position_embeddings=2048),
    video_token_id=VIDEO_TOKEN_ID,
    image_token_id=IMAGE_TOKEN_ID,
)

# EarlyTom's compression layers and in-LLM merge layer scaled to this depth (the official
# defaults P = 6, 21, 23 of 26 blocks and k = 18 of 24 layers, at the same relative depth)
TOY_LAYERS = (1, 2, 3)
TOY_LLM_LAYER = 3
TOY_FASTV_LAYER = 1

# What the checkpoint says about itself (config.json key "earlytom", read by
# compression/defaults.py): its compression defaults, and that it only knows its
# multiple-choice questions.
CHECKPOINT_INFO = {
    "defaults": {"earlytom": {"layers": list(TOY_LAYERS), "llm_layer": TOY_LLM_LAYER},
                 "fastv": {"layer": TOY_FASTV_LAYER}},
    "multiple_choice_only": True,
    "note": "the toy model only knows its five multiple-choice question types (the colour of a square, "
            "how many flashes, which colour appears first, which way a square moves, when the screen goes dark) "
            "and answers anything else with a letter",
}


def tokenizer():
    """A `tokenizers.Tokenizer`: one id per word of the toy prompts (`data.vocabulary`), split
    like tokenizers' `Whitespace`, with Qwen2's special tokens at the end of the vocabulary
    (`<video>` = VOCAB_SIZE - 1)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    words = ["<unk>"] + vocabulary()
    n_plain = IMAGE_TOKEN_ID - len(SPECIALS)
    if len(words) > n_plain:
        raise ValueError(f"toy vocabulary has {len(words)} words, room for {n_plain}")
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"<|w{i}|>": i for i in range(len(vocab), n_plain)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS + ("<image>", "<video>")])
    assert tok.token_to_id("<video>") == VIDEO_TOKEN_ID
    return tok


def write_side_files(directory: str) -> None:
    """tokenizer.json, tokenizer_config.json and preprocessor_config.json."""
    from earlytom_jax.io_utils import atomic_write_text

    os.makedirs(directory, exist_ok=True)
    atomic_write_text(os.path.join(directory, "tokenizer.json"), tokenizer().to_str(pretty=True))
    atomic_write_text(os.path.join(directory, "tokenizer_config.json"), json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "unk_token": "<unk>"}, indent=2) + "\n")
    atomic_write_text(os.path.join(directory, "preprocessor_config.json"), json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
         "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 3,
         "rescale_factor": 1 / 255, "do_rescale": True, "do_normalize": True}, indent=2) + "\n")


def save_checkpoint(params, directory: str, meta: dict | None = None) -> None:
    """The full HF-layout checkpoint directory (weights in fp32 safetensors)."""
    from earlytom_jax.checkpoint.export import save_hf
    from earlytom_jax.io_utils import atomic_write_text

    save_hf(params, TOY_CONFIG, directory)
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["earlytom"] = CHECKPOINT_INFO
    atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")
    write_side_files(directory)
    if meta is not None:
        atomic_write_text(os.path.join(directory, "training.json"), json.dumps(meta, indent=2) + "\n")
