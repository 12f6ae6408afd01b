"""What every public-PRM family shares: token pieces, padding, and the scoring object.

A family (qwen_prm.py, tag_lm.py, value_head.py, token_cls.py, implicit.py) decides two things: how a
solution becomes input ids with a *read position* per step (`encode`), and how a right-padded batch of those
ids becomes one probability of "correct" per read position (`score_batch`). `HubPRM` does the rest the way
`rlprm.reward.model.RewardModel` does it: texts split into steps with the one step convention
(`rlprm.steps.split_steps`), lengths sorted into batches, one forward pass per solution, results back in the
caller's order.

The ids are exactly those the family's model card feeds its model (tests/test_hub_parity.py checks it on real
tokenizers and real solutions): a PRM was trained on one token sequence per solution, and any other one (a
separator tokenized on its own where the card tokenizes it inside a string, a space a tokenizer prefixes to a
piece encoded alone) is scored off-distribution and at shifted positions. So each family builds its input the
way its card does: pieces encoded one by one and marker ids appended where the card does that (`Plan`,
`realize`: Qwen2.5-Math-PRM, PURE, Skywork), one string encoded whole where the card does that (`Marked`,
`realize_marked`: Math-Shepherd, RLHFlow; the implicit family derives its step spans the card's way in
implicit.py). Read positions are never found by searching the ids for a marker
id: they are recorded while the ids are built, or located by character offsets of the markers the family
wrote, and checked to be the marker's token (a step whose own text contains the marker's text therefore adds
no read position). Where the card's text would not tokenize a marker as its own token, the family refuses
with the reason rather than score a sequence the card never produces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from rlprm.reward.model import RewardModelError
from rlprm.steps import DEFAULT_SEPARATOR, leading_bos, split_steps

SENTINEL = "\ue000rlprm-content\ue000"
"""A private-use marker put where a chat template writes a message, to cut the rendered text around it."""


class AdapterError(RewardModelError):
    """A public PRM cannot be loaded or asked to score this way (the message says why).

    A RewardModelError, so every command that reports a bad reward model reports this one the same way."""


@dataclass
class Encoded:
    """One solution in a family's token form."""

    input_ids: list[int]
    reads: list[int]
    """Per step, the index whose output gives that step's score (a marker token, or the token before a verdict)."""
    spans: list[tuple[int, int]] | None = None
    """(implicit family) Per step, its tokens [start, end] inclusive."""


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of `text` with no special tokens added; special-token text in it (template markup) is parsed."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def single_token(tokenizer, text: str, what: str) -> int:
    """The id that ends the encoding of `text` (a family's marker or verdict token), checked to exist."""
    ids = encode_text(tokenizer, text)
    if not ids:
        raise AdapterError(f"the tokenizer encodes the {what} {text!r} to no tokens")
    return ids[-1]


@dataclass
class Plan:
    """One solution as pieces: `bos` ids, `head`, each piece (then `marker_id`, when given), `tail`.

    Each text is tokenized on its own (so a piece never merges with its neighbours), except that with
    `join_head` the head and the first piece are one text, as they are when a card encodes a whole string
    whose head ends in a special token (the tokenizer then splits there, and only there). The read position of
    a piece is its marker, or, with `read_marker=False` or no marker, the piece's last token (rlhflow reads the
    token that predicts the verdict it appends). `read`: per piece, whether it ends a step (None: every piece);
    pieces that do not are encoded but neither read nor given a span of their own (they join the next one's).
    """

    head: str
    pieces: list[str]
    tail: str = ""
    marker_id: int | None = None
    bos: list[int] = field(default_factory=list)
    read_marker: bool = True
    join_head: bool = False
    read: list[bool] | None = None


def realize(tokenizer, plans: Sequence[Plan]) -> list[Encoded]:
    """The token form of many plans, with ONE batched tokenizer call over their distinct texts.

    `reads` per the plan's rule; `spans` each step's tokens (marker included).
    """
    def first_text(plan: Plan) -> str:
        return plan.head + plan.pieces[0] if plan.join_head and plan.pieces else plan.head

    texts = sorted({t for p in plans for t in (first_text(p), p.tail, *p.pieces) if t})
    # ids only: the masks a tokenizer call builds by default cost a quarter of the call and are never read
    ids_of = dict(zip(texts, tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                                       return_token_type_ids=False)["input_ids"])) if texts else {}
    ids_of[""] = []
    out = []
    for plan in plans:
        joined = plan.join_head and plan.pieces
        ids = list(plan.bos) + (ids_of[first_text(plan)] if not joined else [])
        reads, spans = [], []
        start = len(ids)
        for k, piece in enumerate(plan.pieces):
            piece_start = len(ids)
            ids.extend(ids_of[first_text(plan)] if joined and k == 0 else ids_of[piece])
            text_end = len(ids) - 1
            if plan.marker_id is not None:
                ids.append(plan.marker_id)
            if len(ids) == piece_start or (not plan.read_marker and text_end < piece_start):
                raise AdapterError(f"step {piece!r} encodes to no tokens")
            if plan.read is None or plan.read[k]:
                reads.append(len(ids) - 1 if plan.read_marker else text_end)
                spans.append((start, len(ids) - 1))
                start = len(ids)
        ids.extend(ids_of[plan.tail])
        out.append(Encoded(ids, reads, spans))
    return out


@dataclass
class Marked:
    """One solution as one string that a card encodes whole, and the character span of each step's marker.

    `realize_marked` encodes `text` in one call and reads each step at the token whose character span is
    exactly its mark (or, `read_before`, at the token before it: the one whose output predicts it), after
    checking that token is `marker_id`."""

    text: str
    marks: list[tuple[int, int]]
    marker_id: int
    add_special_tokens: bool = False
    read_before: bool = False


def realize_marked(tokenizer, items: Sequence[Marked], what: str) -> list[Encoded]:
    """The token form of many `Marked` solutions: one batched tokenizer call (per add_special_tokens setting)."""
    out: list[Encoded | None] = [None] * len(items)
    for special in (False, True):
        chosen = [i for i, m in enumerate(items) if m.add_special_tokens == special]
        if not chosen:
            continue
        try:
            enc = tokenizer([items[i].text for i in chosen], add_special_tokens=special, return_offsets_mapping=True,
                            return_attention_mask=False, return_token_type_ids=False)
        except NotImplementedError as err:  # Python ("slow") tokenizers have no character offsets
            raise AdapterError(f"the {what} family locates its markers by character offsets, which this tokenizer "
                               f"({type(tokenizer).__name__}) does not give: load the checkpoint's fast tokenizer "
                               "(tokenizer.json)") from err
        for i, ids, offsets in zip(chosen, enc["input_ids"], enc["offset_mapping"]):
            at = {tuple(o): j for j, o in enumerate(offsets) if o[1] > o[0]}
            reads, spans, start = [], [], 0
            for k, mark in enumerate(items[i].marks):
                j = at.get(tuple(mark))
                if j is None or ids[j] != items[i].marker_id:
                    found = "no token" if j is None else f"token {ids[j]}"
                    raise AdapterError(
                        f"the {what} card's text does not tokenize the marker after step {k + 1} as its own token "
                        f"(expected id {items[i].marker_id} at characters {mark}, found {found}): the model would be "
                        f"scored on a sequence it was not trained on. Step text: "
                        f"{items[i].text[max(0, mark[0] - 60):mark[1]]!r}")
                read = j - 1 if items[i].read_before else j
                reads.append(read)
                spans.append((start, j))
                start = j + 1
            out[i] = Encoded(list(ids), reads, spans)
    return out


def split_template(tokenizer, messages: list[dict], where: str) -> list[str]:
    """The chat template rendered with SENTINEL as the content of some messages, cut at every SENTINEL.

    Why a sentinel: the template stays the model's own (system prompt, headers, whatever it trims or adds),
    and the cut points are exactly where a message's content goes, so the steps or verdict tokens can be put
    there as token ids.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise AdapterError(f"the {where} family needs the tokenizer's chat template, and this tokenizer has none")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    parts = text.split(SENTINEL)
    expected = sum(m["content"] == SENTINEL for m in messages) + 1
    if len(parts) != expected:
        raise AdapterError(f"the chat template of this {where} model changed the message content; cannot place "
                           "the steps in it")
    return parts


def pad_right(sequences: list[list[int]], pad_id: int, device):
    """(ids, attention_mask) right-padded: real tokens keep the positions they have unpadded."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.tensor([list(s) + [pad_id] * (width - len(s)) for s in sequences], dtype=torch.long)
    mask = torch.arange(width)[None, :] < torch.tensor([len(s) for s in sequences])[:, None]
    return ids.to(device), mask.long().to(device)


HEAD_CHUNK_ELEMENTS = 1 << 24
"""Logits materialised at once when an LM head runs over many positions (64 MiB in fp32): a 128k vocabulary
over every token of a batch would be gigabytes, so the positions go through the head in chunks."""


def last_hidden(model, ids, mask):
    """(B, T, H) final hidden states of a causal LM's body: its head is left to the caller, who applies it only
    at the positions and vocabulary rows it reads (`output_head`)."""
    body = getattr(model, model.base_model_prefix)
    return body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def output_head(model):
    """The LM head module, applied by hand at read positions; refuses models whose forward transforms the head's
    output (soft-capping, scaling), since applying the head alone would then give other logits."""
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(model.config, key, None)
        if value not in (None, 1, 1.0):
            raise AdapterError(f"this model's config sets {key}={value}: its logits are transformed after the LM "
                               "head, which the adapters (applying the head only at read positions) do not do")
    return model.get_output_embeddings()


def read_index(encoded: list[Encoded], device):
    """(rows, cols) index tensors of every read position of a batch, solution after solution."""
    import torch

    rows = [i for i, e in enumerate(encoded) for _ in e.reads]
    cols = [c for e in encoded for c in e.reads]
    return torch.tensor(rows, device=device), torch.tensor(cols, device=device)


def unflatten(flat: list[float], encoded: list[Encoded]) -> list[list[float]]:
    out, k = [], 0
    for e in encoded:
        out.append(flat[k:k + len(e.reads)])
        k += len(e.reads)
    return out


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise AdapterError("the tokenizer has neither a pad nor an eos token to pad batches with")
    return pad  # right padding behind an attention mask: its value is never read


class HubPRM:
    """A public PRM behind the same scoring calls as `RewardModel` (`kind`, `score_steps`, `score`).

    `family` is the family object (encode / score_batch / models); this class owns batching and order.
    """

    kind = "prm"

    def __init__(self, family, name: str, step_separator: str = DEFAULT_SEPARATOR):
        self.family = family
        self.name = name
        self.step_separator = step_separator
        """Only used to split solution texts into steps; the family marks the boundaries in its own tokens."""

    @property
    def adapter(self) -> str:
        return self.family.adapter

    @property
    def tokenizer(self):
        return self.family.tokenizer

    def max_positions(self) -> int | None:
        return getattr(self.family.config, "max_position_embeddings", None)

    def _steps(self, solutions, sep: str | None) -> list[list[str]]:
        sep = sep or self.step_separator
        return [split_steps(s, sep) if isinstance(s, str) else list(s) for s in solutions]

    def encode(self, problems: Sequence[str], solutions: Sequence, sep: str | None = None) -> list[Encoded]:
        """The input ids and read positions of each solution, as the family's card builds them."""
        return self.family.encode(list(problems), self._steps(solutions, sep))

    def score_steps(self, problems: Sequence[str], solutions: Sequence, sep: str | None = None,
                    batch_size: int = 16, beyond_positions: bool = False, **_ignored) -> list[list[float]]:
        """Per solution, P(step correct) for each step: one forward pass per solution, padded batches.

        `solutions` are step lists or texts (split on `sep`, default `step_separator`). Any separator works:
        the family marks step boundaries with its own token. `beyond_positions`: score solutions longer than
        max_position_embeddings instead of failing (rotary positions only; `rlprm bench-prm`'s bench.too_long).
        Options of `RewardModel.score_steps` that do not apply here (`head_only`) are accepted and ignored.
        """
        if len(problems) != len(solutions):
            raise AdapterError(f"{len(problems)} problems but {len(solutions)} solutions")
        steps = self._steps(solutions, sep)
        live = [i for i, s in enumerate(steps) if s]  # a solution without steps has nothing to score
        encoded: list[Encoded | None] = [None] * len(steps)
        for i, e in zip(live, self.family.encode([problems[i] for i in live], [steps[i] for i in live])):
            # what follows the last read position (a template's closing tokens, rlhflow's last verdict) cannot
            # change a causal model's output before it: not run
            encoded[i] = Encoded(e.input_ids[:e.reads[-1] + 1], e.reads, e.spans)
        limit = None if beyond_positions else self.max_positions()
        longest = max((len(e.input_ids) for e in encoded if e), default=0)
        if limit and longest > limit:
            raise AdapterError(f"a solution is {longest} tokens long, beyond this model's {limit} positions")
        out: list[list[float]] = [[] for _ in encoded]
        order = sorted(live, key=lambda i: len(encoded[i].input_ids))  # less padding; results go back in order
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, probs in zip(chunk, self.family.score_batch([encoded[i] for i in chunk])):
                out[i] = probs
        return out

    def score(self, problems: Sequence[str], solutions: Sequence, aggregate: str = "prod", sep: str | None = None,
              batch_size: int = 16) -> list[float]:
        from rlprm.reward.model import aggregate as combine

        return [combine(p, aggregate) for p in self.score_steps(problems, solutions, sep=sep, batch_size=batch_size)]


def score_steps_per_prefix(rm: HubPRM, problems: Sequence[str], solutions: Sequence, sep: str | None = None,
                           batch_size: int = 16) -> list[list[float]]:
    """The slow reference: every prefix (the solution's ids cut after step k's read position) as its own
    sequence, its last step scored. Equal to `score_steps` when one pass is legitimate; batched the same way,
    and each prefix's head applied only where its own step is read (the family's `prefix`, for the implicit
    family's token spans), so that timings compare the prefixes themselves (benchmarks/prm_scoring.py, tests)."""
    encoded = rm.encode(problems, solutions, sep)
    prefixes, owner = [], []
    cut_prefix = getattr(rm.family, "prefix", None)  # a family whose reads span tokens says which ones step k needs
    for i, e in enumerate(encoded):
        for k, end in enumerate(e.reads):
            prefixes.append(cut_prefix(e, k) if cut_prefix else Encoded(e.input_ids[:end + 1], [end]))
            owner.append(i)
    order = sorted(range(len(prefixes)), key=lambda j: len(prefixes[j].input_ids))
    flat = [0.0] * len(prefixes)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for j, probs in zip(chunk, rm.family.score_batch([prefixes[j] for j in chunk])):
            flat[j] = probs[-1]
    out: list[list[float]] = [[] for _ in encoded]
    for j, i in enumerate(owner):
        out[i].append(flat[j])
    return out
