"""Paper tables load with the right columns and spot values; results round-trip through JSON."""
import pandas as pd
import pytest

from uadkit import repro


def test_every_table_is_well_formed():
    names = repro.available_tables()
    assert {"adtr_table1", "adtr_table2", "adtr_table3"} <= set(names)
    for name in names:
        df = repro.paper_table(name)
        assert list(df.columns) == repro.COLUMNS
        assert df["value"].between(0, 100).all() and (df["table"] == name).all()
        assert df["source"].str.startswith("paper:").all()


def test_spot_values_and_means():
    t1 = repro.paper_table("adtr_table1").set_index(["method", "category"])["value"]
    assert t1["ADTR", "carpet"] == 98.7 and t1["ADTR+", "mean"] == 97.5
    t3 = repro.paper_table("adtr_table3")
    for method, printed in (("ADTR", 94.7), ("ADTR+", 96.1)):
        rows = t3[(t3.method == method) & (t3.category != "mean")]
        assert abs(rows.value.mean() - printed) < 0.06  # the printed mean agrees with the transcribed rows


def test_compare_columns_and_difference():
    out = repro.compare(repro.paper_table("adtr_table3"), {"airplane": 0.9, "bird": 0.95}, method="ADTR")
    assert list(out.columns) == ["paper (ADTR)", "this run", "this run − paper"]
    assert out.loc["airplane", "this run − paper"] == pytest.approx(90 - 94.1)
    assert pd.isna(out.loc["cat", "this run"])
    with pytest.raises(KeyError, match="available"):
        repro.paper_table("nope")


def test_record_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("UADKIT_RESULTS", str(tmp_path))
    rows = [{"category": "mini/brick", "image AUROC": 0.97}]
    path = repro.record("ch", "t", rows, profile="smoke", dataset="mini", seed=0, wall_time_s=1.234)
    assert path == tmp_path / "ch" / "t.json"
    got = repro.load_results("ch", "t")
    assert got["rows"] == rows and got["profile"] == "smoke" and got["wall_time_s"] == 1.23 and "torch" in got
    with pytest.raises(FileNotFoundError, match="run the chapter"):
        repro.load_results("ch", "missing")


def test_default_results_dir_is_the_books(tmp_path, monkeypatch):
    monkeypatch.delenv("UADKIT_RESULTS", raising=False)
    (tmp_path / "_config.yml").write_text("title: x\n")
    (tmp_path / "book").mkdir()
    monkeypatch.chdir(tmp_path / "book")
    assert repro.results_dir() == tmp_path.resolve() / "_build" / "results"


def test_record_becomes_a_notebook_output_in_ipython(tmp_path, monkeypatch):
    """In a notebook a record is also displayed under its own mime type (the book's results page reads it
    from the committed chapter); a training run's record (``runs/``) is not; outside IPython nothing shows."""
    import IPython
    import IPython.display

    shown = []
    monkeypatch.setenv("UADKIT_RESULTS", str(tmp_path))
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False: shown.append((obj, raw)))
    repro.record("ch", "claims", [{"claim": "x", "verdict": "holds"}], profile="smoke", dataset="d", seed=0,
                 wall_time_s=1.0)
    assert shown == []  # no IPython shell here
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())
    repro.record("ch", "claims", [{"claim": "x", "verdict": "holds"}], profile="smoke", dataset="d", seed=0,
                 wall_time_s=1.0)
    repro.record("ch", "runs/abc", [], profile="smoke", dataset="d", seed=0, wall_time_s=1.0)
    assert len(shown) == 1 and shown[0][1] is True
    payload = shown[0][0][repro.RECORD_MIME]
    assert payload["rows"] == [{"claim": "x", "verdict": "holds"}] and payload["chapter"] == "ch"
