import contextlib
import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# `unclip embed` starts a one-worker LocalCluster per run, and that worker imports open_clip (with timm,
# transformers and torchvision: 5-15 s on a 2-core VM) before its first shard. The suite runs embed dozens of
# times, so by default those runs share one LocalCluster, made as `embed_cluster.connect` makes it, as a
# long-lived `--scheduler` cluster serves many runs. Runs with other --workers or --torch-threads, or with
# --scheduler, get their own as before. So do the runs of a test marked `own_cluster` (one that kills its
# workers, reads their stderr, or measures a cold worker) and those a module-scoped fixture makes inside
# `own_embed_cluster()`.
_shared: dict = {}


def pytest_runtest_setup(item):  # before the test's fixtures, module-scoped ones included
    _shared["own"] = item.get_closest_marker("own_cluster") is not None


@pytest.fixture(scope="session")
def own_embed_cluster():
    """A context manager: the embed runs inside it start their own LocalCluster, as a user's run does."""

    @contextlib.contextmanager
    def own():
        before, _shared["own"] = _shared.get("own"), True
        try:
            yield
        finally:
            _shared["own"] = before

    return own


@pytest.fixture(scope="session", autouse=True)
def _embed_runs_share_a_cluster():
    from pipeline import embed, embed_cluster

    def connect(cfg):
        if _shared.get("own") or cfg.scheduler or cfg.workers != 1 or cfg.torch_threads:
            return embed_cluster.connect(cfg)
        from dask.distributed import Client

        if "cluster" not in _shared:
            client, _shared["cluster"] = embed_cluster.connect(cfg)
            client.close()
        return Client(_shared["cluster"].scheduler_address, timeout="30s"), None  # None: the run leaves it be

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(embed, "connect", connect)
        yield
    if "cluster" in _shared:
        _shared.pop("cluster").close()
