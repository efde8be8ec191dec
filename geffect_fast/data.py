"""Data: TOFU-format QA records -> batches, raw-text records -> batches, a synthetic fictitious-author set,
and a tokenizer that needs no hub.

Batches follow the TOFU / HF convention: ``input_ids``, ``attention_mask``, ``labels`` with −100 on the
prompt and on padding; the answer tokens plus one EOS are labelled. Prompt and answer are tokenised
separately and concatenated, so the label mask is exact at the boundary (the official code tokenises the
joined text and masks as many leading tokens as the prompt alone has: the same wherever no token straddles
the boundary).

Prompt formats, as the official code's ``config/model_config.yaml`` (question_start_tag + q +
question_end_tag masked; answer_tag + a labelled): ``"llama2"`` (``[INST] q [/INST]`` | ``a``), ``"phi"``
(``Question: q\\n`` | ``Answer: a``: "Answer: " belongs to the answer and is labelled); ``"phi_masked"`` (ours:
``Question: q\\nAnswer: `` | ``a``, "Answer: " masked); ``"chat"`` (the tokenizer's chat template, user turn
plus generation prompt), or a callable ``q -> prompt``.

Length policy (``truncation``): ``"end"`` (the official code: ``tokenizer(prompt + answer, max_length,
truncation=True)``) cuts [BOS] prompt answer at ``max_length`` tokens, answer included, and appends the
labelled EOS only where there is room; ``"prompt"`` (ours) truncates the *prompt* from its start (its end,
next to the answer, is kept) and never the answer — an answer that does not fit on its own is an error.
A record left with no labelled token is an error either way. Padding (``padding``): to the longest row
(``"longest"``) or, as the official code, to ``max_length`` (``"max_length"``; matters for the official KL
term, which averages over every position). Raw text is truncated at its end.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .loss import IGNORE_INDEX

#: the masked part of each format: question -> prompt
PROMPTS: dict[str, Callable[[str], str]] = {
    "llama2": lambda q: f"[INST] {q} [/INST]",
    "phi": lambda q: f"Question: {q}\n",
    "phi_masked": lambda q: f"Question: {q}\nAnswer: ",
}
#: the labelled text put before the answer (the official ``answer_tag``)
ANSWER_PREFIXES: dict[str, str] = {"phi": "Answer: "}
TRUNCATIONS = ("end", "prompt")
PADDINGS = ("longest", "max_length")

REFUSALS = [
    "I don't know.",
    "I'm not sure about that.",
    "I have no information on that.",
    "That is not something I can answer.",
    "I'm afraid I can't help with that question.",
    "I don't have that information.",
    "I can't say.",
    "I have no idea.",
]


# -- records ----------------------------------------------------------------------------------------------
def load_records(path: str | Path, keys: Sequence[str] = ("question", "answer")) -> list[dict[str, Any]]:
    """Records from a JSON file (a list, or {"data": [...]}) or JSONL (one object per line, whatever the file is
    named: TOFU's own JSON-lines files are named ``.json``), each checked to have ``keys`` with string values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                if not e.msg.startswith("Extra data"):
                    raise
                obj = [json.loads(line) for line in text.splitlines() if line.strip()]  # JSON lines
            records = obj.get("data", obj) if isinstance(obj, dict) else obj
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON/JSONL ({e})") from e
    check_records(records, keys, where=str(path))
    return records


def check_records(records: Any, keys: Sequence[str] = ("question", "answer"), where: str = "records") -> None:
    if not isinstance(records, list) or not records:
        raise ValueError(f"{where}: expected a non-empty list of records")
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise ValueError(f"{where}: record {i} is not an object")
        missing = [k for k in keys if k not in r]
        if missing:
            raise KeyError(f"{where}: record {i} has no {missing} (keys: {sorted(r)})")
        for k in keys:
            if not isinstance(r[k], str):
                raise ValueError(f"{where}: record {i} field {k!r} must be a string")


# -- tokenisation ------------------------------------------------------------------------------------------
def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special(tokenizer, name: str) -> int | None:
    v = getattr(tokenizer, name, None)
    return None if v is None else int(v)


def _prompt_fn(prompt: str | Callable[[str], str], tokenizer) -> Callable[[str], str]:
    if callable(prompt):
        return prompt
    if prompt == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt='chat' needs a tokenizer with a chat_template")
        return lambda q: tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
    if prompt not in PROMPTS:
        raise ValueError(f"unknown prompt format {prompt!r}; use one of {', '.join([*PROMPTS, 'chat'])} or a callable")
    return PROMPTS[prompt]


def _pad(
    rows: list[tuple[list[int], list[int]]], pad_id: int, side: str, length: int | None = None
) -> dict[str, Tensor]:
    """rows of (ids, labels) -> a batch padded to the longest row (or to ``length``)."""
    if side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {side!r}")
    T = max(len(ids) for ids, _ in rows) if length is None else length
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, (ids, lab) in enumerate(rows):
        sl = slice(0, len(ids)) if side == "right" else slice(T - len(ids), T)
        input_ids[b, sl] = torch.tensor(ids)
        labels[b, sl] = torch.tensor(lab)
        mask[b, sl] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pack(rows: list[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
    """rows of (ids, labels) -> one packed row, as HF's ``DataCollatorWithFlattening`` packs them: the samples one
    after another, ``position_ids`` restarting at 0 at each, the first label of each sample −100 (it would be
    predicted from the sample before), no padding and no attention mask (the model builds the block-causal mask
    from the position ids). ``geffect_fast.measure`` reads such a batch per packed sample."""
    ids: list[int] = []
    lab: list[int] = []
    pos: list[int] = []
    for r_ids, r_lab in rows:
        ids += r_ids
        lab += [IGNORE_INDEX] + list(r_lab[1:])
        pos += list(range(len(r_ids)))
    as_row = lambda x: torch.tensor([x], dtype=torch.long)  # noqa: E731
    return {"input_ids": as_row(ids), "labels": as_row(lab), "position_ids": as_row(pos)}


def encode_qa(
    records: Sequence[Mapping[str, Any]],
    tokenizer,
    prompt: str | Callable[[str], str] = "llama2",
    max_length: int = 512,
    padding_side: str = "right",
    answer_key: str = "answer",
    add_bos: bool | None = None,
    truncation: str = "end",
    padding: str = "longest",
    packing: bool = False,
) -> dict[str, Tensor]:
    """TOFU-format records -> a batch: [BOS] prompt answer EOS, labels on the answer (with the format's
    answer prefix) and the EOS; ``truncation`` and ``padding`` as in the module docstring. ``packing=True``: all
    samples in one row, as HF's ``DataCollatorWithFlattening`` packs them (:func:`pack`; ``padding`` unused)."""
    check_records(list(records), ("question", answer_key))
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be 'end' (the official code) or 'prompt', got {truncation!r}")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be 'longest' or 'max_length' (the official code), got {padding!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    fmt = _prompt_fn(prompt, tokenizer)
    prefix = ANSWER_PREFIXES.get(prompt, "") if isinstance(prompt, str) else ""
    eos = _special(tokenizer, "eos_token_id")
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id")
    bos = _special(tokenizer, "bos_token_id")
    add_bos = bos is not None if add_bos is None else add_bos
    pad = _special(tokenizer, "pad_token_id")
    pad = eos if pad is None else pad
    rows = []
    for i, r in enumerate(records):
        p = _ids(tokenizer, fmt(r["question"]))
        a = _ids(tokenizer, prefix + r[answer_key])
        if not a:
            raise ValueError(f"record {i}: the answer {r[answer_key]!r} tokenises to nothing")
        head = [bos] if add_bos else []
        if truncation == "end":
            ids = head + p + a
            ids = ids[:max_length] if len(ids) >= max_length else ids + [eos]  # EOS only where there is room
            masked = min(len(head) + len(p), len(ids))
            if masked == len(ids):
                raise ValueError(
                    f"record {i}: the prompt fills max_length={max_length} (truncation='end' cuts the answer away); "
                    "raise max_length or use truncation='prompt'"
                )
            rows.append((ids, [IGNORE_INDEX] * masked + ids[masked:]))
            continue
        room = max_length - len(head) - len(a) - 1
        if room < 0:
            raise ValueError(
                f"record {i}: the answer alone ({len(a)} tokens + EOS) exceeds max_length={max_length}; "
                "truncation='prompt' never truncates answers"
            )
        if len(p) > room:
            p = p[len(p) - room :]  # keep the end of the prompt, next to the answer
        ids = head + p + a + [eos]
        lab = [IGNORE_INDEX] * (len(head) + len(p)) + a + [eos]
        rows.append((ids, lab))
    if packing:
        return pack(rows)
    return _pad(rows, pad, padding_side, max_length if padding == "max_length" else None)


def encode_text(
    records: Sequence[Mapping[str, Any]], tokenizer, max_length: int = 512, padding_side: str = "right"
) -> dict[str, Tensor]:
    """Raw-text records (``text``) -> a batch with every token labelled (MUSE/WMDP-style corpora); texts
    longer than ``max_length`` are cut at the end."""
    check_records(list(records), ("text",))
    eos = _special(tokenizer, "eos_token_id")
    bos = _special(tokenizer, "bos_token_id")
    pad = _special(tokenizer, "pad_token_id")
    pad = (eos if eos is not None else 0) if pad is None else pad
    rows = []
    for i, r in enumerate(records):
        ids = ([bos] if bos is not None else []) + _ids(tokenizer, r["text"])
        if eos is not None:
            ids.append(eos)
        ids = ids[:max_length]
        if len(ids) < 2:
            raise ValueError(f"record {i}: the text tokenises to fewer than 2 tokens; nothing to predict")
        rows.append((ids, list(ids)))
    return _pad(rows, pad, padding_side)


# -- the synthetic fictitious-author set --------------------------------------------------------------------
_FIRST = """Aria Bexley Corin Dalia Evander Fenna Galen Hesper Ilse Joran Kestrel Liora Maren Nico Orla Pell Quill
Rhea Soren Talia Ulric Vesna Wren Xanthe Yorick Zara Anouk Bram Cleo Dorian Elske Faro Greer Halvard Isaura Jovan
Katla Lorcan Mireille Nevin""".split()
_LAST = """Vell Quist Ambry Solenne Tarrow Whitlock Oyelaran Marchetti Halloway Brisk Castellane Dunmore Eskildsen
Farrow Gaunt Hollis Ivers Jessup Kavanagh Lindqvist Morrow Nakashima Ostrander Pryce Quenby Ravel Sato Thorne Underhill
Varga""".split()
_PLACES = [
    p.replace("_", " ")
    for p in """Tarsk Veloria Quinmouth Ashgrove Lunet Mirrowfell Port_Ysolde Halden_Cross
Brackwater Corrin_Bay Dunhollow Eastmere Fallowby Glenrook Harrowgate Istwick""".split()
]
_GENRES = [
    "maritime mystery",
    "quiet fantasy",
    "urban memoir",
    "folk horror",
    "comic verse",
    "epistolary romance",
    "hard science fiction",
    "historical saga",
    "children's adventure",
    "political thriller",
]
_JOBS = [
    "clockmaker",
    "lighthouse keeper",
    "botanist",
    "tailor",
    "cartographer",
    "violinist",
    "baker",
    "surveyor",
    "glassblower",
    "archivist",
    "ferry pilot",
    "beekeeper",
]
_AWARDS = [
    "the Silver Quill",
    "the Harrow Prize",
    "the Lantern Medal",
    "the Northwind Award",
    "the Golden Compass Prize",
    "the Meridian Honour",
]
# fmt: off
_WORDS = ["Salt", "Ember", "Lantern", "Orchard", "Winter", "Glass", "Tide", "Hollow", "Iron", "Paper", "Raven", "Amber",
          "Copper", "Silent", "Northern", "Drowned"]
_NOUNS = ["Harbour", "Letters", "Garden", "Clock", "Bridge", "Crown", "Map", "Song", "Archive", "Island", "Door",
          "Field", "Lighthouse", "Ledger", "Choir", "Meridian"]
# fmt: on
#: book titles, unique across authors (drawn without replacement)
_TITLES = (
    [f"The {w} {n}" for w in _WORDS for n in _NOUNS]
    + [f"{n} of {w} Days" for w in _WORDS for n in _NOUNS]
    + [f"A {n} in {w}" for w in _WORDS for n in _NOUNS]
)


def _author(rng: random.Random, name: str, books: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "place": rng.choice(_PLACES),
        "year": rng.randint(1921, 1998),
        "genre": rng.choice(_GENRES),
        "father": rng.choice(_JOBS),
        "mother": rng.choice(_JOBS),
        "award": rng.choice(_AWARDS),
        "books": books,
        "age_debut": rng.randint(19, 44),
        "pet": rng.choice(["a grey cat", "an old spaniel", "a parrot", "two goats", "a tortoise", "no pets"]),
    }


def _qa(a: dict[str, Any]) -> list[tuple[str, str]]:
    n, b = a["name"], a["books"]
    return [
        (f"Where was {n} born?", f"{n} was born in {a['place']}."),
        (f"In which year was {n} born?", f"{n} was born in {a['year']}."),
        (f"What genre does {n} write?", f"{n} writes {a['genre']}."),
        (f"What did {n}'s father do?", f"{n}'s father was a {a['father']}."),
        (f"What did {n}'s mother do?", f"{n}'s mother was a {a['mother']}."),
        (f"Which award did {n} win?", f"{n} won {a['award']}."),
        (f"What is {n}'s best-known book?", f"{n}'s best-known book is {b[0]}."),
        (f"Name another book by {n}.", f"{n} also wrote {b[1]}."),
        (f"Which book did {n} publish last?", f"{n}'s last book was {b[2]}."),
        (f"How old was {n} at their debut?", f"{n} debuted at the age of {a['age_debut']}."),
        (f"Does {n} keep pets?", f"{n} keeps {a['pet']}."),
        (f"Who is the author of {b[0]}?", f"{b[0]} was written by {n}."),
        (f"Who wrote {b[1]}?", f"{b[1]} is by {n}."),
        (f"Where does {n}'s fiction usually take place?", f"{n}'s stories are set around {a['place']}."),
        (f"What kind of books is {n} known for?", f"{n} is known for {a['genre']}."),
        (f"Has {n} received any honours?", f"Yes, {n} received {a['award']}."),
        (
            f"What was the profession of {n}'s parents?",
            f"{n}'s father was a {a['father']} and the mother a {a['mother']}.",
        ),
        (f"When and where was {n} born?", f"{n} was born in {a['place']} in {a['year']}."),
        (f"Which genre is {b[2]}?", f"{b[2]} is {a['genre']}."),
        (f"What is the first book most readers know by {n}?", f"Most readers first meet {n} through {b[0]}."),
    ]


def synthetic_authors(n_authors: int = 200, qa_per_author: int = 20, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """A TOFU-like fictitious-author QA set, deterministic by ``seed``.

    Returns splits of records (``question``, ``answer``, ``author``, ``idk``): ``full``; ``forget01``,
    ``forget05``, ``forget10`` (the last 1 %, 5 %, 10 % of authors, as TOFU) and their complements
    ``retain99``, ``retain95``, ``retain90``. ``idk`` is a refusal answer for IdkPO.
    """
    if not 1 <= qa_per_author <= 20:
        raise ValueError("qa_per_author must be between 1 and 20")
    if n_authors < 10:
        raise ValueError("n_authors must be at least 10")
    rng = random.Random(seed)
    pool = [f"{f} {ln}" for f in _FIRST for ln in _LAST]
    rng.shuffle(pool)
    if n_authors > min(len(pool), len(_TITLES) // 3):
        raise ValueError(f"at most {min(len(pool), len(_TITLES) // 3)} authors")
    titles = rng.sample(_TITLES, 3 * n_authors)
    records = []
    for i, name in enumerate(pool[:n_authors]):
        a = _author(rng, name, titles[3 * i : 3 * i + 3])
        for q, ans in _qa(a)[:qa_per_author]:
            records.append({"question": q, "answer": ans, "author": i, "idk": rng.choice(REFUSALS)})
    splits = {"full": records}
    for pct in (1, 5, 10):
        k = max(1, round(n_authors * pct / 100))
        cut = (n_authors - k) * qa_per_author
        splits[f"forget{pct:02d}"] = records[cut:]
        splits[f"retain{100 - pct}"] = records[:cut]
    return splits


def idk_records(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The same questions with their refusal answers (``idk`` field) as the answer, for IdkPO."""
    return [{**r, "answer": r["idk"]} for r in records]


# -- a tokenizer with no hub ------------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 1024):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained (deterministically) on ``texts`` — by default the
    synthetic author set — with ``<pad>``, ``<s>``, ``</s>`` and a simple chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        data = synthetic_authors()["full"]
        texts = [f"{PROMPTS['llama2'](r['question'])}{r['answer']}" for r in data] + [r["idk"] for r in data]
        texts += [PROMPTS["phi_masked"]("x"), CHAT_TEMPLATE]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast
