r"""The target configuration: 276B total / 12B active parameters.

  python -m launch.inspect --config experiments/tml_interaction_small.py --mesh fsdp=16,expert=16

Counts from ``jax.eval_shape`` (nothing allocated): about 276B parameters in
total and 11.9B active per token. The decoder is 57 layers at d_model 4096 with
64 query heads and 8 kv heads of 128 (QK-norm); the first layer is dense, the
other 56 are MoE with 256 fine-grained experts (ffn 1536), top-6 with sigmoid
scoring, plus one shared expert.

Streams per 200 ms micro-turn (32 tokens, 160 tokens per second of stream):
  audio_in   5 dMel frames (40 ms stride), 80 mel channels x 16 levels
  video_in  12 patches of 40x40: one 120x160 RGB frame at 5 fps
  text_in    5 byte tokens (typed text, tool and background results)
  text_out   5 byte tokens (inner monologue, transcript, tool calls)
  audio_out  5 mel frames from the flow-matching head, fed back as dMel
A training window is 128 micro-turns = 4096 tokens (25.6 s); the attention
window and the serving cache hold 32768 tokens (1024 micro-turns, 204.8 s).
"""

import ml_collections


def audio(direction):
  return dict(direction=direction, kind="audio", slots=5, mel_channels=80, mel_levels=16, mel_min=-11.5, mel_max=2.5)


def get_config():
  c = ml_collections.ConfigDict()
  c.stream_order = ("audio_in", "video_in", "text_in", "text_out", "audio_out")
  c.streams = ml_collections.ConfigDict(
    dict(
      audio_in=audio("in"),
      video_in=dict(direction="in", kind="video", slots=12, patch_size=40, patches_per_row=4),
      text_in=dict(direction="in", kind="text", slots=5, vocab_size=272),
      text_out=dict(direction="out", kind="text", slots=5, vocab_size=272),
      audio_out=audio("out"),
    )
  )
  c.model = ml_collections.ConfigDict(
    dict(
      d_model=4096,
      num_layers=57,
      num_heads=64,
      num_kv_heads=8,
      head_dim=128,
      qk_norm=True,
      rope_theta=1_000_000.0,
      attention_window=32768,
      num_dense_layers=1,
      dense_ffn_dim=10944,
      num_experts=256,
      experts_per_token=6,
      expert_ffn_dim=1536,
      num_shared_experts=1,
      router_scoring="sigmoid",
      video_hidden=256,
      flow_hidden=1024,
      flow_layers=4,
      flow_steps=8,
      dtype="bfloat16",
      param_dtype="float32",
      # Pod targets (python -m launch.aot): full remat and dispatch in 8 chunks keep the v5p-256 train
      # step under 60 GiB per chip; see benchmarks/aot_report.py.
      remat="full",
      moe_chunks=8,
    )
  )
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=16, tensor=1))
  # The expert axis also splits the batch, so dense weights are sharded over it too (ZeRO-3 over all
  # data-parallel axes); with "fsdp" alone they would take 8x their share of memory on v5p-256.
  c.rules = ml_collections.ConfigDict(dict(embed=("fsdp", "expert")))
  c.data = ml_collections.ConfigDict(dict(window_turns=128, batch_size=256, seed=0))
  c.train = ml_collections.ConfigDict(
    dict(
      steps=100_000,
      lr=3e-4,
      warmup_steps=2000,
      min_lr_ratio=0.1,
      weight_decay=0.1,
      b1=0.9,
      b2=0.95,
      clip_norm=1.0,
      grad_accum=2,  # 128 windows per microbatch: one per chip on v5p-256 (use 4 on v5p-128)
      moment_dtype="bfloat16",  # Adam moments stored in bf16: 16 GiB/chip less on v5p-128 (train.optimizer)
      aux_weight=0.001,
      z_weight=1e-4,
      listen_weight=1.0,  # the listening loss (objective.heard_logprobs)
      time_offset_turns=18000,  # a window's clock starts anywhere in the first hour (train_step)
      transition_weight=3.0,  # as tiny: speech starts and stops weigh 3x (barge-in honoured 0.40 -> 0.98 there)
      seed=0,
      log_every=10,
      checkpoint_every=500,
      keep_checkpoints=3,
      max_bad_steps=20,
    )
  )
  # Serving on v5p-16 (8 chips): experts and session slots split 8 ways, weights in bfloat16.
  c.serve = ml_collections.ConfigDict(dict(slots=16, cache_tokens=32768, mesh=dict(expert=8)))
  return c
