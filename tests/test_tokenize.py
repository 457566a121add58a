"""Tokenizer: the locally built tiny tokenizer, GLaMM's special tokens (order, ids kept on reload),
the llava_v1 template, image placeholders and an encode/decode round trip."""
from __future__ import annotations

from calico_jax.data.tokenize import (IMAGE_TOKEN_INDEX, SPECIAL_TOKENS, add_special_tokens,
                                      build_tiny_tokenizer, image_placeholder, llava_v1_prompt, load_tokenizer,
                                      tokenize_with_images)


def test_tiny_tokenizer_special_tokens(tmp_path):
    built = build_tiny_tokenizer(tmp_path / "tok", vocab_size=120)
    tok = load_tokenizer(tmp_path / "tok")
    ids = add_special_tokens(tok)
    assert list(ids) == list(SPECIAL_TOKENS)
    assert list(ids.values()) == list(range(120, 127)) and len(tok) == 127 == len(built)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    # Adding again (a checkpoint that already has them) keeps every id.
    assert add_special_tokens(tok) == ids and len(tok) == 127
    assert tok("[SEG]", add_special_tokens=False).input_ids == [ids["[SEG]"]]


def test_existing_tokens_keep_their_ids(tmp_path):
    build_tiny_tokenizer(tmp_path / "tok", vocab_size=110)
    tok = load_tokenizer(tmp_path / "tok", add_tokens=False)
    assert len(tok) == 117
    from transformers import AutoTokenizer
    raw = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert raw.convert_tokens_to_ids("[SEG]") == 114 and raw.convert_tokens_to_ids("</p>") == 116


def test_llava_v1_template_and_images(tmp_path):
    build_tiny_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    prompt = llava_v1_prompt([(image_placeholder() + "\nWhat are the parts?", "The <p> leg </p> [SEG] (1)."),
                              ("And the tail?", None)], system="SYS.")
    assert prompt == ("SYS. USER: <im_start><image><im_end>\nWhat are the parts? ASSISTANT: "
                      "The <p> leg </p> [SEG] (1).</s>USER: And the tail? ASSISTANT:")
    ids = tokenize_with_images(prompt, tok)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    i = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[i - 1] == tok.convert_tokens_to_ids("<im_start>") and ids[i + 1] == tok.convert_tokens_to_ids("<im_end>")
    assert tok.eos_token_id in ids and tok.unk_token_id not in ids
    two = tokenize_with_images(f"a {image_placeholder(False)} b {image_placeholder(False)} c", tok)
    assert two.count(IMAGE_TOKEN_INDEX) == 2
    # Round trip: decoding the ids (image slot aside) gives the text back.
    text = "The unique parts are the <p> neck </p> [SEG] (1) and the <p> wheel </p> [SEG] (2).</s>"
    enc = tok(text, add_special_tokens=False).input_ids
    assert tok.convert_tokens_to_ids("[SEG]") in enc
    assert tok.decode(enc) == text
