"""Compact decoder layers for families transformers has no class for (Grok-1, DeepSeekMoE v1).

Each file is one model's decoder layer, built from transformers' own pieces (rotary embeddings,
attention kernels, fused expert stacks, llama layers) where they match, and written out where the
model differs. They follow transformers' decoder-layer interface — `Layer(config, layer_idx)`,
`forward(hidden, attention_mask=, position_ids=, position_embeddings=) -> hidden`, the MoE block
under `.mlp` with `.gate` and fused `.experts` — so `moe_ray.runtime.LayerRange` runs them exactly
like a transformers model. Parameter names are the hub checkpoint's, so a layer loads with the
family adapter's `layer_state`.
"""
