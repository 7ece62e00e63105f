"""scripts/benchmark.py runs end to end. A --quick run only: its timings are not measurements and are not checked,
only that every case ran and reported what the README reads from it."""

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import POEMS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def test_quick_benchmark_runs_the_training_cases_asked_for_and_the_data_section(tmp_path):
    corpus = tmp_path / "poems.txt"
    corpus.write_text("\n\n".join(POEMS * 20), encoding="utf-8")
    out = tmp_path / "bench.json"
    cases = "hf,lightning,ours_ckpt,hf_fp32,ours_compiled"  # ours runs anyway; ours_compiled needs --compile
    # bf16 at 2 x 32 tokens: CPUs without native bf16 (AVX2 ones) take seconds a step at the quick shape
    argv = ["--quick", "--sections", "train,data", "--precision", "bf16-mixed", "--cases", cases]
    argv += ["--batch-size", "2", "--seq-len", "32", "--float32-matmul-precision", "medium"]
    argv += ["--corpus", str(corpus)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU cases, whatever the machine has
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *argv, "--json", str(out)], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())

    # bf16-mixed on a CPU adds transformers in float32, with its MFU taken against the float32 peak
    cases = report["train"]["cases"]
    # in the order asked for, ours last: a run cut short by a time limit keeps the first ones
    assert list(cases) == ["hf", "lightning", "ours_ckpt", "hf_fp32", "ours"]
    for name, case in cases.items():
        assert "error" not in case, (name, case.get("error"))
        assert case["tokens_per_s"] > 0 and case["mfu"] > 0 and case["peak_rss_mb"] > 0, name
    peaks = report["peak_flops"]
    assert set(peaks) == {"bf16-mixed", "32-true"}
    assert "bfloat16" in peaks["bf16-mixed"]["source"] and "float32" in peaks["32-true"]["source"]
    # each case process times the matmul again after its steps; MFU is over the fastest of all the timings
    for name, case in cases.items():
        timings = [run["peak_flops"] for run in case["runs"]]
        peak = peaks["32-true" if name == "hf_fp32" else "bf16-mixed"]["flops"]
        assert all(0 < t <= peak for t in timings), name
        assert case["mfu"] == pytest.approx(case["tokens_per_s"] * report["train"]["flops_per_token"] / peak)
    assert "train: ours bf16-mixed / transformers float32 (tokens/s)" in report["ratios"]
    # ours and transformers also step in turn in one process: the ratio of each pair of steps
    pairs = report["train"]["paired"]["step_s_pairs"]
    assert len(pairs) == 2 and all(ours > 0 and hf > 0 for ours, hf in pairs)
    median = sorted(hf / ours for ours, hf in pairs)
    assert report["train"]["paired"]["ours_over_hf"] == pytest.approx((median[0] + median[1]) / 2)
    # and the Trainer and the plain loop, a step each in turn in one process
    pairs = report["train"]["paired_trainer"]["step_s_pairs"]
    assert len(pairs) == 2 and all(lightning > 0 and ours > 0 for lightning, ours in pairs)
    median = sorted(ours / lightning for lightning, ours in pairs)
    assert report["train"]["paired_trainer"]["lightning_over_ours"] == pytest.approx((median[0] + median[1]) / 2)
    assert (
        "train: Lightning Trainer / plain loop, a step each in turn in one process (median of the pairs)"
        in (report["ratios"])
    )
    # ours under the float32 matmul precisions highest and medium, a step each in turn in one process
    assert report["settings"]["float32_matmul_precision"] == "medium"
    pairs = report["train"]["paired_matmul_precision"]["step_s_pairs"]
    assert len(pairs) == 2 and all(highest > 0 and medium > 0 for highest, medium in pairs)
    median = sorted(highest / medium for highest, medium in pairs)
    assert report["train"]["paired_matmul_precision"]["speedup"] == pytest.approx((median[0] + median[1]) / 2)
    key = "train: float32 matmul precision medium / highest, plain loop, a step each in turn in one process"
    assert f"{key} (median of the pairs)" in report["ratios"]

    modes = report["data"]["modes"]
    real = [modes[m]["real_fraction"] for m in ("padded to longest", "bucket_by_length", "packing")]
    assert 0 < real[0] <= real[1] <= 1 and real[2] > 0.99
    assert "| ours, plain loop |" in proc.stdout  # the Markdown table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "nano"], "--preset 'nano': choose from tiny, small"),
        (["--decode-presets", "tiny,huge"], "--decode-presets 'tiny,huge': choose from"),
        (["--batch-size", "0"], "argument --batch-size: '0' is not a whole number of at least 1"),
        (["--steps", "two"], "argument --steps: 'two' is not a whole number of at least 1"),
        (["--preset", "tiny", "--seq-len", "1025"], "--seq-len = 1025 is longer than tiny's max_position_embeddings"),
        (["--sections", "decode", "--new-tokens", "1009"], "= 1025 is longer than tiny's max_position_embeddings"),
        (["--case-timeout", "0"], "--case-timeout 0.0 must be a positive number of seconds"),
    ],
)
def test_bad_benchmark_arguments_stop_before_any_work(argv, message, capsys):
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    # the longest lengths each preset takes pass
    good = benchmark.parse_args(["--preset", "tiny", "--seq-len", "1024", "--new-tokens", "1008"])
    assert (good.preset, good.seq_len, good.decode_presets) == ("tiny", 1024, "tiny,small")
    with pytest.raises(SystemExit) as exit_:
        benchmark.parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_benchmark_imports_and_measures_without_unix_only_modules(monkeypatch):
    # Windows has neither the resource module nor os.getloadavg
    monkeypatch.setitem(sys.modules, "resource", None)  # import resource: ImportError
    monkeypatch.delattr(os, "getloadavg", raising=False)
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    assert benchmark.max_rss_mb() != benchmark.max_rss_mb()  # NaN: not measured
    assert benchmark.load_average() is None


def test_the_paired_step_timer_leaves_the_plain_step_out_of_the_trainer_steps(monkeypatch):
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    clock = [0.0]
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock[0])

    def plain_step() -> float:  # the plain loop's step: 5 s on the clock, of which it reports 4
        clock[0] += 5.0
        return 4.0

    timer = benchmark.StepTimer(torch.device("cpu"), between=plain_step)
    for trainer_step in (1.0, 2.0, 3.0):  # the Trainer's work up to each batch's end
        clock[0] += trainer_step
        timer.on_train_batch_end(None, None, None, None, 0)
    # the first batch's end only starts the clock; the plain step after each later end is not a Trainer step's
    assert timer.step_s == [2.0, 3.0]
    assert timer.between_s == [4.0, 4.0]


def test_the_paired_matmul_precision_case_times_each_step_under_the_precision_it_is_filed_under(monkeypatch):
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)

    def fake_steps(*args, **kwargs):  # a step "takes" 2 s under highest and 1 s under anything else
        while True:
            yield 2.0 if torch.get_float32_matmul_precision() == "highest" else 1.0

    monkeypatch.setattr(benchmark, "plain_steps", fake_steps)
    args = benchmark.parse_args(["--quick", "--steps", "3", "--float32-matmul-precision", "medium"])
    before = torch.get_float32_matmul_precision()
    try:
        pairs = benchmark.run_paired_matmul(args)["step_s_pairs"]
    finally:
        torch.set_float32_matmul_precision(before)
    assert pairs == [[2.0, 1.0]] * 3  # [highest, medium], whichever of the two went first


def test_the_gpu_sync_check_files_each_wait_under_its_call_site_and_step(monkeypatch, tmp_path, capsys):
    # scripts/gpu_syncs.py needs CUDA's sync debug mode; here a stand-in mode makes every read of a loss tensor
    # (the progress bar's redraws, the logger's rows) warn as the real mode would on a GPU
    spec = importlib.util.spec_from_file_location("gpu_syncs", SCRIPT.parent / "gpu_syncs.py")
    gpu_syncs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_syncs)
    mode = [0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: mode.__setitem__(0, m))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in")
    item = torch.Tensor.item

    def read(self):
        if mode[0] and self.requires_grad is False and self.ndim == 0 and self.dtype == torch.float32:
            warnings.warn("called a synchronizing CUDA operation", stacklevel=2)
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", read)
    argv = ["gpu_syncs.py", "--preset", "tiny", "--steps", "22", "--precision", "32-true"]
    monkeypatch.setattr(sys, "argv", [*argv, "--json", str(tmp_path / "syncs.json")])
    gpu_syncs.main()
    out = capsys.readouterr().out
    assert "stand-in, tiny, 32-true: steps 11 to 22 watched (12)" in out
    report = json.loads((tmp_path / "syncs.json").read_text())
    assert report["watched"] == list(range(11, 23))
    # every site is a real frame, filed under steps that were watched
    assert report["sites"] and all(
        ":" in site and set(steps) <= set(range(11, 23)) for site, steps in report["sites"].items()
    )
    assert any("lightning" in site for site in report["sites"])  # the bar's and the logger's reads


def test_a_benchmark_stopped_between_cases_leaves_the_finished_ones_in_its_json(monkeypatch, tmp_path):
    # scripts/gpu_check.sh stops a preset's run at its time limit: the cases done by then are in --json
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    out = tmp_path / "bench.json"
    args = benchmark.parse_args(["--quick", "--sections", "train", "--cases", "hf", "--json", str(out)])
    done = {"step_s": [0.5, 0.4], "peak_rss_mb": 1.0, "baseline_rss_mb": 0.5, "peak_cuda_mb": None}

    def spawn(name, argv, timeout):
        if name == "ours":  # the second case: the time limit strikes
            raise KeyboardInterrupt
        return done

    monkeypatch.setattr(benchmark, "spawn_case", spawn)
    with pytest.raises(KeyboardInterrupt):
        benchmark.train_section(args, [], torch.device("cpu"), {"32-true": 1e11})
    report = json.loads(out.read_text())
    assert report["partial"] is True and report["train_runs"] == {"hf": [done], "ours": []}
