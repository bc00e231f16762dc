"""Integrations of grouter routing with other training stacks.

* :mod:`grouter.integrations.hf`: train a Hugging Face transformers MoE causal LM (Qwen2-MoE,
  Qwen3-MoE, OLMoE, Mixtral) with stored or online Grouter routing instead of its own gates.
* :mod:`grouter.integrations.megatron`: a router for Megatron-core's ``MoESubmodules.router``, the
  spec helper that installs it, a Megatron-style dataset and a plan-realising data loader, Megatron's
  own trainer as an entry point, and routing replay (extra ``grouter[megatron]``).
* :mod:`grouter.integrations.routed_experts`: routing as ``routed_experts`` ``[batch, seq, layers, k]`` ids
  (vLLM, SGLang, NeMo-RL, Megatron's RouterReplay), to and from routing stores.
* :mod:`grouter.integrations.torchtitan`: a torchtitan router subclass, the config converter and
  a data loader that adds routing to the batch (extra ``grouter[torchtitan]``).

Nothing is imported here, so ``import grouter.integrations`` stays cheap; import the submodule.
"""
