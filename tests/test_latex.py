"""report --latex: booktabs tables of the numbers results.md gives, mean ± CI95."""

import json

from test_tables import CONFIG, EXPS, ROWS

from fedjax_poison import report as report_cli
from fedjax_poison.results import latex


def test_latex_tables_carry_the_numbers_of_results_md(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(CONFIG))
    (run / "experiments.json").write_text(json.dumps(EXPS))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out"
    assert report_cli.main([str(run), f"--out={out}", "--window=2", "--latex"]) == 0
    assert "results.tex" in capsys.readouterr().out
    tex, md = (out / "results.tex").read_text(), (out / "results.md").read_text()
    assert tex.count(r"\begin{tabular}") == 2  # across seeds; against the clean twin
    assert tex.count(r"\toprule") == tex.count(r"\midrule") == tex.count(r"\bottomrule") == 2
    # attacked source recall over seeds 0 and 1, and its difference to the clean twin
    assert "0.314 ± 1.096" in md and r"0.314 $\pm$ 1.096" in tex
    assert "0.686 vs 0.125 clean: +0.561 ± 1.414, not distinguishable" in md
    assert r"0.686 & 0.125 & +0.561 $\pm$ 1.414 n.s." in tex
    assert r"malicious\_fraction" in tex and "label_flip" not in tex  # escaped
    assert not (tmp_path / "run" / "results.tex").exists()  # --out, not the workdir


def test_without_the_flag_no_latex_and_the_escapes():
    assert latex.escape("6:0 Shirt→T-shirt/top, 30% & more_x") == (
        r"6:0 Shirt$\to$T-shirt/top, 30\% \& more\_x"
    )
    assert latex.mean_ci(0.8125, 0.0041) == r"0.812 $\pm$ 0.004"
    assert latex.mean_ci(-0.5, float("nan"), signed=True) == "-0.500"
