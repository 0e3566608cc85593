"""filter.py: the random forest (separable and noisy data, variance, limits, out-of-bag,
determinism, its file), the teacher's scores, the AST match rate, and the pipeline end to
end against a local teacher that scores by a rule and a tiny random model: annotate,
embed (resumed after a crash, and under torchrun), train, apply, decontaminate; bad input."""

import ast
import dataclasses
import errno
import io
import itertools
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import config
import filter
from conftest import at_work
from config import UserError
from filter import RandomForest
from llm_server import FakeLLM
from model import GPT, PRESETS

ROOT = Path(__file__).resolve().parent.parent


def noisy(n, d=8, flip=0.2, seed=0):
    """x0 + x1 > 0 decides the class, and a fraction flip of the labels is wrong: X, y, clean y."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    clean = (X[:, 0] + X[:, 1] > 0).astype(int)
    return X, np.where(rng.random(n) < flip, 1 - clean, clean), clean


def depths(forest):
    """The depth of every node of every tree."""
    depth = np.zeros(len(forest.feature_), np.int64)
    for node in range(len(depth)):  # children come after their parent
        if forest.feature_[node] >= 0:
            depth[[forest.left_[node], forest.right_[node]]] = depth[node] + 1
    return depth


def leaves_of(forest, X):
    n, trees = len(X), len(forest.roots_)
    return filter.route(np.asarray(X, np.float32), forest.feature_, forest.threshold_, forest.left_,
                        forest.right_, np.repeat(forest.roots_, n), np.tile(np.arange(n), trees))


def lines(*rows) -> str:
    """JSONL of rows: dicts become JSON, strings stay as they are."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


# ---------------------------------------------------------------- the forest

def test_separable_data_is_learned_exactly_with_any_labels():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((600, 6)).astype(np.float32)
    y = np.where(rng.random(600) < 0.5, "spam", "ham")
    X[y == "spam", 2] += 8
    forest = RandomForest(n_trees=20, seed=0).fit(X[:400], y[:400])
    assert list(forest.classes_) == ["ham", "spam"]
    assert (forest.predict(X[400:]) == y[400:]).all()
    proba = forest.predict_proba(X[400:])
    assert proba.shape == (200, 2) and np.allclose(proba.sum(1), 1)
    assert forest.oob_score_ > 0.99  # each row judged by the few trees that did not see it
    assert forest.feature_importances_.argmax() == 2 and np.isclose(forest.feature_importances_.sum(), 1)


def test_noisy_data_out_of_bag_agrees_with_held_out():
    X, y, clean = noisy(7000, flip=0.2)
    forest = RandomForest(n_trees=100, seed=0).fit(X[:3000], y[:3000])
    proba = forest.predict_proba(X[3000:])[:, 1]
    held_out = ((proba >= 0.5) == y[3000:]).mean()
    assert ((proba >= 0.5) == clean[3000:]).mean() > 0.9  # it learns the rule, not the noise
    assert 0.72 < held_out < 0.82  # 20% of the held-out labels are wrong
    assert abs(forest.oob_score_ - held_out) < 0.025  # 4000 held out: a standard error of 0.7 points
    assert filter.auc(clean[3000:], proba) > 0.95
    assert set(np.argsort(forest.feature_importances_)[-2:]) == {0, 1}


def test_more_trees_lower_the_variance():
    X, y, _ = noisy(700, flip=0.25, seed=2)
    spread = {}
    for trees in (4, 32):
        runs = [RandomForest(n_trees=trees, seed=s, n_jobs=1).fit(X[:500], y[:500]).predict_proba(X[500:])[:, 1]
                for s in range(6)]
        spread[trees] = np.var(runs, axis=0).mean()
    assert spread[32] < spread[4] / 4  # the variance of a mean of k trees falls as 1/k


def test_depth_and_leaf_limits_are_respected():
    X, y, _ = noisy(2000, flip=0.2, seed=3)
    free = RandomForest(n_trees=10, seed=0).fit(X, y)
    assert depths(free).max() > 8
    shallow = RandomForest(n_trees=10, max_depth=4, seed=0).fit(X, y)
    assert depths(shallow).max() == 4 and depths(shallow)[shallow.feature_ >= 0].max() == 3
    stump = RandomForest(n_trees=3, max_depth=0, seed=0).fit(X, y)
    assert (stump.feature_ == -1).all()
    for min_leaf in (7, 40):
        forest = RandomForest(n_trees=10, min_samples_leaf=min_leaf, seed=0).fit(X, y)
        per_leaf = np.bincount(leaves_of(forest, X), minlength=len(forest.feature_))
        assert per_leaf[forest.feature_ < 0].min() >= min_leaf  # each leaf's bootstrap rows are among these


def test_histograms_and_sorting_find_the_same_splits():
    rng = np.random.default_rng(7)
    bins = rng.integers(0, 40, (3000, 12), dtype=np.uint8)  # few distinct bins: many ties to break alike
    sizes = np.array([900, 40, 1200, 7, 600])
    rows = rng.choice(3000, sizes.sum(), replace=False)
    w = rng.integers(1, 4, len(rows)) * rng.choice([0.5, 1.25], len(rows))  # sums exact in any order: ties stay ties
    y = rng.integers(0, 3, len(rows))
    node = np.repeat(np.arange(len(sizes)), sizes)
    totals = np.stack([np.bincount(node, weights=w * (y == c), minlength=len(sizes)) for c in range(3)], 1)
    tried = np.stack([rng.permutation(12)[:4] for _ in sizes])
    values = bins[rows[:, None], tried[node]]
    for min_leaf in (1, 5):
        found = [split(values, node, sizes, w, y, totals, tried, min_leaf)
                 for split in (filter.best_splits_sorted, filter.best_splits_dense)]
        assert list(found[0][0]) == ([0, 1, 2, 4] if min_leaf == 5 else [0, 1, 2, 3, 4])  # 7 rows: two leaves of 5?
        for a, b in zip(*found):
            assert np.allclose(a, b)


def test_class_weights_favour_the_rare_class():
    X, _, _ = noisy(3000, seed=4)
    y = (X[:, 0] + 0.8 * np.random.default_rng(4).standard_normal(3000) > 1.3).astype(int)  # ~12% positive
    recall = {}
    for weight in (None, "balanced"):
        forest = RandomForest(n_trees=30, min_samples_leaf=20, class_weight=weight, seed=0).fit(X[:2000], y[:2000])
        recall[weight] = filter.metrics(y[2000:], forest.predict_proba(X[2000:])[:, 1])["recall"]
    assert recall["balanced"] > recall[None] + 0.1


def test_the_same_seed_gives_the_same_forest_on_any_number_of_processes():
    X, y, _ = noisy(1500, seed=5)
    one, two, other = (RandomForest(n_trees=12, seed=s, n_jobs=j).fit(X, y) for s, j in ((7, 1), (7, 2), (8, 2)))
    for name in ("feature_", "threshold_", "left_", "right_", "value_", "roots_", "oob_proba_"):
        assert np.array_equal(getattr(one, name), getattr(two, name), equal_nan=True), name
    assert not np.array_equal(one.predict_proba(X), other.predict_proba(X))


def test_forest_files_round_trip_and_other_files_are_refused(tmp_path):
    X, y, _ = noisy(500, seed=6)
    forest = RandomForest(n_trees=8, seed=0).fit(X, y > 0)
    forest.info = {"embedding": {"ckpt": "x.pt"}}
    forest.save(tmp_path / "f.npz")
    loaded = RandomForest.load(tmp_path / "f.npz")
    assert np.array_equal(loaded.predict_proba(X), forest.predict_proba(X))
    assert loaded.info == forest.info and list(loaded.classes_) == [False, True]
    assert loaded.oob_score_ == forest.oob_score_ and not list(tmp_path.glob("*.tmp"))

    def bad(name, writer, message):
        path = tmp_path / name
        writer(path)
        with pytest.raises(ValueError, match=message):
            RandomForest.load(path)

    header = lambda **h: np.frombuffer(json.dumps(h).encode(), np.uint8)  # noqa: E731
    bad("other.npz", lambda p: np.savez(p, weights=np.zeros(3)), "not a random forest .no header")
    bad("tag.npz", lambda p: np.savez(p, header=header(format="sklearn-pickle", version=1)), "'sklearn-pickle' file")
    bad("new.npz", lambda p: np.savez(p, header=header(format=filter.FOREST_FORMAT, version=99)), "version 99")
    bad("array.npy", lambda p: np.save(p, np.zeros(3)), "not a random forest file")
    bad("text.npz", lambda p: p.write_text("hello"), "not a random forest file")
    bad("cut.npz", lambda p: p.write_bytes((tmp_path / "f.npz").read_bytes()[:300]), "not a random forest file")
    with np.load(tmp_path / "f.npz") as data:
        arrays = dict(data)
    arrays["left"] = arrays["left"][:5]
    bad("damaged.npz", lambda p: np.savez(p, **arrays), "damaged")
    with pytest.raises(FileNotFoundError):
        RandomForest.load(tmp_path / "missing.npz")


def test_two_runs_saving_one_forest_at_once_each_write_a_file_of_their_own(tmp_path, monkeypatch):
    """Both wrote forest.npz.tmp: the second truncated the first's, and the first, renaming a
    file no longer there, failed after its fit."""
    X, y, _ = noisy(100, seed=6)
    first, second = (RandomForest(n_trees=n, seed=0).fit(X, y > 0) for n in (3, 4))
    real = np.savez

    def savez(f, **arrays):  # the second saves while the first is written
        real(f, **arrays)
        if len(arrays["roots"]) == 3:
            second.save(tmp_path / "f.npz")

    monkeypatch.setattr(np, "savez", savez)
    first.save(tmp_path / "f.npz")
    assert len(RandomForest.load(tmp_path / "f.npz").roots_) == 3 and not list(tmp_path.glob("*.tmp"))


def test_splits_cut_halfway_between_values_and_ties_go_left():
    X = np.repeat([[0.0], [1.0]], 50, axis=0)
    y = np.repeat([0, 1], 50)
    forest = RandomForest(n_trees=5, seed=0).fit(X, y)
    assert np.allclose(forest.threshold_[forest.feature_ >= 0], 0.5)
    # "x <= threshold" goes left, as in scikit-learn
    assert list(forest.predict([[0.4], [0.5], [0.6]])) == [0, 0, 1]


def test_a_stump_predicts_its_bootstrap_class_shares_counting_repeats():
    X, y, _ = noisy(300, seed=9)
    forest = RandomForest(n_trees=1, max_depth=0, seed=3).fit(X, y)
    drawn = np.bincount(np.random.default_rng([3, 0]).integers(0, 300, 300), minlength=300)  # tree 0's sample
    share = np.bincount(y, weights=drawn, minlength=2) / 300
    assert np.allclose(forest.predict_proba(X[:5]), share)  # a mean of leaf shares, not of votes


def test_out_of_bag_uses_only_the_trees_that_did_not_draw_a_row():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((500, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    X[:, 0] += np.where(y == 1, 3, -3)
    forest = RandomForest(n_trees=1, seed=0).fit(X, y)
    unseen = np.isnan(forest.oob_proba_).all(1)
    assert 0.25 < (~unseen).mean() < 0.5  # about 1/e of the rows are out of the single bag
    assert np.allclose(forest.oob_proba_[~unseen].sum(1), 1)
    assert forest.oob_score_ == 1.0  # rows no tree judged do not count


def test_a_dict_of_class_weights_acts_like_balanced_when_it_holds_the_same_weights():
    X, y, _ = noisy(600, seed=4)
    y = (X[:, 0] > 1).astype(int)
    n, counts = len(y), np.bincount(y)
    weights = {c: n / (2 * counts[c]) for c in (0, 1)}
    balanced = RandomForest(n_trees=5, seed=0, class_weight="balanced").fit(X, y)
    as_dict = RandomForest(n_trees=5, seed=0, class_weight=weights).fit(X, y)
    unweighted = RandomForest(n_trees=5, seed=0).fit(X, y)
    assert np.allclose(as_dict.predict_proba(X), balanced.predict_proba(X))
    assert not np.allclose(as_dict.predict_proba(X), unweighted.predict_proba(X))


def test_feature_importances_agree_with_scikit_learns_impurity_decrease():
    from sklearn.ensemble import RandomForestClassifier
    X, y, _ = noisy(2000, d=6, flip=0.2, seed=8)
    ours = RandomForest(n_trees=60, seed=0, n_jobs=1).fit(X, y).feature_importances_
    theirs = RandomForestClassifier(n_estimators=60, random_state=0, n_jobs=1).fit(X, y).feature_importances_
    assert np.abs(ours - theirs).max() < 0.03


def test_max_features_limits_the_features_a_tree_tries():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((200, 256)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    share = {}
    for features in ("sqrt", "log2", 1, "all"):
        stumps = RandomForest(n_trees=1500, max_depth=1, max_features=features, seed=0).fit(X, y)
        share[features] = (stumps.feature_[stumps.roots_] == 0).mean()  # roots that could try x0 take it
    assert abs(share["sqrt"] - 16 / 256) < 0.012 and abs(share["log2"] - 8 / 256) < 0.012
    assert share[1] < 0.015 and share["all"] == 1
    deep = RandomForest(n_trees=4, max_features=1, seed=0).fit(*noisy(500, seed=1)[:2])
    for root, end in zip(deep.roots_, list(deep.roots_[1:]) + [len(deep.feature_)]):
        assert len(set(deep.feature_[root:end]) - {-1}) > 1  # not one feature drawn for a whole tree


def test_a_loaded_forest_keeps_its_importances_and_parameters(tmp_path):
    X, y, _ = noisy(300, seed=6)
    forest = RandomForest(n_trees=4, max_depth=5, min_samples_leaf=3, class_weight="balanced", seed=2).fit(X, y)
    forest.save(tmp_path / "f.npz")
    loaded = RandomForest.load(tmp_path / "f.npz")
    assert np.array_equal(loaded.feature_importances_, forest.feature_importances_)
    assert loaded._params() == forest._params() and loaded.class_weight == "balanced" and loaded.min_samples_leaf == 3


def test_teacher_scores_are_read_robustly():
    cases = {"Clear and short.\nEducational value: 7": 7, "Educational value (0-10): 4": 4,
             "**Educational value:** 8/10": 8, "Educational value:\n9": 9, "I would give it 6/10.": 6,
             "It has some educational value.\nScore: 3 out of 10": 3, "5": 5, "Educational value: 7.5": 8,
             "Educational value: 11": None, "It has educational value, I think.": None, "": None,
             "Educational value (out of 10): 7": 7, "Educational value (on a scale of 0 to 10): 6": 6,
             "Educational value on a scale from 1 to 10: 8": 8, "Educational value [0–10]: 5": 5,
             "Educational value (0 to 10, where 10 is excellent): 3": 3, "Educational value: 2 out of 10": 2,
             "Educational value: 10/10": 10, "Educational value on a scale of 10: 4": 4,
             "Educational value: -3": None, "Educational value: 6-7": 6}
    for answer, score in cases.items():
        assert filter.parse_score(answer) == score, answer


def test_the_score_is_the_last_labelled_one_not_a_number_after_or_before_it():
    """The last "educational value" anywhere was taken, with the first number on the rest of
    its line: a number in the explanation or a note after the score was read instead. A
    score on another scale is none (the reminder asks for a 0-10 one), not rescaled."""
    cases = {"The file has high educational value for beginners learning Python 3.\nScore: 8/10": 8,
             "Educational value: 7\n\n(Note: educational value judged for Python 2 users.)": 7,
             "Educational value: 7\nOverall its educational value is decent.": 7,
             "I would say 6/10 overall.\nIt targets Python 3.": 6, "Educational value: 4/5": None,
             "Score: 3 out of 5": None, "It uses Python 3 and 2 loops.": None,
             # a lone number in prose is no score (asked again), and "educational value" outranks "score"
             "Mostly boilerplate; see PEP 8.": None, "The code has 2 functions.": None,
             "Educational value: 7\nConfidence score: 9": 7, "Educational value = 7\nHope this helps!": 7,
             "Educational value is 7.\nLet me know if you need more.": 7}
    for answer, score in cases.items():
        assert filter.parse_score(answer) == score, answer


def test_an_is_later_in_the_prose_is_no_label():
    """The label ran over words to any later "is": "value is low, since the file is 5 lines" scored 5."""
    cases = {"The educational value is low, since the file is 5 lines of configuration.": None,
             "The educational value is limited. Note: 3 of its functions are empty.": None,
             "Educational value is: 7": 7,
             "The educational value of this code is 7.": 7, "My score for this is 6": 6}  # is, after words
    for answer, score in cases.items():
        assert filter.parse_score(answer) == score, answer


def test_words_after_an_is_in_the_prose_make_no_label():
    """The label's words ran past an "is" to a later colon: a sentence after the score,
    "the educational value is good: 2 small functions", scored 2 instead of 7."""
    cases = {"Educational value: 7\n\nIn short, the educational value is good: 2 small functions show loops.": 7,
             "The educational value is moderate: 3 functions are trivial.\nEducational value: 6": 6,
             "Score: 6\nThe score is fair: 2 loops are clear.": 6,
             "Educational value is: 7": 7, "The educational value is = 5": 5}  # "is" right before ":" or "="
    for answer, score in cases.items():
        assert filter.parse_score(answer) == score, answer


def test_a_label_that_starts_its_line_outranks_one_in_a_sentence_after_it():
    """The last label won wherever it stood: a suggestion after the score, "to raise the
    educational value: 1. add docstrings", scored 1 instead of the 7 on the score's line."""
    cases = {"Educational value: 7\n\nSuggestions to raise the educational value: 1. Add docstrings.": 7,
             "Educational value: 6\n**Why this educational value:** 3 loops are shown.": 6,
             "Score: 7\nSuggestions to raise the educational value: 1. Add docstrings.": 7,
             "### Educational value: 4\nA higher score: 9 would need tests.": 4, "Score: 7\nConfidence score: 9": 7,
             "Educational value: 5\nOn reflection:\n- **Educational value:** 6": 6,  # corrected: the last
             "It is clear.\nThe educational value of this code is 7.": 7}  # none starts a line: as before
    for answer, score in cases.items():
        assert filter.parse_score(answer) == score, answer


def test_a_label_on_a_numbered_list_item_starts_its_line():
    """A "- " bullet let a label start its line, a numbered item's "2. " did not: a teacher's
    list "2. Educational value: 6" lost to a later "Score: 3" on a line of its own (scored 3,
    or, "3 out of 5" being on another scale, no score), where the last label had given 6."""
    cases = {"1. Readability: good\n2. Educational value: 6\n\nScore: 3 out of 5 for style": 6,
             "1. Correct: yes\n2) **Educational value:** 6\nScore: 3": 6,
             "Score: 7\nIn a sentence, 2. educational value: 3 is low": 7}  # "2." inside a sentence: no label line
    for answer, score in cases.items():
        assert filter.parse_score(answer) == score, answer


# ---------------------------------------------------------------- the AST match rate

class Rename(ast.NodeTransformer):
    """Every name, argument, function and attribute renamed; docstrings replaced."""

    def visit_Name(self, node):
        node.id = "renamed_" + node.id
        return node

    def visit_arg(self, node):
        node.arg = "arg_" + node.arg
        return node

    def visit_Attribute(self, node):
        self.generic_visit(node)
        node.attr = "attr_" + node.attr
        return node

    def visit_FunctionDef(self, node):
        node.name = "fn_" + node.name
        if ast.get_docstring(node) is not None:
            node.body[0].value.value = "Something else entirely."
        self.generic_visit(node)
        return node


def tree(spec):
    """A code_tree from nested (label, children...) tuples, for the textbook example."""
    labels, leftmost = [], []

    def visit(node):
        first = None
        for child in node[1:]:
            leaf = visit(child)
            first = leaf if first is None else first
        labels.append(node[0])
        leftmost.append(len(labels) - 1 if first is None else first)
        return leftmost[-1]

    visit(spec)
    return labels, leftmost, sorted({l: i for i, l in enumerate(leftmost)}.values())


def test_tree_edit_distance_of_zhang_and_shashas_example():
    a = tree(("f", ("d", ("a",), ("c", ("b",))), ("e",)))
    b = tree(("f", ("c", ("d", ("a",), ("b",))), ("e",)))
    assert filter.tree_distance(a, b) == 2 and filter.tree_distance(b, a) == 2
    assert filter.tree_distance(a, tree(("x",))) == 6  # relabel one node, delete five


def test_ast_match_rate_ignores_names_comments_and_docstrings():
    code = '''
def average(values):
    """The mean of values."""
    total = 0  # running sum
    for v in values:
        total += v
    return total / len(values) if values else 0.0
'''
    renamed = '''
def mean_of(xs):
    # no docstring here, other comments
    acc = 0
    for item in xs:   # each item
        acc += item
    return acc / len(xs) if xs else 1.5
'''
    unrelated = '''
class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

with open("data.txt") as f:
    print([line.split(",") for line in f if line.strip()])
'''
    a, b, c = (filter.code_tree(s) for s in (code, renamed, unrelated))
    assert filter.ast_match_rate(a, b) == 1.0
    assert filter.ast_match_rate(a, c) < 0.3
    assert filter.ast_match_rate(a, filter.code_tree(code.replace("total = 0", "total = '0'"))) < 1.0
    assert filter.ast_match_rate_bound(a, c) >= filter.ast_match_rate(a, c)
    assert filter.code_tree("def broken(:\n") is None


def test_humaneval_solutions_match_renamed_copies_of_themselves():
    problems, _ = evaluate.load_problems("humaneval")
    taus = []
    for p in problems.values():
        original = p["prompt"] + p["reference"]
        copy = "# copied\n" + ast.unparse(Rename().visit(ast.parse(original)))
        assert copy != original
        taus.append(filter.ast_match_rate(filter.code_tree(original), filter.code_tree(copy)))
    assert taus == [1.0] * len(problems)
    first, second = (problems[f"HumanEval/{i}"] for i in (0, 1))
    other = filter.ast_match_rate(filter.code_tree(first["prompt"] + first["reference"]),
                                  filter.code_tree(second["prompt"] + second["reference"]))
    assert other < 0.5


def test_code_units_walk_each_statement_of_a_document_once(monkeypatch):
    """A definition is in several units (the file, alone, with its helpers, as the helper of
    others): its labels are found once and taken into each, as walking it again finds them.
    A chain of calls walked again in each unit made the work quadratic in the chain's length."""
    chain = "".join(f'def f{i}(x):\n    """Step {i}."""\n    return f{i - 1}(x) + {i}\n\n' for i in range(1, 30))
    text = f'"""A chain."""\nimport os\n\ndef f0(x):\n    return os.sep * x\n\n{chain}'
    module = ast.parse(text)
    nodes, definitions = len(filter.tree_of(module)[0]), len(module.body) - 2
    labelled, label = [], filter._label
    monkeypatch.setattr(filter, "_label", lambda node: labelled.append(node) or label(node))
    units = filter.code_units(text)
    # each node once; the module of each unit (the file, each definition alone and with its
    # helpers), and the file's docstring (an Expr and a Constant) besides
    assert len(labelled) <= nodes + 2 * definitions + 2
    monkeypatch.setattr(filter, "_label", label)
    walked = {id(s): filter.postorder(s, {}) for s in module.body}
    assert filter.tree_of(module, walked) == filter.tree_of(module)  # (the module's docstring left out alike)
    last = ast.Module(body=[module.body[1], *module.body[2:]], type_ignores=[])  # f29 with its helpers: all
    assert filter.tree_of(last) in units


# ---------------------------------------------------------------- the pipeline

def test_the_draw_is_spread_over_length_quantiles_and_grows_by_extension(tmp_path):
    lengths = list(range(1, 1001))
    random.Random(0).shuffle(lengths)
    path = tmp_path / "docs.jsonl"
    path.write_text(lines(*(dict(text="x" * n) for n in lengths)))  # line i has length lengths[i] + 12
    picked = filter.draw([path], 100, 10, 0, Counter())
    deciles = np.bincount([(lengths[i] - 1) // 100 for i in picked], minlength=10)
    assert list(deciles) == [10] * 10 and all((lengths[i] - 1) // 100 == s for i, s in picked.items())
    assert set(filter.draw([path], 50, 10, 0, Counter())) < set(picked)
    assert set(filter.draw([path], 100, 10, 1, Counter())) != set(picked)


def test_a_larger_n_extends_the_draw_whatever_the_strata_sizes(tmp_path):
    """Quotas by largest remainders could shrink as n grew (the Alabama paradox), and uneven
    strata (lengths tied at the quantiles) dropped documents drawn for a smaller n."""
    rng = random.Random(3)
    path = tmp_path / "docs.jsonl"
    path.write_text(lines(*(dict(text="x" * rng.choice([1, 2, 3, 5, 8, 13, 40])) for _ in range(103))))
    draws = [set(filter.draw([path], n, 10, 0, Counter())) for n in range(1, 105)]
    assert [len(d) for d in draws] == list(range(1, 104)) + [103]
    assert all(smaller <= larger for smaller, larger in zip(draws, draws[1:]))


LESSON = '''def {name}(items, factor):
    """Return every item of items multiplied by factor: a lesson in loops."""
    result = []  # the answer, built one item at a time
    for item in items:
        result.append(item * factor)
    return result
'''


def corpus(path: Path, n: int, seed: int, extra=()) -> Path:
    """Lessons (40%) and dumps of constants, each with its kind."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if rng.random() < 0.4:
            name = "_".join(rng.sample(["scale", "items", "by", "factor", "each", "list", "values"], 3))
            rows.append(dict(id=f"{path.stem}-{i}", kind="lesson", text=LESSON.format(name=name)))
        else:
            text = "\n".join(f"LIMIT_{rng.randrange(999)} = 0x{rng.randrange(1 << 16):04x}"
                             for _ in range(rng.randrange(3, 12)))
            rows.append(dict(id=f"{path.stem}-{i}", kind="dump", text=text))
    rows += extra
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def teacher(body) -> str:
    """Lessons score 9, dumps 1; "shy" documents need the reminder, "mute" ones never answer."""
    last = body["messages"][-1]["content"]
    text = re.search(r"<file>\n(.*)\n</file>", body["messages"][1]["content"], re.S).group(1)
    if "mute" in text:
        return "I would rather not say."
    if "shy" in text and "could not find the score" not in last:
        return "A fine file."
    return "Loops, named well.\nEducational value: 9" if "lesson" in text else "Constants.\nEducational value: 1"


@pytest.fixture(scope="module")
def nano(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = GPT(PRESETS["nano"])
    path = tmp_path_factory.mktemp("model") / "nano.pt"
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.config)}, path)
    return path


def run_filter(*args):
    filter.main([str(a) for a in args])


def patched(tmp_path: Path, setup: str) -> Path:
    """filter.py, running setup (Python) first."""
    script = tmp_path / "patched_filter.py"
    script.write_text(f"import signal, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport config, filter\n{setup}\n"
                      f"signal.signal(signal.SIGTERM, signal.default_int_handler)\nconfig.run(filter.main)\n")
    return script


def torchrun(tmp_path: Path, *args, setup: str = "") -> subprocess.CompletedProcess:
    """filter.py on 2 processes (torchrun, gloo on CPUs); setup: Python that each runs first (a patch)."""
    script = patched(tmp_path, setup) if setup else ROOT / "filter.py"
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120)


def said(stderr: str) -> list[str]:
    """The lines filter.py's processes wrote to stderr among torchrun's; a traceback of theirs fails."""
    assert f'File "{ROOT}' not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines()
            if line.startswith(("error:", "warning:", "note:", "interrupted", "KeyboardInterrupt", "Exception"))]


def test_annotate_embed_train_apply_keep_what_the_teacher_favours(tmp_path, nano, capsys):
    extra = [dict(id="shy", kind="dump", text="shy = 1"), dict(id="mute", kind="dump", text="mute = 1")]
    train_corpus = corpus(tmp_path / "annotate.jsonl", 90, seed=1, extra=extra)
    labels, emb, forest = tmp_path / "labels.jsonl", tmp_path / "emb.npy", tmp_path / "forest.npz"
    with FakeLLM(answer=teacher) as server:
        teach = [f"--api_base={server.url}", "--model=fake", "--attempts=2", "--concurrency=4"]
        run_filter("annotate", f"--corpus={train_corpus}", "--n=92", f"--labels={labels}", *teach)
        records = {r["id"]: r for r in map(json.loads, labels.read_text().splitlines())}
        assert len(records) == 92 and records["shy"]["score"] == 1
        assert records["mute"]["score"] is None and "no score in 2 answers" in records["mute"]["error"]
        asked = len(server.served)
        assert asked == 92 + 2  # shy and mute were asked twice
        run_filter("annotate", f"--corpus={train_corpus}", "--n=92", f"--labels={labels}", *teach)
        assert len(server.served) == asked + 2  # only mute, the one without a score, is asked again
    kinds = {r["id"]: r["kind"] for r in map(json.loads, train_corpus.read_text().splitlines())}
    scored = [r for r in records.values() if r["score"] is not None]
    assert all((r["score"] == 9) == (kinds[r["id"]] == "lesson") for r in scored)
    assert {r["stratum"] for r in records.values()} == set(range(10))

    run_filter("embed", f"--ckpt={nano}", f"--labels={labels}", f"--embeddings={emb}", "--batch_size=4")
    ids, array, meta = filter.load_embeddings(emb)
    assert array.shape == (92, 64) and array.dtype == np.float16 and len(set(ids)) == 92
    assert meta["source"]["doc_tokens"] == 64  # capped at the model's context

    run_filter("train", f"--labels={labels}", f"--embeddings={emb}", f"--forest={forest}", "--n_trees=30")
    report = RandomForest.load(forest).info["report"]
    assert report["documents"] == 91 and report["held_out"]["auc"] > 0.9

    web = corpus(tmp_path / "web.jsonl", 150, seed=2)
    out = tmp_path / "filtered"
    run_filter("apply", f"--corpus={web}", f"--forest={forest}", f"--out={out}", "--batch_size=4")
    kept = [json.loads(line) for line in (out / "kept-00000-of-00001.jsonl").read_text().splitlines()]
    share = lambda rows: np.mean([r["kind"] == "lesson" for r in rows])  # noqa: E731
    everything = [json.loads(line) for line in web.read_text().splitlines()]
    assert share(everything) < 0.5 and share(kept) > 0.9 and len(kept) > 0.8 * share(everything) * 150
    summary = json.loads((out / "summary-00000-of-00001.json").read_text())
    assert summary["documents"] == 150 and summary["kept_documents"] == len(kept)
    assert sum(b["documents"] for b in summary["histogram"].values()) == 150

    # a fraction of the tokens instead, from the scores already there (embedded as the forest's were,
    # whatever --doc_tokens says); then two shards
    capsys.readouterr()
    run_filter("apply", f"--corpus={web}", f"--forest={forest}", f"--out={out}", "--top_fraction=0.2",
               "--doc_tokens=16")
    assert "--doc_tokens=16 is not used: the forest learned from embeddings of the first 64" in capsys.readouterr().err
    summary = json.loads((out / "summary-00000-of-00001.json").read_text())
    scores = np.fromfile(out / "scores-00000-of-00001.bin", dtype=filter.SCORES)["score"]
    assert summary["kept_tokens"] >= 0.2 * summary["tokens"] and summary["kept_documents"] < len(kept)
    assert scores[scores >= summary["threshold"]].min() > scores[scores < summary["threshold"]].max()
    for shard in (0, 1):
        run_filter("apply", f"--corpus={web}", f"--forest={forest}", f"--out={out}", f"--shard={shard}",
                   "--num_shards=2")
    halves = [json.loads((out / f"summary-0000{s}-of-00002.json").read_text()) for s in (0, 1)]
    assert [h["documents"] for h in halves] == [75, 75]
    split = {json.loads(line)["id"] for s in (0, 1) for line in (out / f"kept-0000{s}-of-00002.jsonl").open()}
    assert len(split ^ {r["id"] for r in kept}) <= 2  # batched differently: a borderline score may move


def test_embed_resumes_after_a_crash_and_leaves_nothing_that_looks_complete(tmp_path, nano, monkeypatch):
    docs = corpus(tmp_path / "docs.jsonl", 40, seed=3)
    emb = tmp_path / "emb.npy"
    monkeypatch.setattr(filter, "CHUNK", 16)
    args = ["embed", f"--corpus={docs}", f"--ckpt={nano}"]
    run_filter(*args, f"--embeddings={tmp_path / 'whole.npy'}")
    args.append(f"--embeddings={emb}")
    real, calls = filter.embed_texts, []

    def crash_on_the_second_chunk(*a, **k):
        calls.append(len(a[1]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(filter, "embed_texts", crash_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        run_filter(*args)
    assert not emb.exists() and not emb.with_suffix(".json").exists()
    with pytest.raises(UserError, match="unfinished run"):
        filter.load_embeddings(emb)
    calls.clear()
    monkeypatch.setattr(filter, "embed_texts", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    run_filter(*args)
    assert calls == [16, 8]  # the two chunks left
    assert np.array_equal(filter.load_embeddings(emb)[1], filter.load_embeddings(tmp_path / "whole.npy")[1])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("emb")) == ["emb.json", "emb.npy"]


@pytest.mark.parametrize("written", [False, True])
def test_a_kill_as_the_whole_work_is_renamed_and_described_loses_none_of_it(tmp_path, nano, monkeypatch, written):
    """embed and apply renamed the finished .partial, then wrote what it holds: a kill between
    the two left a whole array or scores without a description, which a rerun removed and
    made anew (hours of GPUs at scale). A kill as the description is written (before it,
    or after it) now leaves a rerun only the rename."""
    docs, emb, out = corpus(tmp_path / "docs.jsonl", 20, seed=6), tmp_path / "emb.npy", tmp_path / "out"
    embed = ["embed", f"--corpus={docs}", f"--ckpt={nano}", f"--embeddings={emb}"]
    apply = ["apply", f"--corpus={docs}", f"--forest={nano_forest(tmp_path, nano)}", f"--out={out}"]
    real = filter.write_atomic

    def killed(path, data):
        if path.name in ("emb.json", "scores-00000-of-00001.json"):
            if written:
                real(path, data)
            raise KeyboardInterrupt
        real(path, data)

    for args in (embed, apply):
        with monkeypatch.context() as m:
            m.setattr(filter, "write_atomic", killed)
            with pytest.raises(KeyboardInterrupt):
                run_filter(*args)
        with monkeypatch.context() as m:
            m.setattr(filter, "embed_texts", lambda *a, **k: pytest.fail("embedded the documents again"))
            run_filter(*args)
    assert filter.load_embeddings(emb)[1].shape == (20, 64)
    assert json.loads((out / "summary-00000-of-00001.json").read_text())["documents"] == 20
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("emb")) == ["emb.json", "emb.npy"]
    assert sorted(p.name for p in out.iterdir()) == [f"{kind}-00000-of-00001.{ext}" for kind, ext in
                                                     (("kept", "jsonl"), ("scores", "bin"), ("scores", "json"),
                                                      ("summary", "json"))]


def test_a_corpus_edited_while_it_is_embedded_is_refused(tmp_path, nano, monkeypatch):
    """The texts' digests were taken before embedding, from the first read: a corpus edited
    during the run gave embeddings of the new texts under the old digests, and train then
    paired them with the labels of the old ones."""
    docs, emb = corpus(tmp_path / "docs.jsonl", 4, seed=3), tmp_path / "emb.npy"
    real = filter.embed_texts

    def edited_meanwhile(*a, **k):
        docs.write_text(docs.read_text().replace("def", "class"))
        return real(*a, **k)
    monkeypatch.setattr(filter, "embed_texts", edited_meanwhile)
    with pytest.raises(UserError, match=f"^{re.escape(str(docs))} changed while it was embedded: rerun$"):
        run_filter("embed", f"--corpus={docs}", f"--ckpt={nano}", f"--embeddings={emb}")
    assert not emb.exists()


def test_embed_names_a_local_model_by_its_full_path_for_apply_run_elsewhere(tmp_path, nano, monkeypatch, capsys):
    docs = corpus(tmp_path / "docs.jsonl", 4, seed=3)
    monkeypatch.chdir(nano.parent)
    run_filter("embed", f"--corpus={docs}", f"--ckpt={nano.name}", f"--embeddings={tmp_path / 'emb.npy'}")
    assert filter.load_embeddings(tmp_path / "emb.npy")[2]["source"]["ckpt"] == str(nano.resolve())
    monkeypatch.chdir(tmp_path)  # the same model by another name: the same embeddings
    run_filter("embed", f"--corpus={docs}", f"--ckpt={os.path.relpath(nano)}", f"--embeddings={tmp_path / 'emb.npy'}")
    assert "already holds these embeddings" in capsys.readouterr().out


def test_the_same_files_named_another_way_are_not_worked_on_again(tmp_path, nano, monkeypatch, capsys):
    """The fingerprints held the paths as typed: the same command from another folder, or
    --corpus=./docs.jsonl for docs.jsonl, embedded or scored everything again."""
    (tmp_path / "data").mkdir()
    corpus(tmp_path / "data" / "docs.jsonl", 4, seed=3)
    nano_forest(tmp_path / "data", nano)
    monkeypatch.chdir(tmp_path / "data")
    run_filter("embed", "--corpus=docs.jsonl", f"--ckpt={nano}", "--embeddings=emb.npy")
    run_filter("apply", "--corpus=docs.jsonl", "--forest=f.npz", "--out=out")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(filter, "embed_texts", lambda *a, **k: pytest.fail("worked on again"))
    capsys.readouterr()
    run_filter("embed", "--corpus=./data/docs.jsonl", f"--ckpt={os.path.relpath(nano)}", "--embeddings=data/emb.npy")
    run_filter("apply", "--corpus=./data/docs.jsonl", "--forest=data/f.npz", f"--ckpt={os.path.relpath(nano)}",
               "--out=data/out")
    out = capsys.readouterr().out
    assert "already holds these embeddings" in out and "shard 00000-of-00001 is done" in out


def test_embed_under_torchrun_matches_one_process(tmp_path, nano):
    docs = corpus(tmp_path / "docs.jsonl", 30, seed=4)
    common = ["embed", f"--corpus={docs}", f"--ckpt={nano}", "--batch_size=2"]
    run_filter(*common, f"--embeddings={tmp_path / 'one.npy'}")
    result = torchrun(tmp_path, *common, f"--embeddings={tmp_path / 'two.npy'}", setup="filter.CHUNK = 8")  # 4 chunks
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = (filter.load_embeddings(tmp_path / f"{n}.npy") for n in ("one", "two"))
    assert one[0] == two[0] and np.allclose(one[1], two[1], atol=1e-3)  # other thread counts: other roundings


def test_embed_under_torchrun_says_a_held_lock_once(tmp_path, nano):
    """Process 0 takes the lock while process 1 waits: it printed a traceback as process 0 exited."""
    import fcntl
    docs, emb = corpus(tmp_path / "docs.jsonl", 4, seed=4), tmp_path / "emb.npy"
    with open(f"{emb}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another run's lock
        result = torchrun(tmp_path, "embed", f"--corpus={docs}", f"--ckpt={nano}", f"--embeddings={emb}")
    assert result.returncode != 0
    assert said(result.stderr) == [f"error: another run is embedding into {emb}: wait for it, stop it, or use "
                                   f"another --embeddings"], result.stderr[-3000:]


def test_a_rerun_with_another_batch_size_goes_on_from_the_chunks_done(tmp_path, nano, monkeypatch):
    """A chunk was --batch_size x 16 documents, and part of the state a rerun resumes: a rerun with
    a lower --batch_size (the answer to running out of memory) threw the chunks done away."""
    monkeypatch.setattr(filter, "CHUNK", 16, raising=False)  # (--batch_size=1's chunk before)
    docs, emb = corpus(tmp_path / "docs.jsonl", 40, seed=3), tmp_path / "emb.npy"
    args = ["embed", f"--corpus={docs}", f"--ckpt={nano}", f"--embeddings={emb}"]
    real, calls = filter.embed_texts, []

    def out_of_memory_on_the_second_chunk(*a, **k):
        calls.append(len(a[1]))
        if len(calls) == 2:
            raise UserError("out of memory")
        return real(*a, **k)

    monkeypatch.setattr(filter, "embed_texts", out_of_memory_on_the_second_chunk)
    with pytest.raises(UserError):
        run_filter(*args, "--batch_size=1")
    calls.clear()
    monkeypatch.setattr(filter, "embed_texts", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    run_filter(*args, "--batch_size=2")
    assert calls == [16, 8]  # the two chunks left, not all three again
    assert filter.load_embeddings(emb)[1].shape == (40, 64)


OUT_OF_MEMORY = "CUDA out of memory. Tried to allocate 2.00 GiB"


def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError(OUT_OF_MEMORY)


def test_running_out_of_memory_is_one_line_advising_a_lower_batch_size(tmp_path, nano, monkeypatch):
    """An out-of-memory error of the model was a traceback (from every process under torchrun)."""
    docs = corpus(tmp_path / "docs.jsonl", 4, seed=3)
    monkeypatch.setattr(GPT, "hidden_states", out_of_memory)
    for command in (["embed", f"--ckpt={nano}", f"--embeddings={tmp_path / 'emb.npy'}"],
                    ["apply", f"--forest={nano_forest(tmp_path, nano)}", f"--out={tmp_path / 'out'}"]):
        with pytest.raises(UserError, match=rf"^out of memory: lower --batch_size \(now 3\) "
                                            rf"\({re.escape(OUT_OF_MEMORY)}\)$"):
            run_filter(*command, f"--corpus={docs}", "--batch_size=3")


@pytest.mark.parametrize("case", ["apply, no corpus", "embed, no .npy", "embed, no corpus", "apply, an --out inside a file",
                                  "apply, no model, a note", "embed, out of memory on each process"])
def test_mistakes_under_torchrun_are_said_once(tmp_path, nano, case):
    """Checks before the processes meet, and failures of one after they met (a model not there,
    out of memory), were said by every process, racing torchrun's SIGTERM (and, where it won, an
    "interrupted" or a KeyboardInterrupt traceback came after); a note came twice."""
    docs, forest, missing = corpus(tmp_path / "docs.jsonl", 4, seed=3), nano_forest(tmp_path, nano), tmp_path / "no"
    apply, embed = ["apply", f"--forest={forest}", f"--out={tmp_path / 'out'}"], ["embed", f"--ckpt={nano}"]
    args, setup, expected = {
        "apply, no corpus": (apply + [f"--corpus={missing}.jsonl"], "", [f"error: no such file: {missing}.jsonl"]),
        "embed, no .npy": (embed + [f"--corpus={docs}", "--embeddings=e.txt"], "",
                           ["error: --embeddings must name a .npy file, not e.txt"]),
        "embed, no corpus": (embed + [f"--corpus={missing}.jsonl", f"--embeddings={tmp_path / 'e.npy'}"], "",
                             [f"error: no such file: {missing}.jsonl"]),
        "apply, an --out inside a file": (["apply", f"--forest={forest}", f"--corpus={docs}", f"--out={docs}/out"], "",
                                     [f"error: cannot write {docs}/out/kept-00000-of-00001.jsonl: {docs} is a file, "
                                      f"not a folder"]),
        "apply, no model, a note": (apply + [f"--corpus={docs}", f"--ckpt={missing}.pt", "--doc_tokens=16"], "",
                                    ["note: --doc_tokens=16 is not used: the forest learned from embeddings of the "
                                     "first 64 tokens, so apply embeds those",
                                     f"error: cannot load --ckpt={missing}.pt: no checkpoint at {missing}.pt"]),
        "embed, out of memory on each process": (
            embed + [f"--corpus={docs}", f"--embeddings={tmp_path / 'e.npy'}"],
            f"import model, torch\nfilter.CHUNK = 2  # a chunk for each\ndef out_of_memory(*a):\n"
            f"    raise torch.OutOfMemoryError({OUT_OF_MEMORY!r})\nmodel.GPT.hidden_states = out_of_memory",
            [f"error: out of memory: lower --batch_size (now 8) ({OUT_OF_MEMORY})"]),
    }[case]
    result = torchrun(tmp_path, *args, setup=setup)
    assert result.returncode != 0 and said(result.stderr) == expected, result.stderr[-3000:]


def test_embed_under_torchrun_says_once_that_its_embeddings_are_made(tmp_path, nano):
    docs, emb = corpus(tmp_path / "docs.jsonl", 4, seed=3), tmp_path / "emb.npy"
    args = ["embed", f"--corpus={docs}", f"--ckpt={nano}", f"--embeddings={emb}"]
    run_filter(*args)
    result = torchrun(tmp_path, *args)
    assert result.returncode == 0 and result.stdout.count("already holds these embeddings") == 1, result.stdout


def test_embed_under_torchrun_waits_for_a_process_far_slower_than_the_others(tmp_path, nano):
    """A process done with its chunks waited for the others in a barrier under the process
    group's timeout (train.DDP_TIMEOUT, an hour): one finished an hour before another (its chunks
    done by an interrupted run) ended in a timeout's traceback. Here the timeout is 5 s."""
    docs, emb = corpus(tmp_path / "docs.jsonl", 4, seed=3), tmp_path / "emb.npy"
    slow = ("import datetime, os, time, train\ntrain.DDP_TIMEOUT = datetime.timedelta(seconds=5)\n"
            "if os.environ['RANK'] == '0':  # the one chunk, 8 s\n"
            "    filter.embed_texts = lambda *a, real=filter.embed_texts: time.sleep(8) or real(*a)")
    result = torchrun(tmp_path, "embed", f"--corpus={docs}", f"--ckpt={nano}", f"--embeddings={emb}", setup=slow)
    assert result.returncode == 0 and said(result.stderr) == [], result.stderr[-3000:]
    assert filter.load_embeddings(emb)[1].shape == (4, 64)


def test_a_process_waiting_for_another_that_is_gone_says_so_in_one_line(tmp_path, nano):
    """A process done with its chunks, waiting for the others, whose peer was killed (out of
    memory, say) printed the broken connection's traceback. (Two processes started as
    torchrun starts them, without torchrun, which would stop the other at once.)"""
    import socket
    docs, emb, go = corpus(tmp_path / "docs.jsonl", 4, seed=3), tmp_path / "emb.npy", tmp_path / "go"
    script = patched(tmp_path, f"import os, pathlib, time\nfilter.CHUNK = 2  # a chunk for each\n"
                               f"if os.environ['RANK'] == '0':  # works on until told to go on\n"
                               f"    def slow(*a, real=filter.embed_texts):\n"
                               f"        while not pathlib.Path({str(go)!r}).exists():\n"
                               f"            time.sleep(0.1)\n"
                               f"        return real(*a)\n"
                               f"    filter.embed_texts = slow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [subprocess.Popen([sys.executable, str(script), "embed", f"--corpus={docs}", f"--ckpt={nano}",
                                   f"--embeddings={emb}"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
                 for rank in (0, 1)]
    try:
        flags = Path(f"{emb}.partial.done")
        for _ in range(600):  # process 1 embedded its chunk, and waits for process 0
            if flags.is_file() and flags.read_bytes()[1:] == b"\x01":
                break
            time.sleep(0.1)
        time.sleep(1)
        processes[0].kill()
        assert processes[1].wait(timeout=30) == 2
        said = processes[1].stderr.read()
        assert [line for line in said.splitlines() if line.strip() and not line.startswith(("[W", "embedding"))] == [
            "process 1: stopping, as another process is gone (its message, or torchrun's report if it was killed, "
            "says why)"], said[-3000:]
    finally:
        for process in processes:
            process.kill()
            process.wait()


def test_decontaminate_finds_renamed_benchmark_code_and_prunes_it(tmp_path, nano, capsys):
    problems, _ = evaluate.load_problems("humaneval")
    copies = [dict(id=f"copy-{i}", text=ast.unparse(Rename().visit(ast.parse(problems[f"HumanEval/{i}"]["prompt"] +
                                                                          problems[f"HumanEval/{i}"]["reference"]))))
              for i in (2, 7)]
    verbatim = dict(id="verbatim", text=problems["HumanEval/5"]["prompt"] + problems["HumanEval/5"]["reference"])
    own = [verbatim, dict(id="own", text=LESSON.format(name="scale")), dict(id="prose", text="Loops repeat things.")]
    docs = tmp_path / "exercises.jsonl"
    docs.write_text("".join(json.dumps(r) + "\n" for r in copies + own))
    results = [tmp_path / model / "humaneval" / "results.jsonl" for model in ("a", "b")]  # as evaluate.py writes them
    for path, passing in zip(results, (("HumanEval/2", "HumanEval/5"), ())):
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(dict(task_id=t, completion="", passed=t in passing, result="x")) + "\n"
                                for t in problems))
    report_path, pruned = tmp_path / "report.json", tmp_path / "pruned.jsonl"
    run_filter("decontaminate", f"--corpus={docs}", "--bench=humaneval", f"--ckpt={nano}", "--prune_tau=0.95",
               f"--out={pruned}", f"--report={report_path}", f"--results={results[0]},{results[1]}", "--workers=2")
    report = json.loads(report_path.read_text())
    by_task = {r["task_id"]: r for r in report["by_problem"]}
    assert by_task["HumanEval/2"]["tau"] == 1.0 and by_task["HumanEval/2"]["tau_document"] == "copy-2"
    assert by_task["HumanEval/7"]["ngram_example"] is None  # its docstring was rewritten
    assert by_task["HumanEval/5"]["ngram_example"] == "verbatim" and by_task["HumanEval/5"]["l2"] < 1e-3
    assert report["parsed"] == 4 and report["problems_by_tau"]["0.95"] == 3
    assert [json.loads(line)["id"] for line in pruned.read_text().splitlines()] == ["own", "prose"]
    table = capsys.readouterr().out
    assert re.search(r"count\s+a/humaneval\s+b/humaneval\n0\.95\s+similar\s+3\s+66\.7%\s+0\.0%", table)
    assert re.search(r"non-similar\s+161\s+0\.0%", table)
    assert report["similarity"][0] == dict(tau=0.95, problems="similar", count=3,
                                           pass_rate={"a/humaneval": 2 / 3, "b/humaneval": 0.0})


def annotated(labels: Path) -> list[dict]:
    return [json.loads(line) for line in labels.read_text().splitlines()]


def test_annotate_counts_documents_not_lines(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    lessons = [dict(id=f"l{i}", text=LESSON.format(name=f"scale_{i}")) for i in range(6)]
    docs.write_text(lines(lessons[0], "not JSON", lessons[1], dict(id="no text"), lessons[2], "",
                          lessons[3], '{"id": "lone", "text": "x = \'\\ud800\'"}', lessons[4], lessons[5]))
    labels = tmp_path / "labels.jsonl"
    with FakeLLM(answer=teacher) as server:
        teach = [f"--corpus={docs}", f"--labels={labels}", f"--api_base={server.url}", "--model=fake"]
        run_filter("annotate", "--n=3", *teach)
        run_filter("annotate", "--n=6", *teach)
        out, err = capsys.readouterr()
        assert "annotating 3 documents (0 of 3 done before)" in out
        assert "annotating 3 documents (3 of 6 done before)" in out
        assert "2 not a JSON object with a text, 1 blank, 1 with a lone surrogate" in err
        assert sorted(r["id"] for r in annotated(labels)) == [f"l{i}" for i in range(6)]
        run_filter("annotate", "--n=10", *teach)
        assert "all 6 documents drawn are annotated" in capsys.readouterr().out
        assert len(server.served) == 6
        docs.write_text(lines("not JSON", dict(id="no text"), '{"text": "\\udc00"}'))
        with pytest.raises(UserError, match="no documents in"):
            run_filter("annotate", *teach)


def test_a_sigterm_stops_annotate_as_ctrl_c_does_and_a_rerun_completes(tmp_path):
    """filter.py had no SIGTERM handler: it died at once, without a word or exit status 130."""
    import time
    docs = corpus(tmp_path / "docs.jsonl", 30, seed=4)
    labels = tmp_path / "labels.jsonl"
    with FakeLLM(answer=teacher, latency=0.1) as server:
        teach = [f"--corpus={docs}", f"--labels={labels}", f"--api_base={server.url}", "--model=fake", "--n=30"]
        proc = subprocess.Popen([sys.executable, str(ROOT / "filter.py"), "annotate", *teach, "--concurrency=1"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and not (
                labels.exists() and labels.read_text().count("\n") >= 3):
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "interrupted" in err, (proc.returncode, err)
        done = len(annotated(labels))
        assert 3 <= done < 30
        run_filter("annotate", *teach)
    assert sorted(r["id"] for r in annotated(labels)) == sorted(json.loads(line)["id"] for line in
                                                                docs.read_text().splitlines())


def test_annotate_fails_when_requests_fail_and_a_rerun_asks_again(tmp_path, capsys):
    """A document whose request failed for good is written without a score (a rerun asks
    again), and the run ends in one line and a non-zero exit, so a pipeline stops there."""
    docs, labels = corpus(tmp_path / "docs.jsonl", 4, seed=3), tmp_path / "labels.jsonl"
    teach = [f"--corpus={docs}", f"--labels={labels}", "--model=fake", "--n=4", "--max_retries=0"]
    with FakeLLM(faults=["ok", "500"], answer=teacher) as server:
        with pytest.raises(UserError, match=r"^2 documents got no answer \(first: .*500.*rerun the same command"):
            run_filter("annotate", f"--api_base={server.url}", "--concurrency=1", *teach)
    assert sum(r["score"] is None for r in annotated(labels)) == 2
    with FakeLLM(answer=teacher) as server:
        run_filter("annotate", f"--api_base={server.url}", *teach)
        assert len(server.served) == 2
    assert len(filter.read_scores(labels)[0]) == 4


def test_annotate_stops_when_the_last_documents_failed_alike(tmp_path):
    """A teacher down (every request a 500) had every document left retry in full before the
    run failed: 16 documents took 105 s, 100,000 would take days."""
    docs, labels = corpus(tmp_path / "docs.jsonl", 16, seed=3), tmp_path / "labels.jsonl"
    with FakeLLM(faults=["ok"] * 3 + ["500"] * 13, answer=teacher) as server:
        with pytest.raises(UserError, match=r"^5 documents got no answer .*the last 5 failed alike, so the run "
                                            r"stopped there: is .* working\?; rerun the same command"):
            run_filter("annotate", f"--corpus={docs}", f"--labels={labels}", f"--api_base={server.url}",
                       "--model=fake", "--n=16", "--max_retries=0", "--concurrency=1")
        assert len(server.served) < 16
    assert [r["score"] is None for r in annotated(labels)] == [False] * 3 + [True] * 5  # the answers are kept


def test_a_refusal_is_a_verdict_a_rerun_with_the_same_settings_does_not_ask_again(tmp_path, capsys):
    """A document refused for good (too long for the teacher's context, a content filter) made
    every run fail with "rerun to ask again", and every rerun was refused the same way. Where
    the teacher refuses every request, the settings are at fault: a rerun asks again."""
    docs, labels = corpus(tmp_path / "docs.jsonl", 4, seed=3), tmp_path / "labels.jsonl"
    teach = [f"--corpus={docs}", "--model=fake", "--n=4", "--concurrency=1"]
    with FakeLLM(faults=["ok", "context", "ok", "null"], answer=teacher) as server:
        run_filter("annotate", f"--api_base={server.url}", f"--labels={labels}", *teach)
        assert re.search(r"^warning: the teacher refused 2 documents for good .*; 1 of them too long for its "
                         r"context: a lower --prompt_chars", capsys.readouterr().err, re.M)
        run_filter("annotate", f"--api_base={server.url}", f"--labels={labels}", *teach)
        assert len(server.served) == 4  # not asked again
        assert "the teacher refused 2 of its documents for good" in capsys.readouterr().out
    assert len(filter.read_scores(labels)[0]) == 2
    with FakeLLM(answer=teacher) as server:
        run_filter("annotate", f"--api_base={server.url}", f"--labels={labels}", "--prompt_chars=1000", *teach)
        assert len(server.served) == 2  # another --prompt_chars asks again
    assert len(filter.read_scores(labels)[0]) == 4

    # a teacher that refuses every request of a run, scores from before or not: the settings or the
    # endpoint are at fault (scores from before may be another endpoint's), and a rerun asks again
    resumed = tmp_path / "resumed.jsonl"
    with FakeLLM(answer=teacher) as server:
        run_filter("annotate", f"--api_base={server.url}", f"--labels={resumed}", *teach[:2], "--n=2")
    for labels_now in (tmp_path / "fresh.jsonl", resumed):
        with FakeLLM(faults=["filtered"]) as server:
            with pytest.raises(UserError, match=r"^the teacher refused \d requests and answered none .* A rerun"):
                run_filter("annotate", f"--api_base={server.url}", f"--labels={labels_now}", *teach)
        with FakeLLM(answer=teacher) as server:
            run_filter("annotate", f"--api_base={server.url}", f"--labels={labels_now}", *teach)
            assert len(server.served) == (4 if labels_now != resumed else 2)
    # a prompt too long for the context is the document's verdict, answered or not
    with FakeLLM(faults=["context"]) as server:
        run_filter("annotate", f"--api_base={server.url}", f"--labels={tmp_path / 'long.jsonl'}", *teach)
        assert re.search(r"refused 4 documents for good .* 4 of them too long for its context: a lower "
                         r"--prompt_chars \(now 8000\)", capsys.readouterr().err)
        run_filter("annotate", f"--api_base={server.url}", f"--labels={tmp_path / 'long.jsonl'}", *teach)
        assert len(server.served) == 4


def test_annotate_fails_when_no_answer_holds_a_score(tmp_path):
    docs, labels = tmp_path / "docs.jsonl", tmp_path / "labels.jsonl"
    docs.write_text(lines(*(dict(id=f"mute-{i}", text=f"mute = {i}") for i in range(3))))
    with FakeLLM(answer=teacher) as server:
        with pytest.raises(UserError, match=r"^none of the 3 answers held a score .* is --model=fake one that"):
            run_filter("annotate", f"--api_base={server.url}", f"--corpus={docs}", f"--labels={labels}",
                       "--model=fake", "--n=3")
    assert [r["error"] for r in annotated(labels)] == [f"no score in {filter.DEFAULTS['attempts']} answers"] * 3


def test_an_output_naming_an_input_is_refused(tmp_path):
    docs, labels = corpus(tmp_path / "docs.jsonl", 4, seed=3), tmp_path / "labels.jsonl"
    before = docs.read_bytes()
    with pytest.raises(UserError, match="--labels=.* is the file --corpus names"):
        run_filter("annotate", f"--corpus={docs}", f"--labels={docs}", "--api_base=http://127.0.0.1:9/v1", "--model=m")
    labels.write_text(lines(*(dict(id=f"docs-{i}", score=i) for i in range(4))))
    with pytest.raises(UserError, match="--forest=.* is the file --labels names"):
        run_filter("train", f"--labels={labels}", f"--embeddings={tmp_path / 'e.npy'}", f"--forest={labels}")
    assert docs.read_bytes() == before and len(annotated(labels)) == 4


def test_embed_never_writes_over_the_labels_beside_its_array(tmp_path, nano):
    """--labels=X.json with --embeddings=X.npy: the array's description is X.json, and
    embed removed it (the labels) as a stale output before it began."""
    labels = tmp_path / "scores.json"
    labels.write_text(lines(*(dict(id=f"d{i}", text=f"def f{i}(): return {i}", score=i) for i in range(4))))
    before = labels.read_bytes()
    with pytest.raises(UserError, match=r"^--embeddings=.*scores.npy keeps .*scores.json beside it, the file --labels"):
        run_filter("embed", f"--labels={labels}", f"--embeddings={tmp_path / 'scores.npy'}", f"--ckpt={nano}")
    assert labels.read_bytes() == before
    with pytest.raises(UserError, match=r"^--embeddings=.* is the file --ckpt names"):
        run_filter("embed", f"--labels={labels}", f"--embeddings={nano.with_suffix('.npy')}",
                   f"--ckpt={nano.with_suffix('.npy')}")


def test_documents_without_ids_in_files_of_one_name_are_told_apart(tmp_path, capsys):
    first, second = tmp_path / "a" / "docs.jsonl", tmp_path / "b" / "docs.jsonl"
    for path, kind in ((first, "lesson"), (second, "dump")):
        path.parent.mkdir()
        path.write_text(lines(*(dict(text=f"{kind}_{i} = {i}", **({"id": None} if i else {})) for i in range(3))))
    ids = [doc_id for _, doc_id, _, _ in filter.documents([first, second], Counter())]  # "id": null is none
    assert ids == [f"{path.resolve()}:{n}" for path in (first, second) for n in (1, 2, 3)]

    labels = tmp_path / "labels.jsonl"  # from before ids held the path: NAME:LINE
    labels.write_text(lines(*(dict(id=f"docs.jsonl:{n}", score=9, text=f"lesson_{n - 1} = {n - 1}")
                              for n in (1, 2, 3))))
    with FakeLLM(answer=teacher) as server:
        teach = [f"--labels={labels}", f"--api_base={server.url}", "--model=fake"]
        run_filter("annotate", f"--corpus={first}", *teach)
        assert "all 3 documents drawn are annotated" in capsys.readouterr().out and not server.served
        run_filter("annotate", f"--corpus={first},{second}", *teach)  # the old ids cannot tell the two apart
        assert len(server.served) == 6
    scores = filter.read_scores(labels)[0]
    assert [scores[doc_id] for doc_id in ids] == [9, 9, 9, 1, 1, 1]


def test_a_utf16_corpus_gives_no_garbled_documents_and_a_byte_order_mark_reads(tmp_path):
    """json.loads of bytes takes UTF-16: a UTF-16 file (PowerShell's), cut into lines at its \\n
    bytes, kept its lines a byte off, "代码 = 1" read as other characters, without a word."""
    docs = tmp_path / "docs.jsonl"
    records = [dict(id=f"d{i}", text=f"代码_{i} = {i}\n") for i in range(3)]
    docs.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-16"))
    assert list(filter.documents([docs], Counter())) == []
    docs.write_bytes(lines(*records).encode("utf-8-sig"))
    assert [(doc_id, text) for _, doc_id, text, _ in filter.documents([docs], Counter())] == [
        (r["id"], r["text"]) for r in records]


def test_lines_with_lone_surrogates_are_skipped_and_counted(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_bytes(lines(dict(id="fine", text="def f():\n    return 1\n"),
                           '{"id": "escaped", "text": "def g():\\n    return \'\\ud800\'\\n"}',
                           '{"id": "in the id \\udfff", "text": "x = 1"}',
                           '{"id": "an emoji", "text": "print(\'\\ud83d\\ude00\')"}', "[" * 100_000).encode()
                     + '{"id": "raw", "text": "\ud800"}\n'.encode("utf-8", "surrogatepass"))
    skipped = Counter()
    assert [doc_id for _, doc_id, _, _ in filter.documents([docs], skipped)] == ["fine", "an emoji"]
    assert skipped == {"with a lone surrogate (not UTF-8)": 2, "not UTF-8": 1, "not a JSON object with a text": 1}
    pruned = tmp_path / "pruned.jsonl"
    run_filter("decontaminate", f"--corpus={docs}", "--bench=humaneval,humaneval", "--prune_tau=0.95",
               f"--out={pruned}", f"--report={tmp_path / 'report.json'}", "--workers=1")
    assert [json.loads(line)["id"] for line in pruned.read_text(encoding="utf-8").splitlines()] == ["fine", "an emoji"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["benchmarks"], report["problems"]) == ("humaneval", 164)  # a benchmark named twice, once


@pytest.mark.parametrize("change", ["drop the first", "add one", "rewrite one"])
def test_decontaminate_prunes_nothing_from_a_corpus_changed_while_it_was_compared(tmp_path, monkeypatch, change):
    """The taus of the comparison are paired with the documents of a second read: a corpus
    changed between the two would have its documents pruned by other documents' taus (and
    one rewritten under the same id, a benchmark's solution say, was kept as clean)."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text(lines(*(dict(id=f"d{i}", text=f"def f{i}():\n    return {i}\n") for i in range(5))))
    real_warn = filter.warn_skipped

    def change_the_corpus(*a):  # called once the comparison has read the corpus
        records = docs.read_text().splitlines(keepends=True)
        docs.write_text("".join(records[1:]) if change == "drop the first" else
                        "".join(records) + lines(dict(id="d5", text="x = 5")) if change == "add one" else
                        lines(dict(id="d0", text="def add(a, b):\n    return a + b\n")) + "".join(records[1:]))
        return real_warn(*a)

    monkeypatch.setattr(filter, "warn_skipped", change_the_corpus)
    pruned = tmp_path / "pruned.jsonl"
    with pytest.raises(UserError, match=r"docs.jsonl changed while it was compared: rerun"):
        run_filter("decontaminate", f"--corpus={docs}", "--bench=humaneval", "--prune_tau=0.95", f"--out={pruned}",
                   f"--report={tmp_path / 'report.json'}", "--workers=1")
    assert not pruned.exists() and not (tmp_path / "pruned.jsonl.partial").exists()
    assert not (tmp_path / "report.json").exists()


def fake_embeddings(tmp_path: Path, scores: list[int]) -> list[str]:
    """Labels with these scores and random embeddings of their documents, as annotate and embed
    write them; the settings that point train at them."""
    ids = [f"doc-{i}" for i in range(len(scores))]
    labels, emb = tmp_path / "labels.jsonl", tmp_path / "emb.npy"
    labels.write_text(lines(*(dict(id=i, score=s, text=f"text of {i}") for i, s in zip(ids, scores))))
    np.save(emb, np.random.default_rng(0).standard_normal((len(ids), 4)).astype(np.float16))
    emb.with_suffix(".json").write_text(json.dumps(dict(format=filter.EMBEDDINGS_FORMAT, count=len(ids), dim=4, ids=ids,
                                                        digests=[filter.text_digest(f"text of {i}") for i in ids],
                                                        source={})))
    return [f"--labels={labels}", f"--embeddings={emb}", "--n_trees=3", "--workers=1"]


def test_worker_processes_end_silently_and_a_signal_to_the_group_stops_the_run(tmp_path):
    """Workers took the KeyboardInterrupt handler of filter.py's __main__: the pool's end
    (terminate: SIGTERM) printed a traceback of each, and a SIGTERM to the whole group now
    and then killed one holding the pool's lock, which hung the run for good."""
    train = ["train", *fake_embeddings(tmp_path, [1, 9] * 20)[:-1], f"--forest={tmp_path / 'f.npz'}", "--workers=2"]
    many = corpus(tmp_path / "many.jsonl", 100_000, seed=5)  # seconds of comparing
    decontaminate = ["decontaminate", "--bench=humaneval", "--workers=2", f"--report={tmp_path / 'r.json'}"]
    for command in (train, decontaminate + [f"--corpus={corpus(tmp_path / 'few.jsonl', 40, seed=5)}"]):
        result = subprocess.run([sys.executable, "filter.py", *command], cwd=ROOT, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    proc, workers = at_work(["filter.py", *decontaminate, f"--corpus={many}"])
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler or timeout does: the parent and its workers
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and stderr.endswith("\ninterrupted\n") and "Traceback" not in stderr, stderr[-3000:]
    assert len(workers) == 2 and not [pid for pid in workers if Path(f"/proc/{pid}").exists()]


def test_train_holds_out_both_classes_or_nothing(tmp_path, capsys):
    forest = tmp_path / "forest.npz"
    run_filter("train", *fake_embeddings(tmp_path, [1, 1, 9]), "--holdout=0.5", f"--forest={forest}")
    assert "training on all of them, with no held-out metrics" in capsys.readouterr().err
    report = RandomForest.load(forest).info["report"]
    assert report["trained_on"] == 3 and report["held_out"] == 0

    run_filter("train", *fake_embeddings(tmp_path, [1, 9] * 5), "--holdout=0.2", f"--forest={forest}")
    report = RandomForest.load(forest).info["report"]
    assert report["trained_on"] == 8 and not np.isnan(report["held_out"]["auc"])  # a positive and a negative


def test_the_same_fit_writes_the_same_forest_whatever_it_took(tmp_path, monkeypatch):
    """The fit's seconds were in the file: a rerun of the same fit (toy_pipeline.sh after an
    interruption) wrote another forest, and apply scored the whole corpus again."""
    settings, forests = fake_embeddings(tmp_path, [1, 9] * 5), []
    for seconds_per_call in (1.0, 2.0):
        clock = iter(itertools.count(0.0, seconds_per_call))
        monkeypatch.setattr(filter.time, "time", lambda: next(clock))
        run_filter("train", *settings, f"--forest={tmp_path / 'forest.npz'}")
        forests.append((tmp_path / "forest.npz").read_bytes())
    assert forests[0] == forests[1]


def test_train_checks_its_output_before_the_fit(tmp_path, monkeypatch):
    taken = tmp_path / "taken"
    taken.mkdir()
    monkeypatch.setattr(RandomForest, "fit", lambda *a: pytest.fail("fitted a forest it cannot write"))
    with pytest.raises(UserError, match="taken: it is a directory"):
        run_filter("train", *fake_embeddings(tmp_path, [1, 9] * 3), f"--forest={taken}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.json", "emb.npy", "labels.jsonl", "taken"]


def test_train_makes_the_forest_folder_only_to_write_the_forest(tmp_path):
    settings = fake_embeddings(tmp_path, [1, 9] * 3)
    (tmp_path / "labels.jsonl").write_text(lines(dict(id="elsewhere", score=1)))
    with pytest.raises(UserError, match="none of the 6 documents"):
        run_filter("train", *settings, f"--forest={tmp_path / 'new' / 'forest.npz'}")
    assert not (tmp_path / "new").exists()
    run_filter("train", *fake_embeddings(tmp_path, [1, 9] * 3), f"--forest={tmp_path / 'new' / 'forest.npz'}")
    assert RandomForest.load(tmp_path / "new" / "forest.npz").n_features_ == 4


def test_empty_lists_name_their_setting(tmp_path):
    docs = corpus(tmp_path / "docs.jsonl", 3, seed=7)
    for bench in ("", ","):
        with pytest.raises(UserError, match="^--bench is needed"):
            run_filter("decontaminate", f"--corpus={docs}", f"--bench={bench}")
    for command in ("annotate", "embed", "apply", "decontaminate"):
        with pytest.raises(UserError, match="^--corpus is needed"):
            run_filter(command, "--corpus= , ")


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, message", [
    (["annotate", "--min_score=11"], "--min_score must be a score from 0 to 10"),
    (["annotate", "--temperature=-1"], "--temperature must be in"),
    (["annotate", "--temperature=5"], r"--temperature must be in \[0, 2\]"),  # every request refused, then
    (["annotate", "--max_tokens=0"], "--max_tokens must be >= 1"),  # was: every request refused
    (["annotate", "--seed=-1"], "--seed must be an integer >= 0"),  # were numpy's tracebacks
    (["train", "--seed=-1"], "--seed must be an integer >= 0"),
    (["train", "--workers=-3"], "--workers must be >= 0"),  # was one process, without a word
    (["decontaminate", "--bench=humaneval", "--mbpp=m.jsonl"], "--mbpp names MBPP's file"),  # was ignored
    (["train", "--min_score=-1"], "--min_score must be a score, from 0 to 10, not -1"),
    (["apply", "--num_shards=0", "--forest=f.npz"], "--num_shards must be at least 1 and --shard in .* not 0 of 0"),
])
def test_settings_out_of_range_are_one_line(tmp_path, args, message):
    docs = corpus(tmp_path / "docs.jsonl", 3, seed=7)
    with pytest.raises(UserError, match=message):
        run_filter(*args, f"--corpus={docs}", f"--labels={tmp_path / 'l.jsonl'}", "--api_base=http://127.0.0.1:9/v1",
                   "--model=m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_a_first_annotation_checks_the_teacher_before_it_reads_the_corpus(tmp_path, monkeypatch):
    """A wrong --model or URL was said only after the draw had read the whole corpus (at the
    paper's scale, The Stack)."""
    docs = corpus(tmp_path / "docs.jsonl", 3, seed=7)
    monkeypatch.setattr(filter, "draw", lambda *a: pytest.fail("the corpus was read"))
    with pytest.raises(UserError, match="127.0.0.1:9"):
        run_filter("annotate", f"--corpus={docs}", f"--labels={tmp_path / 'l.jsonl'}", "--model=m",
                   "--api_base=http://127.0.0.1:9/v1", "--max_retries=0")


def test_annotate_says_when_the_corpus_holds_fewer_documents_than_n(tmp_path, capsys):
    docs, labels = corpus(tmp_path / "docs.jsonl", 3, seed=7), tmp_path / "labels.jsonl"
    with FakeLLM(answer=teacher) as server:
        run_filter("annotate", f"--api_base={server.url}", f"--corpus={docs}", f"--labels={labels}",
                   "--model=fake", "--n=10")
    assert "the corpus holds 3 documents, fewer than --n=10: all of them are drawn" in capsys.readouterr().out
    assert len(annotated(labels)) == 3


def test_bad_input_gives_one_clear_line(tmp_path, nano):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    for command in ("annotate", "embed", "apply", "decontaminate"):
        with pytest.raises(UserError, match="no documents in .*empty"):
            run_filter(command, f"--corpus={empty}", f"--ckpt={nano}", f"--labels={tmp_path / 'l.jsonl'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]

    docs = corpus(tmp_path / "docs.jsonl", 12, seed=5)
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(dict(id=f"docs-{i}", score=9 * (i % 2))) + "\n" for i in range(12)))
    emb = tmp_path / "emb.npy"
    run_filter("embed", f"--corpus={docs}", f"--ckpt={nano}", f"--embeddings={emb}")
    train = ["train", f"--labels={labels}", f"--forest={tmp_path / 'f.npz'}", "--n_trees=3"]
    good = emb.read_bytes()
    emb.write_bytes(good[:-100])
    with pytest.raises(UserError, match="emb.npy is corrupt"):
        run_filter(*train, f"--embeddings={emb}")
    emb.write_bytes(good)
    meta = json.loads(emb.with_suffix(".json").read_text())
    emb.with_suffix(".json").write_text(json.dumps(dict(meta, count=13)))
    with pytest.raises(UserError, match="emb.npy is corrupt"):
        run_filter(*train, f"--embeddings={emb}")
    emb.with_suffix(".json").write_text(json.dumps(dict(meta, digests=meta["digests"][1:])))
    with pytest.raises(UserError, match="description .* is missing or broken .*11 digests of texts for 12 ids"):
        run_filter(*train, f"--embeddings={emb}")
    emb.with_suffix(".json").write_text(json.dumps(meta))
    kept = emb.read_bytes()
    emb.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match="emb.npy is corrupt: the magic string is not correct") as error:
        run_filter(*train, f"--embeddings={emb}")
    assert "pickle" not in str(error.value)  # np.load's advice to load it unsafely
    emb.write_bytes(kept)
    emb.with_suffix(".json").unlink()
    with pytest.raises(UserError, match="description .* is missing"):
        run_filter(*train, f"--embeddings={emb}")
    with pytest.raises(UserError, match="no embeddings at"):
        run_filter(*train, f"--embeddings={tmp_path / 'none.npy'}")
    assert not (tmp_path / "f.npz").exists()

    with pytest.raises(UserError, match="emb.npy is not a random forest file"):
        run_filter("apply", f"--corpus={docs}", f"--forest={emb}", f"--out={tmp_path / 'out'}")
    result = subprocess.run([sys.executable, str(ROOT / "filter.py"), "apply", f"--corpus={docs}",
                             f"--forest={labels}", f"--out={tmp_path / 'out'}"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not a random forest file" in result.stderr
    (tmp_path / "noise.npz").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match=r"noise\.npz is not a random forest file \(not an \.npz archive\)$"):
        run_filter("apply", f"--corpus={docs}", f"--forest={tmp_path / 'noise.npz'}", f"--out={tmp_path / 'out'}")
    with pytest.raises(UserError, match="unknown subcommand 'filter'"):
        run_filter("filter")
    assert not (tmp_path / "out").exists()


def test_a_corpus_file_that_cannot_be_read_is_told_before_any_work(tmp_path, nano, monkeypatch):
    """Only the files up to the first with a document were opened first: annotate's draw met a
    later unreadable one in a traceback, apply and decontaminate after the work on the others."""
    docs, locked = corpus(tmp_path / "docs.jsonl", 3, seed=8), corpus(tmp_path / "locked.jsonl", 3, seed=9)
    forest, real = nano_forest(tmp_path, nano), Path.open

    def open_(path, *args, **kwargs):  # as for a user without the permission (the tests may run as root)
        if path.name == "locked.jsonl":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(Path, "open", open_)
    monkeypatch.setattr(filter, "load_embedder", lambda *a: pytest.fail("loaded a model before reading the corpus"))
    monkeypatch.setattr(filter, "compare_document", lambda *a: pytest.fail("compared before reading the corpus"))
    outputs = [tmp_path / name for name in ("l.jsonl", "e.npy", "out", "r.json")]
    with FakeLLM(answer=teacher) as server:
        for command in ("annotate", "embed", "apply", "decontaminate"):
            with pytest.raises(UserError, match="^cannot read .*locked.jsonl: Permission denied$"):
                run_filter(command, f"--corpus={docs},{locked}", f"--ckpt={nano}", f"--api_base={server.url}",
                           f"--forest={forest}", "--model=fake", "--prune_tau=0.95", "--workers=1",
                           *(f"--{o}={p}" for o, p in zip(("labels", "embeddings", "out", "report"), outputs)))
    assert not any(p.exists() for p in outputs)


def decontaminating(tmp_path: Path, monkeypatch) -> list[str]:
    """A corpus to check, with a comparison that fails the test if it starts: a wrong setting
    must be told before the hours it takes. The settings that point decontaminate at it."""
    monkeypatch.setattr(filter, "compare_document", lambda *a: pytest.fail("compared before checking the settings"))
    docs = corpus(tmp_path / "docs.jsonl", 3, seed=8)
    return ["decontaminate", f"--corpus={docs}", "--bench=humaneval", "--workers=1"]


def test_decontaminate_checks_its_outputs_before_comparing(tmp_path, monkeypatch):
    args = decontaminating(tmp_path, monkeypatch)
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="taken: it is a directory"):
        run_filter(*args, f"--report={tmp_path / 'taken'}")
    with pytest.raises(UserError, match="taken: it is a directory"):
        run_filter(*args, "--prune_tau=0.95", f"--out={tmp_path / 'taken'}", f"--report={tmp_path / 'r.json'}")
    with pytest.raises(UserError, match="^--out needs --prune_tau"):  # else nothing would be written there
        run_filter(*args, f"--out={tmp_path / 'pruned.jsonl'}", f"--report={tmp_path / 'r.json'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "taken"]
    assert not any((tmp_path / "taken").iterdir())


def test_decontaminate_loads_its_embedding_model_before_comparing(tmp_path, monkeypatch, nano):
    args = decontaminating(tmp_path, monkeypatch)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a model")
    with pytest.raises(UserError, match="cannot load --ckpt=.*junk.pt"):
        run_filter(*args, f"--ckpt={junk}", f"--report={tmp_path / 'new' / 'deep' / 'r.json'}")  # no folder made
    with pytest.raises(UserError, match="--batch_size must be at least 1"):
        run_filter(*args, f"--ckpt={nano}", "--batch_size=0", f"--report={tmp_path / 'r.json'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "junk.pt"]


def test_decontaminate_reads_its_results_before_comparing(tmp_path, monkeypatch):
    args = decontaminating(tmp_path, monkeypatch)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(lines(dict(task_id="HumanEval/0", passed=True), "not JSON"))
    report = f"--report={tmp_path / 'r.json'}"
    with pytest.raises(UserError, match=r"mixed.jsonl line 2 is not a JSON object, as every line of a JSONL"):
        run_filter(*args, f"--results={mixed}", report)
    with pytest.raises(UserError, match=r"^--results: .*docs.jsonl holds a record that is not an evaluate.py result"):
        run_filter(*args, f"--results={tmp_path / 'docs.jsonl'}", report)  # JSON objects, but not results
    mixed.write_text(lines(dict(task_id="MBPP/2", passed=True)))
    with pytest.raises(UserError, match=r"^--results: .*mixed.jsonl has task ids the benchmarks checked do not"):
        run_filter(*args, f"--results={mixed}", report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "mixed.jsonl"]


def test_an_interrupted_decontaminate_goes_on_where_it_stopped(tmp_path, monkeypatch, capsys):
    """The comparison takes hours at the paper's scale, and its results were in memory
    alone: an interrupted run compared everything again."""
    solved = evaluate.humaneval_problems()["HumanEval/2"]
    docs = corpus(tmp_path / "docs.jsonl", 30, seed=9, extra=[dict(id="copy", text=solved["prompt"] +
                                                                   solved["reference"])])
    common = ["decontaminate", f"--corpus={docs}", "--bench=humaneval", "--workers=1", "--prune_tau=0.95"]
    run_filter(*common, f"--report={tmp_path / 'whole.json'}", f"--out={tmp_path / 'whole.jsonl'}")
    real, compared = filter.compare_document, []

    def interrupted_at_the_eleventh(document):
        compared.append(document[0])
        if len(compared) == 11:
            raise KeyboardInterrupt
        return real(document)

    monkeypatch.setattr(filter, "compare_document", interrupted_at_the_eleventh)
    report, partial = tmp_path / "r.json", tmp_path / "r.json.partial"
    args = [*common, f"--report={report}", f"--out={tmp_path / 'pruned.jsonl'}"]
    with pytest.raises(KeyboardInterrupt):
        run_filter(*args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "r.json.partial", "whole.json", "whole.jsonl"]
    compared.clear()
    capsys.readouterr()
    monkeypatch.setattr(filter, "compare_document", lambda document: compared.append(document[0]) or real(document))
    run_filter(*args)
    assert f"resuming: 10 documents compared before, in {partial}" in capsys.readouterr().out
    assert len(compared) == 21 and compared[-1] == "copy" and not partial.exists()
    ours, whole = (json.loads(path.read_text()) for path in (report, tmp_path / "whole.json"))
    assert ours["by_problem"][2]["tau"] == 1.0 and ours["documents_by_tau"] == whole["documents_by_tau"]
    assert {**ours, "pruned": None} == {**whole, "pruned": None}
    assert (tmp_path / "pruned.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    # what another --min_tau left is not taken
    monkeypatch.setattr(filter, "compare_document", interrupted_at_the_eleventh)
    compared.clear()
    with pytest.raises(KeyboardInterrupt):
        run_filter(*args, "--min_tau=0.9")
    compared.clear()
    monkeypatch.setattr(filter, "compare_document", lambda document: compared.append(document[0]) or real(document))
    run_filter(*args)
    assert len(compared) == 31 and not partial.exists()


def test_decontaminate_holds_its_lock_until_the_report_is_written(tmp_path, monkeypatch):
    """The lock went with the comparison: a second run then found it done and wrote the
    report and pruned file at the same time, and the first failed removing its progress."""
    args = ["decontaminate", f"--corpus={corpus(tmp_path / 'docs.jsonl', 5, seed=8)}", "--bench=humaneval",
            "--workers=1", f"--report={tmp_path / 'r.json'}"]
    real, busy = filter.write_atomic, []

    def another_run_meanwhile(*a):
        if not busy:
            with pytest.raises(UserError, match="another run is writing .*r.json") as error:
                run_filter(*args)
            busy.append(error)
        return real(*a)

    monkeypatch.setattr(filter, "write_atomic", another_run_meanwhile)
    run_filter(*args)
    assert busy and sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "r.json"]


def test_decontaminate_holds_a_lock_on_its_out_too(tmp_path, monkeypatch):
    """Only --report was locked: two runs with one --out and other reports wrote the pruned
    documents into the same OUT.partial at once."""
    args = ["decontaminate", f"--corpus={corpus(tmp_path / 'docs.jsonl', 5, seed=8)}", "--bench=humaneval",
            "--workers=1", "--prune_tau=0.95", f"--out={tmp_path / 'pruned.jsonl'}"]
    real, tried = filter.write_atomic, []

    def another_run_meanwhile(*a):
        if not tried:  # (once: not again when that run writes its report)
            tried.append(True)
            with pytest.raises(UserError, match="another run is writing .*pruned.jsonl: wait for it"):
                run_filter(*args, f"--report={tmp_path / 'other.json'}")
        return real(*a)

    monkeypatch.setattr(filter, "write_atomic", another_run_meanwhile)
    run_filter(*args, f"--report={tmp_path / 'r.json'}")
    assert tried and sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "pruned.jsonl", "r.json"]


def test_a_full_disk_after_the_long_work_is_one_line(tmp_path, monkeypatch):
    """The forest's file and the pruned documents are written after hours of work: a write
    that failed was a traceback."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    forest = tmp_path / "forest.npz"
    monkeypatch.setattr(filter.np, "savez", full)
    with pytest.raises(UserError, match=rf"^cannot write {re.escape(str(forest))}: No space left on device"):
        run_filter("train", *fake_embeddings(tmp_path, [1, 9] * 4), f"--forest={forest}")
    monkeypatch.undo()
    real_read_again = filter.read_again

    def full_after_one(*args):
        yield next(real_read_again(*args))
        full()

    monkeypatch.setattr(filter, "read_again", full_after_one)
    pruned = tmp_path / "pruned.jsonl"
    with pytest.raises(UserError, match=rf"^cannot write {re.escape(str(pruned))}: No space left on device"):
        run_filter("decontaminate", f"--corpus={corpus(tmp_path / 'docs.jsonl', 3, seed=8)}", "--bench=humaneval",
                   "--workers=1", "--prune_tau=0.95", f"--out={pruned}", f"--report={tmp_path / 'r.json'}")
    assert not forest.exists() and not pruned.exists() and not (tmp_path / "pruned.jsonl.partial").exists()


def test_labels_without_ids_are_named_as_embed_names_them(tmp_path, nano):
    """train called every label line without an id "None", embed called it PATH:LINE: no
    document had a score."""
    labels = tmp_path / "labels.jsonl"
    labels.write_text(lines(*(dict(text=f"x_{i} = {i}", score=9 * (i % 2)) for i in range(12))))
    run_filter("embed", f"--labels={labels}", f"--ckpt={nano}", f"--embeddings={tmp_path / 'e.npy'}")
    run_filter("train", f"--labels={labels}", f"--embeddings={tmp_path / 'e.npy'}", "--n_trees=3", "--workers=1",
               f"--forest={tmp_path / 'f.npz'}")
    assert RandomForest.load(tmp_path / "f.npz").info["report"]["documents"] == 12


def test_problems_that_do_not_parse_are_compared_by_13_grams_and_results_may_have_spaces(tmp_path, capsys):
    """A reference that did not parse (a user's --mbpp) was a TypeError traceback; a space
    after a comma in --results was part of the next path."""
    mbpp = tmp_path / "mbpp.jsonl"
    broken = "def f():\n\treturn 1\n        return 2\n"  # mixed tabs and spaces: no AST
    text = "Return one, the smallest positive whole number, to whoever calls this function today."
    mbpp.write_text(lines(dict(task_id=11, text=text, code=broken, test_list=["assert f() == 1"],
                               test_setup_code=""),
                          dict(task_id=12, text="Add.", code="def add(a, b):\n    return a + b\n",
                               test_list=["assert add(1, 2) == 3"], test_setup_code="")))
    docs = tmp_path / "docs.jsonl"
    docs.write_text(lines(dict(id="copy", text="def add(x, y):\n    return x + y\n"),
                          dict(id="words", text=text + "\n" + broken)))
    results = [tmp_path / n / "results.jsonl" for n in ("a", "b")]
    for path in results:
        path.parent.mkdir()
        path.write_text(lines(dict(task_id="MBPP/11", passed=True), dict(task_id="MBPP/12", passed=False)))
    filter.main(["decontaminate", f"--corpus={docs}", "--bench=mbpp", f"--mbpp={mbpp}", "--workers=1",
                 f"--report={tmp_path / 'r.json'}", f"--results={results[0]}, {results[1]}"])
    assert "1 of the problems do not parse as prompt and reference (MBPP/11)" in capsys.readouterr().err
    rows = {r["task_id"]: r for r in json.loads((tmp_path / "r.json").read_text())["by_problem"]}
    assert rows["MBPP/12"]["tau"] == 1.0 and rows["MBPP/11"]["tau"] is None
    assert rows["MBPP/11"]["ngram_documents"] == 1


def test_decontaminate_never_writes_over_its_corpus(tmp_path, monkeypatch):
    args = decontaminating(tmp_path, monkeypatch)
    docs = tmp_path / "docs.jsonl"
    before = docs.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.jsonl").symlink_to(docs)
    for same in (docs, tmp_path / "sub" / ".." / "docs.jsonl", tmp_path / "link.jsonl"):
        with pytest.raises(UserError, match=r"^--out=.* is the file --corpus names .*: writing it would overwrite"):
            run_filter(*args, "--prune_tau=0.95", f"--out={same}", f"--report={tmp_path / 'r.json'}")
    with pytest.raises(UserError, match=r"^--report=.* is the file --corpus names"):
        run_filter(*args, f"--report={tmp_path / 'link.jsonl'}")
    with pytest.raises(UserError, match=r"^--report=.* is the file --out names"):
        run_filter(*args, "--prune_tau=0.95", f"--out={tmp_path / 'p.jsonl'}", f"--report={tmp_path / 'p.jsonl'}")
    assert docs.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "link.jsonl", "sub"]


def nano_forest(tmp_path: Path, nano: Path, score=None) -> Path:
    """A forest on the nano model's embeddings, fitted to noise so that documents score
    apart, or scoring every document score exactly."""
    X, y, _ = noisy(100, d=64)
    forest = RandomForest(n_trees=5).fit(X, y > 0)
    if score is not None:
        forest.value_[:] = [1 - score, score]
    forest.info = {"embedding": {"ckpt": str(nano), "doc_tokens": 64}}
    forest.save(tmp_path / "f.npz")
    return tmp_path / "f.npz"


def test_an_interrupted_apply_leaves_no_summary_and_resumes(tmp_path, nano, monkeypatch):
    docs = corpus(tmp_path / "docs.jsonl", 20, seed=6)
    args = ["apply", f"--corpus={docs}", f"--forest={nano_forest(tmp_path, nano)}", f"--out={tmp_path / 'out'}",
            "--batch_size=1"]
    real = filter.embed_texts

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(filter, "embed_texts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_filter(*args)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "scores-00000-of-00001.bin.partial", "scores-00000-of-00001.bin.partial.done",
        "scores-00000-of-00001.bin.partial.json"]
    monkeypatch.setattr(filter, "embed_texts", real)
    run_filter(*args)
    assert json.loads((tmp_path / "out" / "summary-00000-of-00001.json").read_text())["documents"] == 20
    assert not any(p.name.endswith((".partial", ".done")) for p in (tmp_path / "out").iterdir())


def test_scoring_with_another_forest_leaves_nothing_of_the_old_one_while_it_runs(tmp_path, nano, monkeypatch):
    """Scoring a shard again (another forest, corpus or model) removed only its summary: a run
    killed on the way left the old forest's kept file, which a reader of kept-*.jsonl
    (prepare.py --inputs) took for the shard's selection, and its scores."""
    docs, out = corpus(tmp_path / "docs.jsonl", 8, seed=6), tmp_path / "out"
    run_filter("apply", f"--corpus={docs}", f"--forest={nano_forest(tmp_path, nano)}", f"--out={out}")
    assert (out / "kept-00000-of-00001.jsonl").is_file()
    (tmp_path / "other").mkdir()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(filter, "embed_texts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_filter("apply", f"--corpus={docs}", f"--forest={nano_forest(tmp_path / 'other', nano, score=0.9)}",
                   f"--out={out}")
    assert sorted(p.name for p in out.iterdir()) == [
        "scores-00000-of-00001.bin.partial", "scores-00000-of-00001.bin.partial.done",
        "scores-00000-of-00001.bin.partial.json"]


def test_a_model_that_does_not_load_leaves_no_scores_behind(tmp_path, nano):
    docs, out = corpus(tmp_path / "docs.jsonl", 4, seed=6), tmp_path / "out"
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(UserError, match="notes.txt is not a readable checkpoint"):
        run_filter("apply", f"--corpus={docs}", f"--forest={nano_forest(tmp_path, nano)}", f"--out={out}",
                   f"--ckpt={tmp_path / 'notes.txt'}")
    assert list(out.iterdir()) == []


def test_an_interrupted_apply_goes_on_from_the_chunks_it_scored(tmp_path, nano, monkeypatch, capsys):
    """It scored the whole shard again: hours of a GPU's work at scale, and under torchrun the
    others' share too when one process failed."""
    monkeypatch.setattr(filter, "CHUNK", 4)
    docs = corpus(tmp_path / "docs.jsonl", 20, seed=6)  # 5 chunks
    forest = nano_forest(tmp_path, nano)
    args = ["apply", f"--corpus={docs}", f"--forest={forest}", "--threshold=0.5"]
    run_filter(*args, f"--out={tmp_path / 'straight'}")
    real, embedded = filter.embed_texts, []

    def interrupted_at_the_third_chunk(model, texts, *args, **kwargs):
        if len(embedded) == 2:
            raise KeyboardInterrupt
        embedded.append(len(texts))
        return real(model, texts, *args, **kwargs)

    monkeypatch.setattr(filter, "embed_texts", interrupted_at_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        run_filter(*args, f"--out={tmp_path / 'out'}")
    embedded.clear()
    monkeypatch.setattr(filter, "embed_texts", lambda model, texts, *a, **k: embedded.append(len(texts))
                        or real(model, texts, *a, **k))
    capsys.readouterr()
    run_filter(*args, f"--out={tmp_path / 'out'}")
    assert embedded == [4, 4, 4] and "resuming: 2 chunks of scores-00000-of-00001.bin scored before" in capsys.readouterr().out
    for name in ("scores-00000-of-00001.bin", "kept-00000-of-00001.jsonl"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_apply_puts_each_chunks_scores_on_disk_before_its_flag(tmp_path, nano, monkeypatch):
    """A flag written back before its scores (the kernel may write either first) would stand,
    after a crash of the machine, for scores that were never saved: zeros taken as done."""
    monkeypatch.setattr(filter, "CHUNK", 4)
    docs = corpus(tmp_path / "docs.jsonl", 12, seed=6)  # 3 chunks
    real_fsync, synced = os.fsync, []

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if name.endswith(".partial"):
            synced.append(Path(name + ".done").read_bytes())  # the flags as they stand at the sync
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    run_filter("apply", f"--corpus={docs}", f"--forest={nano_forest(tmp_path, nano)}", f"--out={tmp_path / 'out'}")
    assert synced == [b"", b"\x01", b"\x01\x01"]  # the flags grow a byte a chunk


# ---------------------------------------------------------------- the forest's edges, apply's selection

def test_a_cut_across_bins_a_tree_left_empty_is_halfway_between_the_values_it_saw():
    """Where a tree's bootstrap sample misses the values between the two sides, the cut lies
    halfway across the gap it saw, as exact CART (and scikit-learn) cuts halfway between the
    two values, not at either edge of the gap."""
    X = np.r_[np.zeros(100), [1.0], np.full(100, 2.0)][:, None]
    y = np.r_[np.zeros(101, int), np.ones(100, int)]
    forest = RandomForest(n_trees=20, seed=0).fit(X, y)
    missed = np.array([np.random.default_rng([0, t]).integers(0, 201, 201).tolist().count(100) == 0
                       for t in range(20)])  # the trees whose sample lacks the one row at x = 1
    assert 0 < missed.sum() < 20
    assert list(forest.threshold_[forest.roots_]) == list(np.where(missed, 1.0, 1.5))


def test_max_bins_distinct_values_each_keep_a_bin():
    """A feature with exactly max_bins distinct values still gets a bin for each, so that every
    pair of neighbouring values can be told apart, cut halfway between them."""
    X = np.repeat([[0.0], [1.0], [2.0], [3.0]], 20, axis=0)
    y = (X[:, 0] >= 1).astype(int)
    forest = RandomForest(n_trees=5, max_bins=4, seed=0).fit(X, y)
    assert np.allclose(forest.threshold_[forest.roots_], 0.5)
    assert list(forest.predict([[0.4], [0.6], [3.0]])) == [0, 1, 1]


def test_a_value_that_fills_bins_by_itself_leaves_the_rest_to_the_other_values():
    """A sparse feature, 90% zeros: quantiles of all rows put 230 of 255 edges on 0, where
    they fell into one, and the 10% of rows that vary were cut into 27 bins (a forest on a
    fine pattern in them: 82% accurate where scikit-learn was 99.6%)."""
    rng = np.random.default_rng(0)
    X = rng.random((40_000, 2)).astype(np.float32)
    X[rng.random(40_000) < 0.9, 0] = 0
    sparse, dense = filter.bin_edges(X, 256, rng)
    counts = np.bincount(filter.binned(X[:, :1], [sparse])[:, 0], minlength=256)
    assert len(sparse) == 255 and counts[0] == (X[:, 0] == 0).sum()  # the zeros' bin, and only theirs
    assert counts[1:].max() <= 2 * counts[1:].mean()  # the others about as full
    # without such a value: the quantiles of all rows, as before
    assert np.array_equal(dense, np.unique(np.sort(X[:, 1])[(np.arange(1, 256) * 40_000) // 256]))


def test_max_features_counts_as_scikit_learn_does():
    """The number of features tried per split, for every form of max_features, is
    scikit-learn's: int() of sqrt, log2 or the fraction times the features, at least 1."""
    from sklearn.tree import DecisionTreeClassifier  # what each tree of RandomForestClassifier is given
    for d in (1, 3, 10, 40, 99):
        X, y = np.random.default_rng(d).standard_normal((8, d)), np.arange(8) % 2
        for features in ("sqrt", "log2", 0.05, 0.29, 0.5, 0.55, 0.999, 1.0, 1, 3):
            if type(features) is int and features > d:
                continue
            theirs = DecisionTreeClassifier(max_features=features, random_state=0).fit(X, y).max_features_
            assert RandomForest(max_features=features)._candidates(d) == theirs, (d, features)


def test_each_node_draws_its_own_features():
    """Features are drawn afresh at every split: the nodes of one level of one tree try
    different features, not one draw shared by the whole level."""
    X, y, _ = noisy(500, seed=1)
    forest = RandomForest(n_trees=4, max_features=1, seed=0).fit(X, y)
    tree = np.searchsorted(forest.roots_, np.arange(len(forest.feature_)), side="right")
    split = forest.feature_ >= 0
    levels = Counter(zip(tree[split], depths(forest)[split]))  # split nodes per (tree, depth)
    features = {key: {f for t, d, f in zip(tree[split], depths(forest)[split], forest.feature_[split])
                      if (t, d) == key} for key in levels}
    crowded = [f for key, f in features.items() if levels[key] >= 4]  # levels of 4 nodes or more of a tree
    assert crowded and all(len(f) > 1 for f in crowded)


def test_importances_weigh_every_tree_that_splits_alike():
    """As in scikit-learn, each tree's importances are normalised before the mean, trees that
    never split (their sample holds one class) are left out, and a forest of such trees has
    no importances (zeros, not NaN): with one split a tree, a feature's importance is its
    share of the roots."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((400, 3)).astype(np.float32)
    y = np.zeros(400, int)
    y[np.argsort(X[:, 0] + 0.05 * X[:, 1])[-3:]] = 1  # three positives: a tree's sample misses them 1 time in 20
    forest = RandomForest(n_trees=200, max_depth=1, max_features=1, seed=0).fit(X, y)
    roots = forest.feature_[forest.roots_]
    assert 0 < (roots == -1).sum() < 30 and len(set(roots.tolist())) == 4
    assert np.allclose(forest.feature_importances_, np.bincount(roots[roots >= 0], minlength=3) / (roots >= 0).sum())
    stumps = RandomForest(n_trees=3, max_depth=0, seed=0).fit(X, y)
    assert np.array_equal(stumps.feature_importances_, np.zeros(3))


def test_a_split_whose_drawn_features_are_constant_draws_on():
    """As scikit-learn's trees do: a node tries further features, one at a time, until one
    varies in it. With one feature of three constant and one drawn per split, every root
    splits, on x0 or x1 alike often; where no feature varies, the node is a leaf."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((400, 3)).astype(np.float32)
    X[:, 2] = 1.0
    y = (X[:, 0] > 0).astype(int)
    stumps = RandomForest(n_trees=200, max_depth=1, max_features=1, seed=0).fit(X, y)
    roots = stumps.feature_[stumps.roots_]
    assert set(roots.tolist()) == {0, 1} and 70 < (roots == 0).sum() < 130
    twins = np.repeat(X[:2], 10, axis=0)  # two distinct rows, each with both labels
    both = RandomForest(n_trees=20, max_features=1, seed=0).fit(twins, np.arange(20) % 2)
    assert (both.feature_[both.roots_] >= 0).all() and (depths(both) <= 1).all()


def test_trees_grow_as_large_as_scikit_learns_on_sparse_binary_features():
    """On one-hot-like data most features are constant in a deep node: trees that stopped
    there would be far smaller than scikit-learn's (a quarter fewer nodes here)."""
    from sklearn.ensemble import RandomForestClassifier
    rng = np.random.default_rng(0)
    X = (rng.random((1500, 64)) < 0.05).astype(np.float32)
    y = (X[:, :8].sum(1) + 0.5 * X[:, 8:16].sum(1) + 0.3 * rng.standard_normal(1500) > 0.7).astype(int)
    ours = len(RandomForest(n_trees=30, seed=0).fit(X, y).feature_)
    theirs = sum(t.tree_.node_count for t in RandomForestClassifier(n_estimators=30, random_state=0).fit(X, y).estimators_)
    assert abs(ours / theirs - 1) < 0.04, (ours, theirs)


def test_importances_are_each_trees_weighted_gini_decrease_found_again_from_its_sample():
    """feature_importances_ is the mean over the trees of each tree's normalised sum of
    w·gini(node) - w_left·gini(left) - w_right·gini(right) over its splits, recomputed here from
    the trees and their bootstrap samples: every split counts, however many share a feature."""
    X, y, _ = noisy(300, d=4, seed=7)
    forest = RandomForest(n_trees=3, seed=5).fit(X, y)
    ends, per_tree = list(forest.roots_[1:]) + [len(forest.feature_)], []
    for t, (root, end) in enumerate(zip(forest.roots_, ends)):
        drawn = np.bincount(np.random.default_rng([5, t]).integers(0, 300, 300), minlength=300)  # the tree's sample
        leaves = filter.route(X, forest.feature_, forest.threshold_, forest.left_, forest.right_,
                              np.full(300, root), np.arange(300))
        totals = np.zeros((len(forest.feature_), 2))
        np.add.at(totals, (leaves, y), drawn)
        for node in reversed(range(root, end)):  # children come after their parent
            if forest.feature_[node] >= 0:
                totals[node] = totals[forest.left_[node]] + totals[forest.right_[node]]
        weight = totals.sum(1)
        impurity = weight - (totals ** 2).sum(1) / np.maximum(weight, 1e-12)  # w·gini
        importance = np.zeros(4)
        for node in range(root, end):
            if forest.feature_[node] >= 0:
                importance[forest.feature_[node]] += (impurity[node] - impurity[forest.left_[node]]
                                                      - impurity[forest.right_[node]])
        per_tree.append(importance / importance.sum())
    assert np.allclose(forest.feature_importances_, np.mean(per_tree, 0) / np.mean(per_tree, 0).sum())


def test_a_class_missing_from_a_class_weight_dict_weighs_one():
    """class_weight={1: 3} weighs class 0 as 1, as scikit-learn does."""
    X, y, _ = noisy(400, seed=4)
    y = (X[:, 0] > 0.8).astype(int)
    partial = RandomForest(n_trees=4, seed=0, class_weight={1: 3.0}).fit(X, y)
    full = RandomForest(n_trees=4, seed=0, class_weight={0: 1.0, 1: 3.0}).fit(X, y)
    assert np.array_equal(partial.predict_proba(X), full.predict_proba(X))


def test_a_node_of_twice_min_samples_leaf_rows_splits():
    """A node may split while it has 2 x min_samples_leaf rows: two rows of different classes
    make two leaves."""
    X, y = np.array([[0.0], [1.0]]), np.array([0, 1])
    forest = RandomForest(n_trees=12, seed=0).fit(X, y)
    both = np.array([len(set(np.random.default_rng([0, t]).integers(0, 2, 2).tolist())) == 2 for t in range(12)])
    assert 0 < both.sum() < 12
    assert list(forest.feature_[forest.roots_] == 0) == list(both)  # the trees that drew both rows split


def test_a_leaf_may_hold_exactly_min_samples_leaf_rows():
    """min_samples_leaf is a least, not a strict bound: a split that leaves exactly that many
    (distinct) rows on either side is made, whether the node's splits are found by sorting
    (few rows) or from histograms (many)."""
    for n in (100, 600):  # sorted, then dense: a root of 256 rows or more uses histograms
        drawn = set(np.random.default_rng([0, 0]).integers(0, n, n).tolist())  # tree 0's sample
        for few in (0, 1):  # the rare value on the left of the cut, then on the right
            x = np.where(np.arange(n) < 10, few, 1 - few).astype(np.float32)[:, None]
            rare = len(drawn & set(range(10)))
            forest = RandomForest(n_trees=1, min_samples_leaf=rare, seed=0).fit(x, np.arange(n) < 10)
            assert forest.feature_[0] == 0 and list(forest.threshold_[:1]) == [0.5], (n, few)
            assert list(forest.predict([[few], [1 - few]])) == [True, False]


def test_out_of_bag_ties_go_to_the_first_class_as_in_predict():
    """A row whose out-of-bag shares tie is judged the first class, as predict (argmax) judges
    it, so that oob_score_ estimates the accuracy of predict."""
    n = 40
    X, y = np.zeros((n, 1)), np.arange(n) >= n // 2  # no split possible: each tree is one leaf
    drawn = np.bincount(np.random.default_rng([0, 0]).integers(0, n, n), minlength=n)
    weights = {False: float(drawn[y].sum()), True: float(drawn[~y].sum())}  # equal class totals in the sample
    forest = RandomForest(n_trees=1, class_weight=weights, seed=0).fit(X, y)
    assert np.array_equal(forest.predict_proba(X[:1]), [[0.5, 0.5]]) and not forest.predict(X[:1])[0]
    unseen = drawn == 0
    assert forest.oob_score_ == (~y[unseen]).mean() != (y[unseen]).mean()


def test_pure_nodes_are_leaves():
    """A node of one class is not split further, however many values its rows hold."""
    X = np.arange(100, dtype=np.float32)[:, None]
    forest = RandomForest(n_trees=6, seed=0).fit(X, X[:, 0] >= 50)
    assert len(forest.feature_) == 3 * 6  # a root and two leaves a tree
    assert (forest.predict(X) == (X[:, 0] >= 50)).all()


def test_predictions_in_many_chunks_equal_those_row_by_row():
    """predict_proba routes a bounded number of (tree, row) pairs at a time: with many trees a
    batch is cut into chunks, the last one short, and must give each row its own probability."""
    X, y, _ = noisy(300, d=4, seed=2)
    small = RandomForest(n_trees=10, max_depth=2, seed=0).fit(X, y)
    copies, nodes = 100, len(small.feature_)  # the same 10 trees 100 times: 2097 rows a chunk
    many = RandomForest(n_trees=10 * copies)
    shift = np.repeat(np.arange(copies) * nodes, nodes)
    many.n_features_, many.classes_ = 4, small.classes_
    many.roots_ = np.concatenate([small.roots_ + k * nodes for k in range(copies)])
    many.feature_, many.threshold_, many.value_ = (np.tile(a, (copies,) + (1,) * (a.ndim - 1))
                                                   for a in (small.feature_, small.threshold_, small.value_))
    many.left_, many.right_ = (np.where(a >= 0, a + shift, -1) for a in (np.tile(small.left_, copies),
                                                                         np.tile(small.right_, copies)))
    rows = np.tile(X, (7, 1))  # 2100 rows: chunks of 2097 and 3
    # the mean is summed in float64: 1000 float32 shares summed in float32 drift by about 1e-6
    assert np.allclose(many.predict_proba(rows), small.predict_proba(rows), rtol=0, atol=1e-12)


def test_nan_and_infinite_values_are_refused():
    """NaN > threshold is False: a NaN would go left at every split without a word."""
    X, y, _ = noisy(100, seed=1)
    forest = RandomForest(n_trees=2, seed=0).fit(X, y)
    for bad in (np.nan, np.inf):
        Z = X.copy()
        Z[3, 1] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            RandomForest(n_trees=2).fit(Z, y)
        with pytest.raises(ValueError, match="NaN or infinite"):
            forest.predict_proba(Z)
    # and what was an AttributeError, a ZeroDivisionError, or a class named nan
    cases = [(lambda: RandomForest().predict(X), "not fitted"), (lambda: RandomForest().fit(X[:, :0], y), "a feature"),
             (lambda: RandomForest().fit(X, np.where(np.arange(100) == 7, np.nan, y)), "y holds NaN")]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_a_forest_whose_first_feature_is_constant_loads_and_a_file_gone_is_a_change(tmp_path):
    """A leaf's threshold comes from feature 0's first edge, inf where it has none: the check
    of a loaded forest refused what fit() wrote. And a corpus file gone since it was listed
    made files_identity a TypeError, where it is a change (rerun)."""
    X, y, _ = noisy(200, d=3, seed=3)
    X[:, 0] = 1
    forest = RandomForest(n_trees=5, n_jobs=1, seed=0).fit(X, y)
    forest.save(tmp_path / "f.npz")
    assert np.array_equal(RandomForest.load(tmp_path / "f.npz").predict_proba(X), forest.predict_proba(X))
    assert filter.files_identity([tmp_path / "gone.jsonl"]) == [[str(tmp_path / "gone.jsonl"), None, None]]


def test_forest_files_with_arrays_out_of_range_are_refused(tmp_path):
    """A file whose features, classes or roots do not fit the forest it describes is damaged:
    loading it must fail, not route rows through other rows' values later."""
    X, y, _ = noisy(200, d=4, seed=6)
    RandomForest(n_trees=3, seed=0).fit(X, y).save(tmp_path / "f.npz")
    with np.load(tmp_path / "f.npz") as data:
        good = dict(data)
    inner = int(np.flatnonzero(good["feature"] >= 0)[0])
    looped = good["left"].copy()
    looped[inner] = inner  # predict_proba walked this for ever: apply hung
    header = json.loads(good["header"].tobytes())
    damage = [("feature", lambda a: np.where(a >= 0, 4, a)), ("value", lambda a: np.c_[a, a[:, :1]]),
              ("roots", lambda a: np.r_[a, len(good["feature"])]),
              # written whole, but wrong: loaded, they predicted from other rows' nodes, NaN, or a traceback
              ("left", lambda a: looped), ("left", lambda a: np.where(a >= 0, -5, a)),
              ("roots", lambda a: np.r_[a[:1], -3, a[2:]]), ("feature", lambda a: np.where(a >= 0, -7, a)),
              ("value", lambda a: np.full_like(a, np.nan)), ("left", lambda a: a.astype(float)),
              ("threshold", lambda a: a[:, None]),
              ("header", lambda a: np.frombuffer(json.dumps({**header, "params": None}).encode(), np.uint8)),
              ("header", lambda a: np.frombuffer(json.dumps({k: v for k, v in header.items() if k != "info"}).encode(),
                                                 np.uint8)),
              ("header", lambda a: np.frombuffer(json.dumps({**header, "params": {**header["params"], "x": 1}}).encode(),
                                                 np.uint8)),
              ("header", lambda a: np.frombuffer(json.dumps({**header, "n_features": "four"}).encode(), np.uint8))]
    for name, change in damage:
        np.savez(tmp_path / "bad.npz", **dict(good, **{name: change(good[name])}))
        with pytest.raises(ValueError, match="damaged"):
            RandomForest.load(tmp_path / "bad.npz")


def test_top_threshold_is_the_highest_bin_edge_that_holds_the_fraction():
    """The documents at or above the threshold hold at least the fraction of the tokens, and
    the threshold is the highest bin edge for which that is true; a score of 1.0 is in the last bin."""
    scores = np.zeros(4, filter.SCORES)
    scores["score"], scores["tokens"] = [0.25, 0.5, 0.75, 1.0], [4, 2, 1, 1]
    assert filter.top_threshold(scores, 0.25) == 0.75  # exactly 2 of the 8 tokens score 0.75 or more
    assert filter.top_threshold(scores, 0.3) == 0.5
    assert filter.top_threshold(scores, 0.125) == 0.9999  # the document scoring 1.0
    assert filter.top_threshold(scores, 1.0) == 0.25
    assert filter.top_threshold(np.zeros(0, filter.SCORES), 0.5) == 0.0


def test_metrics_count_a_score_at_the_threshold_as_positive():
    """metrics, like apply, reads score >= threshold as the positive class."""
    m = filter.metrics([True, False, True, False], [0.5, 0.25, 0.75, 0.5])
    assert (m["precision"], m["recall"], m["accuracy"]) == (2 / 3, 1.0, 0.75)


def test_auc_is_the_share_of_positive_negative_pairs_ordered_ties_counting_half():
    rng = np.random.default_rng(0)
    positive, score = rng.random(40) < 0.3, rng.integers(0, 5, 40) / 4  # few values: many ties
    pairs = [(p > n) + 0.5 * (p == n) for p in score[positive] for n in score[~positive]]
    assert np.isclose(filter.auc(positive, score), np.mean(pairs))
    assert filter.auc([True, False, True, False], [0.9, 0.1, 0.5, 0.5]) == 3.5 / 4  # a tie: half a pair


def test_train_reads_max_features_as_a_number_or_a_fraction(tmp_path):
    """--max_features=3 is three features and --max_features=.25 a quarter of them."""
    forest = tmp_path / "forest.npz"
    for given, meant in (("3", 3), (".25", 0.25), ("0.75", 0.75), ("log2", "log2")):
        run_filter("train", *fake_embeddings(tmp_path, [1, 9] * 5), f"--max_features={given}", f"--forest={forest}")
        assert RandomForest.load(forest).max_features == meant


def test_apply_keeps_a_score_equal_to_the_threshold_and_selects_again_at_another(tmp_path, nano, capsys):
    """A document scoring exactly --threshold is kept (score >= threshold); a rerun with
    another --threshold selects again from the scores, at that threshold. A --top_fraction
    that ties keep far beyond says so."""
    docs = corpus(tmp_path / "docs.jsonl", 6, seed=6)
    forest = nano_forest(tmp_path, nano, score=0.25)
    out = tmp_path / "out"
    for threshold, kept in ((0.25, 6), (0.3, 0), (0.2, 6)):
        run_filter("apply", f"--corpus={docs}", f"--forest={forest}", f"--out={out}", f"--threshold={threshold}")
        summary = json.loads((out / "summary-00000-of-00001.json").read_text())
        assert (summary["threshold"], summary["kept_documents"]) == (threshold, kept)
        assert len((out / "kept-00000-of-00001.jsonl").read_text().splitlines()) == kept
    capsys.readouterr()
    run_filter("apply", f"--corpus={docs}", f"--forest={forest}", f"--out={out}", "--top_fraction=0.2")
    assert json.loads((out / "summary-00000-of-00001.json").read_text())["kept_documents"] == 6
    assert "note: --top_fraction=0.2 kept 100.0% of the tokens: 6 documents" in capsys.readouterr().err


def test_apply_never_reads_its_own_output_and_names_stale_shards(tmp_path, nano, capsys):
    """An --out among the --corpus files would overwrite the corpus, or feed each run the last
    one's kept documents (kept 30 of 60, then 60 of 90, ...): refused. Kept files of another
    --num_shards are named, since a glob of kept-*.jsonl takes them too. A corpus without a
    single document, or --batch_size below 1, is one line, not an empty shard marked done."""
    (tmp_path / "data").mkdir()
    docs, out = corpus(tmp_path / "data" / "docs.jsonl", 12, seed=3), tmp_path / "data" / "filtered"
    forest = f"--forest={nano_forest(tmp_path, nano)}"
    for size in (0, -2):
        with pytest.raises(UserError, match="^--batch_size must be at least 1"):
            run_filter("apply", f"--corpus={docs}", forest, f"--out={out}", f"--batch_size={size}")
    everything = f"--corpus={tmp_path / 'data' / '**' / '*.jsonl'}"
    run_filter("apply", everything, forest, f"--out={out}")
    kept = out / "kept-00000-of-00001.jsonl"
    before = kept.read_bytes()
    for args in ([everything], [f"--corpus={kept}", "--threshold=0.9"], [everything, "--num_shards=2"]):
        with pytest.raises(UserError, match=rf"^--corpus takes .*kept-00000-of-00001.jsonl, which apply writes in "
                                            rf"--out={re.escape(str(out))}: "):  # the folder given, not a file in it
            run_filter("apply", *args, forest, f"--out={out}")
    assert kept.read_bytes() == before

    capsys.readouterr()
    run_filter("apply", f"--corpus={docs}", forest, f"--out={out}", "--num_shards=2")
    assert re.search(r"^warning: .*filtered holds kept files of another --num_shards \(kept-00000-of-00001.jsonl\): "
                     r".*; keep each --num_shards in an --out of its own \(move those files to another folder\)$",
                     capsys.readouterr().err, re.M)

    other = tmp_path / "other.jsonl"
    other.write_text(lines(*(dict(id=i, content="def f():\n    pass\n") for i in range(3))))
    with pytest.raises(UserError, match=r"^no documents in .*other.jsonl$"):
        run_filter("apply", f"--corpus={other}", forest, f"--out={tmp_path / 'out'}")
    assert not list((tmp_path / "out").glob("summary-*"))


def test_a_shard_is_the_same_documents_on_any_number_of_processes(tmp_path, nano, monkeypatch, capsys):
    """Under torchrun each process was a shard of its own (N = --num_shards x processes): a
    machine of 2 processes running shard 0 of 2 filtered shards 0 and 1 of 4, one of 1 process
    shard 1 of 2, and the union kept some documents twice and never scored others (and the
    warning of stale shards had the user remove more). The shard's processes share its chunks."""
    docs, out = corpus(tmp_path / "docs.jsonl", 22, seed=6), tmp_path / "out"
    args = [f"--corpus={docs}", f"--forest={nano_forest(tmp_path, nano)}", "--num_shards=2", "--threshold=0",
            "--batch_size=1"]  # a document embedded alone scores the same wherever it is
    result = torchrun(tmp_path, "apply", *args, f"--out={out}", "--shard=0", setup="filter.CHUNK = 3")  # 4 chunks
    assert result.returncode == 0 and said(result.stderr) == [], result.stderr[-3000:]
    run_filter("apply", *args, f"--out={out}", "--shard=1")
    assert "warning" not in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("kept-*")) == ["kept-00000-of-00002.jsonl", "kept-00001-of-00002.jsonl"]
    kept = [json.loads(line) for path in sorted(out.glob("kept-*")) for line in path.read_text().splitlines()]
    assert sorted(r["id"] for r in kept) == sorted(f"docs-{i}" for i in range(22))
    run_filter("apply", *args, f"--out={tmp_path / 'alone'}", "--shard=0")  # on one process: the same scores
    alone = [json.loads(line) for line in (tmp_path / "alone" / "kept-00000-of-00002.jsonl").read_text().splitlines()]
    assert [(r["id"], r["score"]) for r in alone] == pytest.approx([(r["id"], r["score"]) for r in kept[:11]])
    monkeypatch.setattr(filter, "embed_texts", lambda *a, **k: pytest.fail("scored the shard again"))
    run_filter("apply", *args, f"--out={out}", "--shard=0")  # the shard torchrun filtered is done
    assert "shard 00000-of-00002 is done" in capsys.readouterr().out


def test_apply_scores_again_a_corpus_rewritten_to_the_same_size(tmp_path, nano):
    """Scores are kept by line: a corpus shuffled in place (its size unchanged) must be scored
    again, not have its old scores paired with other documents."""
    docs = corpus(tmp_path / "docs.jsonl", 20, seed=6)
    args = ["apply", f"--corpus={docs}", f"--forest={nano_forest(tmp_path, nano)}", f"--out={tmp_path / 'out'}",
            "--batch_size=1"]  # a document embedded alone scores the same wherever it is
    kept = tmp_path / "out" / "kept-00000-of-00001.jsonl"
    run_filter(*args, "--threshold=0")
    before = {r["id"]: r["score"] for r in map(json.loads, kept.read_text().splitlines())}
    assert len(before) == 20 and len(set(before.values())) > 1
    written = docs.stat().st_mtime_ns
    docs.write_text("".join(reversed(docs.read_text().splitlines(keepends=True))))
    os.utime(docs, ns=(written + 10**9, written + 10**9))  # a later write, however coarse the file system's clock
    run_filter(*args, "--top_fraction=1")
    assert {r["id"]: r["score"] for r in map(json.loads, kept.read_text().splitlines())} == pytest.approx(before)


def test_a_selection_killed_at_any_point_selects_again_from_the_scores(tmp_path, nano, monkeypatch):
    """Selecting again (another --threshold) keeps the shard's scores usable whenever it is
    killed: the next run never embeds the shard again, and never takes a kept file that its
    summary does not describe for done."""
    docs, out = corpus(tmp_path / "docs.jsonl", 20, seed=6), tmp_path / "out"
    args = ["apply", f"--corpus={docs}", f"--forest={nano_forest(tmp_path, nano)}", f"--out={out}"]
    run_filter(*args, "--threshold=0.5")
    expected = (out / "kept-00000-of-00001.jsonl").read_text()
    assert 0 < len(expected.splitlines()) < 20

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(filter, "embed_texts", lambda *a, **k: pytest.fail("embedded the shard again"))
    for point in ("documents", "write_atomic"):  # before the kept file is replaced, and after, before the summary
        with monkeypatch.context() as m:
            m.setattr(filter, point, killed)
            with pytest.raises(KeyboardInterrupt):
                run_filter(*args, "--threshold=0")
        run_filter(*args, "--threshold=0.5")
        assert (out / "kept-00000-of-00001.jsonl").read_text() == expected, point


def test_scores_whole_before_a_first_run_was_killed_are_used_again(tmp_path, nano, monkeypatch):
    """Only the summary said which scores were whole: a first run killed after scoring its
    shard, before writing the summary, left the rerun to embed the whole shard again."""
    docs, out = corpus(tmp_path / "docs.jsonl", 20, seed=6), tmp_path / "out"
    args = ["apply", f"--corpus={docs}", f"--forest={nano_forest(tmp_path, nano)}", f"--out={out}",
            "--top_fraction=0.5"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(filter, "top_threshold", killed)  # the scores are whole; nothing else is written
        with pytest.raises(KeyboardInterrupt):
            run_filter(*args)
    assert not (out / "summary-00000-of-00001.json").exists()
    monkeypatch.setattr(filter, "embed_texts", lambda *a, **k: pytest.fail("embedded the shard again"))
    run_filter(*args)
    assert json.loads((out / "summary-00000-of-00001.json").read_text())["documents"] == 20


def test_another_dtype_embeds_and_scores_anew(tmp_path, nano, capsys):
    """--dtype was no part of the fingerprints: embeddings made in float32 were taken for
    bfloat16 ones, and train's advice for NaN ones, to embed again with --dtype=float32, did
    nothing."""
    docs, emb, out = corpus(tmp_path / "docs.jsonl", 4, seed=3), tmp_path / "emb.npy", tmp_path / "out"
    embed = ["embed", f"--corpus={docs}", f"--ckpt={nano}", f"--embeddings={emb}"]
    run_filter(*embed, "--dtype=float32")
    run_filter(*embed, "--dtype=bfloat16")
    assert "already holds" not in capsys.readouterr().out
    assert json.loads(emb.with_suffix(".json").read_text())["source"]["dtype"] == "bfloat16"
    forest = RandomForest.load(nano_forest(tmp_path, nano))
    forest.info["embedding"]["dtype"] = "float32"  # as train records embed's source
    forest.save(tmp_path / "f32.npz")
    apply = ["apply", f"--corpus={docs}", f"--forest={tmp_path / 'f32.npz'}", f"--out={out}"]
    run_filter(*apply, "--dtype=float32")
    assert "note: the forest learned from" not in capsys.readouterr().err
    run_filter(*apply, "--dtype=bfloat16")
    captured = capsys.readouterr()
    assert "is done" not in captured.out
    assert "the forest learned from embeddings made in float32, and these are made in bfloat16" in captured.err
    assert json.loads((out / "summary-00000-of-00001.json").read_text())["dtype"] == "bfloat16"


def test_embeddings_that_overflow_are_one_line_naming_the_shard(tmp_path, nano, monkeypatch):
    docs = corpus(tmp_path / "docs.jsonl", 6, seed=3)
    real = filter.embed_texts

    def overflowing(*args, **kwargs):
        X, tokens = real(*args, **kwargs)
        X[1, 0], X[2, 5] = np.nan, np.inf
        return X, tokens

    monkeypatch.setattr(filter, "embed_texts", overflowing)
    with pytest.raises(UserError, match=r"^shard 1 of 2: 2 of its documents 0 to 2 embed to NaN or infinite "
                                        r"values \(--dtype=auto\): try --dtype=float32$"):
        run_filter("apply", f"--corpus={docs}", f"--forest={nano_forest(tmp_path, nano)}", f"--out={tmp_path}/out",
                   "--shard=1", "--num_shards=2")


def test_a_shard_of_blank_lines_is_empty_not_a_wrong_corpus(tmp_path, nano):
    """Shards take lines: a corpus with a blank line after each document gave shard 1 of 2
    blank lines only, which was refused as "no documents", under torchrun on every rerun."""
    docs = tmp_path / "docs.jsonl"
    records = corpus(tmp_path / "c.jsonl", 6, seed=3).read_text().splitlines()
    docs.write_text("".join(record + "\n\n" for record in records))
    forest = nano_forest(tmp_path, nano)
    for shard, documents in ((0, 6), (1, 0)):
        run_filter("apply", f"--corpus={docs}", f"--forest={forest}", f"--out={tmp_path / 'out'}",
                   f"--shard={shard}", "--num_shards=2")
        summary = json.loads((tmp_path / "out" / f"summary-{shard:05d}-of-00002.json").read_text())
        assert summary["documents"] == documents
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="^no documents in"):  # a corpus without any is still refused
        run_filter("apply", f"--corpus={tmp_path / 'blank.jsonl'}", f"--forest={forest}", f"--out={tmp_path / 'o2'}")


def test_top_fraction_keeps_what_the_histogram_counted_above_the_threshold(tmp_path, nano):
    """The histogram binned score x 10,000 in float32, which rounds 0.40969998 up into bin
    4097, while the selection compared the score with 0.4097: nothing was kept."""
    score = float(np.nextafter(np.float32(0.4097), np.float32(0)))
    docs, out = corpus(tmp_path / "docs.jsonl", 6, seed=3), tmp_path / "out"
    run_filter("apply", f"--corpus={docs}", f"--forest={nano_forest(tmp_path, nano, score=score)}", f"--out={out}",
               "--top_fraction=0.5")
    summary = json.loads((out / "summary-00000-of-00001.json").read_text())
    assert summary["threshold"] == 0.4096 and summary["kept_documents"] == 6


def test_decontaminate_compares_each_code_unit_of_a_document(tmp_path):
    """A markdown textbook's fenced code, a file with one Python 2 line elsewhere, and a copy
    inside a larger file are compared by their code: each is a copy of a problem (tau 1)."""
    problems, _ = evaluate.load_problems("humaneval")
    solution = {i: problems[f"HumanEval/{i}"]["prompt"] + problems[f"HumanEval/{i}"]["reference"] for i in (3, 4, 6)}
    renamed = ast.unparse(Rename().visit(ast.parse(solution[3])))
    textbook = f"# Balances\n\nA running total tells when it drops:\n\n```python\n{renamed}\n```\n\nThat is all.\n"
    helpers = "".join(f"\n\ndef helper_{k}(path):\n    with open(path) as f:\n        return [line.split()[{k}] "
                      f"for line in f if os.path.exists(path)]\n" for k in range(6))
    larger = "import os\n" + solution[4] + helpers  # its `from typing import List` comes with it
    python2 = solution[6] + "\n\ndef main():\n    print 'nested parens'\n"
    docs = [dict(id="textbook", text=textbook), dict(id="larger", text=larger), dict(id="python2", text=python2),
            dict(id="prose", text="Loops repeat things. ```python\nnot python\n```")]
    assert filter.code_tree(textbook) is None and filter.code_tree(python2) is None
    assert filter.ast_match_rate(filter.code_tree(larger), filter.code_tree(solution[4])) < 0.5
    (tmp_path / "docs.jsonl").write_text(lines(*docs))
    report = tmp_path / "report.json"
    run_filter("decontaminate", f"--corpus={tmp_path / 'docs.jsonl'}", "--bench=humaneval", "--workers=1",
               "--prune_tau=0.95", f"--out={tmp_path / 'pruned.jsonl'}", f"--report={report}")
    by_task = {r["task_id"]: r for r in json.loads(report.read_text())["by_problem"]}
    assert [(by_task[f"HumanEval/{i}"]["tau"], by_task[f"HumanEval/{i}"]["tau_document"]) for i in (3, 4, 6)] == \
        [(1.0, "textbook"), (1.0, "larger"), (1.0, "python2")]
    assert json.loads(report.read_text())["parsed"] == 3
    assert [json.loads(line)["id"] for line in (tmp_path / "pruned.jsonl").read_text().splitlines()] == ["prose"]


def test_a_copy_of_a_problem_with_a_helper_inside_a_larger_file_matches_it():
    """HumanEval/10's make_palindrome calls its is_palindrome: each definition was compared
    alone and the whole file diluted by the others, so a copy among other functions, or after
    a Python 2 line, scored 0.735 and was kept at --prune_tau=0.8 (25 problems have helpers)."""
    problems, _ = evaluate.load_problems("humaneval")
    solution = problems["HumanEval/10"]["prompt"] + problems["HumanEval/10"]["reference"]
    others = ("\n\ndef twice(xs):\n    return [x * 2 for x in xs if x % 3]\n\n\nclass Box:\n"
              "    def __init__(self, v):\n        self.v = v\n\n    def get(self):\n        return self.v\n")
    problem = filter.code_tree(solution)
    for text in (solution + others, "print 'python 2'\n" + solution):
        assert max(filter.ast_match_rate(unit, problem) for unit in filter.code_units(text)) == 1.0



def test_code_units_of_a_long_chain_of_calls_stay_linear(monkeypatch):
    """Each definition is compared with its helpers, and along a chain (f0 calls f1 calls f2
    ...) those were the rest of the file: 1000 functions built 9.5M nodes, 28 s for one
    document. Helpers past max_nodes (the largest problem / min_tau) cannot reach the tau
    asked for and are left out, while a problem's copy inside the file still matches."""
    problems, _ = evaluate.load_problems("humaneval")
    solution = problems["HumanEval/10"]["prompt"] + problems["HumanEval/10"]["reference"]
    chain = "".join(f"\n\ndef f{i}(x):\n    y = x + {i}\n    return f{i + 1}(y) if y < 100 else y\n"
                    for i in range(300))
    text = solution + chain
    document_nodes, problem = len(filter.code_tree(text)[0]), filter.code_tree(solution)
    built = []
    tree_of = filter.tree_of
    monkeypatch.setattr(filter, "tree_of", lambda root, *walked: built.append(tree_of(root, *walked)) or built[-1])
    units = filter.code_units(text, max_nodes=len(problem[0]) / 0.8 + 1)
    assert max(filter.ast_match_rate(unit, problem) for unit in units) == 1.0
    # the whole, each definition alone and with helpers of at most max_nodes: it was 150 times
    assert sum(len(tree[0]) for tree in built) < 8 * document_nodes
    # a name defined twice (the first one's helpers are found by name too): a KeyError ended the run
    assert filter.code_units("def f():\n    return 1\n\ndef f():\n    return g()\n\ndef g():\n    return 2\n")


def test_decontaminate_forks_no_more_processes_than_cores(tmp_path, monkeypatch):
    """--workers=100000 forked a pool of 100000 processes."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text(lines(dict(id="own", text=LESSON.format(name="scale"))))
    asked = []
    real_pool = multiprocessing.get_context("fork").Pool

    class Context:
        def Pool(self, jobs, *args):
            asked.append(jobs)
            return real_pool(1, *args)
    monkeypatch.setattr(filter.multiprocessing, "get_context", lambda how: Context())
    run_filter("decontaminate", f"--corpus={docs}", "--bench=humaneval", "--workers=100000",
               f"--report={tmp_path / 'report.json'}")
    assert asked in ([], [len(os.sched_getaffinity(0))]) and (tmp_path / "report.json").is_file()


def test_decontaminate_counts_at_a_min_tau_above_the_papers(tmp_path):
    """A --min_tau above the paper's taus is a row of its own, not an empty report."""
    problems, _ = evaluate.load_problems("humaneval")
    docs = tmp_path / "docs.jsonl"
    copy = problems["HumanEval/0"]["prompt"] + problems["HumanEval/0"]["reference"]
    docs.write_text(lines(dict(id="copy", text=copy), dict(id="own", text=LESSON.format(name="scale"))))
    report = tmp_path / "report.json"
    run_filter("decontaminate", f"--corpus={docs}", "--bench=humaneval", "--workers=1", "--min_tau=0.97",
               f"--report={report}")
    found = json.loads(report.read_text())
    assert found["documents_by_tau"] == {"0.97": 1} and found["problems_by_tau"] == {"0.97": 1}


def add_problem(tmp_path: Path) -> tuple[Path, str]:
    """An MBPP file of one problem, add(a, b), and its text as decontaminate reads it."""
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text(lines(dict(task_id=12, text="Write a function to add two numbers.",
                               code="def add(a, b):\n    return a + b\n", test_list=["assert add(1, 2) == 3"],
                               test_setup_code="")))
    problem = evaluate.load_problems("mbpp", str(mbpp))[0]["MBPP/12"]
    return mbpp, problem["prompt"] + problem["reference"]


def decontaminate_add(tmp_path: Path, docs: list[str], *args) -> dict:
    """decontaminate's report on docs, named doc-0, doc-1, ..., against add_problem."""
    mbpp, _ = add_problem(tmp_path)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(lines(*(dict(id=f"doc-{i}", text=text) for i, text in enumerate(docs))))
    run_filter("decontaminate", f"--corpus={corpus}", "--bench=mbpp", f"--mbpp={mbpp}", "--workers=1",
               f"--report={tmp_path / 'r.json'}", *args)
    return json.loads((tmp_path / "r.json").read_text())


def test_ngrams_are_every_13_words_in_any_case():
    words = [f"w{i}" for i in range(13)]
    assert len(filter.ngrams(" ".join(words))) == 1 and filter.ngrams(" ".join(words[:12])) == set()
    assert len(filter.ngrams(" ".join(words + ["w13"]))) == 2
    assert filter.ngrams(" ".join(words).upper()) == filter.ngrams(" ".join(words))


def test_a_document_sharing_only_a_problems_last_13_words_in_capitals_is_counted(tmp_path):
    """The last 13-gram of a problem and of a document was never formed, and capitals hid a copy."""
    last = re.findall(r"\w+", add_problem(tmp_path)[1])[-13:]
    report = decontaminate_add(tmp_path, ["Loops repeat things: " + " ".join(last).upper() + "."])
    assert report["by_problem"][0]["ngram_documents"] == 1 and report["documents_with_13gram_overlap"] == 1


def test_a_document_whose_tau_is_exactly_min_tau_is_close(tmp_path):
    extra_argument = "def add(x, y, z):\n    return x + y\n"  # 1 edit in 10 nodes
    tau = filter.ast_match_rate(filter.code_tree(extra_argument), filter.code_tree(add_problem(tmp_path)[1]))
    assert tau == 0.9
    report = decontaminate_add(tmp_path, [extra_argument], "--min_tau=0.9")
    assert report["by_problem"][0]["tau"] == 0.9 and report["documents_by_tau"]["0.9"] == 1


def test_of_documents_equally_close_to_a_problem_the_first_is_named(tmp_path):
    """On a tie, the report named the last of them."""
    copies = ["def add(x, y):\n    return x + y\n", "def plus(p, q):\n    return p + q\n"]
    row = decontaminate_add(tmp_path, copies)["by_problem"][0]
    assert (row["tau"], row["tau_document"]) == (1.0, "doc-0")


def test_results_are_named_by_the_end_of_their_paths_that_tells_them_apart():
    names = filter.result_names
    assert names([Path("out/humaneval/results.jsonl")]) == ["humaneval"]
    assert names([Path("runs/a/humaneval/results.jsonl"), Path("runs/b/humaneval/results.jsonl")]) == \
        ["a/humaneval", "b/humaneval"]
    assert names([Path("out/humaneval/first.jsonl"), Path("out/humaneval/second.jsonl")]) == \
        ["first.jsonl", "second.jsonl"]


def test_documents_of_one_id_in_two_files_never_pair_one_score_with_the_other_text(tmp_path, nano, capsys):
    """Two synth.py outputs of one --seed share their ids: annotate scored both documents of an id,
    embed kept the first's text and train the last's score."""
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    kinds = [("lesson", "dump") if i % 2 else ("dump", "lesson") for i in range(12)]
    for path, k in ((first, 0), (second, 1)):
        path.write_text(lines(*(dict(id=f"textbook-1337-{i}", text=LESSON.format(name=f"scale_{i}")
                                     if kinds[i][k] == "lesson" else f"LIMIT_{i} = {i}") for i in range(12))))
    labels, emb, alone = tmp_path / "labels.jsonl", tmp_path / "emb.npy", tmp_path / "alone.npy"
    with FakeLLM(answer=teacher) as server:
        run_filter("annotate", f"--corpus={first},{second}", "--n=24", f"--labels={labels}",
                   f"--api_base={server.url}", "--model=fake")
        assert len(server.served) == 12
    assert "12 repeated id" in capsys.readouterr().err
    assert sorted(r["text"] for r in annotated(labels)) == sorted(r["text"] for r in annotated(first))
    run_filter("embed", f"--corpus={first},{second}", f"--ckpt={nano}", f"--embeddings={emb}")
    run_filter("embed", f"--corpus={first}", f"--ckpt={nano}", f"--embeddings={alone}")
    ids, array, _ = filter.load_embeddings(emb)
    assert np.array_equal(array, filter.load_embeddings(alone)[1])  # the first file's texts
    scores = filter.read_scores(labels)[0]
    assert [scores[doc_id] for doc_id in ids] == [9 if kinds[i][0] == "lesson" else 1 for i in range(12)]


def test_scores_of_an_id_with_two_texts_are_left_out(tmp_path, capsys):
    """Labels an older annotate wrote for a repeated id: which text embed takes is not the score's."""
    labels = tmp_path / "labels.jsonl"
    labels.write_text(lines(dict(id="a", score=None, text="x = 1"), dict(id="a", score=9, text="def f(): ..."),
                            dict(id="b", score=None, text="y"), dict(id="b", score=1, text="y")))
    assert filter.read_scores(labels)[0] == {"b": 1}
    assert "1 ids of" in capsys.readouterr().err


def test_train_pairs_a_score_only_with_an_embedding_of_the_text_scored(tmp_path, nano, capsys):
    """Scores and embeddings were paired by id alone: embeddings of a corpus made again, other
    texts under the same ids, taught the forest the reverse of the teacher (held-out AUC 1.0)."""
    docs, labels, emb = corpus(tmp_path / "docs.jsonl", 20, seed=7), tmp_path / "labels.jsonl", tmp_path / "emb.npy"
    with FakeLLM(answer=teacher) as server:
        run_filter("annotate", f"--corpus={docs}", "--n=20", f"--labels={labels}", f"--api_base={server.url}",
                   "--model=fake")
    train = ["train", f"--labels={labels}", f"--embeddings={emb}", f"--forest={tmp_path / 'f.npz'}", "--n_trees=3",
             "--workers=1"]
    run_filter("embed", f"--corpus={docs}", f"--ckpt={nano}", f"--embeddings={emb}")
    capsys.readouterr()
    run_filter(*train)  # the texts the labels hold are those embed read from the corpus
    assert "another text" not in capsys.readouterr().err

    rows = annotated(docs)
    edited = [dict(r, text=r["text"] + "\n") if i == 0 else r for i, r in enumerate(rows)]  # 1 of 20
    made_again = [dict(r, text=rows[(i + 1) % 20]["text"]) for i, r in enumerate(rows)]  # the ids of other texts
    for changed, embedded in ((edited, 19), (made_again, None)):
        docs.write_text(lines(*changed))
        run_filter("embed", f"--corpus={docs}", f"--ckpt={nano}", f"--embeddings={emb}")
        if embedded is None:
            with pytest.raises(UserError, match=r"^20 of the 20 documents scored in .* have another text in"):
                run_filter(*train)
        else:
            run_filter(*train)
            assert "1 of the 20 documents scored" in capsys.readouterr().err
            assert RandomForest.load(tmp_path / "f.npz").info["report"]["documents"] == embedded

    sidecar = emb.with_suffix(".json")  # an older filter.py's: no digests, and train cannot tell
    sidecar.write_text(json.dumps({k: v for k, v in json.loads(sidecar.read_text()).items() if k != "digests"}))
    run_filter(*train)
    assert "kept no digests of its texts" in capsys.readouterr().err
    run_filter("embed", f"--corpus={docs}", f"--ckpt={nano}", f"--embeddings={emb}")  # adds them, embedding nothing
    with pytest.raises(UserError, match=r"^20 of the 20 documents"):
        run_filter(*train)


def test_one_run_at_a_time_annotates_embeds_filters_a_shard_or_decontaminates(tmp_path, nano, capsys):
    """Two annotate runs on one --labels each asked for every document (and paid twice)."""
    import fcntl
    docs, labels = corpus(tmp_path / "docs.jsonl", 6, seed=3), tmp_path / "labels.jsonl"
    emb, out = tmp_path / "emb.npy", tmp_path / "out"
    forest = nano_forest(tmp_path, nano)
    labels.write_text(lines(dict(id="docs-0", score=9, model="gpt-4")))
    with FakeLLM(answer=teacher) as server:
        teach = ["annotate", f"--corpus={docs}", f"--labels={labels}", f"--api_base={server.url}", "--model=fake"]
        for held, message, command in (
                (labels, f"another run is annotating into {labels}", teach),
                (Path(f"{emb}.lock"), f"another run is embedding into {emb}",
                 ["embed", f"--corpus={docs}", f"--ckpt={nano}", f"--embeddings={emb}"]),
                (out / "00000-of-00001.lock", f"another run is filtering shard 00000-of-00001 in {out}",
                 ["apply", f"--corpus={docs}", f"--forest={forest}", f"--out={out}"]),
                (tmp_path / "r.json.lock", f"another run is writing {tmp_path / 'r.json'}",
                 ["decontaminate", f"--corpus={docs}", "--bench=humaneval", f"--report={tmp_path / 'r.json'}"])):
            held.parent.mkdir(exist_ok=True)
            with open(held, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)  # another run's lock
                with pytest.raises(UserError, match=f"^{re.escape(message)}: wait for it"):
                    run_filter(*command)
        assert server.served == []
        run_filter(*teach)
        assert len(server.served) == 5  # docs-0 was scored before, by another teacher
    assert "resuming with another teacher than" in capsys.readouterr().err


def test_a_run_starting_as_another_ends_neither_undoes_nor_redoes_its_work(tmp_path, nano, monkeypatch, capsys):
    """The lock was the .partial file that the end renames: a run starting just after the
    rename locked a new .partial, deleted the embeddings just made and made them again
    (and one whose check came just before the other's end did the same)."""
    docs, emb, out = corpus(tmp_path / "docs.jsonl", 6, seed=3), tmp_path / "emb.npy", tmp_path / "out"
    commands = (["embed", f"--corpus={docs}", f"--ckpt={nano}", f"--embeddings={emb}"],
                ["apply", f"--corpus={docs}", f"--forest={nano_forest(tmp_path, nano)}", f"--out={out}"])
    real_replace, real_lock, real_embed = os.replace, filter.run_lock, filter.embed_texts
    # (embed's description is written before the rename: a run starting after it finds the embeddings whole)
    for command, output, busy, done in zip(commands, (emb, out), (None, "another run is filtering shard"),
                                           (f"{emb} already holds these embeddings", "shard 00000-of-00001 is done")):
        def start_another_as_the_first_renames(src, dst):
            real_replace(src, dst)
            if str(src).endswith(".partial") and not started:
                started.append(1)
                if busy is None:
                    capsys.readouterr()
                    run_filter(*command)
                    assert done in capsys.readouterr().out
                else:
                    with pytest.raises(UserError, match=busy):  # the first is still at work
                        run_filter(*command)

        started = []
        monkeypatch.setattr(filter.os, "replace", start_another_as_the_first_renames)
        run_filter(*command)
        assert started
        monkeypatch.setattr(filter.os, "replace", real_replace)
        first = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

        def finish_another_before_the_lock(*a, **k):
            if not started:
                started.append(1)
                run_filter(*command)  # (the same again: it finds its work done)
                embedded.clear()
                capsys.readouterr()
            return real_lock(*a, **k)

        monkeypatch.setattr(filter, "run_lock", finish_another_before_the_lock)
        embedded = []
        monkeypatch.setattr(filter, "embed_texts", lambda *a, **k: embedded.append(1) or real_embed(*a, **k))
        (shutil.rmtree if output.is_dir() else Path.unlink)(output)  # as if not done when the second run looked
        started = []
        run_filter(*command)
        assert done in capsys.readouterr().out and embedded == []
        assert {p.name for p in tmp_path.rglob("*") if p.is_file()} == set(first)
        monkeypatch.setattr(filter, "run_lock", real_lock)
        monkeypatch.setattr(filter, "embed_texts", real_embed)


def test_train_says_how_many_scored_documents_lack_an_embedding(tmp_path, capsys):
    settings = fake_embeddings(tmp_path, [1, 9] * 3)
    with (tmp_path / "labels.jsonl").open("a") as f:
        f.write(lines(*(dict(id=f"later-{i}", score=9) for i in range(4))))
    run_filter("train", *settings, f"--forest={tmp_path / 'forest.npz'}")
    assert "4 of the 10 documents scored in" in capsys.readouterr().err


# ---------------------------------------------------------------- a full disk, signals, odd files

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullDisk(io.FileIO):
    """A file on a disk with room for `room` bytes more: a write past them fails, as on a full disk."""

    def __init__(self, path, mode, room=0):
        super().__init__(path, mode)
        self.room = room

    def write(self, data):
        if not self.room:
            no_space()
        written = super().write(bytes(data)[:self.room])
        self.room -= written
        return written


def on_a_full_disk(path, mode="r", encoding=None, **kwargs):
    """open() as filter.py calls it, with the .partial files written on a full disk, buffered
    as open's are (the write that fails may be the close's flush)."""
    if not (str(path).endswith(".partial") and ("w" in mode or "+" in mode)):
        return open(path, mode, encoding=encoding, **kwargs)
    f = io.BufferedWriter(FullDisk(path, mode.replace("b", "")))
    return f if "b" in mode else io.TextIOWrapper(f, encoding=encoding)


def test_a_full_disk_annotating_or_comparing_is_one_line_and_a_rerun_goes_on(tmp_path, monkeypatch):
    """The labels and decontaminate's progress on a full disk were a traceback, and the close
    of the file, which tries the rest of the line again, a second one."""
    docs, labels = tmp_path / "docs.jsonl", tmp_path / "labels.jsonl"
    docs.write_text(lines(*(dict(id=f"docs-{i}", text=f"LIMIT_{i} = {i}") for i in range(6))))
    real_open, room = filter.Appender.open, iter([200, 0])  # the labels: a line and a torn one; the progress: none

    def full(self):
        real_open(self).close()  # (what it makes whole first, while the disk had room)
        return io.BufferedWriter(FullDisk(self.path, "a", next(room)))

    monkeypatch.setattr(filter.Appender, "open", full)
    with FakeLLM(answer=teacher) as server:
        teach = ["annotate", f"--corpus={docs}", f"--labels={labels}", f"--api_base={server.url}", "--model=fake",
                 "--concurrency=1"]
        with pytest.raises(UserError, match=rf"^cannot write {re.escape(str(labels))}: No space left on device"):
            run_filter(*teach)
        report = tmp_path / "r.json"
        with pytest.raises(UserError, match=rf"^cannot write {re.escape(str(report))}.partial: No space left"):
            run_filter("decontaminate", f"--corpus={docs}", "--bench=humaneval", "--workers=1", f"--report={report}")
        monkeypatch.undo()
        written = labels.read_text()
        assert written.count("\n") == 1 and not written.endswith("\n")  # a line, and a torn one
        run_filter(*teach)
    assert sorted(r["id"] for r in annotated(labels)) == [f"docs-{i}" for i in range(6)]


def test_a_full_disk_embedding_is_one_line_and_a_rerun_goes_on(tmp_path, nano, monkeypatch):
    """The array and its chunk flags, written before the work, were a traceback on a full disk.
    A memory map's write that the disk has no room for is a crash (SIGBUS): the array's space
    is taken before the work, and a disk without it is the same one line."""
    docs, emb = corpus(tmp_path / "docs.jsonl", 6, seed=3), tmp_path / "emb.npy"
    args = ["embed", f"--corpus={docs}", f"--ckpt={nano}", f"--embeddings={emb}"]
    real_open_memmap, full = np.lib.format.open_memmap, rf"^cannot write {re.escape(str(emb))}: No space left"
    with monkeypatch.context() as m:  # no room for a new array
        m.setattr(np.lib.format, "open_memmap",
                  lambda *a, mode="r+", **k: no_space() if mode == "w+" else real_open_memmap(*a, mode=mode, **k))
        with pytest.raises(UserError, match=full):
            run_filter(*args)
    with monkeypatch.context() as m:  # room for its header, not for its contents
        m.setattr(filter.os, "posix_fallocate", no_space)
        with pytest.raises(UserError, match=full):
            run_filter(*args)
    assert not emb.exists() and Path(f"{emb}.partial").exists()
    run_filter(*args)
    assert filter.load_embeddings(emb)[1].shape == (6, 64)


def test_a_full_disk_filtering_is_one_line_and_a_rerun_goes_on(tmp_path, nano, monkeypatch):
    """The scores and the kept documents on a full disk were a traceback (the close's flush
    of what a failed write left, a second one). A rerun selects again from scores whole."""
    docs, out = corpus(tmp_path / "docs.jsonl", 6, seed=3), tmp_path / "out"
    args = ["apply", f"--corpus={docs}", f"--forest={nano_forest(tmp_path, nano)}", f"--out={out}"]
    with monkeypatch.context() as m:
        m.setattr(filter, "open", on_a_full_disk, raising=False)
        with pytest.raises(UserError, match=rf"^cannot write {re.escape(str(out))}/scores-00000-of-00001.bin: No sp"):
            run_filter(*args)
    run_filter(*args)
    with monkeypatch.context() as m:
        m.setattr(filter, "open", on_a_full_disk, raising=False)
        with pytest.raises(UserError, match=rf"^cannot write {re.escape(str(out))}/kept-00000-of-00001.jsonl: No sp"):
            run_filter(*args, "--threshold=0")
    monkeypatch.setattr(filter, "embed_texts", lambda *a, **k: pytest.fail("embedded the shard again"))
    run_filter(*args, "--threshold=0")
    assert json.loads((out / "summary-00000-of-00001.json").read_text())["kept_documents"] == 6


def test_a_signal_while_torch_is_imported_is_the_usual_interrupted_line(tmp_path):
    """A Ctrl-C in the first second, as torch was imported, was two tracebacks: the cleanup
    imported torch.distributed, which torch's import had finished, into a torch cut short."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text(lines(dict(id="a", text="x = 1")))
    stop = textwrap.dedent(f"""
        import importlib.abc, sys
        class Stop(importlib.abc.MetaPathFinder):  # Ctrl-C at the first import after torch.distributed's
            def find_spec(self, name, path, target=None):
                done = sys.modules.get("torch.distributed")
                if done is not None and not done.__spec__._initializing:
                    sys.meta_path.remove(self)
                    raise KeyboardInterrupt
        sys.meta_path.insert(0, Stop())
        import config, filter
        config.run(lambda: filter.main(["embed", "--corpus={docs}", "--ckpt=x"]))
    """)
    result = subprocess.run([sys.executable, "-c", stop], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130 and result.stderr == "interrupted\n", result.stderr[-3000:]


@pytest.mark.parametrize("setting", ["--seed=-1", "--workers=-1"])
def test_a_bad_seed_or_workers_is_said_by_process_0_alone(monkeypatch, setting):
    """Under torchrun every process printed "error: --seed must be ..." (README: process 0 says it)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(config.time, "sleep", lambda seconds: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as stopped:  # waited, silent, for torchrun's SIGTERM (here, at once)
        filter.main(["apply", setting])
    assert stopped.value.code == 2


def test_descriptions_that_are_json_but_no_object_are_stale_or_one_line(tmp_path, nano):
    """An emb.json or summary holding a list, null or a string was an AttributeError traceback."""
    docs, emb, out = corpus(tmp_path / "docs.jsonl", 6, seed=3), tmp_path / "emb.npy", tmp_path / "out"
    labels = tmp_path / "labels.jsonl"
    labels.write_text(lines(*(dict(id=f"docs-{i}", score=9 * (i % 2)) for i in range(6))))
    embed = ["embed", f"--corpus={docs}", f"--ckpt={nano}", f"--embeddings={emb}"]
    apply = ["apply", f"--corpus={docs}", f"--forest={nano_forest(tmp_path, nano)}", f"--out={out}"]
    run_filter(*embed)
    run_filter(*apply)
    summary = out / "summary-00000-of-00001.json"
    for odd in ("[]", "null", '"done"'):
        emb.with_suffix(".json").write_text(odd)
        with pytest.raises(UserError, match=r"emb.npy: its description .*emb.json is missing or broken"):
            run_filter("train", f"--labels={labels}", f"--embeddings={emb}", f"--forest={tmp_path / 'f.npz'}")
        run_filter(*embed)  # embeds again
        assert filter.load_embeddings(emb)[1].shape == (6, 64)
        summary.write_text(odd)
        run_filter(*apply)  # selects again
        assert json.loads(summary.read_text())["documents"] == 6


def test_paths_in_a_symlink_loop_are_one_line(tmp_path, nano):
    """same_file raised RuntimeError (Symlink loop) for a path through a loop, and a folder
    to make there was a FileExistsError traceback."""
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    loop = tmp_path / "loop1"
    assert filter.same_file(loop, loop) and filter.same_file(loop, tmp_path / "." / "loop1")
    assert not filter.same_file(loop, tmp_path / "loop2") and not filter.same_file(loop / "x", tmp_path / "x")
    docs = corpus(tmp_path / "docs.jsonl", 4, seed=3)
    with pytest.raises(UserError, match=rf"^cannot load --ckpt={re.escape(str(loop))}: no such checkpoint"):
        run_filter("embed", f"--corpus={docs}", f"--ckpt={loop}", f"--embeddings={tmp_path / 'emb.npy'}")
    with pytest.raises(UserError, match=rf"^cannot write {re.escape(str(loop))}/kept-00000-of-00001.jsonl: "):
        run_filter("apply", f"--corpus={docs}", f"--forest={nano_forest(tmp_path, nano)}", f"--out={loop}")
    for report in (loop / "r.json", loop / "sub" / "r.json"):
        with pytest.raises(UserError, match=rf"^cannot write {re.escape(str(report))}: "):
            run_filter("decontaminate", f"--corpus={docs}", "--bench=humaneval", f"--report={report}")


def test_apply_notes_a_model_other_than_the_one_the_forest_learned_from(tmp_path, nano, capsys):
    """The forest kept the model's path only: a checkpoint replaced there (train.py resumed
    into its folder), or a --ckpt of the same width, scored with other weights without a word."""
    ckpt, same = tmp_path / "ckpt.pt", tmp_path / "same.pt"
    shutil.copy(nano, ckpt)
    shutil.copy(nano, same)
    docs, emb, forest = corpus(tmp_path / "docs.jsonl", 8, seed=3), tmp_path / "emb.npy", tmp_path / "forest.npz"
    labels = tmp_path / "labels.jsonl"
    labels.write_text(lines(*(dict(id=f"docs-{i}", score=9 * (i % 2)) for i in range(8))))
    run_filter("embed", f"--corpus={docs}", f"--ckpt={ckpt}", f"--embeddings={emb}")
    run_filter("train", f"--labels={labels}", f"--embeddings={emb}", f"--forest={forest}", "--n_trees=3",
               "--holdout=0", "--workers=1")
    assert RandomForest.load(forest).info["embedding"]["model"] == filter.content_identity(str(ckpt))
    apply = ["apply", f"--corpus={docs}", f"--out={tmp_path / 'out'}"]
    other = "holds other weights than those the forest learned from"
    capsys.readouterr()
    run_filter(*apply, f"--forest={forest}")
    run_filter(*apply, f"--forest={forest}", f"--ckpt={same}")  # the same weights by another name
    run_filter(*apply, f"--forest={nano_forest(tmp_path, nano)}")  # a forest of before: it kept no contents
    assert other not in capsys.readouterr().err
    torch.manual_seed(1)
    model = GPT(PRESETS["nano"])
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.config)}, ckpt)  # replaced
    for given in ([], [f"--ckpt={ckpt}"]):
        run_filter(*apply, f"--forest={forest}", *given)
        assert f"note: {ckpt} {other} ({ckpt} as embed found it): its scores" in capsys.readouterr().err


def test_scores_that_are_not_a_number_from_0_to_10_are_refused(tmp_path):
    """NaN, inf, 1e30 and negative scores were labels (NaN >= 6 is False: a negative; inf a
    positive), and a string score left out without a word."""
    forest = tmp_path / "f.npz"
    with pytest.raises(UserError, match=r"labels.jsonl has 6 malformed lines \(lines 1, 3, 5, 7, 9, \.\.\.\): a "
                                        r"score is a number from 0 to 10, or null for none, not NaN \(line 1\)$"):
        run_filter("train", *fake_embeddings(tmp_path, [float("nan"), 9, float("inf"), 1, 1e30, 9, -1, 1, "9", 1,
                                                         True, None, 6.5]), f"--forest={forest}")
    assert not forest.exists()
    run_filter("train", *fake_embeddings(tmp_path, [1, 9, None, 6.5, 0, 10]), f"--forest={forest}")
    assert RandomForest.load(forest).info["report"]["documents"] == 5
