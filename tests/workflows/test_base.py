"""The execution layer: MultiProc workers keep to the thread budget, a fit node to its own."""
from __future__ import annotations

import json

import numpy as np

from vaemap_bids.interfaces.fitting import FitModel
from vaemap_bids.physics import make_model
from vaemap_bids.workflows.base import MultiProcPlugin


def _threads() -> tuple[int, int]:
    import torch
    from threadpoolctl import threadpool_info
    return torch.get_num_threads(), max([p["num_threads"] for p in threadpool_info()] or [1])


def test_multiproc_workers_start_with_one_thread():
    plugin = MultiProcPlugin(plugin_args={"n_procs": 2, "memory_gb": 1.0})
    try:
        assert plugin.pool.submit(_threads).result(timeout=120) == (1, 1)
    finally:
        plugin.pool.shutdown(wait=True)


def test_a_fit_node_uses_the_threads_it_asked_for(tmp_path, hcp_acq, rng):
    model = make_model("msdki", hcp_acq)
    truth = np.column_stack([rng.uniform(0.7, 1.5, 50), rng.uniform(0.3, 1.0, 50)])
    signals = np.ones((50, hcp_acq.n_volumes), np.float32)
    signals[:, model.volumes] = model.forward_numpy(truth)
    path = tmp_path / "signals.npz"
    np.savez(path, signals=signals, s0=np.ones(50, np.float32), valid=np.ones(50, bool),
             bvals=hcp_acq.bvals, bvecs=hcp_acq.bvecs)
    node = FitModel(signals_file=str(path), model="msdki", method="lsq", num_threads=1)
    result = node.run(cwd=str(tmp_path))
    record = json.loads(open(result.outputs.record_file).read())
    assert record["threads"] == {"torch": 1, "blas": 1}  # this machine has more
