"""Direct stage runs (python -m stages.embed / stages.retrieve) replace the earlier run's files
only once the new ones exist: a run that fails halfway keeps them. And embed refuses a model file
whose bits changed instead of embedding with a changed model."""
from __future__ import annotations

import contextlib
import shutil

import pytest
from conftest import flip_bit

from clipcore import paths
from clipcore.errors import ClipcoreError
from clipcore.model.checkpoint import DamagedFile, save_model
from clipcore.model.factory import build_model
from clipcore.retrieve.embedding import embed_all
from clipcore.retrieve.retrieval import retrieve_all

TINY = {"model.name": "tiny", "model.pretrained": "none", "embed.num_workers": 0,
        "retrieve.picture_queries": 2}


def test_failed_runs_keep_the_earlier_outputs(tmp_path, params_factory, prepared_demo):
    params = params_factory(TINY)
    with contextlib.chdir(tmp_path):
        model = build_model(params.model)
        for epoch in (0, 1):
            save_model(model, paths.model_path(epoch), backbone_trained=False, epoch=epoch)
        embed_all(params, *prepared_demo)
        retrieve_all(params.retrieve, *prepared_demo)
        earlier = {path: path.read_bytes() for path in
                   [paths.embeddings_path(1), paths.results_path(1), paths.picture_path(1)]}

        # embed: a model file with a flipped bit is refused, naming it. Before, it was embedded
        # with the changed weights, and a failing run had already deleted every embeddings file.
        flip_bit(paths.model_path(1), "data/0")
        with pytest.raises(DamagedFile, match=r"model_epoch_1\.pt: damaged: CRC-32 check"):
            embed_all(params, *prepared_demo)
        assert paths.embeddings_path(1).read_bytes() == earlier[paths.embeddings_path(1)]

        # retrieve: epoch 1 is gone (model file and embeddings) and writing epoch 0's picture
        # fails. Before, every earlier result file and picture had been deleted by then.
        shutil.move(paths.embeddings_path(1), tmp_path / "aside.npz")
        shutil.move(paths.model_path(1), tmp_path / "aside.pt")
        paths.picture_path(0).unlink()
        paths.picture_path(0).mkdir()  # a folder where the picture goes: the write fails
        with pytest.raises(ClipcoreError, match=r"epoch_0\.png: cannot write"):
            retrieve_all(params.retrieve, *prepared_demo)
        for path in (paths.results_path(1), paths.picture_path(1)):
            assert path.read_bytes() == earlier[path]

        # A run that succeeds removes the epochs that no longer exist.
        paths.picture_path(0).rmdir()
        retrieve_all(params.retrieve, *prepared_demo)
        assert not paths.results_path(1).exists() and not paths.picture_path(1).exists()
        assert paths.results_path(0).exists() and paths.picture_path(0).exists()
