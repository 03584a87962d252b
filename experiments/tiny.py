r"""Tiny interaction model: trains on 2 CPU cores in minutes.

  python -m launch.inspect --config experiments/tiny.py --mesh data=2,expert=4

About 2.5M parameters: 4 decoder layers (1 dense, 3 MoE with 8 experts, top-2),
d_model 128. One micro-turn is 17 tokens: 4 dMel frames of user audio (50 ms
stride, 32 channels x 16 levels), one 40x40 video patch, 4 text-in bytes, then
4 text-out bytes and 4 mel frames of the model's speech.
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
  c.data = ml_collections.ConfigDict(dict(window_turns=16, batch_size=8, seed=0))
  c.serve = ml_collections.ConfigDict(dict(slots=8, cache_tokens=512))
  return c
