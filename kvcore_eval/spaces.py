"""Names of the activation spaces a calibration records and a cache truncates (no heavy imports).

`key_pre_rope` is the paper's K = X·W_k (before RoPE), `key_post_rope` what a KV cache holds, `value` V = X·W_v.
A truncation names its key space by the short form (`pre_rope` / `post_rope`).
"""

from __future__ import annotations

from typing import Literal

KeySpace = Literal["pre_rope", "post_rope"]
Truncate = Literal["keys", "values", "both"]
Granularity = Literal["layer", "head"]

SPACES = ("key_pre_rope", "key_post_rope", "value")
KEY_SPACES: dict[str, str] = {"pre_rope": "key_pre_rope", "post_rope": "key_post_rope"}
DEFAULT_KEY_SPACE: KeySpace = "pre_rope"  # the paper's K = X·W_k
