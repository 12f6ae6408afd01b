import pytest

from rlprm.steps import (
    StepTokenError,
    answer_step,
    char_ends_to_token_ends,
    encode_batch,
    encode_steps,
    render_steps,
    split_steps,
    step_answer,
    step_char_ends,
    token_char_ends,
)

STEPS = ["93 + 3 = 96", "96 - 4 = 92", "92 mod 10 = 2", answer_step("2")]
PROMPT = "93 +3 -4 mod 10\n"


@pytest.mark.parametrize("sep", ["\n", "\n\n", " ; "])
def test_render_split_round_trip(sep):
    text = render_steps(STEPS, sep)
    assert text.endswith(sep)
    assert split_steps(text, sep) == STEPS


def test_answer_step_holds_newlines_and_stays_one_step():
    assert answer_step("7") == "# Answer\n\n7"
    assert split_steps("1 + 1 = 2\n# Answer\n\n2\n") == ["1 + 1 = 2", "# Answer\n\n2"]
    assert step_answer("# Answer\n\n2") == "2"
    assert step_answer("# Answer: 5") == "5"
    assert step_answer("# Answer") is None
    assert step_answer("5") is None


def test_split_drops_empty_pieces_and_strips():
    assert split_steps("\n a \n\n b\n") == ["a", "b"]
    assert split_steps("") == []


def test_step_char_ends_match_split():
    text = render_steps(STEPS)
    ends = step_char_ends(text)
    assert len(ends) == len(STEPS)
    for k, end in enumerate(ends):
        assert split_steps(text[:end]) == STEPS[: k + 1]
        assert text[:end].endswith("\n")
    # no trailing separator: the last step ends at its last character
    assert step_char_ends("a\nb") == [2, 3]


def _check_prefixes(tokenizer, prompt, steps, sep):
    full = encode_steps(tokenizer, prompt, steps, sep)
    assert len(full.step_ends) == len(steps)
    assert full.step_ends == sorted(full.step_ends) and full.step_ends[0] >= full.prompt_len
    for k, end in enumerate(full.step_ends):
        # the ids up to a step end are exactly the encoding of the solution cut after that step
        assert full.input_ids[: end + 1] == encode_steps(tokenizer, prompt, steps[: k + 1], sep).input_ids
        decoded = tokenizer.decode(full.input_ids[: end + 1], skip_special_tokens=True)
        assert decoded.endswith(steps[k] + sep)
    return full


def test_char_tokenizer_step_ends(char_tokenizer):
    full = _check_prefixes(char_tokenizer, PROMPT, STEPS, "\n")
    nl = char_tokenizer.convert_tokens_to_ids("\n")
    assert all(full.input_ids[e] == nl for e in full.step_ends)
    assert full.input_ids[0] == char_tokenizer.bos_token_id


def test_bpe_tokenizer_step_ends(bpe_tokenizer):
    _check_prefixes(bpe_tokenizer, PROMPT, STEPS, "\n")


def test_bpe_merges_separator_into_previous_token():
    """A BPE without pre-tokenisation learns `= 2\\n`-style merges: the step end is the merged token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from rlprm.models import SPECIAL_TOKENS, _wrap

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["x = 2\ny = 2\n" * 50, "= 2\n" * 200], trainer=trainer)
    tokenizer = _wrap(tok, 256)
    steps = ["x = 2", "y = 2"]
    full = _check_prefixes(tokenizer, "q\n", steps, "\n")
    last = tokenizer.convert_ids_to_tokens(full.input_ids[full.step_ends[0]])
    assert len(tokenizer.convert_tokens_to_string([last])) > 1, "the test needs a merge across the separator"


def test_space_separator_with_byte_level_bpe(bpe_tokenizer):
    """On whole text GPT-2-style BPE glues ' ' onto the next word; piecewise the step end survives."""
    whole = bpe_tokenizer.convert_ids_to_tokens(bpe_tokenizer("12 34", add_special_tokens=False)["input_ids"])
    assert "Ġ" not in whole and any(t.startswith("Ġ") for t in whole), whole  # the space went to the next word
    _check_prefixes(bpe_tokenizer, "q ", ["12", "34", "56"], " ")


def test_separator_normalised_away_is_an_error():
    from tokenizers import normalizers

    from rlprm.models import build_char_tokenizer

    tokenizer = build_char_tokenizer("abc\n ")
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("\n", "")
    with pytest.raises(StepTokenError, match="normalises the step separator"):
        encode_steps(tokenizer, "a", ["b", "c"], "\n")


def test_unknown_symbols_do_not_drop_the_end(char_tokenizer):
    full = encode_steps(char_tokenizer, "?", ["€€", "b"], "\n")
    assert len(full.step_ends) == 2


def test_batch_matches_single(char_tokenizer):
    sols = [STEPS, STEPS[:2], [answer_step("0")]]
    batch = encode_batch(char_tokenizer, [PROMPT] * 3, sols)
    for enc, steps in zip(batch, sols):
        assert enc == encode_steps(char_tokenizer, PROMPT, steps)
    with pytest.raises(ValueError):
        encode_batch(char_tokenizer, [PROMPT], sols)


@pytest.mark.parametrize("which", ["char_tokenizer", "bpe_tokenizer"])
def test_char_offsets_to_generated_tokens(which, request):
    tokenizer = request.getfixturevalue(which)
    text = render_steps(STEPS)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tok_ends = token_char_ends(tokenizer, ids)
    assert tok_ends[-1] == len(text)
    positions = char_ends_to_token_ends(tok_ends, step_char_ends(text))
    assert len(positions) == len(STEPS) and positions[-1] == len(ids) - 1
    for pos, end in zip(positions, step_char_ends(text)):
        # the token at a step end is the first one whose text reaches past the step's last character
        assert tok_ends[pos] >= end and (pos == 0 or tok_ends[pos - 1] < end)
    with pytest.raises(StepTokenError):
        char_ends_to_token_ends(tok_ends, [len(text) + 5])
