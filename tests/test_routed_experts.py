"""Recording a trained built-in model's own routing as a per-layer store (the learned router's routing)."""

import numpy as np
import pytest
import torch

from grouter.errors import GrouterError
from grouter.formats.store import RoutingStore
from grouter.integrations.routed_experts import IDS_ONLY, import_routed_experts, record_routed_experts
from grouter.model import MoEConfig, MoELM


def save_model(tmp_path, data, router: str, name: str, **kw) -> MoELM:
    cfg = MoEConfig(vocab_size=data.vocab_size, max_seq_len=data.seq_len, d_model=32, n_layers=3, n_heads=2,
                    d_expert=16, n_experts=8, top_k=2, router=router, **kw)
    model = MoELM(cfg)
    model.save_pretrained(tmp_path / name)
    return model


@pytest.mark.parametrize("router", ["aux", "stablemoe"])
def test_recorded_ids_are_what_each_layer_chose(tmp_path, tiny_data, router):
    """Every layer's recorded top-k equals the routers' own choice in a forward pass; a StableMoE model
    past its first stage routes by its frozen token-embedding router, and that is what is recorded."""
    model = save_model(tmp_path, tiny_data, router, "m", stablemoe_stage1_steps=1)
    if router == "stablemoe":
        for r in model.routers():
            r.after_step()  # frozen: stage 2
        assert all(r.frozen for r in model.routers())
        model.save_pretrained(tmp_path / "m")
    split = tiny_data.split("train")
    ids = record_routed_experts(tmp_path / "m", tiny_data, "train", batch_size=5, max_sequences=12)
    assert ids.shape == (12, tiny_data.seq_len, 3, 2)
    with torch.no_grad():
        want = model.eval()(split.batch(np.arange(12))["input_ids"]).routing_ids.permute(1, 2, 0, 3).numpy()
    assert np.array_equal(ids, want)
    if router == "stablemoe":  # stage 2: the token-embedding router alone, the same for a token wherever it is
        tokens = split.batch(np.arange(12))["input_ids"].numpy()
        first = {}
        for tok, row in zip(tokens.ravel(), ids[:, :, 0].reshape(-1, 2)):
            assert first.setdefault(int(tok), sorted(row.tolist())) == sorted(row.tolist())
    store = RoutingStore.open(import_routed_experts(tmp_path / "store", {"train": ids}, 8))
    assert store.manifest["grouter_fingerprint"] == IDS_ONLY and len(store.heads) == 3
    assert np.array_equal(np.asarray(store.ids("train")), ids)


def test_recording_needs_a_model_with_its_own_router(tmp_path, tiny_data):
    save_model(tmp_path, tiny_data, "external", "ext")
    with pytest.raises(GrouterError, match="routes with stored routing"):
        record_routed_experts(tmp_path / "ext", tiny_data)
