"""The rows every routed-expert family shares: pre-MLP norm, router, experts, optional shared expert.

Megatron-Core keeps the MoE layer's pre-MLP norm as its own module (`pre_mlp_layernorm`), where dense
TE layers fuse it into `linear_fc1`; its local spec still keys it `mlp.linear_fc1.layer_norm_weight` in
torch_dist. Experts are TP-split by the expert tensor-parallel size and stored in torch_dist on an
expert axis (`mlp.experts.experts.*`), whichever expert implementation wrote them.
"""

from .mapping import Kind, rule


def routed_experts(router: str, experts: str, gate: str, up: str, down: str) -> tuple:
    """`router`: HF router weight; `experts`: HF prefix of expert `{e}`; gate/up/down: its projections."""
    return (
        rule("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", Kind.REPLICATED, where="moe",
             local_dist_key="mlp.linear_fc1.layer_norm_weight"),
        rule("mlp.router.weight", router, Kind.REPLICATED, where="moe"),
        rule("mlp.experts.local_experts.{e}.linear_fc1.weight",
             (f"{experts}.{{e}}.{gate}.weight", f"{experts}.{{e}}.{up}.weight"), Kind.GLU, where="moe",
             expert=True, ffn="expert", grouped="mlp.experts.linear_fc1.weight{e}",
             dist_key="mlp.experts.experts.linear_fc1.weight"),
        rule("mlp.experts.local_experts.{e}.linear_fc2.weight", f"{experts}.{{e}}.{down}.weight", Kind.ROW,
             where="moe", expert=True, ffn="expert", grouped="mlp.experts.linear_fc2.weight{e}",
             dist_key="mlp.experts.experts.linear_fc2.weight"),
    )


def shared_expert(prefix: str, gate: str | None) -> tuple:
    """An always-on expert beside the routed ones, TP-split like a dense MLP, scaled by sigmoid(gate) when
    there is a gate (Qwen2-MoE; DeepSeek's shared experts are ungated)."""
    rows = (
        rule("mlp.shared_experts.linear_fc1.weight", (f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight"),
             Kind.GLU, where="moe", ffn="shared"),
        rule("mlp.shared_experts.linear_fc2.weight", f"{prefix}.down_proj.weight", Kind.ROW, where="moe",
             ffn="shared"),
    )
    if gate is None:
        return rows
    return rows + (rule("mlp.shared_experts.gate_weight", gate, Kind.REPLICATED, where="moe"),)
