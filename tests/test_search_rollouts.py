"""Search-guided RL rollouts (rl.rollout_search): the groups a PRM-guided tree draws, on hand-made pieces and on a
tiny generator; rejection sampling drawing its N from the tree end to end; the config's refusals."""

from __future__ import annotations

import pytest

from rlprm.data.problems import TaskProblem
from rlprm.evaluation.search import StepDraw
from rlprm.rl.search_rollouts import draw_groups, plain_tokens, settings_for
from rlprm.steps import ANSWER_MARK, split_steps
from rlprm.tracking import read_metrics

from .conftest import RL_SEED


class Steps:
    """Step j of any partial solution is `s{j}` (one token); the third step is the answer `# Answer\\n\\n{j}` (two
    tokens, finished). same=True: every draw is `s0` / answer 0 (a generator with no spread)."""

    def __init__(self, same: bool = False):
        self.same = same

    def next_steps(self, contexts, n, temperature, max_step_tokens, greedy=False):
        out = []
        for c in contexts:
            depth = c.split("\n", 1)[1].count("\n")
            js = [0] * n if self.same else range(n)
            out.append([StepDraw(f"{ANSWER_MARK}\n\n{j}", 2, True) if depth == 2 else StepDraw(f"s{j}\n", 1, False)
                        for j in js])
        return out


class Zeros:
    """A step's probability: 0.9 for `s0` and the answer 0, 0.8 for the answer 1, else 0.5."""

    name = "zeros"

    def score_prefixes(self, problems, partial_texts):
        table = {"s0": 0.9, f"{ANSWER_MARK}\n\n0": 0.9, f"{ANSWER_MARK}\n\n1": 0.8}
        return [[table.get(s, 0.5) for s in split_steps(t, "\n")] for t in partial_texts]


PROBLEMS = [TaskProblem("p0", "problem zero\n", "0"), TaskProblem("p1", "problem one\n", "0")]


def _cfg(method: str, width: int):
    from rlprm.config import RolloutSearchConfig

    return RolloutSearchConfig(method=method, width=width, max_steps=6, max_step_tokens=8)


def test_beam_groups_share_prefixes_best_first_and_count_every_token():
    settings = settings_for(_cfg("beam", 2), group_size=2, max_new_tokens=50, temperature=1.0, seed=0)
    groups = draw_groups(PROBLEMS, Steps(), Zeros(), settings, group_size=2)
    for texts, values in zip(groups.texts, groups.values):
        # the best paths by product are s0 s0 then answer 0 (0.9^3), then s0 s0 answer 1 (0.9^2 x 0.8): one shared
        # prefix, branching at the last step
        assert texts == ["s0\ns0\n# Answer\n\n0", "s0\ns0\n# Answer\n\n1"]
        assert values == pytest.approx([0.9 ** 3, 0.9 ** 2 * 0.8])
    # per problem: round 1 draws 2 x 2 one-token steps, round 2 extends the 2 kept (2 x 2), round 3 writes 2 x 2
    # two-token answers: pruned branches count as generated
    assert groups.tokens == [4 + 4 + 8] * 2 and groups.generated_tokens == 32
    assert groups.short == 0 and all(c > 0 for c in groups.scorer_calls)


def test_dvts_draws_one_completion_per_subtree():
    settings = settings_for(_cfg("dvts", 2), group_size=3, max_new_tokens=50, temperature=1.0, seed=0)
    assert settings.n == 6 and settings.subtrees == 3  # group_size subtrees of width 2
    groups = draw_groups(PROBLEMS, Steps(), Zeros(), settings, group_size=3)
    # every subtree is greedy on the scorer: s0 s0 answer 0 in each; 3 subtrees x (2 + 2 + 4) tokens
    assert groups.texts == [["s0\ns0\n# Answer\n\n0"] * 3] * 2
    assert groups.tokens == [3 * 8] * 2 and groups.short == 0


def test_a_search_that_finishes_too_few_fills_the_group_with_its_best():
    # width 1 and no spread: the 3 beams are one repeated partial solution, dropped to one, which finishes alone
    settings = settings_for(_cfg("beam", 1), group_size=3, max_new_tokens=50, temperature=1.0, seed=0)
    groups = draw_groups(PROBLEMS, Steps(same=True), Zeros(), settings, group_size=3)
    assert groups.texts == [["s0\ns0\n# Answer\n\n0"] * 3] * 2 and groups.short == 2


def test_plain_tokens_count_eos_below_the_cap():
    # lengths 3 (stopped: +EOS), 5 (cut at the cap: no EOS), 0 (EOS at once)
    assert plain_tokens([[[1, 2, 3], [1, 2, 3, 4, 5]], [[]]], max_new_tokens=5) == 4 + 5 + 1


def _memorised_problems(n: int = 2):
    from rlprm.config import ArithmeticConfig
    from rlprm.data.problems import from_arithmetic
    from rlprm.tasks.arithmetic import make_problems

    return from_arithmetic(make_problems(ArithmeticConfig(), n, seed=RL_SEED * 1_000_003 + 1000))


def test_groups_from_the_tiny_generator_with_the_checker(answering_generator):
    """HF generate stepping at the separator: group_size completions per prompt, built of the steps the tree
    shared, and the checker steers them to right answers (the tree is the evaluation module's, not a copy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlprm.config import RolloutSearchConfig
    from rlprm.data.problems import grade_samples
    from rlprm.rl.search_rollouts import make_scorer, step_generator

    tok = AutoTokenizer.from_pretrained(answering_generator)
    model = AutoModelForCausalLM.from_pretrained(answering_generator)
    problems = _memorised_problems()
    cfg = RolloutSearchConfig(method="beam", width=2, max_steps=8, max_step_tokens=48, scorer="checker")
    settings = settings_for(cfg, group_size=4, max_new_tokens=96, temperature=1.0, seed=0)
    groups = draw_groups(problems, step_generator(model, tok, "\n", 64), make_scorer(cfg, model, tok, None, "\n"),
                         settings, group_size=4)
    assert [len(row) for row in groups.texts] == [4, 4]
    for row, values in zip(groups.texts, groups.values):
        firsts = [split_steps(t, "\n")[0] for t in row]
        assert len(set(firsts)) < len(firsts)  # 4 beams, 2 first steps each round: branches share prefixes
        assert values == sorted(values, reverse=True) and values[0] == 1.0  # best first; an all-right path found
    grades = grade_samples(problems, groups.texts, "\n")
    # every completion finished with its answer step; the best of each group is right in every step
    assert all(g.answer is not None for row in grades for g in row)
    assert all(row[0].answer_correct and row[0].process_correct for row in grades)
    # what the search spent covers the longest kept completion (one character token each); shared prefixes are
    # generated once, so the group's summed length may exceed it
    assert all(t >= max(len(x) for x in row) for t, row in zip(groups.tokens, groups.texts))


def test_rejection_sampling_draws_from_the_tree_end_to_end(answering_generator, tmp_path):
    from rlprm.config import validate_recipe
    from rlprm.rl import train

    def recipe(out, search):
        return validate_recipe({
            "run": {"output_dir": str(tmp_path / out), "device": "cpu", "seed": RL_SEED, "threads": 1},
            "model": {"generator": str(answering_generator)},
            "reward": {"mode": "sparse", "source": "ground_truth"},
            "rl": {"algorithm": "rejection_sampling", "epochs": 1, "problems_per_epoch": 2,
                   "samples_per_problem": 4, "max_new_tokens": 96, "sft_batch_size": 2, "learning_rate": 1e-3,
                   "rejection_top_k": 2, "eval_n_max": 0, "rollout_search": search},
            "eval": {"resamples": 5},
            "tracking": {"wandb": "disabled"},
        }, tmp_path)

    train(recipe("tree", {"method": "beam", "width": 2, "scorer": "checker", "max_steps": 8}), progress=False)
    tree = [r for r in read_metrics(tmp_path / "tree" / "metrics.jsonl") if "rs/kept" in r][0]
    assert tree["rs/generated_tokens"] > 2 * 4 * 20  # 8 completions of 20+ characters, and the pruned branches
    assert 0 <= tree["rs/search_short_groups"] <= 2 and tree["rs/search_scorer_calls"] > 0
    # the checker steered the pool towards right solutions: some kept (right ones only) and trained on
    assert tree["rl/answer_accuracy"] >= 0.5 and tree["rs/kept"] >= 2 and tree["rs/sft_steps"] >= 1
    assert tree["rs/kept_answer_accuracy"] == 1.0

    train(recipe("plain", {}), progress=False)
    plain = [r for r in read_metrics(tmp_path / "plain" / "metrics.jsonl") if "rs/kept" in r][0]
    assert plain["rs/generated_tokens"] > 0 and "rs/search_short_groups" not in plain


class SepSteps(Steps):
    sep = "\n"


def test_trl_rollout_hands_grpo_one_group_per_run_of_copies(char_tokenizer):
    """TRL's rollout_func contract: one completion per prompt copy, in order, the answer ones ending on EOS, and the
    policy's log-probs of exactly the ids handed over."""
    from rlprm.config import TinyModelConfig
    from rlprm.models import build_tiny_causal_lm
    from rlprm.rl.search_rollouts import TRLRollout, policy_logprobs

    policy = build_tiny_causal_lm(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2),
                                  char_tokenizer, seed=1)
    counts: dict = {}
    rollout = TRLRollout(PROBLEMS, SepSteps(), Zeros(), _cfg("beam", 2), policy, char_tokenizer,
                         max_new_tokens=96, temperature=0.7, seed=0, counts=counts)
    # a slice whose last group is cut short (as when a group straddles two ranks)
    prompts = [PROBLEMS[0].prompt] * 2 + [PROBLEMS[1].prompt] * 3 + [PROBLEMS[0].prompt]
    out = rollout(prompts, None)
    assert len(out["prompt_ids"]) == len(out["completion_ids"]) == len(out["logprobs"]) == 6
    texts = [char_tokenizer.decode(ids, skip_special_tokens=True) for ids in out["completion_ids"]]
    assert texts[:2] == ["s0\ns0\n# Answer\n\n0", "s0\ns0\n# Answer\n\n1"] and texts[5] == texts[0]
    assert all(ids[-1] == char_tokenizer.eos_token_id for ids in out["completion_ids"])
    assert [len(lp) for lp in out["logprobs"]] == [len(ids) for ids in out["completion_ids"]]
    again = policy_logprobs(policy, out["prompt_ids"][:1], out["completion_ids"][:1], 0.7)
    assert again[0] == pytest.approx(out["logprobs"][0]) and max(out["logprobs"][0]) < 0
    # groups of 2, 3 and 1 were searched; every token they generated is counted
    assert counts["generated_tokens"] > 0 and rollout.calls == 1


def test_grpo_trains_on_the_trees_groups(answering_generator, tmp_path):
    from rlprm.config import validate_recipe
    from rlprm.rl import train

    recipe = validate_recipe({
        "run": {"output_dir": str(tmp_path / "grpo"), "device": "cpu", "seed": RL_SEED, "threads": 1},
        "model": {"generator": str(answering_generator)},
        "reward": {"mode": "sparse", "source": "ground_truth"},
        "rl": {"algorithm": "grpo", "epochs": 1, "problems_per_epoch": 2, "prompts_per_iteration": 2,
               "samples_per_problem": 2, "max_new_tokens": 96, "minibatch_size": 4, "ppo_epochs": 1,
               "learning_rate": 1e-3, "eval_n_max": 0,
               "rollout_search": {"method": "beam", "width": 2, "scorer": "checker", "max_steps": 8}},
        "eval": {"resamples": 5},
        "tracking": {"wandb": "disabled"},
    }, tmp_path)
    train(recipe, progress=False)
    it = [r for r in read_metrics(tmp_path / "grpo" / "metrics.jsonl") if "rl/reward" in r]
    assert len(it) == 1 and it[0]["rl/generated_tokens"] > 4 * 20 and "rl/search_short_groups" in it[0]
    # the checker steered the groups to right answers (a fitted but sampled generator gets some wrong alone)
    assert it[0]["rl/answer_accuracy"] >= 0.5 and it[0]["rl/loss"] is not None
    # plain GRPO counts what TRL sampled in the same entry (2 prompts x 2 completions of at least one token)
    recipe.rl.rollout_search.method = "none"
    recipe.run.output_dir = tmp_path / "plain"
    train(recipe, progress=False)
    plain = [r for r in read_metrics(tmp_path / "plain" / "metrics.jsonl") if "rl/reward" in r]
    assert plain[0]["rl/generated_tokens"] >= 4 and "rl/search_short_groups" not in plain[0]


def test_config_refusals(tmp_path):
    from rlprm.config import RecipeError, validate_recipe

    def check(rl, **top):
        return validate_recipe({"rl": rl, "tracking": {"wandb": "disabled"}, **top}, tmp_path)

    search = {"method": "beam", "width": 2}
    data = tmp_path / "problems.jsonl"
    data.write_text('{"problem": "1 + 1", "answer": "2"}\n')
    with pytest.raises(RecipeError, match="model.reward_model"):  # the default scorer needs a reward model
        check({"algorithm": "rejection_sampling", "rollout_search": search})
    with pytest.raises(RecipeError, match="rollout_search: not a key of rl.algorithm ppo"):  # on-policy critic
        check({"algorithm": "ppo", "rollout_search": {**search, "scorer": "checker"}})
    with pytest.raises(RecipeError, match="none, beam|'none'"):
        check({"algorithm": "rejection_sampling", "rollout_search": {"method": "best_of_n", "scorer": "checker"}})
    with pytest.raises(RecipeError, match="exact step checker"):
        check({"algorithm": "rejection_sampling", "rollout_search": {**search, "scorer": "checker"}},
              task={"name": "gsm8k", "train_path": str(data), "test_path": str(data)})
    ok = check({"algorithm": "rejection_sampling", "rollout_search": {**search, "scorer": "checker"}})
    assert ok.rl.rollout_search.width == 2 and ok.rl.rollout_search.method == "beam"
    assert check({"algorithm": "rejection_sampling"}).rl.rollout_search.method == "none"  # off by default
