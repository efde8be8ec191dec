"""Data: exact masks, one EOS labelled, padding sides, truncation policy, loaders, the generator."""

import json

import pytest
import torch

from geffect_fast import data


@pytest.fixture(scope="module")
def tok():
    return data.build_tokenizer()


RECS = [
    {"question": "Where was Aria Vell born?", "answer": "Aria Vell was born in Tarsk."},
    {"question": "What does Corin Quist write?", "answer": "Corin Quist writes comic verse, mostly."},
]


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("prompt", ["llama2", "phi", "phi_masked", "chat"])
def test_masks_exact(tok, side, prompt):
    b = data.encode_qa(RECS, tok, prompt=prompt, padding_side=side)
    fmt = {
        "llama2": lambda q: f"[INST] {q} [/INST]",
        "phi": lambda q: f"Question: {q}\n",
        "phi_masked": lambda q: f"Question: {q}\nAnswer: ",
    }.get(prompt)
    prefix = "Answer: " if prompt == "phi" else ""  # the official phi format labels "Answer: " with the answer
    for i, r in enumerate(RECS):
        ids, lab, m = b["input_ids"][i], b["labels"][i], b["attention_mask"][i]
        real = ids[m == 1].tolist()
        p = (
            _ids(tok, fmt(r["question"]))
            if fmt
            else _ids(
                tok,
                tok.apply_chat_template(
                    [{"role": "user", "content": r["question"]}], tokenize=False, add_generation_prompt=True
                ),
            )
        )
        a = _ids(tok, prefix + r["answer"])
        assert real == [tok.bos_token_id] + p + a + [tok.eos_token_id]
        labelled = lab[lab != -100].tolist()
        assert labelled == a + [tok.eos_token_id]  # the answer and exactly one EOS
        assert (lab[m == 0] == -100).all() and (ids[m == 0] == tok.pad_token_id).all()
        pad = (m == 0).nonzero().flatten().tolist()
        if pad:  # padding on the requested side only
            assert (pad[0] == len(real)) if side == "right" else (pad[-1] == len(pad) - 1)


def test_prompt_truncated_never_the_answer(tok):
    """truncation='prompt' (ours): the prompt is cut from its start, never the answer."""
    long_q = {"question": "Tell me " + "very " * 80 + "much about Aria Vell?", "answer": "Aria Vell was born in Tarsk."}
    b = data.encode_qa([long_q], tok, max_length=24, truncation="prompt")
    a = _ids(tok, long_q["answer"])
    assert b["input_ids"].shape[1] == 24
    assert b["labels"][0][b["labels"][0] != -100].tolist() == a + [tok.eos_token_id]
    end_of_prompt = _ids(tok, f"[INST] {long_q['question']} [/INST]")[-3:]
    assert b["input_ids"][0, 24 - len(a) - 1 - 3 : 24 - len(a) - 1].tolist() == end_of_prompt
    with pytest.raises(ValueError, match="never truncates answers"):
        data.encode_qa([long_q], tok, max_length=5, truncation="prompt")


def test_end_truncation_cuts_the_answer_and_drops_the_eos(tok):
    """truncation='end' (the official code, the default): [BOS] prompt answer cut at max_length, no EOS."""
    r = {"question": "Where was Aria Vell born?", "answer": "Aria Vell was born in the town of Tarsk, by the sea."}
    p, a = _ids(tok, f"[INST] {r['question']} [/INST]"), _ids(tok, r["answer"])
    b = data.encode_qa([r], tok, max_length=len(p) + 5)
    assert b["input_ids"][0].tolist() == [tok.bos_token_id] + p + a[:4]
    assert b["labels"][0].tolist() == [-100] * (1 + len(p)) + a[:4]
    full = data.encode_qa([r], tok, max_length=len(p) + len(a) + 2, padding="max_length")
    assert full["labels"][0, 1 + len(p) :].tolist() == a + [tok.eos_token_id]  # room for the EOS: labelled
    with pytest.raises(ValueError, match="truncation must be"):
        data.encode_qa([r], tok, truncation="start")
    with pytest.raises(ValueError, match="padding must be"):
        data.encode_qa([r], tok, padding="max")


def test_bad_records(tok, tmp_path):
    with pytest.raises(ValueError, match="tokenises to nothing"):
        data.encode_qa([{"question": "q?", "answer": ""}], tok)
    with pytest.raises(KeyError, match="record 0 has no \\['answer'\\]"):
        data.encode_qa([{"question": "q?"}], tok)
    with pytest.raises(ValueError, match="unknown prompt format"):
        data.encode_qa(RECS, tok, prompt="alpaca")
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([{"q": 1}]))
    with pytest.raises(KeyError, match="has no"):
        data.load_records(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        data.load_records(p)
    with pytest.raises(FileNotFoundError):
        data.load_records(tmp_path / "missing.json")


def test_loaders_json_and_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"data": RECS}))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in RECS) + "\n")
    assert data.load_records(tmp_path / "a.json") == RECS == data.load_records(tmp_path / "b.jsonl")


def test_raw_text_every_token_labelled(tok):
    b = data.encode_text([{"text": "Aria Vell was born in Tarsk."}, {"text": "Short."}], tok)
    m = b["attention_mask"].bool()
    assert torch.equal(b["labels"][m], b["input_ids"][m])
    assert (b["labels"][~m] == -100).all()


def test_generator_deterministic_and_splits():
    a, b = data.synthetic_authors(seed=3), data.synthetic_authors(seed=3)
    assert a == b and a != data.synthetic_authors(seed=4)
    assert len(a["full"]) == 200 * 20
    for pct, n in ((1, 2), (5, 10), (10, 20)):
        f, r = a[f"forget{pct:02d}"], a[f"retain{100 - pct}"]
        assert len(f) == n * 20 and len(f) + len(r) == len(a["full"])
        assert {x["author"] for x in f}.isdisjoint({x["author"] for x in r})
    names = {x["question"] for x in a["full"]}
    assert len(names) == len(a["full"])  # every question distinct
    idk = data.idk_records(a["forget01"])
    assert all(x["answer"] in data.REFUSALS for x in idk)


def test_tokenizer_is_deterministic(tok):
    t2 = data.build_tokenizer()
    assert tok.get_vocab() == t2.get_vocab()
    assert tok.decode(_ids(tok, "Aria Vell was born in Tarsk.")) == "Aria Vell was born in Tarsk."
