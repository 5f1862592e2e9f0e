"""Speed-ups that patch or extend a library, each exact (the test suite proves it) and each switched by a parameter.

- `kv_cache`: the local backend keeps each conversation's keys and values, and the prompt prefix
  its task's chains share, across turns (`LocalBackend(prefix_cache=...)`; parameter `kv_cache`).
- `prefix_sharing`: in training, the prompt prefixes that rows of a batch share run once
  (parameter `share_prompt_prefix`).
- `completion_scoring`: in training, TRL scores only the completion tokens on CPU too
  (parameter `completion_only_scoring`).
- `grouped_attention`: in training, attention reads each key/value head once instead of a copy
  per query head (parameter `grouped_kv_attention`): less memory.
- `recompute`: in training, each decoder layer reruns in the backward pass instead of keeping its
  activations, with the cache restored so prefix sharing keeps working (parameter
  `recompute_layers`): memory for time, not a speed-up; on in the workshop profile.

Each module that patches a library has a `check()` that fails loudly when the pinned version
no longer has what the patch relies on, rather than letting the patch silently do nothing.
"""
