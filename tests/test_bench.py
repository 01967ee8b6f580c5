"""The benchmark runs on the smoke preset and reports positive figures (no timing asserts)."""

from confeti.__main__ import main
from confeti.bench import BENCH_METHODS, run_bench
from confeti.config import smoke


def test_bench_reports_every_method_and_phase(toy):
    res = run_bench(smoke(), device="cpu", repeats=1, data=toy)
    assert res["matmul_peak_gflops"] > 0 and res["conv_peak_gflops"] > 0
    assert res["peak_gflops"] == max(res["matmul_peak_gflops"], res["conv_peak_gflops"])
    cut = res["cut_iteration"]
    assert cut["sec_per_iter"] > 0 and cut["gflop_per_iter"] > 0 and cut["utilisation"] > 0
    assert cut["style_pretrain_iters"] == smoke().style_pretrain_iters and cut["phase0_sec"] >= 0
    loader = res["loader"]
    assert loader["images_per_sec"] > 0 and loader["sec_per_batch"] > 0
    assert loader["vs_slowest_method"] > 0
    assert loader["cached"] is True and loader["images_per_sec_cached"] > 0  # the toy fits
    assert set(res["methods"]) == set(BENCH_METHODS)
    for r in res["methods"].values():
        assert r["sec_per_iter"] > 0 and r["images_per_sec"] > 0 and r["peak_memory_mb"] > 0
        assert r["gflop_per_iter"] > 0 and 0 < r["utilisation"]
        assert r["phases_sec"]["student_source"] > 0 and r["phases_sec"]["optimizer"] > 0
    assert res["methods"]["style"]["phases_sec"]["cut_steps"] > 0
    phases = res["methods"]["confeti"]["phases_sec"]
    for name in (
        "stylize",
        "pseudo_labels",
        "prototype_update",
        "student_source",
        "cut_steps",
        "student_mixed",
        "optimizer",
    ):
        assert phases[name] > 0, name
    # a method's own FLOPs grow with what it switches on
    m = res["methods"]
    assert (
        m["confeti"]["gflop_per_iter"]
        > m["selftrain"]["gflop_per_iter"]
        > m["source_only"]["gflop_per_iter"]
    )


def test_bench_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(
        [
            "bench",
            "--preset",
            "smoke",
            "--repeats",
            "1",
            "--methods",
            "source_only",
            "--out",
            str(out),
        ]
    )
    assert '"source_only"' in out.read_text()
