r"""Tiny interaction model: trains on 2 CPU cores in minutes.

  python -m launch.inspect --config experiments/tiny.py --mesh data=2,expert=4

About 2.5M parameters: 4 decoder layers (1 dense, 3 MoE with 8 experts, top-2),
d_model 128. One micro-turn is 17 tokens: 4 dMel frames of user audio (50 ms
stride, 32 channels x 16 levels), one 40x40 video patch, 4 text-in bytes, then
4 text-out bytes and 4 mel frames of the model's speech.

  python -m launch.train --config experiments/tiny.py --workdir /tmp/tiny

trains 600 steps (about 11 minutes on 2 CPU cores, ~4.3k tokens/s) on the
embedded synthetic tasks, in 32-micro-turn windows: serving attends over the
512-token attention window (30 micro-turns), so training windows must be at
least that long or the model meets contexts longer than it ever trained on
(with 16-turn windows it answered the first question of a conversation and
ignored the second). Expect the held-out text cross-entropy to fall from ~5.6
to below 0.25 nats (a quarter of the 1.05-nat unigram entropy of text_out
bytes; tests/test_train.py checks it at 150 steps) and the flow-matching loss
from ~1.3 to below 0.25.
"""

import ml_collections


def audio(direction):
  return dict(direction=direction, kind="audio", slots=4, mel_channels=32, mel_levels=16, mel_min=-11.5, mel_max=2.5)


def get_config():
  c = ml_collections.ConfigDict()
  c.stream_order = ("audio_in", "video_in", "text_in", "text_out", "audio_out")
  c.streams = ml_collections.ConfigDict(
    dict(
      audio_in=audio("in"),
      video_in=dict(direction="in", kind="video", slots=1, patch_size=40),
      text_in=dict(direction="in", kind="text", slots=4, vocab_size=272),
      text_out=dict(direction="out", kind="text", slots=4, vocab_size=272),
      audio_out=audio("out"),
    )
  )
  c.model = ml_collections.ConfigDict(
    dict(
      d_model=128,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      head_dim=32,
      qk_norm=True,
      attention_window=512,
      num_dense_layers=1,
      dense_ffn_dim=512,
      num_experts=8,
      experts_per_token=2,
      expert_ffn_dim=128,
      num_shared_experts=1,
      router_scoring="softmax",
      video_hidden=64,
      flow_hidden=256,
      flow_layers=2,
      flow_steps=8,
      dtype="float32",
      param_dtype="float32",
      remat="none",
    )
  )
  # Mesh axis sizes; -1 takes the devices left over.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=4, tensor=1))
  c.data = ml_collections.ConfigDict(
    dict(
      dir="",  # empty: generate the embedded synthetic tasks into the workdir
      synthetic_train=2048,
      synthetic_eval=448,  # 64 per task (the eval split is always even): each behaviour rate is judged on 47-95 events
      synthetic_mix=dict(visual_interjection=3),  # train mix: a third visual (seeing is the slowest skill to learn)
      window_turns=32,
      batch_size=8,
      seed=0,
      workers=0,
      read_threads=1,
      bad_records="fail",
    )
  )
  c.train = ml_collections.ConfigDict(
    dict(
      steps=600,  # the demo's budget: about 11 minutes on 2 CPU cores
      lr=3e-3,
      warmup_steps=50,
      min_lr_ratio=0.1,
      weight_decay=0.01,
      b1=0.9,
      b2=0.95,
      clip_norm=1.0,
      grad_accum=1,
      aux_weight=0.01,
      z_weight=1e-3,
      listen_weight=1.0,  # the listening loss (objective.heard_logprobs): audio frames predict the word heard
      time_offset_turns=18000,  # each window's clock starts at a random turn in [0, this] (one hour; train_step)
      transition_weight=3.0,  # loss weight of output slots where speech starts or stops (objective.transition_weights)
      seed=0,
      log_every=10,
      checkpoint_every=100,
      keep_checkpoints=3,
      max_bad_steps=5,
    )
  )
  c.serve = ml_collections.ConfigDict(dict(slots=8, cache_tokens=512))
  return c
