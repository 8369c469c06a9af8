"""benchmarks/: the GEMM work a model is charged per text, the int8 GEMM the peak is timed on, and the
inference benchmark's sides running in processes with their own environments."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.common import labelled_test_texts
from benchmarks.gemm_peak import (
    EncoderShape,
    encoder_flops,
    matmul_integer_model,
    mean_flops_per_text,
    measure_peak,
    onnxruntime_session,
)
from benchmarks.inference_worker import SideProcess, WorkerError, side_environment


def test_encoder_flops_by_hand() -> None:
    # d=4, f=8, T=3, per layer: Q/K/V/O 4*2*3*4*4 = 384, FFN 2*2*3*4*8 = 384, attention 2*2*3*3*4 = 144.
    assert encoder_flops(EncoderShape(layers=2, hidden=4, intermediate=8), 3) == 2 * (384 + 384 + 144)
    shape = EncoderShape(layers=1, hidden=4, intermediate=8)
    assert mean_flops_per_text(shape, [1, 3]) == (encoder_flops(shape, 1) + encoder_flops(shape, 3)) / 2
    with pytest.raises(ValueError, match="zero texts"):
        mean_flops_per_text(shape, [])


def test_encoder_flops_match_torch_flop_counter(tiny_model_dir: Path) -> None:
    """The count equals what torch's FlopCounterMode sees in the real (truncated) MiniLM's GEMMs. Eager
    attention: FlopCounterMode has no formula for the CPU kernel of scaled_dot_product_attention."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(tiny_model_dir, add_pooling_layer=False, attn_implementation="eager").eval()
    tokens = 13
    input_ids = torch.randint(1000, 2000, (1, tokens), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        encoder(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    assert encoder.config.num_hidden_layers == 2
    assert encoder_flops(EncoderShape.from_config(encoder.config), tokens) == counter.get_total_flops()


def test_int8_gemm_graph_computes_the_product_it_is_timed_on() -> None:
    """The timed ONNX graph is MatMulInteger: (A - a_zero_point) @ W in int32, W int8 with zero zero points."""
    model, weights = matmul_integer_model(k=24, n=8, seed=3)
    session = onnxruntime_session(model, threads=1)
    a = np.random.default_rng(0).integers(0, 256, size=(5, 24), dtype=np.uint8)
    (product,) = session.run(None, {"A": a, "a_zero_point": np.array(100, dtype=np.uint8)})
    expected = (a.astype(np.int32) - 100) @ weights.astype(np.int32)
    assert product.dtype == np.int32
    np.testing.assert_array_equal(product, expected)

    peak = measure_peak("onnxruntime_int8", threads=1, seconds_per_shape=0.01, shapes=[(4, 24, 8), (32, 24, 8)])
    assert peak.threads == 1 and len(peak.timings) == 2
    best = max(peak.timings, key=lambda t: t.gops)
    assert peak.gops == best.gops and peak.best_shape == (best.m, best.k, best.n)
    assert best.gops == pytest.approx(2 * best.m * best.k * best.n / best.seconds / 1e9)
    with pytest.raises(ValueError, match="unknown GEMM runtime"):
        measure_peak("tensorflow_int4")


def test_defaults_environment_drops_every_runtime_setting_and_keeps_the_rest() -> None:
    base = {
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": "3",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    assert side_environment("defaults", base) == {"HF_HUB_OFFLINE": "1"}
    assert side_environment("project", base) == base
    assert side_environment("project")["OMP_WAIT_POLICY"] == os.environ["OMP_WAIT_POLICY"]
    with pytest.raises(ValueError, match="unknown environment setting"):
        side_environment("fast", base)


def test_a_side_process_answers_a_bad_request_with_its_error() -> None:
    with SideProcess("probe", "defaults") as process:
        with pytest.raises(WorkerError, match="(?s)probe: 'batch' failed in its process:.*'batch' before 'load'"):
            process.request("batch")
        with pytest.raises(WorkerError, match="unknown side 'gpu'"):
            process.request("load", side="gpu", model_dir=".", threads=None, texts=[])
    assert process.process.returncode == 0


def test_defaults_are_the_libraries_for_the_pipeline_and_serve_s_for_the_champion() -> None:
    from benchmarks.inference import parse_args

    args = parse_args([])
    assert (args.baseline_env, args.champion_env) == ("defaults", "project")


@pytest.fixture(scope="module")
def tiny_classifier_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained classifier over customer_service's labels: enough to compare two ways of running it."""
    from domainflow.catalog import get_domain
    from domainflow.modeling import TextClassifier, load_encoder, save_classifier
    from domainflow.spec import ClassificationSpec

    labels = list(get_domain("customer_service").as_kind(ClassificationSpec).label_names)
    encoder, tokenizer = load_encoder(str(tiny_model_dir))
    torch.manual_seed(0)
    model = TextClassifier(encoder, num_labels=len(labels)).eval()
    return save_classifier(
        model, tokenizer, tmp_path_factory.mktemp("tiny-classifier"), label_names=labels, max_length=64
    )


def test_each_side_runs_in_its_own_process_under_its_own_environment(
    tiny_model_dir: Path, tiny_classifier_dir: Path, tmp_path: Path
) -> None:
    """The baseline's process runs without the PASSIVE wait policy this (test) process has; the project
    baseline and the champion run with it; and the figures come out of real work on the same texts."""
    from benchmarks.inference import main

    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # conftest configured this process as domainflow does
    out = tmp_path / "report.json"
    argv = ["--champion-dir", str(tiny_classifier_dir), "--fp32-dir", str(tiny_classifier_dir), "--max-texts", "32"]
    argv += ["--rounds", "2", "--latency-requests", "2", "--threads", "1", "--baseline-env", "both"]
    assert main([*argv, "--peak-seconds", "0.01", "--json", str(out)]) == 0
    report = json.loads(out.read_text())

    baseline, project, champion = report["baseline"], report["baseline_project"], report["champion"]
    assert baseline["setting"] == "defaults" and baseline["environment"]["OMP_WAIT_POLICY"] is None
    assert baseline["environment"]["TOKENIZERS_PARALLELISM"] is None
    assert project["environment"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert champion["setting"] == "project" and champion["environment"]["OMP_WAIT_POLICY"] == "PASSIVE"
    pids = {side["environment"]["pid"] for side in (baseline, project, champion)}
    assert len(pids) == 3 and os.getpid() not in pids
    assert all(side["environment"]["torch_threads"] == 1 for side in (baseline, project, champion))

    # The pipeline answers as domainflow's own inference does, and the "champion" is the same fp32 model.
    assert report["pipeline_agreement_with_our_fp32"] == 1.0
    assert report["champion_agreement_with_fp32"] == 1.0
    assert champion["accuracy"] == baseline["accuracy"] == project["accuracy"]

    texts, _ = labelled_test_texts("customer_service", 32, 0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # the tokenizer the classifier folder was saved with
    counts = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=64)["input_ids"]]
    expected = mean_flops_per_text(EncoderShape(layers=2, hidden=384, intermediate=1536), counts)
    for side in (baseline, project, champion):
        assert side["gemm_runtime"] == "torch_fp32"
        assert side["gemm_ops_per_text"] == pytest.approx(expected)
        assert side["mean_tokens"] == pytest.approx(sum(counts) / len(counts))
        peak = side["gemm_peak"]
        assert side["share_of_peak_batch32"] == pytest.approx(
            side["texts_per_second_batch32"] * expected / (1e9 * peak["gops"])
        )
