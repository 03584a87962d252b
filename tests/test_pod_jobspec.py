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
