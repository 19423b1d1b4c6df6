"""Position-tagged attention: keys rotated by ``key_pos - slot_pos`` and masked by position.

- :mod:`.rope`: RoPE parameters read off SGLang's rotary module; the delta rotation.
- :mod:`.reference`: the float32 torch spec (one request at a time).
- :mod:`.torch_path`: one row's key plan, gather + rotate + SDPA (deviation probes, tests).
- :mod:`.batch_plan` / :mod:`.batch_exec`: the torch path for a whole batch: one key plan per
  forward, then per layer one gather, rotation and SDPA by blocks of rows.
- :mod:`.triton_kernels` / :mod:`.triton_ops`: Triton extend/decode kernels with the rotation
  fused into the key load, and their wrappers (reference signatures).
- :mod:`.dispatch`: which code a batch runs (the user's backend or the tagged path).
- :mod:`.tagged` / :mod:`.hooks`: ``TaggedAttention`` over SGLang's pools and the hooks that
  route tagged batches to it. The only submodules that import SGLang.

Nothing is imported here, so the kernels and the reference load without SGLang (GPU check).
"""
