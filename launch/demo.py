r"""The end-to-end demo on the embedded default (``make demo``).

  python -m launch.demo --config experiments/tiny.py --workdir workdir/demo

Generates the synthetic interaction tasks, trains the tiny model for the
config's step budget on 8 virtual CPU devices with checkpoints, restores the
final checkpoint onto one device, replays the held-out conversations through
the micro-turn step (the serving path) and prints what the model does per task,
then streams them through the sessions engine free-running and prints the
interaction metrics beside their targets (serving/README.md).
"""

import pathlib

from absl import flags
from ml_collections import config_flags

from launch import (
  cli,
  cpu_devices,  # noqa: F401  (must precede jax)
)

FLAGS = cli.flag_values()
_CONFIG = config_flags.DEFINE_config_file("config", "experiments/tiny.py", "Experiment config file.", flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/demo", "Where data, checkpoints and metrics go.", flag_values=FLAGS)
_REPLAY_TURNS = flags.DEFINE_integer(
  "replay_turns", 56, "Micro-turns per replayed conversation (longer ones are cut).", flag_values=FLAGS
)


def main(argv=None) -> int:
  cli.parse(FLAGS, argv, doc=__doc__, prog="python -m launch.demo")
  from data_pipeline import synthetic
  from data_pipeline.pipeline import make_pipeline
  from interaction.ckpt import open_model
  from interaction.experiment import experiment
  from launch import trainer
  from serving.eval import evaluate, replay

  config, workdir = experiment(_CONFIG.value), pathlib.Path(_WORKDIR.value)
  summary = trainer.run(config, workdir)
  loaded = open_model(workdir)  # the newest step's parameters on one device; the optimizer state stays on disk
  data_dir = trainer.prepare_data(config, workdir)
  batches = make_pipeline(
    config, data_dir, split="eval", window_turns=_REPLAY_TURNS.value, num_epochs=1, shuffle=False, process_count=1
  )
  scores = replay.replay(loaded.cfg, loaded.graphdef, loaded.params, batches, cache_tokens=loaded.cache_tokens)
  print()
  print(
    f"trained {summary['step']} steps; held-out loss {summary['eval']['total']:.4f} "
    f"(text cross-entropy {summary['eval']['text_ce']:.4f}, flow {summary['eval']['flow']:.4f})"
  )
  print(f"checkpoint step {loaded.step} restored onto 1 device; held-out conversations replayed through the step:")
  print(f"{'task':<22}{'says the right byte':>20}{'stays silent':>14}{'mean log p':>12}")
  for task_id in sorted(scores):
    s = scores[task_id]
    spoken = f"{s['spoken_acc']:.1%}" if s["spoken_slots"] else "(says nothing)"
    print(f"{synthetic.TASKS[task_id]:<22}{spoken:>20}{s['silent_acc']:>14.1%}{s['mean_logprob']:>12.3f}")
  print("(greedy choice per text_out slot given the true past, teacher-forced at every 200 ms tick)")
  print()
  print("free-running evaluation: held-out conversations streamed through the sessions engine in simulated real time")
  evaluate.run(workdir, data_dir, slots=32, output_dir=workdir / "eval")
  print(f"report and timeline PNGs: {workdir / 'eval'}")
  print(f"talk to it live (browser client at the printed URL): python -m launch.serve --checkpoint {workdir}")
  return 0


if __name__ == "__main__":
  cli.run(main, refused=(ValueError,))
