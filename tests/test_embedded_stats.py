"""The embedded tables' statistics (embedded/stats.py) against hand computations, and Student's t against
its printed quantiles."""

import math

import pytest

from embedded import stats

# two task draws × two pair-order seeds; draw 0 has 4 test problems, draw 1 has 3; y is each draw's SFT model
X = {(0, 0): [1, 1, 0, 1], (0, 1): [1, 0, 0, 1], (1, 0): [1, 1, 1], (1, 1): [0, 1, 1]}
SFT = {0: [1, 0, 0, 0], 1: [0, 1, 1]}
Y = {cell: SFT[cell[0]] for cell in X}


@pytest.mark.parametrize("df,quantile", [(1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228),
                                         (30, 2.042), (120, 1.980)])
def test_t_quantile_matches_the_printed_table(df, quantile):
    assert stats.t_quantile(df) == pytest.approx(quantile, abs=5e-4)


def test_difference_over_draws_and_seeds_by_hand():
    d = stats.difference(X, Y)
    # cells: (3-1)/4, (2-1)/4, (3-2)/3, (2-2)/3
    deltas = [0.5, 0.25, 1 / 3, 0.0]
    assert d["cell_diffs"] == pytest.approx(deltas)
    assert d["diff"] == pytest.approx(sum(deltas) / 4)
    mean = sum(deltas) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in deltas) / 3)  # = 0.208333...
    assert d["cell_stderr"] == pytest.approx(sd / 2) == pytest.approx(0.2083333 / 2)
    half = 3.182446 * sd / 2  # t with 3 degrees of freedom
    assert d["interval"] == pytest.approx([mean - half, mean + half], abs=1e-5)
    assert d["verdict"] == "undecided"  # the interval [-0.061, 0.602] holds 0
    # over problems: draw 0's per-problem differences averaged over its seeds [0, .5, 0, 1] (sd² 0.6875/3),
    # draw 1's [.5, 0, 0] (sd² 1/12); (1/2)·sqrt(s0²/4 + s1²/3) = (1/2)·(7/24)
    assert d["paired_stderr"] == pytest.approx(7 / 48)


def test_one_cell_is_the_paired_difference_over_problems():
    d = stats.difference({(0, 0): [1, 0, 1, 1]}, {(0, 0): [0, 0, 1, 0]})
    assert d == pytest.approx({"diff": 0.5, "paired_stderr": math.sqrt(1 / 3) / 2})  # no interval, no verdict


def test_accuracy_over_cells_by_hand():
    a = stats.accuracy(X)
    p = (0.75 + 0.5 + 1.0 + 2 / 3) / 4
    assert a["accuracy"] == pytest.approx(p) and a["cells"] == 4
    assert a["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 14))  # 14 answers graded
    assert a["cell_stderr"] == pytest.approx(0.2083333 / 2)


def test_a_verdict_needs_the_interval_to_exclude_zero():
    up = {(d, k): [1, 1, 1, 0] if (d + k) % 2 else [1, 1, 1, 1] for d in range(3) for k in range(2)}
    down = {cell: [0, 0, 0, 0] for cell in up}
    assert stats.difference(up, down)["verdict"] == "above"
    assert stats.difference(down, up)["verdict"] == "below"
