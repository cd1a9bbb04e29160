"""toy.benchmark's aggregation: every summary figure carries a 95% bootstrap interval over cases,
computed on the right cases (per kind, rate as a ratio of paired means), and the tables print it."""
import numpy as np
import pytest

from toy.benchmark import summarise, table


def _rows(n=90, seed=0):
    rng = np.random.default_rng(seed)
    kinds = ("main", "secondary", "background")
    base = {"main": 0.6, "secondary": 0.35, "background": 0.9}
    rows = []
    for i in range(n):
        k = kinds[i % 3]
        c_non = rng.uniform(0.02, 0.15)
        rows.append({"id": str(i), "kind": k, "seconds": 1.0, "iou": float(np.clip(base[k] + rng.normal(0, .1), 0, 1)),
                     "iou_sot_only": rng.uniform(0.2, 0.4), "c_m": 3 * c_non + rng.uniform(0, 0.1), "c_non": c_non})
    return rows


def test_every_figure_has_an_interval_around_it():
    s = summarise(_rows())
    for key in ("iou", "iou_sot_only", "iou_main", "iou_secondary", "iou_background", "c_m", "c_non", "rate"):
        lo, hi = s["ci"][key]
        assert lo < s[key] < hi, key
    # per-kind intervals come from that kind's cases alone: the background IoUs sit near 0.9
    assert s["ci"]["iou_background"][0] > s["ci"]["iou"][1]
    # the rate is mean C_m / mean C_non, not the mean of per-case ratios
    rows = _rows()
    assert s["rate"] == pytest.approx(np.mean([r["c_m"] for r in rows]) / np.mean([r["c_non"] for r in rows]))


def test_interval_narrows_with_more_cases_and_ignores_missing_values():
    small, large = summarise(_rows(30)), summarise(_rows(600))
    width = lambda s, k: s["ci"][k][1] - s["ci"][k][0]  # noqa: E731
    for key in ("iou", "rate", "c_non"):
        assert width(large, key) < 0.6 * width(small, key), key  # ~ 1 / sqrt(20) ideally
    masks_only = [{k: v for k, v in r.items() if k not in ("c_m", "c_non")} for r in _rows()]
    s = summarise(masks_only)
    assert s["rate"] is None and "rate" not in s["ci"] and "c_m" not in s["ci"] and "iou" in s["ci"]


def test_table_prints_the_interval():
    s = summarise(_rows())
    text = table("t", {"instdiffedit": s})
    lo, hi = s["ci"]["iou"]
    assert f"{100 * s['iou']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" in text
    assert f"{s['rate']:.2f} [{s['ci']['rate'][0]:.2f}, {s['ci']['rate'][1]:.2f}]" in text


def test_by_size_splits_each_kind_into_thirds_by_what_is_edited():
    """Object edits are ranked by their mask's area, background edits by the objects' area (the
    complement of their mask); cells count the map's cells that area covers."""
    from types import SimpleNamespace
    from toy.benchmark import by_size, size_table
    cases, rows = [], []
    for i in range(6):
        gt = np.zeros((16, 16), bool)
        gt.flat[: 10 * (i + 1)] = True                    # object i covers 10 (i + 1) of 256 pixels
        cases.append(SimpleNamespace(id=f"m{i}", gt_mask=gt, target=0))
        rows.append({"id": f"m{i}", "kind": "main", "iou": i / 10, "c_m": 0.2, "c_non": 0.05 * (i + 1)})
        cases.append(SimpleNamespace(id=f"b{i}", gt_mask=~gt, target=None))  # objects' area as above
        rows.append({"id": f"b{i}", "kind": "background", "iou": 1 - i / 10, "c_m": 0.4, "c_non": 0.1})
    rng = np.random.default_rng(0)
    rows = [rows[k] for k in rng.permutation(len(rows))]  # order of the rows must not matter
    strata = by_size(rows, cases, grid=8)
    assert set(strata) == {"main", "background"}
    small, middle, large = strata["main"]
    assert [s["n"] for s in (small, middle, large)] == [2, 2, 2]
    assert small["cells"] == pytest.approx(64 * 15 / 256) and large["cells"] == pytest.approx(64 * 55 / 256)
    assert small["iou"] == pytest.approx(0.05) and large["iou"] == pytest.approx(0.45)
    assert small["rate"] == pytest.approx(0.2 / 0.075) and large["rate"] == pytest.approx(0.2 / 0.275)
    assert strata["background"][0]["iou"] == pytest.approx(0.95)  # smallest objects first
    assert "| main | large | 2 | 14 | 45.0" in size_table(strata, 8)


def test_object_scale_is_the_bounding_box_share_of_the_edited_object():
    from toy.benchmark import bbox_share, object_scale
    from toy.world import benchmark_cases
    m = np.zeros((100, 100), bool)
    assert bbox_share(m) == 0.0
    m[10:20, 30:50] = True
    m[15, 35] = False  # a hole does not change the box
    assert bbox_share(m) == 10 * 20 / 100 ** 2
    small, large = (object_scale(benchmark_cases(30, size=64, object_sizes=r)) for r in ((0.2, 0.3), (0.6, 0.7)))
    assert set(small) == set(large) == {"main", "secondary"}
    # a circle's box is its size squared; squares and rotated shapes a little more; occlusion less
    assert 0.2 ** 2 * 0.8 < small["secondary"] < small["main"] < 0.3 ** 2 * 1.3
    assert 0.6 ** 2 * 0.8 < large["main"] < 0.7 ** 2 * 1.3
