"""filter.py's RandomForest beside scikit-learn's RandomForestClassifier, in one run.

Both get the same data, the same hyperparameters (trees, max_features, depth and leaf
limits) and the same cores; the table shows test accuracy and AUC (macro one-vs-rest
for several classes) and fit and predict times side by side. Datasets: those that ship
with scikit-learn (small ones: the mean over --splits random 75/25 splits) and
--rows x --dims synthetic "embeddings": low-rank Gaussian vectors plus noise, labelled
by a noisy nonlinear function of a few directions. Targets: accuracy within 1 point of
scikit-learn's, fit time at most 2x. scikit-learn is needed here only (pip install
scikit-learn); it is no dependency of filter.py.

    python bench/forest_speed.py
    python bench/forest_speed.py --n_trees=50 --rows=20000 --jobs=8
"""

import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from config import UserError, parse_settings, require, run  # noqa: E402
from filter import RandomForest, auc  # noqa: E402

DEFAULTS = dict(
    n_trees=100,  # trees in each forest
    max_features="sqrt",  # features tried per split, as both libraries spell it
    max_depth=0,  # depth limit (0: none)
    min_samples_leaf=1,  # rows per leaf at least
    jobs=0,  # processes (ours) and threads (scikit-learn's) (0: every core we may use)
    splits=5,  # random train/test splits of each small dataset, averaged
    rows=100_000,  # rows of the synthetic embeddings (0: leave them out)
    dims=256,  # their width
    seed=0,  # the synthetic data and the train/test splits
)


def embeddings(rows: int, dims: int, seed: int):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows, 16))
    X = (z @ rng.standard_normal((16, dims)) / 4 + 0.5 * rng.standard_normal((rows, dims))).astype(np.float32)
    logit = 1.5 * z[:, 0] + z[:, 1] * z[:, 2] - 0.5 * z[:, 3] ** 2 + 0.5
    return X, (rng.random(rows) < 1 / (1 + np.exp(-2 * logit))).astype(int)


def macro_auc(y, proba) -> float:
    if proba.shape[1] == 2:
        return auc(y == 1, proba[:, 1])
    return float(np.mean([auc(y == c, proba[:, c]) for c in range(proba.shape[1])]))


def measure(make, X, y, train, test) -> tuple[float, float, float, float]:
    """(accuracy, AUC, fit seconds, predict seconds) of a fresh model."""
    model = make()
    t0 = time.perf_counter()
    model.fit(X[train], y[train])
    t1 = time.perf_counter()
    proba = model.predict_proba(X[test])
    t2 = time.perf_counter()
    return float((proba.argmax(1) == y[test]).mean()), macro_auc(y[test], proba), t1 - t0, t2 - t1


def main():
    cfg = parse_settings(DEFAULTS, __doc__)
    require(*[(getattr(cfg, key) > 0, f"--{key} must be positive, not {getattr(cfg, key)}")
              for key in ("n_trees", "min_samples_leaf", "splits", "dims")],
            *[(getattr(cfg, key) >= 0, f"--{key} must not be negative, not {getattr(cfg, key)}")
              for key in ("max_depth", "jobs", "rows", "seed")],
            # a quarter of them is the test set, which a few rows would leave empty or of one class
            (cfg.rows == 0 or cfg.rows >= 100, f"--rows must be 0 (no embeddings) or at least 100, not {cfg.rows}"))
    try:
        max_features = cfg.max_features if cfg.max_features in ("sqrt", "log2") else (
            float(cfg.max_features) if "." in cfg.max_features else int(cfg.max_features))
    except ValueError:
        max_features = None
    require((max_features in ("sqrt", "log2") or (type(max_features) is int and max_features > 0)
             or (type(max_features) is float and 0 < max_features <= 1),
             f"--max_features takes sqrt, log2, a positive count or a fraction up to 1.0, not {cfg.max_features!r}"))
    try:
        from sklearn import datasets
        from sklearn.ensemble import RandomForestClassifier
    except ImportError:
        raise UserError("this benchmark compares with scikit-learn: pip install scikit-learn") from None
    jobs = cfg.jobs or len(os.sched_getaffinity(0))
    depth = cfg.max_depth or None

    def ours(seed):
        return lambda: RandomForest(n_trees=cfg.n_trees, max_depth=depth, max_features=max_features,
                                    min_samples_leaf=cfg.min_samples_leaf, seed=seed, n_jobs=jobs)

    def theirs(seed):
        return lambda: RandomForestClassifier(n_estimators=cfg.n_trees, max_depth=depth, max_features=max_features,
                                              min_samples_leaf=cfg.min_samples_leaf, random_state=seed, n_jobs=jobs)

    data = [(name, *getattr(datasets, f"load_{name}")(return_X_y=True), cfg.splits)
            for name in ("breast_cancer", "digits", "wine", "iris")]
    X, y = datasets.make_classification(n_samples=20_000, n_features=40, n_informative=12, n_classes=3,
                                        flip_y=0.05, random_state=cfg.seed)
    data.append(("make_classification", X, y, 1))
    if cfg.rows:
        size = f"{cfg.rows // 1000}K" if cfg.rows % 1000 == 0 else f"{cfg.rows:,}"
        data.append((f"embeddings {size}", *embeddings(cfg.rows, cfg.dims, cfg.seed), 1))

    print(f"{cfg.n_trees} trees, max_features={cfg.max_features}, max_depth={depth}, "
          f"min_samples_leaf={cfg.min_samples_leaf}, {jobs} processes / threads")
    head = ("dataset", "rows x features", "classes", "accuracy ours / sklearn", "AUC ours / sklearn",
            "fit s ours / sklearn", "fit ratio", "predict s ours / sklearn")
    print(" | ".join(head), flush=True)
    worst = {"accuracy": 0.0, "fit ratio": 0.0}
    for name, X, y, splits in data:
        X = X.astype(np.float32)
        results = {"ours": [], "sklearn": []}
        for split in range(splits):
            order = np.random.default_rng([cfg.seed, split]).permutation(len(y))
            test, train = order[:len(y) // 4], order[len(y) // 4:]
            results["ours"].append(measure(ours(split), X, y, train, test))
            results["sklearn"].append(measure(theirs(split), X, y, train, test))
        (a, u, f, p), (sa, su, sf, sp) = (np.mean(results[k], axis=0) for k in ("ours", "sklearn"))
        worst["accuracy"] = max(worst["accuracy"], 100 * (sa - a))
        worst["fit ratio"] = max(worst["fit ratio"], f / sf)
        print(f"{name} | {X.shape[0]:,} x {X.shape[1]} | {len(np.unique(y))} | {100 * a:.2f}% / {100 * sa:.2f}% | "
              f"{u:.4f} / {su:.4f} | {f:.2f} / {sf:.2f} | {f / sf:.2f}x | {p:.3f} / {sp:.3f}", flush=True)
    print(f"largest accuracy gap behind scikit-learn: {worst['accuracy']:.2f} points (target: at most 1); "
          f"largest fit-time ratio: {worst['fit ratio']:.2f}x (target: at most 2x)")


if __name__ == "__main__":
    run(main)
