"""Served domains whose champions are adapters on one base encoder: the base is loaded once, each domain still
answers exactly as its own merged model, from several threads at once, and a hot swap of one domain leaves the
others alone.

The champions are tiny adapters on the real MiniLM cut to one layer (two LoRA adapters of different ranks and
one IA3 adapter, which peft itself cannot hold in one model beside a LoRA), with seeded random adapter weights
and heads: what is tested is how they are served, not how they were trained (tests/test_peft.py covers that).
"""

from __future__ import annotations

import gc
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from domainflow.catalog import get_domain, register
from domainflow.modeling import TextClassifier, load_classifier, load_encoder, predict_proba, read_metadata
from domainflow.peft_models import ADAPTER_KEY, AdapterMethod, BaseEncoder, attach_adapter, save_adapter_classifier
from domainflow.registry import ModelRegistry
from domainflow.shared_bases import SHARED_BASES, BaseKey
from serving import ApiKeys, ServingConfig, create_app
from tests.conftest import TINY_LABELS
from tests.data_helpers import banking77_rows, replace
from tests.process_helpers import ThreadedUvicorn, wait_for

pytest.importorskip("peft")

KEY = "shared-base-key-5c1e9a7d3b"
DOMAINS = ("shared_lora_a", "shared_lora_b", "shared_ia3")
LORA_A = AdapterMethod(kind="lora", learning_rate=1e-3, rank=4, alpha=8, target_modules=("query", "value"))
LORA_B = AdapterMethod(kind="lora", learning_rate=1e-3, rank=8, alpha=8, target_modules=("query", "key", "value"))
IA3 = AdapterMethod(
    kind="ia3",
    learning_rate=1e-3,
    target_modules=("key", "value", "output.dense"),
    feedforward_modules=("output.dense",),
)
METHODS = dict(zip(DOMAINS, (LORA_A, LORA_B, IA3), strict=True))
LAYERS = 1


def make_adapter_dir(base_dir: Path, out: Path, method: AdapterMethod, seed: int) -> Path:
    """An adapter candidate folder on the first layer of ``base_dir``, with seeded random adapter weights (large
    enough to change the answers visibly) and head."""
    encoder, tokenizer = load_encoder(str(base_dir), LAYERS)
    model = TextClassifier(encoder, num_labels=len(TINY_LABELS))
    base = attach_adapter(model, method, str(base_dir), LAYERS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "lora_B" in name:
                parameter.copy_(noise * 0.2)
            elif "ia3_" in name:
                parameter.copy_(1.0 + noise * 0.5)
            elif name.startswith("classifier.weight"):
                parameter.copy_(noise * 0.3)
    return save_adapter_classifier(
        model, tokenizer, out, label_names=TINY_LABELS, max_length=64, method=method, base=base
    )


def promote(registry_dir: Path, domain: str, model_dir: Path, candidate: str) -> int:
    info = ModelRegistry(domain, root=registry_dir).promote(
        model_dir, metrics={"test": {"accuracy": 0.5}}, lineage={"candidate": candidate}, decision={"summary": "test"}
    )
    return info.version


def served_probabilities(url: str, domain: str, texts: list[str]) -> torch.Tensor:
    """The service's probabilities of every label (in TINY_LABELS order) for each text."""
    answer = httpx.post(
        f"{url}/v1/{domain}/predict", json={"texts": texts, "top_k": len(TINY_LABELS)}, headers={"X-API-Key": KEY}
    )
    assert answer.status_code == 200, answer.text
    rows = []
    for prediction in answer.json()["predictions"]:
        scores = {entry["label"]: entry["score"] for entry in prediction["top_k"]}
        rows.append([scores[label] for label in TINY_LABELS])
    return torch.tensor(rows)


def merged(model_dir: Path, texts: list[str]) -> torch.Tensor:
    """What the domain must answer: its folder loaded the ordinary way (adapter merged into a copy of the base)."""
    loaded = load_classifier(model_dir)
    assert getattr(loaded.model, "shared_base", None) is None
    return predict_proba(loaded, texts)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rows = banking77_rows("test")
    return [next(r["text"].strip() for r in rows if r["category"] == label) for label in TINY_LABELS] + [
        "hello?",
        "Why was I charged twice for withdrawing cash abroad?",
    ]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shared-adapters")
    dirs = {}
    for seed, domain in enumerate(DOMAINS):
        dirs[domain] = make_adapter_dir(tiny_model_dir, root / domain, METHODS[domain], seed)
    dirs["swap"] = make_adapter_dir(tiny_model_dir, root / "swap", LORA_A, seed=11)
    return dirs


@pytest.fixture(scope="module")
def base_key(adapters: dict[str, Path]) -> BaseKey:
    return BaseKey.of(BaseEncoder.model_validate(read_metadata(adapters[DOMAINS[0]])[ADAPTER_KEY]["base"]))


@pytest.fixture(scope="module")
def registered(tiny_domain: str) -> tuple[str, ...]:
    spec = get_domain(tiny_domain)
    for domain in DOMAINS:
        register(replace(spec, name=domain, description=f"{domain} (tests)"))
    return DOMAINS


@pytest.fixture(scope="module")
def service(
    registered: tuple[str, ...], adapters: dict[str, Path], base_key: BaseKey, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ThreadedUvicorn, int, Path]]:
    """The three domains served from one registry; yields the server, the base loads its start cost and the
    registry root."""
    root = tmp_path_factory.mktemp("shared-registry")
    for domain in DOMAINS:
        promote(root / domain, domain, adapters[domain], METHODS[domain].kind)
    gc.collect()
    assert base_key not in SHARED_BASES.resident()  # no model of an earlier test holds this base
    before = SHARED_BASES.loads
    app = create_app(ServingConfig(registry_root=root, domains=DOMAINS, poll_seconds=0.2), api_keys=ApiKeys([KEY]))
    server = ThreadedUvicorn(app).start()
    try:
        yield server, SHARED_BASES.loads - before, root
    finally:
        server.stop()


def test_domains_on_one_base_load_it_once_and_each_answers_as_its_merged_model(
    service: tuple[ThreadedUvicorn, int, Path], adapters: dict[str, Path], base_key: BaseKey, texts: list[str]
) -> None:
    server, loads, _ = service
    assert loads == 1
    assert base_key in SHARED_BASES.resident()
    models = [server.app.state.store.get(domain).current.loaded.model for domain in DOMAINS]
    shared = {id(model.shared_base) for model in models}
    assert len(shared) == 1 and models[0].shared_base.key == base_key
    # one copy of the weights: the embedding table is the same tensor under all three models
    embeddings = {model.encoder.get_input_embeddings().weight.data_ptr() for model in models}
    assert embeddings == {models[0].shared_base.encoder.get_input_embeddings().weight.data_ptr()}

    answers = {domain: served_probabilities(server.url, domain, texts) for domain in DOMAINS}
    for domain in DOMAINS:
        torch.testing.assert_close(answers[domain], merged(adapters[domain], texts), atol=2e-5, rtol=0)
    # the domains do differ (a mix-up of adapters or heads could not pass the check above) ...
    for first, second in ((0, 1), (0, 2), (1, 2)):
        assert float((answers[DOMAINS[first]] - answers[DOMAINS[second]]).abs().max()) > 0.05
    # ... and each adapter matters: without it, the same head answers otherwise
    for domain, model in zip(DOMAINS, models, strict=True):
        loaded = server.app.state.store.get(domain).current.loaded
        with model.encoder.disable_adapter():
            bare = predict_proba(loaded, texts)
        assert float((bare - answers[domain]).abs().max()) > 0.02, domain


def test_two_threads_at_once_each_get_their_own_domains_answers(
    service: tuple[ThreadedUvicorn, int, Path], adapters: dict[str, Path], texts: list[str]
) -> None:
    server, _, _ = service
    pair = DOMAINS[0], DOMAINS[2]  # a LoRA and the IA3 adapter, on the same base tensors
    expected = {domain: merged(adapters[domain], texts) for domain in pair}
    start = threading.Barrier(len(pair))
    worst: dict[str, float] = {}
    failures: list[BaseException] = []

    def hammer(domain: str) -> None:
        loaded = server.app.state.store.get(domain).current.loaded
        try:
            start.wait()
            worst[domain] = max(
                float((predict_proba(loaded, texts, batch_size=4) - expected[domain]).abs().max()) for _ in range(12)
            )
        except BaseException as exc:  # reported below: an exception in a thread would otherwise be lost
            failures.append(exc)

    threads = [threading.Thread(target=hammer, args=(domain,)) for domain in pair]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert worst.keys() == set(pair) and max(worst.values()) < 1e-5, worst


def test_a_hot_swap_replaces_one_domains_adapter_and_leaves_the_others(
    service: tuple[ThreadedUvicorn, int, Path], adapters: dict[str, Path], texts: list[str]
) -> None:
    server, loads, root = service
    store = server.app.state.store
    swapped, kept = DOMAINS[0], DOMAINS[1:]
    before = {domain: store.get(domain).current for domain in DOMAINS}
    answers_before = {domain: served_probabilities(server.url, domain, texts) for domain in kept}
    loads_before = SHARED_BASES.loads

    promote(root / swapped, swapped, adapters["swap"], "lora-2")
    wait_for(lambda: store.get(swapped).current.version == 2, "the swapped domain to serve v2", timeout=120)

    assert SHARED_BASES.loads == loads_before  # the new adapter went onto the base already there
    new = store.get(swapped).current
    assert new.loaded.model.shared_base is before[kept[0]].loaded.model.shared_base
    torch.testing.assert_close(
        served_probabilities(server.url, swapped, texts), merged(adapters["swap"], texts), atol=2e-5, rtol=0
    )
    for domain in kept:
        assert store.get(domain).current is before[domain]  # not reloaded, not touched
        assert torch.equal(served_probabilities(server.url, domain, texts), answers_before[domain])
    assert loads == 1


def test_a_base_lives_while_a_model_uses_it_and_merging_stays_available(
    tiny_model_dir: Path, texts: list[str], tmp_path: Path
) -> None:
    """On a base of its own (a copy of the folder: another cache key), so that the service above does not hold it."""
    base_dir = shutil.copytree(tiny_model_dir, tmp_path / "base")
    lora, ia3 = (make_adapter_dir(base_dir, tmp_path / m.kind, m, seed=5) for m in (LORA_A, IA3))
    key = BaseKey.of(BaseEncoder.model_validate(read_metadata(lora)[ADAPTER_KEY]["base"]))
    before = SHARED_BASES.loads
    first = load_classifier(lora, share_base=True)
    second = load_classifier(ia3, share_base=True)
    assert SHARED_BASES.loads == before + 1 and first.model.shared_base is second.model.shared_base
    assert key in SHARED_BASES.resident()
    merged_copy = load_classifier(lora)  # the default outside serving: merged, a copy of its own
    assert SHARED_BASES.loads == before + 1 and getattr(merged_copy.model, "shared_base", None) is None
    assert not any("lora_" in name for name, _ in merged_copy.torch_model.named_parameters())
    torch.testing.assert_close(predict_proba(first, texts), predict_proba(merged_copy, texts), atol=1e-5, rtol=0)

    del first
    gc.collect()
    assert key in SHARED_BASES.resident()  # the IA3 model still uses it
    del second
    gc.collect()
    assert key not in SHARED_BASES.resident()  # dropped with its last model
    again = load_classifier(ia3, share_base=True)
    assert SHARED_BASES.loads == before + 2 and again.model.shared_base.key == key


def test_merge_adapters_serves_each_adapter_merged_in_a_copy_of_its_own(
    registered: tuple[str, ...], adapters: dict[str, Path], texts: list[str], tmp_path: Path
) -> None:
    """``domainflow serve --merge-adapters``: ServingConfig(share_base_encoders=False) reaches the loader."""
    import asyncio

    for domain in registered[:2]:
        promote(tmp_path / domain, domain, adapters[domain], METHODS[domain].kind)
    config = ServingConfig(registry_root=tmp_path, domains=registered[:2], share_base_encoders=False)
    store = create_app(config, api_keys=ApiKeys([KEY])).state.store
    before = SHARED_BASES.loads
    asyncio.run(store.refresh())
    assert SHARED_BASES.loads == before
    models = [store.get(domain).current.loaded.model for domain in registered[:2]]
    assert all(model.shared_base is None and type(model.encoder).__name__ == "BertModel" for model in models)
    first, second = (model.encoder.get_input_embeddings().weight.data_ptr() for model in models)
    assert first != second  # each holds its own copy
    served = predict_proba(store.get(registered[0]).current.loaded, texts)
    torch.testing.assert_close(served, merged(adapters[registered[0]], texts), atol=1e-6, rtol=0)
