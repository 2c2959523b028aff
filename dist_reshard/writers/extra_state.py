"""`_extra_state` entries that Megatron linear layers carry in their state dicts.

They hold FP8 metadata for TransformerEngine layers and nothing for local ones; converters write them as
None so strict loads and torch_dist loads (which require them) both succeed.
"""

from __future__ import annotations

import re

# Megatron linear modules (inside a transformer layer, an MTP layer's eh_proj, and the output layer) owning an
# `_extra_state`.
# Grouped-GEMM experts keep one `_extra_state` per module beside `weight0`, `weight1`, ...
_LINEAR = re.compile(r"^(?P<module>.*\.(linear_qkv|linear_proj|linear_fc1|linear_fc2|linear_q_proj|linear_q_down_proj"
                     r"|linear_q_up_proj|linear_kv_down_proj|linear_kv_up_proj|mixer\.in_proj|mixer\.out_proj"
                     r"|eh_proj|self_attention\.in_proj|self_attention\.out_proj)"
                     r"|(?:.*\.)?output_layer)\.weight(\d*|\.(z|x|B|C|dt|query|key|value|beta|alpha))$")
# (Mamba's and the gated DeltaNet's in_proj: per section in torch_dist)


def linear_modules(keys) -> list[str]:
    """Module names (e.g. `decoder.layers.0.self_attention.linear_qkv`) owning a linear weight."""
    out = []
    for k in keys:
        m = _LINEAR.match(k)
        if m and m.group("module") not in out:
            out.append(m.group("module"))
    return out
