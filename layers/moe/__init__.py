"""Mixture of Experts: routers, dropless expert execution (torch grouped / batched matmul | megablocks), losses.

`MoEMLP` is registered as the MLP kind "moe" (`layers.mlp.KINDS["moe"]`). Its parts:
- routers.py: softmax top-k, sigmoid top-k with aux-loss-free balancing bias, top-p (dynamic k);
- dispatch.py: sorting tokens by expert, the gather / combine autograd functions;
- experts.py: SwiGLU experts on sorted tokens, one grouped (or batched) matmul per projection;
- megablocks_backend.py: the same experts through megablocks' dMoE kernels on CUDA;
- losses.py: switch load-balancing loss, router z-loss, router entropy, load statistics;
- options.py: MoEOptions, the kind's options (the LM config's mlp_kwargs), self-validating;
- layer.py: MoEMLP, and setting k / top-p on its layers (the zoo LM's methods of the same names).

Adding a router is one class (a Router subclass with its OPTIONS) and one line in ROUTERS.
"""

from layers import mlp
from layers.moe.dispatch import DispatchPlan, combine, dispatch, make_plan
from layers.moe.experts import SwiGLUExperts, capacity_for
from layers.moe.layer import MoEMLP, moe_layers, set_num_experts_per_tok, set_top_p
from layers.moe.losses import load_balancing_loss, load_statistics, router_entropy_loss, router_z_loss
from layers.moe.options import MoEOptions
from layers.moe.routers import ROUTERS, Router, Routing, SigmoidTopKRouter, SoftmaxTopKRouter, TopPRouter

mlp.KINDS.register("moe", MoEMLP)

__all__ = [
    "ROUTERS", "DispatchPlan", "MoEMLP", "MoEOptions", "Router", "Routing", "SigmoidTopKRouter", "SoftmaxTopKRouter",
    "SwiGLUExperts", "TopPRouter", "capacity_for", "combine", "dispatch", "load_balancing_loss",
    "load_statistics", "make_plan", "moe_layers", "router_entropy_loss", "router_z_loss",
    "set_num_experts_per_tok", "set_top_p",
]
