"""Job specs that run ``launch.train`` on a cluster: a GKE JobSet for TPU slices, an sbatch script for GPUs.

Both start one process per host and give it what ``interaction.distributed``
reads: on GKE, ``INTERACTION_COORDINATOR=auto`` (jax finds the slice's hosts
from the TPU environment GKE sets); under Slurm, the first node as coordinator,
the task count and ``SLURM_PROCID``. Both send SIGTERM ahead of a kill, which
the trainer turns into a checkpoint at the same step on every process.
"""

from __future__ import annotations

import re
import shlex

from launch.topology import parse_topology

GKE_ACCELERATORS = {
  "v4": "tpu-v4-podslice",
  "v5e": "tpu-v5-lite-podslice",
  "v5p": "tpu-v5p-slice",
  "v6e": "tpu-v6e-slice",
}
COORDINATOR_PORT = 8476
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")


def train_command(config: str, workdir: str, overrides: list[str] | tuple = ()) -> list[str]:
  return ["python", "-m", "launch.train", "--config", config, "--workdir", workdir, "--noprogress", *overrides]


def check_name(name: str) -> str:
  if not _NAME.match(name):
    raise ValueError(f"job name {name!r} must be a DNS label: lowercase letters, digits and '-', at most 40 chars")
  return name


def jobset(
  name: str,
  topology: str,
  image: str,
  command: list[str],
  *,
  grace_s: int = 120,
  max_restarts: int = 3,
  barrier_timeout_s: int = 300,
  queue: str | None = None,
) -> dict:
  """A JobSet with one Job of one pod per TPU host, shaped like the ones xpk creates."""
  topo = parse_topology(topology)
  check_name(name)
  env = [
    {"name": "INTERACTION_COORDINATOR", "value": "auto"},
    {"name": "INTERACTION_BARRIER_TIMEOUT", "value": str(barrier_timeout_s)},
    {"name": "JOBSET_NAME", "value": name},
  ]
  container = {
    "name": "jax-tpu",
    "image": image,
    "imagePullPolicy": "Always",
    "command": ["bash", "-c", shlex.join(command)],
    "env": env,
    "ports": [{"containerPort": 8471}, {"containerPort": 8080}, {"containerPort": COORDINATOR_PORT}],
    "securityContext": {"privileged": True},
    "resources": {"limits": {"google.com/tpu": topo.chips_per_host}},
  }
  pod = {
    "metadata": {"labels": {"xpk.google.com/workload": name}},
    "spec": {
      "schedulerName": "default-scheduler",
      "restartPolicy": "Never",
      "hostNetwork": True,
      "dnsPolicy": "ClusterFirstWithHostNet",
      # SIGTERM first: every process checkpoints the same step, then exits 0.
      "terminationGracePeriodSeconds": grace_s,
      "nodeSelector": {
        "cloud.google.com/gke-tpu-accelerator": GKE_ACCELERATORS[topo.chip.name],
        "cloud.google.com/gke-tpu-topology": topo.shape,
      },
      "containers": [container],
    },
  }
  labels = {"xpk.google.com/workload": name}
  if queue:
    labels["kueue.x-k8s.io/queue-name"] = queue
  return {
    "apiVersion": "jobset.x-k8s.io/v1alpha2",
    "kind": "JobSet",
    "metadata": {
      "name": name,
      "labels": labels,
      "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"},
    },
    "spec": {
      "failurePolicy": {"maxRestarts": max_restarts},
      "replicatedJobs": [
        {
          "name": "slice-job",
          "replicas": 1,
          "template": {
            "spec": {
              "parallelism": topo.hosts,
              "completions": topo.hosts,
              "backoffLimit": 0,
              "template": pod,
            }
          },
        }
      ],
    },
  }


def parse_gpu_topology(text: str) -> tuple[int, int]:
  """``"4x8"`` -> (4 nodes, 8 GPUs per node)."""
  found = re.fullmatch(r"(\d+)x(\d+)", text or "")
  if not found or int(found.group(1)) < 1 or int(found.group(2)) < 1:
    raise ValueError(f"slurm topology must be NODESxGPUS_PER_NODE, e.g. 4x8; got {text!r}")
  return int(found.group(1)), int(found.group(2))


def sbatch(
  name: str,
  topology: str,
  command: list[str],
  *,
  time_limit: str = "24:00:00",
  grace_s: int = 120,
  barrier_timeout_s: int = 300,
  setup: str = "",
) -> str:
  """An sbatch script: one task per node, jax.distributed env from Slurm, SIGTERM ``grace_s`` before the limit."""
  nodes, gpus = parse_gpu_topology(topology)
  check_name(name)
  inner = f"INTERACTION_PROCESS_ID=$SLURM_PROCID exec {shlex.join(command)}"
  return f"""#!/bin/bash
#SBATCH --job-name={name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --exclusive
#SBATCH --time={time_limit}
#SBATCH --signal=TERM@{grace_s}
#SBATCH --output={name}-%j.log
# One JAX process per node drives its {gpus} GPUs; {nodes * gpus} GPUs in all. SIGTERM {grace_s} s before
# the time limit (or on preemption) makes every process checkpoint the same step and exit 0;
# resubmitting resumes from it.
set -euo pipefail
{setup}
COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export INTERACTION_COORDINATOR="$COORDINATOR_HOST:{COORDINATOR_PORT}"
export INTERACTION_NUM_PROCESSES=$SLURM_NNODES
export INTERACTION_BARRIER_TIMEOUT={barrier_timeout_s}
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c {shlex.quote(inner)}
"""
