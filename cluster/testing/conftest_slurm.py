"""Session-scoped pytest fixture `slurm_cluster`: a real single-node SLURM for the whole test session.

Use it from a test module by importing the fixture function (pytest_plugins is only honoured in
the root conftest):

    from cluster.testing.conftest_slurm import slurm_cluster  # noqa: F401

The fixture installs slurm-wlm/munge when missing and we are root (CI starts bare), starts the
cluster in a pytest temp dir, exports SLURM_CONF into os.environ for the session (so submitit's
sbatch/squeue/scancel calls and the jobs they launch find it), and stops every daemon it started
at the end.
"""

from __future__ import annotations

import pytest

from cluster.testing.slurm_cluster import SlurmCluster


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), gpus=4)
    cluster.start()
    try:
        with pytest.MonkeyPatch.context() as env:
            for name, value in cluster.env.items():
                env.setenv(name, value)
            yield cluster
    finally:
        cluster.stop()
