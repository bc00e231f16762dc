"""Integrations of grouter routing with other training stacks.

* :mod:`grouter.integrations.hf`: train a Hugging Face transformers MoE causal LM (Qwen2-MoE,
  Qwen3-MoE, OLMoE, Mixtral) with stored or online Grouter routing instead of its own gates.

Nothing is imported here, so ``import grouter.integrations`` stays cheap; import the submodule.
"""
