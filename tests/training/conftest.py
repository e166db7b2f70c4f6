from __future__ import annotations

from pathlib import Path

import pytest
from training_fixtures import make_blended_dataset, save_tiny_backbone


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory) -> Path:
    return save_tiny_backbone(tmp_path_factory.mktemp("backbone") / "tiny")


@pytest.fixture(scope="session")
def train_dir(tmp_path_factory) -> Path:
    return make_blended_dataset(tmp_path_factory.mktemp("data"), 12, name="train")


@pytest.fixture(scope="session")
def eval_dir(tmp_path_factory) -> Path:
    return make_blended_dataset(tmp_path_factory.mktemp("data"), 4, name="eval")
