"""Fine-tuning in several processes with torch DDP, launched by ``torchrun``: the same recipe, data-parallel.

Why torchrun and the Trainer, nothing home-made: the Trainer already runs data-parallel when it is started
by ``torchrun`` (it reads ``WORLD_SIZE``/``LOCAL_RANK``, wraps the model in ``DistributedDataParallel``,
shards the batches with a distributed sampler, averages gradients with all-reduce, and lets rank 0 write
checkpoints). This module is what each process runs: it reads the call that
:func:`tasks.finetune.train_classifier` would have made from a JSON file and makes it. The calling task waits
for ``torchrun`` and takes the model rank 0 saved.

Recipe kept: the global batch stays ``config.batch_size`` (each of N processes takes 1/N of it), so the
number of optimizer steps, the learning-rate schedule and the epochs are those of one process. Backend:
gloo on CPUs (nccl where each process has a GPU). On CPUs the processes share the cores, so each gets
``cores / N`` threads: on 2 cores, 2 processes cannot beat one (measured and reported, not hidden).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

CALL_FILE = "ddp-call.json"


def launch(call: dict[str, Any], processes: int, work_dir: Path, log: Any) -> None:
    """Run ``train_classifier(**call)`` in ``processes`` processes under torchrun; raise if any rank fails."""
    work_dir.mkdir(parents=True, exist_ok=True)
    call_file = work_dir / CALL_FILE
    call_file.write_text(json.dumps(call))
    cores = os.cpu_count() or 1
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(max(1, cores // processes)),  # the processes share the machine's cores
        "DOMAINFLOW_DDP_CHILD": "1",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # one machine: a local rendezvous on a free port
        f"--nproc-per-node={processes}",
        "-m",
        "tasks.distributed_train",
        str(call_file),
    ]
    log.info("fine-tuning in %d processes (torch DDP, %s): %s", processes, backend(), " ".join(command[2:]))
    finished = subprocess.run(command, env=env, check=False)
    if finished.returncode != 0:
        raise RuntimeError(
            f"distributed fine-tuning failed (torchrun exit {finished.returncode}); its ranks' output is above"
        )


def backend() -> str:
    """nccl when every process can have a GPU, else gloo (CPUs)."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def main(argv: list[str] | None = None) -> None:
    from domainflow.records import DatasetRef
    from domainflow.settings import configure_environment

    configure_environment()
    from tasks.finetune import TrainConfig, train_classifier

    (call_file,) = argv if argv is not None else sys.argv[1:]
    call = json.loads(Path(call_file).read_text())
    call["dataset"] = DatasetRef.model_validate(call["dataset"])
    call["config"] = TrainConfig.model_validate(call["config"])
    for key in ("init_dir", "out_dir", "teacher_dir", "checkpoints"):
        if call.get(key) is not None:
            call[key] = Path(call[key])
    if call.get("adapter") is not None:  # a parameter-efficient candidate's method (domainflow.peft_models)
        from domainflow.peft_models import AdapterMethod

        call["adapter"] = AdapterMethod.model_validate(call["adapter"])
    train_classifier(**call)


if __name__ == "__main__":
    main()
