"""Tokenizer: the locally built tiny tokenizer, GLaMM's special tokens (order, ids kept on reload),
the llava_v1 template, image placeholders and an encode/decode round trip; training samples: labels,
[SEG] -> image routing, truncation that drops instead of separating a [SEG] from its identifier."""
from __future__ import annotations

from calico_jax.core.tokens import IGNORE_INDEX, IMAGE_TOKEN_INDEX, SPECIAL_TOKENS
from calico_jax.data.tokenize import (
    SampleTokenizer,
    add_special_tokens,
    build_tiny_tokenizer,
    image_placeholder,
    llava_v1_prompt,
    load_tokenizer,
    tokenize_with_images,
)


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


# ------------------------------------------------------------------------------ training samples
Q = ("The <image> (IMAGE1) and <image> (IMAGE2) provide an overview of the pictures. "
     "Can you segment the common parts of the objects in these images?")
A = ("The images show a <p> chair </p> [SEG] (IMAGE1) and a <p> stool </p> [SEG] (IMAGE2). "
     "The common parts are <p> leg </p> [SEG] (IMAGE1) [SEG] (IMAGE2) and <p> seat </p> [SEG] (IMAGE1) [SEG] (IMAGE2).")


def _sample_tok(tmp_path, max_len):
    build_tiny_tokenizer(tmp_path / "tok", [Q, A], vocab_size=300)
    tok = load_tokenizer(tmp_path / "tok")
    return tok, SampleTokenizer(tok, max_len)


def test_sample_ids_labels_and_seg_routing(tmp_path):
    tok, st = _sample_tok(tmp_path, 1000)
    s, kind, _ = st(Q, A)
    assert kind is None and not s.truncated and s.num_images == 2
    ids, labels = s.input_ids.tolist(), s.labels.tolist()
    # Pieces concatenated = the whole conversation tokenized at once.
    assert ids == tokenize_with_images(llava_v1_prompt([(Q.replace("<image>", image_placeholder()), A)]), tok)
    n_prompt = len(tokenize_with_images(st.prompt_text(Q), tok))
    assert st.prompt_text(Q).endswith("ASSISTANT:") and st.prompt_text(Q).count("<im_start><image><im_end>") == 2
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[n_prompt:-1]).strip() == A and ids[-1] == tok.eos_token_id
    assert IMAGE_TOKEN_INDEX not in labels and ids.count(IMAGE_TOKEN_INDEX) == 2
    seg = tok.convert_tokens_to_ids("[SEG]")
    assert labels.count(seg) == 6 and s.seg_images == (0, 1, 0, 1, 0, 1)
    # No space before the identifier: the token fast path misses, the decoding slow path finds it.
    s2, kind, _ = st(Q, "A <p> leg </p> [SEG](IMAGE2).")
    assert kind is None and s2.seg_images == (1,)


def test_truncation_never_separates_seg_from_identifier(tmp_path):
    tok, st = _sample_tok(tmp_path, 1000)
    full = st(Q, A)[0].input_ids.tolist()
    n = len(full)
    seg = tok.convert_tokens_to_ids("[SEG]")
    last_seg = max(i for i, t in enumerate(full) if t == seg)
    ident_end = next(e for e in range(last_seg + 1, n) if "(IMAGE2)" in tok.decode(full[last_seg + 1:e]))
    # This tokenizer merges the last identifier with the final "." ("▁(IMAGE2)."): slow path, one token.
    assert ident_end == last_seg + 2 == n - 1
    for max_len in range(ident_end, n):          # only "</s>" cut: kept, marked truncated
        s, kind, _ = SampleTokenizer(tok, max_len)(Q, A)
        assert kind is None and s.truncated and s.input_ids.tolist() == full[:max_len]
        assert s.labels.tolist().count(seg) == 6
    n_prompt = len(st.prompt_ids(Q))
    for max_len in (ident_end - 1, last_seg, (n_prompt + last_seg) // 2, n_prompt + 1):   # a [SEG]/identifier lost
        s, kind, detail = SampleTokenizer(tok, max_len)(Q, A)
        assert s is None and kind == "too_long_seg" and f"max_len {max_len}" in detail
    assert SampleTokenizer(tok, n_prompt)(Q, A)[1] == "too_long_prompt"
    assert st(Q, "The <p> leg </p> [SEG] and more.")[1] == "bad_seg_identifier"
    assert st(Q, "The <p> leg </p> [SEG] (IMAGE3).")[1] == "bad_seg_identifier"


def test_sentencepiece_only_checkpoint(tmp_path):
    """A LLaMA/Vicuna directory with only ``tokenizer.model`` (no tokenizer.json) loads, gets the
    grounding tokens, and round-trips text."""
    import json as _json

    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["The images show a mug and a cup. The common parts are handle and body."] * 40
                                + ["a chair has a seat and legs", "a dog has a head and a tail"] * 20))
    model_dir = tmp_path / "llama"
    model_dir.mkdir()
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(model_dir / "tokenizer"), vocab_size=300,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True,
                                   character_coverage=1.0, minloglevel=2)
    (model_dir / "tokenizer.vocab").unlink()
    (model_dir / "tokenizer_config.json").write_text(_json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True}))
    tok = load_tokenizer(model_dir)
    ids = tok.convert_tokens_to_ids(["<im_start>", "<im_end>", "<bbox>", "<point>", "[SEG]", "<p>", "</p>"])
    assert ids == list(range(300, 307))
    text = "The images show a <p> mug </p> [SEG] (IMAGE1)"
    enc = tok(text).input_ids
    assert enc[0] == tok.bos_token_id and ids[4] in enc
    decoded = tok.decode(enc, skip_special_tokens=False)
    assert decoded.replace("<s>", "").strip().replace(" ", "") == text.replace(" ", "")
