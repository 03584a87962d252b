"""Job specs: the JobSet matches the slice, the sbatch script is valid bash with the distributed env."""

import shutil
import subprocess
import sys

import pytest
import yaml

from launch import jobspec

CONFIG = "experiments/tml_interaction_small.py"


def render(*args):
  out = subprocess.run([sys.executable, "-m", "launch.pod", *args], capture_output=True, text=True)
  return out


@pytest.mark.parametrize(
  ("topology", "hosts", "chips_per_host", "shape", "accelerator"),
  [("v5p-256", 32, 4, "4x4x8", "tpu-v5p-slice"), ("v6e-64", 16, 4, "8x8", "tpu-v6e-slice")],
)
def test_jobset_yaml_matches_the_slice(topology, hosts, chips_per_host, shape, accelerator):
  out = render(
    "--target", "gke-tpu", "--config", CONFIG, "--topology", topology, "--image", "img:1", "--workdir", "/mnt/w",
    "--dry-run", "--", "--config.train.steps=10",
  )  # fmt: skip
  assert out.returncode == 0, out.stderr
  spec = yaml.safe_load(out.stdout)
  assert spec["kind"] == "JobSet" and spec["apiVersion"].startswith("jobset.x-k8s.io/")
  job = spec["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["parallelism"] == job["completions"] == hosts
  pod = job["template"]["spec"]
  assert pod["nodeSelector"] == {
    "cloud.google.com/gke-tpu-accelerator": accelerator,
    "cloud.google.com/gke-tpu-topology": shape,
  }
  container = pod["containers"][0]
  assert container["resources"]["limits"]["google.com/tpu"] == chips_per_host
  assert hosts * chips_per_host == {"v5p-256": 128, "v6e-64": 64}[topology]
  env = {e["name"]: e["value"] for e in container["env"]}
  assert env["INTERACTION_COORDINATOR"] == "auto"
  script = container["command"][-1]
  assert "-m launch.train --config experiments/tml_interaction_small.py --workdir /mnt/w" in script
  assert script.endswith("--config.train.steps=10") and pod["terminationGracePeriodSeconds"] == 120


def test_sbatch_script_passes_bash_n_and_sets_the_distributed_env(tmp_path):
  out = render("--target", "slurm", "--config", CONFIG, "--topology", "4x8", "--workdir", "/shared/w", "--dry-run")
  assert out.returncode == 0, out.stderr
  script = out.stdout
  assert "#SBATCH --nodes=4" in script and "#SBATCH --gpus-per-node=8" in script
  assert "#SBATCH --signal=TERM@120" in script
  for var in ("INTERACTION_COORDINATOR=", "INTERACTION_NUM_PROCESSES=", "INTERACTION_PROCESS_ID=$SLURM_PROCID"):
    assert var in script
  assert "python -m launch.train --config experiments/tml_interaction_small.py --workdir /shared/w" in script
  path = tmp_path / "job.sbatch"
  path.write_text(script)
  bash = shutil.which("bash")
  assert bash, "bash is needed to check the script"
  check = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True)
  assert check.returncode == 0, check.stderr


def test_bad_requests_are_clear_errors():
  out = render("--target", "gke-tpu", "--config", CONFIG, "--topology", "v5p-3", "--image", "i", "--workdir", "/w")
  assert out.returncode == 2 and "unknown topology 'v5p-3'" in out.stderr
  out = render("--target", "gke-tpu", "--config", CONFIG, "--topology", "v5p-8", "--workdir", "/w")
  assert out.returncode == 2 and "--image is required" in out.stderr
  out = render("--target", "slurm", "--config", CONFIG, "--topology", "v5p-8", "--workdir", "/w")
  assert out.returncode == 2 and "NODESxGPUS_PER_NODE" in out.stderr
  with pytest.raises(ValueError, match="DNS label"):
    jobspec.check_name("Bad_Name")


# -- evaluation and serving ------------------------------------------------------------

K8S_VERSION = "1.33"


def k8s_valid(obj: dict) -> None:
  """Validate against Kubernetes' published OpenAPI schema of its kind (strict: unknown fields fail)."""
  import kubernetes_validate

  kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def as_pod_template(name: str, template: dict) -> dict:
  return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def test_the_validator_refuses_what_kubernetes_would():
  """The check below can fail: a misspelt field, a wrong type."""
  import kubernetes_validate

  good = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}}
  k8s_valid(good)
  for bad in ({"ports": [{"port": "eighty"}]}, {"ports": [{"port": 80}], "selectr": {"a": "b"}}):
    with pytest.raises(kubernetes_validate.ValidationError):
      k8s_valid({**good, "spec": bad})


def test_serve_renders_a_leader_worker_set_and_a_service_that_kubernetes_accepts():
  out = render(
    "--job", "serve", "--target", "gke-tpu", "--topology", "v5p-16", "--image", "img:1",
    "--checkpoint", "/mnt/run1", "--mesh", "expert=8", "--slots", "16", "--dry_run",
  )  # fmt: skip
  assert out.returncode == 0, out.stderr
  lws, service = yaml.safe_load_all(out.stdout)
  assert lws["kind"] == "LeaderWorkerSet" and lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
  group = lws["spec"]["leaderWorkerTemplate"]
  assert group["size"] == 2 and group["restartPolicy"] == "RecreateGroupOnPodRestart"  # v5p-16: 2 hosts x 4 chips
  for role in ("leader", "worker"):
    template = group[f"{role}Template"]
    k8s_valid(as_pod_template(f"interaction-serve-{role}", template))
    container = template["spec"]["containers"][0]
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    script = container["command"][-1]
    assert (
      "INTERACTION_PROCESS_ID=$LWS_WORKER_INDEX" in script and "INTERACTION_NUM_PROCESSES=$LWS_GROUP_SIZE" in script
    )
    assert "-m launch.serve --checkpoint /mnt/run1 --mesh expert=8 --slots 16 --host 0.0.0.0 --port 8000" in script
    env = {e["name"]: e for e in container["env"]}
    assert env["INTERACTION_SERVER_TOKEN"]["valueFrom"]["secretKeyRef"] == {
      "name": "interaction-serve-token",
      "key": "token",
    }
  leader = group["leaderTemplate"]["spec"]["containers"][0]
  assert leader["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 8000}
  assert "readinessProbe" not in group["workerTemplate"]["spec"]["containers"][0]
  k8s_valid(service)
  assert service["spec"]["selector"] == group["leaderTemplate"]["metadata"]["labels"]
  assert service["spec"]["ports"][0]["targetPort"] == 8000


def test_evaluate_renders_a_jobset_whose_job_kubernetes_accepts_and_an_sbatch_script():
  args = ["--job", "evaluate", "--topology", "v5p-16", "--checkpoint", "/mnt/run1", "--mesh", "data=2,expert=4"]
  out = render(*args, "--target", "gke-tpu", "--image", "img:1", "--eval_output", "/mnt/run1/eval", "--dry_run")
  assert out.returncode == 0, out.stderr
  spec = yaml.safe_load(out.stdout)
  assert spec["kind"] == "JobSet" and spec["metadata"]["name"] == "interaction-evaluate"
  job = spec["spec"]["replicatedJobs"][0]["template"]
  k8s_valid({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "evaluate"}, **job})
  script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
  assert "-m launch.evaluate --checkpoint /mnt/run1 --mesh data=2,expert=4 --output /mnt/run1/eval" in script
  out = render(*args[:2], "--topology", "2x8", *args[4:], "--target", "slurm", "--eval_output", "/e", "--dry_run")
  assert out.returncode == 0, out.stderr
  assert "#SBATCH --nodes=2" in out.stdout and "python -m launch.evaluate --checkpoint /mnt/run1" in out.stdout


def test_the_train_jobset_pod_and_every_job_missing_its_flags():
  out = render("--target", "gke-tpu", "--config", CONFIG, "--topology", "v5p-16", "--image", "i", "--workdir", "/w")
  job = yaml.safe_load(out.stdout)["spec"]["replicatedJobs"][0]["template"]
  k8s_valid({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "train"}, **job})
  for job, needs in [("train", "--config, --workdir"), ("serve", "--checkpoint, --mesh")]:
    out = render("--job", job, "--target", "slurm", "--topology", "2x8")
    assert out.returncode == 2 and f"--job {job} needs {needs}" in out.stderr, out.stderr
