"""Position-tagged attention: keys rotated by ``key_pos - slot_pos`` and masked by position.

- :mod:`.rope`: RoPE parameters read off SGLang's rotary module; the delta rotation.
- :mod:`.reference`: the float32 torch spec (one request at a time).
- :mod:`.torch_path`: the backend's per-request gather + rotate + SDPA.
- :mod:`.backend`: ``TokenDanceAttnBackend`` (SGLang's torch_native + the above), registered
  as ``--attention-backend tokendance``. The only submodule that imports SGLang.
- :mod:`.triton_kernels` / :mod:`.triton_ops`: Triton extend/decode kernels with the rotation
  fused into the key load, and their wrappers (reference signatures).

Nothing is imported here, so the kernels and the reference load without SGLang (GPU check).
"""
