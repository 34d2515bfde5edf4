"""An independent, in-memory HC-SMoE: the whole model, forward hooks, scipy linkage.

Written from the paper's definitions, sharing no code with streammerge, so the streaming pipeline
can be checked against it.
"""

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from transformers import AutoModelForCausalLM


@torch.no_grad()
def hcsmoe(model_dir, tokens, experts_kept, method="average", metric="euclidean", merge="freq"):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = model.config
    top_k = config.num_experts_per_tok
    moe_inputs = {}
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda m, args, i=i: moe_inputs.__setitem__(i, args[0]))
        for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")
    ]
    model(tokens)
    for hook in hooks:
        hook.remove()
    result = {}
    for i, x in moe_inputs.items():
        mlp = model.model.layers[i].mlp
        x = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(x @ mlp.gate.weight.T, dim=-1)
        chosen = probs.topk(top_k, dim=-1).indices
        counts = torch.bincount(chosen.flatten(), minlength=probs.shape[1])
        frequencies = counts.double() / counts.sum()
        gate_up, down = mlp.experts.gate_up_proj, mlp.experts.down_proj
        inter = down.shape[-1]
        experts = []
        means = []
        for e in range(gate_up.shape[0]):
            gate, up = gate_up[e, :inter], gate_up[e, inter:]
            out = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down[e].T
            means.append(out.double().mean(0))
            experts.append((gate, up, down[e]))
        means = torch.stack(means).numpy()
        labels = cut_tree(linkage(means, method=method, metric=metric), n_clusters=experts_kept).ravel()
        clusters = [[int(e) for e in np.flatnonzero(labels == c)] for c in np.unique(labels)]
        merged = []
        for members in clusters:
            w = frequencies[members] if merge == "freq" else torch.ones(len(members), dtype=torch.float64)
            w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / len(members))  # never-used members
            merged.append(tuple(sum(float(wj) * experts[m][p] for wj, m in zip(w, members)) for p in range(3)))
        result[i] = dict(counts=counts, mean_outputs=means, clusters=clusters, merged=merged, router=mlp.gate.weight)
    return result
