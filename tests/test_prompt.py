"""qwen_1_5 prompt, tokenizer wrapper and placeholder handling (spec section 1, step 6)."""

from __future__ import annotations

import pytest

from earlytom_jax.errors import CheckpointError
from earlytom_jax.prompt import (
    QWEN_SYSTEM,
    PromptIds,
    Tokenizer,
    chat_prompt,
    encode_video_prompt,
    expand_placeholder,
    split_at_placeholder,
)
from tests.tiny_models import write_tokenizer

VOCAB = 160
VIDEO_ID = VOCAB - 3
IMAGE_ID = VOCAB - 4


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(str(d), VOCAB)
    return Tokenizer.from_dir(d)


def test_chat_prompt_exact():
    assert QWEN_SYSTEM == "You are a helpful assistant."
    assert chat_prompt("What is shown?") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<video>\nWhat is shown?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert chat_prompt("Q", placeholder="<image>") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nQ<|im_end|>\n<|im_start|>assistant\n"
    )


def test_missing_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_special_tokens_are_single_ids(tok):
    ids = tok.encode("<|im_start|>ab<video>c<|im_end|>")
    assert ids == [
        tok.token_id("<|im_start|>"),
        tok.token_id("a"),
        tok.token_id("b"),
        VIDEO_ID,
        tok.token_id("c"),
        tok.token_id("<|im_end|>"),
    ]
    assert tok.token_id("<video>") == VIDEO_ID and tok.token_id("<image>") == IMAGE_ID
    assert tok.encode("a")[0] == tok.token_id("a")  # no BOS


def test_round_trip(tok):
    text = "Answer:(B)the_cat,42!"
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    with_specials = [tok.token_id("<|im_start|>")] + ids + [tok.token_id("<|im_end|>")]
    assert tok.decode(with_specials) == text
    assert tok.decode(with_specials, skip_special_tokens=False) == "<|im_start|>" + text + "<|im_end|>"


def test_eos_ids_and_unknown_token(tok):
    assert tok.eos_ids == (tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>"))
    assert tok.vocab_size == VIDEO_ID + 1  # the model vocab (VOCAB) is padded past the tokenizer
    with pytest.raises(ValueError, match="not in the tokenizer"):
        tok.token_id("<|nope|>")


def test_split_and_expand():
    ids = [1, 2, 9, 3, 4]
    assert split_at_placeholder(ids, 9) == PromptIds(prefix=(1, 2), suffix=(3, 4))
    assert expand_placeholder(ids, 9, 3) == [1, 2, 9, 9, 9, 3, 4]
    assert expand_placeholder(ids, 9, 1) == ids
    with pytest.raises(ValueError, match="exactly one"):
        split_at_placeholder([1, 2, 3], 9)
    with pytest.raises(ValueError, match="exactly one"):
        split_at_placeholder([9, 1, 9], 9)


def test_encode_video_prompt_matches_whole_string(tok):
    q = "Question:Which?\nOption:\n(A)x\n(B)y\nOnly"
    p = encode_video_prompt(tok, q, VIDEO_ID)
    whole = tok.encode(chat_prompt(q))
    assert list(p.prefix) + [VIDEO_ID] + list(p.suffix) == whole
    assert split_at_placeholder(whole, VIDEO_ID) == p
    assert p.prefix[-2:] == (tok.token_id("r"), tok.encode("\n")[0])  # "...user\n"
    assert p.suffix[-1:] == tuple(tok.encode("\n"))
    n = 2 * 196 + 1
    assert p.expanded(VIDEO_ID, n) == expand_placeholder(whole, VIDEO_ID, n)
    assert len(p.expanded(VIDEO_ID, n)) == len(whole) - 1 + n


def test_encode_video_prompt_errors(tok):
    with pytest.raises(ValueError, match="placeholder id"):
        encode_video_prompt(tok, "q", IMAGE_ID)  # tokenizer maps <video> elsewhere
    with pytest.raises(ValueError, match="contains the placeholder"):
        encode_video_prompt(tok, "look<video>again", VIDEO_ID)
