import numpy as np
import pytest
import torch

from grouter.metrics import grad_norm_cv, max_vio, score_cosine, topk_recall, topk_set_agreement


def test_max_vio_balanced_and_skewed():
    assert max_vio(np.array([5, 5, 5, 5])) == 0.0
    assert max_vio(np.array([8, 0, 0, 0])) == pytest.approx(3.0)  # E - 1 when one expert takes all
    per_layer = max_vio(torch.tensor([[1, 1], [3, 1]]))
    assert per_layer.tolist() == pytest.approx([0.0, 0.5])


def test_max_vio_of_empty_loads_is_zero():
    assert max_vio(np.zeros(4)) == 0.0


def test_topk_set_agreement_ignores_order():
    a = np.array([[0, 1], [2, 3], [4, 5]])
    b = np.array([[1, 0], [2, 4], [5, 4]])
    assert topk_set_agreement(a, b) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        topk_set_agreement(a, b[:, :1])


def test_topk_recall():
    teacher = np.array([[0, 1], [2, 3]])
    student = np.array([[1, 7], [3, 2]])
    assert topk_recall(teacher, student) == pytest.approx(3 / 4)


def test_score_cosine():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert score_cosine(a, a) == pytest.approx(1.0)
    assert score_cosine(a, -a) == pytest.approx(-1.0)


def test_grad_norm_cv_windows():
    assert np.allclose(grad_norm_cv(np.ones(10), 5), 0.0)
    cv = grad_norm_cv(np.array([1.0, 3.0, 1.0, 3.0]), 2)
    assert len(cv) == 3 and np.allclose(cv, 0.5)
    assert grad_norm_cv(np.ones(3), 5).size == 0
