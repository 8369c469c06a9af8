"""Federated candidates, simulated on one machine with Flower: clients train locally, FedAvg averages them.

The training split is divided among ``clients`` "branches" (:func:`partition_rows`: non-IID by label, seeded,
disjoint, covering every row). Each round, Flower's ``FedAvg`` strategy (``flwr.serverapp.strategy``) sends the
global trainable weights (:mod:`domainflow.local_training`: the head, or a LoRA adapter and the head) to every
client; each loads them, trains ``local_epochs`` over its own rows only, and answers with its weights and its row
count; FedAvg's aggregation averages the answers weighted by those counts. The model is built from the
pretrained encoder and a zero head: nothing in it has seen another client's rows.

Two engines run the same ``ClientApp`` and the same strategy:

* ``simulation``: Flower's simulation engine (``flwr.simulation.run_simulation``): the clients run in Ray actors,
  each with its own copy of the model. It works offline here with ray 2.60 (flwr 1.42 pins ray 2.55.1 for its
  ``simulation`` extra, and pins fastapi, protobuf, rich, typer, uvicorn, starlette and packaging below the
  versions this project runs on, so flwr is installed without its dependency pins: see pyproject's
  ``federated`` extra). It costs ~20 s of Ray start and a model per actor.
* ``in_process`` (the default): :class:`LocalGrid`, a ``Grid`` (the server's view of the clients) that hands each
  message straight to the ``ClientApp`` in this process: one copy of the model, no Ray. The strategy's
  ``start`` loop, sampling and aggregation are Flower's own either way; nothing here averages weights.

``flwr`` is an optional extra (``pip install -e '.[federated]'``): nothing here imports it until a federated
candidate trains.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from uuid import uuid4

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from domainflow.footprint import FOOTPRINT_KEY, footprint, training_section
from domainflow.local_training import (
    BaseSpec,
    BatchLogits,
    TrainableModel,
    TrainedRun,
    batch_loss,
    build_trainable,
    require_library,
    save_trainable,
    text_features,
    trainable_settings,
)
from domainflow.peft_models import AdapterMethod
from domainflow.spec import FederatedSettings, PeftSettings, TrainableSet
from domainflow.training_keys import FEDERATED_KEY

Partition = Literal["dirichlet", "shards", "iid"]
Engine = Literal["in_process", "simulation"]
ROWS_KEY = "num-examples"  # FedAvg's default weighting key: each client's answer is weighted by its row count


def candidate_name(trainable: TrainableSet) -> str:
    return f"federated-{trainable}"


class FederatedMethod(BaseModel):
    """One federated candidate, with every setting its weights depend on (a task input: part of the cache key)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    trainable: TrainableSet
    clients: int = Field(ge=1)  # 1: the centralised run of the same budget (benchmarks/private_training.py)
    rounds: int = Field(ge=1)
    local_epochs: float = Field(gt=0.0)
    partition: Partition = "dirichlet"
    alpha: float = Field(0.5, gt=0.0)
    shards_per_client: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(gt=0.0)
    adapter: AdapterMethod | None = None
    engine: Engine = "in_process"

    @property
    def name(self) -> str:
        return candidate_name(self.trainable)


def federated_methods(settings: FederatedSettings, peft: PeftSettings) -> list[FederatedMethod]:
    """The domain's ``[federated]`` table as one record per federated candidate, in its order."""
    shared = settings.model_dump(exclude={"methods", "head_lr", "lora_lr"})
    return [
        FederatedMethod(
            trainable=trainable, **trainable_settings(trainable, settings.head_lr, settings.lora_lr, peft), **shared
        )
        for trainable in settings.methods
    ]


def require_flwr() -> None:
    """Fail before any work, saying how to install the optional ``federated`` extra."""
    require_library("flwr", "federated candidates", "federated", "federated")


def partition_rows(
    labels: Iterable[int],
    clients: int,
    partition: Partition,
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int = 42,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Row indices of each client: disjoint, together every row, each client at least one row; seeded.

    ``dirichlet``: each label's rows (shuffled) are cut among the clients by shares drawn from
    Dirichlet(alpha, ..., alpha): with a small alpha most of a label lands on one or two clients. Draws that leave a
    client empty are redrawn (``max_tries``). ``shards``: the rows, shuffled then sorted by label, cut into
    ``clients x shards_per_client`` contiguous shards dealt at random, so a client sees few labels. ``iid``:
    uniformly at random.
    """
    labels = np.asarray(list(labels))
    rows = len(labels)
    if clients < 1:
        raise ValueError(f"clients must be at least 1, got {clients}")
    if rows < clients:
        raise ValueError(f"{rows} training rows cannot be divided among {clients} clients (each needs a row)")
    rng = np.random.default_rng(seed)
    if partition == "iid" or clients == 1:
        parts = np.array_split(rng.permutation(rows), clients)
    elif partition == "shards":
        shards = clients * shards_per_client
        if rows < shards:
            raise ValueError(
                f"{rows} rows cannot be cut into {shards} shards ({clients} clients x {shards_per_client})"
            )
        shuffled = rng.permutation(rows)
        by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
        pieces = np.array_split(by_label, shards)
        dealt = rng.permutation(shards)
        parts = [
            np.concatenate([pieces[j] for j in dealt[k * shards_per_client : (k + 1) * shards_per_client]])
            for k in range(clients)
        ]
    elif partition == "dirichlet":
        parts = _dirichlet_parts(labels, clients, alpha, rng, max_tries)
    else:
        raise ValueError(f"unknown partition {partition!r}: dirichlet, shards or iid")
    return [np.sort(part).astype(np.int64) for part in parts]


def _dirichlet_parts(
    labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator, max_tries: int
) -> list[np.ndarray]:
    for _ in range(max_tries):
        owned: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for label in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = np.round(np.cumsum(shares)[:-1] * len(rows)).astype(int)
            for client, piece in enumerate(np.split(rows, cuts)):
                owned[client].append(piece)
        parts = [np.concatenate(pieces) for pieces in owned]
        if min(len(part) for part in parts) > 0:
            return parts
    raise ValueError(
        f"Dirichlet(alpha={alpha}) left a client without rows in {max_tries} draws; "
        "raise alpha, or lower the number of clients"
    )


class FederatedSetup(BaseModel):
    """What every client (and the server) needs to build its part of the run: picklable, so Ray actors get it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset_path: str
    num_labels: int
    base: BaseSpec
    method: FederatedMethod
    seed: int

    def key(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


class Learner:
    """A process's model and the client data it has loaded: clients share the model (each round starts by loading
    the global weights into it) and each keeps its own rows."""

    def __init__(self, setup: FederatedSetup) -> None:
        from datasets import load_from_disk

        splits = load_from_disk(setup.dataset_path)
        self.setup = setup
        method = setup.method
        self.texts = list(splits["train"]["text"])
        self.labels = np.asarray(splits["train"]["label"], dtype=np.int64)
        self.validation = (list(splits["validation"]["text"]), np.asarray(splits["validation"]["label"]))
        self.partitions = partition_rows(
            self.labels,
            method.clients,
            method.partition,
            alpha=method.alpha,
            shards_per_client=method.shards_per_client,
            seed=setup.seed,
        )
        self.trainable: TrainableModel = build_trainable(setup.base, setup.num_labels, method.trainable, method.adapter)
        self._data: BatchLogits | None = None

    def data(self) -> BatchLogits:
        """Features (head) or token ids (LoRA) of the training rows, made once; a client reads only its own rows."""
        if self._data is None:
            self._data = BatchLogits(self.trainable, self.texts, self.setup.base.max_length)
        return self._data

    def local_train(
        self, arrays: list[np.ndarray], client: int, server_round: int
    ) -> tuple[list[np.ndarray], int, float]:
        """Client ``client``'s round: the global weights in, ``local_epochs`` of Adam over its rows, its weights out."""
        method = self.setup.method
        rows = torch.from_numpy(self.partitions[client])
        data = self.data()
        labels = torch.from_numpy(self.labels)
        self.trainable.load_trainable_arrays(arrays)
        seed = self.setup.seed * 1_000_003 + server_round * 1_009 + client  # the same draws whatever the engine
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        module = self.trainable.trainable_module()
        module.train()
        optimizer = torch.optim.Adam([p for _, p in self.trainable.named_trainable()], lr=method.learning_rate)
        steps = max(1, math.ceil(method.local_epochs * len(rows) / method.batch_size))
        passes = math.ceil(steps * method.batch_size / len(rows))
        order = torch.cat([torch.randperm(len(rows), generator=generator) for _ in range(passes)])
        losses = []
        for step in range(steps):
            index = rows[order[step * method.batch_size : (step + 1) * method.batch_size]]  # this client's rows only
            optimizer.zero_grad(set_to_none=True)
            loss = batch_loss(data(module, index), labels[index])
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        module.eval()
        return self.trainable.trainable_arrays(), len(rows), float(np.mean(losses))

    @torch.inference_mode()
    def validation_accuracy(self, arrays: list[np.ndarray]) -> float:
        """The global model's accuracy on the validation split (the server's view; no client row is used)."""
        texts, labels = self.validation
        if not texts:
            return float("nan")
        self.trainable.load_trainable_arrays(arrays)
        model = self.trainable.model.eval()
        if self.trainable.trainable == "head":  # the frozen encoder's features, embedded once for every round
            features = text_features(self.trainable, texts, self.setup.base.max_length)
            return float((model.classifier(features).argmax(-1).numpy() == labels).mean())
        from domainflow.modeling import LoadedClassifier, predict_logits

        names = [str(label) for label in range(self.setup.num_labels)]  # predict_logits reads only their count
        loaded = LoadedClassifier(model, self.trainable.tokenizer, names, self.setup.base.max_length, {})
        predicted = predict_logits(loaded, texts).argmax(-1).numpy()
        return float((predicted == labels).mean())


_LEARNERS: dict[str, Learner] = {}  # per process: in_process, the server's and the clients' one; a Ray actor's own


def learner_for(setup: FederatedSetup) -> Learner:
    key = setup.key()
    if key not in _LEARNERS:
        _LEARNERS.clear()  # one run at a time per process: do not keep an older run's model alive
        _LEARNERS[key] = Learner(setup)
    return _LEARNERS[key]


def client_app(setup: FederatedSetup) -> Any:
    """The Flower ``ClientApp`` of a run: its ``train`` handler is one client's round (:meth:`Learner.local_train`),
    the client chosen by the node's ``partition-id`` (which Flower's simulation engine assigns, and
    :class:`LocalGrid` likewise)."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        learner = learner_for(setup)
        client = int(context.node_config["partition-id"])
        arrays = message.content.array_records["arrays"].to_numpy_ndarrays()
        server_round = int(str(message.content.config_records["config"]["server-round"]))
        trained, rows, loss = learner.local_train(arrays, client, server_round)
        content = RecordDict(
            {
                "arrays": ArrayRecord(trained),
                "metrics": MetricRecord({ROWS_KEY: rows, "train_loss": loss}),
            }
        )
        return Message(content=content, reply_to=message)

    return app


def local_grid(app: Any, clients: int) -> Any:
    """A Flower ``Grid`` whose nodes are the ``ClientApp`` called in this process (the ``in_process`` engine).

    A message gets an id as Flower's own in-memory grid gives it one, is handled at once by the app with the
    node's context (``partition-id`` = node - 1), and its reply waits to be pulled. A client's exception is
    raised here, in the server's call, naming nothing lost: the run stops."""
    from flwr.app import Context, Message, RecordDict
    from flwr.serverapp import Grid

    class LocalGrid(Grid):
        def __init__(self) -> None:
            self._run: Any = None
            self._nodes = list(range(1, clients + 1))
            self._contexts = {
                node: Context(
                    run_id=0,
                    node_id=node,
                    node_config={"partition-id": node - 1, "num-partitions": clients},
                    state=RecordDict(),
                    run_config={},
                )
                for node in self._nodes
            }
            self._replies: dict[str, Message] = {}

        def set_run(self, run: Any) -> None:
            self._run = run

        @property
        def run(self) -> Any:
            return self._run

        def create_message(
            self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
        ) -> Message:
            return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

        def get_node_ids(self) -> Iterable[int]:
            return list(self._nodes)

        def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
            ids = []
            for message in messages:
                message_id = uuid4().hex
                message.metadata.__dict__["_message_id"] = message_id
                self._replies[message_id] = app(message, self._contexts[message.metadata.dst_node_id])
                ids.append(message_id)
            return ids

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
            return [self._replies.pop(i) for i in message_ids if i in self._replies]

        def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
            return self.pull_messages(list(self.push_messages(messages)))

    return LocalGrid()


@contextmanager
def _server_identity() -> Iterator[None]:
    """Flower stamps every message with the identity of the task that sends it (``TaskIdentity``), which its own
    runtimes set when they start a ServerApp (as ``flwr.server.compat`` does: task 1, the SuperLink's node id).
    The in-process engine sets it likewise for its run, and restores what was there after."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def recording_fedavg(clients: int) -> Any:
    """Flower's FedAvg over every client every round, keeping the last round's client answers (row count and
    weights: what a check of the average needs) and stopping on a client's error instead of averaging the rest."""
    from flwr.serverapp.strategy import FedAvg

    class RecordingFedAvg(FedAvg):
        last_round: list[tuple[int, list[np.ndarray]]]

        def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> tuple[Any, Any]:
            replies = list(replies)
            failed = [reply for reply in replies if reply.has_error()]
            if failed:
                reasons = "; ".join(f"node {r.metadata.src_node_id}: {r.error.reason}" for r in failed)
                raise RuntimeError(f"federated round {server_round}: {len(failed)} client(s) failed: {reasons}")
            if len(replies) != clients:
                raise RuntimeError(f"federated round {server_round}: {len(replies)} of {clients} clients answered")
            self.last_round = [
                (int(r.content["metrics"][ROWS_KEY]), r.content["arrays"].to_numpy_ndarrays()) for r in replies
            ]
            return super().aggregate_train(server_round, replies)

    return RecordingFedAvg(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients
    )


@dataclass
class FederatedRun(TrainedRun):
    """The global model after the last round, in memory, with what the run did."""

    last_round: list[tuple[int, list[np.ndarray]]] = field(default_factory=list)
    partitions: list[np.ndarray] = field(default_factory=list)


def run_federated(setup: FederatedSetup) -> FederatedRun:
    """Run the federation (see the module docstring) and return the global model of the last round."""
    require_flwr()
    import flwr
    from flwr.app import ArrayRecord, MetricRecord

    method = setup.method
    with training_section() as section:  # one training loop at a time in a process (domainflow.footprint)
        torch.manual_seed(setup.seed)
        server = learner_for(setup)  # in_process: the clients' learner too
        strategy = recording_fedavg(method.clients)
        initial = ArrayRecord(server.trainable.trainable_arrays())
        curve: dict[int, float] = {}

        def evaluate(server_round: int, arrays: Any) -> Any:
            curve[server_round] = server.validation_accuracy(arrays.to_numpy_ndarrays())
            return MetricRecord({"validation_accuracy": curve[server_round]})

        outcome: dict[str, Any] = {}

        def serve(grid: Any) -> None:
            outcome["result"] = strategy.start(
                grid=grid, initial_arrays=initial, num_rounds=method.rounds, evaluate_fn=evaluate
            )

        if method.engine == "in_process":
            with _server_identity():
                serve(local_grid(client_app(setup), method.clients))
        else:
            _simulate(setup, serve)
        if "result" not in outcome or outcome["result"].arrays is None:
            raise RuntimeError(f"the federated run of {method.name} ended without global weights")
        final = outcome["result"].arrays.to_numpy_ndarrays()
        server.trainable.load_trainable_arrays(final)
    seconds = section.seconds
    parts = server.partitions
    record = {
        "framework": f"Flower {flwr.__version__}, FedAvg weighted by client rows",
        "engine": method.engine,
        "trainable": method.trainable,
        "clients": method.clients,
        "rounds": method.rounds,
        "local_epochs": method.local_epochs,
        "batch_size": method.batch_size,
        "partition": method.partition,
        "alpha": method.alpha if method.partition == "dirichlet" else None,
        "client_rows": [len(part) for part in parts],
        "client_labels": [int(len(np.unique(server.labels[part]))) for part in parts],
        "round_validation_accuracy": [curve[r] for r in sorted(curve)],
    }
    return FederatedRun(
        server.trainable,
        record,
        seconds,
        footprint(server.trainable.model, section.peak, seconds),
        last_round=list(getattr(strategy, "last_round", [])),
        partitions=parts,
    )


def _simulate(setup: FederatedSetup, serve: Any) -> None:
    """Flower's simulation engine: the ``ServerApp`` runs ``serve`` here; the clients run in Ray actors."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid)

    run_simulation(
        server_app=server_app,
        client_app=client_app(setup),
        num_supernodes=setup.method.clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )


def train_federated(
    dataset_path: str | Path, label_names: list[str], base: BaseSpec, method: FederatedMethod, seed: int, out_dir: Path
) -> FederatedRun:
    """Run the federation on the dataset at ``dataset_path`` and save the global model as a candidate folder."""
    setup = FederatedSetup(
        dataset_path=str(dataset_path), num_labels=len(label_names), base=base, method=method, seed=seed
    )
    run = run_federated(setup)
    records = {FOOTPRINT_KEY: run.footprint, FEDERATED_KEY: run.record}
    save_trainable(run.trainable, out_dir, method.name, base, label_names, run.seconds, records)
    return run
