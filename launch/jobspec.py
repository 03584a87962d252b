"""Job specs that run a job on a cluster: a GKE JobSet (training, evaluation) or LeaderWorkerSet and Service
(live serving) for TPU slices, an sbatch script for GPUs.

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
from serving.protocol import HEALTH_PATH

GKE_ACCELERATORS = {
  "v4": "tpu-v4-podslice",
  "v5e": "tpu-v5-lite-podslice",
  "v5p": "tpu-v5p-slice",
  "v6e": "tpu-v6e-slice",
}
COORDINATOR_PORT = 8476
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")


SERVE_PORT = 8000
TOKEN_SECRET_KEY = "token"


def train_command(config: str, workdir: str, overrides: list[str] | tuple = ()) -> list[str]:
  return ["python", "-m", "launch.train", "--config", config, "--workdir", workdir, "--noprogress", *overrides]


def evaluate_command(checkpoint: str, mesh: str, output: str, extra: list[str] | tuple = ()) -> list[str]:
  return ["python", "-m", "launch.evaluate", "--checkpoint", checkpoint, "--mesh", mesh, "--output", output, *extra]


def serve_command(checkpoint: str, mesh: str, slots: int, extra: list[str] | tuple = ()) -> list[str]:
  """``launch.serve`` on every process; process 0 listens on all interfaces (its Service is the way in)."""
  return [
    "python", "-m", "launch.serve", "--checkpoint", checkpoint, "--mesh", mesh, "--slots", str(slots),
    "--host", "0.0.0.0", "--port", str(SERVE_PORT), *extra,
  ]  # fmt: skip


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
  pod = tpu_pod(topo, image, command, env, {"xpk.google.com/workload": name}, grace_s=grace_s, restart="Never")
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


def tpu_pod(
  topo, image: str, command: list[str], env: list, labels: dict, *, grace_s: int, restart: str, ports=(), prefix=""
):
  """A pod template for one TPU host of the slice ``topo`` running ``command`` (after the shell's ``prefix``)."""
  container = {
    "name": "jax-tpu",
    "image": image,
    "imagePullPolicy": "Always",
    "command": ["bash", "-c", prefix + shlex.join(command)],
    "env": env,
    "ports": [{"containerPort": 8471}, {"containerPort": 8080}, {"containerPort": COORDINATOR_PORT}, *ports],
    "securityContext": {"privileged": True},
    "resources": {"limits": {"google.com/tpu": topo.chips_per_host}},
  }
  return {
    "metadata": {"labels": labels},
    "spec": {
      "schedulerName": "default-scheduler",
      "restartPolicy": restart,
      "hostNetwork": True,
      "dnsPolicy": "ClusterFirstWithHostNet",
      # SIGTERM first: training checkpoints the same step on every process, serving drains; then exit 0.
      "terminationGracePeriodSeconds": grace_s,
      "nodeSelector": {
        "cloud.google.com/gke-tpu-accelerator": GKE_ACCELERATORS[topo.chip.name],
        "cloud.google.com/gke-tpu-topology": topo.shape,
      },
      "containers": [container],
    },
  }


def leader_worker_set(
  name: str,
  topology: str,
  image: str,
  command: list[str],
  *,
  grace_s: int = 120,
  barrier_timeout_s: int = 300,
  token_secret: str | None = None,
) -> list[dict]:
  """A LeaderWorkerSet (one group: the leader is process 0, with the WebSocket front end; the workers are the
  slice's other hosts) and a Service to the leader's port. The processes find each other through the
  variables LWS sets (the leader's address, the group size, each pod's index); the access token comes
  from the Secret ``token_secret`` (key ``token``)."""
  topo = parse_topology(topology)
  check_name(name)
  token_secret = token_secret or f"{name}-token"
  # LWS gives every container the leader's address, the group size and the pod's index in the group.
  prefix = (
    f"INTERACTION_COORDINATOR=$LWS_LEADER_ADDRESS:{COORDINATOR_PORT} INTERACTION_NUM_PROCESSES=$LWS_GROUP_SIZE "
    "INTERACTION_PROCESS_ID=$LWS_WORKER_INDEX exec "
  )
  env = [
    {"name": "INTERACTION_BARRIER_TIMEOUT", "value": str(barrier_timeout_s)},
    {
      "name": "INTERACTION_SERVER_TOKEN",
      "valueFrom": {"secretKeyRef": {"name": token_secret, "key": TOKEN_SECRET_KEY}},
    },
  ]
  leader = tpu_pod(
    topo, image, command, env, {"app": name, "role": "leader"}, grace_s=grace_s, restart="Always",
    ports=[{"containerPort": SERVE_PORT, "name": "websocket"}], prefix=prefix,
  )  # fmt: skip
  leader["spec"]["containers"][0]["readinessProbe"] = {
    "httpGet": {"path": HEALTH_PATH, "port": SERVE_PORT},
    "periodSeconds": 5,
    "failureThreshold": 3,
  }
  worker = tpu_pod(
    topo, image, command, env, {"app": name, "role": "worker"}, grace_s=grace_s, restart="Always", prefix=prefix
  )
  lws = {
    "apiVersion": "leaderworkerset.x-k8s.io/v1",
    "kind": "LeaderWorkerSet",
    "metadata": {"name": name},
    "spec": {
      "replicas": 1,
      "startupPolicy": "LeaderCreated",
      "leaderWorkerTemplate": {
        "size": topo.hosts,
        # A lost process ends the group's server (exit 75): the group restarts as one.
        "restartPolicy": "RecreateGroupOnPodRestart",
        "leaderTemplate": leader,
        "workerTemplate": worker,
      },
    },
  }
  service = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": name},
    "spec": {
      "selector": {"app": name, "role": "leader"},
      "ports": [{"name": "websocket", "port": SERVE_PORT, "targetPort": SERVE_PORT, "protocol": "TCP"}],
    },
  }
  return [lws, service]


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
# the time limit (or on preemption): training checkpoints the same step on every process and exits 0
# (resubmitting resumes from it); a live server drains its sessions and exits 0.
set -euo pipefail
{setup}
COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export INTERACTION_COORDINATOR="$COORDINATOR_HOST:{COORDINATOR_PORT}"
export INTERACTION_NUM_PROCESSES=$SLURM_NNODES
export INTERACTION_BARRIER_TIMEOUT={barrier_timeout_s}
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c {shlex.quote(inner)}
"""
