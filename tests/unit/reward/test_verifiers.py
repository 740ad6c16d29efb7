"""Each verifier on real reasoning-gym entries, right and wrong answers."""

from __future__ import annotations

import json
import threading

import pytest
import reasoning_gym
from rlfleet.common.tasks import entry_to_json
from rlfleet.reward.verifiers import EOS_MARKER, extract_answer, setup_verifier


def _entries(name: str, n: int = 4, **params) -> list[dict]:
    ds = reasoning_gym.create_dataset(name, size=n, seed=7, **params)
    # The entry reaches the reward service as JSON, so score what JSON gives back.
    return [json.loads(entry_to_json(ds[i])) for i in range(n)]


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        (" 42", "42"),
        (" 42\nQuestion: what is 1+1? Answer: 2", "42"),
        ("\n\n 42 \n more", "42"),
        (f" 42{EOS_MARKER}junk", "42"),
        (f" 4{EOS_MARKER}2\n", "4"),
        ("", ""),
        ("   \n  ", ""),
    ],
)
def test_first_line_extraction(completion, answer):
    assert extract_answer(completion) == answer


def test_full_extraction_keeps_lines_but_cuts_at_eos():
    assert extract_answer(f" a\nb \n{EOS_MARKER}c", mode="full") == "a\nb"


def test_reasoning_gym_scores_right_and_wrong_answers():
    verifier = setup_verifier("reasoning_gym", {})
    for entry in _entries("basic_arithmetic"):
        verifier.check_entry(entry)
        assert verifier.score(f" {entry['answer']}\nNext question", entry) == 1.0
        wrong = str(int(entry["answer"]) + 1)
        assert verifier.score(f" {wrong}{EOS_MARKER}", entry) == 0.0
        assert verifier.score("", entry) == 0.0


def test_reasoning_gym_uses_the_tasks_own_scorer():
    # word_sorting's scorer is not a plain string comparison of the raw text.
    verifier = setup_verifier("reasoning_gym", {})
    entry = _entries("word_sorting", 1)[0]
    assert verifier.score(" " + entry["answer"], entry) == 1.0
    assert verifier.score(" nonsense", entry) < 1.0


def test_reasoning_gym_entry_checks():
    verifier = setup_verifier("reasoning_gym", {})
    with pytest.raises(ValueError, match="source_dataset"):
        verifier.check_entry({"answer": "1"})
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset"):
        verifier.check_entry({"answer": "1", "metadata": {"source_dataset": "no_such_task"}})


@pytest.mark.parametrize(
    ("gold", "completion", "reward"),
    [
        ("1/2", " 0.5", 1.0),
        ("0.5", " 1/2", 1.0),
        ("1/2", " \\frac{1}{2}", 1.0),
        ("\\frac{1}{2}", " 0.50\nmore text", 1.0),
        ("$244/607$", " 244/607", 1.0),
        ("2", " 2.0", 1.0),
        ("1/2", " 0.4", 0.0),
        ("-4", " 4", 0.0),
        ("1/2", " not a number", 0.0),
        ("1/2", "", 0.0),
    ],
)
def test_math_equivalent_forms(gold, completion, reward):
    assert setup_verifier("math", {}).score(completion, {"answer": gold}) == reward


def test_math_on_reasoning_gym_entries():
    verifier = setup_verifier("math", {})
    for entry in _entries("fraction_simplification", 3):
        bare = entry["answer"].strip("$")
        assert verifier.score(f" {bare}", entry) == 1.0
        assert verifier.score(" 12345/7", entry) == 0.0


def test_math_full_extraction_finds_a_boxed_answer():
    verifier = setup_verifier("math", {"extract": "full"})
    assert verifier.score(" Let me think.\nSo it is \\boxed{0.5}.", {"answer": "1/2"}) == 1.0


def test_math_refuses_overlong_answers_unparsed():
    verifier = setup_verifier("math", {"max_answer_chars": 8})
    assert verifier.score(" 0.5000000000", {"answer": "1/2"}) == 0.0


def test_math_runs_outside_the_main_thread():
    # math-verify's default signal-based timeouts raise in worker threads.
    results = []
    thread = threading.Thread(
        target=lambda: results.append(setup_verifier("math").score(" 0.5", {"answer": "1/2"}))
    )
    thread.start()
    thread.join()
    assert results == [1.0]


def test_exact():
    verifier = setup_verifier("exact", {})
    for entry in _entries("chain_sum"):
        assert verifier.score(f" {entry['answer']} \n", entry) == 1.0
        assert verifier.score(f" {entry['answer']}0", entry) == 0.0
    assert verifier.score(" Paris", {"answer": "paris"}) == 0.0
    assert (
        setup_verifier("exact", {"ignore_case": True}).score(" Paris", {"answer": "paris"}) == 1.0
    )
    with pytest.raises(ValueError, match="answer"):
        verifier.check_entry({"question": "no gold"})


def test_regex_fullmatches_the_stripped_answer():
    verifier = setup_verifier("regex", {"pattern": r"-?\d+"})
    assert verifier.score(" -12 \nand more", {}) == 1.0
    assert verifier.score(" -12 apples", {}) == 0.0  # fullmatch, not search
    assert verifier.score("", {}) == 0.0


def test_setup_refuses_unknown_kind_and_bad_settings():
    with pytest.raises(ValueError, match="unknown verifier"):
        setup_verifier("llm_judge", {})
    with pytest.raises(ValueError, match="regular expression"):
        setup_verifier("regex", {"pattern": "(unclosed"})
    with pytest.raises(ValueError, match="pattern"):
        setup_verifier("regex", {})
    with pytest.raises(ValueError, match="extra"):
        setup_verifier("exact", {"no_such_setting": 1})
