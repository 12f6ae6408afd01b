"""PRM-guided step-level search (rlprm/evaluation/search.py): step stopping, beam and DVTS bookkeeping, token counting."""

from __future__ import annotations

import random

import pytest

from rlprm.data.problems import TaskProblem
from rlprm.evaluation.search import SearchError, SearchSettings, SeparatorStop, StepDraw, pick, search, step_end


# --------------------------------------------------------------------------- step stopping


def test_step_end_skips_empty_steps_and_answer_steps():
    assert step_end("3 + 4 = 7\n", "\n") == len("3 + 4 = 7\n")
    assert step_end("3 + 4 = 7", "\n") is None
    assert step_end("\n\n3 + 4 = 7\nmore", "\n") == len("\n\n3 + 4 = 7\n")  # leading separators are no step
    assert step_end("# Answer\n\n7\n", "\n") is None  # the answer step holds separators: only EOS ends it
    assert step_end("a\n\nb", "\n\n") == 3
    assert step_end("a\nb\n", "\n\n") is None
    # a separator inside `# Answer` does not cut it while the text may still become one
    assert step_end("#", " ") is None and step_end("# ", " ") is None and step_end("# Answer 5 ", " ") is None
    assert step_end("x ", " ") == 2


def _feed_all(stop: SeparatorStop, rows: list[list[int]]) -> list[int | None]:
    """Feed rows token by token (padded with -1 past their end); the index at which each row first stopped."""
    width = max(len(r) for r in rows)
    first: list[int | None] = [None] * len(rows)
    for t in range(width):
        done = stop.feed([r[t] if t < len(r) else -1 for r in rows])
        for i, d in enumerate(done):
            if d and first[i] is None:
                first[i] = t
    return first


def test_separator_stop_per_row_with_a_two_token_separator(char_tokenizer):
    enc = lambda s: char_tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [enc("1 + 2 = 3\n\n4"), enc("\n\n5 - 1 = 4\n\nx"), enc("# Answer\n\n5\n\n"), enc("7 \n 8")]
    stop = SeparatorStop(char_tokenizer, "\n\n", len(rows))
    assert _feed_all(stop, rows) == [len("1 + 2 = 3\n\n") - 1, len("\n\n5 - 1 = 4\n\n") - 1, None, None]


def test_separator_stop_with_a_real_multi_token_separator():
    """Qwen2.5's byte-level BPE writes Math-Shepherd's ` ки\\n` tag as three tokens, and merges `.\\n\\n` into one:
    the row stops on the tag's last token, and on the merged token for a `\\n` separator."""
    from tests.real_tokenizers import qwen2_tokenizer_dir
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen2_tokenizer_dir())
    tag = " ки\n"
    ids = tok("3 + 4 = 7" + tag + "7 + 1 = 8" + tag, add_special_tokens=False)["input_ids"]
    assert len(tok(tag, add_special_tokens=False)["input_ids"]) > 1
    first = _feed_all(SeparatorStop(tok, tag, 1), [ids])[0]
    assert tok.decode(ids[:first + 1]) == "3 + 4 = 7" + tag
    merged = tok("so x.\n\nthen", add_special_tokens=False)["input_ids"]
    first = _feed_all(SeparatorStop(tok, "\n", 1), [merged])[0]
    assert tok.decode(merged[:first + 1]) == "so x.\n\n" and tok.decode([merged[first]]) == ".\n\n"


def test_separator_stop_cuts_stragglers_once_a_quorum_has_stopped(char_tokenizer):
    """9 of 10 rows end their step at their 2nd token; the 10th writes on: every row stops at 1.5 times that median
    (token 3), not at the cap. Without a quorum only the 9 stop."""
    enc = lambda s: char_tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [enc("1\n")] * 9 + [enc("1111111111")]
    assert _feed_all(SeparatorStop(char_tokenizer, "\n", 10, quorum=0.9), rows) == [1] * 9 + [2]
    assert _feed_all(SeparatorStop(char_tokenizer, "\n", 10), rows) == [1] * 9 + [None]
    assert _feed_all(SeparatorStop(char_tokenizer, "\n", 10, quorum=0.95), rows) == [1] * 9 + [None]


@pytest.fixture(scope="module")
def tiny_lm(char_tokenizer):
    from rlprm.config import TinyModelConfig
    from rlprm.models import build_tiny_causal_lm

    return build_tiny_causal_lm(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2),
                                char_tokenizer, seed=1)


def test_hf_step_generator_stops_each_row_at_its_separator(tiny_lm, char_tokenizer):
    """A random model over ~40 characters writes the separator now and then: in one batched `generate`, every row
    that wrote it ends its step there (one character, one token) and the others run to EOS or the cap."""
    import torch

    from rlprm.evaluation.search import HFStepGenerator

    torch.manual_seed(0)
    gen = HFStepGenerator(tiny_lm, char_tokenizer, "\n", batch_size=64)
    draws = gen.next_steps(["12 + 3\n", "4 - 1\n1 + 1 = 2\n"], n=16, temperature=1.0, max_step_tokens=24)
    assert [len(row) for row in draws] == [16, 16]
    flat = [d for row in draws for d in row]
    stepped = [d for d in flat if not d.finished]
    assert stepped and len(stepped) < len(flat)  # both kinds occur with this seed
    for d in stepped:
        body = d.text.lstrip("\n")
        assert d.text.endswith("\n") and "\n" not in body[:-1] and body.strip()
        # a character tokenizer: one token per character (a special token the random model wrote has no text)
        assert len(d.text) <= d.tokens
    for d in flat:
        if d.finished:
            assert d.tokens == 24 or d.tokens >= len(d.text) + 1  # the cap, or EOS (counted, not written)
        assert 1 <= d.tokens <= 24
    # greedy (lookahead's rollouts) is deterministic, whatever the RNG
    again = [gen.next_steps(["12 + 3\n"], n=1, temperature=1.0, max_step_tokens=24, greedy=True)[0][0]
             for _ in range(2)]
    assert again[0] == again[1]


# --------------------------------------------------------------------------- search on hand-made pieces


class TreeGenerator:
    """Step j of any partial solution is `s{j}` (j < n); at depth `depth` every step is the answer step. One token
    per step, two for an answer step. Records the contexts it was asked to extend."""

    def __init__(self, depth: int):
        self.depth = depth
        self.asked: list[list[str]] = []

    def next_steps(self, contexts, n, temperature, max_step_tokens, greedy=False):
        self.asked.append(list(contexts))
        out = []
        for c in contexts:
            partial = c.split("\n", 1)[1]  # the prompt is one line
            depth = partial.count("\n")
            if depth + 1 == self.depth:
                out.append([StepDraw(f"# Answer\n\n{partial.replace(chr(10), '')}{j}\n", 2, True) for j in range(n)])
            else:
                out.append([StepDraw(f"s{j}\n", 1, False) for j in range(n if not greedy else 1)])
        return out


class TableScorer:
    """Step probabilities from a table keyed by the path of steps so far (default 0.5); counts texts scored."""

    name = "table"

    def __init__(self, table: dict[tuple[str, ...], float]):
        self.table = table
        self.scored = 0

    def score_prefixes(self, problems, partial_texts):
        out = []
        for text in partial_texts:
            steps = [s for s in text.split("\n") if s and not s.startswith("#") and not s.isdigit()]
            self.scored += 1
            out.append([self.table.get(tuple(steps[:k + 1]), 0.5) for k in range(len(steps))])
        return out


PROBLEMS = [TaskProblem("p0", "problem zero\n", "1"), TaskProblem("p1", "problem one\n", "1")]
# s0 looks best after one step, but every step after it is poor; s1 then s0 is the best path by product
TRAP = {("s0",): 0.9, ("s1",): 0.8, ("s2",): 0.1, ("s1", "s0"): 1.0}


def test_beam_search_keeps_the_n_best_and_finds_the_known_best_path():
    gen, scorer = TreeGenerator(depth=3), TableScorer(TRAP)
    result = search(PROBLEMS, gen, scorer, SearchSettings("beam", n=2, width=3, max_steps=5))
    # round 1: 2 empty beams x 3 steps, the repeats dropped; round 2: the two kept (s0, s1) x 3; round 3: the two
    # best (s1 s0 at 0.8, then one of the s0 s* at 0.45, above s1 s1 at 0.4) x 3 answers
    assert [len(c) for c in gen.asked] == [4, 4, 4]
    assert sorted(gen.asked[1][:2]) == ["problem zero\ns0\n", "problem zero\ns1\n"]
    assert gen.asked[2][0] == "problem zero\ns1\ns0\n" and gen.asked[2][1].startswith("problem zero\ns0\n")
    for p in range(2):
        finished = result.finished[p]  # the 2 best of the 6 answers keep a place
        assert len(finished) == 2 and all(b.finished and b.steps == 3 for b in finished)
        best = max(finished, key=lambda b: b.value)
        assert best.text.startswith("s1\ns0\n# Answer") and best.value == pytest.approx(0.8 * 1.0 * 0.5)
    # tokens: 6 + 6 one-token steps, then 6 two-token answer steps per problem; every distinct candidate scored once
    assert result.tokens == [24, 24] and result.scorer_calls == [3 + 6 + 6] * 2 and scorer.scored == 30
    # n=1 is greedy: it follows s0 and never sees the better path
    greedy = search(PROBLEMS, TreeGenerator(3), TableScorer(TRAP), SearchSettings("beam", n=1, width=3, max_steps=5))
    assert max(b.value for b in greedy.finished[0]) == pytest.approx(0.9 * 0.5 * 0.5)


def test_finished_beams_compete_for_places_and_max_steps_cuts():
    """A finished candidate takes one of the n places only by ranking among the best; a poor one that ended
    early loses its place to a better partial solution. A path at max_steps finishes as it is."""
    result = search(PROBLEMS[:1], TreeGenerator(depth=10), TableScorer(TRAP),
                    SearchSettings("beam", n=2, width=2, max_steps=2))
    assert all(b.steps == 2 and not b.text.startswith("#") for b in result.finished[0])
    assert len(result.finished[0]) == 2  # round 2: 4 candidates cut at max_steps, the best 2 keep a place

    class EarlyJunk(TreeGenerator):
        """Draw 0 of the first step ends the solution at once (EOS), and scores low."""

        def next_steps(self, contexts, n, temperature, max_step_tokens, greedy=False):
            out = super().next_steps(contexts, n, temperature, max_step_tokens, greedy)
            return [[StepDraw("junk", 1, True) if c.endswith("\n") and c.count("\n") == 1 and j == 0 else d
                     for j, d in enumerate(row)] for c, row in zip(contexts, out)]

    table = {("junk",): 0.05, **TRAP}
    result = search(PROBLEMS[:1], EarlyJunk(depth=3), TableScorer(table), SearchSettings("beam", n=1, width=3))
    # under "finished ones always stay" the junk would have filled the one place and ended the search
    assert len(result.finished[0]) == 1 and result.finished[0][0].text.startswith("s1\ns0\n# Answer")


class CountingGenerator:
    """Every draw is a new step `c{k}` (k counts all draws); records contexts per call."""

    def __init__(self):
        self.k = 0
        self.asked: list[list[str]] = []

    def next_steps(self, contexts, n, temperature, max_step_tokens, greedy=False):
        self.asked.append(list(contexts))
        out = []
        for c in contexts:
            row = []
            for _ in range(n):
                self.k += 1
                row.append(StepDraw(f"c{self.k}\n", 3, c.count("\n") >= 2))
            out.append(row)
        return out


def test_dvts_splits_n_into_independent_greedy_subtrees():
    """n=6, width=2: 3 subtrees per problem; each goes on with the best of ITS OWN 2 candidates, even where
    another subtree's worst candidate scores higher (beam search would keep those instead)."""
    values = {f"c{k}": v for k, v in enumerate([0, .9, .95, .1, .2, .3, .4, .5, .6, .7, .8, .85, .99], start=0)}

    class StepScorer:
        name = "last"

        def score_prefixes(self, problems, texts):
            return [[values.get(s, 0.5) for s in t.split("\n") if s] for t in texts]

    gen = CountingGenerator()
    result = search(PROBLEMS, gen, StepScorer(), SearchSettings("dvts", n=6, width=2, max_steps=5,
                                                                aggregation="last"))
    assert len(gen.asked[0]) == 6  # 2 problems x 3 subtrees, each from the empty solution
    # problem 0's subtrees drew (c1, c2), (c3, c4), (c5, c6): each keeps its own best
    assert gen.asked[1][:3] == ["problem zero\nc2\n", "problem zero\nc4\n", "problem zero\nc6\n"]
    assert len(gen.asked[1]) == 6 and len(gen.asked) == 2  # the second step finishes every candidate
    assert all(len(row) == 3 for row in result.finished)  # one solution per subtree, its best finished candidate
    assert sorted(b.text.split("\n")[0] for b in result.finished[0]) == ["c2", "c4", "c6"]
    assert result.tokens == [36, 36] and result.scorer_calls == [12, 12]


def test_beam_search_ranks_all_of_a_problems_candidates_together():
    """Every draw distinct (no repeats to drop): each round extends exactly the n best of the problem's n x width
    candidates, whichever beam they came from."""
    values = {f"c{k}": k / 100 for k in range(100)}

    class StepScorer:
        name = "last"

        def score_prefixes(self, problems, texts):
            return [[values[s] for s in t.split("\n") if s] for t in texts]

    gen = CountingGenerator()
    result = search(PROBLEMS, gen, StepScorer(), SearchSettings("beam", n=2, width=3, max_steps=5, aggregation="last"))
    assert [len(c) for c in gen.asked] == [4, 4]
    # problem 0's 2 x 3 first steps are c1..c6; the last two drawn score highest
    assert sorted(gen.asked[1][:2]) == ["problem zero\nc5\n", "problem zero\nc6\n"]
    assert [len(row) for row in result.finished] == [2, 2]


def test_lookahead_scores_the_rollout_and_counts_its_tokens():
    gen, scorer = TreeGenerator(depth=3), TableScorer(TRAP)
    result = search(PROBLEMS[:1], gen, scorer, SearchSettings("beam", n=2, width=3, lookahead=1, max_steps=5))
    # round 1's distinct candidates s0, s1, s2 are rolled out one greedy step (s0 each): s1 s0 scores 0.8 * 1.0,
    # above s0 s0 (0.45), so s1 comes first; without lookahead s0 (0.9) would
    assert len(gen.asked[1]) == 3 and gen.asked[2] == ["problem zero\ns1\n", "problem zero\ns0\n"]
    assert "problem zero\ns1\ns0\n" in gen.asked[4]  # round 2's lookahead is gen.asked[3]
    # 6 steps (3 distinct) + 3 lookahead steps, 6 steps + 6 lookahead answer steps (2 tokens), then 6 answer steps
    assert result.tokens[0] == 6 + 3 + 6 + 6 * 2 + 6 * 2


# --------------------------------------------------------------------------- settings and the final pick


def test_settings_are_validated():
    with pytest.raises(SearchError, match="multiple of width"):
        SearchSettings("dvts", n=6, width=4)
    with pytest.raises(SearchError, match="method"):
        SearchSettings("mcts")
    with pytest.raises(SearchError, match="aggregation"):
        SearchSettings("beam", aggregation="max")
    SearchSettings("beam", n=3, width=2)  # beam search has no divisibility rule


def test_config_section_is_validated(tmp_path):
    from rlprm.config import RecipeError, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("eval: {search: {method: dvts, n: 6, width: 4, scorer: checker}}\n")
    with pytest.raises(RecipeError, match="multiple of width"):
        load_recipe(recipe)
    recipe.write_text("eval: {search: {method: beam, scorer: nope}}\n")
    with pytest.raises(RecipeError, match="eval.reward_models"):
        load_recipe(recipe)
    recipe.write_text("eval: {search: {method: beam, widht: 2}}\n")
    with pytest.raises(RecipeError, match="widht"):
        load_recipe(recipe)
    recipe.write_text("eval: {search: {method: beam, n: 4, width: 2, scorer: checker}}\n")
    assert load_recipe(recipe).eval.search.width == 2


def test_budgets():
    from rlprm.evaluation.search_report import budgets

    assert budgets("beam", 8, 4) == [1, 2, 4, 8] and budgets("beam", 6, 2) == [1, 2, 4, 6]
    assert budgets("dvts", 16, 4) == [4, 8, 16] and budgets("dvts", 4, 4) == [4]


def test_pick_uses_best_of_n_selectors():
    rng = random.Random(0)
    assert pick([0.1, 0.9, 0.3], ["a", "b", "a"], "score", rng) == 1
    assert pick([0.1, 0.9, 0.3], ["a", "b", "a"], "majority", rng) in (0, 2)
    assert pick([0.1, 0.9, 0.3], ["a", "b", "a"], "weighted_majority", rng) == 1
    assert pick([], [], "score", rng) is None


def test_search_on_arithmetic_with_the_checker_and_the_tiny_generator(tiny_lm, char_tokenizer):
    """End to end with HF generate: every finished solution's step scores are the checker's verdicts, tokens are
    counted, and the outcomes grade the picked solutions."""
    from rlprm.config import ArithmeticConfig
    from rlprm.data.problems import from_arithmetic
    from rlprm.evaluation.search import CheckerScorer, HFStepGenerator, search_outcomes
    from rlprm.tasks.arithmetic import check, make_problems

    problems = from_arithmetic(make_problems(ArithmeticConfig(), 2, seed=0))
    gen = HFStepGenerator(tiny_lm, char_tokenizer, "\n")
    result = search(problems, gen, CheckerScorer(), SearchSettings("beam", n=2, width=2, max_steps=3,
                                                                   max_step_tokens=12, max_new_tokens=30))
    for p, row in enumerate(result.finished):
        assert row
        for b in row:
            assert b.scores == [float(x) for x in check(problems[p].arith, b.text).step_correct]
            assert b.tokens <= result.tokens[p]
    assert all(t >= 4 for t in result.tokens) and all(c >= 4 for c in result.scorer_calls)
    out = search_outcomes(result, "\n")
    assert set(out) == {"score", "majority", "weighted_majority"}
    assert out["score"].tokens == [float(t) for t in result.tokens] and len(out["score"].correct) == 2


def test_rlprm_eval_with_search_writes_the_compute_matched_table(tmp_path, char_tokenizer, tiny_lm):
    """`rlprm eval` with eval.search on tiny models built here: beam search with an rlprm PRM as the scorer,
    best-of-N from the pool, the table, the plot and the paired differences."""
    import json

    from rlprm.cli import main
    from rlprm.reward.model import RewardModel, make_convention, reward_model_from_causal_lm

    tiny_lm.save_pretrained(tmp_path / "gen")
    char_tokenizer.save_pretrained(tmp_path / "gen")
    conv = make_convention("prm", "\n")
    RewardModel(reward_model_from_causal_lm(conv, tiny_lm, char_tokenizer), char_tokenizer, conv).save(tmp_path / "prm")
    recipe = tmp_path / "s.yaml"
    recipe.write_text(
        "run: {output_dir: out}\nmodel: {generator: ./gen}\ntracking: {wandb: disabled}\n"
        "eval: {n_max: 4, num_problems: 3, resamples: 20, max_new_tokens: 24, reward_models: {prm: ./prm},\n"
        "       search: {method: beam, n: 2, width: 2, max_steps: 3, max_step_tokens: 12, scorer: prm}}\n")
    assert main(["eval", str(recipe), "--no-progress"]) == 0
    out = tmp_path / "out"
    for name in ("search.json", "search.md", "search.png", "bon_curves.json"):
        assert (out / name).exists(), name
    report = json.loads((out / "search.json").read_text())
    methods = {(r["method"], r["budget"]) for r in report["rows"]}
    assert {("beam_prm_prod", 2), ("beam_majority", 2), ("bon_prm_prod", 4), ("bon_majority", 1)} <= methods
    for r in report["rows"]:
        assert 0 <= r["accuracy"]["lo"] <= r["accuracy"]["mean"] <= r["accuracy"]["hi"] <= 1
        assert r["tokens"]["mean"] > 0
    bon = {r["budget"]: r["tokens"]["mean"] for r in report["rows"] if r["method"] == "bon_prm_prod"}
    assert bon[4] > bon[2] > bon[1]  # best-of-N's tokens grow with N
    assert [(d["a"], d["a_budget"], d["b"]) for d in report["differences"]] == [
        ("beam_prm_prod", 1, "bon_prm_prod"), ("beam_prm_prod", 2, "bon_prm_prod")]
    assert "Search minus best-of-N" in (out / "search.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert "search/beam_prm_prod/budget=2/accuracy" in summary


def test_confidence_scorer_is_each_steps_least_likely_token(tiny_lm, char_tokenizer):
    import math

    import torch

    from rlprm.evaluation.search import ConfidenceScorer

    problem = TaskProblem("p", "12 + 3\n", "15", text="12 + 3")
    text = "12 + 3 = 15\n# Answer\n\n15\n"
    got = ConfidenceScorer(tiny_lm, char_tokenizer, "\n").score_prefixes([problem, problem], [text, ""])
    assert got[1] == [] and len(got[0]) == 2
    ids = char_tokenizer(problem.prompt + text)["input_ids"]
    start = len(char_tokenizer(problem.prompt)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(tiny_lm(torch.tensor([ids])).logits[0].double(), -1)
    token_lp = [float(logp[t - 1, ids[t]]) for t in range(start, len(ids))]
    first = len("12 + 3 = 15\n")
    assert got[0][0] == pytest.approx(math.exp(min(token_lp[:first])), rel=1e-4)
    assert got[0][1] == pytest.approx(math.exp(min(token_lp[first:])), rel=1e-4)


def test_a_hub_family_stand_in_scores_partial_solutions(tmp_path):
    """A qwen_prm stand-in (its <extra_0> step tag, chat template) guides the search through its adapter; every
    finished solution keeps the scores the adapter gives its steps."""
    from rlprm.reward.adapters import load_reward_model
    from rlprm.testing.standins import save_standin
    from rlprm.evaluation.search import RewardModelScorer

    folder = save_standin("qwen_prm", tmp_path / "qwen")
    rm = load_reward_model(folder, "qwen_prm")
    problems = [TaskProblem("p0", "What is 1 + 1?\n", "2", text="What is 1 + 1?")]
    result = search(problems, TreeGenerator(depth=3), RewardModelScorer(rm, "qwen", "\n"),
                    SearchSettings("beam", n=2, width=2, max_steps=5))
    finished = result.finished[0]
    assert finished and all(len(b.scores) == 3 for b in finished)
    from rlprm.steps import split_steps

    direct = rm.score_steps([problems[0].text] * len(finished), [split_steps(b.text) for b in finished])
    for b, d in zip(finished, direct):
        assert b.scores == pytest.approx(d, abs=1e-5)
    assert len({round(b.value, 6) for b in finished}) > 1  # the stand-in tells candidates apart


def test_vllm_step_generator_goes_on_past_stops_that_end_no_step(char_tokenizer, monkeypatch):
    """A stand-in engine that writes one fixed solution and honours stop_token_ids and max_tokens the way vLLM
    does (here leaving the stop token out of token_ids, the case the generator puts it back): a leading
    separator and the separators inside the answer step stop a request but end no step, so the row goes on."""
    from types import SimpleNamespace

    import rlprm.rollout
    from rlprm.evaluation.search import VLLMStepGenerator

    monkeypatch.setattr(rlprm.rollout, "sampling_params", lambda **kw: SimpleNamespace(**kw))
    tok = char_tokenizer
    prompt, solution = "12 + 3\n", "\n12 + 3 = 15\n# Answer\n\n15\n"
    eos = tok.eos_token_id

    class Engine:
        requests = 0

        def generate(self, prompts, sampling_params, use_tqdm=False):
            outs = []
            for p, params in zip(prompts, sampling_params):
                self.requests += 1
                written = tok.decode(p["prompt_token_ids"], skip_special_tokens=True)[len(prompt):]
                assert solution.startswith(written)
                rest = tok(solution[len(written):], add_special_tokens=False)["input_ids"] + [eos]
                ids, reason, stop = [], "length", None
                for t in rest[:params.max_tokens]:
                    if t in params.stop_token_ids:
                        reason, stop = "stop", (None if t == eos else t)
                        if t == eos:
                            ids.append(t)
                        break
                    ids.append(t)
                outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason=reason,
                                                                     stop_reason=stop)] * params.n))
            return outs

    engine = Engine()
    gen = VLLMStepGenerator(engine, tok, "\n")
    first = gen.next_steps([prompt], n=2, temperature=1.0, max_step_tokens=40)
    assert [(d.text, d.tokens, d.finished) for d in first[0]] == [("\n12 + 3 = 15\n", 13, False)] * 2
    answer = gen.next_steps([prompt + "\n12 + 3 = 15\n"], n=1, temperature=1.0, max_step_tokens=40)
    assert (answer[0][0].text, answer[0][0].tokens, answer[0][0].finished) == ("# Answer\n\n15\n", 14, True)
    capped = gen.next_steps([prompt], n=1, temperature=1.0, max_step_tokens=5)
    assert (capped[0][0].tokens, capped[0][0].finished) == (5, True)


def test_rlprm_eval_with_dvts_guided_by_a_hub_family_stand_in(tmp_path, char_tokenizer, tiny_lm):
    """The same job with DVTS and a qwen_prm stand-in (named in eval.reward_model_adapters) as the scorer."""
    import json

    from rlprm.cli import main
    from rlprm.testing.standins import save_standin

    tiny_lm.save_pretrained(tmp_path / "gen")
    char_tokenizer.save_pretrained(tmp_path / "gen")
    save_standin("qwen_prm", tmp_path / "qwen")
    recipe = tmp_path / "s.yaml"
    recipe.write_text(
        "run: {output_dir: out}\nmodel: {generator: ./gen}\ntracking: {wandb: disabled}\n"
        "eval: {n_max: 4, num_problems: 2, resamples: 20, max_new_tokens: 24, reward_models: {qwen: ./qwen},\n"
        "       reward_model_adapters: {qwen: qwen_prm},\n"
        "       search: {method: dvts, n: 4, width: 2, max_steps: 3, max_step_tokens: 12, scorer: qwen}}\n")
    assert main(["eval", str(recipe), "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "search.json").read_text())
    assert report["scorer"] == "qwen" and report["method"] == "dvts"
    assert {(r["method"], r["budget"]) for r in report["rows"] if r["method"].startswith("dvts")} == {
        ("dvts_qwen_prod", 2), ("dvts_qwen_prod", 4), ("dvts_majority", 2), ("dvts_majority", 4)}
    assert all(r["scorer_calls_per_problem"] >= 2 for r in report["rows"] if r["method"].startswith("dvts"))
