"""crl_ray.data.encoding: fixed-length request/response encoding and the position masks of docs/METHOD.md."""

from __future__ import annotations

from typing import get_args

import datasets
import pytest
import torch
from helpers_tiny import IM_END, IM_START, PAD
from tokenizers import Tokenizer
from transformers import BatchEncoding, PreTrainedTokenizerFast

from crl_ray.config import MaskMode
from crl_ray.data.encoding import (
    ENCODED_COLUMNS,
    _as_ids,
    build_request,
    collate,
    encode_dataset,
    encode_pair,
    end_of_turn_id,
    pad_id,
    position_mask,
)

R, S = 24, 12  # max_request_tokens, max_response_tokens for most tests



def _conversation(tok, prompt, response, system=None) -> str:
    msgs = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": response},
    ]
    return tok.apply_chat_template(msgs, tokenize=False)


# ----------------------------------------------------------------------------------------- request
def test_build_request_is_the_templated_user_turn_with_generation_prompt(tok):
    ids = build_request(tok, "Hi there", system="Be brief.")
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    assert tok.decode(ids) == (
        f"{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\nHi there{IM_END}\n{IM_START}assistant\n"
    )
    assert tok.decode(build_request(tok, "Hi there")) == f"{IM_START}user\nHi there{IM_END}\n{IM_START}assistant\n"


@pytest.mark.parametrize(
    "out",
    [
        [5, 6, 7],
        [[5, 6, 7]],
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]},
        BatchEncoding({"input_ids": [[5, 6, 7]], "attention_mask": [[1, 1, 1]]}),
        torch.tensor([[5, 6, 7]]),
    ],
)
def test_as_ids_accepts_every_apply_chat_template_return_type(out):
    assert _as_ids(out) == [5, 6, 7]


def test_end_of_turn_is_im_end_for_chatml(tok):
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids(IM_END)


def test_end_of_turn_falls_back_to_eos_when_the_template_closes_turns_with_plain_text(tok):
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()),
                                    eos_token=PAD)
    other.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert end_of_turn_id(other) == other.convert_tokens_to_ids(PAD)


def test_pad_id_falls_back_to_eos(tok):
    assert pad_id(tok) == tok.convert_tokens_to_ids(PAD)
    no_pad = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()),
                                     eos_token=IM_END)
    assert no_pad.pad_token_id is None
    assert pad_id(no_pad) == no_pad.convert_tokens_to_ids(IM_END)


# ----------------------------------------------------------------------------------------- encode_pair
def test_encode_pair_layout_padding_labels_positions(tok):
    prompt, response = "How do I bake bread?", "Mix flour."
    ex = encode_pair(tok, prompt, response, max_request_tokens=R, max_response_tokens=S)
    assert set(ex) == set(ENCODED_COLUMNS)
    assert all(len(v) == R + S for v in ex.values())

    req = build_request(tok, prompt)
    res = tok(response, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tok)]
    n_req, n_res = len(req), len(res)
    assert n_req < R and n_res < S, "the test needs both parts to fit"
    pad = pad_id(tok)
    lp = R - n_req  # left padding of the request
    assert ex["input_ids"] == [pad] * lp + req + res + [pad] * (S - n_res)
    assert ex["request_mask"] == [0] * lp + [1] * n_req + [0] * S
    assert ex["response_mask"] == [0] * R + [1] * n_res + [0] * (S - n_res)
    assert ex["attention_mask"] == [0] * lp + [1] * (n_req + n_res) + [0] * (S - n_res)
    assert ex["labels"] == [-100] * R + res + [-100] * (S - n_res)
    n = n_req + n_res
    # left padding does not shift positions; trailing padding repeats the last position (cumsum - 1)
    assert ex["position_ids"] == [0] * lp + list(range(n)) + [n - 1] * (S - n_res)
    # the last request token sits right before the response: the assistant header's end
    assert ex["input_ids"][R - 1] == req[-1]


def test_encode_pair_decodes_back_to_the_templated_conversation(tok):
    prompt, response, system = "Tell me a joke about cats.", "Why did the cat sit on the computer?", "Be fun."
    ex = encode_pair(tok, prompt, response, max_request_tokens=64, max_response_tokens=32, system=system)
    kept = [t for t, m in zip(ex["input_ids"], ex["attention_mask"]) if m]
    # the template ends the assistant turn with "<|im_end|>\n"; the example ends at the end-of-turn token
    assert tok.decode(kept) == _conversation(tok, prompt, response, system).removesuffix("\n")
    resp = [t for t, m in zip(ex["input_ids"], ex["response_mask"]) if m]
    assert tok.decode(resp) == response + IM_END


def test_long_request_keeps_its_last_tokens_so_the_assistant_header_survives(tok):
    prompt = "The quick brown fox jumps over the lazy dog. " * 6
    req = build_request(tok, prompt)
    r = 8
    assert len(req) > r
    ex = encode_pair(tok, prompt, "Sure.", max_request_tokens=r, max_response_tokens=S)
    assert ex["input_ids"][:r] == req[-r:]
    assert ex["request_mask"][:r] == [1] * r
    assert tok.decode(ex["input_ids"][:r]).endswith(f"{IM_END}\n{IM_START}assistant\n")
    assert ex["position_ids"][:r] == list(range(r))


def test_long_response_is_cut_on_the_right_without_end_of_turn(tok):
    response = "Mix flour, water, salt and yeast, then knead and bake. " * 4
    full = tok(response, add_special_tokens=False)["input_ids"]
    s = 6
    assert len(full) > s
    ex = encode_pair(tok, "How do I bake bread?", response, max_request_tokens=R, max_response_tokens=s)
    assert ex["input_ids"][R:] == full[:s]
    assert ex["response_mask"][R:] == [1] * s
    assert ex["labels"][R:] == full[:s]
    assert end_of_turn_id(tok) not in ex["input_ids"][R:]


def test_empty_response_is_just_the_end_of_turn(tok):
    ex = encode_pair(tok, "Hi", "", max_request_tokens=R, max_response_tokens=S)
    assert ex["response_mask"][R:] == [1] + [0] * (S - 1)
    assert ex["input_ids"][R] == end_of_turn_id(tok)


# ----------------------------------------------------------------------------------------- masks
def _batch(layout: list[tuple[int, int, int]], t: int) -> dict[str, torch.Tensor]:
    """Rows from (request_start, request_len, response_len); the response follows the request directly."""
    req = torch.zeros(len(layout), t, dtype=torch.long)
    res = torch.zeros_like(req)
    for i, (start, n_req, n_res) in enumerate(layout):
        req[i, start:start + n_req] = 1
        res[i, start + n_req:start + n_req + n_res] = 1
    return {"request_mask": req, "response_mask": res, "attention_mask": req | res}


# T = 12 = 6 + 6. Rows 0-2 are left/right padded like encode_pair; row 3 is not (request ends at column 3),
# which shows the masks are computed from request_mask, not from max_request_tokens.
LAYOUT = [(2, 4, 3), (0, 6, 6), (5, 1, 1), (1, 3, 2)]
EXPECTED: dict[str, list[set[int]]] = {
    "response_all": [{6, 7, 8}, set(range(6, 12)), {6}, {4, 5}],
    "request_all": [{2, 3, 4, 5}, set(range(6)), {5}, {1, 2, 3}],
    "request_response": [set(range(2, 9)), set(range(12)), {5, 6}, set(range(1, 6))],
    "request_last": [{5}, {5}, {5}, {3}],
    "response_first_k": [{6, 7}, {6, 7}, {6}, {4, 5}],  # first_k = 2
    "response_first": [{6}, {6}, {6}, {4}],
}


def test_expected_table_covers_every_mask_mode():
    assert set(EXPECTED) == set(get_args(MaskMode))


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_position_mask_selects_exact_positions(mode):
    batch = _batch(LAYOUT, 12)
    mask = position_mask(batch, mode, first_k=2)
    assert mask.shape == (4, 12) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    got = [set(torch.nonzero(row).flatten().tolist()) for row in mask]
    assert got == EXPECTED[mode]


def test_response_first_k_default_is_20_and_caps_at_the_response_length():
    batch = _batch([(0, 2, 30), (0, 2, 5)], 40)
    mask = position_mask(batch, "response_first_k")
    assert mask.sum(-1).tolist() == [20.0, 5.0]


def test_masks_on_encoded_examples(tok):
    exs = [encode_pair(tok, p, r, max_request_tokens=R, max_response_tokens=S)
           for p, r in [("Hi", "Sure."), ("How do I bake bread?", "Mix flour, water, salt and yeast.")]]
    batch = collate(exs)
    last = position_mask(batch, "request_last")
    assert torch.nonzero(last).tolist() == [[0, R - 1], [1, R - 1]]
    assert torch.equal(position_mask(batch, "response_all"), batch["response_mask"].float())
    assert torch.equal(position_mask(batch, "request_response"), batch["attention_mask"].float())


def test_position_mask_rejects_unknown_mode_and_bad_k():
    batch = _batch(LAYOUT, 12)
    with pytest.raises(ValueError, match="response_all"):
        position_mask(batch, "response_last")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="first_k"):
        position_mask(batch, "response_first_k", first_k=0)


# ----------------------------------------------------------------------------------------- dataset
def test_encode_dataset_matches_encode_pair_shapes_and_dtype(tok):
    rows = {
        "prompt": ["Hi", "How do I bake bread?", "Tell me a joke about cats. " * 5],
        "response": ["Sure.", "Mix flour.", "I cannot help with that request. " * 5],
        "category": ["a", "b", "c"],
    }
    ds = datasets.Dataset.from_dict(rows)
    enc = encode_dataset(ds, tok, max_request_tokens=R, max_response_tokens=S, system="Be brief.")
    assert enc.column_names == list(ENCODED_COLUMNS)
    assert len(enc) == 3
    batch = collate([enc[i] for i in range(len(enc))])
    for key in ENCODED_COLUMNS:
        assert batch[key].shape == (3, R + S) and batch[key].dtype == torch.int64
        expected = torch.tensor([
            encode_pair(tok, p, r, max_request_tokens=R, max_response_tokens=S, system="Be brief.")[key]
            for p, r in zip(rows["prompt"], rows["response"])
        ])
        assert torch.equal(batch[key], expected), key
    assert enc[:2]["input_ids"].shape == (2, R + S)


def test_encode_dataset_names_missing_columns(tok):
    ds = datasets.Dataset.from_dict({"prompt": ["Hi"], "answer": ["Sure."]})
    with pytest.raises(ValueError, match="response"):
        encode_dataset(ds, tok, max_request_tokens=R, max_response_tokens=S)


def test_collate_skips_text_fields():
    out = collate([{"input_ids": [1, 2], "prompt": "a"}, {"input_ids": torch.tensor([3, 4]), "prompt": "b"}])
    assert set(out) == {"input_ids"}
    assert torch.equal(out["input_ids"], torch.tensor([[1, 2], [3, 4]]))


# ----------------------------------------------------------------------------------------- real tokenizer
def test_smollm2_tokenizer_if_cached():
    """The embedded model's real ChatML tokenizer, when the asset is already in the cache (no download)."""
    try:
        from crl_ray.data.assets import asset_path, is_cached

        if not is_cached("smollm2-135m-instruct"):
            pytest.skip("smollm2-135m-instruct is not in the asset cache")
        path = asset_path("smollm2-135m-instruct", verify=False)
    except Exception as exc:  # the asset module is being written concurrently; never fail on it here
        pytest.skip(f"asset cache unavailable: {exc}")
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained(str(path))
    assert real.convert_ids_to_tokens(end_of_turn_id(real)) == "<|im_end|>"
    prompt, response = "How do I bake bread?", "Mix flour, water and yeast."
    ex = encode_pair(real, prompt, response, max_request_tokens=128, max_response_tokens=32)
    kept = [t for t, m in zip(ex["input_ids"], ex["attention_mask"]) if m]
    assert real.decode(kept) == _conversation(real, prompt, response).rstrip("\n")
