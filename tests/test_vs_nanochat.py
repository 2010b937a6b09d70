"""The side-by-side benchmark against nanochat (bench/vs_nanochat.py) works: a short run at toy
size through both systems' real paths (nanochat compiled, nanofast's cpu-preset route, nanochat's
checkpoint decoded by both engines). Speed is not checked here: the full run is a benchmark."""
import json

import pytest

from bench import vs_nanochat


@pytest.mark.skipif(not (vs_nanochat.nanochat_src() / "nanochat" / "gpt.py").is_file(),
                    reason="no nanochat checkout at NANOCHAT_SRC (default ../shared/peers/nanochat)")
def test_the_comparison_runs_both_systems_and_reports_ratios(tmp_path, capsys):
    out = tmp_path / "vs.json"
    shape = "depth=1,seq_len=64,batch=2,vocab=512,steps=1,warmup=1,prompt_len=8,new_tokens=4,repeats=1"
    assert vs_nanochat.main(["--shape", shape, "--rounds", "1", "--batches", "1,2", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    results = record["results"]
    assert [(r["what"], r["dtype"], r["batch"]) for r in results] == [
        ("train", "fp32", 2), ("train", "bf16", 2), ("decode", "fp32", 1), ("decode", "fp32", 2)]
    for r in results:
        assert r["nanochat"] > 0 and r["nanofast"] > 0
        assert r["ratio"] == pytest.approx(r["nanofast"] / r["nanochat"])
    table = capsys.readouterr().out
    assert "| decode, batch 2, 8-token prompt, 4 new, fp32 |" in table
    assert record["shape"]["depth"] == 1 and record["machine"]["cpu_count"] and table.strip() in vs_nanochat.render(record)


def test_a_failing_child_names_the_system_and_shows_its_error():
    with pytest.raises(RuntimeError, match="nanofast train failed"):
        vs_nanochat.child("nanofast", "train", vs_nanochat.Shape(depth=0))
