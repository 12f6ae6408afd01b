"""Shared fixtures: tiny tokenizers and models built in code, paths to the shared data."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import pytest

# W&B stays off in tests unless a test turns it on for itself
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SHARED_DATA = ROOT.parent / "shared" / "data"
EMPTY_SAFETENSORS = (2).to_bytes(8, "little") + b"{}"
"""A well-formed safetensors file holding no tensor: weights for a fake model folder that the input checks
(which read a safetensors header) accept and no test loads."""


def shared_file(relative: str) -> Path:
    """A file under ../shared/data, or a skip saying it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (real data lives in ../shared/data beside the project; see its SOURCES.md)")
    return path


@pytest.fixture(scope="session")
def char_tokenizer():
    from rlprm.models import build_char_tokenizer
    from rlprm.tasks.arithmetic import CHARSET

    return build_char_tokenizer(CHARSET)


@pytest.fixture(scope="session")
def arith_corpus():
    from rlprm.config import ArithmeticConfig
    from rlprm.steps import render_steps
    from rlprm.tasks.arithmetic import make_problems, reference_solution

    problems = make_problems(ArithmeticConfig(), 400, seed=123)
    return [p.prompt + render_steps(reference_solution(p)) for p in problems]


@pytest.fixture(scope="session")
def bpe_tokenizer(arith_corpus):
    from rlprm.models import build_bpe_tokenizer

    return build_bpe_tokenizer(arith_corpus, vocab_size=300)


def save_tiny_generator(path: Path, tokenizer, config=None) -> Path:
    """A randomly initialised tiny causal LM and its tokenizer saved like `rlprm prepare` saves a generator."""
    from rlprm.config import TinyModelConfig
    from rlprm.models import build_tiny_causal_lm

    config = config or TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    build_tiny_causal_lm(config, tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_tiny_generator(path: Path, tokenizer, problems, steps: int) -> Path:
    """A tiny causal LM fitted for `steps` full-batch AdamW steps on the reference solutions of `problems`, saved
    like `rlprm prepare` saves a generator (a few dozen steps: step-shaped lines; about 100: the solutions memorised)."""
    from rlprm.testing.tiny import fit_generator

    model = fit_generator(tokenizer, problems, steps, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory, char_tokenizer):
    """A tiny (2 layers, width 32) random generator folder, shared by a test module (the RL tests)."""
    return save_tiny_generator(tmp_path_factory.mktemp("gen") / "generator", char_tokenizer)


# the run seed of the RL tests' recipes: the answering generator has seen their first training prompts
RL_SEED = 3


@pytest.fixture(scope="session")
def answering_generator(tmp_path_factory, char_tokenizer):
    """A tiny generator (width 32) that has memorised the reference solutions of the first 8 training prompts of
    epochs 1 and 2 of a seed-`RL_SEED` RL run (250 full-batch steps, ~10-20 s on 2 cores): sampled at temperature 1
    it writes `# Answer` solutions, most right, some with slips, some unanswered or cut. A random tiny model writes
    none, so every reward is the same -1, every advantage 0, rejection sampling keeps nothing, and a resume that
    lost its optimizer state or weights looks identical. (At 120-200 steps it writes the format but not yet the
    prompt's numbers: every exact step score is 0.)"""
    from rlprm.config import ArithmeticConfig
    from rlprm.tasks.arithmetic import make_problems

    # epoch_problems' seed stream (rlprm/data/problems.py); its first 8 are the prefix of any rl.problems_per_epoch <= 8
    problems = [p for epoch in (0, 1)
                for p in make_problems(ArithmeticConfig(), 8, seed=RL_SEED * 1_000_003 + 1000 + epoch)]
    return train_tiny_generator(tmp_path_factory.mktemp("gen") / "answering", char_tokenizer, problems, steps=250)


@contextlib.contextmanager
def no_warning():
    """A block in which any warning fails the test (the counterpart of `pytest.warns`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.fixture(scope="module")
def generator(tmp_path_factory, char_tokenizer):
    """A tiny causal LM trained for a few steps on reference solutions, saved like `rlprm prepare` saves one
    (one per test module: train-rm, label, active and synthetic tests sample it)."""
    from rlprm.config import ArithmeticConfig
    from rlprm.tasks.arithmetic import make_problems

    # 30 steps: enough to write step-shaped lines, not enough to be right
    return train_tiny_generator(tmp_path_factory.mktemp("gen") / "generator", char_tokenizer,
                                make_problems(ArithmeticConfig(), 64, seed=3), steps=30)
